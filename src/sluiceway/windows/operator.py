"""The window operator: assigns records to windows, aggregates, fires on the watermark.

Everything inside is in integer microseconds ("ticks").  Per record, the operator first
advances to the watermark that record carries (the watermark *before* it): windows whose
end it reached fire, in order of end and then of opening, and windows past
``end + allowed_lateness`` are freed.  Then the record is added to each of its windows,
or, for a window already past ``end + allowed_lateness``, sent to the late output.  A
record added to a window whose end the watermark already passed fires that window again
at once (a late firing).  Because the watermark comes with each record, none of this
depends on where the stream was cut into batches.
"""

from __future__ import annotations

import logging
import math
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from heapq import heappop, heappush
from itertools import repeat
from typing import Any, ClassVar

from sluiceway.agg import Aggregator
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.runtime.messages import Batch, Control, Watermark
from sluiceway.time import Clock
from sluiceway.windows.assigners import Session, Sessions, Sliding, Tumbling

__all__ = ["Aggregation", "LateRecord", "WindowResult", "WindowSpec"]

log = logging.getLogger("sluiceway")

_INF = math.inf
Assigner = Tumbling | Sliding | Session


@dataclass(slots=True)
class WindowResult:
    """One result of a window.  See docs/windows.md for the semantics of each field.

    Attributes:
        key: the key (None for a window over an unkeyed stream).
        start, end: the window ``[start, end)`` in epoch seconds.
        value: the aggregate (a dict for named aggregates).
        revision: 0 for a window's first result, then 1, 2, ...; a later revision
            replaces the earlier one.
        final: no later result for this window can follow.
        kind: ``"on_time"``, ``"early"`` or ``"late"``.
    """

    key: Any
    start: float
    end: float
    value: Any
    revision: int = 0
    final: bool = True
    kind: str = "on_time"

    @property
    def start_time(self) -> datetime:
        """``start`` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.start, UTC)

    @property
    def end_time(self) -> datetime:
        """``end`` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.end, UTC)


@dataclass(slots=True)
class LateRecord:
    """A record that arrived after its window closed (``end + allowed_lateness``).

    Attributes:
        value: the record.
        key: its key (None when unkeyed).
        timestamp: its event time (epoch seconds).
        window_start, window_end: the window it missed.
        watermark: the watermark when it arrived.
    """

    value: Any
    key: Any
    timestamp: float
    window_start: float
    window_end: float
    watermark: float

    @property
    def lateness(self) -> float:
        """Seconds by which the watermark had passed the record's event time."""
        return self.watermark - self.timestamp


class Aggregation:
    """One or several aggregators compiled into code over a list accumulator.

    The accumulator of a window is a list with one slot per aggregator.  The built-ins'
    inline forms become the source of ``init(v, t)`` (the accumulator of a window's first
    record), of the update statements the window operator compiles into its record loop,
    and of ``result(acc)``; user aggregators are called through create/add/result.
    """

    def __init__(self, aggs: Sequence[Aggregator[Any, Any]], names: Sequence[str] | None) -> None:
        for a in aggs:
            if not isinstance(a, Aggregator):
                raise TypeError(
                    f"aggregate() expects sw.agg aggregators (e.g. sw.agg.count()) or an "
                    f"sw.agg.Aggregator, got {type(a).__name__} {a!r}"
                )
        self.aggs = list(aggs)
        self.names = None if names is None else list(names)
        self.namespace: dict[str, Any] = {}
        init: list[str] = []
        self.add_lines: list[str] = []
        results: list[str] = []
        for i, agg in enumerate(self.aggs):
            self.namespace[f"g{i}"] = agg
            self.namespace[f"f{i}"] = getattr(agg, "fn", None)
            inline = agg._inline(f"a[{i}]", f"f{i}")
            result = agg._inline_result(f"a[{i}]") if inline is not None else None
            if inline is None:
                init.append(f"g{i}.add(g{i}.create(), v)")
                self.add_lines.append(f"a[{i}] = g{i}.add(a[{i}], v)")
            else:
                init.append(inline[0])
                self.add_lines.extend(inline[1])
            results.append(result or f"g{i}.result(a[{i}])")
        self.init_expr = f"[{', '.join(init)}]"
        if self.names is None:
            result_expr = results[0]
        else:
            result_expr = (
                "{"
                + ", ".join(f"{n!r}: {r}" for n, r in zip(self.names, results, strict=True))
                + "}"
            )
        src = (
            f"def init(v, t):\n    return {self.init_expr}\n"
            f"def add(a, v, t):\n    " + "\n    ".join(self.add_lines) + "\n"
            f"def result(a):\n    return {result_expr}\n"
        )
        self.init: Callable[[Any, int], list[Any]] = self.compile(src)["init"]
        self.add: Callable[[list[Any], Any, int], None] = self.compile(src)["add"]
        self.result: Callable[[list[Any]], Any] = self.compile(src)["result"]

    def compile(self, src: str) -> dict[str, Any]:
        """Run generated ``src`` with the aggregators in scope; returns its namespace."""
        ns = dict(self.namespace)
        exec(compile(src, "<sluiceway window>", "exec"), ns)  # our own generated code
        return ns

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        return [g.merge(x, y) for g, x, y in zip(self.aggs, a, b, strict=True)]


