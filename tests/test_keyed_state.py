"""Keyed state for user code: stateful_map, process (value/map state, TTL, timers),
per-record error isolation, checkpoints (snapshot/restore), metrics, and docs/state.md."""

from __future__ import annotations

import asyncio
import itertools
import math
import pickle
import random
import re
import threading
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sluiceway as sw
from sluiceway.core.delta import fold_incremental
from sluiceway.metrics.registry import OperatorMetrics
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.operators.errors import DeadLetterWriter, ErrorHandler
from sluiceway.operators.keyed_state import KeyedProcessSpec, StatefulMapSpec, process_factory
from sluiceway.runtime.messages import Batch, Control, Watermark
from sluiceway.state import TTL, ProcessContext, TimerEvent

S = 1_000_000  # ticks per second

pytestmark = pytest.mark.usefixtures("keyed_backend")  # every test on both backends


# -- helpers -------------------------------------------------------------------------------


def ts1(r: tuple[Any, float]) -> float:
    return r[1]


def count(state: int | None, value: Any) -> tuple[int, tuple[Any, int]]:
    n = (state or 0) + 1
    return n, (value, n)


def keyed_flow(
    records: Any, build: Any, *, key: Any = lambda r: r[0], ts: Any = None, bound: float = 0.0
) -> tuple[sw.Flow, sw.sinks.Collect[Any]]:
    flow = sw.Flow("state")
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    src = records if isinstance(records, sw.sources.Source) else sw.sources.Iterable(records)
    s = flow.source(src)
    if ts is not None:
        s = s.with_timestamps(ts, bound)
    build(s.key_by(key)).sink(out)
    return flow, out


class Capture(Step):
    """The child of a step under test: every record with its columns, and controls."""

    def __init__(self) -> None:
        super().__init__("capture", OperatorMetrics("capture", "sink", 0))
        self.rows: list[Any] = []

    async def push(self, batch: Batch) -> None:
        n = len(batch.values)
        keys = batch.keys or [None] * n
        ts = batch.timestamps or [None] * n
        wms = batch.watermarks or [None] * n
        self.rows.extend(zip(batch.values, keys, ts, wms, strict=True))

    async def control(self, message: Control) -> None:
        self.rows.append(("control", message))

    async def finish(self) -> None:
        self.rows.append("end")


def make_step(
    spec: OpSpec, clock: sw.VirtualClock, name: str = "op"
) -> tuple[Step, Capture, OperatorMetrics]:
    m = OperatorMetrics(name, spec.kind, 0)
    errors = ErrorHandler(
        sw.Fail(),
        flow="t",
        operator=name,
        clock=clock,
        metrics=m,
        dead_letters={},
        rng=random.Random(0),
    )
    step = spec.build(BuildContext("t", name, clock, m, errors, 1024))
    cap = Capture()
    step.children.append(cap)
    return step, cap, m


def event_batch(rows: list[tuple[Any, Any, int]], before: float) -> tuple[Batch, float]:
    """(value, key, ticks) rows as a batch with a watermark column (bound 0)."""
    wms: list[float] = []
    hi = before
    for _, _, t in rows:
        wms.append(hi)
        hi = max(hi, t)
    batch = Batch([r[0] for r in rows], [r[2] for r in rows], [r[1] for r in rows], wms)
    return batch, hi


def process_spec(fn: Any, *, timestamped: bool = True) -> KeyedProcessSpec:
    factory, has_timer = process_factory(fn)
    return KeyedProcessSpec(factory, timestamped=timestamped, processing_timers=has_timer)


# -- stateful_map ------------------------------------------------------------------------------


def test_stateful_map_keeps_a_running_count_per_key() -> None:
    out = sw.testing.run_collect(
        lambda s: s.key_by(lambda w: w).stateful_map(count), ["a", "b", "a", "c", "a", "b"]
    )
    assert out == [("a", 1), ("b", 1), ("a", 2), ("c", 1), ("a", 3), ("b", 2)]


def test_stateful_map_results_do_not_depend_on_batch_sizes() -> None:
    words = [random.Random(3).choice("abcde") for _ in range(200)]
    runs = []
    for size in (1, 7, 1024):
        flow, out = keyed_flow(words, lambda k: k.stateful_map(count), key=lambda w: w)
        sw.testing.run_flow(flow, max_batch_size=size)
        runs.append(out.items)
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][-1][1] == words.count(words[-1])


def test_returning_none_deletes_the_keys_state() -> None:
    def until_reset(total: int | None, x: tuple[str, int]) -> tuple[int | None, Any]:
        if x[1] == 0:
            return None, ("reset", total)
        total = (total or 0) + x[1]
        return total, total

    flow, out = keyed_flow(
        [("a", 1), ("a", 2), ("b", 5), ("a", 0), ("a", 4), ("b", 0)],
        lambda k: k.stateful_map(until_reset, name="sums"),
    )
    result = sw.testing.run_flow(flow)
    assert out.items == [1, 3, 5, ("reset", 3), 4, ("reset", 5)]
    assert result.metrics.operator("sums").state == 1  # only "a" holds state at the end


def test_outputs_keep_key_timestamp_and_watermark_columns() -> None:
    clock = sw.VirtualClock()
    step, cap, _ = make_step(StatefulMapSpec(count, ttl=None, timestamped=True), clock)
    batch, _ = event_batch([("x", "a", 5 * S), ("y", "b", 3 * S), ("z", "a", 9 * S)], -math.inf)
    asyncio.run(step.push(batch))
    assert cap.rows == [
        (("x", 1), "a", 5 * S, -math.inf),
        (("y", 1), "b", 3 * S, 5 * S),
        (("z", 2), "a", 9 * S, 5 * S),
    ]


def test_stateful_map_output_feeds_a_keyed_event_time_window() -> None:
    flow, out = keyed_flow(
        [("a", 1.0), ("b", 2.0), ("a", 3.0), ("a", 12.0)],
        lambda k: (
            k.stateful_map(count)
            .window(sw.windows.Tumbling(10))
            .aggregate(sw.agg.count())
            .map(lambda r: (r.key, r.start, r.value))
        ),
        ts=lambda r: r[1],
    )
    sw.testing.run_flow(flow)
    assert sorted(out.items) == [("a", 0.0, 2), ("a", 10.0, 1), ("b", 0.0, 1)]


def test_stateful_map_checks_its_arguments() -> None:
    keyed = sw.Flow("f").source(sw.sources.Iterable([1])).key_by(lambda x: x)
    with pytest.raises(TypeError, match="stateful_map\\(\\) expects a callable"):
        keyed.stateful_map(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"ttl=...\) must be > 0 seconds, got -1"):
        keyed.stateful_map(count, ttl=-1)
    with pytest.raises(TypeError, match=r"ttl=...\) must be seconds"):
        keyed.stateful_map(count, ttl="5s")  # type: ignore[arg-type]
    with pytest.raises(sw.FlowDefinitionError, match="has no event time"):
        keyed.stateful_map(count, ttl=TTL(5, time="event"))
    with pytest.raises(ValueError, match="'processing' or 'event'"):
        TTL(5, time="wall")  # type: ignore[arg-type]


def test_a_bad_return_value_goes_to_the_error_policy() -> None:
    flow, _ = keyed_flow(["a"], lambda k: k.stateful_map(lambda s, v: v), key=lambda w: w)
    with pytest.raises(sw.OperatorError, match="must return a \\(state, output\\) pair"):
        sw.testing.run_flow(flow)


