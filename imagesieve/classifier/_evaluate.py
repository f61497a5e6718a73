"""Evaluation: score labelled images through the real ONNX path and write the report."""

from __future__ import annotations

import os
from dataclasses import fields
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from imagesieve._errors import UserError
from imagesieve._workspace import Workspace
from imagesieve.classifier._duplicates import DuplicateRule
from imagesieve.classifier._engine import Progress
from imagesieve.classifier._openset import against_target
from imagesieve.classifier._predict import UNKNOWN, Predictor
from imagesieve.classifier._quality import QualityMetrics, QualityRule, quality_columns
from imagesieve.classifier._reference import reference_signatures
from imagesieve.classifier._report import write_report
from imagesieve.classifier._unknown import UnknownRule
from imagesieve.data import load_image, scan_image_folder
from imagesieve.models import ModelVersion, get_version

__all__ = [
    "evaluate_model",
    "evaluate_version_on",
    "held_out_unknowns",
    "held_out_words",
    "target_rate",
    "unknown_now",
]

#: Paths of near-duplicates of training images a report lists at most.
LISTED = 20
#: The columns of a report's audit.csv that ``held_out_unknowns`` decides from, beside the
#: Top-1 probability: the distance to the training data and the photo quality measures.
DECISION_INPUTS = ("distance", *(f.name for f in fields(QualityMetrics)))


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
    target: float | None = None,
) -> dict[str, Any]:
    """Score ``paths`` with ``version`` and write metrics, plots, audit CSV and gallery.

    Images of classes the model does not know are kept out of the metrics and reported under
    ``unseen_classes`` with the share marked UNKNOWN; unreadable files under ``failed``.
    ``target``: the false-UNKNOWN rate to judge the known images' UNKNOWN share against.
    """
    classes = version.classes
    index = {c: i for i, c in enumerate(classes)}
    predictor = Predictor(version, batch_size=batch_size)
    y_true, probs, sources, reasons, failed = [], [], [], [], []
    distances, measured, nearest = [], [], []
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
                distances.append(
                    np.nan if pred.neighbor_distance is None else pred.neighbor_distance
                )
                measured.append(pred.quality)
                nearest.append((pred.neighbor_cosine, pred.neighbor_id, pred.signature))
        if progress:
            progress("evaluating", done, len(paths))
    if not sources:
        raise UserError(
            "no readable images of the model's classes to evaluate: " + ", ".join(classes)
        )
    extra = dict(extra or {})
    extra["model_version"] = version.meta.get("version", version.name)
    twins = _near_training(version, nearest)
    if twins.any():  # leakage: the metrics overstate what the model does on new images
        y, top1 = np.asarray(y_true), np.stack(probs).argmax(1)
        others = ~twins
        extra["near_training"] = {
            "images": int(twins.sum()),
            "accuracy_without": float((top1 == y)[others].mean()) if others.any() else None,
            "paths": [s for s, t in zip(sources, twins.tolist(), strict=True) if t][:LISTED],
        }
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
        inputs={"distance": np.asarray(distances, np.float64), **quality_columns(measured)},
        target=target,
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
        target=target_rate(v),
    )
    return metrics, out_dir


