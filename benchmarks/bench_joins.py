"""J1-J3 joins: sluiceway's joins against a plain hand-written join loop doing the same work.

The data (``make_side``, built in the child before anything is timed): two inputs, each
``events`` records ``{"id": i, "user": "u17", "ts": 123.456}`` -- 1,000 users, event time a
Poisson process of ~500 records/s per input rounded to the millisecond, of which 30 %
arrive late by a uniform 0-4.9 s delay, in arrival order.  With a watermark of
``max(ts seen on that input) - 5.0`` no record is ever late.

* **J1** window join, tumbling 10 s, inner: every (left, right) pair of a user in a window;
* **J2** interval join, inner, ``left.ts - 1 <= right.ts <= left.ts + 1``;
* **J3** as-of join, left outer, tolerance 5 s: each left record with the latest right
  record of its user at or before its time.

``plain loop``: a hand-written pure-Python loop with the same semantics as sluiceway's
operator (docs/joins.md) -- a watermark per input, results due at the minimum of the
two, state freed as it passes -- fed the two inputs alternately in chunks of 1,000
records (about the runtime's batch size).  ``sluiceway``: one ``Iterable`` source of the
same chunks, ``branch``-ed into the two inputs, ``with_timestamps(ts, 5.0).key_by(user)``
each, the join, into a batched ``sinks.Function`` folding the checksum, run with
``sw.run``.  ``sluiceway, two sources`` (information): one ``Iterable`` source per input
instead.  Today the runtime's fan-in serves an always-ready source to its end before the
other one, so the join then holds one whole input in its state (the work of the
robust-order branch: a merge of the inputs by watermark).  Both fold every result
into the same checksum (number of results, sum of left ids, sum of right ids), which
must agree.  Each measurement is its own child process; the systems alternate (plain,
sluiceway, then the reverse, ...; two sources once, mid-run) and each one's best run
counts.  The ratio is of CPU time (``time.process_time``: the machine is shared, and
waiting for a core is not work); wall-clock rates are shown beside it.  The load
average is read before and after.

    python benchmarks/bench_joins.py            # the table
    python benchmarks/bench_joins.py --quick    # a smoke test
"""

from __future__ import annotations

import bisect
import gc
import heapq
import math
import os
import random
import time
from collections.abc import Callable
from typing import Any

from common import Params, Result, Row, fmt_int, module_main, run_child

import sluiceway as sw

Event = dict[str, Any]
TARGET_VS_LOOP = 0.40
BOUND = 5.0
CHUNK = 1000
SEED = 20261206

WORKLOADS = {
    "J1": "J1 window join, tumbling 10 s, inner",
    "J2": "J2 interval join [-1 s, +1 s], inner",
    "J3": "J3 as-of join, tolerance 5 s, left",
}


def make_side(
    n: int, seed: int, *, side: int, users: int = 1000, rate: float = 500.0
) -> list[Event]:
    rng = random.Random(seed)
    rows = []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        ms = round(t * 1000)
        delay = rng.randrange(4901) if rng.random() < 0.3 else 0
        rows.append((ms + delay, i, ms, rng.randrange(users)))
    rows.sort()
    return [{"id": i, "side": side, "user": f"u{u}", "ts": ms / 1000} for _, i, ms, u in rows]


class Checksum:
    __slots__ = ("left", "results", "right")

    def __init__(self) -> None:
        self.results = 0
        self.left = 0
        self.right = 0

    def add(self, a: Event | None, b: Event | None) -> None:
        self.results += 1
        self.left += -1 if a is None else a["id"]
        self.right += -1 if b is None else b["id"]

    def add_batch(self, pairs: list[tuple[Event | None, Event | None]]) -> None:
        for a, b in pairs:
            self.add(a, b)


def chunks(left: list[Event], right: list[Event]) -> list[tuple[int, list[Event]]]:
    """The two inputs alternately, a chunk at a time: (side, records)."""
    out = []
    for i in range(0, max(len(left), len(right)), CHUNK):
        out.append((0, left[i : i + CHUNK]))
        out.append((1, right[i : i + CHUNK]))
    return out


# --------------------------------------------------------------------------- plain loops


