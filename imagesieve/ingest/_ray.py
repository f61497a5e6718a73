"""Score on a Ray cluster: Ray Data feeds the items to actors that fetch, decode and run the model.

The driver expands the inputs as the local path does and keeps the one store writer: results
stream back to it and go through the same run (exactly once by content, one stored failure per
bad item, the batch row, kept copies, ``--sort-into``). Each actor gets the version's files once
(from Ray's object store: no shared disk needed for the model), and the content already stored
with the version as a sorted array of digests, so a re-run after a killed driver decodes only
what was not committed. ``ray`` is imported here only: the local path never needs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from imagesieve._errors import UserError
from imagesieve.classifier import STORED_ARRAYS, UNKNOWN, Prediction
from imagesieve.data import ImageLoadError, read_zip_member
from imagesieve.ingest._fetch import FetchOptions, fetch_items
from imagesieve.ingest._inputs import InputItem, ZipMember
from imagesieve.models import FAR_FILE

__all__ = ["RayOptions", "ray_batches", "ray_plan", "ray_session"]

log = logging.getLogger(__name__)

#: Items per Ray Data dataset. Each window starts its actors once (the model loads in ~1 s); a
#: window bounds what the driver holds of a huge input list.
WINDOW = 20_000
#: Predictions a shard's block sends back for the run's report.
SHOW = 50
#: Version files an actor needs to score (not the torch checkpoint nor the report).
VERSION_FILES = (
    "meta.json",
    "model.onnx",
    "reference.csv",
    "reference.npy",
    "head.npz",
    FAR_FILE,
)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to score on Ray.

    ``address`` None starts a Ray instance in this process for the run; ``"auto"`` joins the
    cluster started on this machine (``ray start``); ``host:port`` or ``ray://host:port`` joins
    that one. ``actors`` defaults to the cluster's CPUs, one CPU each.
    """

    address: str | None = None
    actors: int | None = None
    batch_size: int = 32
    window: int = WINDOW
    #: A folder every node can write and the driver read: actors write their blocks of
    #: ``shard_rows`` scored items there as Parquet shards, which the store ingests in bulk
    #: (None: results stream back to the driver item by item). Shards go once stored.
    shards: str | None = None
    shard_rows: int = 1024
    #: Arguments for ``ray.init`` when it starts Ray here (tests: a small object store).
    init: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _ZipRef:
    """A zip member an actor reads itself (the driver's open archive does not travel)."""

    path: str
    member: str
    limit: int

    def read(self, name: str) -> bytes:
        """The member's bytes within its limit; raises ImageLoadError."""
        try:
            with zipfile.ZipFile(self.path) as zf:
                return read_zip_member(zf, zf.getinfo(self.member), name, None, self.limit)
        except (KeyError, zipfile.BadZipFile, OSError) as e:
            raise ImageLoadError(name, "missing", f"cannot read zip member ({e})") from None


@contextlib.contextmanager
def ray_session(opts: RayOptions) -> Iterator[Any]:
    """Ray connected for one run (the ``ray`` module); a Ray started here stops after it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if opts.address and "RAY_AUTH_MODE" not in os.environ and _has_token():
        # as `ray start` does: a token on this machine means its clusters ask for it
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
        from ray.data import DataContext
    except ImportError:
        raise UserError(
            "--ray needs Ray: pip install 'imagesieve[ray]' (or: pip install 'ray[data]')"
        ) from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(
                address=opts.address,
                log_to_driver=False,
                logging_level=logging.WARNING,
                include_dashboard=False,
                **opts.init,
            )
        except ConnectionError as e:
            raise UserError(f"cannot reach the Ray cluster at {opts.address}: {e}") from None
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # a line per dataset otherwise
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _has_token() -> bool:
    """Whether Ray's authentication token is set (its environment variables or default file)."""
    return bool(
        os.environ.get("RAY_AUTH_TOKEN")
        or os.environ.get("RAY_AUTH_TOKEN_PATH")
        or (Path.home() / ".ray" / "auth_token").is_file()
    )


