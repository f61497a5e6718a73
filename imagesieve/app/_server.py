"""``imagesieve serve``: the REST API and the Gradio app on one uvicorn server.

Loopback only by default. Listening on any other address needs both a UI login
(``--auth user:pass``) and an API token, or the server refuses to start. Request bodies are
capped, declared (Content-Length) or streamed (chunked), uploads by the Gradio app too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException

from imagesieve._access import TOKEN_ENV, TOKEN_FILE_ENV, Tokens, tokens_from_env
from imagesieve._errors import UserError
from imagesieve._local import announce, is_loopback, new_secret, withdraw
from imagesieve.app._service import Service

__all__ = ["RunningServer", "build_server", "check_exposure", "serve", "start_server"]

log = logging.getLogger(__name__)

#: Where ``serve`` finds the app's USER:PASSWORD login when ``--auth`` is not given (containers).
AUTH_ENV = "IMAGESIEVE_AUTH"
#: Multipart framing allowed on top of a file's own size limit.
FORM_OVERHEAD = 1 * 2**20
#: How often the app's idle event queue looks for work, and sends progress (s). Gradio's
#: defaults, 1 ms and 10 ms, are far beyond what a person sees.
UI_QUEUE_POLL = 0.02
UI_PROGRESS_POLL = 0.1


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """'user:pass' -> (user, pass); ValueError naming the expected form."""
    if auth is None:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth must be USER:PASSWORD (both non-empty)")
    return user, password


def check_exposure(
    host: str, auth: tuple[str, str] | None, token: Tokens, *, ui: bool = True
) -> None:
    """Refuse to listen beyond loopback without an API token, and a login when the app is on."""
    if is_loopback(host):
        return
    missing = [
        what
        for what, given in (
            (f"--auth USER:PASSWORD or ${AUTH_ENV} (UI)", auth or not ui),
            (f"--token or ${TOKEN_ENV} or ${TOKEN_FILE_ENV} (API)", token),
        )
        if not given
    ]
    if missing:
        raise UserError(
            f"refusing to listen on {host} (not loopback) without {' and '.join(missing)}"
        )


class _TooLarge(HTTPException):
    """A request body over its cap: a 413 to whichever layer is reading the body.

    Raised from ``receive``; being an HTTPException, body parsers (FastAPI's, Starlette's)
    pass it on rather than answering 400 for a "malformed" body.
    """

    def __init__(self, limit: int):
        super().__init__(
            413,
            f"request body over the {limit:,}-byte limit",
            headers={"connection": "close"},  # the rest of the body is never read
        )


class _BodyLimit:
    """ASGI middleware: 413 JSON for request bodies over the limit, declared or streamed."""

    def __init__(self, app: Any, limit_for: Any):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, _TooLarge(limit))
            return
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge(limit)
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge as e:  # not answered on the way out (a bare ASGI app read the body)
            if started:
                raise
            await self._reject(send, e)

    @staticmethod
    async def _reject(send: Any, e: _TooLarge) -> None:
        body = json.dumps({"error": {"status": e.status_code, "message": e.detail}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": e.status_code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def build_server(
    service: Service,
    *,
    auth: tuple[str, str] | None = None,
    token: Tokens = None,
    ui: bool = True,
    local_secret: str | None = None,
) -> Any:
    """The FastAPI app: ``/api/v1`` (OpenAPI at ``/api/v1/openapi.json``) and the Gradio UI at ``/``.

    ``local_secret``: the routes a CLI beside the server uses (``_local_api``) open to it.
    """
    from fastapi import FastAPI

    import imagesieve
    from imagesieve.app._api import API_PREFIX, add_api

    app = FastAPI(
        title="imagesieve",
        version=getattr(imagesieve, "__version__", "0"),
        description="Score images, search look-alikes, query the history, review UNKNOWN clusters.",
        openapi_url=None,  # served by add_api, behind the API token when one is set
        docs_url=None,
        redoc_url=None,
    )
    add_api(app, service, token=token, local_secret=local_secret)
    limits = service.limits

    def limit_for(path: str) -> int:
        if path == f"{API_PREFIX}/predict":
            return limits.max_file_bytes + FORM_OVERHEAD
        return limits.max_request_bytes + FORM_OVERHEAD

    app.add_middleware(_BodyLimit, limit_for=limit_for)
    if ui:
        # Offline and contained: no usage analytics calls home, and Gradio's upload cache is
        # the workspace's (uploads land in the workspace, never outside it). Gradio reads it
        # from the environment, once per process: a process serves one workspace.
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        os.environ.setdefault("GRADIO_TEMP_DIR", str(service.ws.cache_dir / "gradio"))
        import gradio as gr

        from imagesieve.app.ui import build_app

        blocks = build_app(service)
        app = gr.mount_gradio_app(
            app,
            blocks,
            path="",
            auth=auth,
            max_file_size=limits.max_file_bytes,
            ssr_mode=False,
            footer_links=["api"],
            # Gradio would keep every event's inputs and outputs (uploads, thumbnails) in the
            # browser's localStorage, re-serialising up to 100 of them on each event (page
            # changes slowed from 170 to 580 ms over 15 pages), and offer to send them to a
            # Hugging Face bucket: operators' photos stay on the server.
            run_history=False,
        )
        # Gradio's event queue polls every 1 ms while idle: 1,000 wake-ups a second on the
        # event loop the API shares, each taking the GIL from the scoring threads.
        blocks._queue.sleep_when_free = UI_QUEUE_POLL
        blocks._queue.progress_update_sleep_when_free = UI_PROGRESS_POLL
    return app


@dataclass
class RunningServer:
    """A server running on a background thread."""

    url: str
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        """Ask uvicorn to finish and wait for it."""
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(
    service: Service,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    auth: tuple[str, str] | None = None,
    token: Tokens = None,
    ui: bool = True,
    local_secret: str | None = None,
) -> RunningServer:
    """Start the server on a thread (port 0: a free one); returns once it accepts connections."""
    import uvicorn

    check_exposure(host, auth, token, ui=ui)
    app = build_server(service, auth=auth, token=token, ui=ui, local_secret=local_secret)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_keep_alive=30, access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="imagesieve-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return RunningServer(f"http://{shown}:{bound}", server, thread)


def _warm_quality() -> None:
    """Compile (or load from numba's cache) photo quality's kernel before the first image needs it.

    Compiling takes ~8 s once per install; a request that comes first waits for it otherwise.
    """
    from imagesieve.classifier import compile_quality

    try:
        compile_quality()
    except Exception:  # the first image then compiles it, and reports what went wrong
        log.exception("photo quality's kernel did not compile at start")


def serve(
    service: Service,
    host: str = "127.0.0.1",
    port: int = 7860,
    *,
    auth: str | None = None,
    token: Tokens = None,
    ui: bool = True,
    on_ready: Any = None,
) -> None:
    """Serve until Ctrl-C or SIGTERM, then stop cleanly; ``on_ready(url)`` is called once it listens.

    Both signals are handled even when the parent started us with SIGINT ignored (a shell's
    background job, nohup), so ``kill`` and Ctrl-C always close the store properly. While it
    runs, ``server.json`` in the workspace lets the CLI work through it (``_local``).
    """
    token = token or tokens_from_env()
    auth = auth or os.environ.get(AUTH_ENV) or None
    secret = new_secret()
    running = start_server(
        service, host, port, auth=parse_auth(auth), token=token, ui=ui, local_secret=secret
    )
    record = announce(service.ws.root, running.url, secret)
    threading.Thread(target=_warm_quality, name="imagesieve-warm", daemon=True).start()
    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    if on_ready is not None:
        on_ready(running.url)
    try:
        while running.thread.is_alive() and not stop.wait(0.5):
            pass
    finally:
        withdraw(service.ws.root, record)
        service.stopping.set()
        running.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
