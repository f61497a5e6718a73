"""The store end to end: real DuckDB file, real FAISS index, real images, a real HTTP server."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import signal
import subprocess
import sys
import textwrap
import threading
import zipfile
from dataclasses import replace
from pathlib import Path

import duckdb
import numpy as np
import openpyxl
import pytest
from httpserver import ImageServer
from PIL import Image

from imagesieve._workspace import Workspace
from imagesieve.classifier import Prediction
from imagesieve.classifier._openset import HeldOut, calibrate_rule
from imagesieve.classifier._reference import ReferenceSet
from imagesieve.cli import main
from imagesieve.data import sort_into
from imagesieve.ingest import ScoreOptions, score_inputs
from imagesieve.store import Store, VectorIndex, _vectors
from imagesieve.store._images import image_source
from imagesieve.store._sql import open_readonly


def query(ws, sql: str, params=()) -> list[tuple]:
    """Read the store in a separate read-only connection (the store is closed between runs)."""
    con = duckdb.connect(str(ws.root / "store.duckdb"), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def assert_index_matches_db(ws, version: str = "v1") -> None:
    """FAISS holds exactly DuckDB's ids for the version, and the same vectors (IVF: 8-bit codes)."""
    ids = sorted(
        r[0] for r in query(ws, "SELECT id FROM predictions WHERE model_version = ?", [version])
    )
    index = VectorIndex.load(ws.root / "index" / f"{version}.faiss")
    assert sorted(index.ids().tolist()) == ids
    some = ids[len(ids) // 2]
    stored = np.array(query(ws, "SELECT embedding FROM embeddings WHERE id = ?", [some])[0][0])
    atol = 1e-2 if index.kind == "ivfpq" else 1e-6
    assert np.allclose(index.index.reconstruct(some), stored, atol=atol)


def png_bytes(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def cells(small_folder) -> list[Path]:
    """Ten real functional ELPV cells."""
    return sorted((small_folder / "functional").glob("cell*.png"))[:10]


def test_score__exactly_once_then_rescore_in_place(scoring_ws, cells):
    ws = scoring_ws
    first = score_inputs(ws, [str(p) for p in cells])
    assert (first.items, first.scored, first.already_scored) == (10, 10, 0)
    rows = query(
        ws, "SELECT id, source, label, batch_id, model_version FROM predictions ORDER BY id"
    )
    assert [r[0] for r in rows] == list(range(1, 11))
    assert {r[1] for r in rows} == {str(p) for p in cells}
    assert {r[3] for r in rows} == {first.batch_id} and {r[4] for r in rows} == {"v1"}
    assert query(ws, "SELECT count(*) FROM embeddings") == [(10,)]
    assert_index_matches_db(ws)

    again = score_inputs(ws, [str(p) for p in cells])
    assert (again.scored, again.already_scored) == (0, 10)
    assert again.labels == first.labels  # outputs come from the stored rows
    assert query(ws, "SELECT count(*) FROM predictions") == [(10,)]

    # same content under another name: recognised by SHA-256, not stored twice
    copy = cells[0].parent.parent / "copy-of-first.png"
    copy.write_bytes(cells[0].read_bytes())
    try:
        dup = score_inputs(ws, [str(copy)])
    finally:
        copy.unlink()
    assert (dup.scored, dup.already_scored) == (0, 1)

    re = score_inputs(ws, [str(p) for p in cells[:4]], ScoreOptions(rescore=True, threshold=0.99))
    assert (re.scored, re.rescored) == (0, 4)
    after = query(ws, "SELECT id, batch_id, label, reason FROM predictions ORDER BY id")
    assert [r[0] for r in after] == list(range(1, 11))  # ids kept
    assert [r[1] for r in after[:4]] == [re.batch_id] * 4
    batches = query(
        ws, "SELECT batch_id, status, n_items, n_scored, n_skipped FROM batches ORDER BY 1"
    )
    assert batches == [
        (1, "done", 10, 10, 0),
        (2, "done", 10, 0, 10),
        (3, "done", 1, 0, 1),
        (4, "done", 4, 4, 0),
    ]
    assert_index_matches_db(ws)


def test_score__failures_are_stored_and_retried(scoring_ws, cells, tmp_path):
    ws = scoring_ws
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for p in cells[:3]:
        (folder / "sub" / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    data = cells[3].read_bytes()
    (folder / "half.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    summary = score_inputs(ws, [str(folder)])
    assert summary.scored == 3
    kinds = {Path(f.source).name: f.kind for f in summary.failures}
    assert kinds == {"broken.png": "not_image", "half.png": "truncated", "empty.jpg": "empty"}
    stored = query(ws, "SELECT source, kind, message, resolved FROM failures ORDER BY source")
    assert [(Path(s).name, k, r) for s, k, _, r in stored] == [
        ("broken.png", "not_image", False),
        ("empty.jpg", "empty", False),
        ("half.png", "truncated", False),
        ("notes.txt", "ignored", False),
    ]
    assert all(m and "\n" not in m for _, _, m, _ in stored)

    # fix one file, then retry what failed: it is scored, the others fail again
    (folder / "half.png").write_bytes(data)
    retry = score_inputs(ws, [], ScoreOptions(retry_failed=True))
    assert retry.items == 3 and retry.scored == 1
    assert sorted(Path(f.source).name for f in retry.failures) == ["broken.png", "empty.jpg"]
    unresolved = query(ws, "SELECT source FROM failures WHERE NOT resolved AND kind <> 'ignored'")
    assert sorted(Path(s).name for (s,) in unresolved) == ["broken.png", "empty.jpg"]
    assert query(ws, "SELECT count(*) FROM predictions") == [(4,)]


def test_score__url_list_csv_with_failures_per_row(scoring_ws, cells, tmp_path):
    ws = scoring_ws
    files = {p.name: p.read_bytes() for p in cells[:4]}
    with ImageServer(files) as srv:
        urls = [srv.url(n) for n in files] + [
            f"{srv.base}/status/404",
            f"{srv.base}/html",
            f"{srv.base}/redirect/{cells[0].name}",  # same content as the first: stored once
            "ftp://example.com/x.png",
        ]
        sheet = tmp_path / "meters.csv"
        with sheet.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "photo"])
            w.writerows([i, u] for i, u in enumerate(urls))
        out = tmp_path / "report.csv"
        code = main(
            [
                "score",
                str(sheet),
                "--column",
                "Photo",
                "--workspace",
                str(ws.root),
                "--csv",
                str(out),
                "--json",
            ]
        )
    assert code == 3  # some rows failed
    stored = [s for (s,) in query(ws, "SELECT source FROM predictions")]
    # Downloads finish in any order: the content behind urls[0] and the redirect to it is
    # stored once, under whichever arrived first.
    assert len(stored) == 4 and set(urls[1:4]) <= set(stored)
    assert len(set(stored) & {urls[0], urls[6]}) == 1
    kinds = dict(query(ws, "SELECT source, kind FROM failures"))
    assert kinds == {urls[4]: "http_error", urls[5]: "not_image", urls[7]: "bad_url"}
    report = list(csv.DictReader(out.open()))
    assert len(report) == len(urls)
    assert [r["source"] for r in report] == urls  # in the list's order
    assert [r["id (input)"] for r in report] == [str(i) for i in range(len(urls))]
    redirected = next(r for r in report if r["source"] == urls[6])
    first = next(r for r in report if r["source"] == urls[0])
    assert redirected["label"] == first["label"] and redirected["top1_prob"] == first["top1_prob"]


def test_cli__list_without_the_column_is_one_line_listing_columns(scoring_ws, tmp_path):
    book = openpyxl.Workbook()
    book.active.append(["meter", "link", "note"])
    book.active.append(["A1", "http://127.0.0.1:9/x.png", ""])
    book.save(tmp_path / "meters.xlsx")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "imagesieve.cli",
            "score",
            str(tmp_path / "meters.xlsx"),
            "--workspace",
            str(scoring_ws.root),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "columns: meter, link, note" in r.stderr
    assert not (scoring_ws.root / "store.duckdb").exists()  # nothing stored for a bad input


def test_score__zip_with_nested_folders_sorted_into_label_folders(scoring_ws, cells, tmp_path):
    ws = scoring_ws
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("day1/meter.png", cells[0].read_bytes())
        zf.writestr("day2/meter.png", cells[1].read_bytes())  # same name, other content
        zf.writestr("day2/deep/x.png", cells[2].read_bytes())
        zf.writestr("day2/readme.txt", "notes")
    out = tmp_path / "sorted"
    summary = score_inputs(ws, [str(archive)], ScoreOptions(sort_into=str(out), keep_images="all"))
    assert summary.scored == 3
    # every image kept in the workspace by content, so it outlives the archive
    for sha, source in query(ws, "SELECT sha256, source FROM predictions"):
        assert image_source(ws, sha, source) == str(ws.images_dir / sha[:2] / sha)
        assert hashlib.sha256((ws.images_dir / sha[:2] / sha).read_bytes()).hexdigest() == sha
    assert summary.ignored == [(f"{archive}:day2/readme.txt", "not an image file extension (.txt)")]
    names = sorted(query(ws, "SELECT source FROM predictions"))
    assert [n for (n,) in names] == [
        f"{archive}:day1/meter.png",
        f"{archive}:day2/deep/x.png",
        f"{archive}:day2/meter.png",
    ]
    copied = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    labels = {p.split("/")[0] for p in copied}
    assert labels <= {"functional", "defective", "lonely", "UNKNOWN"}
    assert sorted(p.split("/")[1] for p in copied) == ["meter.png", "meter_1.png", "x.png"]
    # the copies are the originals, byte for byte
    assert sorted(p.read_bytes() for p in out.rglob("*.png")) == sorted(
        c.read_bytes() for c in cells[:3]
    )

    score_inputs(ws, [str(archive)], ScoreOptions(sort_into=str(out)))  # re-run: no duplicates
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == copied


def test_sort_into__never_overwrites_and_never_escapes(tmp_path):
    a, b = png_bytes(1), png_bytes(2)
    sha = lambda d: hashlib.sha256(d).hexdigest()  # noqa: E731
    first = sort_into(tmp_path, "ok", "x.png", a, sha(a))
    second = sort_into(tmp_path, "ok", "x.png", b, sha(b))
    third = sort_into(tmp_path, "ok", "x.png", a, sha(a))
    assert (first.name, second.name, third) == ("x.png", "x_1.png", first)
    assert first.read_bytes() == a and second.read_bytes() == b
    src = tmp_path / "src.png"
    src.write_bytes(b)
    assert sort_into(tmp_path, "ok", "x.png", str(src), sha(b)) == second
    odd = sort_into(tmp_path, "../../etc", "../passwd", a, sha(a))
    assert odd.resolve().is_relative_to(tmp_path.resolve())


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from imagesieve._workspace import Workspace
    from imagesieve.ingest import ScoreOptions, score_inputs

    def progress(stage, done, total):
        if done >= int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the batch

    score_inputs(Workspace(sys.argv[1]), sys.argv[3:], ScoreOptions(commit_rows=16, commit_seconds=60), progress)
    """
)


def test_score__kill_9_mid_batch_then_rerun_completes_exactly_once(scoring_ws, elpv, tmp_path):
    ws = scoring_ws
    paths = [str(im.path) for im in elpv[:160]]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(ws.root), "100", *paths],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    committed = query(ws, "SELECT count(*) FROM predictions")[0][0]
    assert 0 < committed < 160  # some chunks landed, the rest did not
    # the counters landed with each chunk: a dead batch still says what it stored
    assert query(ws, "SELECT status, n_items, n_scored FROM batches") == [
        ("running", committed, committed)
    ]

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "imagesieve.cli",
            "score",
            *paths,
            "--workspace",
            str(ws.root),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["already_scored"] == committed and doc["scored"] == 160 - committed
    assert query(
        ws, "SELECT count(*), count(DISTINCT sha256), count(DISTINCT id), max(id) FROM predictions"
    ) == [(160, 160, 160, 160)]
    assert query(ws, "SELECT count(*) FROM embeddings") == [(160,)]
    assert query(ws, "SELECT batch_id, status FROM batches ORDER BY 1") == [
        (1, "interrupted"),
        (2, "done"),
    ]
    # the FAISS index saved before the kill (none) was caught up from DuckDB on open
    assert doc["index"][0]["model_version"] == "v1"
    assert_index_matches_db(ws)


def test_store__index_checked_on_open_caught_up_repaired_or_rebuilt(scoring_ws, cells):
    ws = scoring_ws
    score_inputs(ws, [str(p) for p in cells])
    path = ws.root / "index" / "v1.faiss"
    with Store(ws) as store:
        assert [(c.action, c.rows) for c in store.indexes.checks] == [("in_sync", 10)]

    index = VectorIndex.load(path)
    index.remove(np.array([9, 10]))  # the index is behind DuckDB, as after a crash
    index.save()
    with Store(ws) as store:
        (check,) = store.indexes.checks
        assert (check.action, check.added, check.removed) == ("caught_up", 2, 0)
    assert_index_matches_db(ws)

    index = VectorIndex.load(path)
    index.add(np.array([999]), np.ones((1, index.dim), np.float32) / np.sqrt(index.dim))
    index.save()
    with Store(ws) as store:
        assert (store.indexes.checks[0].action, store.indexes.checks[0].removed) == ("repaired", 1)
    assert_index_matches_db(ws)

    path.unlink()
    assert main(["reindex", "--workspace", str(ws.root)]) == 0
    assert_index_matches_db(ws)
    path.write_bytes(b"garbage")
    with Store(ws) as store:
        assert store.indexes.checks[0].action == "rebuilt"
    assert_index_matches_db(ws)


def test_store__busy_workspace_is_a_one_line_error(scoring_ws, cells):
    ws = scoring_ws
    score_inputs(ws, [str(cells[0])])
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from imagesieve._workspace import Workspace; from imagesieve.store import Store; "
            "s = Store(Workspace(sys.argv[1])); print('open', flush=True); time.sleep(60)",
            str(ws.root),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "imagesieve.cli",
                "score",
                str(cells[1]),
                "--workspace",
                str(ws.root),
            ],
            capture_output=True,
            text=True,
        )
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2
    assert "is in use by another imagesieve process" in r.stderr and r.stderr.count("\n") == 1


def test_calibrate_rule__hits_the_target_false_unknown_rate():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 64))

    def sample(n):
        x = centres[rng.integers(0, 5, n)] + 0.3 * rng.normal(size=(n, 64))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    def top1(n):  # about 1% of known images under a 0.5 confidence threshold
        return np.where(rng.random(n) < 0.01, rng.uniform(0.3, 0.5, n), rng.uniform(0.5, 1.0, n))

    ref = ReferenceSet(sample(2000), [f"t{i}" for i in range(2000)], ["c"] * 2000)
    held = HeldOut(top1(400), ref.nearest(sample(400))[1][:, 0], np.zeros(400, int), "val")
    rule, info = calibrate_rule(held, 0.5, 0.05)
    assert (info["on"], info["n"], info["false_unknown_rate"]) == ("val", 400, 0.05)
    assert rule.confidence == 0.5 and rule.mix == 0.0 and "confidence_requested" not in info
    assert info["realised"]["unknown"] == 0.05  # the whole decision: 20 of 400 held-out images
    fresh = rule.reasons(top1(4000), ref.nearest(sample(4000))[1][:, 0])
    assert 0.03 <= np.mean([r is not None for r in fresh]) <= 0.08
    far = rng.normal(size=(200, 64))
    far = (far / np.linalg.norm(far, axis=1, keepdims=True)).astype(np.float32)
    assert (ref.nearest(far)[1][:, 0] > rule.distance).mean() > 0.99
    # the training images' leave-one-out distances stand in for held-out images
    loo = HeldOut(top1(2000), ref.leave_one_out(), np.zeros(2000, int), "train")
    loo_rule, loo_info = calibrate_rule(loo, 0.5, 0.05)
    assert loo_info["n"] == 2000 and loo_info["realised"]["unknown"] == 0.05
    assert abs(loo_rule.distance - rule.distance) < 0.05


def embedded(rng, start: int, n: int, dim: int = 1280) -> list[Prediction]:
    """n stored-looking predictions with distinct content and unit embeddings."""
    x = rng.random((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [
        Prediction(
            f"img{start + i}.png",
            "a",
            None,
            [("a", 0.9), ("b", 0.1)],
            x[i],
            8,
            8,
            hashlib.sha256(str(start + i).encode()).hexdigest(),
        )
        for i in range(n)
    ]


def committing_while(store, batch, rng, n: int, dim: int, job) -> tuple[list, int]:
    """Run ``job`` on a thread while this one commits 8 rows and searches, as a server's writer
    does; returns [job's result] and the rows stored by then (``n`` at the start)."""
    done: list = []
    worker = threading.Thread(target=lambda: done.append(job()))
    worker.start()
    while worker.is_alive():
        store.commit(batch, "v1", embedded(rng, n, 8, dim))
        n += 8
        store.indexes.get("v1").search(rng.random((1, dim), dtype=np.float32), 5)
    worker.join()
    return done, n


def test_upgrade_index__flat_turns_hnsw_while_commits_go_on(tmp_path, monkeypatch):
    monkeypatch.setattr(_vectors, "FLAT_MAX", 1500)
    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(0)
    with Store(ws) as store:
        batch = store.begin_batch("v1", ["test"], {})
        store.commit(batch, "v1", embedded(rng, 0, 1500))
        assert not store.indexes.outgrown("v1") and not store.indexes.upgrade("v1")
        store.commit(batch, "v1", embedded(rng, 1500, 500))
        assert store.indexes.outgrown("v1") and store.indexes.get("v1").kind == "flat"
        # commits and searches go on while the graph is built
        done, n = committing_while(
            store, batch, rng, 2000, 1280, lambda: store.indexes.upgrade("v1")
        )
        index = store.indexes.get("v1")
        assert done == [True] and index.kind == "hnsw" and not store.indexes.outgrown("v1")
        assert index.info["built_at"] < index.ntotal == n  # committed during the build: kept
        store.commit(batch, "v1", embedded(rng, n, 8))  # later commits go to the graph
        assert store.indexes.get("v1") is index and index.ntotal == n + 8
        store.finish_batch(batch, "done", {})
    assert_index_matches_db(ws)


def test_retune_index__doubled_hnsw_retuned_while_commits_go_on(tmp_path, monkeypatch):
    monkeypatch.setattr(_vectors, "FLAT_MAX", 300)
    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(3)
    with Store(ws) as store:
        batch = store.begin_batch("v1", ["test"], {})
        store.commit(batch, "v1", embedded(rng, 0, 400, 32))
        store.indexes.save()  # HNSW, tuned over 400
        index = store.indexes.get("v1")
        assert index.kind == "hnsw" and index.info["tuned_at"] == 400
        store.commit(batch, "v1", embedded(rng, 400, 399, 32))
        assert not store.indexes.retune_due("v1") and not store.indexes.retune("v1")
        store.commit(batch, "v1", embedded(rng, 799, 1, 32))
        assert store.indexes.retune_due("v1")
        # commits and searches go on meanwhile
        done, n = committing_while(store, batch, rng, 800, 32, lambda: store.indexes.retune("v1"))
        assert done == [True] and store.indexes.get("v1") is index
        assert index.info["tuned_at"] >= 800 and not store.indexes.retune_due("v1")
        assert index.info["ef_search"] in _vectors.EF_SEARCH_CANDIDATES
        assert index.info["recall_at_10"] >= _vectors.TARGET_RECALL
        assert index.ntotal == n
        store.finish_batch(batch, "done", {})
    assert_index_matches_db(ws)
    assert VectorIndex.load(ws.root / "index" / "v1.faiss").info == index.info


def test_store__embeddings_of_each_size_in_their_own_table_behind_one_view(tmp_path):
    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(1)
    with Store(ws) as store:  # two model versions with different embedding sizes
        for version, dim, start in (("v1", 16, 0), ("v2", 8, 100)):
            batch = store.begin_batch(version, ["test"], {})
            store.commit(batch, version, embedded(rng, start, 20, dim))
            store.finish_batch(batch, "done", {})
    types = dict(
        query(
            ws,
            "SELECT table_name, data_type FROM information_schema.columns "
            "WHERE column_name = 'embedding' AND table_name LIKE 'embeddings%' ",
        )
    )
    assert types == {
        "embeddings_16": "FLOAT[16]",
        "embeddings_8": "FLOAT[8]",
        "embeddings": "FLOAT[]",
    }
    assert query(ws, "SELECT len(embedding), count(*) FROM embeddings GROUP BY 1 ORDER BY 1") == [
        (8, 20),
        (16, 20),
    ]
    for version in ("v1", "v2"):
        (ws.root / "index" / f"{version}.faiss").unlink()  # rebuilt from each size's table
    with Store(ws) as store:
        assert {c.model_version: c.action for c in store.indexes.checks} == {
            "v1": "rebuilt",
            "v2": "rebuilt",
        }
        assert (store.indexes.get("v1").dim, store.indexes.get("v2").dim) == (16, 8)
    assert_index_matches_db(ws, "v1")
    assert_index_matches_db(ws, "v2")


def test_store__list_embeddings_of_an_older_store_move_to_their_table_on_open(tmp_path):
    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(2)
    with Store(ws) as store:
        batch = store.begin_batch("v1", ["test"], {})
        store.commit(batch, "v1", embedded(rng, 0, 30, 16))
        store.finish_batch(batch, "done", {})
    before = query(ws, "SELECT id, embedding FROM embeddings ORDER BY id")
    con = duckdb.connect(str(ws.root / "store.duckdb"))  # as the store was written before
    con.execute("CREATE TABLE old AS SELECT * FROM embeddings")
    con.execute("DROP VIEW embeddings")
    con.execute("DROP TABLE embeddings_16")
    con.execute("CREATE TABLE embeddings (id BIGINT PRIMARY KEY, embedding FLOAT[] NOT NULL)")
    con.execute("INSERT INTO embeddings SELECT * FROM old")
    con.execute("DROP TABLE old")
    # ... and a move that was interrupted after its first rows: it resumes, nothing twice
    con.execute("CREATE TABLE embeddings_16 (id BIGINT PRIMARY KEY, embedding FLOAT[16] NOT NULL)")
    con.execute("INSERT INTO embeddings_16 SELECT id, embedding FROM embeddings WHERE id <= 10")
    con.execute("DROP TABLE schema_version")  # that release recorded no migrations
    con.close()
    (ws.root / "index" / "v1.faiss").unlink()
    assert query(
        ws, "SELECT table_type FROM information_schema.tables WHERE table_name = 'embeddings'"
    ) == [("BASE TABLE",)]
    with Store(ws) as store:
        assert store.indexes.checks[0].action == "rebuilt"
        batch = store.begin_batch("v1", ["test"], {})
        store.commit(batch, "v1", embedded(rng, 30, 5, 16))
        store.finish_batch(batch, "done", {})
    assert query(
        ws, "SELECT table_type FROM information_schema.tables WHERE table_name = 'embeddings'"
    ) == [("VIEW",)]
    after = query(ws, "SELECT id, embedding FROM embeddings ORDER BY id")
    assert after[:30] == before and len(after) == 35
    assert query(ws, "SELECT count(*) FROM embeddings_16") == [(35,)]
    assert_index_matches_db(ws)


def test_append__journaled_rows_found_at_once_and_folded_before_any_read(tmp_path):
    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(0)
    store = Store(ws)
    batch = store.begin_batch("v1", ["serve"], {})
    store.commit(batch, "v1", embedded(rng, 0, 20))
    group = embedded(rng, 20, 8)
    ids = store.append(batch, "v1", group, counts={"n_items": 28, "n_scored": 28})
    assert ids.tolist() == list(range(21, 29)) and [p.id for p in group] == ids.tolist()
    journal = ws.root / "store.journal"
    assert journal.stat().st_size > 8 * 1280 * 4  # synced to disk, not yet in DuckDB
    assert store._con.execute("SELECT count(*) FROM predictions").fetchall() == [(20,)]
    # found at once: by the index, by content, and their rows from memory beside DuckDB's
    found, _ = store.indexes.get("v1").search(group[3].embedding[None], 1)
    assert found[0][0] == 24 and store.has_content("v1", group[3].sha256)
    assert store.row_count("v1") == 28
    rows = store.result_rows([24, 5])
    r24, r5 = rows[24], rows[5]
    assert (r24.id, r24.source, r24.label) == (24, "img23.png", "a") and r24.scored_at.endswith("Z")
    assert (r5.id, r5.source, r5.label) == (5, "img4.png", "a") and r5.scored_at.endswith("Z")
    # any other use of the connection folds first: one transaction, the journal emptied
    assert store._db.execute("SELECT count(*), max(id) FROM predictions").fetchall() == [(28, 28)]
    assert journal.stat().st_size == 0
    assert store._db.execute("SELECT n_items FROM batches").fetchall() == [(28,)]
    assert store.result_rows([24])[24] == rows[24]  # the same fields once in DuckDB
    # rows kept in memory are forgotten by whoever takes the connection, who may change them
    with store.lock:
        store._db.execute("UPDATE predictions SET label = 'b' WHERE id IN (5, 24)")
    assert [r.label for r in store.result_rows([5, 24]).values()] == ["b", "b"]
    # the fold is due after its time, and moves what waits
    store.append(batch, "v1", embedded(rng, 28, 8))
    assert not store.fold_due(60) and store.fold_due(0)
    assert store.fold() == 8 and store.fold() == 0
    # content appended twice (a race between requests) is kept once
    again = embedded(rng, 28, 2)
    assert store.append(batch, "v1", again).tolist() == [] and [p.id for p in again] == [29, 30]
    store.close()
    assert query(ws, "SELECT count(*), count(DISTINCT sha256) FROM predictions") == [(36, 36)]
    assert_index_matches_db(ws)


JOURNAL_KILL_SCRIPT = textwrap.dedent(
    """
    import os, shutil, signal, sys
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    from test_store import embedded
    from imagesieve._workspace import Workspace
    from imagesieve.store import Store

    ws, rng = Workspace(sys.argv[1]), np.random.default_rng(0)
    store = Store(ws)
    batch = store.begin_batch("v1", ["serve"], {})
    store.commit(batch, "v1", embedded(rng, 0, 10))
    store.append(batch, "v1", embedded(rng, 10, 8), counts={"n_items": 18})
    folded = ws.root / "folded.journal"
    shutil.copy(ws.root / "store.journal", folded)  # as if the fold died before emptying it
    store.fold()
    for start in (18, 26):
        store.append(batch, "v1", embedded(rng, start, 8), counts={"n_items": start + 8})
    os.kill(os.getpid(), signal.SIGKILL)  # kill -9: answered, journaled, not folded
    """
)


def test_append__kill_9_before_the_fold_then_open_replays_exactly_once(tmp_path, caplog):
    ws = Workspace(tmp_path / "ws")
    killed = subprocess.run(
        [sys.executable, "-c", JOURNAL_KILL_SCRIPT, str(ws.root), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert query(ws, "SELECT count(*) FROM predictions") == [(18,)]
    journal = ws.root / "store.journal"
    # the first frame was folded already; the last write was torn by the kill
    whole = (ws.root / "folded.journal").read_bytes() + journal.read_bytes()
    journal.write_bytes(whole + b"ISJ1\x00\x10")

    # a reader (imagesieve sql) sees them too: no process writes, so a brief write open adds them
    con = open_readonly(ws)
    assert con.execute("SELECT count(*) FROM predictions").fetchall() == [(34,)]
    con.close()
    with Store(ws) as store:
        assert store.row_count("v1") == 34
    assert "cut short" in caplog.text
    assert "16 rows a stopped process had answered" in caplog.text
    assert query(
        ws, "SELECT count(*), count(DISTINCT id), count(DISTINCT sha256), max(id) FROM predictions"
    ) == [(34, 34, 34, 34)]
    assert query(ws, "SELECT count(*) FROM embeddings") == [(34,)]
    assert query(ws, "SELECT status, n_items FROM batches") == [("interrupted", 34)]
    assert journal.stat().st_size == 0
    assert_index_matches_db(ws)


def test_append__a_failed_sync_stores_nothing_and_the_next_append_goes_on(tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(0)
    store = Store(ws)
    batch = store.begin_batch("v1", ["serve"], {})
    store.append(batch, "v1", embedded(rng, 0, 8))
    journal = ws.root / "store.journal"
    size = journal.stat().st_size

    def disk_error(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("imagesieve.store._journal.os.fdatasync", disk_error)
    lost = embedded(rng, 8, 8)
    with pytest.raises(OSError, match="Input/output"):
        store.append(batch, "v1", lost)
    monkeypatch.undo()
    assert journal.stat().st_size == size  # the frame was taken back
    assert [p.id for p in lost] == [None] * 8 and not store.has_content("v1", lost[0].sha256)
    kept = store.append(batch, "v1", embedded(rng, 16, 8))
    assert kept.tolist() == list(range(9, 17))  # the failed group's ids were never handed out
    store._journal.close()  # as if killed: the next open replays
    store._con.close()
    with Store(ws) as reopened:
        assert reopened.row_count("v1") == 16
    assert query(ws, "SELECT min(id), max(id), count(*) FROM predictions") == [(1, 16, 16)]


def test_ingest_shards__bulk_rows_exactly_once_with_failures_items_and_counts(tmp_path):
    from imagesieve.store import write_shard

    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(3)
    preds = embedded(rng, 0, 40)
    for p in preds[:30]:
        p.signature = rng.integers(-128, 127, 192, dtype=np.int8)
        p.avg_norm, p.max_pooled = 2.5, rng.random(1280).astype(np.float16)
    preds[3].label, preds[3].reason = "UNKNOWN", "far_from_training"
    broken = Prediction("bad.png", error_kind="truncated", error="truncated image data")
    again = replace(preds[5], source="copy-of-5.png")  # the same content twice in one shard
    write_shard(tmp_path / "a.parquet", [*range(24), 24, 25], [*preds[:24], broken, again], 1280)
    stored_before = replace(preds[3], source="seen.png", skipped=True, embedding=None)
    write_shard(
        tmp_path / "b.parquet",
        [*range(26, 50), 50],
        [*preds[16:40], stored_before],
        1280,
        [{"url": f"u{k}"} for k in range(25)],
    )
    with Store(ws) as store:
        batch = store.begin_batch("v1", ["test"], {})
        a = store.ingest_shards(batch, "v1", [tmp_path / "a.parquet"], {})
        assert (a.items, a.scored, a.already_scored, a.failed, a.unknown) == (26, 24, 1, 1, 1)
        assert a.unknown_ids.tolist() == [4]  # preds[3]: to join a cluster, with its vector
        assert np.allclose(a.unknown_vectors, preds[3].embedding[None])
        store.clusters.join(a.unknown_ids, [7])
        b = store.ingest_shards(batch, "v1", [tmp_path / "b.parquet"], a.counts())
        assert (b.items, b.scored, b.already_scored, b.failed, b.unknown) == (25, 16, 9, 0, 1)
        before = {k: a.counts()[k] + b.counts()[k] for k in a.counts()}
        again_b = store.ingest_shards(batch, "v1", [tmp_path / "b.parquet"], before)
        assert (again_b.scored, again_b.already_scored) == (0, 25)  # a re-run stores nothing
        assert store.row_count("v1") == 40
        store.indexes.check("v1")  # shards leave the index to catch up in bulk
        outputs = store.batch_outputs(batch)
    assert outputs["labels"] == {"a": 72, "UNKNOWN": 3}
    assert query(ws, "SELECT count(*), count(DISTINCT sha256), max(id) FROM predictions") == [
        (40, 40, 40)
    ]
    stored = dict(query(ws, "SELECT sha256, embedding FROM predictions JOIN embeddings USING (id)"))
    assert all(np.allclose(stored[p.sha256], p.embedding) for p in preds)
    assert query(ws, "SELECT count(*) FROM signatures") == [(30,)]
    assert query(ws, "SELECT count(*), min(avg_norm) FROM head_inputs") == [(30, 2.5)]
    assert query(ws, "SELECT id, cluster_id FROM predictions WHERE cluster_id IS NOT NULL") == [
        (4, 7)
    ]
    assert query(ws, "SELECT source, kind, message FROM failures") == [
        ("bad.png", "truncated", "truncated image data")
    ]
    items = query(ws, "SELECT seq, source, outcome, error, input_row FROM batch_items ORDER BY seq")
    assert items[24] == (24, "bad.png", "failed", "truncated: truncated image data", None)
    assert items[25][2] == "already_scored" and items[26][4] == '{"url": "u0"}'
    assert dict(query(ws, "SELECT outcome, count(*) FROM batch_items GROUP BY 1")) == {
        "scored": 40,
        "already_scored": 35,
        "failed": 1,
    }
    assert {r[2] for r in items if r[0] == 50} == {"already_scored"}
    assert query(ws, "SELECT n_items, n_scored, n_skipped, n_unknown, n_failed FROM batches") == [
        (76, 40, 35, 3, 1)
    ]
    assert_index_matches_db(ws)
