import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tmpfs import remount_read_only, tmpfs

from imagesieve.classifier import ReferenceSet
from imagesieve.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "imagesieve.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_main__models_json_parses(trained, capsys):
    ws, result = trained
    assert main(["models", "--workspace", str(ws.root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["active"] == "v1"
    assert doc["versions"][0]["classes"] == 3
    assert doc["backbones"][0] == "efficientnet_lite0"


def test_main__score_json_and_csv(scoring_ws, small_folder, tmp_path, capsys):
    ws = scoring_ws
    out_csv = tmp_path / "out.csv"
    (tmp_path / "bad.jpg").write_text("not an image")
    code = main(
        [
            "score",
            str(small_folder / "functional"),
            str(tmp_path / "bad.jpg"),
            "--workspace",
            str(ws.root),
            "--json",
            "--csv",
            str(out_csv),
        ]
    )
    assert code == 3  # one item failed
    doc = json.loads(capsys.readouterr().out)
    assert doc["exit_code"] == 3
    n_images = len(list((small_folder / "functional").glob("*.png")))
    assert doc["items"] == len(doc["predictions"]) == n_images + 1
    assert doc["failed"] == 1 and doc["scored"] == n_images
    assert doc["failures"][0]["kind"] == "not_image"
    assert sum(doc["labels"].values()) == n_images
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == n_images + 2  # and the folder's notes.txt, left out, last
    assert [int(r["item"]) for r in rows] == list(range(1, n_images + 3))  # input order
    bad, ignored = rows[-2:]
    assert bad["source"].endswith("bad.jpg") and bad["outcome"] == "failed"
    assert bad["error"] == "not_image: not a recognised image format"
    assert bad["label"] == "" and bad["id"] == ""
    assert ignored["source"].endswith("notes.txt") and ignored["outcome"] == "ignored"
    good = rows[0]
    assert good["outcome"] == "scored" and int(good["id"]) >= 1
    assert good["top1_class"] in ("defective", "functional", "lonely")
    assert 0 < float(good["top1_prob"]) <= 1


def test_main__evaluate_json_reports_unseen_class(trained, small_folder, tmp_path, capsys, elpv):
    ws, result = trained
    data = tmp_path / "eval"
    for label in ("functional", "defective"):
        (data / label).mkdir(parents=True)
        for p in sorted((small_folder / label).glob("cell*.png"))[:5]:
            (data / label / p.name).write_bytes(p.read_bytes())
    (data / "poly").mkdir()
    for im in [im for im in elpv if im.cell_type == "poly"][1:4]:
        (data / "poly" / im.path.name).write_bytes(im.path.read_bytes())
    assert main(["evaluate", str(data), "--workspace", str(ws.root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n"] == 10
    assert doc["unseen_classes"]["poly"]["images"] == 3
    # the known images' UNKNOWN share, judged against the target the thresholds aim at
    off = doc["unknown_vs_target"]
    assert (off["n"], off["flagged"], off["target"]) == (10, round(doc["unknown_rate"] * 10), 0.05)
    # the ones the model trained on are copies of training images: leakage, listed
    trained_on = {Path(p).name for p in ReferenceSet.load(result.version.path).sources}
    copies = {p.name for p in data.glob("*/cell*.png") if p.parent.name != "poly"} & trained_on
    assert copies and doc["near_training"]["images"] >= len(copies)
    assert copies <= {Path(p).name for p in doc["near_training"]["paths"]}
    assert main(["evaluate", str(data), "--workspace", str(ws.root)]) == 0
    out = capsys.readouterr().out
    assert f"{doc['near_training']['images']} of them nearly duplicate a training image" in out
    assert (ws.root / "models" / "v1" / "evaluations").is_dir()


def test_cli__errors_are_one_line_exit_2(tmp_path):
    r = run_cli("train", str(tmp_path / "nope"), "--workspace", str(tmp_path / "ws"))
    assert r.returncode == 2
    assert (
        r.stderr.strip() == f"imagesieve train: error: data folder not found: {tmp_path / 'nope'}"
    )
    r = run_cli("score", "x.jpg", "--workspace", str(tmp_path / "ws"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("imagesieve score: error: no active model in workspace")
    assert "Traceback" not in r.stderr


def test_cli__unknown_backbone_lists_known(tmp_path, small_folder):
    r = run_cli("train", str(small_folder), "--backbone", "vgg", "--workspace", str(tmp_path))
    assert r.returncode == 2
    assert (
        "unknown backbone 'vgg'; known backbones: efficientnet_lite0, resnet18, resnet50, mobilenet_v2"
        in r.stderr
    )


@pytest.mark.slow
def test_cli__train_json_end_to_end(tmp_path, small_folder):
    r = run_cli(
        "train",
        str(small_folder),
        "--workspace",
        str(tmp_path),
        "--json",
        "--test-size",
        "0.25",
        "--patience",
        "5",
        "--flips",
        "all",
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["version"] == "v1" and doc["activated"] is True
    assert set(doc["metrics"]) >= {"accuracy", "macro_f1", "ece", "n"}
    options = json.loads((Path(doc["path"]) / "meta.json").read_text())["training"]["options"]
    assert (options["patience"], options["flips"]) == (5, "all")


def test_main__score_human_summary_always_lists_failures(
    scoring_ws, small_folder, tmp_path, capsys
):
    ws = scoring_ws
    (tmp_path / "bad.jpg").write_text("not an image")
    good = sorted((small_folder / "functional").glob("cell*.png"))[:3]
    code = main(
        [
            "score",
            *map(str, good),
            str(tmp_path / "bad.jpg"),
            "--workspace",
            str(ws.root),
            "--show",
            "1",
        ]
    )
    assert code == 3
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "... 2 more (use --csv OUT for all)"
    assert out[2] == f"{tmp_path / 'bad.jpg'}: FAILED (not_image): not a recognised image format"
    assert out[3].startswith("batch 1 with v1: 4 items, 3 newly scored, 0 rescored, ")
    assert "1 failed" in out[3]
    assert out[4].startswith("  labels: ")


def test_main__score_exit_codes_tell_scripts_what_happened(scoring_ws, small_folder, tmp_path):
    ws = ["--workspace", str(scoring_ws.root)]
    good = sorted((small_folder / "functional").glob("*.png"))[:3]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    (bad / "b.jpg").write_bytes(b"")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert main(["score", *map(str, good), *ws]) == 0  # all scored
    assert main(["score", *map(str, good), *ws]) == 0  # all already stored
    assert main(["score", str(good[0]), str(bad), *ws]) == 3  # some failed
    assert main(["score", str(bad), *ws]) == 4  # every item failed
    assert main(["score", str(empty), *ws]) == 4  # nothing to score


def test_cli__read_only_workspace_reads_and_refuses_writes_in_one_line(
    scoring_ws, small_folder, tmp_path
):
    images = sorted((small_folder / "functional").glob("*.png"))[:4]
    assert main(["score", *map(str, images), "--workspace", str(scoring_ws.root)]) == 0
    with tmpfs(tmp_path / "ro", "256m") as mount:
        shutil.copytree(scoring_ws.root, mount / "ws")
        remount_read_only(mount)
        ws = ["--workspace", str(mount / "ws")]
        for verb in (
            ["similar", "--id", "1"],
            ["cluster", "--list"],
            ["sql", "SELECT 1"],
            ["models"],
        ):
            done = run_cli(*verb, *ws)
            assert done.returncode == 0, (verb, done.stderr)
        for verb in (
            ["score", str(images[0])],
            ["reindex"],
            ["cluster"],
            ["score", str(small_folder)],
            ["serve", "--port", "0", "--no-ui"],
        ):
            done = run_cli(*verb, *ws)
            assert done.returncode == 2, (verb, done.stdout, done.stderr)
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
            assert "Traceback" not in done.stderr
            assert "read-only" in done.stderr.lower(), done.stderr


def test_cli__full_disk_is_one_line_exit_2(scoring_ws, small_folder, tmp_path):
    models = sum(f.stat().st_size for f in scoring_ws.models_dir.rglob("*") if f.is_file())
    with tmpfs(tmp_path / "full", str(models + 400 * 1024)) as mount:
        shutil.copytree(scoring_ws.root, mount / "ws")
        done = run_cli(
            "score", str(small_folder), "--keep-images", "all", "--workspace", str(mount / "ws")
        )
        assert done.returncode == 2, (done.stdout[-500:], done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        assert "disk is full" in done.stderr, done.stderr


def test_cli__help_says_what_it_is_and_what_its_exit_codes_mean():
    r = run_cli("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "flag those unlike anything it was trained on (UNKNOWN)" in text
    assert "Run `imagesieve demo`" in text
    for code in ("0 done", "2 an error", "3 `score`: some items failed", "4 `score`: nothing"):
        assert code in text
    assert "130 interrupted (Ctrl-C)" in text and "1 a bug" in text
    assert "thin layer" not in text  # the module's docstring is for developers
