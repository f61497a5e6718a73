"""The REST API's cost, side by side in one run: ``POST /api/v1/predict`` over real HTTP vs the
scoring engine alone.

(a) engine: ``Predictor.score_batches`` over the images' bytes in one process, batch 32,
    nothing stored: the batch throughput to match.
(b) one client: sequential ``POST /api/v1/predict`` of 300x300 ELPV PNGs (each stored, 5
    neighbours returned): latency p50/p99, next to the engine's own single-image forward pass.
(c) 16 clients for 60 s, keep-alive connections: throughput, latency, errors, as a ratio to the
    mean of (a) and (a'), the engine measured again right after (c) (this VM's speed drifts).

The server is ``imagesieve serve`` in its own process (its peak RSS is read from /proc); the
clients use http.client with pre-built request bodies so they cost the server little CPU.
Every request carries distinct content (a counter in a PNG text chunk), so each one is decoded,
scored and stored; nothing is answered from the store.

Usage: python bench/bench_api.py [--clients 16] [--seconds 60] [--single 300] [--engine 2624]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

from bench_store import MODEL_WS, OUT, child_train, elpv_paths

API_WS = OUT.parent / "api" / "ws"
BOUNDARY = "imagesievebench"
UI = True  # serve the app too, as operators run it (--no-ui: the API alone)


def with_counter(png: bytes, n: int) -> bytes:
    """The same PNG with a tEXt chunk carrying ``n``: new content (SHA-256), same pixels."""
    data = b"bench\x00" + str(n).encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + data) & 0xFFFFFFFF)
    return png[:-12] + chunk + png[-12:]  # before IEND


def multipart(png: bytes, name: str) -> bytes:
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + png + f"\r\n--{BOUNDARY}--\r\n".encode()


class Client:
    """One keep-alive connection posting pre-built bodies."""

    def __init__(self, host: str, port: int):
        self.conn = http.client.HTTPConnection(host, port, timeout=60)

    def post(self, body: bytes, neighbours: int = 5) -> tuple[int, float]:
        t = time.perf_counter()
        self.conn.request(
            "POST",
            f"/api/v1/predict?neighbours={neighbours}",
            body,
            {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
        )
        r = self.conn.getresponse()
        r.read()
        return r.status, time.perf_counter() - t


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def engine_run(pngs: list[bytes]) -> dict:
    """(a) the engine alone on the same kind of bytes, and its single-image forward pass."""
    import numpy as np

    from imagesieve._workspace import Workspace
    from imagesieve.classifier import Predictor
    from imagesieve.models import get_version

    predictor = Predictor(get_version(Workspace(API_WS)))
    items = [(f"e{i}.png", with_counter(p, i)) for i, p in enumerate(pngs)]
    list(predictor.score_batches(items[:64]))  # warm-up
    c0 = os.times()
    t = time.perf_counter()
    n = sum(p.ok for batch in predictor.score_batches(items) for p in batch)
    seconds = time.perf_counter() - t
    c1 = os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    x = predictor.engine.prepare(items[0])[1][None]
    single = []
    for _ in range(100):
        t0 = time.perf_counter()
        predictor.engine.forward(x)
        single.append(time.perf_counter() - t0)
    return {
        "n": n,
        "img_per_s": n / seconds,
        "cpu_ms": 1000 * cpu / n,
        "forward1_p50_ms": 1000 * statistics.median(single),
        "forward1_p99_ms": 1000 * float(np.percentile(single, 99)),
    }


def start_server() -> tuple[subprocess.Popen, str, int]:
    cmd = [
        sys.executable,
        "-m",
        "imagesieve.cli",
        "serve",
        "--workspace",
        str(API_WS),
        "--port",
        "0",
    ]
    if not UI:
        cmd.append("--no-ui")
    log = open(OUT.parent / "api" / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    for line in proc.stdout:
        m = re.search(r"on http://([\d.]+):(\d+)", line)
        if m:
            return proc, m[1], int(m[2])
    sys.exit(f"server did not start; see {log.name}")


def process_cpu(proc: subprocess.Popen) -> float:
    """CPU seconds (user + system) the process has used so far."""
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_peak_mb(proc: subprocess.Popen) -> float:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--single", type=int, default=300, help="sequential requests for latency")
    ap.add_argument("--engine", type=int, default=2624, help="images for the engine baseline")
    ap.add_argument("--no-ui", action="store_true", help="serve the REST API without the app")
    args = ap.parse_args()
    global UI
    UI = not args.no_ui
    if not (MODEL_WS / "models").is_dir():
        print("training the benchmark model (once) ...", flush=True)
        child_train()
    shutil.rmtree(API_WS, ignore_errors=True)
    shutil.copytree(MODEL_WS / "models", API_WS / "models")
    paths = elpv_paths()
    pngs = [Path(p).read_bytes() for p in paths]
    cpus = os.cpu_count()
    print(
        f"# bench_api: {cpus} cores; {len(pngs)} ELPV 300x300 PNGs; command: python "
        + " ".join(shlex.quote(a) for a in sys.argv),
        flush=True,
    )

    eng = engine_run(pngs[: args.engine])
    print(
        f"(a) engine alone, batch 32: {eng['img_per_s']:.1f} img/s ({eng['n']} images), "
        f"{eng['cpu_ms']:.1f} ms CPU per image; "
        f"single-image forward pass p50 {eng['forward1_p50_ms']:.1f} ms, "
        f"p99 {eng['forward1_p99_ms']:.1f} ms",
        flush=True,
    )

    proc, host, port = start_server()
    counter = iter(range(10**9))
    lock = threading.Lock()

    def body(i: int) -> bytes:
        with lock:
            n = next(counter)
        return multipart(with_counter(pngs[i % len(pngs)], n), f"cell{n}.png")

    try:
        client = Client(host, port)
        for i in range(20):  # warm-up: sessions, first commits, index creation
            client.post(body(i))
        lat = []
        errors = 0
        for i in range(args.single):
            status, s = client.post(body(i))
            errors += status != 200
            lat.append(s)
        p50, p99 = 1000 * pct(lat, 50), 1000 * pct(lat, 99)
        print(
            f"(b) 1 client, {args.single} sequential POST /api/v1/predict (stored, 5 neighbours): "
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, errors {errors}  "
            f"[targets p50 <= 60, p99 <= 150]; "
            f"HTTP + decode + store + neighbours add {p50 - eng['forward1_p50_ms']:.1f} ms "
            "to the forward pass at p50",
            flush=True,
        )

        # (c) many clients: prebuild bodies so clients spend little CPU
        stop = time.monotonic() + args.seconds
        results: list[list[tuple[int, float]]] = [[] for _ in range(args.clients)]
        bodies = [body(i) for i in range(len(pngs))]  # distinct content, reused per client offset
        rounds = [0]

        def run_client(k: int) -> None:
            c = Client(host, port)
            i = k
            while time.monotonic() < stop:
                b = bodies[i % len(bodies)]
                if i >= len(bodies):  # past one lap: fresh content again
                    b = body(i)
                try:
                    results[k].append(c.post(b))
                except Exception:  # a dropped connection counts as an error, then reconnect
                    results[k].append((0, 0.0))
                    c = Client(host, port)
                i += args.clients
            rounds[0] += 1

        cpu0 = os.times()
        server0 = process_cpu(proc)
        t0 = time.perf_counter()
        threads = [threading.Thread(target=run_client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        cpu1 = os.times()
        server_cpu = process_cpu(proc) - server0
        allres = [r for rs in results for r in rs]
        ok = [s for st, s in allres if st == 200]
        errs = len(allres) - len(ok)
        tput = len(ok) / wall
        client_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        # This VM's speed drifts by minutes: measure the engine again right after (c), with the
        # server idle, and compare (c) with the mean of the engine before and after it.
        again = engine_run(pngs[: args.engine])
        ref = {k: (eng[k] + again[k]) / 2 for k in ("img_per_s", "cpu_ms")}
        print(
            f"(a') engine again right after (c): {again['img_per_s']:.1f} img/s, "
            f"{again['cpu_ms']:.1f} ms CPU per image; (c) is compared with the mean of (a) and (a'): "
            f"{ref['img_per_s']:.1f} img/s, {ref['cpu_ms']:.1f} ms CPU per image",
            flush=True,
        )
        print(
            f"(c) {args.clients} clients for {wall:.0f} s: {len(allres)} requests, errors {errs}; "
            f"{tput:.1f} img/s = {tput / ref['img_per_s']:.2f}x the engine's batch throughput "
            f"[target >= 0.8x]; latency p50 {1000 * pct(ok, 50):.0f} ms, "
            f"p99 {1000 * pct(ok, 99):.0f} ms; the clients themselves used "
            f"{client_cpu / wall:.2f} cores",
            flush=True,
        )
        per = 1000 * server_cpu / max(1, len(allres))
        print(
            f"    server CPU per request {per:.1f} ms vs the engine's {ref['cpu_ms']:.1f} ms per "
            f"image: {ref['cpu_ms'] / per:.2f}x (the throughput ratio an idle machine allows)",
            flush=True,
        )
        import urllib.request

        health = json.loads(
            urllib.request.urlopen(f"http://{host}:{port}/api/v1/health", timeout=30).read()
        )
        print(
            f"    store after the run: {health['stored_images']} images "
            f"(expected {20 + args.single + len(ok)}); server peak RSS {server_peak_mb(proc):.0f} MB",
            flush=True,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
