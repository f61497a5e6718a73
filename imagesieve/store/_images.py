"""Kept images: content-addressed copies of scored images in the workspace.

UNKNOWNs fetched from URLs or read from archives can then still be reviewed, clustered,
exported and promoted later.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import threading
import time
import zipfile
from pathlib import Path

from imagesieve._workspace import Workspace
from imagesieve.data import ImageLoadError, read_zip_member

__all__ = [
    "KEEP_POLICIES",
    "ZIP_MEMBER",
    "image_source",
    "keep_image",
    "kept_path",
    "original_source",
    "remove_partial_images",
    "sync_folder",
]

log = logging.getLogger(__name__)

#: Which scored images keep a copy in the workspace.
KEEP_POLICIES = ("unknown", "all", "none")
#: A zip member named as ``archive.zip:path/in/zip``.
ZIP_MEMBER = re.compile(r"^(?P<zip>.+?\.zip):(?P<member>.+)$", re.IGNORECASE)
#: How ``keep_image`` names its temporary files (``.<sha256>.<pid>.<thread>.tmp``).
TMP_SUFFIX = ".tmp"
#: Age after which a temporary file of this very process counts as left behind.
STALE_SECONDS = 3600


def kept_path(ws: Workspace, sha256: str) -> Path:
    """Where the copy of this content lives (whether or not it exists)."""
    return ws.images_dir / sha256[:2] / sha256


def keep_image(ws: Workspace, sha256: str, source: str | bytes) -> Path:
    """Copy the bytes (or file) of an image into the workspace once; returns its path.

    Written whole and synced to a temporary file, then renamed, so the content address never
    holds a partial copy; a copy found there with the wrong size or hash is replaced. Raises
    OSError (nothing left behind) when the copy cannot be written whole, e.g. on a full disk.
    Plain ``os`` calls, few of them: each releases and retakes the GIL, which costs a busy
    server far more than the write (pathlib's version: 1.25 ms of CPU per upload next to a
    Python thread, this one 0.56 ms before the sync was added).
    """
    path = os.fspath(kept_path(ws, sha256))
    folder = os.path.dirname(path)
    if _holds(path, sha256, len(source) if isinstance(source, bytes) else None):
        return Path(path)
    tmp = os.path.join(folder, f".{sha256}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
    try:
        if isinstance(source, bytes):
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            try:
                fd = os.open(tmp, flags, 0o644)
            except FileNotFoundError:
                os.makedirs(folder, exist_ok=True)
                fd = os.open(tmp, flags, 0o644)
            try:
                _write_all(fd, source, tmp)
                _sync_whole(fd, len(source), tmp)
            finally:
                os.close(fd)
        else:
            size = os.stat(source).st_size
            os.makedirs(folder, exist_ok=True)
            shutil.copyfile(source, tmp)
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _sync_whole(fd, size, tmp)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_folder(folder)
    return Path(path)


def remove_partial_images(ws: Workspace) -> int:
    """Delete temporary files that interrupted ``keep_image`` calls left; returns how many.

    Files of this process younger than STALE_SECONDS may still be being written, and stay.
    """
    removed = 0
    try:
        folders = [e.path for e in os.scandir(ws.images_dir) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return 0
    own = str(os.getpid())
    now = time.time()
    for folder in folders:
        with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
            for e in entries:
                if not (e.name.startswith(".") and e.name.endswith(TMP_SUFFIX)):
                    continue
                parts = e.name.split(".")  # "", sha256, pid, thread, "tmp"
                with contextlib.suppress(FileNotFoundError):
                    mine = len(parts) == 5 and parts[2] == own
                    if mine and now - e.stat().st_mtime < STALE_SECONDS:
                        continue
                    os.unlink(e.path)
                    removed += 1
    if removed:
        log.info("removed %d partial image copies left in %s", removed, ws.images_dir)
    return removed


def _holds(path: str, sha256: str, size: int | None) -> bool:
    """True when ``path`` holds bytes hashing to ``sha256`` (``size`` of them, when known)."""
    try:
        if size is not None and os.stat(path).st_size != size:
            log.warning("%s: a kept copy of the wrong size; it is replaced", path)
            return False
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return False
    if digest != sha256:
        log.warning("%s: a kept copy whose content is not its SHA-256; it is replaced", path)
        return False
    return True


def _write_all(fd: int, data: bytes, name: str) -> None:
    """Write every byte of ``data`` to ``fd``, looping over short writes."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.ENOSPC, f"{name}: no byte written (disk full?)")
        view = view[n:]


def _sync_whole(fd: int, size: int, name: str) -> None:
    """Check the file behind ``fd`` holds ``size`` bytes, and sync it to disk."""
    got = os.fstat(fd).st_size
    if got != size:
        raise OSError(errno.EIO, f"{name}: {got} of {size} bytes written")
    os.fsync(fd)


def sync_folder(folder: str | os.PathLike) -> None:
    """Sync a folder, so a file created or renamed in it survives a power cut (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        log.debug("syncing %s: %s", folder, e)
    finally:
        os.close(fd)


def image_source(ws: Workspace, sha256: str, source: str) -> str | bytes | None:
    """The image's content: the kept copy, else the original file or zip member; None if gone."""
    path = kept_path(ws, sha256)
    if path.is_file():
        return str(path)
    return original_source(source)


def original_source(source: str) -> str | bytes | None:
    """The image's content where it was scored from: the file or zip member; None if gone."""
    if os.path.isfile(source):
        return source
    m = ZIP_MEMBER.match(source)
    if m and os.path.isfile(m["zip"]):
        try:
            with zipfile.ZipFile(m["zip"]) as zf:
                return read_zip_member(zf, zf.getinfo(m["member"]), source)
        except (KeyError, zipfile.BadZipFile, OSError, ImageLoadError):
            return None
    return None
