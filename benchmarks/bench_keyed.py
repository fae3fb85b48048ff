"""K1-K3 keyed state: ``stateful_map`` and ``process`` against a plain loop doing the same work.

The data (built in each child before anything is timed): ``events`` records
``{"id": i, "user": "u17", "ts": 123.456, "amount": 3.25}`` for 1,000 users; event time a
Poisson process of ~1,000 records/s rounded to the millisecond, of which 30 % arrive late
by a uniform 0-4.9 s delay, in arrival order (so with a watermark of ``max(ts) - 5`` no
record is late).  Every system folds each output into the same checksum (outputs, sum of
the first number, sum of the second), which must agree between the systems.

* **K1** ``stateful_map`` running total per user:
  ``fn(total, r) -> (total + r["amount"], (r["user"], total))``.
* **K2** ``process`` with two value states per user (count and total), one output per
  record: ``ctx.value("n").get(0) + 1`` ... ``set``; ``ctx.emit((key, n, total))``.
* **K3** ``process`` on event time: an inactivity timer per user -- each record deletes
  the user's pending timer, counts the record in a value state and sets a timer 3 s after
  its event time; ``on_timer`` emits ``(key, count)`` and clears the count.  The timer at
  ``t`` fires once the watermark (``max ts seen - 5``) is past ``t``.

* **K4** (step level, no flow) ``stateful_map`` state of 1,000,000 keys: the time to take
  and pickle a whole snapshot against a change set after 10,000 of the keys were
  written (the change sets the checkpoint store will take, issue 20).

``plain loop``: a ``for`` loop over the same records with the same functions (K1) or the
same logic inline on dicts (K2, K3: dicts per state, a heap of timers with lazy deletion,
the watermark before each record, times in integer microseconds as the engine keeps
them), handing outputs to the checksum in lists of 1,024.  ``sluiceway``: ``Iterable ->
(with_timestamps ->) key_by -> stateful_map / process -> sinks.Function(batched)``, run
with ``sw.run``.  ``sluiceway, change tracking on``: the same, with the operator told that
the checkpoint store takes change sets (``Step.accept_changes(True)``), so it keeps the
set of keys changed since the last snapshot -- what incremental checkpoints cost per
record.  Each measurement is its own child process; the systems alternate (plain,
sluiceway, tracking, then the reverse, ...) and each one's best run counts.  The ratio is
of CPU time (``time.process_time``: the machine is shared, and waiting for a core is not
work); wall-clock rates are shown beside it.  The load average is read before and after.

    python benchmarks/bench_keyed.py            # the table
    python benchmarks/bench_keyed.py --quick    # a smoke test
"""

from __future__ import annotations

import asyncio
import gc
import heapq
import math
import os
import pickle
import random
import time
from collections.abc import Callable
from typing import Any

from common import Params, Result, Row, fmt_int, module_main, run_child

import sluiceway as sw
from sluiceway.core.messages import Batch
from sluiceway.metrics.registry import OperatorMetrics
from sluiceway.operators import keyed_state
from sluiceway.operators.base import BuildContext
from sluiceway.operators.errors import ErrorHandler
from sluiceway.operators.keyed_state import StatefulMapSpec

Event = dict[str, Any]
TARGET_VS_LOOP = 0.35
BOUND = 5.0
GAP = 3.0
CHUNK = 1024
SEED = 20261206

WORKLOADS = {
    "K1": "K1 stateful_map running total",
    "K2": "K2 process, two value states",
    "K3": "K3 process, event-time inactivity timers",
}


def make_events(n: int, seed: int = SEED, users: int = 1000, rate: float = 1000.0) -> list[Event]:
    rng = random.Random(seed)
    rows = []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(rate)
        ms = round(t * 1000)
        delay = rng.randrange(4901) if rng.random() < 0.3 else 0
        rows.append((ms + delay, i, ms, rng.randrange(users), rng.randrange(80) / 4))
    rows.sort()
    return [{"id": i, "user": f"u{u}", "ts": ms / 1000, "amount": a} for _, i, ms, u, a in rows]


class Checksum:
    __slots__ = ("a", "b", "n")

    def __init__(self) -> None:
        self.n = 0
        self.a = 0.0
        self.b = 0.0

    def add_batch(self, outs: list[tuple[Any, ...]]) -> None:
        for o in outs:
            self.n += 1
            self.a += o[1]
            self.b += o[-1]

    def value(self) -> list[float]:
        return [self.n, self.a, self.b]


# --------------------------------------------------------------------------- the user code


def user_of(e: Event) -> str:
    return e["user"]  # type: ignore[no-any-return]


def running_total(total: float | None, e: Event) -> tuple[float, tuple[str, float]]:
    total = (total or 0.0) + e["amount"]
    return total, (e["user"], total)


class CountAndTotal:
    def process(self, ctx: sw.state.ProcessContext[str], e: Event) -> None:
        count, total = ctx.value("n"), ctx.value("total")
        n = count.get(0) + 1
        count.set(n)
        s = total.get(0.0) + e["amount"]
        total.set(s)
        ctx.emit((ctx.key, n, s))


