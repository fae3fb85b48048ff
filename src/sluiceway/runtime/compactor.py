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

The child reads the store file like any other process (SQLite serialises it with the
flow's saves); if the flow's process dies meanwhile, the child still finishes or leaves
the old chain, both valid.  It verifies every segment it folds and signs each new base
with the flow's key ring, which it is given in its environment
(``SLUICEWAY_CHECKPOINT_KEY``: the ring's keys, one a line, signing key first) -- never
on its command line, which ``ps`` shows to every user, nor in the checkpoint directory.

Usage: ``SLUICEWAY_CHECKPOINT_KEY=... python -m sluiceway.runtime.compactor DIR FLOW RATIO
AFTER LARGER_THAN``; prints how many chains it folded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Final

from sluiceway.checkpoint.keys import ENV_KEY, ENV_KEY_FILE, KeyRing, load_keys
from sluiceway.checkpoint.store import CheckpointStore
from sluiceway.errors import CheckpointError
from sluiceway.runtime.segments import fold_chain

__all__ = ["IN_PROCESS_BYTES", "compact_in_child", "main"]

IN_PROCESS_BYTES: Final = 4 * 1024 * 1024
"""Chains of at most this many bytes (base and deltas) are folded in the flow's own
checkpoint thread: starting an interpreter costs more than folding them."""

_TIMEOUT: Final = 600.0


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
    if keys is None:
        raise CheckpointError(
            f"compacting the checkpoints of flow {flow!r} in {directory} needs the "
            "checkpoint key, and none is available"
        )
    package = Path(__file__).resolve().parents[2]  # the directory holding sluiceway/
    path = os.pathsep.join(p for p in (str(package), os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if k != ENV_KEY_FILE}
    env["PYTHONPATH"] = path
    # The ring as its text form: the same keys, whatever source the flow loaded them from.
    env[ENV_KEY] = "\n".join(k.secret.decode("utf-8") for k in keys.keys)
    command = [
        sys.executable,
        "-m",
        "sluiceway.runtime.compactor",
        os.fspath(directory),
        flow,
        repr(ratio),
        str(after),
        str(larger_than),
    ]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            env=env,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise CheckpointError(
            f"compacting the checkpoints of flow {flow!r} in {directory} failed: could not "
            f"run {sys.executable} -m sluiceway.runtime.compactor: {exc}"
        ) from exc
    if done.returncode != 0:
        raise CheckpointError(
            f"compacting the checkpoints of flow {flow!r} in {directory} failed in a child "
            f"process (exit {done.returncode}): {done.stderr.strip()[-2000:]}"
        )
    return int(done.stdout.strip().splitlines()[-1])


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
