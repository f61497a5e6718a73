"""The container: the Dockerfile built with podman on a local Debian base, run, used, stopped.

The image holds the slim install (no torch) and serves a workspace mounted from this machine,
holding the session's trained model; it scores through the API as the user ``imagesieve``,
lets ``podman exec`` run the CLI through the server that holds the store, answers its health
check, refuses training in one line, and stops cleanly on SIGTERM with everything it stored
readable afterwards.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import requests
from podman import (
    BASE_TAG,
    CONTAINER_UID,
    IMAGE_TAG,
    ROOT,
    bearer,
    build_base,
    build_image,
    image_exists,
    podman,
    run_once,
    run_server,
    venv_megabytes,
    writable_workspace,
)

from imagesieve._workspace import Workspace
from imagesieve.store import open_readonly

pytestmark = pytest.mark.slow
TOKEN = "container-s3cret"
NAME = "imagesieve-test"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> str:
    """The project's image, built (layers cached between runs) on the local base."""
    if not image_exists(BASE_TAG):
        build_base(tmp_path_factory.mktemp("base"))
    build_image(BASE_TAG, IMAGE_TAG, no_cache=False)
    return IMAGE_TAG


@pytest.fixture(scope="module")
def served(image, trained, tmp_path_factory):
    """(URL, host workspace) of the image's server on a copy of the trained model."""
    ws_trained, _ = trained
    ws = Workspace(tmp_path_factory.mktemp("container") / "ws")
    shutil.copytree(ws_trained.models_dir, ws.models_dir)
    writable_workspace(ws.root)
    tokens = ws.root.parent / "tokens"  # a named token in a mounted file: what the probe must read
    tokens.write_text(f"# API tokens\nops={TOKEN}\n")
    tokens.chmod(0o644)
    url = run_server(
        NAME, ws.root, TOKEN, image, "--env", "IMAGESIEVE_AUTH=op:pw", token_file=tokens
    )
    yield url, ws
    podman("rm", "--force", "--ignore", NAME)


def test_image__is_the_documented_slim_non_root_image(image):
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    config = info["Config"]
    assert config["User"] == "imagesieve"
    assert "/workspace" in config["Volumes"]
    assert config["Env"].count("IMAGESIEVE_WORKSPACE=/workspace") == 1
    health = info.get("Healthcheck") or config["Healthcheck"]  # where podman 4 puts it
    assert health["Test"][-3:] == ["python", "-m", "imagesieve._access"]  # the API health probe
    assert config["StopSignal"] in ("SIGTERM", "15")
    assert venv_megabytes(image) * 2**20 <= 1e9  # the slim install: at most 1 GB on disk
    code = "import importlib.util as u; print([m for m in ('torch', 'matplotlib', 'onnxruntime', 'faiss', 'umap') if u.find_spec(m)])"  # noqa: E501
    out = run_once("--entrypoint", "python", image, "-c", code, check=False)
    assert out.stdout.strip() == "['onnxruntime', 'faiss', 'umap']", out.stderr


#: Three tight kinds of 40 images and 10 strays, clustered in the image: PCA, UMAP (numba's
#: compiled code) and HDBSCAN run on the libraries as the image ships them.
CLUSTER_THREE_KINDS = """
import numpy as np
from imagesieve.search._cluster import cluster_embeddings
rng = np.random.default_rng(0)
centres = rng.normal(size=(3, 64))
x = np.concatenate([c + 0.05 * rng.normal(size=(40, 64)) for c in centres])
x = np.concatenate([x, rng.normal(size=(10, 64))]).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
names = ['a'] * len(x)
result = cluster_embeddings(np.arange(len(x)), x, names, names)
print(sorted(len(c.member_ids) for c in result.clusters))
"""


def test_image__clusters_with_its_own_libraries(image):
    out = run_once("--entrypoint", "python", image, "-c", CLUSTER_THREE_KINDS, check=False)
    assert out.returncode == 0, out.stderr
    sizes = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(sizes) == 3 and all(38 <= n <= 42 for n in sizes), sizes


