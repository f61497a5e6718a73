"""Cluster UNKNOWN embeddings into groups of look-alikes, with cluster ids stable across runs.

Pure: arrays in, dataclasses out; no store, no files. The caller (the ``cluster`` verb) reads
the UNKNOWN rows and what it remembers of the previous run, calls :func:`cluster_embeddings`,
and writes the result back. Between runs, :class:`ClusterModel` places new images into the
clusters found (as HDBSCAN's ``approximate_predict`` does), and :func:`assign_to_clusters` does it
from the stored centroids and radii when no model is kept.

The pipeline, chosen on ``bench/bench_openset.py`` (five image sets, the UNKNOWNs of sixteen
leave-classes-out splits; RESULTS.md): PCA of the L2-normalised embeddings to at most
``pca_dims`` dimensions, then UMAP to ``umap_dims`` (seeded), then HDBSCAN from the ``hdbscan``
package with its prediction data. UMAP keeps each image's neighbourhood and lets go of the
global geometry, which is what separates kinds that PCA alone leaves in one mass. The smallest
cluster adapts to the number of UNKNOWNs (:meth:`ClusterParams.cluster_size`). Each image gets
HDBSCAN's outlier score (GLOSH, 0 typical .. 1 outlier), so review can show the least typical
members first. Per-cluster figures (centroid, radius, cohesion, ...) are computed in the
original embedding space with cosine distance ``1 - x . y``.

The whole input may be one cluster (``allow_single_cluster``, on by default): the most common
real case, one new kind plus a few strays, has no split at all, so plain HDBSCAN returns
nothing. HDBSCAN picks, in its tree of density levels, the clusters of most excess of mass
(stability), never the root (the whole input), and its own ``allow_single_cluster`` counts the
root's mass from density zero and keeps only the images there at its last split. So before
UMAP, the whole input is weighed as one kind (:func:`_one_kind`) in the PCA space, where strays
stay apart (UMAP pulls strays into the clump, and cuts a small kind into pieces): if HDBSCAN
finds no split there, its outliers (noise) are the images that leave it at a distance beyond the upper Tukey
fence (third quartile plus 1.5 interquartile ranges) of all the images' leaving distances, the
distance GLOSH ranks by; HDBSCAN is refitted with that distance as
``cluster_selection_epsilon``, so its core distances describe the same cluster. Scattered
images (junk) have no split either: the input is one kind only if the images inside the fence
are as tight as the loosest class the model was trained on (``tightness``, its cohesion); never
when that is not given. Otherwise UMAP and HDBSCAN as above.

UMAP also joins a stray to the nearest clump; back in the embedding space it is still far, so
members beyond the Tukey fence of their cluster's distances to its centroid become noise
(:func:`_trim_strays`). UMAP makes clumps even out of pure noise (points uniform on the sphere);
real embeddings are not like that, but ``umap_dims=None`` (PCA only) does not do it.

A cluster no tighter in the embedding space than all the input together (its cohesion at most
the whole input's) is returned as noise: images unlike the rest, e.g. junk, can land on one spot
of a projection. (A cluster of all the input, which only the rule above makes, is kept.)

Stable ids (:func:`match_clusters`): a new cluster keeps the id of the previous cluster it
continues, decided first by shared members, then by position:

1. *Members.* A new cluster N and a previous cluster P share the images in both; only P's
   members present in this run count (promoted or deleted images cannot be shared). The pair is
   a candidate if they share at least half of the smaller of N and P's present part. Candidates
   are taken greedily, the pair sharing the most images first, each cluster at most once. So a
   split keeps the id on its largest piece (the other pieces get new ids) and a merge keeps the
   id of the previous cluster that contributed most (the other ids retire).
2. *Position.* Among clusters still unmatched, N continues P if N's centroid lies within P's
   radius; the closest pairs are taken first. This carries an id over to a cluster made of
   new images only, e.g. more images of a kind whose earlier ones were promoted.

Unmatched new clusters get fresh ids counting up from ``max(next_id, 1 + largest previous id)``;
an id is never given to a different group, even if its cluster did not continue this run.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imagesieve._errors import UserError
from imagesieve._faiss import search as faiss_search
from imagesieve.store import PreviousCluster

__all__ = [
    "Cluster",
    "ClusterModel",
    "ClusterParams",
    "Clustering",
    "assign_to_clusters",
    "class_tightness",
    "cluster_embeddings",
    "match_clusters",
]

log = logging.getLogger(__name__)

#: Share of members a cluster's radius covers at least (the rest are its outliers).
RADIUS_QUANTILE = 0.95
#: Share of the smaller cluster that a new and a previous cluster must share to be matched.
MIN_SHARED = 0.5
#: Smallest adaptive min cluster size (:meth:`ClusterParams.cluster_size`).
MIN_CLUSTER_SIZE = 5
#: Nearest clustered images whose UMAP positions place a new image (:class:`ClusterModel`).
PLACE_NEIGHBOURS = 10
#: Format of a saved :class:`ClusterModel`; another format is not read (clustering again fixes it).
MODEL_FORMAT = 1
_LOADED: dict[tuple[str, int, int], ClusterModel | None] = {}
_NORM_TOLERANCE = 1e-2
_ASSIGN_CHUNK = 65536


@dataclass(frozen=True)
class ClusterParams:
    """How to cluster: HDBSCAN's density parameters and the dimension reduction before it.

    Attributes:
        min_cluster_size: Fewest images that make a cluster (HDBSCAN ``min_cluster_size``);
            None adapts it to the number of images (:meth:`cluster_size`).
        min_samples: HDBSCAN ``min_samples`` (None: the min cluster size); larger is more
            conservative, declaring more images noise.
        pca_dims: Reduce to at most this many dimensions with PCA first (never more than
            ``n - 1`` or ``d``).
        umap_dims: Then reduce with UMAP to this many dimensions (None: PCA only).
        umap_neighbors: UMAP ``n_neighbors``: the size of the neighbourhood each image keeps.
        seed: Seed of the randomized PCA and of UMAP; the same seed gives the same clusters.
        allow_single_cluster: Let the whole input be one cluster (see the module docstring);
            False is plain HDBSCAN, which never returns the whole input as one cluster.
        poor_quality: Cluster photos of poor quality too (by default they are left out: a
            blurred or dark photo is to be reshot, not a new type to name).
    """

    min_cluster_size: int | None = None
    min_samples: int | None = None
    pca_dims: int = 50
    umap_dims: int | None = 10
    umap_neighbors: int = 15
    seed: int = 0
    allow_single_cluster: bool = True
    poor_quality: bool = False

    def __post_init__(self):
        if self.min_cluster_size is not None and int(self.min_cluster_size) < 2:
            raise UserError(
                f"min_cluster_size must be at least 2 or None (adapt), got {self.min_cluster_size}"
            )
        if self.min_samples is not None and int(self.min_samples) < 1:
            raise UserError(
                f"min_samples must be at least 1 or None (= min_cluster_size), got {self.min_samples}"
            )
        if int(self.pca_dims) < 1:
            raise UserError(f"pca_dims must be at least 1, got {self.pca_dims}")
        if self.umap_dims is not None and int(self.umap_dims) < 1:
            raise UserError(f"umap_dims must be at least 1 or None (no UMAP), got {self.umap_dims}")
        if int(self.umap_neighbors) < 2:
            raise UserError(f"umap_neighbors must be at least 2, got {self.umap_neighbors}")

    def cluster_size(self, n: int) -> int:
        """The min cluster size for ``n`` images: as given, else ``max(5, sqrt(n) / 4)``.

        5 for up to ~600 UNKNOWNs (a new kind shows up a handful at a time), 35 for 20,000 (a
        day's backlog comes back as dozens of clusters to review, not thousands).
        """
        if self.min_cluster_size is not None:
            return int(self.min_cluster_size)
        return max(MIN_CLUSTER_SIZE, round(np.sqrt(n) / 4))


@dataclass
class Cluster:
    """One group of look-alike images.

    Attributes:
        cluster_id: Stable id (>= 0), kept across runs while the group continues.
        member_ids: (m,) int64 row ids, ascending.
        centroid: (d,) float32 normalised mean embedding of the members.
        medoid_id: Row id of the member closest to the centroid (the cluster's face).
        radius: Cosine distance from the centroid covering ~95% of the members; images
            within it belong to the cluster (:func:`assign_to_clusters`).
        cohesion: Mean cosine similarity of the members to the centroid (1 = identical).
        top1: Count of each Top-1 class among the members, most common first.
        top2: Count of each Top-2 class among the members, most common first.
        matched_from: Id of the previous cluster it continues, or None if it is new.
    """

    cluster_id: int
    member_ids: np.ndarray
    centroid: np.ndarray
    medoid_id: int
    radius: float
    cohesion: float
    top1: dict[str, int]
    top2: dict[str, int]
    matched_from: int | None = None

    @property
    def size(self) -> int:
        """Number of members."""
        return len(self.member_ids)

    def as_previous(self) -> PreviousCluster:
        """What to remember of this cluster for the next run."""
        return PreviousCluster(self.cluster_id, self.member_ids, self.centroid, self.radius)


@dataclass
class Clustering:
    """The result of one clustering run.

    Attributes:
        clusters: The clusters, largest first.
        noise_ids: (k,) int64 row ids of the images in no cluster, ascending.
        labels: (n,) int64 cluster id of each input row, in input order (-1 = noise).
        params: The parameters used.
        next_id: The smallest id never used so far; pass it as ``next_id`` to the next run.
        seconds: Wall time of each step: ``pca``, ``umap``, ``hdbscan``, ``stats``, ``match``.
        outlier: (n,) float64 GLOSH outlier score of each input row (0 typical .. 1 outlier;
            NaN where too few images to tell).
        min_cluster_size: The min cluster size used (adapted to n unless given).
        model: What places new images into these clusters, or None if nothing was clustered.
    """

    clusters: list[Cluster]
    noise_ids: np.ndarray
    labels: np.ndarray
    params: ClusterParams
    next_id: int
    seconds: dict[str, float] = field(default_factory=dict)
    outlier: np.ndarray = field(default_factory=lambda: np.zeros(0))
    min_cluster_size: int = MIN_CLUSTER_SIZE
    model: ClusterModel | None = None


@dataclass
class ClusterModel:
    """A clustering run kept to place new images into its clusters between runs.

    New images go through the run's PCA; their position in HDBSCAN's space is the
    distance-weighted mean of their nearest clustered images' positions (UMAP's own
    ``transform`` starts from the same, but needs its compiled code at scoring time). There, an
    image joins the cluster HDBSCAN would have put it in, as ``hdbscan.approximate_predict``
    decides: the cluster of the clustered image at the smallest mutual reachability distance,
    if that distance is within the cluster's own (its members' largest core distance). (The
    package's ``approximate_predict`` is not used: releases 0.8.41 to 0.8.44 return noise for
    whole clusters of their own training points, e.g. 27% of them in the tests' blobs.)

    Attributes:
        mean, components: The PCA (None: embeddings used as they are).
        projected: (n, p) float32 PCA coordinates of the clustered images.
        placed: (n, k) float32 their coordinates in HDBSCAN's space (= ``projected`` without UMAP).
        core: (n,) float32 core distance of each (to its ``min_samples``-th neighbour there).
        labels: (n,) int64 stable cluster id of each (-1 noise).
        min_samples: HDBSCAN's ``min_samples`` of the run.
    """

    mean: np.ndarray | None
    components: np.ndarray | None
    projected: np.ndarray
    placed: np.ndarray
    core: np.ndarray
    labels: np.ndarray
    min_samples: int

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}  # FAISS: not picklable

    def _cached(self, key: str, make: Any) -> Any:
        """What ``make()`` gives, made once per model (the scoring path calls it per write)."""
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _index(self, what: str) -> Any:
        """An exact FAISS index of ``projected`` or ``placed``."""
        import faiss

        def make() -> Any:
            x = np.ascontiguousarray(getattr(self, what), np.float32)
            index = faiss.IndexFlatL2(x.shape[1])
            index.add(x)
            return index

        return self._cached(what, make)

    def _reach(self) -> np.ndarray:
        """Each cluster id's own reach: its members' largest core distance (by id)."""

        def make() -> np.ndarray:
            reach = np.full(int(self.labels.max(initial=-1)) + 1, -1.0)
            members = self.labels >= 0
            np.maximum.at(reach, self.labels[members], self.core[members].astype(np.float64))
            return reach

        return self._cached("reach", make)

    def save(self, path: Path) -> None:
        """Write the model (pickle; a workspace file, read back only by :meth:`load`)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"format": MODEL_FORMAT, "model": self}, f, protocol=5)
        os.replace(tmp, path)

    @staticmethod
    def load(path: Path) -> ClusterModel | None:
        """The model saved at ``path``; None if there is none or it cannot be read (logged)."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if key not in _LOADED:
            try:
                with open(path, "rb") as f:
                    doc = pickle.load(f)  # noqa: S301 - the workspace's own file
                model = doc["model"] if doc.get("format") == MODEL_FORMAT else None
            except Exception as e:  # a partial or foreign file: place by centroids instead
                log.warning("cannot read the clustering model %s (%s): using centroids", path, e)
                model = None
            _LOADED.clear()  # one version's model at a time
            _LOADED[key] = model
        return _LOADED[key]

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """PCA coordinates of L2-normalised embeddings."""
        x = np.ascontiguousarray(embeddings, np.float32)
        if self.components is None:
            return x
        return (x - self.mean) @ self.components.T

    def place(self, embeddings: np.ndarray) -> np.ndarray:
        """Coordinates of new images in HDBSCAN's space."""
        z = self.project(embeddings)
        if self.placed is self.projected:
            return z
        k = min(PLACE_NEIGHBOURS, len(self.projected))
        dist, nn = faiss_search(self._index("projected"), np.ascontiguousarray(z, np.float32), k)
        weight = 1.0 / (np.sqrt(np.maximum(dist, 0)) + 1e-6)
        weight /= weight.sum(axis=1, keepdims=True)
        return np.einsum("nk,nkd->nd", weight, self.placed[nn]).astype(np.float32)

    def predict(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster id or -1, strength) of each new image; strength: 1 - reach / the cluster's."""
        n = len(embeddings)
        d = self.projected.shape[1] if self.components is None else self.components.shape[1]
        if n and np.shape(embeddings)[1] != d:
            raise ValueError(
                f"the clustering was made from {d}-dimensional embeddings, these have "
                f"{np.shape(embeddings)[1]}; were they made with another backbone?"
            )
        out, strength = np.full(n, -1, np.int64), np.zeros(n)
        if not n or not (self.labels >= 0).any():
            return out, strength
        z = np.ascontiguousarray(self.place(embeddings), np.float32)
        k = min(2 * self.min_samples, len(self.placed))
        dist, nn = faiss_search(self._index("placed"), z, k)
        dist = np.sqrt(np.maximum(dist, 0))
        core_new = dist[:, min(self.min_samples, k) - 1]
        reach = np.maximum(np.maximum(dist, core_new[:, None]), self.core[nn])
        best = reach.argmin(axis=1)
        rows = np.arange(n)
        label = self.labels[nn[rows, best]]
        reach = reach[rows, best]
        limit = np.where(label >= 0, self._reach()[np.maximum(label, 0)], -1.0)
        inside = (label >= 0) & (reach <= limit)
        out[inside] = label[inside]
        strength[inside] = 1.0 - reach[inside] / np.maximum(limit[inside], 1e-12)
        return out, np.clip(strength, 0.0, 1.0)


