"""RMQ: RabbitMQ end to end -- queue -> map -> queue, sluiceway vs the raw aio-pika loop.

    python benchmarks/bench_rabbitmq.py            # full (~1-2 min), prints the table
    python benchmarks/bench_rabbitmq.py --quick    # ~20 s smoke run
    python benchmarks/bench_rabbitmq.py --url amqp://guest:guest@127.0.0.1:5672/

Each measurement is a fresh child process with its own queues
(``sluiceway-bench-<uuid>.in`` / ``.out``, deleted afterwards).  It preloads N persistent
JSON messages into the input queue (with confirms), then times moving all of them through
a ``map`` into the output queue, from the start until the last one is confirmed there:

* ``sluiceway``: ``sources.RabbitMQ(prefetch=P)`` -> ``map(enrich)`` ->
  ``sinks.RabbitMQ`` (publisher confirms), acknowledging on the runtime's ack barriers.
* ``aio-pika``: the loop a user would write with the same client: a consumer with the
  same prefetch feeding an ``asyncio.Queue``; take what is there (up to the batch size),
  decode, ``enrich``, publish the batch concurrently with confirms
  (``default_exchange.publish``), then ``ack(multiple=True)`` the batch's last message.

* ``aiormq``: the same loop on the protocol layer under aio-pika (``basic_consume``,
  ``basic_publish``, ``basic_ack`` on aiormq channels), which is what the connectors use;
  a stricter baseline, skipping aio-pika's per-message wrapper objects and tasks.

Target: sluiceway >= 70 % of the raw aio-pika loop (the row also shows the ratio to the
aiormq loop).  Best of ``repeats``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from typing import Any

import aio_pika
from common import Params, Result, Row, fmt_int, module_main, run_child

import sluiceway as sw

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
PREFETCH = 2000
BATCH = 1024


def enrich(r: dict[str, Any]) -> dict[str, Any]:
    return {**r, "amount_eur": round(r["amount"] * 0.92, 2)}


def _record(i: int) -> bytes:
    return json.dumps({"id": i, "user": f"user{i % 1000}", "amount": (i % 200) / 10.0}).encode()


async def _preload(url: str, queue: str, n: int) -> None:
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel(publisher_confirms=True)
        await ch.declare_queue(queue, durable=True)
        props = aio_pika.DeliveryMode.PERSISTENT
        for start in range(0, n, 1000):
            await asyncio.gather(
                *(
                    ch.default_exchange.publish(
                        aio_pika.Message(_record(i), delivery_mode=props), routing_key=queue
                    )
                    for i in range(start, min(n, start + 1000))
                )
            )
    finally:
        await conn.close()


async def _cleanup(url: str, *queues: str) -> int:
    """Delete the queues; how many messages the last one held."""
    conn = await aio_pika.connect(url)
    held = 0
    try:
        for q in queues:
            ch = await conn.channel()
            ok = await ch.queue_delete(q)
            held = ok.message_count or 0
    finally:
        await conn.close()
    return held


async def _sluiceway(url: str, qin: str, qout: str, n: int, prefetch: int) -> float:
    src = sw.sources.RabbitMQ(url, qin, prefetch=prefetch)
    sink = sw.sinks.RabbitMQ(url, declare_queue=qout)
    flow = sw.Flow("bench-rmq")
    flow.source(src, name="in").map(enrich, name="enrich").sink(sink, name="out")
    handle = sw.start(flow, max_batch_size=BATCH)
    t0 = time.perf_counter()
    while sink.published < n:
        if handle.done():
            await handle.wait()  # raises what stopped it
            raise RuntimeError("the flow ended early")
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - t0
    await handle.stop()
    return elapsed


async def _raw(url: str, qin: str, qout: str, n: int, prefetch: int) -> float:
    conn = await aio_pika.connect(url)
    try:
        cin = await conn.channel(publisher_confirms=False)
        await cin.set_qos(prefetch_count=prefetch)
        cout = await conn.channel(publisher_confirms=True, on_return_raises=True)
        await cout.declare_queue(qout, durable=True)
        queue = await cin.declare_queue(qin, passive=True)
        inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            inbox.put_nowait(message)

        t0 = time.perf_counter()
        tag = await queue.consume(on_message, no_ack=False)
        ex = cout.default_exchange
        done = 0
        while done < n:
            batch = [await inbox.get()]
            while len(batch) < BATCH and not inbox.empty():
                batch.append(inbox.get_nowait())
            values = [enrich(json.loads(m.body)) for m in batch]
            await asyncio.gather(
                *(
                    ex.publish(
                        aio_pika.Message(
                            json.dumps(v).encode(),
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            content_type="application/json",
                        ),
                        routing_key=qout,
                    )
                    for v in values
                )
            )
            await batch[-1].ack(multiple=True)
            done += len(batch)
        elapsed = time.perf_counter() - t0
        await queue.cancel(tag)
        return elapsed
    finally:
        await conn.close()


async def _aiormq(url: str, qin: str, qout: str, n: int, prefetch: int) -> float:
    """The same loop on aio-pika's protocol layer (aiormq channels), the primitives the
    connectors use: ``basic_consume`` into a deque, ``basic_publish`` with confirms."""
    from pamqp import commands as spec  # noqa: PLC0415 - aio-pika's dependency

    conn = await aio_pika.connect(url)
    try:
        cin = await conn.channel(publisher_confirms=False)
        await cin.set_qos(prefetch_count=prefetch)
        cout = await conn.channel(publisher_confirms=True, on_return_raises=True)
        await cout.declare_queue(qout, durable=True)
        await cin.declare_queue(qin, passive=True)
        rin, rout = await cin.get_underlay_channel(), await cout.get_underlay_channel()
        inbox: deque[Any] = deque()
        ready = asyncio.Event()

        async def on_message(message: Any) -> None:
            inbox.append(message)
            ready.set()

        t0 = time.perf_counter()
        ok = await rin.basic_consume(qin, on_message, no_ack=False)
        done = 0
        while done < n:
            if not inbox:
                ready.clear()
                await ready.wait()
            batch = [inbox.popleft() for _ in range(min(BATCH, len(inbox)))]
            values = [enrich(json.loads(m.body)) for m in batch]
            await asyncio.gather(
                *(
                    rout.basic_publish(
                        json.dumps(v).encode(),
                        routing_key=qout,
                        properties=spec.Basic.Properties(
                            delivery_mode=2,
                            content_type="application/json",
                            message_id=str(done + i),
                        ),
                        mandatory=True,
                    )
                    for i, v in enumerate(values)
                )
            )
            await rin.basic_ack(batch[-1].delivery.delivery_tag, multiple=True)
            done += len(batch)
        elapsed = time.perf_counter() - t0
        assert ok.consumer_tag is not None
        await rin.basic_cancel(ok.consumer_tag)
        return elapsed
    finally:
        await conn.close()


SYSTEMS = {"sluiceway": _sluiceway, "aio-pika": _raw, "aiormq": _aiormq}


def measure(params: Params) -> Result:
    """Child entry: records/s of ``system`` (a key of :data:`SYSTEMS`)."""
    url, n, system = params["url"], int(params["n"]), params["system"]
    prefetch = int(params.get("prefetch", PREFETCH))

    async def main() -> Result:
        base = f"sluiceway-bench-{uuid.uuid4().hex}"
        qin, qout = f"{base}.in", f"{base}.out"
        try:
            await _preload(url, qin, n)
            run = SYSTEMS[system]
            elapsed = await run(url, qin, qout, n, prefetch)
        finally:
            out = await _cleanup(url, qin, qout)
        if out < n:
            raise RuntimeError(f"{system}: only {out} of {n} messages reached the output")
        return {"rate": n / elapsed, "elapsed": elapsed, "out": out}

    return asyncio.run(main())


def run(quick: bool, url: str = DEFAULT_URL) -> tuple[list[Row], Result]:
    """The RMQ rows (for run.py) and the raw figures."""
    n, repeats = (3000, 1) if quick else (20000, 2)
    raw: Result = {"n": n, "prefetch": PREFETCH, "batch": BATCH, "repeats": repeats}
    rates: dict[str, float] = {}
    for system in ("aio-pika", "aiormq", "sluiceway"):
        runs = [
            run_child(
                "bench_rabbitmq", "measure", {"url": url, "n": n, "system": system}, timeout=300
            )["rate"]
            for _ in range(repeats)
        ]
        rates[system] = max(runs)
        raw[system] = runs
    ratio = rates["sluiceway"] / rates["aio-pika"]
    strict = rates["sluiceway"] / rates["aiormq"]
    wl = "RMQ rabbitmq queue->map->queue"
    rows = [
        Row(
            wl,
            f"sluiceway RabbitMQ source -> map -> sink (prefetch {PREFETCH}, confirms)",
            f"{fmt_int(rates['sluiceway'])} rec/s",
            f"{ratio:.0%} of aio-pika, {strict:.0%} of aiormq",
            ">= 70%",
            "PASS" if ratio >= 0.7 else "FAIL",
        ),
        Row(
            wl,
            "aio-pika consume -> map -> confirmed publish, ack(multiple) per batch",
            f"{fmt_int(rates['aio-pika'])} rec/s",
        ),
        Row(
            wl,
            "the same loop on aiormq channels (the connectors' primitives)",
            f"{fmt_int(rates['aiormq'])} rec/s",
        ),
    ]
    return rows, raw


if __name__ == "__main__":
    module_main(__doc__ or "", run, {"measure": measure}, ("--url", DEFAULT_URL, "the broker"))
