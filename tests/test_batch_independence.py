"""Batch-size independence as a property: one flow with every operator and every
multi-input shape, run on random out-of-order input with ``max_batch_size`` 1, 7 and
1,024, must give the same output on every sink, in the same order.

The README promises results that never depend on batching.  The flow holds, side by
side: a branch merged back (a diamond, with different operators on each side), a merge
with an independent second source, tumbling / sliding / session windows with allowed
lateness and late output, windows of window results, ``map_async`` (ordered and not)
before a window, ``batch`` behind a filter (the watermark moves with dropped records),
``stateful_map``, a ``process`` function with event-time timers, a ``buffer`` and a
``rate_limit``.  Everything runs on a virtual clock, so processing time only decides
*when* things happen, never *what* comes out.  Only time-driven operators are left out:
``batch(max_delay=...)``, idle timeouts and processing-time windows depend on timing by
design.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import sluiceway as sw
from sluiceway.flowcontrol import TokenBucket

SIZES = (1, 7, 1024)


def ts_of(e: dict[str, Any]) -> float:
    return float(e["ts"])


def key_of(e: dict[str, Any]) -> str:
    return str(e["k"])


def row(w: sw.WindowResult) -> tuple[Any, ...]:
    return (w.key, w.start, w.end, w.value, w.revision, w.final, w.kind)


def late_row(x: Any) -> tuple[Any, ...]:
    return (x.value["id"] if isinstance(x.value, dict) else x.value, x.window_start, x.watermark)


def running(total: int | None, e: dict[str, Any]) -> tuple[int, tuple[str, int, int]]:
    total = (total or 0) + 1
    return total, (e["k"], e["id"], total)


class Deadlines:
    """Per key: a timer 3 s of event time after each record; when it fires, how many
    records came before it and the watermark then."""

    def process(self, ctx: Any, value: dict[str, Any]) -> None:
        seen = ctx.value("seen")
        seen.set((seen.get() or 0) + 1)
        ctx.timers.at_event_time(ctx.timestamp + 3.0)

    def on_timer(self, ctx: Any, time: float) -> None:
        ctx.emit((ctx.key, time, ctx.value("seen").get()))


def build(
    events: list[dict[str, Any]],
    other: list[dict[str, Any]],
    bound: float,
    clock: sw.VirtualClock,
) -> tuple[sw.Flow, dict[str, sw.sinks.Collect[Any]]]:
    flow = sw.Flow("independence")
    out: dict[str, sw.sinks.Collect[Any]] = {}

    def sink(stream: Any, name: str) -> None:
        out[name] = sw.sinks.Collect()
        stream.sink(out[name], name=name)

    def windows(stream: Any, name: str, assigner: Any, lateness: float) -> Any:
        w = stream.window(assigner, allowed_lateness=lateness).aggregate(
            n=sw.agg.count(), ids=sw.agg.collect(lambda e: e["id"])
        )
        sink(w.map(row), name)
        sink(w.late().map(late_row), f"{name}_late")
        return w

    async def call(e: dict[str, Any]) -> dict[str, Any]:
        await clock.sleep(0.001 * (e["id"] % 7))  # calls finish out of order
        return e

    src = flow.source(sw.sources.Iterable(events), name="src").with_timestamps(ts_of, bound)
    # A diamond: branch, different operators on each side, merge back.
    yes, no = src.branch(lambda e: e["id"] % 3 == 0)
    yes = yes.map(lambda e: {**e, "side": 1})
    no = no.filter(lambda e: e["id"] % 5 != 1).flat_map(
        lambda e: [e, {**e, "id": -e["id"]}] if e["id"] % 4 == 0 else [e]
    )
    diamond = yes.merge(no, name="diamond")
    # An independent second source, paced, behind a buffer.
    src2 = (
        flow.source(sw.sources.Iterable(other), name="src2")
        .rate_limit(TokenBucket(rate=200, burst=5))
        .buffer(8)
        .with_timestamps(ts_of, bound)
    )
    keyed = diamond.merge(src2, name="both").key_by(key_of)

    tumbling = windows(keyed, "tumbling", sw.windows.Tumbling(5), 2.0)
    windows(keyed, "sliding", sw.windows.Sliding(6, 2), 1.0)
    windows(keyed, "session", sw.windows.Session(2), 1.0)
    # Windows of window results (their event time is end - 1 µs).
    sink(
        tumbling.filter(lambda w: w.final)
        .window(sw.windows.Tumbling(10))
        .aggregate(sw.agg.sum(lambda w: w.value["n"]))
        .map(row),
        "tumbling_of_results",
    )
    # map_async before windows, in order and as completed.
    ordered = keyed.map_async(call, concurrency=4).key_by(key_of)
    windows(ordered, "async_ordered", sw.windows.Tumbling(4), 0.0)
    unordered = keyed.map_async(call, concurrency=4, ordered=False).key_by(key_of)
    counted = unordered.window(sw.windows.Tumbling(4), allowed_lateness=1.0).aggregate(
        sw.agg.count()
    )
    sink(counted.map(row), "async_unordered")
    sink(counted.late().map(late_row), "async_unordered_late")
    # batch behind a filter: dropped records move the watermark while lists wait.
    lists = src.filter(lambda e: e["id"] % 2 == 0).batch(3)
    windows(
        lists.map(lambda ids: {"id": ids[0]["id"], "n": len(ids)}),
        "lists",
        sw.windows.Tumbling(5),
        0.0,
    )
    # Keyed state and event-time timers.
    sink(keyed.stateful_map(running), "stateful_map")
    deadlines = keyed.process(Deadlines)
    sink(deadlines, "process_timers")
    # A window over what the timers emitted (their event time is the timer's).
    sink(
        deadlines.window(sw.windows.Tumbling(5)).aggregate(sw.agg.sum(lambda d: d[2])).map(row),
        "window_of_timers",
    )
    return flow, out


def run(
    events: list[dict[str, Any]], other: list[dict[str, Any]], bound: float, size: int
) -> dict[str, list[Any]]:
    clock = sw.VirtualClock()
    flow, out = build(events, other, bound, clock)
    sw.testing.run_flow(flow, clock=clock, max_batch_size=size)
    return {name: c.items for name, c in out.items()}


def stream(first_id: int) -> st.SearchStrategy[list[dict[str, Any]]]:
    """Records ~0.5 s apart, each off by up to 4 s either way, some 15 s behind (late
    even for sessions)."""
    offset = st.one_of(st.integers(-40, 40), st.just(-150))
    return st.lists(st.tuples(st.sampled_from("abc"), offset), max_size=50).map(
        lambda rows: [
            {"id": first_id + i, "k": k, "ts": round(i * 0.5 + off / 10, 1)}
            for i, (k, off) in enumerate(rows)
        ]
    )


@settings(max_examples=100, deadline=None)
@given(events=stream(0), other=stream(1000), bound=st.sampled_from([0.0, 1.0, 2.5]))
def test_every_operator_gives_the_same_output_at_every_batch_size(
    events: list[dict[str, Any]], other: list[dict[str, Any]], bound: float
) -> None:
    outputs = [run(events, other, bound, size) for size in SIZES]
    for name, want in outputs[-1].items():
        for size, got in zip(SIZES, outputs, strict=True):
            assert got[name] == want, f"sink {name!r}: max_batch_size {size} vs 1024"


def test_the_property_sees_late_records_and_every_sink_gets_output() -> None:
    """The property is not vacuous: on an input like the ones drawn, every sink gets
    something, and some records are late."""
    events = [
        {"id": i, "k": "abc"[i % 3], "ts": round(i * 0.5 + ((i * 37) % 81 - 40) / 10, 1)}
        for i in range(50)
    ]
    for e in events[20::10]:
        e["ts"] -= 15.0
    other = [{**e, "id": 1000 + e["id"], "k": "bca"[e["id"] % 3]} for e in events]
    got = run(events, other, 1.0, 7)
    assert all(got.values()), [name for name, items in got.items() if not items]
