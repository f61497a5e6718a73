# ruff: noqa: E741 - faiss vocabulary: D, I = index.search(xq, k)
"""Near-duplicate images among embeddings: groups, incremental assignment and calibration.

Two images are near-duplicates when the cosine distance (1 - inner product) of their
L2-normalised embeddings is at most a threshold, or, given their pixel signatures
(``imagesieve.classifier._signature``), when it is within a looser candidate distance and the
signatures agree (a ``DuplicateRule``): the embedding proposes, the pixels confirm; the rule's
floor also lets the pixels veto a close pair that plainly differs. Groups are
the connected components of that relation, so chains (A~B, B~C) make one group. The rule is
calibrated per training set from generated copies of its images (``near_duplicate_variants``,
``calibrate_duplicate_rule``). Pure math: nothing here reads or writes the store.

Up to EXACT_MAX vectors every pair within reach (the threshold, or the rule's candidate
distance) is found by an exact FAISS range search. Beyond it, by an IVF self-join: k-means
cells of a PCA projection, and each vector compared, on the full vectors, with the members of
its NPROBE nearest cells (a near-duplicate within a tight threshold almost always shares a cell
with its original or lies in the next one; at a loose candidate distance some fall further
away: measured in ``bench/bench_duplicates.py``). Signatures are compared only for the pairs
within reach that the embedding alone does not decide (``DuplicateRule.needs_signature``).
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from imagesieve._faiss import search as faiss_search
from imagesieve._faiss import top_k_of_chunks

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DEFAULT_K",
    "EXACT_MAX",
    "VARIANT_KINDS",
    "VARIANT_STRENGTHS",
    "DuplicateRule",
    "NearDuplicateIndex",
    "assign_near_duplicates",
    "calibrate_duplicate_distance",
    "calibrate_duplicate_rule",
    "near_duplicate_groups",
    "near_duplicate_variants",
]

log = logging.getLogger(__name__)

#: Earlier vectors ``NearDuplicateIndex`` links each new one to: one with more near-duplicates
#: than this still joins their group through the chains, as long as each finds some others.
DEFAULT_K = 16
#: Queries searched at a time: bounds the (chunk, k) results and the search's scratch memory.
DEFAULT_CHUNK = 16_384
#: Largest collection grouped by exact search (n^2 d: 20,000 x 1280-d takes about 10 s on 2 cores).
EXACT_MAX = 20_000
#: Dimensions of the PCA projection the coarse cells of a large collection are found in.
REDUCED_DIM = 64
#: Rows the PCA basis is fitted on.
PCA_SAMPLE = 65_536
#: Coarse cells: about this many times sqrt(n).
LISTS_PER_SQRT_N = 8
#: Training points per cell for the k-means.
TRAIN_PER_LIST = 16
#: Cells each vector is compared within: its own and the nearest others.
NPROBE = 2
#: Rows of each side of one matrix product in the cell-by-cell comparison.
BLOCK = 4096
#: Pair lists longer than twice this are reduced to a spanning forest when that is shorter.
SPAN_MIN = 1024
#: Distances within this of the threshold count: float32 inner products of two identical
#: 1280-d unit vectors come out as 1 +- a few 1e-7.
TOLERANCE = 1e-5
#: New vectors matched at a time by ``NearDuplicateIndex.add`` (within a batch: m x m products).
ADD_BATCH = 1024
#: Kinds of copies ``near_duplicate_variants`` makes, in order.
VARIANT_KINDS = ("jpeg", "crop", "resize", "brightness")
#: How hard ``near_duplicate_variants`` edits: "realistic" (what duplicate finders mean by a
#: re-encode or resize; the target) or "harsh" (a stress test).
VARIANT_STRENGTHS = ("realistic", "harsh")
#: Candidate pairs whose signatures are compared at a time (bounds the gathered signatures).
VERIFY_BATCH = 32_768
#: Queries at a time of the exact range search when candidates are verified: a loose candidate
#: distance can put most of the collection within reach of each query.
VERIFY_CHUNK = 512


@dataclass(frozen=True)
class DuplicateRule:
    """When two images are near-duplicates, from their embeddings and pixel signatures.

    A pair is one when its cosine distance is at most ``distance`` (and, with ``floor``, its
    ``signature_similarity`` at least ``floor``), or beyond it but at most
    ``candidate_distance`` with a signature similarity of at least ``similarity``. With
    ``similarity`` None (or no signatures) the embedding decides alone, at ``distance``.
    ``floor`` (None: none) vetoes the pairs the embedding alone would accept whose pixels
    plainly differ: renderings of one design that differ in a needle or a digit are as close in
    the embedding as a copy is.
    """

    distance: float
    candidate_distance: float | None = None
    similarity: float | None = None
    floor: float | None = None

    def __post_init__(self):
        if self.distance < 0 or (self.candidate_distance or 0) < 0:
            raise ValueError(
                f"distances are cosine distances >= 0, got {self.distance}, "
                f"{self.candidate_distance}"
            )

    @classmethod
    def of_version(cls, meta: dict[str, Any]) -> DuplicateRule | None:
        """A version's rule, as training calibrated it (``meta.json`` duplicates.rule).

        None for a version trained before near-duplicates were checked, or when it could not
        be calibrated (too few training images).
        """
        d = (meta.get("duplicates") or {}).get("rule")
        if not d:
            return None
        return cls(
            float(d["distance"]),
            None if d.get("candidate_distance") is None else float(d["candidate_distance"]),
            None if d.get("similarity") is None else float(d["similarity"]),
            None if d.get("floor") is None else float(d["floor"]),
        )

    @property
    def uses_signatures(self) -> bool:
        """True when signatures decide some pairs (else the embedding decides alone)."""
        return self.similarity is not None or self.floor is not None

    def needs_signature(self, distance: np.ndarray) -> np.ndarray:
        """Which pairs, by cosine distance, the signatures must decide (the rest: ``accepts``)."""
        close = np.asarray(distance) <= self.distance + TOLERANCE
        need = np.zeros(close.shape, bool)
        if self.floor is not None:
            need |= close
        if self.similarity is not None:
            need |= ~close
        return need

    def accepts(self, distance: np.ndarray, similarity: np.ndarray | None = None) -> np.ndarray:
        """Which pairs are near-duplicates, by cosine distance and signature similarity.

        ``similarity`` is NaN where a signature is missing or flat (``signature_similarity``
        with ``flat=np.nan``; None when ``needs_signature`` is False everywhere): such a pair is
        decided by its distance alone.
        """
        distance = np.asarray(distance)
        close = distance <= self.distance + TOLERANCE
        if similarity is None or not self.uses_signatures:
            return close
        similarity = np.asarray(similarity, np.float32)
        known = ~np.isnan(similarity)
        ok = close.copy()
        if self.floor is not None:
            ok &= ~known | (similarity >= np.float32(self.floor))
        if self.similarity is not None and self.candidate_distance is not None:
            loose = ~close & (distance <= self.candidate_distance + TOLERANCE)
            ok |= loose & known & (similarity >= np.float32(self.similarity))
        return ok

    def judge(
        self,
        distance: np.ndarray,
        signatures: Callable[[int], tuple[np.ndarray | None, np.ndarray | None]],
    ) -> np.ndarray:
        """``accepts``, reading pair ``k``'s two signatures (``signatures(k)``) only if needed.

        Only pairs ``needs_signature`` picks are read; a missing one (None) leaves that pair to
        its distance.
        """
        from imagesieve.classifier._signature import signature_similarity

        distance = np.asarray(distance, np.float64)
        sims = np.full(len(distance), np.nan, np.float32)
        for k in np.flatnonzero(self.needs_signature(distance)):
            a, b = signatures(int(k))
            if a is not None and b is not None:
                sims[k] = signature_similarity(a, b, flat=np.nan)
        return self.accepts(distance, sims)

    @property
    def reach(self) -> float:
        """The largest distance at which a pair can be a near-duplicate."""
        if self.similarity is None or self.candidate_distance is None:
            return self.distance
        return max(self.distance, self.candidate_distance)


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be an (n, d) matrix, got shape {x.shape}")
    return x


def _check_normalised(x: np.ndarray, name: str) -> None:
    norms = np.linalg.norm(x, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1) > 1e-3)
    if len(bad):
        raise ValueError(
            f"{name} must be L2-normalised: row {bad[0]} has norm {norms[bad[0]]:.4f} "
            "(divide each row by np.linalg.norm(x, axis=1, keepdims=True))"
        )


def _row_ids(ids: np.ndarray | None, n: int) -> np.ndarray:
    if ids is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(ids, np.int64).ravel()
    if len(ids) != n:
        raise ValueError(f"{len(ids)} ids for {n} vectors; give one id per row")
    return ids


def near_duplicate_groups(
    xb: np.ndarray,
    threshold: float | DuplicateRule,
    ids: np.ndarray | None = None,
    chunk: int = DEFAULT_CHUNK,
    threads: int | None = None,
    exact_max: int = EXACT_MAX,
    nprobe: int = NPROBE,
    signatures: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Groups of near-duplicates among (n, d) L2-normalised float32 vectors ``xb``.

    ``threshold`` is a cosine distance or a ``DuplicateRule``; with a rule and ``signatures``
    ((n, SIGNATURE_BYTES) int8, ``image_signature`` of each row), pairs within its candidate
    distance are confirmed by their signatures. Each group is an ascending array of ``ids``
    (default: row numbers) of two or more vectors linked by chains of near-duplicate pairs;
    largest group first, ties by smallest id. ``threads`` defaults to every core.
    """
    rule = threshold if isinstance(threshold, DuplicateRule) else None
    if rule is None:
        if threshold < 0:
            raise ValueError(f"threshold is a cosine distance >= 0, got {threshold}")
        rule = DuplicateRule(float(threshold))
    if chunk < 1 or nprobe < 1:
        raise ValueError(f"chunk and nprobe must be at least 1, got {chunk}, {nprobe}")
    n = len(xb)
    ids = _row_ids(ids, n)
    if n < 2:
        return []
    if xb.ndim != 2:
        raise ValueError(f"xb must be an (n, d) matrix, got shape {xb.shape}")
    threads = threads or os.cpu_count() or 1
    verify = None
    if signatures is not None and rule.uses_signatures:
        verify = _verifier(rule, _check_signatures(signatures, n))
        chunk = min(chunk, VERIFY_CHUNK) if n <= exact_max else chunk
    reach = rule.reach if verify is not None else rule.distance
    if n <= exact_max:
        pairs = _exact_pairs(xb, reach, chunk, threads, verify)
    else:
        pairs = _blocked_pairs(xb, reach, chunk, threads, nprobe, verify)
    edges = [(np.zeros(0, np.int64), np.zeros(0, np.int64)), *pairs]
    a = np.concatenate([e[0] for e in edges]).astype(np.int64)
    b = np.concatenate([e[1] for e in edges]).astype(np.int64)
    return _components(a, b, ids)