# -- TTL ---------------------------------------------------------------------------------------


def test_processing_time_ttl_expires_state_not_written_for_ttl() -> None:
    script = sw.testing.ScriptedSource(
        [(0.0, ["a"]), (3.0, ["a"]), (7.9, ["a"]), (12.95, ["a"]), (13.0, ["b"])]
    )
    flow, out = keyed_flow(
        script, lambda k: k.stateful_map(count, ttl=5.0, name="ttl"), key=lambda w: w
    )
    result = sw.testing.run_flow(flow)
    # written at 0, 3, 7.9: alive (< 5 s between writes); 12.95 is 5.05 s after 7.9.
    assert out.items == [("a", 1), ("a", 2), ("a", 3), ("a", 1), ("b", 1)]
    assert result.metrics.operator("ttl").state == 2


def test_processing_time_ttl_frees_state_on_a_timer_without_new_records() -> None:
    clock = sw.VirtualClock(autojump=False)
    step, _, m = make_step(StatefulMapSpec(count, ttl=TTL(5), timestamped=False), clock)
    assert step.uses_timer()
    asyncio.run(step.push(Batch(["a", "b"], keys=["a", "b"])))
    clock.advance(2)
    asyncio.run(step.push(Batch(["b"], keys=["b"])))
    assert m.state == 2
    assert step.next_deadline() == pytest.approx(5.0)
    clock.advance(3)
    asyncio.run(step.on_timer(clock.monotonic()))
    assert m.state == 1  # "a" expired at 5; "b" was written at 2
    assert step.next_deadline() == pytest.approx(7.0)
    clock.advance(2)
    asyncio.run(step.on_timer(clock.monotonic()))
    assert m.state == 0
    assert step.next_deadline() is None


def test_event_time_ttl_follows_the_watermark_not_the_clock() -> None:
    records = [("a", 0.0), ("a", 1.0), ("b", 5.9), ("a", 6.5), ("b", 7.0), ("a", 30.0)]
    flow, out = keyed_flow(
        records,
        lambda k: k.stateful_map(lambda n, r: count(n, r[0]), ttl=TTL(5, time="event"), name="ttl"),
        ts=lambda r: r[1],
    )
    result = sw.testing.run_flow(flow)
    # "a" written at t=1: alive while the watermark < 6.  The watermark before ("a", 6.5)
    # is 5.9: alive.  Before ("a", 30.0) it is 7.0 < 6.5 + 5: alive again.
    assert out.items == [("a", 1), ("a", 2), ("b", 1), ("a", 3), ("b", 2), ("a", 4)]
    assert result.metrics.operator("ttl").state == 0  # end of input: the watermark is +inf

    records = [("a", 0.0), ("b", 5.0), ("a", 6.0)]
    flow, out = keyed_flow(
        records,
        lambda k: k.stateful_map(lambda n, r: count(n, r[0]), ttl=TTL(5, time="event")),
        ts=lambda r: r[1],
    )
    sw.testing.run_flow(flow)
    assert out.items == [("a", 1), ("b", 1), ("a", 1)]  # watermark 5 >= 0 + 5: expired


def test_an_out_of_order_write_does_not_shorten_an_event_time_ttl() -> None:
    records = [("a", 10.0), ("a", 4.0), ("b", 22.0), ("a", 23.0)]
    flow, out = keyed_flow(
        records,
        lambda k: k.stateful_map(lambda n, r: count(n, r[0]), ttl=TTL(5, time="event")),
        ts=lambda r: r[1],
        bound=10.0,
    )
    sw.testing.run_flow(flow)
    # "a" was last written at event time 10 (the write at 4 came late): alive until the
    # watermark reaches 15; before ("a", 23.0) it is 22 - 10 = 12.
    assert out.items == [("a", 1), ("a", 2), ("b", 1), ("a", 3)]


def test_state_cleared_and_written_again_late_expires_on_its_new_deadline() -> None:
    class SetClearGet:
        def process(self, ctx: ProcessContext[Any], r: tuple[str, str, float]) -> None:
            v = ctx.value("v", ttl=TTL(7, time="event"))
            if r[1] == "set":
                v.set(r[2])
            elif r[1] == "clear":
                v.clear()
            else:
                ctx.emit((ctx.key, v.get()))

    records = [
        ("a", "set", 19.0),  # deadline 26
        ("a", "clear", 20.0),
        ("a", "set", 16.0),  # late (bound 10): deadline 23, earlier than the first one
        ("b", "get", 34.0),
        ("a", "get", 35.0),  # the watermark is 24 here: a's value has expired
    ]
    flow, out = keyed_flow(records, lambda k: k.process(SetClearGet), ts=lambda r: r[2], bound=10)
    sw.testing.run_flow(flow)
    assert out.items == [("b", None), ("a", None)]


def test_event_time_ttl_gives_the_same_results_for_any_batch_size() -> None:
    rng = random.Random(11)
    records = [(rng.choice("ab"), rng.uniform(0, 400)) for _ in range(200)]
    runs = []
    for size in (1, 5, 1024):
        flow, out = keyed_flow(
            records,
            lambda k: k.stateful_map(lambda n, r: count(n, r[0]), ttl=TTL(3, time="event")),
            ts=lambda r: r[1],
            bound=1.0,
        )
        sw.testing.run_flow(flow, max_batch_size=size)
        runs.append(out.items)
    assert runs[0] == runs[1] == runs[2]
    assert any(n == 1 for (k, n) in runs[0][10:])  # some state did expire


def test_map_state_entries_expire_on_their_own() -> None:
    class Recent:
        def process(self, ctx: ProcessContext[Any], r: tuple[str, str, float]) -> None:
            m = ctx.map("seen", ttl=TTL(10, time="event"))
            m.put(r[1], ctx.timestamp)
            ctx.emit(sorted(m.keys()))

    flow, out = keyed_flow(
        [("k", "x", 0.0), ("k", "y", 8.0), ("k", "z", 12.0), ("k", "w", 19.0)],
        lambda k: k.process(Recent()),
        ts=lambda r: r[2],
    )
    sw.testing.run_flow(flow)
    assert out.items == [["x"], ["x", "y"], ["x", "y", "z"], ["w", "y", "z"]]


# -- process: state and context ------------------------------------------------------------


def test_process_context_and_map_state_operations() -> None:
    seen: list[Any] = []

    class Probe:
        def process(self, ctx: ProcessContext[Any], r: tuple[str, float]) -> None:
            m = ctx.map("m")
            m.put(r[1], True)
            seen.append((ctx.key, ctx.timestamp, ctx.watermark, ctx.time_domain))
            ctx.emit((len(m), m.contains(r[1]), r[1] in m, m.get(-1, "none"), sorted(m.values())))
            if len(m) == 2:
                m.remove(r[1])
                m.remove("absent")
            if len(m) > 2:
                m.clear()
                ctx.emit(("cleared", len(m), m.items()))

    flow, out = keyed_flow(
        [("a", 1.0), ("a", 2.0), ("b", 3.0), ("a", 4.0), ("a", 5.0), ("a", 6.0)],
        lambda k: k.process(Probe),
        ts=lambda r: r[1],
    )
    sw.testing.run_flow(flow)
    assert seen[:3] == [("a", 1.0, -math.inf, None), ("a", 2.0, 1.0, None), ("b", 3.0, 2.0, None)]
    assert out.items == [
        (1, True, True, "none", [True]),
        (2, True, True, "none", [True, True]),
        (1, True, True, "none", [True]),
        (2, True, True, "none", [True, True]),
        (2, True, True, "none", [True, True]),
        (2, True, True, "none", [True, True]),
    ]


