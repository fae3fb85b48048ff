"""The stage tasks: a source stage pulls on credit and injects barriers and watermarks; a
channel stage receives from its channel and fires its steps' timers.

Each stage runs the steps the plan fused into it, as one task of the executor's
TaskGroup (:mod:`sluiceway.runtime.executor` builds, starts and stops them); what a
stage needs of that executor is :class:`Owner`.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Protocol

from sluiceway.core.channel import ChannelReader, Overflow
from sluiceway.core.contract import Source
from sluiceway.core.messages import Barrier, Batch, Watermark
from sluiceway.errors import EndOfStream, FlowFailedError, OperatorError, SluicewayError
from sluiceway.flow import Flow
from sluiceway.flowcontrol.limiters import TokenBucket
from sluiceway.operators.base import SendStep, Step
from sluiceway.plan import StagePlan
from sluiceway.runtime.checkpointing import Coordinator
from sluiceway.runtime.inventory import Inner
from sluiceway.time import Clock, yield_now

__all__ = ["HALTED", "ChannelStage", "Owner", "SourceStage", "Stage"]


class Owner(Protocol):
    """What a stage needs of the executor that runs it."""

    flow: Flow
    clock: Clock
    max_batch_size: int
    fetch_cap: int | None
    """A load rule's ShrinkFetch: records per pull."""
    stop_requested: bool
    coordinator: Coordinator | None
    bad_input_failure: OperatorError | None

    @property
    def checkpointing(self) -> bool: ...

    def request_stop(self) -> None: ...

    async def stage_finished(self, stage: Stage) -> None: ...


