"""Open-set detection of fine-tuned versions: phase 1 alone against phase 1 + fine-tuning.

``bench_openset.py`` trains with default options (phase 1 only). Operators who fine-tune
(``--finetune-epochs N``) get a version whose backbone moved, and whose confidence moved with
it. This bench takes the first ``--splits`` leave-classes-out splits of each set (the same
splits, images and scoring as ``bench_openset``), trains each twice (phase 1 alone, then with
``--epochs`` of fine-tuning, default options otherwise) and reports, per version, the whole
decision's realised false-UNKNOWN rate on held-out known images (target 5%), the recall of
unseen classes, the AUROC of its far-from-training score, accuracy on its own test split,
the 5th percentile of Top-1 probability on held-out known images, and what training told the
operator about its own test images (``metrics.unknown_vs_target``: off the target beyond
chance, or within).

Usage: python bench/bench_finetune.py [--sets elpv digits ...] [--splits 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_openset as bo  # noqa: E402
from _memory import peak_mb  # noqa: E402
from _openset_sets import SETS, image_set  # noqa: E402

from imagesieve._workspace import Workspace  # noqa: E402
from imagesieve.classifier import TrainOptions, train_model  # noqa: E402

OUT = Path(__file__).resolve().parent / "_out" / "finetune"


def one(name: str, s: int, epochs: int, ws: Workspace) -> dict:
    """Train split ``s`` of set ``name`` with ``epochs`` of fine-tuning; the product's figures."""
    items = image_set(name, bo.DATA)
    labels = np.array([c for _, c in items])
    classes = sorted(set(labels))
    left = bo.splits(name, classes)[s]
    fit, known_test, unseen = bo.split_rows(labels, classes, s, left)
    data = bo.link_folder(OUT / "data" / f"{name}{s}", items, fit)
    t = time.perf_counter()
    version = train_model(data, ws, TrainOptions(activate=False, finetune_epochs=epochs)).version
    seconds = time.perf_counter() - t
    decision, _ = bo.product(version, items, known_test, unseen, OUT / f"unknowns-{name}{s}.npz")
    return {
        **decision,
        "left": left,
        "train_s": seconds,
        "accuracy": version.meta["metrics"]["accuracy"],
        "on": version.meta["thresholds"]["calibration"]["on"],
        "own": version.meta["metrics"]["unknown_vs_target"],
    }


def own(row: dict) -> str:
    """The version's own test images: flagged of n, and ``against_target``'s verdict."""
    o = row["own"]
    return f"{o['flagged']}/{o['n']} {o['verdict']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--splits", type=int, default=2, help="the first N splits of each set")
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    args = ap.parse_args()
    ws = bo.fresh_workspace(OUT, "bench_finetune.py")
    t0 = time.perf_counter()
    rows = []
    for name in args.sets:
        n = len(bo.splits(name, sorted({c for _, c in image_set(name, bo.DATA)})))
        for s in range(min(args.splits, n)):
            pair = [one(name, s, e, ws) for e in (0, args.epochs)]
            rows.append((name, s, pair))
            print(f"  {name} split {s}: calibrated on {pair[1]['on']}", flush=True)
    print(
        f"\n## Phase 1 alone / with {args.epochs} epochs of fine-tuning "
        "(realised false UNKNOWN on held-out known, target 5%)"
    )
    print("| set | split (unseen) | train s | test accuracy | Top-1 p5, held-out known | "
          "**realised false UNKNOWN** | recall of unseen | score AUROC | "
          "the version's own test images: flagged / n, verdict |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s, (a, b) in rows:
        print(f"| {name} | {s} ({', '.join(a['left'])}) | {a['train_s']:.0f} / {b['train_s']:.0f} | "
              f"{a['accuracy']:.3f} / {b['accuracy']:.3f} | {a['top1_p5']:.3f} / {b['top1_p5']:.3f} | "
              f"**{a['false']:.3f} / {b['false']:.3f}** | {a['recall']:.3f} / {b['recall']:.3f} | "
              f"{a['auroc']:.3f} / {b['auroc']:.3f} | {own(a)} / {own(b)} |")  # fmt: skip
    mean = {k: [float(np.mean([p[i][k] for *_, p in rows])) for i in (0, 1)]
            for k in ("false", "recall", "auroc", "accuracy")}  # fmt: skip
    worst = [max(abs(p[i]["false"] - 0.05) for *_, p in rows) for i in (0, 1)]
    print(f"\nmeans over {len(rows)} splits, phase 1 / fine-tuned: realised false UNKNOWN "
          f"{mean['false'][0]:.3f} / {mean['false'][1]:.3f} (worst distance from 5%: "
          f"{worst[0]:.3f} / {worst[1]:.3f}); recall of unseen {mean['recall'][0]:.3f} / "
          f"{mean['recall'][1]:.3f}; AUROC {mean['auroc'][0]:.3f} / {mean['auroc'][1]:.3f}; "
          f"accuracy {mean['accuracy'][0]:.3f} / {mean['accuracy'][1]:.3f}")  # fmt: skip
    print(f"\n# whole run {time.perf_counter() - t0:.0f} s, peak RSS {peak_mb():.0f} MB")


if __name__ == "__main__":
    main()
