"""The backbone registry: a name -> constructor, preprocessing config and weights source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagesieve._errors import SieveError, UserError
from imagesieve.models._config import BackboneConfig

__all__ = [
    "BackboneSpec",
    "MissingWeightsError",
    "create_backbone",
    "get_backbone_spec",
    "list_backbones",
    "register_backbone",
]


class MissingWeightsError(SieveError, FileNotFoundError):
    """Pretrained weights are not on this machine; the message says which file to put where."""

    kind = "missing_weights"


@dataclass(frozen=True)
class BackboneSpec:
    """What the registry knows about one backbone without importing torch."""

    config: BackboneConfig
    build: Callable[..., Any]
    weights_source: str
    description: str


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(config: BackboneConfig, weights_source: str, description: str):
    """Decorator registering ``build(weights: str | None) -> Backbone`` under ``config.name``."""

    def deco(build: Callable[..., Any]) -> Callable[..., Any]:
        assert config.name not in _REGISTRY, f"backbone {config.name} registered twice"
        _REGISTRY[config.name] = BackboneSpec(config, build, weights_source, description)
        return build

    return deco


def list_backbones() -> list[str]:
    """Names of all registered backbones, default first."""
    _ensure_registered()
    return list(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; unknown names raise ``UserError`` listing the known."""
    _ensure_registered()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unknown backbone {name!r}; known backbones: {', '.join(_REGISTRY)}"
        ) from None


def _ensure_registered() -> None:
    # The definitions module registers on import; it imports torch only inside builders.
    from imagesieve.models import _backbones  # noqa: F401


def create_backbone(name: str, weights: str | None = None, pretrained: bool = True):
    """Build a registered backbone (torch): ImageNet weights unless ``pretrained=False``.

    ``weights`` names a local state-dict file to use instead of the default source; missing
    weights raise :class:`MissingWeightsError` saying which file to put where.
    """
    return get_backbone_spec(name).build(weights=weights, pretrained=pretrained)