def test_value_state_get_set_clear_and_plain_function() -> None:
    def fn(ctx: ProcessContext[Any], x: int) -> None:
        s = ctx.value("last")
        ctx.emit((s.exists, s.get("-")))
        if x < 0:
            s.clear()
        else:
            s.set(x)

    out = sw.testing.run_collect(lambda s: s.key_by(lambda x: 0).process(fn), [1, 2, -1, 3])
    assert out == [(False, "-"), (True, 1), (True, 2), (False, "-")]
    assert out[0][0] is False


def test_process_checks_its_arguments_and_declarations() -> None:
    keyed = sw.Flow("f").source(sw.sources.Iterable([1])).key_by(lambda x: x)
    with pytest.raises(TypeError, match="process\\(ctx, value\\)"):
        keyed.process(5)  # type: ignore[arg-type]

    class NoProcess:
        pass

    with pytest.raises(TypeError, match="without one"):
        keyed.process(NoProcess)

    def twice(ctx: ProcessContext[Any], x: int) -> None:
        ctx.value("s")
        ctx.map("s")

    with pytest.raises(sw.OperatorError, match="already declared as value state"):
        sw.testing.run_collect(lambda s: s.key_by(lambda x: x).process(twice), [1])

    def timer_without_on_timer(ctx: ProcessContext[Any], x: int) -> None:
        ctx.timers.at_processing_time(ctx.processing_time + 1)

    with pytest.raises(sw.OperatorError, match="needs an on_timer"):
        sw.testing.run_collect(lambda s: s.key_by(lambda x: x).process(timer_without_on_timer), [1])

    class EventTimer:
        def process(self, ctx: ProcessContext[Any], x: int) -> None:
            ctx.timers.at_event_time(10.0)

        def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
            pass

    with pytest.raises(sw.OperatorError, match="needs event time"):
        sw.testing.run_collect(lambda s: s.key_by(lambda x: x).process(EventTimer), [1])


# -- per-record errors -----------------------------------------------------------------------


class Careless:
    """Writes state, a map entry, a timer and an output, then fails on negative values."""

    def __init__(self) -> None:
        self.calls = 0

    def process(self, ctx: ProcessContext[Any], x: int) -> None:
        self.calls += 1
        total = ctx.value("total")
        seen = ctx.map("seen")
        total.set((total.get() or 0) + x)
        seen.put(x, True)
        ctx.timers.at_event_time(100.0 + x)
        ctx.emit(("partial", x))
        if x < 0 and self.calls % 2 == 1:
            raise ValueError(f"bad {x}")
        ctx.emit((ctx.key, total.get(), sorted(seen.keys())))

    def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
        ctx.emit(("timer", ctx.key, t))


def test_a_dead_lettered_record_leaves_state_timers_and_output_untouched() -> None:
    dlq: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow, out = keyed_flow(
        [1, 2, -5, 3],
        lambda k: k.process(Careless(), name="careless", on_error=sw.DeadLetter(dlq)),
        key=lambda x: "k",
        ts=lambda x: float(abs(x)),
    )
    result = sw.testing.run_flow(flow)
    assert out.items == [
        ("partial", 1),
        ("k", 1, [1]),
        ("partial", 2),
        ("k", 3, [1, 2]),
        ("partial", 3),
        ("k", 6, [1, 2, 3]),  # -5 left no trace: not in the total, not in the map
        ("timer", "k", 101.0),
        ("timer", "k", 102.0),
        ("timer", "k", 103.0),  # and no timer at 95
    ]
    assert [d.record for d in dlq.items] == [-5]
    assert result.metrics.operator("careless").dead_letters == 1


def test_a_retried_record_is_applied_exactly_once() -> None:
    flow, out = keyed_flow(
        [1, -5, 3],
        lambda k: k.process(Careless(), on_error=sw.Retry(3, sw.Backoff(initial=0.1))),
        key=lambda x: "k",
        ts=lambda x: float(abs(x)),
    )
    sw.testing.run_flow(flow)
    assert out.items == [
        ("partial", 1),
        ("k", 1, [1]),
        ("partial", -5),
        ("k", -4, [-5, 1]),  # the second attempt, on the state before the first
        ("partial", 3),
        ("k", -1, [-5, 1, 3]),
        ("timer", "k", 95.0),
        ("timer", "k", 101.0),
        ("timer", "k", 103.0),
    ]


class Scripted:
    """Per record ``(key, ops, fail)``: the value/map operations ``ops``, then a failure
    (``fail``: always; ``"once"``: on the first attempt), else the key's whole state out."""

    maps = True  # (False: no map state, so a snapshot holds each key's dict as it is)

    def __init__(self) -> None:
        self.attempts: dict[int, int] = {}

    def process(self, ctx: ProcessContext[Any], r: tuple[str, tuple[Any, ...], Any]) -> None:
        _, ops, fail = r
        for op in ops:
            if op[0] == "set":
                ctx.value(op[1]).set(op[2])
            elif op[0] == "clear":
                ctx.value(op[1]).clear()
            elif op[0] == "put":
                ctx.map("m").put(op[1], op[2])
            elif op[0] == "remove":
                ctx.map("m").remove(op[1])
            else:
                ctx.map("m").clear()
        seen = self.attempts[id(r)] = self.attempts.get(id(r), 0) + 1
        if fail is True or (fail == "once" and seen == 1):
            raise RuntimeError("fails after writing")
        ctx.emit((ctx.key, scripted_view(ctx, self.maps)))


class ScriptedValues(Scripted):
    maps = False


def scripted_view(ctx: ProcessContext[Any], maps: bool = True) -> dict[str, Any]:
    view: dict[str, Any] = {n: ctx.value(n).get() for n in ("a", "b") if ctx.value(n).exists}
    if maps and len(ctx.map("m")):
        view["m"] = dict(ctx.map("m").items())
    return view


def scripted_model(
    rows: list[tuple[str, tuple[Any, ...], Any]],
) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """What Scripted must give: the outputs, and the state of every key at the end (a
    record that fails for good changes nothing)."""
    state: dict[str, dict[str, Any]] = {}
    out = []
    for key, ops, fail in rows:
        if fail is True:
            continue
        st_ = state.setdefault(key, {})
        for op in ops:
            if op[0] == "set":
                st_[op[1]] = op[2]
            elif op[0] == "clear":
                st_.pop(op[1], None)
            elif op[0] == "put":
                st_.setdefault("m", {})[op[1]] = op[2]
            elif op[0] == "remove":
                st_.get("m", {}).pop(op[1], None)
                if not st_.get("m", True):
                    del st_["m"]
            else:
                st_.pop("m", None)
        out.append((key, {k: dict(v) if k == "m" else v for k, v in st_.items()}))
    return out, {k: v for k, v in state.items() if v}


def keyed_process(fn: Any, policy: sw.ErrorPolicy, keyed: Any) -> Any:
    return keyed.process(fn, on_error=policy)


