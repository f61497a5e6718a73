"""Model versions: ``models/<version>/`` with checkpoint, ONNX export, ``meta.json``, report."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imagesieve._errors import SieveError, UserError
from imagesieve._workspace import Workspace
from imagesieve.models._config import BackboneConfig

__all__ = [
    "ModelVersion",
    "Thresholds",
    "VersionMeta",
    "activate_version",
    "active_stamp",
    "active_version",
    "get_version",
    "list_versions",
    "read_history",
    "set_thresholds",
    "write_version",
]

_ACTIVE_FILE = "ACTIVE"
#: A version's fitted Mahalanobis distance (``classifier._far``): when present, its distance to
#: the training data; otherwise the cosine distance to the nearest training image.
FAR_FILE = "far.npz"
#: The before/after diff of a version's scoring of the history (``ingest.score_history``).
HISTORY_FILE = "history.json"
_NAME_RE = re.compile(r"^v(\d+)$")


@dataclass(frozen=True)
class Thresholds:
    """``meta.json`` "thresholds": when a prediction is UNKNOWN (see ``classifier.UnknownRule``)."""

    confidence: float = 0.5  # as ModelVersion.confidence_threshold when the key is missing
    distance: float | None = None
    mix: float | None = None  # weight of (1 - Top-1 probability) in the distance score; None: 0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. "calibration"


@dataclass(frozen=True)
class VersionMeta:
    """A version's ``meta.json``, typed: the keys imagesieve decides by; all others in ``extra``.

    ``to_dict(from_dict(d)) == d`` (as dicts); a key written as null reads as missing.
    """

    classes: list[str]
    preprocessing: dict[str, Any]  # BackboneConfig.to_dict()
    kind: str | None = None  # "trained", "imagenet"
    thresholds: Thresholds | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # backbone, metrics, version, created_at...

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VersionMeta:
        """Parse ``meta.json``."""
        rest = {k: v for k, v in d.items() if k not in ("classes", "preprocessing", "kind")}
        th = rest.pop("thresholds", None)
        if th is not None:
            th = dict(th)
            th = Thresholds(
                th.pop("confidence", 0.5), th.pop("distance", None), th.pop("mix", None), th
            )
        return cls(list(d["classes"]), d["preprocessing"], d.get("kind"), th, rest)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        th = self.thresholds
        out = {"kind": self.kind, "classes": self.classes, "preprocessing": self.preprocessing}
        if th is not None:
            mix = {} if th.mix is None else {"mix": th.mix}
            out["thresholds"] = {"confidence": th.confidence, "distance": th.distance} | mix
            out["thresholds"] |= th.extra
        return {k: v for k, v in out.items() if v is not None} | self.extra


def _meta_text(meta: dict[str, Any]) -> str:
    return json.dumps(meta, indent=2) + "\n"


@dataclass(frozen=True)
class ModelVersion:
    """A model version directory and its parsed ``meta.json``."""

    path: Path
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        """The version's name, e.g. ``v3``."""
        return self.path.name

    @property
    def onnx_path(self) -> Path:
        """ONNX graph: input ``image`` (n, s, s, 3) uint8; outputs ``embedding`` (n, d), ``logits``."""
        return self.path / "model.onnx"

    @property
    def checkpoint_path(self) -> Path:
        """Torch checkpoint (state dict of the whole model, plus backbone name and classes)."""
        return self.path / "model.pt"

    @property
    def head_path(self) -> Path:
        """The linear head as arrays ``weight`` (c, d) and ``bias`` (c,), for stored head inputs."""
        return self.path / "head.npz"

    @property
    def frozen_backbone(self) -> str | None:
        """The pretrained backbone this version embeds with, untouched; None when fine-tuned.

        Versions with the same one give an image the same embedding, head input and features
        for the distance to the training data (which ``thresholds.far`` names: versions of
        other taps differ there).
        """
        if self.meta.get("kind") != "trained" or (self.meta.get("training") or {}).get("phase2"):
            return None
        far = self.meta.get("thresholds", {}).get("far")
        return f"{self.meta['backbone']}:{self.meta.get('weights')}:{far}"

    @property
    def report_dir(self) -> Path:
        """Evaluation outputs written at training time."""
        return self.path / "report"

    @property
    def classes(self) -> list[str]:
        """Class names in logit order."""
        return list(self.meta["classes"])

    @property
    def config(self) -> BackboneConfig:
        """The backbone's preprocessing config as used by this version."""
        return BackboneConfig.from_dict(self.meta["preprocessing"])

    @property
    def confidence_threshold(self) -> float:
        """Top-1 probability below which a prediction is UNKNOWN."""
        return float(self.meta.get("thresholds", {}).get("confidence", 0.5))

    @property
    def distance_threshold(self) -> float | None:
        """Distance to the training data above which a prediction is UNKNOWN (None: no rule)."""
        value = self.meta.get("thresholds", {}).get("distance")
        return None if value is None else float(value)

    @property
    def thresholds_tuned(self) -> bool:
        """Whether an operator set the thresholds (``set_thresholds``), not the calibration."""
        return bool(self.meta.get("thresholds", {}).get("tuned"))

    @property
    def distance_words(self) -> str:
        """What this version's distance to its training data is, in a few words."""
        if (self.path / FAR_FILE).is_file():
            return "Mahalanobis distance to the nearest class"
        return "nearest training image's cosine distance"

    @property
    def mix(self) -> float:
        """Weight of (1 - Top-1 probability) added to the distance before its threshold."""
        return float(self.meta.get("thresholds", {}).get("mix") or 0.0)

    @property
    def drift_reference(self) -> list[float] | None:
        """Held-out known images' distances to the training data (None: trained before drift)."""
        found = (self.meta.get("drift") or {}).get("distance")
        return None if found is None else [float(d) for d in found]

    @property
    def info(self) -> VersionMeta:
        """``meta`` as a typed ``VersionMeta``."""
        return VersionMeta.from_dict(self.meta)

    @classmethod
    def load(cls, path: Path) -> ModelVersion:
        """Read a version directory; a broken one raises ``UserError`` saying what is wrong."""
        meta_path = path / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise UserError(f"model version {path.name} has no meta.json ({meta_path})") from None
        except json.JSONDecodeError as e:
            raise UserError(
                f"model version {path.name}: meta.json is not valid JSON ({e})"
            ) from None
        return cls(path, meta)


