"""``sluiceway run TARGET --workers N``: N worker processes of one flow, stopped together.

The supervisor is the process the user started.  It starts each worker as
``python -m sluiceway run TARGET ...`` -- exactly what starting N by hand does -- with
``SLUICEWAY_WORKER_ID`` = 0 .. N-1, each in a process group of its own (so a Ctrl-C on
the terminal reaches the supervisor once, not every worker twice), and then:

* forwards SIGINT and SIGTERM to every worker (the first drains, a second forces, as for
  one flow);
* when a worker fails (a non-zero exit before any stop was asked), says which and stops
  the others gracefully: the exit code is 1;
* gives each worker the read end of a pipe whose write end only the supervisor holds: if
  the supervisor dies (even by SIGKILL) the pipe reaches end-of-file and every worker
  stops gracefully by itself -- no orphans.

No sleeping and no polling: the supervisor waits on the workers' exits and on signals in
one asyncio loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from sluiceway.console import say
from sluiceway.scaleout.worker import ENV_SUPERVISOR_FD, ENV_WORKER_ID, ENV_WORKERS

__all__ = ["WorkerCommand", "supervise", "watch_supervisor"]

_EXIT_FAILED = 1


@dataclass(frozen=True, slots=True)
class WorkerCommand:
    """How to start worker ``index``: its command line (after ``python``)."""

    index: int
    args: tuple[str, ...]


def _say(text: str) -> None:
    """One line on stderr, as the command's own messages are."""
    say(f"sluiceway: {text}")


async def _supervise(commands: Sequence[WorkerCommand]) -> int:
    loop = asyncio.get_running_loop()
    read_end, write_end = os.pipe()
    procs: dict[int, asyncio.subprocess.Process] = {}
    # The workers start with SIGINT and SIGTERM blocked (the mask is inherited through
    # exec), so a signal forwarded before a worker can handle it waits instead of killing
    # it mid-import; the worker lets them through once it holds them (hold_signals).
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    stopping: list[int] = []  # signals forwarded so far

    def forward(signum: int) -> None:
        running = [p for p in procs.values() if p.returncode is None]
        stopping.append(signum)
        for p in running:  # first: nothing said after it can keep it from happening
            p.send_signal(signum)
        if len(stopping) == 1:
            _say(f"stopping {len(running)} worker(s) ({signal.Signals(signum).name})")

    # The handlers are in place before the mask is lifted, so a Ctrl-C that came while
    # the workers were starting (or right after "started") is forwarded to every one of
    # them once all exist -- never the default KeyboardInterrupt of this process (exit
    # 130, the workers left to notice the supervisor is gone).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    for signum in stop_signals:
        loop.add_signal_handler(signum, forward, signum)
    try:
        for cmd in commands:
            env = {
                **os.environ,
                ENV_WORKER_ID: str(cmd.index),
                ENV_WORKERS: str(len(commands)),
                ENV_SUPERVISOR_FD: str(read_end),
            }
            procs[cmd.index] = await asyncio.create_subprocess_exec(
                sys.executable,
                *cmd.args,
                env=env,
                pass_fds=(read_end,),
                start_new_session=True,
            )
    except BaseException:
        for p in procs.values():
            p.kill()
        for signum in stop_signals:
            loop.remove_signal_handler(signum)
        os.close(write_end)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(read_end)
    pids = ", ".join(f"{i}: pid {p.pid}" for i, p in procs.items())
    _say(f"started {len(procs)} workers ({pids})")

    failed: list[str] = []
    codes: dict[int, int] = {}
    try:
        waits = {asyncio.ensure_future(p.wait()): i for i, p in procs.items()}
        pending = set(waits)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = waits[fut]
                code = codes[i] = fut.result()
                if code != 0 and not stopping:
                    failed.append(f"worker {i} (pid {procs[i].pid}) failed with exit code {code}")
                    if pending:
                        _say(f"{failed[-1]}; stopping the other workers")
                        forward(signal.SIGTERM)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        os.close(write_end)
    if failed:
        _say("; ".join(failed))
        return _EXIT_FAILED
    bad = {i: c for i, c in codes.items() if c != 0}
    if bad:
        _say(
            "stopped; "
            + ", ".join(f"worker {i} exited with code {c}" for i, c in sorted(bad.items()))
        )
        return max(bad.values()) if all(c > 128 for c in bad.values()) else _EXIT_FAILED
    return 0


def supervise(commands: Sequence[WorkerCommand]) -> int:
    """Run the workers until all have ended; the exit code for the command (0: every
    worker ended well; 1: one failed, named on stderr; 128 + N: a second signal N forced
    the stop)."""
    return asyncio.run(_supervise(commands))


def watch_supervisor() -> None:
    """In a worker: stop gracefully (SIGTERM to this process) once the supervisor is gone.

    Does nothing in a process not started by ``--workers``."""
    fd_text = os.environ.get(ENV_SUPERVISOR_FD)
    if not fd_text:
        return
    import threading  # noqa: PLC0415 - only workers need it

    fd = int(fd_text)

    def wait() -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            return
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, daemon=True, name="supervisor-watch").start()
