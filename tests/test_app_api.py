"""The REST API over real HTTP: a server on 127.0.0.1 serving a real store and model."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from cliserver import settled, start_cli_server
from PIL import Image

from imagesieve._workspace import Workspace
from imagesieve.app import Limits, Service, _service
from imagesieve.app._server import check_exposure, start_server
from imagesieve.data import ImageLoadError
from imagesieve.store import Store, _vectors
from imagesieve.store._images import kept_path

MAX_FILE = 2 * 2**20
#: Both blur bounds off: the blur check as a whole.
NO_BLUR_CHECK = {"blur_max": None, "edge_blur_max": None}


@pytest.fixture(scope="module")
def api(trained, tmp_path_factory):
    """(base URL, workspace, service) of a server with a copy of the trained model, no rows yet."""
    ws = model_copy(trained, tmp_path_factory.mktemp("api") / "ws")
    service = Service(ws, limits=Limits(max_file_bytes=MAX_FILE, max_files=20))
    server = start_server(service, ui=False)
    yield server.url + "/api/v1", ws, service
    server.stop()
    service.close()


def model_copy(trained, root) -> Workspace:
    """A workspace at ``root`` with a copy of the trained model, nothing stored yet."""
    ws_trained, _ = trained
    ws = Workspace(root)
    shutil.copytree(ws_trained.models_dir, ws.models_dir)
    return ws


@pytest.fixture
def ws(trained, tmp_path) -> Workspace:
    """A workspace of its own with a copy of the trained model."""
    return model_copy(trained, tmp_path / "ws")


def png_bytes(path) -> bytes:
    return path.read_bytes()


def post_image(base, data, name="cell.png", field="file", timeout=60, **params):
    return requests.post(
        f"{base}/predict", files={field: (name, data)}, params=params, timeout=timeout
    )


def assert_error(r, status, text):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["status"] == status and text in err["message"], err
    assert "Traceback" not in r.text


def test_health__reports_model_and_store(api):
    base, ws, _ = api
    doc = requests.get(f"{base}/health", timeout=30).json()
    assert doc["status"] == "ok" and doc["model_version"] == "v1"
    assert doc["classes"] == ["defective", "functional", "lonely"]
    assert doc["workspace"] == str(ws.root)


def test_predict__stores_once_and_returns_neighbours(api, elpv):
    base, _, _ = api
    mono = [im for im in elpv if im.cell_type == "mono"][200:203]
    first = post_image(base, png_bytes(mono[0].path), "a.png")
    assert first.status_code == 200, first.text
    doc = first.json()
    assert doc["label"] in ("defective", "functional", "lonely", "UNKNOWN")
    assert len(doc["top3"]) == 3 and sum(t["probability"] for t in doc["top3"]) == pytest.approx(
        1, abs=1e-4
    )
    assert doc["id"] >= 1 and doc["already_stored"] is False
    assert doc["source"] == "upload:a.png" and doc["width"] == 300
    second = post_image(base, png_bytes(mono[1].path), "b.png").json()
    assert second["neighbours"][0]["id"] == doc["id"]  # the only other stored image
    again = post_image(base, png_bytes(mono[0].path), "renamed.png").json()
    assert again["already_stored"] is True and again["id"] == doc["id"]
    assert again["top3"] == doc["top3"]
    rows = requests.post(
        f"{base}/sql",
        json={"sql": f"SELECT count(*) AS n FROM predictions WHERE id = {doc['id']}"},
        timeout=30,
    ).json()
    assert rows["rows"] == [[1]]


def test_predict__bad_uploads_get_4xx_json_and_the_server_keeps_serving(api, elpv, tmp_path):
    base, _, _ = api
    good = png_bytes(elpv[5].path)
    assert_error(
        post_image(base, b"this is not an image", "notes.txt"), 422, "not a recognised image format"
    )
    assert_error(post_image(base, b"", "empty.png"), 422, "empty file")
    assert_error(post_image(base, good[: len(good) // 3], "cut.png"), 422, "cut.png")
    big = np.random.default_rng(0).integers(0, 255, (900, 900, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG", compress_level=0)
    assert (
        MAX_FILE < len(buf.getvalue()) < MAX_FILE + 2**20
    )  # passes the body cap, not the file cap
    assert_error(post_image(base, buf.getvalue(), "big.png"), 413, "upload limit")
    assert_error(post_image(base, b"x" * (MAX_FILE + 3 * 2**20), "huge.png"), 413, "byte limit")
    assert_error(post_image(base, good, field="image"), 422, "file")
    r = requests.post(f"{base}/predict", json={"file": "cell.png"}, timeout=30)
    assert_error(r, 422, "file")
    assert_error(requests.get(f"{base}/nothing-here", timeout=30), 404, "Not Found")
    # every failure that reached the decoder is stored with its one-line reason
    failures = requests.post(
        f"{base}/sql",
        json={"sql": "SELECT source, kind FROM failures ORDER BY source"},
        timeout=30,
    ).json()["rows"]
    assert ["upload:notes.txt", "not_image"] in failures
    assert any(s == "upload:cut.png" for s, _ in failures)
    assert post_image(base, good, "still-fine.png").status_code == 200
    assert requests.get(f"{base}/health", timeout=30).status_code == 200


def test_predict__concurrent_clients_each_get_their_own_row(api, elpv):
    base, _, _ = api
    cells = [im for im in elpv if im.cell_type == "mono"][300:332]
    results: dict[int, dict] = {}

    def client(i: int) -> None:
        results[i] = post_image(base, png_bytes(cells[i].path), f"c{i}.png", neighbours=0).json()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(cells))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [results[i]["id"] for i in range(len(cells))]
    assert len(set(ids)) == len(cells)
    assert all(results[i]["source"] == f"upload:c{i}.png" for i in range(len(cells)))
    # each answer is the one a direct, unbatched prediction gives for that image
    from imagesieve.classifier import Predictor
    from imagesieve.models import get_version

    _, ws, _ = api
    direct = list(Predictor(get_version(ws)).score([str(c.path) for c in cells]))
    for i, p in enumerate(direct):
        assert results[i]["label"] == p.label
        assert results[i]["top3"][0]["probability"] == pytest.approx(p.top3[0][1], abs=1e-5)


def test_score__many_files_with_a_bad_one_and_hostile_names(api, elpv, tmp_path):
    base, ws, _ = api
    poly = [im for im in elpv if im.cell_type == "poly"][:4]
    files = [("files", (f"../../escape{i}.png", png_bytes(im.path))) for i, im in enumerate(poly)]
    files.append(("files", ("/etc/passwd", b"root:x:0:0")))
    r = requests.post(f"{base}/score", files=files, timeout=120)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["scored"] == 4 and len(doc["failures"]) == 1
    upload_dir = doc["upload_dir"]
    assert upload_dir.startswith(str(ws.root / "uploads"))
    assert sorted(p.name for p in (ws.root / "uploads").rglob("*") if p.is_file()) == [
        "escape0.png",
        "escape1.png",
        "escape2.png",
        "escape3.png",
        "passwd",
    ]
    assert not any((ws.root.parent / f"escape{i}.png").exists() for i in range(4))
    assert_error(requests.post(f"{base}/score", timeout=30), 422, "")
    too_many = [("files", (f"f{i}.png", b"x")) for i in range(25)]
    r = requests.post(f"{base}/score", files=too_many, timeout=30)
    assert r.status_code in (400, 413, 422) and "error" in r.json()


def test_similar__by_id_class_and_filter(api, elpv):
    base, _, _ = api
    stored = requests.post(
        f"{base}/sql", json={"sql": "SELECT min(id), count(*) FROM predictions"}, timeout=30
    ).json()["rows"][0]
    first_id, n = stored
    doc = requests.get(f"{base}/similar", params={"id": first_id, "k": 3}, timeout=30).json()
    assert len(doc["results"]) == 3 and all(r["id"] != first_id for r in doc["results"])
    assert [r["distance"] for r in doc["results"]] == sorted(r["distance"] for r in doc["results"])
    by_class = requests.get(f"{base}/similar", params={"class": "defective", "k": 2}, timeout=30)
    assert by_class.status_code == 200 and by_class.json()["query"]["kind"] == "class"
    filtered = requests.get(
        f"{base}/similar",
        params={"id": first_id, "k": 50, "where": "source LIKE '%escape%'"},
        timeout=30,
    ).json()
    assert {r["source"].split("/")[-1] for r in filtered["results"]} <= {
        f"escape{i}.png" for i in range(4)
    }
    assert len(filtered["results"]) == 4
    assert_error(
        requests.get(f"{base}/similar", params={"id": 10**9}, timeout=30), 400, "no stored image"
    )
    assert_error(
        requests.get(f"{base}/similar", params={"class": "nope"}, timeout=30),
        400,
        "no class 'nope'",
    )
    assert_error(
        requests.get(
            f"{base}/similar", params={"id": first_id, "where": "nonsense ==="}, timeout=30
        ),
        400,
        "bad --where filter",
    )


@pytest.mark.parametrize(
    ("sql", "text"),
    [
        ("SELECT * FROM read_csv('/etc/passwd')", ""),
        ("COPY predictions TO '/tmp/out.csv'", ""),
        ("DELETE FROM predictions", ""),
        ("ATTACH '/tmp/x.duckdb' AS x", ""),
    ],
)
def test_sql__escapes_are_refused_with_json_400(api, sql, text):
    base, _, _ = api
    r = requests.post(f"{base}/sql", json={"sql": sql}, timeout=30)
    assert_error(r, 400, text)


def test_sql__views_and_limits(api, elpv):
    base, _, _ = api
    cell = png_bytes([im for im in elpv if im.cell_type == "mono"][760].path)
    assert post_image(base, cell, "for-sql.png", neighbours=0).status_code == 200  # a row today
    doc = requests.post(
        f"{base}/sql", json={"sql": "SELECT * FROM predictions_per_day", "limit": 5}, timeout=30
    ).json()
    assert "label" in doc["columns"] and doc["rows"]
    assert_error(requests.post(f"{base}/sql", json={"limit": 5}, timeout=30), 422, "sql")


def test_clusters__listed_after_clustering(api, elpv):
    base, _, service = api
    assert requests.get(f"{base}/clusters", timeout=30).json() == {"clusters": []}
    poly = [im for im in elpv if im.cell_type == "poly"][100:116]
    files = [("files", (f"poly{i}.png", png_bytes(im.path))) for i, im in enumerate(poly)]
    assert requests.post(f"{base}/score", files=files, timeout=120).json()["scored"] == len(poly)
    # The test model knows a poly cell (its 'lonely' class), so few stored images are UNKNOWN:
    # for this test every one is (confidence threshold 1), and the clusters come back sorted.
    before = dict(service.version.meta["thresholds"])
    service.set_thresholds(1.0, before.get("distance"))
    try:
        run = service.run_clustering(min_cluster_size=2)
    finally:
        service.set_thresholds(before["confidence"], before.get("distance"))
    assert run.images >= len(poly) and run.clusters, (run.images, run.noise)
    doc = requests.get(f"{base}/clusters", timeout=30).json()
    assert [(c["cluster_id"], c["size"]) for c in doc["clusters"]] == [
        (c["cluster_id"], c["size"]) for c in run.clusters
    ]
    sizes = [c["size"] for c in doc["clusters"]]
    assert sizes == sorted(sizes, reverse=True)  # largest first
    assert sum(sizes) + run.noise == run.images


def test_run_clustering__predictions_are_stored_and_answered_meanwhile(api, elpv):
    base, _, service = api
    cell = png_bytes([im for im in elpv if im.cell_type == "mono"][700].path)
    during = []

    def progress(stage, done, total):
        if stage == "clustering" and done == 0:  # the run is under way
            r = post_image(base, cell, "during-clustering.png", neighbours=0, timeout=20)
            during.append(r)

    run = service.run_clustering(min_cluster_size=2, progress=progress)
    assert run.run_id and len(during) == 1 and during[0].status_code == 200, during
    stored = during[0].json()["id"]
    rows = service.sql(f"SELECT source FROM predictions WHERE id = {stored}").rows
    assert rows == [("upload:during-clustering.png",)]


def test_openapi__schema_lists_every_endpoint(api):
    base, _, _ = api
    schema = requests.get(f"{base}/openapi.json", timeout=30).json()
    paths = set(schema["paths"])
    assert {
        "/api/v1/predict",
        "/api/v1/score",
        "/api/v1/similar",
        "/api/v1/sql",
        "/api/v1/clusters",
        "/api/v1/versions/{name}/history",
        "/api/v1/health",
    } <= paths
    json.dumps(schema)


def test_start_server__token_required_when_set(ws):
    with Service(ws) as service:
        server = start_server(service, token="s3cret", ui=False)
        try:
            base = server.url + "/api/v1"
            assert_error(requests.get(f"{base}/health", timeout=30), 401, "API token")
            bad = {"Authorization": "Bearer nope"}
            assert_error(requests.get(f"{base}/health", headers=bad, timeout=30), 401, "API token")
            ok = {"Authorization": "Bearer s3cret"}
            assert requests.get(f"{base}/health", headers=ok, timeout=30).status_code == 200
        finally:
            server.stop()


@pytest.mark.parametrize(
    ("host", "auth", "token", "message"),
    [
        ("0.0.0.0", None, None, "refusing to listen on 0.0.0.0 (not loopback) without --auth"),
        (
            "0.0.0.0",
            ("u", "p"),
            None,
            "without --token or $IMAGESIEVE_API_TOKEN or $IMAGESIEVE_API_TOKEN_FILE (API)",
        ),
        ("192.168.1.5", None, "t", "without --auth USER:PASSWORD or $IMAGESIEVE_AUTH (UI)"),
    ],
)
def test_check_exposure__beyond_loopback_needs_login_and_token(host, auth, token, message):
    with pytest.raises(ValueError) as e:
        check_exposure(host, auth, token)
    assert message in str(e.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_check_exposure__loopback_needs_nothing(host):
    check_exposure(host, None, None)


def test_check_exposure__api_alone_needs_only_the_token():
    check_exposure("0.0.0.0", None, "t", ui=False)
    with pytest.raises(
        ValueError,
        match=r"without --token or \$IMAGESIEVE_API_TOKEN or \$IMAGESIEVE_API_TOKEN_FILE \(API\)$",
    ):
        check_exposure("0.0.0.0", None, None, ui=False)


def probe(url: str, **env: str) -> subprocess.CompletedProcess:
    """The container's health check (``python -m imagesieve._access URL``) with only ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IMAGESIEVE_API_TOKEN")}
    return subprocess.run(
        [sys.executable, "-m", "imagesieve._access", url],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_health_probe__passes_with_every_form_of_the_servers_token(ws, tmp_path, monkeypatch):
    """The server reads its tokens from $IMAGESIEVE_API_TOKEN_FILE too (enough to listen beyond
    loopback), and the probe passes with the token in any form the server takes."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# mounted secret\nops=s3cret\nci=other\n")
    monkeypatch.delenv("IMAGESIEVE_API_TOKEN", raising=False)
    monkeypatch.setenv("IMAGESIEVE_API_TOKEN_FILE", str(tokens))
    proc, url = start_cli_server(
        ["serve", "--workspace", str(ws.root), "--host", "0.0.0.0", "--port", "0", "--no-ui"],
        tmp_path / "serve.log",
    )
    url = url.replace("0.0.0.0", "127.0.0.1")
    try:
        ok = {"Authorization": "Bearer other"}
        assert requests.get(f"{url}/api/v1/health", headers=ok, timeout=30).status_code == 200
        assert probe(url, IMAGESIEVE_API_TOKEN_FILE=str(tokens)).returncode == 0
        assert probe(url, IMAGESIEVE_API_TOKEN="ops=s3cret").returncode == 0
        assert probe(url, IMAGESIEVE_API_TOKEN="s3cret").returncode == 0
        wrong = probe(url, IMAGESIEVE_API_TOKEN="ops=nope")
        assert (
            wrong.returncode == 1
            and wrong.stderr == f"unhealthy: {url} answered 401 Unauthorized\n"
        )
        missing = probe(url, IMAGESIEVE_API_TOKEN_FILE=str(tmp_path / "gone"))
        assert missing.returncode == 1 and "cannot read the token file" in missing.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    down = probe(url, IMAGESIEVE_API_TOKEN="s3cret")
    assert down.returncode == 1 and down.stderr.startswith(f"unhealthy: {url} did not answer")
    light = subprocess.run(
        [sys.executable, "-c", "import sys, imagesieve._access; print(sorted(m for m in "
         "('imagesieve.app', 'numpy', 'starlette') if m in sys.modules))"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert light.stdout.strip() == "[]"  # every 30 s in a container: no heavy imports


def test_service_predict__live_frames_are_not_stored(api, elpv):
    _, _, service = api
    mono = [im for im in elpv if im.cell_type == "mono"]
    for im in mono[401:406]:  # at least five stored neighbours, whatever ran before
        service.predict(png_bytes(im.path), im.path.name, neighbours=0)
    frame = png_bytes(mono[400].path)
    before = service.health()["stored_images"]
    live = service.predict(frame, "webcam.png", store=False)
    assert live.prediction.id is None and live.prediction.label is not None
    assert len(live.neighbours) == 5 and all(n["id"] is not None for n in live.neighbours)
    assert service.health()["stored_images"] == before
    stored = service.predict(frame, "webcam.png")
    assert stored.prediction.id is not None
    assert stored.prediction.top3 == live.prediction.top3
    assert [n["id"] for n in stored.neighbours] == [n["id"] for n in live.neighbours]
    assert service.health()["stored_images"] == before + 1


def test_service_predict__live_batch_counters_are_stored_while_serving(ws, elpv, monkeypatch):
    monkeypatch.setattr(_service, "COUNTS_EVERY", 0.0)
    with Service(ws) as service:
        for im in [im for im in elpv if im.cell_type == "mono"][720:723]:
            service.predict(png_bytes(im.path), im.path.name, neighbours=0)
        with pytest.raises(ImageLoadError):
            service.predict(b"not an image", "notes.png")
        batches = "SELECT status, n_items, n_scored, n_failed FROM batches"
        assert service.sql(batches).rows == [("running", 4, 3, 1)]
    with Store(ws) as store:
        assert store._db.execute(batches).fetchall() == [("done", 4, 3, 1)]


def test_service_predict__outgrown_flat_index_turns_hnsw_while_serving(ws, elpv, monkeypatch):
    monkeypatch.setattr(_vectors, "FLAT_MAX", 10)
    cells = [im for im in elpv if im.cell_type == "mono"][700:724]
    with Service(ws) as service:
        for im in cells[:12]:
            service.predict(png_bytes(im.path), im.path.name, neighbours=0)
        service._upgrade.join(timeout=60)  # started by the commit that crossed FLAT_MAX
        index = service.store.indexes.get("v1")
        assert index.kind == "hnsw" and index.ntotal == 12
        first = index.info["tuned_at"]  # the snapshot the graph was built from: 11 or 12
        later = [service.predict(png_bytes(im.path), im.path.name) for im in cells[12:16]]
        assert index.ntotal == 16 and service.store.indexes.get("v1") is index
        ids = {n["id"] for r in later for n in r.neighbours}
        assert all(len(r.neighbours) == 5 for r in later) and ids <= set(range(1, 17))
        for im in cells[16:24]:  # doubled since it was tuned: re-tuned beside the requests
            service.predict(png_bytes(im.path), im.path.name, neighbours=0)
        service._upgrade.join(timeout=60)
        assert index.ntotal == 24 and 24 >= index.info["tuned_at"] >= 2 * first
    with Service(ws) as again:  # saved as HNSW: no conversion at the next start
        assert again.store.indexes.get("v1").kind == "hnsw"


def test_service_score__batch_past_flat_max_builds_hnsw_beside_the_requests(ws, elpv, monkeypatch):
    monkeypatch.setattr(_vectors, "FLAT_MAX", 10)
    cells = [im for im in elpv if im.cell_type == "mono"][740:756]
    with Service(ws) as service:
        summary = service.score([str(im.path) for im in cells[:15]])
        assert summary.scored == 15 and service._upgrade is not None
        # not saved as flat (saving would have built the graph holding the store)
        assert not (ws.root / "index" / "v1.faiss").exists()
        answer = service.predict(png_bytes(cells[15].path), "cell.png")  # during or after it
        assert len(answer.neighbours) == 5
        service._upgrade.join(timeout=60)
        assert (
            service.store.indexes.get("v1").kind == "hnsw"
            and service.store.indexes.get("v1").ntotal == 16
        )
    with Service(ws) as again:
        index = again.store.indexes.get("v1")
        assert index.kind == "hnsw" and index.ntotal == 16


@pytest.mark.slow
def test_service_retrain__serves_the_new_version_then_activate_goes_back(ws, small_folder, elpv):
    from imagesieve.models import get_version

    cell = png_bytes([im for im in elpv if im.cell_type == "mono"][500].path)
    with Service(ws) as service:
        first = service.predict(cell, "cell.png")
        stages = []
        version = service.retrain(small_folder, progress=lambda s, d, t: stages.append(s))
        assert version.name == "v2" and service.health()["model_version"] == "v2"
        assert stages and service.training_status == {"running": False, "version": "v2"}
        # v2 scored v1's history when it was trained: the cell is stored with it already
        history = service.history()
        assert history["old"] == "v1" and history["compared"] == 1 and history["failed"] == 0
        server = start_server(service, ui=False)  # the same diff over REST
        try:
            base = server.url + "/api/v1/versions"
            assert requests.get(f"{base}/v2/history", timeout=30).json() == {
                "version": "v2",
                "history": history,
            }
            assert requests.get(f"{base}/v1/history", timeout=30).json()["history"] is None
            # each version with its test images' UNKNOWN rate and whether it is off target
            listed = {v["version"]: v for v in requests.get(base, timeout=30).json()["versions"]}
            own = get_version(ws, "v2").meta["metrics"]
            assert listed["v2"]["unknown_rate"] == own["unknown_rate"]
            assert listed["v2"]["unknown_vs_target"] == own["unknown_vs_target"]
            assert listed["v2"]["unknown_vs_target"]["verdict"] in ("within", "above", "below")
            assert_error(requests.get(f"{base}/v9/history", timeout=30), 400, "no model version")
            for hostile in ("..", "%2e%2e%2fmodels", "v1%00", "x" * 65):
                r = requests.get(f"{base}/{hostile}/history", timeout=30)
                assert r.status_code in (400, 404, 422), (hostile, r.status_code)
        finally:
            server.stop()
        again = service.predict(cell, "cell.png")
        assert again.prediction.skipped is True
        assert again.prediction.id != first.prediction.id
        assert [v["version"] for v in service.versions() if v["active"]] == ["v2"]
        service.activate("v1")
        assert service.health()["model_version"] == "v1"
        assert service.predict(cell, "cell.png").prediction.id == first.prediction.id


def cli(ws: Workspace, *args: str) -> subprocess.CompletedProcess:
    """``imagesieve ARGS --workspace WS`` in a process of its own, as an operator's shell runs it."""
    return subprocess.run(
        [sys.executable, "-m", "imagesieve.cli", *args, "--workspace", str(ws.root)],
        capture_output=True,
        text=True,
    )


def test_serve__models_activate_from_the_cli_takes_effect_on_the_running_server(ws, elpv):
    shutil.copytree(ws.models_dir / "v1", ws.models_dir / "v2")  # a second version, same model
    cell = png_bytes([im for im in elpv if im.cell_type == "mono"][501].path)
    with Service(ws) as service:
        server = start_server(service, ui=False)
        base = server.url + "/api/v1"
        try:
            assert post_image(base, cell).json()["model_version"] == "v1"
            r = cli(ws, "models", "--activate", "v2")
            assert r.returncode == 0 and "serves it from its next request" in r.stdout
            stored = service.store.row_count("v1")
            assert requests.get(base + "/health", timeout=10).json()["model_version"] == "v2"
            # v2 had nothing stored (trained or activated outside): the server scores v1's
            # history with it in the background, as its own retrain does
            status = settled(base + "/retrain")
            assert status == {"running": False, "version": "v2"}
            answer = post_image(base, cell).json()
            assert (answer["model_version"], answer["already_stored"]) == ("v2", True)
            history = requests.get(base + "/versions/v2/history", timeout=10).json()["history"]
            assert (history["old"], history["new"], history["failed"]) == ("v1", "v2", 0)
            assert history["compared"] == stored >= 1
            assert service.store.row_count("v2") == stored
        finally:
            server.stop()


def test_serve__a_version_the_cli_trains_meanwhile_is_served_with_the_history(
    ws, small_folder, elpv
):
    cell = png_bytes([im for im in elpv if im.cell_type == "mono"][502].path)
    with Service(ws) as service:
        server = start_server(service, ui=False)
        base = server.url + "/api/v1"
        try:
            assert post_image(base, cell).json()["model_version"] == "v1"
            r = cli(ws, "train", str(small_folder))
            assert r.returncode == 0, r.stderr
            assert "trained v2" in r.stdout
            assert (
                "history: the server holding the store serves v2 from its next request and "
                "scores the images stored with v1 in the background" in r.stderr
            )
            assert requests.get(base + "/health", timeout=10).json()["model_version"] == "v2"
            assert settled(base + "/retrain") == {"running": False, "version": "v2"}
            history = requests.get(base + "/versions/v2/history", timeout=10).json()["history"]
            assert history["compared"] == service.store.row_count("v1") >= 1
            # the same for a version with nothing stored activated through the API
            shutil.copytree(ws.models_dir / "v1", ws.models_dir / "v3")
            assert requests.post(base + "/versions/v3/activate", timeout=30).status_code == 200
            status = settled(base + "/retrain")
            assert status == {"running": False, "version": "v3"}
            history = requests.get(base + "/versions/v3/history", timeout=10).json()["history"]
            assert (history["old"], history["compared"]) == ("v2", service.store.row_count("v2"))
        finally:
            server.stop()


def test_service_set_thresholds__redecides_stored_rows_and_new_ones(scoring_ws, elpv):
    cells = [im for im in elpv if im.cell_type == "mono"][600:612]
    with Service(scoring_ws) as service:
        for im in cells[:10]:
            service.predict(png_bytes(im.path), im.path.name, neighbours=0)
        rows = service.sql("SELECT top1_prob, neighbor_distance FROM predictions").rows
        confidence = sorted(r[0] for r in rows)[5]  # half of them fall below
        distance = sorted(r[1] for r in rows)[7]  # the 2 furthest are beyond
        counts = service.set_thresholds(confidence, distance)
        stored = service.sql(
            "SELECT top1_class, top1_prob, neighbor_distance, label, reason FROM predictions"
        ).rows
        for top1, prob, dist, label, reason in stored:
            want = [
                r
                for r, hit in (
                    ("low_confidence", prob < confidence),
                    ("far_from_training", dist > distance),
                )
                if hit
            ]
            assert reason == ("+".join(want) or None)
            assert label == ("UNKNOWN" if want else top1)
        assert counts["unknown"] == counts["unknown_now"] == sum(r[3] == "UNKNOWN" for r in stored)
        assert service.version.confidence_threshold == confidence
        assert service.version.distance_threshold == distance
        new = service.predict(png_bytes(cells[10].path), "new.png").prediction
        assert service.predictor.threshold == confidence
        assert (new.label == "UNKNOWN") == (
            new.confidence < confidence or new.neighbor_distance > distance
        )
        service.set_thresholds(0.0, None)
        assert service.sql("SELECT count(*) FROM predictions WHERE label = 'UNKNOWN'").rows == [
            (0,)
        ]
    with Service(scoring_ws) as again:  # kept in the version's meta.json
        assert (
            again.version.confidence_threshold == 0.0 and again.version.distance_threshold is None
        )
        assert_error_text = "confidence threshold must be within [0, 1], got 2"
        with pytest.raises(ValueError) as e:
            again.set_thresholds(2, None)
        assert assert_error_text in str(e.value)


def test_predict__upload_that_cannot_be_kept_is_not_stored(api, elpv):
    base, ws, service = api
    im = [im for im in elpv if im.cell_type == "poly"][300]
    data = png_bytes(im.path)
    before = service.health()["stored_images"]
    images = ws.images_dir
    images.mkdir(parents=True, exist_ok=True)
    aside = images.with_name("images-aside")
    images.rename(aside)
    images.write_bytes(b"")  # a file where the folder should be: every write fails
    try:
        assert_error(post_image(base, data, "kept.png"), 500, "cannot keep the upload")
        assert service.health()["stored_images"] == before
    finally:
        images.unlink()
        aside.rename(images)
    ok = post_image(base, data, "kept.png").json()
    assert ok["already_stored"] is False and ok["id"] is not None
    assert kept_path(ws, ok["sha256"]).read_bytes() == data


def test_serve__kill_9_after_answering_keeps_every_answered_image_once(ws, elpv, tmp_path):
    """Answers are synced to the journal before they go out: a server killed right after
    answering loses none of them, and the next open stores each once."""
    proc, url = start_cli_server(
        ["serve", "--workspace", str(ws.root), "--port", "0", "--no-ui"], tmp_path / "serve.log"
    )
    try:
        cells = [im for im in elpv if im.cell_type == "mono"][800:824]
        answered: dict[int, int] = {}

        def client(k: int, step: int = 8) -> None:
            for i in range(k, 23, step):
                answered[i] = post(i)

        def post(i: int) -> int:
            return post_image(f"{url}/api/v1", png_bytes(cells[i].path), f"k{i}.png").json()["id"]

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(1.5)  # folded by now (the writer folds within a second); then one more
        answered[23] = post(23)
    finally:
        proc.send_signal(signal.SIGKILL)  # right after the last answer: no fold, no clean stop
        proc.wait(timeout=60)
    assert len(answered) == 24 and len(set(answered.values())) == 24
    journal = ws.root / "store.journal"
    assert journal.stat().st_size > 0  # the last one was answered from the journal alone
    with Store(ws) as store:
        rows = store._db.execute(
            "SELECT id, source FROM predictions WHERE starts_with(source, 'upload:k')"
        ).fetchall()
        assert store.indexes.check("v1").action == "in_sync"
    assert sorted(rows) == sorted((answered[i], f"upload:k{i}.png") for i in range(24))
    assert journal.stat().st_size == 0


def test_photo_quality__flagged_filtered_and_bounded_over_http(ws, elpv):
    from PIL import Image, ImageFilter

    cells = [im for im in elpv if im.cell_type == "mono"][200:203]
    sharp, blurred = png_bytes(cells[0].path), io.BytesIO()
    Image.open(cells[1].path).convert("RGB").filter(ImageFilter.GaussianBlur(6)).save(
        blurred, "PNG"
    )
    service = Service(ws)
    server = start_server(service, ui=False)
    base = server.url + "/api/v1"
    try:
        good = post_image(base, sharp, "good.png").json()
        bad = post_image(base, blurred.getvalue(), "blurred.png").json()
        assert bad["label"] == "UNKNOWN" and bad["reason"].startswith("poor_quality")
        assert bad["quality"]["flags"] == ["blurred"] and good["quality"]["flags"] == []
        page = requests.get(f"{base}/images", params={"quality": "blurred"}, timeout=30).json()
        assert [r["id"] for r in page["rows"]] == [bad["id"]]
        assert page["rows"][0]["quality_flags"] == "blurred"
        page = requests.get(f"{base}/images", params={"reason": "poor_quality"}, timeout=30)
        assert page.json()["total"] == 1
        th = requests.get(f"{base}/thresholds", timeout=30).json()
        assert th["counts"]["poor_quality"] == 1 and th["quality"]["blur_max"] > 0
        body = {"confidence": th["confidence"], "distance": th["distance"]}
        r = requests.post(
            f"{base}/thresholds/preview", json=body | {"quality": NO_BLUR_CHECK}, timeout=30
        )
        assert r.status_code == 200 and r.json()["poor_quality"] == 0
        for bad_bound, status in (({"blur": 1}, 422), ({"blur_max": -1}, 422)):
            r = requests.put(f"{base}/thresholds", json=body | {"quality": bad_bound}, timeout=30)
            assert r.status_code == status
        r = requests.put(f"{base}/thresholds", json=body | {"quality": NO_BLUR_CHECK}, timeout=30)
        assert r.status_code == 200 and r.json()["poor_quality"] == 0
        again = post_image(base, blurred.getvalue(), "blurred-again.png").json()
        assert again["quality"]["flags"] == [] and "poor_quality" not in (again["reason"] or "")
        auto = dict.fromkeys(NO_BLUR_CHECK, "auto")
        r = requests.put(f"{base}/thresholds", json=body | {"quality": auto}, timeout=30)
        assert r.json()["poor_quality"] == 1
    finally:
        server.stop()
        service.close()
