"""A head-only retrain scores the stored history from stored head inputs, without decoding.

Real ELPV images, real versions trained with the frozen backbone, a real store and FAISS index.
"""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

from imagesieve._workspace import Workspace
from imagesieve.classifier import DuplicateRule, Predictor
from imagesieve.classifier._far import FAR_MAHALANOBIS
from imagesieve.classifier._train import TrainOptions, train_model
from imagesieve.data._elpv import export_elpv
from imagesieve.ingest import ScoreOptions, describe_history, score_history, score_inputs
from imagesieve.models import ModelVersion, get_version
from imagesieve.search import audit_log, keep_one, undo_action
from imagesieve.store import Store, kept_path


@pytest.fixture(scope="module")
def history(elpv, tmp_path_factory):
    """v1 trained on 120 mono cells; 60 other mono and 20 poly cells scored into the store."""
    rng = random.Random(1)
    mono = rng.sample([im for im in elpv if im.cell_type == "mono"], 180)
    poly = rng.sample([im for im in elpv if im.cell_type == "poly"], 20)
    root = tmp_path_factory.mktemp("history")
    data = export_elpv(
        root / "data", mono[:120], lambda im: "defective" if im.defective else "functional"
    )
    ws = Workspace(root / "ws")
    train_model(data, ws, TrainOptions())
    pics = root / "pics"
    pics.mkdir()
    for im in mono[120:] + poly:
        shutil.copyfile(im.path, pics / im.path.name)
    assert score_inputs(ws, [str(pics)]).scored == 80
    return ws, data, pics


def rows(ws: Workspace, sql: str, params=()) -> list[tuple]:
    with Store(ws, check=False) as store:
        return store._db.execute(sql, list(params)).fetchall()


def test_scoring_stores_what_the_head_read(history):
    ws, _, _ = history
    n, size = rows(ws, "SELECT count(*), min(octet_length(max_pooled)) FROM head_inputs")[0]
    assert n == 80 and size == 1280 * 2  # every row: 1280 float16 max-pooled features
    v1 = get_version(ws, "v1")
    assert v1.head_path.is_file()
    assert v1.frozen_backbone == f"efficientnet_lite0:{v1.meta['weights']}:{FAR_MAHALANOBIS}"


def test_head_only_retrain__history_redecided_without_the_images(history, tmp_path):
    ws, data, pics = history
    train_model(data, ws, TrainOptions(seed=1, activate=False))
    v2 = get_version(ws, "v2")
    expected = {p.source: p for p in Predictor(v2).score(sorted(map(str, pics.iterdir())))}
    gone = pics.rename(tmp_path / "moved")  # no original and (known images) no kept copy
    sizes = "SELECT (SELECT count(*) FROM embeddings_1280), (SELECT count(*) FROM head_inputs)"
    stored = rows(ws, sizes)
    try:
        diff = score_history(ws, "v2", "v1")
    finally:
        gone.rename(pics)
    assert diff["compared"] == 80 and diff["scored"] == 80 and diff["failed"] == 0
    # v2's rows share v1's stored features: nothing copied, and SQL sees them as v2's
    assert rows(ws, sizes) == stored
    assert rows(ws, "SELECT count(*) FROM shared_features")[0][0] == 80
    (n,) = rows(
        ws,
        "SELECT count(*) FROM embeddings JOIN predictions USING (id) WHERE model_version = 'v2'",
    )[0]
    assert n == 80
    got = rows(
        ws,
        "SELECT source, label, top1_class, top1_prob, neighbor_id, neighbor_distance "
        "FROM predictions WHERE model_version = 'v2'",
    )
    assert len(got) == 80
    threshold = Predictor(v2).rule.confidence
    for source, label, top1, prob, neighbor, distance in got:
        want = expected[source]
        assert top1 == want.top3[0][0]
        assert prob == pytest.approx(want.top3[0][1], abs=2e-3)  # float16 max-pooled features
        assert neighbor == want.neighbor_id
        assert distance == pytest.approx(want.neighbor_distance, abs=1e-5)
        if abs(want.top3[0][1] - threshold) > 2e-3:
            assert label == want.label
    # v2's index is v1's graph under v2's ids, saved as a link to v1's file and v2's ids: in
    # sync, and a search finds v2's rows
    with Store(ws) as store:
        assert store.indexes.path("v2").samefile(store.indexes.path("v1"))
        assert [c.action for c in store.indexes.checks] == ["in_sync", "in_sync"]
        index = store.indexes.get("v2")
        ids = {
            r[0]
            for r in store._db.execute(
                "SELECT id FROM predictions WHERE model_version = 'v2'"
            ).fetchall()
        }
        assert set(index.ids().tolist()) == ids
        (vector,) = store._db.execute(
            "SELECT e.embedding FROM embeddings e JOIN predictions p USING (id) "
            "WHERE p.model_version = 'v2' ORDER BY id LIMIT 1"
        ).fetchall()[0]
        found = index.search(np.asarray([vector], np.float32), 1)[0][0]
        assert int(found[0]) == min(ids)
    again = score_history(ws, "v2", "v1")  # stored once per version
    assert again["already_scored"] == 80 and again["scored"] == 0


