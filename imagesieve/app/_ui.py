"""The Gradio app: Predict, Batch, Similar, History, Unknowns and Model tabs over one ``Service``.

Every tab calls the same ``Service`` methods as the REST API and the CLI; this module only
turns their results into components. ``build_app`` builds the Blocks and starts nothing: the
server mounts it (``imagesieve serve``). Errors reach the user as one line in a toast
(``gr.Error``), never as a traceback; long work (batches, clustering, training) shows progress.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import functools
import html
import io
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from imagesieve.app._service import Service, ServiceError
from imagesieve.classifier import UNKNOWN, Prediction

__all__ = ["build_app"]

log = logging.getLogger(__name__)

#: What the UNKNOWN reasons mean, in the user's words.
REASON_WORDS = {
    "low_confidence": "low confidence",
    "far_from_training": "far from the training data",
}
#: The Grad-CAM class choice meaning "the Top-1 class of the image".
TOP1_CHOICE = "Top-1 class"
#: Longest side of thumbnails in galleries.
THUMB = 192
#: Rows of a batch report shown in its table (the CSV download has them all).
MAX_TABLE_ROWS = 5000
#: Clusters shown with their galleries (largest first); members shown per cluster.
MAX_CLUSTERS_SHOWN = 20
MEMBERS_SHOWN = 24
#: Suffixes of inputs whose number of images is unknown before they are read.
LIST_SUFFIXES = (".csv", ".tsv", ".txt", ".xlsx", ".xlsm", ".xls")
ALL = "All"
FAILED = "failed"

_GREEN, _RED, _GREY = "#15803d", "#b91c1c", "#6b7280"


# -- errors --------------------------------------------------------------------------------


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 400 else text[:399] + "…"


def _user_errors(fn: Callable) -> Callable:
    """Show a handler's failure as one line (``gr.Error``), never as a traceback.

    Bad input (every library error is a ``ValueError``: ServiceError, ImageLoadError,
    SqlError, SimilarError, ReviewError, InputError) and file problems show their own message;
    anything else is logged and shown as "internal error".
    """

    @functools.wraps(fn)  # keeps the signature: Gradio still sees ``progress=gr.Progress()``
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, OSError) as e:
            log.info("app: %s", _one_line(e))
            raise gr.Error(_one_line(e), print_exception=False) from None
        except Exception as e:
            log.exception("app: unexpected error in %s", fn.__name__)
            raise gr.Error(
                f"internal error ({type(e).__name__}); see the server log",
                print_exception=False,
            ) from None

    return wrapper


def _progress_relay(
    progress: gr.Progress, total_hint: int | None = None, unit: str = "images"
) -> Callable[[str, int, int], None]:
    """A ``progress(stage, done, total)`` callback for the library that moves Gradio's bar.

    ``total_hint`` stands in when the library does not know the total (a batch's images are
    counted as they are read).
    """

    def report(stage: str, done: int, total: int) -> None:
        total = total or total_hint
        if total and done > total:  # an estimate that fell short: show a count only
            total = None
        progress((done, total or None), desc=stage, unit=unit)

    return report


# -- small presentation helpers ------------------------------------------------------------


def _version_or_none(service: Service) -> Any:
    try:
        return service.version
    except ServiceError:
        return None


def _classes(service: Service) -> list[str]:
    version = _version_or_none(service)
    return version.classes if version is not None else []


def _pct(p: float | None) -> str:
    return "" if p is None else f"{p:.0%}"


def _reason_words(reason: str | None) -> list[str]:
    return [REASON_WORDS.get(r, r.replace("_", " ")) for r in (reason or "").split("+") if r]


def _badge(text: str, detail: str, colour: str, **data: str) -> str:
    attrs = "".join(f' data-{k}="{html.escape(v)}"' for k, v in data.items())
    return (
        f'<div class="imagesieve-verdict"{attrs} style="border:3px solid {colour};'
        f'border-radius:10px;padding:10px 14px;background:{colour}14">'
        f'<div class="verdict-label" style="font-size:1.8em;font-weight:800;color:{colour};'
        f'letter-spacing:.03em">{html.escape(text)}</div>'
        f'<div class="verdict-detail" style="margin-top:2px">{html.escape(detail)}</div></div>'
    )


def verdict_html(pred: Prediction, threshold: float | None, distance: float | None) -> str:
    """The label as a badge: green for a class, an unmistakable red UNKNOWN with its reasons."""
    if pred.label != UNKNOWN:
        return _badge(
            pred.label or "",
            f"Top-1 confidence {_pct(pred.confidence)}",
            _GREEN,
            label=pred.label or "",
        )
    details = []
    for reason in (pred.reason or "").split("+"):
        if reason == "low_confidence":
            limit = f", below {_pct(threshold)}" if threshold is not None else ""
            details.append(f"low confidence (Top-1 {_pct(pred.confidence)}{limit})")
        elif reason == "far_from_training":
            bits = []
            if pred.neighbor_distance is not None:
                bits.append(f"nearest at distance {pred.neighbor_distance:.3f}")
            if distance is not None:
                bits.append(f"limit {distance:.3f}")
            details.append("far from the training data" + (f" ({', '.join(bits)})" if bits else ""))
        elif reason:
            details.append(reason.replace("_", " "))
    return _badge(
        UNKNOWN,
        "; ".join(details) or "not like any known class",
        _RED,
        label=UNKNOWN,
        reason=pred.reason or "",
    )


def _empty_badge(text: str = "Upload an image to score it") -> str:
    return (
        f'<div class="imagesieve-verdict" style="border:2px dashed {_GREY};border-radius:10px;'
        f'padding:10px 14px;color:{_GREY}">{html.escape(text)}</div>'
    )


def _top3(pred: Prediction) -> dict[str, float]:
    return {c: float(p) for c, p in pred.top3}


def _thumb(service: Service, id_: int, side: int = THUMB) -> Any:
    try:
        return service.image(id_, max_side=side)
    except Exception:  # a thumbnail that cannot be made is left out, not an error
        log.debug("no thumbnail for %s", id_, exc_info=True)
        return None


def _gallery(service: Service, items: Iterable[tuple[int, str]]) -> list[tuple[Any, str]]:
    """Gallery value from (stored id, caption) pairs; images no longer available are left out."""
    out = []
    for id_, caption in items:
        im = _thumb(service, id_)
        if im is not None:
            out.append((im, caption))
    return out


def _distance_caption(row: dict[str, Any]) -> str:
    return f"#{row['id']} · {row.get('label') or ''} · d={row['distance']:.3f}"


def _cell(v: Any) -> Any:
    """A SQL value as a table cell: numbers stay numbers, everything else becomes text."""
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, dt.datetime | dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, bytes | bytearray | memoryview):
        return "\\x" + bytes(v).hex()
    return str(v)


def _unique_headers(columns: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for c in columns:
        n = seen.get(c, 0)
        seen[c] = n + 1
        out.append(c if n == 0 else f"{c}_{n + 1}")
    return out


def _frame(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> pd.DataFrame:
    return pd.DataFrame([[_cell(v) for v in r] for r in rows], columns=_unique_headers(columns))


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
    return pd.DataFrame(
        [[r.get(c) for c in columns] for r in shown[:MAX_TABLE_ROWS]], columns=columns
    )


def _summary_md(summary: Any, rows: int) -> str:
    d = summary.to_dict()
    labels = ", ".join(f"**{k}** {v}" for k, v in d["labels"].items()) or "none"
    reasons = ", ".join(
        f"{' and '.join(_reason_words(k))} {v}" for k, v in d["unknown_reasons"].items()
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


def _parse_ids(text: str) -> tuple[int, ...]:
    parts = [p for p in re.split(r"[\s,;]+", text or "") if p]
    bad = [p for p in parts if not p.lstrip("#").isdigit()]
    if bad:
        raise ValueError(f"not an image id: {bad[0]!r} (give ids like '12, 15')")
    return tuple(int(p.lstrip("#")) for p in parts)


def _shares(hist: dict[str, int]) -> dict[str, float]:
    total = sum(hist.values()) or 1
    return {k or "(none)": v / total for k, v in hist.items()}


def _header_md(service: Service) -> str:
    health = service.health()
    if health.get("model_version") is None:
        return (
            f"**imagesieve** · workspace `{health['workspace']}` · no trained model yet: run "
            "`imagesieve train DATA_DIR` or `imagesieve demo`"
        )
    classes = ", ".join(health.get("classes", []))
    return (
        f"**imagesieve** · workspace `{health['workspace']}` · model **{health['model_version']}**"
        f" ({classes}) · {health.get('stored_images', 0):,} stored images"
    )


class _Downloads:
    """Files made only to be downloaded (query results), in one temporary folder per app.

    Gradio copies a returned file into its own cache at once, so folders older than an hour
    are removed as new ones are made.
    """

    def __init__(self) -> None:
        self._dir: Path | None = None

    def path(self, name: str) -> Path:
        if self._dir is None or not self._dir.is_dir():
            self._dir = Path(tempfile.mkdtemp(prefix="imagesieve-app-"))
        old = time.time() - 3600
        for folder in self._dir.iterdir():
            if folder.stat().st_mtime < old:
                shutil.rmtree(folder, ignore_errors=True)
        folder = self._dir / uuid.uuid4().hex[:12]
        folder.mkdir()
        return folder / name


@dataclass
class _Panel:
    """How a tab keeps itself up to date.

    ``refresh(*inputs)`` fills ``outputs`` on page load, when the tab is opened and after the
    served model changed (``model_changes``: events after which it did). ``on_open(tab)``,
    when given, wires the tab's opening itself instead.
    """

    refresh: Callable[..., Any] | None = None
    outputs: list[Any] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)
    on_open: Callable[[Any], None] | None = None
    model_changes: list[Any] = field(default_factory=list)


# -- Predict ----------------------------------------------------------------------------------


def _jpeg(image: Any) -> bytes:
    """A camera frame (PIL or array) as JPEG bytes, the form it is scored and stored in."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _predict_tab(service: Service) -> _Panel:
    def thresholds() -> tuple[float | None, float | None]:
        predictor = service.predictor
        if predictor is None:
            return None, None
        return predictor.threshold, predictor.distance_threshold

    def show(result: Any) -> tuple[str, dict[str, float], str, list]:
        pred = result.prediction
        parts = []
        if pred.id is not None:
            parts.append(f"stored as **#{pred.id}**")
        if pred.skipped:
            parts.append("this content was stored before")
        parts.append(f"model {result.model_version}")
        if pred.neighbor_distance is not None:
            parts.append(f"nearest training image at distance {pred.neighbor_distance:.3f}")
        if pred.cluster_id is not None and pred.cluster_id >= 0:
            parts.append(f"in UNKNOWN cluster {pred.cluster_id}")
        parts.append(f"{pred.width}×{pred.height} px, {result.seconds:.2f} s")
        gallery = _gallery(service, ((n["id"], _distance_caption(n)) for n in result.neighbours))
        return verdict_html(pred, *thresholds()), _top3(pred), " · ".join(parts), gallery

    @_user_errors
    def score_upload(path: str | None) -> tuple:
        if not path:
            return _empty_badge(), None, "", [], None, None
        result = service.predict(Path(path).read_bytes(), Path(path).name)
        return (*show(result), path, None)

    @_user_errors
    def live_frame(frame: Any) -> tuple:
        if frame is None:
            return gr.skip(), gr.skip(), None
        data = _jpeg(frame)
        result = service.predict(data, "webcam.jpg", neighbours=0, store=False)
        return _top3(result.prediction), verdict_html(result.prediction, *thresholds()), data

    @_user_errors
    def store_frame(data: bytes | None) -> tuple:
        if not data:
            raise gr.Error("no camera frame yet: start the camera first", print_exception=False)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        return (*show(service.predict(data, f"webcam-{stamp}.jpg")), data, None)

    @_user_errors
    def explain(source: str | bytes | None, class_name: str | None) -> Any:
        if source is None:
            return None
        from imagesieve.data import load_image

        wanted = None if class_name in (None, "", TOP1_CHOICE) else class_name
        try:
            cam = service.gradcam(source, wanted)
        except (ImportError, ValueError) as e:  # no torch, no checkpoint: the score still stands
            gr.Warning(f"no Grad-CAM: {_one_line(e)}")
            return None
        image = load_image(source).image
        image.thumbnail((512, 512))
        return gr.Image(
            value=cam.overlay(image),
            label=f"Grad-CAM: where the model saw “{cam.class_name}” ({_pct(cam.probability)})",
        )

    def refresh(current: str | None) -> Any:
        choices = [TOP1_CHOICE, *_classes(service)]
        return gr.Dropdown(choices=choices, value=current if current in choices else TOP1_CHOICE)

    with gr.Row():
        with gr.Column(scale=1):
            with gr.Tabs():
                with gr.Tab("Upload"):
                    image = gr.Image(
                        label="Image",
                        type="filepath",
                        image_mode=None,  # the file as uploaded: scored and stored as sent
                        sources=["upload", "clipboard"],
                        elem_id="predict-image",
                    )
                with gr.Tab("Camera"):
                    camera = gr.Image(
                        label="Live camera (frames are scored, not stored)",
                        sources=["webcam"],
                        streaming=True,
                        type="pil",
                        elem_id="predict-camera",
                    )
                    live_verdict = gr.HTML(
                        _empty_badge("Start the camera to score it live"), elem_id="live-verdict"
                    )
                    live_top3 = gr.Label(label="Live Top-3", num_top_classes=3, show_heading=False)
                    store_button = gr.Button("Store this frame", elem_id="predict-store-frame")
        with gr.Column(scale=1):
            verdict = gr.HTML(_empty_badge(), elem_id="predict-verdict")
            top3 = gr.Label(
                label="Top-3", num_top_classes=3, show_heading=False, elem_id="predict-top3"
            )
            details = gr.Markdown(elem_id="predict-details")
    with gr.Row():
        with gr.Column(scale=1):
            cam_class = gr.Dropdown(label="Explain class", choices=[TOP1_CHOICE], value=TOP1_CHOICE)
            cam_image = gr.Image(
                label="Grad-CAM", interactive=False, format="png", elem_id="predict-gradcam"
            )
        with gr.Column(scale=2):
            neighbours = gr.Gallery(
                label="Most similar stored images",
                columns=5,
                height=320,
                object_fit="contain",
                elem_id="predict-neighbours",
            )
    source = gr.State(None)  # the scored image (upload path or frame bytes), for Grad-CAM
    frame = gr.State(None)  # the latest camera frame (JPEG bytes)

    outputs = [verdict, top3, details, neighbours, source, cam_image]
    image.upload(score_upload, image, outputs).success(explain, [source, cam_class], cam_image)
    image.clear(score_upload, image, outputs)
    camera.stream(
        live_frame,
        camera,
        [live_top3, live_verdict, frame],
        stream_every=0.5,
        time_limit=600,
        concurrency_limit=4,
        show_progress="hidden",
    )
    store_button.click(store_frame, frame, outputs).success(explain, [source, cam_class], cam_image)
    cam_class.input(explain, [source, cam_class], cam_image)
    return _Panel(refresh, [cam_class], [cam_class])


