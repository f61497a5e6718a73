"""A server's vector index as its store grows: the neighbour search of one micro-batch on a flat
index vs the HNSW graph it turns into, and what the server's requests see while the graph is
built in the background.

1. Per size (6,000 / 20,000 / 50,000 stored vectors; FLAT_MAX is 5,000): the search a server runs per group of 8
   requests (8 queries, k = 6, one thread) on a flat index and on the HNSW index built from
   the same vectors on one thread, and adding a group's 8 vectors to each.
2. `store.indexes.upgrade` in a real store of 6,000 rows crossing FLAT_MAX: while it builds the
   graph on its thread, the main thread does what the server's writer does (commit 8 rows,
   search their 8 neighbours) without pause; latency of that step before, during and after.
3. The same store grown until the graph has doubled since it was tuned: `store.indexes.retune`
   on its thread while the main thread goes on as in 2.

Vectors: bench_search.py's recipe (a real ELPV embedding + noise, clipped, normalised), seeded
from its cache of the backbone's embeddings (made once if missing).

Usage: python bench/bench_serve_index.py [--sizes 6000 20000 50000] [--rows 6000]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import threading
import time

import numpy as np
from bench_search import EMB, OUT, child, load_real, seeded
from bench_store import synthetic_rows

GROUP = 8


def ms(seconds: list[float]) -> str:
    """p50 / p99 / max in ms."""
    xs = sorted(seconds)
    p99 = xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]
    return f"{1000 * statistics.median(xs):.2f} / {1000 * p99:.2f} / {1000 * xs[-1]:.2f}"


def part1(sizes: list[int], seeds, rng) -> None:
    from imagesieve.store import _vectors
    from imagesieve.store._vectors import VectorIndex

    print("## 1. One micro-batch's neighbour search: flat vs HNSW (one thread)")
    print(
        "| stored | index | build (1 thread) | search 8 queries p50 / p99 / max ms | "
        "add 8 vectors p50 ms |"
    )
    print("|---|---|---|---|---|")
    path = OUT / "serve-index.faiss"
    for n in sizes:
        x = seeded(n, rng, seeds, 0.25)
        ids = np.arange(1, n + 1, dtype=np.int64)
        queries = seeded(GROUP, rng, seeds, 0.25)
        flat = VectorIndex(path, x.shape[1])
        flat.add(ids, x)
        t = time.perf_counter()
        hnsw = VectorIndex.build(path, x.shape[1], ids, x, threads=1)
        build = time.perf_counter() - t
        assert hnsw.kind == "hnsw" and flat.kind == "flat" and n > _vectors.FLAT_MAX
        for name, index, built in (("flat", flat, "-"), ("hnsw", hnsw, f"{build:.1f} s")):
            index.search(queries, 6, threads=1)
            search, add = [], []
            for _ in range(50):
                t = time.perf_counter()
                index.search(queries, 6, threads=1)
                search.append(time.perf_counter() - t)
            for k in range(20):  # the first add after a build allocates: in max, not p50
                first = n + 1 + k * GROUP
                xa = seeded(GROUP, rng, seeds, 0.25)
                t = time.perf_counter()
                index.add(np.arange(first, first + GROUP), xa)
                add.append(time.perf_counter() - t)
            extra_info = f" (efSearch {index.info['ef_search']})" if name == "hnsw" else ""
            print(
                f"| {n:,} | {name}{extra_info} | {built} | {ms(search)} | "
                f"{1000 * statistics.median(add):.2f} (max {1000 * max(add):.1f}) |",
                flush=True,
            )


def part2(rows: int, seeds, rng) -> None:
    from imagesieve._workspace import Workspace
    from imagesieve.store import Store

    print(f"\n## 2. `store.indexes.upgrade` at {rows:,} rows while the writer goes on")
    ws_dir = OUT / "ws-serve-index"
    shutil.rmtree(ws_dir, ignore_errors=True)
    with Store(Workspace(ws_dir)) as store:
        batch = store.begin_batch("v1", ["bench"], {})
        start = 1
        for chunk in range(0, rows, 1000):
            preds, x = synthetic_rows(start, min(1000, rows - chunk), rng, seeds)
            for p, e in zip(preds, x, strict=True):
                p.embedding = e
            store.commit(batch, "v1", preds)
            start += len(preds)

        def step() -> float:
            """What the writer does per group: commit 8 rows, search their neighbours."""
            nonlocal start
            preds, x = synthetic_rows(start, GROUP, rng, seeds)
            for p, e in zip(preds, x, strict=True):
                p.embedding = e
            t = time.perf_counter()
            store.commit(batch, "v1", preds)
            with store.lock:
                store.indexes.get("v1").search(x, 6, threads=1)
            start += GROUP
            return time.perf_counter() - t

        def stepping_while(job) -> tuple[list, float, list[float]]:
            """``job`` on its thread while the writer steps: its result, seconds, the steps."""
            result: list = []
            t0 = time.perf_counter()
            worker = threading.Thread(target=lambda: result.append(job()))
            worker.start()
            during = []
            while worker.is_alive():
                during.append(step())
            return result, time.perf_counter() - t0, during

        before = [step() for _ in range(40)]
        assert store.indexes.outgrown("v1")
        result, build, during = stepping_while(lambda: store.indexes.upgrade("v1"))
        index = store.indexes.get("v1")
        after = [step() for _ in range(40)]
        print(
            f"upgrade: {build:.1f} s wall on its thread, result {result}, index now {index.kind} "
            f"(efSearch {index.info.get('ef_search')}, built over {index.info['built_at']:,}, "
            f"{len(during)} groups committed during the build and kept: {index.ntotal:,} "
            f"vectors = {start - 1:,} rows)"
        )
        print("| writer step (commit 8 rows + search 8) | groups | p50 / p99 / max ms |")
        print("|---|---|---|")
        for name, xs in (
            ("before (flat)", before),
            ("during the build", during),
            ("after (HNSW)", after),
        ):
            print(f"| {name} | {len(xs)} | {ms(xs)} |")

        tuned = index.info["tuned_at"]
        print(
            f"\n## 3. `store.indexes.retune` once the graph has doubled since tuned over {tuned:,}"
        )
        while not store.indexes.retune_due("v1"):  # grow it as a busy day would
            preds, x = synthetic_rows(start, 1000, rng, seeds)
            for p, e in zip(preds, x, strict=True):
                p.embedding = e
            store.commit(batch, "v1", preds)
            start += len(preds)
        before = [step() for _ in range(40)]
        result, took, during = stepping_while(lambda: store.indexes.retune("v1"))
        after = [step() for _ in range(40)]
        print(
            f"retune: {took:.1f} s wall on its thread, result {result}: efSearch "
            f"{index.info['ef_search']} for recall@10 {index.info['recall_at_10']} over "
            f"{index.info['tuned_at']:,} vectors; {len(during)} groups committed meanwhile"
        )
        print("| writer step (commit 8 rows + search 8) | groups | p50 / p99 / max ms |")
        print("|---|---|---|")
        for name, xs in (("before", before), ("during the re-tune", during), ("after", after)):
            print(f"| {name} | {len(xs)} | {ms(xs)} |")
        store.finish_batch(batch, "done", {})
    shutil.rmtree(ws_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[6_000, 20_000, 50_000])
    ap.add_argument("--rows", type=int, default=6_000)
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not EMB.is_file():
        child("embed")
    print(
        f"# bench_serve_index: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
        f"command: python bench/bench_serve_index.py"
    )
    seeds, rng = load_real(), np.random.default_rng(0)
    part1(args.sizes, seeds, rng)
    part2(args.rows, seeds, rng)


if __name__ == "__main__":
    main()
