import json
import re

import duckdb
import numpy as np
import pytest

from imagesieve._workspace import Workspace
from imagesieve.classifier import (
    FAR_FROM_TRAINING,
    LOW_CONFIDENCE,
    POOR_QUALITY,
    UNKNOWN,
    Predictor,
    UnknownRule,
)
from imagesieve.models import ModelVersion, VersionMeta, set_thresholds
from imagesieve.models._version import new_build_dir, write_version

PROBS = [0.0, 0.2, 0.49999, 0.5, 0.50001, 0.7, 1.0]
DISTANCES = [None, 0.0, 0.29, 0.3, 0.31, 1.5, 2.0, float("nan")]
RULES = [UnknownRule(c, d) for c in (0.0, 0.5, 0.7, 1.0) for d in (None, 0.3, 2.0)]


def float_table() -> duckdb.DuckDBPyConnection:
    """Every (probability, distance) pair in a table ``t`` with the store's FLOAT columns.

    Every third row is a photo of poor quality (``quality_flags`` set). Shared with
    tests/test_openset.py.
    """
    probs = PROBS + np.random.default_rng(0).random(5, np.float32).tolist()
    rows = [
        (i, f"class{i}", p, d, "blurred" if i % 3 == 0 else None)
        for i, (p, d) in enumerate((p, d) for p in probs for d in DISTANCES)
    ]
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE t (id INTEGER, top1_class VARCHAR, top1_prob FLOAT, neighbor_distance FLOAT, "
        "quality_flags VARCHAR)"
    )
    con.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?)", rows)
    return con


@pytest.fixture(scope="module")
def stored():
    con = float_table()
    yield con
    con.close()


def assert_python_and_sql_agree(con, rule: UnknownRule) -> None:
    """``rule``'s reasons, labels and counts are the same from Python and from DuckDB over ``t``.

    Python sees what re-deciding stored rows sees: the float32 values read back from the
    FLOAT columns. Shared with tests/test_openset.py.
    """
    ids, top1, probs, dists, flags = zip(
        *con.execute("SELECT * FROM t ORDER BY id").fetchall(), strict=True
    )
    poor = np.array([f is not None for f in flags])
    expected = rule.reasons(np.array(probs, np.float32), list(dists), poor)
    labels = [c if r is None else UNKNOWN for c, r in zip(top1, expected, strict=True)]

    reason_sql, reason_params = rule.sql_reason()
    label_sql, label_params = rule.sql_label()
    got = con.execute(
        f"SELECT {reason_sql}, {label_sql} FROM t ORDER BY id", reason_params + label_params
    ).fetchall()
    assert [r for r, _ in got] == expected
    assert [lab for _, lab in got] == labels

    counts_sql, counts_params = rule.sql_counts()
    assert con.execute(f"SELECT {counts_sql} FROM t", counts_params).fetchone() == (
        sum(r is not None and POOR_QUALITY in r for r in expected),
        sum(r is not None and LOW_CONFIDENCE in r for r in expected),
        sum(r is not None and FAR_FROM_TRAINING in r for r in expected),
        sum(r is not None for r in expected),
    )
    # thresholds (and the mix) go in as parameters, never into the SQL text
    far_params = [] if rule.distance is None else [rule.mix] * bool(rule.mix) + [rule.distance]
    assert reason_params == [rule.confidence] + far_params
    assert set(re.findall(r"\b\d+(?:\.\d+)?\b", reason_sql)) <= {"1.0"}  # only 1 - Top-1


@pytest.mark.parametrize("rule", RULES, ids=repr)
def test_unknown_rule__python_and_sql_agree_on_float32_values(stored, rule):
    probs, dists = zip(
        *stored.execute("SELECT top1_prob, neighbor_distance FROM t ORDER BY id").fetchall(),
        strict=True,
    )
    assert probs[5 * len(DISTANCES)] == float(np.float32(0.7))
    assert dists[0] is None and np.isnan(dists[7])
    assert_python_and_sql_agree(stored, rule)


def test_unknown_rule__reasons():
    rule = UnknownRule(0.5, 0.3)
    probs = np.array([0.4, 0.4, 0.6, 0.6, 0.6, 0.5, 0.6])
    dists = np.array([0.1, 0.4, 0.4, 0.3, np.nan, 0.1, np.inf])
    assert rule.reasons(probs, dists) == [
        LOW_CONFIDENCE,
        f"{LOW_CONFIDENCE}+{FAR_FROM_TRAINING}",
        FAR_FROM_TRAINING,
        None,
        None,
        None,
        FAR_FROM_TRAINING,
    ]
    assert rule.reasons(probs, None) == UnknownRule(0.5).reasons(probs, dists)
    # float32 values compare exactly: float32(0.7) is just under 0.7, float32(0.3) just over 0.3
    assert UnknownRule(0.7, 0.3).reasons(np.float32([0.7]), np.float32([0.3])) == [
        f"{LOW_CONFIDENCE}+{FAR_FROM_TRAINING}"
    ]
    assert rule.reasons(np.zeros(0), np.zeros(0)) == []
    # a poor photo is UNKNOWN whatever the model says, and says so first
    poor = np.array([True, True, True, True, False, False, False])
    assert rule.reasons(probs, dists, poor)[:4] == [
        f"{POOR_QUALITY}+{LOW_CONFIDENCE}",
        f"{POOR_QUALITY}+{LOW_CONFIDENCE}+{FAR_FROM_TRAINING}",
        f"{POOR_QUALITY}+{FAR_FROM_TRAINING}",
        POOR_QUALITY,
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1.5,), r"confidence threshold must be within \[0, 1\], got 1.5"),
        ((-0.1, 0.3), r"confidence threshold must be within \[0, 1\], got -0.1"),
        ((0.5, 2.5), r"distance threshold must be within \[0, 2\], got 2.5"),
        ((0.5, -0.1), r"distance threshold must be within \[0, 2\], got -0.1"),
    ],
)
def test_unknown_rule__out_of_range_thresholds_rejected(args, message):
    with pytest.raises(ValueError, match=message):
        UnknownRule(*args)


