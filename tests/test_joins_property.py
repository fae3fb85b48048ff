"""Joins, as properties: sluiceway agrees with a brute-force oracle (tests/join_oracle.py).

Two random disordered keyed inputs -- records far behind so that they are late, several
keys -- are cut into random micro-batches that arrive at random instants of the virtual
clock, so the two inputs interleave differently on every example.  The results (with
their keys and event times) and the late records must equal the oracle's, which knows
nothing of batches or interleaving: in order where docs/joins.md promises an order, as a
multiset where results leave as pairs arrive (interval join).  The as-of join and the
event-time temporal join share the same oracle (a temporal join is an as-of join without
tolerance whose match may be a deletion).
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import event, given, settings
from hypothesis import strategies as st

import sluiceway as sw
from join_oracle import In, Out, asof_oracle, interval_oracle, window_oracle
from sluiceway.connectors.base import Sink
from sluiceway.testing import ScriptedSource
from window_oracle import TICKS

KEYS = ("a", "b", "c")


def ts_of(r: dict[str, Any]) -> Any:
    return r["ts"]


def key_of(r: dict[str, Any]) -> Any:
    return r["k"]


class Tapped(Sink):
    """Keeps (key, value, event time in ticks) of every record."""

    def __init__(self) -> None:
        self.items: list[Out] = []

    async def write(self, batch: sw.Batch) -> None:
        assert batch.keys is not None
        assert batch.timestamps is not None
        self.items.extend(
            Out(k, v, t) for k, v, t in zip(batch.keys, batch.values, batch.timestamps, strict=True)
        )


@st.composite
def disordered(draw: st.DrawFn, first_id: int, max_size: int = 18) -> list[dict[str, Any]]:
    """A rising trend with jitter, now and then a record far behind (late)."""
    specs = draw(
        st.lists(
            st.tuples(st.sampled_from(KEYS), st.integers(-4, 4), st.integers(0, 7)),
            max_size=max_size,
        )
    )
    out = []
    for i, (k, jitter, roll) in enumerate(specs):
        ts = max(0, i - 12) if roll == 0 else max(0, i + jitter)
        out.append({"id": first_id + i, "k": k, "ts": ts, "v": i})
    return out


@st.composite
def scripts(draw: st.DrawFn, records: list[dict[str, Any]]) -> list[tuple[float, list[Any]]]:
    """``records`` cut into chunks, each arriving at a random (rising) instant."""
    n = len(records)
    points = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=5))) if n > 1 else []
    edges = [0, *points, n]
    at = 0.0
    out = []
    for a, b in itertools.pairwise(edges):
        at += draw(st.integers(0, 3))
        out.append((at, records[a:b]))
    return out


def inputs(records: list[dict[str, Any]]) -> list[In]:
    return [In(r["k"], r["ts"] * TICKS, r) for r in records]


def run_join(
    data: st.DataObject,
    left: list[dict[str, Any]],
    right: list[dict[str, Any]],
    bounds: tuple[int, int],
    join: Any,
) -> tuple[list[Out], list[tuple[str, Any]], sw.RunResult]:
    flow = sw.Flow("join-property")
    sides = [
        flow.source(ScriptedSource(data.draw(scripts(records))))
        .with_timestamps(ts_of, max_out_of_orderness=bound)
        .key_by(key_of)
        for records, bound in zip((left, right), bounds, strict=True)
    ]
    joined = join(*sides)
    out = Tapped()
    late: sw.sinks.Collect[Any] = sw.sinks.Collect()
    joined.sink(out)
    joined.late().sink(late)
    result = sw.testing.run_flow(flow, max_batch_size=data.draw(st.integers(1, 6)))
    for x in late.items:
        assert isinstance(x, sw.joins.LateJoinRecord)
        assert x.timestamp == x.value["ts"]
        assert x.key == x.value["k"]
    return out.items, [(x.side, x.value) for x in late.items], result


def by_side(late: list[tuple[str, Any]]) -> list[list[Any]]:
    return [[v for s, v in late if s == side] for side in ("left", "right")]


def join_metrics(result: sw.RunResult) -> Any:
    (op,) = [op for op in result.metrics.operators if op.kind.endswith("join")]
    return op


def pair_ids(o: Out) -> tuple[int, int]:
    a, b = o.value
    return (-1 if a is None else a["id"], -1 if b is None else b["id"])


streams = disordered(0)
right_streams = disordered(1000)
bounds = st.tuples(st.integers(0, 4), st.integers(0, 4))
latenesses = st.sampled_from([0, 0, 2, 5])


@settings(max_examples=400, deadline=None)
@given(
    data=st.data(),
    left=streams,
    right=right_streams,
    bnds=bounds,
    lateness=latenesses,
    kind=st.sampled_from(["tumbling", "sliding", "session"]),
    how=st.sampled_from(["inner", "left", "full"]),
    size=st.integers(1, 6),
    offset=st.integers(-2, 5),
)
def test_window_join_equals_the_oracle(
    data: st.DataObject,
    left: list[dict[str, Any]],
    right: list[dict[str, Any]],
    bnds: tuple[int, int],
    lateness: int,
    kind: str,
    how: str,
    size: int,
    offset: int,
) -> None:
    slide = data.draw(st.integers(1, size)) if kind == "sliding" else None
    assigner: Any
    if kind == "tumbling":
        assigner = sw.windows.Tumbling(size, offset=offset)
    elif kind == "sliding":
        assigner = sw.windows.Sliding(size, slide, offset=offset)
    else:
        assigner = sw.windows.Session(size)
    got, got_late, result = run_join(
        data,
        left,
        right,
        bnds,
        lambda a, b: a.window_join(b, assigner, how=how, allowed_lateness=lateness),
    )
    expected, expected_late = window_oracle(
        inputs(left),
        inputs(right),
        bounds=(bnds[0] * TICKS, bnds[1] * TICKS),
        size=size * TICKS,
        slide=None if slide is None else slide * TICKS,
        offset=offset * TICKS,
        gap=size * TICKS if kind == "session" else None,
        how=how,
        lateness=lateness * TICKS,
    )
    event(f"{kind} {how}: {'late records' if expected_late else 'none late'}")
    assert got == expected
    assert by_side(got_late) == by_side(expected_late)
    m = join_metrics(result)
    assert m.late == len(expected_late)
    assert m.state == 0  # everything closed at the end of input
    assert m.records_out == len(expected)


@settings(max_examples=400, deadline=None)
@given(
    data=st.data(),
    left=streams,
    right=right_streams,
    bnds=bounds,
    lateness=latenesses,
    lower=st.integers(-4, 3),
    width=st.integers(0, 5),
    how=st.sampled_from(["inner", "left"]),
)
def test_interval_join_equals_the_oracle(
    data: st.DataObject,
    left: list[dict[str, Any]],
    right: list[dict[str, Any]],
    bnds: tuple[int, int],
    lateness: int,
    lower: int,
    width: int,
    how: str,
) -> None:
    upper = lower + width
    got, got_late, result = run_join(
        data,
        left,
        right,
        bnds,
        lambda a, b: a.interval_join(
            b, lower=lower, upper=upper, how=how, allowed_lateness=lateness
        ),
    )
    expected, expected_late = interval_oracle(
        inputs(left),
        inputs(right),
        bounds=(bnds[0] * TICKS, bnds[1] * TICKS),
        lower=lower * TICKS,
        upper=upper * TICKS,
        how=how,
        lateness=lateness * TICKS,
    )
    event(f"{how}: {len(expected)} results, {'late' if expected_late else 'none late'}")
    assert sorted(got, key=pair_ids) == sorted(expected, key=pair_ids)
    assert by_side(got_late) == by_side(expected_late)
    assert join_metrics(result).state == 0


def deleted(r: dict[str, Any]) -> bool:
    return r["v"] % 4 == 0


@settings(max_examples=400, deadline=None)
@given(
    data=st.data(),
    left=streams,
    right=right_streams,
    bnds=bounds,
    lateness=latenesses,
    tolerance=st.sampled_from([None, 0, 1, 3, 6]),
    how=st.sampled_from(["inner", "left"]),
    temporal=st.booleans(),
)
def test_asof_and_temporal_joins_equal_the_oracle(
    data: st.DataObject,
    left: list[dict[str, Any]],
    right: list[dict[str, Any]],
    bnds: tuple[int, int],
    lateness: int,
    tolerance: int | None,
    how: str,
    temporal: bool,
) -> None:
    if temporal:
        tolerance = None

        def join(a: Any, b: Any) -> Any:
            return a.temporal_join(b, is_delete=deleted, how=how, allowed_lateness=lateness)
    else:

        def join(a: Any, b: Any) -> Any:
            return a.asof_join(b, tolerance=tolerance, how=how, allowed_lateness=lateness)

    got, got_late, result = run_join(data, left, right, bnds, join)
    expected, expected_late = asof_oracle(
        inputs(left),
        inputs(right),
        bounds=(bnds[0] * TICKS, bnds[1] * TICKS),
        tolerance=None if tolerance is None else tolerance * TICKS,
        how=how,
        lateness=lateness * TICKS,
        is_delete=deleted if temporal else None,
    )
    matched = sum(1 for o in expected if o.value[1] is not None)
    event(f"{'temporal' if temporal else 'as-of'} {how}: {'some' if matched else 'no'} matches")
    assert got == expected
    assert by_side(got_late) == by_side(expected_late)
    m = join_metrics(result)
    assert m.late == len(expected_late)
    assert m.records_out == len(expected)
