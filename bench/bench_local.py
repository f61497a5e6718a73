"""`imagesieve score` alone vs through a server holding the store, side by side.

The same folder of ELPV images is scored into a fresh workspace each run: by the CLI on its own,
and by the CLI while `imagesieve serve` holds the store (the CLI then hands the work to the
server, ``imagesieve._local``). Runs alternate (alone, through, through, alone, ...); medians
are quoted. Wall time is the CLI command's whole run as a user sees it (imports included);
the scoring seconds are the library's own. Peak RSS of the CLI and of the server.

Usage: python bench/bench_local.py [--images 1000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _memory import status_mb
from bench_api import start_cli

HERE = Path(__file__).resolve().parent
OUT = HERE / "_out" / "local"


def trained_models() -> Path:
    """The models folder of a workspace trained once on 80 mono ELPV cells (reused)."""
    models = OUT / "model-ws" / "models"
    if (models / "ACTIVE").exists():
        return models
    from imagesieve._workspace import Workspace
    from imagesieve.classifier._train import TrainOptions, train_model
    from imagesieve.data._elpv import elpv_images, export_elpv

    mono = [im for im in elpv_images() if im.cell_type == "mono"]
    good = [im for im in mono if im.defect_probability == 0.0][:40]
    bad = [im for im in mono if im.defect_probability == 1.0][:40]
    data = export_elpv(OUT / "train", good + bad)
    train_model(data, Workspace(OUT / "model-ws"), TrainOptions())
    return models


def inputs(n: int) -> Path:
    """A folder of ``n`` ELPV images the model did not train on."""
    from imagesieve.data._elpv import elpv_images

    folder = OUT / f"inputs-{n}"
    if folder.is_dir() and len(list(folder.iterdir())) == n:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for im in elpv_images()[-n:]:
        shutil.copyfile(im.path, folder / im.path.name)
    return folder


def timed_cli(args: list[str]) -> tuple[float, float, dict]:
    """Wall seconds, peak RSS (MB) and JSON output of ``imagesieve ARGS --json``."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagesieve.cli", *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, status_mb("VmHWM", proc.pid, missing=0.0))
        time.sleep(0.05)
    out = proc.stdout.read()
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"imagesieve {' '.join(args)} exited {proc.returncode}")
    return seconds, peak, json.loads(out)


def one_run(mode: str, models: Path, folder: Path, tmp: Path) -> dict:
    ws = tmp / f"ws-{mode}-{time.monotonic_ns()}"
    shutil.copytree(models, ws / "models")
    server = None
    if mode == "through":
        server, _, _ = start_cli(
            ["serve", "--workspace", str(ws), "--port", "0", "--no-ui"], tmp / "serve.log"
        )
    try:
        seconds, peak, doc = timed_cli(["score", str(folder), "--workspace", str(ws)])
        server_peak = status_mb("VmHWM", server.pid) if server else None
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    shutil.rmtree(ws, ignore_errors=True)
    assert doc["scored"] == len(list(folder.iterdir())), doc
    return {
        "mode": mode,
        "wall": seconds,
        "scoring": doc["seconds"],
        "cli_peak": peak,
        "server_peak": server_peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"# bench_local: command: python {' '.join(sys.argv)}", flush=True)
    t0 = time.perf_counter()
    models = trained_models()
    folder = inputs(args.images)
    order = [
        m for r in range(args.rounds) for m in (("alone", "through"), ("through", "alone"))[r % 2]
    ]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in order:
            runs.append(one_run(mode, models, folder, Path(tmp)))
            r = runs[-1]
            print(
                f"  {mode:<8} wall {r['wall']:6.1f} s, scoring {r['scoring']:6.1f} s "
                f"({args.images / r['scoring']:.0f} img/s), CLI peak {r['cli_peak']:.0f} MB"
                + (f", server peak {r['server_peak']:.0f} MB" if r["server_peak"] else ""),
                flush=True,
            )

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["mode"] == mode)

    print(
        f"\n## {args.images} ELPV 300x300 PNGs into a fresh store, medians of {args.rounds} runs each"
    )
    print("| | wall s | scoring s | img/s (scoring) | CLI peak MB | server peak MB |")
    print("|---|---|---|---|---|---|")
    for mode in ("alone", "through"):
        server = "" if mode == "alone" else f"{median(mode, 'server_peak'):.0f}"
        print(
            f"| {mode} | {median(mode, 'wall'):.1f} | {median(mode, 'scoring'):.1f} | "
            f"{args.images / median(mode, 'scoring'):.0f} | {median(mode, 'cli_peak'):.0f} | {server} |"
        )
    print(
        f"\nthrough / alone: wall {median('through', 'wall') / median('alone', 'wall'):.2f}x, "
        f"scoring {median('through', 'scoring') / median('alone', 'scoring'):.2f}x"
    )
    print(f"\n# whole run {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
