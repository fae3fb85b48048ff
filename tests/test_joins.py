"""Joins: the builder's checks and the behaviour the property tests do not single out."""

from __future__ import annotations

import gc
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sluiceway as sw
from sluiceway.core.messages import Batch
from sluiceway.joins.base import _watermarks, gc_paused
from sluiceway.testing import ScriptedSource, run_watched


def keyed(flow: sw.Flow, items: list[Any], *, timed: bool = True, key: bool = True) -> Any:
    s: Any = flow.source(sw.sources.Iterable(items))
    if timed:
        s = s.with_timestamps(lambda r: r[1])
    return s.key_by(lambda r: r[0]) if key else s


def test_an_input_without_keys_is_refused_naming_the_side() -> None:
    flow = sw.Flow("f")
    left = keyed(flow, [("a", 1)])
    right = keyed(flow, [("a", 1)], key=False)
    with pytest.raises(sw.FlowDefinitionError, match=r"right input.*no keys.*key_by"):
        left.window_join(right, sw.windows.Tumbling(10))


def test_an_input_without_timestamps_is_refused_naming_the_side() -> None:
    flow = sw.Flow("f")
    left = keyed(flow, [("a", 1)], timed=False)
    right = keyed(flow, [("a", 1)])
    with pytest.raises(sw.FlowDefinitionError, match=r"left input.*no event time.*with_timestamps"):
        left.interval_join(right, lower=0, upper=1)


def test_bad_options_are_refused_with_the_value() -> None:
    flow = sw.Flow("f")
    left, right = keyed(flow, [("a", 1)]), keyed(flow, [("a", 1)])
    with pytest.raises(ValueError, match="'outer'"):
        left.window_join(right, sw.windows.Tumbling(10), how="outer")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Tumbling"):
        left.window_join(right, 10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"lower \(3\) must be <= upper \(1\)"):
        left.interval_join(right, lower=3, upper=1)
    with pytest.raises(ValueError, match="allowed_lateness"):
        left.interval_join(right, lower=0, upper=1, allowed_lateness=-1)
    with pytest.raises(TypeError, match="keyed stream"):
        left.interval_join([1, 2], lower=0, upper=1)
    with pytest.raises(sw.FlowDefinitionError, match="itself"):
        left.interval_join(left, lower=0, upper=1)
    other = keyed(sw.Flow("g"), [("a", 1)])
    with pytest.raises(sw.FlowDefinitionError, match="belongs to flow 'g'"):
        left.interval_join(other, lower=0, upper=1)


def test_a_full_outer_window_join_emits_unmatched_rows_when_the_window_closes() -> None:
    flow = sw.Flow("f")
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    left = keyed(flow, [("a", 1), ("b", 2), ("a", 25)])
    right = keyed(flow, [("a", 4), ("c", 5), ("a", 28)])
    left.window_join(right, sw.windows.Tumbling(10), how="full").sink(out)
    sw.testing.run_flow(flow)
    assert out.items == [
        (("a", 1), ("a", 4)),
        (("b", 2), None),
        (None, ("c", 5)),
        (("a", 25), ("a", 28)),
    ]


def test_late_join_inputs_go_to_the_side_output() -> None:
    flow = sw.Flow("f")
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    late: sw.sinks.Collect[Any] = sw.sinks.Collect()
    left = keyed(flow, [("a", 10), ("a", 3)])  # 3 arrives after the watermark reached 10
    right = keyed(flow, [("a", 4)])
    joined = left.interval_join(right, lower=-2, upper=2)
    joined.sink(out)
    joined.late().sink(late)
    result = sw.testing.run_flow(flow)
    assert out.items == []
    assert late.items == [sw.joins.LateJoinRecord(("a", 3), "a", "left", 3.0, 10.0)]
    assert late.items[0].lateness == 7.0
    (op,) = [o for o in result.metrics.operators if o.kind == "interval_join"]
    assert op.late == 1


