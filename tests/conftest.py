"""Shared fixtures: real ELPV images and one small trained workspace per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from imagesieve._workspace import Workspace
from imagesieve.data._elpv import ElpvImage, elpv_images, export_elpv


@pytest.fixture(scope="session")
def elpv() -> list[ElpvImage]:
    """All 2,624 ELPV images with labels."""
    return elpv_images()


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory, elpv) -> Path:
    """ImageFolder: 40 functional + 40 defective mono cells, and a class with a single image."""
    mono = [im for im in elpv if im.cell_type == "mono"]
    good = [im for im in mono if im.defect_probability == 0.0][:40]
    bad = [im for im in mono if im.defect_probability == 1.0][:40]
    root = export_elpv(tmp_path_factory.mktemp("data") / "small", good + bad)
    lone = [im for im in elpv if im.cell_type == "poly"][0]
    (root / "lonely").mkdir()
    shutil.copyfile(lone.path, root / "lonely" / lone.path.name)
    (root / "functional" / "notes.txt").write_text("not an image")
    data = bad[-1].path.read_bytes()
    (root / "defective" / "broken.png").write_bytes(data[: len(data) // 2])  # truncated
    (root / "README.txt").write_text("stray file outside the class folders")
    return root


@pytest.fixture(scope="session")
def trained(tmp_path_factory, small_folder):
    """A workspace with one phase-1 model trained on ``small_folder`` (session-wide, read-only)."""
    from imagesieve.classifier._train import TrainOptions, train_model

    ws = Workspace(tmp_path_factory.mktemp("ws"))
    result = train_model(small_folder, ws, TrainOptions(test_size=0.25, val_size=0.15))
    return ws, result


@pytest.fixture
def scoring_ws(trained, tmp_path) -> Workspace:
    """A fresh workspace (empty store) holding a copy of the ``trained`` model version."""
    ws_trained, _ = trained
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(ws_trained.models_dir, ws.models_dir)
    return ws
