"""Scoring (ONNX Runtime, no torch), training and evaluation of the classifier head."""

from imagesieve.classifier._engine import EngineItem, EngineResult, ScoringEngine
from imagesieve.classifier._predict import UNKNOWN, Prediction, Predictor, softmax, top_k

__all__ = [
    "UNKNOWN",
    "EngineItem",
    "EngineResult",
    "Prediction",
    "Predictor",
    "ScoringEngine",
    "softmax",
    "top_k",
]
