"""Incremental snapshots of keyed state (issue 20, keyed side): dirty-key tracking and
``Incremental`` change sets that fold into exactly the whole state at the same point."""

from __future__ import annotations

import asyncio
import itertools
import pickle
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sluiceway as sw
from sluiceway.core.delta import Changes, Incremental, fold_incremental
from sluiceway.core.messages import Batch, Control, Watermark
from sluiceway.metrics.registry import OperatorMetrics
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.operators.errors import DeadLetterWriter, ErrorHandler
from sluiceway.operators.keyed_state import KeyedProcessSpec, StatefulMapSpec, process_factory
from sluiceway.state import OVERLAY_PROBE, Overlay, ProcessContext

S = 1_000_000  # ticks per second

pytestmark = pytest.mark.usefixtures("keyed_backend")  # every test on both backends


class Capture(Step):
    def __init__(self) -> None:
        super().__init__("capture", OperatorMetrics("capture", "sink", 0))
        self.rows: list[Any] = []

    async def push(self, batch: Batch) -> None:
        self.rows.extend(batch.values)

    async def control(self, message: Control) -> None:
        pass


def make_step(spec: OpSpec, clock: sw.VirtualClock) -> tuple[Step, Capture]:
    """The step with a dead-letter policy (a failed record must leave no trace)."""
    m = OperatorMetrics("op", spec.kind, 0)
    dlq: sw.sinks.Collect[Any] = sw.sinks.Collect()
    errors = ErrorHandler(
        sw.DeadLetter(dlq),
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
    return step, cap


def process_spec(fn: Any, *, timestamped: bool = True) -> KeyedProcessSpec:
    factory, has_timer = process_factory(fn)
    return KeyedProcessSpec(factory, timestamped=timestamped, processing_timers=has_timer)


class Mixed:
    """Per record ``(key, op, ts)``: writes, clears, map entries, a TTL'd value, timers,
    and failures after writing (the dead letter must leave no trace)."""

    def process(self, ctx: ProcessContext[Any], r: tuple[str, str, float]) -> None:
        _, op, ts = r
        n = ctx.value("n")
        n.set(n.get(0) + 1)
        if op == "clear":
            n.clear()
            ctx.map("m").clear()
        elif op == "map":
            ctx.map("m").put(int(ts) % 3, ts)
        elif op == "unmap":
            ctx.map("m").remove(int(ts) % 3)
        elif op == "ttl":
            ctx.value("short", ttl=sw.state.TTL(2.0, time="event")).set(ts)
        elif op == "timer":
            ctx.timers.at_event_time(ts + 1.5)
        elif op == "untimer":
            ctx.timers.delete_event_time(ts - 0.5)
        elif op == "fail":
            ctx.timers.at_event_time(ts + 0.25)
            ctx.map("m").put("x", 1)
            raise RuntimeError("boom")
        ctx.emit((ctx.key, n.get()))

    def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
        ctx.value("fired").set(t)
        ctx.emit((ctx.key, "timer", t))


OPS = ["set", "set", "clear", "map", "unmap", "ttl", "timer", "untimer", "fail"]


def batch_of(rows: list[tuple[str, str, float]], hi: float) -> tuple[Batch, float]:
    ts, wms = [], []
    for r in rows:
        t = round(r[2] * S)
        wms.append(hi)
        ts.append(t)
        hi = max(hi, t)
    return Batch(list(rows), ts, [r[0] for r in rows], wms), hi


def whole_state(inc: Incremental) -> dict[Any, Any]:
    (changes,) = inc.partitions.values()
    assert changes.whole
    return dict(changes.upserts)


def extra_of(inc: Incremental) -> Any:
    (changes,) = inc.partitions.values()
    return changes.extra


def run_both(
    rows: list[tuple[str, str, float]], cuts: list[int], snaps: set[int]
) -> tuple[list[Incremental], list[Incremental]]:
    """Feed the same batches to a step that takes change sets and one that does not;
    snapshot both after the batches in ``snaps`` (and at the end)."""
    clock = sw.VirtualClock()
    inc, _ = make_step(process_spec(Mixed), clock)
    ref, _ = make_step(process_spec(Mixed), clock)
    inc.accept_changes(True)
    chain: list[Incremental] = []
    wholes: list[Incremental] = []
    kept: list[tuple[Incremental, bytes]] = []  # snapshots as taken, and pickled at once
    hi = -float("inf")
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(rows)}), len(rows)]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        batch, hi = batch_of(rows[a:b], hi)
        for step in (inc, ref):
            asyncio.run(step.push(batch))
            asyncio.run(step.control(Watermark(hi - S)))
        if i in snaps or b == len(rows):
            for step, into in ((inc, chain), (ref, wholes)):
                snap = step.snapshot()
                blob = pickle.dumps(snap)
                kept.append((snap, blob))
                into.append(pickle.loads(blob))
    # a snapshot shares nothing the step changed afterwards (copy on write)
    for snap, blob in kept:
        assert pickle.loads(pickle.dumps(snap)) == pickle.loads(blob)
    return chain, wholes


