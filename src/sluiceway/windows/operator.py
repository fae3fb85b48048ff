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

import copy
import functools
import math
import textwrap
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from heapq import heapify, heappop, heappush
from itertools import islice, repeat
from typing import Any, ClassVar

from sluiceway.agg import EMPTY, Aggregator, Reduce, _Count
from sluiceway.core.delta import Incremental
from sluiceway.core.messages import Batch, Control, Watermark
from sluiceway.core.query import KeyState, OpenWindow
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.operators.incremental import GONE, ChangeLog, ChangeSets, whole_changes
from sluiceway.operators.late import Lateness, LateOutputStep
from sluiceway.time import Clock
from sluiceway.windows.assigners import Session, Sliding, Tumbling

__all__ = ["Aggregation", "LateRecord", "WindowResult", "WindowSpec"]

_INF = math.inf
_MISSING: Any = object()
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
        final: the window's last result: no later one can follow.
        kind: why it was emitted: ``"on_time"`` (the watermark reached ``end``),
            ``"early"``, ``"late"`` (a late record within the allowed lateness) or
            ``"final"`` (the window closed at ``end + allowed_lateness``).
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
class LateRecord(Lateness):
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


class Aggregation:
    """One or several aggregators compiled into code over an accumulator.

    The accumulator of a window is a list with one slot per aggregator -- or, in the
    *bare* form (:meth:`bare`, one aggregator, used by tumbling and sliding windows), the
    aggregator's own accumulator, e.g. an ``int`` for a count.  The built-ins' inline
    forms become the source of ``init(v, t)`` (the accumulator of a window's first
    record), of the update statements the window operator compiles into its record loop
    (``add_lines``, on a variable ``a``), of ``add(a, v, t)`` (returns the accumulator)
    and of ``result(a)``; user aggregators are called through create/add/result.
    """

    def __init__(
        self,
        aggs: Sequence[Aggregator[Any, Any]],
        names: Sequence[str] | None,
        *,
        bare: bool = False,
    ) -> None:
        for a in aggs:
            if not isinstance(a, Aggregator):
                raise TypeError(
                    f"aggregate() expects sw.agg aggregators (e.g. sw.agg.count()) or an "
                    f"sw.agg.Aggregator, got {type(a).__name__} {a!r}"
                )
        if bare and len(aggs) != 1:
            raise ValueError("a bare accumulator holds exactly one aggregator")
        self.aggs = list(aggs)
        self.names = None if names is None else list(names)
        self.is_bare = bare
        self.namespace: dict[str, Any] = {"_MISSING": _MISSING}
        init: list[str] = []
        self.add_lines: list[str] = []
        results: list[str] = []
        for i, agg in enumerate(self.aggs):
            slot = "a" if bare else f"a[{i}]"
            self.namespace[f"g{i}"] = agg
            self.namespace[f"f{i}"] = getattr(agg, "fn", None)
            inline = agg._inline(slot, f"f{i}")
            result = agg._inline_result(slot) if inline is not None else None
            if inline is None:
                init.append(f"g{i}.add(g{i}.create(), v)")
                self.add_lines.append(f"{slot} = g{i}.add({slot}, v)")
            else:
                init.append(inline[0])
                self.add_lines.extend(inline[1])
            results.append(result or f"g{i}.result({slot})")
        self.init_expr = init[0] if bare else f"[{', '.join(init)}]"
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
            f"def add(a, v, t):\n    " + "\n    ".join(self.add_lines) + "\n    return a\n"
            f"def result(a):\n    return {result_expr}\n"
        )
        ns = self.compile(src)
        self.init: Callable[[Any, int], Any] = ns["init"]
        self.add: Callable[[Any, Any, int], Any] = ns["add"]
        self.result: Callable[[Any], Any] = ns["result"]
        self.copy = self._copier()
        """``copy(acc)``: an accumulator that shares nothing the window changes in place
        (for a change set, which is serialised after the barrier); None: they never are
        (a count)."""

    def _copier(self) -> Callable[[Any], Any] | None:
        slots = [_slot_copier(a) for a in self.aggs]
        if self.is_bare:
            return slots[0]
        if all(c is None for c in slots):
            return list.copy
        copiers = [c or _same for c in slots]
        return lambda a: [c(x) for c, x in zip(copiers, a, strict=True)]

    def bare(self) -> Aggregation:
        """The bare form of a one-aggregator aggregation (self if already bare)."""
        return self if self.is_bare else Aggregation(self.aggs, self.names, bare=True)

    def compile(self, src: str) -> dict[str, Any]:
        """Run generated ``src`` with the aggregators in scope; returns its namespace."""
        ns = dict(self.namespace)
        exec(_code(src), ns)  # our own generated code
        return ns

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        return [g.merge(x, y) for g, x, y in zip(self.aggs, a, b, strict=True)]


_ATOMIC = frozenset({int, float, complex, str, bytes, bool, type(None), type(EMPTY)})


def _same(x: Any) -> Any:
    return x


