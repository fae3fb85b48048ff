"""W2-W4 event-time windows: per-user tumbling, sliding and session windows over clicks.

The data (``make_events``, built once per child process before anything is timed):
``events`` click records ``{"user": "u17", "ts": 123.456, "amount": 3.25}`` -- 1,000 users,
event time a Poisson process of ~1,000 events/s rounded to the millisecond (so ~1,000 s of
event time for 1,000,000 events), amounts multiples of 0.25 (so every sum is exact) -- of
which 30 % arrive late by a uniform 0-4.9 s delay.  The list is in *arrival* order (event
time + delay).  With a watermark of ``max(ts seen) - 5.0``, no record is ever late.

* **W2**: tumbling 10 s windows, ``count`` and ``sum(amount)`` per (user, window);
* **W3**: sliding 30 s windows every 10 s, ``count`` per (user, window);
* **W4**: session windows with a 2 s gap, ``count`` per (user, session).

Every system computes the same results incrementally, with the same watermark:

* ``plain loop``: a hand-written pure-Python loop.  Per record: the watermark is the largest
  ``ts`` seen before it minus 5.0 (a record whose window already ended is late, and is
  counted, never added); per-window accumulators live in dicts; a heap of window starts (or
  session ends) fires and frees every window whose end the watermark has reached; at the end
  of the input everything left fires.  Tumbling and sliding windows use float arithmetic
  (``ts - ts % size``), which is exact for whole-second sizes and gives the same windows as
  sluiceway's integer microseconds for these millisecond timestamps; sessions compare in
  integer microseconds, because ``102.123 - 100.123`` is not ``2.0`` in floats and records
  exactly ``gap`` apart must be in different sessions.
* ``sluiceway``: ``Iterable(events).with_timestamps(ts, max_out_of_orderness=5.0)
  .key_by(user).window(...).aggregate(...)`` into a sink that folds each batch of
  ``WindowResult`` s into the checksum, run with ``sw.run``.
* ``Bytewax 0.21`` (when installed: ``pip install -e '.[bench]'``): ``TestingSource(events,
  batch_size=1000)`` -> ``bytewax.operators.windowing`` (``fold_window`` for W2,
  ``count_window`` for W3 and W4) -> a sink folding the checksum, run with ``run_main``.
  Two settings make it compute the same results (see ``run_bytewax``): a frozen
  ``now_getter`` (its watermark otherwise also advances with system time, so a pause
  between two batches makes the most delayed records after it late), and a session gap of
  2 s - 1 us (Bytewax joins records *up to and including* ``gap`` apart).

Each measurement is one child process (``measure``): build the data, ``gc.collect()``,
``gc.freeze()`` (the 1,000,000 input dicts are not rescanned by the cyclic GC, as they would
not exist in a real stream), reset the peak RSS, then time one run of one system including
its source and sink.  Memory added = peak RSS (``VmHWM``) after the run - ``VmRSS`` before it.

**W2-mem, W3-mem, W4-mem** (``run_memory``): the same three computations over 100,000
users at 10,000 events/s of event time (``SCALE``), so that ~10^5 windows are open at once
and the window state dominates the memory a run adds; plain loop and sluiceway only.  Peak
RSS added (``measure``) and the ``tracemalloc`` peak (``traced``) of each, and the plain
loop's peak number of open windows (``open_windows``).

Results are checked, not trusted: every sink folds each result into a checksum (number of
results, sum of counts, sum of totals, sum of window starts and ends in ms, sum of user
numbers), and every system must give the plain loop's.  ``diff`` compares full result sets
(and an offline batch computation), ``profile`` profiles one run:

    python benchmarks/bench_windows.py diff '{"workload": "W4", "events": 20000}'
    python benchmarks/bench_windows.py open_windows \
        '{"workload": "W2", "events": 1000000, "users": 100000, "rate": 10000}'
    python benchmarks/bench_windows.py profile '{"workload": "W2", "tool": "pyinstrument"}'
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from typing import Any

from common import (
    Params,
    Result,
    Row,
    child_main,
    fmt_int,
    proc_status_kb,
    reset_peak_rss,
    run_child,
)

import sluiceway as sw

Event = dict[str, Any]

# The targets.
TARGET_VS_LOOP = {"W2": 0.50, "W3": 0.40, "W4": 0.40}
TARGET_VS_BYTEWAX = 10.0
TARGET_MEMORY_VS_LOOP = 2.0

BOUND = 5.0  # max_out_of_orderness / Bytewax wait_for_system_duration (seconds)
SEED = 20261201

WORKLOADS: dict[str, dict[str, Any]] = {
    "W2": {"title": "W2 tumbling 10 s, count+sum", "kind": "tumbling", "size": 10.0},
    "W3": {"title": "W3 sliding 30 s/10 s, count", "kind": "sliding", "size": 30.0, "slide": 10.0},
    "W4": {"title": "W4 session gap 2 s, count", "kind": "session", "gap": 2.0},
}

BYTEWAX_HINT = "not installed (pip install -e '.[bench]')"


# --------------------------------------------------------------------------- the data


def make_events(
    n: int,
    *,
    users: int = 1000,
    rate: float = 1000.0,
    delayed: float = 0.30,
    max_delay: float = 4.9,
    seed: int = SEED,
) -> list[Event]:
    """``n`` click events in arrival order (deterministic for a given seed).

    Built in two phases so that the first phase's garbage (integer tuples, sorted) sits
    in memory pages of its own, which are returned to the OS when it is freed; otherwise
    a run could reuse those free pages and its memory growth would not show in the RSS.
    """
    rng = random.Random(seed)
    expo, rand, randrange = rng.expovariate, rng.random, rng.randrange
    max_delay_ms = round(max_delay * 1000)
    rows: list[tuple[int, int, int, int, int]] = []  # arrival ms, i, ts ms, user, amount/4
    t = 0.0
    for i in range(n):
        t += expo(rate)
        ms = round(t * 1000)
        delay = randrange(max_delay_ms + 1) if rand() < delayed else 0
        rows.append((ms + delay, i, ms, randrange(users), randrange(1, 201)))
    rows.sort()  # arrival order; i breaks ties
    names = [f"u{k}" for k in range(users)]
    events = [{"user": names[u], "ts": ms / 1000, "amount": q * 0.25} for _, _, ms, u, q in rows]
    del rows
    return events


# --------------------------------------------------------------------------- checksums


class Checksum:
    """Folds window results into a few exact sums; ``add`` is every system's sink."""

    __slots__ = ("count", "end_ms", "results", "start_ms", "total", "users")

    def __init__(self) -> None:
        self.results = 0
        self.count = 0
        self.total = 0.0  # sums of multiples of 0.25: exact
        self.start_ms = 0
        self.end_ms = 0
        self.users = 0

    def add(self, user: str, start: float, end: float, count: int, total: float) -> None:
        self.results += 1
        self.count += count
        self.total += total
        self.start_ms += round(start * 1000)
        self.end_ms += round(end * 1000)
        self.users += int(user[1:])

    def as_dict(self) -> dict[str, Any]:
        return {
            "results": self.results,
            "count": self.count,
            "total": self.total,
            "start_ms": self.start_ms,
            "end_ms": self.end_ms,
            "users": self.users,
        }


