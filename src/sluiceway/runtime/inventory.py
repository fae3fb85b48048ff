"""What a stage's pushes are doing: the time each step spends on its own, and the records
still inside the pushes under way (the inventory a cancelled flow reports).

:func:`time_processing` wraps each step of a stage once, when the executor builds it;
:meth:`Inner.in_process` answers :meth:`~sluiceway.runtime.executor.Executor.unflushed`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sluiceway.core.messages import Batch
from sluiceway.metrics.histogram import LatencyHistogram
from sluiceway.operators.base import SendStep, Step
from sluiceway.time import Clock

__all__ = ["Frame", "Inner", "time_processing"]


class Frame:
    """A push under way in a stage: for the inventory of a cancelled flow."""

    __slots__ = ("n", "passed", "step", "weight")

    def __init__(self, step: Step, n: int, weight: float) -> None:
        self.step = step
        self.n = n  # the records of the batch pushed into the step
        self.weight = weight  # the stage's input records they stand for
        self.passed = False  # the step has pushed something on to a child


class Inner:
    """Per stage: seconds the steps called from the current ``push`` spent, and the
    pushes under way (innermost last)."""

    __slots__ = ("frames", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.frames: list[Frame] = []

    def enter(self, step: Step, batch: Batch) -> Frame:
        frames = self.frames
        n = len(batch.values)
        weight: float = n
        if frames:
            parent = frames[-1]
            parent.passed = True
            per_record = parent.weight / parent.n if parent.n else 1.0
            weight = parent.step.output_weight(batch) * per_record
        frame = Frame(step, n, weight)
        frames.append(frame)
        return frame

    def leave(self, frame: Frame) -> None:
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


def time_processing(steps: list[Step], clock: Clock) -> Inner:
    """Wrap each step's ``push`` to observe the time it alone spent per batch, and to
    keep track of the pushes under way (for the exact inventory of a cancelled flow).

    Steps of a stage call each other: the time in a ``push`` minus the time in the pushes
    it made (children in the same stage, sends into channels -- backpressure) is the
    operator's own.  Two clock reads per operator per batch.  ``on_timer``, ``finish``
    and ``control`` are framed too (as pushes of no records), so what a step emits from
    them is counted in the records it stands for -- not taken for the output of the push
    that sent the control message on (``batch`` sends a held watermark on from a push).
    """
    inner = Inner()
    for step in steps:
        hist = None if isinstance(step, SendStep) else step.metrics.processing
        step.push = _timed(step, step.push, clock, inner, hist)  # type: ignore[method-assign,assignment]
        step.on_timer = _framed(step, step.on_timer, inner)  # type: ignore[method-assign,assignment]
        step.finish = _framed(step, step.finish, inner)  # type: ignore[method-assign,assignment]
        step.control = _framed(step, step.control, inner)  # type: ignore[method-assign,assignment]
    return inner


_NO_RECORDS = Batch([])


def _framed(
    step: Step, fn: Callable[..., Awaitable[None]], inner: Inner
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
    inner: Inner,
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
