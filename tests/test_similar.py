"""Find similar: by image, id and class centroid, with filters, on a real store of ELPV cells."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from imagesieve._workspace import Workspace
from imagesieve.cli import main
from imagesieve.ingest import score_inputs
from imagesieve.search import _similar
from imagesieve.search._similar import SimilarError, find_similar
from imagesieve.store import Store, _vectors


@pytest.fixture(scope="module")
def stored(trained, small_folder, tmp_path_factory) -> Workspace:
    """A workspace whose store holds the 80 mono cells of ``small_folder``."""
    ws = Workspace(tmp_path_factory.mktemp("similar") / "ws")
    shutil.copytree(trained[0].models_dir, ws.models_dir)
    summary = score_inputs(ws, [str(small_folder / "functional"), str(small_folder / "defective")])
    assert summary.scored == 80
    return ws


def all_embeddings(ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
    with Store(ws) as store:
        return store.indexes.get("v1").vectors()


def test_find_similar__by_id_is_exact_and_excludes_the_query(stored):
    ids, x = all_embeddings(stored)
    info, results = find_similar(stored, id=int(ids[0]), k=5)
    assert info.method == "exact" and len(results) == 5
    assert ids[0] not in [r.id for r in results]
    want = ids[np.argsort(-(x @ x[0]))[1:6]]
    assert [r.id for r in results] == want.tolist()
    assert all(a.distance <= b.distance for a, b in zip(results, results[1:], strict=False))
    assert np.isclose(results[0].distance, 1 - x[ids == results[0].id][0] @ x[0], atol=1e-5)
    assert results[0].source.endswith(".png") and results[0].label and results[0].scored_at


def test_find_similar__by_image_finds_itself_first(stored, small_folder):
    image = sorted((small_folder / "defective").glob("cell*.png"))[3]
    info, results = find_similar(stored, image=str(image), k=3)
    assert info.kind == "image" and info.prediction["label"]
    assert results[0].source == str(image) and results[0].distance < 1e-4


def test_find_similar__by_class_centroid(stored):
    info, results = find_similar(stored, class_name="defective", k=10)
    assert info.kind == "class" and len(results) == 10
    assert sum(r.label == "defective" or r.top1_class == "defective" for r in results) >= 7
    with pytest.raises(
        SimilarError, match="no class 'brandX' in v1; classes: defective, functional, lonely"
    ):
        find_similar(stored, class_name="brandX")


def test_find_similar__selective_filter_still_returns_k(stored):
    ids, _ = all_embeddings(stored)
    keep = ids[::8][:10]
    where = f"id IN ({', '.join(map(str, keep))})"
    info, results = find_similar(stored, id=int(ids[1]), k=5, where=where)
    assert info.matching_rows == 10 and info.method == "exact-within-filter"
    assert len(results) == 5 and {r.id for r in results} <= set(keep.tolist())
    info, results = find_similar(stored, id=int(ids[1]), k=50, where="label = 'no such label'")
    assert info.matching_rows == 0 and results == []


def test_find_similar__max_distance_drops_the_tail(stored):
    ids, _ = all_embeddings(stored)
    _, everything = find_similar(stored, id=int(ids[0]), k=79)
    cut = everything[10].distance
    _, near = find_similar(stored, id=int(ids[0]), k=79, max_distance=cut)
    assert near == [r for r in everything if r.distance <= cut] and 10 <= len(near) < 79


def test_find_similar__hnsw_with_widened_filter(stored, tmp_path, monkeypatch):
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(stored.root, ws.root)
    (ws.root / "index" / "v1.faiss").unlink()
    monkeypatch.setattr(_vectors, "FLAT_MAX", 20)
    monkeypatch.setattr(_similar, "EXACT_FILTER_MAX", 5)
    assert main(["reindex", "--workspace", str(ws.root), "--rebuild"]) == 0
    ids, x = all_embeddings(ws)
    info, results = find_similar(ws, id=int(ids[0]), k=5, where="label <> 'UNKNOWN'")
    assert info.method == "ann-widened" and len(results) == 5
    info, results = find_similar(ws, id=int(ids[0]), k=5)
    assert info.method == "ann"
    exact = ids[np.argsort(-(x @ x[0]))[1:6]]
    assert len({r.id for r in results} & set(exact.tolist())) >= 4


@pytest.mark.parametrize(
    "where, message",
    [
        (
            "(SELECT count(*) FROM read_csv('/etc/passwd')) > 0",
            "file system operations are disabled",
        ),
        ("1 = 1); DROP TABLE predictions; --", "bad --where filter"),
        ("nosuchcolumn = 1", "bad --where filter"),
    ],
)
def test_find_similar__bad_or_hostile_filters_fail_in_one_line(stored, where, message):
    with pytest.raises(SimilarError, match="bad --where filter") as e:
        find_similar(stored, class_name="defective", where=where)
    assert message in str(e.value) and "\n" not in str(e.value)
    with Store(stored) as store:
        assert store.row_count("v1") == 80


def test_cli__similar_json(stored, capsys):
    import json

    assert (
        main(
            [
                "similar",
                "--class",
                "functional",
                "-k",
                "3",
                "--workspace",
                str(stored.root),
                "--json",
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["query"]["kind"] == "class" and len(doc["results"]) == 3
    assert main(["similar", "--workspace", str(stored.root)]) == 2
    assert "give exactly one of an image, --id or --class" in capsys.readouterr().err
