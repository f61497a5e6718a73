"""Open-set calibration on real numbers: the whole UNKNOWN decision, its SQL, the report card."""

import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from test_unknown_rule import assert_python_and_sql_agree, float_table

from imagesieve.classifier import (
    FAR_FROM_TRAINING,
    LOW_CONFIDENCE,
    POOR_QUALITY,
    TrainOptions,
    UnknownRule,
)
from imagesieve.classifier._far import RELATIVE, FarFeatures, Mahalanobis
from imagesieve.classifier._openset import (
    FOLDS,
    MIN_GAIN,
    OFF_TARGET,
    HeldOut,
    against_target,
    calibrate_rule,
    held_out,
    off_target_words,
    report_card,
)
from imagesieve.models import ModelVersion

RATE = 0.05


# --- calibrating the whole decision ---------------------------------------------------------


def _sample(rng, n: int, low_share: float, nan_share: float = 0.01) -> tuple[np.ndarray, ...]:
    """Top-1 probabilities, ``low_share`` of them under 0.5, and spread distances, some NaN."""
    n_low = round(low_share * n)
    p = np.concatenate([rng.uniform(0.05, 0.5, n_low), rng.uniform(0.5, 1.0, n - n_low)])
    d = rng.gamma(2.0, 0.1, n)
    d[rng.random(n) < nan_share] = np.nan  # no nearest training image: never far
    order = rng.permutation(n)
    return p[order], d[order]


def _shares(rule: UnknownRule, p: np.ndarray, d: np.ndarray) -> tuple[int, float, float, float]:
    """Flagged count, then the shares: either rule, low confidence, far from training."""
    reasons = rule.reasons(p, d)
    flagged = sum(r is not None for r in reasons)
    low = np.mean([r is not None and LOW_CONFIDENCE in r for r in reasons])
    far = np.mean([r is not None and FAR_FROM_TRAINING in r for r in reasons])
    return flagged, flagged / len(reasons), float(low), float(far)


@pytest.mark.parametrize(
    ("low_share", "mix", "lowered"),
    [
        (0.02, 0.0, False),  # low confidence under half the rate: the threshold is kept
        (0.02, 0.5, False),
        (0.04, 0.0, True),  # over half the rate (2.5%): lowered
        (0.20, 0.0, True),  # low confidence alone would take 20%
        (0.20, 0.5, True),
    ],
)
def test_calibrate_rule__whole_decision_flags_the_rate_on_held_and_fresh_rows(
    low_share, mix, lowered
):
    rng = np.random.default_rng(7)
    n = 2000
    p, d = _sample(rng, n, low_share)
    held = HeldOut(p, d, np.zeros(n, int), "synthetic")
    rule, info = calibrate_rule(held, 0.5, RATE, mix)

    assert rule.mix == mix
    flagged, unknown, low, far = _shares(rule, p, d)
    assert abs(flagged - RATE * n) <= 1  # the whole decision, within one row
    assert info["realised"] == {
        "unknown": round(unknown, 4),
        POOR_QUALITY: 0.0,
        LOW_CONFIDENCE: round(low, 4),
        FAR_FROM_TRAINING: round(far, 4),
    }
    assert low > 0 and far > 0  # both rules fire
    assert (info["on"], info["n"], info["false_unknown_rate"]) == ("synthetic", n, RATE)
    if lowered:
        assert rule.confidence < 0.5 and info["confidence_requested"] == 0.5
        assert low <= RATE / 2
    else:
        assert rule.confidence == 0.5 and "confidence_requested" not in info
        assert low == pytest.approx(low_share)
    assert not any(
        r is not None and FAR_FROM_TRAINING in r
        for r in rule.reasons(p[np.isnan(d)], d[np.isnan(d)])
    )

    # a fresh sample from the same distribution
    fp, fd = _sample(rng, 20000, low_share)
    _, fresh_unknown, fresh_low, _ = _shares(rule, fp, fd)
    assert abs(fresh_unknown - RATE) <= 0.02
    if lowered:
        assert fresh_low <= RATE / 2 + 0.01