class _WindowStep(Step):
    """What every window operator shares: output, late records, watermarks, timers."""

    def __init__(self, ctx: BuildContext, spec: WindowSpec) -> None:
        super().__init__(ctx.name, ctx.metrics)
        self.spec = spec
        self.flow = ctx.flow
        self.clock: Clock = ctx.clock
        self.agg = spec.aggregation
        self.lateness = spec.lateness
        self.wm: float = -_INF
        self.next_due: float = _INF  # the earliest watermark at which something happens
        self.open = 0  # open windows
        # Results emitted so far per window; needed only when a window can fire twice.
        self.revs: dict[tuple[Any, int], int] | None = (
            {} if spec.lateness or spec.early_every else None
        )
        self.dirty: set[tuple[Any, int]] | None = set() if spec.early_every else None
        self.next_early: float | None = None
        self._outputs: tuple[list[Step], Step | None] | None = None
        self._warned = False
        # Output of the batch being processed.
        self.out: list[WindowResult] = []
        self.out_ts: list[int] = []
        self.out_keys: list[Any] = []
        self.out_wms: list[float] = []
        self.late: list[LateRecord] = []
        self.late_ts: list[int] = []
        self.late_keys: list[Any] = []
        self.late_wms: list[float] = []

    # -- output ------------------------------------------------------------------------

    def outputs(self) -> tuple[list[Step], Step | None]:
        if self._outputs is None:
            if self.spec.late_output:
                self._outputs = (self.children[:-1], self.children[-1])
            else:
                self._outputs = (self.children, None)
        return self._outputs

    def _result(self, k: Any, start: int, end: int, acc: list[Any], kind: str, final: bool) -> None:
        rev = 0
        revs = self.revs
        if revs is not None:
            slot = (k, start)
            if final:
                rev = revs.pop(slot, 0)
            else:
                rev = revs.get(slot, 0)
                revs[slot] = rev + 1
        self.out.append(
            WindowResult(k, start / 1e6, end / 1e6, self.agg.result(acc), rev, final, kind)
        )
        self.out_ts.append(end - 1)
        self.out_keys.append(k)
        self.out_wms.append(self.wm)

    def _late(self, v: Any, k: Any, t: int, start: int, end: int) -> None:
        self.late.append(LateRecord(v, k, t / 1e6, start / 1e6, end / 1e6, self.wm / 1e6))
        self.late_ts.append(t)
        self.late_keys.append(k)
        self.late_wms.append(self.wm)

    def _forget(self, k: Any, start: int) -> None:
        """Window ``(k, start)`` is gone: drop its revision count and early mark."""
        if self.revs is not None:
            self.revs.pop((k, start), None)
        if self.dirty is not None:
            self.dirty.discard((k, start))

    async def _flush_output(self) -> None:
        main, late_child = self.outputs()
        if self.out:
            batch = Batch(self.out, self.out_ts, self.out_keys, self.out_wms)
            self.metrics.records_out += len(self.out)
            self.out, self.out_ts, self.out_keys, self.out_wms = [], [], [], []
            for child in main:
                await child.push(batch)
        if self.late:
            self.metrics.late += len(self.late)
            if late_child is not None:
                batch = Batch(self.late, self.late_ts, self.late_keys, self.late_wms)
                await late_child.push(batch)
            elif not self._warned:
                self._warned = True
                log.warning(
                    "window operator %r in flow %r dropped late records (counted in its "
                    "'late' metric); add .late() to its results to receive them",
                    self.name,
                    self.flow,
                )
            self.late, self.late_ts, self.late_keys, self.late_wms = [], [], [], []
        self.metrics.state = self.open
        self.metrics.watermark = self.wm

    async def emit(self, batch: Batch) -> None:  # pragma: no cover - output goes by ports
        raise AssertionError("the window operator emits through _flush_output")

    # -- records and time ----------------------------------------------------------------

    def _records(self, values: list[Any], ts: list[int], keys: Any, wms: list[float]) -> None:
        raise NotImplementedError

    def _advance(self, wm: float) -> None:
        """Move to watermark ``wm``: fire what is due, free what expired, set ``wm``.

        Results carry the watermark from before this advance, so that downstream (a
        window over the results) they are not behind the watermark.
        """
        raise NotImplementedError

    def _early(self) -> None:
        """Emit partial results of the windows changed since the last early firing."""
        raise NotImplementedError

    async def push(self, batch: Batch) -> None:
        n = len(batch.values)
        if not n:
            return
        self.metrics.records_in += n
        if self.spec.processing_time:
            now = round(self.clock.time() * 1e6)
            if now > self.wm:
                self._advance(now)
            ts: list[int] = [now] * n
            wms: list[float] = [self.wm] * n
        else:
            assert batch.timestamps is not None
            assert batch.watermarks is not None
            ts, wms = batch.timestamps, batch.watermarks
        self._records(batch.values, ts, batch.keys or repeat(None), wms)
        await self._flush_output()

    async def control(self, message: Control) -> None:
        if (
            isinstance(message, Watermark)
            and not message.idle
            and not self.spec.processing_time  # those follow the clock
            and message.time > self.wm
        ):
            if message.time >= self.next_due:
                self._advance(message.time)
                await self._flush_output()
            else:
                self.wm = message.time
                self.metrics.watermark = self.wm
        for child in self.children:
            await child.control(message)

    def uses_timer(self) -> bool:
        return self.spec.processing_time or self.spec.early_every is not None

    def next_deadline(self) -> float | None:
        d: float | None = None
        if self.spec.processing_time and self.next_due < _INF:
            wait = self.next_due / 1e6 - self.clock.time()
            d = self.clock.monotonic() + max(0.0, wait)
        if self.spec.early_every is not None and self.dirty:
            if self.next_early is None:
                self.next_early = self.clock.monotonic() + self.spec.early_every
            if d is None or self.next_early < d:
                d = self.next_early
        return d

    async def on_timer(self, now: float) -> None:
        if self.spec.processing_time:
            t = round(self.clock.time() * 1e6)
            if t > self.wm:
                self._advance(t)
        if self.next_early is not None and now >= self.next_early:
            self.next_early = None
            self._early()
            assert self.dirty is not None
            self.dirty.clear()
        await self._flush_output()

    async def finish(self) -> None:
        if self.wm < _INF:
            self._advance(_INF)
            await self._flush_output()
        await super().finish()

    def pending(self) -> int:
        """Open windows (their contents are lost if the flow is cancelled)."""
        return self.open