Verifier = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _check_signatures(signatures: np.ndarray, n: int) -> np.ndarray:
    from imagesieve.classifier._signature import SIGNATURE_BYTES

    signatures = np.asarray(signatures)
    if signatures.shape != (n, SIGNATURE_BYTES) or signatures.dtype != np.int8:
        raise ValueError(
            f"signatures must be an ({n}, {SIGNATURE_BYTES}) int8 array, one image_signature "
            f"per row of xb; got {signatures.shape} {signatures.dtype}"
        )
    return signatures


def _verifier(rule: DuplicateRule, signatures: np.ndarray) -> Verifier:
    """``keep(a, b, sim)``: which candidate pairs (rows, inner products) the rule accepts."""
    from imagesieve.classifier._signature import signature_similarity

    def keep(a: np.ndarray, b: np.ndarray, sim: np.ndarray) -> np.ndarray:
        distance = 1 - sim
        sigs = np.full(len(sim), np.nan, np.float32)
        need = np.flatnonzero(rule.needs_signature(distance))
        for s in range(0, len(need), VERIFY_BATCH):
            r = need[s : s + VERIFY_BATCH]
            sigs[r] = signature_similarity(signatures[a[r]], signatures[b[r]], flat=np.nan)
        return rule.accepts(distance, sigs)

    return keep


