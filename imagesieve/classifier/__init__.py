"""Scoring (ONNX Runtime, no torch), training and evaluation of the classifier head."""

from imagesieve.classifier._engine import EngineItem, EngineResult, Progress, ScoringEngine
from imagesieve.classifier._gradcam import GradCam, grad_cam
from imagesieve.classifier._predict import (
    FAR_FROM_TRAINING,
    LOW_CONFIDENCE,
    PREDICTION_CSV_COLUMNS,
    TOP3_COLUMNS,
    UNKNOWN,
    Prediction,
    Predictor,
    softmax,
    top_k,
    write_predictions_csv,
)
from imagesieve.classifier._unknown import UnknownRule

__all__ = [
    "FAR_FROM_TRAINING",
    "LOW_CONFIDENCE",
    "PREDICTION_CSV_COLUMNS",
    "TOP3_COLUMNS",
    "UNKNOWN",
    "EngineItem",
    "EngineResult",
    "GradCam",
    "Prediction",
    "Progress",
    "Predictor",
    "ScoringEngine",
    "UnknownRule",
    "grad_cam",
    "softmax",
    "top_k",
    "write_predictions_csv",
]
