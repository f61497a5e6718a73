"""Run one benchmark on two checkouts, alternating, and print their figures side by side.

A refactoring's "no regression" is measured here: ``--old`` is a checkout of the previous main
(``git worktree add /tmp/old <commit>``); each side runs its own copy of the benchmark script
(only import paths differ between them) with ``PYTHONPATH`` pointing at its own package, in
turns: new, old, old, new, new, old... so drift on the VM falls on both sides alike. Both sides
share this checkout's ``bench/_data`` and ``bench/_out`` (models are trained once). Each run's
full output is kept in ``bench/_out/versus/``; medians per side and new / old are printed.

    python bench/bench_versus.py --old /tmp/old --rounds 2 bench_api.py
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "_out" / "versus"

#: Per benchmark: figure -> a regex whose first group is the number (higher is better unless
#: the name says "ms", "s" or "MB").
FIGURES: dict[str, dict[str, str]] = {
    "bench_api.py": {
        "(c) 16 clients vs the engine, per core (x)": r"\(c\) 16 clients.*?= ([\d.]+)x the engine's \[",
        "(d) median of 8 windows (x)": r"\(d\) .*?median ([\d.]+)x \[",
        "one client p50 (ms)": r"\(b\) 1 client.*?p50 ([\d.]+) ms",
        "one client p99 (ms)": r"\(b\) 1 client.*?p99 ([\d.]+) ms",
        "server peak RSS (MB)": r"server peak RSS (\d+) MB",
    },
    "bench_history.py": {
        "re-decide 100,000 rows, whole call (s)": r"\| re-decided from stored head inputs \| \d+ \| ([\d.]+) \|",
        "decode 2,624 rows (s)": r"\| decoded again \| \d+ \| ([\d.]+) \|",
    },
    "bench_store_duplicates.py": {
        "backlog: link every row (s)": r"\| [\d,]+ \| \w+ \| [\d.]+ \| [\d,]+, ([\d.]+), [\d,]+ \|",
        "one batch of 1,000 (ms/row)": r"\| [\d,]+, [\d.]+, [\d,]+ \| ([\d.]+) \|",
        "planted pairs found": r"\| (\d+)/\d+ \|",
    },
    "bench_scoring.py": {
        "engine / forward (x)": r"engine / forward = \*\*([\d.]+)x",
        "engine / plain loop (x)": r"engine / plain = \*\*([\d.]+)x\*\* \(target >= 3.5",
        "engine img/s, ELPV PNG": r"\| imagesieve engine \(decode \+ ONNX, overlapped\) \| \d+ \| ([\d.]+)",
        "engine img/s, 12 MP JPEG": r"\| imagesieve engine \(JPEG draft decode\) \| \d+ \| ([\d.]+)",
        "streaming 10,000: peak RSS (MB)": r"peak RSS \*\*(\d+) MB",
    },
    "bench_train.py": {
        "wall, process start to exit (s)": r"wall \*\*([\d.]+) s\*\*",
        "train_model (s)": r"training ([\d.]+) s \(train_model\)",
        "accuracy": r"accuracy \*\*([\d.]+)\*\*",
    },
    "bench_store.py": {
        "1. score_inputs into a store / engine alone (x)": r"\| 1\. \(b\) [^|]*\| ([\d.]+)x",
        "1. re-run, all stored (img/s)": r"\| 1\. \(c\) [^|]*\| ([\d.]+) img/s",
        "1. (b) peak RSS (MB)": r"\| \(b\) score_inputs into a fresh store \|[^|]*\|[^|]*\|[^|]*\| (\d+) MB",
        "2. URL list / disk (x)": r"\| 2\. URL list [^|]*\| ([\d.]+)x",
        "3. (i) open, 100,000 rows (s)": r"\| 3\. \(i\) [^|]*\| ([\d.]+) s",
        "3. (ii) open + catch up 1,000 (s)": r"\| 3\. \(ii\) [^|]*\| ([\d.]+) s",
        "3. (iii) reindex --rebuild (s)": r"\| 3\. \(iii\) [^|]*\| ([\d.]+) s",
    },
    "bench_finetune.py": {
        "phase 1: realised false UNKNOWN": r"phase 1 / fine-tuned: realised false UNKNOWN ([\d.]+) /",
        "fine-tuned: realised false UNKNOWN": r"realised false UNKNOWN [\d.]+ / ([\d.]+)",
        "fine-tuned: worst distance from 5%": r"worst distance from 5%: [\d.]+ / ([\d.]+)",
        "fine-tuned: recall of unseen": r"recall of unseen [\d.]+ / ([\d.]+);",
    },
    "bench_quality.py": {
        "with / without quality (x)": r"median \*\*([\d.]+)\*\* \(cost",
        "engine with quality (img/s)": r"\| with quality \|[^|]*\| ([\d.]+) \|",
    },
}


#: Imported at start-up by every Python process of a run (children too): drops the venv's
#: editable-install finder, which would otherwise import this checkout's package on both sides.
SITECUSTOMIZE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
"""


def run(side: str, root: Path, script: str, args: list[str], n: int) -> tuple[str, float]:
    """One run of ``root``'s copy of the script with its package first on the path."""
    shim = OUT / "site"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{root}"}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(root / "bench" / script), *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=root,
    )
    text = done.stdout + done.stderr
    (OUT / f"{Path(script).stem}-{side}-{n}.txt").write_text(text)
    if done.returncode:
        sys.exit(f"{side} run {n} of {script} failed ({done.returncode}):\n{text[-3000:]}")
    return text, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--old", type=Path, required=True, help="checkout of the previous main")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side")
    ap.add_argument("script", choices=sorted(FIGURES))
    ap.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")
    a = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for shared in ("_data", "_out"):  # one set of data and trained models for both sides
        link = a.old / "bench" / shared
        if not link.exists():
            link.symlink_to(HERE / shared)
    sides = {"new": HERE.parent, "old": a.old.resolve()}
    commits = {
        s: subprocess.run(
            ["git", "-C", str(p), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        for s, p in sides.items()
    }
    found: dict[str, dict[str, list[float]]] = {
        s: {f: [] for f in FIGURES[a.script]} for s in sides
    }
    order = []
    for r in range(a.rounds):
        order += ["new", "old"] if r % 2 == 0 else ["old", "new"]
    t0 = time.perf_counter()
    for n, side in enumerate(order):
        text, seconds = run(side, sides[side], a.script, a.args, n)
        print(f"run {n}: {side} ({commits[side]}) {seconds:.0f} s", flush=True)
        for figure, pattern in FIGURES[a.script].items():
            m = re.search(pattern, text, re.DOTALL)
            if m:
                found[side][figure].append(float(m[1]))
    cmd = " ".join(
        [
            "python bench/bench_versus.py",
            f"--old {a.old}",
            f"--rounds {a.rounds}",
            a.script,
            *a.args,
        ]
    )
    print(
        f"\n# {a.script}: new {commits['new']} vs old {commits['old']}, {a.rounds} runs each, "
        f"alternated ({' '.join(order)}); {time.perf_counter() - t0:.0f} s; command: {cmd}"
    )
    print("| figure | new: runs | old: runs | new / old (medians) |\n|---|---|---|---|")
    for figure in FIGURES[a.script]:
        new, old = found["new"][figure], found["old"][figure]
        ratio = f"{statistics.median(new) / statistics.median(old):.2f}" if new and old else "-"
        print(f"| {figure} | {', '.join(map(str, new))} | {', '.join(map(str, old))} | {ratio} |")


if __name__ == "__main__":
    main()