class Stage:
    def __init__(self, ex: Owner, sp: StagePlan, head: Step, steps: list[Step]) -> None:
        self.ex = ex
        self.plan = sp
        self.head = head
        self.steps = steps
        self.timer_steps = [s for s in steps if s.uses_timer()]
        self.inner: Inner | None = None  # set by time_processing: the pushes under way
        self.task: asyncio.Task[Any] | None = None
        self.pulling = False
        self.stop_cancel = False

    @property
    def label(self) -> str:
        return f"stage {self.plan.index} ({' -> '.join(n.name for n in self.plan.nodes)})"

    async def run(self) -> None:
        self.task = asyncio.current_task()
        try:
            if await self._run() is not HALTED:
                await self.ex.stage_finished(self)
        except (SluicewayError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise FlowFailedError(
                f"{self.label} in flow {self.ex.flow.name!r} crashed: {type(exc).__name__}: {exc}",
                flow=self.ex.flow.name,
                operator=self.plan.head.name,
            ) from exc

    async def _run(self) -> object:
        raise NotImplementedError


HALTED = object()  # a source stage stopped at a final checkpoint: nothing downstream ends


class SourceStage(Stage):
    def __init__(
        self, ex: Owner, sp: StagePlan, head: Step, steps: list[Step], source: Source
    ) -> None:
        super().__init__(ex, sp, head, steps)
        self.source = source
        # Lossless channels give credit and are waited for.  A dropping or failing channel
        # is never waited for (the source must not slow down, or its policy would never
        # apply), but while it has room it sizes the pull: drops are for a reader that
        # is behind, not for a batch larger than the room.
        writers = [s.writer for s in steps if isinstance(s, SendStep)]
        self.sends = [w for w in writers if w.overflow is Overflow.BLOCK]
        self.sheds = [w for w in writers if w.overflow is not Overflow.BLOCK]
        # Steps that pace records (rate_limit) cap the pull too (Step.demand).
        self.demanders = [s for s in steps if type(s).demand is not Step.demand]
        self.wm = -math.inf  # the watermark an event-time source last passed on
        self.barrier: int | None = None  # a checkpoint to start at the next batch boundary
        self.barrier_cancel = False
        self.signal: asyncio.Future[None] | None = None
        self.draining = False  # a stop drains what the source accepted (Source.stop_intake)
        self.pull_limit: TokenBucket | None = None  # a load rule's LimitRate

    def request_barrier(self, checkpoint_id: int) -> None:
        """Start checkpoint ``checkpoint_id`` here before the next batch (interrupting a
        pull that waits for input: pulls are cancellation-safe)."""
        if self.task is None or self.task.done():
            return
        self.barrier = checkpoint_id
        if self.signal is not None and not self.signal.done():
            self.signal.set_result(None)
        # A checkpoint interrupts a pull waiting for input; an ack barrier waits for it.
        if self.pulling and self.ex.checkpointing and not (self.barrier_cancel or self.stop_cancel):
            self.barrier_cancel = True
            self.task.cancel("checkpoint barrier")

    async def _inject(self) -> bool:
        """Send the pending barrier; True if it was the final one of a stop."""
        checkpoint_id, self.barrier = self.barrier, None
        assert checkpoint_id is not None
        coord = self.ex.coordinator
        assert coord is not None
        final = coord.is_final(checkpoint_id)
        coord.source_barrier(self.plan.head.name, checkpoint_id, self.source.position())
        await self.head.control(Barrier(checkpoint_id))
        return final

    async def _halt(self) -> object:
        """A stop with checkpoints: pass barriers on until the final one, then halt."""
        while True:
            if self.barrier is not None and await self._inject():
                return HALTED
            self.signal = asyncio.get_running_loop().create_future()
            await self.signal

    async def credit(self) -> int:
        """How many records to ask for: the batch limit, the room downstream, or what
        a pacing step lets through now (``Step.demand``), at least one.

        When a channel is nearly full, first wait until it has room for a useful batch
        (a full batch, or half the channel if that is smaller).  Without this, sustained
        backpressure grinds batches down to single records: each freed slot would be
        filled by a one-record pull.
        """
        n = self.ex.max_batch_size
        for w in self.sends:
            low_water = min(n, max(1, w.capacity // 2))
            if w.room < low_water:
                self.source.hold(True)
                try:
                    await w.wait_for_room(low_water)
                finally:
                    self.source.hold(False)
            n = min(n, w.room)
        for w in self.sheds:
            if w.room:
                n = min(n, w.room)
        for s in self.demanders:
            d = s.demand()
            if d is not None:
                n = min(n, d)
        cap = self.ex.fetch_cap
        if cap is not None:
            n = min(n, cap)
        return max(1, n)

    async def _watermark(self) -> None:
        """After a pull of an event-time source: pass its watermark on when it rose."""
        wm = self.source.watermark()
        if wm is not None and wm > self.wm:
            self.wm = wm
            self.head.metrics.watermark = wm / 1e6
            await self.head.control(Watermark(wm))

    def set_pull_rate(self, rate: float | None, burst: int) -> None:
        """A load rule's LimitRate: pull no faster than ``rate`` records/s (None: off)."""
        current = self.pull_limit
        if rate is None:
            self.pull_limit = None
        elif current is None or current.rate != rate or current.burst != burst:
            self.pull_limit = TokenBucket(rate, burst, clock=self.ex.clock)

    async def _next_batch(self, n: int) -> Batch | None:
        """Pull up to ``n`` records, after the wait a load rule's LimitRate asks for."""
        limit = self.pull_limit
        if limit is not None:
            n = min(n, limit.burst)
            clock = self.ex.clock
            await clock.sleep(limit.reserve(n, clock.monotonic()))
        return await self.source.next_batch(n)

    async def _run(self) -> object:
        ex, head, source = self.ex, self.head, self.source
        clock, latency = ex.clock, head.metrics.latency
        event_time = source.event_time
        task = self.task
        assert task is not None
        try:
            while True:
                if self.barrier is not None:
                    await self._inject()
                if ex.stop_requested and not self.draining:
                    if ex.checkpointing:
                        return await self._halt()
                    break
                n = await self.credit()
                if (ex.stop_requested and not self.draining) or self.barrier is not None:
                    continue
                self.pulling = True
                try:
                    batch = await self._next_batch(n)
                except OperatorError as err:
                    if err is not ex.bad_input_failure:
                        raise
                    # Bad input under Fail: stop here, at a position to resume from, but
                    # let what was handed out before reach the sinks and be acknowledged,
                    # so that a restart does not write it again; then the run fails.
                    ex.request_stop()
                    continue
                except asyncio.CancelledError:
                    if self.stop_cancel or self.barrier_cancel:
                        self.stop_cancel = self.barrier_cancel = False
                        if task.uncancel() == 0:
                            continue
                    raise
                finally:
                    self.pulling = False
                if batch is None:
                    break
                if batch.values:
                    t0 = clock.monotonic()
                    await head.push(batch)
                    latency.observe(clock.monotonic() - t0, len(batch.values))
                if event_time:
                    await self._watermark()
                await yield_now()
        except (SluicewayError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise FlowFailedError(
                f"source {self.plan.head.name!r} in flow {ex.flow.name!r} failed: "
                f"{type(exc).__name__}: {exc}",
                flow=ex.flow.name,
                operator=self.plan.head.name,
            ) from exc
        await head.finish()
        return None


class ChannelStage(Stage):
    def __init__(
        self, ex: Owner, sp: StagePlan, head: Step, steps: list[Step], reader: ChannelReader
    ) -> None:
        super().__init__(ex, sp, head, steps)
        self.reader = reader
        self.fired = False  # the last pass over the timers fired one (and yielded)

    async def _timers(self) -> float | None:
        """Fire the timers that are due; return the instant to wait for input until.

        Safe by construction, whatever ``next_deadline()`` returns:

        * ``now`` is read once, *after* every deadline of the pass has been computed, and
          each step is compared with the deadline it gave in that pass.  A deadline
          computed from any clock read (``monotonic()``, or "due now") is therefore
          ``<= now`` and fires: a step cannot make itself "not yet due" by reading the
          clock again.  A deadline in the past fires.
        * After a firing the stage yields to the event loop and then only polls its
          channel (returns ``now``): a step that is due again at once, forever, costs a
          loop turn per firing -- other stages, timers, signal handlers and a stop still
          run, and input is still taken between firings.  A wait that ends without
          input also yields, even if the deadline had passed before it began.
        """
        clock = self.ex.clock
        deadlines = [(s, s.next_deadline()) for s in self.timer_steps]
        now = clock.monotonic()
        wait: float | None = None
        fired = False
        for step, d in deadlines:
            if d is None:
                continue
            if d <= now:
                await step.on_timer(now)
                fired = True
            elif wait is None or d < wait:
                wait = d
        self.fired = fired
        if fired:
            await yield_now()
            return now
        return wait

    async def _run(self) -> object:
        reader, head, clock = self.reader, self.head, self.ex.clock
        latency = head.metrics.latency
        timed = bool(self.timer_steps)
        while True:
            # Every turn awaits: a due timer is fired and followed by a yield, and the
            # receive (with a deadline in the past: a poll) never spins on its own.
            deadline = await self._timers() if timed else None
            try:
                item = await reader.receive(deadline)
            except EndOfStream:
                break
            if item is None:  # a deadline passed, or a step woke the stage: timers next
                if not self.fired:
                    await yield_now()  # (a deadline just ahead of `now` may not have waited)
                continue
            if isinstance(item, Batch):
                t0 = clock.monotonic()
                await head.push_input(item, reader.input_index)
                latency.observe(clock.monotonic() - t0, len(item.values))
            else:
                await head.control_input(item.message, item.input_index)
        await head.finish()
        return None