def ray_plan(ray: Any, opts: RayOptions) -> dict[str, Any]:
    """Where a run scores: the cluster's address, nodes and CPUs, and the model actors to start."""
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return {
        "address": ray.get_runtime_context().gcs_address,
        "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
        "cpus": cpus,
        "actors": max(1, opts.actors or cpus),
    }


def version_bundle(path: Path) -> dict[str, bytes]:
    """The files of a version directory that scoring reads, by name."""
    return {n: (path / n).read_bytes() for n in VERSION_FILES if (path / n).is_file()}


class _ScoreActor:
    """One Ray actor: the version's Predictor, fed a block of items at a time.

    Hashes are checked against the stored content before decoding; URLs are fetched here;
    fetched bytes go back only for images the driver keeps or sorts. With ``shards``, a block's
    items go to a Parquet shard there instead (``_to_shard``).
    """

    def __init__(
        self,
        bundle: dict[str, bytes],
        name: str,
        thresholds: tuple[float, float | None],
        batch_size: int,
        fetch: FetchOptions,
        stored: np.ndarray,
        wants: tuple[str, bool],
        shards: str | None = None,
    ):
        from imagesieve.classifier import Predictor
        from imagesieve.models import ModelVersion

        self._dir = tempfile.TemporaryDirectory(prefix="imagesieve-ray-")
        path = Path(self._dir.name) / name
        path.mkdir()
        for file, data in bundle.items():
            (path / file).write_bytes(data)
        self.predictor = Predictor(
            ModelVersion.load(path),
            threshold=thresholds[0],
            distance_threshold=thresholds[1],
            batch_size=batch_size,
            workers=1,
        )
        self.stored = stored  # sorted (n,) S32 digests
        self.fetch = fetch
        self.keep_policy, self.sorting = wants
        self.shards = shards
        self.dim = next(
            o.shape[1] for o in self.predictor.engine.session.get_outputs() if o.name == "embedding"
        )

    def _skip(self, sha256: str) -> bool:
        digest = np.frombuffer(bytes.fromhex(sha256), "S32")[0]
        at = int(np.searchsorted(self.stored, digest))
        return at < len(self.stored) and self.stored[at] == digest

    def _wants(self, label: str | None) -> bool:
        return (
            self.sorting
            or self.keep_policy == "all"
            or (self.keep_policy == "unknown" and label == UNKNOWN)
        )

    def _to_shard(self, fetched: list[InputItem], preds: list[Prediction]) -> dict[str, Any]:
        """Write a block's items to a new shard; what the driver still needs of them.

        That is the shard's path, the images to keep (content hash, bytes or a file's path) and
        up to ``SHOW`` predictions without their vectors, for the run's report.
        """
        from imagesieve.store import write_shard

        path = os.path.join(self.shards, f"{uuid.uuid4().hex}.parquet")
        rows = [i.row for i in fetched]
        write_shard(path, [i.index for i in fetched], preds, self.dim, rows)
        kept = [
            (p.sha256, i.source)
            for i, p in zip(fetched, preds, strict=True)
            if p.ok and self._wants(p.label) and i.source is not None
        ]
        shown = [replace(p, signature=None, **dict.fromkeys(STORED_ARRAYS)) for p in preds[:SHOW]]
        return {"path": path, "rows": len(fetched), "kept": kept, "shown": shown}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A block of items -> (index, Prediction, fetched bytes of URLs kept or sorted) each."""
        items = []
        for item in batch["item"]:
            if isinstance(item.source, _ZipRef):
                try:
                    item = replace(item, source=item.source.read(item.name))
                except ImageLoadError as e:
                    item = replace(item, source=None, error=e)
            items.append(item)
        fetched = list(fetch_items(items, self.fetch))
        stream = ((i.name, i.error if i.error is not None else i.source) for i in fetched)
        preds: list[Prediction] = []
        for part in self.predictor.score_batches(stream, skip=self._skip):
            preds.extend(part)
        if self.shards is not None:
            return {"row": np.array([self._to_shard(fetched, preds), None], dtype=object)[:-1]}
        content = [
            i.source if i.url is not None and p.ok and self._wants(p.label) else None
            for i, p in zip(fetched, preds, strict=True)
        ]
        rows = [(i.index, p, c) for i, p, c in zip(fetched, preds, content, strict=True)]
        # one column of pickled tuples: Ray keeps Python objects (bytes, arrays) as they are
        return {"row": np.array(rows + [None], dtype=object)[:-1]}


def _shippable(item: InputItem) -> InputItem:
    """An item that pickles: a zip member travels as its archive's path and member name."""
    if isinstance(item.source, ZipMember):
        member = item.source
        ref = _ZipRef(str(member.archive.path), member.info.filename, member.archive.member_limit)
        return replace(item, source=ref)
    return item


