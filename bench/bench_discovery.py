"""Discovery of unseen kinds: train on known classes, score images of held-out kinds, cluster
the UNKNOWNs, and compare the clusters with the true kinds.

Known classes: ELPV mono cells, functional vs defective (a seeded 75% of them trained on).
Scored: the other 25% of mono cells (known kind) and three kinds never trained on: poly
cells (a different cell type), and two kinds made from held-out mono cells, the way a new
meter brand looks different: colour negatives ("inverted") and cells turned 45 degrees
("rotated"). Reports per kind the UNKNOWN rate, and for the clustering of the UNKNOWNs the
adjusted Rand index against the kinds (noise counted as its own label), the noise share, and
per kind its largest cluster's share and purity.

Usage: python bench/bench_discovery.py [--min-samples 10 5 3] [--poly 600]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from sklearn.metrics import adjusted_rand_score

from imagesieve._workspace import Workspace
from imagesieve.classifier._train import TrainOptions, train_model
from imagesieve.data._elpv import elpv_images, export_elpv
from imagesieve.indexer import ScoreOptions, Store, score_inputs
from imagesieve.search._cluster import ClusterParams
from imagesieve.search._review import run_clustering

OUT = Path(__file__).resolve().parent / "_out" / "discovery"


def label(im) -> str:
    return "defective" if im.defective else "functional"


def build(poly_n: int) -> tuple[Workspace, dict[str, str]]:
    """Train on 75% of mono cells; write the scored kinds; returns the workspace and kind per file."""
    rng = random.Random(0)
    images = elpv_images()
    mono = [im for im in images if im.cell_type == "mono"]
    rng.shuffle(mono)
    cut = int(0.75 * len(mono))
    train, rest = mono[:cut], mono[cut:]
    poly = rng.sample([im for im in images if im.cell_type == "poly"], poly_n)
    shutil.rmtree(OUT, ignore_errors=True)
    ws = Workspace(OUT / "ws")
    train_model(export_elpv(OUT / "train", train, label), ws, TrainOptions())
    kinds: dict[str, str] = {}
    third = len(rest) // 3
    for kind, ims, make in (
        ("mono", rest[:third], lambda im: Image.open(im.path)),
        (
            "inverted",
            rest[third : 2 * third],
            lambda im: ImageOps.invert(Image.open(im.path).convert("L")),
        ),
        ("rotated", rest[2 * third :], lambda im: Image.open(im.path).convert("L").rotate(45)),
        ("poly", poly, lambda im: Image.open(im.path)),
    ):
        folder = OUT / "scored" / kind
        folder.mkdir(parents=True)
        for im in ims:
            path = folder / im.path.name
            make(im).save(path)
            kinds[str(path)] = kind
    return ws, kinds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--min-samples", type=int, nargs="+", default=[10, 5, 3])
    p.add_argument("--min-cluster-size", type=int, default=10)
    p.add_argument("--poly", type=int, default=600)
    args = p.parse_args()
    print("$ python bench/bench_discovery.py", " ".join(sys.argv[1:]))
    t = time.perf_counter()
    ws, kinds = build(args.poly)
    summary = score_inputs(ws, [str(OUT / "scored")], ScoreOptions())
    print(f"trained and scored {summary.items} images in {time.perf_counter() - t:.0f} s")
    with Store(ws, check=False) as store:
        rows = store.con.execute("SELECT id, source, label FROM predictions").fetchall()
    kind_of = {i: kinds[s] for i, s, _ in rows}
    unknown = {i for i, _, lab in rows if lab == "UNKNOWN"}
    print(f"{'kind':<10}{'images':>8}{'UNKNOWN':>10}")
    for kind in ("mono", "inverted", "rotated", "poly"):
        ids = [i for i in kind_of if kind_of[i] == kind]
        print(f"{kind:<10}{len(ids):>8}{sum(i in unknown for i in ids) / len(ids):>10.1%}")
    for ms in args.min_samples:
        params = ClusterParams(min_cluster_size=args.min_cluster_size, min_samples=ms)
        t = time.perf_counter()
        run = run_clustering(ws, params, export=OUT / f"clusters-ms{ms}")
        seconds = time.perf_counter() - t
        with Store(ws, check=False) as store:
            got = dict(
                store.con.execute(
                    "SELECT id, cluster_id FROM predictions WHERE label = 'UNKNOWN'"
                ).fetchall()
            )
        ids = sorted(got)
        truth = [kind_of[i] for i in ids]
        pred = [got[i] for i in ids]
        ari = adjusted_rand_score(truth, pred)
        noise = np.mean([c == -1 for c in pred])
        print(
            f"\nHDBSCAN min_cluster_size {args.min_cluster_size}, min_samples {ms}: "
            f"{len(run.clusters)} clusters over {len(ids)} UNKNOWNs in {seconds:.1f} s; "
            f"ARI **{ari:.3f}**, noise **{noise:.1%}**"
        )
        print(
            f"  {'kind':<10}{'UNKNOWNs':>9}{'noise':>8}{'clusters':>10}{'largest':>9}{'purity':>8}"
        )
        for kind in ("mono", "inverted", "rotated", "poly"):
            mine = [c for c, k in zip(pred, truth, strict=True) if k == kind]
            if not mine:
                continue
            counts = Counter(c for c in mine if c != -1)
            big, n = counts.most_common(1)[0] if counts else (None, 0)
            members = [k for c, k in zip(pred, truth, strict=True) if c == big]
            purity = members.count(kind) / len(members) if members else 0.0
            many = sum(v >= 0.1 * len(mine) for v in counts.values())
            print(
                f"  {kind:<10}{len(mine):>9}{mine.count(-1) / len(mine):>8.1%}{many:>10}"
                f"{n / len(mine):>9.1%}{purity:>8.1%}"
            )
    print("\n(clusters: those holding >= 10% of the kind's UNKNOWNs; largest: share of the kind's")
    print(" UNKNOWNs in its largest cluster; purity: share of that cluster that is of the kind)")


if __name__ == "__main__":
    main()
