"""`imagesieve train` on ELPV functional vs defective (defect probability >= 0.5), timed
wall-clock through the real CLI in a fresh process.

Split "reference": the stratified 75/25 split of the published baselines, i.e.
sklearn.model_selection.train_test_split(stratify=y, test_size=0.25, random_state=SEED) over
the dataset's labels.csv order, written as a pre-split train/ test/ ImageFolder.
Split "adaptive": imagesieve's own class-wise split (--test-size 0.25 --val-size 0), per seed.
Split "folder": any ImageFolder given with --data (its own adaptive split, default sizes).

Usage: python bench/bench_train.py [--split reference|adaptive|folder] [--data DIR] [--seeds 0 1 2]
       [--finetune-epochs N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def label(im) -> str:
    return "defective" if im.defective else "functional"


def reference_folder(seed: int) -> Path:
    import numpy as np
    from sklearn.model_selection import train_test_split

    from imagesieve.data._elpv import elpv_images, export_elpv

    images = elpv_images()
    y = np.array([im.defective for im in images])
    train, test = train_test_split(
        np.arange(len(images)), test_size=0.25, stratify=y, random_state=seed
    )
    root = HERE / "_data" / f"elpv-defect-ref{seed}"
    export_elpv(root / "train", [images[i] for i in train], label)
    export_elpv(root / "test", [images[i] for i in test], label)
    return root


def run_train(data: Path, ws: Path, extra: list[str]) -> tuple[dict, float]:
    """One ``imagesieve train`` in a fresh process; the workspace is emptied but for its cache
    (the backbone's ONNX export, made once per workspace, is not what is timed)."""
    for child in ws.iterdir() if ws.is_dir() else []:
        if child.name != "cache":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    cmd = [
        sys.executable,
        "-m",
        "imagesieve.cli",
        "train",
        str(data),
        "--workspace",
        str(ws),
        "--json",
        *extra,
    ]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode:
        sys.exit(out.stderr)
    return json.loads(out.stdout), wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", choices=["reference", "adaptive", "folder"], default="reference")
    ap.add_argument("--data", type=Path, help="the ImageFolder of --split folder")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--finetune-epochs", type=int, default=0)
    ap.add_argument("extra", nargs="*", help="more arguments for imagesieve train")
    args = ap.parse_args()
    from imagesieve.data._elpv import elpv_images, export_elpv

    results = []
    for seed in args.seeds:
        extra = ["--seed", str(seed), "--finetune-epochs", str(args.finetune_epochs), *args.extra]
        if args.split == "reference":
            data = reference_folder(seed)
        elif args.split == "folder":
            data = args.data.resolve()
        else:
            data = export_elpv(HERE / "_data" / "elpv-defect", elpv_images(), label)
            extra += ["--test-size", "0.25", "--val-size", "0"]
        doc, wall = run_train(
            data, HERE / "_out" / f"ws-train-{args.split}{seed}-ft{args.finetune_epochs}", extra
        )
        m, tr = doc["metrics"], doc["training"]
        results.append((m["accuracy"], wall))
        print(
            f"## split {args.split}, seed {seed}: {doc['split']['train']} train / {doc['split']['test']} test"
        )
        print(f"command: imagesieve train {data} {' '.join(extra)}")
        auc = f", ROC-AUC {m['roc_auc']:.4f}" if m.get("roc_auc") is not None else ""
        print(
            f"accuracy **{m['accuracy']:.4f}**, macro-F1 {m['macro_f1']:.4f}{auc}, "
            f"ECE {m['ece']:.4f}; wall **{wall:.1f} s** (process start to exit), training "
            f"{tr['seconds']:.1f} s (train_model)"
        )
        print(
            f"phase 1: weight decay {tr['phase1']['weight_decay']} chosen on {tr['phase1']['selected_on']}"
        )
        if tr.get("phase2"):
            p2 = tr["phase2"]
            print(
                f"phase 2: {p2['epochs_run']} epochs run, best epoch {p2['best_epoch']} "
                f"(val acc {p2['best_val_acc']:.4f})"
            )
        print()
    if len(results) > 1:
        accs = [a for a, _ in results]
        print(
            f"over seeds {args.seeds}: accuracy mean **{statistics.mean(accs):.4f}** "
            f"(sd {statistics.stdev(accs):.4f}, min {min(accs):.4f}, max {max(accs):.4f}); "
            f"wall mean {statistics.mean(w for _, w in results):.1f} s"
        )


if __name__ == "__main__":
    main()
