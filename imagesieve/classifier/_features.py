"""Frozen-backbone features for phase-1 training, computed with the fast ONNX engine."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imagesieve._workspace import Workspace
from imagesieve.classifier._engine import Progress, ScoringEngine
from imagesieve.data import ImageLoadError
from imagesieve.models import get_backbone_spec

__all__ = ["HEAD_POOLING", "backbone_onnx", "extract_features"]

#: Pooling of trained heads: average and max pooled features concatenated.
HEAD_POOLING = "avgmax"


def backbone_onnx(ws: Workspace, backbone: str, weights: str | None = None) -> Path:
    """ONNX of the pretrained backbone alone: ``embedding`` and ``features`` (avg + max pooled).

    Exported once per backbone and weights file into the workspace cache, then reused.
    """
    key = backbone
    if weights:
        st = os.stat(weights)
        key += (
            "-"
            + hashlib.sha256(
                f"{os.path.abspath(weights)}:{st.st_size}:{st.st_mtime_ns}".encode()
            ).hexdigest()[:12]
        )
    path = ws.cache_dir / f"backbone-{key}-{HEAD_POOLING}.onnx"
    if path.is_file():
        return path
    from torch import nn

    from imagesieve.models import create_backbone
    from imagesieve.models._export import export_onnx, make_model

    ws.cache_dir.mkdir(parents=True, exist_ok=True)
    model = make_model(
        create_backbone(backbone, weights=weights), nn.Identity(), pooling=HEAD_POOLING
    )
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    export_onnx(model, tmp, output_names=("embedding", "features"))
    os.replace(tmp, path)
    return path


def extract_features(
    onnx_path: Path,
    backbone: str,
    paths: Sequence[Path],
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> tuple[np.ndarray, list[ImageLoadError | None]]:
    """(n, 2d) float32 pooled features of ``paths`` (head input); rows of failed images are zero.

    Returns the features and, per path, the load error or None.
    """
    engine = ScoringEngine(onnx_path, get_backbone_spec(backbone).config, batch_size=batch_size)
    feats = np.zeros((len(paths), engine.session.get_outputs()[1].shape[1]), np.float32)
    errors: list[ImageLoadError | None] = []
    i = 0
    for batch in engine.run(paths):
        for r in batch:
            if r.outputs is not None:
                feats[i] = r.outputs["features"]
            errors.append(r.error)
            i += 1
        if progress:
            progress("embedding", i, len(paths))
    return feats, errors
