import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imagesieve._errors import UserError
from imagesieve.classifier import (
    UNKNOWN,
    Predictor,
    ScoringEngine,
    UnknownRule,
    calibrate_at,
    card_at,
    held_out_unknowns,
    held_out_words,
    read_audit,
    softmax,
    top_k,
    untested_words,
)
from imagesieve.classifier._far import FAR_MAHALANOBIS, RELATIVE, Mahalanobis
from imagesieve.classifier._reference import ReferenceSet
from imagesieve.classifier._report import AUDIT_COLUMNS
from imagesieve.classifier._split import adaptive_split
from imagesieve.classifier._train import TrainOptions, train_model
from imagesieve.data import load_image
from imagesieve.models import ModelVersion, active_version, get_version
from imagesieve.models.export import imagenet_version, load_checkpoint


def test_softmax_top_k__against_reference():
    logits = np.array([[1.0, 3.0, 2.0, 0.0], [5.0, 5.0, 0.0, -1.0]], np.float32)
    p = softmax(logits.copy())
    ref = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(p, ref, rtol=1e-6)
    idx, probs = top_k(p, 3)
    assert idx.tolist() == [[1, 2, 0], [0, 1, 2]]
    np.testing.assert_allclose(probs, np.take_along_axis(ref, idx, 1), rtol=1e-6)


def test_adaptive_split__near_duplicates_stay_on_one_side():
    labels = np.array([0] * 100 + [1] * 100)
    plain = adaptive_split(labels, ["a", "b"], seed=3)
    groups = np.arange(200)
    groups[[5, 50, 99]] = 5  # three near-duplicates of class a, likely split apart
    groups[[150, 160]] = 150
    groups[[10, 110]] = 10  # a near-duplicate pair filed under both classes
    plan = adaptive_split(labels, ["a", "b"], seed=3, groups=groups)
    side = {i: k for k in ("train", "val", "test") for i in getattr(plan, k).tolist()}
    for members in ([5, 50, 99], [150, 160], [10, 110]):
        assert len({side[i] for i in members}) == 1, members
    assert sorted(side) == list(range(200))  # still a partition
    for k in ("train", "val", "test"):  # sizes move by at most the groups' members
        assert abs(len(getattr(plan, k)) - len(getattr(plain, k))) <= 4
        for c in ("a", "b"):
            got = plan.per_class[c][k]
            assert got == int((labels[getattr(plan, k)] == ("ab".index(c))).sum())
    # without groups of two or more, the split is the plain one
    again = adaptive_split(labels, ["a", "b"], seed=3, groups=np.arange(200))
    assert np.array_equal(again.test, plain.test) and np.array_equal(again.val, plain.val)


def test_adaptive_split__rules_per_class_size():
    labels = np.array([0] * 2 + [1] * 10 + [2] * 100)
    plan = adaptive_split(labels, ["rare", "medium", "many"], test_size=0.2, val_size=0.1, seed=0)
    pc = plan.per_class
    assert pc["rare"] == {
        "images": 2,
        "train": 2,
        "val": 0,
        "test": 0,
        "rule": "train only (fewer than 4 images)",
    }
    assert (
        pc["medium"]["train"],
        pc["medium"]["val"],
        pc["medium"]["test"],
        pc["medium"]["rule"],
    ) == (8, 0, 2, "train+test")
    assert (pc["many"]["train"], pc["many"]["val"], pc["many"]["test"]) == (70, 10, 20)
    all_idx = np.concatenate([plan.train, plan.val, plan.test])
    assert sorted(all_idx.tolist()) == list(
        range(len(labels))
    )  # a partition: nothing lost, nothing twice


def test_adaptive_split__bad_shares_rejected():
    with pytest.raises(ValueError, match="must be shares in \\[0, 1\\) summing below 1"):
        adaptive_split(np.zeros(10, int), ["a"], test_size=0.6, val_size=0.5)


