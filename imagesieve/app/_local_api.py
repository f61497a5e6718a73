"""The routes a CLI on this machine uses while this server holds the store (``imagesieve._local``).

Only a request carrying the secret of the server's ``server.json`` gets in: whoever can read
that file (the server's own user) may read the workspace directly too. So these routes do what
the CLI does, local paths included, rather than what an API client may. Each answers JSON
lines: ``{"progress": [stage, done, total]}`` as the work goes, blank keep-alive lines, then one
``{"result": ...}`` or ``{"error": {"kind", "message"}}`` (the CLI's words and exit code).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from imagesieve._errors import SieveError, classify_error
from imagesieve._local import LOCAL_HEADER, LOCAL_PREFIX, is_loopback
from imagesieve.app._service import Service
from imagesieve.ingest import FetchOptions, ScoreOptions
from imagesieve.search import list_clusters

__all__ = ["add_local_api"]

log = logging.getLogger(__name__)

#: Seconds between keep-alive lines while work reports no progress (the CLI reads with a
#: 30 s timeout).
KEEPALIVE = 5.0
#: Least seconds between two progress lines.
PROGRESS_EVERY = 0.2


class LocalScore(BaseModel):
    """``imagesieve score``: its inputs (absolute paths, URLs) and options."""

    inputs: list[str] = Field(default_factory=list)
    model: str | None = None
    threshold: float | None = None
    distance_threshold: float | None = None
    column: str | None = None
    rescore: bool = False
    retry_failed: bool = False
    csv: str | None = None
    sort_into: str | None = None
    keep_images: str = "unknown"
    fetch_workers: int = 16
    read_timeout: float = 15.0


class LocalCluster(BaseModel):
    """``imagesieve cluster``: list, change one (``update_cluster``'s keywords), or run one."""

    list: bool = False
    model: str | None = None
    change: dict[str, Any] | None = None
    export: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class LocalPromote(BaseModel):
    """``imagesieve promote``: a cluster into a training folder (an absolute path)."""

    cluster_id: int
    name: str | None = None
    into: str | None = None
    exclude: list[int] = Field(default_factory=list)
    model: str | None = None


class LocalSql(BaseModel):
    """``imagesieve sql``: one read-only query and its limits (None: none)."""

    sql: str
    limit: int | None = 1000
    timeout: float | None = None


class LocalSimilar(BaseModel):
    """``imagesieve similar``: an image file, a stored id or a class, and the search's options."""

    image: str | None = None
    id: int | None = None
    class_name: str | None = None
    k: int = 10
    max_distance: float | None = None
    where: str | None = None
    model: str | None = None


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
        yield json.dumps({"result": jsonable_encoder(result)}) + "\n"  # as the API encodes

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def add_local_api(app: FastAPI, service: Service, secret: str) -> None:
    """Mount the CLI's routes under ``LOCAL_PREFIX``, open to requests carrying ``secret``."""

    def check_local(request: Request) -> None:
        given = request.headers.get(LOCAL_HEADER, "").encode()
        client = request.client.host if request.client is not None else ""
        if not is_loopback(client) or not hmac.compare_digest(given, secret.encode()):
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
        return streamed(lambda p: str(service.ws.root))

    @router.post("/score")
    def score(body: LocalScore) -> StreamingResponse:
        opts = ScoreOptions(
            model=body.model,
            threshold=body.threshold,
            distance_threshold=body.distance_threshold,
            column=body.column,
            rescore=body.rescore,
            retry_failed=body.retry_failed,
            csv=body.csv,
            sort_into=body.sort_into,
            keep_images=body.keep_images,
            fetch=FetchOptions(workers=body.fetch_workers, read_timeout=body.read_timeout),
        )
        return streamed(lambda p: service.score_local(body.inputs, opts, p).to_dict())

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

    @router.post("/sql")
    def sql(body: LocalSql) -> StreamingResponse:
        return streamed(
            lambda p: service.sql(body.sql, limit=body.limit, timeout=body.timeout).to_dict()
        )

    @router.post("/similar")
    def similar(body: LocalSimilar) -> StreamingResponse:
        def work(p: Any) -> dict[str, Any]:
            info, results = service.similar(**body.model_dump())
            return {"query": info.__dict__, "results": [r.to_dict() for r in results]}

        return streamed(work)

    app.include_router(router)
