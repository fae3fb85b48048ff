"""BP backpressure memory: a fast lazy source into a ~20,000 records/s sink.

sluiceway: ``Generator(factory)`` (no rate: as fast as pulled) -> ``buffer(capacity)``
-> ``Function(slow_sink, batched=True)``, where ``slow_sink`` awaits
``asyncio.sleep(len(batch) / sink_rate)`` (real time; benchmark code may sleep, the
engine may not).  A ``monitor=`` coroutine samples every ``interval`` seconds:

* in flight = source ``records_out`` - sink ``records_out`` (``handle.metrics()``), and
  the buffer channel's ``fill``;
* ``VmRSS`` from /proc/self/status.

It requests a graceful stop after ``duration`` seconds (unless the source ends first).
Peak RSS growth is ``VmHWM`` at the end minus ``VmRSS`` just before the flow was built.

The bound checked for in-flight records is ``capacity + 2 * max_batch_size``:

* stage 0 (source -> buffer's send) holds at most the one batch it pulled, which the
  runtime sizes to the credit ``min(max_batch_size, room)`` -- at most ``max_batch_size``;
* the buffer channel holds at most ``capacity`` records (a larger send is split, and
  the writer awaits room for the rest);
* stage 1 (buffer -> sink) holds at most the one batch it took from the channel, which is
  one of stage 0's batches (or a slice of one) -- at most ``max_batch_size``.

The baseline is what people write first: a producer task putting the same records into an
*unbounded* ``asyncio.Queue`` (yielding to the loop every ``max_batch_size`` records), and
a consumer taking what is queued, up to ``max_batch_size`` records, and sleeping the same
``len / sink_rate``.  Each system runs in its own child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Any

from common import Params, Result, Row, child_main, fmt_int, make_record, proc_status_kb, run_child

import sluiceway as sw

TARGET_GROWTH_MB = 50.0


def run_sluiceway(params: Params) -> Result:
    """Child entry: the sluiceway flow; RSS and in-flight samples."""
    total, duration = int(params["records"]), float(params["duration"])
    sink_rate, capacity = float(params["sink_rate"]), int(params["capacity"])
    max_batch, interval = int(params["max_batch"]), float(params["interval"])

    gc.collect()
    baseline_kb = proc_status_kb("VmRSS")

    def factory() -> Any:
        return (make_record(i) for i in range(total))

    writes: list[tuple[float, int]] = []  # (seconds into the run, records) per sink write

    async def slow_sink(values: list[Any]) -> None:
        writes.append((time.monotonic() - started, len(values)))
        await asyncio.sleep(len(values) / sink_rate)

    started = time.monotonic()
    flow = sw.Flow("w2_backpressure")
    (
        flow.source(sw.sources.Generator(factory), name="source")
        .buffer(capacity=capacity, name="buffer")
        .sink(sw.sinks.Function(slow_sink, batched=True), name="sink")
    )

    in_flight: list[int] = []
    fills: list[int] = []
    rss_kb: list[int] = []

    async def monitor(handle: sw.FlowHandle) -> None:
        while True:
            await asyncio.sleep(interval)
            snap = handle.metrics()
            pulled = snap.operator("source").records_out
            sunk = snap.operator("sink").records_out
            in_flight.append(pulled - sunk)
            fills.append(snap.channel("buffer.in").fill)
            rss_kb.append(proc_status_kb("VmRSS"))
            if time.monotonic() - started >= duration and not handle.stopping:
                handle.request_stop()

    result = sw.run(flow, monitor=monitor, max_batch_size=max_batch, handle_signals=False)
    elapsed = time.monotonic() - started
    peak_kb = proc_status_kb("VmHWM")
    pulled = result.metrics.operator("source").records_out
    sunk = result.metrics.operator("sink").records_out
    channel = result.metrics.channel("buffer.in")
    first = [n for t, n in writes if t < 2.0]
    last = [n for t, n in writes if duration - 2.0 <= t < duration]
    return {
        "writes": len(writes),
        "single_record_writes": sum(1 for _, n in writes if n == 1),
        "mean_write_first_2s": sum(first) / max(1, len(first)),
        "mean_write_last_2s": sum(last) / max(1, len(last)),
        "sunk_first_2s": sum(first),
        "sunk_last_2s": sum(last),
        "baseline_mb": baseline_kb / 1024,
        "peak_mb": peak_kb / 1024,
        "growth_mb": (peak_kb - baseline_kb) / 1024,
        "max_sampled_rss_mb": max(rss_kb, default=baseline_kb) / 1024,
        "samples": len(in_flight),
        "max_in_flight": max(in_flight, default=0),
        "max_fill_sampled": max(fills, default=0),
        "channel_max_fill": channel.max_fill,
        "bound": capacity + 2 * max_batch,
        "pulled": pulled,
        "sunk": sunk,
        "elapsed": elapsed,
        "sink_rate": sunk / elapsed,
        "blocked_seconds": channel.blocked_seconds,
    }


def run_queue(params: Params) -> Result:
    """Child entry: producer -> unbounded asyncio.Queue -> slow consumer."""
    total, duration = int(params["records"]), float(params["duration"])
    sink_rate, max_batch = float(params["sink_rate"]), int(params["max_batch"])
    interval = float(params["interval"])

    gc.collect()
    baseline_kb = proc_status_kb("VmRSS")
    queued: list[int] = []
    rss_kb: list[int] = []
    counts = {"produced": 0, "consumed": 0}

    async def main() -> float:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()  # unbounded: the naive version
        done = asyncio.Event()

        async def produce() -> None:
            for i in range(total):
                q.put_nowait(make_record(i))
                counts["produced"] += 1
                if i % max_batch == max_batch - 1:
                    await asyncio.sleep(0)

        async def consume() -> None:
            while counts["consumed"] < total:
                batch = [await q.get()]
                while len(batch) < max_batch and not q.empty():
                    batch.append(q.get_nowait())
                await asyncio.sleep(len(batch) / sink_rate)
                counts["consumed"] += len(batch)
            done.set()

        async def sample() -> None:
            while True:
                await asyncio.sleep(interval)
                queued.append(q.qsize())
                rss_kb.append(proc_status_kb("VmRSS"))

        t0 = time.monotonic()
        tasks = [asyncio.create_task(c) for c in (produce(), consume(), sample())]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=duration)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    peak_kb = proc_status_kb("VmHWM")
    return {
        "baseline_mb": baseline_kb / 1024,
        "peak_mb": peak_kb / 1024,
        "growth_mb": (peak_kb - baseline_kb) / 1024,
        "max_sampled_rss_mb": max(rss_kb, default=baseline_kb) / 1024,
        "samples": len(queued),
        "max_in_flight": max(queued, default=0),
        "pulled": counts["produced"],
        "sunk": counts["consumed"],
        "elapsed": elapsed,
        "sink_rate": counts["consumed"] / elapsed,
    }


def run(quick: bool) -> tuple[list[Row], Result]:
    """Run BP (each system in its own child process); the table rows."""
    params: Params = {
        "records": 200_000 if quick else 2_000_000,
        "duration": 3.0 if quick else 20.0,
        "sink_rate": 20_000,
        "capacity": 10_000,
        "max_batch": 1024,
        "interval": 0.1,
    }
    s = run_child("bench_backpressure", "sluiceway", params)
    q = run_child("bench_backpressure", "queue", params)
    wl = f"BP backpressure ({params['duration']:g} s)"
    grew_ok = s["growth_mb"] < TARGET_GROWTH_MB
    bound_ok = s["max_in_flight"] <= s["bound"] and s["channel_max_fill"] <= params["capacity"]
    lossless = s["pulled"] == s["sunk"]
    rows = [
        Row(
            wl,
            "sluiceway",
            f"peak RSS +{s['growth_mb']:.1f} MB; sink {fmt_int(s['sink_rate'])} rec/s",
            "1.00",
            f"< {TARGET_GROWTH_MB:g} MB",
            "PASS" if grew_ok else "FAIL",
        ),
        Row(
            wl,
            "sluiceway in flight",
            f"max {fmt_int(s['max_in_flight'])} of {s['samples']} samples; "
            f"channel max_fill {fmt_int(s['channel_max_fill'])}; "
            f"{fmt_int(s['pulled'])} pulled = {fmt_int(s['sunk'])} sunk",
            "",
            f"<= {fmt_int(s['bound'])}, lossless",
            "PASS" if bound_ok and lossless else "FAIL",
        ),
        Row(
            wl,
            "sluiceway sink writes",
            f"mean {s['mean_write_first_2s']:.0f} rec/write in the first 2 s, "
            f"{s['mean_write_last_2s']:.0f} in the last 2 s; "
            f"{fmt_int(s['single_record_writes'])} of {fmt_int(s['writes'])} writes are 1 record",
            "",
            "",
            "",
        ),
        Row(
            wl,
            "asyncio.Queue (unbounded)",
            f"peak RSS +{q['growth_mb']:.1f} MB; max queued {fmt_int(q['max_in_flight'])}; "
            f"sink {fmt_int(q['sink_rate'])} rec/s",
            f"{q['growth_mb'] / max(s['growth_mb'], 0.1):.0f}x sw RSS growth",
            "",
            "",
        ),
    ]
    return rows, {"sluiceway": s, "asyncio_queue": q}


if __name__ == "__main__":
    child_main({"sluiceway": run_sluiceway, "queue": run_queue})
