import io
import json
import signal

import duckdb
import numpy as np
import pytest
import requests
from cliserver import start_cli_server
from PIL import Image

from imagesieve._workspace import Workspace
from imagesieve.cli import main
from imagesieve.store import Store


@pytest.mark.slow
def test_main__demo_trains_flags_poly_cells_unknown_then_reuses(tmp_path, capsys):
    ws = str(tmp_path / "sieve")
    assert main(["demo", "--workspace", ws, "--json", "--no-serve"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["reused_model"] is False
    assert first["metrics"]["accuracy"] > 0.75
    mono, poly = first["mixed_batch"]["mono"], first["mixed_batch"]["poly"]
    assert sum(mono.values()) == 150 and sum(poly.values()) == 600
    trained_on = tmp_path / "sieve" / "demo" / "elpv-mono"
    assert sum(1 for _ in trained_on.rglob("*.png")) == 1074 - 150  # scored mono cells held out

    # Trained on mono cells only: the poly cells are unlike anything trained on, and the
    # distance rule says so; unseen mono cells mostly keep their label.
    poly_far = sum(
        n for k, n in poly.items() if k.startswith("UNKNOWN (") and "far_from_training" in k
    )
    assert poly_far >= 0.95 * 600, poly
    mono_known = sum(n for k, n in mono.items() if not k.startswith("UNKNOWN"))
    assert mono_known >= 0.8 * 150, mono
    # ... which softmax confidence alone does not: most poly cells get a confident Top-1, and
    # are UNKNOWN only because they are far from the training images.
    assert poly.get("UNKNOWN (far_from_training)", 0) >= 0.5 * 600, poly
    # ... and the UNKNOWNs are clustered, exported as folders with a summary
    clusters = first["clusters"]["clusters"]
    unknown = [(k, n) for k, n in [*mono.items(), *poly.items()] if k.startswith("UNKNOWN")]
    poor = sum(n for k, n in unknown if "poor_quality" in k)
    assert poor <= 0.05 * 750, (mono, poly)  # photos of poor quality: left out of clustering
    assert first["clusters"]["images"] == sum(n for _, n in unknown) - poor
    assert clusters and clusters[0]["size"] >= 50
    assert (tmp_path / "sieve" / "clusters" / "summary.csv").is_file()

    assert main(["demo", "--workspace", ws, "--json", "--no-serve"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reused_model"] is True
    assert again["mixed_batch"] == first["mixed_batch"]
    assert again["batch"]["already_scored"] == 750 and again["batch"]["scored"] == 0
    con = duckdb.connect(str(tmp_path / "sieve" / "store.duckdb"), read_only=True)
    assert con.execute("SELECT count(*), count(DISTINCT sha256) FROM predictions").fetchall() == [
        (750, 750)
    ]
    con.close()

    # The README's command ends serving the populated app: health, stored rows and clusters.
    proc, url = start_cli_server(["demo", "--workspace", ws, "--port", "0"], tmp_path / "serve.log")
    try:
        health = requests.get(f"{url}/api/v1/health", timeout=30).json()
        assert health["model_version"] == "v1" and health["stored_images"] == 750
        clusters = requests.get(f"{url}/api/v1/clusters", timeout=30).json()["clusters"]
        assert [c["size"] for c in clusters] == [c["size"] for c in first["clusters"]["clusters"]]
        page = requests.get(url + "/", timeout=30)
        assert page.status_code == 200 and "gradio" in page.text.lower()
        png = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(
            png, "PNG"
        )
        r = requests.post(
            f"{url}/api/v1/predict", files={"file": ("new.png", png.getvalue())}, timeout=60
        )
        assert r.status_code == 200 and r.json()["id"] is not None  # stored in the live batch
    finally:
        proc.send_signal(signal.SIGTERM)  # what `kill`, systemd and docker send
        assert proc.wait(timeout=60) == 0  # a clean stop: the live batch finished, store closed
    with Store(Workspace(ws)) as store:  # the live batch was finished, not left interrupted
        assert store._db.execute(
            "SELECT count(*) FROM batches WHERE status <> 'done'"
        ).fetchall() == [(0,)]