def test_container__refuses_beyond_loopback_without_its_secrets(image, tmp_path):
    out = run_once("-v", f"{writable_workspace(tmp_path)}:/workspace", image, check=False)
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 (not loopback) without --auth USER:PASSWORD or " in (
        out.stderr
    )


def test_container__scores_through_the_api_as_its_own_user(served, elpv):
    url, _ = served
    api, auth = f"{url}/api/v1", bearer(TOKEN)
    health = requests.get(f"{api}/health", headers=auth, timeout=30).json()
    assert health["model_version"] == "v1" and health["workspace"] == "/workspace"
    assert requests.get(f"{api}/health", timeout=30).status_code == 401
    mono = [im for im in elpv if im.cell_type == "mono"][300:303]
    for im in mono:
        r = requests.post(
            f"{api}/predict", headers=auth, files={"file": (im.path.name, im.path.read_bytes())},
            timeout=120,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["label"] in ("defective", "functional", "lonely", "UNKNOWN")
    bad = requests.post(
        f"{api}/predict", headers=auth, files={"file": ("notes.png", b"not an image")}, timeout=60
    )
    assert bad.status_code == 422 and "not a recognised image" in bad.json()["error"]["message"]
    rows = requests.post(
        f"{api}/sql", headers=auth, json={"sql": "SELECT count(*) FROM predictions"}, timeout=60
    ).json()["rows"]
    assert rows == [[3]]
    assert podman("exec", NAME, "id", "-u").stdout.strip() == str(CONTAINER_UID)


def test_container__cli_works_through_its_server(served):
    """``podman exec NAME imagesieve ...`` reaches the server that holds the store."""
    query = "SELECT count(*) FROM predictions"
    out = podman("exec", NAME, "imagesieve", "sql", query, "--json", check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["rows"] == [[3]]
    out = podman("exec", NAME, "imagesieve", "images", "--json", check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["total"] == 3
    out = podman("exec", NAME, "imagesieve", "reindex", check=False)  # the server owns the indexes
    assert out.returncode == 2 and "holds the store of /workspace" in out.stderr, out.stderr


def test_container__retrain_is_refused_in_one_line(served):
    url, _ = served
    r = requests.post(f"{url}/api/v1/retrain", headers=bearer(TOKEN), timeout=60)
    assert r.status_code == 501
    assert r.json()["error"]["message"].startswith("this server runs the slim install (no torch)")


def test_container__health_check_passes(served):
    out = podman("healthcheck", "run", NAME, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    state = json.loads(podman("inspect", NAME).stdout)[0]["State"]
    assert state["Health"]["Status"] == "healthy"


def test_container__stops_cleanly_on_sigterm_and_its_store_reads_back(served):
    _, ws = served
    t = time.monotonic()
    podman("stop", "--time", "60", NAME)
    took = time.monotonic() - t
    state = json.loads(podman("inspect", NAME).stdout)[0]["State"]
    logs = podman("logs", NAME)
    assert state["ExitCode"] == 0, logs.stdout + logs.stderr
    assert took < 30  # it stopped itself rather than being killed at the timeout
    assert "Traceback" not in logs.stdout + logs.stderr
    con = open_readonly(ws)
    try:
        assert con.execute("SELECT count(*) FROM predictions").fetchone() == (3,)
    finally:
        con.close()


def test_compose__runs_the_dockerfile_with_its_port_volume_and_secrets():
    import yaml

    from imagesieve._access import TOKEN_ENV
    from imagesieve.app._server import AUTH_ENV

    dockerfile = (ROOT / "Dockerfile").read_text()
    service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["imagesieve"]
    assert service["build"] == "."
    assert [p.split(":")[-1] for p in service["ports"]] == ["7860"]
    assert '"--port", "7860"' in dockerfile and "EXPOSE 7860" in dockerfile
    assert [v.split(":")[-1] for v in service["volumes"]] == ["/workspace"]
    assert "VOLUME /workspace" in dockerfile
    assert sorted(service["environment"]) == sorted([TOKEN_ENV, AUTH_ENV])
    assert f"sudo chown -R {CONTAINER_UID}:{CONTAINER_UID}" in (ROOT / "compose.yaml").read_text()
