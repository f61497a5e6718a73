"""Read-only SQL over a real store: escapes refused, limits kept, views checked, CLI outputs parsed."""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import hashlib
import io
import json
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pytest

from imagesieve._workspace import Workspace
from imagesieve.classifier import Prediction
from imagesieve.store import (
    SAFE_CONFIG,
    VIEWS,
    Failure,
    SqlError,
    SqlResult,
    Store,
    StoreBusyError,
    open_readonly,
    run_sql,
)
from imagesieve.store._schema import views_sql

REPO = Path(__file__).resolve().parents[1]
TABLES = ("batches", "predictions", "embeddings", "failures", "reference_images")


def pred(name, label, top3, reason=None, neighbor=(0, 0.1), seed=0, sha=None) -> Prediction:
    e = np.random.default_rng(seed).normal(size=16).astype(np.float32)
    return Prediction(
        source=name,
        label=label,
        reason=reason,
        top3=top3,
        embedding=e / np.linalg.norm(e),
        width=64,
        height=48,
        sha256=sha or hashlib.sha256(name.encode()).hexdigest(),
        neighbor_id=neighbor[0],
        neighbor_distance=neighbor[1],
    )


def build_store(ws: Workspace) -> None:
    """Three batches of v1: two finished, one that died mid-run (rows and failures stored).

    Final rows (id: source label top1/top2):
      1 img1 a (a .85, b .10)  rescored by batch 2
      2 img2 a (a .80, b .15)
      3 img3 UNKNOWN low_confidence (a .45, b .40), nearest training image 1 (b) at .3
      4 img4 b (b .70, a .20)
      5 img5 UNKNOWN far_from_training (a .95, c .03), nearest 0 (a) at .9
      6 bad.png b (b .60, a .30)  failed in batch 1, fine in batch 2
      7 img7 UNKNOWN low_confidence (b .50, a .30), nearest 1 (b) at .25
      8 img8 UNKNOWN low_confidence+far_from_training (c .40, a .35), nearest 0 (a) at .8
    """
    low, far = "low_confidence", "far_from_training"
    store = Store(ws)
    store.register_version("v1", ["ref/a0.png", "ref/b0.png"], ["a", "b"])
    b1 = store.begin_batch("v1", ["in1"], {})
    store.commit(
        b1,
        "v1",
        new=[
            pred("img1", "a", [("a", 0.9), ("b", 0.08), ("c", 0.02)], seed=1),
            pred("img2", "a", [("a", 0.8), ("b", 0.15), ("c", 0.05)], seed=2),
            pred("img3", "UNKNOWN", [("a", 0.45), ("b", 0.4), ("c", 0.15)], low, (1, 0.3), 3),
            pred("img4", "b", [("b", 0.7), ("a", 0.2), ("c", 0.1)], neighbor=(1, 0.15), seed=4),
        ],
        failures=[Failure("bad.png", "not_image", "cannot identify image file")],
        processed_sources=["img1", "img2", "img3", "img4", "bad.png"],
    )
    store.finish_batch(
        b1, "done", {"n_items": 5, "n_scored": 4, "n_skipped": 0, "n_unknown": 1, "n_failed": 1}
    )
    b2 = store.begin_batch("v1", ["in2"], {})
    store.commit(
        b2,
        "v1",
        new=[
            pred("img5", "UNKNOWN", [("a", 0.95), ("c", 0.03), ("b", 0.02)], far, (0, 0.9), 5),
            pred("bad.png", "b", [("b", 0.6), ("a", 0.3), ("c", 0.1)], seed=6),
            pred("img7", "UNKNOWN", [("b", 0.5), ("a", 0.3), ("c", 0.2)], low, (1, 0.25), 7),
        ],
        rescored=[pred("img1", "a", [("a", 0.85), ("b", 0.1), ("c", 0.05)], seed=1)],
        failures=[
            Failure("gone.png", "missing", "no such file"),
            Failure("notes.txt", "ignored", "not an image file"),
        ],
        processed_sources=["img5", "bad.png", "img7", "img1", "img2", "gone.png", "notes.txt"],
    )
    # img2 was already stored: skipped, but counted (label a) among the batch's 5 scored
    store.finish_batch(
        b2, "done", {"n_items": 6, "n_scored": 4, "n_skipped": 1, "n_unknown": 2, "n_failed": 1}
    )
    b3 = store.begin_batch("v1", ["in3"], {})  # never finished: the process "dies"
    store.commit(
        b3,
        "v1",
        new=[
            pred(
                "img8",
                "UNKNOWN",
                [("c", 0.4), ("a", 0.35), ("b", 0.25)],
                f"{low}+{far}",
                (0, 0.8),
                8,
            )
        ],
        failures=[Failure("late.png", "timeout", "read timed out")],
        processed_sources=["img8", "late.png"],
    )
    time.sleep(0.01)
    store.commit(b3, "v1", failures=[Failure("late.png", "http_error", "HTTP 503")])
    store.close()
    Store(ws, check=False).close()  # reopening marks the dead batch interrupted


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("sql") / "ws")
    build_store(ws)
    return ws


