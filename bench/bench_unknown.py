"""UNKNOWN by confidence and by nearest-training distance, on ELPV: trained on mono cells only,
the poly cells are the never-seen kind. Trains (or reuses) the demo model, then scores the
demo's unseen mono cells and every poly cell.

Reports the AUROC of each signal for telling poly from unseen mono, and the UNKNOWN rate of
each rule at the version's calibrated thresholds.

Usage: python bench/bench_unknown.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from imagesieve._demo import demo_split, run_demo
from imagesieve._workspace import Workspace
from imagesieve.classifier import Predictor
from imagesieve.models import active_version

HERE = Path(__file__).resolve().parent


def main() -> None:
    print("$ python bench/bench_unknown.py", " ".join(sys.argv[1:]))
    ws = Workspace(HERE / "_out" / "unknown-ws")
    run_demo(ws)
    version = active_version(ws)
    _, held_out, poly = demo_split()
    predictor = Predictor(version)
    t = time.perf_counter()
    preds = list(predictor.score([str(im.path) for im in held_out + poly]))
    seconds = time.perf_counter() - t
    is_poly = np.array([0] * len(held_out) + [1] * len(poly))
    conf = np.array([p.confidence for p in preds])
    dist = np.array([p.neighbor_distance for p in preds])
    th = version.meta["thresholds"]
    low = conf < th["confidence"]
    far = dist + th.get("mix", 0.0) * (1 - conf) > th["distance"]
    print(
        f"model {version.name}: trained on {version.meta['data']['images']} mono cells; "
        f"scored {len(held_out)} unseen mono + {len(poly)} poly cells in {seconds:.1f} s"
    )
    print(
        f"thresholds: confidence {th['confidence']}, distance {th['distance']:.4f}, mix "
        f"{th.get('mix', 0.0)} (calibrated on {th['calibration']['n']} {th['calibration']['on']} "
        f"for {th['calibration']['false_unknown_rate']:.0%} false UNKNOWN)"
    )
    print(
        f"AUROC poly vs unseen mono: distance {roc_auc_score(is_poly, dist):.4f}, "
        f"1 - Top-1 confidence {roc_auc_score(is_poly, 1 - conf):.4f}"
    )
    print(f"{'rule':<28}{'unseen mono UNKNOWN':>22}{'poly UNKNOWN':>16}")
    for name, flag in (
        ("confidence only", low),
        ("distance only", far),
        ("confidence OR distance", low | far),
    ):
        print(f"{name:<28}{flag[is_poly == 0].mean():>22.1%}{flag[is_poly == 1].mean():>16.1%}")


if __name__ == "__main__":
    main()