def test_retrain_from_a_version_of_other_far_features__history_scored_from_the_images(
    history, tmp_path
):
    """A version fitted before the far distance's features changed (here: its meta names
    another distance) holds rows whose stored features the new version cannot read: its
    history is scored from the images, and an image no longer there is a stored failure."""
    import json

    ws0, data, pics = history
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(ws0.root, ws.root)
    meta_path = get_version(ws, "v1").path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["thresholds"]["far"] = "Mahalanobis distance to the nearest class (192-channel stage)"
    meta_path.write_text(json.dumps(meta))
    v2 = train_model(data, ws, TrainOptions(seed=1, activate=False)).version  # the module's
    v1 = get_version(ws, "v1")  # earlier tests may have trained versions in the copied store
    assert v1.frozen_backbone != v2.frozen_backbone
    kept = {
        sha
        for (sha,) in rows(ws, "SELECT sha256 FROM predictions WHERE model_version = 'v1'")
        if kept_path(ws, sha).is_file()
    }
    assert 0 < len(kept) < 80  # the UNKNOWNs' images are kept, the others' are not
    gone = pics.rename(tmp_path / "moved")  # no original: only the kept copies can be read
    try:
        diff = score_history(ws, v2.name, "v1")
    finally:
        gone.rename(pics)
    assert diff["scored"] == len(kept) and diff["failed"] == 80 - len(kept)
    shared = "SELECT count(*) FROM shared_features s JOIN predictions p USING (id) "
    assert rows(ws, shared + "WHERE p.model_version = ?", [v2.name])[0][0] == 0
    failed = rows(ws, "SELECT kind, message FROM failures WHERE model_version = ?", [v2.name])
    assert len(failed) == 80 - len(kept)
    assert {kind for kind, _ in failed} == {"missing"}
    assert all("no kept copy" in message for _, message in failed)
    # the rows scored carry the new version's features (the 112- and 192-channel stages)
    sizes = rows(
        ws,
        "SELECT DISTINCT octet_length(h.ood_features) FROM head_inputs h "
        "JOIN predictions p USING (id) WHERE p.model_version = ?",
        [v2.name],
    )
    assert sizes == [(4 * (112 + 192),)]