def test_a_failed_record_that_wrote_a_cell_twice_or_deleted_leaves_no_trace() -> None:
    """The rollback paths of copy on write: a cell written twice, a value deleted, the
    key's last value deleted (its states dict goes), deleted and written again, a new key,
    map entries -- each followed by a failure -- leave the state as it was."""
    rows: list[tuple[str, tuple[Any, ...], Any]] = [
        ("k", (("set", "a", 1), ("set", "b", 10), ("put", 0, "x")), False),
        ("k", (("set", "a", 2), ("set", "a", 3)), True),  # a cell written twice
        ("k", (("clear", "a"),), True),  # a deletion
        ("k", (("clear", "a"), ("set", "a", 4)), True),  # deleted, written again
        ("k", (("clear", "a"), ("clear", "b"), ("map_clear",)), True),  # everything goes
        ("k", (("clear", "a"), ("clear", "b"), ("map_clear",), ("set", "b", 5)), True),
        ("k", (("put", 0, "y"), ("put", 1, "z"), ("remove", 0)), True),  # map entries
        ("new", (("set", "a", 7), ("put", 1, "w")), True),  # a new key
        ("k", (), False),
        ("new", (), False),
        ("k", (("set", "a", 8), ("set", "a", 9)), "once"),  # retried: applied once
    ]
    expected = [
        ("k", {"a": 1, "b": 10, "m": {0: "x"}}),
        ("k", {"a": 1, "b": 10, "m": {0: "x"}}),
        ("new", {}),
        ("k", {"a": 9, "b": 10, "m": {0: "x"}}),
    ]
    assert scripted_model(rows)[0] == expected
    for ts in (None, lambda r: 1.0):  # the loops of streams without and with event time
        dlq: sw.sinks.Collect[Any] = sw.sinks.Collect()
        policy = sw.Retry(2, sw.Backoff(initial=0.1), then=sw.DeadLetter(dlq))
        flow, out = keyed_flow(rows, partial(keyed_process, Scripted(), policy), ts=ts)
        sw.testing.run_flow(flow)
        assert out.items == expected
        assert [d.record for d in dlq.items] == [r for r in rows if r[2] is True]


