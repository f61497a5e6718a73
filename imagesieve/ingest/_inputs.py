"""The inputs of ``imagesieve score``: files, folders, zips, CSV/XLSX lists and URLs, as one stream."""

from __future__ import annotations

import codecs
import csv
import logging
import os
import re
import threading
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from imagesieve._errors import SieveError
from imagesieve.data import (
    IMAGE_EXTENSIONS,
    MAX_MEMBER_BYTES,
    ImageLoadError,
    member_error,
    read_zip_member,
)

__all__ = [
    "LIST_COLUMNS",
    "ArchiveLimits",
    "InputError",
    "InputExpander",
    "InputItem",
    "ZipMember",
    "expand_inputs",
]

log = logging.getLogger(__name__)

#: A list row kept for the batch report: at most this many columns, of at most this many chars.
ROW_LIMITS = (64, 1000)
#: Headers tried, in order and case-insensitively, when a list is given without ``--column``.
LIST_COLUMNS = ("url", "image_url", "image", "path", "file", "filename", "source")

_CSV_SUFFIXES = (".csv", ".tsv")
_XLSX_SUFFIXES = (".xlsx", ".xlsm")
_UNSUPPORTED_LISTS = (".xls", ".ods")
_DELIMITERS = (",", ";", "\t")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: C:\ is a drive


class InputError(SieveError, ValueError):
    """A whole input is unusable (missing path, list without the column, unreadable sheet)."""


@dataclass(frozen=True)
class ArchiveLimits:
    """How much zip archives may hold: members read and bytes inflated, per archive and per run.

    Members are read one at a time as they are decoded, never held together; these limits bound
    the work (and the workspace a server keeps) that a few kilobytes of archive can ask for.
    """

    max_members: int = 1_000_000
    max_bytes: int | None = None  # inflated bytes per archive
    max_member_bytes: int | None = None  # one member (None: MAX_MEMBER_BYTES)
    max_total_members: int | None = None  # over every archive of one run (a request)
    max_total_bytes: int | None = None


class _Budget:
    """Members and inflated bytes counted against a limit, shared by the threads reading them."""

    def __init__(self, what: str, max_members: int | None, max_bytes: int | None):
        self.what = what
        self.max_members = max_members
        self.max_bytes = max_bytes
        self.members = 0
        self.bytes = 0
        self._lock = threading.Lock()

    def take_member(self) -> bool:
        """Count one more member; False once over the limit."""
        with self._lock:
            self.members += 1
            return self.max_members is None or self.members <= self.max_members

    def bytes_left(self) -> int | None:
        """Inflated bytes still allowed (None: no limit)."""
        with self._lock:
            return None if self.max_bytes is None else max(self.max_bytes - self.bytes, 0)

    def spend(self, n: int) -> None:
        with self._lock:
            self.bytes += n


@dataclass
class InputItem:
    """One thing to score.

    ``index`` numbers the items 0, 1, 2, ... across all inputs, in input order; ``name`` is
    printable: a path, a URL or ``archive.zip:dir/member.png``. ``source`` is a file path (str),
    the bytes of a zip member or fetched URL, or None for a URL not fetched yet and for an item
    that already failed (``error`` set).
    """

    index: int
    name: str
    source: str | bytes | ZipMember | None
    url: str | None = None
    error: ImageLoadError | None = None
    member: str | None = None  # path inside the archive, for zip members
    row: dict[str, str] | None = None  # its row of a CSV/XLSX list: header -> cell (bounded)

    def content(self) -> str | bytes:
        """The item's file path or bytes (a zip member is read again, within its limits)."""
        if isinstance(self.source, ZipMember):
            return self.source.read()
        return self.source

    @property
    def filename(self) -> str:
        """The original file name (of the path, zip member or URL path), or ``image``."""
        if self.url is not None:
            raw = unquote(urlsplit(self.url).path)
        elif self.member is not None:
            raw = self.member
        else:
            raw = self.name
        base = raw.replace("\\", "/").rsplit("/", 1)[-1]
        base = "".join(ch for ch in base if ch.isprintable()).strip()
        return base if base not in ("", ".", "..") else "image"


