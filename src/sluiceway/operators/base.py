"""The step kernel every operator is built on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

from sluiceway.core.channel import ChannelWriter, Overflow
from sluiceway.core.messages import Barrier, Batch, Control
from sluiceway.core.query import KeyState
from sluiceway.metrics.registry import OperatorMetrics
from sluiceway.operators.errors import ErrorHandler
from sluiceway.time import Clock

__all__ = ["BuildContext", "OpSpec", "SendStep", "Step", "apply_each", "without"]


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What a spec needs to build its step."""

    flow: str
    name: str
    clock: Clock
    metrics: OperatorMetrics
    errors: ErrorHandler | None
    max_batch_size: int


class OpSpec:
    """A logical operator: frozen configuration that builds a :class:`Step`.

    ``boundary`` operators get a channel in front of them and start a new stage (fan-in,
    a user buffer, anything that needs a processing-time timer); all others are fused
    into the stage of their input.
    """

    kind: ClassVar[str] = "operator"

    @property
    def boundary(self) -> bool:
        return False

    @property
    def channel_capacity(self) -> int | None:
        """Capacity of the channel in front (None: the flow's default)."""
        return None

    @property
    def channel_overflow(self) -> Overflow:
        return Overflow.BLOCK

    @property
    def channel_block_timeout(self) -> float | None:
        """Seconds a writer waits for room before a dropping channel drops (None: none)."""
        return None

    def build(self, ctx: BuildContext) -> Step:
        raise NotImplementedError


class Step:
    """A running operator inside a stage.

    Subclasses override :meth:`push` (and, when they hold records, :meth:`finish`,
    :meth:`pending`, and for processing-time timers :meth:`next_deadline` /
    :meth:`on_timer`).  Output goes to :meth:`emit`.
    """

    def __init__(self, name: str, metrics: OperatorMetrics) -> None:
        self.name = name
        self.metrics = metrics
        self.children: list[Step] = []
        self.wake: Callable[[], None] = _nothing
        """Called by a timer step with work of its own (e.g. an async call finished): its
        stage stops waiting for input and calls :meth:`on_timer`.  Set by the runtime."""
        self.on_barrier: Callable[[Step, Barrier], Awaitable[None]] | None = None
        """Set by the runtime when the flow takes checkpoints: called with this step when
        a barrier passes it, before the barrier goes on to the children."""

    async def emit(self, batch: Batch) -> None:
        if not batch.values:
            return
        self.metrics.records_out += len(batch.values)
        for child in self.children:
            await child.push(batch)

    async def push(self, batch: Batch) -> None:
        """Process a micro-batch (default: pass it on unchanged)."""
        self.metrics.records_in += len(batch.values)
        await self.emit(batch)

    async def control(self, message: Control) -> None:
        """An in-band control message (default: forward to every child).

        A step that overrides this must forward through ``super().control(message)``:
        that is where a checkpoint barrier takes the step's snapshot.  A step that holds
        a control message back (behind records still in flight) forwards it later, and
        its snapshot is taken then.
        """
        if self.on_barrier is not None and type(message) is Barrier:
            await self.on_barrier(self, message)
        for child in self.children:
            await child.control(message)

    async def push_input(self, batch: Batch, index: int) -> None:
        """A batch from input ``index`` of a fan-in (default: :meth:`push`)."""
        await self.push(batch)

    async def control_input(self, message: Control, index: int) -> None:
        """A control message from input ``index`` of a fan-in (default: :meth:`control`)."""
        await self.control(message)

    async def finish(self) -> None:
        """End of input: flush what is held, then tell the children."""
        for child in self.children:
            await child.finish()

    def pending(self) -> int:
        """Records held inside this step (reported when a flow is cancelled)."""
        return 0

    def in_process(self, n: int, passed: bool) -> int:
        """Of the ``n`` records of a :meth:`push` under way, how many this step still
        holds itself -- not passed on to its children, not done with (for the exact
        inventory of a flow cancelled mid-push; the children count theirs).

        ``passed``: the step has pushed something on already.  Default: all ``n`` until
        then, none after (a step that passes its batch on in one go).  A step that
        passes records on bit by bit (``rate_limit``), or that finishes them itself (a
        sink), overrides this."""
        return 0 if passed else n

    def output_weight(self, batch: Batch) -> int:
        """How many of this step's input records ``batch`` (which it emits) stands for:
        one per record by default; ``batch()`` emits lists, each standing for its
        records."""
        return len(batch.values)

    def demand(self) -> int | None:
        """How many records this step can pass on right now without waiting (None: no
        limit).  A source stage asks its source for no more than the smallest demand of
        its steps (at least one record), so a step that paces records (``rate_limit``)
        is fed about as fast as it lets them through, instead of sitting on a full batch
        that would take minutes to pass -- and that a stop would have to wait for."""
        return None

    def snapshot(self) -> Any:
        """The step's state for a checkpoint, or None when it holds none.

        Called by the runtime when a checkpoint barrier reaches the step's stage: every
        record before the barrier has been pushed, none after it.  Return a picklable
        value that shares nothing mutable with the live step (the runtime pickles it at
        once, but the step must not mutate it afterwards either way).  A step must never
        emit records in response to a :class:`~sluiceway.core.messages.Barrier`.
        """
        return None

    def accept_changes(self, accepted: bool) -> None:
        """Whether the checkpoint store takes change sets (called by the checkpoint side
        before the first snapshot; default: it does not).

        A step whose :meth:`snapshot` returns a :class:`~sluiceway.core.delta.Incremental`
        must make every snapshot whole until told ``True``; then it may return only what
        changed since its previous snapshot (``Changes(whole=False, ...)``).  Steps
        without incremental state ignore it."""

    async def prepare_checkpoint(self, checkpoint_id: int | None) -> Any:
        """The state to store for checkpoint ``checkpoint_id`` (None: the step's final
        state, after the end of its input).  Default: :meth:`snapshot`.  A sink step
        overrides it to make what it wrote durable first."""
        return self.snapshot()

    def query(self, key: Any, at: float | None) -> KeyState | None:
        """What the step holds for ``key`` right now, for a state query (``at``: only the
        windows holding that instant, in seconds), or None when the step keeps no state
        per key.  Called between two of the step's records; see
        :mod:`sluiceway.core.query`."""
        return None

    def restore(self, state: Any) -> None:
        """Load a :meth:`snapshot` taken by an earlier run of the same flow.

        Called after the step is built and before the flow starts.  Processing-time
        deadlines restart from the restoring run's clock.
        """
        raise TypeError(f"operator {self.name!r} ({type(self).__name__}) holds no state to restore")

    def close(self) -> None:
        """The flow is over (ended, failed or cancelled): release what the step holds
        beyond its stage's task, e.g. tasks it started."""

    def uses_timer(self) -> bool:
        """True when this step has processing-time deadlines (it then heads a stage)."""
        return False

    def next_deadline(self) -> float | None:
        """The clock instant this step next needs :meth:`on_timer`, or None."""
        return None

    async def on_timer(self, now: float) -> None:
        """Called by the stage once ``now >= next_deadline()``."""