def test_train_model__version_files_split_and_skipped(trained):
    ws, result = trained
    v = result.version
    assert active_version(ws).name == v.name == "v1"
    for name in ("model.pt", "model.onnx", "meta.json"):
        assert (v.path / name).is_file()
    for name in ("metrics.json", "confusion_matrix.png", "training_curves.png", "audit.csv"):
        assert (v.report_dir / name).is_file(), name
    meta = json.loads((v.path / "meta.json").read_text())
    assert meta["classes"] == ["defective", "functional", "lonely"]
    assert meta["split"]["per_class"]["lonely"]["rule"] == "train only (fewer than 4 images)"
    lonely = meta["split"]["per_class"]["lonely"]["images"]
    assert untested_words(meta["split"]) == (
        f"no test images, so no accuracy, for lonely ({lonely} images)"
    )
    scores = json.loads((v.report_dir / "metrics.json").read_text())["per_class"]["lonely"]
    assert (scores["recall"], scores["f1"], scores["support"]) == (None, None, 0)
    from imagesieve.app.ui._model import _metrics_md  # the Model tab says it too

    assert f"No test images, so no accuracy, for lonely ({lonely} images)." in _metrics_md(v)
    assert meta["split"]["per_class"]["defective"]["test"] == 10
    # the whole UNKNOWN decision calibrated on out-of-fold training images + validation images
    thresholds, split = meta["thresholds"], meta["split"]
    n_train, n_val = split["train"], split["val"]
    assert n_train == sum(c["train"] for c in split["per_class"].values())
    calibration = thresholds["calibration"]
    assert calibration["on"] == f"{n_train} training images out of fold + {n_val} validation images"
    assert calibration["n"] == n_train + n_val
    assert calibration["false_unknown_rate"] == 0.05
    if "confidence_requested" in calibration:  # low confidence alone took over half the rate
        assert calibration["confidence_requested"] == 0.5 and thresholds["confidence"] < 0.5
    else:
        assert thresholds["confidence"] == 0.5
    assert thresholds["mix"] >= 0.0
    assert 0.0 < thresholds["distance"] < 2.0 + thresholds["mix"]
    realised = calibration["realised"]
    assert set(realised) == {"unknown", "poor_quality", "low_confidence", "far_from_training"}
    assert realised["low_confidence"] <= 0.025
    assert max(realised["low_confidence"], realised["far_from_training"]) <= realised["unknown"]
    if calibration["n"] >= 50:
        assert abs(realised["unknown"] - 0.05) <= 0.02
    # the open-set report card: every class with other classes to compare against, left out
    card = meta["open_set"]
    assert set(card["per_class"]) == {"defective", "functional", "lonely"}
    recalls = card["per_class"].values()
    assert all(0.0 <= r <= 1.0 for r in recalls)
    assert card["mean_recall"] == pytest.approx(np.mean(list(recalls)), abs=1e-3)
    assert card["worst"]["recall"] == min(recalls)
    assert card["per_class"][card["worst"]["class"]] == min(recalls)
    assert f"{thresholds['mix']:.4g}" in card["mix_tried"] and "0" in card["mix_tried"]
    # the test metrics count the whole decision, and each rule's share
    metrics = meta["metrics"]
    by_rule = metrics["unknown_by_rule"]
    assert set(by_rule) == {"poor_quality", "low_confidence", "far_from_training"}
    rate = metrics["unknown_rate"]
    assert max(by_rule.values()) - 1e-9 <= rate <= sum(by_rule.values()) + 1e-9
    # ... and whether the test images' rate is off the target beyond chance
    off = metrics["unknown_vs_target"]
    assert (off["n"], off["flagged"], off["target"]) == (
        metrics["n"],
        round(rate * metrics["n"]),
        0.05,
    )
    assert off["verdict"] in ("within", "above", "below") and 0.0 <= off["p"] <= 1.0
    reference = ReferenceSet.load(v.path)
    assert len(reference) == n_train and reference.embeddings.shape == (n_train, 1280)
    assert np.allclose(np.linalg.norm(reference.embeddings, axis=1), 1.0, atol=1e-4)
    assert "lonely" in reference.labels
    # the distance to the training data: Mahalanobis on the 112- and 192-channel stages, one
    # mean a class, less a share of the distance to one Gaussian of all training images
    assert thresholds["far"] == FAR_MAHALANOBIS
    assert v.distance_words == "Mahalanobis distance to the nearest class"
    far = Mahalanobis.load(v.path)
    assert far.means.shape == (3, 304) and far.precision.shape == (304, 304)
    assert far.center.shape == (304,) and far.total_precision.shape == (304, 304)
    assert far.relative == RELATIVE > 0
    assert len(meta["data"]["fingerprint"]) == 64
    reasons = {Path(s["path"]).name: s["reason"] for s in result.skipped}
    assert reasons["notes.txt"] == "not an image file extension (.txt)"
    assert reasons["broken.png"].startswith("truncated image data")
    assert reasons["README.txt"] == "not inside a class folder"
    assert meta["data"]["images"] == 81
    assert 0.5 <= result.metrics["accuracy"] <= 1.0


