"""Evaluation report: metrics.json, confusion matrix, training curves, audit CSV and gallery.

matplotlib and scikit-learn are imported inside the functions that use them, so importing this
module stays cheap and never touches matplotlib's global backend.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imagesieve.classifier._openset import against_target
from imagesieve.classifier._predict import TOP3_COLUMNS, top_k
from imagesieve.classifier._unknown import LOW_CONFIDENCE, reason_shares

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["write_report"]

log = logging.getLogger(__name__)

ECE_BINS = 15
GALLERY_SIZE = 16
#: Keys computed by the report; ``extra`` may not overwrite them.
RESERVED_KEYS = frozenset(
    {
        "n",
        "accuracy",
        "macro_f1",
        "weighted_f1",
        "roc_auc",
        "ece",
        "unknown_rate",
        "unknown_by_rule",
        "unknown_vs_target",
        "accuracy_known",
        "threshold",
        "classes",
        "per_class",
        "confusion_matrix",
        "files",
    }
)
AUDIT_COLUMNS = ["path", "true", *TOP3_COLUMNS, "confidence", "correct", "unknown", "reason"]


def write_report(
    out_dir: Path,
    *,
    classes: list[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    sources: list[str],
    threshold: float = 0.5,
    history: dict[str, list[float]] | None = None,
    load_thumbnail: Callable[[str], Image.Image] | None = None,
    extra: dict[str, Any] | None = None,
    reasons: Sequence[str | None] | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    target: float | None = None,
) -> dict[str, Any]:
    """Write metrics.json, plots, audit.csv and the misclassified gallery into ``out_dir``.

    ``y_true`` is (n,) int class indices, ``probs`` (n, c) softmax rows; ``reasons`` the
    model's UNKNOWN reason per row (None: known), so that the UNKNOWN rate is the whole
    decision's; without them only ``probs[top1] < threshold`` counts. ``inputs``: the rest of
    what the decision read, as (n,) columns (``distance``, the photo quality measures) that
    audit.csv keeps, so other thresholds can be judged on these images later
    (``classifier.held_out_unknowns``). ``target``: the false-UNKNOWN rate the thresholds aim
    at, which these known-class images' UNKNOWN share is judged against (``unknown_vs_target``,
    ``against_target``). Returns the metrics.
    """
    y_true, probs = _check_inputs(classes, y_true, probs, sources, threshold, extra)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    idx, top_p = top_k(probs, 3)
    if reasons is None:
        reasons = [LOW_CONFIDENCE if p < threshold else None for p in top_p[:, 0]]
    if len(reasons) != len(y_true):
        raise ValueError(f"reasons ({len(reasons)}) need one entry per probs row ({len(y_true)})")
    metrics = _metrics(classes, y_true, probs, idx[:, 0], top_p[:, 0], threshold, reasons)
    if target is not None:
        metrics["unknown_vs_target"] = against_target(metrics["unknown_rate"], len(y_true), target)
    metrics.update(_plain(extra or {}))

    files = ["metrics.json", "audit.csv", "confusion_matrix.png"]
    _write_audit(out_dir / "audit.csv", classes, y_true, idx, top_p, sources, reasons, inputs)
    cm = np.asarray(metrics["confusion_matrix"])
    _plot_confusion(out_dir / "confusion_matrix.png", classes, cm)
    if _plot_curves(out_dir / "training_curves.png", history or {}):
        files.append("training_curves.png")
    worst = _worst_misclassified(y_true, idx[:, 0], top_p[:, 0], GALLERY_SIZE)
    if load_thumbnail is not None and worst.size:
        captions = [_caption(classes, y_true[i], idx[i, 0], top_p[i, 0], sources[i]) for i in worst]
        sources_shown = [sources[i] for i in worst]
        _plot_gallery(out_dir / "misclassified.png", sources_shown, captions, load_thumbnail)
        files.append("misclassified.png")
    metrics["files"] = files
    text = json.dumps(metrics, indent=2, allow_nan=False)
    (out_dir / "metrics.json").write_text(text, encoding="utf-8")
    log.info("evaluation report for %d images written to %s", len(y_true), out_dir)
    return metrics


def _check_inputs(
    classes: list[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    sources: list[str],
    threshold: float,
    extra: dict[str, Any] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, dtypes and ranges; return (y_true int64, probs float64)."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    c = len(classes)
    if c == 0 or len(set(classes)) != c:
        raise ValueError(f"classes must be non-empty and unique, got {list(classes)}")
    if probs.ndim != 2 or probs.shape[1] != c:
        raise ValueError(f"probs must be (n, {c}) for {c} classes, got shape {probs.shape}")
    n = probs.shape[0]
    if n == 0:
        raise ValueError("nothing to report: probs and y_true are empty")
    if y_true.shape != (n,) or len(sources) != n:
        raise ValueError(
            f"y_true {y_true.shape} and sources ({len(sources)}) need one entry per probs row ({n})"
        )
    if not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 or y_true.max() >= c:
        raise ValueError(
            f"y_true must hold integer class indices in [0, {c}), "
            f"got {y_true.dtype} values {np.unique(y_true)[:10].tolist()}"
        )
    if not np.isfinite(probs).all():
        raise ValueError("probs contains NaN or inf; pass softmax probabilities")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be within [0, 1], got {threshold}")
    clash = sorted(RESERVED_KEYS & set(extra or {}))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite computed metrics; rename them")
    return y_true.astype(np.int64), probs


def _metrics(
    classes: list[str],
    y_true: np.ndarray,
    probs: np.ndarray,
    top1: np.ndarray,
    conf: np.ndarray,
    threshold: float,
    reasons: Sequence[str | None],
) -> dict[str, Any]:
    """Accuracy, F1, per-class scores, ROC-AUC (binary), ECE, UNKNOWN share, confusion matrix.

    Macro F1 averages the classes present in ``y_true`` or predicted (scikit-learn's default).
    A class without test images has no recall or F1, one never predicted no precision (None,
    not the 0 scikit-learn fills in).
    The UNKNOWN share is the whole decision's, with the share each rule fires on (both may).
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = np.arange(len(classes))
    prec, rec, f1, support = precision_recall_fscore_support(
        y_true, top1, labels=labels, zero_division=0
    )
    predicted = np.bincount(top1, minlength=len(classes))[: len(classes)]
    present = (support > 0) | (predicted > 0)
    correct = top1 == y_true
    known = np.array([r is None for r in reasons], bool)
    metrics: dict[str, Any] = {
        "n": len(y_true),
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1[present].mean()),
        "weighted_f1": float(np.average(f1, weights=support)),
    }
    if len(classes) == 2:
        metrics["roc_auc"] = _roc_auc(y_true, probs[:, 1])
    metrics |= {
        "ece": _ece(conf, correct),
        "unknown_rate": float(1.0 - known.mean()),
        "unknown_by_rule": {k: v for k, v in reason_shares(reasons).items() if k != "unknown"},
        "accuracy_known": float(correct[known].mean()) if known.any() else None,
        "threshold": float(threshold),
        "classes": list(classes),
        "per_class": {
            name: {
                "precision": float(p) if k else None,
                "recall": float(r) if s else None,
                "f1": float(f) if s else None,
                "support": int(s),
            }
            for name, p, r, f, s, k in zip(classes, prec, rec, f1, support, predicted, strict=True)
        },
        "confusion_matrix": confusion_matrix(y_true, top1, labels=labels).tolist(),
    }
    return metrics