@pytest.mark.parametrize(("poor_share", "floor"), [(0.02, False), (0.045, True), (0.10, True)])
def test_calibrate_rule__poor_photos_spend_their_share_first(poor_share, floor):
    rng = np.random.default_rng(3)
    n = 4000
    p, d = _sample(rng, n, 0.03)
    poor = rng.random(n) < poor_share
    held = HeldOut(p, d, np.zeros(n, int), "synthetic", poor)
    rule, info = calibrate_rule(held, 0.5, RATE, 0.0)

    reasons = rule.reasons(p, d, poor)
    flagged = np.array([r is not None for r in reasons])
    assert all(POOR_QUALITY in reasons[i] for i in np.flatnonzero(poor))
    content = np.mean(flagged & ~poor)  # flagged by confidence or distance alone
    far = np.mean([r is not None and FAR_FROM_TRAINING in r for r in reasons])
    assert info["realised"][POOR_QUALITY] == round(poor.mean(), 4)
    if floor:  # poor photos would take the whole rate: the search for new types keeps a quarter
        assert content == pytest.approx(RATE / 4, abs=1.5 / n)
        assert far > 0
    else:  # the whole decision flags the rate
        assert abs(flagged.sum() - RATE * n) <= 1
    assert info["realised"]["unknown"] == round(flagged.mean(), 4)


def test_calibrate_rule__every_held_out_photo_poor():
    p = np.linspace(0.3, 1.0, 50)
    held = HeldOut(p, np.linspace(0.1, 0.5, 50), np.zeros(50, int), "x", np.ones(50, bool))
    rule, info = calibrate_rule(held, 0.5, RATE)
    assert info["realised"]["unknown"] == 1.0 and info["realised"][POOR_QUALITY] == 1.0
    assert rule.confidence == 0.5  # nothing left to lower it on


def test_calibrate_rule__edges():
    # nothing measured (e.g. one training image): the distance threshold is the top of its range
    p = np.linspace(0.3, 1.0, 100)
    nothing = HeldOut(p, np.full(100, np.nan), np.zeros(100, int), "x")
    rule, info = calibrate_rule(nothing, 0.5, RATE, 0.5)
    assert rule.distance == 2.5 and info["realised"][FAR_FROM_TRAINING] == 0.0
    assert 0 < info["realised"]["unknown"] <= RATE / 2  # low confidence, lowered to half the rate
    # fewer held-out images than one in 1/rate: the threshold is the largest score, none flagged
    p, d = np.full(10, 0.9), np.linspace(0.1, 0.5, 10)
    rule, info = calibrate_rule(HeldOut(p, d, np.zeros(10, int), "x"), 0.5, RATE, 1.0)
    assert rule.distance == pytest.approx(0.5 + 0.1) and info["realised"]["unknown"] == 0.0


# --- the rule with a mix: Python and SQL ----------------------------------------------------


def _rules_with_mix() -> list[UnknownRule]:
    rules = {
        UnknownRule(c, d, mix)
        for mix in (0.0, 0.3, 1.7)
        for c in (0.0, 0.5, 1.0)
        for d in (None, 0.0, 0.3, 1.0, 2.0, 2.0 + mix)
    }
    # ties: the threshold is exactly one stored row's score, computed in double as both forms do
    p, d = float(np.float32(0.7)), float(np.float32(0.29))
    rules |= {UnknownRule(0.5, d + mix * (1.0 - p), mix) for mix in (0.3, 1.7)}
    return sorted(rules, key=repr)


@pytest.fixture(scope="module")
def stored():
    con = float_table()
    yield con
    con.close()


@pytest.mark.parametrize("rule", _rules_with_mix(), ids=repr)
def test_unknown_rule_with_mix__python_and_sql_agree_on_float32_values(stored, rule):
    assert_python_and_sql_agree(stored, rule)


def test_unknown_rule_with_mix__score_and_nan():
    rule = UnknownRule(0.5, 0.4, 0.3)
    p = np.array([0.9, 0.6, 0.6, 0.4, 1.0, 0.2])
    d = np.array([0.3, 0.3, 0.27, 0.0, np.nan, np.nan])
    # scores 0.33, 0.42, 0.39, 0.18, NaN, NaN
    assert rule.reasons(p, d) == [
        None,
        FAR_FROM_TRAINING,
        None,
        LOW_CONFIDENCE,
        None,
        LOW_CONFIDENCE,
    ]
    assert UnknownRule(0.5, 0.4).reasons(p, d)[1] is None  # without the mix: 0.3 is near
    assert rule.reasons(p, None) == UnknownRule(0.5).reasons(p, d)
    assert UnknownRule(0.0, 2.5, 0.5).reasons([0.0], [2.0]) == [None]  # 2.5 is not above 2.5


