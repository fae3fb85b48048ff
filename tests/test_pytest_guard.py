"""A failing test must never crash the test session (see ``pytest_guard.py``).

The inner session fails one test while a finalizer that formats a traceback (as asyncio's
"Task exception was never retrieved" does) is collected during pytest's own ``ast.parse``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

FAILING = '''
import ast, gc

class Noisy:
    """Cyclic garbage whose finalizer parses source, as traceback formatting does, and
    leaves another one behind, so the collector always has one to finalize."""
    alive = True
    def __init__(self):
        self.me = self
    def __del__(self):
        ast.parse("x = [1, 2, 3]\\n" * 5)
        if Noisy.alive:
            Noisy()

def test_fails_with_garbage_around():
    gc.set_threshold(5, 1, 1)       # collect at almost every allocation
    import conftest
    conftest.Noisy = Noisy
    Noisy()
    assert 1 == 2
'''


# The garbage is finite, as in life: it stops once the failure has been reported.
CONFTEST = """
import gc
Noisy = None

def pytest_runtest_logreport(report):
    if report.when == "call" and Noisy is not None:
        Noisy.alive = False
        gc.collect()
"""


def _inner(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(FAILING, encoding="utf-8")
    (tmp_path / "conftest.py").write_text(CONFTEST, encoding="utf-8")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "default",
            *extra,
            str(tmp_path / "test_inner.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
        env={"PYTHONPATH": f"{TESTS}:{tmp_path}", "PATH": "/usr/bin:/bin"},
    )


def test_a_failing_test_is_reported_not_an_internal_error(tmp_path: Path) -> None:
    done = _inner(tmp_path, "-p", "pytest_guard")
    assert "INTERNALERROR" not in done.stdout + done.stderr, done.stdout[-3000:]
    assert done.returncode == 1, done.stdout[-3000:]  # 1: tests failed (3 would be internal)
    assert "1 failed" in done.stdout


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="the bug is CPython 3.11.7's")
def test_without_the_guard_this_interpreter_crashes(tmp_path: Path) -> None:
    """The control: the inner test really trips the bug here, so the test above can fail."""
    done = _inner(tmp_path)
    assert "AST constructor recursion depth mismatch" in done.stdout + done.stderr
