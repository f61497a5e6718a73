"""The training images' embeddings, for the "unlike anything trained on" half of UNKNOWN.

Every trained version keeps the L2-normalised embeddings of its training images. A scored
image's distance to its nearest training image (cosine distance, ``1 - cos``, in [0, 2]) goes
into the far-from-training test, whose threshold training calibrates (``_openset``).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imagesieve._faiss import cosine_distance, nearest_above
from imagesieve._faiss import search as faiss_search

__all__ = [
    "DEFAULT_FALSE_UNKNOWN_RATE",
    "REFERENCE_EMBEDDINGS",
    "REFERENCE_SIGNATURES",
    "REFERENCE_TABLE",
    "ReferenceSet",
    "reference_signatures",
]

REFERENCE_EMBEDDINGS = "reference.npy"
REFERENCE_TABLE = "reference.csv"
#: The training images' pixel signatures (``image_signature``), row i for reference id i:
#: what promote and relabel compare a stored image's with (versions before it have none).
REFERENCE_SIGNATURES = "reference-signatures.npy"
DEFAULT_FALSE_UNKNOWN_RATE = 0.05


@dataclass
class ReferenceSet:
    """Training images of one version: embeddings (row i is reference id i), sources, labels.

    ``signatures``: their pixel signatures, for the near-duplicate rule (None: not kept).
    """

    embeddings: np.ndarray
    sources: list[str]
    labels: list[str]
    signatures: np.ndarray | None = None

    def __post_init__(self) -> None:
        import faiss

        self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        self._index = faiss.IndexFlatIP(self.embeddings.shape[1])
        self._index.add(self.embeddings)

    def __len__(self) -> int:
        return len(self.sources)

    def nearest(
        self, embeddings: np.ndarray, k: int = 1, threads: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """(m, d) normalised embeddings -> (m, k) reference ids and cosine distances, nearest first.

        One thread by default: scoring runs one inference stream per core, and calls this from
        each. A caller with the machine to itself (re-deciding stored rows) passes more.
        """
        x = np.ascontiguousarray(np.atleast_2d(embeddings), dtype=np.float32)
        if len(x) == 0 or len(self) == 0:
            return np.zeros((len(x), k), np.int64), np.full((len(x), k), np.inf, np.float32)
        sims, ids = faiss_search(self._index, x, min(k, len(self)), threads)
        return ids, cosine_distance(sims)

    def ids_of(self, old: ReferenceSet) -> np.ndarray | None:
        """Each of ``old``'s images' id in this set (same embedding), or None if one is missing."""
        at = {v.tobytes(): i for i, v in enumerate(self.embeddings)}
        mapped = np.array([at.get(v.tobytes(), -1) for v in old.embeddings], np.int64)
        return None if len(old) == 0 or (mapped < 0).any() else mapped

    def nearest_since(
        self,
        old_ids_here: np.ndarray,
        embeddings: np.ndarray,
        near: np.ndarray,
        dist: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The nearest of this set (ids, distances) from the nearest of an older subset.

        ``old_ids_here``: ``ids_of`` the older set; ``near``, ``dist``: each row's nearest
        there. A retrain whose training images include the last version's (same backbone) only
        searches the images added: each row's nearest is the nearer of its nearest old image
        and the nearest added one, which is computed only where it can be nearer
        (``nearest_above``: 0.75 s for 100,000 rows and 1,083 added images, a full search
        1.6 s). None when a row has no stored nearest.
        """
        if (near < 0).any():
            return None
        added = np.setdiff1d(np.arange(len(self)), old_ids_here)
        ids, dist = old_ids_here[near], dist.astype(np.float32)
        if len(added):
            found, sims = nearest_above(embeddings, self.embeddings[added], 1.0 - dist)
            d = cosine_distance(sims)
            closer = (found >= 0) & (d < dist)
            ids[closer], dist[closer] = added[found[closer]], d[closer]
        return ids, dist

    def leave_one_out(self) -> np.ndarray:
        """Each training image's distance to its nearest *other* training image."""
        ids, dist = self.nearest(self.embeddings, k=2)
        if dist.shape[1] < 2:
            return np.zeros(0, np.float32)
        own = ids[:, 0] == np.arange(len(self))
        return np.where(own, dist[:, 1], dist[:, 0])

    def save(self, directory: str | os.PathLike) -> None:
        """Write the reference files (embeddings, id/source/label table, signatures) into a dir."""
        directory = Path(directory)
        np.save(directory / REFERENCE_EMBEDDINGS, self.embeddings)
        if self.signatures is not None:
            if len(self.signatures) != len(self.embeddings):
                raise ValueError("one signature per reference image")
            np.save(directory / REFERENCE_SIGNATURES, np.asarray(self.signatures, np.int8))
        with open(directory / REFERENCE_TABLE, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "source", "label"])
            w.writerows(
                (i, s, lab)
                for i, (s, lab) in enumerate(zip(self.sources, self.labels, strict=True))
            )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ReferenceSet | None:
        """The reference set saved in a version dir, or None when it has none (ImageNet mode)."""
        directory = Path(directory)
        if not (directory / REFERENCE_EMBEDDINGS).is_file():
            return None
        emb = np.load(directory / REFERENCE_EMBEDDINGS)
        with open(directory / REFERENCE_TABLE, newline="") as f:
            rows = list(csv.DictReader(f))
        if len(rows) != len(emb):
            raise ValueError(
                f"{directory}: {REFERENCE_TABLE} has {len(rows)} rows but "
                f"{REFERENCE_EMBEDDINGS} has {len(emb)}"
            )
        return cls(
            emb,
            [r["source"] for r in rows],
            [r["label"] for r in rows],
            reference_signatures(directory),
        )


def reference_signatures(directory: str | os.PathLike) -> np.ndarray | None:
    """A version's training images' signatures (memory-mapped; row = reference id), or None.

    None when it kept none: trained before they were kept, or ImageNet mode.
    """
    path = Path(directory) / REFERENCE_SIGNATURES
    return np.load(path, mmap_mode="r") if path.is_file() else None
