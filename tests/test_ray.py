"""Scoring on a real local Ray cluster (``ray start --head``) against the local engine."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from httpserver import ImageServer
from test_store import query

from imagesieve._workspace import Workspace
from imagesieve.ingest import RayOptions, ScoreOptions, score_inputs
from imagesieve.store import VectorIndex

pytestmark = pytest.mark.slow
RAY = Path(sys.executable).with_name("ray")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A 2-CPU Ray cluster with a small object store, started for these tests and stopped after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tmp_path_factory.mktemp("ray")
    env_args = ["--include-dashboard=false", "--disable-usage-stats"]
    subprocess.run(
        [str(RAY), "start", "--head", "--num-cpus", "2", "--node-ip-address", "127.0.0.1"]
        + ["--port", str(port), "--object-store-memory", str(150 * 2**20)]
        + ["--temp-dir", str(temp), *env_args],
        check=True,
        capture_output=True,
    )
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True)


def fresh_ws(trained, path: Path) -> Workspace:
    ws_trained, _ = trained
    ws = Workspace(path)
    shutil.copytree(ws_trained.models_dir, ws.models_dir)
    return ws


def mixed_inputs(tmp_path, small_folder, elpv, server) -> list[str]:
    """A folder with a truncated PNG and non-images, a zip with a corrupt member, a URL list."""
    archive = tmp_path / "cells.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for im in elpv[200:206]:
            zf.write(im.path, f"zipped/{im.path.name}")
        zf.writestr("zipped/corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
        zf.writestr("zipped/readme.txt", "not an image")
    listing = tmp_path / "urls.csv"
    with open(listing, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "meter"])
        for k in range(8):
            w.writerow([server.url(f"{k}.png"), f"m{k}"])
        w.writerow([server.url("0.png"), "again"])  # the same content twice in one run
        w.writerow([f"{server.base}/status/404", "gone"])
        w.writerow([f"{server.base}/html", "page"])
        w.writerow([f"{server.base}/empty", "empty"])
        w.writerow(["", "blank"])
        w.writerow([str(tmp_path / "missing.png"), "missing"])
    return [str(small_folder), str(archive), str(listing)]


def stored(ws) -> dict[str, list]:
    """What a run stored, without ids, batch ids and times."""
    return {
        "rows": query(
            ws,
            "SELECT source, sha256, label, reason, top1_class, round(top1_prob, 4), top2_class, "
            "neighbor_id, round(neighbor_distance, 4), quality_flags, width, height "
            "FROM predictions ORDER BY source",
        ),
        "failures": query(ws, "SELECT source, kind, message FROM failures ORDER BY source"),
        "items": query(
            ws,
            "SELECT seq, source, outcome, sha256, error, input_row FROM batch_items ORDER BY seq",
        ),
        "kept": sorted(p.name for p in (ws.root / "images").rglob("*") if p.is_file()),
    }


def test_ray__mixed_inputs_equal_the_local_path(ray_cluster, trained, small_folder, elpv, tmp_path):
    files = {f"{k}.png": elpv[300 + k].path.read_bytes() for k in range(8)}
    with ImageServer(files) as server:
        inputs = mixed_inputs(tmp_path, small_folder, elpv, server)
        local_ws = fresh_ws(trained, tmp_path / "local")
        ray_ws = fresh_ws(trained, tmp_path / "ray")
        local = score_inputs(local_ws, inputs, ScoreOptions(keep_images="all"))
        on_ray = score_inputs(
            ray_ws,
            inputs,
            ScoreOptions(keep_images="all", ray=RayOptions(ray_cluster, batch_size=8)),
        )
    assert local.ray is None
    assert on_ray.ray["actors"] == 2 and on_ray.ray["cpus"] == 2
    assert on_ray.ray["address"].endswith(ray_cluster.rsplit(":")[1])
    assert (on_ray.items, on_ray.scored, on_ray.already_scored) == (
        local.items,
        local.scored,
        local.already_scored,
    )
    assert on_ray.scored > 90 and len(on_ray.failures) == len(local.failures) >= 7
    a, b = stored(local_ws), stored(ray_ws)
    assert a["rows"] == b["rows"]
    assert a["failures"] == b["failures"]
    # which of two copies of one content is "scored" depends on which finished first
    assert [i[:2] + i[3:] for i in a["items"]] == [i[:2] + i[3:] for i in b["items"]]
    assert sorted(i[2] for i in a["items"]) == sorted(i[2] for i in b["items"])
    assert a["kept"] == b["kept"] and len(a["kept"]) == on_ray.scored  # URL bytes came back


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from imagesieve._workspace import Workspace
    from imagesieve.ingest import RayOptions, ScoreOptions, score_inputs

    def progress(stage, done, total):
        if stage == "scoring" and done >= int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 the driver in the middle of the job

    opts = ScoreOptions(commit_rows=16, commit_seconds=60, ray=RayOptions(sys.argv[2], batch_size=8))
    score_inputs(Workspace(sys.argv[1]), sys.argv[4:], opts, progress)
    """
)