class Inactivity:
    def process(self, ctx: sw.state.ProcessContext[str], e: Event) -> None:
        due, count = ctx.value("due"), ctx.value("n")
        old = due.get()
        if old is not None:
            ctx.timers.delete_event_time(old)
        t = e["ts"] + GAP
        due.set(t)
        ctx.timers.at_event_time(t)
        count.set(count.get(0) + 1)

    def on_timer(self, ctx: sw.state.ProcessContext[str], t: float) -> None:
        ctx.emit((ctx.key, ctx.value("n").get()))
        ctx.value("n").clear()
        ctx.value("due").clear()


# --------------------------------------------------------------------------- plain loops


def plain_k1(events: list[Event], out: Checksum) -> None:
    state: dict[str, Any] = {}
    key, fn = user_of, running_total
    outs: list[Any] = []
    for e in events:
        k = key(e)
        new, o = fn(state.get(k), e)
        if new is None:
            state.pop(k, None)
        else:
            state[k] = new
        outs.append(o)
        if len(outs) == CHUNK:
            out.add_batch(outs)
            outs = []
    out.add_batch(outs)


def plain_k2(events: list[Event], out: Checksum) -> None:
    counts: dict[str, int] = {}
    totals: dict[str, float] = {}
    outs: list[Any] = []
    for e in events:
        k = e["user"]
        n = counts.get(k, 0) + 1
        counts[k] = n
        s = totals.get(k, 0.0) + e["amount"]
        totals[k] = s
        outs.append((k, n, s))
        if len(outs) == CHUNK:
            out.add_batch(outs)
            outs = []
    out.add_batch(outs)


def plain_k3(events: list[Event], out: Checksum) -> None:
    bound, gap = round(BOUND * 1e6), round(GAP * 1e6)
    due: dict[str, int] = {}
    counts: dict[str, int] = {}
    heap: list[tuple[int, int, str]] = []
    live: dict[tuple[str, int], int] = {}
    hi = -math.inf
    outs: list[Any] = []

    def fire(wm: float) -> None:
        while heap and heap[0][0] < wm:  # a timer at t fires once the watermark is past t
            t, s, k = heapq.heappop(heap)
            if live.get((k, t)) != s:
                continue  # deleted
            del live[(k, t)]
            outs.append((k, counts.pop(k)))
            del due[k]

    for seq, e in enumerate(events):
        ts = round(e["ts"] * 1e6)
        fire(hi - bound)
        k = e["user"]
        old = due.get(k)
        if old is not None:
            live.pop((k, old), None)
        t = ts + gap
        due[k] = t
        live[(k, t)] = seq
        heapq.heappush(heap, (t, seq, k))
        counts[k] = counts.get(k, 0) + 1
        if ts > hi:  # noqa: PLR1730 - an if is cheaper than max() here
            hi = ts
        if len(outs) >= CHUNK:
            out.add_batch(outs)
            outs = []
    fire(math.inf)
    out.add_batch(outs)


PLAIN: dict[str, Callable[[list[Event], Checksum], None]] = {
    "K1": plain_k1,
    "K2": plain_k2,
    "K3": plain_k3,
}


# --------------------------------------------------------------------------- sluiceway


def track_changes() -> None:
    """Make every keyed-state operator built from now on keep its changed keys, as it does
    once the checkpoint store says it takes change sets."""
    init = keyed_state._KeyedProcessStep.__init__

    def tracking_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.accept_changes(True)

    keyed_state._KeyedProcessStep.__init__ = tracking_init  # type: ignore[method-assign]


def run_sluiceway(wl: str, events: list[Event], out: Checksum) -> None:
    flow = sw.Flow(f"bench-{wl}")
    stream = flow.source(sw.sources.Iterable(events))
    if wl == "K3":
        stream = stream.with_timestamps(lambda e: e["ts"], max_out_of_orderness=BOUND)
    keyed = stream.key_by(user_of)
    if wl == "K1":
        result = keyed.stateful_map(running_total)
    elif wl == "K2":
        result = keyed.process(CountAndTotal)
    else:
        result = keyed.process(Inactivity)
    result.sink(sw.sinks.Function(out.add_batch, batched=True))
    sw.run(flow)


def measure(params: Params) -> Result:
    """Child entry: one timed run of one system on one workload."""
    wl, system, n = params["workload"], params["system"], params["events"]
    events = make_events(n)
    if system == "tracking":
        track_changes()
    gc.collect()
    gc.freeze()
    out = Checksum()
    t0, c0 = time.perf_counter(), time.process_time()
    if system == "plain":
        PLAIN[wl](events, out)
    else:
        run_sluiceway(wl, events, out)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "workload": wl,
        "system": system,
        "records": n,
        "seconds": dt,
        "cpu": cpu,
        "rate": n / dt,
        "cpu_rate": n / cpu,
        "checksum": out.value(),
    }


