"""Clustering 20,000 UNKNOWN embeddings: time of each step, peak memory, quality, id stability.

The data: the Lite0 embeddings of all 2,624 ELPV cells (computed once with the backbone ONNX,
cached under bench/_out/cluster/), plus 16,376 synthetic look-alikes, each an ELPV embedding
moved up to halfway towards one of its 5 nearest ELPV neighbours plus Gaussian noise (sigma
0.004 per dimension, i.e. ~0.01 cosine distance), renormalised, plus 1,000 (5%) points drawn
uniformly on the sphere as junk. Quality is judged against what is known: ELPV cell type
(mono/poly) per cluster, and the junk should come back as noise.

The re-run drops 1,000 images (as if promoted), adds 1,000 new look-alikes, shuffles the rows
and clusters again with the first run's clusters as ``previous``.

``--compare`` also times HDBSCAN on 20/30/50 PCA dimensions with scikit-learn and, if
installed, the ``hdbscan`` package, and compares each clustering with the default one.

Usage: python bench/bench_cluster.py [--n 20000] [--compare]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from _memory import peak_mb, reset_peak
from sklearn.metrics import adjusted_rand_score

from imagesieve.search._cluster import (
    Clustering,
    ClusterParams,
    _pca,
    assign_to_clusters,
    cluster_embeddings,
)

HERE = Path(__file__).resolve().parent
OUT = HERE / "_out" / "cluster"


def elpv_embeddings() -> tuple[np.ndarray, np.ndarray]:
    """Lite0 embeddings (2624, 1280) of all ELPV cells and their cell types, cached."""
    cache = OUT / "elpv-embeddings.npz"
    if not cache.is_file():
        from imagesieve._workspace import Workspace
        from imagesieve.classifier._features import backbone_onnx, extract_features
        from imagesieve.data._elpv import elpv_images
        from imagesieve.models import get_backbone_spec

        images = elpv_images()
        onnx = backbone_onnx(Workspace(OUT / "ws"), "efficientnet_lite0")
        arrays, _ = extract_features(
            onnx,
            get_backbone_spec("efficientnet_lite0").config,
            [im.path for im in images],
            ("embedding",),
        )
        OUT.mkdir(parents=True, exist_ok=True)
        np.savez(
            cache,
            embedding=arrays["embedding"],
            cell_type=np.array([im.cell_type for im in images]),
        )
    data = np.load(cache)
    return data["embedding"], data["cell_type"]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def look_alikes(e: np.ndarray, kind: np.ndarray, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic embeddings between ELPV embeddings and their near neighbours."""
    sim = e @ e.T
    np.fill_diagonal(sim, -2)
    nn = np.argpartition(-sim, 5, axis=1)[:, :5]
    src = rng.integers(0, len(e), n)
    dst = nn[src, rng.integers(0, 5, n)]
    t = rng.uniform(0, 0.5, (n, 1)).astype(np.float32)
    x = e[src] + t * (e[dst] - e[src]) + rng.normal(0, 0.004, (n, e.shape[1])).astype(np.float32)
    return unit(x), kind[src]


def make_data(n: int, seed: int = 0):
    e, cell = elpv_embeddings()
    rng = np.random.default_rng(seed)
    n_junk = n // 20
    x, k = look_alikes(e, cell, n - n_junk - len(e), rng)
    junk = unit(rng.normal(size=(n_junk, e.shape[1])))
    xb = np.concatenate([e, x, junk])
    kind = np.concatenate([cell, k, np.full(n_junk, "junk")])
    return xb, kind, (e, cell, rng)


def quality(labels: np.ndarray, kind: np.ndarray) -> str:
    """Noise share per kind, and purity: share of clustered images of their cluster's majority type."""
    parts = [
        f"{(labels[kind == k] == -1).mean():.1%} of {k} noise" for k in ("mono", "poly", "junk")
    ]
    inside = labels >= 0
    _, kind_code = np.unique(kind, return_inverse=True)
    majority = 0
    for c in np.unique(labels[inside]):
        majority += np.bincount(kind_code[labels == c]).max()
    parts.append(
        f"cell-type purity {majority / max(inside.sum(), 1):.4f} "
        f"({inside.sum() - majority} clustered images not of their cluster's majority type)"
    )
    return ", ".join(parts)


def summary(res: Clustering) -> str:
    sizes = [c.size for c in res.clusters]
    return f"{len(sizes)} clusters (largest {sizes[:6]}), {len(res.noise_ids)} noise"


def seconds(res: Clustering) -> str:
    s = res.seconds
    return ", ".join(f"{k} {v:.2f} s" for k, v in s.items()) + f"; total {sum(s.values()):.1f} s"


