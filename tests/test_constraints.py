"""constraints.txt pins what the README installs, and this environment was installed with it."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _lines() -> list[str]:
    """constraints.txt without its comment and blank lines (a pin line is nothing but the pin)."""
    text = (ROOT / "constraints.txt").read_text().splitlines()
    return [x.strip() for x in text if x.strip() and not x.startswith("#")]


def _pins() -> dict[str, str]:
    return {canonicalize_name(n): v for n, v in (x.split("==") for x in _lines())}


def _requirements() -> list[Requirement]:
    """Every requirement pyproject.toml names: the core's and every extra's (not our own)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    own = canonicalize_name(project["name"])
    return [r for r in map(Requirement, reqs) if canonicalize_name(r.name) != own]


def _declared() -> set[str]:
    return {canonicalize_name(r.name) for r in _requirements()}


def test_constraints__every_line_is_an_exact_pin_and_every_dependency_is_pinned():
    lines = _lines()
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[^=\s]+", x) for x in lines), lines
    missing = _declared() - set(_pins())
    assert not missing, f"not pinned in constraints.txt: {sorted(missing)}"


def test_constraints__every_pin_satisfies_pyproject_and_is_what_is_installed():
    pins = _pins()
    for req in _requirements():
        pin = pins[canonicalize_name(req.name)]
        assert req.specifier.contains(pin, prereleases=True), (str(req), pin)
    # The README installs with -c constraints.txt: what runs these tests is what is pinned.
    for name in _declared():
        assert metadata.version(name) == pins[name], name