def test_head_inputs_read_with_the_old_index_are_the_stored_ones(history, monkeypatch):
    """Re-deciding takes the embeddings from the old version's index, which a fresh version
    takes over; a saved index that disagrees with DuckDB is not read (DuckDB is). A copy read
    from the file lends views of its vectors; the loaded index, which scoring may grow
    meanwhile, gives copies."""
    from imagesieve.store import _vectors

    monkeypatch.setattr(_vectors, "VIEW_MIN_IDS", 1)  # every chunk from the stored vectors
    ws, _, _ = history
    with Store(ws, check=False) as store:
        store.indexes.save()
        peeked = store.indexes.peek("v1")
        assert peeked is not None and "v1" not in store.indexes._loaded  # read, not kept
        plain = list(store.head_input_chunks("v1", "none", 32))
        fast = list(store.head_input_chunks("v1", "none", 32, peeked))
        assert [len(c.ids) for c in fast] == [len(c.ids) for c in plain] and sum(
            len(c.ids) for c in plain
        ) == store.row_count("v1")
        for a, b in zip(plain, fast, strict=True):
            assert np.array_equal(a.ids, b.ids)
            assert np.array_equal(a.embedding, b.embedding)
            assert np.array_equal(a.max_pooled, b.max_pooled)
            assert not b.embedding.flags.writeable  # a view of the copy's vectors
        # one more stored row than the saved index holds: the file is stale, not peeked
        store._db.execute("BEGIN")
        try:
            store._db.execute(
                "INSERT INTO predictions SELECT * REPLACE (10000000 AS id, 'x' AS sha256) "
                "FROM predictions WHERE model_version = 'v1' LIMIT 1"
            )
            assert store.indexes.peek("v1") is None
        finally:
            store._db.execute("ROLLBACK")
        assert store.indexes.peek("v1") is not None
        loaded = store.indexes.get("v1")
        shared = store.head_input_chunks("v1", "none", 32, loaded)
        for a, c in zip(plain, shared, strict=True):
            assert np.array_equal(a.embedding, c.embedding) and c.embedding.flags.owndata


def test_head_only_retrain__near_duplicates_judged_again_from_the_kept_candidates(
    history, tmp_path
):
    """The copies hold v1's embeddings, so v1's kept candidates stand in for a search: the new
    rule judges them without the index, and the groups are the ones a search gives."""
    from PIL import Image

    src, data, pics = history
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(src.root, ws.root)
    copies = tmp_path / "copies"
    copies.mkdir()
    for p in sorted(pics.iterdir())[:3]:  # one pixel changed: other bytes, the same look
        img = np.array(Image.open(p).convert("RGB"))
        img[0, 0] = 255 - img[0, 0]
        Image.fromarray(img).save(copies / f"copy-{p.name}")
    score_inputs(ws, [str(copies)], ScoreOptions(model="v1"))
    # a person kept the copy of the first picture, setting its original aside
    first = sorted(pics.iterdir())[0]
    with Store(ws, check=False) as store:
        by_name = dict(
            store._db.execute(
                "SELECT regexp_extract(source, '[^/]+$'), id FROM predictions "
                "WHERE model_version = 'v1'"
            ).fetchall()
        )
        store.duplicates.catch_up("v1", DuplicateRule.of_version(get_version(ws, "v1").meta))
    keep_one(ws, by_name[f"copy-{first.name}"], model="v1")
    name = train_model(data, ws, TrainOptions(seed=3, activate=False)).version.name
    rule = DuplicateRule.of_version(get_version(ws, name).meta)
    diff = score_history(ws, name, "v1", who="ops")
    assert diff["scored"] == 83 and diff["failed"] == 0
    groups = "SELECT list(sha256 ORDER BY sha256) FROM predictions WHERE model_version = ? "
    groups += "AND duplicate_group IS NOT NULL GROUP BY duplicate_group ORDER BY 1"
    got = rows(ws, groups, [name])
    assert len(got) >= 3 and all(len(g[0]) == 2 for g in got)  # each copy with its original
    # the new version keeps the same picture of that group, and says so
    aside = "SELECT regexp_extract(p.source, '[^/]+$'), regexp_extract(k.source, '[^/]+$') "
    aside += "FROM predictions p JOIN predictions k ON k.id = p.duplicate_of "
    aside += "WHERE p.model_version = ?"
    assert rows(ws, aside, [name]) == [(first.name, f"copy-{first.name}")]
    assert diff["set_aside"] == 1
    assert "still set aside: 1" in "\n".join(describe_history(diff))
    # recorded as the new version's keep-one, by whom retrained, and undone as one
    carried = audit_log(ws, limit=1)["actions"][0]
    assert carried["action"] == "keep_one" and carried["model_version"] == name
    assert carried["who"] == "ops" and carried["target"] == "v1" and carried["images"] == 1
    undo_action(ws, carried["action_id"])
    assert rows(ws, aside, [name]) == []
    undo_action(ws)  # the latest left: the keep-one made with v1
    assert rows(ws, aside, ["v1"]) == []

    def relink(like) -> list[tuple]:
        with Store(ws, check=False) as store:
            store._db.execute(
                "UPDATE predictions SET duplicate_group = NULL WHERE model_version = ?", [name]
            )
            store._db.execute(
                "DELETE FROM duplicate_pairs WHERE a IN "
                "(SELECT id FROM predictions WHERE model_version = ?)",
                [name],
            )
            store._db.execute("DELETE FROM duplicate_checks WHERE model_version = ?", [name])
            assert store.duplicates.catch_up(name, rule, like=like) == 83
            searched = name in store.indexes._loaded
        assert searched == (like is None)  # the kept candidates need no index
        return rows(ws, groups, [name])

    assert relink(("v1", DuplicateRule.of_version(get_version(ws, "v1").meta))) == got
    assert relink(None) == got


