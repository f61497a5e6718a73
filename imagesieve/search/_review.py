"""The review loop over the store: cluster UNKNOWNs, name, reject, trim, export, promote.

Cluster ids are stable: each run matches its clusters to the previous run's (shared members,
then centroid distance), so a name given to cluster 7 stays on it. Between runs, new UNKNOWNs
are assigned to the nearest existing cluster whose radius covers them as they are scored.
"""

from __future__ import annotations

import csv
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imagesieve._errors import SieveError
from imagesieve._workspace import Workspace
from imagesieve.classifier import Progress, ReferenceSet
from imagesieve.data import sort_into
from imagesieve.models import get_version
from imagesieve.search._cluster import (
    Clustering,
    ClusterParams,
    class_tightness,
    cluster_embeddings,
)
from imagesieve.store import CLUSTER_FIELDS, STORE_FILE, Store, image_source, using_store

__all__ = [
    "ClusterRun",
    "PromoteResult",
    "ReviewError",
    "export_clusters",
    "list_clusters",
    "promote_cluster",
    "run_clustering",
    "update_cluster",
]

NOISE = -1


class ReviewError(SieveError, ValueError):
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
    params = params or ClusterParams()
    progress = progress or (lambda stage, done, total: None)
    info = get_version(ws, model)
    version = info.name
    reference = ReferenceSet.load(info.path)
    tightness = (
        None if reference is None else class_tightness(reference.embeddings, reference.labels)
    )
    with using_store(ws, store) as store:
        progress("clustering", 0, 1)
        with store.lock:
            ids, x, top1, top2 = store.clusters.unknowns(version)
            previous, next_id = store.clusters.previous(version)
        # Seconds at scale, so without the store's lock: a server keeps storing predictions,
        # and the UNKNOWNs it stores meanwhile stay unclustered until the next run.
        result: Clustering = cluster_embeddings(
            ids, x, top1, top2, params, previous, next_id, tightness
        )
        progress("clustering", 1, 1)
        seconds = {k: round(v, 3) for k, v in result.seconds.items()}
        with store.lock:
            if result.model is not None:
                result.model.save(cluster_model_path(ws, version))
            else:
                cluster_model_path(ws, version).unlink(missing_ok=True)
            run_id = store.clusters.save_run(
                version,
                ids,
                result.labels,
                result.outlier,
                result.clusters,
                len(result.noise_ids),
                asdict(result.params) | {"min_cluster_size_used": result.min_cluster_size},
                seconds,
            )
            export_dir = Path(export) if export is not None else ws.root / "clusters"
            if export is None and export_dir.exists():
                shutil.rmtree(export_dir)  # the default export is derived: rewritten each run
            export_clusters(store, ws, version, export_dir)
            listed = store.clusters.listing(version)
    return ClusterRun(
        run_id,
        version,
        len(ids),
        len(result.noise_ids),
        [c for c in listed if c["size"] > 0],
        seconds,
        asdict(result.params),
        str(export_dir),
    )


def cluster_model_path(ws: Workspace, version: str) -> Path:
    """Where the version's last clustering run keeps its :class:`ClusterModel` (derived data)."""
    return ws.cache_dir / "clusters" / f"{version}.pkl"


def list_clusters(
    ws: Workspace, *, model: str | None = None, store: Store | None = None
) -> list[dict[str, Any]]:
    """The version's clusters, largest first, with status, name, size, medoid and histograms."""
    version = get_version(ws, model).name
    if store is None and not (ws.root / STORE_FILE).is_file():
        return []  # nothing scored yet, so nothing clustered
    with using_store(ws, store, read_only=True) as store:
        return store.clusters.listing(version)


def export_clusters(
    store: Store, ws: Workspace, model_version: str, dest: str | os.PathLike
) -> Path:
    """Copy clusters into ``dest/cluster_<id>/`` and noise into ``dest/noise/``; write a summary.

    ``dest/summary.csv`` has one row per cluster, with how many images are no longer available.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    missing: dict[int, int] = {}
    for m in store.clusters.members(model_version):
        content = image_source(ws, m.sha256, m.source)
        if content is None:
            missing[m.cluster_id] = missing.get(m.cluster_id, 0) + 1
            continue
        folder = "noise" if m.cluster_id == NOISE else f"cluster_{m.cluster_id}"
        sort_into(dest, folder, _filename(m.source), content, m.sha256)
    with open(dest / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*CLUSTER_FIELDS, "missing_images"])
        for c in store.clusters.listing(model_version):
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
    status = store.clusters.status(model_version, cluster_id)
    if status is None:
        raise ReviewError(
            f"no cluster {cluster_id} for model {model_version}; run 'imagesieve cluster'"
        )
    return status


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
            store.clusters.name(version, cluster_id, _class_name(name))
        if reject:
            store.clusters.reject(version, cluster_id)
        if exclude:
            members = {m.id for m in store.clusters.members(version, cluster_id)}
            strangers = sorted(set(exclude) - members)
            if strangers:
                raise ReviewError(
                    f"ids not in cluster {cluster_id}: {', '.join(map(str, strangers))}"
                )
            store.clusters.exclude(version, cluster_id, exclude)
        return next(c for c in store.clusters.listing(version) if c["cluster_id"] == cluster_id)


def _class_name(name: str) -> str:
    """A class name usable as one folder name, or ReviewError."""
    clean = name.strip()
    if not clean or clean.startswith(".") or any(ch in clean for ch in "/\\\x00"):
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
            store.clusters.exclude(version, cluster_id, exclude)
        excluded = store.clusters.excluded(version, cluster_id)
        result = PromoteResult(cluster_id, name, str(dest))
        members = store.clusters.members(version, cluster_id)
        if not members:
            raise ReviewError(
                f"cluster {cluster_id} has no members now; run 'imagesieve cluster' again"
            )
        dest.mkdir(parents=True, exist_ok=True)
        before = {p.name for p in dest.iterdir()}
        for m in members:
            if m.id in excluded:
                result.excluded += 1
                continue
            content = image_source(ws, m.sha256, m.source)
            if content is None:
                result.missing.append(m.source)
                continue
            target = sort_into(dest.parent, name, _filename(m.source), content, m.sha256)
            if target.name in before:
                result.already_there += 1
            else:
                result.copied += 1
        store.clusters.promoted(version, cluster_id, name, str(dest))
    return result