@pytest.fixture(scope="module")
def con(ws):
    con = open_readonly(ws)
    yield con
    con.close()


def counts(con) -> dict[str, int]:
    return {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in TABLES}


def copy_ws(ws: Workspace, dest: Path) -> Workspace:
    shutil.copytree(ws.root, dest)
    return Workspace(dest)


# -- escapes ----------------------------------------------------------------------------------

REFUSED = "only read-only queries (SELECT) are allowed, got "
NO_FILES = "file system operations are disabled by configuration"
ESCAPES = [
    (
        "SELECT * FROM read_csv('/etc/passwd')",
        'Permission Error: Cannot access file "/etc/passwd" - ' + NO_FILES,
    ),
    (
        "SELECT * FROM read_text('/etc/passwd')",
        'Permission Error: Cannot access file "/etc/passwd" - ' + NO_FILES,
    ),
    ("SELECT * FROM glob('/etc/*')", 'Permission Error: Cannot access file "/etc/*" - ' + NO_FILES),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", NO_FILES),
    ("SELECT * FROM '/etc/passwd'", "Catalog Error: Table with name /etc/passwd does not exist!"),
    ("COPY predictions TO '{tmp}/x.csv'", REFUSED + "COPY"),
    ("ATTACH '{tmp}/other.duckdb' AS other", REFUSED + "ATTACH"),
    ("INSTALL httpfs", REFUSED + "INSTALL"),
    ("LOAD httpfs", REFUSED + "LOAD"),
    ("INSERT INTO batches SELECT * FROM batches", REFUSED + "INSERT"),
    ("UPDATE predictions SET label = 'x'", REFUSED + "UPDATE"),
    ("DELETE FROM predictions", REFUSED + "DELETE"),
    ("WITH doomed AS (SELECT 1) DELETE FROM predictions", REFUSED + "DELETE"),
    ("DROP TABLE predictions", REFUSED + "DROP"),
    ("CREATE TABLE t AS SELECT 1", REFUSED + "CREATE"),
    ("SET enable_external_access = true", REFUSED + "SET"),
    ("PRAGMA enable_profiling", REFUSED + "PRAGMA"),
    ("SELECT 1; DROP TABLE predictions", "one statement at a time, got 2"),
    ("EXPORT DATABASE '{tmp}/export'", REFUSED + "EXPORT"),
    ("CALL force_checkpoint()", REFUSED + "CALL"),
    ("CHECKPOINT", REFUSED + "CHECKPOINT"),
    ("USE memory", REFUSED + "USE"),
    ("EXPLAIN ANALYZE DELETE FROM predictions", REFUSED + "EXPLAIN DELETE"),
    ("EXPLAIN (ANALYZE) UPDATE predictions SET label = 'x'", REFUSED + "EXPLAIN UPDATE"),
    (
        "SELECT * FROM force_checkpoint()",
        "function force_checkpoint() is not allowed in read-only queries",
    ),
    (
        "SELECT * FROM query('DELETE FROM predictions')",
        "function query() is not allowed in read-only queries",
    ),
    ("", "no SQL statement given"),
    ("SELEC 1", 'Parser Error: syntax error at or near "SELEC"'),
]