def test_rows_without_head_inputs_are_decoded_and_a_live_index_follows(history):
    ws, data, pics = history
    # rows stored by a release that kept no head inputs
    with Store(ws, check=False) as store:
        store._db.execute(
            "DELETE FROM head_inputs WHERE id IN (SELECT id FROM predictions "
            "WHERE model_version = 'v1' ORDER BY id LIMIT 30)"
        )
    name = train_model(data, ws, TrainOptions(seed=2, activate=False)).version.name
    shutil.rmtree(ws.images_dir)  # no kept copies: the UNKNOWNs of the new version need them
    with Store(ws) as store:  # one store throughout, as a server holds it
        first = sorted(map(str, pics.iterdir()))[:5]
        score_inputs(ws, first, ScoreOptions(model=name), store=store)
        assert store.indexes.get(name).ntotal == 5  # loaded, and not new any more
        diff = score_history(ws, name, "v1", store=store)
        assert diff["compared"] == 80 and diff["failed"] == 0
        assert diff["scored"] == 75 and diff["already_scored"] == 5
        assert store.indexes.get(name).ntotal == store.row_count(name) == 80
        # every row has its features: its own (decoded or scored) or shared with a v1 row
        (own, shared) = store._db.execute(
            "SELECT count(h.id), count(s.id) FROM predictions p "
            "LEFT JOIN head_inputs h USING (id) LEFT JOIN shared_features s USING (id) "
            "WHERE model_version = ?",
            [name],
        ).fetchall()[0]
        assert own + shared == 80 and own >= 30
        unknown = store._db.execute(
            "SELECT sha256 FROM predictions WHERE model_version = ? AND label = 'UNKNOWN'",
            [name],
        ).fetchall()
    # the keep policy holds for re-decided rows too: every UNKNOWN of the new version is kept
    assert unknown and all(kept_path(ws, sha).is_file() for (sha,) in unknown)


def test_only_an_untouched_backbone_is_shared(history):
    ws, _, _ = history
    v1 = get_version(ws, "v1")
    meta = {**v1.meta, "training": {**v1.meta["training"], "phase2": {"epochs": 3}}}
    assert ModelVersion(v1.path, meta).frozen_backbone is None  # fine-tuned
    other = {**v1.meta, "backbone": "resnet18"}
    assert ModelVersion(v1.path, other).frozen_backbone != v1.frozen_backbone
    # a version of other taps (the 192-channel stage alone, before) has other features
    older = {**v1.meta, "thresholds": {**v1.meta["thresholds"], "far": "Mahalanobis (192)"}}
    assert ModelVersion(v1.path, older).frozen_backbone != v1.frozen_backbone


