"""PP process pool: ``map_in_processes`` against ``map`` and a plain loop, CPU-bound.

Every system applies the same CPU-bound function (``burn``: a sum over ``work``
iterations of Python bytecode, about a millisecond) to every record and counts the
results:

* ``plain loop``: ``for r in records: fn(r)``, one core.
* ``sluiceway map``: ``Iterable(records).map(fn).sink(counter)``, one core (the GIL).
* ``sluiceway map_in_processes``: the same with ``map_in_processes(fn, workers=2)``; the
  time includes starting the two worker processes (spawn) and every pickle.

The rounds alternate the systems (round r runs each once, in an order rotated per round)
so a load that comes and goes on a shared machine falls on all of them alike; the table
shows the median of the rounds, the cores each kept busy (CPU seconds of the process and
its pool's workers over wall seconds: what it got of the machine, whatever the load) and
the machine's load average before and after.  The
target: ``map_in_processes`` >= 1.7x ``map`` on two cores.

Run: ``python benchmarks/bench_processes.py`` (``--quick`` for a smoke run); also
``python benchmarks/run.py --only PP``.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import time
from collections.abc import Callable

from common import Params, Result, Row, fmt_int, module_main, run_child

import sluiceway as sw

TARGET = 1.7
WORKERS = 2


def burn(n: int) -> int:
    """The CPU-bound function: ``n`` iterations of integer arithmetic."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


class CountingSink(sw.sinks.Sink):
    def __init__(self) -> None:
        self.n = 0

    async def write(self, batch: sw.Batch) -> None:
        self.n += len(batch.values)


def run_loop(records: list[int]) -> int:
    n = 0
    for r in records:
        burn(r)
        n += 1
    return n


def run_map(records: list[int]) -> int:
    flow = sw.Flow("pp_map")
    sink = CountingSink()
    flow.source(sw.sources.Iterable(records)).map(burn).sink(sink)
    sw.run(flow, handle_signals=False)
    return sink.n


def run_processes(records: list[int]) -> int:
    flow = sw.Flow("pp_processes")
    sink = CountingSink()
    flow.source(sw.sources.Iterable(records)).map_in_processes(burn, workers=WORKERS).sink(sink)
    sw.run(flow, handle_signals=False)
    return sink.n


SYSTEMS: dict[str, Callable[[list[int]], int]] = {
    "plain loop": run_loop,
    "sluiceway map": run_map,
    f"sluiceway map_in_processes(workers={WORKERS})": run_processes,
}


def _cpu() -> float:
    """CPU seconds of this process and of its reaped children (the pool's workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(params: Params) -> Result:
    """Child entry: records/s per system per round, the rounds alternating; and the
    cores each kept busy (CPU seconds, workers included, over wall seconds)."""
    n, work, rounds = int(params["records"]), int(params["work"]), int(params["rounds"])
    records = [work] * n
    names = list(SYSTEMS)
    runs: dict[str, list[float]] = {k: [] for k in names}
    cores: dict[str, list[float]] = {k: [] for k in names}
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    for rnd in range(rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            gc.collect()
            c0, t0 = _cpu(), time.perf_counter()
            done = SYSTEMS[name](records)
            dt = time.perf_counter() - t0
            cores[name].append((_cpu() - c0) / dt)
            if done != n:
                raise AssertionError(f"{name} counted {done} records, expected {n}")
            runs[name].append(n / dt)
    t0 = time.perf_counter()
    burn(work)
    per_call = time.perf_counter() - t0
    return {
        "records": n,
        "work": work,
        "per_call_ms": per_call * 1e3,
        "runs": runs,
        "cores": cores,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "seconds": time.perf_counter() - t_start,
        "cpus": len(os.sched_getaffinity(0)),
    }


def run(quick: bool) -> tuple[list[Row], Result]:
    """Run PP in a child process; the table rows."""
    params = {"records": 400 if quick else 3000, "work": 40_000, "rounds": 2 if quick else 5}
    res = run_child("bench_processes", "measure", params)
    med = {k: statistics.median(v) for k, v in res["runs"].items()}
    base = med["sluiceway map"]
    lb, la = res["load_before"], res["load_after"]
    wl = (
        f"PP ({fmt_int(res['records'])} rec x {res['per_call_ms']:.1f} ms CPU, "
        f"{res['cpus']} cores, load {lb[0]:.1f} -> {la[0]:.1f})"
    )
    rows = []
    for name, rate in med.items():
        spread = f"{min(res['runs'][name]):.0f}-{max(res['runs'][name]):.0f}"
        busy = statistics.median(res["cores"][name])
        result = f"{rate:,.0f} rec/s (rounds {spread}), {busy:.2f} cores busy"
        if name.startswith("sluiceway map_in_processes"):
            r = rate / base
            rows.append(
                Row(
                    wl,
                    name,
                    result,
                    f"{r:.2f}x map",
                    f">= {TARGET}x map",
                    "PASS" if r >= TARGET else "FAIL",
                )
            )
        else:
            rows.append(Row(wl, name, result, f"{rate / base:.2f}x map"))
    return rows, res


if __name__ == "__main__":
    module_main(__doc__ or "", run, {"measure": measure})
