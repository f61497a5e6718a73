"""Safe image decoding: any file, bytes or upload -> an RGB PIL image sized for the model."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from imagesieve._errors import SieveError

__all__ = [
    "MAX_MEMBER_BYTES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DECODE_BYTES",
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
#: Most memory one decode may need for its pixels, checked from the header before anything is
#: allocated (after a JPEG's draft reduction): 64 MP at 4 bytes a pixel. A 288-byte BLP that
#: declares 83,886,338 pixels allocated ~640 MB before failing without it.
DEFAULT_MAX_DECODE_BYTES = 256 * 2**20
#: Bytes per pixel Pillow's decoded image takes, by mode (multi-band 8-bit modes are stored as
#: 4 bytes a pixel); modes not listed count 4.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
#: Bytes read at a time from a file.
_READ_CHUNK = 1 << 20

ImageSource = str | os.PathLike | bytes | BinaryIO


class ImageLoadError(SieveError, ValueError):
    """An input could not be turned into an image; ``kind`` is a short machine-readable tag.

    (The failure's tag, as stored; the error table reads it as too_large or bad_image.)
    """

    def __init__(self, source: str, kind: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.kind = kind
        self.reason = reason

    def __reduce__(self) -> tuple:
        """Pickle by its three fields (scoring on Ray ships items that failed already)."""
        return type(self), (self.source, self.kind, self.reason)

    def detached(self) -> ImageLoadError:
        """This error without its traceback, cause and context.

        They would keep the failed decode's frames, and so its buffers, alive for as long as the
        error is kept.
        """
        self.__traceback__ = None
        self.__context__ = None
        self.__cause__ = None
        return self


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


def _read_file(path: str | os.PathLike, name: str, max_bytes: int) -> bytes:
    """A regular file's bytes, at most ``max_bytes`` + 1 of them whatever its size says."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageLoadError(name, "missing", "file not found") from None
    except IsADirectoryError:
        raise ImageLoadError(name, "unreadable", "is a directory, not an image file") from None
    except OSError as e:
        raise ImageLoadError(name, "unreadable", f"cannot read file ({e.strerror})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageLoadError(name, "unreadable", "is a directory, not an image file")
        if not stat.S_ISREG(info.st_mode):
            raise ImageLoadError(name, "unreadable", "not a regular file (device, pipe or socket)")
        if info.st_size > max_bytes:
            raise ImageLoadError(
                name,
                "too_large",
                f"file is {info.st_size:,} bytes, over the {max_bytes:,}-byte limit",
            )
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = os.read(fd, min(_READ_CHUNK, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise ImageLoadError(name, "unreadable", f"cannot read file ({e.strerror})") from None
    finally:
        os.close(fd)


def read_image_bytes(source: ImageSource, name: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The raw bytes of a source, refusing missing, unreadable, empty and oversized inputs.

    Every source is read through one bounded reader: at most ``max_bytes`` + 1 bytes, whatever
    a file's size says; only regular files are read (not devices, pipes or sockets).
    """
    if isinstance(source, bytes):
        data = source
    elif isinstance(source, str | os.PathLike):
        data = _read_file(source, name, max_bytes)
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
    if (mode == "P" and "transparency" in im.info) or mode == "PA":
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
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    name: str | None = None,
    sha256: str | None = None,
) -> DecodedImage:
    """Decode a path, bytes or file object into an RGB image, safely.

    EXIF orientation is applied, every PIL mode (L, LA, P, RGBA, CMYK, I;16, F, ...) becomes
    RGB, animated files give their first frame, and JPEGs are decoded with ``draft`` to the
    smallest scale whose shorter side still covers ``min_side``, then (any format) resized so
    the shorter side is ``min_side``, before colour conversion to save work. Oversized, truncated, empty
    and non-image inputs raise :class:`ImageLoadError` naming the source and the reason; so do
    images whose pixels would need more than ``max_decode_bytes``, before they are allocated.
    ``sha256`` is the bytes' digest when the caller already computed it.
    """
    name = name or source_name(source)
    data = read_image_bytes(source, name, max_bytes)
    digest = sha256 or hashlib.sha256(data).hexdigest()
    image, width, height = _decode(data, name, min_side, max_pixels, max_decode_bytes)
    return DecodedImage(source=name, image=image, width=width, height=height, sha256=digest)


def _decode_bytes(width: int, height: int, mode: str) -> int:
    """Bytes Pillow's decoded image of that size and mode will take.

    Pillow keeps a pointer per row besides the pixels: a 1 x 80,000,000 greyscale image takes
    640 MB of pointers for 80 MB of pixels.
    """
    return height * (width * _PIXEL_BYTES.get(mode, 4) + 8)


def _icon_bytes(data: bytes) -> int:
    """The most bytes any image inside an ICO/CUR file declares it needs, from its directory.

    Pillow's ICO reader decodes the first image while opening the file, before its size can be
    checked, so the sizes are read here first: each entry is a PNG (IHDR) or a BMP (DIB header).
    """
    count = struct.unpack_from("<H", data, 4)[0] if len(data) >= 6 else 0
    most = 0
    for i in range(count):
        entry = 6 + 16 * i
        if entry + 16 > len(data):
            break
        offset = struct.unpack_from("<I", data, entry + 12)[0]
        head = data[offset : offset + 24]
        if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 24:
            w, h = struct.unpack(">II", head[16:24])
        elif len(head) >= 12:
            w, h = struct.unpack("<ii", head[4:12])
            w, h = abs(w), abs(h) // 2  # a BMP icon's height counts its mask too
        else:
            continue
        most = max(most, _decode_bytes(w, h, "RGBA"))
    return most


def _decode(
    data: bytes, name: str, min_side: int | None, max_pixels: int, max_decode_bytes: int
) -> tuple[Image.Image, int, int]:
    """``load_image``'s decoding: (RGB image, original width, height), or ImageLoadError.

    The error is built after the failed decode's frame is gone, so nothing it allocated
    survives in a traceback.
    """
    failure: ImageLoadError | None = None
    im = None
    try:
        with warnings.catch_warnings():
            # max_pixels below is the limit; PIL's warning (at ~89 MP) would undercut it. Its
            # other warnings are about malformed files ("not the expected size"), which are
            # refused or decoded as they are: noise on a user's terminal either way.
            warnings.simplefilter("ignore")
            if data[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):  # ICO, CUR
                need = _icon_bytes(data)
                if need > max_decode_bytes:
                    raise ImageLoadError(
                        name,
                        "too_large",
                        f"icon declares an image that needs {need / 2**20:,.0f} MB to decode, "
                        f"over the {max_decode_bytes / 2**20:,.0f} MB limit",
                    )
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    name,
                    "too_large",
                    f"image is {width}x{height} = {width * height:,} pixels, "
                    f"over the {max_pixels:,}-pixel limit",
                )
            # Image.open leaves an animated or layered file at its first frame (a PSD's is 1,
            # so seek(0) would refuse a valid layered file).
            if im.format == "JPEG" and min_side:
                # draft keeps both sides >= the request, so the shorter side covers min_side.
                scale = min_side / min(width, height)
                if scale < 1:
                    im.draft(im.mode, (max(1, round(width * scale)), max(1, round(height * scale))))
            need = _decode_bytes(*im.size, im.mode)
            if need > max_decode_bytes:
                raise ImageLoadError(
                    name,
                    "too_large",
                    f"image is {width}x{height} {im.mode}: decoding needs {need / 2**20:,.0f} MB, "
                    f"over the {max_decode_bytes / 2**20:,.0f} MB limit",
                )
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
    except ImageLoadError as e:
        failure = e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        failure = ImageLoadError(name, "too_large", f"decompression bomb refused ({e})")
    except Image.UnidentifiedImageError:
        failure = ImageLoadError(name, "not_image", "not a recognised image format")
    except MemoryError:
        failure = ImageLoadError(name, "too_large", "not enough memory to decode the image")
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        text = str(e) or type(e).__name__
        kind = "truncated" if "truncated" in text or isinstance(e, EOFError) else "corrupt"
        failure = ImageLoadError(name, kind, f"{kind} image data ({text})")
    if failure is not None:
        if im is not None:
            im.close()  # frees the decoder's buffers now, not when the error is collected
        raise failure.detached()
    return im, width, height


#: Largest zip member read into memory, in bytes (declared or inflated); guards zip bombs.
MAX_MEMBER_BYTES = DEFAULT_MAX_BYTES


def member_error(
    info: zipfile.ZipInfo, name: str, limit: int | None = None
) -> ImageLoadError | None:
    """Why a member cannot be read, from the archive's directory alone (None: try it)."""
    parts = PurePosixPath(info.filename.replace("\\", "/")).parts
    if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        return ImageLoadError(name, "unreadable", "unsafe member name (absolute or with ..)")
    limit = MAX_MEMBER_BYTES if limit is None else limit
    if info.file_size > limit:
        reason = f"zip member is {info.file_size:,} bytes, over the {limit:,}-byte limit"
        return ImageLoadError(name, "too_large", reason)
    if info.flag_bits & 0x1:
        return ImageLoadError(name, "unreadable", "zip member is encrypted (password protected)")
    return None


def read_zip_member(
    zf: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    name: str,
    cap: int | None = None,
    limit: int | None = None,
) -> bytes:
    """A zip member's bytes, refusing members that declare or inflate past ``limit`` bytes.

    At most ``cap`` bytes are inflated (default ``limit`` + 1; ``limit`` defaults to
    MAX_MEMBER_BYTES): a longer result means the member went past the caller's limit.
    """
    limit = MAX_MEMBER_BYTES if limit is None else limit
    error = member_error(info, name, limit)
    if error is not None:
        raise error
    try:
        with zf.open(info) as f:
            data = f.read(min(cap if cap is not None else limit + 1, limit + 1))
    except NotImplementedError as e:
        raise ImageLoadError(name, "unreadable", f"unsupported zip member ({e})") from None
    except RuntimeError as e:  # encryption zipfile noticed on its own
        raise ImageLoadError(name, "unreadable", f"unreadable zip member ({e})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise ImageLoadError(name, "corrupt", f"corrupt zip member ({e})") from None
    if len(data) > limit:
        raise ImageLoadError(
            name, "too_large", f"zip member inflates past the {limit:,}-byte limit"
        )
    return data
