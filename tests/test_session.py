"""One scoring session stores images the same way for the batch runner and the server."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from test_store import embedded

from imagesieve._workspace import Workspace
from imagesieve.classifier import UNKNOWN
from imagesieve.ingest import ScoringSession
from imagesieve.search import Cluster
from imagesieve.store import Failure, Store, kept_path

COLUMNS = "source, sha256, label, reason, top1_class, top1_prob, cluster_id"


def query(store, sql, params=()) -> list[tuple]:
    with store.cursor() as con:
        return con.execute(sql, list(params)).fetchall()


def unknown(p, reason="low_confidence"):
    return replace(p, label=UNKNOWN, reason=reason)


@pytest.fixture
def store(tmp_path):
    with Store(Workspace(tmp_path / "ws")) as s:
        yield s


@pytest.mark.parametrize("journal", [False, True])
def test_session__batch_commit_and_server_journal_store_the_same_rows(store, journal):
    rng = np.random.default_rng(0)
    preds = embedded(rng, 0, 6, 16)
    preds[2] = unknown(preds[2])
    session = ScoringSession.begin(store, "v1", ["in"], {}, journal=journal)
    session.write(Counter(n_items=6, n_scored=6, n_unknown=1), new=preds[:4])
    session.write(Counter(), new=preds[2:])  # content stored meanwhile is kept once
    assert bool(store._pending) is journal  # the server's rows wait in the journal
    assert [p.id for p in preds] == [1, 2, 3, 4, 5, 6]
    assert all(session.stored(p.sha256) for p in preds)
    session.finish()
    rows = query(store, f"SELECT {COLUMNS} FROM predictions ORDER BY id")
    assert [r[0] for r in rows] == [p.source for p in preds]
    assert [r[2] for r in rows] == ["a", "a", UNKNOWN, "a", "a", "a"]
    assert query(store, "SELECT status, n_items, n_scored, n_unknown FROM batches") == [
        ("done", 6, 6, 1)
    ]


def test_session__counters_stored_at_most_every_counts_every_and_always_at_the_end(store):
    rng = np.random.default_rng(1)
    session = ScoringSession.begin(store, "v1", ["serve"], {}, counts_every=3600)
    for i in range(3):
        session.write(Counter(n_items=1, n_scored=1), new=embedded(rng, i, 1, 16))
    batch = "SELECT n_items FROM batches WHERE batch_id = ?"
    assert query(store, batch, [session.batch_id]) == [(1,)]  # the first write only
    session.finish("interrupted")
    assert query(store, batch, [session.batch_id]) == [(3,)]


def test_session__failures_recorded_and_resolved_when_their_source_is_processed(store):
    rng = np.random.default_rng(2)
    first = ScoringSession.begin(store, "v1", ["in"], {})
    first.write(Counter(n_items=1, n_failed=1), failures=[Failure("x.png", "corrupt", "bad")])
    assert [f.source for f in store.unresolved_failures()] == ["x.png"]
    again = ScoringSession.begin(store, "v1", ["in"], {})
    again.write(Counter(n_items=1, n_scored=1), new=embedded(rng, 0, 1, 16), sources=["x.png"])
    assert store.unresolved_failures() == []


@pytest.mark.parametrize(
    ("policy", "kept"),
    [("all", [True, True]), ("unknown", [False, True]), ("none", [False, False])],
)
def test_session__keep_policy(store, policy, kept):
    session = ScoringSession(store, "v1", 1, keep=policy)
    assert [session.keeps(label) for label in ("a", UNKNOWN)] == kept
    session.keep("ab" * 32, b"bytes")
    assert kept_path(store.ws, "ab" * 32).read_bytes() == b"bytes"


def test_session__new_unknowns_join_the_cluster_that_covers_them(store):
    rng = np.random.default_rng(3)
    preds = [unknown(p) for p in embedded(rng, 0, 3, 16)]
    session = ScoringSession.begin(store, "v1", ["in"], {})
    session.write(Counter(), new=preds[:1])
    centre = preds[0].embedding
    cluster = Cluster(0, np.array([preds[0].id]), centre, preds[0].id, 0.01, 1.0, {"a": 1}, {})
    store.clusters.save_run(
        "v1", np.array([preds[0].id]), np.array([0]), np.array([0.5]), [cluster], 0, {}, {}
    )
    session.reload_clusters()
    near = replace(preds[1], embedding=centre.copy(), sha256="near")
    session.write(Counter(), new=[near, preds[2]])
    assert (near.cluster_id, preds[2].cluster_id) == (0, None)
    assert query(store, "SELECT cluster_id FROM predictions ORDER BY id") == [
        (0,),
        (0,),
        (None,),
    ]