def plain_window(left: list[Event], right: list[Event], out: Checksum) -> None:
    size = 10.0
    panes: dict[float, dict[str, tuple[list[Event], list[Event]]]] = {}
    starts: list[float] = []
    hi = [-math.inf, -math.inf]
    fired = -math.inf

    def fire(upto: float) -> None:
        while starts and starts[0] + size <= upto:
            for lefts, rights in panes.pop(heapq.heappop(starts)).values():
                for a in lefts:
                    for b in rights:
                        out.add(a, b)

    for side, records in chunks(left, right):
        for e in records:
            ts = e["ts"]
            start = ts - ts % size
            if start + size <= hi[side] - BOUND:
                continue  # late (never, with this data)
            pane = panes.get(start)
            if pane is None:
                pane = panes[start] = {}
                heapq.heappush(starts, start)
            sides = pane.get(e["user"])
            if sides is None:
                sides = pane[e["user"]] = ([], [])
            sides[side].append(e)
            if ts > hi[side]:  # noqa: PLR1730 - an if is cheaper than max() here
                hi[side] = ts
        wm = min(hi) - BOUND
        if wm > fired:
            fired = wm
            fire(wm)
    fire(math.inf)


def plain_interval(left: list[Event], right: list[Event], out: Checksum) -> None:
    """Times in integer milliseconds: ``2.3 + 1.0 <= 3.3`` is false in floats."""
    lower, upper, bound = -1000, 1000, round(BOUND * 1000)
    held: tuple[dict[str, dict[int, tuple[int, Event]]], ...] = ({}, {})
    expiry: list[tuple[int, int, int, str]] = []
    hi = [-math.inf, -math.inf]
    n = 0
    for side, records in chunks(left, right):
        mine, theirs = held[side], held[1 - side]
        for e in records:
            ts, user = round(e["ts"] * 1000), e["user"]
            if ts < hi[side] - bound:
                continue
            others = theirs.get(user)
            if side == 0:
                if others:
                    lo, up = ts + lower, ts + upper
                    for t, b in others.values():
                        if lo <= t <= up:
                            out.add(e, b)
                until = ts + upper
            else:
                if others:
                    lo, up = ts - upper, ts - lower
                    for t, a in others.values():
                        if lo <= t <= up:
                            out.add(a, e)
                until = ts - lower
            n += 1
            mine.setdefault(user, {})[n] = (ts, e)
            heapq.heappush(expiry, (until, n, side, user))
            if ts > hi[side]:  # noqa: PLR1730 - an if is cheaper than max() here
                hi[side] = ts
        wm = min(hi) - bound
        while expiry and expiry[0][0] < wm:
            _, i, s, user = heapq.heappop(expiry)
            records_of = held[s][user]
            del records_of[i]
            if not records_of:
                del held[s][user]


def plain_asof(left: list[Event], right: list[Event], out: Checksum) -> None:
    """Times in integer milliseconds, as in ``plain_interval``."""
    tolerance, bound = 5000, round(BOUND * 1000)
    waiting: list[tuple[int, int, str, Event]] = []
    rights: dict[str, list[tuple[int, int, Event]]] = {}
    hi = [-math.inf, -math.inf]
    n = 0
    answered = -math.inf

    def answer(upto: float) -> None:
        while waiting and waiting[0][0] < upto:
            ts, _, user, a = heapq.heappop(waiting)
            rows = rights.get(user)
            match = None
            if rows:
                i = bisect.bisect_right(rows, (ts, math.inf)) - 1
                if i >= 0 and ts - rows[i][0] <= tolerance:
                    match = rows[i][2]
                if i > 0:  # later left records (never earlier than ts) need none before i
                    del rows[:i]
            out.add(a, match)

    for side, records in chunks(left, right):
        for e in records:
            ts = round(e["ts"] * 1000)
            if ts < hi[side] - bound:
                continue
            n += 1
            if side == 0:
                heapq.heappush(waiting, (ts, n, e["user"], e))
            else:
                bisect.insort(rights.setdefault(e["user"], []), (ts, n, e))
            if ts > hi[side]:  # noqa: PLR1730 - an if is cheaper than max() here
                hi[side] = ts
        wm = min(hi) - bound
        if wm > answered:
            answered = wm
            answer(wm)
    answer(math.inf)


PLAIN: dict[str, Callable[[list[Event], list[Event], Checksum], None]] = {
    "J1": plain_window,
    "J2": plain_interval,
    "J3": plain_asof,
}


# --------------------------------------------------------------------------- sluiceway


