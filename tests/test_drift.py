"""Drift: a batch unlike the training data is marked, an ordinary one is not; the same rows
from the SQL views, the CLI, the API and the batch summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
from scipy import stats

from imagesieve.app import Service, start_server
from imagesieve.cli import main
from imagesieve.ingest import ScoreOptions, batch_detail, score_inputs
from imagesieve.models import get_version
from imagesieve.store import Store


@pytest.fixture
def scored(scoring_ws, elpv):
    """Two batches scored with the small mono model: 30 held-out mono cells, 30 poly cells.

    The held-out mono cells are the next ones of the kinds ``small_folder`` trains on.
    """
    mono = [im for im in elpv if im.cell_type == "mono"]
    good = [im for im in mono if im.defect_probability == 0.0][40:55]
    mono = good + [im for im in mono if im.defect_probability == 1.0][40:55]
    poly = [im for im in elpv if im.cell_type == "poly"][100:130]
    with Store(scoring_ws) as store:
        known = score_inputs(scoring_ws, [str(im.path) for im in mono], store=store)
        shifted = score_inputs(scoring_ws, [str(im.path) for im in poly], store=store)
    return scoring_ws, known, shifted


def test_drift__poly_batch_departs_mono_batch_does_not(scored):
    ws, known, shifted = scored
    assert known.drift["drifted"] is False and shifted.drift["drifted"] is True
    assert shifted.drift["images"] == known.drift["images"] == 30
    # twice as far in squared Mahalanobis distance (the [0, 2) map d = 2m / (m + scale) undone)
    m_known, m_shifted = (x.drift["median_distance"] for x in (known, shifted))
    assert m_shifted / (2 - m_shifted) > 2 * m_known / (2 - m_known)
    assert known.to_dict()["drift"] == known.drift  # in the summary's JSON too

    # the view's KS statistic is scipy's, and its p the asymptotic Kolmogorov distribution's
    reference = np.array(get_version(ws).drift_reference)
    with Store(ws) as store:
        rows = store._db.execute(
            "SELECT batch_id, neighbor_distance FROM predictions ORDER BY batch_id"
        ).fetchall()
    for summary in (known, shifted):
        d = np.array([x for b, x in rows if b == summary.batch_id], np.float32).astype(float)
        ks = stats.ks_2samp(d, np.float32(reference).astype(float))
        assert summary.drift["ks_d"] == pytest.approx(ks.statistic, abs=1e-6)
        ne = len(d) * len(reference) / (len(d) + len(reference))
        lam = (np.sqrt(ne) + 0.12 + 0.11 / np.sqrt(ne)) * ks.statistic
        assert summary.drift["p_value"] == pytest.approx(stats.kstwobign.sf(lam), abs=1e-6)


def test_drift__read_through_sql_cli_and_api(scored, capsys):
    ws, known, shifted = scored
    wsa = ["--workspace", str(ws.root)]
    assert (
        main(["sql", "SELECT batch_id, drifted FROM drift_per_batch ORDER BY 1", *wsa, "--json"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["rows"] == [[known.batch_id, False], [shifted.batch_id, True]]
    assert main(["sql", "SELECT count(*) FROM drift_per_day", *wsa, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [[1]]  # one model, one day
    assert main(["batches", "--drift", *wsa]) == 0
    out = capsys.readouterr().out
    assert "DEPARTED from the training data" in out and "in line with the training data" in out
    assert main(["batches", "--id", str(shifted.batch_id), *wsa]) == 0
    assert "drift: DEPARTED" in capsys.readouterr().out
    assert batch_detail(ws, shifted.batch_id)["drift"]["drifted"] is True

    service = Service(ws)
    server = start_server(service, ui=False)
    try:
        base = server.url + "/api/v1"
        r = requests.get(f"{base}/drift", timeout=30).json()
        assert [x["drifted"] for x in r["drift"]] == [True, False]  # newest first
        r = requests.get(f"{base}/drift", params={"per": "day"}, timeout=30).json()
        assert r["per"] == "day" and len(r["drift"]) == 1
        assert requests.get(f"{base}/drift", params={"per": "week"}, timeout=30).status_code == 422
        one = requests.get(f"{base}/batches/{shifted.batch_id}", timeout=30).json()
        assert one["drift"]["drifted"] is True
    finally:
        server.stop()
        service.close()


def test_drift__a_version_without_a_reference_gives_no_test(scoring_ws, elpv, tmp_path):
    version = get_version(scoring_ws)
    meta = json.loads((version.path / "meta.json").read_text())
    del meta["drift"]  # as a version trained before drift was measured
    (version.path / "meta.json").write_text(json.dumps(meta))
    cells = [str(im.path) for im in elpv if im.cell_type == "poly"][:5]
    summary = score_inputs(scoring_ws, cells, ScoreOptions())
    assert summary.drift["ks_d"] is None and summary.drift["drifted"] is False
    assert summary.drift["images"] == 5
