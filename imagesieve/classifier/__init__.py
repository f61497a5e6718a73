"""Scoring (ONNX Runtime, no torch), training and evaluation of the classifier head, the UNKNOWN rule."""

from imagesieve.classifier._duplicates import (
    DuplicateRule,
    NearDuplicateIndex,
    assign_near_duplicates,
    calibrate_duplicate_rule,
    near_duplicate_groups,
    near_duplicate_variants,
)
from imagesieve.classifier._engine import (
    INFER_BATCH,
    EngineItem,
    EngineResult,
    Progress,
    ScoringEngine,
)
from imagesieve.classifier._evaluate import evaluate_model
from imagesieve.classifier._gradcam import GradCam, grad_cam, grad_cam_loaded
from imagesieve.classifier._predict import (
    FAR_FROM_TRAINING,
    LOW_CONFIDENCE,
    POOR_QUALITY,
    PREDICTION_CSV_COLUMNS,
    TOP3_COLUMNS,
    UNKNOWN,
    Prediction,
    Predictor,
    softmax,
    top_k,
    write_predictions_csv,
)
from imagesieve.classifier._quality import (
    CALIBRATED,
    QUALITY_KINDS,
    STORED_MEASURES,
    QualityMetrics,
    QualityRule,
    bound_text,
    calibrate_quality,
    image_shape,
    measure_quality,
    merge_overrides,
    parse_bounds,
    quality_columns,
)
from imagesieve.classifier._reference import ReferenceSet
from imagesieve.classifier._report import confusion_counts, read_audit
from imagesieve.classifier._signature import (
    SIGNATURE_BYTES,
    image_signature,
    signature_similarity,
)
from imagesieve.classifier._train import CLASS_WEIGHTS, FLIPS, TrainOptions, train_model
from imagesieve.classifier._unknown import REASONS, UnknownRule

__all__ = [
    "DuplicateRule",
    "NearDuplicateIndex",
    "assign_near_duplicates",
    "bound_text",
    "calibrate_duplicate_rule",
    "near_duplicate_groups",
    "near_duplicate_variants",
    "CALIBRATED",
    "SIGNATURE_BYTES",
    "CLASS_WEIGHTS",
    "FLIPS",
    "INFER_BATCH",
    "FAR_FROM_TRAINING",
    "LOW_CONFIDENCE",
    "POOR_QUALITY",
    "PREDICTION_CSV_COLUMNS",
    "QUALITY_KINDS",
    "REASONS",
    "STORED_MEASURES",
    "TOP3_COLUMNS",
    "UNKNOWN",
    "EngineItem",
    "EngineResult",
    "GradCam",
    "Prediction",
    "Progress",
    "Predictor",
    "QualityMetrics",
    "QualityRule",
    "ReferenceSet",
    "ScoringEngine",
    "TrainOptions",
    "UnknownRule",
    "calibrate_quality",
    "confusion_counts",
    "evaluate_model",
    "read_audit",
    "grad_cam",
    "grad_cam_loaded",
    "image_shape",
    "image_signature",
    "measure_quality",
    "merge_overrides",
    "parse_bounds",
    "quality_columns",
    "signature_similarity",
    "softmax",
    "top_k",
    "train_model",
    "write_predictions_csv",
]
