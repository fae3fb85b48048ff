"""Run a keyed-state test suite on every state backend: ``pytestmark =
pytest.mark.usefixtures("keyed_backend")`` in a module runs each of its tests once on the
in-memory dict and once on ``sw.state.OnDisk`` with a cache of 3 keys (so that nearly every
batch writes back, evicts and reads keys from the file again)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import sluiceway as sw
from sluiceway.operators import keyed_state

__all__ = ["keyed_backend"]


@pytest.fixture(params=["memory", "disk"])
def keyed_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The engine's default keyed-state backend for one test (operators and flows that
    name no ``state=``); files under the test's ``tmp_path`` (steps built by hand, without
    a flow, are never closed)."""
    before = keyed_state.DEFAULT_BACKEND
    if request.param == "disk":
        keyed_state.DEFAULT_BACKEND = sw.state.OnDisk(path=tmp_path, cache_keys=3)
    try:
        yield request.param
    finally:
        keyed_state.DEFAULT_BACKEND = before
