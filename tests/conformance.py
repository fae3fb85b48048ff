"""The connector conformance suite (issue 6): one set of checks every broker connector
passes, against the real server.

A broker plugs in with a :class:`Harness`: it makes a source and a sink on its own
uniquely named stream/queue/topic, publishes and reads with the raw client library, and
says how many records the broker still holds for the source (undelivered, or delivered
and not acknowledged) once no flow runs.  The checks are the promises of the connector
contract (``sluiceway.connectors.base``):

* order within a partition;
* credit: a saturated pipeline stops fetching, the broker keeps the backlog;
* acknowledgment only after the record is durably handled (after every sink without
  checkpoints, after a stored checkpoint with them);
* redelivery of unacknowledged records after a crash;
* a clean close (the run ends on its own, no task left behind);
* resume from a checkpoint position, exactly once with an exactly-once sink;
* the sink: what ``write`` returned from is in the broker, in order.

``tests/test_conformance.py`` runs every check for every harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import sluiceway as sw
from sluiceway.connectors.base import Sink, Source

IDLE = 0.6  # seconds without input after which a conformance source ends its input


class Harness(Protocol):
    """One broker's adapter to the conformance checks (one instance per test)."""

    name: str
    backlog: int
    """How many records the broker can hold for an idle source without dropping any
    (Mosquitto's default ``max_queued_messages`` is 1000)."""

    async def setup(self) -> None:
        """Create what the source needs before anything is published (a durable
        subscription, a consumer group)."""
        ...

    def source(self) -> Source:
        """A source on the harness's input, with the same durable identity every call
        (consumer group, durable consumer, queue, client id), ending after ``IDLE``
        seconds without input."""
        ...

    def sink(self) -> Sink | None:
        """A sink writing to the harness's output (None: the broker has no sink here)."""
        ...

    async def publish(self, values: list[Any]) -> None:
        """Put JSON values into the input with the raw client, in order."""
        ...

    async def read_output(self, n: int) -> list[Any]:
        """The first ``n`` values the sink wrote, read with the raw client."""
        ...

    async def held(self) -> int:
        """Records the broker holds for the source now -- undelivered, or delivered and
        not acknowledged: what a restart would receive.  Called only when no flow runs,
        and last in a check (it may consume them)."""
        ...


def _flow(name: str, source: Source, sink: Sink, capacity: int = 1024) -> sw.Flow:
    flow = sw.Flow(name, channel_capacity=capacity)
    flow.source(source, name="in").map(lambda v: v, name="same").sink(sink, name="out")
    return flow


