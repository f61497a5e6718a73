"""Predictions: softmax Top-3 and the UNKNOWN decision, on top of the scoring engine."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from imagesieve._errors import UserError
from imagesieve.classifier._engine import (
    INFER_BATCH,
    EngineItem,
    EngineResult,
    ScoringEngine,
    SkipContent,
)
from imagesieve.classifier._far import Mahalanobis
from imagesieve.classifier._quality import QualityMetrics, QualityRule, quality_columns
from imagesieve.classifier._unknown import (
    FAR_FROM_TRAINING,
    LOW_CONFIDENCE,
    POOR_QUALITY,
    UNKNOWN,
    UnknownRule,
)
from imagesieve.models import OOD_FEATURES, ModelVersion

__all__ = [
    "FAR_FROM_TRAINING",
    "LOW_CONFIDENCE",
    "POOR_QUALITY",
    "PREDICTION_CSV_COLUMNS",
    "STORED_ARRAYS",
    "TOP3_COLUMNS",
    "UNKNOWN",
    "Prediction",
    "Predictor",
    "softmax",
    "top_k",
    "write_predictions_csv",
]

TOP3_COLUMNS = ["top1", "top1_prob", "top2", "top2_prob", "top3", "top3_prob"]
#: The ``Prediction`` arrays that only the store needs: a prediction kept for a report, or
#: reported again under another name, drops them.
STORED_ARRAYS = ("embedding", "probs", "max_pooled", "ood_features")
PREDICTION_CSV_COLUMNS = [
    "source",
    "label",
    "reason",
    *TOP3_COLUMNS,
    "distance",
    "quality",
    "error",
]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, c) logits, numerically stable."""
    z = logits - logits.max(axis=-1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=-1, keepdims=True)
    return z


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, c) probabilities -> (n, k) indices and probabilities, best first."""
    k = min(k, probs.shape[-1])
    idx = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    return idx, np.take_along_axis(probs, idx, axis=-1)


@dataclass
class Prediction:
    """One scored image: Top-3, decision and embedding, or the reason it could not be scored."""

    source: str
    label: str | None = None
    reason: str | None = None
    top3: list[tuple[str, float]] = field(default_factory=list)
    embedding: np.ndarray | None = None
    width: int = 0
    height: int = 0
    sha256: str = ""
    error_kind: str | None = None
    error: str | None = None
    probs: np.ndarray | None = field(default=None, repr=False)
    neighbor_id: int | None = None
    #: The distance to the training data that the far-from-training rule reads: the cosine
    #: distance to ``neighbor_id``, or the version's Mahalanobis distance (``classifier._far``).
    neighbor_distance: float | None = None
    #: The cosine distance to ``neighbor_id`` (what the near-duplicate rule compares).
    neighbor_cosine: float | None = None
    skipped: bool = False
    cluster_id: int | None = None
    id: int | None = None  # the store's row id, once stored
    #: The rest of the head's input (``avgmax`` versions): the average-pooled features' length
    #: and the max-pooled features (float16), kept so a head-only retrain needs no decoding.
    avg_norm: float | None = None
    max_pooled: np.ndarray | None = field(default=None, repr=False)
    #: The features the version's Mahalanobis distance reads, kept for the same reason (float32:
    #: a re-decided row gets the distance scoring gave it, 1,216 bytes for EfficientNet-Lite0).
    ood_features: np.ndarray | None = field(default=None, repr=False)
    #: Photo quality: the measures, and what the version's calibrated rule flags (any flag
    #: makes the prediction UNKNOWN with reason ``poor_quality``).
    quality: QualityMetrics | None = None
    quality_flags: list[str] = field(default_factory=list)
    #: The crop's pixel signature (``image_signature``): confirms near-duplicates in the store.
    signature: np.ndarray | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """True when the image was scored."""
        return self.error is None

    @property
    def confidence(self) -> float:
        """Top-1 probability (0 for failed items)."""
        return self.top3[0][1] if self.top3 else 0.0

    def top3_cells(self) -> list[str]:
        """Top-3 as six CSV cells (class, probability with 6 decimals), blank where missing."""
        cells = [x for c, q in self.top3 for x in (c, f"{q:.6f}")]
        return cells + [""] * (len(TOP3_COLUMNS) - len(cells))

    def csv_row(self) -> list[str]:
        """This prediction as a row of the report, in PREDICTION_CSV_COLUMNS order."""
        distance = "" if self.neighbor_distance is None else f"{self.neighbor_distance:.6f}"
        return [
            self.source,
            self.label or "",
            self.reason or "",
            *self.top3_cells(),
            distance,
            "+".join(self.quality_flags),
            self.error or "",
        ]

    def to_dict(self) -> dict:
        """JSON-ready form (no embedding)."""
        return {
            "id": self.id,
            "source": self.source,
            "label": self.label,
            "reason": self.reason,
            "top3": [{"class": c, "probability": round(p, 6)} for c, p in self.top3],
            "width": self.width,
            "height": self.height,
            "sha256": self.sha256,
            "neighbor_id": self.neighbor_id,
            "cluster_id": self.cluster_id,
            "neighbor_distance": (
                None if self.neighbor_distance is None else round(self.neighbor_distance, 6)
            ),
            "neighbor_cosine": (
                None if self.neighbor_cosine is None else round(self.neighbor_cosine, 6)
            ),
            "error_kind": self.error_kind,
            "error": self.error,
            "quality": (
                None
                if self.quality is None
                else {"flags": list(self.quality_flags), **self.quality.to_dict()}
            ),
        }


class Predictor:
    """Scores images with one model version: ONNX engine, Top-3, nearest training image, decision.

    UNKNOWN by ``rule``: Top-1 under the confidence threshold, or the image further than the
    distance threshold from every training image (or both).
    """

    def __init__(
        self,
        version: ModelVersion,
        *,
        threshold: float | None = None,
        distance_threshold: float | None = None,
        batch_size: int = INFER_BATCH,
        workers: int | None = None,
    ):
        from imagesieve.classifier._reference import ReferenceSet

        self.version = version
        self.classes = version.classes
        try:
            rule = UnknownRule(
                version.confidence_threshold if threshold is None else threshold,
                version.distance_threshold if distance_threshold is None else distance_threshold,
                version.mix,
            )
        except ValueError as e:  # a threshold out of range, in the user's words
            raise UserError(str(e)) from None
        self.threshold, self.distance_threshold, self.mix = rule.confidence, rule.distance, rule.mix
        self.reference = ReferenceSet.load(version.path)
        #: The version's Mahalanobis distance (None: the cosine distance to the nearest image).
        self.far = Mahalanobis.load(version.path)
        #: The version's photo quality thresholds (None: trained before they were calibrated).
        self.quality_rule = QualityRule.of_version(version.meta)
        self._head: tuple[np.ndarray, np.ndarray] | None = None  # head.npz, read on first use
        self._subset: dict[str, np.ndarray | None] = {}  # for nearest_since, per older version
        self.engine = ScoringEngine(
            version.onnx_path,
            version.config,
            batch_size=batch_size,
            workers=workers,
            signature=True,
        )

    @property
    def rule(self) -> UnknownRule:
        """The UNKNOWN rule of this predictor's thresholds."""
        return UnknownRule(self.threshold, self.distance_threshold, self.mix)

    def decide(
        self,
        probs: np.ndarray,
        distances: np.ndarray | None = None,
        poor: np.ndarray | None = None,
    ) -> list[tuple[str, str | None, list[tuple[str, float]]]]:
        """(n, c) probabilities, (n,) training distances -> per row (label, reason or None, Top-3).

        Without distances (or a distance threshold) only confidence counts; ``poor`` (bool)
        marks photos of poor quality.
        """
        idx, p, reasons, labels = self.decide_columns(probs, distances, poor)
        return [
            (label, reason, [(self.classes[i], float(q)) for i, q in zip(ri, rp, strict=True)])
            for label, reason, ri, rp in zip(labels.tolist(), reasons, idx, p, strict=True)
        ]

    def decide_columns(
        self,
        probs: np.ndarray,
        distances: np.ndarray | None = None,
        poor: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[str | None], np.ndarray]:
        """``decide`` as columns: Top-3 class indices and probabilities (n, <=3), reasons, labels.

        For many rows at once (re-deciding a stored history): no per-row Python tuples.
        """
        idx, p = top_k(probs, 3)
        reasons = self.rule.reasons(p[:, 0], distances, poor)
        unknown = np.array([r is not None for r in reasons], bool)
        names = np.asarray(self.classes, dtype=object)
        labels = np.where(unknown, UNKNOWN, names[idx[:, 0]] if len(idx) else names[:0])
        return idx, p, reasons, labels

    def predictions(self, batch: list[EngineResult]) -> list[Prediction]:
        """Engine results -> predictions (Top-3, nearest training image, decision), in order."""
        ok = [r for r in batch if r.outputs is not None]
        probs = (
            softmax(np.stack([r.outputs["logits"] for r in ok]))
            if ok
            else np.zeros((0, len(self.classes)))
        )
        ids, cosine = self.nearest(
            np.stack([r.outputs["embedding"] for r in ok]) if ok else np.zeros((0, 1), np.float32)
        )
        ood = (
            np.stack([r.outputs[OOD_FEATURES] for r in ok]) if ok and self.far is not None else None
        )
        dist = self.far_distance(cosine, ood)
        flags = self.quality_flags([r.quality for r in ok])
        poor = np.array([f is not None for f in flags], bool)
        decisions = iter(enumerate(zip(self.decide(probs, dist, poor), probs, strict=True)))
        preds = []
        for r in batch:
            if r.skipped:
                preds.append(Prediction(r.source, sha256=r.sha256, skipped=True))
                continue
            if r.error is not None:
                preds.append(
                    Prediction(
                        r.source, sha256=r.sha256, error_kind=r.error.kind, error=r.error.reason
                    )
                )
                continue
            j, ((label, reason, top3), p) = next(decisions)
            preds.append(
                Prediction(
                    r.source,
                    label,
                    reason,
                    top3,
                    r.outputs["embedding"],
                    r.width,
                    r.height,
                    r.sha256,
                    probs=p,
                    neighbor_id=None if ids is None else int(ids[j]),
                    neighbor_distance=None if dist is None else float(dist[j]),
                    neighbor_cosine=None if cosine is None else float(cosine[j]),
                    avg_norm=float(r.outputs["avg_norm"]) if "avg_norm" in r.outputs else None,
                    max_pooled=(
                        r.outputs["max_pooled"].astype(np.float16)
                        if "max_pooled" in r.outputs
                        else None
                    ),
                    ood_features=(
                        r.outputs[OOD_FEATURES].astype(np.float32)
                        if OOD_FEATURES in r.outputs
                        else None
                    ),
                    quality=r.quality,
                    quality_flags=flags[j].split("+") if flags[j] else [],
                    signature=r.signature,
                )
            )
        return preds

    def quality_flags(self, measured: list[QualityMetrics | None]) -> list[str | None]:
        """Per image its quality flags by the version's rule, joined by ``+`` (None: good).

        None for every image when the version has no quality rule or nothing was measured.
        """
        if self.quality_rule is None:
            return [None] * len(measured)
        return self.quality_rule.flag_columns(quality_columns(measured))

    def far_distance(self, cosine: np.ndarray | None, ood: np.ndarray | None) -> np.ndarray | None:
        """The distance to the training data the far rule reads, per row.

        The version's Mahalanobis distance of the tapped features ``ood`` where it has one,
        else the cosine distance to the nearest training image (None without a reference set).
        """
        if self.far is None or cosine is None:
            return cosine
        if ood is None:
            raise ValueError(f"version {self.version.name} needs {OOD_FEATURES} for its distance")
        return self.far(ood)

    def nearest(
        self, embeddings: np.ndarray, threads: int = 1
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(n, d) embeddings -> the nearest training image's id and distance each.

        (None, None) without a reference set or rows.
        """
        if self.reference is None or not len(embeddings):
            return None, None
        ids, dist = self.reference.nearest(embeddings, threads=threads)
        return ids[:, 0], dist[:, 0]

    def nearest_since(
        self,
        old: ModelVersion,
        embeddings: np.ndarray,
        near: np.ndarray,
        dist: np.ndarray,
        threads: int = 1,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``nearest``, given each row's nearest training image of ``old`` (id, distance).

        When ``old``'s training images are all among this version's (same backbone), only the
        ones added since are searched (``ReferenceSet.nearest_since``, on the BLAS library's
        threads); otherwise all are, on ``threads``.
        """
        from imagesieve.classifier._reference import ReferenceSet

        if old.name not in self._subset:
            was = ReferenceSet.load(old.path)
            self._subset[old.name] = (
                self.reference.ids_of(was)
                if self.reference is not None and was is not None
                else None
            )
        here = self._subset[old.name]
        found = None if here is None else self.reference.nearest_since(here, embeddings, near, dist)
        return found or self.nearest(embeddings, threads)

    def head_probs(
        self, embeddings: np.ndarray, avg_norm: np.ndarray, max_pooled: np.ndarray
    ) -> np.ndarray | None:
        """Probabilities from stored head inputs, as scoring the images again would give.

        To ~1e-3 (the max-pooled part is kept as float16); None without a ``head.npz``.
        """
        if self._head is None:
            path = self.version.head_path
            if not path.is_file():
                return None
            with np.load(path) as w:
                self._head = (w["weight"].T.astype(np.float32), w["bias"].astype(np.float32))
        weight, bias = self._head
        dim = embeddings.shape[1]
        logits = (embeddings @ weight[:dim]) * avg_norm[:, None]  # the head is linear
        for a in range(0, len(logits), 8192):  # converted a block at a time: no 2x-size copy
            logits[a : a + 8192] += max_pooled[a : a + 8192].astype(np.float32) @ weight[dim:]
        return softmax(logits + bias)

    def score_batches(
        self, items: Iterable[EngineItem], skip: SkipContent | None = None
    ) -> Iterator[list[Prediction]]:
        """Score a stream of images batch by batch, in input order.

        Content accepted by ``skip(sha256)`` comes back as ``skipped`` predictions, undecoded.
        """
        for batch in self.engine.run(items, skip):
            yield self.predictions(batch)

    def score(self, items: Iterable[EngineItem]) -> Iterator[Prediction]:
        """Score a stream of images one prediction at a time, in input order."""
        for batch in self.score_batches(items):
            yield from batch


def write_predictions_csv(predictions: Iterable[Prediction], path: str | os.PathLike) -> int:
    """Write the report operators hand on; returns the number of rows.

    Columns: source, label, UNKNOWN reason, Top-3, nearest-training distance, error.
    """
    n = 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PREDICTION_CSV_COLUMNS)
        for p in predictions:
            w.writerow(p.csv_row())
            n += 1
    return n
