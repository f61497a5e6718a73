"""The REST API (``/api/v1``): the same service calls as the app and the CLI, as JSON.

Every error is JSON ``{"error": {"status": ..., "message": ...}}`` with a 4xx/5xx status and a
one-line message; no stack trace ever reaches a client.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    File,
    Form,
    HTTPException,
    Query,
    Request,
    UploadFile,
)
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagesieve.app._service import Service, ServiceError

__all__ = ["API_PREFIX", "add_api"]

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


class ApiError(Exception):
    """An error answered as JSON with its status code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class SqlRequest(BaseModel):
    """A read-only query."""

    sql: str = Field(description="one SELECT (or EXPLAIN SELECT) over the store's tables and views")
    limit: int = Field(1000, ge=1, le=100_000, description="rows returned at most")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "message": message}}, status_code=status)


def _user_error(e: BaseException) -> ApiError:
    """Map library errors (bad image, bad query, no model...) to a 4xx with their one line."""
    from imagesieve.data import ImageLoadError
    from imagesieve.indexer import InputError
    from imagesieve.search._review import ReviewError
    from imagesieve.search._similar import SimilarError
    from imagesieve.search._sql import SqlError

    if isinstance(e, ImageLoadError):
        return ApiError(413 if e.kind in ("too_large", "bomb") else 422, str(e))
    if isinstance(e, ServiceError) and isinstance(e.__cause__, OSError):
        return ApiError(500, str(e))  # the server's disk, not the request
    if isinstance(e, ServiceError) and "no trained model" in str(e):
        return ApiError(503, str(e))
    if isinstance(e, ServiceError) and "limit" in str(e):
        return ApiError(413, str(e))
    if isinstance(e, SqlError | SimilarError | ReviewError | InputError | ServiceError):
        return ApiError(400, str(e))
    raise e


async def _answered(start: Callable[[], Awaitable[Any]]) -> Any:
    """Await what ``start()`` begins; library user errors become ApiError (mapped here only)."""
    try:
        return await start()
    except (ApiError, HTTPException):
        raise
    except Exception as e:
        raise _user_error(e) from None


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking service call on the thread pool; user errors become ApiError."""
    return await _answered(lambda: run_in_threadpool(fn, *args, **kwargs))


async def _read_upload(upload: Any, service: Service, field: str) -> tuple[str, bytes]:
    """The bytes of one multipart file field, within the size limit."""
    if not isinstance(upload, StarletteUpload):
        raise ApiError(422, f"field '{field}' must be a file (multipart/form-data upload)")
    limit = service.limits.max_file_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"{upload.filename or field}: over the {limit:,}-byte upload limit")
    if not data:
        raise ApiError(422, f"{upload.filename or field}: empty file")
    return upload.filename or "upload", data


def add_api(app: FastAPI, service: Service, *, token: str | None = None) -> None:
    """Mount ``/api/v1`` on ``app``: predict, score, similar, sql, clusters, health."""

    def check_token(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "missing or wrong API token: send 'Authorization: Bearer TOKEN'")

    router = APIRouter(prefix=API_PREFIX, dependencies=[Depends(check_token)] if token else [])

    @router.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the model served and how many images are stored."""
        return await _call(service.health)

    @router.post("/predict")
    async def predict(
        file: UploadFile = File(..., description="the image"),  # noqa: B008 - FastAPI's idiom
        neighbours: int = Query(5, ge=0, le=100, description="nearest stored images returned"),
    ) -> JSONResponse:
        """Score one image: Top-3, label (or UNKNOWN and why), nearest stored images; stored."""
        name, data = await _read_upload(file, service, "file")
        result = await _answered(
            lambda: asyncio.wrap_future(service.predict_async(data, name, neighbours=neighbours))
        )
        return JSONResponse(result.to_dict())  # already JSON-ready: skip the generic encoder

    @router.post("/score")
    async def score(
        request: Request,
        column: str | None = Form(None, description="URL/path column of an uploaded CSV/XLSX"),
    ) -> dict[str, Any]:
        """Score many images (multipart field ``files``, repeated; zips and URL lists too)."""
        form = await request.form(
            max_files=service.limits.max_files, max_part_size=service.limits.max_file_bytes
        )
        uploads = form.getlist("files")
        if not uploads:
            raise ApiError(422, "no files: send them as multipart field 'files' (repeated)")
        files = [await _read_upload(u, service, "files") for u in uploads]
        folder = await _call(service.save_uploads, files)
        summary = await _call(
            service.score, [folder / p.name for p in sorted(folder.iterdir())], column=column
        )
        out = summary.to_dict()
        out["upload_dir"] = str(folder)
        return out

    @router.get("/similar")
    async def similar(
        id: int | None = Query(None, description="a stored image id"),  # noqa: A002
        class_name: str | None = Query(None, alias="class", description="a class (its centroid)"),
        k: int = Query(10, ge=1, le=1000),
        max_distance: float | None = Query(None, ge=0, le=2),
        where: str | None = Query(None, description="SQL boolean filter over predictions"),
    ) -> dict[str, Any]:
        """The k stored images nearest to a stored image or a class centroid."""
        info, results = await _call(
            service.similar,
            id=id,
            class_name=class_name,
            k=k,
            max_distance=max_distance,
            where=where,
        )
        return {"query": info.__dict__, "results": [r.to_dict() for r in results]}

    @router.post("/sql")
    async def sql(body: SqlRequest) -> dict[str, Any]:
        """A read-only query over the store (external access off, row and time limits)."""
        result = await _call(service.sql, body.sql, limit=body.limit)
        return result.to_dict()

    @router.get("/clusters")
    async def clusters() -> dict[str, Any]:
        """The UNKNOWN clusters of the active model, largest first."""
        return {"clusters": await _call(service.clusters)}

    app.include_router(router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if not request.url.path.startswith(API_PREFIX):
            return JSONResponse({"detail": e.detail}, status_code=e.status_code)
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error ({type(e).__name__}); see the server log")
