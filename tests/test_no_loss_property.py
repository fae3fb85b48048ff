"""The core promise, as a property: a record is output, dead-lettered, dropped by a policy
the user chose (and counted), or filtered out by the user's own predicate -- never lost.

    output + dead letters + dropped by policy (+ filtered) == input
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import sluiceway as sw
from sluiceway.runtime.messages import Batch


class SlowCollect(sw.sinks.Sink):
    """Collects ids; optionally fails on some and sleeps (virtual) per batch."""

    def __init__(self, clock: sw.Clock, fail_on: set[int], delay: float) -> None:
        self.clock = clock
        self.fail_on = fail_on
        self.delay = delay
        self.items: list[int] = []

    async def write(self, batch: Batch) -> None:
        if self.delay:
            await self.clock.sleep(self.delay)
        for i, v in enumerate(batch.values):
            if v["id"] in self.fail_on:
                self.fail_on.discard(v["id"])  # transient: the retry succeeds
                raise sw.sinks.PartialWriteError(i, OSError(f"write failed for {v['id']}"))
            self.items.append(v["id"])


overflows = st.sampled_from(list(sw.Overflow))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 300),
    map_fail=st.sets(st.integers(0, 299), max_size=30),
    filter_fail=st.sets(st.integers(0, 299), max_size=30),
    transient=st.sets(st.integers(0, 299), max_size=30),
    sink_fail=st.sets(st.integers(0, 299), max_size=10),
    drop_mod=st.integers(2, 7),
    overflow=overflows,
    capacity=st.integers(1, 64),
    batch=st.integers(1, 50),
    sink_delay=st.sampled_from([0.0, 0.001, 0.01]),
)
def test_every_record_is_accounted_for(
    n: int,
    map_fail: set[int],
    filter_fail: set[int],
    transient: set[int],
    sink_fail: set[int],
    drop_mod: int,
    overflow: sw.Overflow,
    capacity: int,
    batch: int,
    sink_delay: float,
) -> None:
    clock = sw.VirtualClock()
    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    seen_transient: set[int] = set()

    def enrich(r: dict[str, Any]) -> dict[str, Any]:
        i = r["id"]
        if i in map_fail:
            raise ValueError(f"cannot enrich {i}")
        if i in transient and i not in seen_transient:
            seen_transient.add(i)
            raise ConnectionError("flaky lookup")
        return {**r, "enriched": True}

    def keep(r: dict[str, Any]) -> bool:
        if r["id"] in filter_fail:
            raise KeyError("amount")
        return r["id"] % drop_mod != 0

    sink = SlowCollect(clock, set(sink_fail), sink_delay)
    flow = sw.Flow("prop")
    dead = sw.DeadLetter(dlq)
    (
        flow.source(sw.sources.Iterable([{"id": i} for i in range(n)]))
        .map(enrich, name="enrich", on_error=sw.Retry(2, then=dead))
        .filter(keep, name="keep", on_error=dead)
        .buffer(capacity, overflow, name="buf")
        .sink(sink, name="out", on_error=sw.Retry(2, then=dead))
    )
    try:
        result = sw.testing.run_flow(flow, clock=clock, max_batch_size=batch)
    except sw.ChannelOverflowError:
        assert overflow is sw.Overflow.FAIL
        return
    snap = result.metrics
    dropped = snap.channel("buf.in").records_dropped
    dead_ids = [d.record["id"] for d in dlq.items]
    filtered = {
        i for i in range(n) if i not in map_fail and i not in filter_fail and i % drop_mod == 0
    }
    out = sink.items

    assert len(out) == len(set(out)), "a record was duplicated in the output"
    assert len(dead_ids) == len(set(dead_ids)), "a record was dead-lettered twice"
    assert not set(out) & set(dead_ids)
    assert set(dead_ids) == (map_fail | filter_fail) & set(range(n))
    assert len(out) + len(dead_ids) + dropped + len(filtered) == n
    if overflow in (sw.Overflow.BLOCK, sw.Overflow.FAIL):
        assert dropped == 0
        assert out == sorted(out)  # order kept
    assert snap.operator("buf").dropped == dropped