def measure_snapshots(params: Params) -> Result:
    """Child entry (K4): whole snapshot against a change set, 1,000,000 keys."""
    keys, changed = int(params["keys"]), int(params["changed"])
    clock = sw.VirtualClock()
    m = OperatorMetrics("op", "stateful_map", 0)
    errors = ErrorHandler(
        sw.Fail(),
        flow="b",
        operator="op",
        clock=clock,
        metrics=m,
        dead_letters={},
        rng=random.Random(0),
    )
    spec = StatefulMapSpec(lambda s, x: ((s or 0) + 1, None), ttl=None, timestamped=False)
    step = spec.build(BuildContext("b", "op", clock, m, errors, 1024))
    step.accept_changes(True)
    names = [f"user{i}" for i in range(keys)]
    for i in range(0, keys, 65536):
        part = names[i : i + 65536]
        asyncio.run(step.push(Batch(part, keys=part)))
    out: Result = {"keys": keys, "changed": changed}
    t0 = time.perf_counter()
    blob = pickle.dumps(step.snapshot(), protocol=pickle.HIGHEST_PROTOCOL)
    out["whole_s"], out["whole_bytes"] = time.perf_counter() - t0, len(blob)
    part = names[:: keys // changed][:changed]
    asyncio.run(step.push(Batch(part, keys=part)))
    t0 = time.perf_counter()
    blob = pickle.dumps(step.snapshot(), protocol=pickle.HIGHEST_PROTOCOL)
    out["changes_s"], out["changes_bytes"] = time.perf_counter() - t0, len(blob)
    return out


def run_workload(wl: str, quick: bool) -> tuple[list[Row], Result]:
    n = 100_000 if quick else 500_000
    repeats = 2 if quick else 4
    load_before = os.getloadavg()
    runs: dict[str, list[Result]] = {"plain": [], "sluiceway": [], "tracking": []}
    for rnd in range(repeats):
        order = ["plain", "sluiceway", "tracking"]
        for system in order if rnd % 2 == 0 else order[::-1]:
            params = {"workload": wl, "system": system, "events": n}
            runs[system].append(run_child("bench_keyed", "measure", params))
    load_after = os.getloadavg()
    sums = {tuple(round(x, 6) for x in r["checksum"]) for rs in runs.values() for r in rs}
    if len(sums) != 1:
        raise RuntimeError(f"{wl}: the systems' results differ: {sums}")
    best = {name: max(rs, key=lambda r: r["cpu_rate"]) for name, rs in runs.items()}
    wall = {name: max(r["rate"] for r in rs) for name, rs in runs.items()}
    plain = best["plain"]
    load = f"load {load_before[0]:.1f} -> {load_after[0]:.1f}"
    title = f"{WORKLOADS[wl]} ({fmt_int(n)} rec, {fmt_int(plain['checksum'][0])} out; {load})"

    def result(name: str) -> str:
        return f"{fmt_int(best[name]['cpu_rate'])} rec/s CPU ({fmt_int(wall[name])} wall)"

    rows = [Row(title, "plain loop", result("plain"))]
    for name, label in (("sluiceway", "sluiceway"), ("tracking", "sluiceway, change tracking on")):
        ratio = best[name]["cpu_rate"] / plain["cpu_rate"]
        rows.append(
            Row(
                title,
                label,
                result(name),
                f"sw = {ratio:.2f}x (wall {wall[name] / wall['plain']:.2f}x)",
                f"sw >= {TARGET_VS_LOOP:.0%}",
                "PASS" if ratio >= TARGET_VS_LOOP else "FAIL",
            )
        )
    return rows, {"runs": runs, "load": [load_before, load_after]}


def run_k1(quick: bool) -> tuple[list[Row], Result]:
    return run_workload("K1", quick)


def run_k2(quick: bool) -> tuple[list[Row], Result]:
    return run_workload("K2", quick)


def run_k3(quick: bool) -> tuple[list[Row], Result]:
    return run_workload("K3", quick)


def run_k4(quick: bool) -> tuple[list[Row], Result]:
    keys = 100_000 if quick else 1_000_000
    res = run_child("bench_keyed", "snapshots", {"keys": keys, "changed": keys // 100})
    title = f"K4 stateful_map snapshot, {fmt_int(keys)} keys"
    rows = [
        Row(
            title,
            "whole (snapshot + pickle)",
            f"{res['whole_s'] * 1000:.0f} ms, {res['whole_bytes'] / 1e6:.1f} MB",
        ),
        Row(
            title,
            f"change set, {fmt_int(res['changed'])} keys written",
            f"{res['changes_s'] * 1000:.1f} ms, {res['changes_bytes'] / 1e6:.2f} MB",
            f"{res['changes_s'] / res['whole_s']:.3f}x the time",
            "(info)",
        ),
    ]
    return rows, res


def run(quick: bool) -> tuple[list[Row], Result]:
    rows: list[Row] = []
    details: Result = {}
    for wl in WORKLOADS:
        got, det = run_workload(wl, quick)
        rows += got
        details[wl] = det
    got, details["K4"] = run_k4(quick)
    return rows + got, details


if __name__ == "__main__":
    module_main(__doc__ or "", run, {"measure": measure, "snapshots": measure_snapshots})