class Collector:
    """The same interface, keeping every result (for ``diff``)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, float, float, int, float]] = []

    def add(self, user: str, start: float, end: float, count: int, total: float) -> None:
        self.items.append((user, round(start, 6), round(end, 6), count, total))


Out = Checksum | Collector


# --------------------------------------------------------------------------- plain loops


def plain_tumbling(events: Iterable[Event], out: Out, size: float, bound: float = BOUND) -> int:
    """Tumbling windows: count + sum(amount) per (user, window); returns the late count."""
    add = out.add
    heappush, heappop = heapq.heappush, heapq.heappop
    panes: dict[float, dict[str, list[Any]]] = {}  # window start -> user -> [count, total]
    starts: list[float] = []  # heap of the open windows' starts
    max_ts = wm = -math.inf
    late = 0
    for e in events:
        ts = e["ts"]
        start = ts - ts % size
        if start + size <= wm:  # the watermark before this record passed its window
            late += 1
            continue
        pane = panes.get(start)
        if pane is None:
            pane = panes[start] = {}
            heappush(starts, start)
        user = e["user"]
        acc = pane.get(user)
        if acc is None:
            pane[user] = [1, e["amount"]]
        else:
            acc[0] += 1
            acc[1] += e["amount"]
        if ts > max_ts:
            max_ts = ts
            wm = ts - bound
            while starts and starts[0] + size <= wm:
                s = heappop(starts)
                end = s + size
                for user, (c, tot) in panes.pop(s).items():
                    add(user, s, end, c, tot)
    while starts:  # end of input: the watermark moves to +infinity
        s = heappop(starts)
        for user, (c, tot) in panes.pop(s).items():
            add(user, s, s + size, c, tot)
    return late


def plain_sliding(
    events: Iterable[Event], out: Out, size: float, slide: float, bound: float = BOUND
) -> int:
    """Sliding windows (``size`` a multiple of ``slide``): count per (user, window)."""
    if size % slide:
        raise ValueError("plain_sliding wants size to be a multiple of slide")
    add = out.add
    heappush, heappop = heapq.heappush, heapq.heappop
    offsets = [k * slide for k in range(round(size / slide))]  # 0, 10, 20
    panes: dict[float, dict[str, int]] = {}  # window start -> user -> count
    starts: list[float] = []
    max_ts = wm = -math.inf
    late = 0
    for e in events:
        ts = e["ts"]
        last = ts - ts % slide  # the latest window holding ts starts here
        user = e["user"]
        for off in offsets:
            start = last - off
            if start + size <= wm:
                late += 1
                continue
            pane = panes.get(start)
            if pane is None:
                pane = panes[start] = {}
                heappush(starts, start)
            pane[user] = pane.get(user, 0) + 1
        if ts > max_ts:
            max_ts = ts
            wm = ts - bound
            while starts and starts[0] + size <= wm:
                s = heappop(starts)
                end = s + size
                for user, c in panes.pop(s).items():
                    add(user, s, end, c, 0.0)
    while starts:
        s = heappop(starts)
        for user, c in panes.pop(s).items():
            add(user, s, s + size, c, 0.0)
    return late


def plain_session(events: Iterable[Event], out: Out, gap: float, bound: float = BOUND) -> int:
    """Session windows ``[first, last + gap)`` per user: count per session.

    Times are integer microseconds.  Each user has a short list of open sessions
    ``[start, end, count]`` (almost always one).  A record at ``t`` joins every session its
    own ``[t, t + gap)`` overlaps (merging them if it bridges several).  The heap holds one
    live ``(due, user)`` entry per user with open sessions, ``due[user]`` <= the earliest
    end of its sessions (sessions only grow, so it may be early); popping it fires the
    user's sessions that have ended and schedules the rest.  Entries whose ``due`` was
    replaced (a new session ending earlier) are skipped when popped.
    """
    add = out.add
    heappush, heappop = heapq.heappush, heapq.heappop
    gap_us, bound_us = round(gap * 1e6), round(bound * 1e6)
    sessions: dict[str, list[list[int]]] = {}
    due: dict[str, int] = {}
    heap: list[tuple[int, str]] = []
    max_t = -(2**62)
    wm = -(2**62)
    late = 0
    for e in events:
        t = round(e["ts"] * 1e6)
        end = t + gap_us
        user = e["user"]
        ss = sessions.get(user)
        if ss is None:
            if end <= wm:
                late += 1
                continue
            sessions[user] = [[t, end, 1]]
            due[user] = end
            heappush(heap, (end, user))
        else:
            hit = None
            bridges = False
            for s in ss:
                if s[0] < end and t < s[1]:
                    if hit is None:
                        hit = s
                    else:
                        bridges = True
            if hit is None:
                if end <= wm:
                    late += 1
                    continue
                ss.append([t, end, 1])
                if end < due[user]:
                    due[user] = end
                    heappush(heap, (end, user))
            elif not bridges:
                hit[0] = min(hit[0], t)
                hit[1] = max(hit[1], end)
                hit[2] += 1
            else:  # the record bridges two or more sessions: merge them all
                joined = [s for s in ss if s[0] < end and t < s[1]]
                ss[:] = [s for s in ss if not (s[0] < end and t < s[1])]
                ss.append(
                    [
                        min(t, *(s[0] for s in joined)),
                        max(end, *(s[1] for s in joined)),
                        1 + sum(s[2] for s in joined),
                    ]
                )
        if t > max_t:
            max_t = t
            wm = t - bound_us
            while heap and heap[0][0] <= wm:
                d, user = heappop(heap)
                if due.get(user) != d:
                    continue  # replaced by an earlier entry, which already ran
                ss = sessions[user]
                keep = []
                for s in ss:
                    if s[1] <= wm:
                        add(user, s[0] / 1e6, s[1] / 1e6, s[2], 0.0)
                    else:
                        keep.append(s)
                if keep:
                    sessions[user] = keep
                    d = due[user] = min(s[1] for s in keep)
                    heappush(heap, (d, user))
                else:
                    del sessions[user]
                    del due[user]
    for user, ss in sessions.items():
        for s in ss:
            add(user, s[0] / 1e6, s[1] / 1e6, s[2], 0.0)
    return late


def run_plain(wl: str, events: Iterable[Event], out: Out) -> int:
    spec = WORKLOADS[wl]
    if spec["kind"] == "tumbling":
        return plain_tumbling(events, out, spec["size"])
    if spec["kind"] == "sliding":
        return plain_sliding(events, out, spec["size"], spec["slide"])
    return plain_session(events, out, spec["gap"])


def batch_reference(wl: str, events: list[Event], out: Out) -> int:
    """The same results computed offline (no watermark), in integer microseconds.

    Only for ``diff``: an independent check of the incremental loops above.
    """
    spec = WORKLOADS[wl]
    by_user: dict[str, list[tuple[int, float]]] = {}
    for e in events:
        by_user.setdefault(e["user"], []).append((round(e["ts"] * 1e6), e["amount"]))
    for user, recs in by_user.items():
        recs.sort()
        if spec["kind"] == "session":
            gap = round(spec["gap"] * 1e6)
            first = last = recs[0][0]
            n = 0
            for t, _amount in recs:
                if t - last >= gap:
                    out.add(user, first / 1e6, (last + gap) / 1e6, n, 0.0)
                    first, n = t, 0
                last = t
                n += 1
            out.add(user, first / 1e6, (last + gap) / 1e6, n, 0.0)
            continue
        size = round(spec["size"] * 1e6)
        slide = round(spec.get("slide", spec["size"]) * 1e6)
        acc: dict[int, list[Any]] = {}
        for t, amount in recs:
            start = t - t % slide
            while start > t - size:
                a = acc.setdefault(start, [0, 0.0])
                a[0] += 1
                a[1] += amount
                start -= slide
        for start, (c, tot) in acc.items():
            out.add(user, start / 1e6, (start + size) / 1e6, c, tot if slide == size else 0.0)
    return 0


# --------------------------------------------------------------------------- sluiceway


def sluiceway_available() -> str | None:
    """None if sluiceway has the windows API, else why not."""
    missing = [f"sw.{n}" for n in ("agg", "windows", "WindowResult") if not hasattr(sw, n)]
    if not hasattr(sw.Stream, "with_timestamps"):
        missing.append("Stream.with_timestamps")
    return f"no windows API in this sluiceway ({', '.join(missing)})" if missing else None


def build_sluiceway(wl: str, events: list[Event], out: Out) -> sw.Flow:
    """The W2/W3/W4 sluiceway flow, sinking every result into ``out``."""
    spec = WORKLOADS[wl]
    dict_value = spec["kind"] == "tumbling"

    class FoldSink(sw.sinks.Sink):
        """Folds each batch of ``WindowResult`` s into ``out``."""

        async def write(self, batch: Any) -> None:
            add = out.add
            for r in batch.values:  # a second revision of a window would show in the sums
                v = r.value
                if dict_value:
                    add(r.key, r.start, r.end, v["count"], v["total"])
                else:
                    add(r.key, r.start, r.end, v, 0.0)

    flow = sw.Flow(f"{wl.lower()}_windows")
    keyed = (
        flow.source(sw.sources.Iterable(events))
        .with_timestamps(lambda e: e["ts"], max_out_of_orderness=BOUND)
        .key_by(lambda e: e["user"])
    )
    if spec["kind"] == "tumbling":
        results = keyed.window(sw.windows.Tumbling(spec["size"])).aggregate(
            count=sw.agg.count(), total=sw.agg.sum(lambda e: e["amount"])
        )
    elif spec["kind"] == "sliding":
        results = keyed.window(sw.windows.Sliding(spec["size"], spec["slide"])).aggregate(
            sw.agg.count()
        )
    else:
        results = keyed.window(sw.windows.Session(spec["gap"])).aggregate(sw.agg.count())
    results.sink(FoldSink())
    return flow


def run_sluiceway(wl: str, events: list[Event], out: Out) -> int:
    flow = build_sluiceway(wl, events, out)
    result = sw.run(flow, handle_signals=False)
    return sum(op.late for op in result.metrics.operators)  # the window operator's count


# --------------------------------------------------------------------------- Bytewax


def bytewax_version() -> str | None:
    """Bytewax's version if it can be imported, else None."""
    try:
        import bytewax.operators  # noqa: F401, PLC0415 - optional
    except ImportError:
        return None
    return version("bytewax")


