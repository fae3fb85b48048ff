"""Semantics of the stateless operators: map, filter, flat_map, inspect, key_by, branch,
merge, fan-out; independence from micro-batch size; sync and async sources.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Hashable, Iterator
from typing import Any

import pytest

import sluiceway as sw
from sluiceway.connectors.base import SinkContext
from sluiceway.runtime.messages import Batch
from sluiceway.testing import ScriptedSource
from sluiceway.time import Clock, VirtualClock

BATCH_SIZES = [1, 3, 1024]


class Recorder(sw.sinks.Sink):
    """Records values, keys, arrival times and batch sizes; rejects empty batches."""

    def __init__(self) -> None:
        self.clock: Clock | None = None
        self.values: list[Any] = []
        self.keys: list[Hashable] = []
        self.keyed: list[bool] = []
        self.times: list[float] = []
        self.sizes: list[int] = []

    async def open(self, ctx: SinkContext) -> None:
        self.clock = ctx.clock

    async def write(self, batch: Batch) -> None:
        assert self.clock is not None
        assert len(batch.values) > 0, "a sink must never be handed an empty batch"
        self.sizes.append(len(batch.values))
        self.values.extend(batch.values)
        self.keyed.append(batch.keys is not None)
        if batch.keys is not None:
            assert len(batch.keys) == len(batch.values)
            self.keys.extend(batch.keys)
        self.times.extend([self.clock.monotonic()] * len(batch.values))

    @property
    def pairs(self) -> list[tuple[Any, Hashable]]:
        assert all(self.keyed), "every batch should carry keys"
        return list(zip(self.values, self.keys, strict=True))


def run(flow: sw.Flow, max_batch_size: int = 1024, clock: VirtualClock | None = None) -> Any:
    return sw.testing.run_flow(flow, max_batch_size=max_batch_size, clock=clock)


# -- map, filter, flat_map, inspect ---------------------------------------------------


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_map(n: int) -> None:
    got = sw.testing.run_collect(lambda s: s.map(lambda x: x * 10), range(7), max_batch_size=n)
    assert got == [0, 10, 20, 30, 40, 50, 60]


def test_map_may_return_anything_including_none() -> None:
    assert sw.testing.run_collect(lambda s: s.map(lambda x: None), [1, 2]) == [None, None]


def test_filter_uses_truthiness() -> None:
    items: list[Any] = [0, 1, "", "a", None, [], [0], 0.0, -1]
    assert sw.testing.run_collect(lambda s: s.filter(lambda x: x), items) == [1, "a", [0], -1]


def test_filter_everything_out_never_hands_the_sink_an_empty_batch() -> None:
    flow = sw.Flow("none")
    out = Recorder()
    flow.source(sw.sources.Iterable(range(50))).filter(lambda x: False).sink(out)
    run(flow, max_batch_size=3)
    assert out.values == []
    assert out.sizes == []


def gen_pm(x: int) -> Iterator[int]:
    yield x
    yield -x


def gen_none(x: int) -> Iterator[int]:
    return
    yield x  # pragma: no cover - makes this a generator function


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (lambda x: [x, x], [1, 1, 2, 2, 3, 3]),
        (lambda x: [], []),
        (range, [0, 0, 1, 0, 1, 2]),
        (lambda x: (x,) * (x % 2), [1, 3]),
        (gen_pm, [1, -1, 2, -2, 3, -3]),
        (gen_none, []),
        (lambda x: (i * x for i in (1, 10)), [1, 10, 2, 20, 3, 30]),
        (lambda x: str(x) * 2, ["1", "1", "2", "2", "3", "3"]),
    ],
)
def test_flat_map(fn: Any, expected: list[Any]) -> None:
    for n in BATCH_SIZES:
        assert sw.testing.run_collect(lambda s: s.flat_map(fn), [1, 2, 3], max_batch_size=n) == (
            expected
        )


def test_inspect_sees_every_record_once_in_order_and_passes_them_unchanged() -> None:
    seen: list[Any] = []
    items = [{"id": i} for i in range(5)]

    def look(x: Any) -> bool:
        seen.append(x)
        return False  # its return value is ignored

    got = sw.testing.run_collect(lambda s: s.inspect(look), items, max_batch_size=2)
    assert seen == items
    assert got == items
    assert all(a is b for a, b in zip(got, items, strict=True))


def test_user_functions_are_called_exactly_once_per_record() -> None:
    calls: dict[str, int] = {"map": 0, "filter": 0, "flat_map": 0, "key_by": 0, "branch": 0}

    def counting(kind: str, result: Any) -> Any:
        def fn(x: Any) -> Any:
            calls[kind] += 1
            return result(x)

        return fn

    flow = sw.Flow("once")
    yes, no = (
        flow.source(sw.sources.Iterable(range(20)))
        .map(counting("map", lambda x: x + 1))
        .filter(counting("filter", lambda x: x % 2))
        .flat_map(counting("flat_map", lambda x: [x, x]))
        .key_by(counting("key_by", lambda x: x % 3))
        .branch(counting("branch", lambda x: x > 10))
    )
    yes.sink(sw.sinks.Collect())
    no.sink(sw.sinks.Collect())
    run(flow, max_batch_size=3)
    assert calls == {"map": 20, "filter": 20, "flat_map": 10, "key_by": 20, "branch": 20}


# -- keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_keys_survive_map_filter_flat_map_inspect_and_buffer(n: int) -> None:
    flow = sw.Flow("keys")
    out = Recorder()
    (
        flow.source(sw.sources.Iterable(range(30)))
        .key_by(lambda x: f"k{x % 4}")
        .map(lambda x: x * 10)
        .filter(lambda x: x % 20 == 0)  # keeps the even inputs
        .buffer(2)  # tiny: batches are split in the channel
        .flat_map(lambda x: [x, x + 1])
        .inspect(lambda x: None)
        .sink(out)
    )
    run(flow, max_batch_size=n)
    expected = [(v, f"k{x % 4}") for x in range(0, 30, 2) for v in (x * 10, x * 10 + 1)]
    assert out.pairs == expected


def test_keys_survive_a_keyed_merge_and_branch() -> None:
    flow = sw.Flow("keys")
    a = flow.source(sw.sources.Iterable(range(10))).key_by(lambda x: ("a", x))
    b = flow.source(sw.sources.Iterable(range(100, 110))).key_by(lambda x: ("b", x))
    big, small = a.merge(b).branch(lambda x: x >= 5)
    out_big, out_small = Recorder(), Recorder()
    big.sink(out_big)
    small.sink(out_small)
    run(flow, max_batch_size=3)
    for v, k in out_big.pairs + out_small.pairs:
        assert k == ("a" if v < 100 else "b", v)
    assert sorted(out_big.values) == [5, 6, 7, 8, 9, *range(100, 110)]
    assert sorted(out_small.values) == [0, 1, 2, 3, 4]


def test_key_by_leaves_values_unchanged_and_a_second_key_by_replaces_keys() -> None:
    flow = sw.Flow("rekey")
    out = Recorder()
    (
        flow.source(sw.sources.Iterable(["x", "yy", "zzz"]))
        .key_by(len)
        .key_by(lambda s: s[0])
        .sink(out)
    )
    run(flow)
    assert out.pairs == [("x", "x"), ("yy", "y"), ("zzz", "z")]


def test_unkeyed_streams_carry_no_keys() -> None:
    flow = sw.Flow("plain")
    out = Recorder()
    flow.source(sw.sources.Iterable(range(5))).map(str).sink(out)
    run(flow)
    assert out.keyed == [False]


def test_keyed_stream_types() -> None:
    flow = sw.Flow("types")
    k = flow.source(sw.sources.Iterable([1])).key_by(str)
    assert isinstance(k, sw.KeyedStream)
    assert isinstance(k.map(str), sw.KeyedStream)
    assert isinstance(k.filter(bool), sw.KeyedStream)
    assert isinstance(k.flat_map(list), sw.KeyedStream)
    assert isinstance(k.inspect(print), sw.KeyedStream)
    assert isinstance(k.buffer(3), sw.KeyedStream)
    assert all(isinstance(s, sw.KeyedStream) for s in k.branch(bool))
    assert not isinstance(flow.source(sw.sources.Iterable([1])).map(str), sw.KeyedStream)


# -- branch ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_branch_evaluates_the_predicate_once_and_routes_each_record_once(n: int) -> None:
    calls: list[int] = []

    def is_even(x: int) -> int:
        calls.append(x)
        return (x + 1) % 2  # truthy int, not a bool

    flow = sw.Flow("branch")
    even, odd = flow.source(sw.sources.Iterable(range(25))).branch(is_even)
    out_even, out_odd = Recorder(), Recorder()
    even.sink(out_even)
    odd.sink(out_odd)
    run(flow, max_batch_size=n)
    assert calls == list(range(25))
    assert out_even.values == list(range(0, 25, 2))
    assert out_odd.values == list(range(1, 25, 2))


def test_branch_outputs_can_be_processed_and_fanned_out() -> None:
    flow = sw.Flow("branch")
    yes, no = flow.source(sw.sources.Iterable(range(10))).branch(lambda x: x < 3)
    a, b, c = sw.sinks.Collect(), sw.sinks.Collect(), sw.sinks.Collect()
    yes.map(lambda x: -x).sink(a)
    yes.sink(b)
    no.buffer(2).sink(c)
    run(flow, max_batch_size=3)
    assert a.items == [0, -1, -2]
    assert b.items == [0, 1, 2]
    assert c.items == list(range(3, 10))


def test_branch_where_everything_goes_one_way() -> None:
    flow = sw.Flow("branch")
    yes, no = flow.source(sw.sources.Iterable(range(10))).branch(lambda x: True)
    a, b = Recorder(), Recorder()
    yes.sink(a)
    no.sink(b)
    run(flow, max_batch_size=3)
    assert a.values == list(range(10))
    assert (b.values, b.sizes) == ([], [])


def test_branch_outputs_merged_again_give_back_every_record() -> None:
    flow = sw.Flow("diamond")
    yes, no = flow.source(sw.sources.Iterable(range(40))).branch(lambda x: x % 3 == 0)
    out = sw.sinks.Collect()
    yes.map(lambda x: ("y", x)).merge(no.map(lambda x: ("n", x))).sink(out)
    run(flow, max_batch_size=4)
    assert sorted(v for _, v in out.items) == list(range(40))
    assert [v for t, v in out.items if t == "y"] == list(range(0, 40, 3))
    assert [v for t, v in out.items if t == "n"] == [v for v in range(40) if v % 3]


# -- merge ----------------------------------------------------------------------------


def test_merge_of_inputs_at_different_speeds_delivers_each_record_when_it_arrives() -> None:
    fast = [(float(t), [("fast", t)]) for t in range(10)]
    slow = [(0.5 + 3 * t, [("slow", t)]) for t in range(4)]
    bursty = [(2.25, [("burst", i) for i in range(5)]), (7.75, [("burst", 5)])]
    flow = sw.Flow("merge")
    out = Recorder()
    (
        flow.source(ScriptedSource(fast))
        .merge(flow.source(ScriptedSource(slow)), flow.source(ScriptedSource(bursty)), capacity=2)
        .sink(out)
    )
    run(flow)
    for name, script in [("fast", fast), ("slow", slow), ("burst", bursty)]:
        got = [v for v in out.values if v[0] == name]
        assert got == [v for _, vs in script for v in vs], name  # all, in order
    arrivals = dict(zip(out.values, out.times, strict=True))
    for _, script in [("fast", fast), ("slow", slow), ("burst", bursty)]:
        for at, vs in script:
            for v in vs:
                assert arrivals[v] == at, v  # no waiting for the slower inputs
    assert out.times == sorted(out.times)


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_merge_with_an_empty_input_and_one_ending_early(n: int) -> None:
    flow = sw.Flow("merge")
    out = sw.sinks.Collect()
    a = flow.source(sw.sources.Iterable(range(100)))
    b = flow.source(sw.sources.Iterable([]))
    c = flow.source(sw.sources.Iterable(["x", "y"]))
    a.merge(b, c, capacity=1).sink(out)
    run(flow, max_batch_size=n)
    assert [v for v in out.items if isinstance(v, int)] == list(range(100))
    assert [v for v in out.items if isinstance(v, str)] == ["x", "y"]


# -- fan-out --------------------------------------------------------------------------


@pytest.mark.parametrize("n", BATCH_SIZES)
def test_fan_out_gives_every_consumer_everything(n: int) -> None:
    flow = sw.Flow("fanout")
    s = flow.source(sw.sources.Iterable(range(50))).map(lambda x: {"v": x})
    a, b, c, d = (sw.sinks.Collect() for _ in range(4))
    s.sink(a)
    s.sink(b)
    s.map(lambda r: r["v"]).sink(c)
    s.buffer(3).map(lambda r: r["v"] * 2).sink(d)
    run(flow, max_batch_size=n)
    expected = [{"v": x} for x in range(50)]
    assert a.items == expected
    assert b.items == expected
    assert c.items == list(range(50))
    assert d.items == [2 * x for x in range(50)]


def test_one_consumer_cannot_corrupt_anothers_records_columns() -> None:
    flow = sw.Flow("fanout")
    s = flow.source(sw.sources.Iterable(range(10))).key_by(lambda x: x % 2)
    a, b = Recorder(), Recorder()
    s.filter(lambda x: x > 4).sink(a)
    s.flat_map(lambda x: [x] * 2).sink(b)
    run(flow, max_batch_size=4)
    assert a.pairs == [(x, x % 2) for x in range(5, 10)]
    assert b.pairs == [(x, x % 2) for x in range(10) for _ in range(2)]


# -- independence from micro-batch size -----------------------------------------------


def _build_everything(flow: sw.Flow) -> dict[str, Any]:
    sinks: dict[str, Any] = {name: sw.sinks.Collect() for name in "abcdef"}
    s = flow.source(sw.sources.Iterable(range(200)), name="src")
    keyed = s.map(lambda x: x * 3).filter(lambda x: x % 7).key_by(lambda x: x % 5)
    big, small = keyed.branch(lambda x: x > 300)
    big.flat_map(lambda x: range(x % 3)).sink(sinks["a"])
    small.batch(4).sink(sinks["b"])
    keyed.buffer(5).batch(7, 1.0).sink(sinks["c"])
    other = flow.source(sw.sources.Iterable(range(1000, 1050)))
    s.merge(other, capacity=3).sink(sinks["d"])
    s.inspect(lambda x: None).sink(sinks["e"])
    big.merge(small).map(str).sink(sinks["f"])
    return sinks


def test_results_are_identical_for_every_max_batch_size() -> None:
    results = {}
    for n in BATCH_SIZES:
        flow = sw.Flow("all")
        sinks = _build_everything(flow)
        run(flow, max_batch_size=n)
        results[n] = sinks
    ref = results[1024]
    for n in BATCH_SIZES:
        got = results[n]
        for name in "abce":  # linear paths: identical, in order
            assert got[name].items == ref[name].items, (n, name)
        # merges interleave inputs as they arrive: the same records, each input in order
        assert sorted(got["d"].items) == sorted(ref["d"].items) == [*range(200), *range(1000, 1050)]
        assert [x for x in got["d"].items if x < 1000] == list(range(200))
        assert [x for x in got["d"].items if x >= 1000] == list(range(1000, 1050))
        assert sorted(got["f"].items) == sorted(ref["f"].items)
    # and the reference itself is right
    kept = [x * 3 for x in range(200) if (x * 3) % 7]
    assert ref["e"].items == list(range(200))
    assert ref["b"].items == [
        [x for x in kept if x <= 300][i : i + 4]
        for i in range(0, len([x for x in kept if x <= 300]), 4)
    ]
    assert [v for lst in ref["c"].items for v in lst] == kept
    assert all(len(lst) <= 7 for lst in ref["c"].items)
    assert ref["a"].items == [v for x in kept if x > 300 for v in range(x % 3)]


def test_micro_batches_never_exceed_max_batch_size_through_one_to_one_operators() -> None:
    flow = sw.Flow("sizes")
    out = Recorder()
    flow.source(sw.sources.Iterable(range(100))).map(str).filter(bool).sink(out)
    run(flow, max_batch_size=3)
    assert out.values == [str(i) for i in range(100)]
    assert max(out.sizes) <= 3


# -- sources: sync and async ----------------------------------------------------------


class AsyncRange:
    """An async iterable object (not a generator)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __aiter__(self) -> AsyncIterator[int]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[int]:
        for i in range(self.n):
            yield i


