"""Near-duplicates among stored images: linked as they arrive, listed, kept one of, flagged at
relabel and promote; the same through the CLI, the REST API and read-only SQL."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from imagesieve._errors import UserError
from imagesieve.app import Service, start_server
from imagesieve.classifier._reference import REFERENCE_SIGNATURES, ReferenceSet
from imagesieve.classifier._signature import SIGNATURE_BYTES
from imagesieve.cli import main
from imagesieve.ingest import score_inputs
from imagesieve.models import get_version
from imagesieve.search import (
    ReviewError,
    browse_images,
    keep_one,
    list_duplicates,
    relabel_images,
    undo_action,
)
from imagesieve.store import ImageQuery, Store, open_readonly, run_sql


def near_copy(src: Path, dest: Path) -> Path:
    """The same picture with one pixel changed: other bytes, other SHA-256, same look."""
    img = np.array(Image.open(src).convert("RGB"))
    img[0, 0] = 255 - img[0, 0]
    Image.fromarray(img).save(dest)
    return dest


def ids_by_name(store: Store) -> dict[str, int]:
    """Stored row ids by the file name of their source."""
    return dict(
        store._db.execute("SELECT regexp_extract(source, '[^/]+$'), id FROM predictions").fetchall()
    )


@pytest.fixture
def batches(scoring_ws, elpv, small_folder, tmp_path):
    """Batch 1: 12 held-out mono cells. Batch 2: near-copies of 3 of them and of 2 training
    cells, 2 other cells, and one cell's exact bytes under a second name."""
    mono = [im for im in elpv if im.cell_type == "mono"]
    fresh = [im.path for im in mono if im.defect_probability == 0.0][60:72]
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for p in fresh:
        shutil.copyfile(p, first / p.name)
    copies = {near_copy(p, second / f"copy-{p.stem}.png").name: p.name for p in fresh[:3]}
    training = sorted((small_folder / "functional").glob("*.png"))[:2]
    for p in training:
        near_copy(p, second / f"train-{p.stem}.png")
    for im in [im for im in mono if im.defect_probability == 1.0][60:62]:
        shutil.copyfile(im.path, second / im.path.name)
    shutil.copyfile(fresh[5], second / f"same-{fresh[5].name}")
    return scoring_ws, first, second, copies, training


def test_near_duplicates__linked_as_batches_arrive_and_listed(batches):
    ws, first, second, copies, _ = batches
    assert get_version(ws).meta["duplicates"]["rule"]  # training calibrated the version's rule
    with Store(ws) as store:
        one = score_inputs(ws, [str(first)], store=store)
        assert one.near_duplicates == 0 and one.to_dict()["near_duplicates"] == 0
        two = score_inputs(ws, [str(second)], store=store)
        ids = ids_by_name(store)
        assert store.duplicates.checked_upto(get_version(ws).name) == max(ids.values())
    # each copy joins the group of the cell it copies, from the earlier batch; nothing else
    want = sorted(sorted([ids[c], ids[o]]) for c, o in copies.items())
    doc = list_duplicates(ws)
    got = sorted(sorted(m["id"] for m in g["members"]) for g in doc["near"]["groups"])
    assert got == want, doc
    assert two.near_duplicates == 3 + 0  # the copies; the originals came in the first batch
    assert doc["near"]["total"] == 3 and all(g["size"] == 2 for g in doc["near"]["groups"])
    assert all(g["group_id"] == min(m["id"] for m in g["members"]) for g in doc["near"]["groups"])
    assert doc["exact"]["total"] == 1  # one content under two names, stored once
    (exact,) = doc["exact"]["groups"]
    assert len(exact["sources"]) == 2 and exact["names"] == 2

    # scoring the same again adds no rows and changes no group
    again = score_inputs(ws, [str(second)])
    assert again.scored == 0 and again.near_duplicates == 3
    assert list_duplicates(ws)["near"] == doc["near"]