@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from(["k1", "k2", "k3", "k4", "k5", "k6"]),  # (OnDisk caches 3)
            st.lists(
                st.one_of(
                    st.tuples(st.just("set"), st.sampled_from(["a", "b"]), st.integers(0, 9)),
                    st.tuples(st.just("clear"), st.sampled_from(["a", "b"])),
                    st.tuples(st.just("put"), st.integers(0, 2), st.integers(0, 9)),
                    st.tuples(st.just("remove"), st.integers(0, 2)),
                    st.tuples(st.just("map_clear")),
                ),
                max_size=5,
            ).map(tuple),
            st.booleans(),
        ),
        max_size=30,
    ),
    timed=st.booleans(),
    size=st.integers(1, 8),
    snap_every=st.integers(1, 4),
    fail=st.booleans(),
    track=st.booleans(),
    maps=st.booleans(),
)
def test_failed_records_leave_no_trace_in_state_or_snapshots(
    rows: list[tuple[str, tuple[Any, ...], bool]],
    timed: bool,
    size: int,
    snap_every: int,
    fail: bool,
    track: bool,
    maps: bool,
) -> None:
    """Against a model that skips the failing records: the outputs, every key's state in
    the final snapshot (or the change sets folded), and the snapshots taken on the way
    (they must not change after).  With ``fail``, the policy is ``Fail`` and no record
    fails: the store then changes a key's states dict in place once it made it, and
    must still never change one a snapshot holds (or, on disk, one written back).
    Without ``maps`` (map state), snapshots hold each key's states dict itself."""
    if fail:
        rows = [r for r in rows if not r[2]]
    if not maps:
        rows = [(k, tuple(op for op in ops if op[0] in ("set", "clear")), f) for k, ops, f in rows]
    clock = sw.VirtualClock()
    dlq: sw.sinks.Collect[Any] = sw.sinks.Collect()
    m = OperatorMetrics("op", "process", 0)
    errors = ErrorHandler(
        sw.Fail() if fail else sw.DeadLetter(dlq),
        flow="t",
        operator="op",
        clock=clock,
        metrics=m,
        dead_letters={id(dlq): DeadLetterWriter(dlq, "t")},
        rng=random.Random(0),
    )
    step = process_spec(Scripted if maps else ScriptedValues, timestamped=timed).build(
        BuildContext("t", "op", clock, m, errors, 1024)
    )
    cap = Capture()
    step.children.append(cap)
    step.accept_changes(track)
    kept: list[tuple[Any, bytes]] = []
    hi = -math.inf
    for i in range(0, len(rows), size):
        part = rows[i : i + size]
        if timed:
            batch, hi = event_batch([(r, r[0], i * S) for r in part], hi)
        else:
            batch = Batch(list(part), keys=[r[0] for r in part])
        asyncio.run(step.push(batch))
        if (i // size) % snap_every == 0:
            snap = step.snapshot()
            kept.append((snap, pickle.dumps(snap)))
    expected, state = scripted_model(rows)
    assert [row[0] for row in cap.rows] == expected
    snaps = [snap for snap, _ in kept] + [step.snapshot()]
    (changes,) = fold_incremental(snaps[0], *snaps[1:]).partitions.values()
    assert {
        k: {n: dict(v) if n == "m" else v for n, v in st_.items()}
        for k, st_ in changes.upserts.items()
    } == state
    for snap, blob in kept:  # later records changed nothing a snapshot holds
        assert pickle.dumps(snap) == blob


def test_with_fail_a_dict_changed_in_place_is_never_one_a_snapshot_or_file_holds(
    keyed_backend: str,
) -> None:
    """``Fail``: nothing is rolled back, so the store changes a key's states dict in place
    once it made it -- but never one a snapshot holds (a later record copies it again),
    and, on disk, never one written back to the file (the change would be lost when the
    cache drops it: it caches 3 keys here)."""
    clock = sw.VirtualClock()
    step, cap, _ = make_step(process_spec(ScriptedValues, timestamped=False), clock)
    step.accept_changes(True)
    keys = [f"k{i}" for i in range(6)]
    model: dict[str, dict[str, Any]] = {}
    kept: list[tuple[Any, bytes]] = []
    for n in range(1, 5):
        for i, batch_keys in enumerate([keys, keys[-1:], keys[:-1], keys[::-1]]):
            rows = [(k, (("set", "a", n * 10 + i), ("set", "b", n)), False) for k in batch_keys]
            asyncio.run(step.push(Batch(rows, keys=batch_keys)))
            for k in batch_keys:
                model[k] = {"a": n * 10 + i, "b": n}
        if n % 2:
            snap = step.snapshot()
            kept.append((snap, pickle.dumps(snap)))
    assert cap.rows[-1][0] == ("k0", model["k0"])
    snaps = [snap for snap, _ in kept] + [step.snapshot()]
    (changes,) = fold_incremental(snaps[0], *snaps[1:]).partitions.values()
    assert dict(changes.upserts) == model
    for snap, blob in kept:
        assert pickle.dumps(snap) == blob


@pytest.mark.parametrize("fail", [True, False])
def test_map_entries_changed_after_a_write_back_reach_the_disk_file(fail: bool) -> None:
    """A map entry put or removed changes the key's state even when the key's states dict
    stays the same: on disk (3 keys cached here) the key must be written back again, or
    the change is lost when the cache drops the key (and at a crash)."""
    clock = sw.VirtualClock()
    spec = process_spec(Scripted, timestamped=False)
    m = OperatorMetrics("op", spec.kind, 0)
    dlq: sw.sinks.Collect[Any] = sw.sinks.Collect()
    errors = ErrorHandler(
        sw.Fail() if fail else sw.DeadLetter(dlq),
        flow="t",
        operator="op",
        clock=clock,
        metrics=m,
        dead_letters={id(dlq): DeadLetterWriter(dlq, "t")},
        rng=random.Random(0),
    )
    step = spec.build(BuildContext("t", "op", clock, m, errors, 1024))
    cap = Capture()
    step.children.append(cap)
    keys = [f"k{i}" for i in range(6)]
    rows: list[tuple[str, tuple[Any, ...], Any]] = []
    for n in range(4):
        part = [(k, (("put", n % 2, n), ("remove", (n + 1) % 2)), False) for k in keys]
        part += [(k, (("put", 5, n),), False) for k in keys[:2]]  # a map that exists
        rows += part
        asyncio.run(step.push(Batch(part, keys=[r[0] for r in part])))
    expected, state = scripted_model(rows)
    assert [r[0] for r in cap.rows] == expected
    (changes,) = step.snapshot().partitions.values()
    assert {k: {"m": dict(v["m"])} for k, v in changes.upserts.items()} == state


def test_stateful_map_dead_letter_keeps_the_previous_state() -> None:
    def strict_sum(total: int | None, x: tuple[str, int]) -> tuple[int, int]:
        if x[1] < 0:
            raise ValueError("negative")
        total = (total or 0) + x[1]
        return total, total

    dlq: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow, out = keyed_flow(
        [("a", 1), ("a", -1), ("a", 2)],
        lambda k: k.stateful_map(strict_sum, on_error=sw.DeadLetter(dlq)),
    )
    sw.testing.run_flow(flow)
    assert out.items == [1, 3]
    assert [d.record for d in dlq.items] == [("a", -1)]


def test_stateful_map_retries_with_the_state_before_the_failure() -> None:
    calls: list[tuple[Any, int]] = []

    def flaky_sum(total: int | None, x: tuple[str, int]) -> tuple[int, int]:
        calls.append((total, x[1]))
        if x[1] == 2 and calls.count((total, 2)) == 1:
            raise ConnectionError("flaky")
        total = (total or 0) + x[1]
        return total, total

    for ttl in (None, 60.0):  # the plain loop and the one with TTL bookkeeping
        calls.clear()
        flow, out = keyed_flow(
            [("a", 1), ("a", 2), ("a", 3)],
            lambda k, ttl=ttl: k.stateful_map(
                flaky_sum, ttl=ttl, on_error=sw.Retry(2, sw.Backoff(initial=0.5))
            ),
        )
        sw.testing.run_flow(flow)
        assert out.items == [1, 3, 6]
        assert calls == [(None, 1), (1, 2), (1, 2), (3, 3)]


def test_stateful_map_state_survives_snapshot_and_restore() -> None:
    for ttl in (None, TTL(100)):
        clock = sw.VirtualClock(autojump=False)
        step, _, _ = make_step(StatefulMapSpec(count, ttl=ttl, timestamped=False), clock)
        asyncio.run(step.push(Batch(["a", "b", "a"], keys=["a", "b", "a"])))
        snap = pickle.loads(pickle.dumps(step.snapshot()))
        step2, cap2, m2 = make_step(StatefulMapSpec(count, ttl=ttl, timestamped=False), clock)
        step2.restore(snap)
        assert m2.state == 2
        asyncio.run(step2.push(Batch(["a", "c"], keys=["a", "c"])))
        assert [r[0] for r in cap2.rows] == [("a", 3), ("c", 1)]


def test_a_failing_timer_is_dead_lettered_as_a_timer_event() -> None:
    class BadTimer:
        def process(self, ctx: ProcessContext[Any], x: int) -> None:
            ctx.value("v").set(x)
            ctx.timers.at_event_time(float(x) + 1)

        def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
            ctx.value("v").clear()
            ctx.emit(("fired", t))
            if t == 2.0:
                raise RuntimeError("timer broke")

    dlq: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow, out = keyed_flow(
        [1, 5],
        lambda k: k.process(BadTimer, name="bt", on_error=sw.DeadLetter(dlq)),
        key=lambda x: x,
        ts=float,
    )
    result = sw.testing.run_flow(flow)
    assert out.items == [("fired", 6.0)]
    assert [d.record for d in dlq.items] == [TimerEvent(1, 2.0, "event")]
    assert result.metrics.operator("bt").state == 1  # the failed timer's clear() was undone


# -- timers ----------------------------------------------------------------------------------


class Reminder:
    """For every record, an event-time timer ``delay`` seconds after it."""

    def __init__(self, delay: float = 5.0) -> None:
        self.delay = delay

    def process(self, ctx: ProcessContext[Any], r: tuple[str, float]) -> None:
        assert ctx.timestamp is not None
        ctx.timers.at_event_time(ctx.timestamp + self.delay)
        ctx.timers.at_event_time(ctx.timestamp + self.delay)  # twice: fires once
        ctx.emit(("rec", ctx.key, ctx.timestamp))

    def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
        ctx.emit(("timer", ctx.key, t, ctx.timestamp, ctx.watermark, ctx.time_domain))


def test_event_time_timers_fire_in_time_order_as_the_watermark_passes() -> None:
    records = [("a", 0.0), ("b", 3.0), ("c", 1.0), ("d", 10.0), ("e", 11.0)]
    runs = []
    for size in (1, 2, 1024):
        flow, out = keyed_flow(records, lambda k: k.process(Reminder), ts=lambda r: r[1], bound=2)
        sw.testing.run_flow(flow, max_batch_size=size)
        runs.append(out.items)
    assert runs[0] == runs[1] == runs[2]
    assert runs[0] == [
        ("rec", "a", 0.0),
        ("rec", "b", 3.0),
        ("rec", "c", 1.0),
        ("rec", "d", 10.0),
        # the watermark before "e" is 10 - 2 = 8: it has passed the timers at 5 (a) and
        # 6 (c), which fire in time order; b's at 8 waits for the records at 8
        ("timer", "a", 5.0, 5.0, 8.0, "event"),
        ("timer", "c", 6.0, 6.0, 8.0, "event"),
        ("rec", "e", 11.0),
        # the watermark after "e" is 9: past 8
        ("timer", "b", 8.0, 8.0, 9.0, "event"),
        # end of input: the watermark is +inf; the rest fire in time order
        ("timer", "d", 15.0, 15.0, math.inf, "event"),
        ("timer", "e", 16.0, 16.0, math.inf, "event"),
    ]


def test_event_timers_fire_on_watermark_controls_and_can_be_deleted() -> None:
    class Cancel:
        def process(self, ctx: ProcessContext[Any], x: str) -> None:
            if x.startswith("-"):
                ctx.timers.delete_event_time(20.0)
            else:
                ctx.timers.at_event_time(20.0)
                ctx.timers.at_event_time(10.0)

        def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
            ctx.emit((ctx.key, t))

    clock = sw.VirtualClock()
    step, cap, _ = make_step(process_spec(Cancel), clock)

    async def go() -> None:
        b, _ = event_batch([("x", "k1", 1 * S), ("y", "k2", 2 * S), ("-y", "k2", 3 * S)], 0)
        await step.push(b)
        await step.control(Watermark(15 * S))
        await step.control(Watermark(12 * S))  # going back: nothing
        await step.finish()

    asyncio.run(go())
    assert cap.rows == [
        (("k1", 10.0), "k1", 10 * S, 2 * S),
        (("k2", 10.0), "k2", 10 * S, 2 * S),
        ("control", Watermark(15 * S)),
        ("control", Watermark(12 * S)),
        (("k1", 20.0), "k1", 20 * S, 2 * S),  # k2's timer at 20 was deleted
        "end",
    ]


class EveryMinute:
    """A Flink-style timer that re-arms itself: one a minute, for ever."""

    def __init__(self, step: float = 60.0) -> None:
        self.step = step

    def process(self, ctx: ProcessContext[Any], r: tuple[str, float]) -> None:
        assert ctx.timestamp is not None
        ctx.timers.at_event_time(ctx.timestamp + self.step)

    def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
        ctx.emit((ctx.key, t, ctx.watermark))
        ctx.timers.at_event_time(t + self.step)


def test_a_self_rearming_timer_fires_once_at_end_of_input() -> None:
    # At end of input the watermark is +inf: the timers pending then fire once, in time
    # order; the ones they set do not (there is no later watermark), as in Flink.
    flow, out = keyed_flow([("k", 0.0), ("k", 30.0)], lambda k: k.process(EveryMinute), ts=ts1)
    sw.testing.run_flow(flow)
    assert out.items == [("k", 60.0, math.inf), ("k", 90.0, math.inf)]


def test_a_rearming_timer_chain_follows_the_watermark_for_any_batch_cuts() -> None:
    # Mid-stream, a timer set by a timer fires in the same advance when it is later than
    # its setter and not past the watermark: as if the watermark had moved in two steps.
    records = [("k", 0.0), ("k", 200.0), ("j", 210.0)]
    runs = []
    for size in (1, 2, 1024):
        flow, out = keyed_flow(records, lambda k: k.process(EveryMinute), ts=ts1)
        sw.testing.run_flow(flow, max_batch_size=size)
        runs.append(out.items)
    assert runs[0] == runs[1] == runs[2]
    assert runs[0] == [
        ("k", 60.0, 200.0),  # the watermark before ("j", 210) is 200
        ("k", 120.0, 200.0),
        ("k", 180.0, 200.0),
        # end of input: what was pending fires once
        ("k", 240.0, math.inf),
        ("k", 260.0, math.inf),
        ("j", 270.0, math.inf),
    ]


def test_a_timer_set_at_its_own_instant_fires_at_the_next_advance_not_again_at_once() -> None:
    class Again:
        def process(self, ctx: ProcessContext[Any], r: tuple[str, float]) -> None:
            if r[1] == 0.0:
                ctx.timers.at_event_time(10.0)

        def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
            ctx.emit((t, ctx.watermark))
            ctx.timers.at_event_time(t)  # behind the watermark now

    records = [("k", 0.0), ("k", 20.0), ("k", 30.0), ("k", 40.0)]
    flow, out = keyed_flow(records, lambda k: k.process(Again), ts=ts1)
    sw.testing.run_flow(flow)
    # once per advance of the watermark (20, 30, 40), and once at the end
    assert out.items == [(10.0, 20.0), (10.0, 30.0), (10.0, 40.0), (10.0, math.inf)]


def test_a_processing_timer_set_behind_the_one_firing_waits_for_the_next_round() -> None:
    fired: list[tuple[str, float]] = []
    epoch = 1_700_000_000.0

    class Back:
        def process(self, ctx: ProcessContext[Any], x: str) -> None:
            ctx.timers.at_processing_time(ctx.processing_time + 2)

        def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
            fired.append((ctx.key, t - epoch))
            if ctx.key == "a" and t == epoch + 2:
                ctx.timers.at_processing_time(t - 1)  # behind the timer firing

    script = sw.testing.ScriptedSource([(0.0, ["a", "b"]), (5.0, ["c"])])
    flow = sw.Flow("pt")
    flow.source(script).key_by(lambda x: x).process(Back).sink(sw.sinks.Collect())
    sw.testing.run_flow(flow)
    # the round at 2 fires a and b; a's timer at 1 comes in the next round, not between
    assert fired == [("a", 2.0), ("b", 2.0), ("a", 1.0)]


def test_processing_time_timers_fire_on_the_flow_clock_in_time_order() -> None:
    class Later:
        def process(self, ctx: ProcessContext[Any], r: tuple[str, float]) -> None:
            ctx.timers.at_processing_time(ctx.processing_time + r[1])
            ctx.value("n").set(r[1])

        def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
            ctx.emit((ctx.key, ctx.value("n").get(), ctx.time_domain, ctx.timestamp))

    script = sw.testing.ScriptedSource([(0.0, [("a", 5.0), ("b", 2.0)]), (30.0, [("c", 99.0)])])
    flow = sw.Flow("pt")
    out = sw.testing.TimedCollect()
    flow.source(script).key_by(lambda r: r[0]).process(Later).sink(out)
    sw.testing.run_flow(flow)
    # c's timer (t=129) is still pending at end of input: dropped, not fired
    assert out.items == [
        (2.0, ("b", 2.0, "processing", None)),
        (5.0, ("a", 5.0, "processing", None)),
    ]


def test_processing_timer_deletion_and_time_argument() -> None:
    fired: list[float] = []

    class Snooze:
        def process(self, ctx: ProcessContext[Any], x: int) -> None:
            now = ctx.timers.processing_time
            if x == 0:
                ctx.timers.at_processing_time(now + 1)
                ctx.timers.at_processing_time(now + 2)
            else:
                ctx.timers.delete_processing_time(now - 0.5 + 1)

        def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
            fired.append(t - 1_700_000_000.0)

    script = sw.testing.ScriptedSource([(0.0, [0]), (0.5, [1]), (5.0, [2])])
    flow = sw.Flow("pt")
    flow.source(script).key_by(lambda x: "k").process(Snooze).sink(sw.sinks.Collect())
    sw.testing.run_flow(flow)
    assert fired == [2.0]


def test_timers_of_a_stream_without_event_time_end_with_the_input() -> None:
    class Never:
        def process(self, ctx: ProcessContext[Any], x: int) -> None:
            assert ctx.watermark is None
            assert ctx.timestamp is None
            ctx.timers.at_processing_time(ctx.processing_time + 3600)
            ctx.emit(x)

        def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
            ctx.emit("fired")

    clock = sw.VirtualClock()
    out = sw.testing.run_collect(lambda s: s.key_by(str).process(Never), [1, 2], clock=clock)
    assert out == [1, 2]
    assert clock.monotonic() < 1  # the flow did not wait for the timers


# -- metrics ---------------------------------------------------------------------------------


def test_metrics_state_counts_keys_held() -> None:
    flow, _ = keyed_flow(
        [("a", 1), ("b", 1), ("c", 1), ("b", 0)],
        lambda k: k.stateful_map(lambda s, r: (r[1] or None, r), name="held"),
    )
    result = sw.testing.run_flow(flow)
    assert result.metrics.operator("held").state == 2


# -- checkpoints -----------------------------------------------------------------------------


class Everything:
    """Value + map state with TTLs in both domains, timers in both domains, deletions."""

    def process(self, ctx: ProcessContext[Any], v: int) -> None:
        assert ctx.timestamp is not None
        c = ctx.value("count", ttl=TTL(7, time="event"))
        n = (c.get() or 0) + 1
        c.set(n)
        m = ctx.map("seen", ttl=3.0)
        m.put(v % 3, ctx.timestamp)
        ctx.emit(("rec", ctx.key, v, n, sorted(m.items())))
        ctx.timers.at_event_time(ctx.timestamp + 2)
        if v % 4 == 0:
            ctx.timers.at_processing_time(ctx.processing_time + 1.5)
        if v % 5 == 0:
            ctx.timers.delete_event_time(ctx.timestamp + 2)

    def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
        c = ctx.value("count", ttl=TTL(7, time="event"))
        ctx.emit(("timer", ctx.time_domain, ctx.key, t, c.get(), len(ctx.map("seen", ttl=3.0))))
        if ctx.time_domain == "event" and (c.get() or 0) % 2 == 0:
            c.clear()


Rows = list[tuple[int, int, int, float]]  # (value, key, ticks, clock advance)


async def drive(
    step: Step, clock: sw.VirtualClock, rows: Rows, cuts: list[int], wm: float
) -> float:
    """Feed ``rows`` as batches cut at ``cuts``, advancing the clock and firing
    processing-time timers between batches, a watermark control after each."""
    bounds = [0, *cuts, len(rows)]
    for a, b in itertools.pairwise(bounds):
        if a == b:
            continue
        clock.advance(rows[a][3])
        while (d := step.next_deadline()) is not None and d <= clock.monotonic():
            await step.on_timer(clock.monotonic())
        batch, wm = event_batch([(v, k, t) for v, k, t, _ in rows[a:b]], wm)
        await step.push(batch)
        await step.control(Watermark(wm))
    return wm


def run_whole(rows: Rows, cuts: list[int]) -> list[Any]:
    clock = sw.VirtualClock(autojump=False)
    step, cap, _ = make_step(process_spec(Everything), clock)

    async def go() -> None:
        await drive(step, clock, rows, cuts, -math.inf)
        await step.finish()

    asyncio.run(go())
    return cap.rows


def run_interrupted(rows: Rows, cuts: list[int], at: int, later: float = 0.0) -> list[Any]:
    clock = sw.VirtualClock(autojump=False)
    step, cap, _ = make_step(process_spec(Everything), clock)
    first = [c for c in cuts if c < at]
    rest = [c - at for c in cuts if c > at]
    wm = asyncio.run(drive(step, clock, rows[:at], first, -math.inf))
    blob = pickle.dumps(step.snapshot())
    del step
    clock2 = sw.VirtualClock(
        start=clock.monotonic() + later, epoch=clock.time() + later, autojump=False
    )
    step2, cap2, _ = make_step(process_spec(Everything), clock2)
    step2.restore(pickle.loads(blob))

    async def go() -> None:
        await drive(step2, clock2, rows[at:], rest, wm)
        await step2.finish()

    asyncio.run(go())
    return cap.rows + cap2.rows


def random_rows(rng: random.Random, n: int) -> Rows:
    t = 0
    rows: Rows = []
    for i in range(n):
        t += rng.randint(-2 * S, 3 * S)
        rows.append((i, rng.randint(0, 3), max(0, t), rng.choice([0.0, 0.25, 1.0, 2.5])))
    return rows


def test_snapshot_restore_gives_the_same_output_as_one_run() -> None:
    rng = random.Random(5)
    rows = random_rows(rng, 60)
    cuts = sorted(rng.sample(range(1, 60), 12))
    whole = run_whole(rows, cuts)
    assert any(r[0][0] == "timer" and r[0][1] == "processing" for r in whole if r != "end")
    assert any(r[0][0] == "timer" and r[0][1] == "event" for r in whole if r != "end")
    for at in (cuts[3], cuts[7]):
        assert run_interrupted(rows, cuts, at) == whole


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 40),
    cut_frac=st.floats(0, 1),
    batches=st.integers(1, 10),
)
def test_snapshot_restore_property(seed: int, n: int, cut_frac: float, batches: int) -> None:
    rng = random.Random(seed)
    rows = random_rows(rng, n)
    cuts = sorted(rng.sample(range(1, n), min(batches, n - 1))) if n > 1 else []
    at = round(cut_frac * n)
    cuts = sorted({*cuts, at} - {0, n})
    assert run_interrupted(rows, cuts, at) == run_whole(rows, cuts)


