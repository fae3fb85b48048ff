"""Incremental snapshots of windows and joins (issue 20): their change sets fold into
exactly the whole state at every point, and a restore from the folded chain goes on as
if never interrupted.

Each example feeds the same random script -- batches of disordered records (some far
behind: late), watermarks that fire and close windows or expire join buffers, session
merges, early firings -- to two copies of one operator: one that takes change sets
(``accept_changes(True)``, as under a durable checkpoint store) and one that snapshots
whole.  At every snapshot point the chain of change sets folded onto its base
(``fold_incremental``) must equal the whole snapshot; a third copy restored from the
fold (pickled, as from the store) must give the same output from there on, and its own
later change sets must fold to the whole state too.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import sluiceway as sw
from sluiceway.core.delta import Changes, Incremental, fold_incremental
from sluiceway.core.messages import Batch, Control, Watermark
from sluiceway.joins.asof import AsOfJoinSpec, TemporalJoinSpec
from sluiceway.joins.interval import IntervalJoinSpec
from sluiceway.joins.latest import LatestJoinSpec
from sluiceway.joins.window import WindowJoinSpec
from sluiceway.metrics.registry import OperatorMetrics
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.windows.operator import Aggregation, WindowSpec

S = 1_000_000  # ticks per second
BOUND = 3 * S  # how far a record's watermark trails the largest time before it


class Capture(Step):
    def __init__(self) -> None:
        super().__init__("capture", OperatorMetrics("capture", "sink", 0))
        self.rows: list[Any] = []

    async def push(self, batch: Batch) -> None:
        self.rows.extend(batch.values)

    async def control(self, message: Control) -> None:
        pass


class Op:
    """One operator under test with its outputs (results and late records)."""

    def __init__(self, make: Callable[[], OpSpec], accept: bool) -> None:
        spec = make()
        late = hasattr(spec, "late_output")
        if late:
            spec.late_output = True  # type: ignore[attr-defined]
        clock = sw.VirtualClock()
        self.step = spec.build(
            BuildContext("t", "op", clock, OperatorMetrics("op", spec.kind, 0), None, 64)
        )
        self.out = Capture()
        self.late = Capture()
        self.step.children.append(self.out)
        if late:
            self.step.children.append(self.late)
        self.step.accept_changes(accept)
        self.start = (0, 0)  # (a restored copy) the reference's outputs before it

    def outputs(self, since: tuple[int, int] = (0, 0)) -> list[Any]:
        """Results, then late records (from ``since``: how many of each to skip)."""
        return [*self.out.rows[since[0] :], *(("late", x) for x in self.late.rows[since[1] :])]


def only(inc: Incremental) -> Changes:
    (changes,) = inc.partitions.values()
    return changes


def same_state(folded: Incremental, whole: Incremental) -> None:
    a, b = only(folded), only(whole)
    assert a.whole
    assert b.whole
    assert a.upserts == b.upserts
    assert a.extra == b.extra


# -- scripts ------------------------------------------------------------------------------


def records() -> Any:
    """A batch: (key, second) pairs; a record is mostly near the trend, sometimes far
    behind (late)."""
    return st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 25)), min_size=1, max_size=6)


def script(sides: int) -> Any:
    step = st.one_of(
        st.tuples(st.just("rec"), st.integers(0, sides - 1), records()),
        st.tuples(st.just("wm"), st.integers(0, sides - 1), st.integers(0, 30)),
        st.tuples(st.just("snap"), st.just(0), st.just(None)),
        st.tuples(st.just("early"), st.just(0), st.just(None)),
    )
    return st.lists(step, min_size=1, max_size=40)


class Feeder:
    """Turns a script into batches and watermarks per input, the same for every copy."""

    def __init__(self, sides: int) -> None:
        self.hi = [-float("inf")] * sides  # per input: the largest time so far
        self.next_id = 0

    def batch(self, side: int, recs: list[tuple[str, int]]) -> Batch:
        values, ts, keys, wms = [], [], [], []
        for k, sec in recs:
            t = sec * S
            values.append({"id": self.next_id, "k": k, "t": sec, "v": self.next_id % 7})
            self.next_id += 1
            ts.append(t)
            keys.append(k)
            wms.append(self.hi[side] - BOUND)
            self.hi[side] = max(self.hi[side], t)
        return Batch(values, ts, keys, wms)

    def watermark(self, side: int, sec: int) -> Watermark:
        self.hi[side] = max(self.hi[side], sec * S)
        return Watermark(self.hi[side] - BOUND)


async def apply(op: Op, kind: str, side: int, item: Any, two: bool) -> None:
    step = op.step
    if kind == "rec":
        if two:
            await step.push_input(item, side)  # type: ignore[attr-defined]
        else:
            await step.push(item)
    elif kind == "wm":
        if two:
            await step.control_input(item, side)  # type: ignore[attr-defined]
        else:
            await step.control(item)
    elif kind == "early" and step.uses_timer() and not two:
        step.next_deadline()
        await step.on_timer(float("inf"))


def check(
    make: Callable[[], OpSpec], ops: list[tuple[str, int, Any]], sides: int, restore_at: int
) -> None:
    asyncio.run(_check(make, ops, sides, restore_at))


async def _check(
    make: Callable[[], OpSpec], ops: list[tuple[str, int, Any]], sides: int, restore_at: int
) -> None:
    two = sides == 2
    inc, ref = Op(make, True), Op(make, False)
    feed = Feeder(sides)
    chain: list[Incremental] = []
    taken: list[tuple[Incremental, bytes]] = []
    restored: Op | None = None
    chain2: list[Incremental] = []
    ops = [*ops, ("snap", 0, None)]
    for kind, side, arg in ops:
        if kind == "snap":
            snap = inc.step.snapshot()
            whole = ref.step.snapshot()
            blob = pickle.dumps(snap)
            taken.append((snap, blob))
            chain.append(pickle.loads(blob))
            assert chain[0].whole
            folded = fold_incremental(chain[0], *chain[1:])
            same_state(folded, whole)
            if restored is not None:
                chain2.append(pickle.loads(pickle.dumps(restored.step.snapshot())))
                same_state(fold_incremental(chain2[0], *chain2[1:]), whole)
            elif len(chain) - 1 == restore_at:
                restored = Op(make, True)
                restored.step.restore(pickle.loads(pickle.dumps(folded)))
                restored.start = (len(ref.out.rows), len(ref.late.rows))
            continue
        item = (
            feed.batch(side, arg)
            if kind == "rec"
            else feed.watermark(side, arg)
            if kind == "wm"
            else None
        )
        for op in (inc, ref, restored):
            if op is not None:
                await apply(op, kind, side, item, two)
    assert inc.outputs() == ref.outputs()
    if restored is not None:
        assert restored.outputs() == ref.outputs(restored.start)
    # each change set was handed over sharing nothing the operator changed afterwards
    for snap, blob in taken:
        assert pickle.loads(pickle.dumps(snap)) == pickle.loads(blob)


# -- windows ------------------------------------------------------------------------------


class Squares(sw.agg.Aggregator[list[int], int]):
    """A user aggregator whose accumulator is changed in place."""

    def create(self) -> list[int]:
        return [0]

    def add(self, acc: list[int], value: Any) -> list[int]:
        acc[0] += value["v"] ** 2
        return acc

    def merge(self, a: list[int], b: list[int]) -> list[int]:
        return [a[0] + b[0]]

    def result(self, acc: list[int]) -> int:
        return acc[0]


def aggregation(kind: str) -> Aggregation:
    if kind == "count":
        return Aggregation([sw.agg.count()], None)
    if kind == "collect":  # one aggregator (bare in grid windows), a list changed in place
        return Aggregation([sw.agg.collect(lambda r: r["id"])], None)
    named = {
        "n": sw.agg.count(),
        "mean": sw.agg.mean(lambda r: r["v"]),
        "distinct": sw.agg.count_distinct(lambda r: r["v"]),
        "last": sw.agg.last(lambda r: r["id"]),
        "squares": Squares(),
        "max": sw.agg.max(lambda r: r["v"]),
    }
    return Aggregation(list(named.values()), list(named))


ASSIGNERS = {
    "tumbling": lambda: sw.windows.Tumbling(5),
    "sliding": lambda: sw.windows.Sliding(6, 2),
    "session": lambda: sw.windows.Session(gap=3),
}


def window_spec(assigner: str, lateness: int, early: bool, agg: str) -> Callable[[], OpSpec]:
    def make() -> OpSpec:
        return WindowSpec(
            ASSIGNERS[assigner](),
            aggregation(agg),
            lateness=lateness * S,
            early_every=1.0 if early else None,
            processing_time=False,
        )

    return make


@pytest.mark.parametrize("assigner", sorted(ASSIGNERS))
@settings(max_examples=250, deadline=None)
@given(
    lateness=st.sampled_from([0, 0, 4]),
    early=st.booleans(),
    agg=st.sampled_from(["count", "collect", "many"]),
    ops=script(1),
    restore_at=st.integers(0, 6),
)
# Sessions: a record opens a session before the key's, whose heap entry (due sooner)
# supersedes the key's; the next batch grows the later session and the watermark fires
# the earlier one.  The superseded entry (7 s) was left on top of the never-stopped
# operator's heap and became its next_due, while the restored one (heap rebuilt from
# the keys' due times) had the exact 9 s: their snapshots differed.
@example(
    lateness=0,
    early=False,
    agg="count",
    ops=[("rec", 0, [("a", 4), ("a", 0)]), ("snap", 0, None), ("rec", 0, [("a", 6), ("a", 0)])],
    restore_at=0,
)
def test_window_change_sets_fold_to_the_whole_state_at_every_point(
    assigner: str,
    lateness: int,
    early: bool,
    agg: str,
    ops: list[tuple[str, int, Any]],
    restore_at: int,
) -> None:
    check(window_spec(assigner, lateness, early, agg), ops, 1, restore_at)


def test_a_window_change_set_holds_only_the_windows_that_changed() -> None:
    """10,000 keys with an open window each; one more record: a change set of one window.
    Closing the windows deletes every one of them."""
    op = Op(window_spec("tumbling", 0, False, "count"), True)
    feed = Feeder(1)

    async def run() -> list[Incremental]:
        snaps = []
        await op.step.push(feed.batch(0, [(f"k{i}", 1) for i in range(10_000)]))
        snaps.append(op.step.snapshot())
        await op.step.push(feed.batch(0, [("k7", 2)]))
        snaps.append(op.step.snapshot())
        snaps.append(op.step.snapshot())
        await op.step.control(Watermark(20 * S))
        snaps.append(op.step.snapshot())
        return snaps

    base, one, nothing, closed = (only(s) for s in asyncio.run(run()))
    assert base.whole
    assert len(base.upserts) == 10_000
    assert not one.whole
    assert one.upserts == {("k7", 0): 2}
    assert not one.deletes
    assert (nothing.upserts, nothing.deletes) == ({}, frozenset())
    assert closed.whole  # an empty whole state, smaller than 10,000 deletes
    assert closed.upserts == {}
    assert len(op.out.rows) == 10_000


def test_restore_refuses_a_change_set_and_partitions_it_does_not_keep() -> None:
    op = Op(window_spec("session", 0, False, "many"), True)
    with pytest.raises(ValueError, match="fold it onto its base"):
        op.step.restore(Incremental({None: Changes(False, {})}))
    with pytest.raises(ValueError, match="partition"):
        op.step.restore(Incremental({3: Changes(True, {})}))


# -- joins ------------------------------------------------------------------------------


def deleted(r: dict[str, Any]) -> bool:
    return bool(r["v"] % 5 == 0)


JOINS: dict[str, Callable[[], OpSpec]] = {
    "window-tumbling": lambda: WindowJoinSpec(sw.windows.Tumbling(5), "full", 2 * S),
    "window-sliding": lambda: WindowJoinSpec(sw.windows.Sliding(6, 2), "left", 0),
    "window-session": lambda: WindowJoinSpec(sw.windows.Session(gap=3), "full", S),
    "interval": lambda: IntervalJoinSpec(-2 * S, 3 * S, "left", S),
    "interval-inner": lambda: IntervalJoinSpec(0, 4 * S, "inner", 0),
    "asof": lambda: AsOfJoinSpec("left", S, tolerance=5 * S),
    "temporal": lambda: TemporalJoinSpec("left", 0, tolerance=None, is_delete=deleted),
    "latest": lambda: LatestJoinSpec("left", deleted),
}


@pytest.mark.parametrize("join", sorted(JOINS))
@settings(max_examples=200, deadline=None)
@given(ops=script(2), restore_at=st.integers(0, 6))
def test_join_change_sets_fold_to_the_whole_state_at_every_point(
    join: str, ops: list[tuple[str, int, Any]], restore_at: int
) -> None:
    check(JOINS[join], ops, 2, restore_at)


def test_a_join_change_set_holds_only_what_was_appended_or_expired() -> None:
    op = Op(JOINS["interval"], True)
    feed = Feeder(2)

    async def run() -> list[Incremental]:
        snaps = []
        await op.step.push_input(feed.batch(1, [(f"k{i}", 1) for i in range(5_000)]), 1)
        snaps.append(op.step.snapshot())
        await op.step.push_input(feed.batch(0, [("k3", 1)]), 0)  # matches k3's right record
        snaps.append(op.step.snapshot())
        return snaps

    base, one = (only(s) for s in asyncio.run(run()))
    assert base.whole
    assert len(base.upserts) == 5_000
    assert not one.whole
    assert sorted(one.upserts.values(), key=repr) == sorted(
        [
            ("k3", S, {"id": 5_000, "k": "k3", "t": 1, "v": 5_000 % 7}, True),
            ("k3", S, {"id": 3, "k": "k3", "t": 1, "v": 3}, True),
        ],
        key=repr,
    )
