"""The operator's threshold tools at scale: the held-out check, another rate, the trade-off.

A version is trained on 80 ELPV mono cells, then its records are grown to ``--rows`` rows
(synthetic, seeded): the test images in ``report/audit.csv`` and the calibration images and
simulated new types in ``calibration.npz``, as a version trained on ``5 x --rows`` images would
keep. Timed, each a median of ``--repeats`` calls, cold (first call in the process) and warm:

* ``held_out_unknowns`` at other thresholds: what each threshold preview adds;
* ``calibrate_at`` for another false-UNKNOWN rate;
* ``threshold_tradeoff`` over the default five rates (the Model tab's table);
* ``card_at``: the report card of other thresholds.

Peak RSS of the process is printed. No target: these are interactive, so the warm figures are
what a slider or a click waits for. Run alone: ``python bench/bench_thresholds.py``.
"""

from __future__ import annotations

import argparse
import csv
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import peak_mb  # noqa: E402

from imagesieve._workspace import Workspace  # noqa: E402
from imagesieve.classifier import UnknownRule, calibrate_at, card_at, held_out_unknowns  # noqa: E402
from imagesieve.classifier._evaluate import DECISION_INPUTS  # noqa: E402
from imagesieve.classifier._openset import HeldOut, save_calibration  # noqa: E402
from imagesieve.classifier._report import AUDIT_COLUMNS  # noqa: E402
from imagesieve.models import ModelVersion  # noqa: E402
from imagesieve.search import threshold_tradeoff  # noqa: E402

OUT = Path(__file__).resolve().parent / "_out" / "thresholds"


def trained(out: Path) -> Workspace:
    """A workspace with one version trained on 40 functional and 40 defective mono cells."""
    from imagesieve.classifier import TrainOptions, train_model
    from imagesieve.data._elpv import elpv_images, export_elpv

    shutil.rmtree(out, ignore_errors=True)
    mono = [im for im in elpv_images() if im.cell_type == "mono"]
    good = [im for im in mono if im.defect_probability == 0.0][:40]
    bad = [im for im in mono if im.defect_probability == 1.0][:40]
    data = export_elpv(out / "data", good + bad)
    ws = Workspace(out / "ws")
    train_model(data, ws, TrainOptions(test_size=0.25, val_size=0.15))
    return ws


def grow(version: ModelVersion, rows: int, seed: int = 0) -> None:
    """Give the version ``rows`` test rows and ``rows`` calibration and new-type rows each."""
    rng = np.random.default_rng(seed)
    classes = version.classes
    p = np.clip(rng.beta(8, 1.5, rows), 1 / len(classes), 1.0)
    distance = rng.gamma(4.0, 0.3, rows)
    measures = {
        k: rng.random(rows).astype(np.float32).astype(np.float64) for k in DECISION_INPUTS[1:]
    }
    with open(version.report_dir / "audit.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([*AUDIT_COLUMNS, *DECISION_INPUTS])
        for i in range(rows):
            top = classes[i % len(classes)]
            top3 = [top, f"{p[i]:.6f}", "", "", "", ""]
            more = [repr(float(distance[i]))] + [repr(float(measures[k][i])) for k in measures]
            w.writerow([f"/x/{i}.png", top, *top3, f"{p[i]:.6f}", "true", "false", "", *more])
    held = HeldOut(p, distance, rng.integers(0, len(classes), rows), "grown", None, measures)
    new = HeldOut(
        np.clip(rng.beta(3, 2, rows), 0.34, 1.0),
        rng.gamma(6.0, 0.3, rows),
        rng.integers(0, len(classes), rows),
        "each class left out",
        None,
        measures,
    )
    save_calibration(version.path, held, new)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of the next ``repeats``) in ms."""
    t = time.perf_counter()
    fn()
    cold = (time.perf_counter() - t) * 1000
    warm = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        warm.append((time.perf_counter() - t) * 1000)
    return cold, statistics.median(warm)


def measure(ws: Workspace, base: Path, rows: int, repeats: int) -> None:
    """One table row per call, on a copy of ``base`` grown to ``rows`` rows."""
    path = ws.models_dir / f"v{rows}"
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(base, path)
    version = ModelVersion.load(path)
    grow(version, rows)
    rules = iter(np.linspace(0.3, 0.9, 10_000))

    def other() -> UnknownRule:  # another confidence threshold each call
        return UnknownRule(float(next(rules)), 1.2, version.mix)

    calls = {
        "held_out_unknowns (a preview's check)": lambda: held_out_unknowns(version, other()),
        "card_at (a preview's card)": lambda: card_at(version, other()),
        "calibrate_at (another rate)": lambda: calibrate_at(version, 0.03),
        "threshold_tradeoff (5 rates)": lambda: threshold_tradeoff(ws, model=path.name),
    }
    for name, fn in calls.items():
        cold, warm = timed(fn, repeats)
        print(f"| {rows:,} | {name} | {cold:.1f} | {warm:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print("$ python bench/bench_thresholds.py", " ".join(sys.argv[1:]))
    print(f"# {platform.node()}, {platform.processor() or platform.machine()}")
    t0 = time.perf_counter()
    ws = trained(OUT)
    base = ws.models_dir / "v1"
    print(f"# set-up: v1 trained in {time.perf_counter() - t0:.0f} s")
    print("\n| rows | call | cold ms | warm ms (median) |")
    print("|---|---|---|---|")
    for rows in args.rows:
        measure(ws, base, rows, args.repeats)
    print(f"\n# whole run {time.perf_counter() - t0:.0f} s, peak RSS {peak_mb():.0f} MB")


if __name__ == "__main__":
    main()
