"""Evaluation: score labelled images through the real ONNX path and write the report."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from imagesieve._errors import UserError
from imagesieve._workspace import Workspace
from imagesieve.classifier._engine import Progress
from imagesieve.classifier._predict import UNKNOWN, Predictor
from imagesieve.classifier._report import write_report
from imagesieve.data import load_image, scan_image_folder
from imagesieve.models import ModelVersion, get_version

__all__ = ["evaluate_model", "evaluate_version_on"]


def _thumbnail(path: str):
    im = load_image(path, min_side=160).image
    im.thumbnail((160, 160))
    return im


def evaluate_version_on(
    version: ModelVersion,
    paths: list[Path],
    labels: list[str],
    out_dir: Path,
    *,
    history: dict[str, list[float]] | None = None,
    extra: dict[str, Any] | None = None,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score ``paths`` with ``version`` and write metrics, plots, audit CSV and gallery.

    Images of classes the model does not know are kept out of the metrics and reported under
    ``unseen_classes`` with the share marked UNKNOWN; unreadable files under ``failed``.
    """
    classes = version.classes
    index = {c: i for i, c in enumerate(classes)}
    predictor = Predictor(version, batch_size=batch_size)
    y_true, probs, sources, reasons, failed = [], [], [], [], []
    unseen: dict[str, dict[str, int]] = {}
    done = 0
    for batch in predictor.score_batches([str(p) for p in paths]):
        for pred in batch:
            label = labels[done]
            done += 1
            if not pred.ok:
                failed.append({"path": pred.source, "reason": pred.error})
            elif label not in index:
                u = unseen.setdefault(label, {"images": 0, "unknown": 0})
                u["images"] += 1
                u["unknown"] += pred.label == UNKNOWN
            else:
                y_true.append(index[label])
                probs.append(pred.probs)
                sources.append(pred.source)
                reasons.append(pred.reason)
        if progress:
            progress("evaluating", done, len(paths))
    if not sources:
        raise UserError(
            "no readable images of the model's classes to evaluate: " + ", ".join(classes)
        )
    extra = dict(extra or {})
    extra["model_version"] = version.meta.get("version", version.name)
    extra["failed"] = failed
    extra["unseen_classes"] = {
        c: {**u, "unknown_rate": round(u["unknown"] / u["images"], 4)}
        for c, u in sorted(unseen.items())
    }
    return write_report(
        out_dir,
        classes=classes,
        y_true=np.asarray(y_true, np.int64),
        probs=np.stack(probs),
        sources=sources,
        threshold=predictor.threshold,
        history=history,
        load_thumbnail=_thumbnail,
        extra=extra,
        reasons=reasons,
    )


def evaluate_model(
    data_dir: str | os.PathLike,
    ws: Workspace,
    version: str | None = None,
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], Path]:
    """Evaluate a version on an ImageFolder (its ``test/`` split when pre-split) -> (metrics, report dir)."""
    v = get_version(ws, version)
    folder = scan_image_folder(data_dir)
    samples = (
        [s for s in folder.samples if s.split in (None, "test")]
        if folder.presplit
        else folder.samples
    )
    if folder.presplit and not any(s.split == "test" for s in samples):
        raise UserError(f"{data_dir} is pre-split but has no test/ folder to evaluate on")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    out_dir = v.path / "evaluations" / f"{Path(data_dir).resolve().name}-{stamp}"
    metrics = evaluate_version_on(
        v,
        [s.path for s in samples],
        [s.label for s in samples],
        out_dir,
        extra={
            "data_dir": str(Path(data_dir).resolve()),
            "skipped": [str(s.path) for s in folder.skipped],
        },
        batch_size=batch_size,
        progress=progress,
    )
    return metrics, out_dir
