"""The container, measured: build time from the local base, the slim install's size, and
``POST /api/v1/predict`` latency in the container vs the same server run outside it.

(a) build: the Debian base (``mmdebstrap`` + ``podman import``, only when missing or with
    --base), then ``podman build --no-cache`` of the Dockerfile on it: seconds (target <= 600).
(b) size: the image's installed environment (/opt/imagesieve, what ``du`` counts) and the
    whole image (target for the slim install: <= 1 GB).
(c) latency: two servers at once, both ``imagesieve serve`` with the app and the API, each on
    its own copy of the benchmark's model: the image's (port published on 127.0.0.1) and one
    run from this checkout's venv. One client posts a distinct ELPV PNG per request (a counter
    in a tEXt chunk, so each is decoded, scored and stored), --per-turn requests to one server
    then the other, the order swapped each round (ABBA), --rounds rounds after a warm-up.
    p50/p99 of each, and the median over rounds of the per-round p50 ratio (target <= 1.2).
    Peak RSS of both server processes (VmHWM; the container's is a process of this kernel).
(d) stop: ``podman stop`` of the container: seconds and exit code (0: it closed the store).

Usage: python bench/bench_container.py [--rounds 10] [--per-turn 30] [--base]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _memory import peak_mb  # noqa: E402
from bench_api import Client, multipart, pct, with_counter  # noqa: E402
from bench_store import MODEL_WS, child_train, elpv_paths, fresh_ws  # noqa: E402
from podman import (  # noqa: E402
    BASE_TAG,
    IMAGE_TAG,
    build_base,
    build_image,
    image_exists,
    image_megabytes,
    podman,
    run_server,
    venv_megabytes,
    writable_workspace,
)

OUT = HERE / "_out" / "container"
TOKEN = "bench-token"
NAME = "imagesieve-bench"


def start_outside(ws: Path) -> tuple[subprocess.Popen, int]:
    """``imagesieve serve`` from this checkout's venv, app and API, as the container runs it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagesieve.cli", "serve", "--workspace", str(ws)]
        + ["--port", "0", "--token", TOKEN],
        stdout=subprocess.PIPE,
        stderr=(OUT / "outside.log").open("w"),
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("serving "):
            return proc, int(line.split(" on ", 1)[1].split()[0].rsplit(":", 1)[1])
    raise SystemExit(f"the outside server did not start: {(OUT / 'outside.log').read_text()}")


def timed_posts(port: int, bodies: list[bytes]) -> list[float]:
    """Post each body on one kept-alive connection: the seconds each took."""
    c = Client("127.0.0.1", port, TOKEN)
    out = []
    for body in bodies:
        status, seconds = c.post(body)
        if status != 200:
            raise SystemExit(f"predict answered {status} on port {port}")
        out.append(seconds)
    c.conn.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-turn", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--base", action="store_true", help="rebuild the local Debian base too")
    args = ap.parse_args()
    print("command: python bench/bench_container.py " + " ".join(sys.argv[1:]))
    podman_version = podman("--version").stdout.strip()
    print(f"# {platform.machine()}, python {platform.python_version()}, {podman_version}")
    OUT.mkdir(parents=True, exist_ok=True)
    if not (MODEL_WS / "models").is_dir():
        print(f"training the benchmark model: {child_train()}")

    print("\n(a) build")
    if args.base or not image_exists(BASE_TAG):
        print(f"  base (mmdebstrap minbase + python3, podman import): {build_base(OUT):.1f} s")
    else:
        print(f"  base {BASE_TAG}: present (--base rebuilds it)")
    seconds, log = build_image(BASE_TAG, IMAGE_TAG, no_cache=True)
    (OUT / "build.log").write_text(log)
    print(
        f"  podman build --no-cache: {seconds:.1f} s (target <= 600: {'met' if seconds <= 600 else 'MISSED'})"
    )

    print("\n(b) size")
    venv = venv_megabytes()
    print(f"  installed environment /opt/imagesieve: {venv:.0f} MiB = {venv * 2**20 / 1e9:.3f} GB"
          f" (target <= 1 GB: {'met' if venv * 2**20 <= 1e9 else 'MISSED'})")  # fmt: skip
    print(f"  whole image (base included): {image_megabytes():.0f} MiB")

    print("\n(c) POST /api/v1/predict, one client, container vs outside")
    inside_ws = writable_workspace(fresh_ws("container-in"))
    outside_ws = fresh_ws("container-out")
    url = run_server(NAME, inside_ws, TOKEN, IMAGE_TAG, "--env", "IMAGESIEVE_AUTH=bench:bench")
    in_port = int(url.rsplit(":", 1)[1])
    outside, out_port = start_outside(outside_ws)
    try:
        in_pid = json.loads(podman("inspect", NAME).stdout)[0]["State"]["Pid"]
        pngs = [Path(p).read_bytes() for p in elpv_paths(200)]
        n = [0]

        def bodies(k: int) -> list[bytes]:
            out = []
            for _ in range(k):
                n[0] += 1
                out.append(multipart(with_counter(pngs[n[0] % len(pngs)], n[0]), f"b{n[0]}.png"))
            return out

        timed_posts(in_port, bodies(args.warmup))
        timed_posts(out_port, bodies(args.warmup))
        lat: dict[str, list[float]] = {"container": [], "outside": []}
        ratios = []
        for r in range(args.rounds):
            order = [("container", in_port), ("outside", out_port)]
            p50 = {}
            for who, port in order if r % 2 == 0 else order[::-1]:
                got = timed_posts(port, bodies(args.per_turn))
                lat[who] += got
                p50[who] = statistics.median(got)
            ratios.append(p50["container"] / p50["outside"])
            print(f"  round {r + 1}: p50 container {1000 * p50['container']:.1f} ms, outside "
                  f"{1000 * p50['outside']:.1f} ms, ratio {ratios[-1]:.3f}")  # fmt: skip
        for who, xs in lat.items():
            print(f"  {who}: n={len(xs)} p50 {1000 * statistics.median(xs):.1f} ms, "
                  f"p99 {1000 * pct(xs, 99):.1f} ms")  # fmt: skip
        ratio = statistics.median(ratios)
        print(f"  container / outside p50, median of {args.rounds} rounds: {ratio:.3f} "
              f"(target <= 1.2: {'met' if ratio <= 1.2 else 'MISSED'})")  # fmt: skip
        print(f"  peak RSS: container's server {peak_mb(in_pid):.0f} MB, "
              f"outside {peak_mb(outside.pid):.0f} MB")  # fmt: skip

        print("\n(d) stop")
        t = time.perf_counter()
        podman("stop", "--time", "60", NAME)
        state = json.loads(podman("inspect", NAME).stdout)[0]["State"]
        print(f"  podman stop: {time.perf_counter() - t:.1f} s, exit code {state['ExitCode']}")
    finally:
        outside.terminate()
        outside.wait(timeout=60)
        podman("rm", "--force", "--ignore", NAME)


if __name__ == "__main__":
    main()