class EventOnly:
    """Event-time state, TTL and timers only: the output must not depend on batching."""

    def process(self, ctx: ProcessContext[Any], v: int) -> None:
        assert ctx.timestamp is not None
        c = ctx.value("count", ttl=TTL(4, time="event"))
        c.set((c.get() or 0) + 1)
        ctx.emit(("rec", ctx.key, v, c.get(), ctx.watermark))
        ctx.timers.at_event_time(ctx.timestamp + v % 3)
        if v % 4 == 0:
            ctx.timers.delete_event_time(ctx.timestamp + 1)

    def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
        c = ctx.value("count", ttl=TTL(4, time="event"))
        ctx.emit(("timer", ctx.key, t, c.get(), ctx.watermark))
        if (c.get() or 0) > 2:
            c.clear()


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000), n=st.integers(1, 40), a=st.integers(1, 10), b=st.integers(1, 10)
)
def test_event_time_output_does_not_depend_on_batch_cuts(seed: int, n: int, a: int, b: int) -> None:
    rng = random.Random(seed)
    rows = random_rows(rng, n)
    outs = []
    for k in (a, b):
        cuts = sorted(rng.sample(range(1, n), min(k, n - 1))) if n > 1 else []
        clock = sw.VirtualClock(autojump=False)
        step, cap, _ = make_step(process_spec(EventOnly), clock)

        async def go(
            step: Step = step, clock: sw.VirtualClock = clock, cuts: list[int] = cuts
        ) -> None:
            await drive(step, clock, rows, cuts, -math.inf)
            await step.finish()

        asyncio.run(go())
        outs.append([r for r in cap.rows if r == "end" or r[0] != "control"])
    assert outs[0] == outs[1]