def test_late_records_without_a_late_output_are_counted_and_warned_of_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The side-output handling joins share with window operators (operators/late.py)."""
    flow = sw.Flow("f")
    left = keyed(flow, [("a", 10), ("a", 3), ("a", 2)])  # 3 and 2: late, in two batches
    right = keyed(flow, [("a", 4)])
    left.interval_join(right, lower=-2, upper=2, name="ij").sink(sw.sinks.Collect())
    left.window(sw.windows.Tumbling(5.0)).aggregate(sw.agg.count(), name="w").sink(
        sw.sinks.Collect()
    )
    with caplog.at_level(logging.WARNING, logger="sluiceway"):
        result = sw.testing.run_flow(flow, max_batch_size=1)
    late = {o.name: o.late for o in result.metrics.operators if o.late}
    assert late == {"ij": 2, "w": 2}
    assert sorted(r.getMessage() for r in caplog.records) == [
        f"{what} {name!r} in flow 'f' dropped late records (counted in its 'late' metric); "
        "add .late() to its results to receive them"
        for what, name in (("join", "ij"), ("window operator", "w"))
    ]


def test_a_processing_time_temporal_join_takes_the_latest_row_on_arrival() -> None:
    flow = sw.Flow("f")
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    orders = flow.source(
        ScriptedSource(
            [(1.0, [("EUR", 10)]), (3.0, [("EUR", 20), ("GBP", 1)]), (5.0, [("EUR", 30)])]
        )
    ).key_by(lambda r: r[0])
    rates = flow.source(
        ScriptedSource([(0.0, [("EUR", 1.1)]), (2.0, [("EUR", 1.2)]), (4.0, [("EUR", None)])])
    ).key_by(lambda r: r[0])
    orders.temporal_join(
        rates, time="processing", how="left", is_delete=lambda r: r[1] is None
    ).sink(out)
    result = sw.testing.run_flow(flow)
    assert out.items == [
        (("EUR", 10), ("EUR", 1.1)),
        (("EUR", 20), ("EUR", 1.2)),
        (("GBP", 1), None),
        (("EUR", 30), None),
    ]
    (op,) = [o for o in result.metrics.operators if o.kind == "temporal_join_latest"]
    assert op.state == 0  # the deletion removed the only row


def test_a_processing_time_temporal_join_refuses_allowed_lateness() -> None:
    flow = sw.Flow("f")
    left, right = keyed(flow, [("a", 1)]), keyed(flow, [("a", 1)])
    with pytest.raises(TypeError, match="allowed_lateness"):
        left.temporal_join(right, time="processing", allowed_lateness=1)


class Directory:
    """An external system: counts the calls per key; fails the first ``flaky`` calls."""

    def __init__(self, rows: dict[str, Any], flaky: int = 0) -> None:
        self.rows = rows
        self.calls: list[str] = []
        self.flaky = flaky

    async def __call__(self, key: str) -> Any:
        self.calls.append(key)
        if self.flaky:
            self.flaky -= 1
            raise ConnectionError("directory unavailable")
        return self.rows.get(key)


def test_a_lookup_join_answers_from_its_cache_until_the_ttl_since_the_write() -> None:
    directory = Directory({"c1": "Ada", "c2": "Grace"})
    script = [
        (0.0, [("c1", 1), ("c9", 2)]),
        (5.0, [("c1", 3), ("c9", 4)]),  # cached (written at 0, ttl 10)
        (12.0, [("c1", 5)]),  # written at 0: expired, fetched again
    ]
    items = sw.testing.run_collect(
        lambda s: s.key_by(lambda r: r[0]).lookup_join(directory, ttl=10),
        ScriptedSource(script),
    )
    assert items == [
        (("c1", 1), "Ada"),
        (("c9", 2), None),
        (("c1", 3), "Ada"),
        (("c9", 4), None),
        (("c1", 5), "Ada"),
    ]
    assert directory.calls == ["c1", "c9", "c1"]


def test_a_lookup_join_cache_holds_at_most_cache_size_rows() -> None:
    directory = Directory({"a": 1, "b": 2, "c": 3})
    script = [(float(i), [k]) for i, k in enumerate("abcab")]
    items = sw.testing.run_collect(
        lambda s: s.key_by(str).lookup_join(directory, cache_size=2, ttl=None, how="inner"),
        ScriptedSource(script),
    )
    assert items == [("a", 1), ("b", 2), ("c", 3), ("a", 1), ("b", 2)]
    assert directory.calls == ["a", "b", "c", "a", "b"]  # "a" and then "b" were evicted


def test_a_lookup_join_retries_and_drops_missing_rows_when_inner() -> None:
    directory = Directory({"c1": "Ada"}, flaky=1)
    items = sw.testing.run_collect(
        lambda s: s.key_by(lambda r: r[0]).lookup_join(
            directory, how="inner", on_error=sw.Retry(3)
        ),
        [("c1", 1), ("c2", 2), ("c1", 3)],
    )
    assert items == [(("c1", 1), "Ada"), (("c1", 3), "Ada")]


def test_a_lookup_join_needs_an_async_fetch_and_keys() -> None:
    flow = sw.Flow("f")
    s = flow.source(sw.sources.Iterable([1]))
    with pytest.raises(TypeError, match="async function fetch"):
        s.key_by(str).lookup_join(lambda k: k)  # type: ignore[arg-type,return-value]
    with pytest.raises(AttributeError):
        s.lookup_join  # type: ignore[attr-defined]  # noqa: B018 - only on keyed streams


@pytest.mark.slow
def test_a_lookup_join_ttl_on_the_system_clock() -> None:
    directory = Directory({"c1": "Ada"})
    flow = sw.Flow("f")
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    at = sw.SystemClock().monotonic()
    source = ScriptedSource([(at, ["c1"]), (at + 0.01, ["c1"]), (at + 0.3, ["c1"])])
    flow.source(source).key_by(str).lookup_join(directory, ttl=0.2).sink(out)
    result = run_watched(flow, run_for=2.0)
    assert not result.stopped  # it ended by itself
    assert out.items == [("c1", "Ada")] * 3
    assert directory.calls == ["c1", "c1"]


def test_every_example_on_the_joins_page_runs() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "joins.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    assert len(blocks) == 7  # window, interval, as-of, temporal (event, processing), lookup, why
    for block in blocks:
        exec(block, {})  # each asserts its own output


def test_a_lookup_join_makes_one_call_per_key_in_flight() -> None:
    directory = Directory({"c1": "Ada"})
    items = sw.testing.run_collect(
        lambda s: s.key_by(str).lookup_join(directory, concurrency=8), ["c1", "c1", "c2", "c1"]
    )
    assert items == [("c1", "Ada"), ("c1", "Ada"), ("c2", None), ("c1", "Ada")]
    assert directory.calls == ["c1", "c2"]


def test_an_idle_input_stops_holding_the_join_watermark_back() -> None:
    flow = sw.Flow("f")
    out = sw.testing.TimedCollect()
    # The left input sends one record, then nothing until t=30 (without ending).
    left = (
        flow.source(ScriptedSource([(0.0, [("a", 5)]), (30.0, [("a", 40)])]))
        .with_timestamps(lambda r: r[1], idle_timeout=1.0)
        .key_by(lambda r: r[0])
    )
    right = (
        flow.source(ScriptedSource([(float(t), [("a", t)]) for t in range(20)]))
        .with_timestamps(lambda r: r[1])
        .key_by(lambda r: r[0])
    )
    left.asof_join(right).sink(out)
    sw.testing.run_flow(flow)
    (at, pair), (_, last) = out.items
    assert pair == (("a", 5), ("a", 5))
    assert at < 30  # answered once the right input's watermark passed 5, not at t=30
    assert last == (("a", 40), ("a", 19))


@given(
    ts=st.lists(st.integers(0, 60), min_size=1, max_size=12),
    base=st.integers(-10, 60),
    bound=st.integers(0, 8),
    lateness=st.integers(0, 8),
    implicit=st.booleans(),
)
def test_a_batch_skips_the_lateness_test_only_when_none_of_its_records_is_late(
    ts: list[int], base: int, bound: int, lateness: int, implicit: bool
) -> None:
    """A join's input batch: the watermark column, None only when no record can be late
    by the test every join applies (``t + lateness < watermark``), and the watermark
    before its last record -- whether the batch carries the column or its implicit form."""
    column = Batch(ts, ts, ts, watermark_base=(base, bound)).watermarks
    assert column is not None
    batch = (
        Batch(ts, ts, ts, watermark_base=(base, bound)) if implicit else Batch(ts, ts, ts, column)
    )
    wms, last = _watermarks(batch, ts, lateness)
    assert last == column[-1]
    # Skipped when the earliest record is not late against the highest watermark.
    assert (wms is None) == (min(ts) + lateness >= max(column))
    if wms is None:
        assert not any(t + lateness < w for t, w in zip(ts, column, strict=True))
    else:
        assert wms == column


def test_a_join_pauses_the_garbage_collector_only_while_it_makes_results() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError), gc_paused():
        raise KeyError("x")
    assert gc.isenabled()  # even when the results fail
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # the user's choice stays
    finally:
        gc.enable()


async def _fetch(key: Any) -> Any:
    return key


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda a, b: a.window_join(b, sw.windows.Tumbling(1), how="right"),
            "window_join(how=...) must be 'inner', 'left' or 'full', got 'right'",
        ),
        (
            lambda a, b: a.interval_join(b, lower=0, upper=1, how="full"),
            "interval_join(how=...) must be 'inner' or 'left', got 'full'",
        ),
        (
            lambda a, b: a.asof_join(b, how="full"),
            "asof_join(how=...) must be 'inner' or 'left', got 'full'",
        ),
        (
            lambda a, b: a.temporal_join(b, how="full"),
            "temporal_join(how=...) must be 'inner' or 'left', got 'full'",
        ),
        (
            lambda a, b: a.temporal_join(b, time="wall"),
            "temporal_join(time=...) must be 'event' or 'processing', got 'wall'",
        ),
        (
            lambda a, b: a.lookup_join(_fetch, how="full"),
            "lookup_join(how=...) must be 'inner' or 'left', got 'full'",
        ),
    ],
)
def test_every_join_refuses_a_bad_choice_quoting_it_and_the_choices(
    call: Any, message: str
) -> None:
    flow = sw.Flow("f")
    left, right = keyed(flow, [("a", 1)]), keyed(flow, [("a", 1)])
    with pytest.raises(ValueError, match=re.escape(message)):
        call(left, right)
