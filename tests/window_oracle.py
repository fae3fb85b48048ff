"""A deliberately simple reference implementation of docs/windows.md, for the window tests.

It shares no code with sluiceway: window bounds are found by brute force on the integer
microsecond grid ("ticks"), every window keeps its records (in arrival order) and its
value is computed from them at each emission, and the whole input is replayed record by
record.  It is slow and obviously correct; sluiceway must agree with it exactly.

The rules it implements (docs/windows.md, with our reading where the page is silent):

1. The watermark before record ``i`` is ``max(ts of records 0..i-1) - bound`` (``-inf``
   before the first record).  It never decreases.  Everything is compared in ticks.
   Records dropped between ``with_timestamps`` and the window still moved the
   watermark; extra records made from one record (``flat_map``) carry its watermark
   (see ``Rec.ghost`` and ``Rec.echo``).
2. The watermark advances before each record (to ``max(ts so far) - bound``), after
   the last record, and at the end of input (to ``+inf``).  An advance to ``wm`` fires
   every window with ``end <= wm`` that has not fired yet (``kind="on_time"``) and
   closes every window with ``end + lateness <= wm``: with ``lateness > 0`` a closing
   emits ``kind="final"`` (the latest value again), and the window is freed.  These
   events are emitted in order of their time (``end`` for firings, ``end + lateness``
   for closings), then firings before closings, then in the order the windows were
   opened -- so the sequence does not depend on the steps the watermark took.
   ``final`` is True on the last result of a window only: the on-time result when
   ``lateness == 0``, else the ``"final"`` one.
3. Record ``i`` (tumbling/sliding): for each of its windows, in order of window start:
   if ``end + lateness <= watermark`` it is late for that window (one ``LateRecord`` per
   window missed, carrying the watermark before it).  Otherwise it is added to the
   window (opening it if needed), and if the window's end has already passed
   (``end <= watermark``) the window fires again at once: ``kind="late"``, the next
   revision, ``final=False``.
   *Reading*: a window first opened by a record that arrives after the window's end
   already passed (possible only with ``allowed_lateness > 0``) fires at once in the
   same way -- ``kind="late"``, revision 0 -- since the watermark already reached its
   end; it does not wait for the next watermark advance.
4. Record ``i`` (sessions): its own window is ``[t, t + gap)``.  It joins every open
   (not yet freed) session of its key that this window overlaps (half-open: touching is
   not overlapping); they all merge into one session ``[min start, max end)``.  If it
   overlaps none and ``t + gap + lateness <= watermark``, it is late
   (``LateRecord(window_start=t, window_end=t + gap)``).  Otherwise, after adding it, if
   the (possibly grown or merged) session's end has passed (``end <= watermark``), the
   session fires at once with ``kind="late"``.
   A merged (or grown) session supersedes the sessions it absorbed, which end without a
   result of their own, and continues their revision numbers (its next revision is
   the largest next revision among them).  *Readings*: it counts as opened when the
   earliest-opened of them was; if its end is still ahead of the watermark, it fires
   later on the watermark as ``on_time`` (with that continued revision).
5. At the end of input the watermark becomes ``+inf``: everything fires and closes as in
   rule 2; every window ends with exactly one ``final=True`` result.
6. Values: ``apply`` and ``collect`` see the records in arrival order, except that a
   session made by merging lists the earlier session's records (by start) first, then
   the later ones', then the record that merged them; ``first``/``last`` are the
   records with the earliest/latest event time, ties broken by arrival order (``last``
   of a tie is the one that arrived last).

>>> recs = [Rec("a", 1_000_000, 1), Rec("a", 12_000_000, 2), Rec("a", 3_000_000, 3)]
>>> out = run_oracle(recs, bound=0, assigner=Tumbling(10_000_000), lateness=0,
...                  agg=lambda items: [v for _, v in items])
>>> [(r.start, r.end, r.value, r.kind) for r in out.results]
[(0, 10000000, [1], 'on_time'), (10000000, 20000000, [2], 'on_time')]
>>> [(x.value, x.window_end, x.watermark) for x in out.late]
[(3, 10000000, 12000000)]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "TICKS",
    "Late",
    "OracleOutput",
    "Rec",
    "Result",
    "Session",
    "Sliding",
    "Tumbling",
    "grid_windows",
    "run_oracle",
    "to_ticks",
]

TICKS = 1_000_000
"""Ticks (microseconds) per second."""


def to_ticks(seconds: float) -> int:
    """Seconds to the nearest integer microsecond."""
    return round(seconds * TICKS)


@dataclass(frozen=True)
class Tumbling:
    """``[offset + k*size, offset + (k+1)*size)`` for every integer k (ticks)."""

    size: int
    offset: int = 0


@dataclass(frozen=True)
class Sliding:
    """``[offset + k*slide, offset + k*slide + size)`` for every integer k (ticks)."""

    size: int
    slide: int
    offset: int = 0


@dataclass(frozen=True)
class Session:
    """Per-key sessions ``[first, last + gap)`` (ticks)."""

    gap: int


Assigner = Tumbling | Sliding | Session


class Rec(NamedTuple):
    """One input record: its key, event time in ticks, and the value itself.

    ``ghost``: the record moved the watermark but was dropped before the window (a
    ``filter`` after ``with_timestamps``).  ``echo``: an extra output of the record before
    it (a ``flat_map`` after ``with_timestamps``): it is windowed but shares that record's
    watermark, and does not move it.
    """

    key: Hashable
    ts: int
    value: Any
    ghost: bool = False
    echo: bool = False


class Result(NamedTuple):
    """A window result (bounds in ticks), as sluiceway's ``WindowResult``."""

    key: Hashable
    start: int
    end: int
    value: Any
    revision: int
    final: bool
    kind: str