@pytest.mark.parametrize("mix", [-0.1, float("inf"), float("nan")])
def test_unknown_rule_with_mix__bad_mix_rejected(mix):
    with pytest.raises(ValueError, match=r"mix must be a finite number >= 0"):
        UnknownRule(0.5, 0.3, mix)


@pytest.mark.parametrize("mix", [0.0, 0.3, 1.7])
def test_unknown_rule_with_mix__distance_up_to_two_plus_mix(mix):
    assert UnknownRule(0.5, 2.0 + mix, mix).distance == 2.0 + mix
    UnknownRule(0.5, 0.0, mix)
    top = re.escape(f"[0, {2.0 + mix:g}]")
    with pytest.raises(ValueError, match=rf"distance threshold must be within {top}"):
        UnknownRule(0.5, 2.0 + mix + 1e-6, mix)


# --- the report card on real images (scikit-learn's digits) ---------------------------------

DIGITS = [0, 1, 4, 7]


@pytest.fixture(scope="module")
def digits():
    """Four digit classes: pixels for the head, unit pixel vectors as embeddings; train/val."""
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = np.isin(data.target, DIGITS)
    pixels = data.data[keep] / 16.0
    y = np.searchsorted(DIGITS, data.target[keep])
    emb = (pixels / np.linalg.norm(pixels, axis=1, keepdims=True)).astype(np.float32)
    rng = np.random.default_rng(0)
    val = np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(y == c))[:30] for c in range(len(DIGITS))])
    )
    train = np.setdiff1d(np.arange(len(y)), val)
    return pixels, emb, y, train, val


def _refit(pixels: np.ndarray, y: np.ndarray, calls: list | None = None):
    """The head stand-in: logistic regression on the rows given; every row's Top-1 probability."""
    from sklearn.linear_model import LogisticRegression

    def refit(rows: np.ndarray, warm: bool = False) -> np.ndarray:
        if len(np.unique(y[rows])) < 2:
            out = np.ones(len(y))
        else:
            out = (
                LogisticRegression(max_iter=2000)
                .fit(pixels[rows], y[rows])
                .predict_proba(pixels)
                .max(1)
            )
        if calls is not None:
            calls.append((np.array(rows), out))
        return out

    return refit


def _card(pixels, emb, y, train, val, calls=None):
    refit = _refit(pixels, y, calls)
    val_top1 = refit(train)[val]
    held = held_out(emb, y, train, val, val_top1, refit)
    classes = [f"digit{d}" for d in DIGITS]
    return held, refit, report_card(emb, y, classes, train, val, held, refit, 0.5, RATE)


