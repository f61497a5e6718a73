"""The review loop over the store: cluster UNKNOWNs, name, reject, trim, export, promote.

Cluster ids are stable: each run matches its clusters to the previous run's (shared members,
then centroid distance), so a name given to cluster 7 stays on it. Between runs, new UNKNOWNs
are assigned to the nearest existing cluster whose radius covers them as they are scored.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imagesieve._workspace import Workspace
from imagesieve.classifier import UNKNOWN, Progress
from imagesieve.indexer import Store
from imagesieve.indexer._images import image_source
from imagesieve.indexer._score import sort_into
from imagesieve.indexer._store import STORE_FILE, embedding_matrix, using_store
from imagesieve.models import get_version
from imagesieve.search._cluster import (
    Clustering,
    ClusterParams,
    PreviousCluster,
    cluster_embeddings,
)

__all__ = [
    "STATUSES",
    "ClusterRun",
    "PromoteResult",
    "ReviewError",
    "export_clusters",
    "list_clusters",
    "load_clusters",
    "promote_cluster",
    "run_clustering",
    "update_cluster",
]

STATUSES = ("new", "named", "promoted", "rejected")
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
NOISE = -1


class ReviewError(ValueError):
    """A review action that cannot be done (unknown cluster, bad name, ...); one line."""


@dataclass
class ClusterRun:
    """One clustering run: what was clustered and the clusters it left in the store."""

    run_id: int
    model_version: str
    images: int
    noise: int
    clusters: list[dict[str, Any]]
    seconds: dict[str, float]
    params: dict[str, Any]
    export_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class PromoteResult:
    """What promoting a cluster copied where."""

    cluster_id: int
    name: str
    dest: str
    copied: int = 0
    already_there: int = 0
    excluded: int = 0
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def load_clusters(store: Store, model_version: str) -> tuple[list[PreviousCluster], int]:
    """The version's clusters still alive (size > 0) with their members, and the next free id."""
    rows = store.con.execute(
        "SELECT cluster_id, centroid, radius, size FROM clusters WHERE model_version = ?",
        [model_version],
    ).fetchall()
    next_id = max((r[0] for r in rows), default=-1) + 1
    members = store.con.execute(
        "SELECT cluster_id, list(id ORDER BY id) FROM predictions "
        "WHERE model_version = ? AND cluster_id >= 0 GROUP BY cluster_id",
        [model_version],
    ).fetchall()
    by_cluster = {c: np.array(ids, np.int64) for c, ids in members}
    previous = [
        PreviousCluster(
            int(cid),
            by_cluster.get(cid, np.zeros(0, np.int64)),
            np.array(centroid, np.float32),
            float(radius),
        )
        for cid, centroid, radius, size in rows
        if size > 0 and centroid is not None
    ]
    return previous, next_id