def test_near_duplicates__the_versions_signature_floor_vetoes_close_pairs(batches):
    """The store links by the rule in ``meta.json``: a floor no signature reaches (above 1)
    vetoes every pair the embedding alone would link; identical bytes stay exact duplicates."""
    ws, first, second, _, _ = batches
    meta_path = get_version(ws).path / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["duplicates"]["rule"]["floor"] = 1.01
    meta_path.write_text(json.dumps(meta))
    with Store(ws) as store:
        score_inputs(ws, [str(first)], store=store)
        two = score_inputs(ws, [str(second)], store=store)
    assert two.near_duplicates == 0
    doc = list_duplicates(ws)
    assert doc["near"]["total"] == 0 and doc["exact"]["total"] == 1


def test_near_duplicates__keep_one_sets_aside_and_undo_restores(batches):
    ws, first, second, copies, _ = batches
    with Store(ws) as store:
        score_inputs(ws, [str(first)], store=store)
        score_inputs(ws, [str(second)], store=store)
    group = list_duplicates(ws)["near"]["groups"][0]
    keep, other = (m["id"] for m in group["members"])
    done = keep_one(ws, other)
    assert done == {"kept": other, "set_aside": 1, "action_id": done["action_id"]}
    group = list_duplicates(ws)["near"]["groups"][0]
    aside = {m["id"]: m["duplicate_of"] for m in group["members"]}
    assert aside == {keep: other, other: None} and group["kept"] == other
    with pytest.raises(ReviewError, match="already the one kept"):
        keep_one(ws, other)
    with pytest.raises(ReviewError, match="has no near-duplicates"):
        keep_one(ws, 10**9)
    # a set-aside image is not clustered (nor, then, promoted)
    version = get_version(ws).name
    with Store(ws) as store:
        store._db.execute("UPDATE predictions SET label = 'UNKNOWN'")
        ids = store.clusters.unknowns(version, poor_quality=True)[0].tolist()
        assert keep not in ids and other in ids
        assert store.duplicates.set_aside_among(version, [keep, other]) == {keep}
    # the review grid's filter and facet
    aside = browse_images(ws, ImageQuery(duplicates=("set_aside",)))
    assert [r["id"] for r in aside["rows"]] == [keep] and aside["rows"][0]["duplicate_of"] == other
    facet = dict(map(tuple, browse_images(ws)["facets"]["duplicates"]))
    assert facet == {"none": 13, "kept": 5, "set_aside": 1}  # 19 rows, 3 groups of 2
    shown = browse_images(ws, ImageQuery(duplicates=("none", "kept")), limit=100)
    assert shown["total"] == 18 and keep not in {r["id"] for r in shown["rows"]}
    with pytest.raises(UserError, match="duplicates must be among"):
        ImageQuery(duplicates=("gone",))
    undo_action(ws, done["action_id"])
    group = list_duplicates(ws)["near"]["groups"][0]
    assert all(m["duplicate_of"] is None for m in group["members"]) and group["kept"] is None


def test_near_duplicates__relabel_flags_copies_of_training_images(batches, small_folder, tmp_path):
    ws, first, second, _, training = batches
    score_inputs(ws, [str(second)])
    with Store(ws) as store:
        rows = ids_by_name(store)
    copies = [rows[f"train-{p.stem}.png"] for p in training]
    others = [i for n, i in rows.items() if not n.startswith("train-")]
    data = tmp_path / "data"  # a copy: the session's training folder stays as it is
    shutil.copytree(small_folder, data)
    result = relabel_images(ws, [*copies, *others[:2]], "defective", into=data)
    flagged = {n["id"]: n for n in result.near_training}
    assert set(flagged) == set(copies)  # the others are not copies of training images
    for p, i in zip(training, copies, strict=True):
        assert Path(flagged[i]["training_source"]).name == p.name
        assert flagged[i]["training_label"] == "functional" and flagged[i]["distance"] < 0.01
    assert result.to_dict()["near_training"]


