"""A deliberately simple reference implementation of docs/joins.md, for the join tests.

It shares no code with sluiceway.  Each input is a list of records in its own arrival
order: ``(key, ts in ticks, value)``.  The watermark before record ``i`` of an input is
``max(ts of its records 0..i-1) - bound`` (``-inf`` before the first); how the two inputs
interleave plays no part.  Every result is found by brute force over all records: nothing
is ever freed, so nothing can be freed too early.

The rules (docs/joins.md):

1. Lateness is judged per input against its own watermark ``w`` before the record:
   window joins on a grid: late for a window when ``end + lateness <= w`` (per window);
   everything else: late when ``ts + lateness < w``.
2. Window join (grid): for each window and key, the non-late records of either side in
   it; inner: every (left, right) pair; left: also (left, None) when the key has no
   right record in the window; full: also (None, right) when it has no left one.
   Result time ``end - 1``.  Order: by ``end + lateness``, window start, then key by key
   in the order of the key's first left record in the window (keys with none after, by
   their first right record), then the left record's position on its input, then the
   right's.
3. Window join (session): per key, the non-late records of both sides make intervals
   ``[ts, ts + gap)``; overlapping ones (half-open) chain into sessions; then as rule 2
   with the session as the window.
4. Interval join: every non-late pair with ``l.ts + lower <= r.ts <= l.ts + upper``,
   time ``max(l.ts, r.ts)``; left: also (left, None) at ``l.ts`` for a non-late left
   record without partner.  (A multiset: the order follows arrival.)
5. As-of join: for each non-late left record, the non-late right record of its key with
   the largest ``(ts, position)`` among those with ``ts <= l.ts`` (and
   ``l.ts - ts <= tolerance``); for a temporal join that record may be a deletion,
   which means no match.  Time ``l.ts``; order: by ``l.ts``, then position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

from window_oracle import grid_windows

__all__ = ["In", "Out", "asof_oracle", "interval_oracle", "lateness_marks", "window_oracle"]


class In(NamedTuple):
    """One input record."""

    key: Hashable
    ts: int
    value: Any


class Out(NamedTuple):
    """One result: its key, (left, right) and its event time (ticks)."""

    key: Hashable
    value: tuple[Any, Any]
    ts: int


def lateness_marks(records: list[In], bound: int) -> list[float]:
    """The watermark before each record of one input."""
    marks: list[float] = []
    hi = -math.inf
    for r in records:
        marks.append(hi - bound)
        hi = max(hi, r.ts)
    return marks


def _late_simple(records: list[In], bound: int, lateness: int) -> list[bool]:
    return [
        r.ts + lateness < w for r, w in zip(records, lateness_marks(records, bound), strict=True)
    ]


def _pairs(
    lefts: list[tuple[int, In]], rights: list[tuple[int, In]], how: str
) -> list[tuple[float, int, Any, Any]]:
    if lefts and rights:
        return [(i, j, a.value, b.value) for i, a in lefts for j, b in rights]
    if lefts and how != "inner":
        return [(i, -1, a.value, None) for i, a in lefts]
    if rights and how == "full":
        return [(math.inf, j, None, b.value) for j, b in rights]
    return []


def window_oracle(
    left: list[In],
    right: list[In],
    *,
    bounds: tuple[int, int],
    size: int,
    slide: int | None,
    offset: int,
    gap: int | None,
    how: str,
    lateness: int,
) -> tuple[list[Out], list[tuple[str, Any]]]:
    """Rules 1-3: the results in order, and the late records as (side, value) per
    window missed (grid) or once (session), in each input's order."""
    late: list[tuple[str, Any]] = []
    # groups: (start, end, key) -> ([(pos, rec)], [(pos, rec)])
    groups: dict[tuple[int, int, Hashable], tuple[list[tuple[int, In]], list[tuple[int, In]]]] = {}
    if gap is None:
        step = slide or size
        for side, (records, bound) in enumerate(zip((left, right), bounds, strict=True)):
            for pos, (r, w) in enumerate(zip(records, lateness_marks(records, bound), strict=True)):
                for start, end in grid_windows(r.ts, size, step, offset):
                    if end + lateness <= w:
                        late.append((("left", "right")[side], r.value))
                        continue
                    g = groups.setdefault((start, end, r.key), ([], []))
                    g[side].append((pos, r))
    else:
        live: list[tuple[int, int, In]] = []  # (side, pos, rec)
        for side, (records, bound) in enumerate(zip((left, right), bounds, strict=True)):
            for pos, (r, is_late) in enumerate(
                zip(records, _late_simple(records, bound, lateness), strict=True)
            ):
                if is_late:
                    late.append((("left", "right")[side], r.value))
                else:
                    live.append((side, pos, r))
        for key in {r.key for _, _, r in live}:
            mine = sorted((x for x in live if x[2].key == key), key=lambda x: x[2].ts)
            sessions: list[list[Any]] = []  # [start, end, members]
            for x in mine:
                t = x[2].ts
                if sessions and t < sessions[-1][1]:
                    sessions[-1][1] = max(sessions[-1][1], t + gap)
                    sessions[-1][2].append(x)
                else:
                    sessions.append([t, t + gap, [x]])
            for start, end, members in sessions:
                g = groups.setdefault((start, end, key), ([], []))
                for side, pos, r in members:
                    g[side].append((pos, r))
    rows = []
    for (start, end, key), (lefts, rights) in groups.items():
        first_l = min((i for i, _ in lefts), default=math.inf)
        first_r = min((j for j, _ in rights), default=math.inf)
        for i, j, a, b in _pairs(sorted(lefts), sorted(rights), how):
            order = (end + lateness, start, first_l, first_r, i, j)
            rows.append((order, Out(key, (a, b), end - 1)))
    rows.sort(key=lambda row: row[0])
    return [o for _, o in rows], late


