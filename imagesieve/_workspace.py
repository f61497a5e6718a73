"""The workspace: one directory holding everything a deployment owns."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_WORKSPACE", "Workspace"]

DEFAULT_WORKSPACE = "sieve"
ENV_VAR = "IMAGESIEVE_WORKSPACE"


class Workspace:
    """Paths inside a workspace directory; nothing is created until something is written."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> Workspace:
        """``path``, else ``$IMAGESIEVE_WORKSPACE``, else ``./sieve``."""
        return cls(path or os.environ.get(ENV_VAR) or DEFAULT_WORKSPACE)

    @property
    def models_dir(self) -> Path:
        """Where model versions live, one sub-directory each."""
        return self.root / "models"

    @property
    def cache_dir(self) -> Path:
        """Derived files that can always be rebuilt (e.g. temporary ONNX exports)."""
        return self.root / "cache"

    @property
    def images_dir(self) -> Path:
        """Kept copies of scored images (UNKNOWNs by default), content-addressed by SHA-256."""
        return self.root / "images"

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"
