"""Review over the store: browse it by filters, and actions recorded and undoable (relabel,
cluster actions, thresholds, activation) from the library, the CLI and the API.

Real store, real model, real ELPV images; undo must put the store and the training folder back
exactly (every file's path and content).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import openpyxl
import pytest
import requests
from cliserver import settled  # tests/ is on sys.path under pytest

from imagesieve._access import parse_tokens
from imagesieve._errors import UserError
from imagesieve._workspace import Workspace
from imagesieve.app import Service
from imagesieve.app._server import start_server
from imagesieve.app.ui._model import _metrics_md
from imagesieve.classifier import UNKNOWN
from imagesieve.cli import main
from imagesieve.data import scan_image_folder
from imagesieve.ingest import batch_detail, batch_report, list_batches, score_inputs
from imagesieve.models import active_version, get_version
from imagesieve.search import (
    ClusterParams,
    ReviewError,
    activate_model,
    apply_thresholds,
    audit_log,
    browse_images,
    compute_map,
    map_points,
    promote_cluster,
    relabel_images,
    run_clustering,
    threshold_counts,
    undo_action,
    update_cluster,
)
from imagesieve.store import ImageQuery, Store


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> SHA-256), and every folder (-> 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def existing_classes(data: Path) -> list[str]:
    return [p.name for p in data.iterdir() if p.is_dir()]


def stored(ws: Workspace, sql: str, params=()) -> list[tuple]:
    with Store(ws, check=False) as store:
        return store._db.execute(sql, list(params)).fetchall()


@pytest.fixture
def review(trained, small_folder, elpv, tmp_path):
    """A workspace with the trained model, 40 scored images (mono and poly), a private data copy."""
    ws_trained, _ = trained
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(ws_trained.models_dir, ws.models_dir)
    data = tmp_path / "data"
    shutil.copytree(small_folder, data)
    mono = [im for im in elpv if im.cell_type == "mono"][200:220]
    poly = [im for im in elpv if im.cell_type == "poly"][:20]
    summary = score_inputs(ws, [str(im.path) for im in mono + poly])
    assert summary.scored == 40
    ids = dict(stored(ws, "SELECT source, id FROM predictions"))
    return ws, data, [ids[str(im.path)] for im in mono], [ids[str(im.path)] for im in poly]


def test_relabel__copies_into_the_class_and_undo_restores_the_folder_exactly(review):
    ws, data, mono, poly = review
    before = tree(data)
    result = relabel_images(ws, poly[:5], "poly", into=data, who="app:ana")
    assert (result.labelled, result.copied, result.unchanged, result.moved) == (5, 5, 0, 0)
    assert len(list((data / "poly").iterdir())) == 5
    labels = stored(ws, "SELECT id, label FROM labels ORDER BY id")
    assert labels == [(i, "poly") for i in sorted(poly[:5])]
    # the next training run's data has them under the new class
    folder = scan_image_folder(data)
    assert "poly" in folder.classes and sum(s.label == "poly" for s in folder.samples) == 5

    # again: nothing changes; one of them to another class: moved, not copied twice
    again = relabel_images(ws, poly[:5], "poly", into=data)
    assert (again.labelled, again.unchanged, again.copied) == (0, 5, 0)
    moved = relabel_images(ws, poly[:1], "defective", into=data, who="api:127.0.0.1")
    assert (moved.moved, moved.copied) == (1, 1)
    assert len(list((data / "poly").iterdir())) == 4

    log = audit_log(ws)
    assert log["total"] == 3
    newest = log["actions"][0]
    assert newest["action"] == "relabel" and newest["who"] == "api:127.0.0.1"
    assert newest["images"] == 1 and newest["undoable"]

    # the first relabel cannot be undone before the later one that moved the same image
    with pytest.raises(ReviewError, match="undo it first"):
        undo_action(ws, result.action_id)
    undone = undo_action(ws)  # the latest: the move
    assert undone["action"] == "undo" and f"undid {moved.action_id}" in undone["summary"]
    assert len(list((data / "poly").iterdir())) == 5
    assert stored(ws, "SELECT label FROM labels WHERE id = ?", [poly[0]]) == [("poly",)]
    undo_action(ws, again.action_id)  # changed nothing: undoing it changes nothing
    undo_action(ws, result.action_id)
    assert tree(data) == before  # the folder as it was: files, contents, no empty poly/
    assert stored(ws, "SELECT count(*) FROM labels") == [(0,)]
    with pytest.raises(ReviewError, match="already undone"):
        undo_action(ws, result.action_id)
    with pytest.raises(ReviewError, match="is an undo"):
        undo_action(ws, audit_log(ws)["actions"][0]["action_id"])
    with pytest.raises(ReviewError, match="nothing to undo"):
        undo_action(ws)


def test_relabel__unknown_takes_an_image_out_of_its_class_and_undo_puts_it_back(review):
    ws, data, mono, poly = review
    relabel_images(ws, poly[:3], "poly", into=data)
    after_poly = tree(data)
    result = relabel_images(ws, poly[:2] + mono[:1], "unknown", into=data, who="app:ana")
    assert (result.label, result.labelled, result.moved, result.copied) == (UNKNOWN, 3, 2, 0)
    assert len(list((data / "poly").iterdir())) == 1  # no class keeps them; none gets them
    labels = dict(stored(ws, "SELECT id, label FROM labels"))
    assert [labels[i] for i in poly[:3] + mono[:1]] == [UNKNOWN, UNKNOWN, "poly", UNKNOWN]
    assert not any(p.name == UNKNOWN for p in data.iterdir())
    undo_action(ws)
    assert tree(data) == after_poly
    assert dict(stored(ws, "SELECT id, label FROM labels")) == {i: "poly" for i in poly[:3]}


def test_relabel__bad_requests_are_refused_and_change_nothing(review):
    ws, data, mono, poly = review
    before = tree(data)
    for ids, label, message in [
        ([], "poly", "no images"),
        ([999_999], "poly", "no stored image"),
        (poly[:1], "../up", "cannot be a class name"),
        (poly[:1], ".hidden", "cannot be a class name"),
    ]:
        with pytest.raises(ReviewError, match=message):
            relabel_images(ws, ids, label, into=data)
    with pytest.raises(ReviewError, match="not found"):
        relabel_images(ws, poly[:1], "poly", into=data / "nope")
    assert tree(data) == before and audit_log(ws)["total"] == 0


def test_cluster_actions__promote_name_reject_exclude_are_undone(review):
    ws, data, mono, poly = review
    apply_thresholds(ws, 1.0, None)  # every image UNKNOWN, so there are clusters to review
    run = run_clustering(ws, ClusterParams(min_cluster_size=5))
    assert run.clusters, "no cluster to review"
    cid = run.clusters[0]["cluster_id"]
    members = [i for (i,) in stored(ws, "SELECT id FROM predictions WHERE cluster_id = ?", [cid])]
    before_tree = tree(data)
    state = lambda: stored(  # noqa: E731
        ws,
        "SELECT status, name, promoted_into FROM clusters WHERE cluster_id = ?",
        [cid],
    )
    fresh = state()

    update_cluster(ws, cid, name="poly", who="app:ana")
    update_cluster(ws, cid, exclude=(members[0],))
    result = promote_cluster(ws, cid, "poly", data, who="app:ana")
    assert result.copied == len(members) - 1 and result.excluded == 1
    assert state()[0][0] == "promoted"
    assert stored(ws, "SELECT count(*) FROM labels WHERE label = 'poly'") == [(len(members) - 1,)]
    actions = [a["action"] for a in audit_log(ws)["actions"]]
    assert actions == ["promote", "exclude", "name", "thresholds"]

    undo_action(ws)  # promote
    assert tree(data) == before_tree and state()[0][:2] == ("named", "poly")
    assert stored(ws, "SELECT count(*) FROM labels") == [(0,)]
    undo_action(ws)  # exclude
    assert stored(ws, "SELECT count(*) FROM cluster_exclusions") == [(0,)]
    undo_action(ws)  # name
    assert state() == fresh

    update_cluster(ws, cid, reject=True)
    assert state()[0][0] == "rejected"
    undo_action(ws)
    assert state() == fresh

    # merge: promoted under an existing class's name, it joins that class's folder
    existing = sorted(p.name for p in (data / "functional").iterdir())
    merged = promote_cluster(ws, cid, "functional", data)
    assert merged.dest == str(data / "functional") and merged.copied == len(members)
    added = sorted(p.name for p in (data / "functional").iterdir())
    assert set(existing) < set(added) and len(added) - len(existing) == merged.copied
    assert state()[0] == ("promoted", "functional", str(data / "functional"))
    assert [c for c in scan_image_folder(data).classes] == sorted(existing_classes(data))
    undo_action(ws)
    assert tree(data) == before_tree and state() == fresh

    # a member a person had put in another class leaves it when the cluster is promoted
    relabel_images(ws, members[:1], "defective", into=data)
    in_defective = tree(data)
    moved = promote_cluster(ws, cid, "poly", data)
    assert moved.moved == 1 and moved.copied == len(members)
    assert tree(data).keys() - in_defective.keys() == {
        p for p in tree(data) if p.startswith("poly")
    }
    assert len(in_defective.keys() - tree(data).keys()) == 1  # out of defective/
    undo_action(ws)
    assert tree(data) == in_defective


def test_thresholds_and_activation__undone_exactly(review):
    ws, data, mono, poly = review
    version = get_version(ws, None)
    meta_before = (version.path / "meta.json").read_text()
    labels_before = stored(ws, "SELECT id, label, reason FROM predictions ORDER BY id")
    was_unknown = sum(label == UNKNOWN for _, label, _ in labels_before)
    counts = apply_thresholds(ws, 1.0, None, who="local:test")
    n = counts["unknown"]
    assert n == counts["low_confidence"] and 30 <= n > was_unknown and counts["stored"] == 40
    assert stored(ws, f"SELECT count(*) FROM predictions WHERE label = '{UNKNOWN}'") == [(n,)]
    # ... and on the version's held-out test images, all of known classes: every one
    tested = version.meta["metrics"]["n"]
    assert (counts["held_out"]["images"], counts["held_out"]["unknown"]) == (tested, tested)
    assert counts["held_out"]["vs_target"]["verdict"] == "above"
    preview = threshold_counts(ws, 0.0, None, keep=False)
    assert preview["counts"]["unknown"] == 0 and preview["counts"]["unknown_now"] == n
    assert preview["counts"]["held_out"]["by_rule"]["low_confidence"] == 0
    assert threshold_counts(ws)["tuned"] is True
    # the Model tab judges the operator's thresholds, beside what training measured
    tab = _metrics_md(get_version(ws, None))
    assert f"The thresholds an operator set mark {tested} of the {tested} held-out" in tab
    assert "**Off target**" in tab and "more than chance explains" in tab
    assert "**Open-set report card** at the thresholds an operator set" in tab
    assert "flagged UNKNOWN **100%** of the time" in tab  # confidence 1: everything
    undo_action(ws)
    assert (version.path / "meta.json").read_text() == meta_before
    own = threshold_counts(ws)["counts"]["held_out"]
    assert own["vs_target"] == version.meta["metrics"]["unknown_vs_target"]
    assert "The thresholds an operator set" not in _metrics_md(get_version(ws, None))
    assert stored(ws, "SELECT id, label, reason FROM predictions ORDER BY id") == labels_before

    # a second version to switch between (a copy of the first, as a retrain would add)
    shutil.copytree(version.path, ws.models_dir / "v2")
    meta = json.loads((ws.models_dir / "v2" / "meta.json").read_text())
    (ws.models_dir / "v2" / "meta.json").write_text(json.dumps(meta | {"version": "v2"}))
    assert activate_model(ws, "v2") == "v2" and active_version(ws).name == "v2"
    undo_action(ws)
    assert active_version(ws).name == version.name
    with pytest.raises(UserError, match="no model version 'v9'"):
        activate_model(ws, "v9")


def test_cli__relabel_audit_undo_thresholds(review, capsys):
    ws, data, mono, poly = review
    args = ["--workspace", str(ws.root)]
    ids = ",".join(map(str, poly[:3]))
    assert main(["relabel", ids, "--label", "poly", "--into", str(data), *args]) == 0
    out = capsys.readouterr().out
    assert "3 images labelled poly" in out and "imagesieve audit --undo 1" in out
    assert main(["relabel", "1,x", "--label", "poly", *args]) == 2
    assert "whole numbers" in capsys.readouterr().err

    # what each rate costs and catches; training's own rate gives training's thresholds
    assert main(["thresholds", "--tradeoff", *args, "--json"]) == 0
    table = {r["target"]: r for r in json.loads(capsys.readouterr().out)["rates"]}
    assert list(table) == [0.01, 0.02, 0.05, 0.1, 0.2]
    version = get_version(ws, None)
    own = table[0.05]
    assert (own["confidence"], own["distance"]) == (
        version.confidence_threshold,
        version.distance_threshold,
    )
    assert own["test_unknown_rate"] == round(version.meta["metrics"]["unknown_rate"], 4)
    assert own["new_type_recall"] == version.meta["open_set"]["mean_recall"]
    rates = [table[r]["test_unknown_rate"] for r in table]
    assert rates == sorted(rates) and table[0.2]["distance"] <= table[0.01]["distance"]
    assert main(["thresholds", "--tradeoff", *args]) == 0
    assert "apply one: imagesieve thresholds --set-target RATE" in capsys.readouterr().out
    assert main(["thresholds", "--preview", "1", "off", *args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    n = doc["counts"]["unknown"]
    assert n >= 30 and doc["distance"] is None and doc["counts"]["stored"] == 40
    assert main(["thresholds", "--set", "1", "off", *args]) == 0
    out = capsys.readouterr().out
    assert f"mark {n} of 40 stored images UNKNOWN" in out
    tested = get_version(ws, None).meta["metrics"]["n"]
    assert f"mark {tested:,} of the {tested:,} held-out test images of known classes" in out
    # the version list judges its test images at the thresholds it has now
    assert main(["models", *args, "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)["versions"]
    assert (listed["unknown_rate"], listed["thresholds_tuned"]) == (1.0, True)
    assert main(["models", *args]) == 0
    assert "test UNKNOWN 100.0%, thresholds tuned" in capsys.readouterr().out
    assert main(["thresholds", "--set", "1.5", "off", *args]) == 2
    assert "confidence" in capsys.readouterr().err
    # thresholds for another false-UNKNOWN rate, as training would calibrate them
    assert main(["thresholds", "--target", "20%", *args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    found = doc["calibrated"]
    assert (doc["confidence"], doc["distance"]) == (found["confidence"], found["distance"])
    assert found["target"] == 0.2 and doc["counts"]["held_out"]["vs_target"]["target"] == 0.2
    assert get_version(ws, None).confidence_threshold == 1.0  # a preview changes nothing
    assert main(["thresholds", "--set-target", "0.2", *args]) == 0
    out = capsys.readouterr().out
    assert "calibrated for 20.0% false UNKNOWN" in out and "(applied)" in out
    assert "report card: a never-seen type would be" in out
    now = get_version(ws, None)
    assert (now.confidence_threshold, now.distance_threshold) == (
        found["confidence"],
        found["distance"],
    )
    assert now.meta["thresholds"]["target"] == 0.2
    assert main(["thresholds", "--target", "150%", *args]) == 2
    assert "must be a share within (0, 1)" in capsys.readouterr().err

    assert main(["audit", *args, "--json"]) == 0
    log = json.loads(capsys.readouterr().out)
    assert [a["action"] for a in log["actions"]] == ["thresholds", "thresholds", "relabel"]
    assert all(a["who"].startswith("local:") for a in log["actions"])
    assert main(["audit", "--undo", *args]) == 0  # the rate's thresholds: the 1 / off ones back
    assert "undid 3" in capsys.readouterr().out
    back = get_version(ws, None)
    assert back.confidence_threshold == 1.0 and "target" not in back.meta["thresholds"]
    assert main(["audit", "--undo", *args]) == 0
    assert "undid 2" in capsys.readouterr().out
    assert main(["audit", "--undo", "1", *args]) == 0
    assert not (data / "poly").exists()
    assert main(["audit", "--undo", "1", *args]) == 2
    assert "already undone" in capsys.readouterr().err


def test_api__drives_the_review_loop_with_undo(review, tmp_path):
    ws, data, mono, poly = review
    version = get_version(ws, None)
    meta = json.loads((version.path / "meta.json").read_text())
    meta["data"]["root"] = str(data)  # this test's own training folder, not the session's
    (version.path / "meta.json").write_text(json.dumps(meta))
    with Store(ws, check=False) as store:  # every image UNKNOWN, so there are clusters to review
        store._db.execute("UPDATE predictions SET label = 'UNKNOWN', reason = 'low_confidence'")
        store._db.execute("UPDATE predictions SET quality_flags = 'dark' WHERE id = ?", [mono[0]])
    before = tree(data)
    with Service(ws) as service:
        server = start_server(service, ui=False)
        base = server.url + "/api/v1"
        try:
            # clustering through the API: in the background, one run at a time
            with service._clustering:  # as while the app's button runs
                r = requests.post(f"{base}/clusters/run", json={}, timeout=30)
                assert r.status_code == 409 and "running already" in r.text
            r = requests.post(f"{base}/clusters/run", json={"min_cluster_size": 5}, timeout=30)
            assert r.status_code == 202 and r.json()["running"] is True
            run = settled(f"{base}/clusters/run")["run"]
            assert (run["images"], run["left_out"]) == (39, {"poor_quality": 1, "set_aside": 0})
            assert run["params"]["min_cluster_size"] == 5 and run["clusters"]
            clusters = requests.get(f"{base}/clusters", timeout=30).json()["clusters"]
            assert [c["cluster_id"] for c in clusters] == [c["cluster_id"] for c in run["clusters"]]
            cid = clusters[0]["cluster_id"]
            page = requests.get(
                f"{base}/clusters/{cid}/members", params={"limit": 2, "offset": 1}, timeout=30
            ).json()
            everyone = requests.get(f"{base}/clusters/{cid}/members", timeout=30).json()
            assert [m["id"] for m in page["members"]] == [m["id"] for m in everyone["members"]][1:3]
            left_out = everyone["members"][0]["id"]
            r = requests.post(f"{base}/images/exclude", json={"ids": [left_out]}, timeout=30)
            assert r.status_code == 200 and r.json() == {
                "clusters": {str(cid): 1},
                "not_in_cluster": 0,
            }
            r = requests.post(f"{base}/clusters/{cid}/name", json={"name": "poly"}, timeout=30)
            assert r.status_code == 200 and r.json()["name"] == "poly"
            r = requests.post(f"{base}/clusters/{cid}/promote", json={}, timeout=60)
            assert r.status_code == 200, r.text
            assert r.json()["copied"] == len(everyone["members"]) - 1
            assert (data / "poly").is_dir()
            r = requests.post(
                f"{base}/images/relabel", json={"ids": mono[:2], "label": "functional"}, timeout=30
            )
            assert r.status_code == 200 and r.json()["labelled"] == 2

            r = requests.get(f"{base}/thresholds", timeout=30).json()
            assert r["version"] == version.name and r["counts"]["stored"] == 40
            r = requests.post(f"{base}/thresholds/preview", json={"confidence": 1.0}, timeout=30)
            n = r.json()["unknown"]
            assert n >= 30
            r = requests.put(f"{base}/thresholds", json={"confidence": 1.0}, timeout=30)
            assert r.status_code == 200 and r.json()["unknown_now"] == n
            assert r.json()["held_out"]["rate"] == 1.0
            assert requests.get(f"{base}/thresholds", timeout=30).json()["tuned"] is True
            # the version list judges the test images at the thresholds the version has now
            listed = requests.get(f"{base}/versions", timeout=30).json()["versions"]
            now = next(v for v in listed if v["version"] == version.name)
            assert now["thresholds_tuned"] and now["unknown_rate"] == 1.0
            assert now["unknown_vs_target"]["verdict"] == "above"
            # thresholds for another rate: previewed and applied like any, the rate recorded
            found = requests.get(f"{base}/thresholds/calibrated?target=0.2", timeout=30).json()
            assert found["target"] == 0.2 and found["calibration"]["false_unknown_rate"] == 0.2
            asked = {k: found[k] for k in ("confidence", "distance", "target")}
            r = requests.post(f"{base}/thresholds/preview", json=asked, timeout=30)
            assert r.status_code == 200 and r.json()["held_out"]["vs_target"]["target"] == 0.2
            assert 0 <= r.json()["report_card"]["mean_recall"] <= 1
            r = requests.put(f"{base}/thresholds", json=asked, timeout=30)
            assert r.status_code == 200, r.text
            assert get_version(ws, None).meta["thresholds"]["target"] == 0.2
            for bad in ("0", "1", "2", "x", "nan"):
                r = requests.get(f"{base}/thresholds/calibrated?target={bad}", timeout=30)
                assert r.status_code == 422, (bad, r.status_code)
                r = requests.get(f"{base}/thresholds/tradeoff?rate=0.05&rate={bad}", timeout=30)
                assert r.status_code == 422, (bad, r.status_code)
            r = requests.get(f"{base}/thresholds/tradeoff?rate=0.1&rate=0.05", timeout=30)
            assert [row["target"] for row in r.json()["rates"]] == [0.05, 0.1]
            many = "&".join(f"rate=0.{i:02d}" for i in range(1, 22))
            assert requests.get(f"{base}/thresholds/tradeoff?{many}", timeout=30).status_code == 422
            r = requests.put(f"{base}/thresholds", json={**asked, "target": 1.5}, timeout=30)
            assert r.status_code == 422

            log = requests.get(f"{base}/audit", timeout=30).json()
            assert [a["action"] for a in log["actions"]] == [
                "thresholds",
                "thresholds",
                "relabel",
                "promote",
                "name",
                "exclude",
            ]
            assert all(a["who"] == "api:127.0.0.1" for a in log["actions"])
            for _ in range(6):
                r = requests.post(f"{base}/audit/undo", json={}, timeout=60)
                assert r.status_code == 200, r.text
            assert tree(data) == before
            assert requests.get(f"{base}/thresholds", timeout=30).json()["tuned"] is False
            assert service.predictor.version.confidence_threshold == version.confidence_threshold
            r = requests.post(f"{base}/audit/undo", json={"action_id": 1}, timeout=30)
            assert r.status_code == 409 and "already undone" in r.json()["error"]["message"]

            # hostile or wrong bodies: JSON errors, nothing written
            for path, body, status in [
                ("/images/relabel", {"ids": [], "label": "x"}, 422),
                ("/images/relabel", {"ids": [1], "label": "a/b"}, 400),
                ("/images/relabel", {"ids": [1], "label": "x" * 101}, 422),
                ("/images/relabel", {"ids": list(range(50_001)), "label": "x"}, 422),
                ("/images/exclude", {"ids": []}, 422),
                ("/images/exclude", {"ids": [999_999]}, 400),
                (f"/clusters/{cid}/name", {"name": ".."}, 400),
                ("/clusters/9999/name", {"name": "x"}, 400),
                ("/clusters/9999/promote", {"name": "x"}, 400),
                ("/clusters/run", {"min_cluster_size": 1}, 422),
                ("/clusters/run", {"poor_quality": "maybe"}, 422),
                ("/audit/undo", {"action_id": 0}, 422),
                ("/audit/undo", {"action_id": 99}, 400),
            ]:
                r = requests.post(base + path, json=body, timeout=30)
                assert r.status_code == status, (path, r.status_code, r.text)
                assert "error" in r.json() and "Traceback" not in r.text
            r = requests.put(f"{base}/thresholds", json={"confidence": 2}, timeout=30)
            assert r.status_code == 422
            r = requests.post(f"{base}/versions/..%2f/activate", timeout=30)
            assert r.status_code in (400, 404, 422)
            assert tree(data) == before

            versions = requests.get(f"{base}/versions", timeout=30).json()["versions"]
            assert [v["version"] for v in versions if v["active"]] == [version.name]
            schema = requests.get(f"{base}/openapi.json", timeout=30).json()
            for path in (
                "/api/v1/images/relabel",
                "/api/v1/images/exclude",
                "/api/v1/clusters/{cluster_id}/promote",
                "/api/v1/clusters/run",
                "/api/v1/audit/undo",
                "/api/v1/thresholds",
                "/api/v1/retrain",
                "/api/v1/versions/{name}/activate",
            ):
                assert path in schema["paths"], path
            body = schema["paths"]["/api/v1/images/relabel"]["post"]["requestBody"]
            assert body["required"] is True
        finally:
            server.stop()


def test_browse__filters_sort_pages_and_facets(review):
    ws, data, mono, poly = review
    apply_thresholds(ws, 0.9, None)
    everything = browse_images(ws, limit=500)
    assert everything["total"] == 40 and len(everything["rows"]) == 40
    facets = dict(map(tuple, everything["facets"]["label"]))
    assert sum(facets.values()) == 40
    unknown = browse_images(ws, ImageQuery(labels=(UNKNOWN,)), limit=500)
    assert unknown["total"] == facets.get(UNKNOWN, 0) > 0
    assert all(r["label"] == UNKNOWN and r["reason"] for r in unknown["rows"])
    low = browse_images(ws, ImageQuery(reasons=("low_confidence",)), limit=500)
    assert all("low_confidence" in r["reason"] for r in low["rows"]) and low["total"] > 0

    # pages never overlap and cover everything, in the order asked
    seen = []
    for offset in range(0, 40, 7):
        page = browse_images(ws, ImageQuery(sort="-confidence"), limit=7, offset=offset)
        seen += page["rows"]
    assert sorted(r["id"] for r in seen) == sorted(mono + poly)
    probs = [r["top1_prob"] for r in seen]
    assert probs == sorted(probs, reverse=True)
    far = browse_images(ws, ImageQuery(sort="-distance", min_distance=0.0), limit=3)["rows"]
    assert far[0]["neighbor_distance"] >= far[-1]["neighbor_distance"]
    band = browse_images(ws, ImageQuery(min_confidence=0.5, max_confidence=0.95), limit=500)
    assert all(0.5 <= r["top1_prob"] <= 0.95 for r in band["rows"])

    # the label a person gave is a facet and a filter
    relabel_images(ws, poly[:3], "poly", into=data)
    mine = browse_images(ws, ImageQuery(human_labels=("poly",)), limit=500)
    assert sorted(r["id"] for r in mine["rows"]) == sorted(poly[:3])
    nobody = browse_images(ws, ImageQuery(human_labels=("",)), limit=500)
    assert nobody["total"] == 37
    assert ["poly", 3] in browse_images(ws)["facets"]["human_label"]
    assert browse_images(ws, ImageQuery(ids=tuple(mono[:2])))["total"] == 2

    for bad, message in [
        (lambda: ImageQuery(sort="name; DROP TABLE predictions"), "sort must be one of"),
        (lambda: ImageQuery(min_confidence=0.9, max_confidence=0.1), "is above"),
        (lambda: browse_images(ws, limit=501), "1 to 500"),
        (lambda: browse_images(ws, offset=-1), "0 or more"),
    ]:
        with pytest.raises(UserError, match=message):
            bad()


def test_cli_and_api__browse(review, capsys):
    ws, data, mono, poly = review
    assert main(["images", "--workspace", str(ws.root), "--sort=-id", "--limit", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "images 1-5 of 40" and out[0].split()[0] == str(max(mono + poly))
    with pytest.raises(SystemExit):  # argparse: not one of the sort keys
        main(["images", "--workspace", str(ws.root), "--sort", "nope"])
    assert "invalid choice" in capsys.readouterr().err
    with Service(ws) as service:
        server = start_server(service, ui=False)
        base = server.url + "/api/v1"
        try:
            r = requests.get(
                f"{base}/images",
                params={"sort": "confidence", "limit": 4, "offset": 2, "label": ["functional"]},
                timeout=30,
            ).json()
            assert (
                r["offset"] == 2 and len(r["rows"]) <= 4 and r["query"]["labels"] == ["functional"]
            )
            assert all(row["label"] == "functional" for row in r["rows"])
            assert set(r["facets"]) >= {"label", "reason", "cluster_id", "batch_id", "day"}
            # the map: made in the background, polled, then served with its colours
            assert requests.get(f"{base}/map", timeout=30).json()["points"] == 0
            r = requests.post(f"{base}/map", timeout=30)
            assert r.status_code == 202 and r.json()["running"] is True
            deadline = time.monotonic() + 120
            while requests.get(f"{base}/map", timeout=30).json()["making"]["running"]:
                assert time.monotonic() < deadline, "the map was not made in 2 minutes"
                time.sleep(0.5)
            doc = requests.get(f"{base}/map", params={"color_by": "reason"}, timeout=30).json()
            assert doc["points"] == 40 and doc["color_by"] == "reason" and len(doc["ids"]) == 40
            r = requests.get(f"{base}/map", params={"color_by": "x; DROP"}, timeout=30)
            assert r.status_code == 400
            for params, status in [
                ({"sort": "id; DROP TABLE x"}, 400),
                ({"limit": 501}, 422),
                ({"min_confidence": 2}, 422),
                ({"day_from": "yesterday"}, 422),
                ({"batch_id": 2**70}, 422),
                ({"label": ["x"] * 101}, 422),
            ]:
                r = requests.get(f"{base}/images", params=params, timeout=30)
                assert r.status_code == status, (params, r.status_code, r.text)
        finally:
            server.stop()


def test_map__projected_once_coloured_by_the_store_now(review, tmp_path, capsys):
    ws, data, mono, poly = review
    assert map_points(ws)["points"] == 0  # none made yet
    made = compute_map(ws)
    assert sorted(made.ids.tolist()) == sorted(mono + poly) and made.stored == 40
    assert made.xy.shape == (40, 2) and made.xy.min() >= 0 and made.xy.max() <= 1
    # mono and poly cells lie apart: each one's nearest point is mostly of its own kind
    kind = {i: "mono" for i in mono} | {i: "poly" for i in poly}
    d = ((made.xy[:, None] - made.xy[None]) ** 2).sum(-1) + np.eye(40) * 9
    same = [kind[made.ids[i]] == kind[made.ids[d[i].argmin()]] for i in range(40)]
    assert sum(same) >= 34, sum(same)

    doc = map_points(ws)
    assert doc["points"] == 40 and len(doc["x"]) == len(doc["c"]) == 40
    assert sum(n for _, _, n in doc["legend"]) == 40
    before = {name: n for name, _, n in doc["legend"]}
    apply_thresholds(ws, 1.0, None)  # the colours follow the store without projecting again
    after = {name: n for name, _, n in map_points(ws)["legend"]}
    assert after.get(UNKNOWN, 0) > before.get(UNKNOWN, 0)
    assert map_points(ws, color_by="reason")["legend"][0][0] == "low confidence"
    assert {n for n, _, _ in map_points(ws, color_by="cluster")["legend"]} == {"not clustered"}
    with pytest.raises(ValueError, match="color_by must be one of"):
        map_points(ws, color_by="size")

    out = tmp_path / "map.csv"
    args = ["map", "--workspace", str(ws.root), "--out", str(out), "--color-by", "class"]
    assert main(args) == 0
    assert "40 of 40 stored images" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert lines[0] == "id,x,y,class" and len(lines) == 41


def test_batches__listed_opened_and_reported_by_every_door(review, tmp_path, capsys):
    ws, data, mono, poly = review
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    summary = score_inputs(
        ws, [str(broken), str(Path(stored(ws, "SELECT source FROM predictions")[0][0]))]
    )
    listed = list_batches(ws)
    assert listed["total"] == 2 and [b["batch_id"] for b in listed["batches"]] == [2, 1]
    first = listed["batches"][1]
    assert (first["items"], first["scored"], first["failed"]) == (40, 40, 0)
    second = batch_detail(ws, summary.batch_id)
    assert second["failed"] == 1 and second["failures"][0]["source"] == str(broken)
    assert second["failures"][0]["kind"] == "not_image"

    out = tmp_path / "report.csv"
    args = ["batches", "--workspace", str(ws.root), "--id", "1", "--csv", str(out)]
    assert main(args) == 0
    report = list(csv.DictReader(out.open()))
    assert len(report) == 40 and [int(r["item"]) for r in report] == list(range(1, 41))
    assert sorted(int(r["id"]) for r in report) == sorted(mono + poly)
    assert {r["outcome"] for r in report} == {"scored"}
    again = tmp_path / "again.csv"
    assert main([*args[:-2], "--csv", str(again)]) == 0 and again.read_text() == out.read_text()
    mixed = tmp_path / "mixed.xlsx"
    assert main([*args[:-2], "--xlsx", str(mixed)]) == 0
    book = openpyxl.load_workbook(mixed, read_only=True)
    first_rows = list(book.active.iter_rows(values_only=True))
    assert first_rows[0][:3] == ("item", "source", "outcome") and len(first_rows) == 41
    second_report = tmp_path / "second.csv"
    assert main([*args[:-4], "--id", "2", "--csv", str(second_report)]) == 0
    two = list(csv.DictReader(second_report.open()))
    assert [r["outcome"] for r in two] == ["failed", "already_scored"]
    assert two[0]["error"].startswith("not_image:") and int(two[1]["id"]) in mono + poly
    assert main(["batches", "--workspace", str(ws.root), "--id", "9"]) == 2
    assert "no batch 9" in capsys.readouterr().err

    with Service(ws) as service:
        server = start_server(service, ui=False)
        base = server.url + "/api/v1"
        try:
            assert requests.get(f"{base}/batches", timeout=30).json()["total"] == 2
            one = requests.get(f"{base}/batches/2", timeout=30).json()
            assert one["failures"][0]["kind"] == "not_image"
            r = requests.get(f"{base}/batches/1/report", timeout=30)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
            day = first["started_at"][:10]
            assert f'filename="batch-1-{day}.csv"' in r.headers["content-disposition"]
            assert r.text.replace("\r\n", "\n") == out.read_text().replace("\r\n", "\n")
            r = requests.get(f"{base}/batches/1/report?format=xlsx", timeout=30)
            assert r.status_code == 200 and "spreadsheetml" in r.headers["content-type"]
            assert f'filename="batch-1-{day}.xlsx"' in r.headers["content-disposition"]
            book = openpyxl.load_workbook(io.BytesIO(r.content), read_only=True)
            assert list(book.active.iter_rows(values_only=True)) == first_rows
            assert (
                requests.get(f"{base}/batches/1/report?format=xls", timeout=30).status_code == 422
            )
            # An uploaded folder keeps its sub-folders; nothing climbs out of the upload.
            cell = Path(stored(ws, "SELECT source FROM predictions")[1][0])
            parts = [("site/north/a.png", cell), ("../../outside.png", cell)]
            files = [("files", (name, p.read_bytes(), "image/png")) for name, p in parts]
            doc = requests.post(f"{base}/score", files=files, timeout=60).json()
            upload = Path(doc["upload_dir"])
            assert (upload / "site/north/a.png").is_file() and (upload / "outside.png").is_file()
            r = requests.get(f"{base}/batches/{doc['batch_id']}/report", timeout=30)
            sources = [row["source"] for row in csv.DictReader(io.StringIO(r.text))]
            assert sources == [str(upload / "site/north/a.png"), str(upload / "outside.png")]
            for path, status in [
                ("/batches/99", 400),
                ("/batches/99/report", 400),
                ("/batches/0", 422),
            ]:
                assert requests.get(base + path, timeout=30).status_code == status, path
        finally:
            server.stop()


def test_confusion__counts_and_a_cells_images_by_the_service_and_the_api(review):
    ws, data, mono, poly = review
    version = get_version(ws, None)
    with Service(ws) as service:
        doc = service.confusion()
        rows = list(csv.DictReader(open(version.report_dir / "audit.csv", encoding="utf-8")))
        assert doc["classes"] == version.classes
        assert sum(map(sum, doc["counts"])) == len(rows) > 0
        true = predicted = version.classes[0]
        cell = service.confusion(None, true, predicted)["images"]
        assert len(cell) == doc["counts"][0][0]
        probs = [im["top1_prob"] for im in cell]
        assert probs == sorted(probs, reverse=True)
        assert service.file_thumbnail(cell[0]["path"]).suffix == ".webp"
        server = start_server(service, ui=False)
        base = server.url + "/api/v1/versions"
        try:
            r = requests.get(
                f"{base}/{version.name}/confusion",
                params={"true": true, "predicted": predicted},
                timeout=30,
            )
            assert r.status_code == 200 and r.json()["images"] == cell
            for params in ({"true": "nope", "predicted": true}, {"true": true}):
                r = requests.get(f"{base}/{version.name}/confusion", params=params, timeout=30)
                assert r.status_code == 400, params
            assert requests.get(f"{base}/v9/confusion", timeout=30).status_code == 400
        finally:
            server.stop()


def test_api__named_tokens_are_who_the_audit_log_records(review, tmp_path):
    ws, data, mono, poly = review
    token_file = tmp_path / "tokens"
    token_file.write_text("# who may drive the API\nci-bot=s2\n\n")
    tokens = parse_tokens(["ana=s1", "plain-secret"], token_file)
    assert tokens == {"s1": "ana", "plain-secret": None, "s2": "ci-bot"}
    with pytest.raises(UserError, match="same name"):
        parse_tokens(["ana=a", "ana=b"])
    with pytest.raises(UserError, match="cannot read the token file"):
        parse_tokens([], tmp_path / "missing")
    with Service(ws) as service:
        server = start_server(service, token=tokens, ui=False)
        base = server.url + "/api/v1"
        try:
            for secret, label in [("s1", "poly"), ("s2", "defective"), ("plain-secret", "poly")]:
                r = requests.post(
                    f"{base}/images/relabel",
                    json={"ids": poly[:1], "label": label},
                    headers={"Authorization": f"Bearer {secret}"},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
            r = requests.get(f"{base}/audit", headers={"Authorization": "Bearer s1"}, timeout=30)
            assert [a["who"] for a in r.json()["actions"]] == [
                "api:127.0.0.1",
                "api:ci-bot",
                "api:ana",
            ]
            r = requests.get(f"{base}/audit", headers={"Authorization": "Bearer ana"}, timeout=30)
            assert r.status_code == 401  # a name is not a secret
        finally:
            server.stop()


def test_batch_report__xlsx_survives_control_characters_in_names(review, tmp_path):
    ws, data, mono, poly = review
    cell = Path(stored(ws, "SELECT source FROM predictions")[0][0])
    odd = tmp_path / "meter\x1b\x07.png"
    odd.write_bytes(cell.read_bytes())
    summary = score_inputs(ws, [str(odd)])
    name, chunks = batch_report(ws, summary.batch_id, fmt="xlsx")
    book = openpyxl.load_workbook(io.BytesIO(b"".join(chunks)), read_only=True)
    rows = list(book.active.iter_rows(values_only=True))
    source = rows[1][rows[0].index("source")]
    assert name.endswith(".xlsx") and source.endswith("meter\\x1b\\x07.png")
