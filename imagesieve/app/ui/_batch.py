"""The Batch tab: many images scored at once, their CSV report and label folders."""

from __future__ import annotations

import csv
import os
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from imagesieve.app._service import Service
from imagesieve.app.ui._widgets import (
    Panel,
    progress_relay,
    reason_words,
    table_frame,
    user_errors,
)

#: Rows of a batch report shown in its table (the CSV download has them all).
MAX_TABLE_ROWS = 5000
#: Suffixes of inputs whose number of images is unknown before they are read.
LIST_SUFFIXES = (".csv", ".tsv", ".txt", ".xlsx", ".xlsm", ".xls")
ALL = "All"
FAILED = "failed"


def _count_items(paths: Sequence[Path]) -> int | None:
    """Images the inputs hold, when known before reading them (None with URL lists)."""
    n = 0
    for p in paths:
        suffix = p.suffix.lower()
        if suffix in LIST_SUFFIXES:
            return None
        if suffix == ".zip":
            try:
                with zipfile.ZipFile(p) as zf:
                    n += sum(not info.is_dir() for info in zf.infolist())
            except (OSError, zipfile.BadZipFile):
                n += 1
        else:
            n += 1
    return n


_NUMERIC = ("top1_prob", "top2_prob", "top3_prob", "distance")


def _report_rows(csv_path: Path, upload_dir: Path) -> list[dict[str, Any]]:
    """The rows of a batch's CSV report, sources shown relative to the upload folder."""
    prefix = str(upload_dir) + os.sep
    rows = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            source = r["source"]
            r["source"] = source[len(prefix) :] if source.startswith(prefix) else source
            if not r.get("label"):
                r["label"] = FAILED
            for key in _NUMERIC:
                r[key] = float(r[key]) if r.get(key) else None
            rows.append(r)
    return rows


def _rows_frame(rows: list[dict[str, Any]], label: str) -> pd.DataFrame:
    columns = ["source", "label", "reason", "top1", "top1_prob", "top2", "top2_prob"]
    columns += ["top3", "top3_prob", "distance", "error"]
    shown = [r for r in rows if label in (ALL, None, "") or r["label"] == label]
    return table_frame(columns, ([r.get(c) for c in columns] for r in shown[:MAX_TABLE_ROWS]))


def _summary_md(summary: Any, rows: int) -> str:
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
    for f in d["failures"][:10]:
        lines.append(f"- failed: `{f['source']}` — {f['message'] or f['kind']}")
    if d["failed"] > 10:
        lines.append(f"- … and {d['failed'] - 10} more (see the CSV report)")
    for item in d["ignored"][:5]:
        lines.append(f"- ignored: `{item['source']}` — {item['reason']}")
    if rows > MAX_TABLE_ROWS:
        lines.append(f"The table shows the first {MAX_TABLE_ROWS:,} of {rows:,} rows.")
    return "\n\n".join(lines[:2]) + ("\n\n" + "\n".join(lines[2:]) if lines[2:] else "")


def batch_tab(service: Service) -> Panel:
    @user_errors
    def run(
        files: list[str] | None,
        folder_files: list[str] | None,
        column: str | None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - how Gradio hands out its bar
    ) -> tuple:
        paths = [*(files or []), *(folder_files or [])]
        if not paths:
            raise gr.Error(
                "add images, a zip of a folder, or a CSV/XLSX list of URLs first",
                print_exception=False,
            )
        progress(0, desc="saving uploads")
        folder = service.save_uploads([(Path(p).name, p) for p in paths])
        inputs = sorted(folder.iterdir())
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
        csv_path = report_dir / "report.csv"
        rows = _report_rows(csv_path, folder) if csv_path.is_file() else []
        labels = sorted({r["label"] for r in rows})
        return (
            _summary_md(summary, len(rows)),
            gr.Dropdown(choices=[ALL, *labels], value=ALL),
            _rows_frame(rows, ALL),
            rows,
            gr.DownloadButton(value=str(csv_path) if rows else None, visible=bool(rows)),
            gr.DownloadButton(value=zip_path, visible=zip_path is not None),
        )

    def filter_rows(rows: list[dict[str, Any]], label: str) -> pd.DataFrame:
        return _rows_frame(rows or [], label)

    gr.Markdown(
        "Score many images at once: image files, a folder (or a zip of one), or a CSV/XLSX "
        "list of image URLs. Every image is stored; the CSV report and the images sorted into "
        "one folder per label can be downloaded."
    )
    with gr.Row():
        files = gr.File(
            label="Images, zips, or CSV/XLSX lists of URLs",
            file_count="multiple",
            elem_id="batch-files",
        )
        folder = gr.File(label="…or a folder", file_count="directory", elem_id="batch-folder")
    with gr.Row():
        column = gr.Textbox(
            label="URL column of a CSV/XLSX (optional)",
            placeholder="url",
            elem_id="batch-column",
            scale=3,
        )
        start = gr.Button("Score", variant="primary", elem_id="batch-run", scale=1)
    summary = gr.Markdown(elem_id="batch-summary")
    with gr.Row():
        label = gr.Dropdown(label="Show label", choices=[ALL], value=ALL, elem_id="batch-label")
        csv_button = gr.DownloadButton(
            "Download CSV report", visible=False, variant="primary", elem_id="batch-csv"
        )
        zip_button = gr.DownloadButton(
            "Download label folders (zip)", visible=False, elem_id="batch-zip"
        )
    table = gr.Dataframe(
        value=_rows_frame([], ALL),
        label="Results (click a column header to sort)",
        interactive=False,
        show_search="search",
        max_height=520,
        elem_id="batch-table",
    )
    rows = gr.State([])
    start.click(
        run,
        [files, folder, column],
        [summary, label, table, rows, csv_button, zip_button],
        show_progress_on=[summary, table],
    )
    label.input(filter_rows, [rows, label], table)
    return Panel()
