"""The clusters repository: the store's ``clusters``, ``cluster_runs`` and ``cluster_exclusions``.

Fitting clusters is ``search``'s work; what a run found, and what review does to it (names,
rejections, exclusions, promotions), is kept here. Every method holds the store's lock.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from imagesieve.classifier import UNKNOWN
from imagesieve.store._rows import embedding_matrix, now

if TYPE_CHECKING:
    from imagesieve.store._store import Store

__all__ = ["CLUSTER_FIELDS", "ClusterMember", "Clusters", "PreviousCluster"]

#: What a cluster listing and ``summary.csv`` show of each cluster.
CLUSTER_FIELDS = (
    "cluster_id",
    "status",
    "name",
    "size",
    "cohesion",
    "radius",
    "medoid_id",
    "medoid_source",
    "top1",
    "top2",
)


@dataclass(frozen=True)
class PreviousCluster:
    """What the store remembers of a cluster from an earlier run.

    Attributes:
        cluster_id: Its id.
        member_ids: (m,) int64 row ids of its members then.
        centroid: (d,) float32 normalised mean embedding.
        radius: Cosine distance from the centroid covering ~95% of its members.
    """

    cluster_id: int
    member_ids: np.ndarray
    centroid: np.ndarray
    radius: float


@dataclass(frozen=True)
class ClusterMember:
    """A clustered image: its row id, source, content and cluster (-1: noise)."""

    id: int
    source: str
    sha256: str
    cluster_id: int
    top1_class: str | None = None
    top1_prob: float | None = None
    excluded: bool = False


#: Per cluster of version ``$v``, its members no person has labelled, left out or set aside
#: yet (``pending``); ``{only}``: more conditions on ``p``.
_PENDING = (
    "SELECT p.cluster_id, count(*) AS pending FROM predictions p "
    "WHERE p.model_version = $v AND p.cluster_id IS NOT NULL {only}"
    "AND p.duplicate_of IS NULL "
    "AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.sha256 = p.sha256) "
    "AND NOT EXISTS (SELECT 1 FROM cluster_exclusions x WHERE x.model_version = $v "
    "AND x.cluster_id = p.cluster_id AND x.id = p.id) GROUP BY p.cluster_id"
)
#: Work for review, of a cluster ``c`` joined with its ``_PENDING`` row ``w``: found in the
#: last run, and new or named, or promoted with members pending.
_OPEN = (
    "(c.size > 0 AND (c.status IN ('new', 'named') "
    "OR (c.status = 'promoted' AND coalesce(w.pending, 0) > 0)))"
)


class Clusters:
    """One store's clusters of UNKNOWN images, per model version."""

    def __init__(self, store: Store):
        self.store = store

    def previous(self, model_version: str) -> tuple[list[PreviousCluster], int]:
        """The version's clusters still alive (size > 0) with their members, and the next free id."""
        with self.store._connection() as con:
            rows = con.execute(
                "SELECT cluster_id, centroid, radius, size FROM clusters WHERE model_version = ?",
                [model_version],
            ).fetchall()
            members = con.execute(
                "SELECT cluster_id, list(id ORDER BY id) FROM predictions "
                "WHERE model_version = ? AND cluster_id >= 0 GROUP BY cluster_id",
                [model_version],
            ).fetchall()
        next_id = max((r[0] for r in rows), default=-1) + 1
        return _alive(rows, members), next_id

    def last_params(self, model_version: str) -> dict[str, Any] | None:
        """The parameters of the version's latest clustering run; None when it was never run."""
        with self.store._connection() as con:
            row = con.execute(
                "SELECT params FROM cluster_runs WHERE model_version = ? "
                "ORDER BY run_id DESC LIMIT 1",
                [model_version],
            ).fetchall()
        return json.loads(row[0][0] or "{}") if row else None

    def carried_over(
        self, model_version: str, earlier: str
    ) -> tuple[list[PreviousCluster], int, dict[int, tuple]]:
        """An earlier version's clusters as this version's ``previous`` (its first run).

        Members are this version's rows of the same images (by content); with the review
        state (status, name, promoted_into) of each, and the earlier version's next free id.
        For versions that share the embedding, so that the centroids still apply.
        """
        with self.store._connection() as con:
            rows = con.execute(
                "SELECT cluster_id, centroid, radius, size, status, name, promoted_into "
                "FROM clusters WHERE model_version = ?",
                [earlier],
            ).fetchall()
            members = con.execute(
                "SELECT o.cluster_id, list(n.id ORDER BY n.id) FROM predictions o "
                "JOIN predictions n ON n.sha256 = o.sha256 AND n.model_version = ? "
                "WHERE o.model_version = ? AND o.cluster_id >= 0 GROUP BY o.cluster_id",
                [model_version, earlier],
            ).fetchall()
        states = {int(r[0]): tuple(r[4:]) for r in rows}
        return _alive(rows, members), max((r[0] for r in rows), default=-1) + 1, states

    def unknowns(
        self, model_version: str, poor_quality: bool = False
    ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
        """Ids, embeddings, Top-1 and Top-2 classes of the version's UNKNOWN images.

        Photos of poor quality only with ``poor_quality``; never near-duplicates set aside.
        """
        import pyarrow as pa

        query = (
            "SELECT p.id, coalesce(p.top1_class, '') AS top1, coalesce(p.top2_class, '') AS top2, "
            "e.embedding FROM predictions p JOIN embeddings e USING (id) "
            "WHERE p.model_version = ? AND p.label = ? "
            + ("" if poor_quality else "AND p.quality_flags IS NULL ")
            + "AND p.duplicate_of IS NULL "  # set aside: a near-duplicate was kept instead
            + "ORDER BY p.id"
        )
        with self.store._connection() as con:
            reader = con.sql(query, params=[model_version, UNKNOWN]).to_arrow_reader(8192)
            table = pa.Table.from_batches(list(reader), schema=reader.schema)  # none: typed
        ids, x = embedding_matrix(table, 1)
        return ids, x, table.column("top1").to_pylist(), table.column("top2").to_pylist()

    def left_out(self, model_version: str, poor_quality: bool = False) -> dict[str, int]:
        """The version's UNKNOWN images :meth:`unknowns` leaves out, by why.

        ``poor_quality``: photos of poor quality (0 when they are clustered too);
        ``set_aside``: near-duplicates a person set aside.
        """
        with self.store._connection() as con:
            poor, aside = con.execute(
                "SELECT count(*) FILTER (WHERE quality_flags IS NOT NULL AND duplicate_of IS NULL), "
                "count(*) FILTER (WHERE duplicate_of IS NOT NULL) "
                "FROM predictions WHERE model_version = ? AND label = ?",
                [model_version, UNKNOWN],
            ).fetchone()
        return {"poor_quality": 0 if poor_quality else int(poor), "set_aside": int(aside)}

    def save_run(
        self,
        model_version: str,
        ids: np.ndarray,
        labels: np.ndarray,
        outlier: np.ndarray,
        clusters: Sequence[Any],
        noise: int,
        params: dict[str, Any],
        seconds: dict[str, float],
        carried: dict[int, tuple] | None = None,
    ) -> int:
        """Store one clustering run in one transaction; returns its run id.

        ``labels`` give each of ``ids`` its cluster (-1 noise) and ``outlier`` its GLOSH score
        (NaN: none); ``clusters`` (search's
        ``Cluster``) replace their rows, keeping status, name, creation and promotion; clusters
        not found again keep their row with size 0. ``carried``: the review state (status,
        name, promoted_into) of an earlier version's clusters a new one continues.
        """
        import pyarrow as pa

        with self.store._connection() as con:
            stamp = now()
            run_id = con.execute(
                "SELECT coalesce(max(run_id), 0) + 1 FROM cluster_runs"
            ).fetchall()[0][0]
            old = {
                r[0]: r[1:]
                for r in con.execute(
                    "SELECT cluster_id, status, name, created_at, promoted_into FROM clusters "
                    "WHERE model_version = ?",
                    [model_version],
                ).fetchall()
            }
            rows = []
            for c in clusters:
                status, name, into = (carried or {}).get(c.cluster_id, ("new", None, None))
                status, name, created, into = old.get(c.cluster_id, (status, name, stamp, into))
                centroid = c.centroid.astype(np.float32).tolist()
                top1, top2 = json.dumps(c.top1), json.dumps(c.top2)
                rows.append(
                    [model_version, c.cluster_id, status, name, c.size, c.medoid_id]
                    + [float(c.cohesion), float(c.radius), centroid, top1, top2, run_id]
                    + [created, stamp, into]
                )
            outlier = np.asarray(outlier, np.float32)
            labels = pa.table(
                {
                    "id": pa.array(ids, pa.int64()),
                    "cluster_id": pa.array(labels, pa.int32()),
                    "outlier": pa.array(outlier, pa.float32(), mask=np.isnan(outlier)),
                }
            )
            with self.store._transaction({"_labels": labels}) as tx:
                tx.execute(
                    "UPDATE predictions SET cluster_id = NULL, cluster_outlier = NULL "
                    "WHERE model_version = ? AND cluster_id IS NOT NULL",
                    [model_version],
                )
                tx.execute(
                    "UPDATE predictions SET cluster_id = _labels.cluster_id, "
                    "cluster_outlier = _labels.outlier FROM _labels "
                    "WHERE predictions.id = _labels.id"
                )
                tx.execute(
                    "DELETE FROM clusters WHERE model_version = ? "
                    "AND cluster_id IN (SELECT unnest(?::INTEGER[]))",
                    [model_version, [c.cluster_id for c in clusters]],
                )
                if rows:
                    tx.executemany(f"INSERT INTO clusters VALUES ({', '.join('?' * 15)})", rows)
                tx.execute(
                    "UPDATE clusters SET size = 0, run_id = ?, updated_at = ? "
                    "WHERE model_version = ? AND run_id <> ?",
                    [run_id, stamp, model_version, run_id],
                )
                tx.execute(
                    "INSERT INTO cluster_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        run_id,
                        model_version,
                        stamp,
                        len(ids),
                        len(clusters),
                        noise,
                        json.dumps(params),
                        json.dumps(seconds),
                    ],
                )
        return run_id

    def listing(self, model_version: str) -> list[dict[str, Any]]:
        """The version's clusters, largest first: CLUSTER_FIELDS and four more.

        ``promoted_into``: the folder of its last promotion; ``excluded``: members left out of
        promotion; ``pending``: members a promotion would take that no person has labelled yet
        (not left out, not set aside), such as UNKNOWNs that joined a promoted cluster since;
        ``open``: work for review, a cluster found in the last run that is new or named, or
        promoted with members pending (a promotion adds them to the same class).
        """
        with self.store._connection() as con:
            rows = con.execute(
                "SELECT c.cluster_id, c.status, c.name, c.size, c.cohesion, c.radius, c.medoid_id, "
                "m.source, c.top1, c.top2, c.promoted_into, "
                "(SELECT count(*) FROM cluster_exclusions x WHERE x.model_version = c.model_version "
                "AND x.cluster_id = c.cluster_id) AS excluded, coalesce(w.pending, 0) AS pending, "
                f"{_OPEN} FROM clusters c LEFT JOIN predictions m ON m.id = c.medoid_id "
                f"LEFT JOIN ({_PENDING.format(only='')}) w ON w.cluster_id = c.cluster_id "
                "WHERE c.model_version = $v ORDER BY c.size DESC, c.cluster_id",
                {"v": model_version},
            ).fetchall()
        keys = (*CLUSTER_FIELDS, "promoted_into", "excluded", "pending", "open")
        out = []
        for r in rows:
            d = dict(zip(keys, r, strict=True))
            d["top1"], d["top2"] = json.loads(d["top1"] or "{}"), json.loads(d["top2"] or "{}")
            d["cohesion"] = None if d["cohesion"] is None else round(float(d["cohesion"]), 4)
            d["radius"] = None if d["radius"] is None else round(float(d["radius"]), 4)
            out.append(d)
        return out

    def open_count(self, model_version: str) -> int:
        """How many of the version's clusters ``listing`` says are ``open`` (the app's header).

        Only promoted clusters' members are read. A listing reads every clustered row: 70-110
        ms for 1,000,000 rows, 333,000 of them in 500 clusters, a quarter promoted; this 22 ms.
        """
        promoted = (
            "AND p.cluster_id IN (SELECT cluster_id FROM clusters "
            "WHERE model_version = $v AND status = 'promoted') "
        )
        with self.store._connection() as con:
            return con.execute(
                f"SELECT count(*) FROM clusters c LEFT JOIN ({_PENDING.format(only=promoted)}) w "
                f"ON w.cluster_id = c.cluster_id WHERE c.model_version = $v AND {_OPEN}",
                {"v": model_version},
            ).fetchall()[0][0]

    def members(
        self,
        model_version: str,
        cluster_id: int | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[ClusterMember]:
        """Members of one cluster (or of every cluster and noise), up to ``limit`` from ``offset``.

        Least typical first (highest outlier score), so review meets the doubtful ones first;
        then by id.
        """
        which = "cluster_id IS NOT NULL" if cluster_id is None else "cluster_id = ?"
        with self.store._connection() as con:
            rows = con.execute(
                "SELECT id, source, sha256, cluster_id, top1_class, top1_prob, "
                "id IN (SELECT id FROM cluster_exclusions e WHERE e.model_version = p.model_version "
                f"AND e.cluster_id = p.cluster_id) FROM predictions p WHERE model_version = ? "
                f"AND {which} ORDER BY cluster_outlier DESC NULLS LAST, id LIMIT ? OFFSET ?",
                [
                    model_version,
                    *([] if cluster_id is None else [int(cluster_id)]),
                    limit,
                    int(offset),
                ],
            ).fetchall()
        return [ClusterMember(*r) for r in rows]

    def status(self, model_version: str, cluster_id: int) -> tuple[str, str | None] | None:
        """A cluster's (status, name), or None when there is no such cluster."""
        with self.store._connection() as con:
            row = con.execute(
                "SELECT status, name FROM clusters WHERE model_version = ? AND cluster_id = ?",
                [model_version, cluster_id],
            ).fetchall()
        return (row[0][0], row[0][1]) if row else None

    def name(self, model_version: str, cluster_id: int, name: str) -> None:
        """Name a cluster: a new or rejected one becomes ``named`` (a person changed their mind)."""
        self._update(
            "name = ?, status = CASE WHEN status IN ('new', 'rejected') THEN 'named' "
            "ELSE status END",
            [name],
            model_version,
            cluster_id,
        )

    def reject(self, model_version: str, cluster_id: int) -> None:
        """Mark a cluster rejected."""
        self._update("status = 'rejected'", [], model_version, cluster_id)

    def promoted(self, model_version: str, cluster_id: int, name: str, into: str) -> None:
        """Mark a cluster promoted under ``name`` into the folder ``into``."""
        self._update(
            "status = 'promoted', name = ?, promoted_into = ?",
            [name, into],
            model_version,
            cluster_id,
        )

    def review_state(self, model_version: str, cluster_id: int) -> dict[str, Any]:
        """What review set on a cluster (status, name, promoted_into): what an undo puts back."""
        with self.store._connection() as con:
            row = con.execute(
                "SELECT status, name, promoted_into FROM clusters "
                "WHERE model_version = ? AND cluster_id = ?",
                [model_version, cluster_id],
            ).fetchall()[0]
        return dict(zip(("status", "name", "promoted_into"), row, strict=True))

    def restore(self, model_version: str, cluster_id: int, state: dict[str, Any]) -> None:
        """Put back what :meth:`review_state` read."""
        self._update(
            "status = ?, name = ?, promoted_into = ?",
            [state["status"], state["name"], state["promoted_into"]],
            model_version,
            cluster_id,
        )

    def _update(self, sets: str, values: list, model_version: str, cluster_id: int) -> None:
        with self.store._connection() as con:
            con.execute(
                f"UPDATE clusters SET {sets}, updated_at = ? WHERE model_version = ? AND cluster_id = ?",
                [*values, now(), model_version, cluster_id],
            )

    def join(self, ids: Sequence[int], cluster_ids: Sequence[int]) -> None:
        """Stored new UNKNOWNs join existing clusters (a bulk ingest's, decided after it)."""
        with self.store._connection() as con:
            con.execute(
                "UPDATE predictions SET cluster_id = j.c FROM (SELECT unnest(?::BIGINT[]) AS id, "
                "unnest(?::INTEGER[]) AS c) j WHERE predictions.id = j.id",
                [[int(i) for i in ids], [int(c) for c in cluster_ids]],
            )

    def exclude(self, model_version: str, cluster_id: int, ids: Sequence[int]) -> None:
        """Record ids to leave out of a cluster's promotion (idempotent)."""
        with self.store._connection() as con:
            con.executemany(
                "INSERT OR IGNORE INTO cluster_exclusions VALUES (?, ?, ?)",
                [[model_version, cluster_id, int(i)] for i in ids],
            )

    def include(self, model_version: str, cluster_id: int, ids: Sequence[int]) -> None:
        """Take ids off a cluster's exclusions (they are promoted with it again)."""
        with self.store._connection() as con:
            con.execute(
                "DELETE FROM cluster_exclusions WHERE model_version = ? AND cluster_id = ? "
                "AND id IN (SELECT unnest(?::BIGINT[]))",
                [model_version, cluster_id, [int(i) for i in ids]],
            )

    def excluded(self, model_version: str, cluster_id: int) -> set[int]:
        """The ids left out of a cluster's promotion."""
        with self.store._connection() as con:
            rows = con.execute(
                "SELECT id FROM cluster_exclusions WHERE model_version = ? AND cluster_id = ?",
                [model_version, cluster_id],
            ).fetchall()
        return {r[0] for r in rows}


def _alive(rows: list[tuple], members: list[tuple]) -> list[PreviousCluster]:
    """``PreviousCluster`` of each cluster row (id, centroid, radius, size, ...) still alive.

    ``members``: (cluster id, its member row ids) pairs.
    """
    by_cluster = {c: np.array(ids, np.int64) for c, ids in members}
    return [
        PreviousCluster(
            int(cid),
            by_cluster.get(cid, np.zeros(0, np.int64)),
            np.array(centroid, np.float32),
            float(radius),
        )
        for cid, centroid, radius, size, *_ in rows
        if size > 0 and centroid is not None
    ]
