"""Safe image decoding: any file, bytes or upload -> an RGB PIL image sized for the model."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DecodedImage",
    "ImageLoadError",
    "ImageSource",
    "fit_shorter_side",
    "load_image",
    "read_image_bytes",
    "source_name",
]

#: Largest accepted file, in bytes (a 12 MP JPEG is ~5 MB; a 16-bit TIFF scan can be ~100 MB).
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
#: Largest accepted image, in pixels (before any draft reduction); guards decompression bombs.
DEFAULT_MAX_PIXELS = 150_000_000

ImageSource = str | os.PathLike | bytes | BinaryIO


class ImageLoadError(ValueError):
    """An input could not be turned into an image; ``kind`` is a short machine-readable tag."""

    def __init__(self, source: str, kind: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image ready for preprocessing, with facts about the original file."""

    source: str
    image: Image.Image
    width: int
    height: int
    sha256: str


def source_name(source: ImageSource) -> str:
    """A printable name for a source: the path, the upload's file name, or ``<bytes>``."""
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    name = getattr(source, "name", None)
    return str(name) if name else "<bytes>"


def read_image_bytes(source: ImageSource, name: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The raw bytes of a source, refusing missing, unreadable, empty and oversized inputs."""
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageLoadError(name, "missing", "file not found") from None
        except OSError as e:
            raise ImageLoadError(name, "unreadable", f"cannot read file ({e.strerror})") from None
        if path.is_dir():
            raise ImageLoadError(name, "unreadable", "is a directory, not an image file")
        if size > max_bytes:
            raise ImageLoadError(
                name, "too_large", f"file is {size:,} bytes, over the {max_bytes:,}-byte limit"
            )
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageLoadError(name, "unreadable", f"cannot read file ({e.strerror})") from None
    else:
        data = source.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageLoadError(name, "too_large", f"file is over the {max_bytes:,}-byte limit")
    if not data:
        raise ImageLoadError(name, "empty", "file is empty")
    return data


def fit_shorter_side(image: Image.Image, side: int) -> Image.Image:
    """Resize (bilinear, antialiased) so the shorter side is ``side``; a no-op when it already is."""
    w, h = image.size
    scale = side / min(w, h)
    size = (max(side, round(w * scale)), max(side, round(h * scale)))
    if size == (w, h):
        return image
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited onto white."""
    mode = im.mode
    if mode in ("L", "RGB") and "transparency" in im.info:
        im = im.convert("RGBA")  # PNG tRNS colour key
    elif mode == "RGB":
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im)
        if mode == "F":
            a = a * 255.0 if float(np.nanmax(a, initial=0.0)) <= 1.0 else a
        elif mode.startswith("I;16") or float(a.max(initial=0)) > 255:
            a = a / 257.0  # full 16-bit range -> 8 bits
        a = np.clip(np.nan_to_num(a), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    elif mode == "PA":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(
    source: ImageSource,
    *,
    min_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    name: str | None = None,
    sha256: str | None = None,
) -> DecodedImage:
    """Decode a path, bytes or file object into an RGB image, safely.

    EXIF orientation is applied, every PIL mode (L, LA, P, RGBA, CMYK, I;16, F, ...) becomes
    RGB, animated files give their first frame, and JPEGs are decoded with ``draft`` to the
    smallest scale whose shorter side still covers ``min_side``, then (any format) resized so
    the shorter side is ``min_side``, before colour conversion to save work. Oversized, truncated, empty
    and non-image inputs raise :class:`ImageLoadError` naming the source and the reason.
    ``sha256`` is the bytes' digest when the caller already computed it.
    """
    name = name or source_name(source)
    data = read_image_bytes(source, name, max_bytes)
    digest = sha256 or hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            # max_pixels below is the limit; PIL's warning (at ~89 MP) would undercut it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    name,
                    "too_large",
                    f"image is {width}x{height} = {width * height:,} pixels, "
                    f"over the {max_pixels:,}-pixel limit",
                )
            if getattr(im, "is_animated", False):
                im.seek(0)
            if im.format == "JPEG" and min_side:
                # draft keeps both sides >= the request, so the shorter side covers min_side.
                scale = min_side / min(width, height)
                if scale < 1:
                    im.draft(im.mode, (max(1, round(width * scale)), max(1, round(height * scale))))
            im.load()
            orientation = im.getexif().get(0x0112, 1)
            if orientation in (2, 3, 4, 5, 6, 7, 8):  # exif_transpose copies even when upright
                im = ImageOps.exif_transpose(im)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            if min_side and im.mode in ("L", "RGB") and "transparency" not in im.info:
                im = fit_shorter_side(im, min_side)
            im = _to_rgb(im)
            if min_side:
                im = fit_shorter_side(im, min_side)  # modes not resized above; no-op otherwise
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(name, "too_large", f"decompression bomb refused ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(name, "not_image", "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        text = str(e) or type(e).__name__
        kind = "truncated" if "truncated" in text or isinstance(e, EOFError) else "corrupt"
        raise ImageLoadError(name, kind, f"{kind} image data ({text})") from None
    return DecodedImage(source=name, image=im, width=width, height=height, sha256=digest)
