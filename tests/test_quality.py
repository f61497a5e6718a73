"""Photo quality: each kind flagged on generated degradations, clean photos not, on real pixels."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from imagesieve.classifier import (
    STORED_MEASURES,
    QualityRule,
    calibrate_quality,
    measure_quality,
)
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


def _noisy_stripes(n: int, seed: int) -> list[Image.Image]:
    """Stripes of random colours, period and angle, slightly blurred and noisy, 160 pixels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:160, 0:160].astype(np.float32)
    out = []
    for _ in range(n):
        bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        while np.abs(bg - fg).sum() < 120:  # stripes that can be seen
            fg = rng.integers(0, 256, 3)
        angle, period = rng.uniform(0, np.pi), rng.uniform(10, 32)
        on = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period) > 0
        img = Image.fromarray(np.where(on[..., None], fg, bg).astype(np.uint8))
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 1.2))))  # a camera's
        a = np.asarray(img, np.float32) + rng.normal(0, rng.uniform(2, 10), (160, 160, 3))
        out.append(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)))
    return out


@pytest.fixture(scope="module")
def stripes(config):
    """A rule calibrated on 300 noisy coloured stripes, and 60 others to degrade."""
    images = _noisy_stripes(360, 7)
    return calibrate_quality([measure(im, config) for im in images[:300]]), images[300:]


def test_flags__blur_that_noise_hides_is_found_by_the_edges(stripes, config):
    """Noise reads as detail to the re-blur measure; the spread of the strongest edges does not."""
    rule, images = stripes
    blurred = [measure(im.filter(ImageFilter.GaussianBlur(2.5)), config) for im in images]
    found = np.mean(["blurred" in rule.flags(m) for m in blurred])
    by_detail = np.mean(["blurred" in replace(rule, edge_blur_max=None).flags(m) for m in blurred])
    assert found >= 0.9 and by_detail < found - 0.1, (found, by_detail)
    clean = [rule.flags(measure(im, config)) for im in images]
    assert np.mean(["blurred" in f for f in clean]) <= 0.05


def test_flags__under_exposure_of_dark_colours_is_found_by_the_highlights(stripes, config):
    """Dark colours are ordinary here, so mean brightness alone misses photos at 30% of their
    light; its brightest part gives it away. Dark photos are not called blurred."""
    rule, images = stripes
    dim = [
        measure(Image.fromarray((np.asarray(im) * 0.3).astype(np.uint8)), config) for im in images
    ]
    flags = [rule.flags(m) for m in dim]
    by_mean = np.mean(["dark" in replace(rule, highlights_min=None).flags(m) for m in dim])
    assert np.mean(["dark" in f for f in flags]) >= 0.9 and by_mean < 0.8, by_mean
    assert not any("blurred" in f for f in flags)
    assert np.mean(["dark" in rule.flags(measure(im, config)) for im in images]) <= 0.05


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
    assert "blurred" not in preds[1].quality_flags  # its edges are faint, not spread
    doc = preds[1].to_dict()["quality"]
    assert (
        doc["flags"][0] == "dark" and doc["brightness"] < rule.dark_max and doc["min_side"] == 300
    )


def _photos(small_folder, folder) -> None:
    """Three sharp functional cells, one of them blurred, one darkened, in ``folder``."""
    cells = sorted((small_folder / "functional").glob("*.png"))[:5]
    folder.mkdir()
    for i, cell in enumerate(cells):
        img = Image.open(cell).convert("RGB")
        if i == 1:
            img = img.filter(ImageFilter.GaussianBlur(6))
        if i == 3:
            img = Image.fromarray((np.asarray(img) * 0.1).astype(np.uint8))
        img.save(folder / f"{i}.png")