# -- Batch ------------------------------------------------------------------------------------


def _batch_tab(service: Service) -> _Panel:
    @_user_errors
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
        report = _progress_relay(progress, _count_items(inputs))
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
    return _Panel()


# -- Similar ----------------------------------------------------------------------------------


def _similar_tab(service: Service) -> _Panel:
    columns = ["id", "distance", "label", "top1_class", "top1_prob", "cluster_id", "source"]

    def search(query: dict[str, Any], k: float, max_distance: float, where: str | None) -> tuple:
        info, results = service.similar(
            **query,
            k=int(k),
            max_distance=None if max_distance >= 2 else float(max_distance),
            where=(where or "").strip() or None,
        )
        rows = [r.to_dict() for r in results]
        gallery = _gallery(service, ((r["id"], _distance_caption(r)) for r in rows))
        what = {"image": "the uploaded image", "id": f"image #{info.value}"}.get(
            info.kind, f"the centre of class {info.value}"
        )
        text = f"**{len(rows)}** nearest to {what} (model {info.model_version}, {info.method}"
        if info.matching_rows is not None:
            text += f"; {info.matching_rows:,} stored images pass the filter"
        text += ")."
        if info.prediction:
            p = info.prediction
            why = " and ".join(_reason_words(p.get("reason")))
            text += f" The uploaded image scores **{p['label']}**" + (f" ({why})." if why else ".")
        table = pd.DataFrame([[r[c] for c in columns] for r in rows], columns=columns)
        return text, gallery, table, [r["id"] for r in rows]

    @_user_errors
    def by_image(path: str | None, k: float, max_distance: float, where: str | None) -> tuple:
        if not path:
            raise gr.Error("upload an image to search with", print_exception=False)
        return search({"image": Path(path).read_bytes()}, k, max_distance, where)

    @_user_errors
    def by_id(id_: float | None, k: float, max_distance: float, where: str | None) -> tuple:
        if id_ is None:
            raise gr.Error("give a stored image id", print_exception=False)
        return search({"id": int(id_)}, k, max_distance, where)

    @_user_errors
    def by_class(name: str | None, k: float, max_distance: float, where: str | None) -> tuple:
        if not name:
            raise gr.Error("pick a class", print_exception=False)
        return search({"class_name": name}, k, max_distance, where)

    def pick(ids: list[int], evt: gr.SelectData) -> Any:
        i = evt.index if isinstance(evt.index, int) else None
        return ids[i] if ids and i is not None and i < len(ids) else gr.skip()

    def refresh(current: str | None) -> Any:
        classes = _classes(service)
        value = current if current in classes else (classes[0] if classes else None)
        return gr.Dropdown(choices=classes, value=value)

    with gr.Row():
        with gr.Column(scale=1):
            with gr.Tabs():
                with gr.Tab("By image"):
                    image = gr.Image(
                        label="Image",
                        type="filepath",
                        image_mode=None,
                        sources=["upload", "clipboard"],
                        elem_id="similar-image",
                    )
                    image_button = gr.Button(
                        "Search", variant="primary", elem_id="similar-by-image"
                    )
                with gr.Tab("By id"):
                    id_box = gr.Number(label="Stored image id", precision=0, elem_id="similar-id")
                    id_button = gr.Button("Search", variant="primary", elem_id="similar-by-id")
                with gr.Tab("By class"):
                    class_box = gr.Dropdown(label="Class", choices=[], elem_id="similar-class")
                    class_button = gr.Button(
                        "Search", variant="primary", elem_id="similar-by-class"
                    )
        with gr.Column(scale=1):
            k = gr.Slider(1, 100, value=12, step=1, label="How many", elem_id="similar-k")
            max_distance = gr.Slider(
                0,
                2,
                value=2,
                step=0.01,
                label="Max distance (cosine; 2 = no limit)",
                elem_id="similar-max-distance",
            )
            where = gr.Textbox(
                label="Filter: SQL over predictions (optional)",
                placeholder="label = 'UNKNOWN' AND top1_prob > 0.8",
                elem_id="similar-where",
            )
    info = gr.Markdown(elem_id="similar-info")
    gallery = gr.Gallery(
        label="Similar stored images (click one to search from it by id)",
        columns=6,
        height=420,
        object_fit="contain",
        elem_id="similar-gallery",
    )
    table = gr.Dataframe(
        value=pd.DataFrame(columns=columns),
        interactive=False,
        label="Results",
        elem_id="similar-table",
    )
    ids = gr.State([])
    controls = [k, max_distance, where]
    outputs = [info, gallery, table, ids]
    image_button.click(by_image, [image, *controls], outputs)
    id_button.click(by_id, [id_box, *controls], outputs)
    id_box.submit(by_id, [id_box, *controls], outputs)
    class_button.click(by_class, [class_box, *controls], outputs)
    gallery.select(pick, ids, id_box)
    return _Panel(refresh, [class_box], [class_box])