def test_ray__killed_driver_then_rerun_scores_every_image_once(
    ray_cluster, trained, elpv, tmp_path
):
    ws = fresh_ws(trained, tmp_path / "ws")
    paths = [str(im.path) for im in elpv[400:560]]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(ws.root), ray_cluster, "60", *paths],
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    committed = query(ws, "SELECT count(*) FROM predictions")[0][0]
    assert 0 < committed < 160
    r = subprocess.run(
        [sys.executable, "-m", "imagesieve.cli", "score", *paths]
        + ["--workspace", str(ws.root), "--ray", ray_cluster, "--json"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ray"]["actors"] == 2
    assert doc["already_scored"] == committed and doc["scored"] == 160 - committed
    assert query(ws, "SELECT count(*), count(DISTINCT sha256) FROM predictions") == [(160, 160)]
    assert query(ws, "SELECT count(*) FROM embeddings") == [(160,)]
    assert query(ws, "SELECT batch_id, status FROM batches ORDER BY 1") == [
        (1, "interrupted"),
        (2, "done"),
    ]


def vectors(ws) -> dict[str, list]:
    """Each stored image's embedding, signature and head inputs, by content."""
    return {
        "embeddings": query(
            ws,
            "SELECT sha256, e.embedding FROM predictions JOIN embeddings e USING (id) ORDER BY 1",
        ),
        "signatures": query(
            ws,
            "SELECT sha256, s.signature FROM predictions JOIN signatures s USING (id) ORDER BY 1",
        ),
        "heads": query(
            ws,
            "SELECT sha256, h.avg_norm, h.max_pooled FROM predictions JOIN head_inputs h "
            "USING (id) ORDER BY 1",
        ),
    }


def test_ray__parquet_shards_store_the_same_rows_and_vectors(
    ray_cluster, trained, small_folder, elpv, tmp_path
):
    inputs = [str(small_folder), *(str(im.path) for im in elpv[600:640])]
    local_ws = fresh_ws(trained, tmp_path / "local")
    ray_ws = fresh_ws(trained, tmp_path / "ray")
    local = score_inputs(local_ws, inputs, ScoreOptions(commit_rows=32))
    shards = tmp_path / "shards"
    opts = RayOptions(ray_cluster, batch_size=8, shards=str(shards))
    on_ray = score_inputs(ray_ws, inputs, ScoreOptions(commit_rows=32, ray=opts))
    assert on_ray.scored == local.scored > 100
    a, b = stored(local_ws), stored(ray_ws)
    assert a["rows"] == b["rows"] and a["failures"] == b["failures"]
    assert a["kept"] == b["kept"] and a["kept"]  # the UNKNOWNs' copies, written by the driver
    assert [i[:2] + i[3:] for i in a["items"]] == [i[:2] + i[3:] for i in b["items"]]
    assert (on_ray.labels, on_ray.unknown_reasons) == (local.labels, local.unknown_reasons)
    assert len(on_ray.failures) == len(local.failures) == 1 and len(on_ray.shown) == 50
    index = VectorIndex.load(ray_ws.root / "index" / "v1.faiss")  # caught up at the end
    assert sorted(index.ids().tolist()) == [
        r[0] for r in query(ray_ws, "SELECT id FROM predictions ORDER BY 1")
    ]
    va, vb = vectors(local_ws), vectors(ray_ws)
    assert all(len(va[k]) == on_ray.scored for k in va)
    assert va == vb
    assert shards.is_dir() and not any(shards.iterdir())  # the run's shards, stored, are gone
    # every content once, and the index holds the rows DuckDB holds
    assert query(ray_ws, "SELECT count(*) = count(DISTINCT sha256) FROM predictions") == [(True,)]
    rerun = score_inputs(ray_ws, inputs, ScoreOptions(ray=opts))
    assert rerun.scored == 0 and rerun.already_scored == on_ray.scored + on_ray.already_scored