def _nearest(emb: np.ndarray, rows: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine distance of each of ``rows`` to its nearest of ``ref`` (itself excluded)."""
    d = 1.0 - emb[rows].astype(np.float64) @ emb[ref].T.astype(np.float64)
    d[rows[:, None] == ref[None, :]] = np.inf
    return d.min(1)


def test_held_out__out_of_fold_probabilities_and_leave_one_out_distances(digits):
    pixels, emb, y, train, val = digits
    calls = []
    refit = _refit(pixels, y, calls)
    val_top1 = refit(train)[val]
    calls.clear()
    held = held_out(emb, y, train, val, val_top1, refit)

    assert held.on == f"{len(train)} training images out of fold + {len(val)} validation images"
    np.testing.assert_array_equal(held.label, np.concatenate([y[train], y[val]]))
    # each training image is predicted by the one refit whose rows leave it out
    assert len(calls) == FOLDS
    left_out = [np.setdiff1d(train, rows) for rows, _ in calls]
    np.testing.assert_array_equal(np.sort(np.concatenate(left_out)), train)
    top1 = dict(zip(train.tolist(), held.top1_prob[: len(train)], strict=True))
    for out_rows, (_, out) in zip(left_out, calls, strict=True):
        assert [top1[i] for i in out_rows.tolist()] == out[out_rows].tolist()
    np.testing.assert_array_equal(held.top1_prob[len(train) :], val_top1)
    # distances: leave-one-out among training images, validation images to the training images
    np.testing.assert_allclose(held.distance[: len(train)], _nearest(emb, train, train), atol=1e-5)
    np.testing.assert_allclose(held.distance[len(train) :], _nearest(emb, val, train), atol=1e-5)


def test_report_card__each_class_left_out(digits):
    pixels, emb, y, train, val = digits
    held, refit, (rule, info, card) = _card(pixels, emb, y, train, val)
    classes = [f"digit{d}" for d in DIGITS]

    per_class = card["per_class"]
    assert list(per_class) == classes
    assert all(0.0 <= r <= 1.0 for r in per_class.values())
    assert card["mean_recall"] == pytest.approx(np.mean(list(per_class.values())), abs=1e-4)
    assert card["worst"] == {
        "class": min(per_class, key=per_class.get),
        "recall": min(per_class.values()),
    }
    # the chosen mix: 0 unless another raised the mean recall by MIN_GAIN
    tried = card["mix_tried"]
    assert "0" in tried and card["mean_recall"] == tried[f"{rule.mix:.4g}"]
    if rule.mix:
        assert card["mean_recall"] >= tried["0"] + MIN_GAIN - 1e-4
        assert card["mean_recall"] == max(tried.values())
    else:
        assert max(tried.values()) < tried["0"] + MIN_GAIN + 1e-4

    # the chosen rule is calibrated on all held-out images: about 5% of them UNKNOWN
    n = len(held.label)
    flagged, unknown, low, far = _shares(rule, held.top1_prob, held.distance)
    assert abs(flagged - RATE * n) <= 1
    assert info["realised"]["unknown"] == round(unknown, 4) and info["n"] == n

    # a class's recall, recomputed: the head and the reference set without it
    c = 2
    rest = train[y[train] != c]
    unseen = np.concatenate([train[y[train] == c], val[y[val] == c]])
    top1 = refit(rest)[unseen]
    recall = _shares(rule, top1, _nearest(emb, unseen, rest))[1]
    assert recall == pytest.approx(per_class[classes[c]], abs=1 / len(unseen) + 1e-4)


def test_report_card__a_class_far_from_the_others_is_found(digits):
    pixels, emb, y, train, val = digits
    far = 3
    moved = emb.copy()
    # negated pixel vectors: as tight among themselves as before, >= 1 from every other digit
    moved[y == far] *= -1.0
    _, _, (rule, _, card) = _card(pixels, moved, y, train, val)
    assert card["per_class"][f"digit{DIGITS[far]}"] >= 0.95
    assert card["worst"]["class"] != f"digit{DIGITS[far]}"


# --- the Mahalanobis distance (versions with tapped features) --------------------------------


def _squared_by_definition(x, y, q, relative: float = RELATIVE) -> np.ndarray:
    """Smallest squared Mahalanobis distance, written out, less the relative term.

    Class means and a shrunk shared covariance; the term is ``relative`` times the squared
    distance to one Gaussian of all of ``x``.
    """
    from sklearn.covariance import ledoit_wolf

    means = np.stack([x[y == c].mean(0) for c in np.unique(y)])
    centred = x - means[np.searchsorted(np.unique(y), y)]
    inv = np.linalg.inv(ledoit_wolf(centred, assume_centered=True)[0])
    nearest = np.stack([np.einsum("nd,de,ne->n", q - m, inv, q - m) for m in means], 1).min(1)
    center = x.mean(0)
    total = np.linalg.inv(ledoit_wolf(x - center, assume_centered=True)[0])
    return np.maximum(
        nearest - relative * np.einsum("nd,de,ne->n", q - center, total, q - center), 0
    )


def test_mahalanobis__the_definition_mapped_onto_zero_to_two(digits, tmp_path):
    _, emb, y, train, val = digits
    x = emb.astype(np.float64)
    far = Mahalanobis.fit(x[train], y[train])
    np.testing.assert_allclose(
        far.squared(x[val]), _squared_by_definition(x[train], y[train], x[val]), rtol=1e-6
    )
    # the scale: the training images' median, each measured by a fit without its fold
    fold = np.random.default_rng(0).permutation(len(train)) % 5
    held = np.concatenate(
        [
            _squared_by_definition(x[train][fold != f], y[train][fold != f], x[train][fold == f])
            for f in range(5)
        ]
    )
    assert far.scale == pytest.approx(np.median(held), rel=1e-6)
    mapped = far(x[train])
    assert mapped.dtype == np.float32 and np.all((mapped >= 0) & (mapped < 2))
    # so held-out known images map around 1; by the class means alone (the term taken off
    # fits the training images too), the training images themselves are nearer
    assert 0.8 <= np.median(far(x[val])) <= 1.2
    plain = Mahalanobis(far.means, far.precision, far.scale)
    assert np.median(plain(x[train])) < np.median(plain(x[val]))
    # the map keeps the order; far away tends to 2
    order = np.argsort(far.squared(x[val]))
    assert np.all(np.diff(far(x[val])[order]) >= 0)
    assert far(x[val][:1] * 1e3)[0] > 1.99
    # a fixed scale is kept (folds are scored on the version's)
    assert Mahalanobis.fit(x[val], y[val], scale=far.scale).scale == far.scale
    far.save(tmp_path)
    again = Mahalanobis.load(tmp_path)
    np.testing.assert_array_equal(again(x[val]), far(x[val]))
    assert Mahalanobis.load(tmp_path / "nothing") is None
    # a version fitted before the relative term (its file has no center) keeps its own distance
    np.savez(tmp_path / "far.npz", means=far.means, precision=far.precision, scale=far.scale)
    older = Mahalanobis.load(tmp_path)
    assert older.relative == 0 and older.center is None
    np.testing.assert_allclose(
        older.squared(x[val]), _squared_by_definition(x[train], y[train], x[val], 0), rtol=1e-6
    )


def test_held_out__mahalanobis_out_of_fold(digits):
    pixels, emb, y, train, val = digits
    refit = _refit(pixels, y)
    val_top1 = refit(train)[val]
    version = Mahalanobis.fit(emb[train], y[train])
    held = held_out(emb, y, train, val, val_top1, refit, far=(FarFeatures(emb), version))

    # validation images: the version's own fit
    np.testing.assert_allclose(held.distance[len(train) :], version(emb[val]), rtol=1e-6)
    # training images: the fit without their fold (the head's folds), on the version's scale
    order = np.random.default_rng(0).permutation(train)
    fold = np.arange(len(order)) % FOLDS
    hold = order[fold == 1]
    without = Mahalanobis.fit(emb[order[fold != 1]], y[order[fold != 1]], scale=version.scale)
    at = np.searchsorted(train, hold)
    np.testing.assert_allclose(held.distance[at], without(emb[hold]), rtol=1e-6)
    # held out, a training image is further than in its own fit
    assert np.median(held.distance[: len(train)]) > np.median(version(emb[train]))


def test_held_out__a_fold_fits_the_copies_of_its_own_images_only(digits):
    pixels, emb, y, train, val = digits
    refit = _refit(pixels, y)
    rng = np.random.default_rng(1)
    copy_of = rng.choice(train, 60, replace=False)  # "re-encoded" copies of training images
    copies = emb[copy_of] + rng.normal(0, 0.05, (60, emb.shape[1])).astype(np.float32)
    features = FarFeatures(emb, copies, copy_of)
    version = features.fit(y, train)
    assert features.copies_of(train) == 60 and features.copies_of(val) == 0
    plain = Mahalanobis.fit(emb[train], y[train])
    assert not np.allclose(version.means, plain.means)  # the copies are in the version's fit
    held = held_out(emb, y, train, val, refit(train)[val], refit, far=(features, version))
    order = np.random.default_rng(0).permutation(train)
    fold = np.arange(len(order)) % FOLDS
    fit, hold = order[fold != 1], order[fold == 1]
    mine = np.isin(copy_of, fit)  # the copies of a held-out image stay out of its fold's fit
    assert mine.sum() < 60 and not np.isin(copy_of[mine], hold).any()
    expected = Mahalanobis.fit(
        np.concatenate([emb[fit], copies[mine]]),
        np.concatenate([y[fit], y[copy_of[mine]]]),
        scale=version.scale,
    )(emb[hold])
    np.testing.assert_allclose(held.distance[np.searchsorted(train, hold)], expected, rtol=1e-6)


def test_report_card__mahalanobis_refitted_without_the_class(digits):
    pixels, emb, y, train, val = digits
    refit = _refit(pixels, y)
    version = Mahalanobis.fit(emb[train], y[train])
    held = held_out(emb, y, train, val, refit(train)[val], refit, far=(FarFeatures(emb), version))
    classes = [f"digit{d}" for d in DIGITS]
    rule, _, card = report_card(
        emb, y, classes, train, val, held, refit, 0.5, RATE, far=(FarFeatures(emb), version)
    )
    n = len(held.label)
    assert abs(_shares(rule, held.top1_prob, held.distance)[0] - RATE * n) <= 1
    c = 1
    rest = train[y[train] != c]
    unseen = np.concatenate([train[y[train] == c], val[y[val] == c]])
    dist = Mahalanobis.fit(emb[rest], y[rest], scale=version.scale)(emb[unseen])
    recall = _shares(rule, refit(rest)[unseen], dist)[1]
    assert recall == pytest.approx(card["per_class"][classes[c]], abs=1 / len(unseen) + 1e-4)


def _trained_meta(**thresholds) -> ModelVersion:
    options = asdict(TrainOptions(finetune_epochs=2, false_unknown_rate=0.1, flips="all"))
    meta = {
        "kind": "trained",
        "classes": ["a", "b"],
        "preprocessing": {},
        "training": {"options": options | {"seed": 7}},
        "thresholds": {"confidence": 0.5, "distance": 0.3} | thresholds,
    }
    return ModelVersion(Path("v1"), meta)


def test_train_options_from_version__a_retrain_starts_from_the_active_versions_choices():
    version = _trained_meta(confidence=0.6)
    opts = TrainOptions.from_version(version)
    assert (opts.finetune_epochs, opts.false_unknown_rate, opts.flips, opts.seed) == (
        2,
        0.1,
        "all",
        7,
    )
    assert opts.confidence_threshold == 0.6 and opts.activate
    told = TrainOptions.from_version(version, finetune_epochs=0, activate=False)
    assert told.finetune_epochs == 0 and not told.activate and told.flips == "all"
    # A threshold the calibration lowered: the operator's request counts, not the lowered one.
    lowered = _trained_meta(confidence=0.31, calibration={"confidence_requested": 0.7})
    assert TrainOptions.from_version(lowered).confidence_threshold == 0.7
    tuned = _trained_meta(confidence=0.45, tuned=True, calibration={"confidence_requested": 0.7})
    assert TrainOptions.from_version(tuned).confidence_threshold == 0.45
    # Thresholds calibrated for the operator's rate: a retrain calibrates at that rate, with
    # the confidence training was asked for (the options' 0.5), not the calibrated 0.42.
    aimed = _trained_meta(confidence=0.42, tuned=True, target=0.03)
    opts = TrainOptions.from_version(aimed)
    assert (opts.false_unknown_rate, opts.confidence_threshold) == (0.03, 0.5)
    assert TrainOptions.from_version(aimed, false_unknown_rate=0.07).false_unknown_rate == 0.07
    assert TrainOptions.from_version(None) == TrainOptions()
    imagenet = ModelVersion(Path("v0"), {"kind": "imagenet", "classes": [], "preprocessing": {}})
    assert TrainOptions.from_version(imagenet, seed=3) == TrainOptions(seed=3)


@pytest.mark.parametrize(
    ("n", "flagged", "verdict"),
    [
        (187, 9, "within"),
        (187, 14, "within"),
        (187, 20, "above"),
        (400, 6, "below"),
        (20, 3, "within"),
    ],
)
def test_against_target__off_target_only_beyond_chance(n, flagged, verdict, capsys, tmp_path):
    from imagesieve.app.ui._model import _metrics_md
    from imagesieve.cli import _print_metrics

    off = against_target(flagged / n, n, 0.05)
    assert (off["n"], off["flagged"], off["target"], off["verdict"]) == (n, flagged, 0.05, verdict)
    assert (off["p"] < OFF_TARGET) == (verdict != "within")
    # the train summary and the Model tab say so, in the same words, only when off target
    m = {"n": n, "accuracy": 0.9, "macro_f1": 0.9, "unknown_rate": flagged / n}
    m |= {"unknown_by_rule": {"far_from_training": flagged / n}, "unknown_vs_target": off}
    _print_metrics(m)
    printed = capsys.readouterr().out
    tab = _metrics_md(ModelVersion(tmp_path, {"metrics": m}))
    words = off_target_words(off)
    assert (words is None) == (verdict == "within") and off_target_words(None) is None
    assert (words is not None and words in printed and words in tab) or (
        verdict == "within" and "chance" not in printed + tab
    )
    if words:
        more = "more" if verdict == "above" else "fewer"
        assert (
            f"{flagged} of {n} images of known classes" in words and f"{more} than chance" in words
        )