def test_restore_counts_processing_time_from_the_restoring_clock() -> None:
    class Later:
        def process(self, ctx: ProcessContext[Any], x: int) -> None:
            ctx.timers.at_processing_time(ctx.processing_time + 10)
            ctx.value("v", ttl=4.0).set(x)

        def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
            ctx.emit(("fired", t))

    clock = sw.VirtualClock(autojump=False)
    step, _, _ = make_step(process_spec(Later, timestamped=False), clock)
    asyncio.run(step.push(Batch([1], keys=["k"])))
    clock.advance(3)
    state = pickle.loads(pickle.dumps(step.snapshot()))
    assert list(state.partitions[None].upserts) == ["k"]
    step.metrics.state = 0

    later = sw.VirtualClock(start=500.0, epoch=2_000_000_000.0, autojump=False)
    step2, cap2, m2 = make_step(process_spec(Later, timestamped=False), later)
    step2.restore(state)
    assert m2.state == 1
    # 7 s were left on the timer, 1 s on the TTL: from the restoring clock's now
    assert step2.next_deadline() == pytest.approx(501.0)
    later.advance(1)
    asyncio.run(step2.on_timer(later.monotonic()))
    assert m2.state == 0
    assert step2.next_deadline() == pytest.approx(507.0)
    later.advance(6)
    asyncio.run(step2.on_timer(later.monotonic()))
    assert cap2.rows == [(("fired", 2_000_000_007.0), "k", None, None)]


def test_snapshot_shares_nothing_with_the_live_step() -> None:
    class Append:
        def process(self, ctx: ProcessContext[Any], x: int) -> None:
            s = ctx.value("xs")
            s.set([*(s.get() or []), x])
            ctx.emit(s.get())

    clock = sw.VirtualClock()
    step, cap, _ = make_step(process_spec(Append, timestamped=False), clock)
    asyncio.run(step.push(Batch([1], keys=["k"])))
    snap = step.snapshot()
    asyncio.run(step.push(Batch([2], keys=["k"])))
    step2, cap2, _ = make_step(process_spec(Append, timestamped=False), clock)
    step2.restore(snap)
    asyncio.run(step2.push(Batch([3], keys=["k"])))
    assert cap.rows[-1][0] == [1, 2]
    assert cap2.rows == [([1, 3], "k", None, None)]


