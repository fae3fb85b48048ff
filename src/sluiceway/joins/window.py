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
time.  Results leave in order of closing time, then window start, then the left record's
arrival on its input, then the right one's -- an order that does not depend on batch cuts
or on how the inputs interleaved.

A record is late -- it goes to ``.late()`` -- when its window closed by its *own* input's
watermark (tumbling, sliding: ``end + allowed_lateness <= watermark``, per window it
misses) or, for sessions, when its time is more than ``allowed_lateness`` behind that
watermark (a session that closed may not grow again).
"""

from __future__ import annotations

from heapq import heappop, heappush
from typing import Any, ClassVar, Literal

from sluiceway.joins.base import INF, JoinSpec, JoinStep
from sluiceway.operators.base import BuildContext, Step
from sluiceway.windows.assigners import Session, Sliding, Tumbling

__all__ = ["WindowJoinSpec"]

How = Literal["inner", "left", "full"]
# A record in state: (sequence number on its side, time, value).
Entry = tuple[int, int, Any]


def _pairs(lefts: list[Entry], rights: list[Entry], how: How) -> list[tuple[float, int, Any, Any]]:
    """The results of one key in one window: (left seq, right seq, left, right)."""
    out: list[tuple[float, int, Any, Any]] = []
    if lefts and rights:
        out = [(ls, rs, lv, rv) for ls, _, lv in lefts for rs, _, rv in rights]
    elif lefts and how != "inner":
        out = [(ls, -1, lv, None) for ls, _, lv in lefts]
    elif rights and how == "full":
        out = [(INF, rs, None, rv) for rs, _, rv in rights]
    return out


class _GridJoinStep(JoinStep):
    """Tumbling and sliding windows: ``panes[start][key] = (lefts, rights)``."""

    def __init__(self, ctx: BuildContext, spec: WindowJoinSpec, a: Tumbling | Sliding) -> None:
        super().__init__(ctx, spec)
        self.how = spec.how
        if isinstance(a, Tumbling):
            self.size = self.slide = a.size_ticks
        else:
            self.size, self.slide = a.size_ticks, a.slide_ticks
        self.offset = a.offset_ticks
        self.panes: dict[int, dict[Any, tuple[list[Entry], list[Entry]]]] = {}
        self.closing: list[int] = []  # starts of open panes, by start (= by close)
        self.count = 0

    _STATE = (*JoinStep._STATE, "panes", "closing", "count")

    def held(self) -> int:
        return self.count

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
        self, side: int, values: list[Any], ts: list[int], keys: list[Any], wms: list[float]
    ) -> None:
        panes, size, lateness = self.panes, self.size, self.lateness
        seq = self.seq[side]
        for v, t, k, w in zip(values, ts, keys, wms, strict=True):
            seq += 1
            for start in self._starts(t):
                if start + size + lateness <= w:
                    self.late_record(side, v, t, k, w)
                    continue
                pane = panes.get(start)
                if pane is None:
                    pane = panes[start] = {}
                    heappush(self.closing, start)
                sides = pane.get(k)
                if sides is None:
                    sides = pane[k] = ([], [])
                sides[side].append((seq, t, v))
                self.count += 1
        self.seq[side] = seq

    def _advance(self, wm: float) -> None:
        closing, size, lateness = self.closing, self.size, self.lateness
        while closing and closing[0] + size + lateness <= wm:
            start = heappop(closing)
            pane = self.panes.pop(start)
            end = start + size
            results: list[tuple[float, int, Any, Any, Any]] = []
            for k, (lefts, rights) in pane.items():
                self.count -= len(lefts) + len(rights)
                pairs = _pairs(lefts, rights, self.how)
                results.extend((ls, rs, k, lv, rv) for ls, rs, lv, rv in pairs)
            results.sort(key=lambda r: (r[0], r[1]))
            for _, _, k, lv, rv in results:
                self.result((lv, rv), end - 1, k)


# A session in state: [start, end, lefts, rights].
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

    def _records(
        self, side: int, values: list[Any], ts: list[int], keys: list[Any], wms: list[float]
    ) -> None:
        gap, lateness = self.gap, self.lateness
        seq = self.seq[side]
        for v, t, k, w in zip(values, ts, keys, wms, strict=True):
            seq += 1
            if t + lateness < w:
                self.late_record(side, v, t, k, w)
                continue
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
        results: list[tuple[int, int, float, int, Any, Any, Any]] = []
        while heap and heap[0][0] <= wm:
            _, _, k = heappop(heap)
            ss = self.sessions.get(k)
            if ss is None:
                continue  # an entry for sessions already closed
            keep = []
            for s in ss:
                close = s[_E] + lateness
                if close > wm:
                    keep.append(s)
                    continue
                lefts, rights = sorted(s[_L]), sorted(s[_R])
                self.count -= len(lefts) + len(rights)
                for ls, rs, lv, rv in _pairs(lefts, rights, self.how):
                    results.append((close, s[_S], ls, rs, k, (lv, rv), s[_E] - 1))
            if keep:
                self.sessions[k] = keep
            else:
                del self.sessions[k]
        results.sort(key=lambda r: (r[0], r[1], r[2], r[3]))
        for *_, k, value, t in results:
            self.result(value, t, k)


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
