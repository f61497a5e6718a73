"""Past batches: listed with their counts, opened with their failures, reported as CSV.

The same calls answer ``imagesieve batches``, ``GET /api/v1/batches`` and its report download.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import itertools
import json
import tempfile
from collections.abc import Iterator
from typing import IO, Any

from imagesieve._errors import NotFoundError, UserError
from imagesieve._workspace import Workspace
from imagesieve.store import BATCH_ITEM_FIELDS, ROW_FIELDS, STORE_FILE, Store, using_store

__all__ = [
    "batch_detail",
    "drift_history",
    "drift_words",
    "batch_report",
    "REPORT_FORMATS",
    "list_batches",
    "report_media_type",
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
    """One batch: counts, inputs, each failure with its reason, and ``drift``.

    ``drift`` is its ``drift_per_batch`` row: whether it departed from the training data.
    """
    with using_store(ws, store, read_only=store is None) as store:
        row = _batch_row(store, batch_id)
        failures = store.batch_failures(batch_id)
        drift = store.drift("batch", int(batch_id), limit=1)
    return row | {"failures": [f.__dict__ for f in failures], "drift": drift[0] if drift else None}


def drift_words(d: dict[str, Any]) -> str:
    """A drift row (``drift_per_batch``/``_per_day``) in one line for people: the verdict first."""
    p = d["p_value"]
    test = f"KS D {d['ks_d']:.2f}, p {'< 0.001' if p < 0.001 else f'{p:.3f}'}"
    distances = (
        f"median distance to the training data {d['median_distance']:.3f} against "
        f"{d['reference_median']:.3f} for held-out known images"
    )
    verdict = (
        "DEPARTED from the training data" if d["drifted"] else "in line with the training data"
    )
    return f"{verdict} ({distances}; {test}; UNKNOWN {d['unknown_rate']:.0%})"


def drift_history(
    ws: Workspace, per: str = "batch", *, limit: int = 100, store: Store | None = None
) -> list[dict[str, Any]]:
    """The newest batches' (or UTC days') drift against their version's training data."""
    if store is None and not (ws.root / STORE_FILE).is_file():
        return []
    with using_store(ws, store, read_only=store is None) as store:
        return store.drift(per, limit=limit)


def _batch_row(store: Store, batch_id: int) -> dict[str, Any]:
    """One batch's row with its counts; NotFoundError when there is no such batch."""
    _, rows = store.batches(1, 0, batch_id=batch_id)
    if not rows:
        raise NotFoundError(f"no batch {batch_id}: see the list of batches")
    return rows[0]


#: Formats a batch report is written in: CSV (streamed), or an Excel workbook where numbers are
#: numbers and a sheet's cells stay text (meter ids keep their leading zeros).
REPORT_FORMATS = ("csv", "xlsx")
_MEDIA = {
    "csv": "text/csv; charset=utf-8",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}


def _report_name(batch: dict[str, Any], fmt: str) -> str:
    """The report's file name: batch id and day, e.g. ``batch-12-2026-12-04.csv``."""
    day = str(batch.get("started_at") or dt.date.today().isoformat())[:10]
    return f"batch-{int(batch['batch_id'])}-{day}.{fmt}"


def report_media_type(fmt: str) -> str:
    """The HTTP media type of a report format."""
    return _MEDIA[fmt]


