"""The store's parts one at a time: migrations, clusters, indexes, typed rows, re-deciding."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
from synthstore import fill
from test_store import assert_index_matches_db, embedded, query

from imagesieve._errors import SieveError
from imagesieve._workspace import Workspace
from imagesieve.classifier import (
    FAR_FROM_TRAINING,
    LOW_CONFIDENCE,
    POOR_QUALITY,
    UNKNOWN,
    DuplicateRule,
    UnknownRule,
)
from imagesieve.search import Cluster
from imagesieve.store import (
    MIGRATIONS,
    PREDICTION_COLUMNS,
    SCHEMA_VERSION,
    STORE_FILE,
    VIEWS,
    HumanLabel,
    PredictionRow,
    ResultRow,
    Store,
    VectorIndex,
    _vectors,
)

DIM = 16


def write(store: Store, version: str, preds: list) -> list[int]:
    """Commit ``preds`` as one finished batch of ``version``; their ids."""
    batch = store.begin_batch(version, ["test"], {})
    ids = store.commit(batch, version, preds)
    store.finish_batch(batch, "done", {})
    return ids.tolist()


def unknown(preds: list, reason: str = LOW_CONFIDENCE) -> list:
    """Mark ``preds`` UNKNOWN for ``reason``; returns them."""
    for p in preds:
        p.label, p.reason = UNKNOWN, reason
    return preds


def files(ws: Workspace) -> dict[str, bytes]:
    """The store's files as on disk: DuckDB's file and its write-ahead log, if any."""
    return {p.name: p.read_bytes() for p in ws.root.glob(f"{STORE_FILE}*")}


def sql(ws: Workspace, statement: str, params: list | None = None) -> None:
    """Change the closed store behind the Store's back."""
    con = duckdb.connect(str(ws.root / STORE_FILE))
    try:
        con.execute(statement, params or [])
    finally:
        con.close()


@pytest.fixture
def store(tmp_path):
    with Store(Workspace(tmp_path / "ws")) as store:
        yield store


@pytest.fixture
def old_ws(tmp_path) -> Workspace:
    """A closed store as the previous release left it: 12 rows (ids 1-4 UNKNOWN), no schema_version."""
    ws = Workspace(tmp_path / "old")
    preds = embedded(np.random.default_rng(0), 0, 12, DIM)
    with Store(ws) as store:
        write(store, "v1", unknown(preds[:4]) + preds[4:])
    sql(ws, "DROP TABLE schema_version")
    return ws


# -- migrations ------------------------------------------------------------------------------

ROWS = (
    "SELECT p.id, p.label, p.reason, e.embedding FROM predictions p JOIN embeddings e USING (id) "
    "ORDER BY id"
)


def test_migrate__a_previous_release_store_records_every_migration_and_keeps_its_rows(old_ws):
    before = query(old_ws, ROWS)
    with Store(old_ws) as store:
        with store.cursor() as cur:
            unknowns = cur.execute("SELECT id, reason FROM unknowns").fetchall()
            per_day = cur.execute("SELECT label, n FROM predictions_per_day ORDER BY 1").fetchall()
            counts = {v: cur.execute(f"SELECT count(*) FROM {v}").fetchall()[0][0] for v in VIEWS}
        assert write(store, "v1", embedded(np.random.default_rng(1), 12, 3, DIM)) == [13, 14, 15]
    assert query(old_ws, "SELECT version, name FROM schema_version ORDER BY version") == [
        (i, name) for i, (name, _) in enumerate(MIGRATIONS, 1)
    ]
    assert len(before) == 12 and query(old_ws, ROWS)[:12] == before
    assert unknowns == [(i, LOW_CONFIDENCE) for i in range(1, 5)]
    assert per_day == [("UNKNOWN", 4), ("a", 8)]
    assert counts == {
        "predictions_per_day": 2,
        "unknown_rate_per_batch": 1,
        "class_confusion": 1,
        "unknowns": 4,
        "failures_open": 0,
        "drift_per_batch": 1,  # its batch, untested: the old version has no drift reference
        "drift_per_day": 1,
        "near_duplicates": 0,  # rows of a release without signatures: none grouped yet
        "exact_duplicates": 0,
    }


