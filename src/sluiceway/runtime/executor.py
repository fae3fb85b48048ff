"""Runs a physical plan: one asyncio task per stage, all owned by one TaskGroup.

Lifecycle: open dead-letter sinks, sinks, then sources; run every stage; close sources,
sinks, dead-letter sinks (also after an error).  An error in any stage cancels the others
and surfaces as one exception naming the operator.

Stopping (``request_stop``, or SIGINT/SIGTERM through :func:`sluiceway.run`): sources stop
pulling, in-flight batches drain through the channels, ``batch`` operators flush, sinks
close.  If that takes longer than the grace period (or a second stop is forced), the flow
is cancelled and :class:`~sluiceway.errors.FlowCancelledError` reports exactly which
channels and operators still held how many records.

The stage tasks themselves are in :mod:`sluiceway.runtime.stages`; the accounting of what
their pushes hold (for that report) in :mod:`sluiceway.runtime.inventory`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import signal
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from sluiceway.core.channel import ChannelReader, ChannelWriter, open_channel
from sluiceway.core.contract import Sink, SinkContext, Source, SourceContext
from sluiceway.core.query import StateAnswer, worker_id
from sluiceway.errors import (
    BadInputError,
    CancelReason,
    CheckpointError,
    ConnectorOpenError,
    FlowCancelledError,
    FlowDefinitionError,
    FlowFailedError,
    OperatorError,
    SluicewayError,
)
from sluiceway.flow import Flow, Node
from sluiceway.flowcontrol.load import LoadEffects, LoadPolicy
from sluiceway.metrics.registry import FlowSnapshot, MetricsRegistry
from sluiceway.operators.base import BuildContext, SendStep, Step
from sluiceway.operators.errors import DeadLetterWriter, ErrorHandler
from sluiceway.operators.io import SinkSpec, SourceSpec
from sluiceway.operators.stateless import PortSpec
from sluiceway.plan import PhysicalPlan, plan
from sluiceway.policies import DeadLetter, DeadLetterRecord, Retry
from sluiceway.runtime.checkpointing import Checkpoints, CheckpointStats, Coordinator
from sluiceway.runtime.claims import Claim, claim
from sluiceway.runtime.inventory import time_processing
from sluiceway.runtime.load import LoadMonitor
from sluiceway.runtime.stages import ChannelStage, SourceStage, Stage
from sluiceway.time import Clock, SystemClock, TimerHandle

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


class Executor:
    """Builds the runtime objects for a flow and runs them.  Use :func:`sluiceway.start`."""

    def __init__(  # noqa: PLR0915 - one field per runtime object
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
        # Set once the flow runs (state restored, connectors opened, the first
        # checkpoint taken), with the clock's monotonic time then (running_since).
        self.running_since: float | None = None
        self.running = asyncio.Event()
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

    def _build(self) -> list[Stage]:
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
        stages: list[Stage] = []
        for sp in self.plan.stages:
            st_steps = [steps[n.id] for n in sp.nodes]
            st_steps += [c for s in st_steps for c in s.children if isinstance(c, SendStep)]
            inner = time_processing(st_steps, clock)
            head = steps[sp.head.id]
            src = sp.source
            if src is not None:
                stages.append(SourceStage(self, sp, head, st_steps, src.source))
                stages[-1].inner = inner
            else:
                reader = readers[sp.head.id]
                for step in st_steps:
                    if step.uses_timer():
                        step.wake = reader.interrupt
                stages.append(ChannelStage(self, sp, head, st_steps, reader))
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
            self.running_since = self.clock.monotonic()
            self.running.set()
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
            if isinstance(st, SourceStage):
                st.request_barrier(checkpoint_id)

    async def stage_finished(self, stage: Stage) -> None:
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
            if not isinstance(st, SourceStage):
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
            if isinstance(st, SourceStage) and not self.checkpointing:
                st.draining = st.source.stop_intake()
            if (
                isinstance(st, SourceStage)
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
            if isinstance(st, SourceStage) and st.draining and st.source.backlog():
                held[f"accepted in source {st.plan.head.name}"] = st.source.backlog() or 0
            n = st.inner.in_process() if st.inner is not None else 0
            if n:
                held[f"in process in {st.label}"] = n
            for s in st.steps:
                if s.pending():
                    held[f"operator {s.name}"] = s.pending()
        return held


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
