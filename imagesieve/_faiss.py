"""Exact searches: FAISS on the cheaper of its two kernels, and the BLAS products around it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = [
    "BLAS_MIN_QUERIES",
    "BOUND_DIMS",
    "cosine_distance",
    "nearest_above",
    "search",
    "top_k_of_chunks",
]

#: Queries from which one matrix product (BLAS) beats FAISS's query-by-query kernel on a flat
#: index. Measured on 5,000 x 1280-d vectors, one thread: 1 query 2.6 ms vs 6.0 ms with BLAS,
#: 3 queries 7.8 vs 6.8, 8 queries 20.9 vs 9.0, 16 queries 43.5 vs 9.8.
BLAS_MIN_QUERIES = 3
_NEVER = 2**31 - 1
#: Size of the projection ``nearest_above`` bounds inner products with. Measured on 100,000
#: stored 1280-d rows and the 1,083 training images a retrain added: 64 leaves 11 pairs a row
#: to compute in full, 128 leaves 2.8, 160 1.4; 128 was the fastest (0.75 s vs FAISS's 1.6 s).
BOUND_DIMS = 128
#: A pair computed on its own (two vectors gathered) costs about this many pairs of a matrix
#: product: past that share of a block's pairs, the block is multiplied whole.
_GATHER_COST = 32
#: Added to squared residual norms and taken off thresholds, so float32 rounding cannot turn a
#: bound into a miss.
_SLACK = 1e-4
#: Bounds (queries x vectors) held at once: 64 MB. Many vectors make the blocks of queries
#: smaller (4,096 at 1,083 vectors, 838 at 20,000).
_BLOCK_FLOATS = 1 << 24
#: Pairs computed on their own at once (their two gathered vectors: 84 MB at 1280-d).
_PAIRS_AT_ONCE = 8192
#: The range basis is found on at most this many of the vectors (a seeded sample).
_BASIS_SAMPLE = 4096


def cosine_distance(sims: np.ndarray) -> np.ndarray:
    """Inner products of unit vectors -> cosine distances ``1 - cos``, kept in [0, 2]."""
    return np.clip(1.0 - sims, 0.0, 2.0)


def search(index: Any, x: np.ndarray, k: int, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(x, k)`` on ``threads`` OpenMP threads, choosing the exact kernel by batch size.

    FAISS picks its kernel from a process-wide threshold whose default changed between versions
    (with 1.15's default of 128,000, 8 queries over 5,000 vectors took the slow kernel). It is
    set on every call; a concurrent search may run on the other's kernel, which changes its
    speed, never its result. The thread count is the calling thread's own.
    """
    import faiss

    faiss.cvar.distance_compute_blas_threshold = 1 if len(x) >= BLAS_MIN_QUERIES else _NEVER
    faiss.omp_set_num_threads(threads)
    return index.search(x, k)


