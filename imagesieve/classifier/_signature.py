"""A compact pixel-level signature of an image, to confirm near-duplicates the embedding proposes.

The signature is the image's colour thumbnail: its SIDE x SIDE x 3 box averages (every pixel
counted once), centred and scaled by their own mean and standard deviation (so a brightness or
contrast change cancels), quantised to int8: SIGNATURE_BYTES bytes a row. Two signatures compare
by correlation (``signature_similarity``, 1 for the same picture). A JPEG re-encode, a resize
or a brightness change keeps it near 1; a crop moves it (the embedding finds those); different
pictures the embedding confuses (same layout, other details) mostly fall below. Computed from
the model's 224 x 224 crop in the decode workers (~0.1 ms); pure numpy and PIL.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["SIGNATURE_BYTES", "SIGNATURE_SIDE", "image_signature", "signature_similarity"]

#: Thumbnail side, in cells.
SIGNATURE_SIDE = 8
#: Bytes of one signature: SIDE x SIDE cells x 3 colours, int8.
SIGNATURE_BYTES = SIGNATURE_SIDE * SIGNATURE_SIDE * 3
#: Quantisation: standardised values times this, rounded and clipped to int8 (+-3.97 sd).
_SCALE = 32.0


def image_signature(image: Image.Image) -> np.ndarray:
    """The (SIGNATURE_BYTES,) int8 signature of an image (any mode, best the model's square crop).

    All zeros for a flat image (nothing to compare: it matches nothing).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    s = SIGNATURE_SIDE
    if w % s == 0 and h % s == 0:
        small = image.reduce((w // s, h // s))  # exact box average, the fast path (224 = 8 x 28)
    else:
        small = image.resize((s, s), Image.Resampling.BOX)
    x = np.asarray(small, np.float32).ravel()
    x -= x.mean()
    sd = float(np.sqrt(np.mean(x * x)))
    if sd < 0.5:  # under half a grey level: flat
        return np.zeros(SIGNATURE_BYTES, np.int8)
    return np.clip(np.rint(x * (_SCALE / sd)), -127, 127).astype(np.int8)


def signature_similarity(a: np.ndarray, b: np.ndarray, flat: float = 0.0) -> np.ndarray:
    """Correlation of signatures ``a`` (..., SIGNATURE_BYTES) and ``b`` (broadcast): float32 in [-1, 1].

    ``flat`` (0 by default: it matches nothing) when either is all zeros (a flat image); a
    ``DuplicateRule`` check passes NaN, so the embedding alone decides such a pair.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape[-1] != SIGNATURE_BYTES or b.shape[-1] != SIGNATURE_BYTES:
        raise ValueError(
            f"signatures have {SIGNATURE_BYTES} values (image_signature), got shapes "
            f"{a.shape} and {b.shape}"
        )
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    dot = np.einsum("...i,...i->...", a, b)
    norms = np.sqrt(np.einsum("...i,...i->...", a, a) * np.einsum("...i,...i->...", b, b))
    return np.where(norms > 0, dot / np.maximum(norms, 1e-12), flat).astype(np.float32)