def test_held_out_unknowns__any_thresholds_judged_on_the_test_images(trained):
    """audit.csv keeps what the decision read, so other thresholds are judged without scoring."""
    ws, result = trained
    v = result.version
    rows = read_audit(v.report_dir)
    assert len(rows) == v.meta["metrics"]["n"]
    assert all((r["reason"] != "") == (r["unknown"] == "true") for r in rows)
    assert all(r["distance"] and float(r["distance"]) >= 0 and r["entropy"] for r in rows)
    # at the version's own thresholds: exactly what training measured on its test images
    m = v.meta["metrics"]
    own = held_out_unknowns(v)
    assert (own["images"], own["rate"], own["vs_target"]) == (
        m["n"],
        round(m["unknown_rate"], 4),
        m["unknown_vs_target"],
    )
    assert own["by_rule"] == {k: round(share, 4) for k, share in m["unknown_by_rule"].items()}
    # every image below a Top-1 of 1: all UNKNOWN, far above the 5% target
    every = held_out_unknowns(v, UnknownRule(1.0, None))
    assert (every["unknown"], every["by_rule"]["low_confidence"]) == (m["n"], 1.0)
    assert every["vs_target"]["verdict"] == "above" and every["vs_target"]["flagged"] == m["n"]
    assert f"{m['n']} of the {m['n']} held-out test images" in held_out_words(every)
    assert "more than chance explains" in held_out_words(every)
    # no confidence or distance rule: only poor photos, by the version's quality bounds
    quality_only = held_out_unknowns(v, UnknownRule(0.0, None))
    poor = sum("poor_quality" in r["reason"] for r in rows)
    assert quality_only["unknown"] == poor and quality_only["by_rule"]["far_from_training"] == 0
    # the distance rule alone at a threshold half the test images pass
    d = np.array([float(r["distance"]) for r in rows])
    half = held_out_unknowns(v, UnknownRule(0.0, float(np.median(d)), v.mix))
    far = d + v.mix * (1 - np.array([float(r["confidence"]) for r in rows])) > np.median(d)
    assert half["by_rule"]["far_from_training"] == round(far.mean(), 4)


def test_calibrate_at__training_again_at_another_rate_without_retraining(trained, tmp_path):
    """The held-out images training calibrated on are kept: another rate needs no retraining."""
    ws, result = trained
    v = result.version
    calibration = v.meta["thresholds"]["calibration"]
    rule, info = calibrate_at(v, 0.05)  # training's own rate: training's own thresholds
    assert (rule.confidence, rule.distance, rule.mix) == (
        v.confidence_threshold,
        v.distance_threshold,
        v.mix,
    )
    assert info == calibration
    looser, loose_info = calibrate_at(v, 0.20)
    assert looser.distance <= rule.distance and looser.confidence >= rule.confidence
    assert abs(loose_info["realised"]["unknown"] - 0.20) <= 0.02
    assert held_out_unknowns(v, looser, target=0.2)["vs_target"]["target"] == 0.2
    # the report card of any thresholds: at the version's own, exactly training's card
    card = v.meta["open_set"]
    own = card_at(v, UnknownRule(v.confidence_threshold, v.distance_threshold, v.mix))
    assert own == {k: card[k] for k in ("per_class", "mean_recall", "worst")}
    loose = card_at(v, looser)
    assert all(loose["per_class"][c] >= r for c, r in card["per_class"].items())
    assert card_at(v, UnknownRule(1.0, None))["mean_recall"] == 1.0  # everything flagged
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(UserError, match="must be a share within"):
            calibrate_at(v, bad)
    old = tmp_path / "v1"
    shutil.copytree(v.path, old)
    (old / "calibration.npz").write_bytes(b"not a zip")  # damaged: one line, no traceback
    with pytest.raises(UserError, match="calibration.npz cannot be read: retrain v1"):
        calibrate_at(ModelVersion.load(old), 0.1)
    assert card_at(ModelVersion.load(old), rule) is None
    (old / "calibration.npz").unlink()
    with pytest.raises(UserError, match="trained before its calibration images were kept"):
        calibrate_at(ModelVersion.load(old), 0.1)


