"""As-of join and temporal join (event time): each left record with the right record of
its key that was current at the left record's time.

**As-of join**: a left record at time ``t`` joins the latest right record of its key at or
before ``t`` (the one that arrived last among those with the greatest time), if it is at
most ``tolerance`` older than ``t``.

**Temporal join**: the right input is a changelog -- each record an upsert of its key's
row, or (``is_delete(record)``) its deletion -- that makes a versioned table.  A left
record at ``t`` joins the version of its key's row valid at ``t``; none if the key had no
row then or its row was deleted.  That is an as-of join without tolerance whose match may
be a deletion.

Either way the answer waits for the join's watermark (the minimum over both inputs) to
pass ``t + allowed_lateness``: only then can no right record at or before ``t`` still
come, so the answer does not depend on the order in which the inputs arrived.  Results
``(left, right)`` -- ``(left, None)`` without a match with ``how="left"`` -- carry the left
record's time and leave in order of it (then of the left records' arrival).

A record is late (``.late()``) when its time is more than ``allowed_lateness`` behind its
own input's watermark.  State is bounded by the watermark: the waiting left records, and
per key the right records a left record could still need -- the latest one at or before
the watermark (the current row of a temporal table) and those after it; with a
tolerance, none older than the watermark minus the tolerance.
"""

from __future__ import annotations

from bisect import bisect_right, insort
from collections.abc import Callable, Iterator
from heapq import heapify, heappop, heappush
from itertools import count, repeat
from typing import Any, ClassVar, Literal

from sluiceway.joins.base import INF, JoinSpec, JoinStep, WatermarkColumn
from sluiceway.operators.base import BuildContext, Step
from sluiceway.operators.incremental import GONE

__all__ = ["AsOfJoinSpec", "TemporalJoinSpec"]

How = Literal["inner", "left"]


