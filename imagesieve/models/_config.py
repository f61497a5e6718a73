"""Per-backbone preprocessing: the one place that knows input size and normalisation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from imagesieve.data import fit_shorter_side

__all__ = ["BackboneConfig"]


@dataclass(frozen=True)
class BackboneConfig:
    """Input size, normalisation (in 0-255 pixel units) and embedding size of a backbone.

    Preprocessing resizes the shorter side to ``input_size / crop_pct`` and centre-crops a
    square of ``input_size``; ``crop_pct=1.0`` keeps all of a square image. Normalisation with
    ``mean``/``std`` happens inside the model graph, so model inputs are plain RGB pixels.
    """

    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    crop_pct: float = 1.0

    @property
    def resize_side(self) -> int:
        """Shorter-side length before the centre crop; also the decode target size."""
        return int(round(self.input_size / self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in a model version's ``meta.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        """Resize the shorter side and centre-crop to the model's square input."""
        image = fit_shorter_side(image, self.resize_side)
        w, h = image.size
        s = self.input_size
        if (w, h) != (s, s):
            left, top = (w - s) // 2, (h - s) // 2
            image = image.crop((left, top, left + s, top + s))
        return image

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> (input_size, input_size, 3) uint8 model input."""
        return np.asarray(self.resize_and_crop(image), dtype=np.uint8)