def _windows(items: Iterable[InputItem], size: int) -> Iterator[list[InputItem]]:
    window: list[InputItem] = []
    for item in items:
        window.append(item)
        if len(window) >= size:
            yield window
            window = []
    if window:
        yield window


def _dataset(
    ray: Any,
    predictor: Any,
    window: list[InputItem],
    digests: np.ndarray,
    bundle: dict[str, bytes],
    opts: RayOptions,
    fetch: FetchOptions,
    wants: tuple[str, bool],
    actors: int,
    shards: Path | None,
) -> Any:
    """The Ray Data dataset scoring one window of items on ``actors`` model actors."""
    per_call = opts.batch_size if shards is None else opts.shard_rows
    blocks = max(1, min(len(window) // per_call, actors * 8))
    return ray.data.from_items(
        [{"item": _shippable(item)} for item in window], override_num_blocks=blocks
    ).map_batches(
        _ScoreActor,
        fn_constructor_kwargs={
            "bundle": bundle,
            "name": predictor.version.name,
            "thresholds": (predictor.threshold, predictor.distance_threshold),
            "batch_size": opts.batch_size,
            "fetch": fetch,
            "stored": digests,
            "wants": wants,
            "shards": None if shards is None else str(shards),
        },
        concurrency=actors,
        num_cpus=1,
        batch_size=per_call,
        batch_format="numpy",
    )


def ray_batches(
    ray: Any,
    predictor: Any,
    items: Iterable[InputItem],
    stored: Iterable[str],
    opts: RayOptions,
    fetch: FetchOptions,
    wants: tuple[str, bool],
    actors: int,
    shards: Path | None = None,
) -> Iterator[Any]:
    """Score ``items`` on Ray with ``actors`` model actors, as results come (not input order).

    Yields groups of (item, prediction); with ``shards`` (a folder the actors write their
    blocks to, ``RayOptions.shards``), one dict per shard instead (``_ScoreActor._to_shard``).
    ``stored`` is the content (SHA-256 hex) to skip undecoded; ``wants`` the keep policy and
    whether images are sorted into folders (fetched bytes come back for those). An item whose
    URL was fetched on an actor comes back with its bytes as ``source`` when they are wanted.
    """
    digests = np.sort(np.array([bytes.fromhex(s) for s in stored], dtype="S32"))
    bundle = version_bundle(predictor.version.path)
    if shards is not None:
        shards.mkdir(parents=True, exist_ok=True)
    for window in _windows(items, opts.window):
        by_index = {item.index: item for item in window}
        ds = _dataset(ray, predictor, window, digests, bundle, opts, fetch, wants, actors, shards)
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if shards is not None:
                yield from out["row"]
                continue
            group = []
            for index, pred, content in out["row"]:
                item = by_index.pop(int(index))
                if content is not None:
                    item = replace(item, source=content)
                group.append((item, pred))
            yield group
