"""The Gradio app and REST API over one workspace (``imagesieve serve``)."""

from imagesieve._access import parse_tokens
from imagesieve.app._server import serve, start_server
from imagesieve.app._service import Limits, PredictResult, Service, ServiceError

__all__ = [
    "Limits",
    "PredictResult",
    "Service",
    "ServiceError",
    "parse_tokens",
    "serve",
    "start_server",
]