def run_bytewax(wl: str, events: list[Event], out: Out) -> int:
    """The same workload in Bytewax 0.21; returns how many records it found late.

    * ``EventClock(ts_getter, wait_for_system_duration=5 s)`` computes the watermark as
      ``max event time - 5 s + (system time since that max was seen)``, the system time
      being read once per batch.  With the default ``now_getter``, a pause of ``p`` seconds
      between two batches (GC, a busy core) makes the records at the head of the next
      batch that were delayed by more than ``5 - p`` s late, until a newer record resets
      the watermark: ten 2 s pauses made 328 of 1,000,000 records late in a test.  A
      frozen ``now_getter`` (and ``to_system_utc`` returning None: no timer wake-ups)
      makes the watermark ``max event time - 5 s``, exactly the other systems' rule.
    * ``SessionWindower`` joins a record to a session when it is *at most* ``gap`` from it,
      so records exactly 2 s apart would share a session; ``gap = 2 s - 1 us`` gives the
      half-open semantics (timestamps are whole microseconds).
    * ``fold_window(..., ordered=False)`` (``count_window`` is unordered already): count and
      sum do not depend on order, and ordering costs Bytewax a sort per batch.
    """
    import bytewax.operators as op  # noqa: PLC0415 - optional dependency
    from bytewax.dataflow import Dataflow  # noqa: PLC0415
    from bytewax.operators import windowing as win  # noqa: PLC0415
    from bytewax.outputs import DynamicSink, StatelessSinkPartition  # noqa: PLC0415
    from bytewax.testing import TestingSource, run_main  # noqa: PLC0415

    spec = WORKLOADS[wl]
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    frozen = datetime.now(UTC)
    fromtimestamp = datetime.fromtimestamp
    clock: Any = win.EventClock(
        ts_getter=lambda e: fromtimestamp(e["ts"], tz=UTC),
        wait_for_system_duration=timedelta(seconds=BOUND),
        now_getter=lambda: frozen,
        to_system_utc=lambda _t: None,
    )
    late = [0]

    class Fold(StatelessSinkPartition[Any]):  # type: ignore[misc]
        def __init__(self, write: Callable[[list[Any]], None]) -> None:
            self.write = write

        def write_batch(self, items: list[Any]) -> None:
            self.write(items)

    class Sink(DynamicSink[Any]):  # type: ignore[misc]
        def __init__(self, write: Callable[[list[Any]], None]) -> None:
            self.write = write

        def build(self, step_id: str, worker_index: int, worker_count: int) -> Fold:
            return Fold(self.write)

    def count_late(items: list[Any]) -> None:
        late[0] += len(items)

    flow = Dataflow(f"{wl.lower()}_windows")
    inp = op.input("in", flow, TestingSource(events, batch_size=1000))
    add = out.add
    if spec["kind"] in ("tumbling", "sliding"):
        size_s = spec["size"]
        slide_s = spec.get("slide", size_s)
        windower = win.SlidingWindower(
            length=timedelta(seconds=size_s), offset=timedelta(seconds=slide_s), align_to=epoch
        )
        if spec["kind"] == "tumbling":
            keyed = op.key_on("key", inp, lambda e: e["user"])
            wo = win.fold_window(
                "window",
                keyed,
                clock,
                win.TumblingWindower(length=timedelta(seconds=size_s), align_to=epoch),
                builder=lambda: (0, 0.0),
                folder=lambda a, e: (a[0] + 1, a[1] + e["amount"]),
                merger=lambda a, b: (a[0] + b[0], a[1] + b[1]),
                ordered=False,
            )
        else:
            wo = win.count_window("window", inp, clock, windower, key=lambda e: e["user"])

        def write(items: list[Any]) -> None:
            for user, (wid, v) in items:  # window wid = [wid * slide, wid * slide + size)
                start = wid * slide_s
                if isinstance(v, tuple):
                    add(user, start, start + size_s, v[0], v[1])
                else:
                    add(user, start, start + size_s, v, 0.0)

        op.output("out", wo.down, Sink(write))
    else:
        gap = timedelta(seconds=spec["gap"])
        wo = win.count_window(
            "window",
            inp,
            clock,
            win.SessionWindower(gap=gap - timedelta(microseconds=1)),
            key=lambda e: e["user"],
        )
        # A session's count comes on `down`, its bounds on `meta` (open = first record,
        # close = last record): join them by (user, window id) in the sink.
        tagged = op.merge(
            "merge",
            op.map_value("count", wo.down, lambda x: (x[0], "c", x[1])),
            op.map_value("meta", wo.meta, lambda x: (x[0], "m", x[1])),
        )
        pending: dict[tuple[str, int], Any] = {}
        gap_s = spec["gap"]

        def write(items: list[Any]) -> None:
            for user, (wid, tag, v) in items:
                other = pending.pop((user, wid), None)
                if other is None:
                    pending[(user, wid)] = v
                    continue
                count, meta = (v, other) if tag == "c" else (other, v)
                start = (meta.open_time - epoch).total_seconds()
                last = (meta.close_time - epoch).total_seconds()
                add(user, start, last + gap_s, count, 0.0)

        op.output("out", tagged, Sink(write))
    op.output("late", wo.late, Sink(count_late))
    run_main(flow)
    return late[0]


