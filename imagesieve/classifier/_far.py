"""The far-from-training distance of versions whose backbone has an ``ood_tap``.

Class-conditional Mahalanobis distance (Lee et al., 2018) on the tapped block's
average-pooled, unit-length features: one mean per class and one covariance shared by every
class, shrunk by Ledoit-Wolf. A scored image's distance is the smallest squared Mahalanobis
distance to a class mean, mapped onto [0, 2) by ``2 m / (m + scale)`` (``scale``: the
median over the training images, each measured by a fit without its fold, so a known image the
model has not seen maps around 1), so that thresholds, ``mix`` and the threshold sliders keep
the range of the cosine distance that versions without the tap use. On
``bench/bench_openset.py`` it beat that cosine distance on every set (bench/RESULTS.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagesieve.models import FAR_FILE

__all__ = ["FAR_COSINE", "FAR_MAHALANOBIS", "Mahalanobis"]

#: What a version's distance to its training data is (``meta.json`` ``thresholds.far``).
FAR_COSINE = "cosine distance to the nearest training image (embedding)"
FAR_MAHALANOBIS = "Mahalanobis distance to the nearest class, mapped onto [0, 2) (ood_features)"
#: Folds of the held-out median that scales the distance.
SCALE_FOLDS = 5
#: Rows scored at a time: bounds the (rows, dim) float64 temporaries.
CHUNK = 8192


@dataclass(frozen=True)
class Mahalanobis:
    """Class means (c, d), their shared precision (d, d), and the scale of the [0, 2) map."""

    means: np.ndarray
    precision: np.ndarray
    scale: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, scale: float | None = None) -> Mahalanobis:
        """Fit on features ``x`` (n, d) of classes ``y`` (n,); classes without rows are left out.

        ``scale``: keep another fit's (folds and left-out classes are scored on the scale of
        the version's own fit); default: ``held_out_scale`` of ``x``.
        """
        from sklearn.covariance import LedoitWolf

        x, y = np.asarray(x, np.float64), np.asarray(y)
        labels, inverse = np.unique(y, return_inverse=True)
        means = np.stack([x[inverse == k].mean(0) for k in range(len(labels))])
        precision = LedoitWolf(assume_centered=True).fit(x - means[inverse]).precision_
        if scale is None:
            scale = cls.held_out_scale(x, y)
        return cls(means, precision, max(scale, 1e-12))

    @classmethod
    def held_out_scale(cls, x: np.ndarray, y: np.ndarray) -> float:
        """Median squared distance of each row to a fit on the other SCALE_FOLDS - 1 folds.

        In-sample distances are far smaller than a new image's when the features outnumber the
        images per class (192 against tens): held out, the median is a known image's.
        """
        if len(x) < 2 * SCALE_FOLDS:
            return float(np.median(cls.fit(x, y, 1.0).squared(x))) if len(x) else 1.0
        fold = np.random.default_rng(0).permutation(len(x)) % SCALE_FOLDS
        held = np.concatenate(
            [
                cls.fit(x[fold != f], y[fold != f], 1.0).squared(x[fold == f])
                for f in range(SCALE_FOLDS)
            ]
        )
        return float(np.median(held))

    def squared(self, x: np.ndarray) -> np.ndarray:
        """(n, d) features -> (n,) smallest squared Mahalanobis distance to a class mean."""
        out = np.empty(len(x), np.float64)
        m_p = self.means @ self.precision
        m_p_m = (m_p * self.means).sum(1)
        for a in range(0, len(x), CHUNK):
            q = np.asarray(x[a : a + CHUNK], np.float64)
            q_p_q = ((q @ self.precision) * q).sum(1)
            d = q_p_q[:, None] - 2.0 * (q @ m_p.T) + m_p_m[None, :]
            out[a : a + CHUNK] = np.maximum(d.min(1), 0.0)
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n, d) features -> (n,) distance in [0, 2), float32; NaN rows stay NaN."""
        m = self.squared(x)
        return (2.0 * m / (m + self.scale)).astype(np.float32)

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``FAR_FILE`` into a version's directory."""
        np.savez(
            Path(directory) / FAR_FILE,
            means=self.means,
            precision=self.precision,
            scale=np.float64(self.scale),
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Mahalanobis | None:
        """The version's fitted distance, or None (it measures the cosine distance)."""
        path = Path(directory) / FAR_FILE
        if not path.is_file():
            return None
        with np.load(path) as z:
            return cls(z["means"], z["precision"], float(z["scale"]))
