"""Compaction of large chains in a process of its own.

Folding a chain of change sets into a new base decodes and encodes the whole partition:
for millions of keys, a second of pickling.  In the flow's process that second holds the
interpreter lock (records wait, whatever thread it runs in), so chains larger than
:data:`IN_PROCESS_BYTES` are compacted by ``python -m sluiceway.runtime.compactor``, a
fresh interpreter that opens the store, folds with
:func:`sluiceway.runtime.segments.fold_chain` (verify, fold, sign) and writes each new base in one
transaction, on another core.  A fresh interpreter, not :mod:`multiprocessing`: its
start methods import the user's ``__main__`` again (a script that runs its flow at import
would run it twice), and forking a threaded process is unsafe.

The flow does not wait for it (:func:`start_child`): checkpoints go on at their interval
while the child folds, and the store swaps the new base into every checkpoint whose chain
starts with the folded one, those saved meanwhile included; one child runs at a time.
The child opens the store like any other process (SQLite, or the store's lock in
PostgreSQL, serialises it with the flow's saves); if the flow's process dies meanwhile,
the child still finishes or leaves the old chain, both valid.  It verifies every segment
it folds and signs each new base with the flow's key ring, which it is given in its environment
(``SLUICEWAY_CHECKPOINT_KEY``: the ring's keys, one a line, signing key first) -- never
on its command line, which ``ps`` shows to every user, nor in the checkpoint directory.
For a store in PostgreSQL, DIR is its URL without the password, which the child finds in
``PGPASSWORD`` (libpq's own variable) when the URL held one.

Usage: ``SLUICEWAY_CHECKPOINT_KEY=... python -m sluiceway.runtime.compactor DIR FLOW RATIO
AFTER LARGER_THAN``; prints how many chains it folded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import IO, Final

from sluiceway.checkpoint.keys import ENV_KEY, ENV_KEY_FILE, KeyRing, load_keys
from sluiceway.checkpoint.store import CheckpointStore, is_url
from sluiceway.errors import CheckpointError
from sluiceway.runtime.segments import fold_chain

__all__ = ["IN_PROCESS_BYTES", "Child", "compact_in_child", "main", "start_child"]

IN_PROCESS_BYTES: Final = 4 * 1024 * 1024
"""Chains of at most this many bytes (base and deltas) are folded in the flow's own
checkpoint thread: starting an interpreter costs more than folding them."""

_TIMEOUT: Final = 600.0


class Child:
    """A compactor process under way (:func:`start_child`): :meth:`poll` it, :meth:`wait`
    for it, or :meth:`stop` it.  Its output goes to unnamed temporary files, never to a
    pipe it could fill while nobody reads it."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        out: IO[bytes],
        err: IO[bytes],
        what: str,
        started: float,
    ) -> None:
        self._process, self._out, self._err = process, out, err
        self._what = what
        self.started = started
        """When it was started, on the caller's clock (``Clock.monotonic()``)."""

    def poll(self, now: float) -> int | None:
        """How many chains it folded once it has ended, else None; ``now`` on the clock of
        ``started`` (a child running longer than the timeout is stopped, an error).

        Raises:
            CheckpointError: it failed or ran too long (the chains stay valid).
        """
        if self._process.poll() is None:
            if now - self.started <= _TIMEOUT:
                return None
            self.stop()
            raise CheckpointError(
                f"{self._what} took more than {_TIMEOUT:g} s in a child process; it was stopped"
            )
        return self._result()

    def wait(self) -> int:
        """Wait for it to end (blocking: from a worker thread); how many chains it folded.

        Raises:
            CheckpointError: it failed or ran longer than the timeout.
        """
        try:
            self._process.wait(timeout=_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.stop()
            raise CheckpointError(
                f"{self._what} took more than {_TIMEOUT:g} s in a child process; it was stopped"
            ) from None
        return self._result()

    def stop(self) -> None:
        """End it now (a crash inside its transaction leaves the old chain, valid)."""
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._close()

    def _result(self) -> int:
        try:
            self._out.seek(0)
            self._err.seek(0)
            out = self._out.read().decode("utf-8", "replace")
            err = self._err.read().decode("utf-8", "replace")
        finally:
            self._close()
        code = self._process.returncode
        if code != 0:
            raise CheckpointError(
                f"{self._what} failed in a child process (exit {code}): {err.strip()[-2000:]}"
            )
        return int(out.strip().splitlines()[-1])

    def _close(self) -> None:
        self._out.close()
        self._err.close()


def start_child(
    directory: str | os.PathLike[str],
    flow: str,
    keys: KeyRing | None,
    *,
    ratio: float,
    after: int,
    larger_than: int,
    now: float = 0.0,
) -> Child:
    """Start the compactor in a child interpreter, without waiting for it.  ``keys``: the
    flow's key ring, handed to the child in its environment; ``now``: the caller's clock,
    for :meth:`Child.poll`'s timeout.

    Raises:
        CheckpointError: no key to hand it, or the interpreter cannot be started.
    """
    what = f"compacting the checkpoints of flow {flow!r} in {_shown(directory)}"
    if keys is None:
        raise CheckpointError(f"{what} needs the checkpoint key, and none is available")
    package = Path(__file__).resolve().parents[2]  # the directory holding sluiceway/
    path = os.pathsep.join(p for p in (str(package), os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if k != ENV_KEY_FILE}
    env["PYTHONPATH"] = path
    # The ring as its text form: the same keys, whatever source the flow loaded them from.
    env[ENV_KEY] = "\n".join(k.secret.decode("utf-8") for k in keys.keys)
    location = os.fspath(directory)
    if is_url(location):  # a PostgreSQL store: its password goes where libpq reads it
        from sluiceway.checkpoint.postgres import redacted  # noqa: PLC0415 - optional

        location, password = redacted(location)
        if password is not None:
            env["PGPASSWORD"] = password
    command = [
        sys.executable,
        "-m",
        "sluiceway.runtime.compactor",
        location,
        flow,
        repr(ratio),
        str(after),
        str(larger_than),
    ]
    # Closed by the Child once it has read them (they outlive this call).
    out = tempfile.TemporaryFile()  # noqa: SIM115
    err = tempfile.TemporaryFile()  # noqa: SIM115
    try:
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        out.close()
        err.close()
        raise CheckpointError(
            f"{what} failed: could not run {sys.executable} -m sluiceway.runtime.compactor: {exc}"
        ) from exc
    return Child(process, out, err, what, now)


def _shown(directory: str | os.PathLike[str]) -> str:
    """The store for messages: a URL without its password."""
    location = os.fspath(directory)
    if not is_url(location):
        return location
    from sluiceway.checkpoint.postgres import redacted  # noqa: PLC0415 - optional

    return redacted(location)[0]


def compact_in_child(
    directory: str | os.PathLike[str],
    flow: str,
    keys: KeyRing | None,
    *,
    ratio: float,
    after: int,
    larger_than: int,
) -> int:
    """Run the compactor in a child interpreter and wait for it (blocking: call it from a
    worker thread); returns how many chains it folded.  ``keys``: the flow's key ring,
    handed to the child in its environment.

    Raises:
        CheckpointError: the child failed (its error output is in the message).
    """
    child = start_child(directory, flow, keys, ratio=ratio, after=after, larger_than=larger_than)
    return child.wait()


def main(argv: list[str]) -> int:
    """The child's entry: compact, print the count."""
    directory, flow, ratio, after, larger_than = argv
    keys = load_keys(checkpoint_dir=directory, create=False)  # from the environment
    with CheckpointStore(directory) as store:
        n = store.compact(
            flow,
            partial(fold_chain, keys, flow),
            ratio=float(ratio),
            after=int(after),
            larger_than=int(larger_than),
        )
    print(n)  # noqa: T201 - the answer to the parent
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