def _is_http(text: str) -> bool:
    return text[:8].lower().startswith(("http://", "https://"))


def _ignored_reason(suffix: str) -> str:
    return f"not an image file extension ({suffix or 'none'})"


def _hidden(parts: Sequence[str]) -> bool:
    """Hidden files and folders (``.name``) and macOS resource forks; ``.`` and ``..`` are not."""
    return any((p.startswith(".") and p not in (".", "..")) or p == "__MACOSX" for p in parts)


@dataclass(frozen=True)
class _Sheet:
    """A validated CSV/XLSX list: where its header is and which column holds the images."""

    path: Path
    header_row: int  # 1-based
    col: int  # 0-based
    column: str  # as written in the header
    encoding: str | None = None  # CSV only
    delimiter: str | None = None  # CSV only
    header: tuple[str, ...] = ()  # the header's cells; empty for a bare list of URLs

    def row_values(self, row: Sequence[str]) -> dict[str, str]:
        """One row's cells by header, kept for the batch report (bounded: see ROW_LIMITS)."""
        max_columns, max_chars = ROW_LIMITS
        out: dict[str, str] = {}
        for i, name in enumerate(self.header[:max_columns]):
            key = name or f"column {i + 1}"
            while key in out:
                key += "_"
            out[key] = (row[i] if i < len(row) else "")[:max_chars]
        return out


