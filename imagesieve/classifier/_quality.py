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
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "QUALITY_KINDS",
    "QualityMetrics",
    "QualityRule",
    "bound_text",
    "calibrate_quality",
    "compile_quality",
    "image_shape",
    "measure_quality",
    "merge_overrides",
    "parse_bounds",
    "quality_columns",
]

#: What a photo can be flagged for, in the order flags are listed.
QUALITY_KINDS = ("blurred", "dark", "bright", "glare", "low_information", "too_small", "odd_shape")
#: Blur: the image is averaged over 2x2 pixels (quantisation noise would otherwise read as
#: detail in a smooth image), then re-blurred over BLUR_BOX pixels along each axis.
BLUR_BOX = 5
#: Edge blur: an edge is a step over EDGE_STEP pixels (of the 2x2-averaged crop) among the
#: EDGE_SHARE largest along an axis, of at least EDGE_MIN of the image's range of R+G+B (so an
#: under-exposed photo's edges still count, and edges between colours of one luma do too).
EDGE_STEP, EDGE_SHARE, EDGE_MIN = 3, 0.1, 0.15
#: Highlights: the share of pixels below the brightest ones.
HIGHLIGHTS = 0.99
#: A pixel at or above this luma is saturated (glare, blown highlights).
SATURATED = 250


