"""Photo quality, measured on the pixels the model reads: blur, exposure, glare, information, size.

Every measure runs on the preprocessed square crop the engine already holds (``s`` by ``s``,
the model's input size), so it costs a fraction of a millisecond per image and is
resolution-normalised by construction; size and shape come from the decoded image's width and
height. Thresholds are calibrated on a version's training images (percentiles, see
:func:`calibrate_quality`) and can be overridden: what counts as blurred for close-ups of meter
dials is not what counts for wide shots of a roof.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image

__all__ = [
    "QUALITY_KINDS",
    "QualityMetrics",
    "QualityRule",
    "calibrate_quality",
    "measure_quality",
]

#: What a photo can be flagged for, in the order flags are listed.
QUALITY_KINDS = ("blurred", "dark", "bright", "glare", "low_information", "too_small", "odd_shape")
#: Luma weights (ITU-R BT.601), as PIL's ``L`` conversion.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
#: Blur: the image is averaged over 2x2 pixels (quantisation noise would otherwise read as
#: detail in a smooth image), then re-blurred over BLUR_BOX pixels along each axis.
BLUR_BOX = 5
#: A pixel at or above this luma is saturated (glare, blown highlights).
SATURATED = 250


@dataclass(frozen=True)
class QualityMetrics:
    """One image's quality measures (see the module docstring for what each reads).

    ``blur``: the share of the image's detail that survives re-blurring along its blurriest
    axis (0 sharp .. 1 as blurred as re-blurring can make it; motion blur shows on one axis).
    ``brightness``: mean luma, 0..1. ``saturated``: share of pixels at luma >= 250 (white:
    glare). ``clipped``: share of pixels with any channel at >= 250 (a colour burnt out).
    ``entropy``: bits of the 64-bin luma histogram (0 for a flat image, 6 at most).
    ``min_side`` and ``aspect``: of the decoded image, in pixels and long side / short side.
    """

    blur: float
    brightness: float
    saturated: float
    clipped: float
    entropy: float
    min_side: int
    aspect: float

    def to_dict(self) -> dict[str, float]:
        """JSON-ready form, rounded."""
        return {k: round(float(v), 4) for k, v in asdict(self).items()}


def _box_along(g: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Mean over a window of ``n`` pixels along ``axis``, edges repeated (cumulative sums)."""
    pad = [(0, 0), (0, 0)]
    pad[axis] = (n // 2 + 1, n // 2)
    c = np.cumsum(np.pad(g, pad, mode="edge"), axis=axis, dtype=np.float32)
    m = g.shape[axis]
    hi, lo = [slice(None)] * 2, [slice(None)] * 2
    hi[axis], lo[axis] = slice(n, n + m), slice(0, m)
    return (c[tuple(hi)] - c[tuple(lo)]) / n


def _blur(g: np.ndarray) -> float:
    """Crété-Roffet et al.'s blur effect (2007) on the 2x2-averaged luma ``g``, the worse axis."""
    worst = 0.0
    for axis in (0, 1):
        d = np.abs(np.diff(g, axis=axis))
        total = float(d.sum())
        if total <= 1e-6:  # no detail at all along this axis: as blurred as it gets
            return 1.0
        db = np.abs(np.diff(_box_along(g, BLUR_BOX, axis), axis=axis))
        lost = float(np.maximum(d - db, 0.0).sum())
        worst = max(worst, (total - lost) / total)
    return worst


def measure_quality(image: Image.Image, width: int, height: int) -> QualityMetrics:
    """The quality measures of one preprocessed RGB image (the model's square crop) of that size.

    Everything but size and shape reads the crop averaged over 2x2 pixels (PIL's ``reduce``:
    a quarter of the work, and quantisation noise no longer reads as detail): ~0.4 ms.
    """
    a = np.asarray(image.reduce(2))
    gray = a.astype(np.float32) @ _LUMA
    hist = np.bincount(gray.astype(np.uint8).ravel() >> 2, minlength=64).astype(np.float64)
    p = hist[hist > 0] / gray.size
    brightest = np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])
    short, long = min(width, height), max(width, height)
    return QualityMetrics(
        blur=_blur(gray),
        brightness=float(gray.mean()) / 255.0,
        saturated=float((gray >= SATURATED).mean()),
        clipped=float((brightest >= SATURATED).mean()),
        entropy=float(-(p * np.log2(p)).sum()),
        min_side=int(short),
        aspect=float(long) / max(short, 1),
    )


