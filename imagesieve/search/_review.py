"""The review loop over the store: cluster UNKNOWNs, name, reject, trim, export, promote.

Cluster ids are stable: each run matches its clusters to the previous run's (shared members,
then centroid distance), so a name given to cluster 7 stays on it. Between runs, new UNKNOWNs
are assigned to the nearest existing cluster whose radius covers them as they are scored.
"""

from __future__ import annotations

import csv
import getpass
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from imagesieve._errors import SieveError, UserError
from imagesieve._workspace import Workspace
from imagesieve.classifier import UNKNOWN, Progress, ReferenceSet
from imagesieve.data import sort_into
from imagesieve.models import active_version, get_version, read_history
from imagesieve.search._cluster import (
    Clustering,
    ClusterParams,
    class_tightness,
    cluster_embeddings,
)
from imagesieve.store import (
    CLUSTER_FIELDS,
    STORE_FILE,
    AuditFile,
    HumanLabel,
    ImageQuery,
    Store,
    browse,
    image_source,
    using_store,
)

__all__ = [
    "ClusterRun",
    "PromoteResult",
    "ReviewError",
    "browse_images",
    "class_folder",
    "class_name",
    "continue_clustering",
    "export_clusters",
    "filename_of",
    "label_dict",
    "list_clusters",
    "local_user",
    "place_in_class",
    "promote_cluster",
    "run_clustering",
    "training_folder",
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
    #: UNKNOWN images not clustered, by why (``Clusters.left_out``): poor photos, set aside.
    left_out: dict[str, int] = field(default_factory=dict)
    #: The earlier version whose clusters this first run of a new version continued (ids,
    #: names and status carried over), if any.
    continued_from: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def continued_words(self) -> str:
        """Which version's clusters this run continued, in words ("" when none)."""
        if not self.continued_from:
            return ""
        return f"continuing {self.continued_from}'s clusters: their ids and names carry over"

    def left_out_words(self) -> str:
        """What was left out and how to include it, in words ("" when nothing was)."""
        poor, aside = self.left_out.get("poor_quality", 0), self.left_out.get("set_aside", 0)
        parts = [f"{poor:,} poor photo{'s' * (poor != 1)} (to be reshot)"] if poor else []
        parts += [f"{aside:,} near-duplicate{'s' * (aside != 1)} set aside"] if aside else []
        return f"left out: {', '.join(parts)}" if parts else ""


@dataclass
class PromoteResult:
    """What promoting a cluster copied where."""

    cluster_id: int
    name: str
    dest: str
    into: str  # the training folder ``dest`` is in: what the next training run reads
    copied: int = 0
    already_there: int = 0
    excluded: int = 0
    moved: int = 0  # out of another class folder a person had put them in
    missing: list[str] = field(default_factory=list)
    set_aside: int = 0  # near-duplicates a person set aside (keep-one): not copied
    #: Copied images that nearly duplicate a training image (``near_training``).
    near_training: list[dict[str, Any]] = field(default_factory=list)

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
    continues: str | None = None,
    folders: bool = True,
) -> ClusterRun:
    """Cluster the version's UNKNOWN images, keep ids stable, store the result, export folders.

    ``export`` is where ``cluster_<id>/``, ``noise/`` and ``summary.csv`` go (default
    ``<workspace>/clusters``, rewritten each run; none without ``folders``: a version not
    active yet, whose folders would replace the active one's). A version's first run continues the
    clusters of ``continues`` (default: the version whose history it scored) when both
    share the embedding.
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
            ids, x, top1, top2 = store.clusters.unknowns(version, params.poor_quality)
            left_out = store.clusters.left_out(version, params.poor_quality)
            previous, next_id = store.clusters.previous(version)
            carried, earlier = None, None
            if next_id == 0:  # never clustered: continue the clusters of the version before
                earlier = _earlier_in_same_space(ws, info, continues)
            if earlier is not None:
                previous, next_id, carried = store.clusters.carried_over(version, earlier)
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
                carried,
            )
            listed = store.clusters.listing(version)
        # Copying the images takes long at scale (each UNKNOWN's file), so without the lock:
        # a server goes on storing predictions meanwhile.
        export_dir = Path(export) if export is not None else ws.root / "clusters"
        if folders:
            if export is None and export_dir.exists():
                shutil.rmtree(export_dir)  # the default export is derived: rewritten each run
            export_clusters(store, ws, version, export_dir)
    return ClusterRun(
        run_id,
        version,
        len(ids),
        len(result.noise_ids),
        [c for c in listed if c["size"] > 0],
        seconds,
        asdict(result.params),
        str(export_dir) if folders else None,
        left_out,
        earlier,
    )


def continue_clustering(
    ws: Workspace,
    new: str,
    old: str,
    *,
    store: Store | None = None,
    progress: Progress | None = None,
) -> ClusterRun | None:
    """Cluster ``new``'s UNKNOWNs as ``old`` was last clustered, once ``new`` scored its history.

    So a retrain keeps the Unknowns view: the new version starts with clusters (continuing
    ``old``'s ids, names and status where they share the embedding), and the UNKNOWNs it
    scores next join them. None when ``old`` was never clustered or ``new`` has been. The
    folders are exported when ``new`` is the active version.
    """
    with using_store(ws, store) as store:
        with store.lock:
            last = store.clusters.last_params(old)
            if last is None or store.clusters.last_params(new) is not None:
                return None
        known = {f.name for f in fields(ClusterParams)}
        params = ClusterParams(**{k: v for k, v in last.items() if k in known})
        active = active_version(ws)
        return run_clustering(
            ws,
            params,
            model=new,
            store=store,
            progress=progress,
            continues=old,
            folders=active is not None and active.name == new,
        )


def _earlier_in_same_space(ws: Workspace, info: Any, earlier: str | None = None) -> str | None:
    """``earlier`` (else the version whose history ``info`` scored), if they share the embedding.

    Its clusters are what a new version's first clustering continues: ids, names and status
    carry over where the same images gather again.
    """
    if earlier is None:
        earlier = (read_history(info) or {}).get("old")
    if earlier is None or info.frozen_backbone is None:
        return None
    try:
        other = get_version(ws, earlier)
    except UserError:  # deleted since, or not a version any more: nothing to continue
        return None
    return other.name if other.frozen_backbone == info.frozen_backbone else None


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


def browse_images(
    ws: Workspace,
    query: ImageQuery | None = None,
    *,
    limit: int = 48,
    offset: int = 0,
    facets: bool = True,
    model: str | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """A page of the version's stored images by filters and sort, the total, and facet counts.

    Each row carries its prediction, UNKNOWN reason, cluster, batch and the label a person gave.
    """
    version = get_version(ws, model).name
    query = query or ImageQuery()
    if store is None and not (ws.root / STORE_FILE).is_file():
        return {"total": 0, "offset": 0, "rows": [], "facets": {}}
    with using_store(ws, store, read_only=store is None) as store:
        page = browse(store, version, query, limit, offset, facets)
    return {"model_version": version, "query": query.to_dict(), **page}


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
        sort_into(dest, folder, filename_of(m.source), content, m.sha256)
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


def filename_of(source: str) -> str:
    """The file name a stored image's source gives (a URL's path, a zip member's name)."""
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
    who: str | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Name a cluster, reject it, or exclude member ids from its promotion; returns its row.

    Each change is one audit entry (undoable); ``who`` names who made it.
    """
    version = get_version(ws, model).name
    who = who or local_user()
    with using_store(ws, store, check=False) as store, store.atomic():
        _check_cluster(store, version, cluster_id)
        if name is not None:
            clean = class_name(name)
            _record_state(
                store, "name", version, cluster_id, who, f"named cluster {cluster_id} {clean}"
            )
            store.clusters.name(version, cluster_id, clean)
        if reject:
            _record_state(
                store, "reject", version, cluster_id, who, f"rejected cluster {cluster_id}"
            )
            store.clusters.reject(version, cluster_id)
        if exclude:
            members = {m.id for m in store.clusters.members(version, cluster_id)}
            strangers = sorted(set(exclude) - members)
            if strangers:
                raise ReviewError(
                    f"ids not in cluster {cluster_id}: {', '.join(map(str, strangers))}"
                )
            added = sorted(set(map(int, exclude)) - store.clusters.excluded(version, cluster_id))
            store.audit.record(
                "exclude",
                who=who,
                summary=f"left {len(added)} image{'s' * (len(added) != 1)} out of cluster {cluster_id}",
                model_version=version,
                target=str(cluster_id),
                images=len(added),
                before={"excluded": added},
                touches=[f"cluster:{version}:{cluster_id}"],
            )
            store.clusters.exclude(version, cluster_id, added)
        return next(c for c in store.clusters.listing(version) if c["cluster_id"] == cluster_id)


def exclude_images(
    ws: Workspace,
    ids: Sequence[int],
    *,
    model: str | None = None,
    who: str | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """Leave stored images out of the promotion of whatever clusters they are in.

    The grid's X: a selection may span clusters, each gets its own recorded ``exclude``.
    Returns ``{"clusters": {cluster_id: images}, "not_in_cluster": n}``; ReviewError when none
    of the images is in a cluster.
    """
    version = get_version(ws, model).name
    with using_store(ws, store, check=False) as store:
        rows = store.rows(version, ids=sorted({int(i) for i in ids}))
        by_cluster: dict[int, list[int]] = {}
        for r in rows:
            if r.cluster_id is not None and r.cluster_id >= 0:
                by_cluster.setdefault(int(r.cluster_id), []).append(int(r.id))
        if not by_cluster:
            raise ReviewError(
                f"none of the {len(ids)} selected images is in a cluster: only cluster members "
                "can be left out of a promotion (to keep an image out of training, label it "
                f"{UNKNOWN})"
            )
        for cid, members in sorted(by_cluster.items()):
            update_cluster(ws, cid, exclude=tuple(members), model=version, who=who, store=store)
    return {
        "clusters": {cid: len(m) for cid, m in sorted(by_cluster.items())},
        "not_in_cluster": len(set(ids)) - sum(map(len, by_cluster.values())),
    }


def _record_state(
    store: Store, action: str, version: str, cluster_id: int, who: str, summary: str
) -> None:
    """Record a change of a cluster's review state, keeping the state before for undo."""
    store.audit.record(
        action,
        who=who,
        summary=summary,
        model_version=version,
        target=str(cluster_id),
        before={"state": store.clusters.review_state(version, cluster_id)},
        touches=[f"cluster:{version}:{cluster_id}"],
    )


def local_user() -> str:
    """Who acts from this machine's shell or a script: ``local:<login name>``."""
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (a container's numeric user)
        return f"local:uid{os.getuid()}"


def class_name(name: str) -> str:
    """A class name usable as one folder name, or ReviewError."""
    clean = name.strip()
    if not clean or clean.startswith(".") or any(ch in clean for ch in "/\\\x00"):
        raise ReviewError(
            f"{name!r} cannot be a class name (one folder name: no '/', '\\\\', leading '.')"
        )
    return clean


def place_in_class(
    ws: Workspace,
    dest: Path,
    row: Any,
    names: set[str],
    files: list[AuditFile],
    result: PromoteResult | Any,
) -> HumanLabel:
    """Copy a stored image (``id``, ``source``, ``sha256``) into the class folder ``dest``.

    ``names`` are the file names already there (it grows); a file written is added to
    ``files`` for undo; ``result`` counts copied, already there and missing. Returns the
    label the image now carries (its file, or None when its content is gone).
    """
    content = image_source(ws, row.sha256, row.source)
    if content is None:
        result.missing.append(row.source)
        return HumanLabel(row.sha256, dest.name, row.id, 0, None)
    target = sort_into(dest.parent, dest.name, filename_of(row.source), content, row.sha256)
    if target.name in names:
        result.already_there += 1
    else:
        names.add(target.name)
        files.append(AuditFile(str(target), "added", row.sha256))
        result.copied += 1
    return HumanLabel(row.sha256, dest.name, row.id, 0, str(target))


def leave_old_class(
    prev: HumanLabel | None, dest: Path | None, trash: Path, files: list[AuditFile]
) -> bool:
    """Move an image's copy out of the class folder a person put it in, if it is not ``dest``.

    The file waits in ``trash`` (recorded in ``files``) for an undo. Returns whether it moved.
    """
    if prev is None or prev.file is None or not Path(prev.file).is_file():
        return False
    if dest is not None and Path(prev.file).parent == dest:
        return False
    away = trash / f"{len(files)}-{Path(prev.file).name}"
    away.parent.mkdir(parents=True, exist_ok=True)
    os.replace(prev.file, away)
    files.append(AuditFile(prev.file, "removed", prev.sha256, str(away)))
    return True


def trash_folder(ws: Workspace) -> Path:
    """A new folder under ``<workspace>/trash/`` for the files one action sets aside."""
    return ws.root / "trash" / uuid.uuid4().hex


def label_dict(label: HumanLabel | None) -> dict[str, Any] | None:
    """A person's label as the audit log keeps it for undo (None: there was none)."""
    return None if label is None else asdict(label)


def class_folder(into: Path, name: str) -> Path:
    """Where a class's images go in a training folder: ``into/train/<name>`` if it is pre-split."""
    return into / "train" / name if (into / "train").is_dir() else into / name


def training_folder(version: Any) -> Path | None:
    """A version's training folder (where promoted and relabelled images go), if it still exists."""
    root = version.meta.get("data", {}).get("root")
    return Path(root) if root and Path(root).is_dir() else None


def promote_cluster(
    ws: Workspace,
    cluster_id: int,
    name: str | None = None,
    into: str | os.PathLike | None = None,
    *,
    exclude: tuple[int, ...] = (),
    model: str | None = None,
    who: str | None = None,
    store: Store | None = None,
) -> PromoteResult:
    """Copy a cluster's images (minus excluded ids) into the training data; mark it promoted.

    Near-duplicates a person set aside are not copied; those that nearly duplicate a training
    image are copied and listed (``near_training``).

    Images go to ``into/<name>/`` (``into/train/<name>/`` for a pre-split folder); naming an
    existing class merges into its folder. Identical content already there is not copied again.
    The promoted images carry the label (as a relabel gives it); one audit entry, undoable.
    ``name`` defaults to the name the cluster was given, ``into`` to the version's training
    folder (as relabel's does), so every door promotes a named cluster the same way.
    """
    from imagesieve.search._duplicates import near_training  # it imports this module

    info = get_version(ws, model)
    version = info.name
    folder = Path(into) if into is not None else training_folder(info)
    if folder is None or not folder.is_dir():
        raise ReviewError(
            f"training data folder not found: {folder}"
            if folder is not None
            else f"the training folder of {version} is gone; give the folder to promote into"
        )
    with using_store(ws, store, check=False) as store, store.atomic():
        status, given_name = _check_cluster(store, version, cluster_id)
        if status == "rejected":
            raise ReviewError(f"cluster {cluster_id} was rejected; name it again to promote it")
        if not (name or given_name):
            raise ReviewError(f"cluster {cluster_id} has no name yet: give the class name")
        name = class_name(name or given_name)
        dest = class_folder(folder, name)
        state = store.clusters.review_state(version, cluster_id)
        added = sorted(set(map(int, exclude)) - store.clusters.excluded(version, cluster_id))
        if added:
            store.clusters.exclude(version, cluster_id, added)
        excluded = store.clusters.excluded(version, cluster_id)
        result = PromoteResult(cluster_id, name, str(dest), str(folder))
        members = store.clusters.members(version, cluster_id)
        if not members:
            raise ReviewError(
                f"cluster {cluster_id} has no members now; run 'imagesieve cluster' again"
            )
        created = not dest.exists()
        dest.mkdir(parents=True, exist_ok=True)
        before = {p.name for p in dest.iterdir()}
        aside = store.duplicates.set_aside_among(version, [m.id for m in members])
        taken = [m for m in members if m.id not in excluded and m.id not in aside]
        result.set_aside = len(aside - excluded)
        result.excluded = len(members) - len(taken) - result.set_aside
        result.near_training = near_training(store, info, [m.id for m in taken])
        labels_before = store.audit.labels([m.sha256 for m in taken])
        files: list[AuditFile] = []
        trash = trash_folder(ws)
        for m in taken:  # as a relabel does: an image is in one class folder at most
            result.moved += leave_old_class(labels_before.get(m.sha256), dest, trash, files)
        given = [place_in_class(ws, dest, m, before, files, result) for m in taken]
        store.audit.record(
            "promote",
            who=who or local_user(),
            summary=f"promoted cluster {cluster_id} as {name}: {len(taken)} images",
            model_version=version,
            target=str(cluster_id),
            images=len(taken),
            before={
                "state": state,
                "excluded": added,
                "labels": {g.sha256: label_dict(labels_before.get(g.sha256)) for g in given},
                "created_dir": str(dest) if created else None,
            },
            after={"name": name, "dest": str(dest)},
            touches=[f"cluster:{version}:{cluster_id}", *(f"image:{g.sha256}" for g in given)],
            files=files,
            labels=given,
        )
        store.clusters.promoted(version, cluster_id, name, str(dest))
    return result
