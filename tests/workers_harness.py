"""Helpers for tests that run sluiceway workers as real processes (``python -m sluiceway
run``): the environment and command line of a worker, a child's stderr read in a thread
for waiting on lines, and whether a pid is still alive.

Used by test_workers.py (stateless flows) and test_workers_keyed.py (keyed flows).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["SRC", "Lines", "alive", "run_cmd", "worker_env"]

SRC = Path(__file__).resolve().parents[1] / "src"


def worker_env(**extra: str) -> dict[str, str]:
    """This environment without any worker settings, importing this checkout's sluiceway,
    plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEWAY_WORKER")}
    env["PYTHONPATH"] = str(SRC)
    return {**env, **extra}


def run_cmd(*args: str) -> list[str]:
    """``python -m sluiceway run ARGS``."""
    return [sys.executable, "-m", "sluiceway", "run", *args]


class Lines:
    """A child's stderr, read in a thread, for waiting on lines."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self.thread.start()

    def _read(self, stream: Any) -> None:
        with stream:
            for line in stream:
                with self.cond:
                    self.lines.append(line)
                    self.cond.notify_all()
        with self.cond:
            self.lines.append("")  # the end
            self.cond.notify_all()

    def wait_for(self, pattern: str, count: int = 1, within: float = 60.0) -> list[re.Match[str]]:
        rx = re.compile(pattern)

        def found() -> list[re.Match[str]]:
            return [m for line in self.lines if (m := rx.search(line))]

        with self.cond:
            ok = self.cond.wait_for(lambda: len(found()) >= count or "" in self.lines, within)
            hits = found()
        assert ok, f"timed out waiting for {pattern!r} in:\n{''.join(self.lines)}"
        assert len(hits) >= count, f"no {pattern!r} in:\n{''.join(self.lines)}"
        return hits

    def text(self) -> str:
        self.thread.join(timeout=30)
        return "".join(self.lines)


def alive(pid: int) -> bool:
    """Is ``pid`` a process that has not exited (a zombie counts as exited)?"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
