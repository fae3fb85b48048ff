"""``tryAcquire`` or reject: a rate-limited NATS consumer that hands messages back.

The seed document's consumer takes a permit from a rate limiter for each message and,
when there is none, rejects the message back to the broker to be redelivered later,
instead of waiting with it.  In sluiceway that is
``rate_limit(limiter, when_limited="reject", retry_after=...)`` right after a broker
source: a message over the limit is NAKed with a delay (NATS JetStream; RabbitMQ
requeues), the messages after it go on, and every rejected one comes back and is
processed -- once, unless the process dies (at-least-once, as without the limit).

Here each tenant may do 5 messages a second (bursts of 2); tenant ``a`` sends 10 at
once, ``b`` sends 2.  ``b`` is not held up by ``a``: it does not queue behind ``a``'s
messages, which come back from the server after ``retry_after``.

Run it (nats-server -js on 127.0.0.1:4222)::

    python examples/try_acquire_or_reject.py

Environment: ``SLUICEWAY_NATS_URL`` (default ``nats://127.0.0.1:4222``).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any

import nats
from nats.js.api import StreamConfig

import sluiceway as sw
from sluiceway.connectors.nats import NatsSource
from sluiceway.flowcontrol import KeyedLimiter, TokenBucket

URL = os.environ.get("SLUICEWAY_NATS_URL", "nats://127.0.0.1:4222")


async def setup(stream: str, messages: list[dict[str, Any]]) -> None:
    nc = await nats.connect(URL)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"]))
        for m in messages:
            await js.publish(f"{stream}.jobs", json.dumps(m).encode())
    finally:
        await nc.close()


async def teardown(stream: str) -> None:
    nc = await nats.connect(URL)
    try:
        await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


def main() -> tuple[list[tuple[str, int, int]], int]:
    stream = f"TRYACQUIRE_{uuid.uuid4().hex[:8]}"
    jobs = [{"tenant": "a", "n": i} for i in range(10)] + [
        {"tenant": "b", "n": i} for i in range(2)
    ]
    asyncio.run(setup(stream, jobs))
    try:
        source = NatsSource(
            URL,
            stream,
            f"{stream}.jobs",
            durable="workers",
            include_metadata=True,
            ack_wait=1.0,  # a NAK racing an expiring pull comes back after this
            fetch_timeout=0.2,
            stop_after_idle=2.0,
        )
        done: list[tuple[str, int, int]] = []  # (tenant, n, deliveries)
        flow = sw.Flow("try-acquire")
        (
            flow.source(source)
            .key_by(lambda m: m.payload["tenant"])
            .rate_limit(
                KeyedLimiter(lambda: TokenBucket(rate=5, burst=2)),  # tryAcquire per tenant
                when_limited="reject",  # no permit: NAK, redelivered in 0.3 s
                retry_after=0.3,
            )
            .sink(
                sw.sinks.Function(
                    lambda m: done.append((m.payload["tenant"], m.payload["n"], m.delivered))
                )
            )
        )
        sw.run(flow, handle_signals=False)
    finally:
        asyncio.run(teardown(stream))
    for tenant, n, deliveries in done:
        print(f"tenant {tenant} job {n}: processed on delivery {deliveries}")  # noqa: T201
    print(f"{source.rejected} rejections, {len(done)} jobs processed")  # noqa: T201
    return done, source.rejected


if __name__ == "__main__":
    main()