@pytest.mark.parametrize("sql,message", ESCAPES, ids=[e[0][:40] for e in ESCAPES])
def test_run_sql__escape_refused_read_only(con, tmp_path, sql, message):
    before = counts(con)
    with pytest.raises(SqlError) as err:
        run_sql(con, sql.format(tmp=tmp_path))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert counts(con) == before
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing attached
    assert run_sql(con, "SELECT 42").rows == [(42,)]  # the connection is still usable


@pytest.mark.parametrize("sql,message", ESCAPES, ids=[e[0][:40] for e in ESCAPES])
def test_run_sql__escape_refused_on_a_writable_connection(ws, tmp_path_factory, sql, message):
    """The server runs SQL through its writer: the statement check alone keeps writes out."""
    out = tmp_path_factory.mktemp("out")
    path = tmp_path_factory.mktemp("writable") / "store.duckdb"
    shutil.copyfile(ws.root / "store.duckdb", path)
    con = duckdb.connect(str(path), config=dict(SAFE_CONFIG))
    try:
        before = counts(con)
        with pytest.raises(SqlError) as err:
            run_sql(con, sql.format(tmp=out))
        assert message in str(err.value) and "\n" not in str(err.value)
        assert counts(con) == before
        assert list(out.iterdir()) == []
    finally:
        con.close()
    con = duckdb.connect(str(path), read_only=True)  # and nothing reached the file either
    try:
        assert counts(con) == before
    finally:
        con.close()


def test_run_sql__reads_allowed(con):
    assert run_sql(con, "  -- comment\nSELECT count(*) AS n FROM predictions;").rows == [(8,)]
    assert "label" in [r[0] for r in run_sql(con, "DESCRIBE predictions").rows]
    assert {"predictions", *VIEWS} <= {r[0] for r in run_sql(con, "SHOW TABLES").rows}
    assert run_sql(con, "FROM predictions SELECT max(id)").rows == [(8,)]
    assert run_sql(con, "SUMMARIZE SELECT top1_prob FROM predictions").columns[0] == "column_name"
    plan = run_sql(con, "EXPLAIN ANALYZE SELECT count(*) FROM predictions")
    assert plan.columns == ["explain_key", "explain_value"] and "analyzed_plan" in plan.rows[0]
    with pytest.raises(
        SqlError,
        match=r'^Catalog Error: Table with name prediction does not exist! Did you mean "predictions"\?$',
    ):
        run_sql(con, "SELECT * FROM prediction")


# -- limits -----------------------------------------------------------------------------------


def test_run_sql__row_limit(con):
    r = run_sql(con, "SELECT * FROM range(1000000) t(i)", limit=10)
    assert r.truncated and r.rows == [(i,) for i in range(10)] and r.columns == ["i"]
    assert not run_sql(con, "SELECT * FROM range(10)", limit=10).truncated
    assert len(run_sql(con, "SELECT * FROM range(20000)", limit=None).rows) == 20000
    r = run_sql(con, "SELECT * FROM range(5)", limit=0)
    assert r.rows == [] and r.truncated
    # the unread rest was dropped: the connection runs the next query at once
    assert run_sql(con, "SELECT count(*) FROM predictions").rows == [(8,)]
    with pytest.raises(ValueError, match="limit must be 0 or more, got -1"):
        run_sql(con, "SELECT 1", limit=-1)


def test_run_sql__error_while_streaming(con):
    sql = "SELECT CASE WHEN i > 5000 THEN error('boom at ' || i) ELSE i END FROM range(100000) t(i)"
    with pytest.raises(SqlError, match="^Invalid Input Error: boom at 5001$"):
        run_sql(con, sql, limit=None)
    assert run_sql(con, "SELECT 1").rows == [(1,)]


