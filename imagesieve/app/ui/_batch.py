"""The Batch tab: many images scored at once; past batches re-opened; reports for Excel."""

from __future__ import annotations

import csv
import os
import re
import shutil
import zipfile
from collections import defaultdict, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from imagesieve.app._service import UPLOADS, Service
from imagesieve.app.ui._widgets import (
    Panel,
    progress_relay,
    reason_words,
    table_frame,
    user_errors,
)
from imagesieve.ingest import drift_words
from imagesieve.store import BATCH_ITEM_FIELDS

#: Rows of a batch report shown in its table (the downloads have them all).
MAX_TABLE_ROWS = 5000
#: Past batches offered in the picker (the API and ``imagesieve batches`` page through all).
PAST_BATCHES = 200
#: Suffixes of inputs whose number of images is unknown before they are read.
LIST_SUFFIXES = (".csv", ".tsv", ".txt", ".xlsx", ".xlsm", ".xls")
ALL = "All"
FAILED = "failed"
#: The report's columns the table shows, after the input sheet's own (the downloads have all).
SHOWN = tuple(
    c
    for c in BATCH_ITEM_FIELDS
    if c not in ("top3_class", "top3_prob", "cluster_id", "sha256", "scored_at")
)
_NUMERIC = ("top1_prob", "top2_prob", "neighbor_distance")
_INTEGER = ("item", "id")

#: Remembers the path inside the chosen folder of each file (the browser knows it, the upload
#: does not carry it), so sub-folder names reach the report: ``site-a/2026-12/meter.jpg``.
FOLDER_PATHS_JS = """
document.addEventListener('change', (ev) => {
  const input = ev.target;
  if (!input || input.type !== 'file' || !input.closest('#batch-folder')) return;
  const files = Array.from(input.files || []).map(f => (
    {name: f.name, size: f.size, path: f.webkitRelativePath || f.name}));
  props.value = {files: files};
}, true);
"""


def _count_items(paths: Sequence[Path]) -> int | None:
    """Images the inputs hold, when known before reading them (None with URL lists)."""
    n = 0
    for p in paths:
        suffix = p.suffix.lower()
        if p.is_dir():
            n += sum(len(files) for _, _, files in os.walk(p))
        elif suffix in LIST_SUFFIXES:
            return None
        elif suffix == ".zip":
            try:
                with zipfile.ZipFile(p) as zf:
                    n += sum(not info.is_dir() for info in zf.infolist())
            except (OSError, zipfile.BadZipFile):
                n += 1
        else:
            n += 1
    return n


def upload_names(folder_files: Sequence[str], chosen: dict[str, Any] | None) -> list[str]:
    """Each uploaded file of a folder named by its path inside it, else by its file name.

    The browser tells the paths (``FOLDER_PATHS_JS``); they are matched by name and size, in order.
    """
    paths: dict[tuple[str, int], deque[str]] = defaultdict(deque)
    for f in (chosen or {}).get("files") or []:
        try:
            paths[(str(f["name"]), int(f["size"]))].append(str(f["path"]))
        except (KeyError, TypeError, ValueError):
            continue
    names = []
    for p in folder_files:
        key = (Path(p).name, os.path.getsize(p))
        names.append(paths[key].popleft() if paths.get(key) else Path(p).name)
    return names


def _shown_source(source: str) -> str:
    """A source without the server's upload folder: what the user uploaded, sub-folders kept."""
    m = re.search(rf"[\\/]{UPLOADS}[\\/][^\\/]+[\\/](.*)$", source)
    return m.group(1).replace("\\", "/") if m else source


