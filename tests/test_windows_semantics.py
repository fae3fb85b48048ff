"""Every promise of docs/windows.md, as a small hand-checked example.

Everything runs on a virtual clock; inputs with gaps in processing time use
``ScriptedSource``, and ``TimedCollect`` records the clock instant at which each result
came out.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import sluiceway as sw
from sluiceway.testing import ScriptedSource

DOC = Path(__file__).resolve().parent.parent / "docs" / "windows.md"
DROPPED: sw.sinks.Collect[Any] = sw.sinks.Collect()  # dead letters nobody reads


def ts_of(r: dict[str, Any]) -> Any:
    return r["ts"]


def key_of(r: dict[str, Any]) -> Any:
    return r["k"]


def rec(ts: Any, k: str = "a", **more: Any) -> dict[str, Any]:
    return {"k": k, "ts": ts, **more}


TimedCollect = sw.testing.TimedCollect


class Outcome:
    def __init__(self, results: list[Any], late: list[Any], run: sw.RunResult) -> None:
        self.results = results
        self.late = late
        self.run = run

    @property
    def window_metrics(self) -> Any:
        ops = [op for op in self.run.metrics.operators if op.kind == "window"]
        assert len(ops) == 1
        return ops[0]

    def rows(self) -> list[tuple[Any, ...]]:
        return [(r.key, r.start, r.end, r.value) for r in self.results]

    def full(self) -> list[tuple[Any, ...]]:
        return [(r.key, r.start, r.end, r.value, r.revision, r.final, r.kind) for r in self.results]


def windowed(
    records: list[Any],
    assigner: Any,
    *,
    bound: float | timedelta = 0.0,
    lateness: float | timedelta = 0.0,
    agg: Any = None,
    keyed: bool = True,
    late: bool = True,
    max_batch_size: int = 1024,
) -> Outcome:
    """records -> with_timestamps(ts, bound) -> key_by(k) -> window -> aggregate."""
    flow = sw.Flow("semantics")
    s = flow.source(sw.sources.Iterable(records)).with_timestamps(ts_of, bound)
    w = (s.key_by(key_of) if keyed else s).window(assigner, allowed_lateness=lateness)
    out = w.aggregate(sw.agg.count()) if agg is None else agg(w)
    results: sw.sinks.Collect[Any] = sw.sinks.Collect()
    out.sink(results)
    late_items: sw.sinks.Collect[Any] = sw.sinks.Collect()
    if late:
        out.late().sink(late_items)
    run = sw.testing.run_flow(flow, max_batch_size=max_batch_size)
    return Outcome(results.items, late_items.items, run)


# -- the page's own example --------------------------------------------------------------


def test_the_pages_example_runs_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    block = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)[0]
    run = sw.run
    monkeypatch.setattr(sw, "run", lambda flow: run(flow, clock=sw.VirtualClock()))
    ns: dict[str, Any] = {}
    exec(block, ns)
    assert [x.value["user"] for x in ns["late"].items] == ["ann"]


# -- bounds -------------------------------------------------------------------------------


def test_bounds_are_half_open() -> None:
    out = windowed([rec(0.0), rec(9.999999), rec(10.0), rec(19.999999)], sw.windows.Tumbling(10))
    assert out.rows() == [("a", 0.0, 10.0, 2), ("a", 10.0, 20.0, 2)]


def test_bounds_are_exact_in_microseconds() -> None:
    out = windowed([rec(0.3), rec(0.29999), rec(0.4)], sw.windows.Tumbling(0.1), bound=1)
    assert out.rows() == [("a", 0.2, 0.3, 1), ("a", 0.3, 0.4, 1), ("a", 0.4, 0.5, 1)]


def test_tumbling_offset_shifts_the_grid() -> None:
    out = windowed([rec(2.0), rec(3.0)], sw.windows.Tumbling(10, offset=3))
    assert out.rows() == [("a", -7.0, 3.0, 1), ("a", 3.0, 13.0, 1)]


def test_a_sliding_record_is_in_size_over_slide_windows() -> None:
    out = windowed([rec(25.0)], sw.windows.Sliding(30, 10))
    assert out.rows() == [("a", 0.0, 30.0, 1), ("a", 10.0, 40.0, 1), ("a", 20.0, 50.0, 1)]


def test_sliding_bounds_are_half_open() -> None:
    out = windowed([rec(10.0)], sw.windows.Sliding(20, 10))
    assert [(r.start, r.end) for r in out.results] == [(0.0, 20.0), (10.0, 30.0)]


def test_session_records_exactly_gap_apart_are_in_different_sessions() -> None:
    out = windowed([rec(0.0), rec(5.0), rec(20.0), rec(24.999999)], sw.windows.Session(5))
    assert out.rows() == [("a", 0.0, 5.0, 1), ("a", 5.0, 10.0, 1), ("a", 20.0, 29.999999, 2)]


def test_sessions_are_per_key() -> None:
    out = windowed([rec(0.0, "a"), rec(1.0, "b"), rec(2.0, "a")], sw.windows.Session(3))
    assert sorted(out.rows()) == [("a", 0.0, 5.0, 2), ("b", 1.0, 4.0, 1)]


def test_unkeyed_windows_are_global_with_key_none() -> None:
    out = windowed([rec(1.0, "a"), rec(2.0, "b")], sw.windows.Tumbling(10), keyed=False)
    assert out.rows() == [(None, 0.0, 10.0, 2)]


def test_durations_may_be_timedeltas() -> None:
    out = windowed(
        [rec(1.0), rec(61.0), rec(30.0)],
        sw.windows.Tumbling(timedelta(minutes=1)),
        bound=timedelta(seconds=40),
        lateness=timedelta(seconds=5),
    )
    finals = [(r.start, r.end, r.value) for r in out.results if r.final]
    assert finals == [(0.0, 60.0, 2), (60.0, 120.0, 1)]
    assert out.late == []


# -- timestamps ---------------------------------------------------------------------------


def test_aware_datetimes_are_event_times() -> None:
    plus2 = timezone(timedelta(hours=2))
    records = [
        rec(datetime(2024, 1, 1, 0, 0, 5, tzinfo=UTC)),
        rec(datetime(2024, 1, 1, 2, 0, 7, tzinfo=plus2)),  # 00:00:07 UTC
        rec(datetime(2024, 1, 1, 0, 0, 12, tzinfo=UTC)),
    ]
    out = windowed(records, sw.windows.Tumbling(10))
    epoch = datetime(2024, 1, 1, tzinfo=UTC).timestamp()
    assert out.rows() == [("a", epoch, epoch + 10, 2), ("a", epoch + 10, epoch + 20, 1)]
    first = out.results[0]
    assert first.start_time == datetime(2024, 1, 1, tzinfo=UTC)
    assert first.end_time == datetime(2024, 1, 1, 0, 0, 10, tzinfo=UTC)
    assert first.start_time.tzinfo is not None
    assert first.start_time.utcoffset() == timedelta(0)


def test_a_naive_datetime_fails_the_flow_naming_the_record() -> None:
    bad = rec(datetime(2024, 1, 1, 0, 0, 5), id=42)
    with pytest.raises(sw.OperatorError) as info:
        windowed([rec(1.0), bad], sw.windows.Tumbling(10))
    assert info.value.record == bad
    message = str(info.value)
    assert "'id': 42" in message
    assert "naive" in message


BAD_TIMESTAMPS = [
    pytest.param(datetime(2024, 1, 1), id="naive-datetime"),
    pytest.param("12.0", id="string"),
    pytest.param(None, id="none"),
    pytest.param(math.nan, id="nan"),
    pytest.param(math.inf, id="inf"),
    pytest.param(-math.inf, id="-inf"),
    pytest.param(1e303, id="huge-float"),
    pytest.param(10**400, id="huge-int"),
    pytest.param(-1e20, id="huge-negative"),
    pytest.param(1_733_000_000_123, id="epoch-milliseconds"),
]


@pytest.mark.parametrize("bad_ts", BAD_TIMESTAMPS)
def test_a_bad_timestamp_fails_the_flow_naming_the_record(bad_ts: Any) -> None:
    bad = rec(bad_ts, id=7)
    with pytest.raises(sw.OperatorError) as info:
        windowed([rec(1.0), bad, rec(2.0)], sw.windows.Tumbling(10))
    assert info.value.record == bad
    assert "'id': 7" in str(info.value)


@pytest.mark.parametrize("bad_ts", BAD_TIMESTAMPS)
def test_a_bad_timestamp_goes_to_the_dead_letter_sink(bad_ts: Any) -> None:
    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    bad = rec(bad_ts, id=7)
    flow = sw.Flow("dead-letters")
    results: sw.sinks.Collect[Any] = sw.sinks.Collect()
    (
        flow.source(sw.sources.Iterable([rec(1.0), bad, rec(12.0)]))
        .with_timestamps(ts_of, on_error=sw.DeadLetter(dlq))
        .key_by(key_of)
        .window(sw.windows.Tumbling(10))
        .aggregate(sw.agg.count())
        .sink(results)
    )
    sw.testing.run_flow(flow)
    assert [d.record for d in dlq.items] == [bad]
    assert [(r.start, r.value) for r in results.items] == [(0.0, 1), (10.0, 1)]


@pytest.mark.parametrize(
    ("value", "fix"),
    [
        (1_733_000_000_123, "epoch milliseconds: divide by 1_000"),
        (1_733_000_000_123_456, "epoch microseconds: divide by 1_000_000"),
        (1_733_000_000_123_456_789, "epoch nanoseconds: divide by 1_000_000_000"),
        (1e303, "event times are epoch seconds"),
    ],
)
def test_an_implausible_timestamp_names_the_unit_it_looks_like(value: Any, fix: str) -> None:
    with pytest.raises(sw.OperatorError, match="outside the years 1-9999") as info:
        windowed([rec(1.0), rec(value, id=9)], sw.windows.Tumbling(10))
    assert fix in str(info.value)
    assert info.value.record == rec(value, id=9)


def test_timestamps_at_the_edges_of_the_years_1_to_9999_are_windowed() -> None:
    out = windowed([rec(-62_135_596_800.0), rec(253_402_300_000)], sw.windows.Tumbling(10))
    assert [r.start_time.year for r in out.results] == [1, 9999]
    assert [r.end - r.start for r in out.results] == [10.0, 10.0]


def test_a_timestamp_function_that_raises_goes_to_the_error_policy() -> None:
    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    flow = sw.Flow("raising")
    results: sw.sinks.Collect[Any] = sw.sinks.Collect()
    (
        flow.source(sw.sources.Iterable([rec(1.0), {"k": "a"}, rec(2.0)]))
        .with_timestamps(ts_of, on_error=sw.DeadLetter(dlq))
        .key_by(key_of)
        .window(sw.windows.Tumbling(10))
        .aggregate(sw.agg.count())
        .sink(results)
    )
    sw.testing.run_flow(flow)
    assert [(d.record, d.error_type) for d in dlq.items] == [({"k": "a"}, "KeyError")]
    assert [r.value for r in results.items] == [2]


def test_whether_a_timestamp_is_valid_does_not_depend_on_its_batch() -> None:
    """``True`` is a number to Python; whether it is accepted as a timestamp or refused,
    it must be the same alone in its batch or beside a datetime."""
    aware = datetime(1970, 1, 1, 0, 0, 3, tzinfo=UTC)

    def run(batch: int) -> tuple[list[Any], list[Any]]:
        dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
        flow = sw.Flow("bool-timestamps")
        results: sw.sinks.Collect[Any] = sw.sinks.Collect()
        records = [rec(True, id=1), rec(aware, id=2), rec(True, id=3)]
        (
            flow.source(sw.sources.Iterable(records))
            .with_timestamps(ts_of, on_error=sw.DeadLetter(dlq))
            .key_by(key_of)
            .window(sw.windows.Tumbling(10))
            .aggregate(sw.agg.collect(lambda r: r["id"]))
            .sink(results)
        )
        sw.testing.run_flow(flow, max_batch_size=batch)
        return [d.record["id"] for d in dlq.items], [r.value for r in results.items]

    assert run(1) == run(2) == run(1024)


def test_the_watermark_strategies_can_be_named() -> None:
    records = [rec(1.0), rec(12.0), rec(4.0), rec(8.0)]
    bounded = windowed(records, sw.windows.Tumbling(10), bound=5.0)

    def with_strategy(strategy: Any) -> Outcome:
        flow = sw.Flow("strategies")
        out = (
            flow.source(sw.sources.Iterable(records))
            .with_timestamps(ts_of, watermarks=strategy)
            .key_by(key_of)
            .window(sw.windows.Tumbling(10))
            .aggregate(sw.agg.count())
        )
        results: sw.sinks.Collect[Any] = sw.sinks.Collect()
        late: sw.sinks.Collect[Any] = sw.sinks.Collect()
        out.sink(results)
        out.late().sink(late)
        return Outcome(results.items, late.items, sw.testing.run_flow(flow))

    named = with_strategy(sw.watermarks.BoundedOutOfOrderness(5.0))
    assert named.rows() == bounded.rows() == [("a", 0.0, 10.0, 3), ("a", 10.0, 20.0, 1)]
    monotonic = with_strategy(sw.watermarks.Monotonic())
    assert monotonic.rows() == [("a", 0.0, 10.0, 1), ("a", 10.0, 20.0, 1)]
    assert [x.value["ts"] for x in monotonic.late] == [4.0, 8.0]


# -- watermarks and lateness ------------------------------------------------------------------


def test_late_records_carry_the_window_they_missed_and_the_watermark() -> None:
    records = [rec(1.0, v=1), rec(25.0, v=2), rec(3.0, v=3), rec(12.0, "b", v=4)]
    out = windowed(records, sw.windows.Tumbling(10), bound=2.0)
    assert out.rows() == [("a", 0.0, 10.0, 1), ("a", 20.0, 30.0, 1)]
    assert out.late == [
        sw.LateRecord(records[2], "a", 3.0, 0.0, 10.0, 23.0),
        sw.LateRecord(records[3], "b", 12.0, 10.0, 20.0, 23.0),
    ]
    assert out.window_metrics.late == 2


def test_a_record_late_for_several_sliding_windows_gives_one_late_record_each() -> None:
    # The record at 14 belongs to [-5, 15), [0, 20), [5, 25) and [10, 30); with the
    # watermark at 30 it missed every one of them.
    records = [rec(30.0), rec(14.0), rec(27.0)]
    out = windowed(records, sw.windows.Sliding(20, 5))
    assert [(x.value, x.window_start, x.window_end, x.watermark) for x in out.late] == [
        (records[1], -5.0, 15.0, 30.0),
        (records[1], 0.0, 20.0, 30.0),
        (records[1], 5.0, 25.0, 30.0),
        (records[1], 10.0, 30.0, 30.0),
        (records[2], 10.0, 30.0, 30.0),  # 27 missed only [10, 30): [15, 35) ... are open
    ]
    assert out.rows() == [
        ("a", 15.0, 35.0, 2),
        ("a", 20.0, 40.0, 2),
        ("a", 25.0, 45.0, 2),
        ("a", 30.0, 50.0, 1),
    ]


def test_without_a_late_consumer_late_records_are_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sluiceway")
    out = windowed(
        [rec(20.0), rec(1.0), rec(2.0), rec(30.0), rec(3.0)],
        sw.windows.Tumbling(10),
        late=False,
        max_batch_size=1,
    )
    assert out.rows() == [("a", 20.0, 30.0, 1), ("a", 30.0, 40.0, 1)]
    assert out.window_metrics.late == 3
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "late" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "between",
    [
        pytest.param(lambda s: s.filter(lambda r: r["v"] != 0), id="filter"),
        pytest.param(
            lambda s: s.map(lambda r: r if r["v"] else 1 / 0, on_error=sw.DeadLetter(DROPPED)),
            id="dead-lettering-map",
        ),
    ],
)
def test_dropping_records_before_the_window_does_not_make_results_depend_on_batches(
    between: Any,
) -> None:
    """The records at 2 and 3 move the watermark, then are dropped before the window.
    Record by record, the watermark reaches 2 (the window [0, 1) fires, not final: 2 < 1
    + 2), then 3 (it closes); the results must not depend on whether the window saw the
    watermark 2 (batches of 1) or only 3 (one batch)."""

    def run(batch: int) -> list[tuple[Any, ...]]:
        flow = sw.Flow("dropping")
        results: sw.sinks.Collect[Any] = sw.sinks.Collect()
        records = [rec(0.0, v=1), rec(2.0, v=0), rec(3.0, v=0)]
        stream = flow.source(sw.sources.Iterable(records)).with_timestamps(ts_of)
        (
            between(stream)
            .window(sw.windows.Tumbling(1), allowed_lateness=2.0)
            .aggregate(sw.agg.count())
            .sink(results)
        )
        sw.testing.run_flow(flow, max_batch_size=batch)
        return [(r.start, r.end, r.value, r.revision, r.final, r.kind) for r in results.items]

    assert run(1) == [(0.0, 1.0, 1, 0, False, "on_time"), (0.0, 1.0, 1, 1, True, "final")]
    assert run(1024) == run(1)


def test_watermarks_never_go_backwards() -> None:
    # 40 then 5: the watermark stays at 40, so 35 (window [30, 40)) is late too.
    out = windowed([rec(40.0), rec(5.0), rec(35.0), rec(41.0)], sw.windows.Tumbling(10))
    assert [(x.timestamp, x.watermark) for x in out.late] == [(5.0, 40.0), (35.0, 40.0)]
    assert out.rows() == [("a", 40.0, 50.0, 2)]


def test_within_allowed_lateness_a_window_fires_again() -> None:
    records = [rec(1.0), rec(12.0), rec(3.0), rec(14.0), rec(16.0), rec(5.0)]
    out = windowed(records, sw.windows.Tumbling(10), lateness=5.0, max_batch_size=1)
    assert out.full() == [
        # the watermark (12) passes 10: on time, but not final (12 < 10 + 5)
        ("a", 0.0, 10.0, 1, 0, False, "on_time"),
        # the record at 3 is within the lateness: the window fires again at once
        ("a", 0.0, 10.0, 2, 1, False, "late"),
        # the watermark (16) passes 10 + 5: the window closes with its latest value
        ("a", 0.0, 10.0, 2, 2, True, "final"),
        # at the end of input [10, 20) fires, then closes
        ("a", 10.0, 20.0, 3, 0, False, "on_time"),
        ("a", 10.0, 20.0, 3, 1, True, "final"),
    ]
    # at 16 the watermark passed 10 + 5: the record at 5 is late, and [0, 10) is gone
    assert [(x.timestamp, x.window_end, x.watermark) for x in out.late] == [(5.0, 10.0, 16.0)]


def test_an_upserting_consumer_holds_the_latest_value() -> None:
    records = [rec(1.0), rec(12.0), rec(3.0), rec(4.0), rec(13.0), rec(2.0)]
    out = windowed(records, sw.windows.Tumbling(10), lateness=10.0)
    table: dict[tuple[Any, float, float], tuple[int, Any]] = {}
    closed: set[tuple[Any, float, float]] = set()
    for r in out.results:
        k = (r.key, r.start, r.end)
        if k in table:
            assert r.revision == table[k][0] + 1
        else:
            assert r.revision == 0
        assert k not in closed, "a result after the final one"
        if r.final:
            closed.add(k)
        table[k] = (r.revision, r.value)
    assert closed == set(table), "every window ends with a final result"
    assert {k: v for k, (_, v) in table.items()} == {
        ("a", 0.0, 10.0): 4,
        ("a", 10.0, 20.0): 2,
    }


def test_on_time_results_with_default_lateness_are_final() -> None:
    out = windowed([rec(1.0), rec(12.0), rec(25.0)], sw.windows.Tumbling(10))
    assert [(r.revision, r.final, r.kind) for r in out.results] == [(0, True, "on_time")] * 3


def test_results_of_one_advance_are_ordered_by_end_then_opening() -> None:
    # Sliding(10, 5): each record opens two windows, b's first, then a's, then c's.  With
    # a bound of 2 the watermark stays at 4 until the record at 30, then jumps to 28 and
    # fires all six in one advance: by end, and among equal ends, b before a before c.
    records = [rec(4.0, "b"), rec(3.0, "a"), rec(6.0, "c"), rec(30.0, "d")]
    out = windowed(records, sw.windows.Sliding(10, 5), bound=2.0, max_batch_size=1)
    fired = [(r.key, r.start, r.end) for r in out.results if r.end <= 30]
    assert fired == [
        ("b", -5.0, 5.0),
        ("a", -5.0, 5.0),
        ("b", 0.0, 10.0),
        ("a", 0.0, 10.0),
        ("c", 0.0, 10.0),
        ("c", 5.0, 15.0),
    ]


def test_session_bridge_merges_two_sessions() -> None:
    records = [rec(0.0, v="x"), rec(3.0, v="y"), rec(6.0), rec(7.0), rec(1.5, v="bridge")]
    out = windowed(
        records,
        sw.windows.Session(2),
        lateness=10.0,
        max_batch_size=1,
        agg=lambda w: w.apply(lambda rs: [r["ts"] for r in rs]),
    )
    assert out.full() == [
        ("a", 0.0, 2.0, [0.0], 0, False, "on_time"),
        ("a", 3.0, 5.0, [3.0], 0, False, "on_time"),
        # The record at 1.5 is within 2 of both: one session [0, 5), fired at once (late:
        # the watermark is past 5), superseding both -- it continues their revisions, and
        # they end without a final result of their own.
        ("a", 0.0, 5.0, [0.0, 3.0, 1.5], 1, False, "late"),
        # End of input: [6, 9) fires (at 9), then the closings, by time: 5 + 10, 9 + 10.
        ("a", 6.0, 9.0, [6.0, 7.0], 0, False, "on_time"),
        ("a", 0.0, 5.0, [0.0, 3.0, 1.5], 2, True, "final"),
        ("a", 6.0, 9.0, [6.0, 7.0], 1, True, "final"),
    ]
    assert out.late == []


def test_a_late_session_record_is_late_only_if_it_joins_nothing() -> None:
    # gap 5: the session [10, 15) is open (not fired) when the watermark is 14; a record
    # at 6 is behind the watermark but within gap of it: it joins (not late).  A record
    # at 1 ([1, 6) ends before the watermark and joins nothing) is late.
    records = [rec(10.0), rec(14.0), rec(6.0), rec(1.0)]
    out = windowed(records, sw.windows.Session(5))
    assert out.rows() == [("a", 6.0, 19.0, 3)]
    assert [(x.timestamp, x.window_start, x.window_end) for x in out.late] == [(1.0, 1.0, 6.0)]


def test_a_session_aggregator_merge_is_used_when_sessions_merge() -> None:
    merges: list[tuple[Any, Any]] = []

    class Total(sw.agg.Aggregator[int, int]):
        def create(self) -> int:
            return 0

        def add(self, acc: int, value: dict[str, Any]) -> int:
            return acc + int(value["v"])

        def merge(self, acc1: int, acc2: int) -> int:
            merges.append((acc1, acc2))
            return acc1 + acc2

        def result(self, acc: int) -> int:
            return acc

    records = [rec(0.0, v=1), rec(10.0, v=10), rec(5.0, v=100)]
    out = windowed(records, sw.windows.Session(6), bound=20, agg=lambda w: w.aggregate(Total()))
    assert out.rows() == [("a", 0.0, 16.0, 111)]
    assert merges, "the two sessions' accumulators were not merged"


# -- aggregations ----------------------------------------------------------------------------


def test_a_single_aggregator_gives_its_value_named_ones_a_dict() -> None:
    records = [rec(1.0, v=2), rec(2.0, v=5)]
    single = windowed(records, sw.windows.Tumbling(10), agg=lambda w: w.aggregate(sw.agg.count()))
    named = windowed(
        records,
        sw.windows.Tumbling(10),
        agg=lambda w: w.aggregate(n=sw.agg.count(), total=sw.agg.sum(lambda r: r["v"])),
    )
    assert [r.value for r in single.results] == [2]
    assert [r.value for r in named.results] == [{"n": 2, "total": 7}]


def test_the_builtin_aggregators() -> None:
    records = [
        rec(5.0, v=3, id=0),
        rec(2.0, v=1, id=1),
        rec(8.0, v=3, id=2),
        rec(2.0, v=7, id=3),  # ties the earliest event time: arrives after id=1
        rec(8.0, v=4, id=4),  # ties the latest event time: arrives after id=2
    ]

    def v(r: dict[str, Any]) -> int:
        return int(r["v"])

    out = windowed(
        records,
        sw.windows.Tumbling(10),
        bound=10,
        agg=lambda w: w.aggregate(
            count=sw.agg.count(),
            sum=sw.agg.sum(v),
            mean=sw.agg.mean(v),
            min=sw.agg.min(v),
            max=sw.agg.max(v),
            first=sw.agg.first(lambda r: r["id"]),
            last=sw.agg.last(lambda r: r["id"]),
            collect=sw.agg.collect(lambda r: r["id"]),
            distinct=sw.agg.count_distinct(v),
            first_record=sw.agg.first(),
        ),
    )
    assert [r.value for r in out.results] == [
        {
            "count": 5,
            "sum": 18,
            "mean": 3.6,
            "min": 1,
            "max": 7,
            "first": 1,
            "last": 4,
            "collect": [0, 1, 2, 3, 4],
            "distinct": 4,
            "first_record": records[1],
        }
    ]


def test_aggregators_default_to_the_record_itself() -> None:
    flow = sw.Flow("defaults")
    results: sw.sinks.Collect[Any] = sw.sinks.Collect()
    (
        flow.source(sw.sources.Iterable([3, 1, 4, 1, 5, 11]))
        .with_timestamps(float)
        .window(sw.windows.Tumbling(10))
        .aggregate(
            sum=sw.agg.sum(),
            mean=sw.agg.mean(),
            min=sw.agg.min(),
            max=sw.agg.max(),
            first=sw.agg.first(),
            last=sw.agg.last(),
            collect=sw.agg.collect(),
            distinct=sw.agg.count_distinct(),
        )
        .sink(results)
    )
    sw.testing.run_flow(flow)
    # The 1s are behind the (monotonic) watermark, but [0, 10) has not fired: on time.
    assert [r.value for r in results.items] == [
        {
            "sum": 14,
            "mean": 2.8,
            "min": 1,
            "max": 5,
            "first": 1,
            "last": 5,
            "collect": [3, 1, 4, 1, 5],
            "distinct": 4,
        },
        {
            "sum": 11,
            "mean": 11.0,
            "min": 11,
            "max": 11,
            "first": 11,
            "last": 11,
            "collect": [11],
            "distinct": 1,
        },
    ]


def test_reduce_combines_records() -> None:
    out = windowed(
        [rec(1.0, v=2), rec(2.0, v=3), rec(11.0, v=4)],
        sw.windows.Tumbling(10),
        agg=lambda w: w.reduce(lambda a, b: {**a, "v": a["v"] * b["v"]}),
    )
    assert [r.value["v"] for r in out.results] == [6, 4]


def test_apply_sees_the_records_in_arrival_order() -> None:
    records = [rec(5.0, id=0), rec(2.0, id=1), rec(8.0, id=2), rec(1.0, id=3)]
    out = windowed(
        records,
        sw.windows.Tumbling(10),
        bound=10,
        agg=lambda w: w.apply(lambda rs: [r["id"] for r in rs]),
    )
    assert [r.value for r in out.results] == [[0, 1, 2, 3]]


@pytest.mark.parametrize("how", ["apply", "collect"])
def test_a_merged_session_lists_the_earlier_sessions_records_first(how: str) -> None:
    """[6, 8) is opened first (id 0), then [4, 6) (id 1); the record at 5 (id 2) bridges
    them.  The merged session lists the earlier session's records, then the later one's,
    then the record itself (docs/windows.md, Aggregations)."""
    records = [rec(6.0, id=0), rec(4.0, id=1), rec(5.0, id=2), rec(7.0, id=3)]

    def agg(w: Any) -> Any:
        if how == "apply":
            return w.apply(lambda rs: [r["id"] for r in rs])
        return w.aggregate(sw.agg.collect(lambda r: r["id"]))

    out = windowed(records, sw.windows.Session(2), bound=5, agg=agg)
    assert out.rows() == [("a", 4.0, 9.0, [1, 0, 2, 3])]


def test_a_custom_aggregator() -> None:
    class Spread(sw.agg.Aggregator[Any, float]):
        def create(self) -> Any:
            return None

        def add(self, acc: Any, value: dict[str, Any]) -> Any:
            x = value["v"]
            return (x, x) if acc is None else (min(acc[0], x), max(acc[1], x))

        def merge(self, a: Any, b: Any) -> Any:
            return (min(a[0], b[0]), max(a[1], b[1]))

        def result(self, acc: Any) -> float:
            return float(acc[1] - acc[0])

    out = windowed(
        [rec(1.0, v=4), rec(2.0, v=9), rec(3.0, v=-1)],
        sw.windows.Tumbling(10),
        agg=lambda w: w.aggregate(spread=Spread(), n=sw.agg.count()),
    )
    assert [r.value for r in out.results] == [{"spread": 10.0, "n": 3}]


# -- results -----------------------------------------------------------------------------------


def test_results_have_event_time_end_minus_a_microsecond_and_can_be_windowed_again() -> None:
    flow = sw.Flow("twice")
    results: sw.sinks.Collect[Any] = sw.sinks.Collect()
    records = [rec(float(t)) for t in (1, 5, 9, 10, 19, 21, 29, 35)]
    (
        flow.source(sw.sources.Iterable(records))
        .with_timestamps(ts_of)
        .key_by(key_of)
        .window(sw.windows.Tumbling(10))
        .aggregate(sw.agg.count())
        # the result for [0, 10) has event time 9.999999: in [0, 10) of the next window
        .window(sw.windows.Tumbling(10))
        .aggregate(sw.agg.sum(lambda r: r.value))
        .sink(results)
    )
    sw.testing.run_flow(flow)
    assert [(r.start, r.value) for r in results.items] == [
        (0.0, 3),
        (10.0, 2),
        (20.0, 2),
        (30.0, 1),
    ]
    assert [r.key for r in results.items] == ["a"] * 4


def test_the_event_time_of_a_result_is_end_minus_one_microsecond() -> None:
    flow = sw.Flow("result-times")
    results: sw.sinks.Collect[Any] = sw.sinks.Collect()
    (
        flow.source(sw.sources.Iterable([rec(1.0), rec(11.0)]))
        .with_timestamps(ts_of)
        .key_by(key_of)
        .window(sw.windows.Tumbling(10))
        .aggregate(sw.agg.count())
        .window(sw.windows.Tumbling(9.999999))  # [0, 9.999999), [9.999999, 19.999998)
        .aggregate(sw.agg.count())
        .sink(results)
    )
    sw.testing.run_flow(flow)
    assert [(r.start, r.end) for r in results.items] == [
        (9.999999, 19.999998),
        (19.999998, 29.999997),
    ]


# -- end of input, stop -------------------------------------------------------------------------


def test_end_of_input_fires_every_window() -> None:
    # A bound of an hour: the watermark never reaches any end; the end of input does.
    out = windowed(
        [rec(1.0), rec(15.0, "b"), rec(22.0)],
        sw.windows.Tumbling(10),
        bound=3600.0,
        lateness=60.0,
    )
    # The watermark jumps from -3599 to +inf: each window fires (at its end) and closes
    # (at its end + 60), in that event-time order.
    assert out.full() == [
        ("a", 0.0, 10.0, 1, 0, False, "on_time"),
        ("b", 10.0, 20.0, 1, 0, False, "on_time"),
        ("a", 20.0, 30.0, 1, 0, False, "on_time"),
        ("a", 0.0, 10.0, 1, 1, True, "final"),
        ("b", 10.0, 20.0, 1, 1, True, "final"),
        ("a", 20.0, 30.0, 1, 1, True, "final"),
    ]
    plain = windowed([rec(1.0), rec(15.0, "b"), rec(22.0)], sw.windows.Tumbling(10), bound=3600)
    assert plain.full() == [
        ("a", 0.0, 10.0, 1, 0, True, "on_time"),
        ("b", 10.0, 20.0, 1, 0, True, "on_time"),
        ("a", 20.0, 30.0, 1, 0, True, "on_time"),
    ]
    assert out.window_metrics.state == 0


def endless_clicks() -> Any:
    return ({"k": f"u{i % 3}", "ts": i / 10} for i in itertools.count())


@pytest.mark.parametrize(
    ("how", "early"),
    [("stop", None), ("request_stop", None), ("stop", 0.25)],
)
def test_a_graceful_stop_flushes_open_windows(how: str, early: float | None) -> None:
    clock = sw.VirtualClock()

    async def main() -> tuple[sw.RunResult, list[Any]]:
        flow = sw.Flow("endless")
        results: sw.sinks.Collect[Any] = sw.sinks.Collect()
        (
            flow.source(sw.sources.Generator(endless_clicks, rate=100), name="clicks")
            .with_timestamps(ts_of, 1.0)
            .key_by(key_of)
            .window(sw.windows.Session(0.5), allowed_lateness=1.0, early_every=early)
            .aggregate(sw.agg.count())
            .sink(results)
        )
        handle = sw.start(flow, clock=clock)
        await clock.sleep(2.505)
        if how == "stop":
            result = await handle.stop()
        else:
            handle.request_stop()
            result = await handle.wait()
        return result, results.items

    result, everything = asyncio.run(main())
    assert result.stopped
    # Every session was open at the stop: each fires (on time) and closes (final) then.
    kinds = [r.kind for r in everything if r.kind != "early"]
    assert kinds == ["on_time"] * 3 + ["final"] * 3
    items = [r for r in everything if r.final]
    assert (early is not None) == any(r.kind == "early" for r in everything)
    pulled = result.metrics.operator("clicks").records_out
    assert pulled > 200
    # Every record pulled is counted in a result: the open sessions were flushed.
    assert sum(r.value for r in items) == pulled
    assert {r.key for r in items} == {"u0", "u1", "u2"}
    last = max(r.end for r in items)
    assert last == pytest.approx((pulled - 1) / 10 + 0.5)
    ops = [op for op in result.metrics.operators if op.kind == "window"]
    assert ops[0].state == 0


# -- processing time --------------------------------------------------------------------------


def test_early_results_are_partial_and_not_final() -> None:
    flow = sw.Flow("early")
    results = TimedCollect()
    script = [(0.0, [rec(1.0), rec(2.0)]), (6.0, [rec(3.0)]), (13.0, [rec(15.0)])]
    (
        flow.source(ScriptedSource(script))
        .with_timestamps(ts_of)
        .key_by(key_of)
        .window(sw.windows.Tumbling(10), early_every=5.0)
        .aggregate(sw.agg.count())
        .sink(results)
    )
    sw.testing.run_flow(flow)
    first = [(at, r) for at, r in results.items if r.start == 0.0]
    early = [(at, r) for at, r in first if r.kind == "early"]
    on_time = [(at, r) for at, r in first if r.kind == "on_time"]
    assert early, "no early result"
    assert len(on_time) == 1
    assert first[-1] == on_time[0]  # every early result came before the on-time one
    assert all(not r.final for _, r in early)
    assert [r.revision for _, r in first] == list(range(len(first)))
    # 5 s in, the window holds two records; 5 s after the third arrived (at 6), three.
    # The on-time result comes with the record at 15 (at 13).
    assert any(5.0 <= at < 6.0 and r.value == 2 for at, r in early)
    assert any(6.0 <= at < 13.0 and r.value == 3 for at, r in early)
    assert on_time[0][0] >= 13.0
    assert on_time[0][1].value == 3
    assert on_time[0][1].final


def test_early_results_of_a_growing_session() -> None:
    flow = sw.Flow("early-sessions")
    results = TimedCollect()
    script = [(0.0, [rec(0.0)]), (3.0, [rec(3.0)]), (20.0, [rec(30.0)])]
    (
        flow.source(ScriptedSource(script))
        .with_timestamps(ts_of)
        .key_by(key_of)
        .window(sw.windows.Session(5), early_every=2.0)
        .aggregate(sw.agg.count())
        .sink(results)
    )
    sw.testing.run_flow(flow)
    rows = [(r.start, r.end, r.value, r.revision, r.final, r.kind) for r in results.values]
    assert rows == [
        (0.0, 5.0, 1, 0, False, "early"),  # at 2
        (0.0, 8.0, 2, 1, False, "early"),  # at 5: the session grew with the record at 3
        (0.0, 8.0, 2, 2, True, "on_time"),  # at 20: the watermark passed 8
        (30.0, 35.0, 1, 0, True, "on_time"),  # end of input
    ]


def test_processing_time_windows_use_the_clock_and_fire_on_a_timer() -> None:
    clock = sw.VirtualClock(epoch=1_700_000_000.0)
    flow = sw.Flow("processing")
    results = TimedCollect()
    script = [(0.0, ["a", "b"]), (3.0, ["c"]), (12.0, ["d"]), (30.0, ["e"])]
    (
        flow.source(ScriptedSource(script))
        .window(sw.windows.Tumbling(10), time="processing")
        .aggregate(sw.agg.collect())
        .sink(results)
    )
    sw.testing.run_flow(flow, clock=clock)
    epoch = 1_700_000_000.0
    assert [(r.start - epoch, r.end - epoch, r.value) for r in results.values] == [
        (0.0, 10.0, ["a", "b", "c"]),
        (10.0, 20.0, ["d"]),
        (30.0, 40.0, ["e"]),
    ]
    at = [t for t, _ in results.items]
    assert 10.0 <= at[0] < 12.0  # on a timer, not when "d" arrives
    assert 20.0 <= at[1] < 30.0


def test_advance_when_idle_closes_the_windows_of_a_quiet_stream() -> None:
    def run(advance: float | None) -> tuple[list[tuple[float, Any]], list[Any]]:
        flow = sw.Flow("quiet")
        results = TimedCollect()
        late: sw.sinks.Collect[Any] = sw.sinks.Collect()
        script = [(0.0, [rec(1.0), rec(2.0)]), (100.0, [rec(3.0)])]
        out = (
            flow.source(ScriptedSource(script))
            .with_timestamps(ts_of, advance_when_idle=advance)
            .key_by(key_of)
            .window(sw.windows.Tumbling(10))
            .aggregate(sw.agg.count())
        )
        out.sink(results)
        out.late().sink(late)
        sw.testing.run_flow(flow)
        return results.items, late.items

    quiet, late = run(10.0)
    # 10 s after the last record, the watermark (2) moves on with processing time: 12
    # passes 10 and [0, 10) fires, long before the next record at 100.
    assert [(r.start, r.value) for _, r in quiet] == [(0.0, 2)]
    assert 10.0 <= quiet[0][0] <= 20.0
    # ... so the record at 3 that comes at 100 is late.
    assert [(x.timestamp, x.window_end) for x in late] == [(3.0, 10.0)]
    assert late[0].watermark >= 12.0
    # Off (the default): nothing fires before the end of input.
    held, late_off = run(None)
    assert [(r.start, r.value) for _, r in held] == [(0.0, 3)]
    assert held[0][0] >= 100.0
    assert late_off == []


def test_processing_time_sessions() -> None:
    clock = sw.VirtualClock(epoch=1_700_000_000.0)
    flow = sw.Flow("processing-sessions")
    results = TimedCollect()
    script = [(0.0, ["a"]), (3.0, ["b"]), (20.0, ["c"])]
    (
        flow.source(ScriptedSource(script))
        .window(sw.windows.Session(5), time="processing")
        .aggregate(sw.agg.collect())
        .sink(results)
    )
    sw.testing.run_flow(flow, clock=clock)
    epoch = 1_700_000_000.0
    assert [(r.start - epoch, r.end - epoch, r.value) for r in results.values] == [
        (0.0, 8.0, ["a", "b"]),
        (20.0, 25.0, ["c"]),
    ]
    assert 8.0 <= results.items[0][0] < 20.0


# -- state ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "assigner",
    [
        pytest.param(sw.windows.Tumbling(1.0), id="tumbling"),
        pytest.param(sw.windows.Sliding(2.0, 0.5), id="sliding"),
        pytest.param(sw.windows.Session(0.3), id="session"),
    ],
)
def test_window_state_stays_bounded(assigner: Any) -> None:
    """200,000 records over 500 keys (in 10 generations: keys come and go) and rolling
    windows: the open windows stay bounded by the keys alive at once, and at the end
    nothing is held."""
    n, keys = 200_000, 500
    samples: list[int] = []
    handle_box: list[sw.FlowHandle] = []

    def sample(r: dict[str, Any]) -> None:
        if r["i"] % 5000 == 4999:
            handle = handle_box[0]
            state = next(op.state for op in handle.metrics().operators if op.kind == "window")
            # The operator's pending() (what a cancelled flow would lose) is the same count.
            held = handle.unflushed()
            assert sum(v for k, v in held.items() if k.startswith("operator window")) == state
            samples.append(state)

    def records() -> Any:
        for i in range(n):
            generation = i // 20_000
            yield {"i": i, "k": generation * keys + i % keys, "ts": i / 1000}

    async def main() -> sw.RunResult:
        flow = sw.Flow("bounded")
        results: sw.sinks.Collect[Any] = sw.sinks.Collect()
        (
            flow.source(sw.sources.Iterable(records()))
            .with_timestamps(ts_of, 0.5)
            .inspect(sample)
            .key_by(key_of)
            .window(assigner)
            .aggregate(sw.agg.count())
            .sink(results)
        )
        handle = sw.start(flow, clock=sw.VirtualClock())
        handle_box.append(handle)
        result = await handle.wait()
        assert sum(r.value for r in results.items) == n * (
            4 if isinstance(assigner, sw.windows.Sliding) else 1
        )
        return result

    result = asyncio.run(main())
    assert len(samples) == n // 5000
    # Each key has a record every 0.5 s of event time; with a watermark 0.5 s behind, a
    # key holds at most a few windows: tumbling 2, sliding 6, sessions 2.
    per_key = {"Tumbling": 2, "Sliding": 6, "Session": 2}[type(assigner).__name__]
    assert 0 < max(samples) <= keys * per_key
    ops = [op for op in result.metrics.operators if op.kind == "window"]
    assert ops[0].state == 0


# -- bad usage ----------------------------------------------------------------------------------


def test_a_window_on_a_stream_without_timestamps_is_refused() -> None:
    flow = sw.Flow("no-timestamps")
    keyed = flow.source(sw.sources.Iterable([1])).key_by(lambda x: x)
    with pytest.raises(sw.FlowDefinitionError, match="with_timestamps"):
        keyed.window(sw.windows.Tumbling(10))


def test_negative_allowed_lateness_is_refused() -> None:
    flow = sw.Flow("negative")
    stream = flow.source(sw.sources.Iterable([1])).with_timestamps(float)
    with pytest.raises(ValueError, match="allowed_lateness"):
        stream.window(sw.windows.Tumbling(10), allowed_lateness=-1.0)


def test_aggregate_without_aggregators_is_refused() -> None:
    flow = sw.Flow("nothing")
    windows = (
        flow.source(sw.sources.Iterable([1])).with_timestamps(float).window(sw.windows.Tumbling(10))
    )
    with pytest.raises(TypeError, match="aggregat"):
        windows.aggregate()


def test_aggregate_with_something_else_is_refused() -> None:
    flow = sw.Flow("not-an-aggregator")
    windows = (
        flow.source(sw.sources.Iterable([1])).with_timestamps(float).window(sw.windows.Tumbling(10))
    )
    with pytest.raises(TypeError, match="len"):
        windows.aggregate(n=len)  # type: ignore[arg-type]


def test_merging_a_timestamped_with_an_untimestamped_stream_is_refused() -> None:
    flow = sw.Flow("mixed")
    timed = flow.source(sw.sources.Iterable([1])).with_timestamps(float)
    untimed = flow.source(sw.sources.Iterable([2]))
    with pytest.raises(sw.FlowDefinitionError, match="with_timestamps"):
        timed.merge(untimed)
    with pytest.raises(sw.FlowDefinitionError, match="with_timestamps"):
        untimed.merge(timed)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"time": "wall"}, ValueError, "time"),
        ({"early_every": 0}, ValueError, "early_every"),
        ({"allowed_lateness": math.inf}, ValueError, "allowed_lateness"),
        ({"allowed_lateness": "5"}, TypeError, "allowed_lateness"),
    ],
)
def test_bad_window_arguments_are_explained(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    flow = sw.Flow("bad-arguments")
    stream = flow.source(sw.sources.Iterable([1])).with_timestamps(float)
    with pytest.raises(error, match=match):
        stream.window(sw.windows.Tumbling(10), **kwargs)


def test_a_window_needs_an_assigner() -> None:
    flow = sw.Flow("no-assigner")
    stream = flow.source(sw.sources.Iterable([1])).with_timestamps(float)
    with pytest.raises(TypeError, match="Tumbling"):
        stream.window(10)  # type: ignore[arg-type]


def test_a_new_session_after_one_that_fired_within_lateness_fires_at_its_own_end() -> None:
    """Key a's first session [0, 2) fires at 4 (not final: lateness 10, kept until 12). A
    second session of a, [6, 8), must fire when the watermark passes 8 (at 9), not at 12:
    so the record at 7 that comes after 9 is a late firing of a session that fired."""
    records = [rec(0.0), rec(4.0, "b"), rec(6.0), rec(9.0, "b"), rec(7.0), rec(30.0, "c")]
    out = windowed(records, sw.windows.Session(2.0), lateness=10.0)
    a_second = [r[3:] for r in out.full() if r[0] == "a" and r[1] == 6.0]
    assert a_second == [(1, 0, False, "on_time"), (2, 1, False, "late"), (2, 2, True, "final")]


def test_the_window_metrics_report_late_records_state_and_watermark_in_seconds() -> None:
    records = [rec(1.0), rec(12.0), rec(2.0), rec(13.0, "b")]
    flow = sw.Flow("metrics")
    out = (
        flow.source(sw.sources.Iterable(records))
        .with_timestamps(ts_of, name="ts")
        .key_by(key_of)
        .window(sw.windows.Tumbling(10))
        .aggregate(sw.agg.count(), name="win")
    )
    out.late().sink(sw.sinks.Collect())
    handle_box: list[sw.FlowHandle] = []
    seen: list[tuple[int, int, float]] = []

    def probe(r: Any) -> None:  # after the record at 13: a's [10, 20) and b's are open
        m = handle_box[0].metrics().operator("win")
        seen.append((m.late, m.state, m.watermark))

    out.inspect(probe).sink(sw.sinks.Collect())

    async def main() -> sw.RunResult:
        handle = sw.start(flow, clock=sw.VirtualClock(), max_batch_size=1)
        handle_box.append(handle)
        return await handle.wait()

    result = asyncio.run(main())
    assert seen, "the probe ran"
    # The record at 2 came after the watermark reached 12: late for [0, 10).
    assert result.metrics.operator("win").late == 1
    assert result.metrics.operator("ts").watermark == float("inf")  # end of input
    assert result.metrics.operator("win").state == 0  # everything flushed and freed
    # While running, the first result ([0, 10) of a, fired at watermark 12) saw:
    assert seen[0] == (0, 1, 12.0)


class ColumnSink(sw.sinks.Sink):
    """Keeps each result with the watermark column value it travelled with."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float]] = []

    async def write(self, batch: sw.Batch) -> None:
        assert batch.watermarks is not None
        self.rows.extend(
            (r.start, r.end, w / 1e6) for r, w in zip(batch.values, batch.watermarks, strict=True)
        )