def test_near_duplicates__relabel_applies_the_whole_rule_to_training_images(
    batches, small_folder, tmp_path
):
    """At relabel, a copy of a training image is flagged by the version's whole rule against
    the training image's kept signature: the floor within the distance, the signature in the
    looser band. A version without kept signatures compares with the training file for the
    floor, and leaves the distance to decide when that file cannot be read."""
    ws, _, second, _, training = batches
    score_inputs(ws, [str(second)])
    with Store(ws) as store:
        rows = ids_by_name(store)
    copies = [rows[f"train-{p.stem}.png"] for p in training]
    version = get_version(ws)
    kept = version.path / REFERENCE_SIGNATURES
    assert np.load(kept).shape == (len(ReferenceSet.load(version.path)), SIGNATURE_BYTES)
    meta_path = version.path / "meta.json"
    meta = json.loads(meta_path.read_text())
    data = tmp_path / "data"
    shutil.copytree(small_folder, data)

    def flagged(**rule: float) -> set[int]:
        meta["duplicates"]["rule"] |= rule
        meta_path.write_text(json.dumps(meta))
        result = relabel_images(ws, copies, "defective", into=data)
        return {n["id"] for n in result.near_training}

    assert flagged(floor=0.99) == set(copies)  # one pixel changed: the signatures agree
    assert flagged(floor=1.01) == set()  # no signature reaches it: vetoed
    # beyond the distance (0 here), within the candidate distance: the signature decides
    tight = {"distance": 0.0, "candidate_distance": 0.5, "floor": None}
    assert flagged(**tight, similarity=0.999) == set(copies)
    assert flagged(similarity=1.01) == set()
    kept.rename(kept.with_suffix(".aside"))  # a version from before signatures were kept
    assert flagged(similarity=0.999) == set()  # no looser band without them
    assert flagged(distance=0.01, floor=1.01) == set()  # the floor against the files
    aside = training[0].with_suffix(".aside")
    training[0].rename(aside)  # the session's folder: put back below
    try:
        assert flagged(floor=1.01) == {copies[0]}  # its file is gone: the distance decides
    finally:
        aside.rename(training[0])


