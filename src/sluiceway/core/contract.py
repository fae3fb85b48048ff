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

With checkpoints on (see ``docs/checkpoints.md``), a source's :meth:`Source.position` is
stored with every checkpoint and handed back to :meth:`Source.restore` when the flow
restarts; :meth:`Source.commit` tells it a checkpoint is complete (a broker source acks
there).  A sink takes part in a two-phase commit: :meth:`Sink.pre_commit` at the
barrier makes everything written so far durable and returns what :meth:`Sink.restore`
needs to go back exactly there; :meth:`Sink.commit` follows once the checkpoint is
stored.  A sink that does nothing of the kind is at-least-once.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sluiceway.core.messages import Batch
from sluiceway.errors import BadInputError, redact
from sluiceway.time import Clock

__all__ = [
    "OPEN_TIMEOUT",
    "PartialWriteError",
    "Sink",
    "SinkContext",
    "Source",
    "SourceContext",
    "check_open_timeout",
    "open_limit",
    "redact",
]

OPEN_TIMEOUT = 10.0
"""Default seconds a broker connector keeps trying to reach its server at ``open``.

A server that is not there when the flow starts is more often a wrong address or a
server not started than an outage, so the start fails fast (as Kafka clients' bootstrap
does) rather than after the ``reconnect_timeout`` meant for outages mid-run; pass
``open_timeout=None`` to wait as long as ``reconnect_timeout``, e.g. for a broker that
starts beside the flow."""


