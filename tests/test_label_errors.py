"""Label errors by confident learning: real digits with flipped labels, and the edge cases."""

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits

from imagesieve.classifier._label_errors import (
    FILTERS,
    RANKINGS,
    LabelSuspect,
    find_label_errors,
    out_of_fold_probs,
)

WD = 0.1
CLASSES = [f"digit{i}" for i in range(10)]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.data.astype(np.float32), data.target.astype(np.int64)


def _flip(y: np.ndarray, share: float, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``y`` with ``share`` of its labels moved to another class at random, and their rows."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(y), int(round(share * len(y))), replace=False)
    noisy = y.copy()
    noisy[rows] = (y[rows] + rng.integers(1, n_classes, len(rows))) % n_classes
    return noisy, rows


def _recall_at_twice(suspects: list[LabelSuspect], flipped: np.ndarray) -> float:
    top = {s.index for s in suspects[: 2 * len(flipped)]}
    return len(top & set(flipped.tolist())) / len(flipped)


@pytest.mark.parametrize("seed", [0, 1])
def test_find_label_errors__finds_flipped_digits(digits, seed):
    x, y = digits
    noisy, flipped = _flip(y, 0.05, 10, seed)
    probs = out_of_fold_probs(x, noisy, np.arange(len(y)), 10, WD, seed=seed)
    suspects = find_label_errors(probs, noisy, CLASSES)
    recall = _recall_at_twice(suspects, flipped)
    random_recall = 2 * len(flipped) / len(y)  # ~0.10
    assert recall >= 0.7 > 5 * random_recall
    found = [s for s in suspects if s.index in set(flipped.tolist())]
    assert np.mean([s.suggested == CLASSES[y[s.index]] for s in found]) >= 0.9


def test_find_label_errors__clean_labels_give_few_suspects(digits):
    x, y = digits
    probs = out_of_fold_probs(x, y, np.arange(len(y)), 10, WD)
    assert len(find_label_errors(probs, y, CLASSES)) <= 0.03 * len(y)


def test_find_label_errors__two_classes(digits):
    x, y = digits
    keep = np.flatnonzero(y < 2)
    noisy, flipped = _flip(y[keep], 0.05, 2, 3)
    probs = out_of_fold_probs(x[keep], noisy, np.arange(len(keep)), 2, WD)
    suspects = find_label_errors(probs, noisy, ["zero", "one"])
    assert _recall_at_twice(suspects, flipped) >= 0.8
    assert {s.suggested for s in suspects} <= {"zero", "one"}


def test_find_label_errors__class_of_one_image_is_never_flagged(digits):
    x, y = digits
    noisy, _ = _flip(y, 0.05, 10, 4)
    lone = int(np.flatnonzero(y == 3)[0])
    noisy[lone] = 10  # an eleventh class with one image: out of fold it is never seen
    probs = out_of_fold_probs(x, noisy, np.arange(len(y)), 11, WD)
    assert probs.shape == (len(y), 11)
    suspects = find_label_errors(probs, noisy, [*CLASSES, "lone"])
    assert lone not in {s.index for s in suspects}
    assert suspects


def test_out_of_fold_probs__rows_subset_shape_and_accuracy(digits):
    x, y = digits
    rows = np.arange(0, len(y), 2)
    probs = out_of_fold_probs(x, y, rows, 10, WD, folds=3)
    assert probs.shape == (len(rows), 10) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == y[rows]).mean() >= 0.9  # held-out accuracy of a linear head


def test_out_of_fold_probs__is_out_of_fold(digits):
    """Flipped labels get far less probability than from the same head fit on all rows."""
    import torch

    from imagesieve.classifier._train import _class_weights, _fit_linear

    x, y = digits
    noisy, flipped = _flip(y, 0.05, 10, 5)
    oof = out_of_fold_probs(x, noisy, np.arange(len(y)), 10, 1e-3)
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    cw = _class_weights(noisy, 10, "sqrt")
    lin, _, _ = _fit_linear(z, noisy, z[:0], noisy[:0], 10, cw, 1e-3, 5)
    with torch.no_grad():
        seen = torch.softmax(lin(torch.from_numpy(z)), 1).numpy()
    assert oof[flipped, noisy[flipped]].mean() < 0.5 * seen[flipped, noisy[flipped]].mean()