SYSTEMS: dict[str, Callable[[str, list[Event], Out], int]] = {
    "plain": run_plain,
    "sluiceway": run_sluiceway,
    "bytewax": run_bytewax,
    "reference": batch_reference,
}


# --------------------------------------------------------------------------- children


def _unavailable(system: str) -> str | None:
    if system == "sluiceway":
        return sluiceway_available()
    if system == "bytewax" and bytewax_version() is None:
        return BYTEWAX_HINT
    return None


def _prepare(params: Params) -> tuple[str, str, int, list[Event]]:
    """Imports done, data built, garbage collected and frozen: ready to measure."""
    wl, system, n = params["workload"], params["system"], int(params["events"])
    if system == "bytewax":  # imported before the memory baseline
        import bytewax.operators.windowing  # noqa: PLC0415
        import bytewax.testing  # noqa: F401, PLC0415
    events = make_events(
        n,
        users=int(params.get("users", 1000)),
        rate=float(params.get("rate", 1000.0)),
        seed=int(params.get("seed", SEED)),
    )
    gc.collect()
    gc.freeze()
    return wl, system, n, events


def measure(params: Params) -> Result:
    """Child entry: one timed run of one system on one workload; RSS growth."""
    if why := _unavailable(params["system"]):
        return {"error": why}
    wl, system, n, events = _prepare(params)
    out = Checksum()
    peak_reset = reset_peak_rss()
    rss0 = proc_status_kb("VmRSS")
    t0 = time.perf_counter()
    late = SYSTEMS[system](wl, events, out)
    dt = time.perf_counter() - t0
    peak = proc_status_kb("VmHWM")
    return {
        "workload": wl,
        "system": system,
        "events": n,
        "seconds": dt,
        "rate": n / dt,
        "rss_before_kb": rss0,
        "peak_kb": peak,
        "added_kb": peak - rss0,
        "peak_reset": peak_reset,
        "late": late,
        "checksum": out.as_dict(),
    }