def test_run_sql__time_limit(con):
    t0 = time.perf_counter()
    with pytest.raises(SqlError, match=r"^query stopped after 0.5 s \(time limit\)$"):
        run_sql(con, "SELECT count(*) FROM range(10_000_000_000)", timeout=0.5)
    assert time.perf_counter() - t0 < 3
    assert run_sql(con, "SELECT 1", timeout=0.5).rows == [(1,)]
    time.sleep(0.6)  # a cancelled timer must not interrupt later work
    assert run_sql(con, "SELECT count(*) FROM range(1000)").rows == [(1000,)]


#: Data-modifying statements a SELECT can hide (DuckDB reports each as a SELECT).
HIDDEN_WRITES = [
    "WITH x AS (DELETE FROM predictions WHERE id = 1 RETURNING id) SELECT count(*) FROM x",
    "WITH x AS (UPDATE predictions SET label = 'x' RETURNING id) SELECT count(*) FROM x",
    "WITH x AS (INSERT INTO failures SELECT * FROM failures RETURNING 1) SELECT count(*) FROM x",
    "WITH x AS (DELETE FROM batches RETURNING 1) SELECT * FROM predictions, x",
    "SELECT * FROM (WITH y AS (DELETE FROM reference_images RETURNING 1) SELECT * FROM y)",
]


@pytest.mark.parametrize("sql", HIDDEN_WRITES, ids=[s[10:40] for s in HIDDEN_WRITES])
def test_run_sql__writes_hidden_in_a_select_refused_on_the_writers_connection(ws, tmp_path, sql):
    path = tmp_path / "store.duckdb"
    shutil.copyfile(ws.root / "store.duckdb", path)
    con = duckdb.connect(str(path))
    try:
        before = counts(con)
        with pytest.raises(SqlError, match="^only read-only queries .*inside the query$"):
            run_sql(con.cursor(), sql)
        assert counts(con) == before
    finally:
        con.close()


@pytest.mark.parametrize("sql", HIDDEN_WRITES, ids=[s[10:40] for s in HIDDEN_WRITES])
def test_run_sql__transaction_refuses_writes_the_check_would_miss(ws, tmp_path, sql, monkeypatch):
    """The second lock alone: with the statement check switched off, DuckDB still refuses."""
    from imagesieve.store import _sql

    monkeypatch.setattr(_sql, "_parse_facts", lambda con, q: (set(), set(), set()))
    path = tmp_path / "store.duckdb"
    shutil.copyfile(ws.root / "store.duckdb", path)
    con = duckdb.connect(str(path))
    try:
        before = counts(con)
        with pytest.raises(
            SqlError, match="read-only mode|data-modifying statement must be at the top"
        ):
            run_sql(con.cursor(), sql)
        assert counts(con) == before
        assert run_sql(con.cursor(), "SELECT count(*) FROM predictions").rows == [(8,)]
    finally:
        con.close()


@pytest.mark.parametrize(
    "sql,name",
    [
        ("SELECT repeat('x', 300000000)", "repeat"),
        ("SELECT len(range(100000000))", "range"),
        ("SELECT generate_series(1, 100000000)", "generate_series"),
        ("SELECT lpad('a', 500000000, 'b')", "lpad"),
        ("SELECT printf('%0500000000d', 1)", "printf"),
        ("SELECT list_resize([1], 100000000)", "list_resize"),
        ("SELECT count(*) FROM predictions WHERE length(RPAD(source, 1e9, 'x')) > 0", "rpad"),
    ],
)
def test_run_sql__size_amplifying_functions_refused(con, sql, name):
    with pytest.raises(SqlError, match=f"^function {name}\\(\\) is not allowed here"):
        run_sql(con, sql)
    assert run_sql(con, "SELECT count(*) FROM range(10)").rows == [(10,)]  # the table function


def test_run_sql__nesting_and_length_bounded(con):
    deep = "SELECT " + "abs(" * 400 + "1" + ")" * 400
    with pytest.raises(SqlError, match=r"^query nested too deeply \(over 200 levels\)$"):
        run_sql(con, deep)
    with pytest.raises(SqlError, match="characters, over the 100,000 limit"):
        run_sql(con, "SELECT 1 -- " + "x" * 100_000)
    ok = "SELECT " + "abs(" * 50 + "-1" + ")" * 50
    assert run_sql(con, ok).rows == [(1,)]


