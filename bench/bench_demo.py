"""``imagesieve demo`` from the installed package to a served, populated app, timed twice.

Starts ``imagesieve demo --port 0`` on an empty workspace, waits for the URL it prints, checks
``/api/v1/health`` (images stored) and ``/`` (the app), stops it, then does the same again: the
second run must reuse the model, the store and the clusters. Target: the first run <= 3 minutes.

Usage: python bench/bench_demo.py
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_api import start_cli

TARGET_S = 180


def one_run(where: Path) -> tuple[float, dict, int, list[str]]:
    """Seconds to the printed URL, the health answer, the app's status, the demo's output."""
    t = time.perf_counter()
    ws = str(where / "sieve")
    proc, url, lines = start_cli(["demo", "--workspace", ws, "--port", "0"], where / "demo.log")
    seconds = time.perf_counter() - t
    try:
        health = json.loads(urllib.request.urlopen(f"{url}/api/v1/health", timeout=30).read())
        status = urllib.request.urlopen(f"{url}/", timeout=30).status
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return seconds, health, status, lines


def main() -> None:
    print(f"# bench_demo: command: python {' '.join(sys.argv)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for run in ("first", "second"):
            seconds, health, status, lines = one_run(Path(tmp))
            print(
                f"{run} run: URL after {seconds:.1f} s; /api/v1/health: "
                f"{health['stored_images']} stored, model {health['model_version']}; / {status}"
                + (f"  [target <= {TARGET_S} s]" if run == "first" else ""),
                flush=True,
            )
            for line in lines:
                if line.startswith(("stored in", "clustered")):
                    print(f"    {line.replace(tmp, '.')}")


if __name__ == "__main__":
    main()
