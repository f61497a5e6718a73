"""FAISS searches on the cheaper of its two exact kernels, with the caller's thread budget."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["BLAS_MIN_QUERIES", "search", "top_k_of_chunks"]

#: Queries from which one matrix product (BLAS) beats FAISS's query-by-query kernel on a flat
#: index. Measured on 5,000 x 1280-d vectors, one thread: 1 query 2.6 ms vs 6.0 ms with BLAS,
#: 3 queries 7.8 vs 6.8, 8 queries 20.9 vs 9.0, 16 queries 43.5 vs 9.8.
BLAS_MIN_QUERIES = 3
_NEVER = 2**31 - 1


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
