"""The load feedback rules of the seed documents, as a sluiceway ``LoadPolicy``.

* CPU above 80 %               -> shrink the sources' fetch batch size
* queue delay above 1 s        -> switch a rate limit on
* GC above 5 collections/min   -> ask for more instances (a metric an autoscaler reads)
* latency p99 above 2 s        -> reject new data at admission (HTTP 429)

The engine measures the signals itself (process CPU, event-loop lag, queue delay in the
channels, latency p99, full GC collections).  This example runs on a virtual clock and
*injects* the signals (``probes=``) so that every rule switches on and off on cue; drop
``probes`` to act on the measured values.  Each switch is logged once and shows in
``handle.metrics().load``, on ``/metrics`` (``sluiceway_load_rule_active``,
``sluiceway_wants_more_instances``) and in the web view.

Run it::

    python examples/load_feedback.py
"""

from __future__ import annotations

import asyncio
import logging

import sluiceway as sw
from sluiceway.flowcontrol import LimitRate, RejectAdmission, ShrinkFetch, WantMoreInstances

RULES = [
    sw.LoadRule("cpu", above=0.80, below=0.60, action=ShrinkFetch(factor=0.25)),
    sw.LoadRule("queue_delay", above=1.0, action=LimitRate(rate=200)),
    sw.LoadRule("gc_per_minute", above=5, action=WantMoreInstances()),
    sw.LoadRule("latency_p99", above=2.0, action=RejectAdmission()),
]

# An injected day: (from t, cpu, queue delay s, gc/min, p99 s)
DAY = [
    (0.0, 0.35, 0.1, 1.0, 0.05),
    (2.0, 0.92, 0.2, 2.0, 0.30),  # CPU spike
    (4.0, 0.95, 1.6, 7.0, 2.50),  # everything is on fire
    (6.0, 0.40, 0.2, 1.0, 0.10),  # calm again
]


async def main() -> list[tuple[float, tuple[str, ...], bool]]:
    clock = sw.VirtualClock()

    def signal(column: int) -> float:
        return [row[column] for row in DAY if row[0] <= clock.monotonic()][-1]

    policy = sw.LoadPolicy(
        RULES,
        interval=0.5,
        probes={
            "cpu": lambda: signal(1),
            "queue_delay": lambda: signal(2),
            "gc_per_minute": lambda: signal(3),
            "latency_p99": lambda: signal(4),
        },
    )
    inbox: sw.sources.Push[int] = sw.sources.Push(capacity=1000)
    flow = sw.Flow("feedback")
    flow.source(inbox, name="inbox").sink(sw.sinks.Collect(), name="out")
    handle = sw.start(flow, clock=clock, load=policy)
    timeline: list[tuple[float, tuple[str, ...], bool]] = []
    for t in (1.0, 3.0, 5.0, 7.0):
        await clock.sleep_until(t)
        load = handle.metrics().load
        assert load is not None
        accepted = inbox.offer(int(t))
        timeline.append((t, load.active, accepted))
        answer = "accepted" if accepted else f"rejected: {inbox.refusal}"
        print(f"t={t}: rules on: {list(load.active) or 'none'}; submit -> {answer}")  # noqa: T201
    await handle.stop()
    return timeline


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    asyncio.run(main())