def batch_report(
    ws: Workspace, batch_id: int, *, fmt: str = "csv", store: Store | None = None
) -> tuple[str, Iterator[bytes]]:
    """(file name, content chunks) of a batch's report: one row per input, in input order.

    A CSV/XLSX list's own columns (meter id, site...) come first, as in the sheet, then what
    became of the item: outcome, stored id, label, Top-3, distance, cluster, a person's label,
    or why it failed. The stored id joins the report back to SQL, Similar and Review. Batches
    scored before inputs were kept list their stored rows instead. Raises NotFoundError at once
    for a batch that does not exist.
    """
    if fmt not in REPORT_FORMATS:
        raise UserError(f"a report is one of {', '.join(REPORT_FORMATS)}, not {fmt!r}")
    with using_store(ws, store, read_only=store is None) as opened:
        name = _report_name(_batch_row(opened, batch_id), fmt)  # its failures are not needed

    def chunks() -> Iterator[bytes]:
        with using_store(ws, store, read_only=store is None) as opened:
            yield from _csv_chunks(*_report_rows(opened, batch_id))

    if fmt == "csv":
        return name, chunks()
    # A workbook is a zip written whole: made now, so a failure is an error, not a cut download.
    f = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the chunks' reader
    try:
        with using_store(ws, store, read_only=store is None) as opened:
            _write_xlsx(*_report_rows(opened, batch_id), f)
    except BaseException:
        f.close()
        raise
    return name, _read_chunks(f)


def _report_rows(store: Store, batch_id: int) -> tuple[list[str], Iterator[list[tuple]]]:
    """(header, chunks of rows) of a batch's report (see :func:`batch_report`)."""
    columns, items = store.batch_items(batch_id)
    first = next(items, None)
    if first is None:
        return list(ROW_FIELDS), store.batch_rows(batch_id)
    shown = [f"{c} (input)" if c in BATCH_ITEM_FIELDS else c for c in columns]
    parts = (_with_sheet(columns, rows) for rows in itertools.chain([first], items))
    return [*shown, *BATCH_ITEM_FIELDS], parts


def _with_sheet(columns: list[str], rows: list[tuple]) -> list[tuple]:
    """Rows of ``Store.batch_items`` with their sheet row (JSON, first) spread into ``columns``."""
    out = []
    for input_row, *rest in rows:
        cells = json.loads(input_row) if input_row else {}
        out.append((*(cells.get(c, "") for c in columns), *rest))
    return out


def _csv_chunks(header: list[str], parts: Iterator[list[tuple]]) -> Iterator[bytes]:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for rows in parts:
        w.writerows(rows)
        yield buf.getvalue().encode()
        buf.seek(0)
        buf.truncate()
    yield buf.getvalue().encode()


def _write_xlsx(header: list[str], parts: Iterator[list[tuple]], out: IO[bytes]) -> None:
    """The workbook, written row by row (openpyxl's write-only mode) to ``out``."""
    import openpyxl

    wb = openpyxl.Workbook(write_only=True)
    sheet = wb.create_sheet("report")
    sheet.freeze_panes = "A2"
    sheet.append(header)
    for rows in parts:
        for row in rows:
            sheet.append([_cell(sheet, v) for v in row])
    wb.save(out)
    out.seek(0)


def _read_chunks(f: IO[bytes]) -> Iterator[bytes]:
    """A file's bytes a megabyte at a time; the file is closed at the end (or when dropped)."""
    with f:
        while chunk := f.read(1 << 20):
            yield chunk


def _cell(sheet: Any, value: Any) -> Any:
    """A cell that keeps its value: text starting with ``=`` stays text, never a formula.

    Control characters XML cannot hold (a hostile file name may carry them) are written as
    their hex escape (backslash, x, two digits).
    """
    if isinstance(value, dt.datetime) and value.tzinfo is not None:  # Excel has no time zones
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    if isinstance(value, str):
        from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

        value = ILLEGAL_CHARACTERS_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    if isinstance(value, str) and value.startswith("="):
        from openpyxl.cell import WriteOnlyCell

        cell = WriteOnlyCell(sheet, value=value)
        cell.data_type = "s"
        return cell
    return value


def write_batch_report(
    ws: Workspace, batch_id: int, out: IO[bytes], *, fmt: str = "csv", store: Store | None = None
) -> None:
    """Write :func:`batch_report`'s file to ``out``."""
    for chunk in batch_report(ws, batch_id, fmt=fmt, store=store)[1]:
        out.write(chunk)
