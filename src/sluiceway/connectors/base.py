"""The plug points: :class:`Source` and :class:`Sink`.

Checkpoints, connectors and tests all meet this one shape.

A source is *pulled*: the runtime calls :meth:`Source.next_batch` only when the stage it
feeds has room, asking for at most ``max_records``.  It returns what is ready now (at least
one record; it may wait for the first), or ``None`` at the end of its input.  It never waits
to fill a batch.  ``next_batch`` must be *cancellation-safe*: if the awaiting task is
cancelled (a stop request), no record may be lost -- a record is either returned or
still there for the next call.

A sink receives micro-batches through :meth:`Sink.write`.  A sink that writes record by
record and fails part-way raises :class:`PartialWriteError` so that the records before
the failure are not written twice when the error policy retries.

Both get a context at ``open`` with the flow's name, their own operator name and the clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sluiceway.errors import BadInputError
from sluiceway.runtime.messages import Batch
from sluiceway.time import Clock

__all__ = ["PartialWriteError", "Sink", "SinkContext", "Source", "SourceContext"]


@dataclass(frozen=True, slots=True)
class SourceContext:
    """What a source gets at ``open``.

    Attributes:
        flow: the flow's name.
        name: the source's operator name (use it in messages).
        clock: the flow's clock; wait on it, never on ``asyncio.sleep``.
        bad_input: await it with a :class:`~sluiceway.errors.BadInputError` for a record
            that cannot be decoded.  Under the ``fail`` policy it raises (stopping the
            flow); under ``DeadLetter`` it writes the dead letter and returns, and the
            source goes on with the next record.
        fails_on_bad_input: True when ``bad_input`` raises.  A source that already holds
            good records should then return them first and report the bad one on the
            next call, so the flow stops at a position it can resume from.
    """

    flow: str
    name: str
    clock: Clock
    bad_input: Callable[[BadInputError], Awaitable[None]]
    fails_on_bad_input: bool


@dataclass(frozen=True, slots=True)
class SinkContext:
    """What a sink gets at ``open``: the flow's name, its own name and the clock."""

    flow: str
    name: str
    clock: Clock


class Source(ABC):
    """A source of records, pulled by the runtime in micro-batches."""

    async def open(self, ctx: SourceContext) -> None:  # noqa: B027 - optional hook
        """Prepare to read (open files, connect).  Called once before any pull."""

    @abstractmethod
    async def next_batch(self, max_records: int) -> Batch | None:
        """Up to ``max_records`` records that are ready now, or None at end of input."""

    def position(self) -> Any:
        """A JSON-able position from which reading could resume (None if unknown)."""
        return None

    def backlog(self) -> int | None:
        """How much input is waiting to be read, when the source knows (None: unknown):
        unread bytes for a file, pending messages for a broker.  Read by the metrics (the
        ``backlog`` of the source's operator), never on the hot path."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources.  Called once, also after errors and cancellation."""

    def describe(self) -> str:
        """A short description for graphs and logs."""
        return type(self).__name__


class Sink(ABC):
    """A destination of records, written in micro-batches."""

    async def open(self, ctx: SinkContext) -> None:  # noqa: B027 - optional hook
        """Prepare to write.  Called once before the first write."""

    @abstractmethod
    async def write(self, batch: Batch) -> None:
        """Write every record of ``batch`` (``batch.values``)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release resources.  Called once, also after errors."""

    def describe(self) -> str:
        """A short description for graphs and logs."""
        return type(self).__name__


class PartialWriteError(Exception):
    """A sink wrote ``written`` records of a batch, then failed on the next one.

    The error policy then handles exactly the failed record (retry it, dead-letter it, or
    stop naming it) and the sink is given the remaining records afterwards.
    """

    def __init__(self, written: int, cause: BaseException) -> None:
        self.written = written
        self.cause = cause
        super().__init__(f"write failed after {written} records: {cause!r}")
