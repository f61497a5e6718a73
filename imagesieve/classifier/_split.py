"""Class-wise adaptive train/val/test split, as the meter system did it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from imagesieve._errors import UserError

__all__ = ["SplitPlan", "adaptive_split", "untested_words"]

#: Classes with fewer images than this are train-only.
MIN_FOR_TEST = 4
#: Classes with fewer images than this get train + test, no validation share.
MIN_FOR_VAL = 20


@dataclass
class SplitPlan:
    """Index arrays per split and, per class, what rule was applied."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    per_class: dict[str, dict]

    def to_dict(self) -> dict:
        """JSON-ready summary for the report."""
        return {
            "train": int(len(self.train)),
            "val": int(len(self.val)),
            "test": int(len(self.test)),
            "per_class": self.per_class,
        }


def adaptive_split(
    labels: np.ndarray,
    classes: list[str],
    *,
    test_size: float = 0.2,
    val_size: float = 0.1,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> SplitPlan:
    """Split indices per class: very few images -> train only; some -> train + test; many -> all.

    ``test_size`` and ``val_size`` are shares of each class; every split that a class gets
    receives at least one image, and train always keeps at least one. ``groups`` (one id per
    image; near-duplicates share one) keeps each group of near-duplicates on one side, so a
    copy of a training image cannot inflate the test accuracy (leakage).
    """
    if not 0 <= test_size < 1 or not 0 <= val_size < 1 or test_size + val_size >= 1:
        raise UserError(
            f"test size {test_size} and val size {val_size} must be shares in [0, 1) summing below 1"
        )
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    per_class = {}
    for c, name in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        n_test = n_val = 0
        if n >= MIN_FOR_TEST and test_size > 0:
            n_test = max(1, int(round(n * test_size)))
        if n >= MIN_FOR_VAL and val_size > 0:
            n_val = max(1, int(round(n * val_size)))
        rule = (
            "train+val+test"
            if n_val and n_test
            else "train+test"
            if n_test
            else "train+val"
            if n_val
            else "train only"
        )
        if n < MIN_FOR_TEST:
            rule = f"train only (fewer than {MIN_FOR_TEST} images)"
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
        per_class[name] = {
            "images": n,
            "train": n - n_test - n_val,
            "val": n_val,
            "test": n_test,
            "rule": rule,
        }
    cat = {
        k: np.sort(np.concatenate(v)).astype(np.int64) if v else np.zeros(0, np.int64)
        for k, v in parts.items()
    }
    if groups is not None and len(np.unique(groups)) < len(groups):
        cat = _keep_groups_together(cat, np.asarray(groups))
        for c, name in enumerate(classes):
            for k in ("train", "val", "test"):
                per_class[name][k] = int((labels[cat[k]] == c).sum())
    return SplitPlan(cat["train"], cat["val"], cat["test"], per_class)


def _keep_groups_together(cat: dict[str, np.ndarray], groups: np.ndarray) -> dict[str, np.ndarray]:
    """Move every member of a group of near-duplicates to the side most of it is on.

    Ties go to the side first of test, val, train; the class-wise shuffle already drawn decides
    the rest, so split sizes stay as near as whole groups allow.
    """
    side = np.empty(len(groups), np.int64)
    names = ("test", "val", "train")
    for k, name in enumerate(names):
        side[cat[name]] = k
    order = np.argsort(groups, kind="stable")
    bounds = np.flatnonzero(np.diff(groups[order])) + 1
    for members in np.split(order, bounds):
        if len(members) < 2 or len(set(side[members].tolist())) == 1:
            continue
        counts = np.bincount(side[members], minlength=3)
        side[members] = int(np.argmax(counts))
    return {name: np.flatnonzero(side == k).astype(np.int64) for k, name in enumerate(names)}


def untested_words(split: dict[str, Any]) -> str | None:
    """The classes a split (``meta.json`` ``split``) left without test images, in words.

    Such a class (too small to hold images out) is trained on but has no accuracy: say so,
    where a per-class table would only show it with no test images. None when every class is
    tested, or when there is no test split at all (the metrics then say what they are on).
    """
    per_class = split.get("per_class") or {}
    untested = [f"{c} ({r['images']} images)" for c, r in per_class.items() if not r["test"]]
    if not untested or not split.get("test"):
        return None
    return f"no test images, so no accuracy, for {', '.join(untested)}"
