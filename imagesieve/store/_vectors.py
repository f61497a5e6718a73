"""The FAISS side of the store: one ID-mapped index per model version, ids = DuckDB row ids.

The index type follows the collection's size: exact (flat) search while it is small, past
FLAT_MAX vectors an HNSW graph, built from the stored vectors, with ``efSearch`` tuned at build
time until recall@10 against exact search reaches TARGET_RECALL (measured and stored; a
neighbour as similar as the true 10th counts, so identical embeddings tie), and past HNSW_MAX
an IVF-PQ index re-ranked on 8-bit codes (``ivf_recipe``), trained on a sample and filled in
chunks, its ``nprobe`` tuned the same way against exact answers gathered while it is filled.
New vectors are added to every kind incrementally; the HNSW is re-tuned when it has doubled.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from imagesieve._faiss import cosine_distance, top_k_of_chunks
from imagesieve._faiss import search as faiss_search
from imagesieve.store._rows import _positions

__all__ = ["FLAT_MAX", "HNSW_MAX", "IndexFileError", "VectorIndex", "ivf_recipe", "train_rows"]

log = logging.getLogger(__name__)

#: Largest collection searched exactly (measured: ~3 ms a query at 5k, ~11 ms at 20k);
#: beyond it the index becomes an HNSW graph.
FLAT_MAX = 5_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
#: recall@10 against exact search the HNSW's efSearch is tuned to reach.
TARGET_RECALL = 0.97
EF_SEARCH_CANDIDATES = (16, 32, 64, 128, 256, 512)
#: Largest collection held as an HNSW graph of float32 vectors (~5.4 GB at 1280-d with its
#: graph); beyond it the index is IVF-PQ (``ivf_recipe``): ~1.4 KB a vector instead of ~5.4 KB.
HNSW_MAX = 1_000_000
#: The IVF kind: PQ code bytes for the inverted-file scan, and the codes its candidates are
#: re-ranked on, per vector. Chosen on real embeddings in bench_index_scale.py: a PCA
#: projection to 256/384/512 dimensions capped recall@10 at 0.88/0.92/0.94 whatever the rest;
#: full-size 8-bit codes keep 0.99 at a quarter of float32 (6-bit: 0.976, 4-bit: 0.91).
IVF_PQ_BYTES, IVF_REFINE = 32, "SQ8"
#: Candidates re-ranked on the refine codes per result wanted.
IVF_K_FACTOR = 8
NPROBE_CANDIDATES = (4, 8, 16, 32, 64, 128, 256)
#: Training vectors per inverted list (FAISS asks for 39 or more), and at most.
IVF_TRAIN_PER_LIST, IVF_TRAIN_MAX = 40, 262_144
#: When no setting reaches TARGET_RECALL, the smallest within this of the best is taken, with
#: no margin (at 120,000 vectors IVF recall stopped at 0.977 from nprobe 32 on, where 256 cost
#: 5x the time; at 10,000,000, 0.956 from 64 on, where 128 cost 1.3x).
RECALL_PLATEAU = 0.005
#: Exact neighbours kept per recall query (ties with the 10th beyond it are not counted).
TRUTH_K = 32
#: Query batches up to this size search on one thread (measured: 0.3 ms vs 3.5 ms p50 with two).
SINGLE_QUERY_BATCH = 4
#: Queries (sampled stored vectors) recall is measured on.
RECALL_QUERIES = 200
#: Vectors read from the index at a time to find the queries' exact neighbours.
TUNE_CHUNK = 16_384
#: A returned neighbour counts as found when it is as similar as the true 10th, to within this:
#: images whose embeddings are the same (a re-encoded or re-uploaded photo) tie, and which of
#: them comes back is a coin toss that would otherwise cap recall (ann-benchmarks counts ties
#: the same way, with a looser 1e-3).
TIE_TOLERANCE = 1e-5
#: A save appends to a delta file beside the index, not the index itself, while the rows added
#: since the index was last written whole (float32, in the delta) stay under this fraction of
#: its size (and it is HNSW or IVF: a flat index is small, re-written whole).
DELTA_MAX_FRACTION = 0.25
#: Bytes read at a time to checksum a saved index.
CHECKSUM_CHUNK = 1 << 24
#: From this many ids, ``vectors_of`` gathers from a view of the stored vectors, not id by id.
VIEW_MIN_IDS = 4096


class IndexFileError(Exception):
    """A saved index file that fails its checksum or cannot be read: it is rebuilt, never used."""


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int, chunk: int = 65536) -> np.ndarray:
    """Row indices of the ``k`` largest inner products of each query, by chunked brute force."""
    chunks = ((a, vectors[a : a + chunk]) for a in range(0, len(vectors), chunk))
    return top_k_of_chunks(queries, chunks, k)[0]


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest sqrt(n), 16 to 65,536."""
    return int(min(65_536, max(16, 2 ** round(math.log2(math.sqrt(max(n, 1)))))))