def interval_oracle(
    left: list[In],
    right: list[In],
    *,
    bounds: tuple[int, int],
    lower: int,
    upper: int,
    how: str,
    lateness: int,
) -> tuple[list[Out], list[tuple[str, Any]]]:
    """Rule 4: the results (a multiset: compare sorted) and the late records."""
    late_l = _late_simple(left, bounds[0], lateness)
    late_r = _late_simple(right, bounds[1], lateness)
    late = [("left", r.value) for r, x in zip(left, late_l, strict=True) if x]
    late += [("right", r.value) for r, x in zip(right, late_r, strict=True) if x]
    out = []
    for a, la in zip(left, late_l, strict=True):
        if la:
            continue
        found = False
        for b, lb in zip(right, late_r, strict=True):
            if not lb and b.key == a.key and a.ts + lower <= b.ts <= a.ts + upper:
                found = True
                out.append(Out(a.key, (a.value, b.value), max(a.ts, b.ts)))
        if not found and how == "left":
            out.append(Out(a.key, (a.value, None), a.ts))
    return out, late


def asof_oracle(
    left: list[In],
    right: list[In],
    *,
    bounds: tuple[int, int],
    tolerance: int | None,
    how: str,
    lateness: int,
    is_delete: Callable[[Any], bool] | None = None,
) -> tuple[list[Out], list[tuple[str, Any]]]:
    """Rule 5: the results in order, and the late records."""
    late_l = _late_simple(left, bounds[0], lateness)
    late_r = _late_simple(right, bounds[1], lateness)
    late = [("left", r.value) for r, x in zip(left, late_l, strict=True) if x]
    late += [("right", r.value) for r, x in zip(right, late_r, strict=True) if x]
    rows = []
    for pos, (a, la) in enumerate(zip(left, late_l, strict=True)):
        if la:
            continue
        best: tuple[int, int, In] | None = None
        for j, (b, lb) in enumerate(zip(right, late_r, strict=True)):
            if lb or b.key != a.key or b.ts > a.ts:
                continue
            if tolerance is not None and a.ts - b.ts > tolerance:
                continue
            if best is None or (b.ts, j) > best[:2]:
                best = (b.ts, j, b)
        match = None if best is None else best[2].value
        if match is not None and is_delete is not None and is_delete(match):
            match = None
        if match is None and how == "inner":
            continue
        rows.append(((a.ts, pos), Out(a.key, (a.value, match), a.ts)))
    rows.sort(key=lambda row: row[0])
    return [o for _, o in rows], late
