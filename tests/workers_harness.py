"""Helpers for tests that run sluiceway workers as real processes (``python -m sluiceway
run``): the environment and command line of a worker, a child's stderr read in a thread
for waiting on lines, whether a pid is still alive, workers started by hand in working
directories of their own, and a ``read_committed`` reader of their output topic.

Used by test_workers.py (stateless flows), test_workers_keyed.py and test_repartition.py
(keyed flows).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SRC", "Lines", "Output", "Workers", "alive", "run_cmd", "worker_env"]

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


class Workers:
    """Worker processes of ``target`` (``path:function``) started by hand, each in a working
    directory of its own, sharing one checkpoint directory (``<root>/checkpoints``; none
    with ``checkpoints=False``), with ``args`` after it; stderr to
    ``<root>/worker-<id>/stderr.log``."""

    def __init__(
        self, root: Path, env: dict[str, str], target: str, *args: str, checkpoints: bool = True
    ) -> None:
        self.root = root
        self.env = env
        self.target = target
        self.args = ("--checkpoint-dir", str(root / "checkpoints"), *args) if checkpoints else args
        self.checkpoints = root / "checkpoints"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, wid: str) -> None:
        work = self.root / f"worker-{wid}"
        work.mkdir()
        with (work / "stderr.log").open("wb") as err:
            self.procs[wid] = subprocess.Popen(
                run_cmd(self.target, *self.args),
                cwd=work,
                env={**self.env, "SLUICEWAY_WORKER_ID": wid},
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        print(f"started worker {wid} (pid {self.procs[wid].pid})")

    def running(self) -> list[str]:
        return [w for w, p in self.procs.items() if p.poll() is None]

    def stop(self, wid: str, within: float = 60.0) -> int:
        """SIGINT (Ctrl-C): a graceful stop; its exit code."""
        self.procs[wid].send_signal(signal.SIGINT)
        return self.procs[wid].wait(timeout=within)

    def stop_running(self, within: float = 60.0) -> dict[str, int]:
        """SIGINT to every running worker at once, then each one's exit code: no worker
        takes over the partitions of one stopping before it (at the end of a test, with
        the output complete, that handover would only cost time)."""
        running = self.running()
        for wid in running:
            self.procs[wid].send_signal(signal.SIGINT)
        return {wid: self.procs[wid].wait(timeout=within) for wid in running}

    def stderr(self, wid: str, lines: int = 25) -> str:
        text = (self.root / f"worker-{wid}" / "stderr.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def report(self) -> str:
        return "\n".join(
            f"--- worker {w} (exit {p.poll()}):\n{self.stderr(w)}" for w, p in self.procs.items()
        )

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


class Output:
    """A one-partition output topic of JSON rows read with ``read_committed`` in a thread,
    as it grows; ``quiet`` is the librdkafka logger to use."""

    def __init__(self, bootstrap: str, topic: str, quiet: Any) -> None:
        import confluent_kafka as ck  # noqa: PLC0415

        self.consumer = ck.Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "logger": quiet,
            }
        )
        self.consumer.assign([ck.TopicPartition(topic, 0, ck.OFFSET_BEGINNING)])
        self.rows: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True, name="output-reader")
        self.thread.start()

    def _read(self) -> None:
        while not self.stopping.is_set():
            msgs = self.consumer.consume(1000, 0.2)
            rows = [json.loads(m.value()) for m in msgs if m.error() is None]
            if rows:
                with self.cond:
                    self.rows.extend(rows)
                    self.cond.notify_all()

    def count(self, kind: str) -> int:
        """How many rows of this ``kind`` were committed so far."""
        with self.cond:
            return sum(1 for r in self.rows if r["kind"] == kind)

    def runs(self) -> int:
        """How many running-total rows (``kind`` ``run``) were committed so far."""
        return self.count("run")

    def wait(self, what: str, done: Callable[[], bool], within: float) -> None:
        with self.cond:
            ok = self.cond.wait_for(done, within)
        assert ok, f"timed out after {within:.0f} s waiting for {what}"

    def wait_for(self, n: int, kind: str, within: float) -> None:
        """Until ``n`` rows of this ``kind`` were committed."""
        self.wait(f"{n} {kind!r} outputs", lambda: self.count(kind) >= n, within)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)
        self.consumer.close()
