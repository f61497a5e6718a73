"""A store's FAISS indexes, one per model version, kept in step with DuckDB.

DuckDB is the source of truth; an index is checked against it (row count, largest id, id sum,
and on first use the file's checksum), then caught up, repaired or rebuilt from the stored
embeddings. A flat index that outgrows FLAT_MAX becomes HNSW, an HNSW that outgrows HNSW_MAX
becomes IVF-PQ, and HNSW is re-tuned as it doubles, while the store stays in use.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imagesieve._errors import UserError
from imagesieve.store._rows import IndexCheck
from imagesieve.store._vectors import IndexFileError, VectorIndex, train_rows

if TYPE_CHECKING:
    from imagesieve.store._store import Store

__all__ = ["INDEX_DIR", "IndexSet"]

log = logging.getLogger(__name__)

INDEX_DIR = "index"


def locked(method: Callable) -> Callable:
    """Run a method holding its object's ``lock`` (the store's): one thread at a time on it."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


class IndexSet:
    """The vector index of every model version of one store: check, catch up, rebuild, upgrade.

    ``store`` supplies the rows (its ``_vector_*`` reads) and the lock every method holds but
    the lock-free probes; ``read_only`` keeps repairs in memory. ``checks`` says what opening
    (and first use) did to each index.
    """

    def __init__(self, store: Store, root: Path, *, read_only: bool = False):
        self.store = store
        self.lock = store.lock
        self.dir = root / INDEX_DIR
        self.read_only = read_only
        self._loaded: dict[str, VectorIndex] = {}
        self.checks: list[IndexCheck] = []

    def path(self, model_version: str) -> Path:
        """Where a version's FAISS index is saved."""
        return self.dir / f"{model_version}.faiss"

    @locked
    def check(self, model_version: str, *, verify: bool = False) -> IndexCheck:
        """Compare a version's FAISS index with DuckDB; catch it up, repair or rebuild it.

        A saved index whose sidecar agrees with DuckDB counts as in sync unless ``verify``: then
        it is loaded (kept in memory) and its file checked, and rebuilt if the check fails.
        """
        t0 = time.perf_counter()
        db = self.store._vector_stats(model_version)
        path = self.path(model_version)
        loaded = self._loaded.get(model_version)
        if loaded is None and not verify and VectorIndex.saved_stats(path) == db:
            return IndexCheck(model_version, db[0], "in_sync", seconds=time.perf_counter() - t0)
        index, damage = loaded, None
        if index is None:
            try:
                index = VectorIndex.open(path)
            except IndexFileError as e:
                damage = str(e)
        dim = self.store._vector_dim(model_version)
        if index is not None and index.stats() == db:
            self._loaded[model_version] = index
            if loaded is None and not (index.verified and VectorIndex.saved_stats(path) == db):
                if not self.read_only:
                    index.save()  # refresh a missing, stale or older (checksum-less) sidecar
            return IndexCheck(model_version, db[0], "in_sync", seconds=time.perf_counter() - t0)
        if index is None or (dim is not None and index.dim != dim):
            check = self.rebuild(model_version)
            check.seconds = time.perf_counter() - t0
            if damage:
                check.details["damaged"] = damage
                log.warning(
                    "%s; not used: rebuilt from the %d rows of %s in the store",
                    damage,
                    check.rows,
                    model_version,
                )
            return check
        have = index.ids()
        want = self.store._vector_ids(model_version)
        extra = np.setdiff1d(have, want, assume_unique=True)
        missing = np.setdiff1d(want, have, assume_unique=True)
        if len(extra) and index.kind == "ivfpq":  # holds codes: rebuilt from DuckDB's vectors
            check = self.rebuild(model_version)
            check.seconds = time.perf_counter() - t0
            return check
        index.remove(extra)
        for ids, vectors in self.store._vectors_of(missing, index.dim):
            index.add(ids, vectors)
        if not self.read_only:
            index.save()
        self._loaded[model_version] = index
        action = "repaired" if len(extra) else "caught_up"
        log.info("index %s %s: +%d -%d", model_version, action, len(missing), len(extra))
        return IndexCheck(
            model_version, db[0], action, len(missing), len(extra), time.perf_counter() - t0
        )

    @locked
    def rebuild(self, model_version: str) -> IndexCheck:
        """Build a version's FAISS index afresh from the embeddings in DuckDB, and save it.

        The rows are streamed in chunks into the index: the index and one chunk in memory.
        """
        t0 = time.perf_counter()
        dim = self.store._vector_dim(model_version)
        n = self.store._vector_stats(model_version)[0]
        want = train_rows(n)  # the IVF kind trains on a seeded sample of the whole version
        sample = self.store.sample_vectors(model_version, want) if want else None
        chunks = self.store._vector_chunks(model_version, dim or 1)
        index = VectorIndex.build_chunks(
            self.path(model_version), dim or 1, chunks, n, sample=sample
        )
        if not self.read_only:
            index.save()
        self._loaded[model_version] = index
        return IndexCheck(
            model_version,
            index.ntotal,
            "rebuilt",
            index.ntotal,
            0,
            time.perf_counter() - t0,
            {"kind": index.kind, **index.info},
        )

    @locked
    def get(self, model_version: str, dim: int | None = None) -> VectorIndex:
        """The version's FAISS index, loaded on first use; empty when new.

        The first use checks the saved file against its checksum and DuckDB, and searches a
        rebuilt index if it fails (``checks`` then says so).
        """
        path = self.path(model_version)
        if model_version not in self._loaded:
            if self.store._vector_stats(model_version)[0] or path.is_file():
                check = self.check(model_version, verify=True)
                if check.action != "in_sync":  # replaces what opening reported
                    at = next(
                        (i for i, c in enumerate(self.checks) if c.model_version == model_version),
                        len(self.checks),
                    )
                    self.checks[at : at + 1] = [check]
            if model_version not in self._loaded:  # new
                if dim is None:
                    raise UserError(f"no stored embeddings for {model_version} yet")
                self._loaded[model_version] = VectorIndex(path, dim)
        index = self._loaded[model_version]
        if dim is not None and index.dim != dim and index.ntotal == 0:
            index = self._loaded[model_version] = VectorIndex(path, dim)  # rebuilt without rows
        return index

    @locked
    def peek(self, model_version: str) -> VectorIndex | None:
        """The version's index as loaded, or as saved when its file agrees with DuckDB.

        An index read from its file is not kept (``adopt`` may take it over); None when there
        is none to read as it is: nothing is repaired or rebuilt here.
        """
        index = self._loaded.get(model_version)
        if index is not None:
            return index
        try:
            index = VectorIndex.open(self.path(model_version))
        except IndexFileError:
            return None
        if index is None or index.stats() != self.store._vector_stats(model_version):
            return None
        return index

    def is_loaded(self, model_version: str) -> bool:
        """True when the version's index is loaded (kept up to date by every write)."""
        return model_version in self._loaded

    def in_use(self, index: VectorIndex) -> bool:
        """True when ``index`` is a version's loaded one, which searches and scoring may change.

        A copy ``peek`` read from a file is the caller's alone.
        """
        return any(index is loaded for loaded in self._loaded.values())

    @locked
    def adopt(
        self,
        source: str,
        target: str,
        from_ids: np.ndarray,
        to_ids: np.ndarray,
        peeked: VectorIndex | None = None,
    ) -> bool:
        """Give ``target`` a copy of ``source``'s index, its rows having been copied to ``target``.

        Row ``from_ids[i]`` of ``source`` is row ``to_ids[i]`` of ``target``, same embedding:
        the copy is the same graph under the new ids, in milliseconds where building an HNSW
        graph takes minutes, saved as a link to ``source``'s file where that file holds it
        (``VectorIndex.save_linked``). ``peeked``: what ``peek(source)`` gave, so its file is
        not read twice. False (nothing done) unless ``target`` holds exactly those rows and
        they are all of ``source``'s.
        """
        import faiss

        to_ids = np.asarray(to_ids, np.int64)
        if not len(to_ids) or self.store._vector_stats(target) != (
            len(to_ids),
            int(to_ids.max()),
            int(to_ids.sum()),
        ):
            return False
        index = self._loaded.get(source)
        if index is None:  # read from its file: this copy becomes the target's own
            index = peeked if peeked is not None else self.peek(source)
            if index is None or index.stats() != self.store._vector_stats(source):
                return False
            graph = index.index
        else:
            graph = faiss.clone_index(index.index)
        have = index.ids()
        order = np.argsort(from_ids)
        at = np.searchsorted(from_ids, have, sorter=order).clip(0, len(from_ids) - 1)
        if len(have) != len(from_ids) or not np.array_equal(from_ids[order[at]], have):
            return False
        faiss.copy_array_to_vector(to_ids[order[at]], graph.id_map)
        graph.construct_rev_map()
        copy = VectorIndex(self.path(target), index.dim, graph, index.info)
        copy.dirty = True
        if not self.read_only and not copy.save_linked(index):
            copy.save()
        self._loaded[target] = copy
        return True

    def upgrade(self, model_version: str) -> bool:
        """Turn a loaded flat index that outgrew FLAT_MAX into HNSW while the store stays in use.

        A server's flat index would otherwise grow until it stops, each search dearer than the
        last (8 queries: 7 ms at 6,000 vectors, 89 ms at 50,000; HNSW ~1.5 ms, measured in
        bench/bench_serve_index.py). The graph is built from a
        snapshot without the lock (seconds), so commits and searches go on meanwhile; vectors
        committed during the build are added before the swap. False when there was nothing to
        do, or vectors were removed meanwhile (a later call starts again).
        """
        with self.lock:
            index = self._loaded.get(model_version)
            if index is None or not index.outgrown:
                return False
            ids, vectors = index.vectors()
        # One thread: a server keeps its other cores for the requests meanwhile.
        hnsw = VectorIndex.build(index.path, index.dim, ids, vectors, threads=1)
        del vectors
        with self.lock:
            if self._loaded.get(model_version) is not index:
                return False
            if not np.array_equal(index.ids()[: len(ids)], ids):
                return False
            hnsw.add(*index.vectors(len(ids)))
            self._loaded[model_version] = hnsw
        log.info("index %s: %d vectors, now HNSW", model_version, hnsw.ntotal)
        return True

    def outgrown(self, model_version: str) -> bool:
        """True when the loaded index of this version is flat and past FLAT_MAX (lock-free)."""
        index = self._loaded.get(model_version)
        return index is not None and index.outgrown

    def retune(self, model_version: str) -> bool:
        """Re-tune a loaded HNSW index's efSearch once it has doubled, while the store stays in use.

        Saving does this too, but a server saves when it stops: a store that grows tenfold
        meanwhile would search all day with the efSearch of its first tenth. The lock is held
        only to read a chunk of vectors or run one recall search (ms each). False when there was
        nothing to do.
        """
        with self.lock:
            index = self._loaded.get(model_version)
            if index is None or not index.retune_due:
                return False
        index.tune(guard=self.lock)
        return True

    def retune_due(self, model_version: str) -> bool:
        """True when the loaded HNSW index of this version has doubled since tuned (lock-free)."""
        index = self._loaded.get(model_version)
        return index is not None and index.retune_due

    @locked
    def save(self) -> None:
        """Save every index changed since it was loaded."""
        if self.read_only:
            return
        for index in self._loaded.values():
            if index.dirty:
                index.save()