def test_run_sql__result_bytes_bounded(con):
    r = run_sql(con, "SELECT 'x' || i AS s FROM range(100000) t(i)", limit=None, max_bytes=100_000)
    assert r.truncated and 500 < len(r.rows) < 2000


def test_run_sql__memory_watchdog_stops_a_growing_query(con):
    # a recursive CTE doubling a string: 2^28 bytes at the end, ~512 MB in all
    sql = (
        "WITH RECURSIVE r(s, n) AS (SELECT 'x', 0 UNION ALL SELECT s || s, n + 1 FROM r "
        "WHERE n < 28) SELECT max(length(s)) FROM r"
    )
    with pytest.raises(SqlError, match=r"^query stopped: it needed over 64 MB \(memory limit\)$"):
        run_sql(con, sql, max_memory=64 * 2**20)
    assert run_sql(con, "SELECT 1").rows == [(1,)]


# -- views ------------------------------------------------------------------------------------


def test_views__unknown_rate_per_batch(con):
    r = run_sql(con, "SELECT * EXCLUDE (started_at) FROM unknown_rate_per_batch")
    assert r.columns == [
        "batch_id",
        "model_version",
        "status",
        "items",
        "scored",
        "failed",
        "unknown",
        "unknown_rate",
    ]
    assert r.rows == [
        (1, "v1", "done", 5, 4, 1, 1, 0.25),  # its counters, though img1 was rescored by batch 2
        (2, "v1", "done", 6, 5, 1, 2, 0.4),  # 3 new + 1 rescored + 1 already stored
        (3, "v1", "interrupted", 2, 1, 1, 1, 1.0),  # no counters: its stored rows and failures
    ]


def test_views__predictions_per_day(con):
    (day,) = {
        ts.astimezone(dt.UTC).date()
        for (ts,) in run_sql(con, "SELECT scored_at FROM predictions").rows
    }
    r = run_sql(con, "FROM predictions_per_day")
    assert r.columns == ["day", "model_version", "label", "n"]
    assert r.rows == [(day, "v1", "UNKNOWN", 4), (day, "v1", "a", 2), (day, "v1", "b", 2)]


def test_views__class_confusion(con):
    r = run_sql(con, "FROM class_confusion")
    assert r.columns == [
        "model_version", "top1_class", "top2_class", "n",
        "mean_top1_prob", "mean_top2_prob", "mean_margin", "unknown_share",
    ]  # fmt: skip
    expected = [
        ("v1", "a", "b", 3, (0.85 + 0.8 + 0.45) / 3, (0.1 + 0.15 + 0.4) / 3, 1 / 3),
        ("v1", "b", "a", 3, (0.7 + 0.6 + 0.5) / 3, (0.2 + 0.3 + 0.3) / 3, 1 / 3),
        ("v1", "a", "c", 1, 0.95, 0.03, 1.0),
        ("v1", "c", "a", 1, 0.4, 0.35, 1.0),
    ]
    assert [row[:4] for row in r.rows] == [e[:4] for e in expected]
    for row, (*_, p1, p2, share) in zip(r.rows, expected, strict=True):
        assert row[4:] == pytest.approx((p1, p2, p1 - p2, share), abs=1e-6)


def test_views__unknowns(con):
    r = run_sql(
        con,
        "SELECT id, source, reason, top1_class, neighbor_id, neighbor_label, neighbor_source, "
        "round(neighbor_distance::DOUBLE, 4), cluster_id, batch_id FROM unknowns",
    )
    assert r.rows == [
        (3, "img3", "low_confidence", "a", 1, "b", "ref/b0.png", 0.3, None, 1),
        (5, "img5", "far_from_training", "a", 0, "a", "ref/a0.png", 0.9, None, 2),
        (7, "img7", "low_confidence", "b", 1, "b", "ref/b0.png", 0.25, None, 2),
        (8, "img8", "low_confidence+far_from_training", "c", 0, "a", "ref/a0.png", 0.8, None, 3),
    ]


