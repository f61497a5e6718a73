"""The CLI beside a running server: `imagesieve serve` holds the store, the CLI works through it."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import stat
import subprocess
import sys
import time

import requests
from cliserver import start_cli_server

from imagesieve._local import LOCAL_HEADER, LOCAL_PREFIX, SERVER_FILE, running_server
from imagesieve.cli import main


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli__works_through_the_server_holding_the_store(
    scoring_ws, elpv, tmp_path, capsys, monkeypatch
):
    ws = ["--workspace", str(scoring_ws.root)]
    images = [im.path for im in elpv if im.cell_type == "poly"][1:7]  # unlike the mono training
    batch = tmp_path / "batch"
    batch.mkdir()
    for p in images:
        shutil.copyfile(p, batch / p.name)
    (batch / "broken.png").write_bytes(images[0].read_bytes()[:300])
    proc, url = start_cli_server(["serve", "--port", "0", "--no-ui", *ws], tmp_path / "serve.log")
    try:
        record = running_server(scoring_ws.root)
        assert record is not None and record.pid == proc.pid and record.url == url
        path = scoring_ws.root / SERVER_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # the secret: the server's user only

        # score: relative paths, the report and label folders written where the CLI says
        monkeypatch.chdir(tmp_path)
        code, out, err = _run(
            capsys,
            "score",
            "batch",
            "--csv",
            "report.csv",
            "--sort-into",
            "sorted",
            "--distance-threshold",
            "0.001",  # the operator's own thresholds: every image is far, so UNKNOWN
            *ws,
        )
        assert code == 3, err  # one item failed: the exit code says so, as it does alone
        assert "7 items, 6 newly scored" in out and "through the server" in out
        assert "6 UNKNOWN: far_from_training 6" in out
        assert "broken.png: FAILED" in out
        with open(tmp_path / "report.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 7 and {r["outcome"] for r in rows} == {"scored", "failed"}
        assert len(list((tmp_path / "sorted" / "UNKNOWN").glob("*.png"))) == 6
        code, out, _ = _run(capsys, "score", "batch", "--json", *ws)  # a re-run stores nothing
        doc = json.loads(out)
        assert (doc["scored"], doc["already_scored"], doc["exit_code"]) == (0, 6, 3)

        # sql: what was stored, read through the server; writes refused in one line
        code, out, _ = _run(
            capsys,
            "sql",
            "SELECT (SELECT count(*) FROM predictions) n, (SELECT count(*) FROM failures) f",
            "--format",
            "csv",
            *ws,
        )
        assert code == 0 and out.splitlines()[1] == "6,2"  # the failure stored, once a run
        code, _, err = _run(capsys, "sql", "DELETE FROM predictions", *ws)
        assert code == 2 and "read-only" in err and len(err.strip().splitlines()) == 1

        # similar: by id and by a local image file
        code, out, _ = _run(capsys, "similar", "--id", "1", "-k", "3", "--json", *ws)
        assert code == 0 and [r["id"] for r in json.loads(out)["results"]][0] != 1
        code, out, _ = _run(capsys, "similar", str(images[2]), "-k", "1", "--json", *ws)
        found = json.loads(out)["results"]
        assert found[0]["distance"] < 1e-4 and found[0]["source"].endswith(images[2].name)

        # cluster, name, list, promote into a training folder
        code, out, err = _run(capsys, "cluster", "--min-cluster-size", "2", "--json", *ws)
        run = json.loads(out)
        assert code == 0 and run["images"] == 6 and run["clusters"], (out, err)
        first = run["clusters"][0]["cluster_id"]
        assert _run(capsys, "cluster", "--name", str(first), "newtype", *ws)[0] == 0
        code, out, _ = _run(capsys, "cluster", "--list", "--json", *ws)
        listed = {c["cluster_id"]: c for c in json.loads(out)["clusters"]}
        assert listed[first]["name"] == "newtype"
        into = tmp_path / "training"
        into.mkdir()
        code, out, err = _run(capsys, "promote", str(first), "--into", str(into), *ws)
        assert code == 0, err
        assert len(list((into / "newtype").iterdir())) == listed[first]["size"] >= 2

        # browse, relabel and undo, a batch's report, thresholds the server then serves
        code, out, _ = _run(capsys, "images", "--label", "UNKNOWN", "--json", *ws)
        page = json.loads(out)
        assert code == 0 and page["total"] == 6
        picked = str(page["rows"][0]["id"])
        relabelled = tmp_path / "relabelled"
        relabelled.mkdir()
        code, out, err = _run(
            capsys, "relabel", picked, "--label", "odd", "--into", str(relabelled), *ws
        )
        assert code == 0 and len(list((relabelled / "odd").iterdir())) == 1, err
        code, out, _ = _run(capsys, "audit", "--undo", "--json", *ws)
        assert code == 0 and json.loads(out)["summary"].startswith("undid")
        assert not (relabelled / "odd").exists()  # the copy and its new folder taken back out
        code, _, err = _run(capsys, "batches", "--id", "1", "--csv", "b1.csv", *ws)
        assert code == 0 and len((tmp_path / "b1.csv").read_text().splitlines()) == 8, err
        assert _run(capsys, "thresholds", "--set", "0.01", "off", *ws)[0] == 0
        fresh = [im.path for im in elpv if im.cell_type == "poly"][7]
        with open(fresh, "rb") as f:
            served = requests.post(f"{url}/api/v1/predict", files={"file": f}, timeout=60).json()
        assert served["label"] != "UNKNOWN"  # the server serves the thresholds just set

        code, out, err = _run(capsys, "map", "--out", "map.csv", "--json", *ws)
        assert code == 0 and json.loads(out)["points"] == 7, err
        assert len((tmp_path / "map.csv").read_text().splitlines()) == 8

        # a version made active from the CLI: the server serves it at once
        shutil.copytree(scoring_ws.models_dir / "v1", scoring_ws.models_dir / "v2")
        code, out, _ = _run(capsys, "models", "--activate", "v2", *ws)
        assert code == 0 and "serves it now" in out
        assert requests.get(f"{url}/api/v1/health", timeout=10).json()["model_version"] == "v2"

        # a verb that does not run through the server: one line naming those that do
        code, _, err = _run(capsys, "reindex", *ws)
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert f"PID {proc.pid}" in err and "score, sql, similar" in err
        code, _, err = _run(capsys, "score", "--history-of", "v1", *ws)
        assert code == 2 and "does not run through the server" in err

        # only the CLI's secret opens the local routes
        bare = requests.post(f"{url}{LOCAL_PREFIX}/sql", json={"sql": "SELECT 1"}, timeout=10)
        wrong = requests.post(
            f"{url}{LOCAL_PREFIX}/sql",
            json={"sql": "SELECT 1"},
            headers={LOCAL_HEADER: "guess"},
            timeout=10,
        )
        assert bare.status_code == wrong.status_code == 403
        skewed = requests.post(  # a field this server does not know: refused, not dropped
            f"{url}{LOCAL_PREFIX}/sql",
            json={"sql": "SELECT 1", "newer_option": True},
            headers={LOCAL_HEADER: record.secret},
            timeout=10,
        )
        assert skewed.status_code == 422
        monkeypatch.setattr("imagesieve.cli.__version__", "0.0.1")  # a CLI of another release
        code, _, err = _run(capsys, "sql", "SELECT 1", *ws)
        assert code == 2 and "restart the server" in err
        assert LOCAL_PREFIX not in requests.get(f"{url}/api/v1/openapi.json", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert not (scoring_ws.root / SERVER_FILE).exists()  # withdrawn when the server stops
    code, out, _ = _run(
        capsys, "sql", "SELECT count(*) FROM predictions WHERE model_version = 'v1'", *ws
    )
    assert code == 0 and out.splitlines()[2].strip() == "7"  # the CLI opens the store again


def test_cli__a_dead_servers_file_is_ignored(scoring_ws, small_folder, capsys):
    ws = ["--workspace", str(scoring_ws.root)]
    image = sorted((small_folder / "functional").glob("*.png"))[0]
    dead = 2**22 + 12345  # above pid_max's default: no such process
    (scoring_ws.root / SERVER_FILE).write_text(
        json.dumps({"pid": dead, "url": "http://127.0.0.1:9", "secret": "x"})
    )
    assert running_server(scoring_ws.root) is None
    code, out, err = _run(capsys, "score", str(image), *ws)
    assert code == 0 and "through the server" not in out, err


def _scoring(args: list[str]) -> subprocess.Popen:
    """``imagesieve score ARGS`` in a process of its own, returned once its progress bar shows."""
    cli = subprocess.Popen(
        [sys.executable, "-m", "imagesieve.cli", "score", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""
    while "scoring" not in seen:  # the server is scoring the batch
        char = cli.stderr.read(1)
        assert char, f"the CLI ended before it scored anything: {seen}"
        seen += char
    return cli


def test_cli__ctrl_c_or_a_server_stopping_ends_the_batch_and_a_rerun_finishes_it(
    scoring_ws, elpv, tmp_path, capsys
):
    ws = ["--workspace", str(scoring_ws.root)]
    batch = tmp_path / "batch"
    batch.mkdir()
    for im in elpv[:400]:
        shutil.copyfile(im.path, batch / im.path.name)
    proc, _ = start_cli_server(["serve", "--port", "0", "--no-ui", *ws], tmp_path / "serve.log")
    last = "SELECT status, n_items FROM batches ORDER BY batch_id DESC LIMIT 1"
    try:
        cli = _scoring([str(batch), *ws])
        cli.send_signal(signal.SIGINT)  # Ctrl-C
        assert cli.wait(timeout=60) == 130
        for _ in range(100):  # the server stops at its next progress report
            code, out, _ = _run(capsys, "sql", last, "--json", *ws)
            rows = json.loads(out)["rows"]
            if rows and rows[0][0] != "running":
                break
            time.sleep(0.1)
        assert rows[0][0] == "interrupted" and rows[0][1] < 400, rows
        first = rows[0][1]

        cli = _scoring([str(batch), *ws])
        proc.send_signal(signal.SIGTERM)  # the server stops: so does the batch, promptly
        assert cli.wait(timeout=60) == 2
        assert "the server is stopping" in cli.stderr.read()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    code, out, _ = _run(capsys, "score", str(batch), "--json", *ws)  # alone now
    doc = json.loads(out)
    assert code == 0 and doc["scored"] + doc["already_scored"] == 400
    assert first <= doc["already_scored"] < 400  # what each run stored is kept, once
    code, out, _ = _run(
        capsys, "sql", "SELECT count(DISTINCT sha256), count(*) FROM predictions", "--json", *ws
    )
    assert json.loads(out)["rows"] == [[400, 400]]
    code, out, _ = _run(
        capsys, "sql", "SELECT status FROM batches ORDER BY batch_id", "--json", *ws
    )
    assert [r[0] for r in json.loads(out)["rows"]][-3:] == ["interrupted", "interrupted", "done"]
