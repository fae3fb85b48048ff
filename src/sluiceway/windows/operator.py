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
from sluiceway.windows.assigners import Session, Sessions, Sliding, Tumbling, seconds

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
    """One or several aggregators compiled into ``init``/``add`` functions over a list.

    The accumulator of a window is a list with one slot per aggregator.  ``add(acc, v,
    t)`` updates every slot in one Python call; it is generated from the aggregators'
    inline forms (user aggregators are called through ``create``/``add``).
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
        ns: dict[str, Any] = {}
        init: list[str] = []
        add: list[str] = []
        for i, agg in enumerate(self.aggs):
            ns[f"g{i}"] = agg
            ns[f"f{i}"] = getattr(agg, "fn", None)
            inline = agg._inline(f"a[{i}]", f"f{i}")
            if inline is None:
                init.append(f"g{i}.add(g{i}.create(), v)")
                add.append(f"a[{i}] = g{i}.add(a[{i}], v)")
            else:
                init.append(inline[0])
                add.extend(inline[1])
        src = (
            f"def init(v, t):\n    return [{', '.join(init)}]\n"
            f"def add(a, v, t):\n    " + "\n    ".join(add) + "\n"
        )
        exec(compile(src, "<sluiceway aggregation>", "exec"), ns)
        self.init: Callable[[Any, int], list[Any]] = ns["init"]
        self.add: Callable[[list[Any], Any, int], None] = ns["add"]

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        return [g.merge(x, y) for g, x, y in zip(self.aggs, a, b, strict=True)]

    def result(self, acc: list[Any]) -> Any:
        if self.names is None:
            return self.aggs[0].result(acc[0])
        return {n: g.result(x) for n, g, x in zip(self.names, self.aggs, acc, strict=True)}


class _WindowStep(Step):
    def __init__(self, ctx: BuildContext, spec: WindowSpec) -> None:
        super().__init__(ctx.name, ctx.metrics)
        self.spec = spec
        self.flow = ctx.flow
        self.clock: Clock = ctx.clock
        self.agg = spec.aggregation
        self.lateness = spec.lateness
        a = spec.assigner
        self.session = isinstance(a, Session)
        if isinstance(a, Tumbling):
            self.size, self.offset, self.slide = a.size_ticks, a.offset_ticks, a.size_ticks
        elif isinstance(a, Sliding):
            self.size, self.offset, self.slide = a.size_ticks, a.offset_ticks, a.slide_ticks
        else:
            self.size, self.offset, self.slide = a.gap_ticks, 0, 0
        self.wm: float = -_INF
        self.accs: dict[tuple[Any, int], list[Any]] = {}
        self.heap: list[tuple[int, int, tuple[Any, int]]] = []  # (end, seq, slot): to fire
        self.expiry: list[tuple[int, int, tuple[Any, int]]] = []  # (end+L, seq, slot)
        self.next_due: float = _INF  # earliest end in either heap
        self.seq = 0
        self.revs: dict[tuple[Any, int], int] = {}  # results emitted so far, per window
        self.dirty: set[tuple[Any, int]] | None = set() if spec.early_every else None
        self.next_early: float | None = None
        self.sessions: dict[Any, Sessions] = {}
        self.session_ends: dict[tuple[Any, int], int] = {}
        self.session_seqs: dict[tuple[Any, int], int] = {}
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

    def _result(self, slot: tuple[Any, int], end: int, kind: str, final: bool) -> None:
        rev = self.revs.get(slot, 0)
        key, start = slot
        r = WindowResult(
            key, seconds(start), seconds(end), self.agg.result(self.accs[slot]), rev, final, kind
        )
        self.out.append(r)
        self.out_ts.append(end - 1)
        self.out_keys.append(key)
        self.out_wms.append(self.wm)
        if final:
            self.revs.pop(slot, None)
        else:
            self.revs[slot] = rev + 1

    def _late(self, v: Any, k: Any, t: int, start: int, end: int) -> None:
        self.late.append(LateRecord(v, k, seconds(t), seconds(start), seconds(end), self.wm / 1e6))
        self.late_ts.append(t)
        self.late_keys.append(k)
        self.late_wms.append(self.wm)

    async def _flush_output(self) -> None:
        main, late_child = self.outputs()
        if self.out:
            batch = Batch(self.out, self.out_ts, self.out_keys, self.out_wms)
            self.metrics.records_out += len(self.out)
            self.out, self.out_ts, self.out_keys, self.out_wms = [], [], [], []
            for child in main:
                await child.push(batch)
        if self.late:
            n = len(self.late)
            self.metrics.late += n
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
        self.metrics.state = len(self.accs)
        self.metrics.watermark = self.wm

    # -- time --------------------------------------------------------------------------

    def _advance(self, wm: float) -> None:
        """Move to watermark ``wm``: fire what is due, free what expired.

        The results carry the watermark from before this advance, so that downstream
        (another window over the results) they are not behind the watermark.
        """
        heap, expiry, accs, lateness = self.heap, self.expiry, self.accs, self.lateness
        while heap and heap[0][0] <= wm:
            end, seq, slot = heappop(heap)
            if slot not in accs or (self.session and self.session_ends.get(slot) != end):
                continue  # a session that grew or merged since: a newer entry stands for it
            final = end + lateness <= wm
            self._result(slot, end, "on_time", final)
            if final:
                self._free(slot)
            else:
                heappush(expiry, (end + lateness, seq, slot))
        while expiry and expiry[0][0] <= wm:
            due, _, slot = heappop(expiry)
            if slot in accs and (not self.session or self.session_ends.get(slot) == due - lateness):
                self._free(slot)
        self.next_due = min(heap[0][0] if heap else _INF, expiry[0][0] if expiry else _INF)
        self.wm = wm

    def _free(self, slot: tuple[Any, int]) -> None:
        del self.accs[slot]
        self.revs.pop(slot, None)
        if self.dirty is not None:
            self.dirty.discard(slot)
        if self.session:
            del self.session_ends[slot]
            del self.session_seqs[slot]
            key, start = slot
            sessions = self.sessions[key]
            sessions.remove(start)
            if not len(sessions):
                del self.sessions[key]

    def _opened_late(self, slot: tuple[Any, int], end: int, seq: int) -> None:
        """A window whose end already passed got its first record (within lateness)."""
        heappush(self.expiry, (end + self.lateness, seq, slot))
        self.next_due = min(self.next_due, end + self.lateness)

    # -- records -----------------------------------------------------------------------

    async def push(self, batch: Batch) -> None:
        n = len(batch.values)
        if not n:
            return
        self.metrics.records_in += n
        if self.spec.processing_time:
            now = round(self.clock.time() * 1e6)
            ts: list[int] = [now] * n
            wms: list[float] = [max(now, self.wm)] * n
        else:
            assert batch.timestamps is not None
            assert batch.watermarks is not None
            ts, wms = batch.timestamps, batch.watermarks
        keys = batch.keys if batch.keys is not None else repeat(None)
        if self.session:
            self._sessions(batch.values, ts, keys, wms)
        elif self.slide == self.size:
            self._tumbling(batch.values, ts, keys, wms)
        else:
            self._sliding(batch.values, ts, keys, wms)
        await self._flush_output()

    def _tumbling(self, values: list[Any], ts: list[int], keys: Any, wms: list[float]) -> None:
        accs, heap, init, add = self.accs, self.heap, self.agg.init, self.agg.add
        size, off, lateness, dirty = self.size, self.offset, self.lateness, self.dirty
        cur = self.wm
        for v, t, k, w in zip(values, ts, keys, wms, strict=False):  # keys may be repeat()
            if w > cur:
                cur = w
                if w >= self.next_due:
                    self._advance(w)
                else:
                    self.wm = w
            start = t - (t - off) % size
            end = start + size
            slot = (k, start)
            acc = accs.get(slot)
            if acc is None:
                if end + lateness <= cur:
                    self._late(v, k, t, start, end)
                    continue
                accs[slot] = init(v, t)
                self.seq += 1
                if end > cur:
                    heappush(heap, (end, self.seq, slot))
                    self.next_due = min(self.next_due, end)
                else:
                    self._opened_late(slot, end, self.seq)
                    self._result(slot, end, "late", False)
            else:
                add(acc, v, t)
                if end <= cur:
                    self._result(slot, end, "late", False)
            if dirty is not None:
                dirty.add(slot)
        self.wm = cur

    def _sliding(self, values: list[Any], ts: list[int], keys: Any, wms: list[float]) -> None:
        accs, heap, init, add = self.accs, self.heap, self.agg.init, self.agg.add
        size, slide, off, lateness, dirty = (
            self.size,
            self.slide,
            self.offset,
            self.lateness,
            self.dirty,
        )
        cur = self.wm
        for v, t, k, w in zip(values, ts, keys, wms, strict=False):  # keys may be repeat()
            if w > cur:
                cur = w
                if w >= self.next_due:
                    self._advance(w)
                else:
                    self.wm = w
            last = t - (t - off) % slide
            # Oldest window first: the order in which they will fire.
            for start in range(last - ((size - 1) // slide) * slide, last + 1, slide):
                end = start + size
                if end <= t:
                    continue
                slot = (k, start)
                acc = accs.get(slot)
                if acc is None:
                    if end + lateness <= cur:
                        self._late(v, k, t, start, end)
                        continue
                    accs[slot] = init(v, t)
                    self.seq += 1
                    if end > cur:
                        heappush(heap, (end, self.seq, slot))
                        self.next_due = min(self.next_due, end)
                    else:
                        self._opened_late(slot, end, self.seq)
                        self._result(slot, end, "late", False)
                else:
                    add(acc, v, t)
                    if end <= cur:
                        self._result(slot, end, "late", False)
                if dirty is not None:
                    dirty.add(slot)
        self.wm = cur

    def _sessions(self, values: list[Any], ts: list[int], keys: Any, wms: list[float]) -> None:
        accs, heap, init, add = self.accs, self.heap, self.agg.init, self.agg.add
        gap, lateness, dirty = self.size, self.lateness, self.dirty
        sessions, ends, seqs = self.sessions, self.session_ends, self.session_seqs
        cur = self.wm
        for v, t, k, w in zip(values, ts, keys, wms, strict=False):  # keys may be repeat()
            if w > cur:
                cur = w
                if w >= self.next_due:
                    self._advance(w)
                else:
                    self.wm = w
            sess = sessions.get(k)
            if sess is None:
                sess = sessions[k] = Sessions(gap)
            if t + gap + lateness <= cur and not sess.overlaps(t):
                if not len(sess):
                    del sessions[k]
                self._late(v, k, t, t, t + gap)
                continue
            (start, end), merged = sess.add(t)
            slot = (k, start)
            if not merged:
                acc = accs.get(slot)
                if acc is not None:  # inside an existing session: it does not change
                    add(acc, v, t)
                    if end <= cur:
                        self._result(slot, end, "late", False)
                    if dirty is not None:
                        dirty.add(slot)
                    continue
                accs[slot] = init(v, t)
                self.seq += 1
                seq = seqs[slot] = self.seq
            else:
                acc, seq, rev = self._merge_sessions(k, merged)
                add(acc, v, t)
                accs[slot] = acc
                seqs[slot] = seq
                if rev:
                    self.revs[slot] = rev
            ends[slot] = end
            if end > cur:
                heappush(heap, (end, seq, slot))
                self.next_due = min(self.next_due, end)
            else:
                self._opened_late(slot, end, seq)
                self._result(slot, end, "late", False)
            if dirty is not None:
                dirty.add(slot)
        self.wm = cur

    def _merge_sessions(self, k: Any, merged: list[tuple[int, int]]) -> tuple[list[Any], int, int]:
        """Take the sessions ``merged`` out of the state; their combined accumulator and
        opening order (the earliest) and revision count: the merged session continues
        the revisions of the sessions it absorbed."""
        acc: list[Any] | None = None
        seq = self.seq + 1
        rev = 0
        for start, _ in merged:
            old = (k, start)
            part = self.accs.pop(old)
            del self.session_ends[old]
            seq = min(seq, self.session_seqs.pop(old))
            rev = max(rev, self.revs.pop(old, 0))
            if self.dirty is not None:
                self.dirty.discard(old)
            acc = part if acc is None else self.agg.merge(acc, part)
        assert acc is not None
        return acc, seq, rev

    # -- control, timers, end ----------------------------------------------------------

    async def control(self, message: Control) -> None:
        if isinstance(message, Watermark) and not message.idle and message.time > self.wm:
            if self.spec.processing_time:
                pass  # processing-time windows follow the clock, not upstream watermarks
            elif message.time >= self.next_due:
                self._advance(message.time)
                await self._flush_output()
            else:
                self.wm = message.time
                self.metrics.watermark = self.wm
        for child in self.children:
            await child.control(message)

    async def emit(self, batch: Batch) -> None:  # pragma: no cover - output goes by ports
        raise AssertionError("the window operator emits through _flush_output")

    def uses_timer(self) -> bool:
        return self.spec.processing_time or self.spec.early_every is not None

    def next_deadline(self) -> float | None:
        d: float | None = None
        if self.spec.processing_time and self.next_due < _INF:
            now = self.clock.time()
            d = self.clock.monotonic() + max(0.0, seconds(int(self.next_due)) - now)
        if self.spec.early_every is not None and self.dirty:
            if self.next_early is None:
                self.next_early = self.clock.monotonic() + self.spec.early_every
            if d is None or self.next_early < d:
                d = self.next_early
        return d

    async def on_timer(self, now: float) -> None:
        if self.spec.processing_time:
            t = round(self.clock.time() * 1e6)
            if t >= self.next_due:
                self._advance(t)
            elif t > self.wm:
                self.wm = t
        if self.next_early is not None and now >= self.next_early:
            self.next_early = None
            self._fire_early()
        await self._flush_output()

    def _fire_early(self) -> None:
        assert self.dirty is not None
        due = []
        for slot in self.dirty:
            if slot not in self.accs:
                continue
            end = self.session_ends[slot] if self.session else slot[1] + self.size
            if end > self.wm:  # not fired on time yet
                seq = self.session_seqs.get(slot, 0)
                due.append((end, seq, slot))
        self.dirty.clear()
        for end, _, slot in sorted(due, key=lambda d: (d[0], d[1])):
            self._result(slot, end, "early", False)

    async def finish(self) -> None:
        if self.wm < _INF:
            self._advance(_INF)
            await self._flush_output()
        await super().finish()

    def pending(self) -> int:
        """Open windows (their contents are lost if the flow is cancelled)."""
        return len(self.accs)


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
        return _WindowStep(ctx, self)