class Late(NamedTuple):
    """A late record (times in ticks), as sluiceway's ``LateRecord``."""

    value: Any
    key: Hashable
    timestamp: int
    window_start: int
    window_end: int
    watermark: float


@dataclass
class OracleOutput:
    results: list[Result]
    late: list[Late]


def grid_windows(t: int, size: int, step: int, offset: int) -> list[tuple[int, int]]:
    """Every window ``[offset + k*step, offset + k*step + size)`` holding ``t``, by start.

    Brute force: try every k whose window could possibly reach ``t`` (a generous range)
    and keep those that really hold it.
    """
    lo = (t - offset - size) // step - 2
    hi = (t - offset) // step + 2
    out = []
    for k in range(lo, hi + 1):
        start = offset + k * step
        if start <= t < start + size:
            out.append((start, start + size))
    return out


@dataclass(eq=False)
class _Window:
    key: Hashable
    start: int
    end: int
    opened: int
    items: list[tuple[int, int, Any]] = field(default_factory=list)  # (arrival, ts, value)
    """In arrival order, except after a session merge (see rule 6)."""
    fired: bool = False
    next_revision: int = 0


Agg = Callable[[list[tuple[int, Any]]], Any]
"""Computes a window's value from its ``(ts, value)`` pairs, in arrival order."""


def run_oracle(
    records: Iterable[Rec],
    *,
    bound: int,
    assigner: Assigner,
    lateness: int,
    agg: Agg,
) -> OracleOutput:
    """Replay ``records`` (in arrival order) through the rules in the module docstring."""
    results: list[Result] = []
    late: list[Late] = []
    windows: list[_Window] = []  # every open (not yet freed) window, any key
    opened = itertools.count()

    def emit(w: _Window, kind: str, final: bool) -> None:
        value = agg([(ts, v) for _, ts, v in w.items])
        results.append(Result(w.key, w.start, w.end, value, w.next_revision, final, kind))
        w.next_revision += 1
        w.fired = True

    def advance(watermark: float) -> None:
        # (time, 0 = fires at end / 1 = closes at end + lateness, opening order, window)
        events = []
        for w in windows:
            if not w.fired and w.end <= watermark:
                events.append((w.end, 0, w.opened, w))
            if lateness and w.end + lateness <= watermark:
                events.append((w.end + lateness, 1, w.opened, w))
        for _, closes, _, w in sorted(events, key=lambda e: e[:3]):
            if closes:
                emit(w, "final", final=True)
            else:
                emit(w, "on_time", final=not lateness)
        windows[:] = [w for w in windows if not w.end + lateness <= watermark]

    def place(arrival: int, rec: Rec, watermark: float) -> None:
        item = (arrival, rec.ts, rec.value)
        if isinstance(assigner, Session):
            t, gap = rec.ts, assigner.gap
            mine = [w for w in windows if w.key == rec.key]
            overlapping = [w for w in mine if w.start < t + gap and t < w.end]
            if not overlapping and t + gap + lateness <= watermark:
                late.append(Late(rec.value, rec.key, t, t, t + gap, watermark))
            else:
                if not overlapping:
                    session = _Window(rec.key, t, t + gap, next(opened))
                    windows.append(session)
                elif len(overlapping) == 1 and (
                    overlapping[0].start <= t and t + gap <= overlapping[0].end
                ):
                    session = overlapping[0]  # inside one session: its bounds stay
                else:
                    session = _Window(
                        rec.key,
                        min(t, *(w.start for w in overlapping)),
                        max(t + gap, *(w.end for w in overlapping)),
                        min(w.opened for w in overlapping),
                        [x for w in sorted(overlapping, key=lambda w: w.start) for x in w.items],
                        fired=False,
                        next_revision=max(w.next_revision for w in overlapping),
                    )
                    windows[:] = [w for w in windows if w not in overlapping]
                    windows.append(session)
                session.items.append(item)
                if session.end <= watermark:
                    emit(session, "late", final=False)
        else:
            if isinstance(assigner, Tumbling):
                bounds = grid_windows(rec.ts, assigner.size, assigner.size, assigner.offset)
            else:
                bounds = grid_windows(rec.ts, assigner.size, assigner.slide, assigner.offset)
            for start, end in sorted(bounds):
                if end + lateness <= watermark:
                    late.append(Late(rec.value, rec.key, rec.ts, start, end, watermark))
                    continue
                found = [w for w in windows if (w.key, w.start, w.end) == (rec.key, start, end)]
                assert len(found) <= 1
                if found:
                    w = found[0]
                else:
                    w = _Window(rec.key, start, end, next(opened))
                    windows.append(w)
                w.items.append(item)
                if end <= watermark:
                    emit(w, "late", final=False)

    max_ts: int | None = None
    watermark: float = -math.inf
    for arrival, rec in enumerate(records):
        if rec.echo:
            assert max_ts is not None, "an echo follows the record it came from"
        else:
            watermark = -math.inf if max_ts is None else max_ts - bound
            advance(watermark)
            max_ts = rec.ts if max_ts is None else max(max_ts, rec.ts)
        if not rec.ghost:
            place(arrival, rec, watermark)
    if max_ts is not None:
        advance(max_ts - bound)
    advance(math.inf)
    assert not windows
    return OracleOutput(results, late)
