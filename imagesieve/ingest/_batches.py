"""Past batches: listed with their counts, opened with their failures, reported as CSV.

The same calls answer ``imagesieve batches``, ``GET /api/v1/batches`` and its report download.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterator
from typing import IO, Any

from imagesieve._errors import NotFoundError
from imagesieve._workspace import Workspace
from imagesieve.store import ROW_FIELDS, STORE_FILE, Store, using_store

__all__ = [
    "batch_detail",
    "batch_report",
    "list_batches",
    "write_batch_report",
]


def list_batches(
    ws: Workspace, *, limit: int = 50, offset: int = 0, store: Store | None = None
) -> dict[str, Any]:
    """The scoring batches, newest first: when, model, items, scored, failed, UNKNOWN rate."""
    if store is None and not (ws.root / STORE_FILE).is_file():
        return {"total": 0, "batches": []}
    with using_store(ws, store, read_only=store is None) as store:
        total, rows = store.batches(limit, offset)
    return {"total": total, "batches": rows}


def batch_detail(ws: Workspace, batch_id: int, *, store: Store | None = None) -> dict[str, Any]:
    """One batch: its counts, what it was asked to score, and each failure with its reason."""
    with using_store(ws, store, read_only=store is None) as store:
        _, rows = store.batches(1, 0, batch_id=batch_id)
        if not rows:
            raise NotFoundError(f"no batch {batch_id}: see the list of batches")
        failures = store.batch_failures(batch_id)
    return rows[0] | {"failures": [f.__dict__ for f in failures]}


def _report_name(batch: dict[str, Any]) -> str:
    """The report's file name: batch id and day, e.g. ``batch-12-2026-12-04.csv``."""
    day = str(batch.get("started_at") or dt.date.today().isoformat())[:10]
    return f"batch-{int(batch['batch_id'])}-{day}.csv"


def batch_report(
    ws: Workspace, batch_id: int, *, store: Store | None = None
) -> tuple[str, Iterator[str]]:
    """(file name, CSV text chunks) of a batch's stored rows: one header, in the order stored.

    The stored id is in each row, so the report joins back to SQL, Similar and Review. Raises
    NotFoundError at once for a batch that does not exist.
    """
    name = _report_name(batch_detail(ws, batch_id, store=store))

    def chunks() -> Iterator[str]:
        with using_store(ws, store, read_only=store is None) as opened:
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(ROW_FIELDS)
            for rows in opened.batch_rows(batch_id):
                w.writerows(rows)
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
            yield buf.getvalue()

    return name, chunks()


def write_batch_report(
    ws: Workspace, batch_id: int, out: IO[str], *, store: Store | None = None
) -> None:
    """Write :func:`batch_report`'s CSV to ``out``."""
    for text in batch_report(ws, batch_id, store=store)[1]:
        out.write(text)