def _shallow(x: Any) -> Any:
    """A built-in's accumulator: a number or ``EMPTY``, or a list or set (of the user's
    values, which the window never changes) that the window changes in place."""
    return x.copy() if type(x) in (list, set, dict) else x


def _deep(x: Any) -> Any:
    """A user aggregator's or a reduce's accumulator: anything, maybe changed in place."""
    return x if type(x) in _ATOMIC else copy.deepcopy(x)


def _slot_copier(agg: Aggregator[Any, Any]) -> Callable[[Any], Any] | None:
    if type(agg) is _Count:
        return None  # an int
    if type(agg).__module__ == Aggregator.__module__ and not isinstance(agg, Reduce):
        return _shallow
    return _deep


def _seconds(ticks: float) -> float | None:
    return ticks / 1e6 if math.isfinite(ticks) else None


@functools.lru_cache(maxsize=256)
def _code(src: str) -> types.CodeType:
    """Generated source, compiled once per distinct text."""
    return compile(src, "<sluiceway window>", "exec")


class _WindowStep(ChangeSets, LateOutputStep):
    """What every window operator shares: output, late records, watermarks, timers."""

    what = "window operator"

    def __init__(self, ctx: BuildContext, spec: WindowSpec) -> None:
        super().__init__(ctx.name, ctx.metrics, ctx.flow, spec.late_output)
        self.spec = spec
        self.clock: Clock = ctx.clock
        self.agg = spec.aggregation
        self.lateness = spec.lateness
        self.wm: float = -_INF
        self.rec_wm: float = -_INF  # the watermark carried by the last record seen
        self.sent_wm: float = -_INF  # the latest watermark sent on
        self.next_due: float = _INF  # the earliest watermark at which something happens
        self.dirty: Any = None  # windows changed since the last early firing
        self.next_early: float | None = None
        # Output of the batch being processed.
        self.out: list[WindowResult] = []
        self.out_ts: list[int] = []
        self.out_keys: list[Any] = []
        self.out_wms: list[float] = []
        self.late: list[LateRecord] = []
        self.late_ts: list[int] = []
        self.late_keys: list[Any] = []
        self.late_wms: list[float] = []
        # Final panes fired and not yet sent: (pane, start, end, carried watermark).
        self.fired: list[tuple[dict[Any, list[Any]], int, int, float]] = []
        self.chunk = ctx.max_batch_size
        self.changes = ChangeLog(ctx.name)  # what changed since the last snapshot

    # -- output ------------------------------------------------------------------------

    def _emit(
        self, k: Any, start: int, end: int, acc: list[Any], kind: str, final: bool, rev: int
    ) -> None:
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

    async def _flush_output(self) -> None:
        """Send the results and late records gathered so far; metrics first, so that
        whoever looks while they travel sees the state they came from."""
        main = self.outputs()[0]
        m = self.metrics
        m.state = self.open_windows()
        m.watermark = self.wm / 1e6
        results, late = None, None
        if self.out:
            results = Batch(self.out, self.out_ts, self.out_keys, self.out_wms)
            m.records_out += len(self.out)
            self.out, self.out_ts, self.out_keys, self.out_wms = [], [], [], []
        if self.late:
            late = Batch(self.late, self.late_ts, self.late_keys, self.late_wms)
            m.late += len(self.late)
            self.late, self.late_ts, self.late_keys, self.late_wms = [], [], [], []
        if results is not None:
            for child in main:
                await child.push(results)
        while self.fired:
            await self._send_pane(*self.fired.pop(0), main)
        if late is not None:
            await self.send_late(late)

    async def _send_pane(
        self, pane: dict[Any, list[Any]], start: int, end: int, wm: float, to: list[Step]
    ) -> None:
        """The results of a fired, final pane, built and sent a batch at a time."""
        result, s, e = self.agg.result, start / 1e6, end / 1e6
        items = iter(pane.items())
        while chunk := list(islice(items, self.chunk)):
            n = len(chunk)
            batch = Batch(
                [WindowResult(k, s, e, result(a)) for k, a in chunk],
                [end - 1] * n,
                [k for k, _ in chunk],
                [wm] * n,
            )
            self.metrics.records_out += n
            for child in to:
                await child.push(batch)

    async def emit(self, batch: Batch) -> None:  # pragma: no cover - output goes by ports
        raise AssertionError("the window operator emits through _flush_output")

    # -- records and time ----------------------------------------------------------------

    def _records(self, values: list[Any], ts: list[int], keys: Any, wms: list[float]) -> None:
        raise NotImplementedError

    def _advance(self, wm: float) -> None:
        """Move to watermark ``wm``: fire what is due, close what expired, set ``wm``.

        The results carry (in their watermark column) the watermark of the last record
        before them, ``rec_wm``: that depends only on the records, not on how many
        steps -- control messages after each batch -- the watermark took to get here.
        A window over the results is then as independent of batch cuts as this one.
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
        ):
            if message.time > self.wm:
                if message.time >= self.next_due:
                    self._advance(message.time)
                    await self._flush_output()
                else:
                    self.wm = message.time
                    self.metrics.watermark = self.wm / 1e6
            # Results to come carry the watermark of the record before them (rec_wm, see
            # _advance), never less than now: a watermark sent on must not be more, or
            # where the control messages fall -- batch sizes -- would decide which of
            # them are late for a window over the results.
            if self.rec_wm > self.sent_wm:
                self.sent_wm = self.rec_wm
                await super().control(Watermark(self.rec_wm))
            return
        await super().control(message)

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
        if self.sent_wm < _INF and not self.spec.processing_time:
            # Nothing more can come: a fan-in after this stops waiting for it.
            self.sent_wm = _INF
            await super().control(Watermark(_INF))
        await super().finish()

    def open_windows(self) -> int:
        """How many windows the operator holds."""
        raise NotImplementedError

    # -- checkpoints -------------------------------------------------------------------

    _STATE: ClassVar[tuple[str, ...]] = ("wm", "rec_wm", "sent_wm", "next_due", "dirty")
    """The attributes that held the operator's state in a snapshot of the earlier format
    (a dict of them, restored by :meth:`restore`)."""
    _TIMES: ClassVar[tuple[str, ...]] = ("wm", "rec_wm", "sent_wm", "next_due")

    def accept_changes(self, accepted: bool) -> None:
        """Whether the checkpoint store takes change sets (see :meth:`snapshot`)."""
        self.changes.accept(accepted)

    def snapshot(self) -> Incremental:
        """The open windows as :class:`~sluiceway.core.delta.Changes` of partition None,
        one entry per window state key (a grid window: ``(key, start)``; a key's
        sessions: ``key``), the watermarks and the per-pane heaps in ``extra``.

        Whole, unless the checkpoint side takes change sets (:meth:`accept_changes`):
        then only the first snapshot (and the first after a restore) is whole, and each
        later one holds the windows opened, updated, fired or closed since the one
        before.  Accumulators are copied: the snapshot shares nothing the operator
        changes afterwards.
        """
        # Between batches, everything fired has been sent: only open windows remain.
        assert not self.fired, "snapshot mid-batch"
        assert not self.out, "snapshot mid-batch"
        assert not self.late, "snapshot mid-batch"
        extra = {name: getattr(self, name) for name in self._TIMES}
        extra.update(self._extra(), format=2, early_pending=self.next_early is not None)
        return self._change_set(extra)

    def _extra(self) -> dict[str, Any]:
        """The rest of the state, copied (it goes in every snapshot)."""
        raise NotImplementedError

    def _size(self) -> int:
        """How many entries a whole snapshot has (one per window by default)."""
        return self.open_windows()

    def restore(self, state: Any) -> None:
        """Load a whole :class:`~sluiceway.core.delta.Incremental`, or a snapshot of the
        earlier format (a dict of the operator's attributes, written before windows took
        change sets)."""
        if isinstance(state, Incremental):
            changes = whole_changes(self.name, state)
            pending = False
            if changes is not None:
                extra = changes.extra
                for name in self._TIMES:
                    setattr(self, name, extra[name])
                self._load(changes.upserts, extra)
                pending = extra["early_pending"]
        else:
            for name in self._STATE:
                if name in state:  # (sent_wm is not in checkpoints of earlier versions)
                    setattr(self, name, state[name])
            self._loaded_format1()
            pending = state["early_pending"]
        self.changes.restored()
        self._taken()
        if pending:  # a processing-time deadline: restart it on this clock
            assert self.spec.early_every is not None
            self.next_early = self.clock.monotonic() + self.spec.early_every
        self.metrics.state = self.open_windows()
        self.metrics.watermark = self.wm / 1e6

    def _loaded_format1(self) -> None:
        """After a snapshot of the earlier format was loaded into the attributes."""

    def pending(self) -> int:
        """Open windows, and results of fired ones not sent yet (lost if cancelled)."""
        return self.open_windows() + sum(len(f[0]) for f in self.fired)


# The record loops of tumbling and sliding windows, generated per operator (see
# _grid_loops): ``exact`` follows the watermark record by record; ``fast`` is for a batch
# in which no watermark can fire a window or make a record late (see
# _GridWindowStep.push).  ``{WINDOWS}`` handles each window of a record.
_EXACT = """
def records(self, values, ts, keys, wms):
    panes = self.panes
    size = self.size
    slide = self.slide
    off = self.offset
    back = self.back
    missing = _MISSING
    changed = self.changes.changed
    fresh = self.fresh
    cur = self.wm
    due = self.next_due
    last_wm = self.rec_wm
    for v, t, k, w in zip(values, ts, keys, wms):
        if w > cur:
            cur = w
            if w >= due:
                self.rec_wm = last_wm
                self._advance(w)
                due = self.next_due
        last_wm = w
{WINDOWS}
    self.wm = cur
    self.rec_wm = last_wm
