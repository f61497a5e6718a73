"""The REST API (``/api/v1``): the same service calls as the app and the CLI, as JSON.

Every error is JSON ``{"error": {"status": ..., "message": ...}}`` with a 4xx/5xx status and a
one-line message; no stack trace ever reaches a client.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import aclosing
from datetime import date
from typing import Annotated, Any, Literal

from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    File,
    HTTPException,
    Path,
    Query,
    Request,
    UploadFile,
)
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from imagesieve._errors import KINDS, classify_error
from imagesieve.app._local_api import add_local_api
from imagesieve.app._service import Limits, Service
from imagesieve.ingest import REPORT_FORMATS, report_media_type
from imagesieve.search import MAX_RELABEL, MAX_TRADEOFF_RATES, similar_answer
from imagesieve.store import MAX_PAGE, SORTS, ImageQuery

__all__ = ["API_PREFIX", "add_api"]

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
#: A photo quality bound an operator may set (``classifier.QualityRule``'s fields).
QualityBound = Literal[
    "blur_max",
    "edge_blur_max",
    "dark_max",
    "highlights_min",
    "bright_min",
    "clipped_min",
    "glare_min",
    "entropy_min",
    "min_side",
    "aspect_max",
]


class ApiError(Exception):
    """An error answered as JSON with its status code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class ErrorDetail(BaseModel):
    """What went wrong."""

    status: int = Field(description="the HTTP status code, repeated")
    message: str = Field(description="one line saying what went wrong and how to fix it")


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


class SqlRequest(BaseModel):
    """A read-only query."""

    sql: str = Field(description="one SELECT (or EXPLAIN SELECT) over the store's tables and views")
    limit: int = Field(1000, ge=1, le=100_000, description="rows returned at most")


#: A model version's name in a path: a plain folder name of this workspace's models.
VersionName = Annotated[
    str,
    Path(max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="a model version, e.g. v2"),
]
#: A stored id as requests give it: bounded, so no value overflows the store's integers.
StoredId = Annotated[int, Field(ge=0, le=2**53)]
_NAME = {"min_length": 1, "max_length": 100, "description": "a class name (one folder name)"}
_IDS = {"min_length": 1, "max_length": MAX_RELABEL, "description": "stored image ids"}


class RelabelRequest(BaseModel):
    """Stored images and the class they belong to (``UNKNOWN``: none; they leave any class)."""

    ids: list[StoredId] = Field(**_IDS)
    label: str = Field(**_NAME)


class NameRequest(BaseModel):
    """A name for a cluster: its new class, or an existing class to merge it into."""

    name: str = Field(**_NAME)


class ExcludeRequest(BaseModel):
    """Members to leave out of a cluster's promotion."""

    ids: list[StoredId] = Field(**_IDS)


class PromoteRequest(BaseModel):
    """Promote a cluster into the active model's training folder."""

    name: str | None = Field(
        None, min_length=1, max_length=100, description="its class (default: its name)"
    )
    exclude: list[StoredId] = Field(
        [], max_length=MAX_RELABEL, description="member ids to leave out as well"
    )


class ClusterRunRequest(BaseModel):
    """Cluster the active model's UNKNOWN images (as `imagesieve cluster` and the app do)."""

    min_cluster_size: int | None = Field(
        None,
        ge=2,
        le=100_000,
        description="fewest images that make a cluster (default: adapts to the number of "
        "UNKNOWNs, max(5, sqrt(n) / 4))",
    )
    poor_quality: bool = Field(
        False, description="cluster photos of poor quality too (left out by default: reshoot them)"
    )


class ThresholdsRequest(BaseModel):
    """UNKNOWN thresholds: below this Top-1 probability, or further than this distance."""

    confidence: float = Field(ge=0, le=1, description="Top-1 probability below which it is UNKNOWN")
    distance: float | None = Field(
        None, ge=0, le=10, description="distance score above which it is UNKNOWN (null: off)"
    )
    quality: (
        dict[QualityBound, Annotated[float, Field(ge=0, le=1e6)] | Literal["auto"] | None] | None
    ) = Field(
        None,
        description=(
            "photo quality bounds over the calibrated ones: a number, null to switch the check "
            'off, "auto" for the calibrated value (omitted: unchanged)'
        ),
    )
    target: float | None = Field(
        None,
        gt=0,
        lt=1,
        description=(
            "the false-UNKNOWN rate these thresholds were calibrated for (GET "
            "/thresholds/calibrated): the held-out check judges against it, PUT records it"
        ),
    )