def compare(xb: np.ndarray, kind: np.ndarray, reference: np.ndarray, params: ClusterParams) -> None:
    from sklearn.cluster import HDBSCAN

    try:
        import hdbscan
    except ImportError:
        hdbscan = None
    print("\n## HDBSCAN implementations and PCA dimensions (same PCA projection per row)")
    print(
        "Raw HDBSCAN labels, before cluster_embeddings turns loose clusters (the junk) into noise."
    )
    print("| PCA dims | implementation | HDBSCAN s | clusters | noise | ARI vs default | quality |")
    print("|---|---|---|---|---|---|---|")
    mcs = params.cluster_size(len(xb))
    for dims in (50, 30, 20):
        z = np.ascontiguousarray(_pca(xb, ClusterParams(pca_dims=dims, seed=params.seed))[1])
        runs = {
            "sklearn (kd_tree)": lambda z=z: HDBSCAN(
                min_cluster_size=mcs, algorithm="kd_tree", copy=True
            ).fit_predict(z),
            "sklearn (ball_tree)": lambda z=z: HDBSCAN(
                min_cluster_size=mcs, algorithm="ball_tree", copy=True
            ).fit_predict(z),
        }
        if hdbscan is not None:
            runs["hdbscan 0.8 (boruvka_kdtree)"] = lambda z=z: hdbscan.HDBSCAN(
                min_cluster_size=mcs, core_dist_n_jobs=2
            ).fit_predict(z)
        for name, run in runs.items():
            t = time.perf_counter()
            labels = run()
            dt = time.perf_counter() - t
            both = (labels >= 0) & (reference >= 0)
            ari = adjusted_rand_score(reference[both], labels[both])
            print(
                f"| {dims} | {name} | {dt:.1f} | {labels.max() + 1} | {(labels < 0).mean():.1%} "
                f"| {ari:.3f} | {quality(labels, kind)} |",
                flush=True,
            )
    if hdbscan is None:
        print("(the hdbscan package is not installed: pip install hdbscan to compare it)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--compare", action="store_true")
    args = ap.parse_args()
    print("$ python bench/bench_cluster.py", " ".join(sys.argv[1:]))
    xb, kind, (e, cell, rng) = make_data(args.n)
    n, d = xb.shape
    print(
        f"# clustering benchmark: {n} x {d} embeddings, {platform.machine()}, python {platform.python_version()}"
    )
    print(
        f"{len(e)} ELPV + {n - len(e) - (kind == 'junk').sum()} look-alikes + {(kind == 'junk').sum()} junk"
    )
    ids = np.arange(n, dtype=np.int64) * 2 + 1000
    top1 = np.where(kind == "junk", "functional", "defective")
    top2 = np.where(kind == "junk", "defective", "functional")
    params = ClusterParams()
    print(f"params: {params}")
    hwm_before, rss_reset = peak_mb(), reset_peak()

    t = time.perf_counter()
    first = cluster_embeddings(ids, xb, top1, top2, params)
    wall = time.perf_counter() - t
    print("\n## First run")
    print(f"wall {wall:.1f} s ({seconds(first)})")
    print(summary(first))
    print(quality(first.labels, kind))
    during = "during clustering" if rss_reset else "whole process"
    print(
        f"peak memory (VmHWM) {during}: {peak_mb():.0f} MB "
        f"(data {xb.nbytes / 2**20:.0f} MB; peak while making the data {hwm_before:.0f} MB)"
    )

    # Re-run: 1,000 images promoted away, 1,000 new look-alikes, rows shuffled.
    keep = np.sort(rng.choice(n, n - 1000, replace=False))
    x_new, k_new = look_alikes(e, cell, 1000, rng)
    xb2 = np.concatenate([xb[keep], x_new])
    kind2 = np.concatenate([kind[keep], k_new])
    ids2 = np.concatenate([ids[keep], ids.max() + 1 + np.arange(1000) * 2])
    t1, t2 = np.concatenate([top1[keep], top1[:1000]]), np.concatenate([top2[keep], top2[:1000]])
    order = rng.permutation(len(xb2))
    previous = [c.as_previous() for c in first.clusters]
    t = time.perf_counter()
    second = cluster_embeddings(
        ids2[order], xb2[order], t1[order], t2[order], params, previous, first.next_id
    )
    wall = time.perf_counter() - t
    kept = [c for c in second.clusters if c.matched_from is not None]
    print("\n## Re-run with the first run's clusters (1,000 promoted, 1,000 new, shuffled)")
    print(f"wall {wall:.1f} s ({seconds(second)})")
    print(summary(second))
    print(quality(second.labels, kind2[order]))
    print(
        f"{len(kept)} of {len(second.clusters)} clusters continue a previous one "
        f"({sum(c.size for c in kept) / max(sum(c.size for c in second.clusters), 1):.1%} of "
        f"clustered images); {len(first.clusters) - len(kept)} previous ids retired; "
        f"next id {second.next_id}"
    )
    first_label = dict(zip(ids.tolist(), first.labels.tolist(), strict=True))
    same = [
        first_label[i] == lab
        for i, lab in zip(ids2[order].tolist(), second.labels.tolist(), strict=True)
        if i in first_label and lab >= 0 and first_label[i] >= 0
    ]
    print(f"images clustered in both runs with the same cluster id: {np.mean(same):.1%}")

    t = time.perf_counter()
    assigned = assign_to_clusters(x_new, second.clusters)
    dt = time.perf_counter() - t
    print(
        f"assign_to_clusters: {len(x_new)} new images to {len(second.clusters)} clusters in "
        f"{dt * 1000:.0f} ms; {(assigned >= 0).mean():.1%} assigned"
    )
    t = time.perf_counter()
    placed = second.model.predict(x_new)[0]
    dt = time.perf_counter() - t
    print(
        f"ClusterModel.predict (as approximate_predict): {len(x_new)} new images in "
        f"{dt * 1000:.0f} ms; {(placed >= 0).mean():.1%} placed; agrees with the re-run on "
        f"{np.mean(placed == second.labels[np.argsort(order)][-1000:]):.1%}"
    )
    print(f"peak memory (VmHWM) {during}, both runs: {peak_mb():.0f} MB")

    if args.compare:
        compare(xb, kind, first.labels, params)


if __name__ == "__main__":
    main()
