"""The Gradio app and REST API over one workspace (``imagesieve serve``)."""

from imagesieve.app._server import (
    RunningServer,
    build_server,
    check_exposure,
    serve,
    start_server,
)
from imagesieve.app._service import Limits, PredictResult, Service, ServiceError

__all__ = [
    "Limits",
    "PredictResult",
    "RunningServer",
    "Service",
    "ServiceError",
    "build_server",
    "check_exposure",
    "serve",
    "start_server",
]