def _roc_auc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """ROC-AUC of class 1 against class 0; None when ``y_true`` holds a single class."""
    from sklearn.metrics import roc_auc_score

    if np.unique(y_true).size < 2:
        return None
    return float(roc_auc_score(y_true, score))


def _ece(conf: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over equal-width bins ``(k/bins, (k+1)/bins]`` of confidence."""
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    ece = 0.0
    for b in np.unique(which):
        in_bin = which == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def _write_audit(
    path: Path,
    classes: list[str],
    y_true: np.ndarray,
    idx: np.ndarray,
    top_p: np.ndarray,
    sources: list[str],
    reasons: Sequence[str | None],
    inputs: dict[str, np.ndarray] | None = None,
) -> None:
    """One CSV row per image: truth, Top-3, confidence, correct, unknown, reason, ``inputs``.

    ``inputs``' numbers are written so they read back exactly; empty: not measured.
    """
    inputs = inputs or {}
    for name, column in inputs.items():
        if len(column) != len(sources):
            raise ValueError(f"input {name!r} has {len(column)} rows, not {len(sources)}")
    extra = [np.asarray(c, np.float64).tolist() for c in inputs.values()]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*AUDIT_COLUMNS, *inputs])
        for j, (src, t, row_i, row_p, why) in enumerate(
            zip(sources, y_true, idx, top_p, reasons, strict=True)
        ):
            top3 = [(classes[i], f"{p:.6f}") for i, p in zip(row_i, row_p, strict=True)]
            top3 += [("", "")] * (3 - len(top3))
            flags = [_flag(row_i[0] == t), _flag(why is not None)]
            cells = [v for pair in top3 for v in pair]
            more = ["" if c[j] != c[j] else repr(c[j]) for c in extra]  # NaN: not measured
            writer.writerow([str(src), classes[t], *cells, top3[0][1], *flags, why or "", *more])


def read_audit(report_dir: Path) -> list[dict[str, str]]:
    """The rows of a report's ``audit.csv`` (empty when the version has none)."""
    path = Path(report_dir) / "audit.csv"
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def confusion_counts(rows: Sequence[dict[str, str]], classes: Sequence[str]) -> list[list[int]]:
    """Counts of evaluated images by true class (rows) and Top-1 class (columns)."""
    at = {c: i for i, c in enumerate(classes)}
    counts = [[0] * len(classes) for _ in classes]
    for r in rows:
        if r.get("true") in at and r.get("top1") in at:
            counts[at[r["true"]]][at[r["top1"]]] += 1
    return counts


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _plot_confusion(path: Path, classes: list[str], cm: np.ndarray) -> None:
    """Counts in the cells, colour = share of the true class (row); size and font scale with c."""
    from matplotlib.figure import Figure

    c = len(classes)
    side = min(max(4.5, 0.45 * c + 2.5), 22.0)
    font = float(np.clip(13 - 0.15 * c, 7, 12))
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of true class")
    few = c <= 10
    rotation, align = (45, "right") if few else (90, "center")
    ax.set_xticks(np.arange(c), classes, fontsize=font, rotation=rotation, ha=align)
    ax.set_yticks(np.arange(c), classes, fontsize=font)
    for i, j in np.ndindex(cm.shape):
        if cm[i, j] or few:
            colour = "white" if share[i, j] > 0.5 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=font, color=colour)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (colour: share of row)")
    fig.savefig(path, dpi=100)


