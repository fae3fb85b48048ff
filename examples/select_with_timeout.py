"""Go's ``select`` with ``time.After``: a write that waits a little, then drops.

The seed document's soft backpressure, in Go::

    select {
    case out <- event:
    case <-time.After(10 * time.Millisecond):
        dropped++            // the consumer is behind: give up on this one
    }

In sluiceway the edge does it: ``buffer(capacity, Overflow.DROP_NEWEST,
block_timeout=0.01)`` waits up to 10 ms for room and then drops the records that still
do not fit, counting them (``DROP_OLDEST`` drops the oldest queued ones instead).  The
producer is never blocked for good; the wait shows as backpressure.

Run it::

    python examples/select_with_timeout.py

It runs on a virtual clock: 300 events at 1 kHz into a consumer that needs 5 ms each.
"""

from __future__ import annotations

import itertools

import sluiceway as sw


def main() -> dict[str, float]:
    clock = sw.VirtualClock()

    async def consumer(event: int) -> None:
        await clock.sleep(0.005)  # 200 events/s at most

    flow = sw.Flow("select-with-timeout")
    (
        flow.source(
            sw.sources.Generator(lambda: itertools.islice(itertools.count(), 300), rate=1000)
        )
        .buffer(8, sw.Overflow.DROP_NEWEST, block_timeout=0.01, name="out")  # select + time.After
        .sink(sw.sinks.Function(consumer), name="consumer")
    )
    result = sw.run(flow, clock=clock, handle_signals=False)
    ch = result.metrics.channel("out.in")
    summary = {
        "sent": result.metrics.operator("source_Generator").records_out,
        "delivered": result.metrics.operator("consumer").records_in,
        "dropped": ch.records_dropped,
        "blocked_seconds": round(ch.blocked_seconds, 3),
    }
    print(summary)  # noqa: T201 - an example
    return summary


if __name__ == "__main__":
    main()