# -- History ----------------------------------------------------------------------------------


def _history_tab(service: Service, downloads: _Downloads) -> _Panel:
    from imagesieve.search._sql import VIEWS

    @_user_errors
    def run(sql: str | None, limit: float | None) -> tuple:
        if not (sql or "").strip():
            raise gr.Error("write a query first", print_exception=False)
        result = service.sql(sql, limit=int(limit or 1000))
        path = downloads.path("query.csv")
        result.to_csv(path)
        n = len(result.rows)
        more = " (row limit reached: more rows were not fetched)" if result.truncated else ""
        return (
            f"{n:,} row{'' if n == 1 else 's'} in {result.seconds:.2f} s{more}",
            gr.Dataframe(value=_frame(result.columns, result.rows), visible=True),
            gr.DownloadButton(value=str(path), visible=True),
        )

    def view(name: str) -> Callable[[float | None], tuple]:
        sql = f"SELECT * FROM {name}"

        def show(limit: float | None) -> tuple:
            return (sql, *run(sql, limit))

        return show

    def chart() -> pd.DataFrame:
        empty = pd.DataFrame({"day": [], "label": [], "n": []})
        if _version_or_none(service) is None:
            return empty
        result = service.sql(
            "SELECT CAST(day AS VARCHAR) AS day, label, CAST(sum(n) AS BIGINT) AS n "
            "FROM predictions_per_day GROUP BY ALL ORDER BY day, label",
            limit=100_000,
        )
        return pd.DataFrame(result.rows, columns=["day", "label", "n"]) if result.rows else empty

    gr.Markdown(
        "Read-only SQL over everything stored (tables `predictions`, `batches`, `failures`, "
        "`clusters`, …; one SELECT at a time). The ready-made views, one click away:"
    )
    with gr.Row():
        buttons = {name: gr.Button(name, size="sm", elem_id=f"view-{name}") for name in VIEWS}
    gr.Markdown("\n".join(f"- **{n}**: {d}" for n, d in VIEWS.items()))
    sql = gr.Textbox(
        label="SQL",
        lines=4,
        value="SELECT label, count(*) AS n FROM predictions GROUP BY label ORDER BY n DESC",
        elem_id="history-sql",
    )
    with gr.Row():
        limit = gr.Number(label="Row limit", value=1000, precision=0, minimum=1)
        start = gr.Button("Run query", variant="primary", elem_id="history-run")
        csv_button = gr.DownloadButton("Download CSV", visible=False, elem_id="history-csv")
    status = gr.Markdown(elem_id="history-status")
    table = gr.Dataframe(
        interactive=False,
        visible=False,  # until there is a result: an empty table shows made-up headers
        label="Result",
        max_height=480,
        elem_id="history-table",
    )
    plot = gr.BarPlot(
        value=pd.DataFrame({"day": [], "label": [], "n": []}),
        x="day",
        y="n",
        color="label",
        title="Predictions per day by label (UTC day of their latest scoring)",
        x_title="day",
        y_title="images",
        height=300,
        elem_id="history-chart",
    )
    start.click(run, [sql, limit], [status, table, csv_button])
    for name, button in buttons.items():
        button.click(_user_errors(view(name)), limit, [sql, status, table, csv_button])
    return _Panel(_user_errors(chart), [plot])