@pytest.mark.parametrize(
    "assigner",
    [sw.windows.Tumbling(10), sw.windows.Sliding(10, 5), sw.windows.Sliding(10, 3)],
    ids=["tumbling", "sliding", "sliding-uneven"],
)
@pytest.mark.parametrize("batch", [1, 1024])
def test_results_carry_the_watermark_of_the_last_record_before_them(
    assigner: Any, batch: int
) -> None:
    """Windows over the results see the same watermarks however batches were cut: a
    result carries the watermark of the last record before it -- those that fire when the
    watermark jumps to 12 (after the record at 12), and those flushed at end of input,
    carry 2, the watermark the record at 12 came with, not 12 or +inf."""
    flow = sw.Flow("carry")
    sink = ColumnSink()
    (
        flow.source(sw.sources.Iterable([rec(0.0), rec(1.0), rec(2.0), rec(12.0)]))
        .with_timestamps(ts_of)
        .window(assigner)
        .aggregate(sw.agg.count())
        .sink(sink)
    )
    sw.testing.run_flow(flow, max_batch_size=batch)
    assert any(end <= 12.0 for _, end, _ in sink.rows)  # fired by the watermark 12
    assert any(end > 12.0 for _, end, _ in sink.rows)  # fired at end of input
    # ([-9, 1) of the uneven sliding windows fires earlier, before the record at 2, when
    # the record at 1 (watermark 0) was the last.)
    assert all(w == (0.0 if end <= 1.0 else 2.0) for _, end, w in sink.rows), sink.rows