class _AsOfJoinStep(JoinStep):
    """``waiting``: a heap of the left records ``(time, seq, key, value)``;
    ``rights[key]``: the key's right records ``(time, seq, value)`` sorted by ``(time,
    seq)``; ``expiry``: with a tolerance, a heap with one ``(oldest time + tolerance, seq,
    key)`` per key."""

    def __init__(self, ctx: BuildContext, spec: AsOfJoinSpec) -> None:
        super().__init__(ctx, spec)
        self.how = spec.how
        self.tolerance = spec.tolerance
        self.is_delete = spec.is_delete
        self.waiting: list[tuple[int, int, Any, Any]] = []
        self.rights: dict[Any, list[Any]] = {}  # (time, seq, value) tuples
        self.expiry: list[tuple[int, int, Any]] = []
        self.count = 0

    _STATE = (*JoinStep._STATE, "waiting", "rights", "expiry", "count")

    def held(self) -> int:
        return self.count

    # Snapshot entries: ``("w", seq) -> (time, seq, key, value)`` per waiting left record
    # (its change mark: the same tuple, or None once answered) and ``("r", key) -> right
    # records`` per key.

    def _entries(self) -> Iterator[tuple[Any, Any]]:
        for item in self.waiting:
            yield ("w", item[1]), item
        for k, rows in self.rights.items():
            yield ("r", k), tuple(rows)

    def _size(self) -> int:
        return len(self.waiting) + len(self.rights)

    def _entry(self, key: Any, mark: Any) -> Any:
        if key[0] == "w":
            return GONE if mark is None else mark
        rows = self.rights.get(key[1])
        return GONE if rows is None else tuple(rows)

    def _load(self, upserts: dict[Any, Any], extra: dict[str, Any]) -> None:
        waiting, rights = [], {}
        for (kind, x), entry in upserts.items():
            if kind == "w":
                waiting.append(entry)
            else:
                rights[x] = list(entry)
        heapify(waiting)
        self.waiting, self.rights = waiting, rights
        self.count = len(waiting) + sum(map(len, rights.values()))
        self.expiry = []
        if self.tolerance is not None:  # one entry per key, for its oldest record
            self.expiry = [(r[0][0] + self.tolerance, r[0][1], k) for k, r in rights.items()]
            heapify(self.expiry)

    def _records(
        self, side: int, values: list[Any], ts: list[int], keys: list[Any], wms: WatermarkColumn
    ) -> None:
        lateness, seq = self.lateness, self.seq[side]
        changed = self.changes.changed
        if wms is None and side == 0:  # no late record: only the waiting heap to fill
            waiting = self.waiting
            if changed is None:
                for item in zip(ts, count(seq + 1), keys, values):
                    heappush(waiting, item)
            else:
                for item in zip(ts, count(seq + 1), keys, values):
                    heappush(waiting, item)
                    changed["w", item[1]] = item
            self.seq[side] = seq + len(values)
            self.count += len(values)
            return
        tolerance, waiting, rights = self.tolerance, self.waiting, self.rights
        cutoff = self.wm - lateness  # see _prune: the same for the whole batch
        plain = self.is_delete is None  # else _prune may also drop a deletion
        for v, t, k, w in zip(values, ts, keys, wms or repeat(-INF, len(ts)), strict=True):
            seq += 1
            if t + lateness < w:
                self.late_record(side, v, t, k, w)
                continue
            self.count += 1
            if side == 0:
                item = (t, seq, k, v)
                heappush(waiting, item)
                if changed is not None:
                    changed["w", seq] = item
                continue
            if changed is not None:
                changed["r", k] = None
            rows = rights.get(k)
            if rows is None:
                rows = rights[k] = [(t, seq, v)]
                if tolerance is not None:  # one entry per key: see _advance
                    heappush(self.expiry, (t + tolerance, seq, k))
            else:
                # (time, seq) is unique: tuples compare without ever reaching the value.
                if rows[-1][0] <= t:  # in order: the common case
                    rows.append((t, seq, v))
                else:
                    insort(rows, (t, seq, v))
                    if tolerance is not None and rows[0][1] == seq:
                        # the key's oldest record now: an entry for it too, so the key's
                        # earliest entry is never later than its oldest record's (what a
                        # restore rebuilds: the same pruning either way)
                        heappush(self.expiry, (t + tolerance, seq, k))
                if plain and rows[1][0] > cutoff:  # nothing to prune (the common case)
                    continue
            self._prune(k, rows)
        self.seq[side] = seq

    def _prune(self, k: Any, rows: list[Any]) -> None:
        """Drop the right records of ``k`` that no left record can need any more: every
        one still to be answered is at or after ``wm - lateness``, so of the records at
        or before that only the latest can match -- and a deletion only hides older
        ones."""
        i = bisect_right(rows, (self.wm - self.lateness, INF)) - 1
        if i > 0:
            del rows[:i]
            self.count -= i
        if i >= 0 and self.is_delete is not None and self.is_delete(rows[0][2]):
            del rows[0]
            self.count -= 1
        if not rows:
            del self.rights[k]

    def _answered(self, n: int) -> None:
        """Waiting left record ``n`` was answered: gone from the next change set."""
        changed = self.changes.changed
        assert changed is not None
        if n > self.snap_seq[0]:  # came and went since the last snapshot: in neither
            changed.pop(("w", n), None)
        else:
            changed["w", n] = None

    def _advance(self, wm: float) -> None:
        waiting, lateness, tolerance = self.waiting, self.lateness, self.tolerance
        rights, is_delete, left = self.rights, self.is_delete, self.how == "left"
        out, out_ts, out_keys = self.out.append, self.out_ts.append, self.out_keys.append
        freed = 0
        changed = self.changes.changed
        while waiting and waiting[0][0] + lateness < wm:
            t, n, k, v = heappop(waiting)
            freed += 1
            if changed is not None:
                self._answered(n)
            match = None
            rows = rights.get(k)
            if rows:
                i = bisect_right(rows, (t, INF)) - 1
                if i >= 0:
                    if tolerance is None or t - rows[i][0] <= tolerance:
                        match = rows[i][2]
                        if is_delete is not None and is_delete(match):
                            match = None
                    if i:  # left records answered later are not earlier: none needs these
                        del rows[:i]
                        freed += i
                        if changed is not None:
                            changed["r", k] = None
            if match is not None or left:
                out((v, match))
                out_ts(t)
                out_keys(k)
        expiry = self.expiry
        if expiry and expiry[0][0] + lateness < wm:
            assert tolerance is not None
            oldest = wm - lateness - tolerance
            while expiry and expiry[0][0] + lateness < wm:
                _, n, k = heappop(expiry)
                rows = rights.get(k)
                if rows is None:
                    continue
                if changed is not None:
                    changed["r", k] = None
                if rows[0][0] < oldest:  # else answering left records pruned them already
                    # Too old for any left record still to come; (oldest, -1) sorts
                    # before every record at ``oldest``, which are kept.
                    i = bisect_right(rows, (oldest, -1))
                    del rows[:i]
                    freed += i
                if rows:  # the key's entry again, for its oldest record
                    heappush(expiry, (rows[0][0] + tolerance, n, k))
                else:
                    del rights[k]
        self.count -= freed


class AsOfJoinSpec(JoinSpec):
    """``left.asof_join(right, ...)`` and ``left.temporal_join(table, ...)``."""

    kind: ClassVar[str] = "asof_join"

    def __init__(
        self,
        how: How,
        lateness: int,
        *,
        tolerance: int | None,
        is_delete: Callable[[Any], object] | None = None,
    ) -> None:
        super().__init__(lateness)
        self.how = how
        self.tolerance = tolerance
        self.is_delete = is_delete

    def build(self, ctx: BuildContext) -> Step:
        return _AsOfJoinStep(ctx, self)


class TemporalJoinSpec(AsOfJoinSpec):
    """``left.temporal_join(table, ...)``: an as-of join without tolerance, with deletes."""

    kind: ClassVar[str] = "temporal_join"