def test_unpicklable_state_is_reported_with_operator_and_key(keyed_backend: str) -> None:
    def keep_lock(state: Any, x: str) -> tuple[Any, str]:
        return threading.Lock(), x

    clock = sw.VirtualClock()
    spec = StatefulMapSpec(keep_lock, ttl=None, timestamped=False)
    step, _, _ = make_step(spec, clock, name="locker")
    if keyed_backend == "disk":  # the file pickles it, at the write-back after the batch
        with pytest.raises(
            sw.StateStorageError, match="operator 'locker': state 'state' of key 'key-a'"
        ):
            asyncio.run(step.push(Batch(["a", "b"], keys=["key-a", "key-b"])))
        return
    asyncio.run(step.push(Batch(["a", "b"], keys=["key-a", "key-b"])))
    snap = step.snapshot()  # the checkpoint pickles it (the error names the key and state)
    with pytest.raises(sw.CheckpointError, match="operator 'locker': state 'state' of key 'key-a'"):
        pickle.dumps(snap)


def test_restore_rejects_what_is_not_a_keyed_state_snapshot() -> None:
    step, _, _ = make_step(process_spec(Everything), sw.VirtualClock())
    with pytest.raises(ValueError, match="not a keyed-state snapshot"):
        step.restore({"panes": {}})


def test_stateful_map_and_process_specs_are_boundaries_only_with_processing_time() -> None:
    assert StatefulMapSpec(count, ttl=TTL(1), timestamped=False).boundary
    assert not StatefulMapSpec(count, ttl=TTL(1, time="event"), timestamped=True).boundary
    assert not StatefulMapSpec(count, ttl=None, timestamped=False).boundary
    assert process_spec(Everything).boundary
    assert not process_spec(lambda ctx, v: None).boundary


# -- public API and docs ----------------------------------------------------------------------


def test_public_names() -> None:
    assert "state" in sw.__all__
    for name in (
        "TTL",
        "ValueState",
        "MapState",
        "ProcessContext",
        "TimerService",
        "TimerEvent",
        "KeyedProcessFunction",
    ):
        assert name in sw.state.__all__
        assert hasattr(sw.state, name)
    assert isinstance(Reminder(), sw.state.KeyedProcessFunction)


DOC = Path(__file__).resolve().parent.parent / "docs" / "state.md"


def doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_every_example_in_docs_state_runs_and_prints_what_it_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    blocks = doc_blocks()
    assert len(blocks) >= 3
    for block in blocks:
        exec(block, {})
        printed = capsys.readouterr().out.strip().splitlines()
        expected = [
            line.removeprefix("# -> ").strip()
            for line in block.splitlines()
            if line.startswith("# -> ")
        ]
        assert printed == expected, block


# -- the traps of issue 16 ---------------------------------------------------------------------


def test_an_event_timer_at_t_fires_after_the_records_at_t() -> None:
    """Bound 0: the watermark before the second record at 2.0 is 2.0 -- that record is on
    time, and a timer at 2.0 must wait for it (it fired before it, at 'watermark >= t')."""

    class AtTwo:
        def process(self, ctx: ProcessContext[Any], r: tuple[str, float]) -> None:
            if ctx.timestamp == 1.0:
                ctx.timers.at_event_time(2.0)
            ctx.emit(("rec", ctx.timestamp, ctx.watermark))

        def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
            ctx.emit(("timer", t, ctx.watermark))

    records = [("k", 1.0), ("k", 2.0), ("k", 2.0), ("k", 3.0), ("k", 4.0)]
    runs = []
    for size in (1, 2, 1024):
        flow, out = keyed_flow(records, lambda k: k.process(AtTwo), ts=ts1)
        sw.testing.run_flow(flow, max_batch_size=size)
        runs.append(out.items)
    assert runs[0] == runs[1] == runs[2]
    assert runs[0] == [
        ("rec", 1.0, -math.inf),
        ("rec", 2.0, 1.0),
        ("rec", 2.0, 2.0),  # watermark 2.0: on time, before the timer at 2.0
        ("rec", 3.0, 2.0),
        ("timer", 2.0, 3.0),  # the watermark after the record at 3.0 has passed 2.0
        ("rec", 4.0, 3.0),
    ]


def test_on_timer_gets_the_time_exactly_as_registered() -> None:
    """0.1 + 0.2 is 0.30000000000000004; the engine orders timers in whole microseconds
    (300000), and handed back 0.3.  A datetime comes back as the datetime."""
    when = datetime(2026, 12, 6, 10, 0, 0, 123456, tzinfo=UTC)

    class Exact:
        def process(self, ctx: ProcessContext[Any], r: tuple[str, float]) -> None:
            ctx.timers.at_event_time(0.1 + 0.2)
            ctx.timers.at_event_time(when)

        def on_timer(self, ctx: ProcessContext[Any], t: Any) -> None:
            ctx.emit((t, ctx.timestamp))

    flow, out = keyed_flow([("k", 0.0)], lambda k: k.process(Exact), ts=ts1)
    sw.testing.run_flow(flow)
    assert out.items == [(0.1 + 0.2, 0.1 + 0.2), (when, when.timestamp())]
    assert out.items[0][0] != 0.3


def test_on_timer_gets_the_exact_time_after_a_restore() -> None:
    class Exact:
        def process(self, ctx: ProcessContext[Any], x: Any) -> None:
            ctx.timers.at_event_time(0.1 + 0.2)

        def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
            ctx.emit(t)

    clock = sw.VirtualClock()
    step, _, _ = make_step(process_spec(Exact), clock)
    batch, _ = event_batch([("x", "k", 0)], -math.inf)
    asyncio.run(step.push(batch))
    step2, cap2, _ = make_step(process_spec(Exact), clock)
    step2.restore(pickle.loads(pickle.dumps(step.snapshot())))
    asyncio.run(step2.finish())
    assert cap2.rows[0][0] == 0.1 + 0.2


def test_ttl_is_documented_as_since_last_write_where_users_look() -> None:
    """The trap: a TTL that drops live state a user only reads.  The rule is stated in
    the TTL docstring, the operators' docstrings and docs/state.md, and the example in
    the docs (run by the test above) shows a read does not extend it."""
    assert "since the last\n    write, not the last read" in (TTL.__doc__ or "")
    assert "last write, not the last read" in DOC.read_text(encoding="utf-8")
    assert "reads do not count" in (sw.KeyedStream.stateful_map.__doc__ or "")
    assert "not from reads" in (sw.KeyedStream.process.__doc__ or "")


def test_reading_a_state_does_not_extend_its_ttl() -> None:
    class ReadOnly:
        def process(self, ctx: ProcessContext[Any], x: str) -> None:
            seen = ctx.value("seen", ttl=5.0)
            if x == "write":
                seen.set(ctx.processing_time)
            ctx.emit(seen.get())

    script = sw.testing.ScriptedSource(
        [(0.0, ["write"]), (3.0, ["read"]), (6.0, ["read"]), (7.0, ["write"])]
    )
    out = sw.testing.run_collect(lambda s: s.key_by(lambda e: "k").process(ReadOnly), script)
    t0 = out[0]
    assert out == [t0, t0, None, t0 + 7.0]