def traced(params: Params) -> Result:
    """Child entry: an untimed run under ``tracemalloc``; peak Python memory it allocated.

    RSS cannot resolve the few hundred kB of window state these workloads hold (allocator
    pools, pages freed earlier and reused); ``tracemalloc`` counts every Python allocation
    (not Bytewax's Rust side) exactly.
    """
    if why := _unavailable(params["system"]):
        return {"error": why}
    wl, system, _n, events = _prepare(params)
    out = Checksum()
    tracemalloc.start()
    SYSTEMS[system](wl, events, out)
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "traced_peak_kb": peak / 1024,
        "traced_left_kb": current / 1024,
        "checksum": out.as_dict(),
    }


def open_windows(params: Params) -> Result:
    """Child entry: how many windows the plain loop holds open at once (untimed).

    Runs the plain loop over the events while noting which record it is at, so that each
    result is known to fire while that record is processed (at the end of the input for
    the windows left).  A window opens with the first record, in arrival order, of the
    records it holds; for sessions that is per session of the final result, so two
    sessions that a later record merges count as one from the earlier of their first
    records (which undercounts briefly, by the merges pending).  The peak is the largest
    number opened minus fired after any record.
    """
    wl, n = params["workload"], int(params["events"])
    spec = WORKLOADS[wl]
    events = make_events(
        n,
        users=int(params.get("users", 1000)),
        rate=float(params.get("rate", 1000.0)),
        seed=int(params.get("seed", SEED)),
    )
    at = [0]

    def tracked() -> Iterator[Event]:
        for i, e in enumerate(events):
            at[0] = i
            yield e
        at[0] = n  # what fires after the input ended

    fired: dict[tuple[str, int], int] = {}
    out = Checksum()

    class Tap:
        def add(self, user: str, start: float, end: float, count: int, total: float) -> None:
            out.add(user, start, end, count, total)
            fired[(user, round(start * 1e6))] = at[0]

    run_plain(wl, tracked(), Tap())  # type: ignore[arg-type]
    opened: dict[tuple[str, int], int] = {}
    if spec["kind"] == "session":
        gap = round(spec["gap"] * 1e6)
        by_user: dict[str, list[tuple[int, int]]] = {}
        for i, e in enumerate(events):
            by_user.setdefault(e["user"], []).append((round(e["ts"] * 1e6), i))
        for user, recs in by_user.items():
            recs.sort()
            first, last, idx = recs[0][0], recs[0][0], recs[0][1]
            for t, i in recs[1:]:
                if t - last >= gap:
                    opened[(user, first)] = idx
                    first, idx = t, i
                last = t
                idx = min(idx, i)
            opened[(user, first)] = idx
    else:
        size = round(spec["size"] * 1e6)
        slide = round(spec.get("slide", spec["size"]) * 1e6)
        for i, e in enumerate(events):
            t = round(e["ts"] * 1e6)
            start = t - t % slide
            while start > t - size:
                opened.setdefault((e["user"], start), i)
                start -= slide
    if opened.keys() != fired.keys():
        raise RuntimeError(f"{wl}: windows opened and fired differ")
    delta = [0] * (n + 1)
    for w, i in opened.items():
        delta[i] += 1
        delta[fired[w]] -= 1
    peak = peak_at = now = 0
    for i in range(n):
        now += delta[i]
        if now > peak:
            peak, peak_at = now, i
    return {
        "peak_open": peak,
        "peak_at_event": peak_at,
        "peak_at_ts": events[peak_at]["ts"],
        "windows": len(opened),
        "checksum": out.as_dict(),
    }


