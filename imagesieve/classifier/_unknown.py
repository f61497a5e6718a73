"""The UNKNOWN rule, once: in Python for fresh predictions, as DuckDB SQL for stored ones."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from imagesieve.models import ModelVersion

__all__ = [
    "FAR_FROM_TRAINING",
    "LOW_CONFIDENCE",
    "POOR_QUALITY",
    "REASONS",
    "UNKNOWN",
    "UnknownRule",
    "reason_shares",
]

UNKNOWN = "UNKNOWN"
#: A stored row's photo is poor: its quality flags, set when it was stored, are not empty.
POOR_SQL = "(quality_flags IS NOT NULL)"
#: Why a prediction is UNKNOWN, in the order a reason lists them (joined by "+" when several
#: fire): a photo too poor to judge (reshoot it: the version's photo quality rule flagged it),
#: Top-1 under the confidence threshold (unsure between known classes), the nearest training
#: image further than the distance threshold (unlike anything trained on).
POOR_QUALITY = "poor_quality"
LOW_CONFIDENCE = "low_confidence"
FAR_FROM_TRAINING = "far_from_training"
REASONS = (POOR_QUALITY, LOW_CONFIDENCE, FAR_FROM_TRAINING)


def reason_shares(reasons: Sequence[str | None]) -> dict[str, float]:
    """Share of rows UNKNOWN (``unknown``), and of rows each rule fires on (both may)."""
    n = max(len(reasons), 1)
    shares = {"unknown": sum(r is not None for r in reasons) / n}
    for rule in REASONS:
        shares[rule] = sum(r is not None and rule in r for r in reasons) / n
    return shares


@dataclass(frozen=True)
class UnknownRule:
    """When a prediction is UNKNOWN.

    Low confidence: Top-1 probability ``p < confidence``. Far from training: ``distance`` is set
    and the score ``d + mix * (1 - p)`` is above it, ``d`` being the nearest-training cosine
    distance (a missing or NaN ``d`` never is far). ``mix`` is 0 unless training found that
    low confidence also marks new types (``classifier._openset``). Poor quality: the photo's
    quality flags (``QualityRule``, stored in ``quality_flags``) are not empty.
    Both forms compare in double precision, so a probability stored as FLOAT gets the same
    decision from the SQL as from ``reasons`` applied to that float32 value.
    """

    confidence: float
    distance: float | None = None
    mix: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.confidence <= 1.0:
            raise ValueError(f"confidence threshold must be within [0, 1], got {self.confidence}")
        if not 0.0 <= self.mix < float("inf"):
            raise ValueError(f"mix must be a finite number >= 0, got {self.mix}")
        top = 2.0 + self.mix
        if self.distance is not None and not 0.0 <= self.distance <= top:
            raise ValueError(f"distance threshold must be within [0, {top:g}], got {self.distance}")

    @classmethod
    def of_version(cls, version: ModelVersion) -> UnknownRule:
        """A ``ModelVersion``'s rule: the thresholds it has now, and its ``mix``."""
        return cls(version.confidence_threshold, version.distance_threshold, version.mix)

    def reasons(
        self,
        top1_prob: np.ndarray,
        distance: np.ndarray | None,
        poor: np.ndarray | None = None,
    ) -> list[str | None]:
        """Per row the UNKNOWN reason, or None when the prediction is known.

        ``distance`` may hold NaN (or None) for rows without a nearest training image;
        ``poor`` (bool) marks photos of poor quality (None: none are).
        """
        hits = self.hits(top1_prob, distance, poor)
        return [
            "+".join(r for r, hit in zip(REASONS, k, strict=True) if hit) or None
            for k in zip(*(h.tolist() for h in hits), strict=True)
        ]

    def hits(
        self,
        top1_prob: np.ndarray,
        distance: np.ndarray | None,
        poor: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row whether each rule fires, as (n,) bool arrays in ``REASONS`` order.

        What ``reasons`` joins into words; for counting many rows without building them.
        """
        p = np.asarray(top1_prob, np.float64)
        low = p < self.confidence
        far = np.zeros(len(low), bool)
        if distance is not None and self.distance is not None:
            score = np.asarray(distance, np.float64)
            if self.mix:
                score = score + self.mix * (1.0 - p)
            far = score > self.distance  # NaN > x is False
        bad = np.zeros(len(low), bool) if poor is None else np.asarray(poor, bool)
        return bad, low, far

    def shares(
        self,
        top1_prob: np.ndarray,
        distance: np.ndarray | None,
        poor: np.ndarray | None = None,
    ) -> dict[str, float]:
        """``reason_shares`` of ``reasons``, from ``hits``: the share UNKNOWN, and each rule's."""
        hits = self.hits(top1_prob, distance, poor)
        n = max(len(hits[0]), 1)
        out = {"unknown": float((hits[0] | hits[1] | hits[2]).sum() / n)}
        return out | {r: float(h.sum() / n) for r, h in zip(REASONS, hits, strict=True)}

    def _sql(self) -> tuple[str, str, list, list]:
        """The two tests over ``predictions``' columns in DuckDB, and their parameters.

        Poor quality is the stored ``quality_flags`` column (``POOR_SQL``), set when stored.
        """
        low = "CAST(top1_prob AS DOUBLE) < ?"
        if self.distance is None:
            return low, "false", [self.confidence], []
        # DuckDB orders NaN above every number, so NaN must be excluded explicitly.
        if not self.mix:
            far = "(NOT isnan(neighbor_distance) AND CAST(neighbor_distance AS DOUBLE) > ?)"
            return low, far, [self.confidence], [self.distance]
        far = (
            "(NOT isnan(neighbor_distance) AND CAST(neighbor_distance AS DOUBLE)"
            " + ? * (1.0 - CAST(top1_prob AS DOUBLE)) > ?)"
        )
        return low, far, [self.confidence], [self.mix, self.distance]

    def sql_reason(self) -> tuple[str, list]:
        """A DuckDB expression giving ``reasons``' value (NULL when known), and its parameters."""
        low, far, lp, fp = self._sql()
        return (
            f"nullif(concat_ws('+', CASE WHEN {POOR_SQL} THEN '{POOR_QUALITY}' END, "
            f"CASE WHEN {low} THEN '{LOW_CONFIDENCE}' END, "
            f"CASE WHEN {far} THEN '{FAR_FROM_TRAINING}' END), '')"
        ), lp + fp

    def sql_label(self) -> tuple[str, list]:
        """A DuckDB expression giving the label: the Top-1 class when known, else UNKNOWN."""
        low, far, lp, fp = self._sql()
        return (
            f"CASE WHEN {POOR_SQL} OR ({low}) OR ({far}) THEN '{UNKNOWN}' ELSE top1_class END",
            lp + fp,
        )

    def sql_counts(self, poor: tuple[str, list] | None = None) -> tuple[str, list]:
        """Select list counting rows of poor quality, low-confidence, far from training, any.

        ``poor``: a boolean expression and its parameters telling photos of poor quality, to
        preview other quality bounds (default: the stored ``quality_flags`` column is set).
        """
        bad, bp = poor or (POOR_SQL, [])
        low, far, lp, fp = self._sql()
        anyone = f"count(*) FILTER (WHERE {bad} OR ({low}) OR ({far}))"
        return (
            f"count(*) FILTER (WHERE {bad}), count(*) FILTER (WHERE {low}), "
            f"count(*) FILTER (WHERE {far}), {anyone}"
        ), bp + lp + fp + bp + lp + fp
