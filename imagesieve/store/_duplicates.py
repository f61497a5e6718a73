# ruff: noqa: E741 - faiss vocabulary: D, I = index.search(xq, k)
"""The near-duplicates repository: ``signatures``, ``predictions.duplicate_group`` and ``duplicate_of``.

Rows are linked as they arrive: ``catch_up`` takes a version's rows stored since its last run
(``duplicate_checks``), finds each one's nearest stored rows in the version's FAISS index within
the version's ``DuplicateRule``, confirms the looser pairs by their pixel signatures, and merges
the groups they touch (a group is named by its smallest id), in one transaction per chunk, so a
killed run resumes where it stopped. The candidates each search found within the rule's reach
are kept (``duplicate_pairs``): a head-only retrain's copies of those rows hold the same
embeddings, so their candidates are the old ones, re-judged by the new rule without a search.
Keep-one (``set_aside``) marks a group's other rows as duplicates of the row kept: they are not
clustered and not promoted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from imagesieve.classifier import DuplicateRule, assign_near_duplicates, signature_similarity
from imagesieve.store._schema import shared_sql

if TYPE_CHECKING:
    from imagesieve.store._store import Store

__all__ = ["DuplicateGroup", "NearDuplicates"]

#: Stored rows each new row is compared with (its nearest in the index): a row with more
#: near-duplicates than this still joins their group through the others.
NEIGHBOURS = 16
#: New rows linked per transaction (and per hold of the store's lock).
CATCH_UP_CHUNK = 2048
#: The same, for rows whose candidates are another version's (no search: a lock hold is short).
REUSE_CHUNK = 32_768
#: Members a group listing returns at most.
MAX_MEMBERS = 100
#: What a group listing gives of each member.
MEMBER_FIELDS = (
    "id",
    "source",
    "sha256",
    "label",
    "reason",
    "top1_class",
    "top1_prob",
    "scored_at",
    "duplicate_of",
)
#: Distances within this of the rule's count (float32 inner products of equal vectors).
TOLERANCE = 1e-5


@dataclass
class DuplicateGroup:
    """One group of near-duplicate stored rows: its id (smallest member id), size and members."""

    group_id: int
    size: int
    members: list[dict[str, Any]] = field(default_factory=list)
    kept: int | None = None  # the row a person kept, when the others are set aside

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


class NearDuplicates:
    """One store's groups of near-duplicate images, per model version."""

    def __init__(self, store: Store):
        self.store = store

    def checked_upto(self, model_version: str) -> int:
        """The largest id whose near-duplicates were looked for (0: none yet)."""
        with self.store._connection() as con:
            row = con.execute(
                "SELECT checked_upto FROM duplicate_checks WHERE model_version = ?",
                [model_version],
            ).fetchall()
        return int(row[0][0]) if row else 0

    def pairs_from(self, model_version: str) -> int | None:
        """The largest id checked before candidates were kept (None: the version has no mark).

        Rows after it and up to ``checked_upto`` have their candidates in ``duplicate_pairs``.
        """
        with self.store._connection() as con:
            row = con.execute(
                "SELECT pairs_from FROM duplicate_checks WHERE model_version = ?", [model_version]
            ).fetchall()
        return None if not row or row[0][0] is None else int(row[0][0])

    def catch_up(
        self,
        model_version: str,
        rule: DuplicateRule | None,
        progress: Callable[[int, int], None] | None = None,
        like: tuple[str, DuplicateRule] | None = None,
    ) -> int:
        """Link the version's rows stored since the last catch-up to their near-duplicates.

        Returns how many rows were checked (0 without a rule or new rows). Each chunk commits
        its groups and candidates with the new mark, and releases the lock between chunks (a
        server keeps storing meanwhile). ``like``: (a version whose rows hold the same
        embeddings, its rule), a head-only retrain's source. When every new row has its
        content stored there with its candidates kept, within a reach as long as ``rule``'s,
        those candidates are re-judged instead of searching the index.
        """
        store = self.store
        if rule is None or store.read_only:
            return 0
        upto = self.checked_upto(model_version)
        with store._connection() as con:
            ids = np.asarray(
                con.execute(
                    "SELECT id FROM predictions WHERE model_version = ? AND id > ? ORDER BY id",
                    [model_version, upto],
                ).fetchnumpy()["id"],
                np.int64,
            )
            dim = store._vector_dim(model_version) if len(ids) else None
        if dim is None:
            return 0
        if progress is not None:  # the phase shows from its start
            progress(0, len(ids))
        twins = None if like is None else self._twins(model_version, upto, like, rule)
        step = CATCH_UP_CHUNK if twins is None else REUSE_CHUNK
        for s in range(0, len(ids), step):
            part = ids[s : s + step]
            with store.lock:
                if twins is not None:
                    a, b, d = self._reused(part, like[0], twins, rule)
                else:
                    a, b, d = self._searched(model_version, part, dim, rule)
                ok = self._accepts(rule, a, b, d)
                self._merge(model_version, a[ok], b[ok], int(part[-1]), (a, b, d))
            if progress is not None:
                progress(s + len(part), len(ids))
        return len(ids)

    def _searched(
        self, model_version: str, part: np.ndarray, dim: int, rule: DuplicateRule
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidates (a, b, distance) of rows ``part``: their nearest in the version's index."""
        index = self.store.indexes.get(model_version, dim=dim)
        held = index.vectors_of(part)  # a copy in memory: no DuckDB read
        # DuckDB's chunks are read whole before the index is queried
        chunks = [(part, held)] if held is not None else list(self.store._vectors_of(part, dim))
        a, b, d = zip(
            *(self._candidates(rule, index, got, emb) for got, emb in chunks), strict=True
        )
        return np.concatenate(a), np.concatenate(b), np.concatenate(d)

    def _twins(
        self, model_version: str, upto: int, like: tuple[str, DuplicateRule], rule: DuplicateRule
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(old ids sorted, the new id of each) of every row both versions hold, or None.

        None unless ``like``'s kept candidates can stand in for a search of every row after
        ``upto``: its reach covers ``rule``'s, and each of those rows has a twin (same content)
        there among the rows checked since candidates were kept.
        """
        old, old_rule = like
        first = self.pairs_from(old)
        if first is None or old_rule.reach + TOLERANCE < rule.reach:
            return None
        last = self.checked_upto(old)
        with self.store._connection() as con:
            rows = con.execute(  # -1: no twin
                "SELECT n.id, coalesce(o.id, -1) AS old, n.id > ? AS new_row FROM predictions n "
                "LEFT JOIN predictions o ON o.sha256 = n.sha256 AND o.model_version = ? "
                "WHERE n.model_version = ?",
                [upto, old, model_version],
            ).fetchnumpy()
        new_row = np.asarray(rows["new_row"], bool)
        twin = np.asarray(rows["old"], np.int64)
        if not new_row.any() or not ((twin > first) & (twin <= last))[new_row].all():
            return None
        ids = np.asarray(rows["id"], np.int64)[twin >= 0]
        twin = twin[twin >= 0]
        order = np.argsort(twin)
        return twin[order], ids[order]

    def _reused(
        self,
        part: np.ndarray,
        old: str,
        twins: tuple[np.ndarray, np.ndarray],
        rule: DuplicateRule,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Candidates (a, b, distance) of rows ``part``: their twins' kept ones within ``rule``."""
        import pyarrow as pa

        old_ids, new_ids = twins
        by_new = np.argsort(new_ids)
        at = by_new[np.searchsorted(new_ids, part, sorter=by_new)]
        con = self.store._con
        twin = old_ids[at]
        con.register("_twin", pa.table({"old": twin, "new": part}))
        try:  # the id range lets DuckDB skip the row groups of other rows' candidates
            got = con.execute(
                "SELECT t.new AS a, c.b, c.distance FROM duplicate_pairs c "
                "JOIN _twin t ON c.a = t.old WHERE c.a BETWEEN ? AND ? AND c.distance <= ?",
                [int(twin.min()), int(twin.max()), rule.reach + TOLERANCE],
            ).fetchnumpy()
        finally:
            con.unregister("_twin")
        a = np.asarray(got["a"], np.int64)
        b_old = np.asarray(got["b"], np.int64)
        d = np.asarray(got["distance"], np.float32)
        at = np.searchsorted(old_ids, b_old).clip(0, max(len(old_ids) - 1, 0))
        held = old_ids[at] == b_old if len(old_ids) else np.zeros(len(b_old), bool)
        return a[held], new_ids[at][held], d[held]

    def _candidates(
        self, rule: DuplicateRule, index: Any, ids: np.ndarray, emb: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(a, b, distance) of new rows ``ids`` and their nearest stored rows within reach."""
        D, I = assign_near_duplicates(emb, index, rule.reach, k=NEIGHBOURS + 1)
        a = np.repeat(ids, I.shape[1])
        b, d = I.ravel(), D.ravel()
        found = (b >= 0) & (b != a)
        return a[found], b[found], d[found]

    def _accepts(
        self, rule: DuplicateRule, a: np.ndarray, b: np.ndarray, d: np.ndarray
    ) -> np.ndarray:
        """Which candidate pairs the rule calls duplicates (signatures read where it needs them)."""
        sims = np.full(len(d), np.nan, np.float32)  # NaN: not compared, missing or flat
        need = np.flatnonzero(rule.needs_signature(d))
        sig = self._signatures(np.unique(np.concatenate([a[need], b[need]]))) if len(need) else {}
        if sig:
            held = np.fromiter(sig, np.int64, len(sig))
            held.sort()
            matrix = np.stack([sig[i] for i in held.tolist()])
            at_a = np.searchsorted(held, a[need]).clip(0, len(held) - 1)
            at_b = np.searchsorted(held, b[need]).clip(0, len(held) - 1)
            have = (held[at_a] == a[need]) & (held[at_b] == b[need])
            if have.any():
                sims[need[have]] = signature_similarity(
                    matrix[at_a[have]], matrix[at_b[have]], flat=np.nan
                )
        return rule.accepts(d, sims)

    def signatures(self, ids: np.ndarray | list[int]) -> dict[int, np.ndarray]:
        """Stored signatures by row id; a row copied by a head-only retrain has its owner's."""
        with self.store._connection():
            return self._signatures(ids)

    def _signatures(self, ids: np.ndarray | list[int]) -> dict[int, np.ndarray]:
        """``signatures``, for a caller that holds the lock (the journal not folded again)."""
        import pyarrow as pa

        con = self.store._con
        con.register("_sig_ids", pa.table({"id": pa.array(ids, pa.int64())}))
        try:
            table = shared_sql("signatures", "signature", self.store._shared)
            rows = con.execute(
                f"SELECT w.id, s.signature FROM _sig_ids w JOIN {table} s USING (id)"
            ).fetchall()
        finally:
            con.unregister("_sig_ids")
        return {int(i): np.frombuffer(s, np.int8) for i, s in rows}

    def _merge(
        self,
        model_version: str,
        a: np.ndarray,
        b: np.ndarray,
        upto: int,
        candidates: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> None:
        """Join the groups of each pair (a, b) (a group is named by its smallest id); mark ``upto``.

        ``candidates`` (a, b, distance): what was judged, kept with the mark.
        """
        import pyarrow as pa
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        con = self.store._con
        tables: dict[str, Any] = {}
        if len(a):
            touched = np.unique(np.concatenate([a, b]))
            con.register("_dup_ids", pa.table({"id": pa.array(touched, pa.int64())}))
            try:
                rows = con.execute(
                    "SELECT id, duplicate_group FROM predictions WHERE model_version = ? "
                    "AND duplicate_group IN (SELECT p.duplicate_group FROM predictions p "
                    "JOIN _dup_ids USING (id) WHERE p.duplicate_group IS NOT NULL)",
                    [model_version],
                ).fetchnumpy()
            finally:
                con.unregister("_dup_ids")
            old_id = np.asarray(rows["id"], np.int64)
            old_group = np.asarray(rows["duplicate_group"], np.int64)
            # each existing member is linked to its group's first row, itself a member
            ea = np.concatenate([a, old_id])
            eb = np.concatenate([b, old_group])
            nodes, inverse = np.unique(np.concatenate([ea, eb]), return_inverse=True)
            m = len(ea)
            graph = coo_matrix(
                (np.ones(m, np.int8), (inverse[:m], inverse[m:])), shape=(len(nodes), len(nodes))
            )
            _, label = connected_components(graph, directed=False)
            first = np.full(label.max() + 1, np.iinfo(np.int64).max, np.int64)
            np.minimum.at(first, label, nodes)
            group = first[label]
            # a node changes group unless it was a member of the group it now has
            change = np.ones(len(nodes), bool)
            if len(old_id):
                order = np.argsort(old_id)
                at = order[np.searchsorted(old_id, nodes, sorter=order).clip(0, len(old_id) - 1)]
                change = (old_id[at] != nodes) | (old_group[at] != group)
            tables["_dup_groups"] = pa.table(
                {
                    "id": pa.array(nodes[change], pa.int64()),
                    "g": pa.array(group[change], pa.int64()),
                }
            )
        ca, cb, cd = candidates
        if len(ca):
            tables["_dup_pairs"] = pa.table(
                {
                    "a": pa.array(ca, pa.int64()),
                    "b": pa.array(cb, pa.int64()),
                    "distance": pa.array(cd, pa.float32()),
                }
            )
        with self.store._transaction(tables):
            if "_dup_groups" in tables:
                con.execute(
                    "UPDATE predictions SET duplicate_group = _dup_groups.g FROM _dup_groups "
                    "WHERE predictions.id = _dup_groups.id"
                )
            if "_dup_pairs" in tables:
                con.execute("INSERT INTO duplicate_pairs SELECT a, b, distance FROM _dup_pairs")
            # a version's first mark: its candidates are kept from its first row on
            con.execute(
                "INSERT INTO duplicate_checks (model_version, checked_upto, pairs_from) "
                "VALUES (?, ?, 0) ON CONFLICT (model_version) "
                "DO UPDATE SET checked_upto = excluded.checked_upto",
                [model_version, upto],
            )

    def groups(
        self, model_version: str, limit: int = 20, offset: int = 0
    ) -> tuple[int, list[DuplicateGroup]]:
        """(how many groups, a page of them): largest first, then by id; members by id.

        Each member: MEMBER_FIELDS, ``duplicate_of`` being the row kept in its place (when set
        aside); at most MAX_MEMBERS a group.
        """
        with self.store._connection() as con:
            total = con.execute(
                "SELECT count(DISTINCT duplicate_group) FROM predictions "
                "WHERE model_version = ? AND duplicate_group IS NOT NULL",
                [model_version],
            ).fetchall()[0][0]
            page = con.execute(
                "SELECT duplicate_group, count(*) AS n FROM predictions "
                "WHERE model_version = ? AND duplicate_group IS NOT NULL "
                "GROUP BY duplicate_group ORDER BY n DESC, duplicate_group LIMIT ? OFFSET ?",
                [model_version, int(limit), int(offset)],
            ).fetchall()
            out = []
            for gid, n in page:
                rows = con.execute(
                    "SELECT id, source, sha256, label, reason, top1_class, top1_prob, "
                    "strftime(timezone('UTC', scored_at), '%Y-%m-%dT%H:%M:%SZ'), duplicate_of "
                    "FROM predictions WHERE model_version = ? AND duplicate_group = ? "
                    "ORDER BY id LIMIT ?",
                    [model_version, gid, MAX_MEMBERS],
                ).fetchall()
                members = [dict(zip(MEMBER_FIELDS, r, strict=True)) for r in rows]
                kept = next((m["duplicate_of"] for m in members if m["duplicate_of"]), None)
                out.append(DuplicateGroup(int(gid), int(n), members, kept))
        return int(total), out

    def group_of(self, model_version: str, row_id: int) -> dict[int, int | None] | None:
        """The members of ``row_id``'s group with their ``duplicate_of``; None if it has none."""
        with self.store._connection() as con:
            rows = con.execute(
                "SELECT id, duplicate_of FROM predictions WHERE model_version = ? AND "
                "duplicate_group = (SELECT duplicate_group FROM predictions "
                "WHERE model_version = ? AND id = ?) ORDER BY id",
                [model_version, model_version, int(row_id)],
            ).fetchall()
        return {int(i): (None if d is None else int(d)) for i, d in rows} or None

    def set_aside(self, model_version: str, duplicate_of: dict[int, int | None]) -> None:
        """Set each row's ``duplicate_of`` (None: not set aside), in one statement."""
        import pyarrow as pa

        table = pa.table(
            {
                "id": pa.array(list(duplicate_of), pa.int64()),
                "d": pa.array(list(duplicate_of.values()), pa.int64()),
            }
        )
        with self.store._connection() as con:  # one statement: atomic, or part of ``atomic``
            con.register("_aside", table)
            try:
                con.execute(
                    "UPDATE predictions SET duplicate_of = _aside.d FROM _aside "
                    "WHERE predictions.id = _aside.id AND predictions.model_version = ?",
                    [model_version],
                )
            finally:
                con.unregister("_aside")

    def set_asides_to_carry(self, old: str, new: str) -> dict[int, tuple[int, int]]:
        """What ``new`` sets aside as a person did in ``old``: row id -> (id kept, its group).

        By content: a row set aside in ``old`` in favour of a kept row is to be set aside in
        ``new`` in favour of the kept row's twin, where ``new`` groups the two together and the
        group has no other image kept (two groups of ``old`` joined in ``new`` are left for a
        person to look at again).
        """
        with self.store._connection() as con:
            rows = con.execute(
                "SELECT n.id, nk.id, n.duplicate_group FROM predictions o "
                "JOIN predictions k ON k.id = o.duplicate_of "
                "JOIN predictions n ON n.sha256 = o.sha256 AND n.model_version = $new "
                "JOIN predictions nk ON nk.sha256 = k.sha256 AND nk.model_version = $new "
                "WHERE o.model_version = $old AND o.duplicate_of IS NOT NULL "
                "AND n.duplicate_of IS NULL AND nk.duplicate_of IS NULL "
                "AND n.duplicate_group = nk.duplicate_group",
                {"old": old, "new": new},
            ).fetchall()
        kept: dict[int, set[int]] = {}
        for _, keep, group in rows:
            kept.setdefault(group, set()).add(keep)
        return {int(i): (int(keep), int(group)) for i, keep, group in rows if len(kept[group]) == 1}

    def set_aside_among(self, model_version: str, ids: list[int]) -> set[int]:
        """Which of ``ids`` are set aside (a near-duplicate kept in their place)."""
        if not ids:
            return set()
        with self.store._connection() as con:
            rows = con.execute(
                "SELECT id FROM predictions WHERE model_version = ? AND id IN "
                "(SELECT unnest(?)) AND duplicate_of IS NOT NULL",
                [model_version, [int(i) for i in ids]],
            ).fetchall()
        return {int(r[0]) for r in rows}

    def near_training(
        self, model_version: str, ids: list[int], distance: float, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Which of ``ids`` have their nearest training image within ``distance``.

        By the stored cosine distance to the nearest training image, nearest first: id, source,
        distance, and that image's reference id, source and label. The caller applies the rest
        of the near-duplicate rule (``search.near_training``).
        """
        if not ids:
            return []
        with self.store._connection() as con:
            rows = con.execute(
                "SELECT p.id, p.source, p.neighbor_cosine AS d, "
                "r.id, r.source, r.label FROM predictions p "
                "LEFT JOIN reference_images r ON r.model_version = p.model_version "
                "AND r.id = p.neighbor_id WHERE p.model_version = ? AND p.id IN (SELECT unnest(?)) "
                "AND d <= ? ORDER BY d, p.id LIMIT ?",
                [model_version, [int(i) for i in ids], float(distance) + TOLERANCE, int(limit)],
            ).fetchall()
        keys = ("id", "source", "distance", "training_id", "training_source", "training_label")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def exact(self, limit: int = 20, offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """Contents that arrived under several names (the ``exact_duplicates`` view), paged."""
        with self.store._connection() as con:
            total = con.execute("SELECT count(*) FROM exact_duplicates").fetchall()[0][0]
            rows = con.execute(
                "SELECT sha256, names, sources[1:20], batches[1:20] FROM exact_duplicates "
                "LIMIT ? OFFSET ?",
                [int(limit), int(offset)],
            ).fetchall()
        keys = ("sha256", "names", "sources", "batches")
        return int(total), [dict(zip(keys, r, strict=True)) for r in rows]

    def in_batch(self, model_version: str, batch_id: int) -> int:
        """How many of a batch's images have near-duplicates among the stored ones."""
        with self.store._connection() as con:
            return int(
                con.execute(
                    "SELECT count(DISTINCT p.id) FROM predictions p WHERE p.model_version = ? "
                    "AND p.duplicate_group IS NOT NULL AND (p.batch_id = ? OR p.sha256 IN "
                    "(SELECT sha256 FROM batch_items WHERE batch_id = ? AND sha256 IS NOT NULL))",
                    [model_version, batch_id, batch_id],
                ).fetchall()[0][0]
            )