def rows_strategy() -> Any:
    row = st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(OPS),
        st.integers(0, 40).map(lambda x: x / 4),
    )
    return st.lists(row, min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(rows_strategy(), st.lists(st.integers(0, 60), max_size=8), st.sets(st.integers(0, 8)))
def test_folding_the_change_sets_gives_the_whole_state_at_every_point(
    rows: list[tuple[str, str, float]], cuts: list[int], snaps: set[int]
) -> None:
    chain, wholes = run_both(rows, cuts, snaps)
    assert chain[0].whole
    for i, whole in enumerate(wholes):
        if i:
            assert not chain[i].whole
            (changes,) = chain[i].partitions.values()
            assert not changes.upserts.keys() & changes.deletes
        folded = fold_incremental(chain[0], *chain[1 : i + 1])
        assert whole_state(folded) == whole_state(whole)
        assert extra_of(folded) == extra_of(whole)


def test_a_change_set_holds_only_the_keys_that_changed() -> None:
    clock = sw.VirtualClock()
    step, _ = make_step(process_spec(Mixed), clock)
    step.accept_changes(True)
    rows = [("a", "set", 1.0), ("b", "map", 1.0), ("c", "timer", 1.0), ("d", "set", 1.0)]
    batch, hi = batch_of(rows, -float("inf"))
    asyncio.run(step.push(batch))
    base = step.snapshot()
    assert base.whole
    assert sorted(whole_state(base)) == ["a", "b", "c", "d"]
    # a: written; b: cleared (a delete); d: a failed record (rolled back: unchanged)
    batch, hi = batch_of([("a", "set", 2.0), ("b", "clear", 2.0), ("d", "fail", 2.0)], hi)
    asyncio.run(step.push(batch))
    (changes,) = step.snapshot().partitions.values()
    assert not changes.whole
    assert set(changes.upserts) == {"a"}
    assert changes.deletes == {"b"}
    # nothing happened: an empty change set
    (changes,) = step.snapshot().partitions.values()
    assert (changes.upserts, changes.deletes) == ({}, frozenset())
    # c's timer (at 2.5) fires once the watermark passes it: c changed (timer gone, and
    # the state on_timer wrote)
    asyncio.run(step.control(Watermark(3 * S)))
    (changes,) = step.snapshot().partitions.values()
    assert set(changes.upserts) == {"c"}
    assert changes.upserts["c"]["fired"] == 2.5


def test_ttl_expiry_is_a_change() -> None:
    clock = sw.VirtualClock()
    step, _ = make_step(process_spec(Mixed), clock)
    step.accept_changes(True)
    batch, _hi = batch_of([("a", "ttl", 1.0), ("b", "set", 1.0)], -float("inf"))
    asyncio.run(step.push(batch))
    base = whole_state(step.snapshot())
    assert base["a"]["short"] == 1.0
    asyncio.run(step.control(Watermark(10 * S)))  # past 1.0 + 2
    (changes,) = step.snapshot().partitions.values()
    assert set(changes.upserts) == {"a"}
    assert "short" not in changes.upserts["a"]


def test_snapshots_are_whole_until_the_checkpoint_side_accepts_changes() -> None:
    clock = sw.VirtualClock()
    step, _ = make_step(process_spec(Mixed), clock)
    batch, hi = batch_of([("a", "set", 1.0)], -float("inf"))
    asyncio.run(step.push(batch))
    assert step.snapshot().whole
    batch, hi = batch_of([("b", "set", 2.0)], hi)
    asyncio.run(step.push(batch))
    second = step.snapshot()
    assert second.whole
    assert sorted(whole_state(second)) == ["a", "b"]


def test_after_a_restore_the_next_snapshot_is_whole() -> None:
    clock = sw.VirtualClock()
    step, _ = make_step(process_spec(Mixed), clock)
    step.accept_changes(True)
    batch, _hi = batch_of([("a", "set", 1.0), ("b", "timer", 1.0)], -float("inf"))
    asyncio.run(step.push(batch))
    snap = pickle.loads(pickle.dumps(step.snapshot()))
    step2, cap2 = make_step(process_spec(Mixed), clock)
    step2.accept_changes(True)
    step2.restore(snap)
    again = step2.snapshot()
    assert again.whole
    assert whole_state(again) == whole_state(snap)
    asyncio.run(step2.control(Watermark(5 * S)))
    assert cap2.rows == [("b", "timer", 2.5)]


def test_restore_refuses_a_change_set() -> None:
    clock = sw.VirtualClock()
    step, _ = make_step(process_spec(Mixed), clock)
    changes = Incremental({None: Changes(False, {}, frozenset({"a"}), extra={})})
    with pytest.raises(ValueError, match="restore needs every partition whole"):
        step.restore(changes)


def test_stateful_map_change_sets() -> None:
    def total(s: int | None, x: tuple[str, int]) -> tuple[int | None, int]:
        if x[1] < 0:
            return None, 0
        return (s or 0) + x[1], x[1]

    clock = sw.VirtualClock()
    spec = StatefulMapSpec(total, ttl=None, timestamped=False)
    step, _ = make_step(spec, clock)
    step.accept_changes(True)
    asyncio.run(step.push(Batch([("a", 1), ("b", 2)], keys=["a", "b"])))
    base = step.snapshot()
    asyncio.run(step.push(Batch([("a", 5), ("b", -1)], keys=["a", "b"])))
    later = step.snapshot()
    (changes,) = later.partitions.values()
    assert changes.upserts == {"a": {"state": 6}}
    assert changes.deletes == {"b"}
    folded = fold_incremental(base, later)
    step2, cap2 = make_step(spec, clock)
    step2.restore(pickle.loads(pickle.dumps(folded)))
    asyncio.run(step2.push(Batch([("a", 1), ("b", 1)], keys=["a", "b"])))
    assert cap2.rows == [1, 1]
    assert whole_state(step2.snapshot()) == {"a": {"state": 7}, "b": {"state": 1}}


def _sum_or_drop(s: int | None, x: tuple[str, int]) -> tuple[int | None, int]:
    """``stateful_map`` test function: add, delete (< 0), or fail (0)."""
    if x[1] == 0:
        raise RuntimeError("boom")
    if x[1] < 0:
        return None, 0
    return (s or 0) + x[1], x[1]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abcde"), st.sampled_from([1, 2, -1, 0])), max_size=60),
    st.lists(st.integers(0, 60), max_size=8),
    st.sets(st.integers(0, 8)),
    st.integers(4, 40),
    st.booleans(),
)
def test_stateful_map_change_sets_fold_to_the_whole_state_at_every_point(
    rows: list[tuple[str, int]], cuts: list[int], snaps: set[int], window: int, on: bool
) -> None:
    """``stateful_map`` taking change sets, against one that does not and writes every
    state through (no overlay).  Change sets record each new states dict as it is put in
    place, deletes as keys to look up, and the overlay's states (in memory: the keys
    written again, folded in at every snapshot and every ``window`` records, on and off
    as keys repeat or not) at each fold.  In any order within one change set (written
    then deleted, deleted then written again, a failed record in between): the same
    outputs, query answers and key counts after every batch, and change sets that fold
    into exactly the whole state at every snapshot."""
    clock = sw.VirtualClock()
    spec = StatefulMapSpec(_sum_or_drop, ttl=None, timestamped=False)  # dead letters: make_step
    inc, out = make_step(spec, clock)
    ref, ref_out = make_step(spec, clock)
    inc.accept_changes(True)
    ov = inc.store.overlay  # (None on disk: there the two differ only in tracking)
    if ov is not None:
        ov.window, ov.on = window, on
    ref.store.overlay = None
    chain: list[Incremental] = []
    wholes: list[Incremental] = []
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(rows)}), len(rows)]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        part = rows[a:b]
        for step in (inc, ref):
            asyncio.run(step.push(Batch(list(part), keys=[r[0] for r in part])))
        assert out.rows == ref_out.rows
        assert [inc.query(k, None) for k in "abcde"] == [ref.query(k, None) for k in "abcde"]
        assert inc.metrics.state == ref.metrics.state
        if i in snaps or b == len(rows):
            chain.append(pickle.loads(pickle.dumps(inc.snapshot())))
            wholes.append(pickle.loads(pickle.dumps(ref.snapshot())))
    for i, whole in enumerate(wholes):
        if i:
            (changes,) = chain[i].partitions.values()
            assert not changes.whole
            assert not changes.upserts.keys() & changes.deletes
        assert whole_state(fold_incremental(chain[0], *chain[1 : i + 1])) == whole_state(whole)


