"""The embedding map: a 2-D projection of a version's stored embeddings, cached per version.

Up to ``MAX_POINTS`` stored images (a seeded sample beyond) are projected with PCA then UMAP
on exact FAISS neighbours, the clustering's reduction, once; the projection is kept under
``<workspace>/.cache/maps/<version>.npz`` (derived data) and coloured at each request by what
the store says now (label, UNKNOWN reason, cluster), so a relabel or a new clustering run
shows without projecting again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imagesieve._workspace import Workspace
from imagesieve.classifier import Progress
from imagesieve.models import get_version
from imagesieve.search._cluster import umap_reduce
from imagesieve.store import STORE_FILE, Store, using_store

__all__ = ["COLOR_BY", "MAX_POINTS", "EmbeddingMap", "compute_map", "load_map", "map_points"]

#: Most images a map shows; beyond, a seeded sample.
MAX_POINTS = 50_000
#: What a map can be coloured by: name -> the ``Store.point_fields`` field.
COLOR_BY = {"label": "label", "reason": "reason", "cluster": "cluster_id", "class": "top1_class"}
#: Colours of the first categories (Okabe-Ito, readable for colour-blind eyes); grey beyond.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
OTHER = "#9a9a9a"
#: Colours that always mean the same: UNKNOWN stands out, noise and the rest recede.
FIXED = {"UNKNOWN": "#D55E00", "noise": "#bdbdbd", "not clustered": "#e0e0e0", "known": "#bdbdbd"}


@dataclass(frozen=True)
class EmbeddingMap:
    """A cached projection: stored ids and their 2-D positions, scaled into [0, 1]."""

    version: str
    ids: np.ndarray
    xy: np.ndarray
    stored: int  # the version's stored images when it was made
    made_at: float
    seconds: float

    def save(self, path: Path) -> None:
        """Write it (atomically)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            ids=self.ids,
            xy=self.xy,
            meta=np.array([self.stored, self.made_at, self.seconds]),
            version=np.array(self.version),
        )
        tmp.replace(path)


def map_path(ws: Workspace, version: str) -> Path:
    """Where a version's map is cached."""
    return ws.cache_dir / "maps" / f"{version}.npz"


def load_map(ws: Workspace, version: str) -> EmbeddingMap | None:
    """The version's cached map, or None (never made, or unreadable: make it again)."""
    try:
        with np.load(map_path(ws, version)) as z:
            stored, made_at, seconds = z["meta"]
            return EmbeddingMap(
                str(z["version"]), z["ids"], z["xy"], int(stored), float(made_at), float(seconds)
            )
    except (OSError, KeyError, ValueError):
        return None


def compute_map(
    ws: Workspace,
    *,
    model: str | None = None,
    store: Store | None = None,
    max_points: int = MAX_POINTS,
    seed: int = 0,
    progress: Progress | None = None,
) -> EmbeddingMap:
    """Project the version's stored embeddings to 2-D and cache the map (seconds at 50,000)."""
    progress = progress or (lambda stage, done, total: None)
    version = get_version(ws, model).name
    t0 = time.perf_counter()
    progress("reading embeddings", 0, 3)
    with using_store(ws, store, check=False) as store:
        stored = store.row_count(version)
        ids, x = store.sample_vectors(version, max_points, seed)
        store.release_cache()
    progress("projecting", 1, 3)
    xy = _project_in_child(ws, x, seed)
    del x
    progress("saving", 2, 3)
    made = EmbeddingMap(version, ids, xy, stored, time.time(), time.perf_counter() - t0)
    made.save(map_path(ws, version))
    progress("saving", 3, 3)
    return made


def _project_in_child(ws: Workspace, x: np.ndarray, seed: int) -> np.ndarray:
    """:func:`project_2d` in a process of its own, the vectors handed over in a file.

    What PCA and UMAP allocate (UMAP's compiled code alone is ~600 MB) leaves with the process;
    a server making a map would otherwise keep it for as long as it runs.
    """
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    ws.cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ws.cache_dir, prefix="map-") as tmp:
        path = Path(tmp) / "vectors.npy"
        np.save(path, x)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(project_2d, str(path), seed).result()


def project_2d(vectors: str | np.ndarray, seed: int) -> np.ndarray:
    """(n, 2) positions in [0, 1] of the rows of ``vectors`` (an array or an ``.npy`` file).

    PCA to 50 dimensions (fitted on at most 10,000 rows), then UMAP on exact neighbours, seeded.
    """
    x = np.load(vectors, mmap_mode="r") if isinstance(vectors, str) else vectors
    n = len(x)
    if n < 3:
        return np.full((n, 2), 0.5, np.float32)
    from sklearn.decomposition import PCA

    k = min(50, n - 1, x.shape[1])
    rows = (
        np.arange(n)
        if n <= 10_000
        else np.random.default_rng(seed).choice(n, 10_000, replace=False)
    )
    pca = PCA(k, random_state=seed).fit(np.asarray(x[np.sort(rows)]))
    z = np.concatenate(
        [pca.transform(np.asarray(x[i : i + 8192])) for i in range(0, n, 8192)]
    ).astype(np.float32)
    # UMAP as clustering runs it, on exact neighbours; points spread a little for the eye
    xy = z[:, :2] if n <= 15 else umap_reduce(z, 2, 15, seed, min_dist=0.1)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    return ((xy - lo) / np.where(hi > lo, hi - lo, 1)).astype(np.float32)


def map_points(
    ws: Workspace,
    *,
    color_by: str = "label",
    model: str | None = None,
    store: Store | None = None,
) -> dict[str, Any]:
    """The version's cached map as JSON-ready columns, coloured by what the store says now.

    ``{"version", "stored", "points", "made_at", "ids", "x", "y", "c", "legend": [[name,
    colour, count]]}``; ``points`` is 0 (and no columns) when no map was made yet.
    """
    if color_by not in COLOR_BY:
        raise ValueError(f"color_by must be one of {', '.join(COLOR_BY)}, got {color_by!r}")
    version = get_version(ws, model).name
    made = load_map(ws, version)
    out: dict[str, Any] = {"version": version, "points": 0, "color_by": color_by}
    if made is None or (store is None and not (ws.root / STORE_FILE).is_file()):
        return out
    with using_store(ws, store, read_only=store is None) as store:
        fields = store.point_fields(version, made.ids)
        stored = store.row_count(version)
    values = ["(gone)" if v is None else str(v) for v in fields[COLOR_BY[color_by]]]
    if color_by == "cluster":
        values = [{"-1": "noise", "-2": "not clustered"}.get(v, f"cluster {v}") for v in values]
    if color_by == "reason":
        values = [v.replace("_", " ") or "known" for v in values]
    names, codes, counts = np.unique(
        np.array(values, dtype=object), return_inverse=True, return_counts=True
    )
    order = np.argsort(-counts, kind="stable")  # the largest get the palette's colours
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    palette = iter(PALETTE)
    colours = [
        FIXED.get(str(names[i])) or next(palette, OTHER) for i in order
    ]  # by rank: the largest categories take the palette's first colours
    return out | {
        "points": len(made.ids),
        "stored": stored,
        "stored_when_made": made.stored,
        "made_at": made.made_at,
        "seconds": round(made.seconds, 1),
        "ids": made.ids.tolist(),
        "x": np.round(made.xy[:, 0], 4).tolist(),
        "y": np.round(made.xy[:, 1], 4).tolist(),
        "c": rank[codes].tolist(),
        "legend": [[str(names[i]), colours[rank[i]], int(counts[i])] for i in order],
    }
