"""The routes a CLI on this machine uses while this server holds the store (``imagesieve._local``).

Only a request carrying the secret of the server's ``server.json`` gets in: whoever can read
that file (the server's own user) may read the workspace directly too. So these routes do what
the CLI does, local paths included, rather than what an API client may. Each answers JSON
lines: ``{"progress": [stage, done, total]}`` as the work goes, blank keep-alive lines, then one
``{"result": ...}`` or ``{"error": {"kind", "message"}}`` (the CLI's words and exit code).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from imagesieve import __version__
from imagesieve._errors import SieveError, classify_error
from imagesieve._local import LOCAL_HEADER, LOCAL_PREFIX, is_loopback
from imagesieve.app._service import Service
from imagesieve.ingest import (
    ScoreOptions,
    batch_detail,
    drift_history,
    list_batches,
    write_batch_report,
)
from imagesieve.search import (
    apply_thresholds,
    audit_log,
    browse_images,
    fix_training_labels,
    keep_one,
    list_clusters,
    list_duplicates,
    map_points,
    relabel_images,
    similar_answer,
    threshold_counts,
    undo_action,
)
from imagesieve.store import ImageQuery

__all__ = ["add_local_api"]

log = logging.getLogger(__name__)

#: Seconds between keep-alive lines while work reports no progress (the CLI reads with a
#: 30 s timeout).
KEEPALIVE = 5.0
#: Least seconds between two progress lines.
PROGRESS_EVERY = 0.2


class _Body(BaseModel):
    """A local request's body: a field unknown here is an error (a CLI's options never dropped)."""

    model_config = ConfigDict(extra="forbid")


class LocalScore(_Body):
    """``imagesieve score``: its inputs (absolute paths, URLs) and ``ScoreOptions.to_dict()``."""

    inputs: list[str] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)


class LocalCluster(_Body):
    """``imagesieve cluster``: list, change one (``update_cluster``'s keywords), or run one."""

    list: bool = False
    model: str | None = None
    change: dict[str, Any] | None = None
    export: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class LocalPromote(_Body):
    """``imagesieve promote``: a cluster into a training folder (an absolute path)."""

    cluster_id: int
    name: str | None = None
    into: str | None = None
    exclude: list[int] = Field(default_factory=list)
    model: str | None = None


class LocalCall(_Body):
    """One library call of a CLI verb (``_library``), with the server's store."""

    function: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class LocalMap(_Body):
    """``imagesieve map``: make a version's map, then its points coloured."""

    model: str | None = None
    max_points: int | None = None
    color_by: str = "label"


class LocalSql(_Body):
    """``imagesieve sql``: one read-only query and its limits (None: none)."""

    sql: str
    limit: int | None = 1000
    timeout: float | None = None


class LocalSimilar(_Body):
    """``imagesieve similar``: an image file, a stored id or a class, and the search's options."""

    image: str | None = None
    id: int | None = None
    class_name: str | None = None
    k: int = 10
    max_distance: float | None = None
    where: str | None = None
    model: str | None = None


def _as_cli_writes(value: Any) -> Any:
    """JSON for what ``json`` cannot write, as the CLI's ``--json`` writes it alone (``str``).

    Numbers stay numbers (numpy's too) and dataclasses objects, so the CLI prints them alike.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if callable(getattr(value, "item", None)):  # a numpy scalar
        return value.item()
    return str(value)


def _streamed(
    work: Callable[[Callable[[str, int, int], None]], Any], stopping: threading.Event
) -> StreamingResponse:
    """Run ``work(progress)`` on a thread; stream its progress, then its result or error.

    The work ends at its next progress report when the client goes away (Ctrl-C) or the
    server is ``stopping``.
    """

    async def lines() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list] = asyncio.Queue()
        gone = threading.Event()
        last = 0.0

        def progress(stage: str, done: int, total: int) -> None:
            nonlocal last
            if gone.is_set():  # the CLI stopped (Ctrl-C): so does its work, as it would alone
                raise SieveError("the CLI that asked for this stopped waiting", "conflict")
            if stopping.is_set():
                raise SieveError(
                    "the server is stopping: what was done so far is stored; run the command "
                    "again (to finish it here alone, or through the server once it is back)",
                    "stopping",
                )
            now = time.monotonic()
            if now - last >= PROGRESS_EVERY or (total and done >= total):
                last = now
                loop.call_soon_threadsafe(queue.put_nowait, [stage, int(done), int(total)])

        job = loop.run_in_executor(None, work, progress)
        try:
            while not job.done() or not queue.empty():
                if not queue.empty():
                    yield json.dumps({"progress": queue.get_nowait()}) + "\n"
                    continue
                waiting = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    {waiting, job}, timeout=KEEPALIVE, return_when=asyncio.FIRST_COMPLETED
                )
                if waiting in done:
                    yield json.dumps({"progress": waiting.result()}) + "\n"
                    continue
                waiting.cancel()
                if not done:
                    yield "\n"
        finally:  # the client went away (the stream is cancelled) before the work ended
            if not job.done():
                gone.set()
        try:
            result = job.result()
        except Exception as e:  # the CLI's words and kind: it is the CLI that shows them
            kind, message = classify_error(e)
            if kind == "internal":
                log.exception("a local CLI request failed")
            yield json.dumps({"error": {"kind": kind, "message": message}}) + "\n"
            return
        yield json.dumps({"result": result}, default=_as_cli_writes) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _library(service: Service) -> dict[str, Callable[..., Any]]:
    """The library calls of the CLI's other verbs, made with the server's store, by name.

    An action that changes what the server serves (labels, thresholds, clusters) is followed
    (``Service.follow_changes``), as the app's own actions are.
    """
    ws, store = service.ws, service.store

    def on_store(fn: Callable[..., Any], *, follows: bool = False) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            done = fn(ws, *args, store=store, **kwargs)
            if follows:
                service.follow_changes()
            return done

        return call

    def browse(query: dict[str, Any], **kwargs: Any) -> Any:
        days = {k: dt.date.fromisoformat(query[k]) for k in ("day_from", "day_to") if query[k]}
        return browse_images(ws, ImageQuery(**(query | days)), store=store, **kwargs)

    def report_file(batch_id: int, path: str, fmt: str) -> str:
        with open(path, "wb") as f:
            write_batch_report(ws, batch_id, f, fmt=fmt, store=store)
        return path

    return {
        "apply_thresholds": on_store(apply_thresholds, follows=True),
        "audit_log": on_store(audit_log),
        "batch_detail": on_store(batch_detail),
        "browse_images": browse,
        "drift_history": on_store(drift_history),
        "fix_training_labels": on_store(fix_training_labels, follows=True),
        "keep_one": on_store(keep_one, follows=True),
        "list_batches": on_store(list_batches),
        "list_duplicates": on_store(list_duplicates),
        "relabel_images": on_store(relabel_images, follows=True),
        "threshold_counts": on_store(threshold_counts),
        "undo_action": on_store(undo_action, follows=True),
        "write_batch_report_file": report_file,
    }


def add_local_api(app: FastAPI, service: Service, secret: str) -> None:
    """Mount the CLI's routes under ``LOCAL_PREFIX``, open to requests carrying ``secret``."""

    def check_local(request: Request) -> None:
        given = request.headers.get(LOCAL_HEADER, "").encode()
        client = request.client.host if request.client is not None else ""
        own = (request.scope.get("server") or ("",))[0]  # this machine, when listening on it
        local = is_loopback(client) or client == own
        if not local or not hmac.compare_digest(given, secret.encode()):
            raise HTTPException(
                403, f"local routes are for the CLI on this machine ({LOCAL_HEADER})"
            )

    router = APIRouter(
        prefix=LOCAL_PREFIX, dependencies=[Depends(check_local)], include_in_schema=False
    )

    def streamed(work: Callable[[Callable[[str, int, int], None]], Any]) -> StreamingResponse:
        return _streamed(work, service.stopping)

    @router.post("/ping")
    def ping() -> StreamingResponse:
        def work(p: Any) -> dict[str, str]:
            service.follow_active()  # a version `train` just made: served before the CLI's call
            return {"root": str(service.ws.root), "version": __version__}

        return streamed(work)

    @router.post("/score")
    def score(body: LocalScore) -> StreamingResponse:
        return streamed(
            lambda p: service.score_local(
                body.inputs, ScoreOptions.from_dict(body.options), p
            ).to_dict()
        )

    @router.post("/cluster")
    def cluster(body: LocalCluster) -> StreamingResponse:
        if body.list:
            return streamed(
                lambda p: list_clusters(service.ws, model=body.model, store=service.store)
            )
        if body.change is not None:
            return streamed(lambda p: service.update_cluster(model=body.model, **body.change))
        return streamed(
            lambda p: service.run_clustering(
                p, model=body.model, export=body.export, **body.params
            ).to_dict()
        )

    @router.post("/promote")
    def promote(body: LocalPromote) -> StreamingResponse:
        return streamed(
            lambda p: service.promote_cluster(
                body.cluster_id, body.name, body.into, tuple(body.exclude), model=body.model
            ).to_dict()
        )

    library = _library(service)

    @router.post("/call")
    def call(body: LocalCall) -> StreamingResponse:
        fn = library.get(body.function)
        if fn is None:
            raise HTTPException(404, f"no local call {body.function!r}")
        return streamed(lambda p: fn(*body.args, **body.kwargs))

    @router.post("/map")
    def embedding_map(body: LocalMap) -> StreamingResponse:
        def work(p: Any) -> dict[str, Any]:
            made = service.make_map(p, model=body.model, max_points=body.max_points)
            colour = {"color_by": body.color_by, "model": made["version"]}
            return map_points(service.ws, store=service.store, **colour)

        return streamed(work)

    @router.post("/sql")
    def sql(body: LocalSql) -> StreamingResponse:
        return streamed(
            lambda p: service.sql(body.sql, limit=body.limit, timeout=body.timeout).to_dict()
        )

    @router.post("/similar")
    def similar(body: LocalSimilar) -> StreamingResponse:
        return streamed(lambda p: similar_answer(*service.similar(**body.model_dump())))

    app.include_router(router)