def _plot_curves(path: Path, history: dict[str, list[float]]) -> bool:
    """Loss and accuracy panels from whichever history keys hold data; False if none do."""
    panels = [
        (title, [(k, v) for k, v in history.items() if k.endswith(suffixes) and len(v)])
        for title, suffixes in (("loss", ("loss",)), ("accuracy", ("acc", "accuracy")))
    ]
    panels = [(title, series) for title, series in panels if series]
    if not panels:
        return False
    from matplotlib.figure import Figure

    boundary = list(history.get("phase_boundary") or [])
    fig = Figure(figsize=(5.0 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels, strict=True):
        for key, values in series:
            epochs = np.arange(1, len(values) + 1)
            ax.plot(epochs, np.asarray(values, dtype=float), label=key.replace("_", " "))
        if boundary:
            ax.axvline(boundary[0] + 0.5, color="grey", linestyle="--", label="phase 2 starts")
        ax.set(xlabel="epoch", ylabel=title, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=100)
    return True


def _worst_misclassified(
    y_true: np.ndarray, top1: np.ndarray, conf: np.ndarray, k: int
) -> np.ndarray:
    """Indices of up to ``k`` wrong Top-1 predictions, most confidently wrong first."""
    wrong = np.flatnonzero(top1 != y_true)
    return wrong[np.argsort(-conf[wrong], kind="stable")][:k]


def _caption(classes: list[str], true: int, pred: int, conf: float, source: str) -> str:
    """Gallery caption: truth, prediction and confidence, then the file name."""
    return f"true: {classes[true]} / pred: {classes[pred]} ({conf:.2f})\n{Path(str(source)).name}"


def _plot_gallery(
    path: Path,
    sources: list[str],
    captions: list[str],
    load_thumbnail: Callable[[str], Image.Image],
) -> None:
    """Grid of thumbnails (four per row) with their captions."""
    from matplotlib.figure import Figure

    cols = min(4, len(sources))
    rows = math.ceil(len(sources) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, source, caption in zip(axes, sources, captions, strict=False):
        ax.imshow(_thumbnail_or_grey(load_thumbnail, source))
        ax.set_title(caption, fontsize=8)
    fig.savefig(path, dpi=100)


def _thumbnail_or_grey(load_thumbnail: Callable[[str], Image.Image], source: str) -> np.ndarray:
    """RGB thumbnail of at most 256 px as an array, or a grey tile when loading fails."""
    try:
        image = load_thumbnail(source).convert("RGB")
        image.thumbnail((256, 256))
        return np.asarray(image)
    except Exception as exc:  # a missing or broken image must not lose the whole report
        log.warning("gallery: cannot load %s (%s); drawing a grey tile", source, exc)
        return np.full((64, 64, 3), 160, dtype=np.uint8)


def _plain(value: Any) -> Any:
    """Copy of ``value`` with numpy scalars and arrays as Python types, NaN and inf as None."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