# -- Unknowns ---------------------------------------------------------------------------------


def _unknowns_status(service: Service) -> str:
    version = _version_or_none(service)
    if version is None:
        return "No trained model yet."
    alive = [c for c in service.clusters() if c["size"] > 0]
    by_status: dict[str, int] = {}
    for c in alive:
        by_status[c["status"]] = by_status.get(c["status"], 0) + 1
    counts = ", ".join(f"{v} {k}" for k, v in sorted(by_status.items()))
    unknown, noise = service.sql(
        "SELECT count(*) FILTER (WHERE label = 'UNKNOWN'), count(*) FILTER (WHERE cluster_id = -1) "
        f"FROM predictions WHERE model_version = {_quote(version.name)}",
        limit=1,
    ).rows[0]
    into = service.training_dir()
    where = f"`{into}`" if into else "the folder given below (the model's training folder is gone)"
    return (
        f"Model {version.name}: {unknown:,} UNKNOWN images; {len(alive)} clusters "
        f"({counts or 'none yet'}); {noise:,} left as noise. Promoting copies a cluster's "
        f"images into {where}."
    )


def _quote(text: str) -> str:
    """A SQL string literal (for values the app itself holds, like a version name)."""
    return "'" + text.replace("'", "''") + "'"


def _unknowns_tab(service: Service) -> _Panel:
    def refresh() -> tuple:
        rows = service.clusters() if _version_or_none(service) is not None else []
        return _unknowns_status(service), rows

    @_user_errors
    def cluster(
        min_size: float,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - how Gradio hands out its bar
    ) -> tuple:
        progress(0, desc="clustering")
        run = service.run_clustering(
            progress=_progress_relay(progress, unit="steps"), min_cluster_size=int(min_size)
        )
        if run.clusters:
            gr.Info(f"{len(run.clusters)} clusters among {run.images} UNKNOWN images")
        else:
            gr.Warning(
                f"no clusters found among {run.images} UNKNOWN images (all are noise): "
                "try a smaller cluster size"
            )
        return refresh()

    @_user_errors
    def retrain(progress: gr.Progress = gr.Progress()) -> tuple:  # noqa: B008
        progress(0, desc="training")
        version = service.retrain(progress=_progress_relay(progress, unit="steps"))
        accuracy = version.meta.get("metrics", {}).get("accuracy")
        gr.Info(
            f"trained and activated {version.name}"
            + (f": test accuracy {accuracy:.3f}" if accuracy is not None else "")
        )
        return refresh()

    gr.Markdown(
        "UNKNOWN images grouped into clusters of look-alikes (HDBSCAN), largest first. Name a "
        "cluster, leave out members that do not belong, then promote it into the training data "
        "as a new class (or reject it), and retrain."
    )
    from imagesieve.search._cluster import ClusterParams

    with gr.Row():
        min_size = gr.Slider(
            2,
            200,
            value=ClusterParams().min_cluster_size,
            step=1,
            label="Smallest cluster (images)",
            elem_id="unknowns-min-size",
        )
        run_button = gr.Button("Run clustering", variant="primary", elem_id="unknowns-run")
        retrain_button = gr.Button("Retrain on the training folder", elem_id="unknowns-retrain")
    status = gr.Markdown(elem_id="unknowns-status")
    with gr.Row():
        show = gr.Radio(
            ["open", "all", "promoted", "rejected"],
            value="open",
            label="Show clusters",
            elem_id="unknowns-show",
        )
        into = gr.Textbox(
            label="Promote into (blank: the active model's training folder)",
            elem_id="unknowns-into",
        )
    clusters = gr.State([])

    @gr.render(inputs=[clusters, show], triggers=[clusters.change, show.change])
    def panels(rows: list[dict[str, Any]] | None, which: str) -> None:
        wanted = {"open": ("new", "named"), "all": ("new", "named", "promoted", "rejected")}
        statuses = wanted.get(which, (which,))
        shown = [c for c in rows or [] if c["size"] > 0 and c["status"] in statuses]
        if not shown:
            gr.Markdown("No clusters to show here. Run clustering after scoring some images.")
            return
        if len(shown) > MAX_CLUSTERS_SHOWN:
            gr.Markdown(f"Showing the {MAX_CLUSTERS_SHOWN} largest of {len(shown)} clusters.")
        for c in shown[:MAX_CLUSTERS_SHOWN]:
            _cluster_panel(service, c, clusters, into)

    run_button.click(cluster, min_size, [status, clusters], show_progress_on=[status])
    retrained = retrain_button.click(retrain, None, [status, clusters], show_progress_on=[status])
    return _Panel(_user_errors(refresh), [status, clusters], model_changes=[retrained])