def run_sluiceway(
    wl: str, left: list[Event], right: list[Event], out: Checksum, *, two_sources: bool = False
) -> None:
    """One source of both inputs in the plain loop's chunks, split by ``branch``; or
    (``two_sources``) one ``Iterable`` source per input."""
    flow = sw.Flow(f"bench-{wl}")

    def prepare(stream: Any, label: str) -> Any:
        return stream.with_timestamps(
            lambda e: e["ts"], max_out_of_orderness=BOUND, name=f"ts_{label}"
        ).key_by(lambda e: e["user"], name=f"key_{label}")

    if two_sources:
        a = prepare(flow.source(sw.sources.Iterable(left), name="src_l"), "l")
        b = prepare(flow.source(sw.sources.Iterable(right), name="src_r"), "r")
    else:
        both = [e for _, records in chunks(left, right) for e in records]
        lefts, rights = flow.source(sw.sources.Iterable(both)).branch(is_left)
        a, b = prepare(lefts, "l"), prepare(rights, "r")
    if wl == "J1":
        joined = a.window_join(b, sw.windows.Tumbling(10.0))
    elif wl == "J2":
        joined = a.interval_join(b, lower=-1.0, upper=1.0)
    else:
        joined = a.asof_join(b, tolerance=5.0)
    joined.sink(sw.sinks.Function(out.add_batch, batched=True))
    sw.run(flow)


def is_left(e: Event) -> bool:
    return e["side"] == 0


def measure(params: Params) -> Result:
    """Child entry: one timed run of one system on one workload."""
    wl, system, n = params["workload"], params["system"], params["events"]
    left, right = make_side(n, SEED, side=0), make_side(n, SEED + 1, side=1)
    gc.collect()
    gc.freeze()
    out = Checksum()
    t0, c0 = time.perf_counter(), time.process_time()
    if system == "plain":
        PLAIN[wl](left, right, out)
    else:
        run_sluiceway(wl, left, right, out, two_sources=system == "two sources")
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "workload": wl,
        "system": system,
        "records": 2 * n,
        "seconds": dt,
        "cpu": cpu,
        "rate": 2 * n / dt,
        "cpu_rate": 2 * n / cpu,
        "checksum": [out.results, out.left, out.right],
    }


def run_workload(wl: str, quick: bool) -> tuple[list[Row], Result]:
    n = 50_000 if quick else 300_000
    repeats = 2 if quick else 4
    load_before = os.getloadavg()
    runs: dict[str, list[Result]] = {"plain": [], "sluiceway": [], "two sources": []}
    for rnd in range(repeats):
        order = ["plain", "sluiceway"] if rnd % 2 == 0 else ["sluiceway", "plain"]
        if rnd == repeats // 2:
            order.append("two sources")  # information: once, mid-run
        for system in order:
            params = {"workload": wl, "system": system, "events": n}
            runs[system].append(run_child("bench_joins", "measure", params))
    load_after = os.getloadavg()
    sums = {tuple(r["checksum"]) for rs in runs.values() for r in rs}
    if len(sums) != 1:
        raise RuntimeError(f"{wl}: the systems' results differ: {runs}")
    best = {name: max(rs, key=lambda r: r["cpu_rate"]) for name, rs in runs.items()}
    wall = {name: max(r["rate"] for r in rs) for name, rs in runs.items()}
    plain = best["plain"]
    load = f"load {load_before[0]:.1f} -> {load_after[0]:.1f}"
    title = (
        f"{WORKLOADS[wl]} ({fmt_int(2 * n)} rec, {fmt_int(plain['checksum'][0])} results; {load})"
    )

    def result(name: str) -> str:
        return f"{fmt_int(best[name]['cpu_rate'])} rec/s CPU ({fmt_int(wall[name])} wall)"

    def ratio(name: str) -> tuple[float, str]:
        r = best[name]["cpu_rate"] / plain["cpu_rate"]
        return r, f"sw = {r:.2f}x (wall {wall[name] / wall['plain']:.2f}x)"

    mine, mine_text = ratio("sluiceway")
    rows = [
        Row(title, "plain loop", result("plain")),
        Row(
            title,
            "sluiceway",
            result("sluiceway"),
            mine_text,
            f"sw >= {TARGET_VS_LOOP:.0%}",
            "PASS" if mine >= TARGET_VS_LOOP else "FAIL",
        ),
        Row(
            title,
            "sluiceway, two sources",
            result("two sources"),
            ratio("two sources")[1],
            "(info)",
        ),
    ]
    return rows, {"runs": runs, "load": [load_before, load_after]}


def run_j1(quick: bool) -> tuple[list[Row], Result]:
    return run_workload("J1", quick)


def run_j2(quick: bool) -> tuple[list[Row], Result]:
    return run_workload("J2", quick)


def run_j3(quick: bool) -> tuple[list[Row], Result]:
    return run_workload("J3", quick)


def run(quick: bool) -> tuple[list[Row], Result]:
    rows: list[Row] = []
    details: Result = {}
    for wl in WORKLOADS:
        got, det = run_workload(wl, quick)
        rows += got
        details[wl] = det
    return rows, details


if __name__ == "__main__":
    module_main(__doc__ or "", run, {"measure": measure})