async def _eventually(check: Callable[[], Awaitable[bool]], seconds: float = 10.0) -> bool:
    """Poll ``check`` (state another task changes) until it holds or ``seconds`` pass."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while not await check():  # noqa: ASYNC110 - polling test-side state
                await asyncio.sleep(0.05)
            return True
    return False


async def order_within_a_partition(h: Harness) -> None:
    values = [{"i": i} for i in range(500)]
    await h.publish(values)
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    await sw.run_async(_flow("order", h.source(), out), max_batch_size=64)
    assert out.items == values, f"{h.name}: records out of order or missing"


async def credit_stops_fetching(h: Harness) -> None:
    """A sink that takes one batch every 0.1 s behind a 16-record channel: the source
    may hand out only what fits (channel + batches in flight), the broker keeps the rest."""
    n = h.backlog
    await h.publish([{"i": i} for i in range(n)])

    class Slow(Sink):
        def __init__(self) -> None:
            self.n = 0

        async def write(self, batch: Any) -> None:
            await asyncio.sleep(0.1)
            self.n += len(batch.values)

    slow = Slow()
    flow = sw.Flow("credit", channel_capacity=16)
    flow.source(h.source(), name="in").buffer(16, name="buf").sink(slow, name="out")
    handle = sw.start(flow, max_batch_size=16)
    await asyncio.sleep(1.0)
    handed_out = handle.metrics().operator("in").records_out
    written = slow.n
    await _crash(handle)
    assert handed_out <= written + 16 + 3 * 16, (
        f"{h.name}: the source handed out {handed_out} records while the sink wrote "
        f"{written}: it does not follow credit"
    )
    assert await h.held() >= n - written - 64, f"{h.name}: the broker lost the backlog"


async def ack_only_after_durable_handling(h: Harness, tmp: Path) -> None:
    values = [{"i": i} for i in range(200)]
    await h.publish(values)
    written: list[Any] = []

    class Gate(Sink):
        """Writes, then holds the flow until released: nothing checkpointed yet."""

        def __init__(self) -> None:
            self.release = asyncio.Event()

        async def write(self, batch: Any) -> None:
            written.extend(batch.values)
            if len(written) >= len(values):
                await self.release.wait()

    gate = Gate()
    ck = sw.Checkpoints(tmp / "ck", interval=3600)  # only the first one
    handle = sw.start(_flow("ack", h.source(), gate), checkpoints=ck)
    assert await _eventually(lambda: _true(len(written) >= len(values)))
    await asyncio.sleep(0.3)  # ack barriers would have passed by now: there are none
    await _crash(handle)
    # Everything reached the sink, but no checkpoint holds it: the broker must keep it.
    assert await h.held() == len(values), f"{h.name}: acknowledged before a checkpoint"


async def ack_after_the_final_checkpoint(h: Harness, tmp: Path) -> None:
    values = [{"i": i} for i in range(150)]
    await h.publish(values)
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    ck = sw.Checkpoints(tmp / "ck", interval=3600)
    await sw.run_async(_flow("ack-final", h.source(), out), checkpoints=ck)
    assert len(out.items) == len(values)
    assert await h.held() == 0, f"{h.name}: not acknowledged after the final checkpoint"


async def ack_after_every_sink_without_checkpoints(h: Harness) -> None:
    values = [{"i": i} for i in range(300)]
    await h.publish(values)
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    await sw.run_async(_flow("ack-barriers", h.source(), out))
    assert len(out.items) == len(values)
    assert await h.held() == 0, f"{h.name}: records written by the sink were not acknowledged"


async def redelivery_after_a_crash(h: Harness) -> None:
    values = [{"i": i} for i in range(300)]
    await h.publish(values)
    first: sw.sinks.Collect[Any] = sw.sinks.Collect()

    class Stuck(Sink):
        async def write(self, batch: Any) -> None:
            first.items.extend(batch.values)
            await asyncio.Event().wait()  # never returns: nothing is acknowledged

    handle = sw.start(_flow("crash", h.source(), Stuck()))
    assert await _eventually(lambda: _true(len(first.items) > 0))
    await _crash(handle)
    again: sw.sinks.Collect[Any] = sw.sinks.Collect()
    await sw.run_async(_flow("crash", h.source(), again))
    missing = Counter(json.dumps(v) for v in values) - Counter(json.dumps(v) for v in again.items)
    assert not missing, f"{h.name}: {sum(missing.values())} records not delivered again"


async def clean_close(h: Harness) -> None:
    await h.publish([{"i": i} for i in range(50)])
    before = asyncio.all_tasks()
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    await asyncio.wait_for(sw.run_async(_flow("close", h.source(), out)), 30)
    await asyncio.sleep(0.05)
    left = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert not left, f"{h.name}: tasks left after the run: {left}"
    assert len(out.items) == 50


async def resume_from_a_checkpoint(h: Harness, tmp: Path) -> None:
    values = [{"i": i} for i in range(400)]
    await h.publish(values)
    out = tmp / "out.jsonl"
    ck = sw.Checkpoints(tmp / "ck", interval=0.2)

    class Paced(Sink):
        def __init__(self) -> None:
            self.inner = sw.sinks.JsonLines(out)

        async def open(self, ctx: Any) -> None:
            await self.inner.open(ctx)

        async def write(self, batch: Any) -> None:
            await asyncio.sleep(0.02)
            await self.inner.write(batch)

        async def pre_commit(self, checkpoint_id: int | None) -> Any:
            return await self.inner.pre_commit(checkpoint_id)

        def restore(self, state: Any) -> None:
            self.inner.restore(state)

        async def close(self) -> None:
            await self.inner.close()

    handle = sw.start(_flow("resume", h.source(), Paced()), checkpoints=ck, max_batch_size=20)
    await asyncio.sleep(0.5)
    stopped = await handle.stop()  # at a final checkpoint
    assert stopped.stopped
    await sw.run_async(_flow("resume", h.source(), Paced()), checkpoints=ck, max_batch_size=20)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert Counter(json.dumps(v) for v in got) == Counter(json.dumps(v) for v in values), (
        f"{h.name}: after a stop and a restart, records were lost or duplicated"
    )


async def sink_writes_in_order(h: Harness) -> None:
    sink = h.sink()
    if sink is None:
        return
    values = [{"i": i, "s": "x" * (i % 7)} for i in range(300)]
    flow = sw.Flow("sink")
    flow.source(sw.sources.Iterable(values), name="in").sink(sink, name="out")
    await sw.run_async(flow, max_batch_size=50)
    assert await h.read_output(len(values)) == values, f"{h.name}: the sink lost or reordered"


async def _true(x: bool) -> bool:
    return x


async def _crash(handle: sw.FlowHandle) -> None:
    """Cancel at once, as a crash would (sources and sinks still close)."""
    handle.force_stop("conformance: crash")
    with contextlib.suppress(sw.FlowCancelledError):
        await handle.wait()


SOURCE_CHECKS: dict[str, Callable[..., Awaitable[None]]] = {
    "order": order_within_a_partition,
    "credit": credit_stops_fetching,
    "ack_after_checkpoint": ack_only_after_durable_handling,
    "ack_final_checkpoint": ack_after_the_final_checkpoint,
    "ack_after_sinks": ack_after_every_sink_without_checkpoints,
    "redelivery": redelivery_after_a_crash,
    "clean_close": clean_close,
    "resume": resume_from_a_checkpoint,
}
"""Checks of a source (the ones taking a second argument get a temporary directory)."""

SINK_CHECKS: dict[str, Callable[..., Awaitable[None]]] = {"sink_order": sink_writes_in_order}