def ivf_recipe(n: int, dim: int = 1280) -> str:
    """The FAISS factory string of the IVF kind for ``n`` vectors (L2 on unit vectors).

    For unit vectors L2 ranks as inner product does (cosine distance = L2^2 / 2), and it is
    the metric PQ's residual codes are made for. ``np``: no polysemous training, which took
    25 s of a 26 s training on 10,000 vectors and serves a search mode not used here.
    """
    pq = math.gcd(dim, IVF_PQ_BYTES)  # PQ splits the vector into equal parts
    return f"IVF{ivf_lists(n)},PQ{pq}np,Refine({IVF_REFINE})"


def recall_queries(sample_ids: np.ndarray, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The seeded RECALL_QUERIES of an IVF build's training sample nprobe is tuned on: (x, ids)."""
    pick = np.random.default_rng(0).choice(
        len(sample_ids), min(RECALL_QUERIES, len(sample_ids)), replace=False
    )
    return np.ascontiguousarray(sample[pick], np.float32), np.asarray(sample_ids, np.int64)[pick]


def ivf_train_rows(n: int) -> int:
    """Vectors the IVF kind is trained on when it will hold ``n`` (PQ's 256 codes ask ~10,000)."""
    return int(min(n, IVF_TRAIN_MAX, max(IVF_TRAIN_PER_LIST * ivf_lists(n), 10_000)))


def train_rows(n: int) -> int:
    """Vectors to sample for training an index of ``n`` (0: a kind that needs none)."""
    return ivf_train_rows(n) if n > HNSW_MAX else 0


class VectorIndex:
    """Stored embeddings of one model version, searchable by inner product (cosine similarity).

    DuckDB is the source of truth; this index is derived from it and can always be rebuilt.
    ``save`` writes the index and a small sidecar (count, max id, id sum, file size, CRC-32 of
    the file, kind and tuning) so that a check against DuckDB needs no load when nothing
    changed, and a load can tell a damaged file from a good one. A graph or IVF index that
    only grew since it was written whole saves just the added rows, to a delta file the
    sidecar names and checksums (``DELTA_MAX_FRACTION``); loading adds them back.
    """

    def __init__(self, path: Path, dim: int, index=None, info: dict[str, Any] | None = None):
        import faiss

        self.path = Path(path)
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.info: dict[str, Any] = dict(info or {})
        self.dirty = index is None
        #: Loaded from a file whose checksum matched its sidecar's (older sidecars have none).
        self.verified = False
        #: The sidecar of the whole index on disk that this one only added to since (None:
        #: the next save writes it whole), and the (ids, vectors) added since.
        self._base: dict[str, Any] | None = None
        self._appended: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def sidecar_path(self) -> Path:
        """The JSON written next to the index at each save."""
        return self.path.with_suffix(".json")

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self.index.ntotal)

    @property
    def kind(self) -> str:
        """``flat`` (exact), ``hnsw`` or ``ivfpq`` (approximate)."""
        import faiss

        inner = faiss.downcast_index(self.index.index)
        if isinstance(inner, faiss.IndexHNSW):
            return "hnsw"
        return "flat" if isinstance(inner, faiss.IndexFlat) else "ivfpq"

    @property
    def l2(self) -> bool:
        """True when FAISS answers squared L2 distances (the IVF kind), not inner products."""
        import faiss

        return self.index.metric_type == faiss.METRIC_L2

    @classmethod
    def load(cls, path: Path) -> VectorIndex | None:
        """The saved index at ``path``; None when absent or damaged (a warning says why)."""
        try:
            return cls.open(path)
        except IndexFileError as e:
            log.warning("%s; it is not used", e)
            return None

    @classmethod
    def open(cls, path: Path) -> VectorIndex | None:
        """The saved index at ``path``, checked against its sidecar's checksum; None when absent.

        Raises IndexFileError when the file fails the checksum or FAISS cannot read it. A file
        whose sidecar has no checksum (saved by an older version) is read unchecked: compare
        its ``stats()`` with DuckDB's.
        """
        import faiss

        path = Path(path)
        if not path.is_file():
            return None
        try:
            side = json.loads(path.with_suffix(".json").read_text())
        except (OSError, ValueError):
            side = {}
        if not isinstance(side, dict):
            side = {}
        want = side.get("crc32")
        if want is not None:
            crc, size = _file_crc32(path)
            if size != side.get("bytes"):
                raise IndexFileError(
                    f"{path}: {size} bytes where its sidecar says {side.get('bytes')} "
                    "(damaged, or changed since it was saved)"
                )
            if crc != want:
                raise IndexFileError(
                    f"{path}: checksum {crc:08x} where its sidecar says {want:08x} (damaged)"
                )
        try:
            index = faiss.read_index(str(path))
        except Exception as e:  # a damaged file of an older version, unchecked: any failure
            reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise IndexFileError(f"{path}: FAISS cannot read it ({reason})") from None
        if not isinstance(index, faiss.IndexIDMap2):
            raise IndexFileError(f"{path}: not an ID-mapped index ({type(index).__name__})")
        relabel = side.get("ids") if want is not None else None
        if relabel:  # the file is another version's (``save_linked``): these ids are this one's
            faiss.copy_array_to_vector(
                _read_ids(path.with_name(relabel["file"]), relabel, index.ntotal), index.id_map
            )
            index.construct_rev_map()
        loaded = cls(path, index.d, index, side.get("info", {}))
        loaded.verified = want is not None
        delta = side.get("delta")
        if delta:
            ids, vectors = _read_delta(path.with_name(delta["file"]), delta, index.d)
            loaded.add(ids, vectors)
            loaded._appended = [(ids, vectors)]
            loaded.dirty = False
        if want is not None:
            loaded._base = side
        return loaded

    @classmethod
    def build(
        cls, path: Path, dim: int, ids: np.ndarray, vectors: np.ndarray, threads: int | None = None
    ) -> VectorIndex:
        """A new index over these vectors, of the kind their number calls for.

        An HNSW graph is built on ``threads`` threads (default: every core); the IVF kind is
        trained on a seeded sample of them.
        """
        sample = None
        if want := train_rows(len(ids)):
            pick = np.sort(np.random.default_rng(0).choice(len(ids), want, replace=False))
            sample = (np.asarray(ids)[pick], np.asarray(vectors)[pick])
        return cls.build_chunks(path, dim, [(ids, vectors)], len(ids), threads, sample)

    @classmethod
    def build_chunks(
        cls,
        path: Path,
        dim: int,
        chunks: Iterable[tuple[np.ndarray, np.ndarray]],
        n: int,
        threads: int | None = None,
        sample: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> VectorIndex:
        """``build`` from (ids, vectors) chunks of ``n`` vectors in all, added as they come.

        Only the index and one chunk are in memory at a time (a rebuild streams DuckDB's rows).
        Past HNSW_MAX the IVF kind is trained on ``sample`` (ids, vectors; default: the first
        chunks' ``ivf_train_rows``).
        """
        index = cls(path, dim)
        index._make_chunks(chunks, n, threads, sample)
        index.dirty = True
        return index

    def _make_chunks(
        self,
        chunks: Iterable[tuple[np.ndarray, np.ndarray]],
        n: int,
        threads: int | None = None,
        sample: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Replace the index by the kind ``n`` vectors call for, filled from the chunks.

        The chunks may be read from the index being replaced: it is swapped only when filled.
        """
        import faiss

        if n > HNSW_MAX:
            self._make_ivf_chunks(chunks, n, sample, threads)
        elif n > FLAT_MAX:
            self._make_hnsw_chunks(chunks, threads, n)
        else:
            flat = faiss.IndexFlatIP(self.dim)
            _reserve(flat, n)
            index = faiss.IndexIDMap2(flat)
            for ids, vectors in chunks:
                if len(ids):
                    index.add_with_ids(
                        np.ascontiguousarray(vectors, np.float32).reshape(len(ids), self.dim),
                        np.ascontiguousarray(ids, np.int64),
                    )
            self.index = index
        self._base = None

    def ids(self) -> np.ndarray:
        """The DuckDB ids held, in insertion order."""
        import faiss

        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def vectors(self, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The (ids, vectors) held from position ``start`` on, in insertion order."""
        import faiss

        inner = faiss.downcast_index(self.index.index)
        n = max(0, self.ntotal - start)
        return self.ids()[start:], inner.reconstruct_n(start, n) if n else np.zeros(
            (0, self.dim), np.float32
        )

    def vectors_of(self, ids: np.ndarray, *, view: bool = False) -> np.ndarray | None:
        """The vectors held under DuckDB ``ids``, in their order.

        None when the index holds codes rather than vectors (IVF-PQ) or lacks one of ``ids``:
        read them from DuckDB then. Many ids are gathered from a view of the stored vectors
        (FAISS's per-id reconstruct: 0.38 s for 50,000 of 100,000 1280-d vectors, the view
        0.07 s); a few by id (the view's id lookup costs a sort of every id held). ``view``:
        ids held in one run come as a view of the index's storage, not copied (256 MB for
        50,000 rows, 0.5-0.6 s on a VM whose fresh memory faults to its host), valid only
        while this index is neither changed nor freed.
        """
        import faiss

        inner = faiss.downcast_index(self.index.index)
        if isinstance(inner, faiss.IndexHNSW):
            inner = faiss.downcast_index(inner.storage)
        if not isinstance(inner, faiss.IndexFlat):
            return None  # codes, not vectors
        want = np.ascontiguousarray(ids, np.int64)
        if len(want) < VIEW_MIN_IDS:
            try:
                return self.index.reconstruct_batch(want)
            except RuntimeError:  # an id not held
                return None
        try:
            at = _positions(self.ids(), want)
        except ValueError:  # an id not held
            return None
        if view and not isinstance(at, slice) and at[-1] - at[0] == len(at) - 1:
            if (np.diff(at) == 1).all():  # one run of positions
                at = slice(int(at[0]), int(at[-1]) + 1)
        stored = faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * self.dim)
        rows = stored.reshape(inner.ntotal, self.dim)[at]
        if not isinstance(at, slice):
            return rows  # gathered: a copy already
        if not view:
            return rows.copy()
        rows.flags.writeable = False  # a write would change the index
        return rows

    def chunks(self, size: int = 65_536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The (ids, vectors) held, ``size`` at a time in insertion order (no full copy)."""
        import faiss

        inner = faiss.downcast_index(self.index.index)
        ids = self.ids()
        for a in range(0, len(ids), size):
            m = min(size, len(ids) - a)
            yield ids[a : a + m], inner.reconstruct_n(a, m)

    @property
    def outgrown(self) -> bool:
        """True for a flat index past FLAT_MAX or an HNSW past HNSW_MAX: due for the next kind."""
        kind = self.kind
        return (kind == "flat" and self.ntotal > FLAT_MAX) or (
            kind == "hnsw" and self.ntotal > HNSW_MAX
        )

    @property
    def retune_due(self) -> bool:
        """True for an HNSW index that has doubled since its efSearch was tuned."""
        return self.kind == "hnsw" and self.ntotal >= 2 * self.info.get("tuned_at", self.ntotal)

    def stats(self) -> tuple[int, int, int]:
        """(count, max id, sum of ids): compared with the same figures from DuckDB."""
        ids = self.ids()
        return len(ids), int(ids.max(initial=-1)), int(ids.sum())

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under their DuckDB ids (a flat index outgrowing FLAT_MAX turns HNSW on save)."""
        if len(ids) == 0:
            return
        x = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        self.index.add_with_ids(x, ids)
        if self._base is not None:
            self._appended.append((ids.copy(), x.copy()))
        self.dirty = True

    def remove(self, ids: np.ndarray) -> None:
        """Remove vectors by DuckDB id (missing ids are ignored); HNSW is rebuilt without them."""
        if len(ids) == 0:
            return
        if self.kind == "ivfpq":  # its vectors are codes: a rebuild reads DuckDB's
            raise ValueError("an IVF index removes vectors by a rebuild from the store")
        self._base = None
        if self.kind == "flat":
            self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
        else:
            have, vectors = self.vectors()
            keep = ~np.isin(have, ids)
            self._make_hnsw(have[keep], vectors[keep])
        self.dirty = True

    def _make_hnsw(self, ids: np.ndarray, vectors: np.ndarray, threads: int | None = None) -> None:
        self._make_hnsw_chunks([(ids, vectors)], threads)

    def _make_hnsw_chunks(
        self,
        chunks: Iterable[tuple[np.ndarray, np.ndarray]],
        threads: int | None = None,
        n: int | None = None,
    ) -> None:
        """Replace the index by an HNSW graph of the (ids, vectors) chunks, then tune it.

        ``n``, the vectors to come, sizes the graph's vector storage once up front.
        """
        import faiss

        t0 = time.perf_counter()
        faiss.omp_set_num_threads(threads or os.cpu_count() or 1)  # this thread's OpenMP team
        inner = faiss.IndexHNSWFlat(self.dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        if n:
            _reserve(faiss.downcast_index(inner.storage), n)
        index = faiss.IndexIDMap2(inner)
        for ids, vectors in chunks:
            if len(ids):
                index.add_with_ids(
                    np.ascontiguousarray(vectors, np.float32).reshape(len(ids), self.dim),
                    np.ascontiguousarray(ids, np.int64),
                )
        self.index = index
        self.info = {"built_at": index.ntotal, "build_seconds": round(time.perf_counter() - t0, 2)}
        self.tune()

    def _make_ivf_chunks(
        self,
        chunks: Iterable[tuple[np.ndarray, np.ndarray]],
        n: int,
        sample: tuple[np.ndarray, np.ndarray] | None = None,
        threads: int | None = None,
    ) -> None:
        """Replace the index by the IVF kind over the (ids, vectors) chunks, then tune nprobe.

        Trained on ``sample`` (default: the first chunks' ``ivf_train_rows``), filled chunk by
        chunk into storage sized up front; the exact neighbours of RECALL_QUERIES sampled
        vectors are gathered from the same chunks as they pass, so tuning needs no second read.
        """
        import faiss

        t0 = time.perf_counter()
        faiss.omp_set_num_threads(threads or os.cpu_count() or 1)
        it = iter(chunks)
        head: list[tuple[np.ndarray, np.ndarray]] = []
        if sample is None:
            want, got = ivf_train_rows(n), 0
            while got < want and (chunk := next(it, None)) is not None:
                head.append(chunk)
                got += len(chunk[0])
            sample = (
                np.concatenate([c[0] for c in head])[:want],
                np.concatenate([c[1] for c in head])[:want],
            )
        sample_ids, train = sample
        recipe = ivf_recipe(n, self.dim)
        inner = faiss.index_factory(self.dim, recipe, faiss.METRIC_L2)
        inner.train(np.ascontiguousarray(train, np.float32).reshape(len(sample_ids), self.dim))
        trained = time.perf_counter() - t0
        refine = faiss.downcast_index(inner.refine_index)
        _reserve(refine, n)
        index = faiss.IndexIDMap2(inner)
        queries, own = recall_queries(sample_ids, train)
        seen: list[np.ndarray] = []

        def fill() -> Iterator[tuple[int, np.ndarray]]:
            at = 0
            for ids, vectors in itertools.chain(head, it):
                if not len(ids):
                    continue
                x = np.ascontiguousarray(vectors, np.float32).reshape(len(ids), self.dim)
                index.add_with_ids(x, np.ascontiguousarray(ids, np.int64))
                seen.append(np.asarray(ids, np.int64))
                yield at, x
                at += len(ids)

        rows, sims = top_k_of_chunks(queries, fill(), TRUTH_K + 1)
        self.index = index
        self.info = {
            "built_at": index.ntotal,
            "recipe": recipe,
            "train_rows": len(sample_ids),
            "train_seconds": round(trained, 2),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        self.tune(truth=(queries, own, np.concatenate(seen)[rows], sims))

    def _truth(
        self, guard: contextlib.AbstractContextManager
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Recall queries (sampled stored vectors), their ids, and their exact neighbours.

        The exact answers come from the index's own vectors, read TUNE_CHUNK at a time
        (memory stays bounded), ``guard`` held while a chunk is read.
        """
        inner = self._inner()
        with guard:
            n = self.ntotal
            ids = self.ids()[:n]
            sample = np.random.default_rng(0).choice(n, min(RECALL_QUERIES, n), replace=False)
            queries = np.stack([inner.reconstruct(int(i)) for i in sample])

        def chunks() -> Iterator[tuple[int, np.ndarray]]:
            for a in range(0, n, TUNE_CHUNK):
                with guard:
                    x = inner.reconstruct_n(a, min(TUNE_CHUNK, n - a))
                yield a, x

        rows, sims = top_k_of_chunks(queries, chunks(), TRUTH_K + 1)
        return queries, ids[sample], ids[rows], sims

    def _inner(self) -> Any:
        import faiss

        return faiss.downcast_index(self.index.index)

    def _search_at(self, queries: np.ndarray, k: int, setting: int) -> tuple[np.ndarray, ...]:
        """(similarities, ids) of a search at an efSearch (HNSW) or nprobe (IVF) ``setting``."""
        import faiss

        if self.kind == "hnsw":
            return self.index.search(
                queries, k, params=faiss.SearchParametersHNSW(efSearch=setting)
            )
        self._set_nprobe(setting)
        d, found = self.index.search(queries, k)
        return 1.0 - d / 2.0, found

    def _set_nprobe(self, nprobe: int) -> None:
        import faiss

        space = faiss.ParameterSpace()
        space.set_index_parameter(self._inner(), "nprobe", int(nprobe))
        space.set_index_parameter(self._inner(), "k_factor_rf", IVF_K_FACTOR)

    def tune(
        self,
        guard: contextlib.AbstractContextManager | None = None,
        truth: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """The smallest efSearch (HNSW) or nprobe (IVF) whose recall@10 reaches the target.

        ``truth`` is (queries, their ids, exact neighbours' ids, their similarities); without
        it an HNSW reads its own vectors for them (an IVF holds codes: it is tuned when built).
        A server passes its store's lock as ``guard``: held only while a chunk is read,
        around each search of the live index and for the final setting, so requests and adds
        go on meanwhile.
        """
        kind = self.kind
        if kind == "flat" or (kind == "ivfpq" and truth is None):
            return
        guard = guard or contextlib.nullcontext()
        # Queries are stored vectors; each one's own match is left out of both lists, so the
        # figure is the recall of its 10 true neighbours, as for a new image near the data.
        queries, own, truth_ids, truth_sims = truth or self._truth(guard)
        n = self.ntotal
        tenth, accept = [], []  # per query: its 10th true similarity, the ids as similar
        for ids, sims, me in zip(truth_ids, truth_sims, own, strict=True):
            keep = ids != me
            ids, sims = ids[keep], sims[keep]
            tenth.append(sims[:10].min())
            accept.append(set(ids[sims >= tenth[-1] - TIE_TOLERANCE].tolist()))
        # HNSW answers exact similarities: a result as similar as the 10th counts, which also
        # holds for vectors added while a live index is tuned. The IVF kind's are re-ranked
        # on 8-bit codes: its results count by id (it is tuned when built, before any adds).
        exact = kind == "hnsw"

        def recall_at(setting: int) -> float:
            with guard:
                found, got = self._search_at(queries, 11, setting)
            hits = [
                np.count_nonzero(s[g != me][:10] >= t - TIE_TOLERANCE) / 10
                if exact
                else len(accept_i.intersection(g[g != me][:10].tolist())) / 10
                for s, g, me, t, accept_i in zip(found, got, own, tenth, accept, strict=True)
            ]
            return float(np.mean(hits))

        candidates = EF_SEARCH_CANDIDATES if kind == "hnsw" else NPROBE_CANDIDATES
        recalls: dict[int, float] = {}
        for candidate in candidates:
            recalls[candidate] = recall_at(candidate)
            if recalls[candidate] >= TARGET_RECALL:
                # Stored vectors are easier queries than new images (measured: at 1M vectors
                # the first passing efSearch gave 0.985 on stored but 0.951 on held-out
                # queries), so keep a margin of one step: twice the setting, at a fraction of
                # a millisecond more.
                setting = min(2 * candidate, candidates[-1])
                break
        else:  # out of reach: where recall stops improving; a margin there buys no recall
            best = max(recalls.values())
            setting = min(c for c, r in recalls.items() if r >= best - RECALL_PLATEAU)
        recall = recalls[setting] if setting in recalls else recall_at(setting)
        name = "ef_search" if kind == "hnsw" else "nprobe"
        with guard:
            if kind == "hnsw":
                self._inner().hnsw.efSearch = setting
            else:
                self._set_nprobe(setting)
            self.info.update({name: int(setting), "recall_at_10": round(recall, 4), "tuned_at": n})
            self.dirty, self._base = True, None
        log.log(
            logging.INFO if recall >= TARGET_RECALL else logging.WARNING,
            "%s over %d vectors: %s %d, recall@10 %.4f (target %.2f)",
            kind.upper(),
            n,
            name,
            setting,
            recall,
            TARGET_RECALL,
        )

    def search(
        self,
        queries: np.ndarray,
        k: int,
        ids: np.ndarray | None = None,
        threads: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(m, d) normalised queries -> (m, k) ids (-1 where fewer) and cosine distances.

        ``ids`` restricts the search to those DuckDB ids (exact over the subset). ``threads``
        defaults to one for a few queries and every core for more.
        """
        x = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if ids is not None:
            have = np.intersect1d(np.asarray(ids, np.int64), self.ids())
            if len(have) == 0:
                return np.full((len(x), k), -1, np.int64), np.full((len(x), k), np.inf, np.float32)
            sub = self.index.reconstruct_batch(have)
            top = exact_top_k(x, sub, min(k, len(have)))
            out_ids, out_sims = have[top], np.take_along_axis(x @ sub.T, top, 1)
            pad = k - out_ids.shape[1]
            if pad:
                out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
                out_sims = np.pad(out_sims, ((0, 0), (0, pad)), constant_values=-np.inf)
        else:
            if threads is None:  # one query: threads cost more than they save
                threads = 1 if len(x) <= SINGLE_QUERY_BATCH else (os.cpu_count() or 1)
            out_sims, out_ids = faiss_search(self.index, x, k, threads)
            if self.l2:  # squared L2 between unit vectors: twice the cosine distance
                out_sims = 1.0 - out_sims / 2.0
        return out_ids, np.where(out_ids >= 0, cosine_distance(out_sims), np.inf)

    def save(self) -> None:
        """Write what changed atomically (temp file + rename), then the sidecar.

        The rows added since the index was last written whole go to a new delta file while
        they are few (``DELTA_MAX_FRACTION``); otherwise the index is written whole. The
        sidecar, written last, names the files it describes: a save cut short leaves the
        previous pair valid (or a mismatch that a check repairs).
        """
        import faiss

        if self.outgrown:  # once, when a run ends, not while it scores
            self._make_chunks(self.chunks(), self.ntotal)
        elif self.retune_due:
            self.tune()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        base, delta = self._base, None
        added = sum(v.nbytes + i.nbytes for i, v in self._appended)
        if (
            base is not None
            and self.kind != "flat"
            and added <= DELTA_MAX_FRACTION * base["bytes"]
            and _size(self.path) == base["bytes"]
        ):
            delta = _write_delta(self.path, self._appended, (base.get("delta") or {}).get("gen", 0))
            side = dict(base)
        else:
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            faiss.write_index(self.index, str(tmp))
            crc, size = _file_crc32(tmp)  # of the bytes on disk, read back (from the page cache)
            os.replace(tmp, self.path)
            side = {"bytes": size, "crc32": crc}
        self._commit(side | {"delta": delta})

    def save_linked(self, source: VectorIndex) -> bool:
        """Save this index, ``source`` under other ids (``IndexSet.adopt``), as ``source``'s file.

        The file is hard-linked and only the ids are written (8 bytes a row; writing 100,000
        1280-d rows whole took 0.9-1.1 s and reading them back for the checksum 0.3 s). Saves
        replace files and never write into them, so a later save of either version leaves the
        other's intact. False (nothing written) when ``source`` differs from its saved file,
        or the filesystem cannot link.
        """
        base, ids = source._base, self.ids()
        if (
            base is None
            or base.get("delta")
            or source.dirty
            or source._appended
            or len(ids) != base.get("count")
            or _size(source.path) != base.get("bytes")
        ):
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source.path, tmp)
        except OSError:
            return False
        entry = _write_ids(self.path, ids)
        os.replace(tmp, self.path)
        self._commit({"bytes": base["bytes"], "crc32": base["crc32"], "ids": entry, "delta": None})
        return True

    def _commit(self, side: dict[str, Any]) -> None:
        """Write the sidecar ``side`` (the files saved, completed with this index's figures).

        Written last: it names the files it describes, and those it no longer names go.
        """
        count, max_id, id_sum = self.stats()
        side.update(
            {
                "count": count,
                "max_id": max_id,
                "id_sum": id_sum,
                "dim": self.dim,
                "kind": self.kind,
                "info": self.info,
            }
        )
        old = _side_files(self.path)
        tmp = self.sidecar_path.with_name(f".{self.sidecar_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(side))
        os.replace(tmp, self.sidecar_path)
        named = {e["file"] for e in (side.get("delta"), side.get("ids")) if e}
        for stale in old:  # described by no sidecar now
            if stale.name not in named:
                stale.unlink(missing_ok=True)
        if side.get("delta") is None:
            self._appended = []
        self._base = side
        self.dirty = False
        self.verified = True

    @staticmethod
    def saved_stats(path: Path) -> tuple[int, int, int] | None:
        """(count, max id, id sum) from the sidecar, if it still describes the file at ``path``."""
        path = Path(path)
        try:
            side = json.loads(path.with_suffix(".json").read_text())
            if path.stat().st_size != side["bytes"]:
                return None
            for entry in (side.get("delta"), side.get("ids")):
                if entry and _size(path.with_name(entry["file"])) != entry["bytes"]:
                    return None
            return int(side["count"]), int(side["max_id"]), int(side["id_sum"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _reserve(flat: Any, n: int) -> None:
    """Size an empty flat index's vector storage for ``n`` vectors before they are added.

    Added chunk by chunk, the storage would grow by doubling, each time holding the old and
    the new copy at once (twice the vectors, measured in ``bench/bench_rebuild.py``). Growing
    it once and shrinking it back keeps the capacity (a C++ vector's never shrinks).
    """
    if flat.ntotal == 0 and n > 0:
        flat.codes.resize(n * flat.code_size)
        flat.codes.resize(0)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _side_files(path: Path) -> list[Path]:
    """The delta and ids files saved beside the index at ``path`` (its sidecar names its own)."""
    return sorted(path.parent.glob(f"{path.name}.delta-*")) + sorted(
        path.parent.glob(f"{path.name}.ids")
    )


def _write_ids(path: Path, ids: np.ndarray) -> dict:
    """Write the ids of a linked index (``save_linked``) beside ``path``; its sidecar entry."""
    ids = np.ascontiguousarray(ids, np.int64)
    entry = _write_beside(path, f"{path.name}.ids", lambda f: np.save(f, ids, allow_pickle=False))
    return entry | {"count": len(ids)}


def _read_ids(path: Path, entry: dict, count: int) -> np.ndarray:
    """The ids of a linked index, checked against its sidecar entry and the file's row count."""
    _check_beside(path, entry)
    ids = np.load(path, allow_pickle=False)
    if ids.shape != (count,) or ids.dtype != np.int64:
        raise IndexFileError(f"{path}: {ids.shape} ids where the index holds {count} rows")
    return ids


def _write_delta(path: Path, appended: list[tuple[np.ndarray, np.ndarray]], gen: int) -> dict:
    """Write the rows added since ``path`` was written whole as a new delta file; its entry."""
    ids = np.concatenate([i for i, _ in appended]) if appended else np.zeros(0, np.int64)
    dim = appended[0][1].shape[1] if appended else 0
    x = np.concatenate([v for _, v in appended]) if appended else np.zeros((0, dim), np.float32)
    entry = _write_beside(
        path, f"{path.name}.delta-{gen + 1}", lambda f: np.savez(f, ids=ids, vectors=x)
    )
    return entry | {"gen": gen + 1, "count": len(ids)}


def _read_delta(path: Path, entry: dict, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The (ids, vectors) of a delta file, checked against its sidecar entry."""
    _check_beside(path, entry)
    with np.load(path, allow_pickle=False) as z:
        ids, x = z["ids"].astype(np.int64), z["vectors"].astype(np.float32)
    if len(ids) != entry.get("count") or (len(ids) and x.shape != (len(ids), dim)):
        raise IndexFileError(f"{path}: {len(ids)} rows where its sidecar says {entry.get('count')}")
    return ids, x.reshape(len(ids), dim)


def _write_beside(path: Path, name: str, write: Callable[[BinaryIO], object]) -> dict:
    """Write a file ``name`` beside the index at ``path`` (temp file + rename); its entry.

    The entry (file name, size, CRC-32) is what the sidecar keeps of it.
    """
    target = path.with_name(name)
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    crc, size = _file_crc32(tmp)
    os.replace(tmp, target)
    return {"file": name, "bytes": size, "crc32": crc}


def _check_beside(path: Path, entry: dict) -> None:
    """IndexFileError unless the file at ``path`` has the size and CRC-32 of its ``entry``."""
    try:
        crc, size = _file_crc32(path)
    except OSError:
        raise IndexFileError(f"{path}: missing (its sidecar names it)") from None
    if (crc, size) != (entry.get("crc32"), entry.get("bytes")):
        raise IndexFileError(f"{path}: checksum or size differs from its sidecar's (damaged)")


def _file_crc32(path: Path) -> tuple[int, int]:
    """(CRC-32, size) of a file, read CHECKSUM_CHUNK bytes at a time."""
    crc, size = 0, 0
    buf = bytearray(CHECKSUM_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(buf):
            crc = zlib.crc32(view[:got], crc)
            size += got
    return crc, size
