"""Label errors in training data by confident learning (Northcutt, Jiang and Chuang, JAIR 2021).

Out-of-fold probabilities come from the phase-1 head refit on cached features
(``out_of_fold_probs``); ``find_label_errors`` estimates the joint of given and true labels
from them and ranks the images whose given label most likely is wrong.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from imagesieve.classifier._predict import softmax
from imagesieve.classifier._train import REFIT_STEPS, _class_weights, _fit_linear

__all__ = ["FILTERS", "RANKINGS", "LabelSuspect", "find_label_errors", "out_of_fold_probs"]

#: Which images the confident joint marks (the paper's section 3.2). Prune by class found most
#: flipped labels on ELPV, digits and shapes (bench/bench_label_errors.py); cleanlab's default
#: is prune by noise rate.
FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_joint")
#: Suspects are ranked by the given label's probability, or by it minus the best other one.
RANKINGS = ("self_confidence", "normalized_margin")


@dataclass(frozen=True)
class LabelSuspect:
    """An image whose given label looks wrong: its row in ``probs`` and what the model saw."""

    index: int
    given: str
    suggested: str
    self_confidence: float
    suggested_confidence: float

    def to_dict(self) -> dict[str, Any]:
        """Plain fields, for JSON."""
        return asdict(self)


def _folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number of each label in ``y``: each class dealt round-robin in a seeded order."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), np.int64)
    start = 0
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        fold[members] = (start + np.arange(len(members))) % folds
        start += len(members)  # a class's remainder goes to the next folds, not always fold 0
    return fold


def out_of_fold_probs(
    feats: np.ndarray,
    y: np.ndarray,
    rows: np.ndarray,
    n_classes: int,
    weight_decay: float,
    class_weight: str = "sqrt",
    *,
    folds: int = 5,
    seed: int = 0,
    steps: int = REFIT_STEPS,
) -> np.ndarray:
    """(len(rows), n_classes) probabilities of ``rows``, each from a phase-1 head fit without it.

    ``feats`` (n, d) and ``y`` (n,) cover all images; the head is refit cold on each stratified
    fold's complement with the weight decay and class weighting training chose.
    """
    import torch

    rows = np.asarray(rows, np.int64)
    if len(rows) < 2:
        raise ValueError(f"need at least 2 rows for out-of-fold probabilities, got {len(rows)}")
    if feats.ndim != 2 or len(feats) != len(y):
        raise ValueError(f"feats must be (n, d) with n = len(y) = {len(y)}, got {feats.shape}")
    x = feats[rows].astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    yy = np.asarray(y, np.int64)[rows]
    fold = _folds(yy, min(folds, len(rows)), seed)
    out = np.zeros((len(rows), n_classes), np.float32)
    for f in np.unique(fold):
        fit, held = fold != f, fold == f
        cw = _class_weights(yy[fit], n_classes, class_weight)
        lin, _, _ = _fit_linear(x[fit], yy[fit], x[:0], yy[:0], n_classes, cw, weight_decay, steps)
        with torch.no_grad():
            out[held] = softmax(lin(torch.from_numpy(x[held])).numpy())
    return out


def _confident_joint(
    probs: np.ndarray, y: np.ndarray, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated confident joint (given x true) and each image's confident class (-1: none).

    An image counts towards true class j when p_j reaches class j's threshold (the mean
    self-confidence of the images labelled j), the likeliest such j when several do. Each row
    is then rescaled to the number of images given that label (the paper's eq. 2).
    """
    counts = np.bincount(y, minlength=n_classes)
    sums = np.bincount(y, weights=probs[np.arange(len(y)), y], minlength=n_classes)
    thresholds = np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)
    above = probs >= thresholds - 1e-6
    confident = above.any(1)
    true = np.where(above, probs, -1.0).argmax(1)
    joint = np.zeros((n_classes, n_classes))
    np.add.at(joint, (y[confident], true[confident]), 1)
    totals = joint.sum(1, keepdims=True)
    joint = np.where(totals > 0, joint / np.maximum(totals, 1) * counts[:, None], 0.0)
    return joint, np.where(confident, true, -1)