def test_held_out_unknowns__none_for_a_report_without_the_decisions_inputs(trained, tmp_path):
    """A version trained before audit.csv kept them: nothing to judge, and no error."""
    ws, result = trained
    old = tmp_path / "v1"
    shutil.copytree(result.version.path, old)
    audit = old / "report" / "audit.csv"
    with open(audit, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(audit, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(AUDIT_COLUMNS[:-1])
        writer.writerows([r[k] for k in AUDIT_COLUMNS[:-1]] for r in rows)
    assert held_out_unknowns(ModelVersion.load(old)) is None
    audit.unlink()
    assert held_out_unknowns(ModelVersion.load(old)) is None
    assert held_out_unknowns(ModelVersion.load(result.version.path)) is not None


def test_predictor__onnx_top1_matches_torch_checkpoint(trained, small_folder):
    ws, result = trained
    v = result.version
    paths = sorted(str(p) for p in (small_folder / "defective").glob("cell*.png"))[:12]
    paths += sorted(str(p) for p in (small_folder / "functional").glob("*.png"))[:12]
    preds = list(Predictor(v).score(paths))
    model, classes = load_checkpoint(v.checkpoint_path)
    x = np.stack(
        [v.config.preprocess(load_image(p, min_side=v.config.resize_side).image) for p in paths]
    )
    with torch.no_grad():
        emb, logits = model(torch.from_numpy(x))
    assert [p.top3[0][0] for p in preds] == [classes[i] for i in logits.argmax(1).tolist()]
    np.testing.assert_allclose(np.stack([p.embedding for p in preds]), emb.numpy(), atol=1e-4)
    np.testing.assert_allclose(
        np.stack([p.probs for p in preds]), logits.softmax(1).numpy(), atol=1e-4
    )
    # the far rule's distance: the version's Mahalanobis distance of the tapped block's output;
    # the nearest training image's cosine distance is kept beside it
    with torch.no_grad():
        tap = model.outputs(torch.from_numpy(x))["ood_features"].numpy()
    far = Mahalanobis.load(v.path)
    np.testing.assert_allclose([p.neighbor_distance for p in preds], far(tap), atol=1e-4)
    reference = ReferenceSet.load(v.path)
    cosine = [1.0 - float(reference.embeddings[p.neighbor_id] @ p.embedding) for p in preds]
    np.testing.assert_allclose([p.neighbor_cosine for p in preds], cosine, atol=1e-5)


def test_predictor__threshold_marks_unknown_and_keeps_top3(trained, small_folder):
    ws, result = trained
    paths = sorted(str(p) for p in (small_folder / "functional").glob("*.png"))[:5]
    for p in Predictor(result.version, threshold=1.0).score(paths):
        assert p.label == UNKNOWN and p.reason == "low_confidence"
        assert len(p.top3) == 3 and p.top3[0][1] >= p.top3[1][1] >= p.top3[2][1]
    for p in Predictor(result.version, threshold=0.0).score(paths):
        assert p.label == p.top3[0][0] and p.reason is None


def test_predictor__bad_items_fail_alone_in_order(trained, small_folder, tmp_path):
    ws, result = trained
    good = sorted(str(p) for p in (small_folder / "functional").glob("*.png"))[:3]
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    items = [
        good[0],
        str(tmp_path / "empty.jpg"),
        good[1],
        str(tmp_path / "text.png"),
        str(tmp_path / "missing.png"),
        ("upload.png", Path(good[2]).read_bytes()),
    ]
    preds = list(Predictor(result.version, batch_size=2).score(items))
    assert [p.source for p in preds] == [
        good[0],
        str(tmp_path / "empty.jpg"),
        good[1],
        str(tmp_path / "text.png"),
        str(tmp_path / "missing.png"),
        "upload.png",
    ]
    assert [p.error_kind for p in preds] == [None, "empty", None, "not_image", "missing", None]
    assert preds[3].error == "not a recognised image format"
    assert preds[5].ok and preds[5].top3


def test_imagenet_version__no_training_top3_on_a_real_photo(tmp_path):
    import skimage

    from imagesieve._workspace import Workspace

    ws = Workspace(tmp_path)
    v = imagenet_version(ws)
    assert len(v.classes) == 1000 and v.meta["kind"] == "imagenet"
    assert active_version(ws) is None  # the baseline is never activated behind the user's back
    cat = Path(skimage.__file__).parent / "data" / "chelsea.png"
    pred = next(Predictor(v).score([str(cat)]))
    assert {c for c, _ in pred.top3} <= {
        "Egyptian cat",
        "tabby",
        "tiger cat",
        "lynx",
        "Persian cat",
    }
    assert imagenet_version(ws).path == v.path  # reused, not rebuilt


def test_scoring_engine__streams_in_batches(trained, small_folder):
    ws, result = trained
    v = result.version
    paths = sorted(str(p) for p in small_folder.rglob("cell*.png"))[:10]
    engine = ScoringEngine(v.onnx_path, v.config, batch_size=4, workers=2)
    sizes = [len(b) for b in engine.run(iter(paths))]
    assert sizes == [4, 4, 2]


def test_scoring_path__does_not_import_torch(trained, small_folder):
    ws, result = trained
    img = next((small_folder / "functional").glob("*.png"))
    code = (
        "import sys; from imagesieve._workspace import Workspace; from imagesieve.models import get_version;"
        "from imagesieve.classifier import Predictor;"
        f"p = next(Predictor(get_version(Workspace({str(ws.root)!r}))).score([{str(img)!r}]));"
        "assert p.ok, p.error; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_train_model__finetune_phase_records_curves(tmp_path, small_folder):
    from imagesieve._workspace import Workspace

    ws = Workspace(tmp_path)
    result = train_model(
        small_folder,
        ws,
        TrainOptions(finetune_epochs=1, flips="all", test_size=0.25, val_size=0.15, activate=False),
    )
    meta = result.version.meta
    assert meta["training"]["options"]["flips"] == "all"
    assert meta["training"]["phase2"]["epochs_run"] == 1
    assert meta["training"]["phase2"]["best_epoch"] == 1
    assert active_version(ws) is None
    assert (result.version.report_dir / "training_curves.png").stat().st_size > 1000
    assert get_version(ws, "v1").meta["training"]["phase1"]["selected_on"] == "val split"
    # the distance is fitted on the fine-tuned model's features of the training images and
    # of the near-duplicate check's copies of them (the same copies, embedded again)
    from imagesieve.classifier._leakage import training_copies
    from imagesieve.data import scan_image_folder

    reference = ReferenceSet.load(result.version.path)
    predictor = Predictor(result.version)
    ood = np.stack([p.ood_features for p in predictor.score(reference.sources)])
    unread = {s["path"] for s in meta["data"]["skipped"]}  # training's images: the readable ones
    paths = [s.path for s in scan_image_folder(small_folder).samples if str(s.path) not in unread]
    items, source = training_copies(paths, result.version.config, 0)
    train = set(reference.sources)
    mine = [k for k, i in enumerate(source) if str(paths[i]) in train]
    assert mine and meta["thresholds"]["far_copies"] == len(mine)
    copies = np.stack([p.ood_features for p in predictor.score([items[k] for k in mine])])
    labels = [*reference.labels, *(paths[source[k]].parent.name for k in mine)]
    expected = Mahalanobis.fit(np.concatenate([ood, copies]), np.array(labels)).means
    far = Mahalanobis.load(result.version.path)
    np.testing.assert_allclose(far.means, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("flips", "corners"),
    [("horizontal", {"top-left", "top-right"}), ("all", None), ("none", {"top-left"})],
)
def test_augment__flips_all_turns_and_flips_images_horizontal_only_mirrors_none_keeps(
    flips, corners
):
    from PIL import Image

    from imagesieve.classifier._train import _augment_transform

    torch.manual_seed(0)
    a = np.zeros((64, 64, 3), np.uint8)
    a[:24, :24] = 255  # a bright top-left corner
    image = Image.fromarray(a)
    aug = _augment_transform(64, flips)
    names = {(0, 0): "top-left", (0, 1): "top-right", (1, 0): "bottom-left", (1, 1): "bottom-right"}
    seen = set()
    for _ in range(80):
        out = np.asarray(aug(image), np.float32).mean(axis=2)
        quads = out.reshape(2, 32, 2, 32).mean(axis=(1, 3))
        seen.add(names[np.unravel_index(quads.argmax(), quads.shape)])
    assert seen == (corners or set(names.values()))
    with pytest.raises(ValueError, match="flips must be one of horizontal, all, none"):
        TrainOptions(flips="vertical")


def test_train_model__unknown_backbone_and_one_class(tmp_path, small_folder):
    from imagesieve._workspace import Workspace

    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        TrainOptions(backbone="nope")
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    for p in list((small_folder / "functional").glob("cell*.png"))[:3]:
        (one / "only" / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ValueError, match="need at least 2 classes with readable images"):
        train_model(one, Workspace(tmp_path / "ws"))


def test_scoring_engine__bytes_waiting_to_be_decoded_are_bounded(
    trained, small_folder, monkeypatch
):
    """Uploads and downloads sit in memory: the engine reads the stream no further than its
    byte budget ahead of decoding, however many items its count-based prefetch would take."""
    from imagesieve.classifier import _engine

    _, result = trained
    data = sorted((small_folder / "functional").glob("*.png"))[0].read_bytes()
    monkeypatch.setattr(_engine, "PREFETCH_BYTES", 2 * len(data))
    pulled = 0

    def items():
        nonlocal pulled
        for i in range(60):
            pulled += 1
            yield (f"img{i}.png", data)

    engine = Predictor(result.version, batch_size=4).engine
    batches = engine.run(items())
    first = next(batches)
    assert len(first) >= 1 and pulled <= 2 * engine.streams + 4, pulled  # count alone: 14+
    assert sum(len(b) for b in batches) + len(first) == 60
