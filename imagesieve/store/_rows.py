"""The store's rows as typed values, and as the Arrow tables that carry them into DuckDB."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imagesieve.classifier import (
    STORED_MEASURES,
    Prediction,
    QualityMetrics,
    image_shape,
    quality_columns,
)

__all__ = [
    "BatchItem",
    "Failure",
    "IndexCheck",
    "PredictionRow",
    "ResultRow",
    "StoredHeadInputs",
    "embedding_matrix",
    "new_table",
    "SHARD_VECTORS",
    "ShardIngest",
    "prediction_table",
    "read_shards",
    "write_shard",
]


def now() -> dt.datetime:
    """The current time in UTC, as rows store it."""
    return dt.datetime.now(dt.UTC)


def utc_text(stamp: dt.datetime) -> str:
    """A timestamp as ISO 8601 UTC text to the second, as results show it."""
    return stamp.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Failure:
    """One input that could not be scored, with its one-line reason."""

    source: str
    kind: str
    message: str


@dataclass(frozen=True)
class BatchItem:
    """One input of a batch and what became of it: a row of the batch report, in input order."""

    seq: int
    source: str
    outcome: str  # scored, rescored, already_scored, failed, ignored
    sha256: str | None = None
    error: str | None = None
    row: dict[str, str] | None = None  # its row of a CSV/XLSX list


@dataclass
class IndexCheck:
    """What opening (or ``reindex``) did to one version's FAISS index."""

    model_version: str
    rows: int
    action: str  # in_sync, caught_up, repaired, rebuilt
    added: int = 0
    removed: int = 0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PredictionRow:
    """One row of ``predictions``, as stored."""

    id: int
    source: str
    sha256: str
    width: int | None
    height: int | None
    model_version: str
    scored_at: dt.datetime
    batch_id: int
    top1_class: str | None
    top1_prob: float | None
    top2_class: str | None
    top2_prob: float | None
    top3_class: str | None
    top3_prob: float | None
    label: str
    reason: str | None
    neighbor_id: int | None
    neighbor_distance: float | None
    cluster_id: int | None
    quality_flags: str | None = None  # "+"-joined; None: a good photo, or not measured
    blur: float | None = None
    edge_blur: float | None = None
    brightness: float | None = None
    highlights: float | None = None
    saturated: float | None = None
    clipped: float | None = None
    entropy: float | None = None
    neighbor_cosine: float | None = None  # cosine distance to neighbor_id

    def to_prediction(self, name: str) -> Prediction:
        """This row as a Prediction reported under ``name`` (no embedding): already stored."""
        top3 = [
            (c, float(p))
            for c, p in (
                (self.top1_class, self.top1_prob),
                (self.top2_class, self.top2_prob),
                (self.top3_class, self.top3_prob),
            )
            if c is not None
        ]
        return Prediction(
            name,
            self.label,
            self.reason,
            top3,
            width=self.width or 0,
            height=self.height or 0,
            sha256=self.sha256,
            neighbor_id=self.neighbor_id,
            neighbor_distance=self.neighbor_distance,
            neighbor_cosine=self.neighbor_cosine,
            skipped=True,
            cluster_id=self.cluster_id,
            id=self.id,
            quality=self.quality,
            quality_flags=self.quality_flags.split("+") if self.quality_flags else [],
        )

    @property
    def quality(self) -> QualityMetrics | None:
        """The photo quality measures stored with the row (None: not measured)."""
        if self.blur is None:
            return None
        short, aspect = image_shape(self.width or 0, self.height or 0)
        return QualityMetrics(
            self.blur,
            np.nan if self.edge_blur is None else self.edge_blur,
            self.brightness,
            np.nan if self.highlights is None else self.highlights,
            self.saturated,
            self.clipped,
            self.entropy,
            int(short),
            float(aspect),
        )