# The record loop of tumbling and sliding windows, compiled per operator with the
# aggregation's update statements in place of ``{ADD}``.  ``{EACH}`` enumerates the
# windows of a record; ``{AFTER}`` handles a window the watermark already passed (only
# possible with allowed lateness) and marks windows for early firing.
_GRID_LOOP = """
def records(self, values, ts, keys, wms):
    panes = self.panes
    size = self.size
    slide = self.slide
    off = self.offset
    back = self.back
    cur = self.wm
    due = self.next_due
    for v, t, k, w in zip(values, ts, keys, wms):
        if w > cur:
            cur = w
            if w >= due:
                self._advance(w)
                due = self.next_due
{EACH}
            pane = panes.get(start)
            if pane is not None:
                a = pane.get(k)
                if a is not None:
{ADD}
{AFTER}
                    continue
            self.wm = cur
            self._open(v, t, k, start, pane)
            due = self.next_due
    self.wm = cur
"""
_TUMBLING_EACH = """\
        for start in (t - (t - off) % size,):"""
_SLIDING_EACH = """\
        last = t - (t - off) % slide
        for start in range(last - back, last + 1, slide):"""
_SLIDING_EACH_UNEVEN = (
    _SLIDING_EACH
    + """
            if start + size <= t:
                continue"""
)
_AFTER_LATE = """\
                    if start + size <= cur:
                        self.wm = cur
                        self._result(k, start, start + size, a, "late", False)"""