def test_unknown_rule__range_ends_accepted():
    UnknownRule(0.0, 0.0)
    UnknownRule(1.0, 2.0)


def test_predictor_decide__uses_the_rule(trained):
    _, result = trained
    classes = result.version.classes
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(len(classes)), 300).astype(np.float32)
    dists = rng.uniform(0.0, 0.6, 300).astype(np.float32)
    dists[::17] = np.nan
    dists[5] = np.float32(0.3)  # the threshold's float32 value, just above 0.3
    probs[5] = np.eye(len(classes), dtype=np.float32)[0]  # Top-1 is 1: the mix adds nothing
    mix = result.version.mix  # chosen by training's report card; the predictor keeps it
    for threshold, distance in [(0.5, 0.3), (0.7, 2.0), (0.0, 0.0)]:
        predictor = Predictor(result.version, threshold=threshold, distance_threshold=distance)
        assert predictor.rule == UnknownRule(threshold, distance, mix)
        decided = predictor.decide(probs, dists)
        reasons = predictor.rule.reasons(probs.max(axis=1), dists)
        assert [r for _, r, _ in decided] == reasons
        assert [lab for lab, _, _ in decided] == [
            classes[i] if r is None else UNKNOWN
            for i, r in zip(probs.argmax(axis=1), reasons, strict=True)
        ]
        if distance == 0.3:
            assert FAR_FROM_TRAINING in decided[5][1]  # compared in double, as the SQL does
            assert {None, LOW_CONFIDENCE, FAR_FROM_TRAINING} <= set(reasons)
        without = predictor.rule.reasons(probs.max(axis=1), None)  # confidence only
        assert [r for _, r, _ in predictor.decide(probs)] == without
    top = re.escape(f"[0, {2.0 + mix:g}]")
    with pytest.raises(ValueError, match=rf"distance threshold must be within {top}, got 3"):
        Predictor(result.version, distance_threshold=3)


def _version_dir(tmp_path, meta_text: str) -> ModelVersion:
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "meta.json").write_text(meta_text)
    return ModelVersion.load(tmp_path / "v1")


def test_version_meta__trained_meta_json_round_trips_and_set_thresholds_changes_only_them(
    trained, tmp_path
):
    _, result = trained
    text = (result.version.path / "meta.json").read_text()
    info = result.version.info
    assert info.kind == "trained" and info.classes == result.version.classes
    assert info.extra["version"] == result.version.name and "metrics" in info.extra
    assert "calibration" in info.thresholds.extra
    assert info.thresholds.mix == result.version.mix
    assert info.to_dict() == json.loads(text)

    version = _version_dir(tmp_path, text)
    new = set_thresholds(version, 0.8, 0.25)
    assert (new.confidence_threshold, new.distance_threshold) == (0.8, 0.25)
    old = json.loads(text)
    old["thresholds"].update(confidence=0.8, distance=0.25, tuned=True)  # the operator's now
    assert new.meta == old
    assert not (new.path / "meta.json.tmp").exists()

    again = set_thresholds(new, 0.8, None)  # an existing distance becomes null
    assert again.distance_threshold is None and again.meta["thresholds"]["distance"] is None


def test_version_meta__imagenet_and_minimal_metas(tmp_path):
    ws = Workspace(tmp_path / "ws")
    meta = {
        "kind": "imagenet",
        "backbone": "efficientnet_lite0",
        "classes": ["a", "b"],
        "preprocessing": {"size": 224},
        "thresholds": {"confidence": 0.5},
        "weights": "hub",
    }
    version = write_version(ws, new_build_dir(ws), meta)
    assert version.meta == {**meta, "thresholds": {"confidence": 0.5, "distance": None}} | {
        "version": version.name,
        "created_at": version.meta["created_at"],
    }
    assert VersionMeta.from_dict(version.meta).to_dict() == version.meta
    assert version.info.thresholds.distance is None

    new = set_thresholds(version, 0.6, None)
    assert new.meta["thresholds"] == {"confidence": 0.6, "distance": None, "tuned": True}
    assert {k: v for k, v in new.meta.items() if k != "thresholds"} == {
        k: v for k, v in version.meta.items() if k != "thresholds"
    }

    minimal = write_version(ws, new_build_dir(ws), {"classes": ["a"], "preprocessing": {}})
    info = minimal.info
    assert (info.kind, info.thresholds, set(info.extra)) == (None, None, {"version", "created_at"})
    assert info.to_dict() == minimal.meta
    new = set_thresholds(minimal, 0.4, 1.0)
    assert new.meta["thresholds"] == {"confidence": 0.4, "distance": 1.0, "tuned": True}
    assert {k: v for k, v in new.meta.items() if k != "thresholds"} == minimal.meta
    with pytest.raises(KeyError):  # classes and preprocessing are required
        write_version(ws, new_build_dir(ws), {"classes": ["a"]})
