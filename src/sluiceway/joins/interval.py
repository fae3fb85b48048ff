"""Interval join: each left record with the right records of its key in a time range.

A left record ``a`` and a right record ``b`` of the same key join when
``a.time + lower <= b.time <= a.time + upper`` (bounds inclusive; either may be
negative).  A pair leaves as soon as its second record arrives, with the later of the
two times as its event time.  With ``how="left"``, a left record that found no partner
leaves as ``(left, None)``, with its own time, once the join's watermark passes
``a.time + upper + allowed_lateness``: no right record that could still match may come.

A record is late (``.late()``) when its time is more than ``allowed_lateness`` behind its
own input's watermark.  State is bounded by the watermark: a left record is held until
the join's watermark passes ``a.time + upper + allowed_lateness``, a right one until it
passes ``b.time - lower + allowed_lateness``.  Which pairs are made depends only on the
two inputs, never on batch cuts or interleaving; the order in which pairs leave follows
their arrival.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator
from heapq import heapify, heappop, heappush
from itertools import repeat
from typing import Any, ClassVar, Literal

from sluiceway.joins.base import INF, JoinSpec, JoinStep, WatermarkColumn
from sluiceway.operators.base import BuildContext, Step
from sluiceway.operators.incremental import GONE

__all__ = ["IntervalJoinSpec"]

How = Literal["inner", "left"]


class _IntervalJoinStep(JoinStep):
    """``buffers[side][key]``: the key's records on that side as ``[time, seq, value,
    matched]``, sorted by (time, seq), so a range of times is found by bisection;
    ``expiry``: a heap of ``(time the record may go, side, seq, key)`` -- per side and key
    in the same order as the list, so the record that goes is always the list's first."""

    def __init__(self, ctx: BuildContext, spec: IntervalJoinSpec) -> None:
        super().__init__(ctx, spec)
        self.lower, self.upper, self.how = spec.lower, spec.upper, spec.how
        self.buffers: tuple[dict[Any, list[list[Any]]], dict[Any, list[list[Any]]]] = ({}, {})
        self.expiry: list[tuple[int, int, int, Any]] = []
        self.count = 0

    _STATE = (*JoinStep._STATE, "buffers", "expiry", "count")

    def held(self) -> int:
        return self.count

    # A snapshot entry per buffered record: ``(side, seq) -> (key, time, value, matched)``;
    # its change mark is ``(key, record)``, or None once it expired.

    def _entries(self) -> Iterator[tuple[Any, Any]]:
        for side, buffer in enumerate(self.buffers):
            for k, rows in buffer.items():
                for t, seq, v, matched in rows:
                    yield (side, seq), (k, t, v, matched)

    def _size(self) -> int:
        return self.count

    def _entry(self, key: Any, mark: Any) -> Any:
        if mark is None:
            return GONE
        k, (t, _, v, matched) = mark
        return (k, t, v, matched)

    def _load(self, upserts: dict[Any, Any], extra: dict[str, Any]) -> None:
        buffers: tuple[dict[Any, list[list[Any]]], dict[Any, list[list[Any]]]] = ({}, {})
        expiry = []
        keep_for = (self.upper, -self.lower)
        for (side, seq), (k, t, v, matched) in upserts.items():
            buffers[side].setdefault(k, []).append([t, seq, v, matched])
            expiry.append((t + keep_for[side] + self.lateness, side, seq, k))
        for buffer in buffers:
            for rows in buffer.values():
                rows.sort(key=lambda r: (r[0], r[1]))
        heapify(expiry)
        self.buffers, self.expiry, self.count = buffers, expiry, len(expiry)

    def _records(
        self, side: int, values: list[Any], ts: list[int], keys: list[Any], wms: WatermarkColumn
    ) -> None:
        lower, upper, lateness = self.lower, self.upper, self.lateness
        mine, theirs = self.buffers[side], self.buffers[1 - side]
        out, out_ts, out_keys, expiry = self.out, self.out_ts, self.out_keys, self.expiry
        # A left record at t matches right ones in [t + lower, t + upper]; a right one at
        # t matches left ones in [t - upper, t - lower].
        lo_off, hi_off = (lower, upper) if side == 0 else (-upper, -lower)
        keep_for = upper if side == 0 else -lower
        seq = self.seq[side]
        added = 0
        changed = self.changes.changed
        for v, t, k, w in zip(values, ts, keys, wms or repeat(-INF, len(ts)), strict=True):
            seq += 1
            if t + lateness < w:
                self.late_record(side, v, t, k, w)
                continue
            entry = [t, seq, v, False]
            others = theirs.get(k)
            if others:
                lo, hi = t + lo_off, t + hi_off
                i = bisect_left(others, [lo])
                j = bisect_right(others, [hi, INF])
                if i < j:
                    entry[3] = True
                    for o in others[i:j]:
                        if changed is not None and not o[3]:
                            changed[1 - side, o[1]] = (k, o)
                        o[3] = True
                        pair = (v, o[2]) if side == 0 else (o[2], v)
                        out.append(pair)
                        out_ts.append(t if t > o[0] else o[0])
                        out_keys.append(k)
            rows = mine.get(k)
            if rows is None:
                mine[k] = [entry]
            elif rows[-1][0] <= t:  # in order: the common case
                rows.append(entry)
            else:
                insort(rows, entry)
            heappush(expiry, (t + keep_for + lateness, side, seq, k))
            added += 1
            if changed is not None:
                changed[side, seq] = (k, entry)
        self.seq[side] = seq
        self.count += added

    def _advance(self, wm: float) -> None:
        expiry, buffers, outer = self.expiry, self.buffers, self.how == "left"
        gone = 0
        changed, snap_seq = self.changes.changed, self.snap_seq
        while expiry and expiry[0][0] < wm:
            _, side, _, k = heappop(expiry)
            rows = buffers[side][k]
            t, seq, v, matched = rows.pop(0)
            if changed is not None:
                if seq > snap_seq[side]:  # came and went since the last snapshot: in neither
                    changed.pop((side, seq), None)
                else:
                    changed[side, seq] = None
            if not rows:
                del buffers[side][k]
            gone += 1
            if side == 0 and outer and not matched:
                self.result((v, None), t, k)
        self.count -= gone


class IntervalJoinSpec(JoinSpec):
    """``left.interval_join(right, lower=..., upper=..., how=...)``."""

    kind: ClassVar[str] = "interval_join"

    def __init__(self, lower: int, upper: int, how: How, lateness: int) -> None:
        super().__init__(lateness)
        self.lower = lower
        self.upper = upper
        self.how = how

    def build(self, ctx: BuildContext) -> Step:
        return _IntervalJoinStep(ctx, self)
