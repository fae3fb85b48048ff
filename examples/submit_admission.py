"""``Submit(data) -> accepted / rejected``: a producer answered at once by admission.

The seed document's backpressure controller, in sluiceway: a service hands records to a
running flow through a :class:`sluiceway.sources.Push` source.  ``offer`` never waits:
it answers *accepted* while the flow keeps up (the buffer has room) and *rejected* when
the flow is saturated, so the service can tell its own caller to come back later instead
of queueing without bound.  ``put(record, timeout=...)`` is the patient variant: it waits
up to the timeout for room.

Run it::

    python examples/submit_admission.py

It runs on a virtual clock (instant and deterministic): a consumer that takes 10 ms per
record is fed 100 records as fast as the service can submit them.
"""

from __future__ import annotations

import asyncio

import sluiceway as sw


async def main(clock: sw.VirtualClock | None = None) -> dict[str, int]:
    clock = clock or sw.VirtualClock()
    processed: list[int] = []

    async def slow_consumer(record: int) -> None:
        await clock.sleep(0.01)  # 100 records/s at most
        processed.append(record)

    inbox: sw.sources.Push[int] = sw.sources.Push(capacity=16)
    flow = sw.Flow("admission")
    flow.source(inbox, name="inbox").sink(sw.sinks.Function(slow_consumer), name="consumer")
    handle = sw.start(flow, clock=clock)

    def submit(data: int) -> str:
        return "accepted" if inbox.offer(data) else "rejected"

    answers = {"accepted": 0, "rejected": 0}
    for i in range(100):
        answers[submit(i)] += 1
        await clock.sleep(0.002)  # the service receives one every 2 ms: 5x too fast
    # The patient way: wait up to 50 ms for room instead of answering "rejected".
    answers["put_ok"] = int(await inbox.put(1000, timeout=0.05))
    await handle.stop()  # closes intake, then drains every accepted record
    answers["processed"] = len(processed)
    print(answers)  # noqa: T201 - an example
    return answers


if __name__ == "__main__":
    asyncio.run(main())