def check_open_timeout(value: object, what: str) -> float | None:
    """A connector's ``open_timeout`` argument: a finite number of seconds > 0, or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(
            f"{what} open_timeout must be a finite number > 0 seconds or None (as long as "
            f"reconnect_timeout), got {value!r}"
        )
    return float(value)


def open_limit(
    open_timeout: float | None, reconnect_timeout: float | None
) -> tuple[float | None, str]:
    """How long to keep trying to reach the server at ``open``, and the argument that says so.

    >>> open_limit(10.0, 60.0)
    (10.0, 'open_timeout')
    >>> open_limit(None, 60.0)
    (60.0, 'reconnect_timeout')
    >>> open_limit(10.0, 2.0)
    (2.0, 'reconnect_timeout')
    """
    if open_timeout is not None and (reconnect_timeout is None or open_timeout < reconnect_timeout):
        return open_timeout, "open_timeout"
    return reconnect_timeout, "reconnect_timeout"


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
    checkpointing: bool = False
    """True when the flow takes checkpoints."""


@dataclass(frozen=True, slots=True)
class SinkContext:
    """What a sink gets at ``open``: the flow's name, its own name and the clock, and
    whether the flow takes checkpoints (then :meth:`Sink.pre_commit`/:meth:`Sink.commit`
    are called)."""

    flow: str
    name: str
    clock: Clock
    checkpointing: bool = False
    restored: bool = False
    """True when the run resumes from a checkpoint: what earlier runs wrote must stay
    (a sink that empties its target on a fresh start must not do it now)."""
    sources: tuple[Source, ...] = ()
    """The flow's sources: a transactional sink that commits their positions together with
    its output (Kafka's consume-transform-produce) finds its own kind among them."""


class Source(ABC):
    """A source of records, pulled by the runtime in micro-batches."""

    async def open(self, ctx: SourceContext) -> None:  # noqa: B027 - optional hook
        """Prepare to read (open files, connect).  Called once before any pull."""

    @abstractmethod
    async def next_batch(self, max_records: int) -> Batch | None:
        """Up to ``max_records`` records that are ready now, or None at end of input."""

    def position(self) -> Any:
        """A JSON-able position from which reading could resume (None if unknown).

        Taken for every checkpoint between two batches: it must describe exactly the
        records handed out so far."""
        return None

    def restore(self, position: Any) -> None:
        """Resume from ``position`` (a :meth:`position` of an earlier run) at ``open``.

        Called before :meth:`open` when a flow restarts from a checkpoint.  A source that
        cannot go back to a position keeps this default, which refuses: a checkpointed
        flow needs replayable sources.
        """
        raise NotImplementedError(
            f"source {self.describe()} cannot resume from a checkpoint position"
        )

    @property
    def resumable(self) -> bool:
        """True when the source can go back to a position.  Default: it implements
        :meth:`restore`.  A source whose input can be read only once in this instance
        (an ``Iterable`` over a generator) overrides it: a flow with checkpoints refuses
        it at start, not at the restart that would need it."""
        return type(self).restore is not Source.restore

    event_time: bool = False
    """True when the source stamps its records with event time itself: its batches carry
    ``timestamps`` and ``watermarks`` (the watermark before each record), and
    :meth:`watermark` says where the watermark stands after a pull.  The flow then treats
    its stream as timestamped (windows may follow without ``with_timestamps``)."""

    def watermark(self) -> float | None:
        """The source's event-time watermark now (microseconds; None: none yet).  Read by
        the runtime after every pull of an ``event_time`` source, also an empty one, so a
        watermark may advance without records (an idle partition stops holding it back);
        a :class:`~sluiceway.core.messages.Watermark` goes downstream when it rose."""
        return None

    def hold(self, full: bool) -> None:  # noqa: B027 - optional hook
        """Backpressure news: ``full=True`` when the stage the source feeds has no room and
        the runtime stops pulling until it has; ``full=False`` when pulling resumes.  A
        broker source whose client prefetches in the background pauses its fetching
        here, so a saturated flow leaves the backlog in the broker."""

    async def commit(self, position: Any) -> None:  # noqa: B027 - optional hook
        """A checkpoint holding ``position`` is complete: records before it will never be
        asked for again (a broker source acknowledges them here)."""

    def stop_intake(self) -> bool:
        """A graceful stop (without checkpoints) has begun.

        Return True when the source holds records it has already *accepted* from
        producers -- a push source, which answered "accepted" to someone -- so that the
        runtime keeps pulling it until :meth:`next_batch` returns None (the source refuses
        new records from now on and ends once the accepted ones are handed over).  The
        default, False: the source is simply pulled no more (a pull waiting for input is
        cancelled; nothing is lost, it was never taken)."""
        return False

    async def redeliver_later(self, indices: Sequence[int], delay: float) -> None:
        """Hand records of the batch :meth:`next_batch` returned last back to the broker,
        to be delivered again after about ``delay`` seconds (``rate_limit(...,
        when_limited="reject")``).

        ``indices`` are positions in that batch.  The records must never be acknowledged
        by a later :meth:`commit` and must come back (a negative acknowledgement with a
        delay, a requeue after the delay, or left pending for a later claim); if the
        broker cannot be told now, leaving them unacknowledged is enough, since the broker
        redelivers what is never acknowledged.  Brokers without redelivery keep the
        default, which refuses: the flow then cannot use ``when_limited="reject"``."""
        raise NotImplementedError(
            f"source {self.describe()} cannot hand records back to its broker"
        )

    @property
    def can_redeliver(self) -> bool:
        """True when the source implements :meth:`redeliver_later`."""
        return type(self).redeliver_later is not Source.redeliver_later

    def shed(self, reason: str | None) -> None:  # noqa: B027 - optional hook
        """A load rule (``RejectAdmission``) asks the source to refuse new records from
        producers with ``reason``, or (None) to accept them again.  Only push sources take
        records from producers; the default ignores it (a pulled source is slowed by
        backpressure instead)."""

    def backlog(self) -> int | None:
        """How much input is waiting to be read, when the source knows (None: unknown):
        unread bytes for a file, pending messages for a broker.  Read by the metrics (the
        ``backlog`` of the source's operator), never on the hot path."""
        return None

    def partition_backlog(self) -> dict[str, int] | None:
        """The backlog per partition of the input, for a partitioned source (Kafka:
        ``{"topic:partition": lag}``); None when unknown.  Read by the metrics like
        :meth:`backlog` (``sluiceway_source_partition_backlog``)."""
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

    def progress(self) -> int | None:
        """While :meth:`write` is under way: how many records of its batch are written
        already (None, the default: unknown).

        Read only when a flow is cancelled in the middle of a write, for the inventory of
        :class:`~sluiceway.errors.FlowCancelledError`: a sink that writes record by record
        and counts them here is reported exactly; otherwise its whole batch counts as not
        flushed."""
        return None

    exactly_once: bool = False
    """True when the sink's pre-commit/commit/restore make its output exactly-once."""

    async def pre_commit(self, checkpoint_id: int | None) -> Any:
        """A checkpoint barrier reached the sink: make everything written so far durable
        and return what :meth:`restore` needs to go back to exactly this point (picklable).

        ``checkpoint_id`` is None for the final checkpoint of a flow whose input ended.
        The runtime never calls it while :meth:`commit` of this sink is running.
        Default: nothing (the sink is at-least-once)."""
        return None

    async def commit(self, checkpoint_id: int, state: Any) -> None:  # noqa: B027
        """The checkpoint for which :meth:`pre_commit` returned ``state`` is stored."""

    def committed(self, state: Any) -> bool:
        """At a restart, before :meth:`restore`: did :meth:`commit` run for the checkpoint
        whose :meth:`pre_commit` returned ``state``?  A sink whose commit cannot be redone
        later (a Kafka transaction is aborted when its producer dies) says False when the
        process died between storing that checkpoint and committing; the runtime then
        restores the checkpoint before it, and the replay writes the lost output again.
        Default True (a sink whose restore takes back what was written needs nothing)."""
        return True

    def restore(self, state: Any) -> None:  # noqa: B027 - optional hook
        """Called before :meth:`open` when the flow restarts from a checkpoint, with what
        :meth:`pre_commit` returned for it: undo anything written after that point."""

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
