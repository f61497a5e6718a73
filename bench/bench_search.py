"""Similar-image search latency and recall at 100,000 and 1,000,000 stored embeddings, side by
side with exact (flat) search.

The issue's target: p50 <= 5 ms and p99 <= 20 ms per query, recall@10 >= 0.95 against exact
search. Each size is one fresh child process: it generates the vectors, builds the store's
index through `VectorIndex.build` (HNSW above FLAT_MAX, efSearch tuned at build) and an exact
`faiss.IndexFlatIP` over the same vectors, then times one query per call on both, interleaved.
Peak memory is VmHWM, reset at the start of each phase (/proc/self/clear_refs).

Usage: python bench/bench_search.py [--sizes 100000 1000000] [--queries 1000] [--noise 0.25]
       [--exact-budget 60] [--find-calls 20] [--no-find]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _memory import peak_mb, reset_peak, status_mb

HERE = Path(__file__).resolve().parent
OUT = HERE / "_out" / "search"
EMB = OUT / "elpv_emb.npy"  # backbone embeddings of the 2,624 ELPV images
CLUSTER_EMB = HERE / "_out" / "cluster" / "elpv-embeddings.npz"  # bench_cluster.py's cache
STORE_EMB = HERE / "_out" / "store" / "elpv-embeddings.npy"  # bench_store.py's (trained model)
ROWS_WS = HERE / "_out" / "store" / "ws-rows"  # bench_store.py part 3: 100,000 stored rows
ROWS_MODELS = HERE / "_out" / "store" / "model-ws" / "models"  # its model version (v1)
FIND_WS = OUT / "ws-find"
BACKBONE = "efficientnet_lite0"
DIM = 1280
K = 10
CHUNK = 50_000  # synthetic vectors generated per step
TARGET_P50_MS, TARGET_P99_MS, TARGET_RECALL = 5.0, 20.0, 0.95
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# -- helpers shared by parent and children -------------------------------------------------
def machine_busy_seconds() -> float:
    """CPU seconds spent by the whole machine (all processes, all cores) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Phase:
    """Times a phase of a child and reads its peak RSS and how busy the rest of the machine was."""

    def __init__(self, record: dict, name: str):
        self.record, self.name = record, name

    def __enter__(self) -> Phase:
        reset_peak()
        self.t, self.busy, self.own = time.perf_counter(), machine_busy_seconds(), own_cpu_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t
        other = (machine_busy_seconds() - self.busy) - (own_cpu_seconds() - self.own)
        self.record[self.name] = {
            "seconds": wall,
            "peak_mb": peak_mb(),
            "rss_mb": status_mb("VmRSS"),
            "other_cores": max(0.0, other / wall) if wall else 0.0,
        }