def _csv_encoding(path: Path) -> str:
    """``utf-8-sig`` when the whole file decodes as UTF-8, else ``cp1252`` (what Excel writes)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        log.info("%s is not UTF-8; reading it as cp1252", path)
        return "cp1252"
    return "utf-8-sig"


def _csv_delimiter(path: Path, encoding: str) -> str:
    """The most frequent of ``,`` ``;`` and tab in the first non-blank line (``,`` when none)."""
    with path.open(encoding=encoding, errors="replace", newline="") as f:
        first = next((line for line in f if line.strip()), "")
    counts = [first.count(d) for d in _DELIMITERS]
    return _DELIMITERS[counts.index(max(counts))] if max(counts) else ","


def _csv_rows(path: Path, encoding: str, delimiter: str) -> Iterator[list[str]]:
    with path.open(encoding=encoding, errors="replace", newline="") as f:
        try:
            yield from csv.reader(f, delimiter=delimiter)
        except csv.Error as e:
            raise InputError(f"{path}: unreadable CSV ({e})") from None


def _xlsx_rows(path: Path) -> Iterator[list]:
    import openpyxl

    try:
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as e:  # openpyxl raises many kinds for a bad file
        raise InputError(f"{path}: cannot read the spreadsheet ({e or type(e).__name__})") from None
    try:
        if not wb.worksheets:
            raise InputError(f"{path}: the workbook has no worksheet")
        ws = wb.worksheets[0]
        ws.reset_dimensions()  # stored dimensions can be wrong and would cut rows off
        for row in ws.iter_rows(values_only=True):
            yield ["" if v is None else str(v) for v in row]
    finally:
        wb.close()


def _sheet_rows(path: Path, encoding: str | None, delimiter: str | None) -> Iterator[list[str]]:
    if encoding is None:
        return _xlsx_rows(path)
    return _csv_rows(path, encoding, delimiter)


def _open_sheet(arg: str, path: Path, column: str | None) -> _Sheet:
    """Find the header row and the image column of a list, or raise InputError saying how to fix."""
    if path.suffix.lower() in _CSV_SUFFIXES:
        encoding = _csv_encoding(path)
        delimiter = _csv_delimiter(path, encoding)
    else:
        encoding = delimiter = None
    rows = _sheet_rows(path, encoding, delimiter)
    try:
        numbered = enumerate(rows, start=1)
        found = next(((n, row) for n, row in numbered if any(c.strip() for c in row)), None)
    finally:
        rows.close()
    if found is None:
        raise InputError(f"{arg} is empty: expected a header row naming the image column")
    number, header = found[0], [cell.strip().lstrip("\ufeff") for cell in found[1]]
    lower = [h.lower() for h in header]
    wanted = [column.strip().lower()] if column is not None else list(LIST_COLUMNS)
    for name in wanted:
        if name in lower:
            col = lower.index(name)
            return _Sheet(path, number, col, header[col], encoding, delimiter, tuple(header))
    if column is None and _is_http(header[0]):  # a bare list of URLs, no header
        return _Sheet(path, number - 1, 0, "1", encoding, delimiter)
    columns = ", ".join(h for h in header if h) or "none"
    missing = f"column '{column}'" if column is not None else "column named " + ", ".join(wanted)
    raise InputError(f"{arg} has no {missing}; columns: {columns} (choose one with --column)")


def _under(path: str, folders: Sequence[str]) -> bool:
    """True when ``path`` (symlinks resolved) lies inside one of ``folders`` (resolved too)."""
    real = os.path.realpath(path)
    for folder in folders:
        root = os.path.realpath(folder)
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            return True
    return False


def _cell_item(
    cell: str, sheet: _Sheet, row: int, local_paths: Sequence[str] | None = None
) -> InputItem:
    """The item for one list cell: a URL, a file path (relative to the list) or an error.

    ``local_paths`` None lets a cell name any file (the operator's own list); otherwise only
    files inside those folders, and a refusal says nothing about whether the file exists.
    """
    where = f"{sheet.path.name} row {row}"
    if not cell:
        name, reason = str(sheet.path), f"row {row}: empty cell in column '{sheet.column}'"
        return InputItem(-1, name, None, error=ImageLoadError(name, "empty", reason))
    if _is_http(cell):
        return InputItem(-1, cell, None, url=cell)
    if _SCHEME.match(cell):
        reason = f"only http and https URLs are fetched ({where})"
        return InputItem(-1, cell, None, error=ImageLoadError(cell, "bad_url", reason))
    if local_paths is None:
        name = shown = str(sheet.path.parent / Path(cell).expanduser())
    else:  # a refusal or a missing file is shown as the cell, not as a path on the server
        name, shown = os.path.normpath(os.path.join(sheet.path.parent, cell)), cell
        if cell.startswith("~") or not _under(name, local_paths):  # "~": a home folder, meant
            reason = f"local paths are not read from this list, only http(s) URLs ({where})"
            return InputItem(-1, cell, None, error=ImageLoadError(cell, "not_allowed", reason))
    if not os.path.exists(name):
        reason = f"file not found ({where})"
        return InputItem(-1, shown, None, error=ImageLoadError(shown, "missing", reason))
    return InputItem(-1, name, name)


class InputExpander:
    """The items of some inputs, validated up front and streamed lazily.

    Iterate over :meth:`items` (or the expander itself). Files left out on purpose — non-image
    extensions inside folders and zips, unreadable sub-folders — are appended to ``ignored`` as
    ``(name, reason)`` while iterating, so the list is complete once the iteration is. Hidden
    files and folders (and ``__MACOSX``) inside folders and zips are skipped silently; symlinked
    folders are not followed. Iterating raises :class:`InputError` only if a list that passed the
    up-front check turns out unreadable part-way (e.g. a CSV field over the csv module's limit).
    Zip members come as :class:`ZipMember` sources, read when they are decoded, within
    ``archives``; ``local_paths`` restricts the files a list may name (see ``expand_inputs``).
    """

    def __init__(
        self,
        inputs: Sequence[str],
        *,
        column: str | None = None,
        local_paths: Sequence[str | os.PathLike] | None = None,
        archives: ArchiveLimits | None = None,
    ):
        self.ignored: list[tuple[str, str]] = []
        self.local_paths = None if local_paths is None else [os.fspath(p) for p in local_paths]
        self.archives = archives or ArchiveLimits()
        self._inputs = [self._check(str(arg), column) for arg in inputs]

    @staticmethod
    def _check(arg: str, column: str | None) -> tuple[str, str, object]:
        """(kind, arg, details) for one command-line input; InputError when it cannot be used."""
        if _is_http(arg):
            return "url", arg, None
        path = Path(arg).expanduser()
        if not path.exists():
            if _SCHEME.match(arg) and "://" in arg:
                raise InputError(f"{arg}: only http and https URLs are fetched")
            raise InputError(f"{arg}: no such file or folder")
        if path.is_dir():
            return "folder", arg, path
        suffix = path.suffix.lower()
        if suffix in _UNSUPPORTED_LISTS:
            raise InputError(f"{arg}: {suffix} lists are not supported; save it as .xlsx or .csv")
        if suffix in _CSV_SUFFIXES + _XLSX_SUFFIXES:
            return "list", arg, _open_sheet(arg, path, column)
        if suffix == ".zip":
            try:
                with zipfile.ZipFile(path):
                    pass
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                raise InputError(f"{arg}: not a readable zip archive ({e})") from None
            return "zip", arg, path
        return "file", arg, path

    def __iter__(self) -> Iterator[InputItem]:
        return self.items()

    def items(self) -> Iterator[InputItem]:
        """Every item of every input, numbered 0, 1, 2, ... in input order."""
        self.ignored = []
        limits = self.archives
        run = _Budget("run", limits.max_total_members, limits.max_total_bytes)
        index = 0
        for kind, arg, details in self._inputs:
            if kind == "url":
                found = iter([InputItem(-1, arg, None, url=arg)])
            elif kind == "file":
                found = iter([InputItem(-1, arg, str(details))])
            elif kind == "folder":
                found = self._folder_items(details)
            elif kind == "zip":
                found = self._zip_items(arg, details, run)
            else:
                found = self._list_items(details)
            for item in found:
                item.index = index
                index += 1
                yield item

    def _folder_items(self, root: Path) -> Iterator[InputItem]:
        found = []

        def unreadable(e: OSError) -> None:
            self.ignored.append((e.filename, f"cannot read folder ({e.strerror})"))

        for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(root).parts
            found += [(*rel, f) for f in filenames if not f.startswith(".")]
        for parts in sorted(found):
            name = str(root.joinpath(*parts))
            suffix = os.path.splitext(parts[-1])[1].lower()
            if suffix in IMAGE_EXTENSIONS:
                yield InputItem(-1, name, name)
            else:
                self.ignored.append((name, _ignored_reason(suffix)))

    def _zip_items(self, arg: str, path: Path, run: _Budget) -> Iterator[InputItem]:
        limits = self.archives
        archive = _Archive(
            path,
            _Budget("archive", limits.max_members, limits.max_bytes),
            run,
            limits.max_member_bytes,
        )
        infos = archive.zf.infolist()
        members = [
            i for i in infos if not i.is_dir() and not _hidden(PurePosixPath(i.filename).parts)
        ]
        members.sort(key=lambda i: PurePosixPath(i.filename).parts)
        for n, info in enumerate(members):
            name = f"{arg}:{info.filename}"
            suffix = PurePosixPath(info.filename).suffix.lower()
            if suffix not in IMAGE_EXTENSIONS:
                self.ignored.append((name, _ignored_reason(suffix)))
                continue
            if over := archive.take_member():
                left = sum(
                    PurePosixPath(i.filename).suffix.lower() in IMAGE_EXTENSIONS
                    for i in members[n:]
                )
                reason = f"{over}; {left:,} image members of {arg} were not read"
                yield InputItem(-1, arg, None, error=ImageLoadError(arg, "too_large", reason))
                return
            error = member_error(info, name, archive.member_limit)
            source = ZipMember(archive, info, name) if error is None else None
            yield InputItem(-1, name, source, error=error, member=info.filename)

    def _list_items(self, sheet: _Sheet) -> Iterator[InputItem]:
        rows = _sheet_rows(sheet.path, sheet.encoding, sheet.delimiter)
        try:
            for number, row in enumerate(rows, start=1):
                if number <= sheet.header_row or not any(cell.strip() for cell in row):
                    continue
                cell = row[sheet.col].strip() if sheet.col < len(row) else ""
                item = _cell_item(cell, sheet, number, self.local_paths)
                if sheet.header:
                    item.row = sheet.row_values(row)
                yield item
        finally:
            rows.close()


class _Archive:
    """An open zip archive whose members are read one at a time, by any thread, within budgets."""

    def __init__(self, path: Path, budget: _Budget, run: _Budget, member_limit: int | None = None):
        self.path = path
        self.zf = zipfile.ZipFile(path)
        self.budget = budget
        self.run = run
        self.member_limit = MAX_MEMBER_BYTES if member_limit is None else member_limit
        self._lock = threading.Lock()

    def take_member(self) -> str | None:
        """Count a member against both budgets: None, or why it is over a limit."""
        for budget in (self.budget, self.run):
            if not budget.take_member():
                return f"over the limit of {budget.max_members:,} image members per {budget.what}"
        return None

    def read(self, info: zipfile.ZipInfo, name: str, cap: int) -> bytes:
        """A member's bytes: at most ``cap``, and no more than the budgets have left."""
        lefts = [(b, b.bytes_left()) for b in (self.budget, self.run)]
        limit = min([cap] + [left + 1 for _, left in lefts if left is not None])
        with self._lock:  # one ZipFile, one file position
            data = read_zip_member(self.zf, info, name, limit, self.member_limit)
        for budget, _ in lefts:
            budget.spend(len(data))
        for budget, left in lefts:
            if left is not None and len(data) > left:
                raise ImageLoadError(
                    name,
                    "too_large",
                    f"over the limit of {budget.max_bytes:,} inflated bytes per {budget.what}",
                )
        return data


@dataclass
class ZipMember:
    """A zip member as an image source: read (``read(n)``) when it is decoded, not before.

    Items stream through a pipeline that holds ~100 of them at once; holding members as bytes
    let 16 members that inflate to 200 MB each take 3.4 GB.
    """

    archive: _Archive = field(repr=False)
    info: zipfile.ZipInfo = field(repr=False)
    name: str

    def read(self, n: int = -1) -> bytes:
        """The member's bytes, at most ``n`` (default: its limit + 1); raises ImageLoadError."""
        cap = self.archive.member_limit + 1 if n is None or n < 0 else n
        return self.archive.read(self.info, self.name, cap)


def expand_inputs(
    inputs: Sequence[str],
    *,
    column: str | None = None,
    local_paths: Sequence[str | os.PathLike] | None = None,
    archives: ArchiveLimits | None = None,
) -> InputExpander:
    """Check every input now (raising :class:`InputError`), then stream their items lazily.

    An input is an ``http(s)://`` URL; a file (passed through whatever its extension); a folder
    (image files under it, recursively, sorted by relative path); a ``.zip`` (its image members,
    sorted, read into memory one at a time); or a ``.csv``/``.tsv``/``.xlsx`` list whose
    ``column`` (or the first of :data:`LIST_COLUMNS`, any case) holds URLs or file paths, paths
    relative to the list's folder. Per-row problems (empty cell, missing file, non-http URL) and
    per-member problems (too large, encrypted, unsafe name, corrupt) become items with ``error``
    set. ``local_paths`` (a server's lists) lets list cells name only files inside those
    folders; None (the operator's own) any file. ``archives`` bounds what zips may hold.
    """
    return InputExpander(inputs, column=column, local_paths=local_paths, archives=archives)
