"""Runs a physical plan: one asyncio task per stage, all owned by one TaskGroup.

Lifecycle: open dead-letter sinks, sinks, then sources; run every stage; close sources,
sinks, dead-letter sinks (also after an error).  An error in any stage cancels the others
and surfaces as one exception naming the operator.

Stopping (``request_stop``, or SIGINT/SIGTERM through :func:`sluiceway.run`): sources stop
pulling, in-flight batches drain through the channels, ``batch`` operators flush, sinks
close.  If that takes longer than the grace period (or a second stop is forced), the flow
is cancelled and :class:`~sluiceway.errors.FlowCancelledError` reports exactly which
channels and operators still held how many records.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sluiceway.core.channel import ChannelReader, ChannelWriter, Overflow, open_channel
from sluiceway.core.contract import Sink, SinkContext, Source, SourceContext
from sluiceway.core.messages import Barrier, Batch, Watermark
from sluiceway.core.query import StateAnswer, worker_id
from sluiceway.errors import (
    BadInputError,
    CancelReason,
    CheckpointError,
    ConnectorOpenError,
    EndOfStream,
    FlowCancelledError,
    FlowDefinitionError,
    FlowFailedError,
    OperatorError,
    SluicewayError,
)
from sluiceway.flow import Flow, Node
from sluiceway.flowcontrol.limiters import TokenBucket
from sluiceway.flowcontrol.load import LoadEffects, LoadPolicy
from sluiceway.metrics.histogram import LatencyHistogram
from sluiceway.metrics.registry import FlowSnapshot, MetricsRegistry
from sluiceway.operators.base import BuildContext, SendStep, Step
from sluiceway.operators.errors import DeadLetterWriter, ErrorHandler
from sluiceway.operators.io import SinkSpec, SourceSpec
from sluiceway.operators.stateless import PortSpec
from sluiceway.plan import PhysicalPlan, StagePlan, plan
from sluiceway.policies import DeadLetter, DeadLetterRecord, Retry
from sluiceway.runtime.checkpointing import Checkpoints, CheckpointStats, Coordinator
from sluiceway.runtime.claims import Claim, claim
from sluiceway.runtime.load import LoadMonitor
from sluiceway.time import Clock, SystemClock, TimerHandle, yield_now

__all__ = ["Executor", "RunResult"]

log = logging.getLogger("sluiceway")


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a run ended.

    Attributes:
        flow: the flow's name.
        metrics: every counter at the end of the run.
        stopped: True if the run ended because a stop was requested (signal or
            ``handle.stop()``) rather than because every source ended.
        elapsed: clock seconds from start to end.
        checkpoints: with checkpoints on, what they did (how many, the last one's id,
            duration and size, the one the run started from); None otherwise.
    """

    flow: str
    metrics: FlowSnapshot
    stopped: bool
    elapsed: float
    checkpoints: CheckpointStats | None = None


class _Stage:
    def __init__(self, ex: Executor, sp: StagePlan, head: Step, steps: list[Step]) -> None:
        self.ex = ex
        self.plan = sp
        self.head = head
        self.steps = steps
        self.timer_steps = [s for s in steps if s.uses_timer()]
        self.inner: _Inner | None = None  # set by _time_processing: the pushes under way
        self.task: asyncio.Task[Any] | None = None
        self.pulling = False
        self.stop_cancel = False

    @property
    def label(self) -> str:
        return f"stage {self.plan.index} ({' -> '.join(n.name for n in self.plan.nodes)})"

    async def run(self) -> None:
        self.task = asyncio.current_task()
        try:
            if await self._run() is not _HALTED:
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


_HALTED = object()  # a source stage stopped at a final checkpoint: nothing downstream ends