def _sync_gen() -> Iterator[int]:
    yield from range(10)


async def _async_gen() -> AsyncIterator[int]:
    for i in range(10):
        yield i


async def _async_gen_on_clock(clock: Clock) -> AsyncIterator[int]:
    for i in range(10):
        await clock.sleep(0.5)
        yield i


@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize(
    "make",
    [
        lambda: list(range(10)),
        lambda: range(10),
        lambda: iter(range(10)),
        _sync_gen,
        _async_gen,
        lambda: AsyncRange(10),
        lambda: sw.sources.Generator(_async_gen),
        lambda: sw.sources.Generator(_sync_gen),
        lambda: sw.sources.Generator(lambda: range(10)),
    ],
    ids=[
        "list",
        "range",
        "iterator",
        "generator",
        "async-generator",
        "async-iterable",
        "Generator(async)",
        "Generator(sync)",
        "Generator(range)",
    ],
)
def test_sync_and_async_sources_give_the_same_results(make: Any, n: int) -> None:
    got = sw.testing.run_collect(
        lambda s: s.map(lambda x: x * x).filter(lambda x: x % 2 == 0), make(), max_batch_size=n
    )
    assert got == [0, 4, 16, 36, 64]


def test_an_async_source_waiting_on_the_clock() -> None:
    clock = VirtualClock()
    flow = sw.Flow("clocked")
    out = Recorder()
    flow.source(sw.sources.Iterable(_async_gen_on_clock(clock))).map(lambda x: x + 1).sink(out)
    result = run(flow, clock=clock)
    assert out.values == list(range(1, 11))
    assert out.times == [0.5 * (i + 1) for i in range(10)]
    assert result.elapsed == 5.0


def test_generator_source_with_rate_paces_on_the_clock() -> None:
    clock = VirtualClock()
    flow = sw.Flow("paced")
    out = Recorder()
    flow.source(sw.sources.Generator(lambda: itertools.islice(itertools.count(), 8), rate=2)).sink(
        out
    )
    run(flow, clock=clock)
    assert out.values == list(range(8))
    assert out.times == [0.5 * (i + 1) for i in range(8)]
