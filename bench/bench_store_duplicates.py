"""Near-duplicates among stored images: what linking rows as they arrive costs the store.

Synthetic 1280-d unit vectors (``bench_duplicates``' clustered ones, with 1% planted copies
at up to the rule's reach and matching pixel signatures) are committed to a real store
in batches (``Store.commit``, as scoring does); its FAISS index is
saved (an HNSW graph past 5,000 rows) and the store reopened. Then ``NearDuplicates.catch_up``
links them with a realistic rule, timed twice:

* the backlog: every row at once (a store upgraded from a release without near-duplicates);
* one more batch of BATCH rows: the work added to each scoring batch, per row, beside what
  scoring costs per image on this machine (``bench/RESULTS.md``: 100-200 images/s).

Recall of the planted pairs and the peak memory are printed. Run alone:
``python bench/bench_store_duplicates.py [--rows 100000]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from imagesieve._workspace import Workspace
from imagesieve.classifier import DuplicateRule, Prediction
from imagesieve.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from _memory import peak_mb  # noqa: E402
from bench_duplicates import synthetic, synthetic_signatures  # noqa: E402

ROUNDS = 3
#: Rows per committed batch, and the size of the one timed incremental batch.
BATCH = 1000
D = 1280
RULE = DuplicateRule(0.03, 0.25, 0.99)  # about the median of bench_duplicates' realistic rules


def predictions(x: np.ndarray, sig: np.ndarray, start: int, stop: int) -> list[Prediction]:
    """Rows ``start:stop`` of the synthetic set as predictions (content named by row)."""
    return [
        Prediction(
            f"img-{i}.png", "a", None, [("a", 0.9)], x[i], 224, 224, f"{i:064x}", signature=sig[i]
        )
        for i in range(start, stop)
    ]


def commit(store: Store, preds: list[Prediction]) -> list[int]:
    batch = store.begin_batch("v1", ["bench"], {})
    ids = store.commit(batch, "v1", preds)
    store.finish_batch(batch, "done", {})
    return ids.tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    n = args.rows + BATCH
    x, a, b = synthetic(n, RULE.reach)  # clustered, 1% planted copies up to the rule's reach
    sig = synthetic_signatures(n, a, b)
    root = Path(tempfile.mkdtemp(prefix="bench-store-dups-"))
    ws = Workspace(root / "ws")
    t = time.perf_counter()
    id_of = np.zeros(n, np.int64)
    with Store(ws) as store:
        for s in range(0, args.rows, BATCH):
            stop = min(s + BATCH, args.rows)
            id_of[s:stop] = commit(store, predictions(x, sig, s, stop))
    fill = time.perf_counter() - t
    with Store(ws) as store:
        kind = store.indexes.get("v1").kind
        t = time.perf_counter()
        backlog = store.duplicates.catch_up("v1", RULE)
        first = time.perf_counter() - t
        id_of[args.rows :] = commit(store, predictions(x, sig, args.rows, n))
        last = int(id_of[args.rows - 1])
        times = []
        for _ in range(ROUNDS):  # the same batch linked again: a median, these VMs drift
            store._db.execute("UPDATE predictions SET duplicate_group = NULL WHERE id > ?", [last])
            store._db.execute("UPDATE duplicate_checks SET checked_upto = ?", [last])
            t = time.perf_counter()
            more = store.duplicates.catch_up("v1", RULE)
            times.append(time.perf_counter() - t)
        step = statistics.median(times)
        tuned_ef = store.indexes.get("v1").info.get("ef_search")
        group = dict(
            store._db.execute(
                "SELECT id, duplicate_group FROM predictions WHERE duplicate_group IS NOT NULL"
            ).fetchall()
        )
    planted = list(zip(id_of[a].tolist(), id_of[b].tolist(), strict=True))
    found = sum(1 for a, b in planted if group.get(a) is not None and group.get(a) == group.get(b))
    grouped = len(group)
    print(f"# bench_store_duplicates.py --rows {args.rows}; python {sys.version.split()[0]}")
    print(
        "| stored rows | index | fill s | backlog: rows, s, rows/s | one batch of "
        f"{more:,}: ms/row (median of {ROUNDS}; efSearch {tuned_ef}) "
        f"| planted pairs found | rows grouped (planted: {2 * len(planted)}) | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {args.rows:,} | {kind} | {fill:.1f} | {backlog:,}, {first:.1f}, {backlog / first:,.0f} "
        f"| {1000 * step / more:.2f} "
        f"| {found}/{len(planted)} | {grouped:,} | {peak_mb() / 1024:.2f} GB |"
    )


if __name__ == "__main__":
    main()
