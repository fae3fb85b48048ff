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

from heapq import heappop, heappush
from typing import Any, ClassVar, Literal

from sluiceway.joins.base import JoinSpec, JoinStep
from sluiceway.operators.base import BuildContext, Step

__all__ = ["IntervalJoinSpec"]

How = Literal["inner", "left"]


class _IntervalJoinStep(JoinStep):
    """``buffers[side][key] = {seq: [time, value, matched]}``; ``expiry`` is a heap of
    ``(time the record may go, side, seq, key)``."""

    def __init__(self, ctx: BuildContext, spec: IntervalJoinSpec) -> None:
        super().__init__(ctx, spec)
        self.lower, self.upper, self.how = spec.lower, spec.upper, spec.how
        self.buffers: tuple[dict[Any, dict[int, list[Any]]], dict[Any, dict[int, list[Any]]]] = (
            {},
            {},
        )
        self.expiry: list[tuple[int, int, int, Any]] = []
        self.count = 0

    _STATE = (*JoinStep._STATE, "buffers", "expiry", "count")

    def held(self) -> int:
        return self.count

    def _records(
        self, side: int, values: list[Any], ts: list[int], keys: list[Any], wms: list[float]
    ) -> None:
        lower, upper, lateness = self.lower, self.upper, self.lateness
        mine, theirs = self.buffers[side], self.buffers[1 - side]
        seq = self.seq[side]
        for v, t, k, w in zip(values, ts, keys, wms, strict=True):
            seq += 1
            if t + lateness < w:
                self.late_record(side, v, t, k, w)
                continue
            matched = False
            others = theirs.get(k)
            if others:
                if side == 0:  # a left record: the right ones in [t + lower, t + upper]
                    lo, hi = t + lower, t + upper
                    for o in others.values():
                        if lo <= o[0] <= hi:
                            matched = True
                            self.result((v, o[1]), max(t, o[0]), k)
                else:  # a right record: the left ones with a + lower <= t <= a + upper
                    lo, hi = t - upper, t - lower
                    for o in others.values():
                        if lo <= o[0] <= hi:
                            o[2] = True
                            self.result((o[1], v), max(t, o[0]), k)
            mine.setdefault(k, {})[seq] = [t, v, matched]
            until = t + upper if side == 0 else t - lower
            heappush(self.expiry, (until + lateness, side, seq, k))
            self.count += 1
        self.seq[side] = seq

    def _advance(self, wm: float) -> None:
        expiry = self.expiry
        while expiry and expiry[0][0] < wm:
            _, side, seq, k = heappop(expiry)
            records = self.buffers[side][k]
            t, v, matched = records.pop(seq)
            if not records:
                del self.buffers[side][k]
            self.count -= 1
            if side == 0 and not matched and self.how == "left":
                self.result((v, None), t, k)


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