def list_versions(ws: Workspace) -> list[ModelVersion]:
    """All complete versions in the workspace, oldest first."""
    if not ws.models_dir.is_dir():
        return []
    found = []
    for p in ws.models_dir.iterdir():
        if p.is_dir() and not p.name.startswith(".") and (p / "meta.json").is_file():
            found.append(ModelVersion.load(p))
    return sorted(found, key=lambda v: (v.meta.get("created_at", ""), v.name))


def get_version(ws: Workspace, name: str | None = None) -> ModelVersion:
    """The named version, or the active one when ``name`` is None."""
    if name is None:
        version = active_version(ws)
        if version is None:
            raise UserError(
                f"no active model in workspace {ws.root}; run 'imagesieve train DATA_DIR' first",
                "no_model",
            )
        return version
    path = ws.models_dir / name
    if not (path / "meta.json").is_file():
        known = ", ".join(v.name for v in list_versions(ws)) or "none"
        raise UserError(f"no model version {name!r} in {ws.root} (versions: {known})")
    return ModelVersion.load(path)


def active_version(ws: Workspace) -> ModelVersion | None:
    """The version scoring uses by default, or None before the first training."""
    marker = ws.models_dir / _ACTIVE_FILE
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    path = ws.models_dir / name
    return ModelVersion.load(path) if (path / "meta.json").is_file() else None


