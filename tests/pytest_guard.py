"""A pytest plugin (loaded by ``conftest.py``) guarding against a CPython 3.11.7 bug.

python/cpython#106905 (fixed in 3.11.8): the AST module keeps one recursion counter per
interpreter, so an ``ast.parse`` that runs *inside* another one corrupts it and the outer
call raises ``SystemError: AST constructor recursion depth mismatch``.  pytest parses
source with ``ast.parse`` while it formats a failing test's traceback; the garbage
collector can run during that parse, and a finalizer it runs (asyncio's "Task exception
was never retrieved" for a flow a failing test left behind) formats a traceback too, which
parses again.  The SystemError escapes as an INTERNALERROR and ends the whole session, so
one failing test hid every result after it.  The garbage collector is therefore paused
while a report is made: finalizers run afterwards, outside any parse.
"""

from __future__ import annotations

import gc
from collections.abc import Generator
from typing import Any

import pytest

__all__ = ["pytest_runtest_makereport"]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport() -> Generator[None, Any, Any]:
    """Make each test report (and format its traceback) with the garbage collector paused."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return (yield)
    finally:
        if enabled:
            gc.enable()
