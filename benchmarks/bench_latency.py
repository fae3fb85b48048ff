"""LAT latency: a steady 10,000 records/s through map -> buffer(1000) -> map -> filter -> sink.

The source is ``Generator(factory, rate=rate)`` on a ``SystemClock``.  Its factory runs
inside ``Generator.open()``, immediately before the generator takes its own start time
``start``; record ``k`` (1-based) is due at ``start + k / rate``.  So the factory reads
``t0 = clock.monotonic()`` (``t0 <= start``, a few microseconds earlier) and stamps record
``k`` with ``due = t0 + k / rate``.  The sink measures ``now - due`` per record: latency
from the moment the record was *scheduled* to exist, which includes the pacing delay
(the generator wakes on the event loop's timer, so a record may be produced up to a
timer tick after it was due) -- the honest figure for a producer emitting at that rate.
Because ``t0 <= start``, the stamp errs on the side of a larger latency.

Records also carry ``created`` (``clock.monotonic()`` when the generator yielded them);
``now - created`` is the engine-only latency, reported beside it.

If the flow fell more than a second behind, ``Generator`` restarts its schedule and the
due stamps would run ahead; that shows up as a > 1 s max latency, never hides.

The baseline is the same pacing rule, the same three functions and the same latency
measurement in plain asyncio: a producer task that sleeps until the next record is due,
then puts every due record (one per message) into an ``asyncio.Queue(maxsize=1000)``;
one consumer task applies map -> map -> filter and measures.  Each system runs in its own
child process; all records of the run are counted (no warm-up discarded).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import time
from collections.abc import Iterator
from typing import Any

from common import Params, Result, Row, child_main, fmt_int, percentile, run_child

import sluiceway as sw

Record = dict[str, Any]

TARGET_P99_MS = 5.0


def enrich(r: Record) -> Record:
    return {**r, "amount": r["amount"] * 1.1}


def add_fee(r: Record) -> Record:
    return {**r, "fee": r["amount"] * 0.01}


def keep(r: Record) -> bool:
    return r["amount"] >= 0.0  # type: ignore[no-any-return]  # keeps every record


def _summary(due_lat: list[float], created_lat: list[float], elapsed: float, rate: float) -> Result:
    worst = max(range(len(due_lat)), key=due_lat.__getitem__, default=0)
    worst_created = max(range(len(created_lat)), key=created_lat.__getitem__, default=0)
    due_lat.sort()
    created_lat.sort()
    out: Result = {
        "count": len(due_lat),
        "elapsed": elapsed,
        "rate": len(due_lat) / elapsed,
        # when (seconds into the run) the worst record was due: a start-up stall or not
        "due_max_at_s": (worst + 1) / rate,
        "created_max_at_s": (worst_created + 1) / rate,
    }
    for label, lat in (("due", due_lat), ("created", created_lat)):
        for q in (50.0, 99.0, 99.9):
            out[f"{label}_p{q:g}_ms"] = percentile(lat, q) * 1e3
        out[f"{label}_max_ms"] = (lat[-1] if lat else math.nan) * 1e3
    return out


class LatencySink(sw.sinks.Sink):
    """Records ``now - due`` and ``now - created`` for every record it receives."""

    def __init__(self, clock: sw.Clock) -> None:
        self.clock = clock
        self.due: list[float] = []
        self.created: list[float] = []

    async def write(self, batch: sw.Batch) -> None:
        now = self.clock.monotonic()
        values = batch.values
        self.due.extend([now - r["due"] for r in values])
        self.created.extend([now - r["created"] for r in values])


def run_sluiceway(params: Params) -> Result:
    """Child entry: the sluiceway flow for ``duration`` seconds at ``rate`` records/s."""
    rate, duration = float(params["rate"]), float(params["duration"])
    clock = sw.SystemClock()

    def factory() -> Iterator[Record]:
        t0 = clock.monotonic()
        mono = clock.monotonic
        return (
            {"id": k, "amount": (k % 200) / 10.0, "due": t0 + k / rate, "created": mono()}
            for k in itertools.count(1)
        )

    sink = LatencySink(clock)
    flow = sw.Flow("w3_latency")
    (
        flow.source(sw.sources.Generator(factory, rate=rate), name="source")
        .map(enrich, name="enrich")
        .buffer(1000, name="buffer")
        .map(add_fee, name="add_fee")
        .filter(keep, name="keep")
        .sink(sink, name="sink")
    )

    async def stop_after(handle: sw.FlowHandle) -> None:
        await asyncio.sleep(duration)
        handle.request_stop()
        await asyncio.Event().wait()  # cancelled when the flow ends

    gc.collect()
    t0 = time.monotonic()
    sw.run(flow, clock=clock, monitor=stop_after, handle_signals=False)
    return _summary(sink.due, sink.created, time.monotonic() - t0, rate)


def run_queue(params: Params) -> Result:
    """Child entry: the same pacing and functions in plain asyncio with a Queue."""
    rate, duration = float(params["rate"]), float(params["duration"])
    due_lat: list[float] = []
    created_lat: list[float] = []

    async def main() -> float:
        q: asyncio.Queue[Record] = asyncio.Queue(maxsize=1000)
        mono = time.monotonic
        start = mono()
        stop_at = start + duration

        async def produce() -> None:
            emitted = 0
            while True:
                now = mono()
                if now >= stop_at:
                    return
                due = math.floor((now - start) * rate + 1e-9) - emitted
                if due <= 0:
                    await asyncio.sleep(start + (emitted + 1) / rate - now)
                    continue
                for _ in range(due):
                    emitted += 1
                    await q.put(
                        {
                            "id": emitted,
                            "amount": (emitted % 200) / 10.0,
                            "due": start + emitted / rate,
                            "created": mono(),
                        }
                    )

        async def consume() -> None:
            while True:
                r = add_fee(enrich(await q.get()))
                if keep(r):
                    now = mono()
                    due_lat.append(now - r["due"])
                    created_lat.append(now - r["created"])
                q.task_done()

        consumer = asyncio.create_task(consume())
        await produce()
        await q.join()
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        return mono() - start

    gc.collect()
    elapsed = asyncio.run(main())
    return _summary(due_lat, created_lat, elapsed, rate)


def _fmt(res: Result, label: str) -> str:
    return (
        f"p50 {res[f'{label}_p50_ms']:.2f} / p99 {res[f'{label}_p99_ms']:.2f} / "
        f"p99.9 {res[f'{label}_p99.9_ms']:.2f} / max {res[f'{label}_max_ms']:.2f} ms "
        f"(at {res[f'{label}_max_at_s']:.2f} s)"
    )


def run(quick: bool) -> tuple[list[Row], Result]:
    """Run LAT (each system in its own child process); the table rows."""
    params: Params = {"rate": 10_000, "duration": 3.0 if quick else 10.0}
    s = run_child("bench_latency", "sluiceway", params)
    q = run_child("bench_latency", "queue", params)
    wl = f"LAT latency ({fmt_int(params['rate'])} rec/s, {params['duration']:g} s)"
    ok = s["due_p99_ms"] < TARGET_P99_MS
    rows = [
        Row(
            wl,
            "sluiceway, due->sink",
            f"{_fmt(s, 'due')}; {fmt_int(s['count'])} rec at {fmt_int(s['rate'])}/s",
            "1.00",
            f"p99 < {TARGET_P99_MS:g} ms",
            "PASS" if ok else "FAIL",
        ),
        Row(wl, "sluiceway, created->sink", _fmt(s, "created")),
        Row(
            wl,
            "asyncio.Queue, due->sink",
            f"{_fmt(q, 'due')}; {fmt_int(q['count'])} rec at {fmt_int(q['rate'])}/s",
            f"sw p99 = {s['due_p99_ms'] / q['due_p99_ms']:.2f}x",
        ),
        Row(wl, "asyncio.Queue, created->sink", _fmt(q, "created")),
    ]
    return rows, {"sluiceway": s, "asyncio_queue": q}


if __name__ == "__main__":
    child_main({"sluiceway": run_sluiceway, "queue": run_queue})
