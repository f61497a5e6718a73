"""The store's journal: rows made durable with one file append and sync, folded into DuckDB later.

A DuckDB transaction costs ~10 ms of CPU however few rows it holds, so a server committing each
small group of requests spends more on commits than on anything but the model. The journal
takes that off the request path: a group is appended here as one Arrow IPC frame and synced
before it is answered; the store folds the journal into DuckDB in one transaction every second
or so, then empties it. Opening the store replays whatever a crash left here.

A frame is ``MAGIC, length (u64), CRC-32 (u32), Arrow IPC stream``; a torn or corrupt frame
(the process died mid-append, before its group was answered) ends the readable journal.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any

__all__ = ["Journal"]

log = logging.getLogger(__name__)

MAGIC = b"ISJ1"
_HEADER = struct.Struct("<4sQI")


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

    def read(self) -> list[tuple[Any, dict[str, Any]]]:
        """Every whole frame, in order, as (table, meta); stops at a torn or corrupt one."""
        import pyarrow as pa

        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        frames, at = [], 0
        while at < len(data):
            head = data[at : at + _HEADER.size]
            if len(head) < _HEADER.size:
                break
            magic, size, crc = _HEADER.unpack(head)
            payload = data[at + _HEADER.size : at + _HEADER.size + size]
            if magic != MAGIC or len(payload) < size or zlib.crc32(payload) != crc:
                break
            table = pa.ipc.open_stream(payload).read_all()
            raw = (table.schema.metadata or {}).get(b"imagesieve")
            frames.append((table.replace_schema_metadata(None), json.loads(raw) if raw else {}))
            at += _HEADER.size + size
        if at < len(data):
            log.warning(
                "%s: %d bytes after the last whole entry were cut short (the process stopped "
                "while writing them, before answering); they are dropped",
                self.path,
                len(data) - at,
            )
        return frames

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
