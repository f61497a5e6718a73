"""The FAISS side of the store: one ID-mapped index per model version, ids = DuckDB row ids."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

__all__ = ["VectorIndex"]


class VectorIndex:
    """Stored embeddings of one model version, searchable by inner product (cosine similarity).

    DuckDB is the source of truth; this index is derived from it and can always be rebuilt.
    ``save`` writes the index and a small sidecar (count, max id, id sum, file size) so that a
    check against DuckDB needs no load when nothing changed.
    """

    def __init__(self, path: Path, dim: int, index=None):
        import faiss

        self.path = Path(path)
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.dirty = index is None

    @property
    def sidecar_path(self) -> Path:
        """The JSON written next to the index at each save."""
        return self.path.with_suffix(".json")

    @property
    def ntotal(self) -> int:
        """Number of vectors in the index."""
        return int(self.index.ntotal)

    @classmethod
    def load(cls, path: Path) -> VectorIndex | None:
        """The saved index at ``path``; None when absent or unreadable (it is then rebuilt)."""
        import faiss

        path = Path(path)
        if not path.is_file():
            return None
        try:
            index = faiss.read_index(str(path))
        except RuntimeError:
            return None
        return cls(path, index.d, index)

    def ids(self) -> np.ndarray:
        """The DuckDB ids held, in insertion order."""
        import faiss

        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def stats(self) -> tuple[int, int, int]:
        """(count, max id, sum of ids): compared with the same figures from DuckDB."""
        ids = self.ids()
        return len(ids), int(ids.max(initial=-1)), int(ids.sum())

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under their DuckDB ids."""
        if len(ids) == 0:
            return
        x = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        self.index.add_with_ids(x, np.ascontiguousarray(ids, dtype=np.int64))
        self.dirty = True

    def remove(self, ids: np.ndarray) -> None:
        """Remove vectors by DuckDB id (missing ids are ignored)."""
        if len(ids):
            self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
            self.dirty = True

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(m, d) normalised queries -> (m, k) ids (-1 where fewer) and cosine distances."""
        x = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        sims, ids = self.index.search(x, k)
        return ids, np.where(ids >= 0, np.clip(1.0 - sims, 0.0, 2.0), np.inf)

    def save(self) -> None:
        """Write the index atomically (temp file + rename), then its sidecar."""
        import faiss

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, self.path)
        count, max_id, id_sum = self.stats()
        side = {
            "count": count,
            "max_id": max_id,
            "id_sum": id_sum,
            "bytes": self.path.stat().st_size,
            "dim": self.dim,
        }
        tmp = self.sidecar_path.with_name(f".{self.sidecar_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(side))
        os.replace(tmp, self.sidecar_path)
        self.dirty = False

    @staticmethod
    def saved_stats(path: Path) -> tuple[int, int, int] | None:
        """(count, max id, id sum) from the sidecar, if it still describes the file at ``path``."""
        path = Path(path)
        try:
            side = json.loads(path.with_suffix(".json").read_text())
            if path.stat().st_size != side["bytes"]:
                return None
            return int(side["count"]), int(side["max_id"]), int(side["id_sum"])
        except (OSError, ValueError, KeyError):
            return None