@pytest.mark.parametrize(
    "assigner", [sw.windows.Tumbling(10), sw.windows.Sliding(10, 5), sw.windows.Session(3)]
)
def test_a_reduce_over_none_values_is_not_mistaken_for_an_empty_window(assigner: Any) -> None:
    """Tumbling and sliding windows keep a lone accumulator without a list around it; a
    reduce whose running value is None must still count as a window that has records."""
    calls: list[tuple[Any, Any]] = []

    def forget(a: Any, b: Any) -> None:
        calls.append((a, b))

    records = [rec(1.0, id=1), rec(2.0, id=2), rec(3.0, id=3)]
    out = windowed(records, assigner, agg=lambda w: w.reduce(forget))
    first = [r for r in out.results if r.start <= 1.0 < r.end]
    assert first
    assert all(r.value is None for r in first)  # not restarted by the record at 3
    assert (None, rec(3.0, id=3)) in calls


# -- merges: the interleaving of the inputs does not matter ------------------------------


def _diamond_or_sources(
    events: list[dict[str, Any]], shape: str, max_batch_size: int, capacity: int | None = None
) -> tuple[list[tuple[Any, ...]], list[Any]]:
    """``events`` -> with_timestamps(1.5) -> [shape] -> key_by -> Tumbling(5) -> count;
    shape "none" (straight), "diamond" (branch, then merge the branches) or "sources" (two
    sources, one per parity, merged).  Returns the results and the late records' ids."""
    flow = sw.Flow("merged")
    if shape == "sources":
        halves = [
            flow.source(sw.sources.Iterable([e for e in events if e["id"] % 3 == p]))
            .with_timestamps(ts_of, max_out_of_orderness=1.5)
            .key_by(key_of)
            for p in (0, 1, 2)
        ]
        s = halves[0].merge(*halves[1:], capacity=capacity)
    else:
        s = flow.source(sw.sources.Iterable(events)).with_timestamps(ts_of, 1.5).key_by(key_of)
        if shape == "diamond":
            a, b = s.branch(lambda e: e["id"] % 3 == 0)
            s = a.merge(b, capacity=capacity)
    out = s.window(sw.windows.Tumbling(5)).aggregate(sw.agg.count())
    results: sw.sinks.Collect[Any] = sw.sinks.Collect()
    late: sw.sinks.Collect[Any] = sw.sinks.Collect()
    out.sink(results)
    out.late().sink(late)
    sw.testing.run_flow(flow, max_batch_size=max_batch_size)
    rows = [(r.key, r.start, r.value, r.kind) for r in results.items]
    return rows, sorted(x.value["id"] for x in late.items)