def diff(params: Params) -> Result:
    """Child entry: every system's full result set against the plain loop's."""
    wl, n = params["workload"], int(params["events"])
    events = make_events(
        n,
        users=int(params.get("users", 1000)),
        rate=float(params.get("rate", 1000.0)),
        seed=int(params.get("seed", SEED)),
    )
    ref = Collector()
    run_plain(wl, events, ref)
    want = sorted(ref.items)
    report: dict[str, Any] = {"workload": wl, "events": n, "plain": len(want)}
    for system in ("reference", "sluiceway", "bytewax"):
        if why := _unavailable(system):
            report[system] = why
            continue
        got_c = Collector()
        SYSTEMS[system](wl, events, got_c)
        got = sorted(got_c.items)
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        report[system] = {
            "results": len(got),
            "identical": got == want,
            "missing": len(missing),
            "extra": len(extra),
            "first_missing": missing[:10],
            "first_extra": extra[:10],
        }
    return report


def profile(params: Params) -> Result:
    """Child entry: one run under pyinstrument (``"tool": "pyinstrument"``) or cProfile.

    ``python benchmarks/bench_windows.py profile '{"workload": "W2", "system": "sluiceway",
    "events": 1000000}'`` prints the profile of the run alone (not of building the data).
    """
    params = {"system": "sluiceway", "events": 1_000_000, **params}
    if why := _unavailable(params["system"]):
        return {"error": why}
    wl, system, n, events = _prepare(params)
    out = Checksum()
    if params.get("tool") == "pyinstrument":
        from pyinstrument import Profiler  # noqa: PLC0415 - optional, profiling only

        profiler = Profiler(interval=0.0005)
        profiler.start()
        SYSTEMS[system](wl, events, out)
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False))
    else:
        import cProfile  # noqa: PLC0415
        import pstats  # noqa: PLC0415

        prof = cProfile.Profile()
        prof.enable()
        SYSTEMS[system](wl, events, out)
        prof.disable()
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    return {"workload": wl, "system": system, "events": n, "checksum": out.as_dict()}


# --------------------------------------------------------------------------- the table


def _mb(kb: float, sign: str = "+") -> str:
    return f"{kb / 1024:{sign}.1f} MB"


def _checksum_text(c: dict[str, Any], wl: str) -> str:
    text = f"{fmt_int(c['results'])} results, sum(count) {fmt_int(c['count'])}"
    if WORKLOADS[wl]["kind"] == "tumbling":
        text += f", sum(total) {c['total']:,.2f}"
    return text


RSS_RESOLUTION_KB = 1024  # RSS growth below 1 MB is allocator noise in these children


