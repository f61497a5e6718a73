"""The store writer's ingest rate: Parquet shards in bulk vs predictions held in Python.

Synthetic rows shaped like scored images (1280-d unit embedding, 192-byte signature, head
inputs: ~7.9 KB a row) are written once as Parquet shards of ``--shard-rows`` items, as Ray
actors write them (``imagesieve score --ray --ray-shards``). Each run is a child process that
stores all rows into a fresh store, ``--commit-rows`` rows per transaction:

* ``shards``: ``Store.ingest_shards`` (what the driver does with shards), then the FAISS index
  catching up from DuckDB in bulk (``indexes.check``), timed apart.
* ``held``: ``Store.commit`` of predictions carrying their vectors (what the driver does when
  results stream back), adding to a flat FAISS index that turns HNSW at close (timed apart).

Runs alternate (this VM drifts by up to 25% within minutes); reported: rows/s, the index's
time, the save at close, and peak memory (the held run makes its predictions first).

Usage: python bench/bench_ingest.py [--rows 131072] [--shard-rows 1024] [--commit-rows 131072]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _memory import peak_mb

DIM = 1280


def make_preds(start: int, n: int, rng: np.random.Generator) -> list:
    from imagesieve.classifier import Prediction

    x = rng.random((n, DIM), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    preds = []
    for i in range(n):
        p = Prediction(
            f"/archive/{start + i:08d}.jpg",
            "a",
            None,
            [("a", 0.9), ("b", 0.07), ("c", 0.03)],
            x[i],
            640,
            480,
            hashlib.sha256(str(start + i).encode()).hexdigest(),
            neighbor_id=7,
            neighbor_distance=0.2,
        )
        p.signature = rng.integers(-128, 127, 192, dtype=np.int8)
        p.avg_norm, p.max_pooled = 2.0, rng.random(DIM).astype(np.float16)
        preds.append(p)
    return preds


def write_shards(root: Path, rows: int, shard_rows: int) -> None:
    from imagesieve.store import write_shard

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for start in range(0, rows, shard_rows):
        seqs = range(start, start + shard_rows)
        write_shard(root / f"{start:09d}.parquet", seqs, make_preds(start, shard_rows, rng), DIM)


def child(kind: str, root: str, ws: str, rows: int, shard_rows: int, commit_rows: int) -> None:
    """Commit every row into a fresh store at ``ws``; print the timings as JSON."""
    from imagesieve._workspace import Workspace
    from imagesieve.store import Store

    store = Store(Workspace(ws))
    batch = store.begin_batch("v1", ["bench"], {})
    index_s = 0.0
    if kind == "shards":
        paths = sorted(str(p) for p in Path(root).iterdir())
        per = commit_rows // shard_rows
        counts: dict[str, int] = {}
        start = time.perf_counter()
        for k in range(0, len(paths), per):
            got = store.ingest_shards(batch, "v1", paths[k : k + per], counts)
            counts = {c: counts.get(c, 0) + v for c, v in got.counts().items()}
        commit_s = time.perf_counter() - start
        start = time.perf_counter()
        store.indexes.check("v1")  # the rows join the index in bulk
        index_s = time.perf_counter() - start
    else:
        rng = np.random.default_rng(0)  # the same rows as the shards hold
        chunks = []
        for start in range(0, rows, commit_rows):
            part = []
            for s in range(start, start + commit_rows, shard_rows):
                part.extend(make_preds(s, shard_rows, rng))
            chunks.append(part)
        start = time.perf_counter()
        for part in chunks:
            store.commit(batch, "v1", part)
        commit_s = time.perf_counter() - start
    start = time.perf_counter()
    store.close()
    close_s = time.perf_counter() - start
    peak = peak_mb()
    doc = {"kind": kind, "commit_s": commit_s, "index_s": index_s, "close_s": close_s}
    print(json.dumps(doc | {"peak_mb": peak}))


def run(kind: str, root: Path, args: argparse.Namespace) -> dict:
    ws = Path(tempfile.mkdtemp(prefix=f"bench-ingest-{kind}-"))
    try:
        cmd = [sys.executable, __file__, "--child", kind, str(root), str(ws)]
        cmd += ["--rows", str(args.rows), "--shard-rows", str(args.shard_rows)]
        cmd += ["--commit-rows", str(args.commit_rows)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr[-3000:])
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(ws, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=131_072)
    ap.add_argument("--shard-rows", type=int, default=1024)
    ap.add_argument("--commit-rows", type=int, default=131_072)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.commit_rows % args.shard_rows or args.rows % args.commit_rows:
        raise SystemExit("--rows must be a multiple of --commit-rows, and that of --shard-rows")
    if args.child:
        kind, root, ws = args.child
        child(kind, root, ws, args.rows, args.shard_rows, args.commit_rows)
        return
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-shards-"))
    try:
        start = time.perf_counter()
        write_shards(root, args.rows, args.shard_rows)
        os.sync()  # else the first run reads them while 1 GB of dirty pages is written back
        size = sum(p.stat().st_size for p in root.iterdir()) / 2**20
        print(
            f"{args.rows:,} rows in {args.rows // args.shard_rows:,} shards of "
            f"{args.shard_rows} ({size:,.0f} MB, written in {time.perf_counter() - start:.0f} s); "
            f"commits of {args.commit_rows} rows; {args.pairs} pairs"
        )
        docs: dict[str, list[dict]] = {"shards": [], "held": []}
        for pair in range(args.pairs):
            order = ("shards", "held") if pair % 2 == 0 else ("held", "shards")
            for kind in order:
                doc = run(kind, root, args)
                docs[kind].append(doc)
                print(
                    f"pair {pair + 1} {kind}: {args.rows / doc['commit_s']:,.0f} rows/s "
                    f"({doc['commit_s']:.1f} s), index {doc['index_s']:.1f} s, "
                    f"close {doc['close_s']:.1f} s, peak {doc['peak_mb']:,.0f} MB"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print("| path | rows/s into DuckDB (median) | FAISS index s | all, rows/s | peak MB |")
    print("|---|---|---|---|---|")
    for kind in ("shards", "held"):
        rate = statistics.median(args.rows / d["commit_s"] for d in docs[kind])
        index = statistics.median(d["index_s"] + d["close_s"] for d in docs[kind])
        whole = statistics.median(
            args.rows / (d["commit_s"] + d["index_s"] + d["close_s"]) for d in docs[kind]
        )
        peak = max(d["peak_mb"] for d in docs[kind])
        print(f"| {kind} | {rate:,.0f} | {index:.1f} | {whole:,.0f} | {peak:,.0f} |")
    print("target: >= 20,000 rows/s from Parquet shards into DuckDB with embeddings")


if __name__ == "__main__":
    main()
