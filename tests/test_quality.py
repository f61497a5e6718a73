"""Photo quality: each kind flagged on generated degradations, clean photos not, on real pixels."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from imagesieve.classifier import QualityRule, calibrate_quality, measure_quality
from imagesieve.models import DEFAULT_BACKBONE, BackboneConfig, get_backbone_spec


@pytest.fixture(scope="module")
def config() -> BackboneConfig:
    return get_backbone_spec(DEFAULT_BACKBONE).config


def measure(img: Image.Image, config: BackboneConfig):
    img = img.convert("RGB")
    return measure_quality(config.resize_and_crop(img), *img.size)


@pytest.fixture(scope="module")
def calibrated(elpv, config):
    """A rule calibrated on 300 ELPV cells, and 100 other cells to degrade."""
    cells = [Image.open(im.path).convert("RGB") for im in elpv[::6][:400]]
    rule = calibrate_quality([measure(c, config) for c in cells[:300]])
    return rule, cells[300:]


def test_calibrate__thresholds_sit_beyond_the_training_images_and_round_trip(calibrated):
    rule, _ = calibrated
    assert 0 < rule.blur_max < 1 and 0 < rule.dark_max < rule.bright_min < 1
    assert rule.glare_min >= 0.01 and rule.min_side == 150  # half of ELPV's 300-pixel side
    assert QualityRule.from_dict(rule.to_dict()) == rule
    assert QualityRule.from_dict(None) is None and calibrate_quality([]) == QualityRule()


def _glare(img: Image.Image) -> Image.Image:
    a = np.asarray(img, np.float32)
    h, w = a.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    blob = np.exp(-((yy - h / 2) ** 2 + (xx - w / 2) ** 2) / (2 * (0.15 * min(h, w)) ** 2))
    return Image.fromarray(np.clip(a + blob[..., None] * 400, 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("kind", "degrade"),
    [
        ("blurred", lambda im: im.filter(ImageFilter.GaussianBlur(6))),
        ("dark", lambda im: Image.fromarray((np.asarray(im) * 0.12).astype(np.uint8))),
        (
            "bright",
            lambda im: Image.fromarray(np.clip(np.asarray(im) * 3.5, 0, 255).astype(np.uint8)),
        ),
        ("glare", _glare),
        ("too_small", lambda im: im.crop((120, 120, 160, 160))),
        ("odd_shape", lambda im: im.crop((0, 100, 300, 140))),
        ("low_information", lambda im: Image.new("RGB", im.size, (128, 128, 128))),
    ],
)
def test_flags__each_kind_on_its_degradation_and_rarely_on_clean_cells(
    calibrated, config, kind, degrade
):
    rule, cells = calibrated
    degraded = [rule.flags(measure(degrade(c), config)) for c in cells[:40]]
    assert np.mean([kind in f for f in degraded]) >= 0.9, kind
    clean = [rule.flags(measure(c, config)) for c in cells]
    assert np.mean([kind in f for f in clean]) <= 0.05


def test_measure__a_flat_image_has_no_detail_and_no_information(config):
    m = measure(Image.new("RGB", (300, 300), (30, 30, 30)), config)
    assert m.blur == 1.0 and m.entropy == 0.0 and m.saturated == 0.0
    assert m.brightness == pytest.approx(30 / 255, abs=1e-3) and m.min_side == 300 and m.aspect == 1


def test_training_calibrates_the_rule_and_predictions_report_their_flags(trained, small_folder):
    from imagesieve.classifier import Predictor
    from imagesieve.models import get_version

    ws, _ = trained
    version = get_version(ws)
    rule = QualityRule.from_dict(version.meta["quality"])
    assert rule is not None and 0 < rule.blur_max < 1 and rule.min_side == 150
    cell = sorted((small_folder / "functional").glob("*.png"))[0]
    sharp = Image.open(cell).convert("RGB")
    dark = Image.fromarray((np.asarray(sharp) * 0.1).astype(np.uint8))
    blurred = sharp.filter(ImageFilter.GaussianBlur(6))
    data = []
    for img in (sharp, dark, blurred):
        buf = io.BytesIO()
        img.save(buf, "PNG")
        data.append(buf.getvalue())
    preds = list(
        Predictor(version).score(
            [("sharp.png", data[0]), ("dark.png", data[1]), ("blur.png", data[2])]
        )
    )
    assert preds[0].quality_flags == [] and preds[2].quality_flags == ["blurred"]
    assert preds[1].quality_flags[0] == "dark"  # (so dark its histogram holds little too)
    doc = preds[1].to_dict()["quality"]
    assert (
        doc["flags"][0] == "dark" and doc["brightness"] < rule.dark_max and doc["min_side"] == 300
    )


def test_score_summary_counts_poor_photos_in_the_cli_and_json(
    scoring_ws, small_folder, tmp_path, capsys
):
    from imagesieve.cli import main

    cells = sorted((small_folder / "functional").glob("*.png"))[:3]
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, cell in enumerate(cells):
        img = Image.open(cell).convert("RGB")
        if i == 1:
            img = img.filter(ImageFilter.GaussianBlur(6))
        img.save(folder / f"{i}.png")
    assert main(["score", str(folder), "--workspace", str(scoring_ws.root)]) == 0
    out = capsys.readouterr().out
    assert "1 photos of poor quality (reported only): blurred 1" in out
    assert main(["score", str(folder), "--workspace", str(scoring_ws.root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["poor_quality"] == 0 and doc["already_scored"] == 3  # not decoded again