def test_find_label_errors__matches_hand_computed_confident_joint():
    # Thresholds: class 0 (0.9 + 0.9 + 0.2) / 3 = 0.667, class 1 (0.8 + 0.8 + 0.05) / 3 = 0.55,
    # class 2 0.7. Confident joint [[2, 1, 0], [0, 2, 1], [0, 0, 1]]: one 0->1, one 1->2.
    probs = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.9, 0.05, 0.05],
            [0.2, 0.75, 0.05],  # labelled 0, confidently 1 (0.75 >= 0.55)
            [0.1, 0.8, 0.1],
            [0.1, 0.8, 0.1],
            [0.1, 0.2, 0.7],
            [0.05, 0.05, 0.9],  # labelled 1, confidently 2
        ]
    )
    y = np.array([0, 0, 0, 1, 1, 2, 1])
    for filter_by in FILTERS:
        suspects = find_label_errors(probs, y, ["a", "b", "c"], filter_by=filter_by)
        assert [s.index for s in suspects] == [6, 2], filter_by
    first = suspects[0]
    assert (first.given, first.suggested) == ("b", "c")
    assert first.self_confidence == pytest.approx(0.05)
    assert first.suggested_confidence == pytest.approx(0.9)
    assert json.loads(json.dumps(first.to_dict()))["suggested"] == "c"


@pytest.mark.parametrize("rank_by", RANKINGS)
def test_find_label_errors__ranked_most_likely_wrong_first(digits, rank_by):
    x, y = digits
    noisy, _ = _flip(y, 0.1, 10, 6)
    probs = out_of_fold_probs(x, noisy, np.arange(len(y)), 10, WD)
    suspects = find_label_errors(probs, noisy, CLASSES, rank_by=rank_by)
    score = [
        s.self_confidence - (s.suggested_confidence if rank_by == "normalized_margin" else 0)
        for s in suspects
    ]
    assert score == sorted(score)
    assert all(s.given != s.suggested for s in suspects)


def test_find_label_errors__bad_input_says_what_is_wrong():
    probs = np.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"probs must be \(n, c\) = \(4, 2\).*got \(4, 3\)"):
        find_label_errors(probs, np.zeros(4, int), ["a", "b"])
    with pytest.raises(ValueError, match=r"labels must be within \[0, 3\), got 0\.\.5"):
        find_label_errors(probs, np.array([0, 1, 2, 5]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="filter_by must be one of prune_by_noise_rate"):
        find_label_errors(probs, np.zeros(4, int), ["a", "b", "c"], filter_by="pbnr")
    with pytest.raises(ValueError, match="need at least 2 rows"):
        out_of_fold_probs(probs.astype(np.float32), np.zeros(4, int), np.array([0]), 3, WD)
    assert find_label_errors(np.zeros((0, 2)), np.zeros(0, int), ["a", "b"]) == []


def test_training_reports_suspects_that_cli_and_api_move_and_undo(small_folder, tmp_path, capsys):
    """Three defective cells filed as functional: training names them; moving one is undoable."""
    import shutil

    import requests

    from imagesieve._workspace import Workspace
    from imagesieve.app import Service, start_server
    from imagesieve.cli import main

    data = tmp_path / "data"
    shutil.copytree(small_folder, data)
    flipped = sorted((data / "defective").glob("cell*.png"))[:3]
    for p in flipped:
        p.rename(data / "functional" / p.name)
    flipped = {str((data / "functional" / p.name).resolve()) for p in flipped}
    ws = Workspace(tmp_path / "ws")
    wsa = ["--workspace", str(ws.root)]
    assert main(["train", str(data), *wsa, "--no-history"]) == 0
    out = capsys.readouterr().out
    assert "label check:" in out and "may be mislabelled" in out
    capsys.readouterr()
    assert main(["suspects", *wsa, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    named = [s["path"] for s in doc["suspects"]]
    assert len(flipped & set(named[:6])) >= 2  # found among the likeliest
    from imagesieve.models import get_version

    assert doc["checked"] == get_version(ws).meta["data"]["images"] and all(
        s["suggested"] != s["given"] for s in doc["suspects"]
    )
    one = next(p for p in named if p in flipped)
    assert main(["suspects", "--relabel", "defective", one, *wsa]) == 0
    moved = data / "defective" / one.rsplit("/", 1)[-1]
    assert moved.is_file() and not (data / "functional" / moved.name).exists()
    assert main(["suspects", "--remove", str(data / "functional" / "missing.png"), *wsa]) != 0
    assert "not a suspected label error" in capsys.readouterr().err
    assert main(["audit", "--undo", *wsa]) == 0
    assert (data / "functional" / moved.name).is_file() and not moved.exists()

    service = Service(ws)
    server = start_server(service, ui=False)
    try:
        base = server.url + "/api/v1"
        listed = requests.get(f"{base}/label-suspects", timeout=30).json()
        assert [s["path"] for s in listed["suspects"]] == named
        for body in ({"paths": ["/etc/passwd"], "label": "defective"}, {"paths": []}):
            r = requests.post(f"{base}/label-suspects/fix", json=body, timeout=30)
            assert r.status_code in (400, 422) and "Traceback" not in r.text
        r = requests.post(f"{base}/label-suspects/fix", json={"paths": [one]}, timeout=30)
        assert r.status_code == 200 and r.json()["moved"] == 1
        assert not (data / "functional" / moved.name).exists()
        assert one not in [s["path"] for s in service.label_suspects()["suspects"]]
    finally:
        server.stop()
        service.close()
