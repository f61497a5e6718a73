"""Class-wise adaptive train/val/test split, as the meter system did it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imagesieve._errors import UserError

__all__ = ["SplitPlan", "adaptive_split"]

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
) -> SplitPlan:
    """Split indices per class: very few images -> train only; some -> train + test; many -> all.

    ``test_size`` and ``val_size`` are shares of each class; every split that a class gets
    receives at least one image, and train always keeps at least one.
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
    return SplitPlan(cat["train"], cat["val"], cat["test"], per_class)
