"""Scoring on a local Ray cluster vs the local engine, side by side on the same 2,624 ELPV images.

A 2-CPU cluster is started once (``ray start --head``); each run is a child process scoring all
images into a fresh store: the local engine, then Ray (order alternating per pair; this VM's
speed drifts by up to 25% within minutes). Reported: images/s, the median of the pairs' ratios,
whether both stored the same predictions, the driver's peak memory and CPU per image (its
ceiling: the driver alone expands inputs, receives results and writes the store), and Ray with
one actor (images/s per worker core), and Ray with Parquet shards (``--ray-shards``).

Usage: python bench/bench_ray.py [--pairs 3] [--n 2624]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _memory import peak_mb

HERE = Path(__file__).resolve().parent
OUT = HERE / "_out" / "ray"
MODEL_WS = OUT / "model"
RAY = Path(sys.executable).with_name("ray")


def ensure_model() -> str:
    """A version trained on 200 mono ELPV cells (100 defective, 100 functional), made once."""
    from imagesieve._workspace import Workspace
    from imagesieve.classifier._train import TrainOptions, train_model
    from imagesieve.data._elpv import elpv_images, export_elpv
    from imagesieve.models import get_version

    if (MODEL_WS / "models").is_dir():
        return get_version(Workspace(MODEL_WS)).name
    mono = [im for im in elpv_images() if im.cell_type == "mono"]
    good = [im for im in mono if im.defect_probability == 0.0][:100]
    bad = [im for im in mono if im.defect_probability == 1.0][:100]
    folder = export_elpv(OUT / "train", good + bad)
    return train_model(folder, Workspace(MODEL_WS), TrainOptions()).version.name


def child(kind: str, ws: str, address: str, actors: int, n: int) -> None:
    """One scoring run in this process; prints its figures as JSON."""
    from imagesieve._workspace import Workspace
    from imagesieve.data._elpv import elpv_images
    from imagesieve.ingest import RayOptions, ScoreOptions, score_inputs

    paths = [str(im.path) for im in elpv_images()][:n]
    shards = str(Path(ws) / "shards") if kind == "shards" else None
    ray = RayOptions(address, actors or None, shards=shards) if kind != "local" else None
    start, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    summary = score_inputs(Workspace(ws), paths, ScoreOptions(keep_images="none", ray=ray))
    seconds = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(
        json.dumps(
            {
                "kind": kind,
                "actors": actors,
                "seconds": seconds,
                "scored": summary.scored,
                "rate": summary.scored / seconds,
                "driver_cpu_ms": 1000 * cpu / summary.scored,
                "driver_peak_mb": peak_mb(),
                "ray": summary.ray,
            }
        )
    )


def run(kind: str, address: str, n: int, actors: int = 0) -> dict:
    ws = OUT / f"ws-{kind}-{actors}-{n}"
    shutil.rmtree(ws, ignore_errors=True)
    shutil.copytree(MODEL_WS / "models", ws / "models")
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(ws), address, str(actors), str(n)],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    doc["ws"] = str(ws)
    return doc


def stored_rows(ws: str) -> dict[str, tuple]:
    import duckdb

    con = duckdb.connect(str(Path(ws) / "store.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT sha256, label, reason, top1_class, top1_prob, neighbor_id, neighbor_distance "
            "FROM predictions"
        ).fetchall()
    finally:
        con.close()
    return {r[0]: r[1:] for r in rows}


def compare(a: str, b: str) -> str:
    x, y = stored_rows(a), stored_rows(b)
    same_keys = x.keys() == y.keys()
    labels = sum(x[k][:3] == y[k][:3] and x[k][4] == y[k][4] for k in x if k in y)
    prob = max((abs(x[k][3] - y[k][3]) for k in x if k in y), default=0.0)
    dist = max((abs(x[k][5] - y[k][5]) for k in x if k in y), default=0.0)
    return (
        f"same images stored: {same_keys} ({len(x)} / {len(y)}); label, reason, top-1 class and "
        f"nearest training image equal on {labels} of {len(x)}; largest difference in top-1 "
        f"probability {prob:.1e}, in distance {dist:.1e}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--n", type=int, default=2624)
    ap.add_argument("--child", nargs=5)
    args = ap.parse_args()
    if args.child:
        kind, ws, address, actors, n = args.child
        child(kind, ws, address, int(actors), int(n))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    version = ensure_model()
    print(f"model {version}; {args.n} ELPV images per run; {args.pairs} pairs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [str(RAY), "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1"]
        + ["--port", str(port), "--object-store-memory", str(500 * 2**20)]
        + ["--include-dashboard=false", "--disable-usage-stats"],
        check=True,
        capture_output=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        docs: dict[str, list[dict]] = {"local": [], "ray": []}
        ratios = []
        for pair in range(args.pairs):
            order = ("local", "ray") if pair % 2 == 0 else ("ray", "local")
            got = {kind: run(kind, address, args.n) for kind in order}
            for kind, doc in got.items():
                docs[kind].append(doc)
            ratios.append(got["ray"]["rate"] / got["local"]["rate"])
            print(
                f"pair {pair + 1} ({' then '.join(order)}): local {got['local']['rate']:.1f}/s, "
                f"ray {got['ray']['rate']:.1f}/s, ratio {ratios[-1]:.3f}"
            )
        one = run("ray", address, args.n, actors=1)
        sharded = run("shards", address, args.n)
        halves = {kind: run(kind, address, args.n // 2) for kind in ("ray", "shards")}
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True)

    def med(kind: str, key: str) -> float:
        return statistics.median(d[key] for d in docs[kind])

    print()
    print("| path | images/s (median) | driver CPU ms/image | driver peak MB |")
    print("|---|---|---|---|")
    for kind in ("local", "ray"):
        print(
            f"| {kind} | {med(kind, 'rate'):.1f} | {med(kind, 'driver_cpu_ms'):.2f} | "
            f"{med(kind, 'driver_peak_mb'):.0f} |"
        )
    print(
        f"| ray, 1 actor | {one['rate']:.1f} | {one['driver_cpu_ms']:.2f} | "
        f"{one['driver_peak_mb']:.0f} |"
    )
    print(
        f"| ray, Parquet shards | {sharded['rate']:.1f} | {sharded['driver_cpu_ms']:.2f} | "
        f"{sharded['driver_peak_mb']:.0f} |"
    )
    print()
    print(
        f"Ray / local throughput: median {statistics.median(ratios):.3f} "
        f"(pairs {', '.join(f'{r:.3f}' for r in ratios)}; target >= 0.6)"
    )
    print(compare(docs["local"][-1]["ws"], docs["ray"][-1]["ws"]))
    print("shards: " + compare(docs["local"][-1]["ws"], sharded["ws"]))

    def marginal(full: dict, half: dict) -> float:
        """Driver CPU ms per image past the fixed start (imports, Ray, model, index, report)."""
        cpu = full["driver_cpu_ms"] * full["scored"] - half["driver_cpu_ms"] * half["scored"]
        return cpu / (full["scored"] - half["scored"])

    for what, full, half in (
        ("results streamed", docs["ray"][-1], halves["ray"]),
        ("Parquet shards", sharded, halves["shards"]),
    ):
        ms = marginal(full, half)
        ceiling = 1000 / ms
        print(
            f"scaling, {what}: one actor {one['rate']:.1f} images/s per worker core; the driver "
            f"(inputs, results, the store writer) spends {ms:.3f} ms CPU an image past its "
            f"fixed start ({args.n} vs {args.n // 2} images): ceiling ~{ceiling:,.0f} images/s, "
            f"about {ceiling / one['rate']:.0f} worker cores"
        )


if __name__ == "__main__":
    main()