def run_workload(wl: str, quick: bool) -> tuple[list[Row], Result]:
    """Run one of W2/W3/W4, every measurement in its own child; the table rows.

    Plain loop and sluiceway: ``repeats`` timed children each, interleaved (best rate, worst
    memory).  Bytewax is ~two orders of magnitude slower than the loop: one child.  Then
    one ``traced`` child per system (at most 200,000 events: the peak does not depend on
    the input's length, since every system frees its windows as they fire).
    """
    n = 100_000 if quick else 1_000_000
    repeats = 2 if quick else 3
    title = f"{WORKLOADS[wl]['title']} ({fmt_int(n)} ev)"
    systems = ["plain", "sluiceway", "bytewax"]
    runs: dict[str, list[Result]] = {s: [] for s in systems}
    for rnd in range(repeats):
        for system in systems[:2] if rnd % 2 == 0 else systems[1::-1]:
            params = {"workload": wl, "system": system, "events": n}
            runs[system].append(run_child("bench_windows", "measure", params))
    runs["bytewax"].append(
        run_child(
            "bench_windows",
            "measure",
            {"workload": wl, "system": "bytewax", "events": n},
            timeout=3600.0,
        )
    )
    traces = {
        system: run_child(
            "bench_windows",
            "traced",
            {"workload": wl, "system": system, "events": min(n, 200_000)},
            timeout=3600.0,
        )
        for system in systems
    }

    def best(system: str) -> Result | None:
        ok = [r for r in runs[system] if "error" not in r]
        return max(ok, key=lambda r: r["rate"]) if ok else None

    def error(system: str) -> str | None:
        return next((r["error"] for r in runs[system] if "error" in r), None)

    def rss(system: str) -> float:
        return max(r["added_kb"] for r in runs[system] if "error" not in r)

    def mem_text(system: str) -> str:
        return f"RSS {_mb(rss(system))}, traced {_mb(traces[system]['traced_peak_kb'], '')}"

    plain = best("plain")
    if plain is None:
        raise RuntimeError(f"the plain loop failed: {runs['plain']}")
    ref = plain["checksum"]
    same: list[str] = []
    differ: list[str] = []

    def check(system: str, label: str) -> str:
        sums = [r["checksum"] for r in runs[system] if "error" not in r]
        if all(c == ref for c in sums):
            same.append(label)
            return ""
        differ.append(label)
        return "; RESULTS DIFFER from the plain loop"

    late = sum(r["late"] for r in runs["plain"])
    sw_late = sum(r.get("late", 0) for r in runs["sluiceway"])
    rows = [
        Row(
            title,
            "plain loop",
            f"{fmt_int(plain['rate'])} ev/s; {mem_text('plain')}"
            + (f"; {late} LATE" if late else "")
            + check("plain", "plain loop"),
            "1.00",
        )
    ]

    sw = best("sluiceway")
    if sw is None:
        rows.append(Row(title, "sluiceway", error("sluiceway") or "no result", "", "", "FAIL"))
    else:
        ratio = sw["rate"] / plain["rate"]
        target = TARGET_VS_LOOP[wl]
        note = check("sluiceway", "sluiceway")
        if sw_late:
            note += f"; {fmt_int(sw_late)} LATE"
        rows.append(
            Row(
                title,
                "sluiceway",
                f"{fmt_int(sw['rate'])} ev/s; {mem_text('sluiceway')}{note}",
                f"sw = {ratio:.2f}x loop",
                f"sw >= {target:.0%} of loop",
                "PASS" if ratio >= target else "FAIL",
            )
        )
        sw_rss, loop_rss = rss("sluiceway"), rss("plain")
        ok = max(sw_rss, RSS_RESOLUTION_KB) <= TARGET_MEMORY_VS_LOOP * max(
            loop_rss, RSS_RESOLUTION_KB
        )
        traced_ratio = traces["sluiceway"]["traced_peak_kb"] / traces["plain"]["traced_peak_kb"]
        rows.append(
            Row(
                title,
                "sluiceway memory added",
                f"RSS {_mb(sw_rss)} vs loop {_mb(loop_rss)}; traced peak "
                f"{_mb(traces['sluiceway']['traced_peak_kb'], '')} vs "
                f"{_mb(traces['plain']['traced_peak_kb'], '')}",
                f"traced: {traced_ratio:.1f}x loop",
                f"RSS <= {TARGET_MEMORY_VS_LOOP:g}x loop (1 MB res.)",
                "PASS" if ok else "FAIL",
            )
        )

    bw = best("bytewax")
    if bw is None:
        rows.append(Row(title, "Bytewax", error("bytewax") or "no result"))
    else:
        note = check("bytewax", "Bytewax")
        if bw["late"]:
            note += f"; {fmt_int(bw['late'])} LATE"
        ratio_s, target_s, status = f"loop = {plain['rate'] / bw['rate']:.1f}x Bytewax", "", ""
        if sw is not None:
            ratio = sw["rate"] / bw["rate"]
            ratio_s = f"sw = {ratio:.1f}x (loop {plain['rate'] / bw['rate']:.1f}x)"
            target_s = f"sw >= {TARGET_VS_BYTEWAX:g}x Bytewax"
            status = "PASS" if ratio >= TARGET_VS_BYTEWAX else "FAIL"
        rows.append(
            Row(
                title,
                f"Bytewax {bytewax_version()}",
                f"{fmt_int(bw['rate'])} ev/s; {mem_text('bytewax')}{note}",
                ratio_s,
                target_s,
                status,
            )
        )
    rows.append(
        Row(
            title,
            "results (checksums)",
            _checksum_text(ref, wl)
            + (
                f"; identical: {', '.join(same)}"
                if not differ
                else f"; MISMATCH: {', '.join(differ)} differ from the plain loop"
            ),
            "",
            "all systems equal",
            "PASS" if not differ else "FAIL",
        )
    )
    return rows, {"events": n, "runs": runs, "traced": traces}


# Memory at scale (W2-mem, W3-mem, W4-mem): the same computations over 100 times as many
# users and 10 times the event rate, so that ~10^5 windows are open at once and the window
# state, not the engine's fixed overhead (event loop, generated code, batch columns: ~0.5 MB
# traced), is what a run adds.  Every user has ~10 events over the 100 s of event time.
SCALE = {"users": 100_000, "rate": 10_000.0, "events": 1_000_000}
SCALE_QUICK = {"users": 20_000, "rate": 2_000.0, "events": 200_000}


