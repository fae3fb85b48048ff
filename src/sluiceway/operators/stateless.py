"""Stateless operators: map, filter, flat_map, inspect, key_by, branch, merge, buffer."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import compress
from typing import Any, ClassVar

from sluiceway.core.channel import Overflow
from sluiceway.core.messages import Batch
from sluiceway.metrics.registry import OperatorMetrics
from sluiceway.operators.base import BuildContext, OpSpec, Step, apply_each, without
from sluiceway.operators.errors import ErrorHandler
from sluiceway.policies import ErrorPolicy, Fail

__all__ = [
    "BranchSpec",
    "BufferSpec",
    "FilterSpec",
    "FlatMapSpec",
    "InspectSpec",
    "KeyBySpec",
    "LateOutputSpec",
    "MapSpec",
    "PortSpec",
]


def _repeat(column: list[Any] | None, parts: list[list[Any]]) -> list[Any] | None:
    """Each entry of ``column`` repeated once per output its record produced."""
    if column is None:
        return None
    return [x for x, part in zip(column, parts, strict=True) for _ in part]


class _UserFnStep(Step):
    def __init__(self, ctx: BuildContext, fn: Callable[[Any], Any]) -> None:
        super().__init__(ctx.name, ctx.metrics)
        assert ctx.errors is not None
        self.fn = fn
        self.errors: ErrorHandler = ctx.errors


@dataclass(frozen=True, slots=True)
class _UserFnSpec(OpSpec):
    fn: Callable[[Any], Any]
    on_error: ErrorPolicy = Fail()


class _MapStep(_UserFnStep):
    async def push(self, batch: Batch) -> None:
        values = batch.values
        self.metrics.records_in += len(values)
        out, failed = await apply_each(self.fn, values, self.errors)
        if failed is None:
            await self.emit(batch.with_values(out))
        else:
            await self.emit(without(batch, failed).with_values(out))


@dataclass(frozen=True, slots=True)
class MapSpec(_UserFnSpec):
    """``stream.map(fn)``: one output per input, timestamps and keys kept."""

    kind: ClassVar[str] = "map"

    def build(self, ctx: BuildContext) -> Step:
        return _MapStep(ctx, self.fn)


class _FilterStep(_UserFnStep):
    async def push(self, batch: Batch) -> None:
        values = batch.values
        self.metrics.records_in += len(values)
        mask, failed = await apply_each(self.fn, values, self.errors)
        if failed is not None:
            for i in failed:  # dead-lettered records are not in the output
                mask.insert(i, False)
        if batch.timestamps is None and batch.keys is None:  # (no timestamps: no watermarks)
            await self.emit(Batch(list(compress(values, mask))))
        else:
            await self.emit(batch.select(mask))


@dataclass(frozen=True, slots=True)
class FilterSpec(_UserFnSpec):
    """``stream.filter(predicate)``: keep the records for which it is truthy."""

    kind: ClassVar[str] = "filter"

    def build(self, ctx: BuildContext) -> Step:
        return _FilterStep(ctx, self.fn)


class _FlatMapStep(_UserFnStep):
    def __init__(self, ctx: BuildContext, fn: Callable[[Any], Iterable[Any]]) -> None:
        # Materialise each result inside the protected call: a generator that fails
        # half-way must not leave half its output behind before a retry.
        super().__init__(ctx, lambda v: list(fn(v)))

    async def push(self, batch: Batch) -> None:
        values = batch.values
        self.metrics.records_in += len(values)
        lists, failed = await apply_each(self.fn, values, self.errors)
        if failed is not None:
            batch = without(batch, failed)
        out: list[Any] = []
        for part in lists:
            out.extend(part)
        await self.emit(
            Batch(
                out,
                _repeat(batch.timestamps, lists),
                _repeat(batch.keys, lists),
                _repeat(batch.watermarks, lists),
            )
        )


@dataclass(frozen=True, slots=True)
class FlatMapSpec(_UserFnSpec):
    """``stream.flat_map(fn)``: zero or more outputs per input (an iterable)."""

    kind: ClassVar[str] = "flat_map"

    def build(self, ctx: BuildContext) -> Step:
        return _FlatMapStep(ctx, self.fn)


class _InspectStep(_UserFnStep):
    async def push(self, batch: Batch) -> None:
        self.metrics.records_in += len(batch.values)
        _, failed = await apply_each(self.fn, batch.values, self.errors)
        await self.emit(batch if failed is None else without(batch, failed))


@dataclass(frozen=True, slots=True)
class InspectSpec(_UserFnSpec):
    """``stream.inspect(fn)``: call ``fn`` for its side effect, pass records on."""

    kind: ClassVar[str] = "inspect"

    def build(self, ctx: BuildContext) -> Step:
        return _InspectStep(ctx, self.fn)


class _KeyByStep(_UserFnStep):
    async def push(self, batch: Batch) -> None:
        self.metrics.records_in += len(batch.values)
        keys, failed = await apply_each(self.fn, batch.values, self.errors)
        if failed is not None:
            batch = without(batch, failed)
        await self.emit(batch.with_keys(keys))


@dataclass(frozen=True, slots=True)
class KeyBySpec(_UserFnSpec):
    """``stream.key_by(fn)``: attach a key to every record (values unchanged).
    ``partitioned``: the user says each key arrives in one source partition only (the
    input topic is keyed by this key); otherwise a flow on several workers repartitions
    through Kafka, into a topic of ``partitions`` partitions (None: the source topic's)."""

    kind: ClassVar[str] = "key_by"
    partitioned: bool = False
    partitions: int | None = None

    def build(self, ctx: BuildContext) -> Step:
        return _KeyByStep(ctx, self.fn)


class _BranchStep(_UserFnStep):
    async def push(self, batch: Batch) -> None:
        self.metrics.records_in += len(batch.values)
        mask, failed = await apply_each(self.fn, batch.values, self.errors)
        if failed is not None:
            batch = without(batch, failed)
        mask = [bool(m) for m in mask]
        self.metrics.records_out += len(batch.values)
        yes, no = self.children  # the two port steps, in port order
        await yes.push(batch.select(mask))
        await no.push(batch.select([not m for m in mask]))


@dataclass(frozen=True, slots=True)
class BranchSpec(_UserFnSpec):
    """``stream.branch(predicate)``: split into (matching, the rest)."""

    kind: ClassVar[str] = "branch"

    def build(self, ctx: BuildContext) -> Step:
        return _BranchStep(ctx, self.fn)


class _Passthrough(Step):
    async def push(self, batch: Batch) -> None:
        if batch.values:
            self.metrics.records_in += len(batch.values)
            await self.emit(batch)


@dataclass(frozen=True, slots=True)
class PortSpec(OpSpec):
    """One output of a :class:`BranchSpec` (0: matching, 1: the rest)."""

    port: int
    kind: ClassVar[str] = "branch_output"

    def build(self, ctx: BuildContext) -> Step:
        return _Passthrough(ctx.name, ctx.metrics)


@dataclass(frozen=True, slots=True)
class LateOutputSpec(PortSpec):
    """The late-record side output of a window operator (``results.late()``)."""

    kind: ClassVar[str] = "late_output"


@dataclass(frozen=True, slots=True)
class BufferSpec(OpSpec):
    """``stream.buffer(capacity, overflow, block_timeout=)``: an explicit channel with a
    policy."""

    capacity: int
    overflow: Overflow = Overflow.BLOCK
    block_timeout: float | None = None
    kind: ClassVar[str] = "buffer"

    @property
    def boundary(self) -> bool:
        return True

    @property
    def channel_capacity(self) -> int | None:
        return self.capacity

    @property
    def channel_overflow(self) -> Overflow:
        return self.overflow

    @property
    def channel_block_timeout(self) -> float | None:
        return self.block_timeout

    def build(self, ctx: BuildContext) -> Step:
        return _Passthrough(ctx.name, ctx.metrics)


def make_passthrough(name: str, metrics: OperatorMetrics) -> Step:
    """A step that forwards batches and counts them (used for a source's own step)."""
    return _Passthrough(name, metrics)
