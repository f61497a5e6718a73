"""The store's journal: rows made durable with one file append and sync, folded into DuckDB later.

A DuckDB transaction costs ~10 ms of CPU however few rows it holds, so a server committing each
small group of requests spends more on commits than on anything but the model. The journal
takes that off the request path: a group is appended here as one Arrow IPC frame and synced
before it is answered; the store folds the journal into DuckDB in one transaction every second
or so, then empties it. Opening the store replays whatever a crash left here.

A frame is ``MAGIC, length (u64), CRC-32 (u32), Arrow IPC stream``. Reading skips a frame
whose checksum fails and goes on from the next whole frame, so damage costs only the rows in
the damaged bytes; a frame cut short at the end is the append a crash interrupted, before its
group was answered.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagesieve.store._images import _write_all, sync_folder

__all__ = ["Damage", "Journal", "JournalScan"]

log = logging.getLogger(__name__)

MAGIC = b"ISJ1"
_HEADER = struct.Struct("<4sQI")


@dataclass(frozen=True)
class Damage:
    """Bytes ``[start, end)`` of the journal that hold no whole frame."""

    start: int
    end: int
    #: Cut short at the end of the file: an append a crash interrupted, before answering.
    torn: bool


@dataclass
class JournalScan:
    """What reading the journal found: its whole frames and the bytes between them that are not."""

    frames: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    data: bytes = b""

    def describe(self) -> str:
        """One line naming the bytes dropped and what they can have held."""
        torn = [d for d in self.damage if d.torn]
        bad = [d for d in self.damage if not d.torn]
        parts = []
        if bad:
            spans = ", ".join(f"{d.start}-{d.end}" for d in bad)
            parts.append(
                f"{len(bad)} damaged span{'s' if len(bad) > 1 else ''} (bytes {spans} of "
                f"{len(self.data)}) failed the checksum: the answered rows in those bytes are "
                f"lost, the {len(self.frames)} whole entries around them are kept"
            )
        for d in torn:
            parts.append(
                f"the last {d.end - d.start} bytes ({d.start}-{d.end}) were cut short (the "
                "process stopped while writing them, before answering) and are dropped"
            )
        return "; ".join(parts)


class Journal:
    """An append-only file of Arrow tables, each synced to disk before ``append`` returns."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return self._fd

    def append(self, table: Any, meta: dict[str, Any] | None = None) -> None:
        """Write ``table`` (with ``meta`` in its schema metadata) as one frame and sync it.

        A write or sync that fails leaves the journal as it was, and raises.
        """
        import pyarrow as pa

        if meta:
            table = table.replace_schema_metadata({"imagesieve": json.dumps(meta)})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        payload = sink.getvalue()
        frame = _HEADER.pack(MAGIC, payload.size, zlib.crc32(payload)) + payload.to_pybytes()
        fd = self._open()
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            if os.write(fd, frame) != len(frame):
                raise OSError(f"{self.path}: short write (disk full?)")
            os.fdatasync(fd)
        except BaseException:
            # Not stored, so not answered: take the frame back, or a later one would follow a
            # torn entry (unreadable) or repeat its ids.
            os.ftruncate(fd, end)
            raise

    def scan(self) -> JournalScan:
        """Every whole frame, in order, and the damaged or torn spans between them.

        A frame whose header or checksum fails is skipped up to the next ``MAGIC`` that starts
        a whole frame, so one damaged frame loses only its own rows.
        """
        if not self.path.is_file():
            return JournalScan()
        data = self.path.read_bytes()
        found = JournalScan(data=data)
        at = 0
        while at < len(data):
            frame = _frame_at(data, at)
            if frame is not None:
                found.frames.append(frame[0])
                at = frame[1]
                continue
            start, at = at, data.find(MAGIC, at + 1)
            while at != -1 and _frame_at(data, at) is None:
                at = data.find(MAGIC, at + 1)
            if at == -1:
                found.damage.append(Damage(start, len(data), _cut_short(data, start)))
                break
            found.damage.append(Damage(start, at, False))
        return found

    def keep_damaged(self, found: JournalScan) -> Path:
        """Write the journal as ``found`` (damaged bytes included) next to it, synced; its path.

        Named ``<journal>.damaged-<UTC time>``; the byte ranges of ``found.damage`` refer to it.
        """
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        for n in range(1000):
            side = self.path.with_name(f"{self.path.name}.damaged-{stamp}{f'.{n}' if n else ''}")
            try:
                fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            try:
                _write_all(fd, found.data, str(side))
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                side.unlink(missing_ok=True)
                raise
            os.close(fd)
            sync_folder(side.parent)
            return side
        raise FileExistsError(f"{self.path}: no free name for its damaged copy ({stamp})")

    def size(self) -> int:
        """Bytes in the journal (0 when it is empty or absent)."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def clear(self) -> None:
        """Empty the journal once its rows are committed elsewhere."""
        if self._fd is None and not self.path.exists():
            return
        fd = self._open()
        os.ftruncate(fd, 0)
        os.fsync(fd)

    def close(self) -> None:
        """Close the file (its contents stay)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _frame_at(data: bytes, at: int) -> tuple[tuple[Any, dict[str, Any]], int] | None:
    """The whole frame starting at ``at`` as ((table, meta), its end), or None."""
    import pyarrow as pa

    head = data[at : at + _HEADER.size]
    if len(head) < _HEADER.size:
        return None
    magic, size, crc = _HEADER.unpack(head)
    end = at + _HEADER.size + size
    if magic != MAGIC or end > len(data):
        return None
    payload = data[at + _HEADER.size : end]
    if zlib.crc32(payload) != crc:
        return None
    try:
        table = pa.ipc.open_stream(payload).read_all()
        raw = (table.schema.metadata or {}).get(b"imagesieve")
        meta = json.loads(raw) if raw else {}
    except (pa.ArrowException, ValueError) as e:
        log.debug("journal frame at byte %d passes its checksum but does not parse: %s", at, e)
        return None
    return (table.replace_schema_metadata(None), meta), end


def _cut_short(data: bytes, at: int) -> bool:
    """True when the bytes from ``at`` to the end are the start of a frame the file ends inside."""
    head = data[at : at + _HEADER.size]
    if len(head) < _HEADER.size:
        return MAGIC.startswith(head[: len(MAGIC)])
    magic, size, _ = _HEADER.unpack(head)
    return magic == MAGIC and at + _HEADER.size + size > len(data)
