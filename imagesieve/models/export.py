"""Torch side of a model version: checkpoint save/load and the ONNX export."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imagesieve._workspace import Workspace
from imagesieve.models import OOD_FEATURES
from imagesieve.models._registry import create_backbone, get_backbone_spec
from imagesieve.models._torch import Backbone, SieveModel
from imagesieve.models._version import (
    ModelVersion,
    discard_build_dir,
    get_version,
    new_build_dir,
    write_version,
)

__all__ = [
    "HEAD_INPUTS",
    "export_onnx",
    "imagenet_version",
    "load_checkpoint",
    "make_model",
    "model_outputs",
    "save_model_files",
]

ONNX_INPUT = "image"
ONNX_OUTPUTS = ("embedding", "logits")
#: What a version whose head reads average- and max-pooled features also outputs: the rest of
#: the head's input beside the embedding (the average's length, the max-pooled vector). The
#: store keeps them, so a head-only retrain re-decides stored images without decoding them.
HEAD_INPUTS = ("avg_norm", "max_pooled")


class _Graph(nn.Module):
    """The graph exported: the named outputs of ``SieveModel.outputs`` in order.

    ``features`` is another name for the logits, for a backbone exported with an identity head.
    """

    def __init__(self, model: SieveModel, names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.names = tuple("logits" if n == "features" else n for n in names)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.outputs(x)
        return tuple(out[n] for n in self.names)


def model_outputs(model: SieveModel) -> tuple[str, ...]:
    """The outputs a version's ``model.onnx`` has, in order.

    ONNX_OUTPUTS, then HEAD_INPUTS for an ``avgmax`` linear head, then OOD_FEATURES when the
    backbone has ``ood_taps``.
    """
    names = ONNX_OUTPUTS
    if model.pooling == "avgmax" and isinstance(model.head, nn.Linear):
        names += HEAD_INPUTS
    if model.backbone.ood_taps:
        names += (OOD_FEATURES,)
    return names


def make_model(backbone: Backbone, head: nn.Module, pooling: str = "avg") -> SieveModel:
    """Wrap a backbone and a head with the backbone's own pixel normalisation."""
    config = get_backbone_spec(backbone.name).config
    return SieveModel(backbone, head, config.mean, config.std, pooling)


def export_onnx(model: SieveModel, path: Path, output_names=ONNX_OUTPUTS) -> None:
    """Export to ONNX: input ``image`` (n, s, s, 3) uint8 RGB, dynamic batch axis.

    Uses the TorchScript exporter: seconds, quiet, and ORT fuses the graph fully.
    """
    model = model.eval()
    size = get_backbone_spec(model.backbone.name).config.input_size
    dummy = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    axes = {ONNX_INPUT: {0: "n"}, **{o: {0: "n"} for o in output_names}}
    graph = _Graph(model, tuple(output_names)).eval()  # export restores its mode after
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (dummy,),
            str(path),
            input_names=[ONNX_INPUT],
            output_names=list(output_names),
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


def save_model_files(model: SieveModel, classes: list[str], build_dir: Path) -> None:
    """Write ``model.pt`` and ``model.onnx`` for a version being built.

    An ``avgmax`` model's graph also outputs HEAD_INPUTS, and its linear head goes to
    ``head.npz`` (weight, bias): what re-deciding stored images without decoding needs.
    The graph's outputs are ``model_outputs``'.
    """
    torch.save(
        {
            "format": 1,
            "backbone": model.backbone.name,
            "pooling": model.pooling,
            "classes": list(classes),
            "state_dict": model.state_dict(),
        },
        build_dir / "model.pt",
    )
    if model.pooling == "avgmax" and isinstance(model.head, nn.Linear):
        np.savez(
            build_dir / "head.npz",
            weight=model.head.weight.detach().numpy(),
            bias=model.head.bias.detach().numpy(),
        )
    export_onnx(model, build_dir / "model.onnx", model_outputs(model))


def load_checkpoint(path: Path) -> tuple[SieveModel, list[str]]:
    """Rebuild the torch model of a version from its ``model.pt`` (no pretrained weights needed)."""
    ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    backbone = create_backbone(ckpt["backbone"], pretrained=False)
    pooling = ckpt.get("pooling", "avg")
    model = make_model(backbone, nn.Linear(1, 1), pooling)
    model.head = nn.Linear(model.head_dim, len(ckpt["classes"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), list(ckpt["classes"])


def imagenet_classes() -> list[str]:
    """The 1,000 ImageNet class names in logit order (shipped with torchvision, no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def imagenet_version(
    ws: Workspace, backbone: str = "efficientnet_lite0", weights: str | None = None
) -> ModelVersion:
    """The no-training baseline: the backbone with its own ImageNet head, as a version.

    Created once as ``imagenet-<backbone>`` and reused; never activated automatically.
    """
    name = f"imagenet-{backbone}"
    if (ws.models_dir / name / "meta.json").is_file():
        return get_version(ws, name)
    net = create_backbone(backbone, weights=weights)
    model = make_model(net, net.imagenet_head)
    classes = imagenet_classes()
    build = new_build_dir(ws)
    try:
        save_model_files(model, classes, build)
        config = get_backbone_spec(backbone).config
        meta = {
            "kind": "imagenet",
            "backbone": backbone,
            "classes": classes,
            "preprocessing": config.to_dict(),
            "thresholds": {"confidence": 0.5},
            "weights": weights or get_backbone_spec(backbone).weights_source,
        }
        return write_version(ws, build, meta, name=name)
    except BaseException:
        discard_build_dir(build)
        raise