def child(kind: str, **kw) -> dict:
    """Run ``kind`` in a fresh interpreter; returns the JSON dict it prints last (+ wall time)."""
    cmd = [sys.executable, __file__, "--child", kind]
    t = time.perf_counter()
    out = subprocess.run(cmd, input=json.dumps(kw) + "\n", capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"child {kind} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    doc["process_wall"] = time.perf_counter() - t
    return doc


def load_real():
    """(2624, 1280) float32, L2-normalised: the backbone's embeddings of every ELPV image."""
    import numpy as np

    x = np.load(EMB).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def seeded(n: int, rng, seeds, noise: float):
    """(n, d) L2-normalised float32: a random real embedding + Gaussian noise, clipped at 0.

    The noise has norm ~``noise`` (per-coordinate sigma noise / sqrt(d)); clipping keeps the
    pooled features non-negative, as the real ones are. bench_store.py part 3's recipe.
    """
    import numpy as np

    x = seeds[rng.integers(0, len(seeds), n)]
    x += (noise / np.sqrt(DIM)) * rng.standard_normal((n, DIM), dtype=np.float32)
    np.maximum(x, 0, out=x)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def quantiles(values) -> list[float]:
    import numpy as np

    return [float(v) for v in np.quantile(np.asarray(values, np.float64), QUANTILES)]


def latency_stats(seconds: list[float]) -> dict:
    """p50 / p99 / mean / max of per-call times, in ms."""
    import numpy as np

    ms = np.asarray(seconds) * 1000
    return {
        "n": len(ms),
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "max": float(ms.max()),
    }


def time_single_queries(searches: dict, xq, limits: dict, budget: dict) -> dict[str, list]:
    """One query per call on every search in turn (first one alternating), per-call seconds.

    ``searches[name](q)`` takes a (1, d) query; a search stops after ``limits[name]`` queries or
    once it has spent ``budget[name]`` seconds (so exact search at 1M stays affordable).
    """
    names = list(searches)
    spent = {name: [] for name in names}
    for q in xq[:10]:  # warm-up, not recorded
        for name in names:
            searches[name](q[None])
    for i, q in enumerate(xq):
        q = q[None]
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            s = spent[name]
            if len(s) >= limits[name] or sum(s) >= budget[name]:
                continue
            t = time.perf_counter()
            searches[name](q)
            s.append(time.perf_counter() - t)
    return spent


def recall_at_k(got, truth, k: int = K) -> tuple[float, list[float]]:
    """Mean and per-query |got[:k] & truth[:k]| / k (ids; -1 never matches)."""
    per = [
        len(set(a[:k].tolist()) & set(b[:k].tolist())) / k for a, b in zip(got, truth, strict=True)
    ]
    return float(sum(per) / len(per)), per


def drop_own(rows, own, k: int = K):
    """Each row of ids without the query's own id, first ``k`` kept (leave-one-out queries)."""
    import numpy as np

    return np.stack([r[r != o][:k] for r, o in zip(rows, own, strict=True)])


# -- children: one measured run each --------------------------------------------------------
def child_embed() -> dict:
    """Backbone embeddings of all ELPV images, computed once (ONNX export + inference)."""
    import numpy as np

    from imagesieve._workspace import Workspace
    from imagesieve.classifier._features import backbone_onnx, extract_features
    from imagesieve.data._elpv import elpv_images
    from imagesieve.models import get_backbone_spec

    t = time.perf_counter()
    images = elpv_images()
    onnx = backbone_onnx(Workspace(OUT / "ws"), BACKBONE)
    arrays, errors = extract_features(
        onnx, get_backbone_spec(BACKBONE).config, [im.path for im in images], ("embedding",)
    )
    bad = [str(im.path) for im, e in zip(images, errors, strict=True) if e is not None]
    assert not bad, f"{len(bad)} images failed: {bad[:3]}"
    np.save(EMB, arrays["embedding"].astype(np.float32))
    return {"n": len(images), "seconds": time.perf_counter() - t, "peak_mb": peak_mb()}


def child_real(noise: float, queries: int, seed: int) -> dict:
    """The 2,624 real embeddings: their neighbour statistics vs the synthetic recipe's, and the
    store's index over them (flat, as built; HNSW, forced) against exact search."""
    import faiss
    import numpy as np

    from imagesieve.store._vectors import VectorIndex

    phases: dict = {}
    xb = load_real()
    n = len(xb)
    ids = np.arange(1, n + 1, dtype=np.int64)

    def nn_dists(x):  # leave-one-out 1st and 10th nearest cosine distances
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        top = -np.sort(-np.partition(sim, -K, axis=1)[:, -K:], axis=1)
        return 1 - top[:, 0], 1 - top[:, K - 1]

    syn = seeded(n, np.random.default_rng(seed + 2), xb, noise)
    real1, real10 = nn_dists(xb)
    syn1, syn10 = nn_dists(syn)
    zero = {"real": float((xb == 0).mean()), "synthetic": float((syn == 0).mean())}
    pair = {"real": float((xb @ xb.T).mean()), "synthetic": float((syn @ syn.T).mean())}

    with Phase(phases, "build"):
        t = time.perf_counter()
        flat_vi = VectorIndex.build(OUT / "real-flat.faiss", DIM, ids, xb)
        flat_seconds = time.perf_counter() - t
        t = time.perf_counter()
        hnsw_vi = VectorIndex(OUT / "real-hnsw.faiss", DIM)
        hnsw_vi._make_hnsw(ids, xb)  # what build does above FLAT_MAX
        hnsw_seconds = time.perf_counter() - t
        exact = faiss.IndexFlatIP(DIM)
        exact.add(xb)
    assert flat_vi.kind == "flat" and hnsw_vi.kind == "hnsw", (flat_vi.kind, hnsw_vi.kind)

    # Queries are the stored vectors, each one's own match left out (as VectorIndex.tune does).
    with Phase(phases, "recall"):
        _, truth = exact.search(xb, K + 1)
        truth = drop_own(truth + 1, ids)
        got_flat = drop_own(flat_vi.search(xb, K + 1)[0], ids)
        got_hnsw = drop_own(hnsw_vi.search(xb, K + 1)[0], ids)
        recall_flat, _ = recall_at_k(got_flat, truth)
        recall_hnsw, per_hnsw = recall_at_k(got_hnsw, truth)

    faiss.omp_set_num_threads(1)
    xq = xb[np.random.default_rng(seed).permutation(n)[:queries]]
    searches = {
        "ours_flat": lambda q: flat_vi.search(q, K + 1),
        "ours_hnsw": lambda q: hnsw_vi.search(q, K + 1),
        "exact": lambda q: exact.search(q, K + 1),
    }
    with Phase(phases, "latency"):
        lat = time_single_queries(
            searches, xq, dict.fromkeys(searches, len(xq)), dict.fromkeys(searches, 1e9)
        )
    return {
        "n": n,
        "noise": noise,
        "nn": {
            "real_1": quantiles(real1),
            "real_10": quantiles(real10),
            "syn_1": quantiles(syn1),
            "syn_10": quantiles(syn10),
        },
        "zero_fraction": zero,
        "pair_cosine": pair,
        "flat_build_seconds": flat_seconds,
        "hnsw_build_seconds": hnsw_seconds,
        "hnsw_info": hnsw_vi.info,
        "recall_flat": recall_flat,
        "recall_hnsw": recall_hnsw,
        "hnsw_queries_below_target": float(np.mean(np.array(per_hnsw) < TARGET_RECALL)),
        "latency": {name: latency_stats(s) for name, s in lat.items()},
        "phases": phases,
        "peak_mb": peak_mb(),
    }


def child_scale(n: int, queries: int, noise: float, seed: int, exact_budget: float) -> dict:
    """``n`` synthetic vectors: VectorIndex.build vs exact IndexFlatIP, held-out queries."""
    import faiss
    import numpy as np

    from imagesieve.store._vectors import EF_SEARCH_CANDIDATES, VectorIndex

    phases: dict = {}
    seeds = load_real()
    threads = faiss.omp_get_max_threads()
    # The vectors live once, in the exact index; VectorIndex.build gets a view of its storage.
    with Phase(phases, "generate"):
        rng = np.random.default_rng(seed)
        exact = faiss.IndexFlatIP(DIM)
        for start in range(0, n, CHUNK):
            exact.add(seeded(min(CHUNK, n - start), rng, seeds, noise))
        xq = seeded(queries, np.random.default_rng(seed + 1), seeds, noise)  # held out
        xb = faiss.rev_swig_ptr(exact.get_xb(), n * DIM).reshape(n, DIM)
    ids = np.arange(1, n + 1, dtype=np.int64)  # DuckDB-like ids: row position + 1

    with Phase(phases, "build"):
        index = VectorIndex.build(OUT / f"scale-{n}.faiss", DIM, ids, xb)
    kind = index.kind

    with Phase(phases, "truth"):  # batched exact search (BLAS, all cores) for ground truth
        d_true, i_true = exact.search(xq, K + 1)
        truth = i_true[:, :K] + 1
        got, dist = index.search(xq, K)
        recall, per = recall_at_k(got, truth)
        # Near-ties at the 10th place: a result as close as the 10th true one counts too.
        tenth = 1 - d_true[:, K - 1]
        tie_recall = float(np.mean(np.sum(dist <= tenth[:, None] + 1e-6, axis=1) / K))

    lat: dict = {}
    budget = {"ours": 1e9, "exact": exact_budget}
    limits = {"ours": queries, "exact": queries}
    with Phase(phases, "latency"):
        for t in sorted({1, threads}):
            faiss.omp_set_num_threads(t)
            busy, own, t0 = machine_busy_seconds(), own_cpu_seconds(), time.perf_counter()
            spent = time_single_queries(
                {"ours": lambda q: index.search(q, K), "exact": lambda q: exact.search(q, K)},
                xq,
                limits,
                budget if t == 1 else {"ours": 1e9, "exact": exact_budget / 2},
            )
            wall = time.perf_counter() - t0
            other = (machine_busy_seconds() - busy) - (own_cpu_seconds() - own)
            lat[str(t)] = {name: latency_stats(s) for name, s in spent.items()}
            lat[str(t)]["other_cores"] = max(0.0, other / wall)
            lat[str(t)]["own_cores"] = (own_cpu_seconds() - own) / wall
        faiss.omp_set_num_threads(threads)

    sweep = []
    if kind == "hnsw":
        inner = faiss.downcast_index(index.index.index)
        chosen = inner.hnsw.efSearch
        with Phase(phases, "sweep"):
            # Stored vectors as queries, own match left out: what VectorIndex.tune measures.
            own = np.random.default_rng(seed + 3).choice(n, min(queries, 500), replace=False)
            xs = np.ascontiguousarray(xb[own])
            s_truth = drop_own(exact.search(xs, K + 1)[1] + 1, own + 1)
            for ef in EF_SEARCH_CANDIDATES:
                inner.hnsw.efSearch = ef
                faiss.omp_set_num_threads(threads)
                r, _ = recall_at_k(index.search(xq, K)[0], truth)
                r_stored, _ = recall_at_k(drop_own(index.search(xs, K + 1)[0], own + 1), s_truth)
                faiss.omp_set_num_threads(1)
                s = time_single_queries(
                    {"ours": lambda q: index.search(q, K)}, xq[:300], {"ours": 300}, {"ours": 1e9}
                )["ours"]
                sweep.append({"ef": ef, "recall": r, "recall_stored": r_stored, **latency_stats(s)})
            inner.hnsw.efSearch = chosen
            faiss.omp_set_num_threads(threads)
    return {
        "n": n,
        "kind": kind,
        "info": index.info,
        "threads": threads,
        "recall": recall,
        "tie_recall": tie_recall,
        "queries_below_target": float(np.mean(np.array(per) < TARGET_RECALL)),
        "query_nn_1": quantiles(1 - d_true[:, 0]),
        "query_nn_10": quantiles(1 - d_true[:, K - 1]),
        "gap_10_11": float(np.median(d_true[:, K - 1] - d_true[:, K])),
        "latency": lat,
        "sweep": sweep,
        "sweep_stored": min(queries, 500),
        "phases": phases,
        "peak_mb": peak_mb(),
    }


def child_find(ws: str, calls: int, queries: int, seed: int) -> dict:
    """find_similar(ws, id=...) end to end, then the same steps within one open Store."""
    import functools

    import faiss
    import numpy as np

    import imagesieve.search._similar as similar
    from imagesieve._workspace import Workspace
    from imagesieve.store import Store
    from imagesieve.store._vectors import VectorIndex

    phases: dict = {}
    wsp = Workspace(ws)
    spent: dict[str, list[float]] = {}

    def timed(owner, name: str, label: str) -> None:
        original = getattr(owner, name)
        spent[label] = []

        @functools.wraps(original)
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                spent[label].append(time.perf_counter() - t)

        setattr(owner, name, wrapper)

    # find_similar's steps, none inside another (the index load is inside Store.index).
    timed(similar, "get_version", "get_version")
    timed(Store, "__init__", "`Store(ws)`: DuckDB open, schema, index check by sidecar")
    timed(Store, "row_count", "`store.row_count` (DuckDB count/max/sum)")
    timed(Store, "index", "`store.indexes.get(v)`: check again, then `VectorIndex.load`")
    timed(VectorIndex, "search", "`VectorIndex.search`")
    timed(similar, "_results", "`_results` (DuckDB metadata join)")
    timed(Store, "close", "`Store.close`")
    timed(VectorIndex, "load", "load")  # reported as part of store.index

    with Store(wsp) as store:
        (version,) = store.versions()
        n = store.row_count(version)
        checks = [c.__dict__ for c in store.indexes.checks]
    for v in spent.values():
        v.clear()
    rng = np.random.default_rng(seed)
    e2e_ids = rng.integers(1, n + 1, calls + 1)
    e2e = []
    with Phase(phases, "find_similar"):
        for i, id_ in enumerate(e2e_ids):
            t = time.perf_counter()
            query, results = similar.find_similar(wsp, id=int(id_), k=K)
            if i == 0:  # warm-up
                for v in spent.values():
                    v.clear()
                continue
            e2e.append(time.perf_counter() - t)
            assert len(results) == K and query.method == "ann", (len(results), query.method)
    breakdown = {label: sum(v) / len(e2e) for label, v in spent.items()}
    load_ms = breakdown.pop("load") * 1000

    # The same steps with the store and index already open (what a long-running server could do).
    steps: dict[str, list[float]] = {
        k: [] for k in ("membership", "reconstruct", "search", "results", "total")
    }
    with Phase(phases, "open store"):
        store = Store(wsp)
        index = store.indexes.get(version)
    ids_q = rng.integers(1, n + 1, queries)
    with Phase(phases, "queries in one open store"):
        for id_ in ids_q:
            id_ = int(id_)
            t0 = time.perf_counter()
            present = id_ in set(index.ids().tolist())  # find_similar's check, as written
            t1 = time.perf_counter()
            q = index.index.reconstruct(id_)
            t2 = time.perf_counter()
            got, dist = VectorIndex.search.__wrapped__(index, q, K + 1)
            t3 = time.perf_counter()
            pairs = [
                (int(i), float(d))
                for i, d in zip(got[0], dist[0], strict=True)
                if i >= 0 and i != id_
            ][:K]
            res = similar._results.__wrapped__(store, pairs)
            t4 = time.perf_counter()
            assert present and len(res) == K
            for key, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                steps[key].append(dt)
        # A membership check that does not rebuild a set of every id on each query.
        id_map = index.ids()
        alt = []
        for id_ in ids_q[:200]:
            t = time.perf_counter()
            _ = bool(np.any(id_map == id_))
            alt.append(time.perf_counter() - t)
    store.close()
    inner = faiss.downcast_index(index.index.index)
    ef_search = int(inner.hnsw.efSearch) if index.kind == "hnsw" else None
    kind, info, index_mb = index.kind, index.info, Path(index.path).stat().st_size / 2**20
    del inner
    t = time.perf_counter()
    del index, store  # what happens when find_similar returns: the loaded index is freed
    free_ms = (time.perf_counter() - t) * 1000
    return {
        "n": n,
        "version": version,
        "kind": kind,
        "ef_search": ef_search,
        "info": info,
        "free_ms": free_ms,
        "checks": checks,
        "threads": faiss.omp_get_max_threads(),
        "e2e": latency_stats(e2e),
        "breakdown_ms": {k: v * 1000 for k, v in breakdown.items()},
        "load_ms": load_ms,
        "index_mb": index_mb,
        "open_seconds": phases["open store"]["seconds"],
        "steps": {k: latency_stats(v) for k, v in steps.items()},
        "membership_np": latency_stats(alt),
        "phases": phases,
        "peak_mb": peak_mb(),
    }


CHILDREN = {"embed": child_embed, "real": child_real, "scale": child_scale, "find": child_find}


# -- parent: the report -----------------------------------------------------------------------
def ensure_embeddings() -> str:
    """EMB exists and holds 2,624 unit-norm 1280-d vectors; says where they came from."""
    import numpy as np

    def ok(x) -> bool:
        norms = np.linalg.norm(x, axis=1)
        return x.shape == (2624, DIM) and np.isfinite(x).all() and np.abs(norms - 1).max() < 1e-3

    OUT.mkdir(parents=True, exist_ok=True)
    if EMB.is_file() and ok(np.load(EMB)):
        return f"cached in {EMB.relative_to(HERE.parent)}"
    if CLUSTER_EMB.is_file():  # bench_cluster.py computes exactly this (same call, same order)
        x = np.load(CLUSTER_EMB)["embedding"].astype(np.float32)
        if ok(x):
            np.save(EMB, x)
            how = (
                f"reused from {CLUSTER_EMB.relative_to(HERE.parent)} (bench_cluster.py: the same "
                "backbone_onnx + extract_features call, image order of elpv_images())"
            )
            if STORE_EMB.is_file():
                y = np.load(STORE_EMB)
                if y.shape == x.shape:
                    how += (
                        f"; max |difference| to the trained model's embeddings in "
                        f"{STORE_EMB.relative_to(HERE.parent)}: {np.abs(x - y).max():.1e}"
                    )
            return how
    d = child("embed")
    return f"computed in {d['seconds']:.0f} s (peak RSS {d['peak_mb']:.0f} MB)"


def fmt_q(values: list[float]) -> str:
    return " / ".join(f"{v:.4f}" for v in values)


def fmt_phases(phases: dict) -> str:
    return ", ".join(
        f"{name} {p['seconds']:.1f} s / peak {p['peak_mb'] / 1024:.2f} GB / other cores "
        f"{p['other_cores']:.2f}"
        for name, p in phases.items()
    )


def lat_cells(s: dict) -> str:
    return f"{s['p50']:.2f} | {s['p99']:.2f} | {s['mean']:.2f} | {s['max']:.1f} | {s['n']}"


def part_real(args, results: list) -> None:
    r = child("real", noise=args.noise, queries=args.queries, seed=args.seed)
    nn = r["nn"]
    print(f"\n## 0. Vectors ({DIM}-d float32, L2-normalised)")
    print(
        f"Real: the {r['n']:,} ELPV embeddings of the default backbone ({BACKBONE}), {args.emb_source}. "
        f"Synthetic: a random real embedding + Gaussian noise of norm {args.noise} (per-coordinate "
        f"sigma {args.noise}/sqrt({DIM})), clipped at 0, L2-normalised (bench_store.py part 3's "
        "recipe; noise norm chosen so the nearest-neighbour distances match). At equal size, "
        "leave-one-out cosine distances (q05 / q25 / median / q75 / q95):\n"
    )
    print("| set | 1st neighbour | 10th neighbour | mean pair cosine | zero coordinates |")
    print("|---|---|---|---|---|")
    print(
        f"| real ELPV, {r['n']:,} | {fmt_q(nn['real_1'])} | {fmt_q(nn['real_10'])} | "
        f"{r['pair_cosine']['real']:.3f} | {r['zero_fraction']['real']:.0%} |"
    )
    print(
        f"| synthetic, {r['n']:,} | {fmt_q(nn['syn_1'])} | {fmt_q(nn['syn_10'])} | "
        f"{r['pair_cosine']['synthetic']:.3f} | {r['zero_fraction']['synthetic']:.0%} |"
    )
    print(
        "\nAt scale the held-out queries' neighbours are closer (denser data: each real embedding "
        "seeds N/2,624 vectors); their distances are in section 2."
    )

    info = r["hnsw_info"]
    lat = r["latency"]
    print(f"\n## 1. Real ELPV embeddings: {r['n']:,} stored, exact vs HNSW")
    print(
        f"Queries: the stored vectors themselves, each one's own match left out (as "
        f"`VectorIndex.tune` measures); recall over all {r['n']:,}, latency over {lat['exact']['n']} "
        "of them, one query per call (k = 11, self dropped), interleaved, **1 thread** "
        "(`faiss.omp_set_num_threads(1)`). Times in ms.\n"
    )
    print("| index | build | recall@10 vs exact | p50 | p99 | mean | max | queries |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| exact `faiss.IndexFlatIP` | - | 1 | {lat_cells(lat['exact'])} |")
    print(
        f"| `VectorIndex.build` (flat: {r['n']:,} <= FLAT_MAX) | {r['flat_build_seconds'] * 1000:.0f} ms "
        f"| {r['recall_flat']:.4f} | {lat_cells(lat['ours_flat'])} |"
    )
    print(
        f"| `VectorIndex._make_hnsw` forced (efSearch {info['ef_search']} tuned to recall@10 "
        f"{info['recall_at_10']} on 200 stored queries) | {r['hnsw_build_seconds']:.2f} s | "
        f"**{r['recall_hnsw']:.4f}** ({r['hnsw_queries_below_target']:.0%} of queries below "
        f"{TARGET_RECALL}) | {lat_cells(lat['ours_hnsw'])} |"
    )
    print(f"\nPhases: {fmt_phases(r['phases'])}.")
    results.append(
        (
            f"1. recall@10, HNSW over the {r['n']:,} real embeddings",
            f"{r['recall_hnsw']:.4f}",
            f">= {TARGET_RECALL}",
            r["recall_hnsw"] >= TARGET_RECALL,
        )
    )


def part_scale(args, results: list) -> list[dict]:
    print(f"\n## 2. Synthetic at scale: {', '.join(f'{n:,}' for n in args.sizes)} stored vectors")
    print(
        f"One fresh process per size. Vectors generated in chunks of {CHUNK:,} straight into an "
        f"exact `faiss.IndexFlatIP` (the only copy); `VectorIndex.build(path, {DIM}, ids, view of "
        f"those vectors)` builds the store's index (build on all cores). {args.queries:,} held-out "
        "queries from the same recipe (not stored). Ground truth: the exact index, batched. "
        "Latency: one query per call, k = 10, ours and exact interleaved (alternating which goes "
        f"first); exact search stops after {args.exact_budget:.0f} s of its own time per size "
        f"(half that with 2 threads), so its query count can be smaller. Times in ms.\n",
        flush=True,
    )
    docs = []
    for n in args.sizes:
        d = child(
            "scale",
            n=n,
            queries=args.queries,
            noise=args.noise,
            seed=args.seed,
            exact_budget=args.exact_budget,
        )
        docs.append(d)
        info = d["info"]
        b = d["phases"]["build"]
        lat1 = d["latency"]["1"]
        hnsw = d["kind"] == "hnsw"
        print(f"### N = {n:,}")
        print(
            f"`VectorIndex.build`: **{b['seconds']:.1f} s**, kind {d['kind']}"
            + (
                f" (graph {info['build_seconds']} s with {d['threads']} threads, M 32, "
                f"efConstruction 40; then tuning), efSearch **{info['ef_search']}** chosen for "
                f"recall@10 {info['recall_at_10']} at build (200 stored vectors as queries)"
                if hnsw
                else ""
            )
            + f"; peak RSS {b['peak_mb'] / 1024:.2f} GB in the build phase."
        )
        print(
            f"Held-out queries: exact cosine distance to the 1st neighbour {fmt_q(d['query_nn_1'])}, "
            f"to the 10th {fmt_q(d['query_nn_10'])} (q05 / q25 / median / q75 / q95); median "
            f"cosine gap between the 10th and 11th neighbour {d['gap_10_11']:.5f}."
        )
        print(
            f"recall@10 on the {args.queries:,} held-out queries: **{d['recall']:.4f}** "
            f"({d['tie_recall']:.4f} counting a result as close as the 10th true one; "
            f"{d['queries_below_target']:.0%} of queries below {TARGET_RECALL}).\n"
        )
        print(
            "| search | threads | p50 | p99 | mean | max | queries | exact / ours (p50) | other cores busy |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for t, lat in d["latency"].items():
            o, e = lat["ours"], lat["exact"]
            print(
                f"| ours (`VectorIndex.search`, {d['kind']}) | {t} | {lat_cells(o)} | 1.00x | "
                f"{lat['other_cores']:.2f} |"
            )
            print(
                f"| exact `IndexFlatIP.search` | {t} | {lat_cells(e)} | "
                f"{e['p50'] / o['p50']:.0f}x | {lat['other_cores']:.2f} |"
            )
        if d["sweep"]:
            print(
                f"\nefSearch sweep (same index; recall on all {args.queries:,} held-out queries, "
                f"{d['sweep_stored']} stored vectors as queries, latency on "
                f"{d['sweep'][0]['n']} held-out queries, 1 thread):\n"
            )
            print(
                "| efSearch | recall@10, held-out queries | recall@10, stored vectors as queries "
                "(own match left out, as tuning measures) | p50 | p99 | mean |"
            )
            print("|---|---|---|---|---|---|")
            for s in d["sweep"]:
                mark = " (chosen)" if s["ef"] == info["ef_search"] else ""
                print(
                    f"| {s['ef']}{mark} | {s['recall']:.4f} | {s['recall_stored']:.4f} | "
                    f"{s['p50']:.2f} | {s['p99']:.2f} | {s['mean']:.2f} |"
                )
        print(
            f"\nPhases (time / peak RSS of the process in that phase / other cores busy): "
            f"{fmt_phases(d['phases'])}.\n",
            flush=True,
        )
        o, x = lat1["ours"], lat1["exact"]
        results += [
            (
                f"2. N={n:,}: p50, 1 thread",
                f"{o['p50']:.2f} ms",
                "<= 5 ms",
                o["p50"] <= TARGET_P50_MS,
            ),
            (
                f"2. N={n:,}: p99, 1 thread",
                f"{o['p99']:.2f} ms",
                "<= 20 ms",
                o["p99"] <= TARGET_P99_MS,
            ),
            (
                f"2. N={n:,}: recall@10 vs exact (held-out)",
                f"{d['recall']:.4f}",
                f">= {TARGET_RECALL}",
                d["recall"] >= TARGET_RECALL,
            ),
            (f"2. N={n:,}: exact search p50, 1 thread", f"{x['p50']:.1f} ms", "(reported)", None),
            (
                f"2. N={n:,}: VectorIndex.build",
                f"{b['seconds']:.0f} s, {b['peak_mb'] / 1024:.1f} GB peak",
                "(reported)",
                None,
            ),
        ]
    return docs


def rows_ws_state() -> tuple[bool, str]:
    """Is bench_store.py's 100,000-row workspace there and in sync (by its index sidecar)?"""
    side = ROWS_WS / "index" / "v1.json"
    faiss_file = ROWS_WS / "index" / "v1.faiss"
    if not (ROWS_WS / "store.duckdb").is_file() or not side.is_file() or not faiss_file.is_file():
        return (
            False,
            f"{ROWS_WS.relative_to(HERE.parent)} missing (run bench/bench_store.py --part rows)",
        )
    doc = json.loads(side.read_text())
    if doc.get("bytes") != faiss_file.stat().st_size:
        return False, "its index sidecar does not describe its index file"
    if not (ROWS_MODELS / "ACTIVE").is_file():
        return False, f"{ROWS_MODELS.relative_to(HERE.parent)} missing"
    return True, f"{doc['count']:,} rows"


def copy_rows_ws() -> float:
    """Copy the rows workspace (DuckDB + index) and its model version into FIND_WS; seconds."""
    t = time.perf_counter()
    stamp = {
        p.name: [p.stat().st_size, p.stat().st_mtime_ns]
        for p in [ROWS_WS / "store.duckdb", *sorted((ROWS_WS / "index").iterdir())]
    }
    marker = FIND_WS / "copied-from.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return 0.0
    shutil.rmtree(FIND_WS, ignore_errors=True)
    (FIND_WS / "index").mkdir(parents=True)
    for p in ROWS_WS.iterdir():
        if p.is_file() and p.name.startswith("store.duckdb"):
            shutil.copy2(p, FIND_WS / p.name)
    for p in (ROWS_WS / "index").iterdir():
        shutil.copy2(p, FIND_WS / "index" / p.name)
    shutil.copytree(ROWS_MODELS, FIND_WS / "models")
    marker.write_text(json.dumps(stamp))
    return time.perf_counter() - t


def part_find(args, results: list) -> None:
    print("\n## 3. `find_similar(ws, id=...)` end to end, 100,000 stored rows")
    ok, why = rows_ws_state()
    if not ok:
        print(f"Skipped: {why}.")
        results.append(("3. find_similar end to end", "skipped", "(reported)", None))
        return
    copied = copy_rows_ws()
    d = child("find", ws=str(FIND_WS), calls=args.find_calls, queries=args.queries, seed=args.seed)
    print(
        f"Workspace: a copy of {ROWS_WS.relative_to(HERE.parent)} ({why}; bench_store.py part 3: "
        "synthetic rows straight into DuckDB, ELPV-seeded embeddings of noise 0.3) "
        + (f"made in {copied:.0f} s" if copied else "(copy reused)")
        + f" + its model version {d['version']}. Index: {d['kind']}, efSearch {d['ef_search']} "
        f"(tuned at build: {d['info']}). Default threads ({d['threads']}). Opening check: "
        f"{', '.join(c['action'] for c in d['checks'])}.\n"
    )
    e = d["e2e"]
    print(
        f"(a) `find_similar(ws, id=random, k=10)`, {e['n']} calls after one warm-up, each opening "
        f"the store: p50 **{e['p50']:.0f} ms**, p99 {e['p99']:.0f} ms, mean {e['mean']:.0f} ms. "
        "Where a call's time goes (mean per call, ms):\n"
    )
    print("| step | ms per call | share |")
    print("|---|---|---|")
    for label, ms in sorted(d["breakdown_ms"].items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {ms:.1f} | {ms / e['mean']:.0%} |")
        if label.startswith("`store.index"):
            print(
                f"| ... of which `VectorIndex.load` ({d['index_mb']:.0f} MB file, page cache warm) "
                f"| {d['load_ms']:.1f} | {d['load_ms'] / e['mean']:.0%} |"
            )
    rest = e["mean"] - sum(d["breakdown_ms"].values())
    print(
        f"| the rest: freeing the loaded index as the call returns ({d['free_ms']:.0f} ms, "
        "measured once), the id check (`set(index.ids().tolist())`), reconstruct, Python | "
        f"{rest:.1f} | {rest / e['mean']:.0%} |"
    )
    s = d["steps"]
    print(
        f"\n(b) The same steps with the store opened once (`Store(ws)` + `store.indexes.get(v)`: "
        f"{d['open_seconds']:.2f} s), {s['total']['n']} random ids, ms:\n"
    )
    print("| step | p50 | p99 | mean | max | queries |")
    print("|---|---|---|---|---|---|")
    names = {
        "membership": "`id in set(index.ids().tolist())` (find_similar's id check)",
        "reconstruct": "`index.index.reconstruct(id)`",
        "search": "`VectorIndex.search(q, 11)`",
        "results": "`_results` (DuckDB join for 10 rows)",
        "total": "**total per query**",
    }
    for key, label in names.items():
        print(f"| {label} | {lat_cells(s[key])} |")
    m = d["membership_np"]
    print(
        f"| (alternative id check: `np.any(index.ids() == id)` with the id array held) | {lat_cells(m)} |"
    )
    print(f"\nPhases: {fmt_phases(d['phases'])}.")
    results.append(
        ("3. find_similar(ws, id) end to end, p50", f"{e['p50']:.0f} ms", "(reported)", None)
    )
    total = f"{s['total']['p50']:.1f} / {s['total']['p99']:.1f} ms"
    results.append(("3. same steps in one open Store, p50 / p99", total, "(reported)", None))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries per size")
    ap.add_argument(
        "--noise", type=float, default=0.25, help="norm of the synthetic vectors' noise"
    )
    ap.add_argument(
        "--exact-budget", type=float, default=60.0, help="s of exact single-query search per size"
    )
    ap.add_argument("--find-calls", type=int, default=20, help="end-to-end find_similar calls")
    ap.add_argument("--no-find", action="store_true", help="skip part 3 (find_similar)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", metavar="KIND", help=argparse.SUPPRESS)  # kwargs: JSON line on stdin
    args = ap.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](**json.loads(sys.stdin.readline()))))
        return

    import faiss
    import numpy

    print(
        "command: python "
        + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *sys.argv[1:]])
    )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    print(
        f"# search benchmark: {os.cpu_count()} cores, {cpu}, "
        f"{mem:.0f} GiB RAM, python {platform.python_version()}, faiss {faiss.__version__}, "
        f"numpy {numpy.__version__}. Load average at start: {os.getloadavg()[0]:.2f}."
    )
    print(
        "Targets (issue): p50 <= 5 ms and p99 <= 20 ms per query, recall@10 >= 0.95 against exact "
        "search, at 100,000 and 1,000,000 stored embeddings. 'other cores busy' = the machine's "
        "CPU time during the timing loop minus this benchmark's own, per second (0 = quiet).",
        flush=True,
    )
    t0 = time.perf_counter()
    args.emb_source = ensure_embeddings()
    results: list = []
    part_real(args, results)
    part_scale(args, results)
    if not args.no_find:
        part_find(args, results)
    print(f"\n## Summary (whole run {time.perf_counter() - t0:.0f} s)")
    print("| figure | measured | target | |")
    print("|---|---|---|---|")
    for name, value, target, ok in results:
        verdict = "-" if ok is None else ("**PASS**" if ok else "**FAIL**")
        print(f"| {name} | {value} | {target} | {verdict} |")


if __name__ == "__main__":
    main()