def _unknown_rows(
    store: Store, model_version: str
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Ids, embeddings, Top-1 and Top-2 classes of the version's UNKNOWN images."""
    import pyarrow as pa

    query = (
        "SELECT p.id, coalesce(p.top1_class, '') AS top1, coalesce(p.top2_class, '') AS top2, "
        "e.embedding FROM predictions p JOIN embeddings e USING (id) "
        "WHERE p.model_version = ? AND p.label = ? ORDER BY p.id"
    )
    reader = store.con.sql(query, params=[model_version, UNKNOWN]).to_arrow_reader(8192)
    table = pa.Table.from_batches(list(reader), schema=reader.schema)  # none: empty, typed
    ids, x = embedding_matrix(table, 1)
    return ids, x, table.column("top1").to_pylist(), table.column("top2").to_pylist()


def run_clustering(
    ws: Workspace,
    params: ClusterParams | None = None,
    *,
    model: str | None = None,
    store: Store | None = None,
    export: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> ClusterRun:
    """Cluster the version's UNKNOWN images, keep ids stable, store the result, export folders.

    ``export`` is where ``cluster_<id>/``, ``noise/`` and ``summary.csv`` go (default
    ``<workspace>/clusters``, rewritten each run).
    """
    import pyarrow as pa

    params = params or ClusterParams()
    progress = progress or (lambda stage, done, total: None)
    version = get_version(ws, model).name
    with using_store(ws, store) as store:
        progress("clustering", 0, 1)
        with store.lock:
            ids, x, top1, top2 = _unknown_rows(store, version)
            previous, next_id = load_clusters(store, version)
        # Seconds at scale, so without the store's lock: a server keeps storing predictions,
        # and the UNKNOWNs it stores meanwhile stay unclustered until the next run.
        result: Clustering = cluster_embeddings(ids, x, top1, top2, params, previous, next_id)
        progress("clustering", 1, 1)
        with store.lock:
            now = _now()
            run_id = int(
                store.con.execute(
                    "SELECT coalesce(max(run_id), 0) + 1 FROM cluster_runs"
                ).fetchall()[0][0]
            )
            old = {
                r[0]: r[1:]
                for r in store.con.execute(
                    "SELECT cluster_id, status, name, created_at, promoted_into FROM clusters WHERE model_version = ?",
                    [version],
                ).fetchall()
            }
            labels = pa.table(
                {"id": pa.array(ids, pa.int64()), "cluster_id": pa.array(result.labels, pa.int32())}
            )
            rows = []
            for c in result.clusters:
                status, name, created, promoted_into = old.get(
                    c.cluster_id, ("new", None, now, None)
                )
                rows.append(
                    {
                        "model_version": version,
                        "cluster_id": c.cluster_id,
                        "status": status,
                        "name": name,
                        "size": c.size,
                        "medoid_id": c.medoid_id,
                        "cohesion": float(c.cohesion),
                        "radius": float(c.radius),
                        "centroid": c.centroid.astype(np.float32).tolist(),
                        "top1": json.dumps(c.top1),
                        "top2": json.dumps(c.top2),
                        "run_id": run_id,
                        "created_at": created,
                        "updated_at": now,
                        "promoted_into": promoted_into,
                    }
                )
            fresh = pa.Table.from_pylist(rows, schema=_CLUSTER_SCHEMA())
            store.con.register("_labels", labels)
            store.con.register("_fresh", fresh)
            try:
                store.con.execute("BEGIN TRANSACTION")
                store.con.execute(
                    "UPDATE predictions SET cluster_id = NULL WHERE model_version = ? AND cluster_id IS NOT NULL",
                    [version],
                )
                store.con.execute(
                    "UPDATE predictions SET cluster_id = _labels.cluster_id FROM _labels "
                    "WHERE predictions.id = _labels.id"
                )
                store.con.execute(
                    "DELETE FROM clusters WHERE model_version = ? AND cluster_id IN (SELECT cluster_id FROM _fresh)",
                    [version],
                )
                store.con.execute("INSERT INTO clusters SELECT * FROM _fresh")
                store.con.execute(
                    "UPDATE clusters SET size = 0, run_id = ?, updated_at = ? WHERE model_version = ? AND run_id <> ?",
                    [run_id, now, version, run_id],
                )
                store.con.execute(
                    "INSERT INTO cluster_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        run_id,
                        version,
                        now,
                        len(ids),
                        len(result.clusters),
                        len(result.noise_ids),
                        json.dumps(asdict(result.params)),
                        json.dumps({k: round(v, 3) for k, v in result.seconds.items()}),
                    ],
                )
                store.con.execute("COMMIT")
            except BaseException:
                store.con.execute("ROLLBACK")
                raise
            finally:
                store.con.unregister("_labels")
                store.con.unregister("_fresh")
            export_dir = Path(export) if export is not None else ws.root / "clusters"
            if export is None and export_dir.exists():
                shutil.rmtree(export_dir)  # the default export is derived: rewritten each run
            export_clusters(store, ws, version, export_dir)
            listed = _list(store, version)
    return ClusterRun(
        run_id,
        version,
        len(ids),
        len(result.noise_ids),
        [c for c in listed if c["size"] > 0],
        {k: round(v, 3) for k, v in result.seconds.items()},
        asdict(result.params),
        str(export_dir),
    )


def _CLUSTER_SCHEMA():  # noqa: N802 - a constant built lazily (pyarrow import)
    import pyarrow as pa

    return pa.schema(
        [
            ("model_version", pa.string()),
            ("cluster_id", pa.int32()),
            ("status", pa.string()),
            ("name", pa.string()),
            ("size", pa.int32()),
            ("medoid_id", pa.int64()),
            ("cohesion", pa.float32()),
            ("radius", pa.float32()),
            ("centroid", pa.list_(pa.float32())),
            ("top1", pa.string()),
            ("top2", pa.string()),
            ("run_id", pa.int32()),
            ("created_at", pa.timestamp("us", tz="UTC")),
            ("updated_at", pa.timestamp("us", tz="UTC")),
            ("promoted_into", pa.string()),
        ]
    )


def _list(store: Store, model_version: str) -> list[dict[str, Any]]:
    rows = store.con.execute(
        "SELECT c.cluster_id, c.status, c.name, c.size, c.cohesion, c.radius, c.medoid_id, "
        "m.source, c.top1, c.top2, c.promoted_into, "
        "(SELECT count(*) FROM cluster_exclusions x WHERE x.model_version = c.model_version "
        "AND x.cluster_id = c.cluster_id) AS excluded "
        "FROM clusters c LEFT JOIN predictions m ON m.id = c.medoid_id "
        "WHERE c.model_version = ? ORDER BY c.size DESC, c.cluster_id",
        [model_version],
    ).fetchall()
    keys = (*CLUSTER_FIELDS, "promoted_into", "excluded")
    out = []
    for r in rows:
        d = dict(zip(keys, r, strict=True))
        d["top1"], d["top2"] = json.loads(d["top1"] or "{}"), json.loads(d["top2"] or "{}")
        d["cohesion"] = None if d["cohesion"] is None else round(float(d["cohesion"]), 4)
        d["radius"] = None if d["radius"] is None else round(float(d["radius"]), 4)
        out.append(d)
    return out


def list_clusters(
    ws: Workspace, *, model: str | None = None, store: Store | None = None
) -> list[dict[str, Any]]:
    """The version's clusters, largest first, with status, name, size, medoid and histograms."""
    version = get_version(ws, model).name
    if store is None and not (ws.root / STORE_FILE).is_file():
        return []  # nothing scored yet, so nothing clustered
    with using_store(ws, store, read_only=True) as store, store.lock:
        return _list(store, version)


def _member_rows(store: Store, model_version: str, cluster_id: int) -> list[tuple[int, str, str]]:
    return store.con.execute(
        "SELECT id, source, sha256 FROM predictions WHERE model_version = ? AND cluster_id = ? ORDER BY id",
        [model_version, cluster_id],
    ).fetchall()


def export_clusters(
    store: Store, ws: Workspace, model_version: str, dest: str | os.PathLike
) -> Path:
    """Copy clusters into ``dest/cluster_<id>/`` and noise into ``dest/noise/``; write a summary.

    ``dest/summary.csv`` has one row per cluster, with how many images are no longer available.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rows = store.con.execute(
        "SELECT id, source, sha256, cluster_id FROM predictions "
        "WHERE model_version = ? AND cluster_id IS NOT NULL ORDER BY id",
        [model_version],
    ).fetchall()
    missing: dict[int, int] = {}
    for _, source, sha, cid in rows:
        content = image_source(ws, sha, source)
        if content is None:
            missing[cid] = missing.get(cid, 0) + 1
            continue
        folder = "noise" if cid == NOISE else f"cluster_{cid}"
        sort_into(dest, folder, _filename(source), content, sha)
    with open(dest / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*CLUSTER_FIELDS, "missing_images"])
        for c in _list(store, model_version):
            if c["size"] == 0:
                continue
            for hist in ("top1", "top2"):
                c[hist] = "; ".join(f"{k} {v}" for k, v in c[hist].items())
            c["name"] = c["name"] or ""
            w.writerow([*(c[k] for k in CLUSTER_FIELDS), missing.get(c["cluster_id"], 0)])
    return dest


def _filename(source: str) -> str:
    from urllib.parse import unquote, urlsplit

    if source.lower().startswith(("http://", "https://")):
        source = unquote(urlsplit(source).path)
    return source.replace("\\", "/").rsplit("/", 1)[-1].rsplit(":", 1)[-1] or "image"


def _check_cluster(store: Store, model_version: str, cluster_id: int) -> tuple[str, str | None]:
    row = store.con.execute(
        "SELECT status, name FROM clusters WHERE model_version = ? AND cluster_id = ?",
        [model_version, cluster_id],
    ).fetchall()
    if not row:
        raise ReviewError(
            f"no cluster {cluster_id} for model {model_version}; run 'imagesieve cluster'"
        )
    return row[0]


def update_cluster(
    ws: Workspace,
    cluster_id: int,
    *,
    name: str | None = None,
    reject: bool = False,
    exclude: tuple[int, ...] = (),
    model: str | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Name a cluster, reject it, or exclude member ids from its promotion; returns its row."""
    version = get_version(ws, model).name
    with using_store(ws, store, check=False) as store, store.lock:
        _check_cluster(store, version, cluster_id)
        if name is not None:
            name = _class_name(name)
            store.con.execute(
                "UPDATE clusters SET name = ?, status = CASE WHEN status = 'new' THEN 'named' ELSE status END, "
                "updated_at = ? WHERE model_version = ? AND cluster_id = ?",
                [name, _now(), version, cluster_id],
            )
        if reject:
            store.con.execute(
                "UPDATE clusters SET status = 'rejected', updated_at = ? WHERE model_version = ? AND cluster_id = ?",
                [_now(), version, cluster_id],
            )
        if exclude:
            members = {r[0] for r in _member_rows(store, version, cluster_id)}
            strangers = sorted(set(exclude) - members)
            if strangers:
                raise ReviewError(
                    f"ids not in cluster {cluster_id}: {', '.join(map(str, strangers))}"
                )
            _exclude(store, version, cluster_id, exclude)
        return next(c for c in _list(store, version) if c["cluster_id"] == cluster_id)


def _exclude(store: Store, model_version: str, cluster_id: int, ids: tuple[int, ...]) -> None:
    """Record ids to leave out of a cluster's promotion (idempotent)."""
    store.con.executemany(
        "INSERT OR IGNORE INTO cluster_exclusions VALUES (?, ?, ?)",
        [[model_version, cluster_id, int(i)] for i in ids],
    )


def _class_name(name: str) -> str:
    """A class name usable as one folder name, or ReviewError."""
    clean = name.strip()
    if (
        not clean
        or clean in (".", "..")
        or any(ch in clean for ch in "/\\\x00")
        or clean.startswith(".")
    ):
        raise ReviewError(
            f"{name!r} cannot be a class name (one folder name: no '/', '\\\\', leading '.')"
        )
    return clean


def promote_cluster(
    ws: Workspace,
    cluster_id: int,
    name: str,
    into: str | os.PathLike,
    *,
    exclude: tuple[int, ...] = (),
    model: str | None = None,
    store: Store | None = None,
) -> PromoteResult:
    """Copy a cluster's images (minus excluded ids) into the training data; mark it promoted.

    Images go to ``into/<name>/`` (``into/train/<name>/`` for a pre-split folder); naming an
    existing class merges into its folder. Identical content already there is not copied again.
    """
    version = get_version(ws, model).name
    name = _class_name(name)
    into = Path(into)
    if not into.is_dir():
        raise ReviewError(f"training data folder not found: {into}")
    dest = into / "train" / name if (into / "train").is_dir() else into / name
    with using_store(ws, store, check=False) as store, store.lock:
        status, _ = _check_cluster(store, version, cluster_id)
        if status == "rejected":
            raise ReviewError(f"cluster {cluster_id} was rejected; name it again to promote it")
        if exclude:
            _exclude(store, version, cluster_id, exclude)
        excluded = {
            r[0]
            for r in store.con.execute(
                "SELECT id FROM cluster_exclusions WHERE model_version = ? AND cluster_id = ?",
                [version, cluster_id],
            ).fetchall()
        }
        result = PromoteResult(cluster_id, name, str(dest))
        members = _member_rows(store, version, cluster_id)
        if not members:
            raise ReviewError(
                f"cluster {cluster_id} has no members now; run 'imagesieve cluster' again"
            )
        dest.mkdir(parents=True, exist_ok=True)
        before = {p.name for p in dest.iterdir()}
        for id_, source, sha in members:
            if id_ in excluded:
                result.excluded += 1
                continue
            content = image_source(ws, sha, source)
            if content is None:
                result.missing.append(source)
                continue
            target = sort_into(
                into if dest.parent == into else dest.parent, name, _filename(source), content, sha
            )
            if target.name in before:
                result.already_there += 1
            else:
                result.copied += 1
        store.con.execute(
            "UPDATE clusters SET status = 'promoted', name = ?, promoted_into = ?, updated_at = ? "
            "WHERE model_version = ? AND cluster_id = ?",
            [name, str(dest), _now(), version, cluster_id],
        )
    return result