def _near_training(version: ModelVersion, nearest: list[tuple]) -> np.ndarray:
    """Which scored images nearly duplicate their nearest training image, by the version's rule.

    ``nearest``: per image (cosine distance to its nearest training image, that image's
    reference id, the image's signature). All False without a rule (or a reference set).
    """
    rule = DuplicateRule.of_version(version.meta)
    distance = np.array([np.nan if d is None else d for d, _, _ in nearest], np.float64)
    if rule is None or not len(nearest):
        return np.zeros(len(nearest), bool)
    kept = reference_signatures(version.path)

    def pair(k: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        _, ref, signature = nearest[k]
        known = kept is not None and ref is not None and ref < len(kept)
        return signature, np.asarray(kept[ref]) if known else None

    return rule.judge(distance, pair)


def target_rate(version: ModelVersion) -> float | None:
    """The false-UNKNOWN rate the version's thresholds were calibrated for (None: not).

    An operator's (``set_thresholds`` with a target) over training's.
    """
    thresholds = version.meta.get("thresholds") or {}
    return thresholds.get("target") or (thresholds.get("calibration") or {}).get(
        "false_unknown_rate"
    )


def held_out_unknowns(
    version: ModelVersion,
    rule: UnknownRule | None = None,
    quality: QualityRule | None = None,
    target: float | None = None,
) -> dict[str, Any] | None:
    """What ``rule`` (default: the version's thresholds) marks UNKNOWN among its test images.

    The version's held-out test images are all of known classes, so this is the false-UNKNOWN
    rate other thresholds would realise, judged from its report's audit.csv with no scoring:
    ``images``, ``unknown``, ``rate``, ``by_rule`` (share each rule fires on) and ``vs_target``
    (``against_target`` the version's target, or ``target``). ``quality``: other photo quality
    bounds (default: the version's). None when the version was not evaluated on a test split, or its
    report predates the decision's inputs in audit.csv.
    """
    if (version.meta.get("metrics") or {}).get("evaluated_on") != "test":
        return None
    path = version.report_dir / "audit.csv"
    try:
        stat = path.stat()
    except OSError:
        return None
    columns = _decision_columns(str(path), stat.st_mtime_ns, stat.st_size)
    if columns is None:
        return None
    rule = rule or UnknownRule.of_version(version)
    quality = quality or QualityRule.of_version(version.meta)
    poor = None
    if quality is not None:
        poor = quality.poor({k: columns[k] for k in DECISION_INPUTS[1:]})
    shares = rule.shares(columns["confidence"], columns["distance"], poor)
    target = target or target_rate(version)
    n = len(columns["confidence"])
    k = round(shares.pop("unknown") * n)
    return {
        "images": n,
        "unknown": k,
        "rate": round(k / n, 4),
        "by_rule": {r: round(v, 4) for r, v in shares.items()},
        "vs_target": None if target is None else against_target(k / n, n, target),
    }


@lru_cache(maxsize=8)
def _decision_columns(path: str, _mtime_ns: int, _size: int) -> dict[str, np.ndarray] | None:
    """An audit.csv's Top-1 probabilities and decision inputs as columns (None: it has none).

    Cached by the file's identity: a threshold preview re-decides the same file at each move
    of a slider. Numbers are parsed exactly as written (round trip), empty cells as NaN.
    """
    import pandas as pd

    wanted = ("confidence", *DECISION_INPUTS)
    # pandas 3 parses floats exactly by default (and deprecates asking); pandas 2 must be asked
    exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
    try:
        frame = pd.read_csv(
            path, usecols=lambda c: c in wanted, dtype=np.float64, encoding="utf-8", **exact
        )
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    if frame.empty or any(k not in frame.columns for k in wanted):
        return None
    columns = {}
    for k in wanted:
        columns[k] = frame[k].to_numpy(np.float64, copy=True)
        columns[k].flags.writeable = False  # shared by every caller of the cache
    return columns


def unknown_now(version: ModelVersion) -> dict[str, Any]:
    """A version's test UNKNOWN rate and its verdict against the target, at its thresholds now.

    ``thresholds_tuned``, ``unknown_rate`` and ``unknown_vs_target``: training's figures, or
    once an operator set thresholds, ``held_out_unknowns`` at them (training's when the version
    kept no decision inputs). For the version lists: CLI, REST and app alike.
    """
    m = version.meta.get("metrics") or {}
    tuned = version.thresholds_tuned
    now = held_out_unknowns(version) if tuned else None
    return {
        "thresholds_tuned": tuned,
        "unknown_rate": now["rate"] if now else m.get("unknown_rate"),
        "unknown_vs_target": now["vs_target"] if now else m.get("unknown_vs_target"),
    }


def held_out_words(held: dict[str, Any]) -> str:
    """``held_out_unknowns``' figure in words, for the CLI and the app alike."""
    t = held["vs_target"]
    words = (
        f"{held['unknown']:,} of the {held['images']:,} held-out test images of known classes "
        f"UNKNOWN ({held['rate']:.1%}"
    )
    if t is not None:
        words += f"; target {t['target']:.0%}"
        if t["verdict"] != "within":
            more = "more" if t["verdict"] == "above" else "fewer"
            words += f", {more} than chance explains (p {t['p']:.2g})"
    return words + ")"
