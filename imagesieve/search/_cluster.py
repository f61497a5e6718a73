"""Cluster UNKNOWN embeddings into groups of look-alikes, with cluster ids stable across runs.

Pure: arrays in, dataclasses out; no store, no files. The caller (the ``cluster`` verb) reads
the UNKNOWN rows and what it remembers of the previous run, calls :func:`cluster_embeddings`,
and writes the result back. :func:`assign_to_clusters` places new images into known clusters
without re-clustering.

The pipeline: PCA of the L2-normalised embeddings to at most ``pca_dims`` dimensions (Euclidean
distance there approximates the embeddings' Euclidean distance, a monotone function of their
cosine distance), optionally UMAP, then HDBSCAN (label -1 = noise). Per-cluster figures
(centroid, radius, cohesion, ...) are computed in the original embedding space with cosine
distance ``1 - x . y``.

The whole input may be one cluster (``allow_single_cluster``, on by default). HDBSCAN picks, in
its tree of density levels, the clusters of most excess of mass (stability), but never the
root, the whole input. scikit-learn's ``allow_single_cluster`` lets it, yet counts the root's
mass from density zero, so that it wins against real splits (two kinds become one cluster), and
then keeps in it only the images still there at its last split. So UNKNOWNs all of one new
kind (a broad group with a few denser spots) came back as those spots, most images noise,
although next to any other group the same images are one cluster: there the group is a child
of the root, born where it splits off, and HDBSCAN weighs it against its spots as usual. Here
the root is weighed the same way, born at its first (largest) merge distance: it is the one
cluster if its stability beats that of the clusters HDBSCAN picked below it. Its outliers (the
noise) are the images that leave it at a distance beyond the upper Tukey fence (third quartile
plus 1.5 interquartile ranges) of all the images' leaving distances, the distance HDBSCAN's
outlier score (GLOSH) ranks by. An input with no split at all (junk, or too few images to
tell) stays all noise.

A cluster no tighter in the embedding space than all the input together (its cohesion at most
the whole input's) is returned as noise. This is an artefact of the PCA step: images unlike
the rest, e.g. junk, differ from each other mostly in directions the principal axes leave out,
so they project onto one spot and HDBSCAN would see them as a dense group. (A cluster of all
the input, which only the rule above makes, is the input itself and is kept.)

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
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from imagesieve._errors import UserError
from imagesieve.store import PreviousCluster

__all__ = [
    "Cluster",
    "ClusterParams",
    "Clustering",
    "assign_to_clusters",
    "cluster_embeddings",
    "match_clusters",
]

log = logging.getLogger(__name__)

#: Share of members a cluster's radius covers at least (the rest are its outliers).
RADIUS_QUANTILE = 0.95
#: Share of the smaller cluster that a new and a previous cluster must share to be matched.
MIN_SHARED = 0.5
_NORM_TOLERANCE = 1e-2
_ASSIGN_CHUNK = 65536


@dataclass(frozen=True)
class ClusterParams:
    """How to cluster: HDBSCAN's density parameters and the dimension reduction before it.

    Attributes:
        min_cluster_size: Fewest images that make a cluster (HDBSCAN ``min_cluster_size``).
        min_samples: HDBSCAN ``min_samples`` (None: ``min_cluster_size``); larger is more
            conservative, declaring more images noise.
        pca_dims: Reduce to at most this many dimensions with PCA first (never more than
            ``n - 1`` or ``d``).
        umap_dims: If set, reduce further with UMAP to this many dimensions (needs the
            ``umap-learn`` package).
        seed: Seed of the randomized PCA (and UMAP); the same seed gives the same clusters.
        allow_single_cluster: Let the whole input be one cluster when that is more stable than
            the clusters HDBSCAN finds inside it (see the module docstring); False is plain
            HDBSCAN, which never returns the whole input as one cluster.
    """

    min_cluster_size: int = 10
    min_samples: int | None = None
    pca_dims: int = 50
    umap_dims: int | None = None
    seed: int = 0
    allow_single_cluster: bool = True

    def __post_init__(self):
        if int(self.min_cluster_size) < 2:
            raise UserError(f"min_cluster_size must be at least 2, got {self.min_cluster_size}")
        if self.min_samples is not None and int(self.min_samples) < 1:
            raise UserError(
                f"min_samples must be at least 1 or None (= min_cluster_size), got {self.min_samples}"
            )
        if int(self.pca_dims) < 1:
            raise UserError(f"pca_dims must be at least 1, got {self.pca_dims}")
        if self.umap_dims is not None and int(self.umap_dims) < 1:
            raise UserError(f"umap_dims must be at least 1 or None (no UMAP), got {self.umap_dims}")


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
    """

    clusters: list[Cluster]
    noise_ids: np.ndarray
    labels: np.ndarray
    params: ClusterParams
    next_id: int
    seconds: dict[str, float] = field(default_factory=dict)