def test_stateful_map_keeps_keys_written_again_in_the_overlay() -> None:
    """In memory, a key the state held is written into the overlay alone until a fold
    (a snapshot here); a new key is written through."""
    clock = sw.VirtualClock()
    spec = StatefulMapSpec(_sum_or_drop, ttl=None, timestamped=False, state=sw.state.InMemory())
    step, _ = make_step(spec, clock)
    step.accept_changes(True)
    store = step.store
    assert store.overlay is not None
    assert store.overlay.on
    asyncio.run(step.push(Batch([("a", 1), ("b", 1)], keys=["a", "b"])))
    assert store.overlay.hot == {}
    assert store.data == {"a": {"state": 1}, "b": {"state": 1}}
    asyncio.run(step.push(Batch([("a", 2), ("a", 3), ("c", 1)], keys=["a", "a", "c"])))
    assert store.overlay.hot == {"a": 6}
    assert store.data["a"] == {"state": 1}
    assert store.data["c"] == {"state": 1}
    assert step.query("a", None).state == 6
    assert step.metrics.state == 3
    (changes,) = step.snapshot().partitions.values()  # the first: whole
    assert changes.upserts == {"a": {"state": 6}, "b": {"state": 1}, "c": {"state": 1}}
    assert store.overlay.hot == {}
    assert store.data["a"] == {"state": 6}
    assert changes.one_field == "state"


