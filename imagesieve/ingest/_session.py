"""One scoring session: how scored images reach the store, for the batch runner and the server.

Whatever scored the images, a session stores them the same way: content already stored with
the version is recognised, failures keep their one-line reason, images are kept by the keep
policy, new UNKNOWNs join the existing cluster that covers them, and the batch row's counters
land with the rows. A batch run commits each chunk in one transaction; a server appends its
small groups of new rows to the store's journal (``journal=True``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from imagesieve.classifier import UNKNOWN, Prediction
from imagesieve.search import ClusterModel, assign_to_clusters, cluster_model_path
from imagesieve.store import BatchItem, Failure, Store, StoredHeadInputs, keep_image

__all__ = ["ScoringSession", "assign_unknowns"]


def assign_unknowns(
    preds: Sequence[Prediction], clusters: Sequence[Any], model: ClusterModel | None = None
) -> None:
    """New UNKNOWNs join the existing cluster they belong to (``cluster_id``), if any.

    With the last run's ``model``, as HDBSCAN would have placed them in that run
    (``approximate_predict``); without, the nearest centroid whose radius covers them.
    Photos of poor quality join none, as clustering leaves them out by default.
    """
    unknown = [
        p for p in preds if p.label == UNKNOWN and p.embedding is not None and not p.quality_flags
    ]
    if not clusters or not unknown:
        return
    found = cluster_of(np.stack([p.embedding for p in unknown]), clusters, model)
    for p, c in zip(unknown, found, strict=True):
        p.cluster_id = int(c) if c >= 0 else None


def cluster_of(
    x: np.ndarray, clusters: Sequence[Any], model: ClusterModel | None = None
) -> np.ndarray:
    """The existing cluster each of (n, d) UNKNOWN embeddings joins, -1 for none.

    As ``assign_unknowns`` decides it.
    """
    if not clusters or not len(x):
        return np.full(len(x), -1, np.int64)
    if model is None:
        return assign_to_clusters(x, clusters)
    found = model.predict(x)[0]
    found[~np.isin(found, [c.cluster_id for c in clusters])] = -1  # reviewed away since
    return found


class ScoringSession:
    """The writes of one batch of one model version; safe to share between threads.

    ``keep`` is the keep policy (``store.KEEP_POLICIES``); ``journal`` sends new rows through the
    store's journal; the batch's counters are stored with the rows at most every
    ``counts_every`` seconds (0: with every write), and always when it finishes.
    """

    def __init__(
        self,
        store: Store,
        version: str,
        batch_id: int,
        *,
        keep: str = "unknown",
        journal: bool = False,
        counts_every: float = 0.0,
    ):
        self.store, self.version, self.batch_id = store, version, batch_id
        self.keep_policy, self.journal, self.counts_every = keep, journal, counts_every
        self.counts: Counter = Counter()  # the batch row's counters (Store BATCH_COUNTS)
        self.reload_clusters()
        self._lock = threading.Lock()  # guards the counters
        self._counts_at = float("-inf")  # the first write stores them

    @classmethod
    def begin(
        cls, store: Store, version: str, inputs: Sequence[str], options: dict[str, Any], **kw: Any
    ) -> ScoringSession:
        """Record a new running batch and open its session (``kw``: the session's options)."""
        return cls(store, version, store.begin_batch(version, inputs, options), **kw)

    def stored(self, sha256: str) -> bool:
        """True when this content is already stored with the session's version (lock-free)."""
        return self.store.has_content(self.version, sha256)

    def keeps(self, label: str | None) -> bool:
        """Whether an image with this label keeps a copy (None: not scored yet)."""
        return self.keep_policy == "all" or (self.keep_policy == "unknown" and label == UNKNOWN)

    def keep(self, sha256: str, content: str | bytes) -> None:
        """Keep a copy of an image in the workspace, by content (see ``keeps``)."""
        keep_image(self.store.ws, sha256, content)

    def reload_clusters(self) -> None:
        """Re-read the version's clusters (after a clustering run or a review action)."""
        self.clusters = self.store.clusters.previous(self.version)[0]
        self.model = ClusterModel.load(cluster_model_path(self.store.ws, self.version))

    def write(
        self,
        delta: Counter,
        *,
        new: Sequence[Prediction] = (),
        rescored: Sequence[Prediction] = (),
        failures: Sequence[Failure] = (),
        sources: Iterable[str] = (),
        items: Sequence[BatchItem] = (),
    ) -> None:
        """Store rows and add ``delta`` to the batch's counters; new UNKNOWNs join clusters.

        New rows alone go through the journal when the session journals; anything else is one
        DuckDB transaction (see ``Store.commit``), which also records ``items`` and resolves
        earlier failures of ``sources`` and of the items' sources.
        """
        assign_unknowns(new, self.clusters, self.model)
        with self._lock:
            due = time.monotonic() - self._counts_at >= self.counts_every
            counts = dict(self.counts + delta) if due else None
        if self.journal and not (rescored or failures or sources or items):
            self.store.append(self.batch_id, self.version, new, counts=counts)
        else:
            self.store.commit(
                self.batch_id,
                self.version,
                new,
                rescored,
                failures,
                sources,
                counts=counts,
                items=items,
            )
        with self._lock:
            self.counts.update(delta)
            if due:
                self._counts_at = time.monotonic()

    def join_clusters(self, ids: np.ndarray, vectors: np.ndarray | None) -> None:
        """Stored new UNKNOWNs (ids, embeddings) join existing clusters, as ``write`` has them.

        For rows a bulk ingest stored (``Store.ingest_shards``) without going through ``write``.
        """
        if vectors is None or not len(ids) or not self.clusters:
            return
        found = cluster_of(vectors, self.clusters, self.model)
        self.store.clusters.join(ids[found >= 0], found[found >= 0])

    def write_copied(
        self, delta: Counter, rows: StoredHeadInputs, decided: Any, index: bool = True
    ) -> np.ndarray:
        """Store decisions on images stored with another version (``Store.copy_redecided``).

        ``decided`` (Arrow) holds the decided columns; new UNKNOWNs join clusters and ``delta``
        lands on the counters, as in ``write``. Returns the new rows' ids (-1: content the
        version stored meanwhile, not copied).
        """
        import pyarrow as pa

        found = np.full(len(rows.ids), -1, np.int64)
        unknown = np.array([x == UNKNOWN for x in decided.column("label").to_pylist()], bool)
        found[unknown] = cluster_of(rows.embedding[unknown], self.clusters, self.model)
        decided = decided.append_column(
            "cluster_id", pa.array([int(c) if c >= 0 else None for c in found], pa.int32())
        )
        with self._lock:
            counts = dict(self.counts + delta)
        ids = self.store.copy_redecided(self.batch_id, self.version, rows, decided, counts, index)
        with self._lock:
            self.counts.update(delta)
            self._counts_at = time.monotonic()
        return ids

    def finish(self, status: str = "done", counts: dict[str, int] | None = None) -> None:
        """Mark the batch finished (``done`` or ``interrupted``) with its counters (or ``counts``)."""
        self.store.finish_batch(self.batch_id, status, counts or dict(self.counts))
