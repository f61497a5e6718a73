"""A small tmpfs mounted for a test: a full disk or a read-only workspace on demand (root only)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["tmpfs"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "64k", *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted over ``path`` (created); the test is skipped, saying why,
    where mounting is not allowed (not root, no ``mount``, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip(f"a full or read-only disk needs 'mount' as root (uid {os.geteuid()})")
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)  # still busy: detach it


def remount_read_only(path: Path) -> None:
    """Make a tmpfs mounted by ``tmpfs`` read-only, keeping what was written to it."""
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