def _exact_pairs(
    xb: np.ndarray, threshold: float, chunk: int, threads: int, verify: Verifier | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every row pair within the threshold that ``verify`` keeps, by exact FAISS range search.

    ``chunk`` queries at a time; each pair once.
    """
    import faiss

    n, d = xb.shape
    index = faiss.IndexFlatIP(d)
    for start in range(0, n, chunk):
        x = _as_matrix(xb[start : start + chunk], "xb")
        _check_normalised(x, "xb")
        index.add(x)
    faiss.omp_set_num_threads(threads)
    for start in range(0, n, chunk):
        x = _as_matrix(xb[start : start + chunk], "xb")
        lims, sims, I = index.range_search(x, 1 - threshold - TOLERANCE)  # similarity > radius
        a = np.repeat(np.arange(start, start + len(x)), np.diff(lims).astype(np.int64))
        keep = a < I  # each pair once
        a, I = a[keep], I[keep]
        if verify is not None:
            keep = verify(a, I, sims[keep])
            a, I = a[keep], I[keep]
        yield _spanning(a, I)


def _blocked_pairs(
    xb: np.ndarray,
    threshold: float,
    chunk: int,
    threads: int,
    nprobe: int,
    verify: Verifier | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Row pairs within the threshold among pairs whose coarse cells meet (an IVF self-join).

    Cells are k-means cells of a PCA projection; each vector is compared, on the full vectors,
    with the members of its ``nprobe`` nearest cells, one cell at a time (matrix products).
    """
    import faiss

    faiss.omp_set_num_threads(threads)
    n, d = xb.shape
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n, min(n, PCA_SAMPLE), replace=False))
    xs = _as_matrix(xb[sample], "xb")
    _check_normalised(xs, "xb")
    xs -= xs.mean(axis=0)
    from scipy.linalg import eigh

    dr = min(REDUCED_DIM, d)
    _, vecs = eigh(xs.T @ xs, subset_by_index=[d - dr, d - 1], driver="evr")  # top dr
    basis = np.ascontiguousarray(vecs[:, ::-1], np.float32)
    del xs
    z = np.empty((n, dr), np.float32)
    for start in range(0, n, chunk):
        z[start : start + chunk] = _as_matrix(xb[start : start + chunk], "xb") @ basis

    nlist = max(1, min(int(LISTS_PER_SQRT_N * math.sqrt(n)), n // TRAIN_PER_LIST))
    kmeans = faiss.Kmeans(dr, nlist, niter=10, seed=1, max_points_per_centroid=TRAIN_PER_LIST)
    kmeans.train(z[np.sort(rng.choice(n, min(n, TRAIN_PER_LIST * nlist), replace=False))])
    quantizer = faiss.IndexFlatL2(dr)
    quantizer.add(kmeans.centroids)
    nprobe = min(nprobe, nlist)
    lists = np.empty((n, nprobe), np.int64)
    for start in range(0, n, chunk):
        _, lists[start : start + chunk] = faiss_search(
            quantizer, z[start : start + chunk], nprobe, threads
        )
    del z
    members = np.argsort(lists[:, 0], kind="stable")
    m_bounds = np.searchsorted(lists[members, 0], np.arange(nlist + 1))
    probes = np.argsort(lists.ravel(), kind="stable")
    q_bounds = np.searchsorted(lists.ravel()[probes], np.arange(nlist + 1))
    probes //= nprobe  # flat position -> row
    del lists
    sim = 1 - threshold - TOLERANCE
    block = max(1, min(chunk, BLOCK))
    compared = 0
    for cell in range(nlist):
        m_rows = members[m_bounds[cell] : m_bounds[cell + 1]]
        q_rows = probes[q_bounds[cell] : q_bounds[cell + 1]]
        for ms in range(0, len(m_rows), block):
            mb = m_rows[ms : ms + block]
            xm = np.asarray(xb[mb], np.float32)
            for qs in range(0, len(q_rows), block):
                qb = q_rows[qs : qs + block]
                prod = np.asarray(xb[qb], np.float32) @ xm.T
                ii, jj = np.nonzero(prod >= sim)
                compared += len(qb) * len(mb)
                a, b = qb[ii], mb[jj]
                keep = a != b
                if verify is not None and np.any(keep):
                    keep[keep] = verify(a[keep], b[keep], prod[ii[keep], jj[keep]])
                if np.any(keep):
                    yield _spanning(a[keep], b[keep])
    log.info(
        "near-duplicates: %d cells, nprobe %d, %.1f comparisons per vector",
        nlist,
        nprobe,
        compared / n,
    )


def _spanning(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges with the same connected components as (a, b), at most one per node when many."""
    if len(a) <= 2 * SPAN_MIN:
        return a, b
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    if len(a) <= 2 * len(nodes):
        return a, b
    m = len(nodes)
    graph = coo_matrix((np.ones(len(a), np.int8), (inv[: len(a)], inv[len(a) :])), shape=(m, m))
    _, labels = connected_components(graph, directed=True, connection="weak")
    first = np.full(labels.max() + 1, -1, np.int64)
    first[labels[::-1]] = np.arange(m)[::-1]  # each component's first node
    root = first[labels]
    keep = root != np.arange(m)
    return nodes[keep], nodes[root[keep]]


def _components(a: np.ndarray, b: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    """Connected components of size >= 2 of the graph with edges (a, b) over rows of ``ids``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(ids)
    if len(a) == 0:
        return []
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=True, connection="weak")
    sizes = np.bincount(labels)
    rows = np.flatnonzero(sizes[labels] >= 2)
    order = rows[np.argsort(labels[rows], kind="stable")]
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    groups = [np.sort(ids[g]) for g in np.split(order, bounds)]
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    return groups


def assign_near_duplicates(
    xq: np.ndarray,
    xb: np.ndarray | Any,
    threshold: float,
    ids: np.ndarray | None = None,
    k: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """``D, I``: each (n, d) query's ``k`` nearest vectors of ``xb`` within ``threshold``.

    ``xb`` is an (m, d) matrix (``ids`` name its rows; default row numbers) or the store's
    ``VectorIndex`` (its DuckDB ids; search it before the queries are added to it). ``D`` holds
    cosine distances, nearest first, inf where fewer are within reach; ``I`` the ids, -1 there.
    """
    xq = _as_matrix(xq, "xq")
    if hasattr(xb, "ntotal"):
        if ids is not None:
            raise ValueError("ids name the rows of a matrix; a VectorIndex has its own")
        if xb.ntotal == 0:
            return np.full((len(xq), k), np.inf, np.float32), np.full((len(xq), k), -1, np.int64)
        I, D = xb.search(xq, k)
    else:
        xb = _as_matrix(xb, "xb") if len(xb) else np.zeros((0, xq.shape[1]), np.float32)
        ids = _row_ids(ids, len(xb))
        rows, sims = top_k_of_chunks(
            xq, ((s, xb[s : s + DEFAULT_CHUNK]) for s in range(0, len(xb), DEFAULT_CHUNK)), k
        )
        pad = k - rows.shape[1]
        I = np.pad(ids[rows], ((0, 0), (0, pad)), constant_values=-1)
        D = np.pad(1 - sims, ((0, 0), (0, pad)), constant_values=np.inf)
    far = (I < 0) | (D > threshold + TOLERANCE)
    return np.where(far, np.inf, np.maximum(D, 0)).astype(np.float32), np.where(far, -1, I)


class NearDuplicateIndex:
    """Vectors added as images arrive: each new one is matched to the earlier ones within reach.

    Keeps the near-duplicate groups up to date (union-find), so a new image joins, or bridges,
    existing groups without regrouping everything; ``groups()`` equals ``near_duplicate_groups``
    over all the vectors whenever no vector has more than ``k`` near-duplicates.
    """

    def __init__(self, threshold: float, k: int = DEFAULT_K):
        if threshold < 0:
            raise ValueError(f"threshold is a cosine distance >= 0, got {threshold}")
        self.threshold = threshold
        self.k = k
        self._xb = np.zeros((0, 0), np.float32)
        self._ids = np.zeros(0, np.int64)
        self._parent = np.zeros(0, np.int64)
        self.ntotal = 0

    def add(self, xq: np.ndarray, ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Add (n, d) normalised vectors; ``D, I``: each one's nearest earlier vector within reach.

        ``I`` is its id (-1 when none; ``ids`` default to the running count) and ``D`` the cosine
        distance (inf when none). Earlier vectors of the same call count.
        """
        xq = _as_matrix(xq, "xq")
        _check_normalised(xq, "xq")
        ids = (
            np.arange(self.ntotal, self.ntotal + len(xq), dtype=np.int64)
            if ids is None
            else _row_ids(ids, len(xq))
        )
        D = np.full(len(xq), np.inf, np.float32)
        I = np.full(len(xq), -1, np.int64)
        for s in range(0, len(xq), ADD_BATCH):
            D[s : s + ADD_BATCH], I[s : s + ADD_BATCH] = self._add_batch(
                xq[s : s + ADD_BATCH], ids[s : s + ADD_BATCH]
            )
        return D, I

    def _add_batch(self, xq: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m, n0 = len(xq), self.ntotal
        k = self.k
        earlier_d, earlier_r = assign_near_duplicates(
            xq,
            self._xb[:n0] if n0 else np.zeros((0, xq.shape[1]), np.float32),
            self.threshold,
            k=k,
        )  # rows of the earlier vectors
        within = 1 - xq @ xq.T
        within[np.triu_indices(m)] = np.inf  # only earlier vectors of the batch
        kb = min(k, m)
        top = np.argpartition(within, kb - 1, axis=1)[:, :kb]
        cand_d = np.concatenate([earlier_d, np.take_along_axis(within, top, 1)], axis=1)
        cand_r = np.concatenate([earlier_r, n0 + top], axis=1)
        cand_r[~(cand_d <= self.threshold + TOLERANCE)] = -1
        self._grow(n0 + m, xq.shape[1])
        self._xb[n0 : n0 + m] = xq
        self._ids[n0 : n0 + m] = ids
        self._parent[n0 : n0 + m] = np.arange(n0, n0 + m)
        self.ntotal = n0 + m
        for i, row in enumerate(cand_r):
            for r in row[row >= 0]:
                self._union(n0 + i, int(r))
        best = np.argmin(np.where(cand_r >= 0, cand_d, np.inf), axis=1)
        d = np.take_along_axis(cand_d, best[:, None], 1)[:, 0]
        r = np.take_along_axis(cand_r, best[:, None], 1)[:, 0]
        return np.where(r >= 0, np.maximum(d, 0), np.inf), np.where(r >= 0, self._ids[r], -1)

    def _grow(self, n: int, d: int) -> None:
        if self._xb.shape[1] not in (0, d):
            raise ValueError(
                f"vectors of dimension {d} added to an index of dimension {self._xb.shape[1]}"
            )
        if n <= len(self._xb) and self._xb.shape[1] == d:
            return
        cap = max(n, 2 * len(self._xb), 1024)
        xb = np.zeros((cap, d), np.float32)
        if self.ntotal:
            xb[: self.ntotal] = self._xb[: self.ntotal]
        self._xb = xb
        self._ids = np.resize(self._ids, cap)
        self._parent = np.resize(self._parent, cap)

    def _find(self, r: int) -> int:
        parent = self._parent
        root = r
        while parent[root] != root:
            root = int(parent[root])
        while parent[r] != root:
            parent[r], r = root, int(parent[r])
        return root

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self._parent[max(ra, rb)] = min(ra, rb)

    def groups(self) -> list[np.ndarray]:
        """Groups of two or more ids, as ``near_duplicate_groups`` returns them."""
        n = self.ntotal
        roots = np.array([self._find(r) for r in range(n)], np.int64)
        rows = np.arange(n)
        linked = roots != rows
        return _components(rows[linked], roots[linked], self._ids[:n])


def near_duplicate_variants(
    image: Image.Image, rng: np.random.Generator, strength: str = "realistic"
) -> list[tuple[str, Image.Image]]:
    """Copies of an image as it is re-shared: one per kind of VARIANT_KINDS, as (kind, image).

    "realistic": a JPEG re-encoded at quality 60-90, a crop keeping 90-97% of each side, a
    resize to 50-90% (kept small: the model resizes anyway) and a brightness change of 5-15%
    either way. "harsh" (a stress test): JPEG quality 20-40, a crop keeping 90-95%, a resize
    down to 40-60% and back up, and brightness 8-15%.
    """
    from PIL import Image, ImageEnhance

    if strength not in VARIANT_STRENGTHS:
        raise ValueError(f"strength must be one of {VARIANT_STRENGTHS}, got {strength!r}")
    harsh = strength == "harsh"
    img = image.convert("RGB")
    w, h = img.size
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(20, 41) if harsh else rng.integers(60, 91)))
    jpeg = Image.open(io.BytesIO(buf.getvalue()))
    jpeg.load()
    keep = 1 - rng.uniform(0.05, 0.10) if harsh else rng.uniform(0.90, 0.97)
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = img.crop((left, top, left + cw, top + ch))
    f = rng.uniform(0.4, 0.6) if harsh else rng.uniform(0.5, 0.9)
    resized = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR)
    if harsh:
        resized = resized.resize((w, h), Image.BILINEAR)
    change = rng.uniform(0.08, 0.15) if harsh else rng.uniform(0.05, 0.15)
    bright = ImageEnhance.Brightness(img).enhance(1 + change * (1 if rng.random() < 0.5 else -1))
    return list(zip(VARIANT_KINDS, (jpeg, crop, resized, bright), strict=True))


def _pair_distances(
    originals: np.ndarray, copies: np.ndarray, source: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(true, false) cosine distances: each copy to its original; each image to its nearest other.

    False pairs: each original's nearest other original, and each copy's nearest original other
    than its own; identical pairs (the set's own duplicates) are left out.
    """
    xb = _as_matrix(originals, "originals")
    xq = _as_matrix(copies, "copies")
    source = np.asarray(source, np.int64)
    if len(source) != len(xq) or (len(source) and (source.min() < 0 or source.max() >= len(xb))):
        raise ValueError("source must give, for each copy, the row of its original in originals")
    true = 1 - np.einsum("ij,ij->i", xq, xb[source])
    D, I = assign_near_duplicates(np.concatenate([xb, xq]), xb, 2.0, k=3)
    own = np.concatenate([np.arange(len(xb)), source])[:, None]
    D = np.where((I == own) | (D <= TOLERANCE), np.inf, D)
    false = D.min(axis=1)
    return true, false[np.isfinite(false)]


def calibrate_duplicate_distance(
    originals: np.ndarray,
    copies: np.ndarray,
    source: np.ndarray,
    false_rate: float = 0.01,
    recall: float = 0.99,
) -> float:
    """A cosine distance threshold from embeddings of distinct images and copies of some of them.

    ``originals`` (n, d) are distinct images, ``copies`` (m, d) near-duplicates made from them
    (``near_duplicate_variants``), ``source`` (m,) the row of each copy's original. The cap is
    the largest distance with at most ``false_rate`` of the nearest-different pairs within it;
    when the ``recall`` quantile of the true pairs is below the cap, the threshold sits midway
    between the two, else at the cap (precision first).
    """
    if not 0 <= false_rate < 1 or not 0 < recall <= 1:
        raise ValueError(f"false_rate in [0, 1) and recall in (0, 1], got {false_rate}, {recall}")
    if len(copies) == 0 or len(originals) < 2:
        raise ValueError("calibration needs copies and at least two distinct originals")
    true, false = _pair_distances(originals, copies, source)
    false = np.sort(false)
    m = int(math.floor(false_rate * len(false)))
    cap = float(np.nextafter(false[m], 0)) if m < len(false) else 2.0
    want = float(np.quantile(true, recall, method="inverted_cdf"))
    threshold = (want + cap) / 2 if want <= cap else cap
    # Not a warning when the recall quantile is beyond the cap: the rule's signature stage
    # decides the copies between this distance and the candidate distance.
    log.info(
        "duplicate threshold %.4f: %.3f of %d true pairs within (%.2f quantile %.4f), "
        "%.3f of %d nearest-different pairs (cap %.4f)",
        threshold,
        float(np.mean(true <= threshold)),
        len(true),
        recall,
        want,
        float(np.mean(false <= threshold)),
        len(false),
        cap,
    )
    return max(threshold, 0.0)


def calibrate_duplicate_rule(
    originals: np.ndarray,
    copies: np.ndarray,
    source: np.ndarray,
    signatures: np.ndarray,
    copy_signatures: np.ndarray,
    false_rate: float = 0.003,
    recall: float = 0.99,
    k: int = DEFAULT_K,
) -> DuplicateRule:
    """A ``DuplicateRule`` from embeddings and signatures of distinct images and copies of some.

    ``distance`` is ``calibrate_duplicate_distance`` at ``false_rate``; ``candidate_distance``
    the ``recall`` quantile of the copies' distances to their originals. ``similarity`` is
    chosen like the distance, over each image's ``k`` nearest candidates (originals and copies
    together): at most ``false_rate`` of the images may have a different one beyond
    ``distance`` whose signature passes; midway to the ``1 - recall`` quantile of the copies
    it decides (between the two distances) when that is higher, else just above that cap
    (precision first). ``floor`` vetoes different images within ``distance``: midway between the
    most alike of those whose signature similarity is below the ``1 - recall`` quantile of the
    copies within ``distance`` and that quantile (so it costs at most that share of them); None
    when no such pair is among the calibration images.
    """
    from imagesieve.classifier._signature import signature_similarity

    distance = calibrate_duplicate_distance(originals, copies, source, false_rate, recall)
    xb = _as_matrix(originals, "originals")
    xq = _as_matrix(copies, "copies")
    source = np.asarray(source, np.int64)
    sig = _check_signatures(signatures, len(xb))
    csig = _check_signatures(copy_signatures, len(xq))
    true_d = 1 - np.einsum("ij,ij->i", xq, xb[source])
    candidate = max(distance, float(np.quantile(true_d, recall, method="inverted_cdf")))
    x = np.concatenate([xb, xq])
    s_all = np.concatenate([sig, csig])
    src = np.concatenate([np.arange(len(xb)), source])
    D, I = assign_near_duplicates(x, x, candidate, k=k + 1)
    rows = np.repeat(np.arange(len(x)), I.shape[1]).reshape(I.shape)
    false = (I >= 0) & (src[np.maximum(I, 0)] != src[:, None]) & (D > distance + TOLERANCE)
    sims = np.full(I.shape, -np.inf, np.float32)
    sims[false] = signature_similarity(s_all[rows[false]], s_all[I[false]])
    worst = np.sort(sims.max(axis=1))[::-1]  # each image's most similar different candidate
    m = int(math.floor(false_rate * len(worst)))
    cap = float(worst[m]) if m < len(worst) and np.isfinite(worst[m]) else -1.0
    decided = (true_d > distance) & (true_d <= candidate)  # the copies the signature decides
    true_s = signature_similarity(csig[decided], sig[source[decided]])
    want = float(np.quantile(true_s, 1 - recall, method="inverted_cdf")) if len(true_s) else 1.0
    similarity = (want + cap) / 2 if want > cap else float(np.nextafter(np.float32(cap), 2))
    # The floor: different images within ``distance`` whose signatures differ more than all
    # but 1 - recall of the copies there do are vetoed, midway between the most alike of them
    # and those copies (never above a ``similarity`` that decides copies: a closer pair never
    # needs more).
    within = (I >= 0) & (src[np.maximum(I, 0)] != src[:, None]) & (D <= distance + TOLERANCE)
    close_s = signature_similarity(s_all[rows[within]], s_all[I[within]])
    copies_s = signature_similarity(csig[true_d <= distance], sig[source[true_d <= distance]])
    bar = float(np.quantile(copies_s, 1 - recall, method="inverted_cdf")) if len(copies_s) else -1.0
    if decided.any():  # the signature decides some copies beyond ``distance``
        bar = min(bar, similarity)
    vetoed = close_s[close_s < bar]
    floor = (float(vetoed.max()) + bar) / 2 if len(vetoed) else None
    log.info(
        "duplicate rule: distance %.4f (signature similarity >= %s), or within %.4f with "
        "signature similarity >= %.4f (copies' %.2f quantile %.4f; different images' cap %.4f)",
        distance,
        "any" if floor is None else f"{floor:.4f}",
        candidate,
        similarity,
        1 - recall,
        want,
        cap,
    )
    return DuplicateRule(distance, candidate, similarity, floor)