class FixLabelsRequest(BaseModel):
    """Suspected label errors to move into a class's folder, or out of the training data."""

    paths: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        min_length=1, max_length=500, description="paths as GET /label-suspects lists them"
    )
    label: str | None = Field(
        None, min_length=1, max_length=100, description="the class (null: remove from the data)"
    )


class KeepOneRequest(BaseModel):
    """Which stored image of a near-duplicate group to keep."""

    keep: int = Field(ge=1, le=2**62, description="the stored image kept (predictions.id)")


class UndoRequest(BaseModel):
    """Which action to undo."""

    action_id: int | None = Field(
        None, ge=1, le=2**31 - 1, description="a recorded action (default: the latest)"
    )


#: When each documented error status is answered.
ERROR_WHEN = {
    400: "The request cannot be done: a bad query, filter, id or column, or a malformed body.",
    401: "The API token is missing or wrong: send 'Authorization: Bearer TOKEN'.",
    409: "Clashes with what is going on (a training run) or was done since (undo that first).",
    413: "An upload over a limit: bytes per file, files per request or bytes per request.",
    422: "A missing or invalid parameter, or a file that is not a readable image.",
    500: "An unexpected error, or the server could not read or write a file; see its log.",
    501: "Asked of the slim install (no torch): training is done where the full install is.",
    503: "No trained model or backbone weights yet, the store is busy, the server cannot write "
    "to its workspace, or it is stopping.",
    507: "The server's disk is full.",
}

#: The multipart body of ``POST /score``, read by the handler itself (within the limits).
SCORE_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "images, zips, or CSV/XLSX/TXT lists of URLs or paths",
                    },
                    "column": {
                        "type": "string",
                        "description": "URL/path column of an uploaded CSV/XLSX",
                    },
                },
            },
            "encoding": {"files": {"contentType": "application/octet-stream"}},
        }
    },
}


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "message": message}}, status_code=status, headers=headers
    )


def _user_error(e: BaseException) -> ApiError:
    """A library error (bad image or query, no model, full disk...) as an ApiError, by its kind.

    An unexpected error is raised again: ``server_error`` logs its traceback.
    """
    kind, message = classify_error(e, server=True)
    if kind == "internal":
        raise e
    if kind in ("disk_full", "read_only"):
        log.error("cannot write to the workspace: %s", e.__cause__ or e)
    return ApiError(KINDS[kind].status, message)


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


class _TooManyFiles(Exception):
    pass


class _UploadParser(MultiPartParser):
    """Starlette's multipart parser; one file over ``max_files`` is a 413, not a bad body."""

    def on_headers_finished(self) -> None:
        try:
            super().on_headers_finished()
        except MultiPartException:
            if self._current_files > self.max_files:
                raise _TooManyFiles from None
            raise