def report_rows(csv_path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(the input sheet's columns, the rows) of a batch report, sources shown as uploaded."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        sheet = fields[: fields.index("item")] if "item" in fields else []
        rows = []
        for r in reader:
            r["source"] = _shown_source(r.get("source") or "")
            if not r.get("label"):
                r["label"] = FAILED
            for key in _NUMERIC:
                r[key] = float(r[key]) if r.get(key) else None
            for key in _INTEGER:
                r[key] = int(r[key]) if r.get(key) else None
            rows.append(r)
    return sheet, rows


def _rows_frame(sheet: list[str], rows: list[dict[str, Any]], label: str) -> pd.DataFrame:
    columns = [*sheet, *SHOWN]
    shown = [r for r in rows if label in (ALL, None, "") or r["label"] == label]
    return table_frame(columns, ([r.get(c) for c in columns] for r in shown[:MAX_TABLE_ROWS]))


def _summary_md(summary: Any) -> str:
    d = summary.to_dict()
    labels = ", ".join(f"**{k}** {v}" for k, v in d["labels"].items()) or "none"
    reasons = ", ".join(
        f"{' and '.join(reason_words(k))} {v}" for k, v in d["unknown_reasons"].items()
    )
    lines = [
        f"**Batch {d['batch_id']}** ({d['status']}, model {d['model_version']}): "
        f"{d['items']} items in {d['seconds']:.1f} s — {d['scored']} scored, "
        f"{d['rescored']} rescored, {d['already_scored']} already stored, "
        f"{d['failed']} failed.",
        f"Labels: {labels}." + (f" UNKNOWN because: {reasons}." if reasons else ""),
    ]
    if d["poor_quality"]:
        flags = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in d["quality_flags"].items())
        lines.append(f"Photos of poor quality: {d['poor_quality']} ({flags}).")
    lines += _drift_lines(d.get("drift"))
    failures = [(f["source"], f["message"] or f["kind"]) for f in d["failures"]]
    return _with_failures(lines, failures, d["failed"], d["ignored"])


def _drift_lines(drift: dict[str, Any] | None) -> list[str]:
    """The batch's drift in words, marked when it departed from the training data."""
    if not drift or drift.get("ks_d") is None:
        return []
    return [f"{'⚠ **Drift**' if drift['drifted'] else 'Drift'}: {drift_words(drift)}."]


def _detail_md(d: dict[str, Any]) -> str:
    """A past batch as the store keeps it."""
    rate = "" if d.get("unknown_rate") is None else f" ({d['unknown_rate']:.1%})"
    lines = [
        f"**Batch {d['batch_id']}** ({d['status']}, model {d['model_version']}), started "
        f"{(d['started_at'] or '')[:19].replace('T', ' ')} UTC: {d['items']} items — "
        f"{d['scored']} scored, {d['failed']} failed, {d['unknown']} UNKNOWN{rate}.",
        *_drift_lines(d.get("drift")),
    ]
    failures = [(f["source"], f["message"] or f["kind"]) for f in d["failures"]]
    return _with_failures(lines, failures, len(failures), [])


def _with_failures(
    lines: list[str], failures: list[tuple[str, str]], n: int, ignored: list[dict[str, str]]
) -> str:
    more = [f"- failed: `{_shown_source(s)}` — {why}" for s, why in failures[:10]]
    if n > 10:
        more.append(f"- … and {n - 10} more (see the report)")
    more += [f"- ignored: `{_shown_source(i['source'])}` — {i['reason']}" for i in ignored[:5]]
    return "\n\n".join(lines) + ("\n\n" + "\n".join(more) if more else "")


def _batch_choice(b: dict[str, Any]) -> tuple[str, int]:
    when = (b["started_at"] or "")[:16].replace("T", " ")
    return (
        f"Batch {b['batch_id']} · {when} UTC · {b['items']} items · {b['failed']} failed · "
        f"{b['model_version']}",
        int(b["batch_id"]),
    )


def batch_tab(service: Service) -> Panel:
    def past(value: int | None = None) -> Any:
        batches = service.batches(PAST_BATCHES)["batches"]
        return gr.Dropdown(choices=[_batch_choice(b) for b in batches], value=value)

    def show(batch_id: int, summary_md: str, zip_path: str | None = None) -> tuple:
        """The outputs that show one batch: summary, filter, table, downloads."""
        csv_path = service.report_file(batch_id, "csv")
        xlsx_path = service.report_file(batch_id, "xlsx")
        sheet, rows = report_rows(csv_path)
        labels = sorted({r["label"] for r in rows})
        if len(rows) > MAX_TABLE_ROWS:
            summary_md += (
                f"\n\nThe table shows the first {MAX_TABLE_ROWS:,} of {len(rows):,} rows; "
                "the downloads have them all."
            )
        return (
            summary_md,
            gr.Dropdown(choices=[ALL, *labels], value=ALL),
            _rows_frame(sheet, rows, ALL),
            {"sheet": sheet, "rows": rows},
            gr.DownloadButton(value=str(csv_path), visible=True),
            gr.DownloadButton(value=str(xlsx_path), visible=True),
            gr.DownloadButton(value=zip_path, visible=zip_path is not None),
        )

    @user_errors
    def run(
        files: list[str] | None,
        folder_files: list[str] | None,
        chosen: dict[str, Any] | None,
        column: str | None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - how Gradio hands out its bar
    ) -> tuple:
        if not files and not folder_files:
            raise gr.Error(
                "add images, a zip of a folder, or a CSV/XLSX list of URLs first",
                print_exception=False,
            )
        progress(0, desc="saving uploads")
        named = [(Path(p).name, p) for p in files or []]
        if folder_files:
            named += list(zip(upload_names(folder_files, chosen), folder_files, strict=True))
        folder, inputs = service.save_uploads(named)
        # Next to the upload folder, not in it: scoring that folder again must not see them.
        report_dir = folder.with_name(folder.name + "-report")
        report = progress_relay(progress, _count_items(inputs))
        report("scoring", 0, 0)
        summary = service.score(
            inputs, column=(column or "").strip() or None, report_dir=report_dir, progress=report
        )
        progress(1.0, desc="zipping the label folders")
        sorted_dir = report_dir / "sorted"
        zip_path = None
        if sorted_dir.is_dir() and any(sorted_dir.iterdir()):
            zip_path = shutil.make_archive(str(report_dir / "labels"), "zip", sorted_dir)
        return (
            *show(summary.batch_id, _summary_md(summary), zip_path),
            past(summary.batch_id),
        )

    @user_errors
    def reopen(batch_id: int | None) -> tuple:
        if batch_id is None:
            return (gr.skip(),) * 7
        return show(int(batch_id), _detail_md(service.batch(int(batch_id))))

    def filter_rows(shown: dict[str, Any], label: str) -> pd.DataFrame:
        shown = shown or {}
        return _rows_frame(shown.get("sheet") or [], shown.get("rows") or [], label)

    gr.Markdown(
        "Score many images at once: image files, a folder (or a zip of one), or a CSV/XLSX "
        "list of image URLs. Every image is stored. The report lists every input in input "
        "order, a list's own columns (meter id, site...) first; download it as CSV or Excel, "
        "with the images sorted into one folder per label."
    )
    with gr.Row():
        files = gr.File(
            label="Images, zips, or CSV/XLSX lists of URLs",
            file_count="multiple",
            elem_id="batch-files",
        )
        folder = gr.File(label="…or a folder", file_count="directory", elem_id="batch-folder")
    chosen = gr.HTML(
        value={"files": []},
        html_template="",
        js_on_load=FOLDER_PATHS_JS,
        elem_id="batch-folder-paths",
        container=False,
        padding=False,
    )
    with gr.Row():
        column = gr.Textbox(
            label="URL column of a CSV/XLSX (optional)",
            placeholder="url",
            elem_id="batch-column",
            scale=3,
        )
        start = gr.Button("Score", variant="primary", elem_id="batch-run", scale=1)
    earlier = gr.Dropdown(
        label="…or open a past batch",
        choices=[],
        value=None,
        elem_id="batch-past",
    )
    summary = gr.Markdown(elem_id="batch-summary")
    with gr.Row():
        label = gr.Dropdown(label="Show label", choices=[ALL], value=ALL, elem_id="batch-label")
        csv_button = gr.DownloadButton(
            "Download report (CSV)", visible=False, variant="primary", elem_id="batch-csv"
        )
        xlsx_button = gr.DownloadButton(
            "Download report (Excel)", visible=False, elem_id="batch-xlsx"
        )
        zip_button = gr.DownloadButton(
            "Download label folders (zip)", visible=False, elem_id="batch-zip"
        )
    table = gr.Dataframe(
        value=_rows_frame([], [], ALL),
        label="Results in input order (click a column header to sort)",
        interactive=False,
        show_search="search",
        max_height=520,
        elem_id="batch-table",
    )
    shown = gr.State({})
    outputs = [summary, label, table, shown, csv_button, xlsx_button, zip_button]
    scored = start.click(
        run,
        [files, folder, chosen, column],
        [*outputs, earlier],
        show_progress_on=[summary, table],
    )
    earlier.input(reopen, earlier, outputs, show_progress_on=[summary, table])
    label.input(filter_rows, [shown, label], table)
    return Panel(user_errors(past), [earlier], store_changes=[scored])