def _nothing() -> None:
    pass


class SendStep(Step):
    """The end of a stage: sends into the channel that starts the next stage."""

    def __init__(self, name: str, metrics: OperatorMetrics, writer: ChannelWriter) -> None:
        super().__init__(name, metrics)
        self.writer = writer

    async def emit(self, batch: Batch) -> None:  # pragma: no cover - never emits
        raise AssertionError("SendStep has no children")

    async def push(self, batch: Batch) -> None:
        await self.writer.send(batch)

    def in_process(self, n: int, passed: bool) -> int:
        return self.writer.unsent  # the part of a blocked send not in the channel yet

    async def control(self, message: Control) -> None:
        self.writer.send_control(message)

    async def finish(self) -> None:
        self.writer.close()


def without(batch: Batch, failed: list[int]) -> Batch:
    """``batch`` minus the records at ``failed`` (they went to the dead-letter sink)."""
    mask = [True] * len(batch.values)
    for i in failed:
        mask[i] = False
    return batch.select(mask)


async def apply_each(
    fn: Callable[[Any], Any], values: list[Any], errors: ErrorHandler
) -> tuple[list[Any], list[int] | None]:
    """``[fn(v) for v in values]`` at C speed, with per-record error recovery.

    Returns the results and the indices of records that went to the dead-letter sink
    (None when there were none).  ``fn`` is called exactly once per record unless the
    error policy retries that record: the fast path is ``list.extend(map(fn, it))``,
    which keeps the results before a failure and leaves ``it`` just past the failed
    record, so the loop resumes there.
    """
    out: list[Any] = []
    it = iter(values)
    failed: list[int] | None = None
    pos = 0
    while True:
        start = len(out)
        try:
            out.extend(map(fn, it))
        except Exception as exc:  # noqa: BLE001 - any user error goes to the error policy
            i = pos + (len(out) - start)
            pos = i + 1
            v = values[i]
            ok, result = await errors.recover([v], exc, partial(fn, v))
            if ok:
                out.append(result)
            elif failed is None:
                failed = [i]
            else:
                failed.append(i)
        else:
            return out, failed