def _cluster_panel(service: Service, c: dict[str, Any], clusters: gr.State, into: Any) -> None:
    """One cluster: its members as a gallery, Top-1/Top-2 histograms and the review actions."""
    cid = c["cluster_id"]
    members = service.cluster_members(cid, limit=MEMBERS_SHOWN)
    gallery = _gallery(
        service,
        (
            (
                m["id"],
                f"#{m['id']} · {m['top1_class']} {_pct(m['top1_prob'])}"
                + (" · left out" if m["excluded"] else ""),
            )
            for m in members
        ),
    )
    title = f"Cluster {cid} · {c['size']} images · {c['status']}"
    if c.get("name"):
        title += f" · “{c['name']}”"
    notes = [f"medoid #{c['medoid_id']}"]
    if c.get("cohesion") is not None:
        notes.append(f"cohesion {c['cohesion']:.3f}")
    if c.get("excluded"):
        notes.append(f"{c['excluded']} left out of promotion")
    if c.get("promoted_into"):
        notes.append(f"promoted into `{c['promoted_into']}`")

    def done(message: str) -> list[dict[str, Any]]:
        gr.Info(message)
        return service.clusters()

    @_user_errors
    def name_it(name: str | None) -> Any:
        row = service.update_cluster(cid, name=name or "")
        return done(f"cluster {cid} named “{row['name']}”")

    @_user_errors
    def leave_out(ids: str | None) -> Any:
        chosen = _parse_ids(ids or "")
        if not chosen:
            raise gr.Error("give the ids to leave out, e.g. '12, 15'", print_exception=False)
        row = service.update_cluster(cid, exclude=chosen)
        return done(f"cluster {cid}: {row['excluded']} members left out of promotion")

    @_user_errors
    def promote(name: str | None, folder: str | None) -> Any:
        name = (name or "").strip() or (c.get("name") or "")
        if not name:
            raise gr.Error("name the cluster (its new class) first", print_exception=False)
        result = service.promote_cluster(cid, name, (folder or "").strip() or None)
        extra = f", {result.already_there} already there" if result.already_there else ""
        extra += f", {len(result.missing)} no longer available" if result.missing else ""
        return done(f"cluster {cid}: {result.copied} images copied into {result.dest}{extra}")

    @_user_errors
    def reject() -> Any:
        service.update_cluster(cid, reject=True)
        return done(f"cluster {cid} rejected")

    with gr.Group(elem_id=f"cluster-{cid}", elem_classes=["imagesieve-cluster"]):
        gr.Markdown(f"### {title}\n{' · '.join(notes)}")
        with gr.Row():
            gr.Gallery(
                value=gallery,
                label=f"Members (first {MEMBERS_SHOWN})",
                columns=8,
                height=260,
                object_fit="contain",
                elem_id=f"cluster-{cid}-gallery",
                scale=3,
            )
            with gr.Column(scale=1):
                gr.Label(
                    value=_shares(c.get("top1") or {}),
                    label="Top-1 class of members",
                    show_heading=False,
                    num_top_classes=5,
                )
                gr.Label(
                    value=_shares(c.get("top2") or {}),
                    label="Top-2 class of members",
                    show_heading=False,
                    num_top_classes=5,
                )
        with gr.Row():
            name_box = gr.Textbox(
                value=c.get("name") or "",
                label="Name (the new class)",
                elem_id=f"cluster-{cid}-name",
            )
            ids_box = gr.Textbox(
                label="Leave out ids", placeholder="12, 15", elem_id=f"cluster-{cid}-exclude"
            )
        with gr.Row():
            name_button = gr.Button("Name", size="sm", elem_id=f"cluster-{cid}-name-button")
            leave_button = gr.Button(
                "Leave out", size="sm", elem_id=f"cluster-{cid}-exclude-button"
            )
            promote_button = gr.Button(
                "Promote into the training data",
                size="sm",
                variant="primary",
                elem_id=f"cluster-{cid}-promote",
            )
            reject_button = gr.Button(
                "Reject", size="sm", variant="stop", elem_id=f"cluster-{cid}-reject"
            )
    name_button.click(name_it, name_box, clusters)
    leave_button.click(leave_out, ids_box, clusters)
    promote_button.click(promote, [name_box, into], clusters)
    reject_button.click(reject, None, clusters)


