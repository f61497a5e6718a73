"""Review at operator scale: the Review tab over 50,000 stored images, in headless Chromium.

Issue 21's targets: first paint of the Review tab <= 1.0 s; a page change or a filter change
<= 300 ms p95; a bulk relabel of 500 images <= 2 s; the embedding map's first draw <= 3 s
after its projection is cached; the server within +300 MB of its idle RSS while browsing all
pages.

Set-up (cached): bench_history's store of ``--rows`` rows (its v1, trained on ELPV's mono
cells, scored all 2,624 ELPV images; the other rows are real rows' features moved by noise).
Copied for each run; each synthetic row gets a real ELPV image as its source and a content
digest of its own, so every one of the rows has its own thumbnail to make, as distinct photos
would, and the thumbnail cache starts empty. v1's training folder is copied too (relabels
write into it).

``imagesieve serve`` runs in a process of its own (its RSS is read from /proc); Debian's
chromium, driven by Playwright, opens the app. Timed, from the user's action until the grid
shows the new page with every thumbnail decoded by the browser:

* first paint: opening the Review tab (cold: thumbnails made; warm: reopened in a new page);
* page change: pressing J (next page), ``--pages`` times, pages never seen before;
* filter change: toggling the label filter between UNKNOWN and every label;
* bulk relabel: ``POST /api/v1/images/relabel`` with 500 ids (the call behind the grid's
  relabel), then its undo;
* embedding map: made through ``POST /api/v1/map`` (in the background) and polled; then its
  first draw (opening the map panel until the canvas holds every point) and a box selection
  opening in the grid;
* memory: the server's RSS idle after start, and the most it held (VmRSS after each page)
  while browsing every page; the map's making peak (VmHWM) is reported apart.

Usage: python bench/bench_review.py [--rows 50000] [--pages 0 (all)] [--filters 10]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
OUT = HERE / "_out" / "review"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from _memory import peak_mb, status_mb  # noqa: E402

CHROMIUM = os.environ.get("IMAGESIEVE_CHROMIUM", "/usr/bin/chromium")


def prepare(rows: int) -> Path:
    """A fresh copy of the cached store with real sources and own digests; its workspace root."""
    from bench_history import build

    from imagesieve.data._elpv import elpv_images
    from imagesieve.store import Store

    src = build(rows) / "ws"
    work = OUT / "ws"
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    shutil.copytree(src, work, ignore=shutil.ignore_patterns(".cache"))
    data = OUT / "data"
    meta_path = work / "models" / "v1" / "meta.json"
    meta = json.loads(meta_path.read_text())
    shutil.copytree(meta["data"]["root"], data)
    meta["data"]["root"] = str(data)
    meta_path.write_text(json.dumps(meta, indent=2))
    (work / "models" / "ACTIVE").write_text("v1\n")
    paths = [str(im.path) for im in elpv_images()]
    from imagesieve._workspace import Workspace

    with Store(Workspace(work), check=False) as store:
        con = store._db
        con.create_function(
            "fake_digest",
            lambda i: hashlib.sha256(f"bench-review-{i}".encode()).hexdigest(),
            ["BIGINT"],
            "VARCHAR",
        )
        con.execute(
            "UPDATE predictions SET source = list_extract(?::VARCHAR[], (id % ?)::INTEGER + 1), "
            "sha256 = fake_digest(id) WHERE sha256 LIKE 'synthetic-%'",
            [paths, len(paths)],
        )
    return work


def wait_page(page, number: int) -> None:
    """Until the summary names page ``number`` and every grid thumbnail is decoded."""
    page.wait_for_function(
        """n => {
            const s = document.querySelector('#review-summary')?.innerText || '';
            if (!s.includes(`(page ${n} of`)) return false;
            const imgs = [...document.querySelectorAll('#review-grid img')];
            return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""",
        arg=number,
        timeout=120_000,
    )


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.95 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--pages", type=int, default=0, help="page changes timed (0: every page)")
    ap.add_argument("--filters", type=int, default=10, help="filter changes timed")
    args = ap.parse_args()
    t_start = time.perf_counter()
    print(
        f"# bench_review: {platform.machine()}, python {platform.python_version()}; "
        f"command: python bench/bench_review.py {' '.join(sys.argv[1:])}".rstrip(),
        flush=True,
    )
    ws = prepare(args.rows)
    from cliserver import start_cli_server
    from playwright.sync_api import sync_playwright

    proc, url = start_cli_server(
        ["serve", "--workspace", str(ws), "--host", "127.0.0.1", "--port", "0"], OUT / "serve.log"
    )
    results: dict[str, object] = {}
    try:
        api = url + "/api/v1"
        requests.get(f"{api}/health", timeout=60).raise_for_status()
        time.sleep(2)
        idle = status_mb("VmRSS", proc.pid)
        t = time.perf_counter()
        requests.post(f"{api}/map", timeout=60).raise_for_status()
        while requests.get(f"{api}/map", timeout=60).json()["making"].get("running"):
            time.sleep(1)
        map_made = time.perf_counter() - t
        map_peak = peak_mb(proc.pid)
        print(f"  map of {args.rows:,} made in {map_made:.0f} s (server peak {map_peak:.0f} MB)")
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--headless", "--disable-gpu"]
            )
            first = []
            for _ in ("cold", "warm"):
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                page = context.new_page()
                page.goto(url)
                page.wait_for_function(
                    "document.querySelector('#app-header')?.innerText.includes('stored images')",
                    timeout=120_000,
                )
                t = time.perf_counter()
                page.get_by_role("tab", name="Review", exact=True).click()
                wait_page(page, 1)
                first.append(time.perf_counter() - t)
                if len(first) == 1:
                    context.close()
            summary = page.inner_text("#review-summary")
            total_pages = int(summary.rsplit(" of ", 1)[1].split(")")[0].replace(",", ""))
            todo = total_pages - 1 if args.pages <= 0 else min(args.pages, total_pages - 1)
            page.click("#review-summary")
            before_browsing = status_mb("VmRSS", proc.pid)
            most = before_browsing
            changes = []
            for n in range(2, todo + 2):
                t = time.perf_counter()
                page.keyboard.press("j")
                wait_page(page, n)
                changes.append(time.perf_counter() - t)
                most = max(most, status_mb("VmRSS", proc.pid))
                if n % 100 == 0:
                    print(
                        f"  page {n}: median so far {statistics.median(changes) * 1000:.0f} ms, "
                        f"server RSS {status_mb('VmRSS', proc.pid):.0f} MB",
                        flush=True,
                    )
            browsed_peak = most
            page.click("#review-map-panel .label-wrap")
            t = time.perf_counter()
            page.wait_for_function(
                "document.querySelector('#review-map canvas')?.dataset.drawn > 0", timeout=120_000
            )
            map_draw = time.perf_counter() - t
            canvas = page.locator("#review-map canvas")
            canvas.scroll_into_view_if_needed()
            box = canvas.bounding_box()
            t = time.perf_counter()
            page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5, steps=4)
            page.mouse.up()
            page.wait_for_function(
                "(document.querySelector('#review-summary')?.innerText || '')"
                ".includes('selected on the map') && [...document.querySelectorAll('#review-grid img')]"
                ".every(im => im.complete)",
                timeout=120_000,
            )
            map_pick = time.perf_counter() - t
            picked = page.inner_text("#review-summary")
            page.click("#review-map-clear")
            page.wait_for_function(
                "!(document.querySelector('#review-summary')?.innerText || '').includes('selected')"
            )
            filters = []
            for i in range(args.filters):
                page.click("#review-label input")
                t = time.perf_counter()
                if i % 2 == 0:
                    page.keyboard.type("UNKNOWN")
                    page.keyboard.press("Enter")
                else:
                    page.click("#review-label button.token-remove, #review-label .token-remove")
                page.wait_for_function(
                    "i => (document.querySelector('#review-summary')?.innerText || '')"
                    ".includes('page 1 of') && [...document.querySelectorAll('#review-grid img')]"
                    ".every(im => im.complete)",
                    arg=i,
                    timeout=120_000,
                )
                page.keyboard.press("Escape")
                filters.append(time.perf_counter() - t)
            browser.close()
        ids = [
            r[0]
            for r in requests.post(
                f"{api}/sql",
                json={"sql": "SELECT id FROM predictions ORDER BY id DESC LIMIT 500", "limit": 500},
                timeout=60,
            ).json()["rows"]
        ]
        t = time.perf_counter()
        r = requests.post(
            f"{api}/images/relabel", json={"ids": ids, "label": "brand_x"}, timeout=120
        )
        relabel = time.perf_counter() - t
        r.raise_for_status()
        copied = r.json()["copied"]
        t = time.perf_counter()
        requests.post(f"{api}/audit/undo", json={}, timeout=120).raise_for_status()
        undo = time.perf_counter() - t
        results = {
            "first_cold": first[0],
            "first_warm": first[1],
            "changes": changes,
            "filters": filters,
            "relabel": relabel,
            "copied": copied,
            "undo": undo,
            "idle": idle,
            "peak": browsed_peak,
            "before_browsing": before_browsing,
            "pages": total_pages,
            "map_made": map_made,
            "map_peak": map_peak,
            "map_draw": map_draw,
            "map_pick": map_pick,
            "picked": picked,
        }
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    ch, fi = results["changes"], results["filters"]
    print(f"\n## {args.rows:,} stored images, {results['pages']:,} pages of 48\n")
    print("| measure | figure | target | |")
    print("|---|---|---|---|")
    rows = [
        ("first paint of the Review tab, cold thumbnails (s)", results["first_cold"], 1.0),
        ("first paint of the Review tab, reopened (s)", results["first_warm"], 1.0),
        (f"page change (J), p95 of {len(ch)} new pages (ms)", p95(ch) * 1000, 300),
        (f"filter change, p95 of {len(fi)} (ms)", p95(fi) * 1000, 300),
        ("bulk relabel of 500 images (s)", results["relabel"], 2.0),
        ("embedding map's first draw, projection cached (s)", results["map_draw"], 3.0),
    ]
    for name, value, target in rows:
        print(
            f"| {name} | {value:.3g} | <= {target:g} | {'met' if value <= target else 'MISSED'} |"
        )
    grown = results["peak"] - results["idle"]
    print(
        f"| server RSS: idle {results['idle']:.0f} MB, most while browsing "
        f"{results['peak']:.0f} MB (+MB) | {grown:.0f} | <= 300 | {'met' if grown <= 300 else 'MISSED'} |"
    )
    print(
        f"\nserver RSS just before browsing (after the map was made): {results['before_browsing']:.0f} MB"
    )
    print(
        f"\npage change median {statistics.median(ch) * 1000:.0f} ms (min {min(ch) * 1000:.0f}, "
        f"max {max(ch) * 1000:.0f}); filter change median {statistics.median(fi) * 1000:.0f} ms; "
        f"relabel copied {results['copied']} files; its undo {results['undo']:.2f} s"
    )
    print(
        f"map: made in the background in {results['map_made']:.0f} s (server peak then "
        f"{results['map_peak']:.0f} MB); a box selection opened in the grid in "
        f"{results['map_pick'] * 1000:.0f} ms ({results['picked'].split(' · ')[0]})"
    )
    print(f"# whole run {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
