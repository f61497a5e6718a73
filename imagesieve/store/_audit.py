"""The review record: the store's ``audit``, ``audit_files`` and ``labels`` tables.

Every review action (relabel, name, reject, exclude, promote, thresholds, activate, undo) is one
``audit`` row: who did it and when, what it touched, and what undo needs to put back. The files
an action wrote into (or moved out of) the training data are ``audit_files`` rows, so undo
restores the folders exactly. ``labels`` holds the labels people gave image contents (by
SHA-256, so they follow the image into every model version). The actions themselves are
``search._review``'s; every method here holds the store's lock.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from imagesieve.store._rows import now, utc_text

if TYPE_CHECKING:
    from imagesieve.store._store import Store

__all__ = ["AuditEntry", "AuditFile", "AuditLog", "HumanLabel"]


@dataclass(frozen=True)
class HumanLabel:
    """A label a person gave one image content, and where its copy in the training data is."""

    sha256: str
    label: str
    id: int
    action_id: int
    file: str | None = None


@dataclass(frozen=True)
class AuditFile:
    """A file an action added to the training data, or moved out of it into ``trash``."""

    path: str
    change: str  # added, removed
    sha256: str
    trash: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One recorded action: what, on what, by whom, when, and what undo puts back."""

    action_id: int
    at: str
    who: str
    action: str
    model_version: str | None
    target: str | None
    images: int
    summary: str
    before: Any
    after: Any
    touches: list[str]
    undone_by: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, without the undo payload (``before``/``after`` stay in the store)."""
        keys = ("action_id", "at", "who", "action", "model_version", "target", "images")
        return {k: getattr(self, k) for k in keys} | {
            "summary": self.summary,
            "undone_by": self.undone_by,
            "undoable": self.action != "undo" and self.undone_by is None,
        }


_ENTRY_COLUMNS = (
    "action_id, epoch_us(done_at), who, action, model_version, target, images, summary, before, "
    "after, touches, undone_by"
)


class AuditLog:
    """One store's record of review actions, the files they moved, and people's labels."""

    def __init__(self, store: Store):
        self.store = store

    def record(
        self,
        action: str,
        *,
        who: str,
        summary: str,
        model_version: str | None = None,
        target: str | None = None,
        images: int = 0,
        before: Any = None,
        after: Any = None,
        touches: Sequence[str] = (),
        files: Sequence[AuditFile] = (),
        labels: Sequence[HumanLabel] = (),
    ) -> int:
        """Append an action, the files it moved and the labels it gave; returns its ``action_id``.

        ``labels``' action ids are set to the new one. Call inside ``Store.atomic()`` with the
        change it records, so both land or neither.
        """
        with self.store._connection() as con:
            action_id = int(
                con.execute("SELECT coalesce(max(action_id), 0) + 1 FROM audit").fetchall()[0][0]
            )
            con.execute(
                "INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                [
                    action_id,
                    now(),
                    who,
                    action,
                    model_version,
                    target,
                    int(images),
                    summary,
                    json.dumps(before),
                    json.dumps(after),
                    list(touches),
                ],
            )
            if files:
                con.executemany(
                    "INSERT INTO audit_files VALUES (?, ?, ?, ?, ?)",
                    [[action_id, f.path, f.change, f.sha256, f.trash] for f in files],
                )
        self.set_labels([replace(h, action_id=action_id) for h in labels])
        return action_id

    def entry(self, action_id: int) -> AuditEntry | None:
        """One action, or None."""
        found = self.entries(action_id=action_id)
        return found[0] if found else None

    def entries(
        self, *, limit: int = 100, offset: int = 0, action_id: int | None = None
    ) -> list[AuditEntry]:
        """Actions, newest first."""
        where = "WHERE action_id = ?" if action_id is not None else ""
        params = [action_id] if action_id is not None else []
        with self.store._connection() as con:
            rows = con.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM audit {where} ORDER BY action_id DESC "
                "LIMIT ? OFFSET ?",
                [*params, int(limit), int(offset)],
            ).fetchall()
        return [_entry(r) for r in rows]

    def count(self) -> int:
        """How many actions are recorded."""
        with self.store._connection() as con:
            return int(con.execute("SELECT count(*) FROM audit").fetchall()[0][0])

    def later_overlapping(self, entry: AuditEntry) -> list[AuditEntry]:
        """Actions after ``entry``, not undone, that touched what it touched (undo would clash)."""
        if not entry.touches:
            return []
        with self.store._connection() as con:
            rows = con.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM audit WHERE action_id > ? AND undone_by IS NULL "
                "AND action <> 'undo' AND len(list_intersect(touches, ?)) > 0 ORDER BY action_id",
                [entry.action_id, entry.touches],
            ).fetchall()
        return [_entry(r) for r in rows]

    def mark_undone(self, action_id: int, by: int) -> None:
        """Record that ``by`` undid ``action_id``."""
        with self.store._connection() as con:
            con.execute("UPDATE audit SET undone_by = ? WHERE action_id = ?", [by, action_id])

    def files(self, action_id: int) -> list[AuditFile]:
        """The files an action added or moved away."""
        with self.store._connection() as con:
            rows = con.execute(
                "SELECT path, change, sha256, trash FROM audit_files WHERE action_id = ? "
                "ORDER BY rowid",
                [action_id],
            ).fetchall()
        return [AuditFile(*r) for r in rows]

    # -- people's labels -------------------------------------------------------------------
    def labels(self, sha256s: Sequence[str]) -> dict[str, HumanLabel]:
        """The labels people gave these contents, by SHA-256."""
        if not sha256s:
            return {}
        with self.store._connection() as con:
            rows = con.execute(
                "SELECT sha256, label, id, action_id, file FROM labels "
                "WHERE sha256 IN (SELECT unnest(?::VARCHAR[]))",
                [list(sha256s)],
            ).fetchall()
        return {r[0]: HumanLabel(*r) for r in rows}

    def set_labels(self, labels: Sequence[HumanLabel]) -> None:
        """Give these contents these labels (replacing earlier ones)."""
        if not labels:
            return
        with self.store._connection() as con:
            con.executemany(
                "INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?)",
                [[h.sha256, h.label, h.id, h.action_id, h.file, now()] for h in labels],
            )

    def drop_labels(self, sha256s: Sequence[str]) -> None:
        """Forget the labels of these contents."""
        if not sha256s:
            return
        with self.store._connection() as con:
            con.execute(
                "DELETE FROM labels WHERE sha256 IN (SELECT unnest(?::VARCHAR[]))", [list(sha256s)]
            )


def _entry(r: tuple) -> AuditEntry:
    import datetime as dt

    at = utc_text(dt.datetime.fromtimestamp(r[1] / 1e6, dt.UTC))
    return AuditEntry(
        r[0],
        at,
        r[2],
        r[3],
        r[4],
        r[5],
        r[6],
        r[7],
        json.loads(r[8]),
        json.loads(r[9]),
        list(r[10] or []),
        r[11],
    )
