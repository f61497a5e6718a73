import json

import pytest

from imagesieve.cli import main


@pytest.mark.slow
def test_main__demo_trains_then_reuses(tmp_path, capsys):
    ws = str(tmp_path / "sieve")
    assert main(["demo", "--workspace", ws, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["reused_model"] is False
    assert first["metrics"]["accuracy"] > 0.75
    mono, poly = first["mixed_batch"]["mono"], first["mixed_batch"]["poly"]
    assert sum(mono.values()) == sum(poly.values()) == 150
    assert "failed" not in mono and "failed" not in poly
    trained_on = tmp_path / "sieve" / "demo" / "elpv-mono"
    assert (
        sum(1 for _ in trained_on.rglob("*.png")) == 1074 - 150
    )  # the scored mono cells are held out

    assert main(["demo", "--workspace", ws]) == 0
    out = capsys.readouterr().out
    assert "(reused)" in out and "scored 300 cells" in out
