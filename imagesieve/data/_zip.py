"""Zip members read safely: names, sizes and encryption checked first, inflation bounded."""

from __future__ import annotations

import zipfile
import zlib
from pathlib import PurePosixPath

from imagesieve.data._decode import DEFAULT_MAX_BYTES, ImageLoadError

__all__ = ["MAX_MEMBER_BYTES", "member_error", "read_zip_member"]

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