def _prune_counts(joint: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Off-diagonal counts to prune, rounded, keeping at least one image of each given label."""
    prune = np.rint(joint).astype(np.int64)
    np.fill_diagonal(prune, 0)
    for i in range(len(prune)):
        room = max(int(counts[i]) - 1, 0)
        while prune[i].sum() > room:
            prune[i, prune[i].argmax()] -= 1
    return prune


def _mark(probs: np.ndarray, y: np.ndarray, filter_by: str) -> np.ndarray:
    """Boolean mask of label issues by ``filter_by`` (one of FILTERS)."""
    n, c = probs.shape
    counts = np.bincount(y, minlength=c)
    joint, true = _confident_joint(probs, y, c)
    prune = _prune_counts(joint, counts)
    self_conf = probs[np.arange(n), y]
    by_class = np.zeros(n, bool)
    by_rate = np.zeros(n, bool)
    for i in range(c):
        members = np.flatnonzero(y == i)
        k = int(prune[i].sum())
        if k:  # the k images labelled i that are least confident of i
            by_class[members[np.argsort(self_conf[members], kind="stable")[:k]]] = True
        for j in np.flatnonzero(prune[i]):  # the images labelled i most like j (margin p_j - p_i)
            margin = probs[members, j] - self_conf[members]
            by_rate[members[np.argsort(-margin, kind="stable")[: prune[i, j]]]] = True
    if filter_by == "prune_by_noise_rate":
        mask = by_rate
    elif filter_by == "prune_by_class":
        mask = by_class
    elif filter_by == "both":
        mask = by_rate & by_class
    else:  # confident_joint: every image counted off the diagonal
        mask = (true >= 0) & (true != y)
    return mask & (probs.argmax(1) != y)  # the model agrees with the given label: not an issue


def find_label_errors(
    probs: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    *,
    filter_by: str = "prune_by_class",
    rank_by: str = "self_confidence",
) -> list[LabelSuspect]:
    """Images whose given label ``y`` is likely wrong, likeliest first (confident learning).

    ``probs`` (n, c) must be out of sample (``out_of_fold_probs``); ``index`` is the row.
    """
    probs = np.asarray(probs, np.float64)
    y = np.asarray(y, np.int64)
    if probs.ndim != 2 or probs.shape != (len(y), len(classes)):
        raise ValueError(
            f"probs must be (n, c) = ({len(y)}, {len(classes)}) for {len(y)} labels and "
            f"{len(classes)} classes, got {probs.shape}"
        )
    if len(y) and (y.min() < 0 or y.max() >= len(classes)):
        raise ValueError(f"labels must be within [0, {len(classes)}), got {y.min()}..{y.max()}")
    if filter_by not in FILTERS:
        raise ValueError(f"filter_by must be one of {', '.join(FILTERS)}, got {filter_by!r}")
    if rank_by not in RANKINGS:
        raise ValueError(f"rank_by must be one of {', '.join(RANKINGS)}, got {rank_by!r}")
    if len(y) == 0:
        return []
    rows = np.flatnonzero(_mark(probs, y, filter_by))
    self_conf = probs[rows, y[rows]]
    other = probs[rows].copy()
    other[np.arange(len(rows)), y[rows]] = -1.0
    suggested = other.argmax(1)
    best_other = other[np.arange(len(rows)), suggested]
    score = self_conf if rank_by == "self_confidence" else self_conf - best_other
    order = np.argsort(score, kind="stable")
    return [
        LabelSuspect(
            int(rows[k]),
            classes[y[rows[k]]],
            classes[suggested[k]],
            float(self_conf[k]),
            float(best_other[k]),
        )
        for k in order
    ]