# -- Model ------------------------------------------------------------------------------------


def _metrics_md(version: Any) -> str:
    m = version.meta.get("metrics", {})
    names = [
        ("accuracy", "accuracy"),
        ("macro_f1", "macro-F1"),
        ("weighted_f1", "weighted-F1"),
        ("roc_auc", "ROC-AUC"),
        ("ece", "calibration error (ECE)"),
        ("unknown_rate", "UNKNOWN rate"),
    ]
    head = " · ".join(
        f"{label} **{m[key]:.3f}**" for key, label in names if isinstance(m.get(key), int | float)
    )
    lines = [
        f"**{version.name}** ({version.meta.get('backbone')}), evaluated on "
        f"{m.get('n', '?')} {m.get('evaluated_on', '')} images: {head}",
        "",
    ]
    per_class = m.get("per_class") or {}
    if per_class:
        lines += ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for name, row in per_class.items():
            cells = [row.get(k) for k in ("precision", "recall", "f1")]
            text = " | ".join("" if v is None else f"{v:.3f}" for v in cells)
            lines.append(f"| {name} | {text} | {row.get('support', '')} |")
    return "\n".join(lines)


def _misclassified(version: Any, limit: int = 48) -> list[tuple[Any, str]]:
    """The misclassified evaluation images (from the audit CSV), or the report's montage."""
    from PIL import Image

    from imagesieve.data import load_image

    out: list[tuple[Any, str]] = []
    audit = version.report_dir / "audit.csv"
    if audit.is_file():
        with open(audit, newline="", encoding="utf-8") as f:
            wrong = [r for r in csv.DictReader(f) if r.get("correct") == "false"]
        wrong.sort(key=lambda r: -float(r.get("top1_prob") or 0))
        for r in wrong[:limit]:
            try:
                im = load_image(r["path"]).image
            except (ValueError, OSError):  # training images moved away: the montage stands in
                continue
            im.thumbnail((THUMB, THUMB))
            p = float(r.get("top1_prob") or 0)
            out.append((im, f"{r['true']} → {r['top1']} {_pct(p)}"))
    montage = version.report_dir / "misclassified.png"
    if not out and montage.is_file():
        out.append((Image.open(montage).convert("RGB"), "most confident mistakes (report)"))
    return out


