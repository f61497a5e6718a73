"""Torch modules: a backbone giving pooled features, and the model giving embedding + logits."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["POOLINGS", "Backbone", "PixelNormalize", "SieveModel"]


class Backbone(nn.Module):
    """A pretrained network cut before its classifier: image batch -> (n, d) pooled features.

    ``body`` maps images to the last feature map, ``imagenet_head`` is the original ImageNet
    classifier and ``tail`` names the last block(s), the part fine-tuning unfreezes.
    ``ood_taps`` name the blocks of ``body`` whose average-pooled outputs (each unit length,
    concatenated) the far-from-training score reads (EfficientNet-Lite0: the 112- and
    192-channel stages, ``bench/bench_layers.py``); none: the score reads the embedding.
    """

    def __init__(
        self,
        name: str,
        body: nn.Module,
        imagenet_head: nn.Linear,
        tail: list[str],
        ood_taps: tuple[str, ...] = (),
    ):
        super().__init__()
        self.name = name
        self.body = body
        self.imagenet_head = imagenet_head
        self.tail = tail
        self.ood_taps = tuple(ood_taps)

    @property
    def embed_dim(self) -> int:
        """Size of the pooled feature vector."""
        return self.imagenet_head.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, s, s) float32 -> (n, d) pooled features."""
        return torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1)

    def maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(n, 3, s, s) normalised images -> the last feature map and ``ood_taps``' maps."""
        grabbed: dict[str, torch.Tensor] = {}
        hooks = [
            self.body.get_submodule(tap).register_forward_hook(
                lambda _m, _i, out, tap=tap: grabbed.__setitem__(tap, out)
            )
            for tap in self.ood_taps
        ]
        try:
            fmap = self.body(x)
        finally:
            for hook in hooks:
                hook.remove()
        return fmap, [grabbed[tap] for tap in self.ood_taps]

    def tail_modules(self) -> list[nn.Module]:
        """The modules fine-tuning trains (the last block and what follows it)."""
        return [self.body.get_submodule(n) for n in self.tail]


class PixelNormalize(nn.Module):
    """(n, s, s, 3) RGB pixels (uint8 or float, 0-255) -> (n, 3, s, s) normalised float32."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]):
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "inv_std",
            1.0 / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last pixels to normalised channels-first floats."""
        return (x.permute(0, 3, 1, 2).float() - self.mean) * self.inv_std


POOLINGS = ("avg", "avgmax")


class SieveModel(nn.Module):
    """Pixels -> backbone -> linear head: one forward pass gives the embedding and the logits.

    The embedding is the L2-normalised average-pooled feature map. The head sees the raw
    average-pooled features (``pooling="avg"``, e.g. the ImageNet head) or those concatenated
    with the max-pooled ones (``"avgmax"``, which keeps small local defects visible).
    """

    def __init__(self, backbone: Backbone, head: nn.Module, mean, std, pooling: str = "avg"):
        super().__init__()
        assert pooling in POOLINGS, pooling
        self.normalize = PixelNormalize(mean, std)
        self.backbone = backbone
        self.head = head
        self.pooling = pooling

    @property
    def head_dim(self) -> int:
        """Size of the head's input vector."""
        return self.backbone.embed_dim * (2 if self.pooling == "avgmax" else 1)

    def outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output a version's graph can give, by its ONNX name.

        ``embedding`` and ``logits`` (``forward``'s); the rest of the head's input for
        ``avgmax`` (``avg_norm``: the average-pooled features' length, ``max_pooled``); and with
        ``ood_taps``, ``ood_features``: those blocks' average-pooled outputs, each unit length,
        concatenated.
        """
        fmap, taps = self.backbone.maps(self.normalize(x))
        avg = fmap.mean(dim=(2, 3))
        out = {"embedding": F.normalize(avg, dim=1)}
        if self.pooling == "avgmax":
            top = fmap.amax(dim=(2, 3))
            out |= {"avg_norm": avg.norm(dim=1), "max_pooled": top}
            out["logits"] = self.head(torch.cat([avg, top], dim=1))
        else:
            out["logits"] = self.head(avg)
        if taps:
            out["ood_features"] = torch.cat(
                [F.normalize(t.mean(dim=(2, 3)), dim=1) for t in taps], 1
            )
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, s, s, 3) pixels -> ((n, d) unit-norm embedding, (n, c) logits)."""
        out = self.outputs(x)
        return out["embedding"], out["logits"]
