"""IO: ``map_async`` over a simulated 10 ms I/O call, on the real clock.

* ``sluiceway, concurrency=100``: ``Iterable(records).map_async(call, concurrency=100)``
  into a counting sink; ``call`` is ``await asyncio.sleep(0.010)``.  Target: >= 8,000
  records/s (the ideal is 100 / 10 ms = 10,000/s).
* ``plain asyncio, 100 at a time``: the same calls from a loop that keeps 100 tasks in
  flight (``asyncio.wait(FIRST_COMPLETED)``), results kept in input order.
* ``sluiceway, sw.Adaptive()``: against a service with a capacity of 100 concurrent calls
  -- beyond that, its latency grows with the load (10 ms x in-flight / 100), as a
  queueing server's does.  Reported: the throughput and where the adaptive limit settles
  (its mean over the second half of the run).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common import Params, Result, Row, child_main, fmt_int, run_child

import sluiceway as sw

LATENCY = 0.010
CONCURRENCY = 100
TARGET = 8_000


class Counting(sw.sinks.Sink):
    def __init__(self) -> None:
        self.n = 0

    async def write(self, batch: sw.Batch) -> None:
        self.n += len(batch.values)


async def call(x: int) -> int:
    await asyncio.sleep(LATENCY)  # the simulated I/O: user code may sleep for real
    return x


class LoadedService:
    """Latency 10 ms up to ``capacity`` calls in flight, growing linearly beyond."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0

    async def __call__(self, x: int) -> int:
        self.in_flight += 1
        try:
            await asyncio.sleep(LATENCY * max(1.0, self.in_flight / self.capacity))
            return x
        finally:
            self.in_flight -= 1


def run_sluiceway(n: int, concurrency: Any, fn: Any) -> tuple[float, list[int]]:
    flow = sw.Flow("io")
    sink = Counting()
    limits: list[int] = []
    stream = flow.source(sw.sources.Iterable(range(n))).map_async(fn, concurrency=concurrency)
    if isinstance(concurrency, sw.Adaptive):
        adaptive = concurrency
        stream = stream.inspect(lambda _: limits.append(adaptive.limit))
    stream.sink(sink)
    t0 = time.perf_counter()
    sw.run(flow, handle_signals=False)
    elapsed = time.perf_counter() - t0
    assert sink.n == n
    return n / elapsed, limits


async def plain(n: int) -> float:
    t0 = time.perf_counter()
    results: dict[int, int] = {}
    pending: set[asyncio.Task[int]] = set()
    index: dict[asyncio.Task[int], int] = {}
    for i in range(n):
        if len(pending) >= CONCURRENCY:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for d in done:
                results[index.pop(d)] = d.result()
        t = asyncio.create_task(call(i))
        index[t] = i
        pending.add(t)
    for d in await asyncio.gather(*pending):
        results[d] = d
    assert len(results) == n
    return n / (time.perf_counter() - t0)


def measure(params: Params) -> Result:
    n = params["records"]
    fixed, _ = run_sluiceway(n, CONCURRENCY, call)
    baseline = asyncio.run(plain(n))
    adaptive = sw.Adaptive(min=1, max=1000, initial=4)
    adapt_rate, limits = run_sluiceway(n * 2, adaptive, LoadedService(CONCURRENCY))
    settled = limits[len(limits) // 2 :]
    return {
        "records": n,
        "sluiceway": fixed,
        "plain": baseline,
        "adaptive": adapt_rate,
        "adaptive_limit_mean": sum(settled) / len(settled),
        "adaptive_limit_range": [min(settled), max(settled)],
    }


def run(quick: bool) -> tuple[list[Row], Result]:
    """Run IO in a child process; the table rows."""
    res = run_child("bench_async_io", "measure", {"records": 4_000 if quick else 40_000})
    wl = f"IO map_async, 10 ms calls ({fmt_int(res['records'])} rec)"
    sw_rate = res["sluiceway"]
    lo, hi = res["adaptive_limit_range"]
    rows = [
        Row(
            wl,
            f"sluiceway, concurrency={CONCURRENCY}",
            f"{fmt_int(sw_rate)} rec/s",
            f"{sw_rate / res['plain']:.2f}x plain",
            f">= {fmt_int(TARGET)} rec/s",
            "PASS" if sw_rate >= TARGET else "FAIL",
        ),
        Row(wl, f"plain asyncio, {CONCURRENCY} at a time", f"{fmt_int(res['plain'])} rec/s"),
        Row(
            wl,
            "sluiceway, sw.Adaptive() vs capacity 100",
            f"{fmt_int(res['adaptive'])} rec/s; limit settles at "
            f"{res['adaptive_limit_mean']:.0f} (range {lo}-{hi})",
        ),
    ]
    return rows, res


if __name__ == "__main__":
    child_main({"measure": measure})