def test_the_overlay_is_on_while_keys_repeat_and_tried_again_after_writing_through() -> None:
    ov = Overlay(window=400)
    ov.records, ov.distinct = 99, 1000  # too few records (< a quarter window): no decision
    ov.decide(None)
    assert (ov.on, ov.records, ov.distinct) == (True, 99, 1000)
    ov.records, ov.distinct = 400, 100  # each key 4 times: on
    ov.decide(None)
    assert (ov.on, ov.records, ov.distinct) == (True, 0, 0)
    # fewer: off; untracked (no change set counts the keys), tried again after 1, 2, 4,
    # ... decisions, each try that fails doubling the wait, at most OVERLAY_PROBE
    waits = []
    for _ in range(9):
        ov.records, ov.distinct = 400, 101
        ov.decide(None)
        assert not ov.on
        n = 0
        while not ov.on:
            ov.records = 400
            ov.decide(None)
            n += 1
        waits.append(n)
    assert waits == [1, 2, 4, 8, 16, 32, 64, 64, 64]
    assert OVERLAY_PROBE == 64
    ov.records, ov.distinct = 400, 100  # a try that pays: the next wait is 1 again
    ov.decide(None)
    ov.records, ov.distinct = 400, 101
    ov.decide(None)
    ov.records = 400
    ov.decide(None)
    assert ov.on
    ov.on, ov.records = False, 400  # writing through, tracked: the change sets count
    ov.decide(through=100)
    assert ov.on
    ov.on, ov.records = False, 400
    ov.decide(through=300)
    assert not ov.on


def test_a_stateful_map_change_set_holds_what_was_written_not_what_failed() -> None:
    clock = sw.VirtualClock()
    spec = StatefulMapSpec(_sum_or_drop, ttl=None, timestamped=False)  # dead letters: make_step
    step, _ = make_step(spec, clock)
    step.accept_changes(True)
    asyncio.run(step.push(Batch([("a", 1), ("b", 1), ("c", 1)], keys=["a", "b", "c"])))
    assert step.snapshot().whole
    rows = [("a", 2), ("b", 0), ("c", -1), ("c", 2), ("d", 1), ("d", -1)]
    asyncio.run(step.push(Batch(rows, keys=[r[0] for r in rows])))
    (changes,) = step.snapshot().partitions.values()
    # a written; b failed (unchanged: not in the change set); c deleted then written
    # again; d written then deleted (d held nothing before: a delete of nothing is harmless)
    assert changes.upserts == {"a": {"state": 3}, "c": {"state": 2}}
    assert changes.deletes == {"d"}
    (changes,) = step.snapshot().partitions.values()
    assert (changes.upserts, changes.deletes) == ({}, frozenset())


def test_a_format_1_snapshot_still_restores() -> None:
    """Checkpoints written before Incremental: one pickled blob, processing times as
    seconds remaining."""
    payload = {
        "data": {"k": {"v": 3}},
        "kinds": {"v": ("value", None)},
        "ttl": [],
        "event_timers": [("k", 7 * S)],
        "processing_timers": [],
        "wm": 2 * S,
        "rec_wm": 2 * S,
        "max_ts": 3 * S,
    }
    old = {"format": 1, "operator": "op", "keys": 1, "blob": pickle.dumps(payload)}

    class Show:
        def process(self, ctx: ProcessContext[Any], x: Any) -> None:
            ctx.emit(("v", ctx.value("v").get()))

        def on_timer(self, ctx: ProcessContext[Any], t: float) -> None:
            ctx.emit(("timer", t))

    clock = sw.VirtualClock()
    step, cap = make_step(process_spec(Show), clock)
    step.restore(old)
    batch, _ = batch_of([("k", "x", 4.0)], 3 * S)
    asyncio.run(step.push(batch))
    asyncio.run(step.finish())
    assert cap.rows == [("v", 3), ("timer", 7.0)]