async def _read_form(request: Request, limits: Limits) -> FormData:
    """The multipart form of an upload request, within the files-per-request limit."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind != "multipart/form-data":
        raise ApiError(422, "no files: send them as multipart/form-data field 'files' (repeated)")
    try:
        async with aclosing(request.stream()) as stream:
            return await _UploadParser(
                request.headers,
                stream,
                max_files=limits.max_files,
                max_part_size=limits.max_file_bytes,
            ).parse()
    except _TooManyFiles:
        raise ApiError(
            413, f"over the limit of {limits.max_files:,} files per upload: send fewer per request"
        ) from None
    except MultiPartException as e:
        raise ApiError(400, f"malformed multipart/form-data body: {e.message}") from None


class _AnyMethod:
    """An ASGI endpoint answering every HTTP method (a function endpoint answers GET only)."""

    def __init__(self, answer: Callable[[Request], Awaitable[Response]]):
        self.answer = answer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        response = await self.answer(Request(scope, receive))
        await response(scope, receive, send)


def _who(request: Request) -> str:
    """Who acts through the API, for the audit log: ``api:<token name>``, else the address."""
    name = getattr(request.state, "token_name", None)
    return f"api:{name or (request.client.host if request.client else 'unknown')}"


def add_api(
    app: FastAPI,
    service: Service,
    *,
    token: str | Mapping[str, str | None] | None = None,
    local_secret: str | None = None,
) -> None:
    """Mount ``/api/v1`` on ``app``: predict, score, similar, sql, clusters, history, health, docs.

    ``token``: one secret, or secrets mapped to names (``parse_tokens``); a named token's name
    is who the audit log records for its requests. ``local_secret`` opens the routes a CLI
    beside the server works through (``_local_api``).
    """
    bearer = HTTPBearer(auto_error=False, description="the server's API token (--token)")
    tokens = {token: None} if isinstance(token, str) else dict(token or {})

    def check_token(
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> None:
        given = (credentials.credentials if credentials is not None else "").encode()
        found = [
            name for secret, name in tokens.items() if hmac.compare_digest(given, secret.encode())
        ]
        if not found:
            raise ApiError(401, "missing or wrong API token: send 'Authorization: Bearer TOKEN'")
        request.state.token_name = found[0]

    def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
        """The documented error answers of a route: ``statuses``, 500, and 401 with a token."""
        codes = sorted({*statuses, 500, *([401] if token else [])})
        return {s: {"model": ErrorBody, "description": ERROR_WHEN[s]} for s in codes}

    router = APIRouter(prefix=API_PREFIX, dependencies=[Depends(check_token)] if token else [])

    @router.get("/health", responses=errors())
    async def health() -> dict[str, Any]:
        """Liveness, the model served and how many images are stored."""
        return await _call(service.health)

    @router.post("/predict", responses=errors(400, 413, 422, 503, 507))
    async def predict(
        file: UploadFile = File(..., description="the image"),
        neighbours: int = Query(5, ge=0, le=100, description="nearest stored images returned"),
    ) -> JSONResponse:
        """Score one image: Top-3, label (or UNKNOWN and why), nearest stored images; stored."""
        name, data = await _read_upload(file, service, "file")
        result = await _answered(
            lambda: asyncio.wrap_future(service.predict_async(data, name, neighbours=neighbours))
        )
        return JSONResponse(result.to_dict())  # already JSON-ready: skip the generic encoder

    @router.post(
        "/score",
        responses=errors(400, 413, 422, 503, 507),
        openapi_extra={"requestBody": SCORE_BODY},
    )
    async def score(request: Request) -> dict[str, Any]:
        """Score many images (multipart field ``files``, repeated; zips and URL lists too)."""
        form = await _read_form(request, service.limits)
        try:
            column = form.get("column") or None
            if column is not None and not isinstance(column, str):
                raise ApiError(422, "field 'column' must be text (a column name), not a file")
            uploads = form.getlist("files")
            if not uploads:
                raise ApiError(422, "no files: send them as multipart field 'files' (repeated)")
            files = [await _read_upload(u, service, "files") for u in uploads]
        finally:
            await form.close()
        folder, saved = await _call(service.save_uploads, files)
        summary = await _call(service.score, saved, column=column)
        return {**summary.to_dict(), "upload_dir": str(folder)}

    @router.get("/similar", responses=errors(400, 422, 503))
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
        return similar_answer(info, results)

    @router.post("/sql", responses=errors(400, 422))
    async def sql(body: SqlRequest) -> dict[str, Any]:
        """A read-only query over the store (external access off, row and time limits)."""
        return (await _call(service.sql, body.sql, limit=body.limit)).to_dict()

    @router.get("/clusters", responses=errors(503))
    async def clusters() -> dict[str, Any]:
        """The UNKNOWN clusters of the active model, largest first.

        Each with its status, name, size, medoid, Top-1/Top-2 histograms, ``pending`` (members
        no person has labelled, left out or set aside yet) and ``open`` (work for review: new or
        named, or promoted with members pending).
        """
        return {"clusters": await _call(service.clusters)}

    @router.post("/clusters/run", status_code=202, responses=errors(400, 409, 503))
    async def run_clusters(body: ClusterRunRequest) -> dict[str, Any]:
        """Cluster the UNKNOWN images in the background; poll ``GET /clusters/run``.

        Cluster ids continue those of the last run, so names stick; the run replaces the
        clusters ``GET /clusters`` lists. One run at a time (409 while one runs).
        """
        return await _call(
            service.start_clustering,
            min_cluster_size=body.min_cluster_size,
            poor_quality=body.poor_quality,
        )

    @router.get("/clusters/run", responses=errors())
    async def clustering_status() -> dict[str, Any]:
        """The clustering run's status: running and stage, then ``run`` or ``error``.

        ``run``: images clustered, noise, the clusters, seconds and ``left_out`` (poor photos
        and set-aside near-duplicates, not clustered).
        """
        return dict(service.clustering_status)

    @router.get("/clusters/{cluster_id}/members", responses=errors(400, 503))
    async def cluster_members(
        cluster_id: int = Path(..., ge=0, le=2**31 - 1),
        limit: int = Query(48, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=10_000_000),
    ) -> dict[str, Any]:
        """A page of a cluster's members, least typical first (GLOSH outlier score)."""
        rows = await _call(service.cluster_members, cluster_id, limit, offset)
        return {"cluster_id": cluster_id, "offset": offset, "members": rows}

    @router.post("/clusters/{cluster_id}/name", responses=errors(400, 503))
    async def name_cluster(
        body: NameRequest,
        request: Request,
        cluster_id: int = Path(..., ge=0, le=2**31 - 1),
    ) -> dict[str, Any]:
        """Name a cluster (recorded in the audit log)."""
        return await _call(service.update_cluster, cluster_id, name=body.name, who=_who(request))

    @router.post("/clusters/{cluster_id}/exclude", responses=errors(400, 503))
    async def exclude_members(
        body: ExcludeRequest,
        request: Request,
        cluster_id: int = Path(..., ge=0, le=2**31 - 1),
    ) -> dict[str, Any]:
        """Leave members out of a cluster's promotion (recorded)."""
        return await _call(
            service.update_cluster, cluster_id, exclude=tuple(body.ids), who=_who(request)
        )

    @router.post("/clusters/{cluster_id}/reject", responses=errors(400, 503))
    async def reject_cluster(
        request: Request,
        cluster_id: int = Path(..., ge=0, le=2**31 - 1),
    ) -> dict[str, Any]:
        """Reject a cluster: not a new kind (recorded)."""
        return await _call(service.update_cluster, cluster_id, reject=True, who=_who(request))

    @router.post("/clusters/{cluster_id}/promote", responses=errors(400, 503, 507))
    async def promote(
        body: PromoteRequest,
        request: Request,
        cluster_id: int = Path(..., ge=0, le=2**31 - 1),
    ) -> dict[str, Any]:
        """Copy a cluster's images into the active model's training folder as a class.

        An existing class's name merges the cluster into it. Recorded, undoable.
        """
        result = await _call(
            service.promote_cluster,
            cluster_id,
            body.name or None,
            exclude=tuple(body.exclude),
            who=_who(request),
        )
        return result.to_dict()

    @router.post("/images/relabel", responses=errors(400, 503, 507))
    async def relabel(body: RelabelRequest, request: Request) -> dict[str, Any]:
        """Give stored images a class; they join its training data (recorded, undoable)."""
        result = await _call(service.relabel, body.ids, body.label, who=_who(request))
        return result.to_dict()

    @router.post("/images/exclude", responses=errors(400, 503))
    async def exclude_images(body: ExcludeRequest, request: Request) -> dict[str, Any]:
        """Leave stored images out of the promotion of the clusters they are in (recorded).

        One recorded exclusion per cluster; images in no cluster are counted, not changed.
        """
        return await _call(service.exclude_images, body.ids, who=_who(request))

    @router.get("/images", responses=errors(400, 503))
    async def images(
        label: list[str] | None = Query(None, max_length=100, description="predicted labels"),
        reason: list[str] | None = Query(None, max_length=10, description="UNKNOWN reasons"),
        top1_class: list[str] | None = Query(None, max_length=100, description="Top-1 classes"),
        human_label: list[str] | None = Query(
            None, max_length=100, description="labels people gave ('' : nobody labelled it)"
        ),
        quality: list[str] | None = Query(
            None,
            max_length=10,
            description="photo quality flags: blurred, dark, bright, glare, low_information, "
            "too_small, odd_shape ('' : none)",
        ),
        duplicates: list[Literal["none", "kept", "set_aside"]] | None = Query(
            None,
            max_length=3,
            description="near-duplicate states: none (no near-duplicate stored), kept (in a "
            "group, not set aside), set_aside (a near-duplicate was kept instead)",
        ),
        min_confidence: float | None = Query(None, ge=0, le=1),
        max_confidence: float | None = Query(None, ge=0, le=1),
        min_distance: float | None = Query(None, ge=0, le=10),
        max_distance: float | None = Query(None, ge=0, le=10),
        batch_id: list[StoredId] | None = Query(None, max_length=100),
        cluster_id: list[Annotated[int, Field(ge=-1, le=2**31 - 1)]] | None = Query(
            None, max_length=100, description="clusters (-1: noise)"
        ),
        day_from: date | None = Query(None, description="first UTC day of scoring"),
        day_to: date | None = Query(None, description="last UTC day of scoring"),
        sort: str = Query("id", description=f"one of {', '.join(SORTS)}"),
        limit: int = Query(48, ge=1, le=MAX_PAGE),
        offset: int = Query(0, ge=0, le=10_000_000),
        facets: bool = Query(True, description="count the filtered images by facet"),
    ) -> dict[str, Any]:
        """A page of the active model's stored images: filters, sort, total and facet counts.

        Every row has its prediction, UNKNOWN reason, cluster, batch and the label a person gave.
        """

        def run() -> dict[str, Any]:
            query = ImageQuery(
                labels=label,
                reasons=reason,
                top1_classes=top1_class,
                human_labels=human_label,
                quality=quality,
                duplicates=duplicates,
                min_confidence=min_confidence,
                max_confidence=max_confidence,
                min_distance=min_distance,
                max_distance=max_distance,
                batch_ids=batch_id,
                cluster_ids=cluster_id,
                day_from=day_from,
                day_to=day_to,
                sort=sort,
            )
            return service.browse(query, limit=limit, offset=offset, facets=facets)

        return await _call(run)

    @router.get("/map", responses=errors(400, 503))
    async def embedding_map(
        color_by: str = Query("label", description="label, reason, cluster or class"),
    ) -> dict[str, Any]:
        """The active model's embedding map: stored ids, 2-D positions in [0, 1], colours.

        ``points`` is 0 until a map is made (``POST /map``); the status of one being made is
        under ``making``.
        """
        doc = await _call(service.embedding_map, color_by)
        return doc | {"making": dict(service.map_status)}

    @router.post("/map", status_code=202, responses=errors(409, 503))
    async def make_map() -> dict[str, Any]:
        """Project the stored embeddings to 2-D in the background (cached per model version)."""
        return await _call(service.make_map, background=True)

    @router.get("/batches", responses=errors())
    async def batches(
        limit: int = Query(50, ge=1, le=1000), offset: int = Query(0, ge=0, le=10_000_000)
    ) -> dict[str, Any]:
        """Scoring batches, newest first: when, model, items, scored, failed, UNKNOWN rate."""
        return await _call(service.batches, limit, offset)

    @router.get("/batches/{batch_id}", responses=errors(400))
    async def batch(batch_id: int = Path(..., ge=1, le=2**31 - 1)) -> dict[str, Any]:
        """One batch: counts, what it was asked to score, each failure and its reason, drift.

        ``drift``: whether its images departed from the training data (their distances to it
        against held-out known images', two-sample KS test), as the ``drift_per_batch`` view.
        """
        return await _call(service.batch, batch_id)

    @router.get("/label-suspects", responses=errors(503))
    async def suspects() -> dict[str, Any]:
        """Training images whose label looks wrong, likeliest first.

        Found at training (confident learning): path, given class, suggested class and both
        probabilities.
        """
        return await _call(service.label_suspects)

    @router.post("/label-suspects/fix", responses=errors(400, 503))
    async def fix_labels(body: FixLabelsRequest, request: Request) -> dict[str, Any]:
        """Move suspected images into a class's folder, or out of the training data.

        Only images the label check named; recorded and undoable.
        """
        return await _call(service.fix_training_labels, body.paths, body.label, who=_who(request))

    @router.get("/duplicates", responses=errors(400))
    async def duplicates(
        limit: int = Query(20, ge=1, le=100, description="groups per page"),
        offset: int = Query(0, ge=0, le=10_000_000, description="groups skipped"),
    ) -> dict[str, Any]:
        """Groups of near-duplicate stored images, and contents that arrived under several names.

        Largest group first; exact duplicates share a SHA-256 and are stored once. The active
        version's calibrated rule; images stored since the last look are linked first. Each
        group: group_id, size, kept, and members (id, source, label, duplicate_of).
        """
        return await _call(service.duplicates, limit, offset)

    @router.post("/duplicates/keep", responses=errors(400, 409))
    async def keep_one(body: KeepOneRequest, request: Request) -> dict[str, Any]:
        """Keep one image of its near-duplicate group and set the others aside.

        Set-aside images are not clustered and not promoted; recorded and undoable.
        """
        return await _call(service.keep_one, body.keep, who=_who(request))

    @router.get("/drift", responses=errors(400))
    async def drift(
        per: Literal["batch", "day"] = Query("batch", description="per batch or per UTC day"),
        limit: int = Query(100, ge=1, le=1000),
    ) -> dict[str, Any]:
        """Whether each batch (or UTC day) departed from the training data, newest first.

        Per batch or day: UNKNOWN and poor-quality rates, the median distance to the training
        data against held-out known images', the two-sample KS test and ``drifted``.
        """
        return {"per": per, "drift": await _call(service.drift, per, limit)}

    @router.get(
        "/batches/{batch_id}/report",
        responses=errors(400)
        | {
            200: {
                "content": {report_media_type(f): {} for f in REPORT_FORMATS},
                "description": "the report file, named by batch and day",
            }
        },
        response_class=StreamingResponse,
    )
    async def batch_report(
        batch_id: int = Path(..., ge=1, le=2**31 - 1),
        format: Literal["csv", "xlsx"] = Query(  # noqa: A002 - the query parameter's name
            "csv", description="csv, or xlsx for Excel (numbers as numbers, ids as text)"
        ),
    ) -> StreamingResponse:
        """A batch's report: its inputs in input order, each with what became of it.

        The input sheet's own columns first, then outcome, stored id, label, Top-3, distance,
        cluster, a person's label or why it failed.
        """
        name, chunks = await _call(service.batch_report, batch_id, format)
        return StreamingResponse(
            chunks,
            media_type=report_media_type(format),
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @router.get("/versions", responses=errors())
    async def versions() -> dict[str, Any]:
        """Every model version with its metrics; the active one marked.

        ``unknown_rate`` and ``unknown_vs_target``: the version's test images (all of known
        classes) at the thresholds it has now, an operator's once ``thresholds_tuned``.
        """
        return {"versions": await _call(service.versions)}

    @router.post("/versions/{name}/activate", responses=errors(400, 503))
    async def activate(
        request: Request,
        name: VersionName,
    ) -> dict[str, Any]:
        """Serve this version from now on (recorded, undoable)."""
        version = await _call(service.activate, name, who=_who(request))
        return {"active": version.name}

    @router.get("/thresholds", responses=errors(503))
    async def thresholds() -> dict[str, Any]:
        """The active model's UNKNOWN thresholds and how many stored images are UNKNOWN.

        ``counts.held_out``: how many of the version's held-out test images, all of known
        classes, the thresholds mark UNKNOWN (false alarms), against the calibration's target.
        """
        return await _call(service.thresholds)

    @router.get("/thresholds/calibrated", responses=errors(400, 503))
    async def thresholds_calibrated(
        target: float = Query(
            ..., gt=0, lt=1, description="false-UNKNOWN rate on held-out known images, e.g. 0.03"
        ),
    ) -> dict[str, Any]:
        """The thresholds calibration gives for another false-UNKNOWN target; changes nothing.

        As training would set them with that ``--false-unknown-rate``, on the held-out images
        of known classes it was calibrated on (``calibration.realised``: each rule's share
        there); preview them with ``POST /thresholds/preview``, apply with ``PUT /thresholds``.
        """
        return await _call(service.thresholds_for_target, target)

    @router.get("/thresholds/tradeoff", responses=errors(400, 503))
    async def thresholds_tradeoff(
        rate: list[Annotated[float, Field(gt=0, lt=1)]] | None = Query(
            None,
            max_length=MAX_TRADEOFF_RATES,
            description="false-UNKNOWN rates to calibrate for (repeat; default 1, 2, 5, 10, 20%)",
        ),
    ) -> dict[str, Any]:
        """What each false-UNKNOWN rate costs and catches: the table to pick a rate from.

        Per rate: the calibrated thresholds, the share of the version's held-out test images
        they flag (``test_unknown_rate``: false alarms on known classes) and the share of a
        never-seen type they flag (``new_type_recall``, the report card's mean; its worst
        class). Changes nothing.
        """
        return await _call(service.threshold_tradeoff, rate)

    @router.post("/thresholds/preview", responses=errors(400, 503))
    async def thresholds_preview(body: ThresholdsRequest) -> dict[str, Any]:
        """How many stored images these thresholds would mark UNKNOWN, by rule; changes nothing.

        ``held_out``: how many of the version's held-out test images (known classes) they would.
        """
        return await _call(
            service.threshold_preview, body.confidence, body.distance, body.quality, body.target
        )

    @router.put("/thresholds", responses=errors(400, 503))
    async def set_thresholds(body: ThresholdsRequest, request: Request) -> dict[str, Any]:
        """Apply thresholds: stored images are re-decided (recorded, undoable)."""
        return await _call(
            service.set_thresholds,
            body.confidence,
            body.distance,
            who=_who(request),
            quality=body.quality,
            target=body.target,
        )

    @router.post("/retrain", status_code=202, responses=errors(409, 501, 503))
    async def retrain(request: Request) -> dict[str, Any]:
        """Retrain in the background; poll ``GET /retrain`` for its progress.

        The new version starts from the active one's training folder, options and thresholds;
        it then scores the stored history and is served.
        """
        return await _call(service.start_retrain, who=_who(request))

    @router.get("/retrain", responses=errors())
    async def retrain_status() -> dict[str, Any]:
        """The training run's status: running, stage, done, total, eta_s; version or error."""
        return dict(service.training_status)

    @router.get("/audit", responses=errors())
    async def audit(
        limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=10_000_000)
    ) -> dict[str, Any]:
        """Recorded review actions, newest first: what, how many images, who, when, undone."""
        return await _call(service.audit, limit, offset)

    @router.post("/audit/undo", responses=errors(400, 409, 503))
    async def undo(body: UndoRequest, request: Request) -> dict[str, Any]:
        """Undo a recorded action (default: the latest not undone); store and files restored."""
        return await _call(service.undo, body.action_id, who=_who(request))

    @router.get("/versions/{name}/confusion", responses=errors(400))
    async def confusion(
        name: VersionName,
        true: str | None = Query(None, max_length=100, description="a true class"),
        predicted: str | None = Query(None, max_length=100, description="a predicted class"),
    ) -> dict[str, Any]:
        """A version's evaluation counts by true and predicted class; with both, that cell's images.

        The images are the evaluation images' paths with their Top-1 probability, most
        confident first (the version's ``audit.csv``).
        """
        return await _call(service.confusion, name, true, predicted)

    @router.get("/versions/{name}/history", responses=errors(400))
    async def history(
        name: VersionName,
    ) -> dict[str, Any]:
        """What a version said about the images stored with the version before it.

        Scored when it was trained (or by ``imagesieve score --history-of``): images compared,
        labels changed, UNKNOWNs resolved by class and by old cluster, images newly UNKNOWN,
        ``clustering``: the new version's UNKNOWNs clustered as the old version's were (run
        id, images, clusters, noise, ``continued_from``; absent when the old version was never
        clustered), and ``set_aside``: the near-duplicates a person set aside with the old
        version that stay set aside (in favour of the same image). ``history`` is null when
        the version scored no history.
        """
        return {"version": name, "history": await _call(service.history, name)}

    @router.get("/openapi.json", include_in_schema=False)
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        # the schema is inlined: the page needs the token once, not again for the schema
        return get_swagger_ui_html(
            openapi_url=f"{API_PREFIX}/openapi.json",
            title=f"{app.title} API",
            swagger_ui_parameters={"spec": app.openapi()},
        )

    app.include_router(router)
    if local_secret is not None:
        add_local_api(app, service, local_secret)

    async def no_route(request: Request) -> JSONResponse:
        # Anything else under /api/v1: the error shape, not the UI's (mounted at "/") 404
        if token:
            try:
                check_token(request, await bearer(request))
            except ApiError as e:
                return _error(e.status, e.message)
        path, method = request.url.path, request.method
        allowed = sorted(
            {
                m
                for r in router.routes
                if isinstance(r, APIRoute) and r.path_regex.match(path)
                for m in r.methods
            }
        )
        if allowed:
            return _error(
                405,
                f"Method Not Allowed: {method} {path}; use {', '.join(allowed)}",
                headers={"Allow": ", ".join(allowed)},
            )
        return _error(404, f"Not Found: no API route {path}; the routes are at {API_PREFIX}/docs")

    app.add_route(API_PREFIX, _AnyMethod(no_route), include_in_schema=False)
    app.add_route(f"{API_PREFIX}/{{rest:path}}", _AnyMethod(no_route), include_in_schema=False)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if not request.url.path.startswith(API_PREFIX):
            return JSONResponse({"detail": e.detail}, status_code=e.status_code, headers=e.headers)
        return _error(e.status_code, str(e.detail), headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        kind, message = classify_error(e, server=True)
        return _error(KINDS[kind].status, message)
