"""The pinned test environment (``requirements/dev-constraints.txt``) pins every package
the dev extras name, so a release elsewhere cannot change what ``scripts/test`` installs;
the package's own dependency ranges stay open for users."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    """The normalised project name of a requirement (PEP 503)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "dev-constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line!r}"
            pins[_name(name)] = version.strip()
    return pins


def test_every_dev_dependency_is_pinned_exactly() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dev = project["project"]["optional-dependencies"]["dev"]
    build = project["build-system"]["requires"]
    missing = sorted({_name(r) for r in [*dev, *build]} - set(_pins()))
    assert not missing, f"add with scripts/refresh-pins: {missing}"


def test_the_package_itself_keeps_open_ranges() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    pinned = [r for name, reqs in extras.items() if name != "bench" for r in reqs if "==" in r]
    assert not pinned, f"users' ranges must stay open (pins belong in requirements/): {pinned}"
