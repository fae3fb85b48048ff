"""Windows, as properties: sluiceway agrees exactly with a deliberately simple oracle.

The oracle (tests/window_oracle.py) replays the input record by record with brute-force
window arithmetic in integer microseconds.  Over random disordered streams -- several
keys, records far behind so that they are late, all three assigners, with and without
allowed lateness, every kind of aggregation -- sluiceway's results and late records must
equal the oracle's, in order, for any cut of the input into micro-batches.  Merged inputs
combine watermarks by their minimum, and idle inputs stop holding the watermark back.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

import sluiceway as sw
from sluiceway.testing import ScriptedSource
from window_oracle import (
    TICKS,
    Late,
    Rec,
    Result,
    Session,
    Sliding,
    Tumbling,
    run_oracle,
    to_ticks,
)

KEYS = ("a", "b", "c")


def ts_of(r: dict[str, Any]) -> Any:
    return r["ts"]


def key_of(r: dict[str, Any]) -> Any:
    return r["k"]


def v_of(r: dict[str, Any]) -> Any:
    return r["v"]


def id_of(r: dict[str, Any]) -> Any:
    return r["id"]


# -- aggregations: sluiceway's and the oracle's ------------------------------------------


Items = list[tuple[int, Any]]  # (ts in ticks, record), arrival order


def _earliest(items: Items) -> Any:
    return min(enumerate(items), key=lambda p: (p[1][0], p[0]))[1][1]


def _latest(items: Items) -> Any:
    return max(enumerate(items), key=lambda p: (p[1][0], p[0]))[1][1]


def builtins_oracle(items: Items) -> dict[str, Any]:
    vs = [v_of(r) for _, r in items]
    return {
        "count": len(vs),
        "sum": sum(vs),
        "mean": sum(vs) / len(vs),
        "min": min(vs),
        "max": max(vs),
        "first": v_of(_earliest(items)),
        "last": v_of(_latest(items)),
        "ids": [id_of(r) for _, r in items],
        "distinct": len(set(vs)),
    }


def builtins(w: Any) -> Any:
    return w.aggregate(
        count=sw.agg.count(),
        sum=sw.agg.sum(v_of),
        mean=sw.agg.mean(v_of),
        min=sw.agg.min(v_of),
        max=sw.agg.max(v_of),
        first=sw.agg.first(v_of),
        last=sw.agg.last(v_of),
        ids=sw.agg.collect(id_of),
        distinct=sw.agg.count_distinct(v_of),
    )


class SumOfSquares(sw.agg.Aggregator[tuple[int, int], dict[str, int]]):
    """A user aggregator: (count, sum of squares of v); merge is used by sessions."""

    def create(self) -> tuple[int, int]:
        return (0, 0)

    def add(self, acc: tuple[int, int], value: dict[str, Any]) -> tuple[int, int]:
        return (acc[0] + 1, acc[1] + value["v"] ** 2)

    def merge(self, a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        return (a[0] + b[0], a[1] + b[1])

    def result(self, acc: tuple[int, int]) -> dict[str, int]:
        return {"n": acc[0], "squares": acc[1]}


def combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """A reduce function (commutative and associative): the same shape as a record."""
    return {
        "id": min(a["id"], b["id"]),
        "k": min(a["k"], b["k"]),
        "ts": max(a["ts"], b["ts"]),
        "v": a["v"] + b["v"],
    }


def ids_in_arrival_order(records: list[dict[str, Any]]) -> list[int]:
    return [r["id"] for r in records]


@dataclass(frozen=True)
class AggCase:
    name: str
    attach: Callable[[Any], Any]
    oracle: Callable[[Items], Any]

    def __repr__(self) -> str:
        return self.name


AGGS = [
    AggCase("builtins", builtins, builtins_oracle),
    AggCase("count", lambda w: w.aggregate(sw.agg.count()), len),
    AggCase("sum", lambda w: w.aggregate(sw.agg.sum(v_of)), lambda it: sum(v_of(r) for _, r in it)),
    AggCase("first", lambda w: w.aggregate(sw.agg.first()), _earliest),
    AggCase("last", lambda w: w.aggregate(sw.agg.last()), _latest),
    AggCase(
        "custom",
        lambda w: w.aggregate(SumOfSquares()),
        lambda it: {"n": len(it), "squares": sum(v_of(r) ** 2 for _, r in it)},
    ),
    AggCase(
        "reduce",
        lambda w: w.reduce(combine),
        lambda it: functools.reduce(combine, [r for _, r in it]),
    ),
    AggCase(
        "apply",
        lambda w: w.apply(ids_in_arrival_order),
        lambda it: ids_in_arrival_order([r for _, r in it]),
    ),
]


# -- running sluiceway --------------------------------------------------------------------


@dataclass
class Run:
    results: list[Result]
    late: list[Late]
    metrics: sw.FlowSnapshot


def as_result(r: Any) -> Result:
    assert isinstance(r, sw.WindowResult)
    return Result(r.key, to_ticks(r.start), to_ticks(r.end), r.value, r.revision, r.final, r.kind)


def as_late(x: Any) -> Late:
    assert isinstance(x, sw.LateRecord)
    return Late(
        x.value,
        x.key,
        to_ticks(x.timestamp),
        to_ticks(x.window_start),
        to_ticks(x.window_end),
        to_ticks(x.watermark) if math.isfinite(x.watermark) else x.watermark,
    )


PIPELINES = ("plain", "map", "filter", "flat_map", "key_first")
"""What stands between the source and the window: ``with_timestamps`` then ``key_by``;
or a ``map``, a ``filter`` (dropping records whose v is a multiple of 3) or a
``flat_map`` (echoing records whose v is odd) between them; or ``key_by`` first."""


def kept(r: dict[str, Any]) -> bool:
    return bool(r["v"] % 3)


def echoed(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [r, {**r, "id": r["id"] + 1000}] if r["v"] % 2 else [r]


def run_windows(
    source: sw.sources.Source,
    *,
    assigner: Any,
    bound: float,
    lateness: float,
    agg: AggCase,
    keyed: bool = True,
    max_batch_size: int = 1024,
    pipeline: str = "plain",
    early_every: float | None = None,
) -> Run:
    flow = sw.Flow("windows-property")
    stream: Any = flow.source(source)
    if keyed and pipeline == "key_first":
        stream = stream.key_by(key_of)
    stream = stream.with_timestamps(ts_of, max_out_of_orderness=bound)
    if pipeline == "map":
        stream = stream.map(dict)
    elif pipeline == "filter":
        stream = stream.filter(kept)
    elif pipeline == "flat_map":
        stream = stream.flat_map(echoed)
    if keyed and pipeline != "key_first":
        stream = stream.key_by(key_of)
    windowed = agg.attach(
        stream.window(assigner, allowed_lateness=lateness, early_every=early_every)
    )
    results: sw.sinks.Collect[Any] = sw.sinks.Collect()
    late: sw.sinks.Collect[Any] = sw.sinks.Collect()
    windowed.sink(results)
    windowed.late().sink(late)
    outcome = sw.testing.run_flow(flow, max_batch_size=max_batch_size)
    return Run(
        [as_result(r) for r in results.items], [as_late(x) for x in late.items], outcome.metrics
    )


def oracle_for(
    records: list[dict[str, Any]],
    *,
    assigner: Any,
    bound: float,
    lateness: float,
    agg: AggCase,
    keyed: bool = True,
    pipeline: str = "plain",
) -> tuple[list[Result], list[Late]]:
    recs = []
    for r in records:
        key, t = r["k"] if keyed else None, to_ticks(r["ts"])
        if pipeline == "filter" and not kept(r):
            recs.append(Rec(key, t, r, ghost=True))
        elif pipeline == "flat_map":
            first, *more = echoed(r)
            recs.append(Rec(key, t, first))
            recs.extend(Rec(key, t, x, echo=True) for x in more)
        else:
            recs.append(Rec(key, t, r))
    out = run_oracle(
        recs, bound=to_ticks(bound), assigner=assigner, lateness=to_ticks(lateness), agg=agg.oracle
    )
    return out.results, out.late


def window_operator(metrics: sw.FlowSnapshot) -> Any:
    ops = [op for op in metrics.operators if "window" in op.kind]
    assert len(ops) == 1, [(op.name, op.kind) for op in metrics.operators]
    return ops[0]


def explain(got: list[Any], expected: list[Any]) -> str:
    for i, (g, e) in enumerate(zip(got, expected, strict=False)):
        if g != e:
            return f"first difference at #{i}:\n  got      {g}\n  expected {e}"
    return f"lengths differ: got {len(got)}, expected {len(expected)}"


# -- strategies ---------------------------------------------------------------------------


@st.composite
def disordered_streams(draw: st.DrawFn, max_size: int = 40) -> list[dict[str, Any]]:
    """Small integer timestamps (windows collide), several keys, random disorder.

    Mostly a rising trend with jitter, sometimes a record far behind (late), sometimes
    complete chaos; occasionally shifted before the epoch or to a realistic epoch.
    """
    specs = draw(
        st.lists(
            st.tuples(
                st.sampled_from(KEYS),
                st.integers(-6, 6),
                st.integers(0, 9),
                st.integers(-3, 3),
            ),
            max_size=max_size,
        )
    )
    chaos = draw(st.booleans())
    shift = draw(st.sampled_from([0, 0, 0, -20, 1_700_000_000]))
    out = []
    for i, (k, jitter, roll, v) in enumerate(specs):
        if chaos:
            ts = (jitter + 6) * 3 + roll
        elif roll == 0:
            ts = max(0, i - 25)  # far behind
        else:
            ts = max(0, i + jitter)
        out.append({"id": i, "k": k, "ts": ts + shift, "v": v})
    return out


@st.composite
def assigners(draw: st.DrawFn, scale: int = TICKS) -> tuple[Any, Any]:
    """A sluiceway assigner and the oracle's equivalent; durations are multiples of
    ``1/scale`` ... in practice whole seconds (scale=TICKS) or tenths (scale=TICKS//10)."""
    unit = scale / TICKS  # seconds per step
    kind = draw(st.sampled_from(["tumbling", "sliding", "session"]))
    if kind == "tumbling":
        size = draw(st.integers(1, 10))
        offset = draw(st.integers(-3, 12))
        return (
            sw.windows.Tumbling(size * unit, offset=offset * unit),
            Tumbling(size * scale, offset * scale),
        )
    if kind == "sliding":
        size = draw(st.integers(1, 10))
        slide = draw(st.integers(1, size))
        offset = draw(st.integers(-3, 12))
        return (
            sw.windows.Sliding(size * unit, slide * unit, offset=offset * unit),
            Sliding(size * scale, slide * scale, offset * scale),
        )
    gap = draw(st.integers(1, 10))
    return sw.windows.Session(gap * unit), Session(gap * scale)


bounds = st.integers(0, 8)
latenesses = st.sampled_from([0, 0, 2, 5, 15])
aggs = st.sampled_from(AGGS)


# -- the properties -----------------------------------------------------------------------


@settings(max_examples=1500, deadline=None)
@given(
    records=disordered_streams(),
    assigner=assigners(),
    bound=bounds,
    lateness=latenesses,
    agg=aggs,
    keyed=st.booleans(),
    pipeline=st.sampled_from(PIPELINES),
)
# Found by this test once; kept so that they are tried on every run.
@example(  # a session bridge: the session earlier in time was opened later
    records=[
        {"id": 0, "k": "a", "ts": 3, "v": 0},
        {"id": 1, "k": "a", "ts": 0, "v": 0},
        {"id": 2, "k": "a", "ts": 2, "v": 0},
    ],
    assigner=(sw.windows.Session(3), Session(3 * TICKS)),
    bound=1,
    lateness=0,
    agg=AGGS[0],
    keyed=False,
    pipeline="plain",
)
@example(  # records dropped after with_timestamps move the watermark one by one
    records=[
        {"id": 0, "k": "a", "ts": 0, "v": 0},
        {"id": 1, "k": "a", "ts": 0, "v": 1},
        {"id": 2, "k": "a", "ts": 2, "v": 0},
        {"id": 3, "k": "a", "ts": 3, "v": 0},
    ],
    assigner=(sw.windows.Tumbling(1), Tumbling(TICKS)),
    bound=0,
    lateness=2,
    agg=AGGS[0],
    keyed=False,
    pipeline="filter",
)
def test_results_and_late_records_equal_the_oracle(
    records: list[dict[str, Any]],
    assigner: tuple[Any, Any],
    bound: int,
    lateness: int,
    agg: AggCase,
    keyed: bool,
    pipeline: str,
) -> None:
    mine, theirs = assigner
    run = run_windows(
        sw.sources.Iterable(records),
        assigner=mine,
        bound=bound,
        lateness=lateness,
        agg=agg,
        keyed=keyed,
        pipeline=pipeline,
    )
    expected, expected_late = oracle_for(
        records,
        assigner=theirs,
        bound=bound,
        lateness=lateness,
        agg=agg,
        keyed=keyed,
        pipeline=pipeline,
    )
    event(f"{type(mine).__name__}, {'late records' if expected_late else 'none late'}")
    for kind in sorted({r.kind for r in expected} - {"on_time"}):
        event(f"{kind} results")
    if any(not r.final for r in expected):
        event("non-final results")
    assert run.results == expected, explain(run.results, expected)
    assert run.late == expected_late, explain(run.late, expected_late)
    # Watermarks never go back: the late records' watermarks are non-decreasing.
    marks = [x.watermark for x in run.late]
    assert marks == sorted(marks)
    assert window_operator(run.metrics).late == len(expected_late)


@st.composite
def cuts(draw: st.DrawFn, n: int) -> list[int]:
    """Cut points splitting n records into chunks."""
    points = draw(st.sets(st.integers(1, max(1, n - 1)), max_size=6)) if n > 1 else set()
    return sorted(points)


@settings(max_examples=500, deadline=None)
@given(
    data=st.data(),
    records=disordered_streams(),
    assigner=assigners(),
    bound=bounds,
    lateness=latenesses,
    agg=st.sampled_from([AGGS[0], AGGS[-1]]),
    max_batch_size=st.integers(1, 7),
    pipeline=st.sampled_from(PIPELINES),
)
def test_any_batch_split_gives_the_same_result(
    data: st.DataObject,
    records: list[dict[str, Any]],
    assigner: tuple[Any, Any],
    bound: int,
    lateness: int,
    agg: AggCase,
    max_batch_size: int,
    pipeline: str,
) -> None:
    mine, theirs = assigner
    whole = run_windows(
        sw.sources.Iterable(records),
        assigner=mine,
        bound=bound,
        lateness=lateness,
        agg=agg,
        pipeline=pipeline,
    )
    points = data.draw(cuts(len(records)))
    edges = [0, *points, len(records)]
    script = [(float(i), records[a:b]) for i, (a, b) in enumerate(itertools.pairwise(edges))]
    split = run_windows(
        ScriptedSource(script),
        assigner=mine,
        bound=bound,
        lateness=lateness,
        agg=agg,
        max_batch_size=max_batch_size,
        pipeline=pipeline,
    )
    assert split.results == whole.results, explain(split.results, whole.results)
    assert split.late == whole.late
    expected, expected_late = oracle_for(
        records, assigner=theirs, bound=bound, lateness=lateness, agg=agg, pipeline=pipeline
    )
    assert whole.results == expected, explain(whole.results, expected)
    assert whole.late == expected_late


@settings(max_examples=400, deadline=None)
@given(
    tenths=st.lists(
        st.tuples(st.sampled_from(KEYS), st.integers(0, 300), st.integers(-3, 3)), max_size=30
    ),
    assigner=assigners(scale=TICKS // 10),
    bound=st.integers(0, 40),
    lateness=st.sampled_from([0, 3, 25]),
)
def test_decimal_times_are_exact(
    tenths: list[tuple[str, int, int]],
    assigner: tuple[Any, Any],
    bound: int,
    lateness: int,
) -> None:
    """Timestamps, sizes and bounds in tenths of a second (0.1, 0.3, 0.7 ...): float
    arithmetic would misplace records at window edges; microsecond arithmetic does not."""
    records = [{"id": i, "k": k, "ts": t / 10, "v": v} for i, (k, t, v) in enumerate(tenths)]
    mine, theirs = assigner
    agg = AGGS[-1]  # apply: the ids, in arrival order
    run = run_windows(
        sw.sources.Iterable(records),
        assigner=mine,
        bound=bound / 10,
        lateness=lateness / 10,
        agg=agg,
    )
    expected, expected_late = oracle_for(
        records, assigner=theirs, bound=bound / 10, lateness=lateness / 10, agg=agg
    )
    assert run.results == expected, explain(run.results, expected)
    assert run.late == expected_late, explain(run.late, expected_late)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    records=disordered_streams(max_size=25),
    assigner=assigners(),
    bound=bounds,
    lateness=latenesses,
    early_every=st.sampled_from([0.5, 1.0, 3.0]),
)
def test_early_results_only_add_partial_results(
    data: st.DataObject,
    records: list[dict[str, Any]],
    assigner: tuple[Any, Any],
    bound: int,
    lateness: int,
    early_every: float,
) -> None:
    """Records trickle in at random instants of the virtual clock.  With ``early_every``,
    the results are those without it (but for revision numbers) plus partial ones:
    ``early``, not final, before the window fires, each holding a prefix of its records."""
    instants = data.draw(st.lists(st.integers(0, 20), min_size=len(records), max_size=len(records)))
    script = [(float(at), [r]) for at, r in zip(sorted(instants), records, strict=True)]
    mine, _ = assigner
    agg = AGGS[-1]  # apply: the ids in arrival order
    kw: dict[str, Any] = {"assigner": mine, "bound": bound, "lateness": lateness, "agg": agg}
    plain = run_windows(ScriptedSource(script), **kw)
    early = run_windows(ScriptedSource(script), early_every=early_every, **kw)

    def no_revisions(results: list[Result]) -> list[Result]:
        return [r._replace(revision=0) for r in results]

    assert no_revisions([r for r in early.results if r.kind != "early"]) == no_revisions(
        plain.results
    )
    assert early.late == plain.late
    fired: set[tuple[Any, int, int]] = set()
    for r in early.results:
        window = (r.key, r.start, r.end)
        if r.kind == "early":
            event("early results")
            assert not r.final
            assert window not in fired
        else:
            fired.add(window)
    if not isinstance(mine, sw.windows.Session):  # sessions: merges renumber and reorder
        by_window: dict[tuple[Any, int, int], list[Result]] = {}
        for r in early.results:
            by_window.setdefault((r.key, r.start, r.end), []).append(r)
        for results in by_window.values():
            assert [r.revision for r in results] == list(range(len(results)))
            last = results[-1].value
            assert all(r.value == last[: len(r.value)] for r in results)


# -- several inputs -------------------------------------------------------------------------


@st.composite
def orderly_input(draw: st.DrawFn, index: int) -> tuple[float, list[dict[str, Any]], list[float]]:
    """One input of a merge: its bound, its records -- each within the bound of the
    input's own watermark, so none is late for that input alone -- and delivery instants
    for chunks of them.  Some inputs run far ahead in event time."""
    bound = draw(st.integers(0, 6))
    base = draw(st.sampled_from([0, 0, 1000]))
    n = draw(st.integers(0, 15))
    out: list[dict[str, Any]] = []
    top: int | None = None
    for i in range(n):
        ts = (
            base + draw(st.integers(0, 5))
            if top is None
            else top - bound + draw(st.integers(0, bound + 4))
        )
        top = ts if top is None else max(top, ts)
        out.append({"id": index * 100 + i, "k": draw(st.sampled_from(KEYS)), "ts": ts, "v": i})
    instants = sorted(draw(st.lists(st.integers(0, 30), min_size=n, max_size=n)))
    return bound, out, [float(x) for x in instants]


def merged_agg(w: Any) -> Any:
    return w.aggregate(count=sw.agg.count(), sum=sw.agg.sum(v_of), ids=sw.agg.collect(id_of))


def merged_oracle(items: Items) -> dict[str, Any]:
    return {
        "count": len(items),
        "sum": sum(v_of(r) for _, r in items),
        "ids": sorted(id_of(r) for _, r in items),
    }


def run_merged(
    inputs: list[tuple[float, list[dict[str, Any]], list[float]]],
    assigner: Any,
    linger: float,
    lateness: float = 0,
) -> Run:
    flow = sw.Flow("merged")
    streams = []
    for j, (bound, records, instants) in enumerate(inputs):
        script: list[tuple[float, list[Any]]] = [
            (t, [r]) for t, r in zip(instants, records, strict=True)
        ]
        script.append((linger, []))  # stay open (delivering nothing) until then
        streams.append(
            flow.source(ScriptedSource(script), name=f"in{j}").with_timestamps(
                ts_of, max_out_of_orderness=bound
            )
        )
    windowed = merged_agg(
        streams[0].merge(*streams[1:]).key_by(key_of).window(assigner, allowed_lateness=lateness)
    )
    results: sw.sinks.Collect[Any] = sw.sinks.Collect()
    late: sw.sinks.Collect[Any] = sw.sinks.Collect()
    windowed.sink(results)
    windowed.late().sink(late)
    outcome = sw.testing.run_flow(flow)
    return Run(
        [as_result(r) for r in results.items], [as_late(x) for x in late.items], outcome.metrics
    )


def normalized(results: list[Result]) -> list[Result]:
    out = [r._replace(value={**r.value, "ids": sorted(r.value["ids"])}) for r in results]
    return sorted(out, key=lambda r: (str(r.key), r.start, r.end, r.revision))


@settings(max_examples=250, deadline=None)
@given(
    data=st.data(),
    n_inputs=st.integers(2, 3),
    assigner=assigners(),
    linger=st.sampled_from([0.0, 50.0]),
    lateness=st.sampled_from([0, 3]),
)
def test_merged_inputs_lose_nothing_to_lateness(
    data: st.DataObject, n_inputs: int, assigner: tuple[Any, Any], linger: float, lateness: int
) -> None:
    inputs = [data.draw(orderly_input(j)) for j in range(n_inputs)]
    mine, theirs = assigner
    run = run_merged(inputs, mine, linger, lateness)
    union = [Rec(r["k"], to_ticks(r["ts"]), r) for _, records, _ in inputs for r in records]
    # The union with an infinite bound: every window collects all of its records.
    expected = run_oracle(
        union, bound=10**18, assigner=theirs, lateness=to_ticks(lateness), agg=merged_oracle
    )
    assert run.late == []
    assert window_operator(run.metrics).late == 0
    # No record was behind the watermark: each window fires once, on time, then (with
    # allowed lateness) closes; its final result holds all of its records.
    assert normalized(run.results) == normalized(expected.results)
    kinds = ["on_time"] if lateness == 0 else ["on_time", "final"]
    by_window: dict[tuple[Any, int, int], list[Result]] = {}
    for r in run.results:
        by_window.setdefault((r.key, r.start, r.end), []).append(r)
    for results in by_window.values():
        assert [r.kind for r in results] == kinds
        assert [r.final for r in results] == [False] * (len(kinds) - 1) + [True]


@pytest.mark.parametrize("fast_ends_early", [True, False])
def test_a_fast_input_does_not_make_a_slow_one_late(fast_ends_early: bool) -> None:
    """Input A runs 1000 s ahead in event time and delivers everything first; input B
    trickles in afterwards.  With the merged watermark the minimum of the inputs', none
    of B is late; with anything larger (the maximum, the latest record's), all of it is."""
    fast = [{"id": 100 + i, "k": "a", "ts": 1000 + i, "v": 1} for i in range(10)]
    slow = [{"id": 200 + i, "k": "b", "ts": i, "v": 1} for i in range(20)]
    linger = 0.0 if fast_ends_early else 100.0
    inputs = [
        (0.0, fast, [0.0] * len(fast)),
        (0.0, slow, [1.0 + i for i in range(len(slow))]),
    ]
    run = run_merged(inputs, sw.windows.Tumbling(5), linger)
    assert run.late == []
    got = {(r.key, r.start // TICKS): r.value["count"] for r in run.results}
    assert got == {("a", 1000): 5, ("a", 1005): 5, **{("b", s): 5 for s in (0, 5, 10, 15)}}


# -- idle inputs ----------------------------------------------------------------------------


TimedCollect = sw.testing.TimedCollect


def run_idle_scenario(
    a_script: list[tuple[float, list[int]]], idle_timeout: float | None, b_until: int = 250
) -> tuple[dict[tuple[str, float], float], list[Any]]:
    """Input A (key "a") follows ``a_script`` of (instant, timestamps); input B (key "b")
    delivers one record a second with timestamp = clock instant until ``b_until``.
    Returns when each window's first result came out, by (key, start), and the late ones."""
    flow = sw.Flow("idle")
    a_src = ScriptedSource([(at, [{"k": "a", "ts": t} for t in stamps]) for at, stamps in a_script])
    b_src = ScriptedSource([(float(c), [{"k": "b", "ts": c}]) for c in range(b_until + 1)])
    a = flow.source(a_src, name="a").with_timestamps(ts_of, idle_timeout=idle_timeout)
    b = flow.source(b_src, name="b").with_timestamps(ts_of)
    windowed = a.merge(b).key_by(key_of).window(sw.windows.Tumbling(10)).aggregate(sw.agg.count())
    results = TimedCollect()
    late: sw.sinks.Collect[Any] = sw.sinks.Collect()
    windowed.sink(results)
    windowed.late().sink(late)
    sw.testing.run_flow(flow)
    when: dict[tuple[str, float], float] = {}
    for at, r in results.items:
        when.setdefault((r.key, r.start), at)
    return when, late.items


@pytest.mark.parametrize("timeout", [10.0, 30.0])
def test_an_idle_input_stops_holding_the_watermark_back(timeout: float) -> None:
    script = [(0.0, [0, 1, 2, 3]), (200.0, [4])]
    when, late = run_idle_scenario(script, timeout)
    # B's window [10, 20) closes once A has been quiet for `timeout` (A's watermark is 3),
    # not when A comes back at 200.
    assert max(20.0, timeout) <= when[("b", 10.0)] < max(20.0, timeout) + 5
    assert when[("b", 100.0)] < 115
    # A comes back at 200 with a record for [0, 10), long closed: it is late, and the
    # merged watermark did not go back to A's.
    assert [(x.value["ts"], x.window_end) for x in late] == [(4, 10.0)]
    assert 190 <= late[0].watermark <= 200


def test_without_idle_timeout_a_quiet_input_holds_the_watermark() -> None:
    script = [(0.0, [0, 1, 2, 3]), (200.0, [4])]
    when, late = run_idle_scenario(script, None)
    assert when[("b", 10.0)] >= 200
    assert late == []
    assert when[("a", 0.0)] >= 200  # A's record at 4 made it into its window


def test_an_idle_input_holds_the_watermark_again_from_its_next_record() -> None:
    # A: quiet from 0 (idle at 30), back at 60 with timestamp 45, quiet again (idle at 90).
    script = [(0.0, [0, 1, 2, 3]), (60.0, [45]), (300.0, [46])]
    when, _ = run_idle_scenario(script, 30.0)
    assert 30 <= when[("b", 10.0)] < 35
    # Back at 60, A holds the watermark at 45: B's [60, 70) waits until A is idle again.
    assert 90 <= when[("b", 60.0)] < 95