def active_stamp(ws: Workspace) -> tuple[int, int] | None:
    """Identity of the active-version marker (inode, mtime): it changes with each activation.

    Cheap enough to poll per request; None before the first training.
    """
    try:
        st = (ws.models_dir / _ACTIVE_FILE).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def activate_version(ws: Workspace, name: str) -> ModelVersion:
    """Make ``name`` the active version (atomic rename of the marker file)."""
    version = get_version(ws, name)
    tmp = ws.models_dir / f".{_ACTIVE_FILE}.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, ws.models_dir / _ACTIVE_FILE)
    return version


def _next_name(ws: Workspace) -> str:
    numbers = [int(m.group(1)) for p in ws.models_dir.iterdir() if (m := _NAME_RE.match(p.name))]
    return f"v{max(numbers, default=0) + 1}"


def write_version(
    ws: Workspace, build_dir: Path, meta: dict[str, Any], name: str | None = None
) -> ModelVersion:
    """Turn a fully written ``build_dir`` into a new version, atomically (rename).

    ``meta`` is written as a ``VersionMeta`` (with the version's name and time); ``name``
    defaults to the next ``vN``; an existing version of that name is never touched.
    """
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        final = name or _next_name(ws)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        info = VersionMeta.from_dict({**meta, "version": final, "created_at": stamp})
        (build_dir / "meta.json").write_text(_meta_text(info.to_dict()))
        try:
            os.rename(build_dir, ws.models_dir / final)
        except OSError:
            if name is not None:
                raise UserError(f"model version {name!r} already exists in {ws.root}") from None
            continue
        return ModelVersion.load(ws.models_dir / final)
    raise SieveError("could not allocate a model version name", "disk")  # renames kept failing


def set_thresholds(
    version: ModelVersion,
    confidence: float,
    distance: float | None,
    *,
    tuned: bool = True,
    quality_overrides: dict[str, Any] | None = None,
    target: float | None = None,
) -> ModelVersion:
    """Rewrite the version's UNKNOWN thresholds in ``meta.json`` (atomically); the reloaded version.

    ``tuned`` marks them as the operator's, which a retrain starts from (False: the calibrated
    ones again, as an undo puts them back). ``quality_overrides``, when given, replaces the
    operator's photo quality bounds (``meta.json``'s ``quality_overrides``). ``target``: the
    false-UNKNOWN rate they were calibrated for at the operator's asking (``thresholds.target``;
    None: training's, in ``thresholds.calibration``).

    Nothing else in it changes. The values are not checked here: build a
    ``classifier.UnknownRule`` (and ``QualityRule``) from them first, which validates them.
    """
    info = version.info
    th = info.thresholds or Thresholds()
    extra = {k: v for k, v in th.extra.items() if k not in ("tuned", "target")}
    extra |= ({"tuned": True} if tuned else {}) | ({"target": target} if target else {})
    th = replace(th, confidence=confidence, distance=distance, extra=extra)
    info = replace(info, thresholds=th)
    if quality_overrides is not None:
        info = replace(info, extra=info.extra | {"quality_overrides": dict(quality_overrides)})
    tmp = version.path / "meta.json.tmp"
    tmp.write_text(_meta_text(info.to_dict()))
    os.replace(tmp, version.path / "meta.json")
    return ModelVersion.load(version.path)


def new_build_dir(ws: Workspace) -> Path:
    """A private directory inside ``models/`` to assemble a version before it is published."""
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".build-", dir=ws.models_dir))


def discard_build_dir(path: Path) -> None:
    """Remove an unfinished build directory."""
    shutil.rmtree(path, ignore_errors=True)


def read_history(version: ModelVersion) -> dict[str, Any] | None:
    """The diff ``ingest.score_history`` stored with a version, or None if none was."""
    path = version.path / HISTORY_FILE
    return json.loads(path.read_text()) if path.is_file() else None
