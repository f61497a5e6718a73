"""A store of synthetic embeddings written straight into DuckDB, and its index rebuilt in a
process of its own with the memory it took (bench_rebuild.py and test_store_units.py).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import numpy as np

D = 1280
CHUNK = 20_000


def fill(root: Path, n: int) -> float:
    """Create the store and write ``n`` rows of one version into it with DuckDB; seconds."""
    import duckdb
    import pyarrow as pa

    from imagesieve._workspace import Workspace
    from imagesieve.store import Store
    from imagesieve.store._schema import EMBEDDINGS_TABLE, add_embedding_table

    ws = Workspace(root)
    Store(ws, check=False).close()  # the schema, migrated
    t = time.perf_counter()
    con = duckdb.connect(str(root / "store.duckdb"))
    add_embedding_table(con, D)
    con.execute(
        "INSERT INTO batches (batch_id, started_at, status, model_version) "
        "VALUES (1, now(), 'done', 'v1')"
    )
    rng = np.random.default_rng(0)
    # clustered like embeddings (as bench_duplicates' synthetic set): centres plus a decaying
    # spectrum of noise; uniform random vectors are a far harder (slower) case for HNSW
    centres = rng.standard_normal((max(10, n // 1000), D), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spectrum = (np.arange(1, D + 1, dtype=np.float32) ** -0.5)[rng.permutation(D)]
    spectrum *= 0.6 / np.linalg.norm(spectrum)
    stamp = dt.datetime.now(dt.UTC)
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        x = centres[rng.integers(0, len(centres), m)]
        x += rng.standard_normal((m, D), dtype=np.float32) * spectrum
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = np.arange(s + 1, s + m + 1, dtype=np.int64)
        rows = pa.table(
            {
                "id": ids,
                "source": [f"img-{i}.png" for i in ids],
                "sha256": [f"{i:064x}" for i in ids],
                "model_version": ["v1"] * m,
                "scored_at": pa.array([stamp] * m, pa.timestamp("us", tz="UTC")),
                "batch_id": pa.array([1] * m, pa.int32()),
                "label": ["a"] * m,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D),
            }
        )
        con.register("_rows", rows)
        con.execute(
            "INSERT INTO predictions (id, source, sha256, model_version, scored_at, batch_id, "
            "label) SELECT id, source, sha256, model_version, scored_at, batch_id, label "
            "FROM _rows"
        )
        con.execute(f"INSERT INTO {EMBEDDINGS_TABLE.format(dim=D)} SELECT id, embedding FROM _rows")
        con.unregister("_rows")
    con.execute("CHECKPOINT")
    con.close()
    # The first open after this raw write peaked at 9.4 GB (measured: it is not the rebuild's);
    # it happens here, so the rebuild's process measures an ordinary open and the rebuild.
    Store(ws, check=False).close()
    return time.perf_counter() - t


def current_rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory now (``VmRSS``) or at its peak (``VmHWM``), in MB.

    Not ``ru_maxrss``: Linux carries a parent's high-water mark across fork and exec into it
    (the filling parent's 9.7 GB showed up as this process's peak on opening the store).
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rebuild_measured(root: Path) -> None:
    """In a fresh process: open the store, rebuild the index, print what it took (JSON)."""
    import faiss  # noqa: F401 - imported before the baseline is read, as a running store has
    import pyarrow  # noqa: F401

    from imagesieve._workspace import Workspace
    from imagesieve.store import Store

    with Store(Workspace(root), check=False) as store:
        base = current_rss_mb()
        opened = current_rss_mb("VmHWM")
        t = time.perf_counter()
        check = store.indexes.rebuild("v1")
        seconds = time.perf_counter() - t
    size = (root / "index" / "v1.faiss").stat().st_size
    peak = current_rss_mb("VmHWM")
    print(
        json.dumps(
            {
                "rows": check.rows,
                "kind": check.details.get("kind"),
                "seconds": round(seconds, 1),
                "index_mb": round(size / 2**20),
                "before_mb": round(base),
                "peak_mb": round(peak),
                "open_peak_mb": round(opened),
                "ef_search": check.details.get("ef_search"),
            }
        )
    )