@dataclass
class ResultRow:
    """The fields of a stored row a neighbour result shows (``Store.result_rows``)."""

    id: int
    source: str
    label: str
    reason: str | None
    top1_class: str | None
    top1_prob: float | None
    cluster_id: int | None
    scored_at: str  # UTC text
    sha256: str


@dataclass
class StoredHeadInputs:
    """Stored rows with what their model's head read (``Store.head_input_chunks``)."""

    table: Any  # Arrow: id, source, sha256, width, height, owner (the row holding the features)
    ids: np.ndarray
    embedding: np.ndarray  # (n, d) float32, unit length: the average-pooled features' direction
    avg_norm: np.ndarray  # (n,) their length
    max_pooled: np.ndarray  # (n, d') float16
    ood: np.ndarray | None = None  # (n, d'') float32: what a Mahalanobis distance reads

    @property
    def sha256(self) -> list[str]:
        """Each row's content hash."""
        return self.table.column("sha256").to_pylist()

    @classmethod
    def from_arrow(cls, rows: Any, embeddings: Any, heads: Any, dim: int) -> StoredHeadInputs:
        """Rows, sorted by owner, with the features of an id range holding their owners.

        Other rows in that range are left out. ``embeddings``: the range's (id, embedding)
        table, or the rows' own (n, d) matrix in their order.
        """
        owners = rows.column("owner").to_numpy()
        if isinstance(embeddings, np.ndarray):
            emb = embeddings
        else:
            ids, emb = embedding_matrix(embeddings, dim)
            emb = emb[_positions(ids, owners)]
        at = _positions(heads.column("id").to_numpy(), owners)
        top = _blob_rows(heads.column("max_pooled"), np.float16)[at]
        ood = None
        if "ood_features" in heads.column_names and heads.column("ood_features").null_count == 0:
            ood = _blob_rows(heads.column("ood_features"), np.float32)[at]
        norm = heads.column("avg_norm").to_numpy().astype(np.float32)[at]
        return cls(rows, rows.column("id").to_numpy(), emb, norm, top, ood)


def _blob_rows(column: Any, dtype: Any) -> np.ndarray:
    """An Arrow column of equal-length blobs of ``dtype`` -> (n, d), without a copy per row.

    One chunk is viewed in place; several are copied once (Arrow's ``combine_chunks`` copies
    even one chunk: 0.35 s for 128 MB).
    """
    import pyarrow as pa

    parts = []
    for blobs in column.chunks:
        if not len(blobs):
            continue
        wide = pa.types.is_large_binary(blobs.type)
        ends = np.frombuffer(blobs.buffers()[1], np.int64 if wide else np.int32)
        ends = ends[blobs.offset : blobs.offset + len(blobs) + 1]
        data = np.frombuffer(blobs.buffers()[2], np.uint8)[ends[0] : ends[-1]]
        parts.append(data.view(dtype).reshape(len(blobs), -1))
    if len(parts) != 1:
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype)
    rows = parts[0]
    return rows if rows.flags.aligned else rows.copy()  # unaligned float16 converts ~8x slower


def _positions(have: np.ndarray, want: np.ndarray) -> np.ndarray | slice:
    """Where each of ``want`` is in ``have``; ValueError if one is not there."""
    if len(have) == len(want) and np.array_equal(have, want):
        return slice(None)  # the usual case: the range holds exactly the owners, no copy
    if not len(have):  # and some wanted
        raise ValueError("stored features changed while they were read")
    order = np.argsort(have, kind="stable")
    at = order[np.searchsorted(have, want, sorter=order).clip(0, len(have) - 1)]
    if not np.array_equal(have[at], want):
        raise ValueError("stored features changed while they were read")
    return at