@dataclass(frozen=True)
class QualityRule:
    """When a photo is poor: each bound flags its kind; None switches a check off.

    ``blur_max``: blur above it is ``blurred``; ``dark_max``: brightness below it is ``dark``;
    ``bright_min`` / ``clipped_min``: brightness or clipped share above it is ``bright``
    (over-exposed); ``glare_min``: saturated share above; ``entropy_min``: histogram bits below
    (``low_information``); ``min_side``: shorter side below, in pixels (``too_small``);
    ``aspect_max``: long side / short side above (``odd_shape``).
    """

    blur_max: float | None = None
    dark_max: float | None = None
    bright_min: float | None = None
    clipped_min: float | None = None
    glare_min: float | None = None
    entropy_min: float | None = None
    min_side: int | None = None
    aspect_max: float | None = None

    def flags(self, m: QualityMetrics) -> list[str]:
        """The kinds ``m`` is flagged for, in QUALITY_KINDS order (empty: a good photo)."""
        tests = (
            self.blur_max is not None and m.blur > self.blur_max,
            self.dark_max is not None and m.brightness < self.dark_max,
            (self.bright_min is not None and m.brightness > self.bright_min)
            or (self.clipped_min is not None and m.clipped > self.clipped_min),
            self.glare_min is not None and m.saturated > self.glare_min,
            self.entropy_min is not None and m.entropy < self.entropy_min,
            self.min_side is not None and m.min_side < self.min_side,
            self.aspect_max is not None and m.aspect > self.aspect_max,
        )
        return [k for k, hit in zip(QUALITY_KINDS, tests, strict=True) if hit]

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready form (``meta.json``'s ``quality``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> QualityRule | None:
        """The rule ``to_dict`` wrote; None for no rule (a version trained before quality)."""
        if not d:
            return None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


#: Calibration: the share of training images each check may flag (it flags beyond that
#: percentile of the training images' own measures), and margins for size and shape.
CALIBRATION = {"blur": 0.02, "dark": 0.005, "bright": 0.005, "glare": 0.005, "entropy": 0.005}
SIZE_MARGIN = 0.5  # too small: under half the smallest usual training image's shorter side
SHAPE_MARGIN = 1.5  # odd shape: 1.5x more elongated than the most elongated usual one


def calibrate_quality(measured: Sequence[QualityMetrics]) -> QualityRule:
    """Thresholds from a version's training images: each flags a small share of them.

    Percentiles (``CALIBRATION``) rather than fixed numbers, so a set of dim close-ups is not
    all "dark": what is poor is judged against what the model was trained on. Each threshold is
    a training image's own value (no interpolation), so a small set flags none of its images. Glare is never
    flagged below 1% of saturated pixels (a training set without highlights would flag any).
    """
    if not measured:
        return QualityRule()

    def col(name: str) -> np.ndarray:
        return np.array([getattr(m, name) for m in measured], np.float64)

    def low(a: np.ndarray, q: float) -> float:  # a training image's own value: it is not flagged
        return float(np.quantile(a, q, method="lower"))

    def high(a: np.ndarray, q: float) -> float:
        return float(np.quantile(a, 1 - q, method="higher"))

    c = CALIBRATION
    blur, bright, sat, ent = col("blur"), col("brightness"), col("saturated"), col("entropy")
    return QualityRule(
        blur_max=high(blur, c["blur"]),
        dark_max=low(bright, c["dark"]),
        bright_min=high(bright, c["bright"]),
        clipped_min=max(0.05, high(col("clipped"), c["bright"])),
        glare_min=max(0.01, high(sat, c["glare"])),
        entropy_min=low(ent, c["entropy"]),
        min_side=int(np.quantile(col("min_side"), 0.01) * SIZE_MARGIN),
        aspect_max=float(np.quantile(col("aspect"), 0.99) * SHAPE_MARGIN),
    )
