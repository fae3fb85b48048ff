"""Window join: the pairs of two keyed streams whose records share a window.

For tumbling and sliding windows a record belongs to the windows the assigner gives its
time (``sw.windows.Tumbling`` / ``Sliding``, the same grid as ``stream.window``); for
session windows, the sessions are built per key over the records of *both* inputs.

A window's results leave together when the join's watermark (the minimum over the two
inputs) reaches ``end + allowed_lateness`` ("the window closes"):

- ``how="inner"``: every pair ``(left, right)`` of the key in the window;
- ``how="left"``: also ``(left, None)`` for a left record without a right one;
- ``how="full"``: also ``(None, right)`` for a right record without a left one.

Each result has the window's last instant (``end`` minus a microsecond) as its event
time.  Results leave window by window, in order of closing time and then of start; within
a window, key by key in the order of each key's first left record (keys with only right
records after them, in the order of their first right record); within a key, left record
by left record, each with the right records in their order -- an order that does not
depend on batch cuts or on how the inputs interleaved.

A record is late -- it goes to ``.late()`` -- when its window closed by its *own* input's
watermark (tumbling, sliding: ``end + allowed_lateness <= watermark``, per window it
misses) or, for sessions, when its time is more than ``allowed_lateness`` behind that
watermark (a session that closed may not grow again).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from heapq import heapify, heappop, heappush
from itertools import count, product, repeat
from typing import Any, ClassVar, Literal

from sluiceway.joins.base import INF, JoinSpec, JoinStep, WatermarkColumn, gc_paused
from sluiceway.operators.base import BuildContext, Step
from sluiceway.operators.incremental import GONE
from sluiceway.windows.assigners import Session, Sliding, Tumbling

__all__ = ["WindowJoinSpec"]

How = Literal["inner", "left", "full"]
_INF_SEQ = 1 << 62  # the order of a key without left records: after every key with one


def _pairs(lefts: list[Any], rights: list[Any], how: How) -> Iterable[tuple[Any, Any]]:
    """The results of one key in one window, left record by left record (made in C:
    ``product`` and ``zip`` build the tuples at a third of a comprehension's cost)."""
    if lefts and rights:
        return product(lefts, rights)
    if lefts and how != "inner":
        return zip(lefts, repeat(None))
    if rights and how == "full":
        return zip(repeat(None), rights)
    return ()


# One key in one window: [first left seq, first right seq, lefts, rights] (records in
# arrival order; a first seq of _INF_SEQ until that side has a record).
_FL, _FR, _LS, _RS = range(4)


class _GridJoinStep(JoinStep):
    """Tumbling and sliding windows: ``panes[start][key]`` as above."""

    def __init__(self, ctx: BuildContext, spec: WindowJoinSpec, a: Tumbling | Sliding) -> None:
        super().__init__(ctx, spec)
        self.how = spec.how
        if isinstance(a, Tumbling):
            self.size = self.slide = a.size_ticks
        else:
            self.size, self.slide = a.size_ticks, a.slide_ticks
        self.offset = a.offset_ticks
        self.panes: dict[int, dict[Any, list[Any]]] = {}
        self.closing: list[int] = []  # starts of open panes, by start (= by close)
        self.count = 0
        # While change sets are taken: the panes opened since the last snapshot, whose
        # entries are not marked one by one (the next change set holds all of them; one
        # that closes before it is in none).
        self.fresh: set[int] = set()

    _STATE = (*JoinStep._STATE, "panes", "closing", "count")

    def held(self) -> int:
        return self.count

    # A snapshot entry per key and window: ``(key, start) -> (first left seq, first right
    # seq, lefts, rights)`` (the records as tuples).

    def _entries(self) -> Iterator[tuple[Any, Any]]:
        for start, pane in self.panes.items():
            for k, e in pane.items():
                yield (k, start), (e[_FL], e[_FR], tuple(e[_LS]), tuple(e[_RS]))

    def _fresh_entries(self) -> Iterator[tuple[Any, Any]]:
        for start in sorted(self.fresh):
            for k, e in self.panes[start].items():
                yield (k, start), (e[_FL], e[_FR], tuple(e[_LS]), tuple(e[_RS]))

    def _fresh_size(self) -> int:
        return sum(len(self.panes[start]) for start in self.fresh)

    def _size(self) -> int:
        return sum(map(len, self.panes.values()))

    def _taken(self) -> None:
        super()._taken()
        self.fresh.clear()

    def _entry(self, key: Any, mark: Any) -> Any:
        k, start = key
        pane = self.panes.get(start)
        e = None if pane is None else pane.get(k)
        return GONE if e is None else (e[_FL], e[_FR], tuple(e[_LS]), tuple(e[_RS]))

    def _load(self, upserts: dict[Any, Any], extra: dict[str, Any]) -> None:
        panes: dict[int, dict[Any, list[Any]]] = {}
        count = 0
        for (k, start), (fl, fr, lefts, rights) in upserts.items():
            pane = panes.get(start)
            if pane is None:
                pane = panes[start] = {}
            pane[k] = [fl, fr, list(lefts), list(rights)]
            count += len(lefts) + len(rights)
        self.panes, self.count = panes, count
        self.closing = list(panes)
        heapify(self.closing)

    def _starts(self, t: int) -> list[int]:
        """The starts of the windows holding ``t``, earliest first."""
        slide, size = self.slide, self.size
        start = t - (t - self.offset) % slide
        out = []
        while start > t - size:
            out.append(start)
            start -= slide
        out.reverse()
        return out

    def _records(
        self, side: int, values: list[Any], ts: list[int], keys: list[Any], wms: WatermarkColumn
    ) -> None:
        if self.slide == self.size:
            self._tumbling(side, values, ts, keys, wms)
            return
        panes, size, lateness = self.panes, self.size, self.lateness
        first, records = (_FL, _LS) if side == 0 else (_FR, _RS)
        seq = self.seq[side]
        added = 0
        changed = self.changes.changed
        for v, t, k, w in zip(values, ts, keys, wms or repeat(-INF, len(ts)), strict=True):
            seq += 1
            for start in self._starts(t):
                if start + size + lateness <= w:
                    self.late_record(side, v, t, k, w)
                    continue
                pane = panes.get(start)
                if pane is None:
                    pane = panes[start] = {}
                    heappush(self.closing, start)
                    if changed is not None:
                        self.fresh.add(start)
                entry = pane.get(k)
                if entry is None:
                    entry = pane[k] = [_INF_SEQ, _INF_SEQ, [], []]
                if entry[first] == _INF_SEQ:
                    entry[first] = seq
                entry[records].append(v)
                added += 1
                if changed is not None and start not in self.fresh:
                    changed[k, start] = None
        self.seq[side] = seq
        self.count += added

    def _tumbling(
        self, side: int, values: list[Any], ts: list[int], keys: list[Any], wms: WatermarkColumn
    ) -> None:
        """:meth:`_records` for one window per record: the loop there, unrolled."""
        panes, size, off = self.panes, self.size, self.offset
        closes = size + self.lateness  # a window closes at start + closes
        first, records = (_FL, _LS) if side == 0 else (_FR, _RS)
        seq = self.seq[side]
        last, pane = None, {}
        added = 0
        changed = self.changes.changed
        marks = None  # ``changed`` while the pane's entries are marked one by one
        for n, v, t, k, w in zip(count(seq + 1), values, ts, keys, wms or repeat(-INF, len(ts))):
            start = t - (t - off) % size
            if start + closes <= w:
                self.late_record(side, v, t, k, w)
                continue
            if start != last:  # records come mostly in order: often the same window
                last = start
                got = panes.get(start)
                if got is None:
                    got = panes[start] = {}
                    heappush(self.closing, start)
                    if changed is not None:
                        self.fresh.add(start)
                pane = got
                marks = changed if start not in self.fresh else None
            entry = pane.get(k)
            if entry is None:
                entry = pane[k] = [_INF_SEQ, _INF_SEQ, [], []]
                entry[first] = n
            elif entry[first] == _INF_SEQ:
                entry[first] = n
            entry[records].append(v)
            added += 1
            if marks is not None:
                marks[k, start] = None
        self.seq[side] = seq + len(values)
        self.count += added

    def _advance(self, wm: float) -> None:
        closing, size, lateness = self.closing, self.size, self.lateness
        if closing and closing[0] + size + lateness <= wm:
            with gc_paused():  # every pair of the windows that close, at once
                self._close(wm)

    def _close(self, wm: float) -> None:
        closing, size, lateness, how = self.closing, self.size, self.lateness, self.how
        out, out_ts, out_keys = self.out, self.out_ts, self.out_keys
        changed = self.changes.changed
        while closing and closing[0] + size + lateness <= wm:
            start = heappop(closing)
            pane = self.panes.pop(start)
            if start in self.fresh:  # opened and closed since the last snapshot: in neither
                self.fresh.discard(start)
            elif changed is not None:  # every key's entry of the window is gone
                changed.update(dict.fromkeys(zip(pane, repeat(start))))
            made = len(out)
            gone = 0
            for k, entry in sorted(pane.items(), key=_key_order):
                lefts, rights = entry[_LS], entry[_RS]
                gone += len(lefts) + len(rights)
                n = len(out)
                out += _pairs(lefts, rights, how)
                out_keys += repeat(k, len(out) - n)
            self.count -= gone
            out_ts += repeat(start + size - 1, len(out) - made)


def _key_order(item: tuple[Any, list[Any]]) -> tuple[int, int]:
    entry = item[1]
    return (entry[_FL], entry[_FR])


# A session in state: [start, end, lefts, rights], records as (seq, time, value).
_S, _E, _L, _R = range(4)


class _SessionJoinStep(JoinStep):
    """Session windows per key over both inputs: ``sessions[key]`` lists disjoint
    sessions; a heap of (close, key) entries, checked when due."""

    def __init__(self, ctx: BuildContext, spec: WindowJoinSpec, a: Session) -> None:
        super().__init__(ctx, spec)
        self.how = spec.how
        self.gap = a.gap_ticks
        self.sessions: dict[Any, list[list[Any]]] = {}
        self.heap: list[tuple[int, int, Any]] = []
        self.n = 0  # heap tie-breaker
        self.count = 0

    _STATE = (*JoinStep._STATE, "sessions", "heap", "n", "count")

    def held(self) -> int:
        return self.count

    # A snapshot entry per key: ``key -> sessions``, each ``(start, end, lefts, rights)``.

    def _entries(self) -> Iterator[tuple[Any, Any]]:
        for k, ss in self.sessions.items():
            yield k, tuple((s[_S], s[_E], tuple(s[_L]), tuple(s[_R])) for s in ss)

    def _entry(self, key: Any, mark: Any) -> Any:
        ss = self.sessions.get(key)
        if ss is None:
            return GONE
        return tuple((s[_S], s[_E], tuple(s[_L]), tuple(s[_R])) for s in ss)

    def _extra(self) -> dict[str, Any]:
        return {"n": self.n}

    def _size(self) -> int:
        return len(self.sessions)

    def _load(self, upserts: dict[Any, Any], extra: dict[str, Any]) -> None:
        self.sessions, self.heap, self.n, self.count = {}, [], extra["n"], 0
        i = 0  # (heap tie-breakers below every ``n``: ``n`` goes on as it was)
        for k, ss in upserts.items():
            self.sessions[k] = [[a, e, list(ls), list(rs)] for a, e, ls, rs in ss]
            for s in self.sessions[k]:  # an entry at each session's close (see _advance)
                i -= 1
                self.heap.append((s[_E] + self.lateness, i, k))
                self.count += len(s[_L]) + len(s[_R])
        heapify(self.heap)

    def _records(
        self, side: int, values: list[Any], ts: list[int], keys: list[Any], wms: WatermarkColumn
    ) -> None:
        gap, lateness = self.gap, self.lateness
        seq = self.seq[side]
        changed = self.changes.changed
        for v, t, k, w in zip(values, ts, keys, wms or repeat(-INF, len(ts)), strict=True):
            seq += 1
            if t + lateness < w:
                self.late_record(side, v, t, k, w)
                continue
            if changed is not None:
                changed[k] = None
            e = t + gap
            ss = self.sessions.setdefault(k, [])
            s: list[Any] = [t, e, [], []]
            for other in [o for o in ss if o[_S] < e and t < o[_E]]:  # merge what overlaps
                ss.remove(other)
                s[_S] = min(s[_S], other[_S])
                s[_E] = max(s[_E], other[_E])
                s[_L].extend(other[_L])
                s[_R].extend(other[_R])
            s[side + 2].append((seq, t, v))
            ss.append(s)
            self.count += 1
            self.n += 1
            heappush(self.heap, (s[_E] + lateness, self.n, k))
        self.seq[side] = seq

    def _advance(self, wm: float) -> None:
        heap, lateness = self.heap, self.lateness
        closed: list[tuple[int, int, int, int, Any, list[Any]]] = []
        while heap and heap[0][0] <= wm:
            _, _, k = heappop(heap)
            ss = self.sessions.get(k)
            if ss is None:
                continue  # an entry for sessions already closed
            self.changes.mark(k)
            keep = []
            for s in ss:
                close = s[_E] + lateness
                if close > wm:
                    keep.append(s)
                    continue
                s[_L].sort()
                s[_R].sort()
                self.count -= len(s[_L]) + len(s[_R])
                fl = s[_L][0][0] if s[_L] else _INF_SEQ
                fr = s[_R][0][0] if s[_R] else _INF_SEQ
                closed.append((close, s[_S], fl, fr, k, s))
            if keep:
                self.sessions[k] = keep
            else:
                del self.sessions[k]
        closed.sort(key=lambda c: c[:4])
        out, out_ts, out_keys = self.out, self.out_ts, self.out_keys
        with gc_paused():  # every pair of the sessions that close, at once
            for _, _, _, _, k, s in closed:
                n = len(out)
                out += _pairs([v for _, _, v in s[_L]], [v for _, _, v in s[_R]], self.how)
                out_ts += repeat(s[_E] - 1, len(out) - n)
                out_keys += repeat(k, len(out) - n)


class WindowJoinSpec(JoinSpec):
    """``left.window_join(right, assigner, how=...)``."""

    kind: ClassVar[str] = "window_join"

    def __init__(self, assigner: Tumbling | Sliding | Session, how: How, lateness: int) -> None:
        super().__init__(lateness)
        self.assigner = assigner
        self.how = how

    def build(self, ctx: BuildContext) -> Step:
        if isinstance(self.assigner, Session):
            return _SessionJoinStep(ctx, self, self.assigner)
        return _GridJoinStep(ctx, self, self.assigner)
