import csv
import json
import subprocess
import sys
from itertools import product

import numpy as np
import pytest
from PIL import Image

from imagesieve.classifier._report import AUDIT_COLUMNS, _worst_misclassified, write_report

CLASSES = ["cat", "dog", "fox"]
# Rows: truth, probabilities. Top-1 per row: cat, dog, dog, cat, fox, fox -> rows 1 and 3 wrong.
Y3 = np.array([0, 0, 1, 1, 2, 2])
P3 = np.array(
    [
        [0.90, 0.06, 0.04],
        [0.30, 0.62, 0.08],
        [0.25, 0.65, 0.10],
        [0.45, 0.35, 0.20],
        [0.05, 0.10, 0.85],
        [0.04, 0.08, 0.88],
    ]
)
SOURCES3 = [f"/data/img{i}.png" for i in range(6)]


def _report(tmp_path, **kw):
    args = {"classes": CLASSES, "y_true": Y3, "probs": P3, "sources": SOURCES3} | kw
    return write_report(tmp_path / "report", **args)


def _strict_json(path):
    def no_constant(name):
        raise AssertionError(f"{name} in {path}")

    return json.loads(path.read_text(), parse_constant=no_constant)


def _tile(colour):
    return Image.new("RGB", (40, 30), colour)


def test_write_report__hand_computed_metrics(tmp_path):
    m = _report(tmp_path)
    assert m["n"] == 6
    assert m["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [0, 0, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["cat"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert m["per_class"]["fox"] == pytest.approx(
        {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    )
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert m["weighted_f1"] == pytest.approx((2 * 0.5 + 2 * 0.5 + 2 * 1.0) / 6)
    assert "roc_auc" not in m
    assert m["classes"] == CLASSES


def test_write_report__ece_by_hand(tmp_path):
    # 15 bins of width 1/15: 0.90 and 0.88 share (0.867, 0.933], 0.62 and 0.65 share (0.6, 0.667],
    # 0.45 and 0.85 are alone. Per bin |accuracy - mean confidence| weighted by bin share.
    expected = (
        2 / 6 * abs(1.0 - (0.90 + 0.88) / 2)
        + 2 / 6 * abs(0.5 - (0.62 + 0.65) / 2)
        + 1 / 6 * abs(0.0 - 0.45)
        + 1 / 6 * abs(1.0 - 0.85)
    )
    assert _report(tmp_path)["ece"] == pytest.approx(expected)
    assert expected == pytest.approx(1.09 / 6)


def test_write_report__ece_zero_when_calibrated(tmp_path):
    # Confidence 0.75 in one bin, 3 of 4 right -> perfectly calibrated.
    probs = np.array([[0.75, 0.25]] * 4)
    m = write_report(
        tmp_path,
        classes=["a", "b"],
        y_true=np.array([0, 0, 0, 1]),
        probs=probs,
        sources=list("wxyz"),
    )
    assert m["ece"] == pytest.approx(0.0)


def test_write_report__absent_class_listed_not_averaged(tmp_path):
    probs = np.hstack([P3, np.zeros((6, 1))])
    m = write_report(tmp_path, classes=[*CLASSES, "owl"], y_true=Y3, probs=probs, sources=SOURCES3)
    # no test image and never predicted: no score at all, not the zeros scikit-learn fills in
    assert m["per_class"]["owl"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m["confusion_matrix"][3] == [0, 0, 0, 0]
    assert m["macro_f1"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_write_report__class_predicted_but_not_tested_has_precision_only(tmp_path):
    probs = np.hstack([P3, np.zeros((6, 1))])
    probs[0] = [0.1, 0.1, 0.1, 0.7]  # one image taken for the class with no test images
    m = write_report(tmp_path, classes=[*CLASSES, "owl"], y_true=Y3, probs=probs, sources=SOURCES3)
    assert m["per_class"]["owl"] == {"precision": 0.0, "recall": None, "f1": None, "support": 0}


def test_write_report__binary_roc_auc_against_pair_count(tmp_path):
    y = np.array([0, 0, 1, 1, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.4])  # one tie: 0.4 vs 0.4 counts one half
    pos, neg = p1[y == 1], p1[y == 0]
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in product(pos, neg)]
    m = write_report(
        tmp_path,
        classes=["ok", "bad"],
        y_true=y,
        probs=np.stack([1 - p1, p1], 1),
        sources=list("abcdefg"),
    )
    assert sum(pairs) / len(pairs) == pytest.approx(8.5 / 12)
    assert m["roc_auc"] == pytest.approx(8.5 / 12)


def test_write_report__binary_single_class_roc_auc_null(tmp_path):
    probs = np.array([[0.9, 0.1], [0.3, 0.7]])
    m = write_report(
        tmp_path, classes=["ok", "bad"], y_true=np.array([0, 0]), probs=probs, sources=["a", "b"]
    )
    assert m["roc_auc"] is None
    assert _strict_json(tmp_path / "metrics.json")["roc_auc"] is None


@pytest.mark.parametrize(
    ("threshold", "unknown_rate", "accuracy_known"),
    [(0.5, 1 / 6, 4 / 5), (0.7, 3 / 6, 1.0), (0.0, 0.0, 4 / 6), (0.95, 1.0, None)],
)
def test_write_report__unknown_rate_with_threshold(
    tmp_path, threshold, unknown_rate, accuracy_known
):
    m = _report(tmp_path, threshold=threshold)
    assert m["threshold"] == threshold
    assert m["unknown_rate"] == pytest.approx(unknown_rate)
    assert m["accuracy_known"] == (
        None if accuracy_known is None else pytest.approx(accuracy_known)
    )


def test_write_report__json_round_trips_plain_values(tmp_path):
    extra = {"split": {"test": np.int64(6)}, "seed_loss": np.float32("nan"), "ids": np.arange(2)}
    m = _report(tmp_path, extra=extra)
    on_disk = _strict_json(tmp_path / "report" / "metrics.json")
    assert on_disk == m
    assert on_disk["split"] == {"test": 6} and on_disk["ids"] == [0, 1]
    assert on_disk["seed_loss"] is None
    assert type(m["n"]) is int and type(m["accuracy"]) is float
    assert type(m["per_class"]["cat"]["support"]) is int


def test_write_report__files_listed_match_directory(tmp_path):
    m = _report(tmp_path, history={"train_loss": [1.0, 0.5]}, load_thumbnail=lambda s: _tile("red"))
    written = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert sorted(m["files"]) == written
    assert written == sorted(
        [
            "metrics.json",
            "audit.csv",
            "confusion_matrix.png",
            "training_curves.png",
            "misclassified.png",
        ]
    )


def test_write_report__audit_csv_rows(tmp_path):
    _report(tmp_path)
    with open(tmp_path / "report" / "audit.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == AUDIT_COLUMNS
    assert len(rows) == 6
    assert rows[3] == {
        "path": "/data/img3.png",
        "true": "dog",
        "top1": "cat",
        "top1_prob": "0.450000",
        "top2": "dog",
        "top2_prob": "0.350000",
        "top3": "fox",
        "top3_prob": "0.200000",
        "confidence": "0.450000",
        "correct": "false",
        "unknown": "true",
        "reason": "low_confidence",
    }
    assert (rows[0]["correct"], rows[0]["unknown"], rows[0]["reason"]) == ("true", "false", "")


def test_write_report__audit_csv_keeps_the_decisions_inputs_exactly(tmp_path):
    distance = np.array([0.1, 1 / 3, np.nan, 2.5e-8, 0.7, 1e6])
    blur = np.float32([0.25, 0.5, 0.1, np.nan, 0.3, 0.9]).astype(np.float64)
    _report(tmp_path, inputs={"distance": distance, "blur": blur})
    with open(tmp_path / "report" / "audit.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == [*AUDIT_COLUMNS, "distance", "blur"]
    for name, column in (("distance", distance), ("blur", blur)):
        read = np.array([float(r[name]) if r[name] else np.nan for r in rows])
        np.testing.assert_array_equal(read, column)  # NaN (not measured) as an empty cell
    with pytest.raises(ValueError, match="input 'blur' has 2 rows, not 6"):
        _report(tmp_path, inputs={"blur": blur[:2]})


def test_write_report__audit_csv_blank_top3_for_two_classes(tmp_path):
    probs = np.array([[0.2, 0.8]])
    write_report(
        tmp_path, classes=["ok", "bad"], y_true=np.array([1]), probs=probs, sources=["x.png"]
    )
    with open(tmp_path / "audit.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert (row["top1"], row["top2"], row["top2_prob"]) == ("bad", "ok", "0.200000")
    assert (row["top3"], row["top3_prob"]) == ("", "")


def test_write_report__pngs_open(tmp_path):
    hist = {
        "train_loss": [1.0, 0.6, 0.4],
        "val_loss": [1.1, 0.8, 0.7],
        "train_acc": [0.5, 0.7, 0.8],
    }
    _report(
        tmp_path, history=hist | {"phase_boundary": [2]}, load_thumbnail=lambda s: _tile("blue")
    )
    for name in ("confusion_matrix.png", "training_curves.png", "misclassified.png"):
        with Image.open(tmp_path / "report" / name) as im:
            assert im.format == "PNG" and im.width > 0 and im.height > 0


def test_write_report__confusion_matrix_grows_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    c = 40
    probs = rng.dirichlet(np.ones(c), size=200)
    classes = [f"class_{i:02d}" for i in range(c)]
    sources = [f"{i}.png" for i in range(200)]
    m = write_report(
        tmp_path, classes=classes, y_true=rng.integers(0, c, 200), probs=probs, sources=sources
    )
    assert np.asarray(m["confusion_matrix"]).sum() == 200
    _report(tmp_path)
    with Image.open(tmp_path / "confusion_matrix.png") as big:
        with Image.open(tmp_path / "report" / "confusion_matrix.png") as small:
            assert big.width > 2 * small.width


@pytest.mark.parametrize(
    "history", [None, {}, {"train_loss": [], "val_loss": []}, {"phase_boundary": [3]}]
)
def test_write_report__no_curves_without_history(tmp_path, history):
    m = _report(tmp_path, history=history)
    assert not (tmp_path / "report" / "training_curves.png").exists()
    assert "training_curves.png" not in m["files"]


def test_write_report__gallery_survives_failing_thumbnail(tmp_path, caplog):
    def load(source):
        if source.endswith("img1.png"):
            raise OSError("truncated file")
        return _tile("green")

    m = _report(tmp_path, load_thumbnail=load)
    with Image.open(tmp_path / "report" / "misclassified.png") as im:
        assert im.width > 0 and im.height > 0
    assert "misclassified.png" in m["files"]
    assert "cannot load /data/img1.png (truncated file); drawing a grey tile" in caplog.text


def test_write_report__no_gallery_without_loader_or_errors(tmp_path):
    m = _report(tmp_path / "a")
    assert not (tmp_path / "a" / "report" / "misclassified.png").exists()
    right = np.eye(3)[Y3] * 0.8 + 0.2 / 3
    m = write_report(
        tmp_path / "b",
        classes=CLASSES,
        y_true=Y3,
        probs=right,
        sources=SOURCES3,
        load_thumbnail=lambda s: _tile("red"),
    )
    assert not (tmp_path / "b" / "misclassified.png").exists()
    assert "misclassified.png" not in m["files"]


def test_worst_misclassified__most_confident_first_capped():
    y = np.array([0, 0, 1, 1, 0, 1])
    top1 = np.array([1, 0, 0, 0, 1, 0])
    conf = np.array([0.6, 0.99, 0.9, 0.7, 0.95, 0.6])
    assert _worst_misclassified(y, top1, conf, 16).tolist() == [4, 2, 3, 0, 5]
    assert _worst_misclassified(y, top1, conf, 2).tolist() == [4, 2]


def test_write_report__creates_parents(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    write_report(out, classes=CLASSES, y_true=Y3, probs=P3, sources=SOURCES3)
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"probs": P3[:, :2]}, r"probs must be \(n, 3\) for 3 classes, got shape \(6, 2\)"),
        ({"sources": SOURCES3[:5]}, r"sources \(5\) need one entry per probs row \(6\)"),
        (
            {"y_true": Y3 + 1},
            r"y_true must hold integer class indices in \[0, 3\), got int64 values \[1, 2, 3\]",
        ),
        (
            {"y_true": Y3.astype(float)},
            r"y_true must hold integer class indices in \[0, 3\), got float64",
        ),
        ({"classes": ["cat", "cat", "fox"]}, r"classes must be non-empty and unique"),
        ({"threshold": 1.5}, r"threshold must be within \[0, 1\], got 1.5"),
        ({"probs": np.where(P3 > 0.8, np.nan, P3)}, r"probs contains NaN or inf"),
        (
            {"extra": {"accuracy": 1.0}},
            r"extra keys \['accuracy'\] would overwrite computed metrics",
        ),
    ],
)
def test_write_report__bad_input_rejected(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _report(tmp_path, **kwargs)
    assert not (tmp_path / "report").exists()


def test_write_report__import_is_cheap():
    code = (
        "import sys, imagesieve.classifier._report; "
        "print(sorted(m for m in ('matplotlib', 'sklearn', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