@pytest.mark.parametrize("rank", [8, 96])  # bounds tight (low rank) / loose (isotropic)
@pytest.mark.parametrize("dims", [4, 16, 200])  # 200 >= the 96 dimensions: no projection
@pytest.mark.parametrize("small", [False, True])  # memory bounds that bite at this size
def test_nearest_above__exact_where_the_nearest_beats_the_floor(
    rank: int, dims: int, small: bool, monkeypatch
):
    from imagesieve import _faiss
    from imagesieve._faiss import nearest_above

    if small:  # blocks of 37 queries, 5 pairs at a time, the basis from 100 vectors
        monkeypatch.setattr(_faiss, "_BLOCK_FLOATS", 700 * 37)
        monkeypatch.setattr(_faiss, "_PAIRS_AT_ONCE", 5)
        monkeypatch.setattr(_faiss, "_BASIS_SAMPLE", 100)
    rng = np.random.default_rng(rank + dims)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    mix = rng.normal(size=(rank, 96))
    vectors = unit(rng.normal(size=(700, rank)) @ mix + 0.01 * rng.normal(size=(700, 96)))
    queries = np.concatenate(
        [
            unit(vectors[rng.integers(0, 700, 1500)] + 0.05 * rng.normal(size=(1500, 96))),
            unit(rng.normal(size=(1000, rank)) @ mix),
            vectors[:300],  # exact copies
        ]
    )
    sims = queries @ vectors.T
    want, top = sims.argmax(1), sims.max(1)
    # the inner product each query has elsewhere: a mix of beaten and unbeaten floors
    floor = np.where(rng.random(len(queries)) < 0.5, top - 0.02, top + 0.02).astype(np.float32)
    floor[:100], floor[100:200] = -np.inf, np.inf
    found, best = nearest_above(queries, vectors, floor, dims=dims, block=500)
    beaten = top > floor
    assert 0 < beaten.sum() < len(queries)
    assert (found[~beaten] == -1).all()
    assert (found[beaten] == want[beaten]).all()
    np.testing.assert_allclose(best[beaten], top[beaten], atol=1e-5)
    assert (best[~beaten] <= floor[~beaten] + 1e-5).all()
    empty = nearest_above(queries[:0], vectors, floor[:0])
    assert empty[0].shape == (0,) and empty[1].shape == (0,)


def test_nearest_since__the_nearer_of_the_old_nearest_and_the_added_images():
    from imagesieve.classifier._reference import ReferenceSet

    rng = np.random.default_rng(3)

    def unit(n: int) -> np.ndarray:
        x = rng.normal(size=(n, 64)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    old = ReferenceSet(unit(40), [f"o{i}" for i in range(40)], ["a"] * 40)
    mixed = np.concatenate([unit(30), old.embeddings[::-1]])  # a superset, in another order
    new = ReferenceSet(mixed, [f"n{i}" for i in range(70)], ["a"] * 70)
    queries = unit(500)
    near, dist = old.nearest(queries)
    here = new.ids_of(old)
    assert here is not None and (new.embeddings[here] == old.embeddings).all()
    got_ids, got_dist = new.nearest_since(here, queries, near[:, 0], dist[:, 0])
    want_ids, want_dist = new.nearest(queries)
    assert (got_ids == want_ids[:, 0]).all()
    np.testing.assert_allclose(got_dist, want_dist[:, 0], atol=1e-6)
    # not a superset: the caller searches everything
    assert ReferenceSet(unit(40), ["x"] * 40, ["a"] * 40).ids_of(old) is None
    assert new.nearest_since(here, queries, np.full(500, -1), dist[:, 0]) is None


def test_an_image_stored_while_the_history_is_copied__kept_once(history, tmp_path, monkeypatch):
    """A server answers uploads while a new version's history is re-decided: content an upload
    stored meanwhile is not copied again (it would break the one-row-per-content rule), and the
    version's index holds every row either way."""
    src, data, pics = history
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(src.root, ws.root)
    name = train_model(data, ws, TrainOptions(seed=4, activate=False)).version.name
    chunks = Store.head_input_chunks

    def upload_first(self, old, new, chunk, vectors=None):
        for part in chunks(self, old, new, chunk, vectors):
            first = part.table.column("source")[0].as_py()
            score_inputs(ws, [first], ScoreOptions(model=name), store=self)
            yield part

    monkeypatch.setattr(Store, "head_input_chunks", upload_first)
    with Store(ws) as store:
        diff = score_history(ws, name, "v1", store=store)
        assert diff["compared"] == 80 and diff["failed"] == 0
        assert diff["already_scored"] >= 1 and diff["scored"] + diff["already_scored"] == 80
        assert store.row_count(name) == 80
        (n,) = store._db.execute(
            "SELECT count(DISTINCT sha256) FROM predictions WHERE model_version = ?", [name]
        ).fetchall()[0]
        assert n == 80
        assert store.indexes.get(name).ntotal == 80