def _shuffled_events(n: int = 3000, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {"id": i, "k": rng.randrange(5), "ts": round(i * 0.01 + rng.uniform(-2, 2), 3)}
        for i in range(n)
    ]


def test_a_merged_watermark_does_not_depend_on_the_batch_size() -> None:
    """Issue 13.3: branch then merge the branches gave 105 / 30 / 0 late records for
    max_batch_size 1 / 16 / 1024, and different windows; the same flow without the
    branch gives the same at every size.  Now all agree, results included."""
    events = _shuffled_events()
    straight = _diamond_or_sources(events, "none", 1024)
    assert len(straight[1]) > 50  # the input does have late records
    for size in (1, 7, 16, 1024):
        assert _diamond_or_sources(events, "diamond", size) == straight, size


def test_independent_merged_sources_give_the_same_results_at_every_batch_size() -> None:
    events = _shuffled_events(1500, seed=2)
    runs = [_diamond_or_sources(events, "sources", size) for size in (1, 7, 1024)]
    assert runs[0][1]  # some records are late
    assert runs[1] == runs[0]
    assert runs[2] == runs[0]


def _ahead_and_behind(results: sw.sinks.Collect[Any], late: sw.sinks.Collect[Any]) -> sw.Flow:
    flow = sw.Flow("ahead")
    ahead = flow.source(sw.sources.Iterable([rec(1000.0 + i) for i in range(500)]))
    behind = flow.source(ScriptedSource([(float(i), [rec(float(i), "b")]) for i in range(30)]))
    merged = ahead.with_timestamps(ts_of).merge(
        behind.with_timestamps(ts_of), capacity=50, name="merge"
    )
    out = merged.key_by(key_of).window(sw.windows.Tumbling(10)).aggregate(sw.agg.count())
    out.sink(results)
    out.late().sink(late)
    return flow