def top_k_of_chunks(
    queries: np.ndarray, chunks: Iterable[tuple[int, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, inner products) of each query's ``k`` best over ``(first row, vectors)`` chunks.

    Best first. Only one chunk is in memory at a time, so the chunks can be read from an index
    as they are needed.
    """
    m = len(queries)
    best_s = np.zeros((m, 0), np.float32)
    best_i = np.zeros((m, 0), np.int64)
    for start, x in chunks:
        s = queries @ x.T
        cand_s = np.concatenate([best_s, s], axis=1)
        rows = np.broadcast_to(np.arange(start, start + s.shape[1]), s.shape)
        cand_i = np.concatenate([best_i, rows], axis=1)
        kk = min(k, cand_s.shape[1])
        top = np.argpartition(-cand_s, kk - 1, axis=1)[:, :kk]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1), np.take_along_axis(best_s, order, 1)


def nearest_above(
    queries: np.ndarray,
    vectors: np.ndarray,
    floor: np.ndarray,
    dims: int = BOUND_DIMS,
    block: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's most similar of ``vectors`` (row, inner product) where it beats ``floor``.

    Exact. Row -1 where none has an inner product above the query's ``floor`` (what it has
    elsewhere: a retrain's old training images), and the inner product then is no more than
    it. Inner products are bounded from a ``dims``-d projection (the rest by Cauchy-Schwarz:
    x.v <= px.pv + |rx| |rv|), so only pairs whose bound reaches the best found so far are
    computed in full. Runs on the BLAS library's threads, in blocks of queries whose bounds
    take at most 64 MB (``_BLOCK_FLOATS``).
    """
    queries = np.ascontiguousarray(queries, np.float32)
    vectors = np.ascontiguousarray(vectors, np.float32)
    floor = np.asarray(floor, np.float32)
    found = np.full(len(queries), -1, np.int64)
    best = np.full(len(queries), -np.inf, np.float32)
    n = len(vectors)
    if not n or not len(queries):
        return found, best
    basis = _range_basis(vectors, dims) if dims < min(vectors.shape) else None
    if basis is not None:
        pv = vectors @ basis
        pv_t, rv = np.ascontiguousarray(pv.T), _residual_norms(vectors, pv)
    block = max(1, min(block, _BLOCK_FLOATS // n))
    for a in range(0, len(queries), block):
        q, lo = queries[a : a + block], floor[a : a + block]
        if basis is None:
            j, s = _most_similar(q, vectors)
        else:
            pq = q @ basis
            bound = pq @ pv_t
            bound += _residual_norms(q, pq)[:, None] * rv
            j = bound.argmax(1)
            s = np.einsum("ij,ij->i", q, vectors[j])
            bound[np.arange(len(q)), j] = -np.inf
            beat = np.maximum(s, lo) - _SLACK
            rows, cols = np.divmod(np.flatnonzero(bound >= beat[:, None]), n)
            if len(rows) * _GATHER_COST > bound.size:  # loose bounds: multiply the block whole
                j, s = _most_similar(q, vectors)
            elif len(rows):
                more = np.empty(len(rows), np.float32)
                for b in range(0, len(rows), _PAIRS_AT_ONCE):
                    r, c = rows[b : b + _PAIRS_AT_ONCE], cols[b : b + _PAIRS_AT_ONCE]
                    more[b : b + len(r)] = np.einsum("ij,ij->i", q[r], vectors[c])
                up = more > s[rows]
                rows, cols, more = rows[up], cols[up], more[up]
                order = np.lexsort((-more, rows))  # by row, best first
                first = order[np.diff(rows[order], prepend=-1) != 0]
                j[rows[first]], s[rows[first]] = cols[first], more[first]
        found[a : a + block] = np.where(s > lo, j, -1)
        best[a : a + block] = s
    return found, best


def _most_similar(q: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's most similar vector (row, inner product), from one matrix product."""
    rows, sims = top_k_of_chunks(q, [(0, vectors)], 1)
    return rows[:, 0], sims[:, 0]


def _range_basis(vectors: np.ndarray, dims: int) -> np.ndarray:
    """(d, dims) orthonormal columns near the span ``vectors`` vary most in (seeded).

    A randomised range finder with one power iteration, on at most ``_BASIS_SAMPLE`` of them:
    milliseconds where an SVD of 1,083 x 1280 takes 0.45 s; a poorer basis costs only pruning,
    never exactness.
    """
    rng = np.random.default_rng(0)
    if len(vectors) > _BASIS_SAMPLE:
        vectors = vectors[np.sort(rng.choice(len(vectors), _BASIS_SAMPLE, replace=False))]
    v = vectors.astype(np.float64)
    y = rng.standard_normal((len(v), dims))
    return np.linalg.qr(v.T @ (v @ (v.T @ y)))[0].astype(np.float32)


def _residual_norms(x: np.ndarray, projected: np.ndarray) -> np.ndarray:
    """|x - its projection|, over-estimated a little so rounding keeps it an upper bound."""
    rest = np.einsum("ij,ij->i", x, x) - np.einsum("ij,ij->i", projected, projected)
    return np.sqrt(np.maximum(rest, 0.0) + _SLACK)
