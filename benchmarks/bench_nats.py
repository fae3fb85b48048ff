"""NATS: records/s through JetStream -> map -> JetStream, sluiceway vs the raw nats-py loop.

    python benchmarks/bench_nats.py           # full (~40 s), prints the table
    python benchmarks/bench_nats.py --quick   # ~15 s smoke run
    python benchmarks/bench_nats.py --url nats://127.0.0.1:4222

Each run preloads ``n`` JSON records (:func:`common.make_record`) into a fresh stream, then
times reading them back through a durable pull consumer, a ``map`` (one field added) and a
publish of every result to a second subject of the same stream, awaiting its PubAck.  The
clock stops when every result is stored *and* every input message is acknowledged.

* ``sluiceway``: ``sw.sources.NatsJetStream -> map -> sw.sinks.NatsJetStream`` with the
  defaults (fetches of up to 1,024, acks every ~0.1 s after the sink, the sink's 256
  publishes in flight).
* ``raw nats-py``: the loop a careful user writes with the same client: ``fetch(1024)``,
  decode, map, publish the batch 256 at a time with ``js.publish_async`` and await every
  PubAck, then ``ack`` each message and ``ack_sync`` the last.

Each measurement is a fresh child process on its own stream (deleted afterwards); best of
``repeats``.  Target: sluiceway >= 70 % of the raw loop.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import nats
from common import (
    Params,
    Result,
    Row,
    fmt_int,
    make_record,
    module_main,
    run_child,
)
from nats.js.api import StreamConfig

import sluiceway as sw

DEFAULT_URL = "nats://127.0.0.1:4222"
BATCH = 1024
WINDOW = 256
TARGET = 0.70


def transform(r: dict[str, Any]) -> dict[str, Any]:
    return {**r, "amount_eur": round(r["amount"] * 0.92, 2)}


async def _preload(url: str, stream: str, n: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"]))
        for start in range(0, n, 2000):
            await asyncio.gather(
                *(
                    js.publish(f"{stream}.in", json.dumps(make_record(i)).encode())
                    for i in range(start, min(n, start + 2000))
                )
            )
    finally:
        await nc.close()


async def _check_and_delete(url: str, stream: str, n: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        consumer = await js.consumer_info(stream, "bench")
        assert info.state.messages == 2 * n, info.state.messages
        assert consumer.num_ack_pending == 0, consumer
        assert consumer.num_pending == 0, consumer
        await js.delete_stream(stream)
    finally:
        await nc.close()


async def _raw(url: str, stream: str, n: int) -> float:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        from nats.js.api import AckPolicy, ConsumerConfig  # noqa: PLC0415

        await js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name="bench",
                ack_policy=AckPolicy.EXPLICIT,
                filter_subject=f"{stream}.in",
                max_ack_pending=20_000,
            ),
        )
        sub = await js.pull_subscribe_bind(durable="bench", stream=stream)
        out = f"{stream}.out"
        t0 = time.perf_counter()
        done = 0
        while done < n:
            msgs = await sub.fetch(BATCH, timeout=1)
            results = [transform(json.loads(m.data)) for m in msgs]
            payloads = [json.dumps(r).encode() for r in results]
            for start in range(0, len(payloads), WINDOW):
                futures = [await js.publish_async(out, p) for p in payloads[start : start + WINDOW]]
                await asyncio.gather(*futures)
            for m in msgs[:-1]:
                await m.ack()
            await msgs[-1].ack_sync()
            done += len(msgs)
        return time.perf_counter() - t0
    finally:
        await nc.close()


async def _sluiceway(url: str, stream: str, n: int) -> float:
    src = sw.sources.NatsJetStream(url, stream, f"{stream}.in", durable="bench")
    sink = sw.sinks.NatsJetStream(url, f"{stream}.out")
    flow = sw.Flow("bench-nats")
    flow.source(src).map(transform).sink(sink)
    handle = sw.start(flow)
    t0 = time.perf_counter()
    while not (sink.published >= n and src.acked >= n):  # noqa: ASYNC110 - two counters
        await asyncio.sleep(0.0005)
    elapsed = time.perf_counter() - t0
    await handle.stop()
    return elapsed


def measure(params: Params) -> Result:
    """Child entry: seconds for ``n`` records with ``system`` ("raw" or "sluiceway")."""
    url, n, system = params["url"], int(params["n"]), params["system"]
    stream = f"SWBENCH_{uuid.uuid4().hex[:12]}"

    async def main() -> float:
        await _preload(url, stream, n)
        try:
            run = _raw if system == "raw" else _sluiceway
            elapsed = await run(url, stream, n)
            await _check_and_delete(url, stream, n)
            return elapsed
        except BaseException:
            nc = await nats.connect(url)
            await nc.jetstream().delete_stream(stream)
            await nc.close()
            raise

    elapsed = asyncio.run(main())
    return {"seconds": elapsed, "rate": n / elapsed}


def run(quick: bool, url: str = DEFAULT_URL) -> tuple[list[Row], Result]:
    """The NATS rows (for run.py) and the raw figures."""
    n, repeats = (20_000, 2) if quick else (100_000, 3)
    raw: Result = {"n": n, "repeats": repeats}
    rates: dict[str, float] = {}
    for system in ("raw", "sluiceway"):
        runs = [
            run_child("bench_nats", "measure", {"url": url, "n": n, "system": system})["rate"]
            for _ in range(repeats)
        ]
        raw[system] = runs
        rates[system] = max(runs)
    ratio = rates["sluiceway"] / rates["raw"]
    wl = "NATS jetstream->map->jetstream"
    rows = [
        Row(
            wl,
            "sluiceway NatsJetStream source + sink",
            f"{fmt_int(rates['sluiceway'])} rec/s",
            f"{ratio:.0%} of raw",
            f">= {TARGET:.0%}",
            "PASS" if ratio >= TARGET else "FAIL",
        ),
        Row(wl, "raw nats-py fetch/publish/ack loop", f"{fmt_int(rates['raw'])} rec/s"),
    ]
    return rows, raw


if __name__ == "__main__":
    module_main(__doc__ or "", run, {"measure": measure}, ("--url", DEFAULT_URL, "the NATS server"))