def test_near_duplicates__cli_api_and_sql(batches, capsys):
    ws, first, second, _, _ = batches
    wsa = ["--workspace", str(ws.root)]
    assert main(["score", str(first), *wsa]) == 0
    assert main(["score", str(second), *wsa]) == 0
    assert "3 images nearly duplicate other stored images" in capsys.readouterr().out
    assert main(["duplicates", *wsa]) == 0
    out = capsys.readouterr().out
    assert "3 groups of near-duplicate images" in out and "1 contents" in out
    assert main(["duplicates", *wsa, "--json", "--limit", "1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["near"]["total"] == 3 and len(doc["near"]["groups"]) == 1
    keep = doc["near"]["groups"][0]["members"][0]["id"]
    assert main(["duplicates", "--keep", str(keep), *wsa]) == 0
    assert "set 1 near-duplicates aside" in capsys.readouterr().out
    assert main(["images", "--duplicates", "set_aside", "--json", *wsa]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 1

    # every new table, column and view through the read-only SQL
    con = open_readonly(ws)
    for sql, want in [
        ("SELECT count(*) FROM near_duplicates", 6),
        ("SELECT count(*) FROM near_duplicates WHERE duplicate_of IS NOT NULL", 1),
        ("SELECT count(*) FROM exact_duplicates", 1),
        ("SELECT count(*) FROM signatures WHERE octet_length(signature) = 192", 19),  # 12 + 7 new
        ("SELECT count(DISTINCT duplicate_group) FROM predictions", 3),
    ]:
        assert run_sql(con, sql).rows == [(want,)], sql
    con.close()

    service = Service(ws)
    server = start_server(service, ui=False)
    try:
        base = server.url + "/api/v1"
        r = requests.get(f"{base}/duplicates", params={"limit": 2}, timeout=30)
        assert r.status_code == 200 and r.json()["near"]["total"] == 3
        assert len(r.json()["near"]["groups"]) == 2
        assert (
            requests.get(f"{base}/duplicates", params={"limit": 0}, timeout=30).status_code == 422
        )
        assert (
            requests.get(f"{base}/duplicates", params={"limit": 10**6}, timeout=30).status_code
            == 422
        )
        group = r.json()["near"]["groups"][-1]
        other = group["members"][1]["id"]
        r = requests.post(f"{base}/duplicates/keep", json={"keep": other}, timeout=30)
        assert r.status_code == 200 and r.json()["set_aside"] == 1
        r = requests.post(f"{base}/duplicates/keep", json={"keep": other}, timeout=30)
        assert r.status_code == 400 and "already the one kept" in r.json()["error"]["message"]
        r = requests.post(f"{base}/duplicates/keep", json={"keep": "1; DROP"}, timeout=30)
        assert r.status_code == 422
        r = requests.get(f"{base}/images", params={"duplicates": "set_aside"}, timeout=30)
        assert r.status_code == 200 and r.json()["total"] == 2  # the CLI's and this one
        r = requests.get(f"{base}/images", params={"duplicates": "gone"}, timeout=30)
        assert r.status_code == 422
        # predictions a server stores are linked when its writer folds them into DuckDB
        version = get_version(ws).name
        original = sorted(first.glob("*.png"))[-1]
        copy = near_copy(original, first.parent / "live-copy.png")
        r = requests.post(
            f"{base}/predict", files={"file": (copy.name, copy.read_bytes())}, timeout=60
        )
        assert r.status_code == 200 and r.json()["already_stored"] is False, r.text
        new = r.json()["id"]
        deadline = time.monotonic() + 30
        while service.store._pending or service.store.duplicates.checked_upto(version) < new:
            assert time.monotonic() < deadline, "the writer did not link the new row"
            time.sleep(0.2)
        linked = service.sql(
            f"SELECT p.duplicate_group = o.duplicate_group FROM predictions p, predictions o "
            f"WHERE p.id = {new} AND o.source = '{original}'"
        ).rows
        assert linked == [(True,)]
        schema = requests.get(server.url + "/api/v1/openapi.json", timeout=30).json()
        assert "/api/v1/duplicates" in schema["paths"]
        assert "/api/v1/duplicates/keep" in schema["paths"]
    finally:
        server.stop()
        service.close()


def test_near_duplicates__promote_leaves_set_aside_out_and_flags_training_copies(
    batches, small_folder, tmp_path
):
    """A cluster of a copy of a training cell and a pair of near-copies, one set aside."""
    from imagesieve.search import promote_cluster
    from imagesieve.search._cluster import Cluster

    ws, first, second, copies, training = batches
    version = get_version(ws).name
    with Store(ws) as store:
        score_inputs(ws, [str(first)], store=store)
        score_inputs(ws, [str(second)], store=store)
        ids = ids_by_name(store)
    copy, original = next(iter(copies.items()))
    twin = ids[f"train-{training[0].stem}.png"]
    members = np.array(sorted([ids[copy], ids[original], twin]), np.int64)
    keep_one(ws, ids[copy])  # its original is set aside
    with Store(ws) as store:
        x = np.concatenate([e for _, e in store._vectors_of(members, 1280)])
        centroid = x.mean(0) / np.linalg.norm(x.mean(0))
        cluster = Cluster(7, members, centroid, int(members[0]), 0.1, 0.9, {}, {})
        store.clusters.save_run(version, members, np.full(3, 7), np.zeros(3), [cluster], 0, {}, {})
    data = tmp_path / "data"  # a copy: the session's training folder stays as it is
    shutil.copytree(small_folder, data)
    result = promote_cluster(ws, 7, "newtype", data)
    assert result.copied == 2 and result.set_aside == 1 and result.excluded == 0
    assert [n["id"] for n in result.near_training] == [twin]
    assert result.near_training[0]["training_label"] == "functional"
    assert not (data / "newtype" / original).exists()
    undo_action(ws)