def test_views__failures_open(con):
    r = run_sql(con, "SELECT source, kind, message, batch_id, model_version FROM failures_open")
    # bad.png was processed again (resolved), notes.txt is ignored, late.png: its latest failure
    assert r.rows == [
        ("gone.png", "missing", "no such file", 2, "v1"),
        ("late.png", "http_error", "HTTP 503", 3, "v1"),
    ]


def test_views__no_embedding_column(con):
    for name in VIEWS:
        assert "embedding" not in run_sql(con, f"SELECT * FROM {name} LIMIT 0").columns


def test_views_sql__persistent_and_idempotent(ws, tmp_path):
    ws2 = copy_ws(ws, tmp_path / "ws")
    w = duckdb.connect(str(ws2.root / "store.duckdb"))
    for statement in views_sql() + views_sql():  # as Store.__init__ does on every writable open
        w.execute(statement)
    w.close()
    with open_readonly(ws2) as con, open_readonly(ws) as con_temp:
        views = con.execute(
            "SELECT view_name, temporary FROM duckdb_views() WHERE NOT internal ORDER BY 1"
        ).fetchall()
        # ``embeddings`` is the store's own view over its per-dimension tables
        assert views == sorted((name, False) for name in [*VIEWS, "embeddings"])
        for name in VIEWS:  # the stored views and the temporary fallback agree
            assert run_sql(con, f"FROM {name}").rows == run_sql(con_temp, f"FROM {name}").rows


# -- opening ----------------------------------------------------------------------------------


def test_open_readonly__no_store(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=f"^no store in {tmp_path} yet: score some images first$"
    ):
        open_readonly(Workspace(tmp_path))


