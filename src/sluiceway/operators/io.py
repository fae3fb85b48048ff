"""The ends of a flow: the source's step and the sink step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sluiceway.connectors.base import PartialWriteError, Sink, Source
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.operators.errors import ErrorHandler
from sluiceway.operators.stateless import make_passthrough
from sluiceway.policies import DeadLetter, ErrorPolicy, Fail
from sluiceway.runtime.messages import Batch

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
    def __init__(self, ctx: BuildContext, sink: Sink) -> None:
        super().__init__(ctx.name, ctx.metrics)
        assert ctx.errors is not None
        self.sink = sink
        self.errors: ErrorHandler = ctx.errors

    async def push(self, batch: Batch) -> None:
        m = self.metrics
        m.records_in += len(batch.values)
        while batch.values:
            try:
                await self.sink.write(batch)
            except PartialWriteError as exc:
                done = exc.written
                m.records_out += done
                await self._recover(batch.slice(done, done + 1), _cause(exc))
                batch = batch.slice(done + 1)
            except Exception as exc:  # noqa: BLE001 - any sink error goes to the error policy
                await self._recover(batch, exc)
                return
            else:
                m.records_out += len(batch.values)
                return

    async def _recover(self, part: Batch, exc: Exception) -> None:
        ok, _ = await self.errors.recover(part.values, exc, lambda: self.sink.write(part))
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
    kind: ClassVar[str] = "sink"

    def build(self, ctx: BuildContext) -> Step:
        return _SinkStep(ctx, self.sink)
