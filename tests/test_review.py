"""The whole loop on real images: train on mono cells -> score a mix -> poly cells UNKNOWN ->
cluster -> promote -> retrain -> the same poly cells now known as the new class."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from imagesieve._workspace import Workspace
from imagesieve.classifier._train import TrainOptions, train_model
from imagesieve.cli import main
from imagesieve.data._elpv import export_elpv
from imagesieve.ingest import (
    HISTORY_FILE,
    ScoreOptions,
    describe_history,
    score_history,
    score_inputs,
)
from imagesieve.models import get_version, read_history, set_thresholds
from imagesieve.search._cluster import ClusterParams
from imagesieve.search._review import (
    ReviewError,
    cluster_model_path,
    list_clusters,
    promote_cluster,
    run_clustering,
    update_cluster,
)
from imagesieve.store import Store


def label(im) -> str:
    return "defective" if im.defective else "functional"


@pytest.fixture(scope="module")
def loop(elpv, tmp_path_factory):
    """Trained on 300 mono cells; scored 60 unseen mono + 400 poly cells into the store."""
    rng = random.Random(0)
    mono = rng.sample([im for im in elpv if im.cell_type == "mono"], 360)
    poly = rng.sample([im for im in elpv if im.cell_type == "poly"], 400)
    root = tmp_path_factory.mktemp("loop")
    data = export_elpv(root / "data", mono[:300], label)
    ws = Workspace(root / "ws")
    train_model(data, ws, TrainOptions())
    kind = {str(im.path): "mono" for im in mono[300:]} | {str(im.path): "poly" for im in poly}
    summary = score_inputs(ws, list(kind))
    assert summary.scored == 460
    return ws, data, kind


def rows(ws: Workspace, sql: str, params=()) -> list[tuple]:
    with Store(ws, check=False) as store:
        return store._db.execute(sql, list(params)).fetchall()


@pytest.mark.slow
def test_review_loop__poly_cells_become_a_class(loop, tmp_path, capsys):
    ws, data, kind = loop
    unknown = dict(rows(ws, "SELECT source, reason FROM predictions WHERE label = 'UNKNOWN'"))
    poly_unknown = [s for s in unknown if kind[s] == "poly"]
    assert len(poly_unknown) >= 0.95 * 400

    run = run_clustering(ws, ClusterParams(min_cluster_size=10))
    assert run.clusters, "no cluster found"
    members = dict(
        rows(ws, "SELECT source, cluster_id FROM predictions WHERE cluster_id IS NOT NULL")
    )
    biggest = run.clusters[0]["cluster_id"]
    in_biggest = [s for s, c in members.items() if c == biggest]
    assert sum(kind[s] == "poly" for s in in_biggest) >= 0.9 * len(in_biggest)
    noise = sum(c == -1 for c in members.values())
    assert noise <= 0.5 * len(members)

    # re-running keeps the ids; a name sticks to its cluster
    update_cluster(ws, biggest, name="poly")
    again = run_clustering(ws, ClusterParams(min_cluster_size=10))
    named = [c for c in again.clusters if c["name"] == "poly"]
    assert [c["cluster_id"] for c in named] == [biggest] and named[0]["status"] == "named"

    # promote every poly cluster (the operator's review) into the training data, then retrain
    poly_clusters = [
        c["cluster_id"]
        for c in again.clusters
        if sum(kind[s] == "poly" for s, m in members.items() if m == c["cluster_id"])
        > c["size"] / 2
    ]
    copied = 0
    for cid in poly_clusters:
        stray = [
            i
            for (i, s) in rows(ws, "SELECT id, source FROM predictions WHERE cluster_id = ?", [cid])
            if kind[s] == "mono"
        ]
        result = promote_cluster(ws, cid, "poly", data, exclude=tuple(stray))
        assert result.excluded == len(stray) and not result.missing
        copied += result.copied
    assert copied == len(list((data / "poly").glob("*.png"))) >= 40
    statuses = {c["cluster_id"]: c["status"] for c in list_clusters(ws)}
    assert all(statuses[c] == "promoted" for c in poly_clusters)
    # ... and leave the open work; a poly cell joining one later (as scoring places new
    # UNKNOWNs) brings it back to the open list: promoting again adds that one
    listed = {c["cluster_id"]: c for c in list_clusters(ws)}
    assert not any(listed[c]["open"] or listed[c]["pending"] for c in poly_clusters)
    noise = rows(
        ws,
        "SELECT id, source FROM predictions WHERE cluster_id = -1 AND duplicate_of IS NULL "
        "AND sha256 NOT IN (SELECT sha256 FROM labels) ORDER BY id",
    )
    late = next(i for i, s in noise if kind[s] == "poly")
    with Store(ws, check=False) as store:
        store.clusters.join([late], [poly_clusters[0]])
    back = next(c for c in list_clusters(ws) if c["cluster_id"] == poly_clusters[0])
    assert (back["status"], back["pending"], back["open"]) == ("promoted", 1, True)
    assert promote_cluster(ws, poly_clusters[0], "poly", data).copied == 1  # only the newcomer
    back = next(c for c in list_clusters(ws) if c["cluster_id"] == poly_clusters[0])
    assert (back["pending"], back["open"]) == (0, False)

    # The operator tuned v1's confidence threshold; the retrain (the CLI's, as an operator runs
    # it) asks for a non-default option and keeps the tuned threshold.
    v1 = get_version(ws, "v1")
    was = v1.meta["thresholds"]
    v1 = set_thresholds(v1, 0.61, was["distance"])
    assert v1.meta["thresholds"]["tuned"]
    args = ["train", str(data), "--workspace", str(ws.root), "--json", "--val-size", "0.25"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    v2 = get_version(ws, doc["version"])
    assert v2.name == "v2" and v2.classes == ["defective", "functional", "poly"]
    options = v2.meta["training"]["options"]
    assert options["val_size"] == 0.25  # asked for
    assert options["confidence_threshold"] == pytest.approx(0.61)  # kept from v1
    # v2 scored v1's history: every stored image, no decoding of new inputs needed to see it
    history = doc["history"]
    assert history == json.loads((v2.path / HISTORY_FILE).read_text())
    stored = rows(ws, "SELECT count(*) FROM predictions WHERE model_version = 'v1'")[0][0]
    assert history["compared"] == stored and history["failed"] == 0
    now = dict(rows(ws, "SELECT source, label FROM predictions WHERE model_version = 'v2'"))
    assert len(now) == stored
    promoted = [s for s in members if any(members[s] == c for c in poly_clusters)]
    assert sum(now[s] == "poly" for s in promoted) >= 0.9 * len(promoted)  # promoted: the new class
    assert sum(now[s] == "poly" for s in kind if kind[s] == "poly") >= 0.8 * 400
    # the diff lists them: UNKNOWNs resolved as poly, per cluster of v1
    assert history["resolved"]["poly"] >= 0.8 * 400
    assert history["unknown_after"] < history["unknown_before"]
    for cid in poly_clusters:
        assert max(history["clusters"][str(cid)], key=history["clusters"][str(cid)].get) == "poly"
    assert any("UNKNOWNs resolved: poly" in line for line in describe_history(history))
    # v1's UNKNOWNs were clustered, so v2's are, continuing v1's clusters: the loop goes on
    clustered = history["clustering"]
    assert (
        clustered["continued_from"] == "v1" and 0 < clustered["images"] <= history["unknown_after"]
    )
    assert len(list_clusters(ws, model="v2")) >= clustered["clusters"]
    # scoring it again adds nothing: the history is stored once per version
    again = score_history(ws, "v2", "v1")
    assert again["already_scored"] == stored and again["scored"] == 0
    set_thresholds(get_version(ws, "v1"), was["confidence"], was["distance"])  # for later tests


def test_review__errors_are_clear(loop, tmp_path):
    ws, data, _ = loop
    run_clustering(ws, ClusterParams(min_cluster_size=10), model="v1")
    with pytest.raises(ReviewError, match="no cluster 999 for model v1"):
        update_cluster(ws, 999, name="x", model="v1")
    some = list_clusters(ws, model="v1")[0]["cluster_id"]
    with pytest.raises(ReviewError, match="cannot be a class name"):
        promote_cluster(ws, some, "../evil", data, model="v1")
    with pytest.raises(ReviewError, match="training data folder not found"):
        promote_cluster(ws, some, "ok", tmp_path / "nope", model="v1")
    with pytest.raises(ReviewError, match="ids not in cluster"):
        update_cluster(ws, some, exclude=(10**9,), model="v1")


def test_cli__cluster_list_name_reject(loop, capsys):
    ws, data, _ = loop
    root = str(ws.root)
    assert (
        main(
            ["cluster", "--model", "v1", "--workspace", root, "--json", "--min-cluster-size", "10"]
        )
        == 0
    )
    run = json.loads(capsys.readouterr().out)
    cid = run["clusters"][-1]["cluster_id"]
    # every UNKNOWN is clustered or counted as left out, and why
    (unknown,) = rows(
        ws, "SELECT count(*) FROM predictions WHERE model_version = 'v1' AND label = 'UNKNOWN'"
    )[0]
    assert set(run["left_out"]) == {"poor_quality", "set_aside"}
    assert run["images"] + sum(run["left_out"].values()) == unknown
    assert (ws.root / "clusters" / "summary.csv").is_file()
    assert (ws.root / "clusters" / f"cluster_{cid}").is_dir()
    assert (
        main(["cluster", "--model", "v1", "--workspace", root, "--reject", str(cid), "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["status"] == "rejected"
    assert main(["cluster", "--model", "v1", "--workspace", root, "--list", "--json"]) == 0
    listed = {c["cluster_id"]: c for c in json.loads(capsys.readouterr().out)["clusters"]}
    assert listed[cid]["status"] == "rejected"
    promote = ["promote", str(cid), "--model", "v1", "--workspace", root, "--json"]
    assert main([*promote, "--name", "x", "--into", root]) == 2
    assert "was rejected; name it again to promote it" in capsys.readouterr().err

    # As the error says: named again, it is promoted, by its name into v1's training folder
    # (neither given, as REST and the app default them); undone, the folder is as it was.
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    name = ["cluster", "--model", "v1", "--workspace", root, "--json", "--name", str(cid)]
    assert main([*name, "oddities"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "named"
    assert main(promote) == 0
    done = json.loads(capsys.readouterr().out)
    assert (done["name"], Path(done["into"]), Path(done["dest"])) == (
        "oddities",
        data,
        data / "oddities",
    )
    assert done["copied"] == len(list((data / "oddities").iterdir())) > 0
    assert main(["audit", "--undo", "--workspace", root]) == 0
    assert "promoted cluster" in capsys.readouterr().out
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before

    # A cluster nobody named: the CLI asks for the name, in one line.
    with Store(ws, check=False) as store:
        was = store.clusters.review_state("v1", cid)
        store.clusters.restore("v1", cid, {"status": "new", "name": None, "promoted_into": None})
    try:
        assert main(promote) == 2
        assert f"cluster {cid} has no name yet: give the class name" in capsys.readouterr().err
    finally:
        with Store(ws, check=False) as store:
            store.clusters.restore("v1", cid, was)


def test_score__new_unknowns_join_clusters_and_ids_stay_stable(loop, elpv):
    ws, _, kind = loop
    run = run_clustering(ws, ClusterParams(min_cluster_size=10), model="v1")
    live = {c["cluster_id"] for c in run.clusters}
    fresh = [str(im.path) for im in elpv if im.cell_type == "poly" and str(im.path) not in kind][
        :80
    ]
    score_inputs(ws, fresh, ScoreOptions(model="v1"))
    got = rows(
        ws,
        "SELECT cluster_id FROM predictions WHERE model_version = 'v1' AND source IN "
        f"({', '.join('?' * len(fresh))})",
        fresh,
    )
    assert len(got) == 80
    assert all(c is None or c in live for (c,) in got)  # never noise (-1) before a run
    assert sum(c in live for (c,) in got) >= 0.3 * 80
    # and a second run with those images added keeps every cluster's id
    rerun = run_clustering(ws, ClusterParams(min_cluster_size=10), model="v1")
    before = {c["cluster_id"]: c["size"] for c in run.clusters}
    after = {c["cluster_id"]: c["size"] for c in rerun.clusters}
    # UMAP's layout changes with the added images, so small clusters may merge (the merged one
    # keeps the id of the largest contributor). Measured: 5 of 12 clusters merged into one, the
    # ids of 72% of the clustered images continue (all of them with PCA alone, before UMAP).
    kept = sum(size for cid, size in before.items() if cid in after)
    assert kept >= 0.7 * sum(before.values())
    assert len(after) >= 0.5 * len(before)
    assert sum(after.values()) >= sum(before.values())
    moved = rows(
        ws,
        "SELECT count(*) FILTER (cluster_id IS NOT NULL AND cluster_id >= 0) FROM predictions "
        f"WHERE model_version = 'v1' AND source IN ({', '.join('?' * len(fresh))})",
        fresh,
    )
    assert moved[0][0] >= sum(c in live for (c,) in got)


def test_run_clustering__no_unknowns_yet_is_an_empty_run(trained, tmp_path):
    ws_trained, _ = trained
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(ws_trained.models_dir, ws.models_dir)
    run = run_clustering(ws, model="v1")
    assert (run.images, run.noise, run.clusters) == (0, 0, [])
    assert list_clusters(ws, model="v1") == []


def test_run_clustering__a_new_version_continues_the_clusters_of_the_one_before(
    scoring_ws, elpv, capsys
):
    """Same embedding (a head-only retrain): its first run keeps the old ids, names, status.

    Scoring the history clusters the new version's UNKNOWNs at once when the old version's
    were clustered; otherwise its first clustering run (here by the CLI) does it."""
    ws = scoring_ws
    rng = random.Random(3)
    poly = rng.sample([im for im in elpv if im.cell_type == "poly"], 60)
    score_inputs(ws, [str(im.path) for im in poly])
    shutil.copytree(ws.models_dir / "v1", ws.models_dir / "v2")  # the same model again
    assert "clustering" not in score_history(ws, "v2", "v1")  # v1 not clustered yet
    before = run_clustering(ws, ClusterParams(min_cluster_size=5), model="v1")
    assert before.clusters and before.continued_from is None and before.continued_words() == ""
    first = before.clusters[0]["cluster_id"]
    update_cluster(ws, first, name="brand X", model="v1")
    assert (
        main(["cluster", "--model", "v2", "--min-cluster-size", "5", "--workspace", str(ws.root)])
        == 0
    )
    assert "continuing v1's clusters: their ids and names carry over" in capsys.readouterr().out
    after = {c["cluster_id"]: c for c in list_clusters(ws, model="v2")}
    old = {c["cluster_id"]: c for c in list_clusters(ws, model="v1")}
    assert set(after) == {c for c in old if old[c]["size"]}  # the same groups, the same ids
    assert (after[first]["name"], after[first]["status"]) == ("brand X", "named")
    assert all(after[c]["size"] == old[c]["size"] for c in after)
    # a later run of v2 continues v2's own clusters (nothing more is carried)
    update_cluster(ws, first, name="brand Y", model="v2")
    again = run_clustering(ws, ClusterParams(min_cluster_size=5), model="v2")
    assert again.continued_from is None
    assert next(c for c in again.clusters if c["cluster_id"] == first)["name"] == "brand Y"
    # a version scoring the history of a clustered one starts clustered, as that one was
    shutil.copytree(ws.models_dir / "v1", ws.models_dir / "v3")
    exported = (ws.root / "clusters" / "summary.csv").read_bytes()
    assert b"brand Y" in exported  # v2's names; v3 continues v1's ("brand X")
    args = ["score", "--history-of", "v1", "--model", "v3", "--workspace", str(ws.root)]
    assert main(args) == 0
    n = len(before.clusters)
    assert (
        f"UNKNOWNs clustered as with v1: {n} cluster{'s' * (n != 1)} among {before.images} images, "
        "continuing v1's" in capsys.readouterr().out
    )
    diff = read_history(get_version(ws, "v3"))
    assert diff["clustering"]["continued_from"] == "v1" and diff["clustering"]["clusters"] == n
    third = {c["cluster_id"]: c for c in list_clusters(ws, model="v3")}
    assert set(third) == set(after) and third[first]["name"] == "brand X"
    with Store(ws, check=False) as store:  # with v1's parameters
        assert store.clusters.last_params("v3")["min_cluster_size"] == 5
    # v3 is not active: the exported folders stay the active version's
    assert (ws.root / "clusters" / "summary.csv").read_bytes() == exported
    # a clustering that fails leaves the history scored and says how to go on
    shutil.copytree(ws.models_dir / "v1", ws.models_dir / "v4")
    cluster_model_path(ws, "v4").mkdir(parents=True)  # where its model goes: not writable
    diff = score_history(ws, "v4", "v1")
    assert diff["scored"] == 60 and "Is a directory" in diff["clustering"]["error"]
    assert read_history(get_version(ws, "v4")) == diff
    assert describe_history(diff)[-1].startswith("UNKNOWNs not clustered (")
    assert describe_history(diff)[-1].endswith("): run `imagesieve cluster`")
