"""Browsing the stored images of a version: filters, sort, pages and facet counts.

The Review tab, ``GET /api/v1/images`` and ``imagesieve images`` page through the store with
this one query. Every filter is a bound parameter (never SQL text), every page is bounded, so a
request cannot read beyond the version's rows or make the server build a large answer.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from imagesieve._errors import UserError
from imagesieve.store._rows import utc_text
from imagesieve.store._schema import PREDICTION_COLUMNS

if TYPE_CHECKING:
    from imagesieve.store._store import Store

__all__ = ["MAX_PAGE", "ROW_FIELDS", "SORTS", "ImageQuery", "browse"]

#: Most rows one page returns.
MAX_PAGE = 500
#: Facet values listed per facet (the most frequent first).
FACET_VALUES = 50
#: Sort keys: name -> ORDER BY (ties broken by id, so pages never overlap).
SORTS = {
    "id": "p.id",
    "-id": "p.id DESC",
    "time": "p.scored_at, p.id",
    "-time": "p.scored_at DESC, p.id DESC",
    "confidence": "p.top1_prob NULLS LAST, p.id",
    "-confidence": "p.top1_prob DESC NULLS LAST, p.id",
    "distance": "p.neighbor_distance NULLS LAST, p.id",
    "-distance": "p.neighbor_distance DESC NULLS LAST, p.id",
    "outlier": "p.cluster_outlier DESC NULLS LAST, p.id",
}
#: Facets counted over the filtered rows: name -> the expression grouped by.
FACETS = {
    "label": "p.label",
    "reason": "p.reason",
    "top1_class": "p.top1_class",
    "cluster_id": "p.cluster_id",
    "batch_id": "p.batch_id",
    "human_label": "h.label",
    "quality": "p.quality_flags",
    "duplicates": "CASE WHEN p.duplicate_of IS NOT NULL THEN 'set_aside' "
    "WHEN p.duplicate_group IS NOT NULL THEN 'kept' ELSE 'none' END",
    "day": "CAST(timezone('UTC', p.scored_at) AS DATE)",
}


#: A stored image's near-duplicate states, as the ``duplicates`` filter and facet name them.
DUPLICATE_STATES = ("none", "kept", "set_aside")


@dataclass(frozen=True)
class ImageQuery:
    """Which stored images to show, and in which order. None leaves a filter off.

    Attributes:
        labels: Predicted labels (a class or UNKNOWN), any of them.
        reasons: UNKNOWN reasons (``low_confidence``, ``far_from_training``), any of them.
        top1_classes: Top-1 classes, any of them.
        human_labels: Labels people gave; ``""`` matches images nobody labelled.
        quality: Photo quality flags (``blurred``, ``dark``...), any of them; ``""`` matches
            photos with none (good, or not measured).
        duplicates: Near-duplicate states (``DUPLICATE_STATES``), any of them: ``none`` (no
            near-duplicate stored), ``kept`` (in a group, not set aside), ``set_aside``.
        min_confidence, max_confidence: Range of the Top-1 probability.
        min_distance, max_distance: Range of the distance to the nearest training image.
        batch_ids: Batches, any of them.
        cluster_ids: Clusters (-1: noise), any of them.
        day_from, day_to: UTC days of scoring, inclusive.
        ids: Only these stored ids (a selection, e.g. from the embedding map).
        sort: A key of ``SORTS``.
    """

    labels: tuple[str, ...] | None = None
    reasons: tuple[str, ...] | None = None
    top1_classes: tuple[str, ...] | None = None
    human_labels: tuple[str, ...] | None = None
    quality: tuple[str, ...] | None = None
    duplicates: tuple[str, ...] | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None
    min_distance: float | None = None
    max_distance: float | None = None
    batch_ids: tuple[int, ...] | None = None
    cluster_ids: tuple[int, ...] | None = None
    day_from: dt.date | None = None
    day_to: dt.date | None = None
    ids: tuple[int, ...] | None = None
    sort: str = "id"

    def __post_init__(self):
        if self.sort not in SORTS:
            raise UserError(f"sort must be one of {', '.join(SORTS)}, got {self.sort!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            if isinstance(value, (list, tuple)) and len(value) > 100_000:
                raise UserError(f"{f.name}: at most 100,000 values")
        unknown = set(self.duplicates or ()) - set(DUPLICATE_STATES)
        if unknown:
            raise UserError(
                f"duplicates must be among {', '.join(DUPLICATE_STATES)}, got {sorted(unknown)}"
            )
        for lo, hi in (("min_confidence", "max_confidence"), ("min_distance", "max_distance")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise UserError(f"{lo} ({a}) is above {hi} ({b})")

    def where(self) -> tuple[str, list[Any]]:
        """The WHERE clause (over ``predictions p`` joined with ``labels h``) and its parameters."""
        parts, params = [], []

        def any_of(expr: str, values: tuple, cast: str) -> None:
            parts.append(f"{expr} IN (SELECT unnest(?::{cast}[]))")
            params.append(list(values))

        if self.labels is not None:
            any_of("p.label", self.labels, "VARCHAR")
        if self.reasons is not None:
            parts.append("list_has_any(string_split(p.reason, '+'), ?::VARCHAR[])")
            params.append(list(self.reasons))
        if self.top1_classes is not None:
            any_of("p.top1_class", self.top1_classes, "VARCHAR")
        if self.human_labels is not None:
            any_of("coalesce(h.label, '')", self.human_labels, "VARCHAR")
        if self.quality is not None:
            parts.append(
                "list_has_any(string_split(coalesce(p.quality_flags, ''), '+'), ?::VARCHAR[])"
            )
            params.append(list(self.quality))
        if self.duplicates is not None:
            any_of(f"({FACETS['duplicates']})", self.duplicates, "VARCHAR")
        for expr, lo, hi in (
            ("p.top1_prob", self.min_confidence, self.max_confidence),
            ("p.neighbor_distance", self.min_distance, self.max_distance),
        ):
            if lo is not None:
                parts.append(f"{expr} >= ?")
                params.append(float(lo))
            if hi is not None:
                parts.append(f"{expr} <= ?")
                params.append(float(hi))
        if self.batch_ids is not None:
            any_of("p.batch_id", self.batch_ids, "BIGINT")
        if self.cluster_ids is not None:
            any_of("p.cluster_id", self.cluster_ids, "BIGINT")
        if self.ids is not None:
            any_of("p.id", self.ids, "BIGINT")
        day = "CAST(timezone('UTC', p.scored_at) AS DATE)"
        if self.day_from is not None:
            parts.append(f"{day} >= ?")
            params.append(self.day_from)
        if self.day_to is not None:
            parts.append(f"{day} <= ?")
            params.append(self.day_to)
        return " AND ".join(parts) or "true", params

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (only the filters that are set)."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        for k in ("day_from", "day_to"):
            if k in out:
                out[k] = out[k].isoformat()
        return out


#: The fields of a stored row that browsing and batch reports show, in this order.
ROW_FIELDS = tuple(c for c in PREDICTION_COLUMNS if c not in ("width", "height", "neighbor_id")) + (
    "cluster_outlier",
)
_COLUMNS = (
    ", ".join("epoch_us(p.scored_at)" if c == "scored_at" else f"p.{c}" for c in ROW_FIELDS)
    + ", h.label, p.duplicate_group, p.duplicate_of"
)
_KEYS = (*ROW_FIELDS, "human_label", "duplicate_group", "duplicate_of")


def browse(
    store: Store,
    model_version: str,
    query: ImageQuery,
    limit: int = 48,
    offset: int = 0,
    facets: bool = True,
) -> dict[str, Any]:
    """One page of a version's stored images matching ``query``, with the total and facets.

    Returns ``{"total", "offset", "rows": [...], "facets": {name: [[value, count], ...]}}``;
    facets count the filtered rows (the most frequent values first).
    """
    if not 1 <= int(limit) <= MAX_PAGE:
        raise UserError(f"a page holds 1 to {MAX_PAGE} images, got {limit}")
    if int(offset) < 0:
        raise UserError(f"offset must be 0 or more, got {offset}")
    where, params = query.where()
    params = [model_version, *params]
    with store.cursor() as cur:
        labels = (
            "labels"
            if cur.execute(
                "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'labels'"
            ).fetchall()[0][0]
            else "(SELECT NULL::VARCHAR AS sha256, NULL::VARCHAR AS label WHERE false)"
        )  # a read-only store of an older release has no labels yet
        rows_of = (
            "predictions"
            if cur.execute(
                "SELECT count(*) FROM duckdb_columns() WHERE table_name = 'predictions' "
                "AND column_name = 'duplicate_of'"
            ).fetchall()[0][0]
            else "(SELECT *, NULL::BIGINT AS duplicate_group, NULL::BIGINT AS duplicate_of "
            "FROM predictions)"
        )  # nor near-duplicates
        base = (
            f"FROM {rows_of} p LEFT JOIN {labels} h ON h.sha256 = p.sha256 "
            f"WHERE p.model_version = ? AND {where}"
        )
        total = int(cur.execute(f"SELECT count(*) {base}", params).fetchall()[0][0])
        rows = cur.execute(
            f"SELECT {_COLUMNS} {base} ORDER BY {SORTS[query.sort]} LIMIT ? OFFSET ?",
            [*params, int(limit), int(offset)],
        ).fetchall()
        counted = {}
        if facets:
            for name, expr in FACETS.items():
                counted[name] = [
                    [_plain(v), int(n)]
                    for v, n in cur.execute(
                        f"SELECT {expr} AS v, count(*) AS n {base} GROUP BY v "
                        f"ORDER BY n DESC, v NULLS LAST LIMIT {FACET_VALUES}",
                        params,
                    ).fetchall()
                ]
    out_rows = []
    for r in rows:
        d = dict(zip(_KEYS, r, strict=True))
        d["scored_at"] = utc_text(dt.datetime.fromtimestamp(d["scored_at"] / 1e6, dt.UTC))
        for k in ("top1_prob", "top2_prob", "top3_prob", "neighbor_distance", "cluster_outlier"):
            if d[k] is not None:
                d[k] = round(float(d[k]), 4)
        out_rows.append(d)
    return {"total": total, "offset": int(offset), "rows": out_rows, "facets": counted}


def _plain(v: Any) -> Any:
    return v.isoformat() if isinstance(v, dt.date) else v
