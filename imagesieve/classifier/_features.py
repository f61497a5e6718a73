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
from imagesieve.models import BackboneConfig

__all__ = ["HEAD_POOLING", "backbone_onnx", "extract_features"]

#: Pooling of trained heads: average and max pooled features concatenated.
HEAD_POOLING = "avgmax"
#: Names the backbones' ``ood_taps`` in the cached export's file name (``-ood`` was the
#: 192-channel stage alone): a change of taps must not reuse an older export.
OOD_LAYOUT = "ood2"


def backbone_onnx(ws: Workspace, backbone: str, weights: str | None = None) -> Path:
    """ONNX of the pretrained backbone alone: embedding, avg + max pooled features, ood features.

    ``embedding``, ``features`` and, for a backbone with ``ood_taps``, ``ood_features``
    (what the far-from-training distance reads).

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
    path = ws.cache_dir / f"backbone-{key}-{HEAD_POOLING}-{OOD_LAYOUT}.onnx"
    if path.is_file():
        return path
    from torch import nn

    from imagesieve.models import OOD_FEATURES, create_backbone
    from imagesieve.models.export import export_onnx, make_model

    ws.cache_dir.mkdir(parents=True, exist_ok=True)
    net = create_backbone(backbone, weights=weights)
    model = make_model(net, nn.Identity(), pooling=HEAD_POOLING)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    names = ("embedding", "features") + ((OOD_FEATURES,) if net.ood_taps else ())
    export_onnx(model, tmp, output_names=names)
    os.replace(tmp, path)
    return path


def extract_features(
    onnx_path: Path,
    config: BackboneConfig,
    paths: Sequence[Path],
    outputs: Sequence[str] = ("features", "embedding"),
    *,
    batch_size: int = 32,
    progress: Progress | None = None,
    qualities: list | None = None,
    signatures: list | None = None,
) -> tuple[dict[str, np.ndarray], list[ImageLoadError | None]]:
    """Run an ONNX model over ``paths`` and keep the named outputs, one (n, dim) array each.

    Returns the arrays and, per path, the load error or None; rows of failed images are zero.
    An output the model does not have is left out of the arrays.
    Phase 1 reads the backbone's ``features`` (the head's input) and ``embedding``. A
    ``qualities`` list gets each image's ``QualityMetrics`` and a ``signatures`` list its pixel
    signature (None when it failed).
    """
    engine = ScoringEngine(
        onnx_path, config, batch_size=batch_size, signature=signatures is not None
    )
    dims = {o.name: o.shape[1] for o in engine.session.get_outputs() if o.name in outputs}
    arrays = {k: np.zeros((len(paths), dims[k]), np.float32) for k in outputs if k in dims}
    errors: list[ImageLoadError | None] = []
    i = 0
    for batch in engine.run(paths):
        for r in batch:
            if r.outputs is not None:
                for k, a in arrays.items():
                    a[i] = r.outputs[k]
            errors.append(r.error)
            if qualities is not None:
                qualities.append(r.quality)
            if signatures is not None:
                signatures.append(r.signature)
            i += 1
        if progress:
            progress("embedding", i, len(paths))
    return arrays, errors