class _SourceStage(_Stage):
    def __init__(
        self, ex: Executor, sp: StagePlan, head: Step, steps: list[Step], source: Source
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
                return _HALTED
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


class _ChannelStage(_Stage):
    def __init__(
        self, ex: Executor, sp: StagePlan, head: Step, steps: list[Step], reader: ChannelReader
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


class Executor:
    """Builds the runtime objects for a flow and runs them.  Use :func:`sluiceway.start`."""

    def __init__(
        self,
        flow: Flow,
        *,
        clock: Clock | None = None,
        grace_period: float = 10.0,
        max_batch_size: int = 1024,
        seed: int | None = None,
        checkpoints: Checkpoints | None = None,
        load: LoadPolicy | None = None,
    ) -> None:
        if checkpoints is not None and not isinstance(checkpoints, Checkpoints):
            raise TypeError(
                f"checkpoints must be sw.Checkpoints(directory, interval=...), got "
                f"{type(checkpoints).__name__}"
            )
        if load is not None and not isinstance(load, LoadPolicy):
            raise TypeError(f"load must be sw.LoadPolicy([...]), got {type(load).__name__}")
        if not 0 <= grace_period < math.inf:  # (NaN fails this too)
            raise ValueError(
                f"grace_period must be a finite number >= 0 seconds, got {grace_period!r}"
            )
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size!r}")
        self.flow = flow
        self.clock = clock or SystemClock()
        self.grace_period = grace_period
        self.max_batch_size = max_batch_size
        self.plan: PhysicalPlan = plan(flow)
        self.metrics = MetricsRegistry(flow.name, self.clock)
        self.stop_requested = False
        self.worker = worker_id()
        self._rng = random.Random(seed)
        self._forced: str | None = None
        self._forced_why = CancelReason.FORCED
        self._forced_signal: signal.Signals | None = None
        self._unflushed: dict[str, int] = {}
        self._grace_timer: TimerHandle | None = None
        self._main: asyncio.Task[Any] | None = None
        self._readers: list[ChannelReader] = []
        self._dead_letters: dict[int, DeadLetterWriter] = {}
        self._sources: list[tuple[Node, Source]] = []
        self._sinks: list[tuple[Node, Sink]] = []
        self._steps: dict[str, Step] = {}
        self._running_stages = 0
        self._halting = False
        self._in_group = False
        self._claim: Claim | None = None
        self.bad_input_failure: OperatorError | None = None
        """A source's bad input under ``Fail``: raised once the flow has drained."""
        self.stages = self._build()
        self.fetch_cap: int | None = None  # a load rule's ShrinkFetch: records per pull
        self._load_task: asyncio.Task[None] | None = None
        self.load: LoadMonitor | None = None
        if load is not None:
            self.load = LoadMonitor(
                load,
                self.clock,
                list(self._readers),
                [st.head.metrics.latency for st in self.stages],
                flow.name,
            )
            self.metrics.add_load(self.load.snapshot)
        self.coordinator: Coordinator | None = None
        acking = any(type(src).commit is not Source.commit for _, src in self._sources)
        if checkpoints is not None or acking:
            self.coordinator = Coordinator(
                flow,
                checkpoints,
                self.clock,
                {n.name: src for n, src in self._sources},
                {n.name: sink for n, sink in self._sinks},
                self._request_barrier,
            )
            for name, step in self._steps.items():
                if name not in self.coordinator.sources:
                    step.on_barrier = self.coordinator.on_barrier
                    # the store keeps bases and chains of changes: steps may snapshot those
                    step.accept_changes(self.coordinator.durable)
            if self.coordinator.durable:
                self.metrics.add_checkpoints(self.coordinator.stats.snapshot)

    # -- building ----------------------------------------------------------------------

    def _build(self) -> list[_Stage]:
        flow, clock = self.flow, self.clock
        for node in flow.nodes:
            policy = getattr(node.spec, "on_error", None)
            final = policy.then if isinstance(policy, Retry) else policy
            if isinstance(final, DeadLetter) and id(final.sink) not in self._dead_letters:
                self._dead_letters[id(final.sink)] = DeadLetterWriter(final.sink, flow.name)
        writers: dict[int, list[ChannelWriter]] = {}
        readers: dict[int, ChannelReader] = {}
        for cp in self.plan.channels:
            ws, r = open_channel(
                cp.capacity,
                clock=clock,
                name=cp.name,
                overflow=cp.overflow,
                writers=len(cp.writers),
                flow=flow.name,
                block_timeout=cp.block_timeout,
            )
            writers[cp.target.id], readers[cp.target.id] = ws, r
            self.metrics.add_channel(r, feeds=cp.target.name)
            self._readers.append(r)
        steps: dict[int, Step] = {}
        for node in flow.topological_order():
            stage = self.plan.stage_of[node.id]
            m = self.metrics.operator(node.name, node.kind, stage)
            policy = getattr(node.spec, "on_error", None)
            errors = None
            if policy is not None:
                errors = ErrorHandler(
                    policy,
                    flow=flow.name,
                    operator=node.name,
                    clock=clock,
                    metrics=m,
                    dead_letters=self._dead_letters,
                    rng=self._rng,
                )
            ctx = BuildContext(flow.name, node.name, clock, m, errors, self.max_batch_size)
            step = steps[node.id] = self._steps[node.name] = node.spec.build(ctx)
            if node.id in writers:
                for i, parent in enumerate(node.inputs):
                    send = SendStep(node.name, m, writers[node.id][i])
                    steps[parent.id].children.append(send)
            else:
                for parent in node.inputs:
                    steps[parent.id].children.append(step)
            if isinstance(node.spec, SourceSpec):
                self._sources.append((node, node.spec.source))
                self.metrics.add_backlog(
                    node.name, node.spec.source.backlog, node.spec.source.partition_backlog
                )
            elif isinstance(node.spec, SinkSpec):
                self._sinks.append((node, node.spec.sink))
        for node in flow.nodes:  # side outputs (branch, late records) last, in port order
            if any(isinstance(c.spec, PortSpec) for c in node.consumers):
                by_port = {
                    id(steps[c.id]): c.spec.port
                    for c in node.consumers
                    if isinstance(c.spec, PortSpec)
                }
                steps[node.id].children.sort(key=lambda s: by_port.get(id(s), -1))
        stages: list[_Stage] = []
        for sp in self.plan.stages:
            st_steps = [steps[n.id] for n in sp.nodes]
            st_steps += [c for s in st_steps for c in s.children if isinstance(c, SendStep)]
            inner = _time_processing(st_steps, clock)
            head = steps[sp.head.id]
            src = sp.source
            if src is not None:
                stages.append(_SourceStage(self, sp, head, st_steps, src.source))
                stages[-1].inner = inner
            else:
                reader = readers[sp.head.id]
                for step in st_steps:
                    if step.uses_timer():
                        step.wake = reader.interrupt
                stages.append(_ChannelStage(self, sp, head, st_steps, reader))
                stages[-1].inner = inner
        return stages

    # -- running -----------------------------------------------------------------------

    async def run(self) -> RunResult:
        """Run until every source ends (or a stop), then close everything."""
        self._main = asyncio.current_task()
        started = self.clock.monotonic()
        opened: list[Source | Sink] = []
        coord = self.coordinator
        try:
            if self.checkpointing:
                assert coord is not None
                coord.restore(self._steps)
            await self._open(opened)
            if self.checkpointing and coord is not None and coord.stats.restored_from is None:
                await coord.initial(self._steps)
            self._running_stages = len(self.stages)
            self._in_group = True
            async with asyncio.TaskGroup() as tg:
                self._spawn(tg, coord)
            self._in_group = False
            if coord is not None:
                await coord.end()
            self._raise_bad_input()
        except asyncio.CancelledError:
            self._in_group = False
            task = asyncio.current_task()
            assert task is not None
            if self._halting and self._forced is None and task.uncancel() == 0:
                self._raise_bad_input()  # stopped at a final checkpoint: a normal end
            elif self._forced is not None and task.uncancel() == 0:
                self._raise_bad_input(f"then the flow was cancelled: {self._forced}")
                raise FlowCancelledError(
                    f"flow {self.flow.name!r} cancelled: {self._forced}",
                    self._unflushed,
                    reason=self._forced_why,
                    signal=self._forced_signal,
                ) from None
            else:
                raise
        except BaseExceptionGroup as group:
            err = _one_error(group, self.flow.name)
            # Keep the error's own cause (the user's exception), drop the group context.
            raise err from err.__cause__
        finally:
            self._in_group = False
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            for st in self.stages:
                for step in st.steps:
                    step.close()
            try:
                # The run's own error, if one is propagating (CPython runs a ``finally``
                # on the way out of an exception as a handler of it): it must stay the
                # error users see, whatever closing does.
                await self._close(opened, sys.exception())
            finally:
                if coord is not None:
                    coord.close()
        return RunResult(
            self.flow.name,
            self.metrics.snapshot(),
            self.stop_requested,
            self.clock.monotonic() - started,
            coord.stats if coord is not None and coord.durable else None,
        )

    def _spawn(self, tg: asyncio.TaskGroup, coord: Coordinator | None) -> None:
        """Start the stage tasks, and the checkpoint and load loops if the run has them."""
        for st in self.stages:
            tg.create_task(st.run(), name=f"{self.flow.name}/stage{st.plan.index}")
        if coord is not None:
            tg.create_task(coord.run(self._halt), name=f"{self.flow.name}/checkpoints")
        if self.load is not None:
            self._load_task = tg.create_task(
                self._load_loop(self.load), name=f"{self.flow.name}/load"
            )

    def _raise_bad_input(self, note: str | None = None) -> None:
        """Raise the bad-input failure the run stopped for (after draining), if any."""
        err = self.bad_input_failure
        if err is not None:
            if note is not None:
                err.add_note(note)
            raise err from err.__cause__

    async def _open(self, opened: list[Source | Sink]) -> None:
        flow, clock = self.flow.name, self.clock
        checkpointing = self.checkpointing
        restored = self.coordinator is not None and self.coordinator.stats.restored_from is not None
        self._claim = claim(
            [
                *(("dead-letter sink", "dead_letter", w.sink) for w in self._dead_letters.values()),
                *(("sink", node.name, sink) for node, sink in self._sinks),
                *(("source", node.name, source) for node, source in self._sources),
            ],
            flow,
        )
        for w in self._dead_letters.values():
            name = f"dead_letter_{w.sink.describe()}"
            await self._opening(
                w.sink,
                "dead-letter sink",
                name,
                w.sink.open(SinkContext(flow, name, clock, restored=restored)),
            )
            opened.append(w.sink)
        sources = tuple(source for _, source in self._sources)
        for node, sink in self._sinks:
            ctx = SinkContext(flow, node.name, clock, checkpointing, restored, sources)
            await self._opening(sink, "sink", node.name, sink.open(ctx))
            opened.append(sink)
        for node, source in self._sources:
            spec = node.spec
            assert isinstance(spec, SourceSpec)
            source_ctx = SourceContext(
                flow,
                node.name,
                clock,
                self._bad_input_handler(node, spec),
                not isinstance(spec.on_error, DeadLetter),
                checkpointing,
            )
            await self._opening(source, "source", node.name, source.open(source_ctx))
            opened.append(source)

    async def _opening(
        self, connector: Source | Sink, kind: str, name: str, opening: Awaitable[None]
    ) -> None:
        """Await a connector's ``open``; a failure becomes one error naming it, the flow
        and (where the exception tells) the fix, with the connector's exception as cause."""
        try:
            await opening
        except (FlowFailedError, FlowDefinitionError, CheckpointError, asyncio.CancelledError):
            raise  # already clear (a checkpoint that does not fit, a stop while opening)
        except Exception as exc:
            raise ConnectorOpenError(
                flow=self.flow.name,
                operator=name,
                kind=kind,
                connector=connector.describe(),
                cause=exc,
            ) from exc

    def _bad_input_handler(self, node: Node, spec: SourceSpec) -> Any:
        m = self.metrics.operator(node.name, node.kind, self.plan.stage_of[node.id])
        policy = spec.on_error
        writer = self._dead_letters.get(id(policy.sink)) if isinstance(policy, DeadLetter) else None

        async def bad_input(err: BadInputError) -> None:
            m.errors += 1
            m.failed_attempts += 1
            if writer is None:
                failure = OperatorError(
                    flow=self.flow.name, operator=node.name, record=err.raw, cause=err
                )
                if self.bad_input_failure is None:
                    self.bad_input_failure = failure
                raise failure from err
            await writer.write(
                [
                    DeadLetterRecord(
                        record=err.raw,
                        error_type=type(err).__name__,
                        error_message=str(err),
                        operator=node.name,
                        flow=self.flow.name,
                        attempts=1,
                        time=self.clock.time(),
                    )
                ]
            )
            m.dead_letters += 1

        return bad_input

    async def _close(self, opened: list[Source | Sink], failure: BaseException | None) -> None:
        """Close what was opened; a close that fails is raised only when the run did not.

        When the run already failed (``failure``), that error is the one users need: a
        close that fails as well is logged and attached to it as a note.
        """
        # Sources first, then sinks, then dead-letter sinks: reverse of opening.
        errors: list[BaseException] = []
        for obj in reversed(opened):
            try:
                await obj.close()
            except Exception as exc:  # noqa: BLE001 - close the others, then report
                errors.append(exc)
                log.error("closing %s in flow %r failed: %r", obj.describe(), self.flow.name, exc)
                if failure is not None:
                    failure.add_note(
                        f"then closing {obj.describe()} failed too: {type(exc).__name__}: {exc}"
                    )
        if self._claim is not None:
            self._claim.release()
        if errors and self._forced is None and failure is None:
            raise FlowFailedError(
                f"closing {len(errors)} connector(s) of flow {self.flow.name!r} failed; "
                f"first: {type(errors[0]).__name__}: {errors[0]}",
                flow=self.flow.name,
            ) from errors[0]

    # -- checkpoints -------------------------------------------------------------------

    @property
    def checkpointing(self) -> bool:
        """True when the flow takes checkpoints (not only ack barriers)."""
        return self.coordinator is not None and self.coordinator.durable

    def _request_barrier(self, checkpoint_id: int) -> None:
        for st in self.stages:
            if isinstance(st, _SourceStage):
                st.request_barrier(checkpoint_id)

    async def stage_finished(self, stage: _Stage) -> None:
        """A stage's input ended and it has flushed: its operators' states are final."""
        coord = self.coordinator
        if coord is not None:
            for node in stage.plan.nodes:
                if node.name in coord.sources:
                    coord.finished(node.name, coord.sources[node.name].position())
                elif not coord.durable:
                    coord.finished(node.name, None)
                else:
                    async with coord.committing:  # never beside a commit of the sink
                        value = await self._steps[node.name].prepare_checkpoint(None)
                    coord.finished(node.name, value)
        self._running_stages -= 1
        if coord is not None and self._running_stages == 0:
            coord.stages_ended()
        if self._running_stages == 0 and self._load_task is not None:
            self._load_task.cancel()  # the load checks end with the stages

    # -- load --------------------------------------------------------------------------

    async def _load_loop(self, monitor: LoadMonitor) -> None:
        """Every ``interval`` of the clock: measure the load signals and apply the rules.
        Cancelled when every stage has ended (:meth:`stage_finished`)."""
        clock, interval = self.clock, monitor.policy.interval
        tick = clock.monotonic() + interval
        while True:
            await clock.sleep_until(tick)
            now = clock.monotonic()
            self._apply_load(monitor.check(now - tick, self.max_batch_size))
            tick += interval
            if tick <= now:  # fell behind: skip, do not burst
                tick = now + interval

    def _apply_load(self, effects: LoadEffects) -> None:
        self.fetch_cap = effects.fetch_cap
        for st in self.stages:
            if not isinstance(st, _SourceStage):
                continue
            st.set_pull_rate(effects.rate, effects.burst)
            st.source.shed(effects.shedding)

    def _halt(self) -> None:
        """The final checkpoint of a stop is stored: end the run without draining."""
        self._halting = True
        if self._in_group and self._main is not None and not self._main.done():
            self._main.cancel("stopped at a checkpoint")

    # -- stopping ----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop pulling from sources and drain; force cancellation after the grace period.

        With checkpoints, stop at a final checkpoint instead of draining: operators keep
        what they hold (in the checkpoint), and the next run goes on from there.
        """
        if self.stop_requested:
            return
        self.stop_requested = True
        if self.checkpointing:
            assert self.coordinator is not None
            self.coordinator.stop()
        for st in self.stages:
            if isinstance(st, _SourceStage) and not self.checkpointing:
                st.draining = st.source.stop_intake()
            if (
                isinstance(st, _SourceStage)
                and not st.draining
                and st.pulling
                and not st.barrier_cancel
                and st.task is not None
            ):
                st.stop_cancel = True
                st.task.cancel("stop requested")
        self._grace_timer = self.clock.call_at(
            self.clock.monotonic() + self.grace_period,
            lambda: self.force_stop(
                f"grace period of {self.grace_period:g}s exceeded", why=CancelReason.GRACE_PERIOD
            ),
        )

    def force_stop(
        self,
        reason: str = "forced stop",
        *,
        why: CancelReason = CancelReason.FORCED,
        sig: signal.Signals | None = None,
    ) -> None:
        """Cancel the flow now, recording what it still held."""
        if self._forced is not None or self._main is None or self._main.done():
            return
        self._forced = reason
        self._forced_why = why
        self._forced_signal = sig
        self._unflushed = self.unflushed()
        self._main.cancel(reason)

    def query(self, operator: str, key: Any, at: float | None = None) -> StateAnswer:
        """What ``operator`` holds for ``key`` now (see :mod:`sluiceway.core.query`)."""
        step = self._steps.get(operator)
        found = None if step is None else step.query(key, at)
        if found is None:
            queryable = [n for n, s in self._steps.items() if type(s).query is not Step.query]
            listed = ", ".join(repr(n) for n in queryable) or "none in this flow"
            what = "no operator" if step is None else "operator"
            why = "" if step is None else " holds no per-key state"
            raise ValueError(
                f"flow {self.flow.name!r} has {what} {operator!r}{why}; operators whose "
                f"state can be queried: {listed}"
            )
        node = next(n for n in self.flow.nodes if n.name == operator)
        return StateAnswer(
            operator=operator,
            kind=node.kind,
            key=key,
            found=found.found,
            worker=self.worker,
            time=self.clock.time(),
            watermark=found.watermark,
            windows=found.windows,
            state=found.state,
        )

    def unflushed(self) -> dict[str, int]:
        """Records still held right now: per channel, per holding operator, per stage."""
        held: dict[str, int] = {}
        for r in self._readers:
            if r.fill:
                held[f"channel {r.name}"] = r.fill
        for st in self.stages:
            if isinstance(st, _SourceStage) and st.draining and st.source.backlog():
                held[f"accepted in source {st.plan.head.name}"] = st.source.backlog() or 0
            n = st.inner.in_process() if st.inner is not None else 0
            if n:
                held[f"in process in {st.label}"] = n
            for s in st.steps:
                if s.pending():
                    held[f"operator {s.name}"] = s.pending()
        return held


class _Frame:
    """A push under way in a stage: for the inventory of a cancelled flow."""

    __slots__ = ("n", "passed", "step", "weight")

    def __init__(self, step: Step, n: int, weight: float) -> None:
        self.step = step
        self.n = n  # the records of the batch pushed into the step
        self.weight = weight  # the stage's input records they stand for
        self.passed = False  # the step has pushed something on to a child


class _Inner:
    """Per stage: seconds the steps called from the current ``push`` spent, and the
    pushes under way (innermost last)."""

    __slots__ = ("frames", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.frames: list[_Frame] = []

    def enter(self, step: Step, batch: Batch) -> _Frame:
        frames = self.frames
        n = len(batch.values)
        weight: float = n
        if frames:
            parent = frames[-1]
            parent.passed = True
            per_record = parent.weight / parent.n if parent.n else 1.0
            weight = parent.step.output_weight(batch) * per_record
        frame = _Frame(step, n, weight)
        frames.append(frame)
        return frame

    def leave(self, frame: _Frame) -> None:
        frames = self.frames
        if frames and frames[-1] is frame:
            frames.pop()
        elif frame in frames:  # pragma: no cover - pushes in a stage nest
            frames.remove(frame)

    def in_process(self) -> int:
        """The stage's input records still inside its pushes: each step counts what it
        holds itself (``Step.in_process``), scaled to the records its batch stands for."""
        total = 0.0
        for f in self.frames:
            if f.n:
                total += f.step.in_process(f.n, f.passed) * f.weight / f.n
        return round(total)


def _time_processing(steps: list[Step], clock: Clock) -> _Inner:
    """Wrap each step's ``push`` to observe the time it alone spent per batch, and to
    keep track of the pushes under way (for the exact inventory of a cancelled flow).

    Steps of a stage call each other: the time in a ``push`` minus the time in the pushes
    it made (children in the same stage, sends into channels -- backpressure) is the
    operator's own.  Two clock reads per operator per batch.  ``on_timer``, ``finish``
    and ``control`` are framed too (as pushes of no records), so what a step emits from
    them is counted in the records it stands for -- not taken for the output of the push
    that sent the control message on (``batch`` sends a held watermark on from a push).
    """
    inner = _Inner()
    for step in steps:
        hist = None if isinstance(step, SendStep) else step.metrics.processing
        step.push = _timed(step, step.push, clock, inner, hist)  # type: ignore[method-assign,assignment]
        step.on_timer = _framed(step, step.on_timer, inner)  # type: ignore[method-assign,assignment]
        step.finish = _framed(step, step.finish, inner)  # type: ignore[method-assign,assignment]
        step.control = _framed(step, step.control, inner)  # type: ignore[method-assign,assignment]
    return inner


_NO_RECORDS = Batch([])


def _framed(
    step: Step, fn: Callable[..., Awaitable[None]], inner: _Inner
) -> Callable[..., Awaitable[None]]:
    async def framed(*args: Any) -> None:
        frame = inner.enter(step, _NO_RECORDS)
        try:
            await fn(*args)
        finally:
            inner.leave(frame)

    return framed


def _timed(
    step: Step,
    push: Callable[[Batch], Awaitable[None]],
    clock: Clock,
    inner: _Inner,
    hist: LatencyHistogram | None,
) -> Callable[[Batch], Awaitable[None]]:
    now = clock.monotonic

    async def timed_push(batch: Batch) -> None:
        outer = inner.seconds
        inner.seconds = 0.0
        frame = inner.enter(step, batch)
        t0 = now()
        try:
            await push(batch)
        finally:
            inner.leave(frame)
            spent = now() - t0
            if hist is not None and batch.values:
                hist.observe(spent - inner.seconds, len(batch.values))
            inner.seconds = outer + spent

    return timed_push


def _one_error(group: BaseExceptionGroup[BaseException], flow: str) -> BaseException:
    """The first real error of a stage group (the others are usually its consequences)."""
    errors = [e for e in _leaves(group) if not isinstance(e, asyncio.CancelledError)]
    for e in errors:
        if isinstance(e, SluicewayError):
            return e
    if not errors:
        return FlowFailedError(f"flow {flow!r} failed", flow=flow)
    first = errors[0]
    wrapped = FlowFailedError(f"flow {flow!r} failed: {type(first).__name__}: {first}", flow=flow)
    wrapped.__cause__ = first
    return wrapped


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