def cluster_embeddings(
    ids: np.ndarray,
    embeddings: np.ndarray,
    top1: Sequence[str],
    top2: Sequence[str],
    params: ClusterParams = ClusterParams(),
    previous: Sequence[PreviousCluster] = (),
    next_id: int = 0,
    tightness: float | None = None,
) -> Clustering:
    """Cluster UNKNOWN images with HDBSCAN; clusters continuing a ``previous`` one keep its id.

    Args:
        ids: (n,) int64 unique row ids.
        embeddings: (n, d) float32 L2-normalised embeddings.
        top1: The Top-1 class of each image (n names).
        top2: The Top-2 class of each image (n names).
        params: Clustering parameters.
        previous: The clusters of the previous run, to carry their ids over.
        next_id: The smallest id never used yet (the previous run's ``Clustering.next_id``).
        tightness: Cohesion of the loosest trained class (:func:`class_tightness`): the whole
            input with no split in it is one cluster only if it is at least this tight.

    Returns:
        The clusters (largest first) and the noise; warns if no cluster was found.
    """
    ids, xb = _check_input(ids, embeddings, top1, top2)
    n, d = xb.shape
    _check_dims(previous, d, "previous clusters")
    prev_ids = [int(p.cluster_id) for p in previous]
    if len(set(prev_ids)) != len(prev_ids) or min(prev_ids, default=0) < 0:
        raise ValueError(f"previous cluster ids must be unique and >= 0, got {sorted(prev_ids)}")
    fresh_from = max([int(next_id), *[i + 1 for i in prev_ids]])
    seconds = dict.fromkeys(("pca", "umap", "hdbscan", "stats", "match"), 0.0)
    mcs = params.cluster_size(n)

    labels = np.full(n, -1, np.int64)
    outlier = np.full(n, np.nan)
    clusterer = pca = None
    z = zp = xb
    if n >= mcs:
        t = time.perf_counter()
        pca, zp = _pca(xb, params)
        z = zp
        seconds["pca"] = time.perf_counter() - t
        t = time.perf_counter()
        whole = _one_kind(zp, xb, mcs, params, tightness) if params.allow_single_cluster else None
        seconds["hdbscan"] += time.perf_counter() - t
        if whole is not None:
            labels, outlier, clusterer = whole
        else:
            if params.umap_dims is not None and n > params.umap_dims + 2:
                t = time.perf_counter()
                z = _umap(zp, params)
                seconds["umap"] = time.perf_counter() - t
            t = time.perf_counter()
            labels, outlier, clusterer = _hdbscan(z, mcs, params)
        seconds["hdbscan"] += time.perf_counter() - t

    t = time.perf_counter()
    if z is not zp:
        labels = _trim_strays(xb, labels)
    top1, top2 = np.asarray(top1, dtype=object), np.asarray(top2, dtype=object)
    found = []  # (cluster, its rows)
    for label in range(labels.max(initial=-1) + 1):
        rows = np.flatnonzero(labels == label)
        rows = rows[np.argsort(ids[rows], kind="stable")]
        found.append((_describe(ids[rows], xb[rows], top1[rows], top2[rows]), rows))
    # Not look-alikes (see module docstring); a cluster of every image is the input itself.
    floor = _cohesion(xb) if n else 0.0
    loose = [c for c, _ in found if c.cohesion <= floor and c.size < n]
    if loose:
        log.info("%d clusters no tighter than all images together (%.3f): noise", len(loose), floor)
    found = [f for f in found if f[0].cohesion > floor or f[0].size == n]
    # A canonical order that does not depend on the input order: largest first, then lowest id.
    found.sort(key=lambda f: (-f[0].size, int(f[0].member_ids[0])))
    clusters = [c for c, _ in found]
    seconds["stats"] = time.perf_counter() - t

    t = time.perf_counter()
    matches = match_clusters(clusters, previous, present_ids=ids) if previous else {}
    for i, c in enumerate(clusters):
        if i in matches:
            c.cluster_id = c.matched_from = matches[i]
        else:
            c.cluster_id, fresh_from = fresh_from, fresh_from + 1
    out = np.full(n, -1, np.int64)
    for c, rows in found:
        out[rows] = c.cluster_id
    seconds["match"] = time.perf_counter() - t

    model = None
    if clusterer is not None:
        projected = np.ascontiguousarray(zp, np.float32)
        model = ClusterModel(
            None if pca is None else pca.mean_.astype(np.float32),
            None if pca is None else pca.components_.astype(np.float32),
            projected,
            projected if z is zp else np.ascontiguousarray(z, np.float32),
            clusterer.prediction_data_.core_distances.astype(np.float32),
            out.copy(),
            int(clusterer.min_samples or clusterer.min_cluster_size),
        )
    noise_ids = np.sort(ids[out == -1])
    if n and not clusters:
        warnings.warn(
            f"no clusters found among {n} images (min_cluster_size={mcs}): "
            "all are noise; a smaller min_cluster_size may find some",
            stacklevel=2,
        )
    log.info(
        "clustered %d images into %d clusters (%d continued), %d noise, in %.1f s",
        n,
        len(clusters),
        len(matches),
        len(noise_ids),
        sum(seconds.values()),
    )
    return Clustering(clusters, noise_ids, out, params, fresh_from, seconds, outlier, mcs, model)