def test_an_input_far_ahead_waits_at_most_a_channel_of_records_in_the_merge() -> None:
    """A merge holds back an input that is ahead in event time (its records wait for the
    others' watermarks), but never more than its capacity: then the oldest go on, capped
    at the other inputs' watermark, and nothing is lost or late."""
    results: sw.sinks.Collect[Any] = sw.sinks.Collect()
    late: sw.sinks.Collect[Any] = sw.sinks.Collect()
    sw.testing.run_flow(_ahead_and_behind(results, late))
    got: dict[str, int] = {}
    for r in results.items:
        got[r.key] = got.get(r.key, 0) + r.value
    assert got == {"a": 500, "b": 30}
    assert late.items == []

    clock = sw.VirtualClock()

    async def stopped_midway() -> dict[str, int]:
        handle = sw.start(_ahead_and_behind(sw.sinks.Collect(), sw.sinks.Collect()), clock=clock)
        await clock.sleep(10.5)
        handle.force_stop("look inside")
        with pytest.raises(sw.FlowCancelledError) as info:
            await handle.wait()
        return info.value.unflushed

    held = asyncio.run(stopped_midway())
    assert held["operator merge"] == 50  # the rest of "ahead" went on, capped


def _window_of_final_results(
    events: list[dict[str, Any]], other: list[dict[str, Any]], max_batch_size: int
) -> list[Any]:
    flow = sw.Flow("twice")
    a = flow.source(sw.sources.Iterable(events)).with_timestamps(ts_of)
    b = flow.source(sw.sources.Iterable(other)).with_timestamps(ts_of)
    first = (
        a.merge(b)
        .key_by(key_of)
        .window(sw.windows.Tumbling(5), allowed_lateness=2.0)
        .aggregate(sw.agg.count())
    )
    second = (
        first.filter(lambda w: w.final)
        .window(sw.windows.Tumbling(10))
        .aggregate(sw.agg.sum(lambda w: w.value))
    )
    results: sw.sinks.Collect[Any] = sw.sinks.Collect()
    late: sw.sinks.Collect[Any] = sw.sinks.Collect()
    second.sink(results)
    second.late().sink(late)
    sw.testing.run_flow(flow, max_batch_size=max_batch_size)
    return [(r.key, r.start, r.value) for r in results.items] + [
        ("late", x.value.start, x.watermark) for x in late.items
    ]