def _cli_json(capsys, *args) -> dict:
    from imagesieve.cli import main

    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_score__a_poor_photo_is_unknown_in_the_summary_csv_and_sorted_folders(
    scoring_ws, small_folder, tmp_path, capsys
):
    from imagesieve.cli import main

    folder = tmp_path / "photos"
    _photos(small_folder, folder)
    wsa = ["--workspace", str(scoring_ws.root)]
    report, sorted_dir = tmp_path / "out.csv", tmp_path / "sorted"
    args = ["score", str(folder), *wsa, "--csv", str(report), "--sort-into", str(sorted_dir)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 photos of poor quality (UNKNOWN: reshoot them): blurred 1, dark 1" in out
    assert f"poor photos in {sorted_dir}/POOR_QUALITY/" in out
    import csv

    rows = {r["source"].rsplit("/", 1)[-1]: r for r in csv.DictReader(report.open())}
    assert rows["1.png"]["label"] == "UNKNOWN" and rows["1.png"]["quality_flags"] == "blurred"
    assert rows["1.png"]["reason"].split("+")[0] == "poor_quality"
    assert (
        rows["3.png"]["reason"].startswith("poor_quality")
        and "dark" in rows["3.png"]["quality_flags"]
    )
    assert rows["0.png"]["quality_flags"] == "" and "poor_quality" not in rows["0.png"]["reason"]
    assert sorted(p.name for p in (sorted_dir / "POOR_QUALITY").iterdir()) == ["1.png", "3.png"]
    others = [p.name for p in sorted_dir.glob("*/*.png") if p.parent.name != "POOR_QUALITY"]
    assert sorted(others) == ["0.png", "2.png", "4.png"]
    doc = _cli_json(capsys, "score", str(folder), *wsa)
    assert doc["poor_quality"] == 2 and doc["already_scored"] == 5  # stored flags, not decoded


def test_stored_quality__columns_in_sql_filters_overrides_undo_and_clustering(
    scoring_ws, small_folder, tmp_path, capsys
):
    from imagesieve.cli import main
    from imagesieve.models import get_version
    from imagesieve.store import Store

    folder = tmp_path / "photos"
    _photos(small_folder, folder)
    wsa = ["--workspace", str(scoring_ws.root)]
    assert main(["score", str(folder), *wsa]) == 0
    version = get_version(scoring_ws)
    rule = QualityRule.of_version(version.meta)

    # the measures and flags are columns any read-only query sees, and agree with the rule
    sql = (
        "SELECT regexp_extract(source, '[0-9]+[.]png') AS f, quality_flags, blur, edge_blur, "
        "brightness, highlights, saturated, clipped, entropy, width, height, label, reason "
        "FROM predictions ORDER BY f"
    )
    got = _cli_json(capsys, "sql", sql, *wsa)
    stored = [dict(zip(got["columns"], r, strict=True)) for r in got["rows"]]
    assert [r["quality_flags"] for r in stored][:2] == [None, "blurred"]
    assert stored[3]["quality_flags"].startswith("dark")
    columns = {
        k: np.array([r[k] for r in stored], np.float64) for k in stored[0] if k in STORED_MEASURES
    }
    columns["min_side"] = np.array([min(r["width"], r["height"]) for r in stored], np.float64)
    columns["aspect"] = np.array(
        [max(r["width"], r["height"]) / min(r["width"], r["height"]) for r in stored]
    )
    assert rule.flag_columns(columns) == [r["quality_flags"] for r in stored]
    with Store(scoring_ws) as store:  # the SQL form of the rule gives the same flags
        expr, params = rule.sql_flags()
        again = store._db.execute(
            f"SELECT {expr} FROM predictions ORDER BY regexp_extract(source, '[0-9]+[.]png')",
            params,
        ).fetchall()
    assert [f for (f,) in again] == [r["quality_flags"] for r in stored]

    # browse filters and facets on the flags ('' : none)
    page = _cli_json(capsys, "images", "--quality", "blurred", *wsa)
    assert [r["source"].rsplit("/", 1)[-1] for r in page["rows"]] == ["1.png"]
    assert _cli_json(capsys, "images", "--quality", "", *wsa)["total"] == 3
    assert _cli_json(capsys, "images", "--reason", "poor_quality", *wsa)["total"] == 2
    facet = dict(map(tuple, _cli_json(capsys, "images", *wsa)["facets"]["quality"]))
    assert facet["blurred"] == 1 and facet[None] == 3

    # an operator switches the blur check off: previewed, applied (re-decided), undone
    before = _cli_json(capsys, "thresholds", *wsa)
    assert before["counts"]["poor_quality"] == 2 and before["quality"]["blur_max"] == rule.blur_max
    preview = _cli_json(
        capsys,
        "thresholds",
        "--preview",
        str(before["confidence"]),
        str(before["distance"]),
        "--quality",
        "blur_max=off",
        "--quality",
        "edge_blur_max=off",
        *wsa,
    )
    assert preview["counts"]["poor_quality"] == 1
    assert _cli_json(capsys, "thresholds", *wsa)["counts"]["poor_quality"] == 2  # nothing changed
    off = ("--quality", "blur_max=off", "--quality", "edge_blur_max=off")
    applied = _cli_json(capsys, "thresholds", *off, *wsa)
    assert applied["counts"]["poor_quality"] == 1 and applied["quality"]["blur_max"] is None
    assert applied["quality_overrides"] == {"blur_max": None, "edge_blur_max": None}
    blurred = _cli_json(capsys, "images", "--quality", "blurred", *wsa)
    assert blurred["total"] == 0
    assert get_version(scoring_ws).meta["quality_overrides"] == {
        "blur_max": None,
        "edge_blur_max": None,
    }
    assert main(["thresholds", "--quality", "blur=0.5", *wsa]) != 0
    assert "unknown photo quality bound 'blur'" in capsys.readouterr().err
    assert main(["audit", "--undo", *wsa]) == 0
    after = _cli_json(capsys, "thresholds", *wsa)
    assert after["counts"] == before["counts"] and after["quality_overrides"] == {}
    assert get_version(scoring_ws).meta["quality_overrides"] == {}

    # clustering leaves poor photos out unless asked
    with Store(scoring_ws) as store:
        unknown = store.clusters.unknowns(version.name)[0]
        everything = store.clusters.unknowns(version.name, poor_quality=True)[0]
        poor_ids = {
            i
            for (i,) in store._db.execute(
                "SELECT id FROM predictions WHERE quality_flags IS NOT NULL"
            ).fetchall()
        }
    assert len(poor_ids) == 2 and poor_ids <= set(everything.tolist())
    assert not poor_ids & set(unknown.tolist())


def test_quality_overrides__checked_and_kept_by_a_retrain():
    from dataclasses import fields
    from typing import get_args

    from imagesieve.app._api import QualityBound
    from imagesieve.classifier import TrainOptions, merge_overrides
    from imagesieve.models import ModelVersion

    assert set(get_args(QualityBound)) == {f.name for f in fields(QualityRule)}
    rule = QualityRule(blur_max=0.6, dark_max=0.2, min_side=100)
    assert rule.with_overrides({"blur_max": None, "min_side": 50.0}) == QualityRule(
        dark_max=0.2, min_side=50
    )
    for bad, message in [
        ({"blur": 1}, "unknown photo quality bound 'blur'"),
        ({"blur_max": -1}, "must be >= 0"),
        ({"blur_max": "high"}, "must be a number"),
        ({"blur_max": float("nan")}, "must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            rule.with_overrides(bad)
    assert merge_overrides({"blur_max": 0.7, "dark_max": 0.1}, {"blur_max": "auto"}) == {
        "dark_max": 0.1
    }
    meta = {"quality": rule.to_dict(), "quality_overrides": {"dark_max": None}}
    assert QualityRule.of_version(meta).dark_max is None
    assert QualityRule.of_version({}) is None
    version = ModelVersion(
        None,
        {
            "kind": "trained",
            "classes": ["a", "b"],
            "preprocessing": {},
            "quality_overrides": {"glare_min": 0.2},
            "training": {"options": {"seed": 3}},
        },
    )
    assert TrainOptions.from_version(version).quality == {"glare_min": 0.2}
    assert TrainOptions.from_version(version, quality={}).quality == {}


def test_serve_compiles_the_quality_kernel_before_the_first_image():
    """``serve`` warms photo quality's numba kernel on a thread, so no request waits for it."""
    import subprocess
    import sys

    code = (
        "from imagesieve.app._server import _warm_quality\n"
        "from imagesieve.classifier._quality_kernel import measures\n"
        "assert not measures.signatures\n"
        "_warm_quality()\n"
        "assert measures.signatures, 'not compiled'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