_AFTER_EARLY = """\
                    self.dirty.add((k, start))"""


class _GridWindowStep(_WindowStep):
    """Tumbling and sliding windows: every key shares the same window grid.

    State is ``panes``: window start -> {key: accumulator}, in the order keys opened
    their window.  A heap holds the ends of panes yet to fire; with allowed lateness,
    a second heap holds the expiry (end + lateness) of panes that fired.
    """

    def __init__(self, ctx: BuildContext, spec: WindowSpec, assigner: Tumbling | Sliding) -> None:
        super().__init__(ctx, spec)
        if isinstance(assigner, Tumbling):
            self.size = self.slide = assigner.size_ticks
            each = _TUMBLING_EACH
        else:
            self.size, self.slide = assigner.size_ticks, assigner.slide_ticks
            each = _SLIDING_EACH if self.size % self.slide == 0 else _SLIDING_EACH_UNEVEN
        self.offset = assigner.offset_ticks
        self.back = ((self.size - 1) // self.slide) * self.slide
        self.panes: dict[int, dict[Any, list[Any]]] = {}
        self.heap: list[int] = []  # ends of panes to fire
        self.expiry: list[int] = []  # end + lateness of panes that fired
        after = []
        if spec.lateness:
            after.append(_AFTER_LATE)
        if spec.early_every is not None:
            after.append(_AFTER_EARLY)
        add = "\n".join(" " * 20 + line for line in self.agg.add_lines)
        src = _GRID_LOOP.format(EACH=each, ADD=add, AFTER="\n".join(after) or "")
        records = self.agg.compile(src)["records"]
        self._records = types.MethodType(records, self)  # type: ignore[method-assign]

    def _open(self, v: Any, t: int, k: Any, start: int, pane: dict[Any, list[Any]] | None) -> None:
        """The first record of window ``(k, start)`` (or one too late for it)."""
        end = start + self.size
        cur = self.wm
        lateness = self.lateness
        if end + lateness <= cur:
            self._late(v, k, t, start, end)
            return
        if pane is None:
            pane = self.panes[start] = {}
            if end > cur:
                heappush(self.heap, end)
                self.next_due = min(self.next_due, end)
            else:  # the window's time passed, but within allowed lateness
                heappush(self.expiry, end + lateness)
                self.next_due = min(self.next_due, end + lateness)
        a = pane[k] = self.agg.init(v, t)
        self.open += 1
        if end <= cur:
            self._result(k, start, end, a, "late", False)
        if self.dirty is not None:
            self.dirty.add((k, start))

    def _advance(self, wm: float) -> None:
        heap, expiry, panes = self.heap, self.expiry, self.panes
        size, lateness = self.size, self.lateness
        while heap and heap[0] <= wm:
            end = heappop(heap)
            start = end - size
            pane = panes[start]
            final = end + lateness <= wm
            self._fire_pane(pane, start, end, final)
            if final:
                self._drop_pane(start)
            else:
                heappush(expiry, end + lateness)
        while expiry and expiry[0] <= wm:
            self._drop_pane(heappop(expiry) - lateness - size)
        self.next_due = min(heap[0] if heap else _INF, expiry[0] if expiry else _INF)
        self.wm = wm

    def _fire_pane(self, pane: dict[Any, list[Any]], start: int, end: int, final: bool) -> None:
        if self.revs is not None:
            for k, a in pane.items():
                self._result(k, start, end, a, "on_time", final)
            return
        # The common case (no lateness, no early firing): every result is final, revision 0.
        result, s, e = self.agg.result, start / 1e6, end / 1e6
        n = len(pane)
        self.out.extend([WindowResult(k, s, e, result(a)) for k, a in pane.items()])
        self.out_ts.extend(repeat(end - 1, n))
        self.out_keys.extend(pane)
        self.out_wms.extend(repeat(self.wm, n))

    def _drop_pane(self, start: int) -> None:
        pane = self.panes.pop(start)
        self.open -= len(pane)
        if self.revs is not None or self.dirty is not None:
            for k in pane:
                self._forget(k, start)

    def _early(self) -> None:
        dirty = self.dirty
        assert dirty is not None
        for start in sorted(self.panes):
            end = start + self.size
            if end <= self.wm:
                continue  # fired on time already
            for k, a in self.panes[start].items():
                if (k, start) in dirty:
                    self._result(k, start, end, a, "early", False)


class _SessionWindowStep(_WindowStep):
    """Session windows: per key, disjoint sessions that grow and merge.

    State: ``accs[(key, start)]``, the session's end and opening order; ``sessions[key]``
    the key's intervals.  The heap holds ``(end, opened, slot)`` for every end a session
    had; entries whose session has since grown or merged are skipped when popped.
    """

    def __init__(self, ctx: BuildContext, spec: WindowSpec, assigner: Session) -> None:
        super().__init__(ctx, spec)
        self.gap = assigner.gap_ticks
        self.accs: dict[tuple[Any, int], list[Any]] = {}
        self.ends: dict[tuple[Any, int], int] = {}
        self.opened: dict[tuple[Any, int], int] = {}
        self.sessions: dict[Any, Sessions] = {}
        self.heap: list[tuple[int, int, tuple[Any, int]]] = []
        self.expiry: list[tuple[int, int, tuple[Any, int]]] = []
        self.seq = 0

    def _records(self, values: list[Any], ts: list[int], keys: Any, wms: list[float]) -> None:
        accs, ends, add = self.accs, self.ends, self.agg.add
        sessions, gap, lateness, dirty = self.sessions, self.gap, self.lateness, self.dirty
        cur = self.wm
        due = self.next_due
        for v, t, k, w in zip(values, ts, keys, wms, strict=False):  # keys may be repeat()
            if w > cur:
                cur = w
                if w >= due:
                    self._advance(w)
                    due = self.next_due
            sess = sessions.get(k)
            if sess is None:
                sess = sessions[k] = Sessions(gap)
            elif t + gap + lateness <= cur and not sess.overlaps(t):
                self.wm = cur
                self._late(v, k, t, t, t + gap)
                continue
            (start, end), merged = sess.add(t)
            slot = (k, start)
            if not merged or (len(merged) == 1 and merged[0][0] == start):
                acc = accs.get(slot)
                if acc is None:  # a new session
                    if end + lateness <= cur:
                        sess.remove(start)
                        if not len(sess):
                            del sessions[k]
                        self.wm = cur
                        self._late(v, k, t, start, end)
                        continue
                    accs[slot] = self.agg.init(v, t)
                    self.seq += 1
                    self.opened[slot] = self.seq
                    self.open += 1
                else:  # inside a session, or growing it at its end
                    add(acc, v, t)
                    if not merged:
                        if end <= cur:
                            self.wm = cur
                            self._result(k, start, end, acc, "late", False)
                        if dirty is not None:
                            dirty.add(slot)
                        continue
            else:  # the record bridges sessions, or extends one backwards
                self._merge(k, slot, merged, v, t)
            ends[slot] = end
            self.wm = cur
            self._schedule(slot, end)
            due = self.next_due
            if dirty is not None:
                dirty.add(slot)
        self.wm = cur

    def _merge(
        self, k: Any, slot: tuple[Any, int], merged: list[tuple[int, int]], v: Any, t: int
    ) -> None:
        """Replace the sessions ``merged`` by ``slot``; it keeps the earliest opening and
        continues their revisions."""
        acc: list[Any] | None = None
        opened = self.seq + 1
        rev = 0
        for start, _ in merged:
            old = (k, start)
            part = self.accs.pop(old)
            del self.ends[old]
            opened = min(opened, self.opened.pop(old))
            if self.revs is not None:
                rev = max(rev, self.revs.pop(old, 0))
            if self.dirty is not None:
                self.dirty.discard(old)
            acc = part if acc is None else self.agg.merge(acc, part)
        assert acc is not None
        self.agg.add(acc, v, t)
        self.accs[slot] = acc
        self.opened[slot] = opened
        self.open -= len(merged) - 1
        if rev and self.revs is not None:
            self.revs[slot] = rev

    def _schedule(self, slot: tuple[Any, int], end: int) -> None:
        """Session ``slot`` now ends at ``end``: fire it then (or now, if that passed)."""
        if end > self.wm:
            heappush(self.heap, (end, self.opened[slot], slot))
            self.next_due = min(self.next_due, end)
        else:  # within allowed lateness
            heappush(self.expiry, (end + self.lateness, self.opened[slot], slot))
            self.next_due = min(self.next_due, end + self.lateness)
            self._result(slot[0], slot[1], end, self.accs[slot], "late", False)

    def _advance(self, wm: float) -> None:
        heap, expiry, accs, ends, lateness = (
            self.heap,
            self.expiry,
            self.accs,
            self.ends,
            self.lateness,
        )
        while heap and heap[0][0] <= wm:
            end, opened, slot = heappop(heap)
            if ends.get(slot) != end:
                continue  # the session grew or merged since: a newer entry stands for it
            final = end + lateness <= wm
            self._result(slot[0], slot[1], end, accs[slot], "on_time", final)
            if final:
                self._drop(slot)
            else:
                heappush(expiry, (end + lateness, opened, slot))
        while expiry and expiry[0][0] <= wm:
            due, _, slot = heappop(expiry)
            if ends.get(slot) == due - lateness:
                self._drop(slot)
        self.next_due = min(heap[0][0] if heap else _INF, expiry[0][0] if expiry else _INF)
        self.wm = wm

    def _drop(self, slot: tuple[Any, int]) -> None:
        k, start = slot
        del self.accs[slot]
        del self.ends[slot]
        del self.opened[slot]
        self.open -= 1
        self._forget(k, start)
        sessions = self.sessions[k]
        sessions.remove(start)
        if not len(sessions):
            del self.sessions[k]

    def _early(self) -> None:
        dirty = self.dirty
        assert dirty is not None
        due = [
            (self.ends[slot], self.opened[slot], slot)
            for slot in dirty
            if slot in self.accs and self.ends[slot] > self.wm
        ]
        for end, _, slot in sorted(due, key=lambda d: (d[0], d[1])):
            self._result(slot[0], slot[1], end, self.accs[slot], "early", False)


class WindowSpec(OpSpec):
    """``stream.window(assigner, ...).aggregate(...)``."""

    kind: ClassVar[str] = "window"

    def __init__(
        self,
        assigner: Assigner,
        aggregation: Aggregation,
        *,
        lateness: int,
        early_every: float | None,
        processing_time: bool,
    ) -> None:
        self.assigner = assigner
        self.aggregation = aggregation
        self.lateness = lateness
        self.early_every = early_every
        self.processing_time = processing_time
        self.late_output = False  # set by .late()

    @property
    def boundary(self) -> bool:
        return self.processing_time or self.early_every is not None

    def build(self, ctx: BuildContext) -> Step:
        if isinstance(self.assigner, Session):
            return _SessionWindowStep(ctx, self, self.assigner)
        return _GridWindowStep(ctx, self, self.assigner)