def cluster_embeddings(
    ids: np.ndarray,
    embeddings: np.ndarray,
    top1: Sequence[str],
    top2: Sequence[str],
    params: ClusterParams = ClusterParams(),
    previous: Sequence[PreviousCluster] = (),
    next_id: int = 0,
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

    labels = np.full(n, -1, np.int64)
    if n >= params.min_cluster_size:
        t = time.perf_counter()
        z = _pca(xb, params)
        seconds["pca"] = time.perf_counter() - t
        if params.umap_dims is not None:
            t = time.perf_counter()
            z = _umap(z, params)
            seconds["umap"] = time.perf_counter() - t
        t = time.perf_counter()
        labels = _hdbscan(z, params)
        seconds["hdbscan"] = time.perf_counter() - t

    t = time.perf_counter()
    top1, top2 = np.asarray(top1, dtype=object), np.asarray(top2, dtype=object)
    found = []  # (cluster, its rows)
    floor = _cohesion(xb) if n else 0.0
    for label in range(labels.max(initial=-1) + 1):
        rows = np.flatnonzero(labels == label)
        rows = rows[np.argsort(ids[rows], kind="stable")]
        found.append((_describe(ids[rows], xb[rows], top1[rows], top2[rows]), rows))
    # Not look-alikes (see module docstring); a cluster of every image is the input itself.
    loose = [c for c, _ in found if c.cohesion <= floor and c.size < n]
    if loose:
        log.info("%d clusters no tighter than all images together (%.3f): noise", len(loose), floor)
    found = [(c, rows) for c, rows in found if c.cohesion > floor or c.size == n]
    # A canonical order that does not depend on the input order: largest first, then lowest id.
    found.sort(key=lambda cr: (-cr[0].size, int(cr[0].member_ids[0])))
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

    noise_ids = np.sort(ids[out == -1])
    if n and not clusters:
        warnings.warn(
            f"no clusters found among {n} images (min_cluster_size={params.min_cluster_size}): "
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
    return Clustering(clusters, noise_ids, out, params, fresh_from, seconds)


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


def _pca(xb: np.ndarray, params: ClusterParams) -> np.ndarray:
    """Project onto the top ``pca_dims`` principal axes (as is if that would not reduce)."""
    n, d = xb.shape
    k = min(params.pca_dims, n - 1, d)
    if k >= d:
        return xb
    from sklearn.decomposition import PCA

    return PCA(n_components=k, whiten=False, random_state=params.seed).fit_transform(xb)


def _umap(z: np.ndarray, params: ClusterParams) -> np.ndarray:
    try:
        import umap
    except ImportError:
        raise ImportError(
            f"umap_dims={params.umap_dims} needs the umap-learn package: pip install umap-learn "
            "(or leave umap_dims=None to cluster the PCA projection)"
        ) from None
    n = len(z)
    reducer = umap.UMAP(
        n_components=max(1, min(params.umap_dims, n - 2)),
        n_neighbors=min(15, n - 1),
        min_dist=0.0,  # dense clumps, as clustering wants
        random_state=params.seed,
    )
    return reducer.fit_transform(z)


def _hdbscan(z: np.ndarray, params: ClusterParams) -> np.ndarray:
    """HDBSCAN labels (-1 = noise) of the rows of ``z``, Euclidean distance.

    With ``params.allow_single_cluster``, all rows but the outliers are cluster 0 when the whole
    input is the most stable cluster (:func:`_single_cluster_outliers`).
    """
    from sklearn.cluster import HDBSCAN

    n = len(z)
    min_samples = min(params.min_samples or params.min_cluster_size, n)
    model = HDBSCAN(
        min_cluster_size=params.min_cluster_size,
        min_samples=min_samples,
        metric="euclidean",
        copy=True,
    )
    labels = model.fit_predict(np.ascontiguousarray(z, np.float64)).astype(np.int64)
    if not params.allow_single_cluster or labels.max(initial=-1) < 0:
        return labels  # no split anywhere: nothing tells a group from scattered images
    tree = getattr(model, "_single_linkage_tree_", None)  # scikit-learn >= 1.3 keeps it
    if tree is None or not {"left_node", "right_node", "value", "cluster_size"} <= set(
        tree.dtype.names or ()
    ):
        log.warning("this scikit-learn HDBSCAN keeps no single-linkage tree: plain HDBSCAN")
        return labels
    outliers = _single_cluster_outliers(tree, params.min_cluster_size)
    if outliers is None:
        return labels
    log.info(
        "the whole input is one cluster, more stable than the %d HDBSCAN found inside it; "
        "%d of %d images are its outliers",
        labels.max() + 1,
        int(outliers.sum()),
        n,
    )
    return np.where(outliers, -1, 0).astype(np.int64)


def _single_cluster_outliers(tree: np.ndarray, min_cluster_size: int) -> np.ndarray | None:
    """The outliers of the whole input if it is HDBSCAN's most stable cluster, else None.

    Condenses the single-linkage tree as HDBSCAN does: going down in distance, a merge of two
    parts of at least ``min_cluster_size`` points each is a split into two new clusters, born
    at that level; smaller parts leave their cluster as points. A cluster's stability is the
    sum over its points of ``lambda - birth`` (lambda = 1 / distance) at which they leave it.
    The root is born at its first (largest) merge distance, as a child is at its split.

    Args:
        tree: (n - 1,) single-linkage tree of the mutual reachability distances, scipy order
            (merge ``i`` makes node ``n + i``; fields ``left_node``, ``right_node``, ``value``,
            ``cluster_size``), as HDBSCAN builds it.
        min_cluster_size: HDBSCAN's ``min_cluster_size``.

    Returns:
        (n,) bool mask of the points leaving the root at a distance beyond the upper Tukey fence
        of all points' leaving distances, or None if the clusters below the root (their best
        selection by excess of mass, which is what HDBSCAN returned) are more stable.
    """
    n = len(tree) + 1
    left = np.asarray(tree["left_node"], np.int64)
    right = np.asarray(tree["right_node"], np.int64)
    size = np.asarray(tree["cluster_size"], np.int64)
    with np.errstate(divide="ignore"):
        lam = 1.0 / np.asarray(tree["value"], np.float64)  # inf where points coincide

    def size_of(node: int) -> int:
        return 1 if node < n else int(size[node - n])

    leave = np.empty(n)  # lambda at which each point leaves the cluster it is last in
    parent, birth, stability = [-1], [lam[-1]], [0.0]  # the condensed clusters; 0 = root
    stack = [(2 * n - 2, 0)]  # (tree node, condensed cluster it belongs to)
    while stack:
        node, c = stack.pop()
        i = node - n
        kids = (int(left[i]), int(right[i]))
        sizes = [size_of(k) for k in kids]
        if min(sizes) >= min_cluster_size:  # a split: two clusters are born
            stability[c] += (lam[i] - birth[c]) * sum(sizes)
            for k in kids:
                parent.append(c)
                birth.append(lam[i])
                stability.append(0.0)
                stack.append((k, len(parent) - 1))
            continue
        for k, m in zip(kids, sizes, strict=True):
            if m >= min_cluster_size:
                stack.append((k, c))  # the cluster goes on without the small part
            else:
                leave[_leaves(left, right, k, n)] = lam[i]
                stability[c] += (lam[i] - birth[c]) * m
    stability_ = np.array(stability)
    if len(parent) == 1 or not np.all(np.isfinite(stability_)):
        return None  # no split (HDBSCAN found nothing), or coinciding points: keep HDBSCAN's
    # Excess of mass, bottom-up (children come after their parent): a cluster's best is itself
    # or its children's best, whichever is more stable.
    below = np.zeros(len(parent))
    for c in range(len(parent) - 1, 0, -1):
        best = stability_[c] if stability_[c] >= below[c] else below[c]
        below[parent[c]] += best
    if not stability_[0] > below[0]:
        return None
    with np.errstate(divide="ignore"):
        distance = 1.0 / leave
    q1, q3 = np.percentile(distance, [25, 75])
    return distance > q3 + 1.5 * (q3 - q1)


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


def _cohesion(x: np.ndarray) -> float:
    """Mean cosine similarity of the rows of ``x`` to their normalised mean."""
    mean = x.mean(axis=0, dtype=np.float64)
    return float((x @ (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)).mean())


def _describe(ids: np.ndarray, x: np.ndarray, top1: np.ndarray, top2: np.ndarray) -> Cluster:
    """A cluster's figures from its members (ids ascending, so ties go to the lowest id)."""
    mean = x.mean(axis=0, dtype=np.float64)
    centroid = (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)
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