def _report_image(version: Any, name: str) -> Any:
    from PIL import Image

    path = version.report_dir / name
    if not path.is_file():
        return None
    with Image.open(path) as im:
        return im.convert("RGB")


def _model_tab(service: Service) -> _Panel:
    def preview(confidence: float, use_distance: bool, distance: float) -> str:
        if _version_or_none(service) is None:
            return ""
        counts = service.threshold_preview(
            float(confidence), float(distance) if use_distance else None
        )
        rule = f"Top-1 below {_pct(confidence)}"
        if use_distance:
            rule += f" or nearest training image beyond {distance:.3f}"
        stored = counts["stored"]
        return (
            f"With **{rule}**, **{counts['unknown']:,} of {stored:,}** stored images would be "
            f"UNKNOWN (low confidence: {counts['low_confidence']:,}; far from the training "
            f"data: {counts['far_from_training']:,}). Marked UNKNOWN now: "
            f"{counts['unknown_now']:,}. **Apply** makes these the model's thresholds and "
            "re-decides the stored images."
        )

    def refresh() -> tuple:
        versions = service.versions()
        columns = ["version", "active", "kind", "backbone", "classes", "accuracy", "macro_f1"]
        table = pd.DataFrame(
            [[v.get(c) for c in columns + ["created_at"]] for v in versions],
            columns=[*columns, "created_at"],
        )
        names = [v["version"] for v in versions if v.get("kind") == "trained"]
        version = _version_or_none(service)
        if version is None:
            return (
                table,
                gr.Dropdown(choices=names, value=names[-1] if names else None),
                "No trained model yet: run `imagesieve train DATA_DIR` or `imagesieve demo`.",
                None,
                None,
                [],
                gr.Slider(),
                gr.Checkbox(),
                gr.Slider(),
                "",
            )
        confidence = version.confidence_threshold
        distance = version.distance_threshold
        return (
            table,
            gr.Dropdown(choices=names, value=version.name),
            _metrics_md(version),
            _report_image(version, "confusion_matrix.png"),
            _report_image(version, "training_curves.png"),
            _misclassified(version),
            gr.Slider(value=confidence),
            gr.Checkbox(value=distance is not None),
            gr.Slider(value=distance if distance is not None else 0.3),
            preview(confidence, distance is not None, distance or 0.3),
        )

    @_user_errors
    def activate(name: str | None) -> None:
        if not name:
            raise gr.Error("pick a version", print_exception=False)
        version = service.activate(name)
        gr.Info(f"now serving {version.name}")

    gr.Markdown("Model versions in this workspace; the active one scores every image.")
    versions = gr.Dataframe(interactive=False, label="Versions", elem_id="model-versions")
    with gr.Row():
        pick = gr.Dropdown(label="Version", choices=[], elem_id="model-pick", scale=3)
        activate_button = gr.Button("Activate", elem_id="model-activate", scale=1)
    metrics = gr.Markdown(elem_id="model-metrics")
    with gr.Row():
        confusion = gr.Image(
            label="Confusion matrix", interactive=False, format="png", elem_id="model-confusion"
        )
        curves = gr.Image(
            label="Training curves", interactive=False, format="png", elem_id="model-curves"
        )
    misclassified = gr.Gallery(
        label="Misclassified evaluation images (true → predicted)",
        columns=8,
        height=260,
        object_fit="contain",
        elem_id="model-misclassified",
    )
    gr.Markdown("### UNKNOWN thresholds")
    with gr.Row():
        confidence = gr.Slider(
            0, 1, value=0.5, step=0.01, label="Top-1 confidence below", elem_id="model-confidence"
        )
        use_distance = gr.Checkbox(
            value=True, label="Use the distance rule", elem_id="model-use-distance"
        )
        distance = gr.Slider(
            0,
            1,
            value=0.3,
            step=0.005,
            label="Nearest training image further than (cosine distance)",
            elem_id="model-distance",
        )
    counts = gr.Markdown(elem_id="model-threshold-preview")
    apply_button = gr.Button("Apply these thresholds", elem_id="model-apply-thresholds")
    outputs = [versions, pick, metrics, confusion, curves, misclassified]
    outputs += [confidence, use_distance, distance, counts]
    activated = activate_button.click(activate, pick, None)

    @_user_errors
    def apply(confidence: float, use_distance: bool, distance: float) -> None:
        counts = service.set_thresholds(
            float(confidence), float(distance) if use_distance else None
        )
        gr.Info(
            f"thresholds applied: {counts['unknown']:,} of {counts['stored']:,} stored images UNKNOWN"
        )

    applied = apply_button.click(apply, [confidence, use_distance, distance], None)
    # One queue for everything that writes the preview, so results land in the order asked.
    thresholds = {"concurrency_id": "model-thresholds", "concurrency_limit": 1}
    sliders = [confidence, use_distance, distance]
    for control in sliders:
        control.input(
            _user_errors(preview),
            sliders,
            counts,
            trigger_mode="always_last",
            show_progress="hidden",
            **thresholds,
        )

    def on_open(tab: Any) -> None:  # the counts change as images are scored; the sliders stay
        tab.select(_user_errors(preview), sliders, counts, show_progress="hidden", **thresholds)

    return _Panel(
        _user_errors(refresh), outputs, on_open=on_open, model_changes=[activated, applied]
    )


