"""Rebuilding a version's FAISS index from DuckDB: peak memory against the index's size.

A store of ``--rows`` synthetic 1280-d unit vectors is written straight into DuckDB (the
store's own tables, created by ``Store``; no index), then a fresh process opens it and calls
``IndexSet.rebuild`` (what ``imagesieve reindex --rebuild`` and a damaged index do): the rows
stream from DuckDB into the index in chunks. Its peak RSS (``VmHWM`` of that process, whose
baseline is the imports and an open store) is compared with the saved index's size: target
<= 1.5x. Run alone: ``python bench/bench_rebuild.py [--rows 1000000]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthstore import fill, rebuild_measured  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--reuse", metavar="ROOT", help="a store an earlier run filled: no fill")
    ap.add_argument("--rebuild", metavar="ROOT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rebuild:
        rebuild_measured(Path(args.rebuild))
        return
    if args.reuse:
        root, fill_s = Path(args.reuse), float("nan")
    else:
        root = Path(tempfile.mkdtemp(prefix="bench-rebuild-")) / "ws"
        fill_s = fill(root, args.rows)
    out = subprocess.run(
        [sys.executable, __file__, "--rebuild", str(root)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    db_mb = (root / "store.duckdb").stat().st_size / 2**20
    ratio = r["peak_mb"] / r["index_mb"]
    print(f"# bench_rebuild.py {' '.join(sys.argv[1:])}; python {sys.version.split()[0]}")
    print(
        "| rows | DuckDB file | fill s | index | rebuild s | index file | RSS before "
        "| peak RSS | peak / index | met (<= 1.5x) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {r['rows']:,} | {db_mb:,.0f} MB | {fill_s:.0f} | {r['kind']} (efSearch "
        f"{r['ef_search']}) | {r['seconds']} | {r['index_mb']:,} MB | {r['before_mb']:,} MB "
        f"| {r['peak_mb']:,} MB (opening: {r['open_peak_mb']:,} MB) | {ratio:.2f}x (above the open store: "
        f"{(r['peak_mb'] - r['before_mb']) / r['index_mb']:.2f}x) "
        f"| {'yes' if ratio <= 1.5 else '**no**'} |"
    )


if __name__ == "__main__":
    main()
