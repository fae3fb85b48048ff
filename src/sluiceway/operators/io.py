"""The ends of a flow: the source's step and the sink step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from sluiceway.core.contract import PartialWriteError, Sink, Source
from sluiceway.core.messages import Batch, Control, Watermark
from sluiceway.flowcontrol.breaker import CircuitBreaker, watch_breaker
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.operators.errors import ErrorHandler
from sluiceway.operators.stateless import make_passthrough
from sluiceway.policies import DeadLetter, ErrorPolicy, Fail
from sluiceway.time import Clock

__all__ = ["SinkSpec", "SourceSpec"]


@dataclass(frozen=True, slots=True, eq=False)
class SourceSpec(OpSpec):
    """A source in the logical graph; ``on_error`` applies to malformed input."""

    source: Source
    on_error: Fail | DeadLetter = Fail()
    kind: ClassVar[str] = "source"

    def build(self, ctx: BuildContext) -> Step:
        return make_passthrough(ctx.name, ctx.metrics)


class _SinkStep(Step):
    def __init__(self, ctx: BuildContext, spec: SinkSpec) -> None:
        super().__init__(ctx.name, ctx.metrics)
        assert ctx.errors is not None
        self.sink = spec.sink
        self.errors: ErrorHandler = ctx.errors
        self.clock: Clock = ctx.clock
        self.breaker = spec.breaker
        if self.breaker is not None:
            watch_breaker(self.breaker, self.metrics)
        self.when_open = spec.when_open
        self.unwritten = 0  # records of the push under way not written yet
        self.writing = False  # inside sink.write(): its progress() counts
        # A sink that passes the flow's event time on (a repartition topic's internal
        # sink, sluiceway.scaleout.repartition) hears every watermark in-band.
        self.on_watermark: Callable[[Watermark], None] | None = getattr(
            spec.sink, "on_watermark", None
        )

    async def push(self, batch: Batch) -> None:
        m = self.metrics
        m.records_in += len(batch.values)
        self.unwritten = len(batch.values)
        try:
            while batch.values:
                try:
                    await self._write(batch)
                except PartialWriteError as exc:
                    done = exc.written
                    m.records_out += done
                    self.unwritten -= done
                    await self._recover(batch.slice(done, done + 1), _cause(exc))
                    batch = batch.slice(done + 1)
                    self.unwritten = len(batch.values)
                except Exception as exc:  # noqa: BLE001 - any sink error goes to the error policy
                    await self._recover(batch, exc)
                    return
                else:
                    m.records_out += len(batch.values)
                    return
        finally:
            self.unwritten = 0

    async def control(self, message: Control) -> None:
        if self.on_watermark is not None and type(message) is Watermark:
            self.on_watermark(message)
        await super().control(message)

    def in_process(self, n: int, passed: bool) -> int:
        """Records of the push under way not written yet: a sink that writes record by
        record says how far it got (``Sink.progress``), so a cancelled flow's inventory
        does not count what it already wrote."""
        held = self.unwritten
        if held and self.writing:
            done = self.sink.progress()
            if done:
                held -= min(max(done, 0), held)
        return held

    async def _write(self, part: Batch) -> None:
        """One write, through the circuit breaker if there is one."""
        breaker, clock = self.breaker, self.clock
        if breaker is not None:
            await breaker.enter(clock, self.when_open)
        self.writing = True
        try:
            await self.sink.write(part)
        except Exception:
            if breaker is not None:
                breaker.on_failure(clock.monotonic())
            raise
        finally:
            self.writing = False
        if breaker is not None:
            breaker.on_success(clock.monotonic())

    async def prepare_checkpoint(self, checkpoint_id: int | None) -> Any:
        return await self.sink.pre_commit(checkpoint_id)

    def restore(self, state: Any) -> None:
        self.sink.restore(state)

    async def _recover(self, part: Batch, exc: Exception) -> None:
        ok, _ = await self.errors.recover(part.values, exc, lambda: self._write(part))
        if ok:
            self.metrics.records_out += len(part.values)


def _cause(exc: PartialWriteError) -> Exception:
    cause = exc.cause
    return cause if isinstance(cause, Exception) else exc


@dataclass(frozen=True, slots=True, eq=False)
class SinkSpec(OpSpec):
    """A sink in the logical graph; ``on_error`` applies to failed writes."""

    sink: Sink
    on_error: ErrorPolicy = Fail()
    breaker: CircuitBreaker | None = None
    when_open: str = "wait"
    kind: ClassVar[str] = "sink"

    def build(self, ctx: BuildContext) -> Step:
        return _SinkStep(ctx, self)