HOLD = textwrap.dedent(
    """
    import sys
    from imagesieve._workspace import Workspace
    from imagesieve.store import Store
    store = Store(Workspace(sys.argv[1]), check=False)
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def test_open_readonly__busy_store(ws, tmp_path):
    busy = copy_ws(ws, tmp_path / "busy")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(busy.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        expected = (
            f"the store {busy.root / 'store.duckdb'} is in use by another imagesieve process "
            f"(PID {holder.pid}); wait for it to finish, or, if it is `imagesieve serve`, use "
            "its app or REST API (/api/v1/sql, /api/v1/score)"
        )
        with pytest.raises(StoreBusyError) as err:
            open_readonly(busy)
        assert str(err.value) == expected
        out = cli("SELECT 1", "--workspace", str(busy.root), check=False)
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr == f"imagesieve sql: error: {expected}\n"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


# -- results ----------------------------------------------------------------------------------


def test_sql_result__to_dict_json_ready():
    ts = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
    u = uuid.UUID(int=1)
    r = SqlResult(
        ["ts", "d", "dec", "b", "nan", "list", "map", "u", "np"],
        [
            (
                ts,
                ts.date(),
                decimal.Decimal("1.50"),
                b"\x00\xff",
                float("nan"),
                [1, 2.5],
                {1: "x"},
                u,
                np.float32(0.5),
            )
        ],
        seconds=0.01234567,
    )
    doc = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert doc["rows"] == [
        [
            "2024-05-01T12:30:00+00:00",
            "2024-05-01",
            1.5,
            "00ff",
            None,
            [1, 2.5],
            {"1": "x"},
            str(u),
            0.5,
        ]
    ]
    assert doc["columns"] == r.columns and doc["row_count"] == 1 and doc["truncated"] is False


def test_sql_result__float32_written_short(con):
    r = run_sql(
        con, "SELECT top1_prob, [top1_prob, top2_prob] AS pair FROM predictions WHERE id = 3"
    )
    assert r.types == ["FLOAT", "FLOAT[]"]
    assert r.to_dict()["rows"] == [[0.45, [0.45, 0.4]]]
    buf = io.StringIO()
    r.to_csv(buf)
    assert buf.getvalue().splitlines() == ["top1_prob,pair", '0.45,"[0.45, 0.4]"']


def test_sql_result__to_text_aligned_and_clipped():
    r = SqlResult(["name", "n", "p"], [("a" * 50, 1, 0.5), (None, 22, None)], seconds=0.5)
    assert r.to_text(max_width=10).splitlines() == [
        "name       |  n |    p",
        "-----------+----+-----",
        "aaaaaaaaa… |  1 |  0.5",
        "NULL       | 22 | NULL",
        "(2 rows, 0.50 s)",
    ]
    r.truncated = True
    assert r.to_text().splitlines()[-1] == "(first 2 rows, more not fetched: limit reached; 0.50 s)"


# -- the CLI ----------------------------------------------------------------------------------


def cli(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "imagesieve.cli", "sql", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


QUERY = "SELECT id, source, label, top1_prob, scored_at FROM predictions WHERE id <= 3 ORDER BY id"


def test_cli_sql__table_csv_json(ws, con, tmp_path):
    expected = run_sql(con, QUERY)
    wsa = ("--workspace", str(ws.root))

    lines = cli(QUERY, *wsa).stdout.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == expected.columns
    assert [[c.strip() for c in line.split("|")][:4] for line in lines[2:5]] == [
        ["1", "img1", "a", "0.85"],
        ["2", "img2", "a", "0.8"],
        ["3", "img3", "UNKNOWN", "0.45"],
    ]
    assert lines[5].startswith("(3 rows, ")

    rows = list(csv.reader(io.StringIO(cli(QUERY, "--format", "csv", *wsa).stdout)))
    assert rows[0] == expected.columns
    assert [r[:4] for r in rows[1:]] == [
        ["1", "img1", "a", "0.85"],
        ["2", "img2", "a", "0.8"],
        ["3", "img3", "UNKNOWN", "0.45"],
    ]
    assert [dt.datetime.fromisoformat(r[4]) for r in rows[1:]] == [r[4] for r in expected.rows]

    doc = json.loads(cli("-", "--json", *wsa, stdin=QUERY).stdout)
    assert doc["columns"] == expected.columns and doc["truncated"] is False
    assert doc["rows"] == [[i, s, lab, p, ts.isoformat()] for i, s, lab, p, ts in [
        (1, "img1", "a", 0.85, expected.rows[0][4]),
        (2, "img2", "a", 0.8, expected.rows[1][4]),
        (3, "img3", "UNKNOWN", 0.45, expected.rows[2][4]),
    ]]  # fmt: skip

    out = cli("SELECT * FROM range(5000) t(i)", "--out", str(tmp_path / "all.csv"), *wsa)
    assert out.stdout.startswith(f"wrote 5000 rows x 1 columns to {tmp_path / 'all.csv'}")
    with open(tmp_path / "all.csv", newline="") as f:
        assert [r[0] for r in csv.reader(f)] == ["i", *map(str, range(5000))]

    out = cli("SELECT * FROM range(5000) t(i)", "--limit", "3", "--format", "csv", *wsa)
    assert out.stdout.split() == ["i", "0", "1", "2"]
    assert out.stderr == "imagesieve sql: note: stopped at 3 rows (--limit N for more)\n"


def test_cli_sql__errors_one_line(ws):
    out = cli("DELETE FROM predictions", "--workspace", str(ws.root), check=False)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"imagesieve sql: error: {REFUSED}DELETE\n"
    out = cli("SELECT * FROM read_csv('/etc/passwd')", "--workspace", str(ws.root), check=False)
    assert out.returncode == 2
    assert (
        out.stderr
        == f'imagesieve sql: error: Permission Error: Cannot access file "/etc/passwd" - {NO_FILES}\n'
    )


def test_cli_sql__views(tmp_path):
    from imagesieve.cli import main

    assert main(["sql", "--views", "--json", "--workspace", str(tmp_path)]) == 0
    out = cli("--views", "--workspace", str(tmp_path)).stdout.splitlines()
    assert [line.split()[0] for line in out] == list(VIEWS)
    assert main(["sql", "--workspace", str(tmp_path)]) == 2  # no query