def test_migrate__rows_stored_before_the_far_distance_get_their_cosine(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with Store(ws) as store:
        write(store, "v1", embedded(np.random.default_rng(0), 0, 5, DIM))
    # as the release before left them: the distance was the cosine, no cosine column filled
    sql(ws, "UPDATE predictions SET neighbor_id = 0, neighbor_distance = id / 8 WHERE id <= 3")
    sql(ws, "UPDATE predictions SET neighbor_cosine = NULL")
    sql(  # that step and the ones after it: a release before them
        ws,
        "DELETE FROM schema_version WHERE version >= "
        "(SELECT version FROM schema_version WHERE name = 'cosine of older rows')",
    )
    Store(ws).close()
    assert query(ws, "SELECT id, neighbor_cosine FROM predictions ORDER BY id") == [
        (1, 0.125),
        (2, 0.25),
        (3, 0.375),
        (4, None),  # no nearest training image: none to measure
        (5, None),
    ]


def test_migrate__an_up_to_date_store_runs_nothing_again(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with Store(ws) as store:
        write(store, "v1", embedded(np.random.default_rng(0), 0, 3, DIM))
    applied = query(ws, "SELECT version, name, applied_at FROM schema_version ORDER BY version")
    Store(ws).close()
    assert len(applied) == SCHEMA_VERSION
    assert query(ws, "SELECT version, name, applied_at FROM schema_version ORDER BY 1") == applied


def test_migrate__a_newer_release_store_is_refused_and_left_as_it_was(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with Store(ws) as store:  # a batch left running: an open that went on would mark it
        batch = store.begin_batch("v1", ["test"], {})
        store.commit(batch, "v1", embedded(np.random.default_rng(0), 0, 3, DIM))
    sql(ws, "INSERT INTO schema_version VALUES (?, 'later', now())", [SCHEMA_VERSION + 1])
    before = files(ws)
    for read_only in (False, True):
        with pytest.raises(
            SieveError, match=rf"version {SCHEMA_VERSION + 1}, .*\({SCHEMA_VERSION}\)"
        ):
            Store(ws, read_only=read_only)
    assert files(ws) == before
    assert query(ws, "SELECT count(*) FROM predictions") == [(3,)]  # closed at once, not at GC


def test_store__read_only_open_of_a_previous_release_store_reads_and_writes_nothing(old_ws):
    before = files(old_ws)
    with Store(old_ws, read_only=True) as store:
        ids = [r.id for r in store.rows("v1")]
        with store.cursor() as cur:
            unknowns = cur.execute("SELECT id FROM unknowns").fetchall()
    assert ids == list(range(1, 13)) and unknowns == [(i,) for i in range(1, 5)]
    assert files(old_ws) == before
    tables = "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'schema_version'"
    assert query(old_ws, tables) == [(0,)]


# -- clusters --------------------------------------------------------------------------------


def cluster(cid: int, members: list[int], x: np.ndarray) -> Cluster:
    """A cluster of rows ``members`` (ids from 1) of embeddings ``x``; its medoid the first."""
    centroid = x[np.array(members) - 1].mean(0)
    return Cluster(
        cid,
        np.array(members, np.int64),
        (centroid / np.linalg.norm(centroid)).astype(np.float32),
        members[0],
        0.25,
        0.8,
        {"a": len(members)},
        {"b": len(members)},
    )


def cluster_ids(store: Store) -> list[int | None]:
    return [r.cluster_id for r in store.rows("v1")]


def test_clusters__unknowns_runs_review_and_a_second_run(store):
    preds = embedded(np.random.default_rng(0), 0, 10, DIM)
    for i, p in enumerate(unknown(preds[:6])):
        p.top3 = [("ab"[i % 2], 0.4), ("bc"[i % 2], 0.3)]
    write(store, "v1", preds)
    write(store, "v2", unknown(embedded(np.random.default_rng(1), 10, 2, DIM)))
    x = np.stack([p.embedding for p in preds])
    ids, got, top1, top2 = store.clusters.unknowns("v1")
    assert ids.tolist() == [1, 2, 3, 4, 5, 6] and np.allclose(got, x[:6])
    assert (top1, top2) == (list("ababab"), list("bcbcbc"))

    first = [cluster(0, [1, 2, 3], x), cluster(1, [4, 5], x)]
    labels = np.array([0, 0, 0, 1, 1, -1])
    assert (
        store.clusters.save_run(
            "v1", ids, labels, np.zeros(len(ids)), first, 1, {"k": 2}, {"fit": 0.5}
        )
        == 1
    )
    assert cluster_ids(store) == [0, 0, 0, 1, 1, -1, None, None, None, None]
    listing = store.clusters.listing("v1")
    assert [(c["cluster_id"], c["status"], c["size"], c["medoid_source"]) for c in listing] == [
        (0, "new", 3, "img0.png"),
        (1, "new", 2, "img3.png"),
    ]
    assert [c["open"] for c in listing] == [True, True] and store.clusters.open_count("v1") == 2
    top = listing[0]
    assert (top["top1"], top["top2"], top["radius"]) == ({"a": 3}, {"b": 3}, 0.25)
    with store.cursor() as cur:
        run = cur.execute(
            "SELECT run_id, model_version, images, clusters, noise, params FROM cluster_runs"
        )
        assert run.fetchall() == [(1, "v1", 6, 2, 1, '{"k": 2}')]
    previous, next_id = store.clusters.previous("v1")
    assert next_id == 2 and [p.member_ids.tolist() for p in previous] == [[1, 2, 3], [4, 5]]
    assert np.allclose(previous[1].centroid, first[1].centroid) and previous[1].radius == 0.25

    store.clusters.name("v1", 0, "cracks")
    assert store.clusters.status("v1", 0) == ("named", "cracks")
    store.clusters.reject("v1", 1)
    assert store.clusters.status("v1", 1) == ("rejected", None)
    store.clusters.exclude("v1", 0, [2, 3])
    store.clusters.exclude("v1", 0, [3])
    assert store.clusters.excluded("v1", 0) == {2, 3} and store.clusters.excluded("v1", 1) == set()
    members = store.clusters.members("v1", 0, limit=2)
    assert [(m.id, m.cluster_id, m.excluded) for m in members] == [(1, 0, False), (2, 0, True)]
    assert [m.id for m in store.clusters.members("v1")] == [1, 2, 3, 4, 5, 6]
    store.clusters.promoted("v1", 0, "cracks", "/data/cracks")
    assert store.clusters.status("v1", 0) == ("promoted", "cracks")

    again = [cluster(0, [1, 2], x)]  # cluster 1 not found again
    labels = np.array([0, 0, -1, -1, -1, -1])
    assert store.clusters.save_run("v1", ids, labels, np.zeros(len(ids)), again, 4, {}, {}) == 2
    listing = store.clusters.listing("v1")
    kept = ("cluster_id", "status", "name", "size", "promoted_into", "excluded", "pending", "open")
    # member 1 is neither left out nor labelled: the promoted cluster has work again
    assert [tuple(c[k] for k in kept) for c in listing] == [
        (0, "promoted", "cracks", 2, "/data/cracks", 2, 1, True),
        (1, "rejected", None, 0, None, 0, 0, False),
    ]
    assert store.clusters.open_count("v1") == 1
    store.audit.set_labels([HumanLabel(preds[0].sha256, "cracks", 1, 0, None)])
    assert [(c["pending"], c["open"]) for c in store.clusters.listing("v1")] == [
        (0, False),
        (0, False),
    ]
    assert store.clusters.open_count("v1") == 0
    assert cluster_ids(store)[:6] == [0, 0, -1, -1, -1, -1]
    previous, next_id = store.clusters.previous("v1")
    assert next_id == 2 and [p.cluster_id for p in previous] == [0]  # cluster 1 is gone
    assert previous[0].member_ids.tolist() == [1, 2]
    assert store.clusters.status("v1", 7) is None and store.clusters.previous("v2") == ([], 0)


# -- the index set ---------------------------------------------------------------------------


def file_version(path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_index_set__checked_rebuilt_searched_journaled_and_saved_when_changed(tmp_path):
    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(3)
    v1, v2, late = embedded(rng, 0, 30, DIM), embedded(rng, 30, 10, DIM), embedded(rng, 40, 5, DIM)
    with Store(ws) as store:
        write(store, "v1", v1)
        write(store, "v2", v2)
        assert [store.indexes.check(v).action for v in ("v1", "v2")] == ["in_sync", "in_sync"]
        path = {v: store.indexes.path(v) for v in ("v1", "v2")}
    path["v1"].unlink()
    with Store(ws, check=False) as store:
        check = store.indexes.check("v1")
        assert (check.action, check.rows) == ("rebuilt", 30)
        assert VectorIndex.saved_stats(path["v1"]) == (30, 30, sum(range(1, 31)))
        xq = np.stack([v1[7].embedding, v1[21].embedding])
        found, distance = store.indexes.get("v1").search(xq, 1)
        assert found[:, 0].tolist() == [8, 22] and distance.max() < 1e-5
        assert store.indexes.get("v2").search(v2[3].embedding, 1)[0].tolist() == [[34]]
        clean = file_version(path["v2"])

        ids = store.append(store.begin_batch("v1", ["serve"], {}), "v1", late)
        assert ids.tolist() == [41, 42, 43, 44, 45]
        in_duckdb = store._con.execute("SELECT count(*) FROM predictions WHERE id > 40")
        assert in_duckdb.fetchall() == [(0,)]  # not folded yet, and found:
        assert store.indexes.get("v1").search(late[2].embedding, 1)[0].tolist() == [[43]]
        dirty = file_version(path["v1"])
        store.indexes.save()
        assert file_version(path["v2"]) == clean and file_version(path["v1"]) != dirty
        assert VectorIndex.saved_stats(path["v1"]) == (35, 45, sum(range(1, 31)) + sum(ids))
    assert_index_matches_db(ws, "v1")


# -- typed rows ------------------------------------------------------------------------------


def test_prediction_row__fields_are_the_stored_columns_in_order():
    assert [f.name for f in dataclasses.fields(PredictionRow)] == PREDICTION_COLUMNS


def test_rows_by_content__typed_rows_that_round_trip_to_predictions(store):
    preds = embedded(np.random.default_rng(0), 0, 3, DIM)
    preds[0].top3 = [("a", 0.7), ("b", 0.2), ("c", 0.1)]
    unknown(preds[1:2])[0].top3 = [("b", 0.4), ("a", 0.35), ("c", 0.25)]
    preds[1].neighbor_id, preds[1].neighbor_distance = 3, 0.5
    write(store, "v1", preds)
    rows = store.rows_by_content("v1", [preds[0].sha256, preds[1].sha256, "0" * 64])
    assert set(rows) == {preds[0].sha256, preds[1].sha256}
    assert store.rows(ids=[2, 1]) == [rows[preds[0].sha256], rows[preds[1].sha256]]
    for p in preds[:2]:
        row = rows[p.sha256]
        assert isinstance(row, PredictionRow) and isinstance(row.scored_at, dt.datetime)
        back = row.to_prediction("shown.png")
        got = (back.source, back.id, back.label, back.reason, back.sha256, back.skipped)
        assert got == ("shown.png", p.id, p.label, p.reason, p.sha256, True)
        assert [c for c, _ in back.top3] == [c for c, _ in p.top3]
        assert [q for _, q in back.top3] == pytest.approx([q for _, q in p.top3])
        assert (back.width, back.height, back.neighbor_id) == (8, 8, p.neighbor_id)
    assert rows[preds[1].sha256].to_prediction("x").neighbor_distance == pytest.approx(0.5)


def test_result_rows__the_same_for_journaled_and_folded_rows(tmp_path):
    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(0)
    with Store(ws) as store:
        write(store, "v1", embedded(rng, 0, 2, DIM))
        late = embedded(rng, 2, 3, DIM)
        unknown(late[:1])[0].top3 = [("b", 0.3), ("a", 0.2)]
        late[2].top3 = []
        ids = store.append(store.begin_batch("v1", ["serve"], {}), "v1", late).tolist()
        assert store._con.execute("SELECT count(*) FROM predictions").fetchall() == [(2,)]
        journaled = store.result_rows([*ids, 1])
    with Store(ws, check=False) as store:
        folded = store.result_rows([*ids, 1])
    assert all(isinstance(r, ResultRow) for r in journaled.values())
    assert [(r.id, r.source, r.label, r.reason, r.top1_class) for r in journaled.values()] == [
        (3, "img2.png", UNKNOWN, LOW_CONFIDENCE, "b"),
        (4, "img3.png", "a", None, "a"),
        (5, "img4.png", "a", None, None),
        (1, "img0.png", "a", None, "a"),
    ]
    assert {i: dataclasses.astuple(r) for i, r in folded.items()} == {
        i: dataclasses.astuple(r) for i, r in journaled.items()
    }


# -- re-deciding stored rows -----------------------------------------------------------------

PROBS = (0.2, 0.6, 0.61, 0.95)
DISTANCES = (None, float("nan"), 0.1, 0.3, 0.31, 0.9)


@pytest.mark.parametrize("rule", [UnknownRule(0.6, 0.3), UnknownRule(0.6)], ids=repr)
def test_redecide__counted_then_labelled_as_the_rule_says(store, rule):
    grid = [(p, d) for p in PROBS for d in DISTANCES]
    preds = embedded(np.random.default_rng(0), 0, len(grid), DIM)
    for i, (p, (prob, distance)) in enumerate(zip(preds, grid, strict=True)):
        p.top3, p.neighbor_id, p.neighbor_distance = [(f"c{i % 3}", prob)], 0, distance
        p.label, p.reason = (UNKNOWN, "stale") if i % 2 else ("wrong", None)
        p.quality_flags = ["dark", "low_information"] if i % 5 == 0 else []
    write(store, "v1", preds)
    write(store, "v2", unknown(embedded(np.random.default_rng(1), 100, 2, DIM), "stale"))
    stored = store.rows("v1")
    # as the rule decides the float32 values the store holds
    poor = np.array([r.quality_flags is not None for r in stored])
    assert poor.sum() == 5 and stored[5].quality_flags == "dark+low_information"
    want = rule.reasons(
        np.array([r.top1_prob for r in stored]), [r.neighbor_distance for r in stored], poor
    )
    assert len(set(want)) == (8 if rule.distance else 4)
    assert store.unknown_counts("v1", rule) == {
        "stored": len(grid),
        POOR_QUALITY: 5,
        LOW_CONFIDENCE: sum(r is not None and LOW_CONFIDENCE in r for r in want),
        FAR_FROM_TRAINING: sum(r is not None and FAR_FROM_TRAINING in r for r in want),
        "unknown": sum(r is not None for r in want),
        "unknown_now": len(grid) // 2,
    }
    store.redecide("v1", rule)
    assert [(r.label, r.reason) for r in store.rows("v1")] == [
        (UNKNOWN if w else r.top1_class, w) for r, w in zip(stored, want, strict=True)
    ]
    assert store.unknown_counts("v1", rule)["unknown_now"] == sum(r is not None for r in want)
    assert [(r.label, r.reason) for r in store.rows("v2")] == [(UNKNOWN, "stale")] * 2


def test_index_set__past_hnsw_max_ivf_rebuilt_from_a_duckdb_sample_and_on_repair(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(_vectors, "FLAT_MAX", 50)
    monkeypatch.setattr(_vectors, "HNSW_MAX", 200)
    ws = Workspace(tmp_path / "ws")
    preds = embedded(np.random.default_rng(4), 0, 400, DIM)
    with Store(ws) as store:
        write(store, "v1", preds)
    path = ws.root / "index" / "v1.faiss"
    assert VectorIndex.load(path).kind == "ivfpq"  # the flat index outgrew both on save
    path.unlink()
    with Store(ws) as store:
        (check,) = store.indexes.checks
        assert (check.action, check.details["kind"]) == ("rebuilt", "ivfpq")
        assert check.details["train_rows"] == 400  # all of them: fewer than PQ asks for
        found, distance = store.indexes.get("v1").search(preds[17].embedding, 1)
        assert found.tolist() == [[18]] and distance[0, 0] < 0.01
    index = VectorIndex.load(path)
    index.add(np.array([9999]), preds[0].embedding[None])
    index.save()
    with Store(ws) as store:  # an id DuckDB lacks: codes cannot be taken out, so rebuilt
        assert store.indexes.checks[0].action == "rebuilt"
    assert_index_matches_db(ws, "v1")


@pytest.mark.parametrize("limits", [None, (50, 200)], ids=["vectors", "codes"])
def test_near_duplicates__linked_alike_whether_the_index_holds_vectors_or_codes(
    tmp_path, monkeypatch, limits
):
    if limits is not None:  # past HNSW_MAX: IVF-PQ, whose vectors are read from DuckDB
        monkeypatch.setattr(_vectors, "FLAT_MAX", limits[0])
        monkeypatch.setattr(_vectors, "HNSW_MAX", limits[1])
    rng = np.random.default_rng(7)
    preds = embedded(rng, 0, 400, DIM)
    for a, b in ((3, 250), (10, 11), (399, 0), (250, 120)):  # b becomes a copy of a
        e = preds[a].embedding + 1e-4 * rng.normal(size=DIM)
        preds[b].embedding = (e / np.linalg.norm(e)).astype(np.float32)
    ws = Workspace(tmp_path / "ws")
    with Store(ws) as store:
        write(store, "v1", preds)  # the index takes its kind when saved, at close
    with Store(ws) as store:
        kind = store.indexes.get("v1").kind
        assert store.duplicates.catch_up("v1", DuplicateRule(0.001)) == 400
        assert store.duplicates.catch_up("v1", DuplicateRule(0.001)) == 0  # all checked
    assert kind == ("flat" if limits is None else "ivfpq")
    rows = query(ws, "SELECT id, duplicate_group FROM predictions WHERE duplicate_group > 0")
    # ids are 1-based; a group is named by its smallest id
    assert sorted(rows) == [(1, 1), (4, 4), (11, 11), (12, 11), (121, 4), (251, 4), (400, 1)]


def test_index_set__a_grown_store_saves_a_delta_and_a_damaged_delta_is_rebuilt(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(_vectors, "FLAT_MAX", 50)
    ws = Workspace(tmp_path / "ws")
    rng = np.random.default_rng(5)
    with Store(ws) as store:
        write(store, "v1", embedded(rng, 0, 300, DIM))
    path = ws.root / "index" / "v1.faiss"
    before = path.stat().st_mtime_ns
    with Store(ws) as store:
        write(store, "v1", embedded(rng, 300, 20, DIM))
    delta = path.parent / "v1.faiss.delta-1"
    assert path.stat().st_mtime_ns == before and delta.is_file()  # only the 20 rows written
    assert_index_matches_db(ws, "v1")
    with Store(ws) as store:
        assert store.indexes.checks[0].action == "in_sync"
    delta.write_bytes(b"garbage")
    with Store(ws) as store:
        assert store.indexes.checks[0].action == "rebuilt"
    assert_index_matches_db(ws, "v1")


def _measured_rebuild(root: Path, rows: int) -> dict:
    """Fill a store of ``rows`` synthetic rows, rebuild its index in a fresh process: its figures."""
    fill(root, rows)
    code = (
        f"import sys, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"from synthstore import rebuild_measured; rebuild_measured(pathlib.Path({str(root)!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert (r["rows"], r["kind"]) == (rows, "hnsw")
    return r


@pytest.mark.slow
def test_index_set__rebuild_from_duckdb_grows_by_about_the_index_not_the_vectors(tmp_path):
    # A rebuild streams DuckDB's rows into the index in chunks: past a fixed part (DuckDB's
    # streaming memory, a chunk, the tuning's queries: ~450 MB measured), the process grows
    # with the index alone, so at 1,000,000 rows its peak is ~1.1x the index (bench_rebuild).
    # Measured here as the growth per added row between two sizes against the index's own:
    # reading the embeddings whole (Arrow, then a float32 copy) would add twice the vectors
    # (10 KB a row beside the index's ~5.2 KB), a ratio near 3.
    small = _measured_rebuild(tmp_path / "small", 50_000)
    large = _measured_rebuild(tmp_path / "large", 125_000)
    grew = [r["peak_mb"] - r["before_mb"] for r in (small, large)]
    ratio = (grew[1] - grew[0]) / (large["index_mb"] - small["index_mb"])
    assert ratio <= 1.5, (small, large)