@dataclass(frozen=True)
class QualityMetrics:
    """One image's quality measures (see the module docstring for what each reads).

    ``blur``: the share of the image's detail that survives re-blurring along its blurriest
    axis (0 sharp .. 1 as blurred as re-blurring can make it; motion blur shows on one axis).
    ``edge_blur``: how spread the image's strongest edges are along its blurrier axis (0: each
    happens within one pixel .. 1: none found); it reads the edges alone, so sensor noise and
    flat areas, which move ``blur``, do not hide a blurred photo.
    ``brightness``: mean luma, 0..1. ``highlights``: the brightest 1% of the image's pixels start
    at this value of their brightest channel, 0..1 (an under-exposed photo has no bright part;
    a dark subject in a well-exposed photo still has some). ``saturated``: share of pixels at luma >= 250 (white:
    glare). ``clipped``: share of pixels with any channel at >= 250 (a colour burnt out).
    ``entropy``: bits of the 64-bin luma histogram (0 for a flat image, 6 at most).
    ``min_side`` and ``aspect``: of the decoded image, in pixels and long side / short side.
    """

    blur: float
    edge_blur: float
    brightness: float
    highlights: float
    saturated: float
    clipped: float
    entropy: float
    min_side: int
    aspect: float

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready form, rounded; None for a measure the row was stored without."""
        return {k: None if v != v else round(float(v), 4) for k, v in asdict(self).items()}


#: The measures stored as ``predictions`` columns (size and shape come from width and height).
STORED_MEASURES = (
    "blur",
    "edge_blur",
    "brightness",
    "highlights",
    "saturated",
    "clipped",
    "entropy",
)


def quality_columns(measured: Sequence[QualityMetrics | None]) -> dict[str, np.ndarray]:
    """Measures as columns, one (n,) float64 array per ``QualityMetrics`` field; NaN: not measured.

    Values are rounded to float32, as the store keeps them, so flags decided now and flags
    re-decided later from stored measures agree, borderline values included.
    """
    names = [f.name for f in fields(QualityMetrics)]
    out = np.full((len(names), len(measured)), np.nan, np.float32)
    for j, m in enumerate(measured):
        if m is not None:
            out[:, j] = [getattr(m, k) for k in names]
    return dict(zip(names, out.astype(np.float64), strict=True))


def image_shape(width: Any, height: Any) -> tuple[Any, Any]:
    """Shorter side and elongation (long side / short side) of images of these sizes.

    Numbers or arrays alike: ``QualityMetrics.min_side`` and ``aspect``, whether measured on a
    decoded image or derived from a stored row's width and height.
    """
    short = np.minimum(width, height)
    return short, np.maximum(width, height) / np.maximum(short, 1)


def measure_quality(image: Image.Image | np.ndarray, width: int, height: int) -> QualityMetrics:
    """The quality measures of one preprocessed RGB image (the model's square crop) of that size.

    ``image``: the crop as PIL or as its (s, s, 3) uint8 pixels. Everything but size and shape
    reads the crop averaged over 2x2 pixels (as PIL's ``reduce(2)``: a quarter of the work, and
    quantisation noise no longer reads as detail), in one compiled pass (``_quality_kernel``:
    ~0.2 ms, without the GIL).
    """
    from imagesieve.classifier._quality_kernel import measures

    x = np.asarray(image, np.uint8)
    x = np.ascontiguousarray(x[: x.shape[0] // 2 * 2, : x.shape[1] // 2 * 2])
    blur, edge_blur, brightness, highlights, saturated, clipped, entropy = measures(x)
    short, aspect = image_shape(width, height)
    return QualityMetrics(
        blur=blur,
        edge_blur=edge_blur,
        brightness=brightness,
        highlights=highlights,
        saturated=saturated,
        clipped=clipped,
        entropy=entropy,
        min_side=int(short),
        aspect=float(aspect),
    )


def compile_quality() -> None:
    """Compile photo quality's kernel, or load it from numba's cache, before an image needs it.

    Any C-ordered uint8 crop gives the one signature ``measure_quality`` uses (~8 s to compile,
    once per install; ~0.5 s from the cache).
    """
    measure_quality(np.zeros((16, 16, 3), np.uint8), 16, 16)


@dataclass(frozen=True)
class QualityRule:
    """When a photo is poor: each bound flags its kind; None switches a check off.

    ``blur_max`` / ``edge_blur_max``: blur or edge blur above it is ``blurred``;
    ``dark_max`` / ``highlights_min``: brightness or highlights below it is ``dark``;
    ``bright_min`` / ``clipped_min``: brightness or clipped share above it is ``bright``
    (over-exposed); ``glare_min``: saturated share above; ``entropy_min``: histogram bits below
    (``low_information``); ``min_side``: shorter side below, in pixels (``too_small``);
    ``aspect_max``: long side / short side above (``odd_shape``).
    """

    blur_max: float | None = None
    edge_blur_max: float | None = None
    dark_max: float | None = None
    highlights_min: float | None = None
    bright_min: float | None = None
    clipped_min: float | None = None
    glare_min: float | None = None
    entropy_min: float | None = None
    min_side: int | None = None
    aspect_max: float | None = None

    def _tests(self) -> list[tuple[str, list[tuple[str, str, float]]]]:
        """Per kind, its bounds as (measure, comparison, bound): the one statement of the rule."""
        bounds = (
            ("blurred", [("blur", ">", self.blur_max), ("edge_blur", ">", self.edge_blur_max)]),
            (
                "dark",
                [("brightness", "<", self.dark_max), ("highlights", "<", self.highlights_min)],
            ),
            ("bright", [("brightness", ">", self.bright_min), ("clipped", ">", self.clipped_min)]),
            ("glare", [("saturated", ">", self.glare_min)]),
            ("low_information", [("entropy", "<", self.entropy_min)]),
            ("too_small", [("min_side", "<", self.min_side)]),
            ("odd_shape", [("aspect", ">", self.aspect_max)]),
        )
        return [(k, [(m, op, float(b)) for m, op, b in t if b is not None]) for k, t in bounds]

    def flag_columns(self, columns: dict[str, np.ndarray]) -> list[str | None]:
        """Per row of measure columns (``QualityMetrics`` names), its flags joined by ``+``.

        None for a good photo, or a row not measured (NaN measures are never flagged).
        """
        hits = self._hits(columns)
        n = len(next(iter(columns.values()))) if columns else 0
        out: list[str | None] = []
        for row in zip(*(h.tolist() for _, h in hits), strict=True) if hits else [()] * n:
            kinds = [k for (k, _), hit in zip(hits, row, strict=True) if hit]
            out.append("+".join(kinds) or None)
        return out

    def poor(self, columns: dict[str, np.ndarray]) -> np.ndarray:
        """Per row of measure columns whether any check flags it: ``flag_columns`` not None."""
        n = len(next(iter(columns.values()))) if columns else 0
        out = np.zeros(n, bool)
        for _, hit in self._hits(columns):
            out |= hit
        return out

    def _hits(self, columns: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
        """Per kind of check, which rows of measure columns it flags (NaN: never)."""
        n = len(next(iter(columns.values()))) if columns else 0
        hits = []
        for kind, tests in self._tests():
            hit = np.zeros(n, bool)
            for name, op, bound in tests:
                v = np.asarray(columns[name], np.float64)
                hit |= v > bound if op == ">" else v < bound  # NaN compares False
            hits.append((kind, hit))
        return hits

    def flags(self, m: QualityMetrics) -> list[str]:
        """The kinds ``m`` is flagged for, in QUALITY_KINDS order (empty: a good photo)."""
        found = self.flag_columns(quality_columns([m]))[0]
        return found.split("+") if found else []

    def sql_flags(self) -> tuple[str, list[float]]:
        """A DuckDB expression over ``predictions``' columns giving ``flag_columns``' value.

        ``min_side`` and ``aspect`` come from the stored width and height; comparisons run in
        double precision, as ``flag_columns`` does on float32 values.
        """
        expr = {
            "min_side": "least(width, height)",
            "aspect": "greatest(width, height)::DOUBLE / greatest(least(width, height), 1)",
        }
        parts, params = [], []
        for kind, tests in self._tests():
            if not tests:
                continue
            test = " OR ".join(
                f"{expr.get(name, f'CAST({name} AS DOUBLE)')} {op} ?" for name, op, _ in tests
            )
            parts.append(f"CASE WHEN {test} THEN '{kind}' END")
            params += [bound for _, _, bound in tests]
        if not parts:
            return "NULL::VARCHAR", []
        return f"nullif(concat_ws('+', {', '.join(parts)}), '')", params

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready form (``meta.json``'s ``quality``)."""
        return asdict(self)

    def with_overrides(self, overrides: dict[str, Any] | None) -> QualityRule:
        """This rule with some bounds set by an operator (None switches a check off).

        ValueError, in the user's words, for an unknown bound or a value that is not a
        number >= 0.
        """
        names = [f.name for f in fields(self)]
        checked: dict[str, Any] = {}
        for key, value in (overrides or {}).items():
            if key not in names:
                raise ValueError(
                    f"unknown photo quality bound {key!r}: use one of {', '.join(names)}"
                )
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ValueError(f"photo quality bound {key} must be a number, got {value!r}")
                if not 0 <= value < float("inf"):
                    raise ValueError(f"photo quality bound {key} must be >= 0, got {value}")
                value = int(value) if key == "min_side" else float(value)
            checked[key] = value
        return replace(self, **checked)

    @classmethod
    def from_dict(cls, d: dict | None) -> QualityRule | None:
        """The rule ``to_dict`` wrote; None for no rule (a version trained before quality)."""
        if not d:
            return None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def of_version(cls, meta: dict[str, Any]) -> QualityRule | None:
        """A version's rule: its calibrated bounds (``quality``) with an operator's overrides.

        None for a version trained before photo quality was measured.
        """
        rule = cls.from_dict(meta.get("quality"))
        return None if rule is None else rule.with_overrides(meta.get("quality_overrides"))


#: In an override, this value puts the calibrated bound back.
CALIBRATED = "auto"


def bound_text(value: float | None) -> str:
    """A quality bound as people read and type it: 4 significant digits, or ``off``."""
    return "off" if value is None else f"{value:.4g}"


def parse_bounds(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` texts as quality bounds: a number, ``off`` (None) or ``auto``.

    ValueError, in the user's words, for text that is not of that form.
    """
    asked: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"a photo quality bound is KEY=VALUE (e.g. blur_max=0.8), got {item!r}"
            )
        v = value.strip().lower()
        if v in ("off", CALIBRATED):
            asked[key.strip()] = None if v == "off" else CALIBRATED
            continue
        try:
            asked[key.strip()] = float(v)
        except ValueError:
            raise ValueError(
                f"photo quality bound {key.strip()} must be a number, off or auto, got {value!r}"
            ) from None
    return asked


def merge_overrides(current: dict[str, Any] | None, given: dict[str, Any]) -> dict[str, Any]:
    """An operator's quality overrides after setting ``given`` (``"auto"``: calibrated again).

    Checked: ValueError for an unknown bound or a bad value.
    """
    merged = dict(current or {}) | given
    merged = {k: v for k, v in merged.items() if v != CALIBRATED}
    QualityRule().with_overrides(merged)
    return merged


#: Calibration: the share of training images each check may flag (it flags beyond that
#: percentile of the training images' own measures), and margins for size and shape.
CALIBRATION = {
    "blur": 0.01,
    "edge_blur": 0.015,
    "dark": 0.005,
    "highlights": 0.0025,
    "bright": 0.005,
    "glare": 0.005,
    "entropy": 0.005,
}
#: Each bound then moves out by MARGIN interquartile ranges over sqrt(images): a small
#: training set's extremes fall short of what ordinary photos reach (80 images: 0.34 IQR;
#: 1,500: 0.08), so its first version does not call ordinary photos poor.
MARGIN = 3.0
SIZE_MARGIN = 0.5  # too small: under half the smallest usual training image's shorter side
SHAPE_MARGIN = 1.5  # odd shape: 1.5x more elongated than the most elongated usual one


def calibrate_quality(measured: Sequence[QualityMetrics]) -> QualityRule:
    """Thresholds from a version's training images: each flags a small share of them.

    Percentiles (``CALIBRATION``) rather than fixed numbers, so a set of dim close-ups is not
    all "dark": what is poor is judged against what the model was trained on. Each threshold is
    a training image's own value (no interpolation) moved out by a margin that shrinks with the
    number of images (``MARGIN``), so a small set flags none of its images and few ordinary
    photos. Glare is never flagged below 1% of saturated pixels (a training set without
    highlights would flag any).
    """
    if not measured:
        return QualityRule()

    columns = quality_columns(measured)

    def col(name: str) -> np.ndarray:
        return columns[name]

    def low(a: np.ndarray, q: float) -> float:  # a training image's own value: it is not flagged
        return float(np.quantile(a, q, method="lower"))

    def high(a: np.ndarray, q: float) -> float:
        return float(np.quantile(a, 1 - q, method="higher"))

    def margin(a: np.ndarray) -> float:  # how far a small set's extremes fall short
        q1, q3 = np.quantile(a, [0.25, 0.75])
        return float(MARGIN * (q3 - q1) / np.sqrt(len(a)))

    c = CALIBRATION
    blur, bright, sat, ent = col("blur"), col("brightness"), col("saturated"), col("entropy")
    clipped, edges, lights = col("clipped"), col("edge_blur"), col("highlights")
    return QualityRule(
        blur_max=high(blur, c["blur"]) + margin(blur),
        edge_blur_max=high(edges, c["edge_blur"]) + margin(edges),
        dark_max=low(bright, c["dark"]) - margin(bright),
        highlights_min=low(lights, c["highlights"]) - margin(lights),
        bright_min=high(bright, c["bright"]) + margin(bright),
        clipped_min=max(0.05, high(clipped, c["bright"]) + margin(clipped)),
        glare_min=max(0.01, high(sat, c["glare"]) + margin(sat)),
        entropy_min=low(ent, c["entropy"]) - margin(ent),
        min_side=int(np.quantile(col("min_side"), 0.01) * SIZE_MARGIN),
        aspect_max=float(np.quantile(col("aspect"), 0.99) * SHAPE_MARGIN),
    )
