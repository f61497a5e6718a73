"""constraints.txt pins what the README installs, and this environment was installed with it."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def _declared() -> set[str]:
    """Every distribution pyproject.toml names: the core and every extra's (not our own)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    names = {canonicalize_name(Requirement(r).name) for r in reqs}
    return names - {canonicalize_name(project["name"])}


def test_constraints__every_line_is_an_exact_pin_and_every_dependency_is_pinned():
    lines = [
        x.strip()
        for x in (ROOT / "constraints.txt").read_text().splitlines()
        if x.strip() and not x.startswith("#")
    ]
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[^=\s]+", x) for x in lines), lines
    missing = _declared() - set(_pins())
    assert not missing, f"not pinned in constraints.txt: {sorted(missing)}"


def test_constraints__every_pin_satisfies_pyproject_and_is_what_is_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    for r in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
        req = Requirement(r)
        name = canonicalize_name(req.name)
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), (r, pins[name])
    # The README installs with -c constraints.txt: what runs these tests is what is pinned.
    for name in _declared():
        assert metadata.version(name) == pins[name], name