def embedding_matrix(table: Any, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow table (id, embedding list) -> (ids, (n, d) float32)."""
    import pyarrow.compute as pc

    ids = table.column("id").to_numpy().astype(np.int64)
    if len(ids) == 0:
        return ids, np.zeros((0, dim or 0), np.float32)
    flat = pc.list_flatten(table.column("embedding")).to_numpy().astype(np.float32, copy=False)
    return ids, flat.reshape(len(ids), -1)


def prediction_table(ids, preds, model_version, batch_id, stamp) -> Any:
    """Predictions as one Arrow table of ``predictions`` columns, in order."""
    import pyarrow as pa

    def top(i: int, part: int) -> list:
        return [p.top3[i][part] if len(p.top3) > i else None for p in preds]

    n = len(preds)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "source": pa.array([p.source for p in preds], pa.string()),
            "sha256": pa.array([p.sha256 for p in preds], pa.string()),
            "width": pa.array([p.width for p in preds], pa.int32()),
            "height": pa.array([p.height for p in preds], pa.int32()),
            "model_version": pa.array([model_version] * n, pa.string()),
            "scored_at": pa.array([stamp] * n, pa.timestamp("us", tz="UTC")),
            "batch_id": pa.array([batch_id] * n, pa.int32()),
            "top1_class": pa.array(top(0, 0), pa.string()),
            "top1_prob": pa.array(top(0, 1), pa.float32()),
            "top2_class": pa.array(top(1, 0), pa.string()),
            "top2_prob": pa.array(top(1, 1), pa.float32()),
            "top3_class": pa.array(top(2, 0), pa.string()),
            "top3_prob": pa.array(top(2, 1), pa.float32()),
            "label": pa.array([p.label for p in preds], pa.string()),
            "reason": pa.array([p.reason for p in preds], pa.string()),
            "neighbor_id": pa.array([p.neighbor_id for p in preds], pa.int32()),
            "neighbor_distance": pa.array([p.neighbor_distance for p in preds], pa.float32()),
            "neighbor_cosine": pa.array([p.neighbor_cosine for p in preds], pa.float32()),
            "cluster_id": pa.array([p.cluster_id for p in preds], pa.int32()),
            "quality_flags": pa.array(
                ["+".join(p.quality_flags) or None for p in preds], pa.string()
            ),
            **{
                k: pa.array(v, pa.float32(), mask=np.isnan(v))
                for k, v in quality_columns([p.quality for p in preds]).items()
                if k in STORED_MEASURES
            },
        }
    )


def _heavy_columns(preds: Sequence[Any], emb: np.ndarray, always: bool = False) -> dict[str, Any]:
    """The embedding, pixel signature and head inputs of ``preds`` as Arrow columns.

    ``always``: every column, null where missing; otherwise signature and head inputs only
    when some row has them.
    """
    import pyarrow as pa

    cols = {
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(emb.ravel(), pa.float32()), emb.shape[1]
        )
    }
    if always or any(p.signature is not None for p in preds):
        cols["signature"] = pa.array(
            [None if p.signature is None else p.signature.tobytes() for p in preds], pa.binary()
        )
    if always or any(p.max_pooled is not None for p in preds):
        cols["avg_norm"] = pa.array([p.avg_norm for p in preds], pa.float32())
        cols["max_pooled"] = pa.array(
            [None if p.max_pooled is None else p.max_pooled.tobytes() for p in preds], pa.binary()
        )
    if always or any(p.ood_features is not None for p in preds):
        cols["ood_features"] = pa.array(
            [None if p.ood_features is None else p.ood_features.tobytes() for p in preds],
            pa.binary(),
        )
    return cols


def new_table(ids, preds, emb, model_version, batch_id, stamp) -> Any:
    """New rows as one Arrow table: prediction columns, then the embedding (``FLOAT[d]``).

    One registered table feeds the inserts: each registration costs a catalog change.
    Rows whose model gave them (``Prediction.max_pooled``) add ``avg_norm`` and ``max_pooled``
    (float16 bytes) for ``head_inputs``, and ``ood_features`` (float32 bytes) where the model
    has them; rows with a pixel signature add ``signature`` bytes.
    """
    table = prediction_table(ids, preds, model_version, batch_id, stamp)
    for name, column in _heavy_columns(preds, emb).items():
        table = table.append_column(name, column)
    return table


#: A shard's vector columns, as ``new_table`` carries them.
SHARD_VECTORS = ("embedding", "signature", "avg_norm", "max_pooled", "ood_features")
#: ``prediction_table`` columns a shard leaves to the store.
_STORE_FILLS = ("id", "model_version", "scored_at", "batch_id", "cluster_id")


@dataclass
class ShardIngest:
    """What one shard added to its batch (``Store.ingest_shards``)."""

    items: int
    scored: int
    already_scored: int
    failed: int
    unknown: int
    #: The new rows labelled UNKNOWN for their own content (not a poor photo): their ids and
    #: embeddings, (n, d), to join existing clusters as a scoring session's new rows do.
    unknown_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    unknown_vectors: np.ndarray | None = None

    def counts(self) -> dict[str, int]:
        """As the batch row's counters."""
        return {
            "n_items": self.items,
            "n_scored": self.scored,
            "n_skipped": self.already_scored,
            "n_unknown": self.unknown,
            "n_failed": self.failed,
        }


def write_shard(
    path: str | Path,
    seqs: Sequence[int],
    preds: Sequence[Prediction],
    dim: int,
    rows: Sequence[dict[str, str] | None] | None = None,
) -> None:
    """Write scored items, failures included, to a Parquet shard that ``Store.ingest_shards`` takes.

    One row per item: its place in the run (``seq``), source, content hash, whether it was
    ``skipped`` (already stored), its error, its list row (``rows``), the ``predictions``
    columns and the vectors (embedding as ``dim`` floats in fixed-size bytes, zeros where the
    item has none: Parquet's nested lists decode ~10x slower than flat values). Written to a
    temporary name and renamed: a shard that exists is whole.
    """
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(preds)
    emb = np.zeros((n, dim), np.float32)
    for i, p in enumerate(preds):
        if p.embedding is not None:
            emb[i] = p.embedding
    table = prediction_table(np.zeros(n, np.int64), preds, "", 0, now())
    table = table.drop_columns(list(_STORE_FILLS))
    columns = _heavy_columns(preds, emb, always=True)
    columns["embedding"] = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(dim * 4), n, [None, pa.py_buffer(emb)]
    )
    rows = rows or [None] * n
    for name, column in {
        "seq": pa.array(seqs, pa.int32()),
        "skipped": pa.array([p.skipped for p in preds], pa.bool_()),
        "error_kind": pa.array([p.error_kind if not p.ok else None for p in preds], pa.string()),
        "error": pa.array([p.error if not p.ok else None for p in preds], pa.string()),
        "input_row": pa.array([None if r is None else json.dumps(r) for r in rows], pa.string()),
        **columns,
    }.items():
        table = table.append_column(name, column)
    table = table.set_column(
        table.schema.get_field_index("sha256"),
        "sha256",
        pa.array([p.sha256 or None for p in preds], pa.string()),
    )
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="none", use_dictionary=False)
    tmp.replace(path)


def read_shards(paths: Sequence[str]) -> Any:
    """The rows of ``write_shard`` files as one Arrow table, ``embedding`` as ``FLOAT[d]``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(list(paths), memory_map=True)
    chunks = []
    for raw in table.column("embedding").chunks:  # each viewed as floats in place: no copy
        dim = raw.type.byte_width // 4
        values = pa.Array.from_buffers(
            pa.float32(), len(raw) * dim, [None, raw.buffers()[1]], offset=raw.offset * dim
        )
        chunks.append(pa.FixedSizeListArray.from_arrays(values, dim))
    dim = table.schema.field("embedding").type.byte_width // 4
    emb = pa.chunked_array(chunks, pa.list_(pa.float32(), dim))
    return table.set_column(table.schema.get_field_index("embedding"), "embedding", emb)
