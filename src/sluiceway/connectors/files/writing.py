"""Writing files: the JSON Lines sink (append or overwrite; with checkpoints, a restart
truncates the file back to the length of the last checkpoint)."""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
from typing import IO, Any, Literal

from sluiceway.core.contract import PartialWriteError, Sink, SinkContext
from sluiceway.core.messages import Batch
from sluiceway.errors import CheckpointError, short_repr

__all__ = ["JsonLinesSink", "WriteMode"]

WriteMode = Literal["append", "overwrite"]
"""How :class:`JsonLinesSink` opens an existing file: add to its end, or start empty."""


def _to_json(value: Any) -> Any:
    """``json.dumps`` fallback: ``to_dict()``, then dataclass fields, then ``str``."""
    if isinstance(value, type):
        return str(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def _open_for_writing(path: str, mode: WriteMode, encoding: str) -> IO[bytes]:
    """Open ``path``; when appending after a torn last line, end that line first."""
    if mode == "overwrite":
        return open(path, "wb")
    f = open(path, "a+b")  # noqa: SIM115 - the sink closes it in close()
    try:
        if os.fstat(f.fileno()).st_size:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write("\n".encode(encoding))
                f.flush()
    except BaseException:
        f.close()
        raise
    return f


def _open_truncated(path: str, length: int) -> IO[bytes]:
    """Open ``path`` for appending after cutting it back to ``length`` bytes."""
    try:
        f = open(path, "r+b")  # noqa: SIM115 - the sink closes it in close()
    except FileNotFoundError:
        raise CheckpointError(
            f"sinks.JsonLines({path}): the checkpoint recorded {length} bytes written, "
            "but the file is gone"
        ) from None
    size = os.fstat(f.fileno()).st_size
    if size < length:
        f.close()
        raise CheckpointError(
            f"sinks.JsonLines({path}): the checkpoint recorded {length} bytes written, "
            f"but the file has only {size}; was it truncated or replaced?"
        )
    f.truncate(length)
    f.seek(length)
    return f


class JsonLinesSink(Sink):
    r"""Writes one JSON line per record (``sw.sinks.JsonLines``).

    Each micro-batch is written and flushed at once.  Objects with a ``to_dict()``
    method (such as :class:`~sluiceway.policies.DeadLetterRecord`) and other dataclasses
    are written as JSON objects, any other value JSON cannot represent as ``str(value)``.
    Only whole lines ever reach the file: a record that cannot be serialized at all (a
    dict with tuple keys, a cycle) raises
    :class:`~sluiceway.core.contract.PartialWriteError` after the records before it
    were written, so the sink's error policy handles exactly that record.

    With checkpoints on, the sink is **exactly-once**: at each barrier it flushes and
    fsyncs the file and stores its length in the checkpoint; a restart from that
    checkpoint first truncates the file to that length (what came after is written
    again by the replay).  A reader following the file while the flow runs, or reading
    it after a run that failed, may see lines past the last checkpoint that the next run
    takes back; once a run has ended or stopped, the file holds exactly the records of
    its final checkpoint.

    Args:
        path: the file to write.
        mode: ``"append"`` (default) adds to an existing file; ``"overwrite"`` empties
            it at ``open`` of a fresh run only.  A run that resumes from a checkpoint
            never erases what earlier runs wrote: a flow's sink is cut back to the
            checkpoint's length, and a dead-letter sink (not part of the checkpoint)
            appends.  When appending to a file whose last line lacks its newline (a torn
            write), a newline is added first so records never merge.
        encoding: the text encoding of the file.

    Raises:
        ValueError: an unknown ``mode`` or encoding.

    >>> import os, tempfile, sluiceway as sw
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "out.jsonl")
    ...     flow = sw.Flow("write")
    ...     flow.source(sw.sources.Iterable([{"id": 1}, "two"])).sink(sw.sinks.JsonLines(path))
    ...     _ = sw.testing.run_flow(flow)
    ...     with open(path) as f:
    ...         print(f.read(), end="")
    {"id": 1}
    "two"
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: WriteMode = "append",
        encoding: str = "utf-8",
    ) -> None:
        if mode not in ("append", "overwrite"):
            raise ValueError(f"sinks.JsonLines mode must be 'append' or 'overwrite', got {mode!r}")
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(
                f"sinks.JsonLines: unknown encoding {encoding!r}; try 'utf-8'"
            ) from None
        self._path = os.fspath(path)
        self._mode: WriteMode = mode
        self._encoding = encoding
        self._file: IO[bytes] | None = None
        self._restore_to: int | None = None

    exactly_once = True

    async def open(self, ctx: SinkContext) -> None:
        """Open (or create) the file for writing; when restarting from a checkpoint, cut
        it back to the length that checkpoint recorded.

        Raises:
            OSError: the file cannot be opened.
            CheckpointError: the file is shorter than the checkpoint recorded.
        """
        restore_to, self._restore_to = self._restore_to, None  # for this run only
        if restore_to is not None:
            self._file = _open_truncated(self._path, restore_to)
        elif ctx.restored:  # a dead-letter sink of a resumed flow: keep what it holds
            self._file = _open_for_writing(self._path, "append", self._encoding)
        else:
            self._file = _open_for_writing(self._path, self._mode, self._encoding)

    def restore(self, state: Any) -> None:
        """Restart from a checkpoint that recorded ``{"length": n}``: cut back to ``n``."""
        if not (isinstance(state, dict) and isinstance(state.get("length"), int)):
            raise CheckpointError(
                f"{self.describe()}: checkpoint state must be {{'length': bytes}}, got "
                f"{short_repr(state)}"
            )
        self._restore_to = state["length"]

    async def pre_commit(self, checkpoint_id: int | None) -> Any:
        """Flush and fsync; the checkpoint records the file's length."""
        f = self._file
        if f is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        f.flush()
        os.fsync(f.fileno())
        return {"length": f.tell()}

    async def write(self, batch: Batch) -> None:
        """Write every record of ``batch`` as a line, then flush.

        Raises:
            PartialWriteError: record ``written`` could not be serialized; the records
                before it are in the file, it and the ones after it are not.
            OSError: the file could not be written.
        """
        f = self._file
        if f is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        encoding = self._encoding
        chunks: list[bytes] = []
        for i, value in enumerate(batch.values):
            try:
                line = json.dumps(value, default=_to_json, ensure_ascii=False)
                chunks.append(f"{line}\n".encode(encoding))
            except Exception as exc:  # pinned to this record, see PartialWriteError
                self._put(f, chunks)
                raise PartialWriteError(i, exc) from exc
        self._put(f, chunks)

    @staticmethod
    def _put(f: IO[bytes], chunks: list[bytes]) -> None:
        if chunks:
            f.write(b"".join(chunks))
            f.flush()

    async def close(self) -> None:
        """Flush and close the file (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def describe(self) -> str:
        """``JsonLines(<path>)``."""
        return f"JsonLines({self._path})"
