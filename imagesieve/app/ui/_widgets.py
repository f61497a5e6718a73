"""What more than one tab uses: error toasts, progress, galleries and the ``Panel`` a tab returns."""

from __future__ import annotations

import datetime as dt
import decimal
import functools
import logging
import math
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from imagesieve._errors import classify_error, first_line
from imagesieve.app._service import UPLOADS, Service, ServiceError

log = logging.getLogger(__name__)

#: What the UNKNOWN reasons mean, in the user's words.
REASON_WORDS = {
    "poor_quality": "poor photo quality",
    "low_confidence": "low confidence",
    "far_from_training": "far from the training data",
}
#: Longest side of thumbnails in galleries.
THUMB = 192


def app_user(request: gr.Request | None) -> str:
    """Who acts in the app, for the audit log: its login user (``--auth``), else anonymous."""
    return f"app:{getattr(request, 'username', None) or 'anonymous'}"


def table_cell(v: Any) -> Any:
    """A value as a table shows it: floats to 4 decimals, times to the second, no NaN.

    Numbers stay numbers (the table sorts them); bytes, decimals and times become text or
    floats. Downloads (CSV) keep the full values.
    """
    if v is None or isinstance(v, bool | int | str):
        return v
    if isinstance(v, decimal.Decimal):
        v = float(v)
    if isinstance(v, float | np.floating):
        return round(float(v), 4) if math.isfinite(v) else None
    if isinstance(v, dt.datetime):
        return (
            v.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
            if v.tzinfo
            else v.strftime("%Y-%m-%d %H:%M:%S")
        )
    if isinstance(v, dt.date | dt.time):
        return v.isoformat(timespec="seconds") if isinstance(v, dt.time) else v.isoformat()
    if isinstance(v, bytes | bytearray | memoryview):
        return "\\x" + bytes(v).hex()
    return str(v)


def table_frame(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Any:
    """A DataFrame of ``rows`` whose cells go through :func:`table_cell`."""
    import pandas as pd

    return pd.DataFrame([[table_cell(v) for v in r] for r in rows], columns=list(columns))


def one_line(e: BaseException | str) -> str:
    text = e if isinstance(e, str) else first_line(e)
    return text if len(text) <= 400 else text[:399] + "…"


def user_errors(fn: Callable) -> Callable:
    """Show a handler's failure as one line (``gr.Error``), never as a traceback.

    A library error (its kind), a full or read-only disk are worded as the API words them;
    anything else is a bug: logged with its traceback, shown as "internal error".
    """

    @functools.wraps(fn)  # keeps the signature: Gradio still sees ``progress=gr.Progress()``
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            e.duration = None  # stays until the user closes it, not 10 seconds
            raise
        except Exception as e:
            kind, message = classify_error(e, server=True)
            if kind == "internal":
                log.exception("app: unexpected error in %s", fn.__name__)
            else:
                log.info("app: %s", one_line(e))
            text = app_words(one_line(message))
            raise gr.Error(text, duration=None, print_exception=False) from None

    return wrapper


#: The library's words for the command line, and what the app calls the same thing.
_APP_WORDS = (
    (re.compile(r"\(?choose one with --column\)?"), "(type it in the URL column box)"),
    (re.compile(r"bad --where filter"), "bad filter"),
    (re.compile(r"--id"), "an image id"),
    (re.compile(r"--class"), "a class"),
    (re.compile(rf"\S*[\\/]{UPLOADS}[\\/][^\\/\s]+[\\/]"), ""),  # the server's upload folder
)


def app_words(text: str) -> str:
    """A library message in the app's words: no command-line flags, no server upload paths."""
    for pattern, words in _APP_WORDS:
        text = pattern.sub(words, text)
    return text


def progress_relay(
    progress: gr.Progress, total_hint: int | None = None, unit: str = "images"
) -> Callable[[str, int, int], None]:
    """A ``progress(stage, done, total)`` callback for the library that moves Gradio's bar.

    ``total_hint`` stands in when the library does not know the total (a batch's images are
    counted as they are read).
    """

    def report(stage: str, done: int, total: int) -> None:
        total = total or total_hint
        if total and done > total:  # an estimate that fell short: show a count only
            total = None
        progress((done, total or None), desc=stage, unit=unit)

    return report


def version_or_none(service: Service) -> Any:
    try:
        return service.version
    except ServiceError:
        return None


def class_names(service: Service) -> list[str]:
    version = version_or_none(service)
    return version.classes if version is not None else []


def pct(p: float | None) -> str:
    return "" if p is None else f"{p:.0%}"


def reason_words(reason: str | None) -> list[str]:
    return [REASON_WORDS.get(r, r.replace("_", " ")) for r in (reason or "").split("+") if r]


def _thumb(service: Service, id_: int, side: int = THUMB) -> Any:
    try:
        return service.thumbnail_of(id_, side)  # a file: Gradio serves a copy made once
    except Exception:  # a thumbnail that cannot be made is left out, not an error
        log.debug("no thumbnail for %s", id_, exc_info=True)
        return None


def gallery_value(service: Service, items: Iterable[tuple[int, str]]) -> list[tuple[Any, str]]:
    """Gallery value from (stored id, caption) pairs; images no longer available are left out."""
    thumbs = ((_thumb(service, id_), caption) for id_, caption in items)
    return [(im, caption) for im, caption in thumbs if im is not None]


def distance_caption(row: dict[str, Any]) -> str:
    return f"#{row['id']} · {row.get('label') or ''} · d={row['distance']:.3f}"


class Downloads:
    """Files made only to be downloaded (query results), in one temporary folder per app.

    Gradio copies a returned file into its own cache at once, so folders older than an hour
    are removed as new ones are made.
    """

    def __init__(self) -> None:
        self._dir: Path | None = None

    def path(self, name: str) -> Path:
        if self._dir is None or not self._dir.is_dir():
            self._dir = Path(tempfile.mkdtemp(prefix="imagesieve-app-"))
        old = time.time() - 3600
        for folder in self._dir.iterdir():
            if folder.stat().st_mtime < old:
                shutil.rmtree(folder, ignore_errors=True)
        folder = self._dir / uuid.uuid4().hex[:12]
        folder.mkdir()
        return folder / name


@dataclass
class Panel:
    """How a tab keeps itself up to date.

    ``refresh(*inputs)`` fills ``outputs`` on page load, when the tab is opened and after the
    served model changed (``model_changes``: events after which it did). ``on_open(tab)``,
    when given, wires the tab's opening itself instead.
    """

    refresh: Callable[..., Any] | None = None
    outputs: list[Any] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)
    on_open: Callable[[Any], None] | None = None
    model_changes: list[Any] = field(default_factory=list)
    #: Components other tabs may set to open this one on something (e.g. the Review filters).
    handles: dict[str, Any] = field(default_factory=dict)
    #: Events after which the store's counts may have changed (the header follows them).
    store_changes: list[Any] = field(default_factory=list)
