"""Scoring (ONNX Runtime, no torch), training and evaluation of the classifier head."""

from imagesieve.classifier._engine import EngineItem, EngineResult, Progress, ScoringEngine
from imagesieve.classifier._gradcam import GradCam, grad_cam
from imagesieve.classifier._predict import (
    PREDICTION_CSV_COLUMNS,
    TOP3_COLUMNS,
    UNKNOWN,
    Prediction,
    Predictor,
    softmax,
    top_k,
    write_predictions_csv,
)

__all__ = [
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
    "grad_cam",
    "softmax",
    "top_k",
    "write_predictions_csv",
]