def test_a_window_over_window_results_does_not_depend_on_the_batch_size() -> None:
    """A window's results carry the watermark of the record before them; the watermark
    it sends on must not be more, or whether a result is late for a window over the
    results depends on where a control message happened to fall -- on batch sizes.
    (Found by tests/test_batch_independence.py.)"""
    events, other = [rec(0.0), rec(0.5)], [rec(-0.1)]
    runs = [_window_of_final_results(events, other, size) for size in (1, 7, 1024)]
    assert runs[0] == runs[1] == runs[2]


def test_window_results_that_end_early_do_not_hold_back_a_merge_after_them() -> None:
    """A window sends on its results' (record-based) watermark; at the end of its input
    it still announces +inf, so a merge of its results with a longer stream does not
    keep that stream's records waiting for it."""
    flow = sw.Flow("ends_early")
    short = (
        flow.source(sw.sources.Iterable([rec(1.0), rec(2.0)]), name="short")
        .with_timestamps(ts_of)
        .key_by(key_of)
        .window(sw.windows.Tumbling(5))
        .aggregate(sw.agg.count())
        .map(lambda w: rec(w.start, "w"))
    )
    long = (
        flow.source(
            ScriptedSource([(float(i), [rec(float(i), "b")]) for i in range(40)]), name="long"
        )
        .with_timestamps(ts_of)
        .key_by(key_of)
    )
    out = TimedCollect()
    short.merge(long, capacity=100).sink(out)
    sw.testing.run_flow(flow)
    arrivals = [at for at, r in out.items if r["k"] == "b"]
    assert len(arrivals) == 40
    assert arrivals[20] < 21.0  # at its own pace, not held until the end