"""
_FAST = """
def records(self, values, ts, keys):
    panes = self.panes
    size = self.size
    slide = self.slide
    off = self.offset
    back = self.back
    missing = _MISSING
    changed = self.changes.changed
    fresh = self.fresh
    for v, t, k in zip(values, ts, keys):
{WINDOWS}
"""
# One window ``start`` of record ``v``: the common case inline -- an open pane the
# watermark has not reached, the aggregation's update statements (``{ADD}``) or its first
# accumulator (``{INIT}``) -- everything else in ``_open``.  ``continue`` goes on with
# the next window (sliding) or the next record (tumbling).
_WINDOW = """\
pane = panes.get(start)
if pane is not None{ON_TIME}:
    a = pane.get(k{MISSING})
    if a is not {NONE}:
{ADD}
    else:
        pane[k] = {INIT}
{MARK}
    continue
{BEFORE_OPEN}
self._open(v, t, k, start, pane)
{AFTER_OPEN}"""


def _grid_loops(
    agg: Aggregation, tumbling: bool, offset: bool, uneven: bool, early: bool, track: bool
) -> tuple[str, str]:
    """The source of the exact and the fast record loop of a grid window operator
    (``track``: marking each window a record changes, for change sets)."""
    loops = []
    marks = []
    if early:
        marks.append("    self.dirty.add((k, start))")
    if track:
        marks.append("    if start not in fresh:\n        changed[k, start] = None")
    for exact in (True, False):
        window = _WINDOW.format(
            ON_TIME=" and start + size > cur" if exact else "",
            ADD=textwrap.indent(
                "\n".join([*agg.add_lines, "pane[k] = a"] if agg.is_bare else agg.add_lines),
                " " * 8,
            ),
            INIT=agg.init_expr,
            # A bare accumulator may be None (a reduce over None values): a sentinel.
            MISSING=", missing" if agg.is_bare else "",
            NONE="missing" if agg.is_bare else "None",
            MARK="\n".join(marks),
            BEFORE_OPEN="self.wm = cur" if exact else "",
            AFTER_OPEN="due = self.next_due" if exact else "",
        )
        if tumbling:
            start = "t - (t - off) % size" if offset else "t - t % size"
            windows = textwrap.indent(f"start = {start}\n{window}", " " * 8)
        else:
            skip = "    if start + size <= t:\n        continue\n" if uneven else ""
            windows = textwrap.indent(
                "grid = t - (t - off) % slide\n"
                "for start in range(grid - back, grid + 1, slide):\n"
                + skip
                + textwrap.indent(window, " " * 4),
                " " * 8,
            )
        loops.append((_EXACT if exact else _FAST).format(WINDOWS=windows))
    return loops[0], loops[1]


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
        else:
            self.size, self.slide = assigner.size_ticks, assigner.slide_ticks
        self.offset = assigner.offset_ticks
        self.back = ((self.size - 1) // self.slide) * self.slide
        self.panes: dict[int, dict[Any, list[Any]]] = {}
        # Results emitted so far per window; needed only when a window can fire twice.
        self.revs: dict[tuple[Any, int], int] | None = (
            {} if spec.lateness or spec.early_every else None
        )
        self.dirty: set[tuple[Any, int]] | None = set() if spec.early_every else None
        self.heap: list[int] = []  # ends of panes to fire
        self.expiry: list[int] = []  # end + lateness of panes that fired
        # While change sets are taken: the panes opened since the last snapshot.  Their
        # windows are not marked one by one: the next change set holds all of them, and
        # one that closes before it is in no change set at all.
        self.fresh: set[int] = set()
        if len(self.agg.aggs) == 1:  # the accumulator itself in the pane, no list around it
            self.agg = self.agg.bare()
        self.tumbling = isinstance(assigner, Tumbling)
        self._compile()

    def _compile(self) -> None:
        """The record loops for this operator (again when change tracking starts)."""
        loops = _grid_loops(
            self.agg,
            tumbling=self.tumbling,
            offset=self.offset != 0,
            uneven=self.size % self.slide != 0,
            early=self.spec.early_every is not None,
            track=self.changes.changed is not None,
        )
        exact, fast = (self.agg.compile(src)["records"] for src in loops)
        self._records = types.MethodType(exact, self)  # type: ignore[method-assign]
        self._records_fast = types.MethodType(fast, self)

    def accept_changes(self, accepted: bool) -> None:
        tracking = self.changes.changed is not None
        super().accept_changes(accepted)
        if tracking != (self.changes.changed is not None):
            self.fresh.clear()
            self._compile()

    def _earliest_end(self, t: int) -> int:
        """The earliest end among the windows holding instant ``t``."""
        x = t - self.size
        return x - (x - self.offset) % self.slide + self.slide + self.size

    async def push(self, batch: Batch) -> None:
        base = batch.watermark_base
        if base is None or self.spec.processing_time or not batch.values:
            await super().push(batch)
            return
        # With the implicit watermark column, skip it when no watermark inside this batch
        # can matter: none reaches the next window end (nothing fires) and every record's
        # windows end after the batch's last watermark (none is late).  The outcome is
        # the same as record by record; a batch that does not qualify goes that way.
        ts = batch.timestamps
        assert ts is not None
        first, bound = base
        hi = max(ts)
        after = max(first, hi) - bound
        if after >= self.next_due or self._earliest_end(min(ts)) <= after:
            await super().push(batch)
            return
        self.metrics.records_in += len(ts)
        self._records_fast(batch.values, ts, batch.keys or repeat(None))
        # The watermark the last record came with: the largest timestamp before it.
        before = hi if ts[-1] < hi else max(ts[:-1], default=first)
        before_last = max(first, before) - bound
        self.wm = max(self.wm, before_last)
        self.rec_wm = before_last
        await self._flush_output()

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
                self._mark(k, start)
        self._emit(k, start, end, acc, kind, final, rev)

    def _mark(self, k: Any, start: int) -> None:
        """Window ``(k, start)`` changed (for the next change set)."""
        changed = self.changes.changed
        if changed is not None and start not in self.fresh:
            changed[k, start] = None

    def _forget(self, k: Any, start: int) -> None:
        """Window ``(k, start)`` is gone: drop its revision count and early mark."""
        if self.revs is not None:
            self.revs.pop((k, start), None)
        if self.dirty is not None:
            self.dirty.discard((k, start))

    def _open(self, v: Any, t: int, k: Any, start: int, pane: dict[Any, list[Any]] | None) -> None:
        """A record for a window without a pane yet, or one the watermark passed."""
        end = start + self.size
        cur = self.wm
        lateness = self.lateness
        if end + lateness <= cur:
            self._late(v, k, t, start, end)
            return
        if pane is None:
            pane = self.panes[start] = {}
            if self.changes.changed is not None:
                self.fresh.add(start)
            if end > cur:
                heappush(self.heap, end)
                self.next_due = min(self.next_due, end)
            else:  # the window's time passed, but within allowed lateness
                heappush(self.expiry, end + lateness)
                self.next_due = min(self.next_due, end + lateness)
        a = pane.get(k, _MISSING)
        if a is _MISSING:
            a = pane[k] = self.agg.init(v, t)
        else:
            a = pane[k] = self.agg.add(a, v, t)
        self._mark(k, start)
        if end <= cur:  # a late firing, within allowed lateness
            self._result(k, start, end, a, "late", False)
        if self.dirty is not None:
            self.dirty.add((k, start))

    _STATE = (*_WindowStep._STATE, "panes", "revs", "heap", "expiry")

    # A window's entry in a snapshot: ``(key, start) -> accumulator``, or with results
    # counted (allowed lateness, early firing) ``(key, start) -> (accumulator, revision)``.

    def _entries(self) -> Iterator[tuple[Any, Any]]:
        for start, pane in self.panes.items():
            yield from self._pane_entries(start, pane)

    def _pane_entries(self, start: int, pane: dict[Any, Any]) -> Iterator[tuple[Any, Any]]:
        revs, acc_copy = self.revs, self.agg.copy
        if revs is None and acc_copy is None:  # (a count: ints, as they are)
            yield from zip(zip(pane, repeat(start)), pane.values(), strict=True)
            return
        for k, a in pane.items():
            acc = a if acc_copy is None else acc_copy(a)
            yield (k, start), acc if revs is None else (acc, revs.get((k, start), 0))

    def _fresh_entries(self) -> Iterator[tuple[Any, Any]]:
        for start in sorted(self.fresh):
            yield from self._pane_entries(start, self.panes[start])

    def _fresh_size(self) -> int:
        return sum(len(self.panes[start]) for start in self.fresh)

    def _taken(self) -> None:
        self.fresh.clear()

    def _entry(self, key: Any, mark: Any) -> Any:
        k, start = key
        pane = self.panes.get(start)
        a = _MISSING if pane is None else pane.get(k, _MISSING)
        if a is _MISSING:
            return GONE
        acc = a if self.agg.copy is None else self.agg.copy(a)
        return acc if self.revs is None else (acc, self.revs.get(key, 0))

    def _extra(self) -> dict[str, Any]:
        early = None if self.dirty is None else set(self.dirty)  # (order: no matter)
        return {"heap": list(self.heap), "expiry": list(self.expiry), "early": early}

    def _load(self, upserts: dict[Any, Any], extra: dict[str, Any]) -> None:
        panes: dict[int, dict[Any, Any]] = {}
        revs = self.revs
        if revs is not None:
            revs.clear()
        for (k, start), entry in upserts.items():
            pane = panes.get(start)
            if pane is None:
                pane = panes[start] = {}
            if revs is None:
                pane[k] = entry
            else:
                pane[k], rev = entry
                if rev:
                    revs[k, start] = rev
        self.panes = panes
        self.heap = list(extra["heap"])
        self.expiry = list(extra["expiry"])
        heapify(self.heap)
        heapify(self.expiry)
        if self.dirty is not None:
            self.dirty = set(extra["early"] or ())

    def query(self, key: Any, at: float | None) -> KeyState:
        wm = self.wm
        tick = None if at is None else round(at * 1e6)
        found: list[OpenWindow] = []
        for start in sorted(self.panes):
            pane = self.panes[start]
            if key not in pane:
                continue
            end = start + self.size
            if tick is not None and not start <= tick < end:
                continue
            value = copy.deepcopy(self.agg.result(pane[key]))
            found.append(OpenWindow(start / 1e6, end / 1e6, value, end <= wm))
        return KeyState(bool(found), tuple(found), None, _seconds(wm))

    def open_windows(self) -> int:
        return sum(map(len, self.panes.values()))

    def _advance(self, wm: float) -> None:
        heap, expiry, panes = self.heap, self.expiry, self.panes
        size, lateness = self.size, self.lateness
        self.wm = self.rec_wm  # what the results carry: see _WindowStep._advance
        # Firings (at end) and closings (at end + lateness) in time order, firings first
        # on a tie: the same sequence however the watermark got to ``wm``.
        while True:
            if heap and heap[0] <= wm and (not expiry or heap[0] <= expiry[0]):
                end = heappop(heap)
                start = end - size
                self._fire_pane(panes[start], start, end, "on_time", not lateness)
                if lateness:
                    heappush(expiry, end + lateness)
                else:
                    self._drop_pane(start)
            elif expiry and expiry[0] <= wm:
                start = heappop(expiry) - lateness - size
                self._fire_pane(panes[start], start, start + size, "final", True)
                self._drop_pane(start)
            else:
                break
        self.next_due = min(heap[0] if heap else _INF, expiry[0] if expiry else _INF)
        self.wm = wm

    def _fire_pane(
        self, pane: dict[Any, list[Any]], start: int, end: int, kind: str, final: bool
    ) -> None:
        if self.revs is not None:
            for k, a in pane.items():
                self._result(k, start, end, a, kind, final)
            return
        # The common case (no lateness, no early firing): every result is final, revision
        # 0, and the pane leaves the state now.  Its results are built when they are sent,
        # a batch at a time: a pane of 100,000 keys never exists twice over in memory.
        # (Without lateness nothing else produces results, so the order is kept.)
        self.fired.append((pane, start, end, self.wm))

    def _drop_pane(self, start: int) -> None:
        pane = self.panes.pop(start)
        if self.revs is not None or self.dirty is not None:
            for k in pane:
                self._forget(k, start)
        if start in self.fresh:  # opened and closed since the last snapshot: in neither
            self.fresh.discard(start)  # (its windows were never marked)
        elif self.changes.changed is not None:  # every window of the pane is gone
            self.changes.changed.update(dict.fromkeys(zip(pane, repeat(start))))

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


# A session: [start, end, accumulator, opening order, results emitted, fired].  ``fired``:
# it has fired for its current end (it fires again only after growing past it).
_S, _E, _ACC, _OPENED, _REVS, _FIRED = range(6)


class _SessionWindowStep(_WindowStep):
    """Session windows: per key, a short list of disjoint sessions that grow and merge.

    ``sessions[key]`` lists the key's open sessions by start (nearly always one).  The heap
    holds one live ``(due, n, key)`` entry per key, ``due[key]`` at or before the earliest
    moment one of its sessions must fire or expire; sessions only grow, so growing one
    needs no new entry -- when an entry comes due, the key's sessions are checked and the
    key rescheduled.
    """

    def __init__(self, ctx: BuildContext, spec: WindowSpec, assigner: Session) -> None:
        super().__init__(ctx, spec)
        self.gap = assigner.gap_ticks
        self.sessions: dict[Any, list[list[Any]]] = {}
        self.due: dict[Any, float] = {}
        self.heap: list[tuple[float, int, Any]] = []
        self.seq = 0
        self.open = 0
        # Early firing: the sessions changed since the last one, by identity.
        self.dirty: dict[int, tuple[Any, list[Any]]] | None = {} if spec.early_every else None

    _STATE = (*_WindowStep._STATE, "sessions", "due", "heap", "seq", "open")

    # A key's entry in a snapshot: ``key -> (sessions, due)``, each session a tuple as in
    # ``sessions`` with its accumulator copied.

    def _entries(self) -> Iterator[tuple[Any, Any]]:
        entry = self._key_entry
        for k, ss in self.sessions.items():
            yield k, entry(k, ss)

    def _key_entry(self, k: Any, ss: list[list[Any]]) -> Any:
        acc_copy = self.agg.copy
        assert acc_copy is not None  # (a session's accumulator is a list)
        return (
            tuple((s[_S], s[_E], acc_copy(s[_ACC]), *s[_OPENED:]) for s in ss),
            self.due[k],
        )

    def _entry(self, key: Any, mark: Any) -> Any:
        ss = self.sessions.get(key)
        return GONE if ss is None else self._key_entry(key, ss)

    def _size(self) -> int:
        return len(self.sessions)

    def _extra(self) -> dict[str, Any]:
        dirty = self.dirty
        # (a set: _early sorts what it fires)
        early = None if dirty is None else {(k, s[_OPENED]) for k, s in dirty.values()}
        return {"seq": self.seq, "open": self.open, "early": early}

    def _load(self, upserts: dict[Any, Any], extra: dict[str, Any]) -> None:
        self.sessions = {k: [list(s) for s in ss] for k, (ss, _) in upserts.items()}
        self.due = {k: due for k, (_, due) in upserts.items()}
        self.seq = extra["seq"]
        self.open = extra["open"]
        # One live entry per key (see the class), told apart by numbers below every
        # sequence number, so that ``seq`` goes on as in the run that took the snapshot.
        heap = [(due, -i, k) for i, (k, due) in enumerate(self.due.items(), 1)]
        heapify(heap)
        self.heap = heap
        # (the checkpoint's value is this one, unless an earlier version -- which left
        # superseded entries on top of the heap -- wrote it: see _next_due)
        self._next_due()
        if self.dirty is not None:
            by_opening = {(k, s[_OPENED]): s for k, ss in self.sessions.items() for s in ss}
            self.dirty = {}
            for k, opened in extra["early"] or ():
                s = by_opening[k, opened]
                self.dirty[id(s)] = (k, s)

    def _loaded_format1(self) -> None:
        self._next_due()  # (the heap was saved with its superseded entries: see _next_due)
        if self.dirty:  # keyed by the identity of each session: new objects, new ids
            self.dirty = {id(s): (k, s) for k, s in self.dirty.values()}

    def query(self, key: Any, at: float | None) -> KeyState:
        tick = None if at is None else round(at * 1e6)
        found: list[OpenWindow] = []
        for s in self.sessions.get(key, ()):
            start, end = s[_S], s[_E]
            if tick is not None and not start <= tick < end:
                continue
            value = copy.deepcopy(self.agg.result(s[_ACC]))
            found.append(OpenWindow(start / 1e6, end / 1e6, value, bool(s[_FIRED])))
        return KeyState(bool(found), tuple(found), None, _seconds(self.wm))

    def open_windows(self) -> int:
        return self.open

    def _records(  # noqa: PLR0915 - one hot loop; helpers would cost a call per record
        self, values: list[Any], ts: list[int], keys: Any, wms: list[float]
    ) -> None:
        sessions, add, init = self.sessions, self.agg.add, self.agg.init
        gap, dirty, changed = self.gap, self.dirty, self.changes.changed
        cur = self.wm
        due = self.next_due
        last = self.rec_wm
        for v, t, k, w in zip(values, ts, keys, wms, strict=False):  # keys may be repeat()
            if w > cur:
                cur = w
                if w >= due:
                    self.rec_wm = last
                    self._advance(w)
                    due = self.next_due
            last = w
            if changed is not None:  # (a late record marks its key for nothing: harmless)
                changed[k] = None
            ss = sessions.get(k)
            e = t + gap
            if ss is not None:
                s = ss[-1]  # the key's latest session: where most records go
                if s[_S] < e and t < s[_E]:
                    if len(ss) == 1 or ss[-2][_E] <= t:  # in or next to it, bridging nothing
                        add(s[_ACC], v, t)
                        if t < s[_S]:  # noqa: PLR1730 - an if is cheaper than min() here
                            s[_S] = t
                        if e > s[_E]:  # noqa: PLR1730
                            s[_E] = e
                        if s[_E] <= cur or s[_FIRED]:
                            self.wm = cur
                            self._changed(k, s)
                            due = self.next_due
                        if dirty is not None:
                            dirty[id(s)] = (k, s)
                        continue
                elif t >= s[_E] and e > cur and not s[_FIRED]:
                    # A new session after the latest: the key's heap entry, due no later
                    # than the end of the latest (which has not fired), stands for it too.
                    self.seq += 1
                    s = [t, e, init(v, t), self.seq, 0, False]
                    ss.append(s)
                    self.open += 1
                    if dirty is not None:
                        dirty[id(s)] = (k, s)
                    continue
            elif e > cur:  # the first session of a key
                self.seq += 1
                s = [t, e, init(v, t), self.seq, 0, False]
                sessions[k] = [s]
                self.open += 1
                self.wm = cur
                self._schedule(k, e)
                due = self.next_due
                if dirty is not None:
                    dirty[id(s)] = (k, s)
                continue
            self.wm = cur
            self._record(v, t, k, ss)
            due = self.next_due
        self.wm = cur
        self.rec_wm = last

    def _record(self, v: Any, t: int, k: Any, ss: list[list[Any]] | None) -> None:
        """The general case: a new session, or one that joins several."""
        e = t + self.gap
        if ss is None:
            ss = []
        hits = [s for s in ss if s[_S] < e and t < s[_E]]
        if not hits:
            if e + self.lateness <= self.wm:
                self._late(v, k, t, t, e)
                return
            self.seq += 1
            s: list[Any] = [t, e, self.agg.init(v, t), self.seq, 0, False]
            self.sessions[k] = ss
            ss.append(s)
            ss.sort(key=lambda x: x[_S])
            self.open += 1
        else:
            s = hits[0]
            for other in hits[1:]:  # the record bridges sessions: merge them into the first
                s[_ACC] = self.agg.merge(s[_ACC], other[_ACC])
                s[_E] = max(s[_E], other[_E])
                s[_OPENED] = min(s[_OPENED], other[_OPENED])
                s[_REVS] = max(s[_REVS], other[_REVS])
                ss.remove(other)
                self.open -= 1
                if self.dirty is not None:
                    self.dirty.pop(id(other), None)
            s[_FIRED] = False
            self.agg.add(s[_ACC], v, t)
            s[_S] = min(s[_S], t)
            s[_E] = max(s[_E], e)
        self._changed(k, s)
        if self.dirty is not None:
            self.dirty[id(s)] = (k, s)

    def _changed(self, k: Any, s: list[Any]) -> None:
        """Session ``s`` of ``k`` grew: fire it at once if its end passed, else make sure
        it fires at its (new) end."""
        end = s[_E]
        if end <= self.wm:  # within allowed lateness (a late record would not get here)
            self._emit(k, s[_S], end, s[_ACC], "late", False, s[_REVS])
            s[_REVS] += 1
            s[_FIRED] = True
            self._schedule(k, end + self.lateness)
        else:
            s[_FIRED] = False
            self._schedule(k, end)

    def _schedule(self, k: Any, when: float) -> None:
        if when < self.due.get(k, _INF):
            self.due[k] = when
            self.seq += 1
            heappush(self.heap, (when, self.seq, k))
            self.next_due = min(self.next_due, when)

    def _advance(self, wm: float) -> None:
        heap, due, sessions, lateness = self.heap, self.due, self.sessions, self.lateness
        self.wm = self.rec_wm  # what the results carry: see _WindowStep._advance
        # (time, 0 = fires / 1 = closes, opening order, key, session): emitted sorted, so
        # the sequence does not depend on the steps the watermark took to get here.
        events: list[tuple[int, int, int, Any, list[Any]]] = []
        changed = self.changes.changed
        while heap and heap[0][0] <= wm:
            d, _, k = heappop(heap)
            if due.get(k) != d:
                continue  # superseded by an earlier entry, which already ran
            if changed is not None:
                changed[k] = None
            keep = []
            nxt = _INF
            for s in sessions[k]:
                end = s[_E]
                if not s[_FIRED] and end <= wm:
                    s[_FIRED] = True
                    events.append((end, 0, s[_OPENED], k, s))
                if end + lateness <= wm:
                    if lateness:
                        events.append((end + lateness, 1, s[_OPENED], k, s))
                    self.open -= 1
                    if self.dirty is not None:
                        self.dirty.pop(id(s), None)
                    continue
                keep.append(s)
                nxt = min(nxt, end + lateness if s[_FIRED] else end)
            if keep:
                sessions[k] = keep
                due[k] = nxt
                self.seq += 1
                heappush(heap, (nxt, self.seq, k))
            else:
                del sessions[k]
                del due[k]
        events.sort(key=lambda e: (e[0], e[1], e[2]))
        for _, closes, _, k, s in events:
            if closes:
                self._emit(k, s[_S], s[_E], s[_ACC], "final", True, s[_REVS])
            else:
                self._emit(k, s[_S], s[_E], s[_ACC], "on_time", not lateness, s[_REVS])
            s[_REVS] += 1
        self._next_due()
        self.wm = wm

    def _next_due(self) -> None:
        """``next_due`` = the earliest ``due`` of a key, exactly: a function of the state.

        Superseded heap entries (a key rescheduled earlier, or gone) stay until they come
        up; those on top are dropped here, as the next ``_advance`` would drop them.  Left
        there, ``next_due`` would be the stale time of one -- early, and depending on the
        history of the heap, which a checkpoint does not keep: an operator restored from
        one (its heap rebuilt from ``due``) would hold another ``next_due`` than the one
        that never stopped, and so would their later snapshots.
        """
        heap, due = self.heap, self.due
        while heap and due.get(heap[0][2]) != heap[0][0]:
            heappop(heap)
        self.next_due = heap[0][0] if heap else _INF

    def _early(self) -> None:
        dirty = self.dirty
        assert dirty is not None
        due = sorted(
            ((s[_E], s[_OPENED], k, s) for k, s in dirty.values() if s[_E] > self.wm),
            key=lambda d: (d[0], d[1]),
        )
        for end, _, k, s in due:
            self._emit(k, s[_S], end, s[_ACC], "early", False, s[_REVS])
            s[_REVS] += 1
            self.changes.mark(k)


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