def run_memory(wl: str, quick: bool) -> tuple[list[Row], Result]:
    """Memory added at scale by the plain loop and sluiceway, and how many windows are open.

    Per system: 2 timed children (interleaved; the worst RSS growth counts) and one
    ``traced`` child on the same events; one ``open_windows`` child counts the plain
    loop's open windows at its peak.  Bytewax is left out: with 100,000 keys it needs
    ~45-90 s per run (``measure`` it by hand, see RESULTS.md).
    """
    scale = SCALE_QUICK if quick else SCALE
    n, users = int(scale["events"]), int(scale["users"])
    base = {"workload": wl, "events": n, "users": users, "rate": scale["rate"]}
    title = f"{wl}-mem {WORKLOADS[wl]['title'][3:]}, {fmt_int(users)} users ({fmt_int(n)} ev)"
    systems = ["plain", "sluiceway"]
    runs: dict[str, list[Result]] = {s: [] for s in systems}
    for rnd in range(2):
        for system in systems if rnd % 2 == 0 else systems[::-1]:
            runs[system].append(run_child("bench_windows", "measure", {**base, "system": system}))
    traces = {
        s: run_child("bench_windows", "traced", {**base, "system": s}, timeout=3600.0)
        for s in systems
    }
    opened = run_child("bench_windows", "open_windows", base, timeout=3600.0)
    raw: Result = {**base, "runs": runs, "traced": traces, "open_windows": opened}
    if any("error" in r for r in runs["plain"]):
        raise RuntimeError(f"the plain loop failed: {runs['plain']}")
    ref = runs["plain"][0]["checksum"]
    peak_open = opened["peak_open"]

    def rss(system: str) -> float:
        return max(r["added_kb"] for r in runs[system])

    def rate(system: str) -> float:
        return max(r["rate"] for r in runs[system])

    def traced_kb(system: str) -> float:
        return float(traces[system]["traced_peak_kb"])

    def per_window(system: str) -> str:
        return f"{traced_kb(system) * 1024 / peak_open:,.0f} B/open window"

    rows = [
        Row(
            title,
            "plain loop",
            f"RSS {_mb(rss('plain'))}, traced {_mb(traced_kb('plain'), '')} "
            f"({per_window('plain')}); {fmt_int(rate('plain'))} ev/s",
            "1.00",
        ),
        Row(
            title,
            "open windows (plain loop)",
            f"peak {fmt_int(peak_open)} open at event time {opened['peak_at_ts']:.1f} s; "
            f"{fmt_int(opened['windows'])} windows in all",
        ),
    ]
    checked = [*runs["plain"], traces["plain"], opened]
    if any("error" in r for r in runs["sluiceway"]):
        why = next(r["error"] for r in runs["sluiceway"] if "error" in r)
        rows.append(Row(title, "sluiceway", why, "", "", "FAIL"))
    else:
        checked += [*runs["sluiceway"], traces["sluiceway"]]
        late = sum(r["late"] for r in runs["sluiceway"])
        rows.append(
            Row(
                title,
                "sluiceway",
                f"RSS {_mb(rss('sluiceway'))}, traced {_mb(traced_kb('sluiceway'), '')} "
                f"({per_window('sluiceway')}); {fmt_int(rate('sluiceway'))} ev/s"
                + (f"; {fmt_int(late)} LATE" if late else ""),
                f"speed {rate('sluiceway') / rate('plain'):.2f}x loop",
            )
        )
        for reading, sw_kb, loop_kb in (
            ("RSS", rss("sluiceway"), rss("plain")),
            ("traced", traced_kb("sluiceway"), traced_kb("plain")),
        ):
            ratio = sw_kb / loop_kb
            rows.append(
                Row(
                    title,
                    f"sluiceway memory ({reading})",
                    f"{reading} peak added {_mb(sw_kb, '')} vs loop {_mb(loop_kb, '')}",
                    f"{ratio:.2f}x loop",
                    f"{reading} <= {TARGET_MEMORY_VS_LOOP:g}x loop",
                    "PASS" if ratio <= TARGET_MEMORY_VS_LOOP else "FAIL",
                )
            )
    same = all(r["checksum"] == ref for r in checked)
    rows.append(
        Row(
            title,
            "results (checksums)",
            _checksum_text(ref, wl)
            + (
                f"; identical in all {len(checked)} children (loop, sluiceway)"
                if same
                else "; MISMATCH between the children"
            ),
            "",
            "all systems equal",
            "PASS" if same else "FAIL",
        )
    )
    return rows, raw


def run_w2_mem(quick: bool) -> tuple[list[Row], Result]:
    return run_memory("W2", quick)


def run_w3_mem(quick: bool) -> tuple[list[Row], Result]:
    return run_memory("W3", quick)


def run_w4_mem(quick: bool) -> tuple[list[Row], Result]:
    return run_memory("W4", quick)


def run_w2(quick: bool) -> tuple[list[Row], Result]:
    return run_workload("W2", quick)


def run_w3(quick: bool) -> tuple[list[Row], Result]:
    return run_workload("W3", quick)


def run_w4(quick: bool) -> tuple[list[Row], Result]:
    return run_workload("W4", quick)


if __name__ == "__main__":
    child_main(
        {
            "measure": measure,
            "traced": traced,
            "open_windows": open_windows,
            "diff": diff,
            "profile": profile,
        }
    )