# -- the app ----------------------------------------------------------------------------------


def build_app(service: Service) -> gr.Blocks:
    """The Gradio app over ``service``; nothing runs until the server mounts or launches it."""
    downloads = _Downloads()
    with gr.Blocks(title="imagesieve", delete_cache=(3600, 86400)) as demo:
        header = gr.Markdown(elem_id="app-header")
        panels: list[tuple[Any, _Panel]] = []
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Predict", id="predict", elem_id="tab-predict") as tab:
                panels.append((tab, _predict_tab(service)))
            with gr.Tab("Batch", id="batch", elem_id="tab-batch") as tab:
                panels.append((tab, _batch_tab(service)))
            with gr.Tab("Similar", id="similar", elem_id="tab-similar") as tab:
                panels.append((tab, _similar_tab(service)))
            with gr.Tab("History", id="history", elem_id="tab-history") as tab:
                panels.append((tab, _history_tab(service, downloads)))
            with gr.Tab("Unknowns", id="unknowns", elem_id="tab-unknowns") as tab:
                panels.append((tab, _unknowns_tab(service)))
            with gr.Tab("Model", id="model", elem_id="tab-model") as tab:
                panels.append((tab, _model_tab(service)))

        def header_now() -> str:
            return _header_md(service)

        demo.load(header_now, None, header)
        for tab, panel in panels:
            tab.select(header_now, None, header, show_progress="hidden")
            if panel.refresh is not None:
                demo.load(panel.refresh, panel.inputs, panel.outputs)
            if panel.on_open is not None:
                panel.on_open(tab)
            elif panel.refresh is not None:
                tab.select(panel.refresh, panel.inputs, panel.outputs)
        for changed in (event for _, panel in panels for event in panel.model_changes):
            changed.success(header_now, None, header)
            for _, panel in panels:
                if panel.refresh is not None:
                    changed.success(panel.refresh, panel.inputs, panel.outputs)
    return demo
