"""The far-from-training distance of versions whose backbone has ``ood_taps``.

Class-conditional Mahalanobis distance (Lee et al., 2018) on the tapped blocks' average-pooled
features (each unit length, concatenated): one mean per class and one covariance shared by
every class, shrunk by Ledoit-Wolf. Less ``RELATIVE`` times the squared distance to one
Gaussian of all the training images (a partial form of Ren et al., 2021's relative
Mahalanobis distance): what every image has far from the mean, known or not, counts less. A
scored image's distance is the smallest squared distance to a class mean, less that term,
mapped onto [0, 2) by ``2 m / (m + scale)`` (``scale``: the median over the training images,
each measured by a fit without its fold, so a known image the model has not seen maps around
1), so that thresholds, ``mix`` and the threshold sliders keep the range of the cosine
distance that versions without the taps use. On ``bench/bench_openset.py`` it beat that cosine
distance on every set (bench/RESULTS.md).

The fit also takes generated copies of some training images (``FarFeatures``: re-encoded,
cropped, resized, brighter or darker, the ones the near-duplicate check makes anyway): these
mid-level features move with JPEG re-encoding and scale, and a known image sent again as a
smaller JPEG must stay known.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagesieve.models import FAR_FILE

__all__ = ["FAR_COSINE", "FAR_MAHALANOBIS", "FarFeatures", "Mahalanobis"]

#: What a version's distance to its training data is (``meta.json`` ``thresholds.far``).
FAR_COSINE = "cosine distance to the nearest training image (embedding)"
FAR_MAHALANOBIS = (
    "Mahalanobis distance to the nearest class less a quarter of that to all training images, "
    "mapped onto [0, 2) (ood_features: 112- and 192-channel stages)"
)
#: The weight of the distance to all training images taken off (0: the plain class-conditional
#: distance; 1: Ren et al.'s relative distance). On bench_openset's sets, 0.25 and 0.5 gave the
#: same recall of unseen classes, but at 0.5 one set's false UNKNOWN rate left the target's
#: +-2 points, and from 0.75 up it swung further (bench/RESULTS.md, stop 44).
RELATIVE = 0.25
#: Folds of the held-out median that scales the distance.
SCALE_FOLDS = 5
#: Rows scored at a time: bounds the (rows, dim) float64 temporaries.
CHUNK = 8192


@dataclass(frozen=True)
class Mahalanobis:
    """Class means (c, d), their shared precision (d, d), and the scale of the [0, 2) map.

    ``center`` (d,) and ``total_precision`` (d, d): the one Gaussian of all training images,
    of which ``relative`` times the squared distance is taken off (None, 0: versions fitted
    before it, whose files lack them).
    """

    means: np.ndarray
    precision: np.ndarray
    scale: float
    center: np.ndarray | None = None
    total_precision: np.ndarray | None = None
    relative: float = 0.0

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
        center = x.mean(0)
        total = LedoitWolf(assume_centered=True).fit(x - center).precision_
        if scale is None:
            scale = cls.held_out_scale(x, y)
        return cls(means, precision, max(scale, 1e-12), center, total, RELATIVE)

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
        """(n, d) features -> (n,) smallest squared distance to a class mean, less the term.

        The term: ``relative`` times the squared distance to all training images. At least 0.
        """
        # Both are quadratic forms in q: one (d, d) product a row, with the term folded into
        # the matrix (A = P - w P0), the class vectors and the constants.
        form, lin = self.precision, self.means @ self.precision
        const = (lin * self.means).sum(1)
        if self.relative:
            c_p0 = self.center @ self.total_precision
            form = self.precision - self.relative * self.total_precision
            lin = lin - self.relative * c_p0
            const = const - self.relative * float(c_p0 @ self.center)
        out = np.empty(len(x), np.float64)
        for a in range(0, len(x), CHUNK):
            q = np.asarray(x[a : a + CHUNK], np.float64)
            q_a_q = ((q @ form) * q).sum(1)
            d = q_a_q[:, None] - 2.0 * (q @ lin.T) + const[None, :]
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
            **(
                {}
                if self.center is None
                else {
                    "center": self.center,
                    "total_precision": self.total_precision,
                    "relative": np.float64(self.relative),
                }
            ),
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Mahalanobis | None:
        """The version's fitted distance, or None (it measures the cosine distance)."""
        path = Path(directory) / FAR_FILE
        if not path.is_file():
            return None
        with np.load(path) as z:
            term = {}  # versions fitted before the relative term have none of it
            if "center" in z:
                term = {k: z[k] for k in ("center", "total_precision")}
                term["relative"] = float(z["relative"])
            return cls(z["means"], z["precision"], float(z["scale"]), **term)


@dataclass(frozen=True)
class FarFeatures:
    """The tapped features a version's distance is fitted on: its images' and generated copies'.

    ``x`` (n, d): every image's features. ``copies`` (m, d): those of generated copies
    (``near_duplicate_variants``: a JPEG re-encode, a crop, a smaller size, a brightness
    change) of the images ``copy_of`` (m,) indexes. A fit on some images takes their copies
    too, so that what re-sharing moves belongs to the known classes, and no held-out image's
    copy is in a fit that scores it. Measured on ``bench_openset``'s sets (bench/RESULTS.md,
    stop 47): without the copies, half the held-out known images re-encoded as JPEG 85 were
    far from training.
    """

    x: np.ndarray
    copies: np.ndarray | None = None
    copy_of: np.ndarray | None = None

    def fit(self, y: np.ndarray, rows: np.ndarray, scale: float | None = None) -> Mahalanobis:
        """``Mahalanobis.fit`` on the images ``rows`` (of classes ``y[rows]``) and their copies."""
        x, labels = self.x[rows], y[rows]
        if self.copies is not None and len(self.copies):
            take = np.isin(self.copy_of, rows)
            x = np.concatenate([x, self.copies[take]])
            labels = np.concatenate([labels, y[self.copy_of[take]]])
        return Mahalanobis.fit(x, labels, scale)

    def copies_of(self, rows: np.ndarray) -> int:
        """How many copies a fit on ``rows`` takes."""
        return 0 if self.copies is None else int(np.isin(self.copy_of, rows).sum())