def _trim_strays(xb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Members far out of their cluster in the embedding space become noise.

    UMAP joins every image to its nearest neighbours, so a stray lands inside the nearest clump.
    Back in the embedding space it is still far: its cosine distance to the cluster's centroid
    is beyond the upper Tukey fence (third quartile plus 1.5 interquartile ranges) of the
    members' distances.
    """
    labels = labels.copy()
    for label in range(labels.max(initial=-1) + 1):
        rows = np.flatnonzero(labels == label)
        dist = 1.0 - xb[rows] @ _centroid(xb[rows])
        labels[rows[dist > _upper_fence(dist)]] = -1
    return labels


def class_tightness(embeddings: np.ndarray, labels: Sequence[str]) -> float | None:
    """Cohesion of the loosest class among labelled embeddings (a version's training images).

    A new kind is worth a cluster if it is as tight as a kind the model was trained on; None
    when no class has two images.
    """
    x = np.ascontiguousarray(embeddings, np.float32)
    y = np.asarray(labels, dtype=object)
    values = [_cohesion(x[y == c]) for c in sorted(set(y.tolist())) if (y == c).sum() >= 2]
    return min(values) if values else None


def match_clusters(
    clusters: Sequence[Cluster],
    previous: Sequence[PreviousCluster],
    present_ids: np.ndarray | None = None,
) -> dict[int, int]:
    """Which previous cluster each new cluster continues: ``{index in clusters: previous id}``.

    One-to-one, first by shared members, then by centroid within the previous radius (the rule
    is in the module docstring). ``present_ids`` are the row ids clustered this run (None: the
    union of the new clusters' members); only previous members among them count as shared.
    """
    if not clusters or not previous:
        return {}
    if present_ids is None:
        present_ids = np.concatenate([c.member_ids for c in clusters])
    present = set(np.asarray(present_ids, np.int64).tolist())
    # Shared members of every (new, previous) pair, via one lookup of previous members.
    new_of = {}
    for i, c in enumerate(clusters):
        new_of.update(dict.fromkeys(c.member_ids.tolist(), i))
    shared = np.zeros((len(clusters), len(previous)), np.int64)
    present_size = np.zeros(len(previous), np.int64)
    for j, p in enumerate(previous):
        members = np.asarray(p.member_ids, np.int64).tolist()
        present_size[j] = sum(m in present for m in members)
        hits = [new_of[m] for m in members if m in new_of]
        if hits:
            shared[:, j] = np.bincount(hits, minlength=len(clusters))
    sizes = np.array([c.size for c in clusters])
    smaller = np.minimum(sizes[:, None], present_size[None, :])
    candidates = (shared > 0) & (shared >= MIN_SHARED * smaller)
    prev_order = np.argsort([p.cluster_id for p in previous], kind="stable")
    rank_of_prev = np.empty(len(previous), np.int64)
    rank_of_prev[prev_order] = np.arange(len(previous))
    pairs = sorted(
        zip(*np.nonzero(candidates), strict=True),
        key=lambda ij: (-shared[ij], rank_of_prev[ij[1]], ij[0]),
    )
    matches: dict[int, int] = {}
    taken: set[int] = set()
    for i, j in pairs:
        if i not in matches and j not in taken:
            matches[int(i)] = int(j)
            taken.add(int(j))

    # Then by position, among the clusters left over.
    left_new = [i for i in range(len(clusters)) if i not in matches]
    left_prev = [j for j in range(len(previous)) if j not in taken]
    if left_new and left_prev:
        c_new = np.stack([clusters[i].centroid for i in left_new]).astype(np.float32)
        _check_dims([previous[j] for j in left_prev], c_new.shape[1], "previous clusters")
        c_prev = np.stack([np.asarray(previous[j].centroid) for j in left_prev]).astype(np.float32)
        dist = 1.0 - c_new @ c_prev.T
        radius = np.array([previous[j].radius for j in left_prev], np.float32)
        a, b = np.nonzero(dist <= radius[None, :])
        for a_, b_ in sorted(zip(a, b, strict=True), key=lambda ab: (dist[ab], ab)):
            i, j = left_new[a_], left_prev[b_]
            if i not in matches and j not in taken:
                matches[i] = j
                taken.add(j)
    return {i: int(previous[j].cluster_id) for i, j in sorted(matches.items())}


def assign_to_clusters(
    embeddings: np.ndarray, clusters: Sequence[PreviousCluster | Cluster]
) -> np.ndarray:
    """Cluster id of each image: the nearest centroid among those whose radius covers it.

    Args:
        embeddings: (n, d) float32 L2-normalised embeddings.
        clusters: Known clusters (their ``cluster_id``, ``centroid`` and ``radius``).

    Returns:
        (n,) int64 cluster ids, -1 where no cluster's radius covers the image.
    """
    xq = np.ascontiguousarray(embeddings, np.float32)
    if xq.ndim != 2:
        raise ValueError(f"embeddings must be an (n, d) array, got shape {xq.shape}")
    out = np.full(len(xq), -1, np.int64)
    if not len(clusters) or not len(xq):
        return out
    _check_dims(clusters, xq.shape[1], "the clusters")
    centroids = np.stack([np.asarray(c.centroid, np.float32) for c in clusters])
    radius = np.array([c.radius for c in clusters], np.float32) + 1e-6  # float32 rounding
    cluster_ids = np.array([c.cluster_id for c in clusters], np.int64)
    for s in range(0, len(xq), _ASSIGN_CHUNK):
        dist = 1.0 - xq[s : s + _ASSIGN_CHUNK] @ centroids.T
        dist[dist > radius[None, :]] = np.inf
        best = dist.argmin(axis=1)
        covered = np.isfinite(dist[np.arange(len(dist)), best])
        out[s : s + _ASSIGN_CHUNK] = np.where(covered, cluster_ids[best], -1)
    return out


def _check_input(ids, embeddings, top1, top2) -> tuple[np.ndarray, np.ndarray]:
    xb = np.ascontiguousarray(embeddings, np.float32)
    if xb.ndim != 2:
        raise ValueError(f"embeddings must be an (n, d) array, got shape {xb.shape}")
    n = len(xb)
    ids = np.asarray(ids)
    if ids.shape != (n,) or not (n == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(
            f"ids must be {n} integers, one per embedding, got {ids.dtype} {ids.shape}"
        )
    ids = ids.astype(np.int64, copy=False)
    if len(np.unique(ids)) != n:
        raise ValueError("ids must be unique: the same row id appears twice")
    if len(top1) != n or len(top2) != n:
        raise ValueError(
            f"top1 and top2 must name one class per embedding: {n} embeddings, "
            f"{len(top1)} top1, {len(top2)} top2"
        )
    if n:
        norms = np.linalg.norm(xb, axis=1)
        bad = np.flatnonzero(~(np.abs(norms - 1.0) <= _NORM_TOLERANCE))
        if len(bad):
            raise ValueError(
                f"embeddings must be L2-normalised: row {bad[0]} (id {ids[bad[0]]}) has norm "
                f"{norms[bad[0]]:.4g}; {len(bad)} rows are off; divide each by its norm, "
                "and leave out images whose embedding failed (all zeros)"
            )
    return ids, xb


def _check_dims(clusters: Sequence[PreviousCluster | Cluster], d: int, what: str) -> None:
    for c in clusters:
        if np.shape(c.centroid) != (d,):
            raise ValueError(
                f"{what} have centroids of shape {np.shape(c.centroid)} (cluster {c.cluster_id}) "
                f"but the embeddings have {d} dimensions; were they made with another backbone? "
                "Cluster afresh without them"
            )


def _pca(xb: np.ndarray, params: ClusterParams) -> tuple[Any, np.ndarray]:
    """(fitted PCA or None, the top ``pca_dims`` principal coordinates, or ``xb`` as is)."""
    n, d = xb.shape
    k = min(params.pca_dims, n - 1, d)
    if k >= d:
        return None, xb
    from sklearn.decomposition import PCA

    pca = PCA(n_components=k, whiten=False, random_state=params.seed)
    return pca, pca.fit_transform(xb).astype(np.float32)


def _umap(z: np.ndarray, params: ClusterParams) -> np.ndarray:
    """UMAP of the PCA coordinates: tight clumps (``min_dist=0``), as clustering wants."""
    return umap_reduce(z, params.umap_dims, params.umap_neighbors, params.seed, min_dist=0.0)


def umap_reduce(
    z: np.ndarray, dims: int, neighbours: int, seed: int, min_dist: float = 0.0
) -> np.ndarray:
    """Seeded UMAP of the rows of ``z`` to ``dims`` dimensions, on exact FAISS neighbours."""
    try:
        import umap
    except ImportError:
        raise ImportError(
            f"umap_dims={dims} needs the umap-learn package: pip install umap-learn "
            "(or umap_dims=None to cluster the PCA projection)"
        ) from None
    n = len(z)
    k = min(neighbours, n - 1)
    nn, dist = _neighbours(z, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n_jobs overridden by random_state": seeded is serial
        reducer = umap.UMAP(
            n_components=min(dims, n - 2),
            n_neighbors=k,
            min_dist=min_dist,
            random_state=seed,
            precomputed_knn=(nn, dist, None),
        )
        return reducer.fit_transform(z).astype(np.float32)


def _neighbours(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest rows (itself first) and their Euclidean distances, exactly.

    FAISS, a second for 20,000 images, instead of UMAP's NN-descent, whose compiled code costs
    ~45 s in every new process (bench_cluster.py). Through the one search helper: its kernel
    depends on the batch size only, never on the process's earlier searches, and UMAP turns
    the last bit of a distance into another layout.
    """
    import faiss

    z = np.ascontiguousarray(z, np.float32)
    index = faiss.IndexFlatL2(z.shape[1])
    index.add(z)
    dist, nn = faiss_search(index, z, k)
    return nn, np.sqrt(np.maximum(dist, 0))


def _hdbscan_params(n: int, mcs: int, params: ClusterParams) -> dict[str, Any]:
    return {
        "min_cluster_size": mcs,
        "min_samples": min(params.min_samples or mcs, n - 1),
        "metric": "euclidean",
        "prediction_data": True,
        "core_dist_n_jobs": 1,
    }


def _hdbscan(z: np.ndarray, mcs: int, params: ClusterParams) -> tuple[np.ndarray, np.ndarray, Any]:
    """Plain HDBSCAN of the rows of ``z``: labels (-1 noise), GLOSH outlier scores, clusterer."""
    import hdbscan

    model = hdbscan.HDBSCAN(**_hdbscan_params(len(z), mcs, params))
    model.fit(np.ascontiguousarray(z, np.float64))
    outlier = np.nan_to_num(model.outlier_scores_.astype(np.float64), nan=0.0)
    return model.labels_.astype(np.int64), outlier, model


def _one_kind(
    zp: np.ndarray, xb: np.ndarray, mcs: int, params: ClusterParams, tightness: float | None
) -> tuple[np.ndarray, np.ndarray, Any] | None:
    """The whole input as one cluster and its outliers, if it is one kind; else None.

    One kind: HDBSCAN finds no split in the PCA space ``zp`` (where strays stay apart; UMAP
    pulls each image towards its neighbours, strays included, and cuts a small kind into
    pieces), and the images that stay until the root dissolves (module docstring; :func:`_leaving_distances`)
    are as tight as the loosest trained class.
    """
    import hdbscan

    n = len(zp)
    if tightness is None or n < 2:
        return None
    labels, _, plain = _hdbscan(zp, mcs, params)
    if labels.max(initial=-1) >= 0:
        return None
    leave = _leaving_distances(plain.single_linkage_tree_.to_numpy(), mcs)
    if leave is None:
        return None
    fence = _upper_fence(leave)
    cohesion = _cohesion(xb[leave <= fence])
    if cohesion < tightness:
        log.info(
            "no split among %d images, but as one they are %.3f tight, looser than the loosest "
            "trained class (%.3f): not one kind",
            n,
            cohesion,
            tightness,
        )
        return None
    kw = _hdbscan_params(n, mcs, params)
    single = hdbscan.HDBSCAN(**kw, allow_single_cluster=True, cluster_selection_epsilon=fence)
    labels = single.fit(np.ascontiguousarray(zp, np.float64)).labels_.astype(np.int64)
    outlier = np.nan_to_num(single.outlier_scores_.astype(np.float64), nan=0.0)
    log.info(
        "no split among %d images: one cluster as tight as a trained class (%.3f), %d outliers",
        n,
        cohesion,
        int((labels < 0).sum()),
    )
    return labels, outlier, single


def _leaving_distances(tree: np.ndarray, min_cluster_size: int) -> np.ndarray | None:
    """The distance at which each point leaves the whole input, which has no split.

    Condenses the single-linkage tree as HDBSCAN does: going down in distance, a part smaller
    than ``min_cluster_size`` leaves the cluster as points; the cluster goes on with the rest.
    (With no split, no merge has two parts of at least that size.)

    Args:
        tree: (n - 1, 4) single-linkage tree of the mutual reachability distances, scipy order
            (merge ``i`` makes node ``n + i`` of ``left, right, distance, size``), as the
            ``hdbscan`` package's ``single_linkage_tree_.to_numpy()`` gives it.
        min_cluster_size: HDBSCAN's ``min_cluster_size``.

    Returns:
        (n,) distances, or None if the tree has a split after all or points coincide.
    """
    n = len(tree) + 1
    left = tree[:, 0].astype(np.int64)
    right = tree[:, 1].astype(np.int64)
    size = tree[:, 3].astype(np.int64)

    def size_of(node: int) -> int:
        return 1 if node < n else int(size[node - n])

    leave = np.full(n, np.nan)
    stack = [2 * n - 2]
    while stack:
        i = stack.pop() - n
        kids = (int(left[i]), int(right[i]))
        sizes = [size_of(k) for k in kids]
        if min(sizes) >= min_cluster_size:
            return None
        for k, m in zip(kids, sizes, strict=True):
            if m >= min_cluster_size:
                stack.append(k)  # the cluster goes on without the small part
            else:
                leave[_leaves(left, right, k, n)] = tree[i, 2]
    return leave if np.all(leave > 0) else None


def _leaves(left: np.ndarray, right: np.ndarray, node: int, n: int) -> list[int]:
    """The points (ids < n) under ``node`` of a single-linkage tree."""
    out, stack = [], [node]
    while stack:
        v = stack.pop()
        if v < n:
            out.append(v)
        else:
            stack += (int(left[v - n]), int(right[v - n]))
    return out


def _centroid(x: np.ndarray) -> np.ndarray:
    """The normalised mean of the rows of ``x`` (float32)."""
    mean = x.mean(axis=0, dtype=np.float64)
    return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)


def _cohesion(x: np.ndarray) -> float:
    """Mean cosine similarity of the rows of ``x`` to their normalised mean."""
    return float((x @ _centroid(x)).mean())


def _upper_fence(values: np.ndarray) -> float:
    """Tukey's upper fence: third quartile plus 1.5 interquartile ranges."""
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 + 1.5 * (q3 - q1))


def _describe(ids: np.ndarray, x: np.ndarray, top1: np.ndarray, top2: np.ndarray) -> Cluster:
    """A cluster's figures from its members (ids ascending, so ties go to the lowest id)."""
    centroid = _centroid(x)
    sim = x @ centroid
    return Cluster(
        cluster_id=-1,
        member_ids=ids,
        centroid=centroid,
        medoid_id=int(ids[int(np.argmax(sim))]),
        radius=float(np.quantile(1.0 - sim, RADIUS_QUANTILE, method="inverted_cdf")),
        cohesion=float(sim.mean()),
        top1=_histogram(top1),
        top2=_histogram(top2),
    )


def _histogram(names: np.ndarray) -> dict[str, int]:
    counts = Counter(str(s) for s in names)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
