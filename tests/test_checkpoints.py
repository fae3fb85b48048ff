"""Checkpoints and recovery in process, on the virtual clock: barrier alignment, restore
equivalence per operator, stop at a checkpoint, ack barriers, and every error a user can
meet (a changed flow, a source that cannot resume, a damaged store, a shortened file).

The subprocess SIGKILL test is tests/test_checkpoint_crash.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import re
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import process_fns
import sluiceway as sw
from sluiceway.checkpoint import CheckpointStore
from sluiceway.cli import main
from sluiceway.connectors.base import Source, SourceContext
from sluiceway.errors import EndOfStream
from sluiceway.metrics.prometheus import metric_families
from sluiceway.runtime.channel import TaggedControl, open_channel
from sluiceway.runtime.messages import Barrier, Batch, Watermark

N = 3000
KEYS = 7


def records(seed: int = 1) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    return [
        {"id": i, "k": i % KEYS, "t": round(i * 0.01 + rnd.uniform(0, 0.3), 4)} for i in range(N)
    ]


def lines(path: Path) -> Counter[str]:
    return Counter(path.read_text().splitlines()) if path.exists() else Counter()


# -- barrier alignment in a fan-in channel ---------------------------------------------


def _drain(r: Any) -> list[Any]:
    out: list[Any] = []
    while True:
        try:
            item = r.receive_nowait()
        except EndOfStream:
            return out
        if item is None:
            return out
        out.append(item.values if isinstance(item, Batch) else item.message)


def test_a_barrier_is_returned_once_every_input_has_sent_it() -> None:
    async def main() -> None:
        ws, r = open_channel(100, clock=sw.VirtualClock(), name="m.in", writers=2)
        await ws[0].send(Batch([1]))
        ws[0].send_control(Barrier(1))
        await ws[0].send(Batch([2]))  # after input 0's barrier: held back
        ws[0].send_control(Watermark(5.0))  # also held, in order
        await ws[1].send(Batch([10]))  # before input 1's barrier: passes
        assert _drain(r) == [[1], [10]]
        assert r.fill == 1  # the held record still counts as queued
        ws[1].send_control(Barrier(1))
        await ws[1].send(Batch([11]))
        assert _drain(r) == [Barrier(1), [2], Watermark(5.0), [11]]

    asyncio.run(main())


def test_a_closed_input_counts_as_aligned() -> None:
    async def main() -> None:
        ws, r = open_channel(100, clock=sw.VirtualClock(), name="m.in", writers=3)
        ws[2].close()
        ws[0].send_control(Barrier(4))
        await ws[0].send(Batch([1]))
        assert _drain(r) == []
        ws[1].close()  # the last input without the barrier ends: aligned
        assert _drain(r) == [Barrier(4), [1]]

    asyncio.run(main())


def test_held_records_block_only_their_own_writer() -> None:
    """Held records leave the shared room (the other input can still deliver its barrier:
    no deadlock) but count against their writer (memory stays bounded)."""

    async def main() -> None:
        ws, r = open_channel(4, clock=sw.VirtualClock(), name="m.in", writers=2)
        ws[0].send_control(Barrier(1))
        await ws[0].send(Batch([1, 2, 3, 4]))
        assert _drain(r) == []  # held
        assert ws[0].room == 0  # input 0 has its capacity held
        assert ws[1].room == 4  # input 1 still has the whole channel
        blocked = asyncio.ensure_future(ws[0].send(Batch([5])))
        await asyncio.sleep(0)
        assert not blocked.done()
        await ws[1].send(Batch([9, 9, 9, 9]))
        ws[1].send_control(Barrier(1))
        got = _drain(r)
        assert got[:2] == [[9, 9, 9, 9], Barrier(1)]
        await blocked
        assert [*got[2:], *_drain(r)] == [[1, 2, 3, 4], [5]]

    asyncio.run(main())


def test_a_single_input_channel_passes_barriers_straight_through() -> None:
    async def main() -> None:
        ws, r = open_channel(10, clock=sw.VirtualClock(), name="a.in")
        ws[0].send_control(Barrier(1))
        await ws[0].send(Batch([1]))
        item = r.receive_nowait()
        assert isinstance(item, TaggedControl)
        assert item.message == Barrier(1)

    asyncio.run(main())


# -- restore equivalence: crash in the middle, restart, same output ---------------------


def _source(rows: list[dict[str, Any]], rate: float = 1000) -> sw.sources.Generator[Any]:
    return sw.sources.Generator(lambda: iter(rows), rate=rate)


def _window_rows(w: sw.WindowResult) -> list[Any]:
    return [w.key, w.start, w.end, w.value, w.kind, w.final]


def flow_tumbling(out: Path, rows: list[dict[str, Any]]) -> sw.Flow:
    flow = sw.Flow("eq")
    (
        flow.source(_source(rows), name="src")
        .with_timestamps(lambda r: r["t"], max_out_of_orderness=0.1, name="ts")
        .key_by(lambda r: r["k"], name="key")
        .window(sw.windows.Tumbling(1.0), allowed_lateness=0.2)
        .aggregate(n=sw.agg.count(), ids=sw.agg.sum(lambda r: r["id"]), name="win")
        .map(_window_rows, name="row")
        .sink(sw.sinks.JsonLines(out), name="out")
    )
    return flow


def flow_sliding_and_late(out: Path, rows: list[dict[str, Any]]) -> sw.Flow:
    flow = sw.Flow("eq")
    res = (
        flow.source(_source(rows), name="src")
        .with_timestamps(lambda r: r["t"], max_out_of_orderness=0.05, name="ts")
        .key_by(lambda r: r["k"], name="key")
        .window(sw.windows.Sliding(1.0, 0.25))
        .aggregate(sw.agg.max(lambda r: r["id"]), name="win")
    )
    res.map(_window_rows, name="row").sink(sw.sinks.JsonLines(out), name="out")
    res.late().map(lambda lr: ["late", lr.value["id"]], name="late_row").sink(
        sw.sinks.JsonLines(out.with_suffix(".late")), name="late_out"
    )
    return flow


def flow_session(out: Path, rows: list[dict[str, Any]]) -> sw.Flow:
    flow = sw.Flow("eq")
    (
        flow.source(_source([r for r in rows if r["id"] % 97 > 20]), name="src")
        .with_timestamps(lambda r: r["t"], max_out_of_orderness=0.1, name="ts")
        .key_by(lambda r: r["k"], name="key")
        .window(sw.windows.Session(gap=0.15))
        .aggregate(sw.agg.collect(lambda r: r["id"]), name="win")
        .map(lambda w: [w.key, w.start, w.end, sorted(w.value)], name="row")
        .sink(sw.sinks.JsonLines(out), name="out")
    )
    return flow


def flow_merge_and_state(out: Path, rows: list[dict[str, Any]]) -> sw.Flow:
    def running(total: int | None, r: dict[str, Any]) -> tuple[int, list[int]]:
        total = (total or 0) + r["id"]
        return total, [r["k"], r["id"], total]

    flow = sw.Flow("eq")
    a = flow.source(_source(rows[0::2]), name="a").with_timestamps(
        lambda r: r["t"], max_out_of_orderness=0.3, name="ts_a"
    )
    b = flow.source(_source(rows[1::2], rate=700), name="b").with_timestamps(
        lambda r: r["t"], max_out_of_orderness=0.3, name="ts_b"
    )
    keyed = a.merge(b, name="both").key_by(lambda r: r["k"], name="key")
    keyed.window(sw.windows.Tumbling(0.5)).aggregate(sw.agg.count(), name="win").map(
        lambda w: [w.key, w.start, w.value], name="row"
    ).sink(sw.sinks.JsonLines(out), name="out")
    keyed.stateful_map(running, name="running").filter(
        lambda row: row[1] % 50 == 0, name="some"
    ).map(lambda row: [row[0], row[1]], name="no_total").sink(
        sw.sinks.JsonLines(out.with_suffix(".state")), name="state_out"
    )
    return flow


def flow_batch(out: Path, rows: list[dict[str, Any]]) -> sw.Flow:
    flow = sw.Flow("eq")
    (
        flow.source(_source(rows), name="src")
        .map(lambda r: r["id"], name="id")
        .batch(7, max_delay=0.3, name="groups")
        .flat_map(lambda group: group, name="flat")
        .sink(sw.sinks.JsonLines(out), name="out")
    )
    return flow


def flow_async(out: Path, rows: list[dict[str, Any]]) -> sw.Flow:
    """``map_async`` holds barriers behind calls in flight: operators after it in its stage
    must snapshot after those calls' results, not when the barrier reached the stage."""

    async def slow_double(r: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {**r, "id2": r["id"] * 2}

    flow = sw.Flow("eq")
    (
        flow.source(_source(rows), name="src")
        .map_async(slow_double, concurrency=8, name="call")
        .with_timestamps(lambda r: r["t"], max_out_of_orderness=0.3, name="ts")
        .key_by(lambda r: r["k"], name="key")
        .window(sw.windows.Tumbling(2.0))
        .aggregate(sw.agg.sum(lambda r: r["id2"]), name="win")
        .map(lambda w: [w.key, w.start, w.value], name="row")
        .sink(sw.sinks.JsonLines(out), name="out")
    )
    return flow


def flow_async_uneven(out: Path, rows: list[dict[str, Any]], *, ordered: bool) -> sw.Flow:
    """Calls finishing out of order, straight into the sink: a barrier must split the
    results by the records' arrival, not by when their calls finished (the result of a
    record after the barrier, written before it, would be written again when the record
    is replayed) -- in order too, where a record after the barrier that finished first
    used to leave together with the one before it.  Each even record's call finishes
    only once the next record's call has started -- often after a barrier between."""
    started: dict[int, asyncio.Event] = {}
    last = rows[-1]["id"]

    async def uneven(r: dict[str, Any]) -> list[Any]:
        i = r["id"]
        started.setdefault(i, asyncio.Event()).set()
        if i % 2 == 0 and i < last:
            await started.setdefault(i + 1, asyncio.Event()).wait()
        return [r["k"], i]

    flow = sw.Flow("eq")
    (
        flow.source(_source(rows), name="src")
        .map_async(uneven, concurrency=8, ordered=ordered, name="call")
        .sink(sw.sinks.JsonLines(out), name="out")
    )
    return flow


def flow_processes(out: Path, rows: list[dict[str, Any]]) -> sw.Flow:
    """``map_in_processes`` holds barriers behind the pieces in worker processes: pieces
    finish out of order (even ids take longer), and no result of a record after a barrier
    may be written before it (it would be written again when the record is replayed)."""
    flow = sw.Flow("eq")
    (
        flow.source(_source(rows), name="src")
        .map_in_processes(process_fns.uneven_row, workers=2, max_in_flight=4, name="rows")
        .sink(sw.sinks.JsonLines(out), name="out")
    )
    return flow


def _pair_ids(pair: tuple[Any, Any]) -> list[Any]:
    return [None if r is None else r["id"] for r in pair]


def flow_joins(out: Path, rows: list[dict[str, Any]]) -> sw.Flow:
    """Every event-time join over two inputs that interleave differently on each run."""
    flow = sw.Flow("eq")
    a, b = (
        flow.source(_source(part, rate=rate), name=f"src_{n}")
        .with_timestamps(lambda r: r["t"], max_out_of_orderness=0.1, name=f"ts_{n}")
        .key_by(lambda r: r["k"], name=f"key_{n}")
        for n, part, rate in (("a", rows[0::2], 400), ("b", rows[1::3], 300))
    )
    joins: dict[str, Any] = {
        "window": a.window_join(b, sw.windows.Tumbling(0.5), how="full", name="wj"),
        "session": a.window_join(b, sw.windows.Session(0.02), how="left", name="sj"),
        "interval": a.interval_join(b, lower=-0.05, upper=0.05, how="left", name="ij"),
        "asof": a.asof_join(b, tolerance=0.1, allowed_lateness=0.1, name="aj"),
        "temporal": a.temporal_join(b, is_delete=lambda r: r["id"] % 11 == 0, name="tj"),
    }
    for label, joined in joins.items():
        joined.map(_pair_ids, name=f"{label}_row").sink(
            sw.sinks.JsonLines(out.with_suffix(f".{label}")), name=f"{label}_out"
        )
    joins["window"].late().map(lambda x: [x.side, x.value["id"]], name="late_row").sink(
        sw.sinks.JsonLines(out.with_suffix(".late")), name="late_out"
    )
    return flow


FLOWS: dict[str, Callable[[Path, list[dict[str, Any]]], sw.Flow]] = {
    "tumbling": flow_tumbling,
    "sliding_and_late": flow_sliding_and_late,
    "session": flow_session,
    "merge_and_state": flow_merge_and_state,
    "batch": flow_batch,
    "map_async": flow_async,
    "map_async_uneven": functools.partial(flow_async_uneven, ordered=True),
    "map_async_unordered": functools.partial(flow_async_uneven, ordered=False),
    "joins": flow_joins,
    "map_in_processes": flow_processes,
}


async def _run_until(flow: sw.Flow, ckpt: sw.Checkpoints, crash_at: float | None) -> bool:
    """Run on a fresh virtual clock; cancel at ``crash_at`` (True if it was cancelled)."""
    clock = sw.VirtualClock()
    handle = sw.start(flow, clock=clock, checkpoints=ckpt)
    if crash_at is not None:
        await clock.sleep(crash_at)
        if not handle.done():
            handle.force_stop("simulated crash")
            with pytest.raises(sw.FlowCancelledError):
                await handle.wait()
            return True
    await handle.wait()
    return False


def _outputs(work: Path) -> dict[str, Counter[str]]:
    return {p.name: lines(p) for p in sorted(work.iterdir()) if p.is_file()}


@pytest.mark.parametrize("name", list(FLOWS))
def test_crashes_and_restarts_give_the_output_of_one_uninterrupted_run(
    name: str, tmp_path: Path
) -> None:
    build, rows = FLOWS[name], records()
    (tmp_path / "once").mkdir()
    (tmp_path / "crashed").mkdir()
    once = tmp_path / "once"
    asyncio.run(_run_until(build(once / "out", rows), sw.Checkpoints(tmp_path / "c1"), None))

    crashed = tmp_path / "crashed"
    ckpt = sw.Checkpoints(tmp_path / "c2", interval=0.25)
    crashes = 0
    for at in (0.6, 0.45, 0.9, 0.3):
        crashes += asyncio.run(_run_until(build(crashed / "out", rows), ckpt, at))
    asyncio.run(_run_until(build(crashed / "out", rows), ckpt, None))
    assert crashes == 4
    want, got = _outputs(once), _outputs(crashed)
    assert sum(sum(c.values()) for c in want.values()) > 0
    assert got == want


def test_a_stop_halts_at_a_checkpoint_without_flushing_and_the_next_run_goes_on(
    tmp_path: Path,
) -> None:
    rows = records()
    ckpt = sw.Checkpoints(tmp_path / "ckpt", interval=10)
    asyncio.run(
        _run_until(flow_tumbling(tmp_path / "once", rows), sw.Checkpoints(tmp_path / "x"), None)
    )

    async def stop_midway() -> sw.RunResult:
        clock = sw.VirtualClock()
        handle = sw.start(flow_tumbling(tmp_path / "out", rows), clock=clock, checkpoints=ckpt)
        await clock.sleep(1.234)
        return await handle.stop()

    result = asyncio.run(stop_midway())
    assert result.stopped
    stopped = lines(tmp_path / "out")
    # Not drained: no window still open at the stop was fired early (a partial result
    # would differ from the uninterrupted run's).
    assert stopped
    assert not stopped - lines(tmp_path / "once"), "a stop flushed open windows"
    assert max(json.loads(x)[1] for x in stopped) < 13  # 1.234 s at 1000 records/s
    info = CheckpointStore(tmp_path / "ckpt").list()[0][0]
    assert info.final

    asyncio.run(_run_until(flow_tumbling(tmp_path / "out", rows), ckpt, None))
    assert lines(tmp_path / "out") == lines(tmp_path / "once")


def test_a_flow_that_ended_does_not_write_again_when_restarted(tmp_path: Path) -> None:
    rows = records()[:200]
    ckpt = sw.Checkpoints(tmp_path / "ckpt")
    asyncio.run(_run_until(flow_batch(tmp_path / "out", rows), ckpt, None))
    first = (tmp_path / "out").read_text()
    asyncio.run(_run_until(flow_batch(tmp_path / "out", rows), ckpt, None))
    assert (tmp_path / "out").read_text() == first


def test_a_finished_flow_run_again_ends_at_once(tmp_path: Path) -> None:
    """Nothing to do: no waiting for the next checkpoint interval to notice."""

    def build() -> sw.Flow:
        flow = sw.Flow("fin")
        flow.source(sw.sources.Iterable(list(range(10))), name="src").sink(
            sw.sinks.JsonLines(tmp_path / "out"), name="out"
        )
        return flow

    ckpt = sw.Checkpoints(tmp_path / "ckpt", interval=5)
    assert sw.testing.run_flow(build(), checkpoints=ckpt).elapsed == 0
    for _ in range(2):
        again = sw.testing.run_flow(build(), checkpoints=ckpt)
        assert again.checkpoints is not None
        assert again.checkpoints.restored_from is not None
        assert again.elapsed == 0  # was 5.0: one whole interval
    assert (tmp_path / "out").read_text() == "".join(f"{i}\n" for i in range(10))


@pytest.mark.slow
def test_a_finished_flow_run_again_ends_at_once_on_the_real_clock(tmp_path: Path) -> None:
    def build() -> sw.Flow:
        flow = sw.Flow("fin")
        flow.source(sw.sources.Iterable([1, 2]), name="src").sink(
            sw.sinks.JsonLines(tmp_path / "out"), name="out"
        )
        return flow

    ckpt = sw.Checkpoints(tmp_path / "ckpt", interval=60)
    for _ in range(2):
        result = sw.testing.run_watched(build(), run_for=5, checkpoints=ckpt)
        assert not result.stopped  # it ended by itself, long before the interval
        assert result.elapsed < 4


# -- ack barriers: commit after every sink wrote ---------------------------------------


class AckingSource(Source):
    """A list source that records each commit with what the sinks had written then."""

    def __init__(self, n: int, sinks: list[sw.sinks.Collect[Any]]) -> None:
        self.n, self.sinks, self.next = n, sinks, 0
        self.commits: list[tuple[int, int]] = []

    async def open(self, ctx: SourceContext) -> None:
        self.clock = ctx.clock

    async def next_batch(self, max_records: int) -> Batch | None:
        if self.next >= self.n:
            return None
        await self.clock.sleep(0.01)
        values = list(range(self.next, min(self.n, self.next + min(max_records, 50))))
        self.next += len(values)
        return Batch(values)

    def position(self) -> int:
        return self.next

    async def commit(self, position: Any) -> None:
        self.commits.append((position, min(len(s.items) for s in self.sinks)))


def test_without_checkpoints_an_acking_source_commits_only_what_every_sink_wrote() -> None:
    fast: sw.sinks.Collect[int] = sw.sinks.Collect()
    slow: sw.sinks.Collect[int] = sw.sinks.Collect()
    source = AckingSource(3000, [fast, slow])
    flow = sw.Flow("acks", channel_capacity=64)
    s = flow.source(source)
    s.sink(fast)

    async def crawl(x: int) -> int:
        await asyncio.sleep(0)
        return x

    s.buffer(64).map_async(crawl, concurrency=1).sink(slow)
    sw.testing.run_flow(flow)
    assert len(source.commits) > 5
    for position, written in source.commits:
        assert position <= written, "acknowledged records a sink had not written"
    assert source.commits[-1][0] == 3000
    assert [p for p, _ in source.commits] == sorted(p for p, _ in source.commits)


# -- what a user can get wrong ----------------------------------------------------------


def test_a_changed_flow_is_refused_naming_the_differences(tmp_path: Path) -> None:
    rows = records()[:100]
    ckpt = sw.Checkpoints(tmp_path / "ckpt")
    asyncio.run(_run_until(flow_batch(tmp_path / "out", rows), ckpt, None))
    changed = sw.Flow("eq")
    (
        changed.source(_source(rows), name="src")
        .map(lambda r: r["id"], name="id")
        .filter(lambda x: x > 3, name="new_filter")
        .sink(sw.sinks.JsonLines(tmp_path / "out"), name="out")
    )
    with pytest.raises(sw.CheckpointMismatchError) as err:
        asyncio.run(_run_until(changed, ckpt, None))
    msg = str(err.value)
    assert "'new_filter' (filter) is new" in msg
    assert "'groups' (batch) is gone" in msg
    assert f"sluiceway checkpoints reset {tmp_path / 'ckpt'} --flow eq" in msg
    assert "a second copy" in msg  # what a reset does to sinks that append


def test_a_source_that_cannot_resume_is_refused_up_front(tmp_path: Path) -> None:
    flow = sw.Flow("stdin")
    flow.source(sw.sources.Stdin(), name="in").sink(sw.sinks.Collect())
    with pytest.raises(sw.CheckpointError, match=r"source 'in' \(Stdin\) cannot resume"):
        sw.testing.run_flow(flow, checkpoints=sw.Checkpoints(tmp_path))


def test_an_iterable_over_a_one_shot_generator_is_refused_at_the_first_start(
    tmp_path: Path,
) -> None:
    """Refused before anything runs, not at the restart that would need the replay."""
    flow = sw.Flow("gen")
    flow.source(sw.sources.Iterable(x for x in range(10)), name="in").sink(
        sw.sinks.JsonLines(tmp_path / "out"), name="out"
    )
    with pytest.raises(sw.CheckpointError) as err:
        sw.testing.run_flow(flow, checkpoints=sw.Checkpoints(tmp_path / "ckpt"))
    msg = str(err.value)
    assert "source 'in' (Iterable) cannot resume" in msg
    assert "a list instead of a one-shot iterator" in msg
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "ckpt").exists()
    # A list is fine, and so is the generator without checkpoints.
    ok = sw.Flow("list")
    ok.source(sw.sources.Iterable(list(range(10))), name="in").sink(sw.sinks.Collect())
    sw.testing.run_flow(ok, checkpoints=sw.Checkpoints(tmp_path / "ckpt"))
    assert sw.testing.run_collect(lambda s: s, sw.sources.Iterable(x for x in range(3))) == [
        0,
        1,
        2,
    ]


def test_running_the_same_flow_object_twice_starts_every_source_afresh(
    tmp_path: Path,
) -> None:
    """A second run of one Flow object carries no source position or pace over."""
    gen = sw.sources.Generator(lambda: iter(range(20)), rate=20)
    lst = sw.sources.Iterable(list(range(5)))
    (tmp_path / "in.jsonl").write_text("".join(f"{i}\n" for i in range(4)))
    js = sw.sources.JsonLines(tmp_path / "in.jsonl")
    scripted = sw.testing.ScriptedSource([(0.0, [1, 2]), (0.5, [3])])
    outs: list[sw.sinks.Collect[Any]] = [sw.sinks.Collect() for _ in range(4)]
    flow = sw.Flow("twice")
    for i, src in enumerate((gen, lst, js, scripted)):
        flow.source(src, name=f"s{i}").sink(outs[i], name=f"o{i}")
    for run in range(2):
        for out in outs:
            out.items.clear()
        result = sw.testing.run_flow(flow)
        assert result.elapsed == pytest.approx(1.05), f"run {run}"  # 20 records at 20/s
        assert [out.items for out in outs] == [
            list(range(20)),
            list(range(5)),
            list(range(4)),
            [1, 2, 3],
        ]
        assert (gen.position(), lst.position()) == (20, 5)
        assert js.position() == {"offset": 8, "line": 4}


def test_a_restored_position_is_not_carried_into_a_later_run_without_checkpoints(
    tmp_path: Path,
) -> None:
    def build(src: sw.sources.Source) -> tuple[sw.Flow, sw.sinks.Collect[Any]]:
        out: sw.sinks.Collect[Any] = sw.sinks.Collect()
        flow = sw.Flow("restored")
        flow.source(src, name="src").sink(out, name="out")
        return flow, out

    path = tmp_path / "in.jsonl"
    path.write_text("".join(f"{i}\n" for i in range(6)))
    for i, make in enumerate(
        [lambda: sw.sources.JsonLines(path), lambda: sw.sources.Generator(lambda: iter(range(6)))]
    ):
        ckpt = sw.Checkpoints(tmp_path / f"ckpt{i}")
        sw.testing.run_flow(build(make())[0], checkpoints=ckpt)
        flow, out = build(make())
        sw.testing.run_flow(flow, checkpoints=ckpt)  # restored at the end: nothing new
        assert out.items == []
        sw.testing.run_flow(flow)  # no checkpoints: from the start
        assert out.items == list(range(6))
    sink_path = tmp_path / "out.jsonl"
    flow = sw.Flow("restored")
    flow.source(sw.sources.Iterable([1, 2]), name="src").sink(
        sw.sinks.JsonLines(sink_path), name="out"
    )
    sw.testing.run_flow(flow, checkpoints=sw.Checkpoints(tmp_path / "ckpt2"))
    sw.testing.run_flow(flow, checkpoints=sw.Checkpoints(tmp_path / "ckpt2"))
    sw.testing.run_flow(flow)  # appends; it must not cut the file back to a checkpoint
    assert sink_path.read_text() == "1\n2\n1\n2\n"


def test_a_sink_file_shorter_than_the_checkpoint_says_is_an_error(tmp_path: Path) -> None:
    rows = records()[:100]
    ckpt = sw.Checkpoints(tmp_path / "ckpt")
    asyncio.run(_run_until(flow_batch(tmp_path / "out", rows), ckpt, None))
    (tmp_path / "out").write_text("")
    with pytest.raises(
        sw.CheckpointError, match=r"recorded \d+ bytes written, but the file has only 0"
    ):
        asyncio.run(_run_until(flow_batch(tmp_path / "out", rows), ckpt, None))


def test_a_torn_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = records()
    ckpt = sw.Checkpoints(tmp_path / "ckpt", interval=0.25)
    asyncio.run(
        _run_until(flow_tumbling(tmp_path / "once", rows), sw.Checkpoints(tmp_path / "x"), None)
    )
    asyncio.run(_run_until(flow_tumbling(tmp_path / "out", rows), ckpt, 1.3))
    store = CheckpointStore(tmp_path / "ckpt")
    newest = store.list()[0][0].id
    store.close()
    conn = sqlite3.connect(tmp_path / "ckpt" / "checkpoints.db")
    with conn:
        conn.execute(
            "UPDATE parts SET data = zeroblob(length(data)) WHERE checkpoint_id = ? "
            "AND name = 'win'",
            (newest,),
        )
    conn.close()
    with caplog.at_level(logging.WARNING, logger="sluiceway"):
        asyncio.run(_run_until(flow_tumbling(tmp_path / "out", rows), ckpt, None))
    assert f"checkpoint {newest}" in caplog.text
    assert lines(tmp_path / "out") == lines(tmp_path / "once")


def test_state_that_cannot_be_pickled_names_the_operator(tmp_path: Path) -> None:
    flow = sw.Flow("unpicklable")
    (
        flow.source(sw.sources.Iterable(range(10)), name="in")
        .key_by(lambda x: x % 2, name="key")
        .stateful_map(lambda s, v: (lambda: v, v), name="holds_a_lambda")
        .sink(sw.sinks.Collect(), name="out")
    )
    with pytest.raises(sw.CheckpointError, match="holds_a_lambda"):
        sw.testing.run_flow(flow, checkpoints=sw.Checkpoints(tmp_path))


# -- the command line ------------------------------------------------------------------


FLOW_FILE = """
import sluiceway as sw

flow = sw.Flow("cli")
(
    flow.source(sw.sources.JsonLines({inp!r}), name="in")
    .key_by(lambda r: r["k"], name="key")
    .stateful_map(lambda n, r: ((n or 0) + 1, [r["k"], (n or 0) + 1]), name="count")
    .sink(sw.sinks.JsonLines({out!r}), name="out")
)
"""


def test_run_with_a_checkpoint_dir_restores_on_the_second_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"k": i % 3}) + "\n" for i in range(30)))
    (tmp_path / "job.py").write_text(FLOW_FILE.format(inp=str(inp), out=str(out)))
    target = f"{tmp_path / 'job.py'}:flow"
    ckdir = tmp_path / "ck"
    assert main(["run", target, "--checkpoint-dir", str(ckdir), "--checkpoint-interval", "1"]) == 0
    assert len(out.read_text().splitlines()) == 30
    with inp.open("a") as f:  # more input: the second run goes on from the checkpoint
        f.write("".join(json.dumps({"k": i % 3}) + "\n" for i in range(6)))
    assert main(["run", target, "--checkpoint-dir", str(ckdir)]) == 0
    err = capsys.readouterr().err
    assert "restored from checkpoint" in err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 36
    assert [r[1] for r in rows if r[0] == 0][-2:] == [11, 12]  # counts carried over


def test_a_checkpoint_interval_without_a_dir_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "job.py").write_text(FLOW_FILE.format(inp="x", out="y"))
    assert main(["run", f"{tmp_path / 'job.py'}:flow", "--checkpoint-interval", "2"]) == 2
    assert "--checkpoint-interval needs --checkpoint-dir" in capsys.readouterr().err


# -- the documentation -----------------------------------------------------------------


def test_the_first_example_of_the_checkpoints_page_runs_and_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    page = Path(__file__).resolve().parent.parent / "docs" / "checkpoints.md"
    block = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)[0]
    block = block.replace("sw.run(flow,", "sw.run(flow, handle_signals=False,")
    monkeypatch.chdir(tmp_path)
    orders = [{"ts": i * 7.0, "customer": f"c{i % 3}", "amount": i} for i in range(40)]
    Path("orders.jsonl").write_text("".join(json.dumps(o) + "\n" for o in orders))
    exec(compile(block, str(page), "exec"), {})
    first = Path("totals.jsonl").read_text()
    assert len(first.splitlines()) == 15  # 5 minutes x 3 customers
    with caplog.at_level(logging.INFO, logger="sluiceway"):
        exec(compile(block, str(page), "exec"), {})
    assert "restored from checkpoint" in caplog.text
    assert Path("totals.jsonl").read_text() == first


# -- metrics ---------------------------------------------------------------------------


def test_checkpoint_metrics_in_the_snapshot_and_for_prometheus(tmp_path: Path) -> None:
    rows = records()[:500]
    ckpt = sw.Checkpoints(tmp_path / "ckpt", interval=0.1)
    result = sw.testing.run_flow(flow_tumbling(tmp_path / "out", rows), checkpoints=ckpt)
    ck = result.metrics.checkpoints
    assert ck is not None
    assert result.checkpoints is not None
    assert ck.completed == result.checkpoints.completed > 3  # 0.5 s at 0.1 s, first, last
    with CheckpointStore(tmp_path / "ckpt") as store:
        stored = store.list()[0][0]
        # the window's state is a chain (a base and deltas): the checkpoint holds all of it
        held = sum(
            p.size + sum(ch.base_size + ch.delta_size for ch in p.chains)
            for p in store.parts(stored.id, stored.flow)
        )
    assert (ck.last_id, ck.last_size) == (stored.id, held)
    assert ck.restored_from is None
    values = {
        (m.name, s.name): s.value
        for m in metric_families(result.metrics)
        for s in m.samples
        if "checkpoint" in m.name
    }
    completed = "sluiceway_checkpoints_completed"
    assert values[(completed, f"{completed}_total")] == ck.completed
    size, last = "sluiceway_checkpoint_size_bytes", "sluiceway_checkpoint_last_id"
    assert values[(size, size)] == held
    assert values[(last, last)] == stored.id
    plain = sw.testing.run_flow(flow_tumbling(tmp_path / "out2", rows))
    assert plain.metrics.checkpoints is None
    assert not [m for m in metric_families(plain.metrics) if "checkpoint" in m.name]


def test_an_overwrite_dead_letter_sink_keeps_what_earlier_runs_wrote_on_resume(
    tmp_path: Path,
) -> None:
    """``mode="overwrite"`` empties the file on a fresh start only: a resumed run appends
    (dead letters are at-least-once; none may be lost)."""
    rows = list(range(2000))

    def build() -> sw.Flow:
        dead = sw.sinks.JsonLines(tmp_path / "dead.jsonl", mode="overwrite")
        flow = sw.Flow("dl")
        (
            flow.source(sw.sources.Generator(lambda: iter(rows), rate=1000), name="src")
            .map(lambda x: x // (x % 10), on_error=sw.DeadLetter(dead), name="div")
            .sink(sw.sinks.JsonLines(tmp_path / "out.jsonl"), name="out")
        )
        return flow

    (tmp_path / "dead.jsonl").write_text('"from an earlier, unrelated run"\n')
    ckpt = sw.Checkpoints(tmp_path / "ckpt", interval=0.25)
    assert asyncio.run(_run_until(build(), ckpt, 0.7))  # crashed
    assert asyncio.run(_run_until(build(), ckpt, 0.6))  # crashed again
    asyncio.run(_run_until(build(), ckpt, None))
    dead = [json.loads(x) for x in (tmp_path / "dead.jsonl").read_text().splitlines()]
    assert "from an earlier, unrelated run" not in dead  # the fresh start emptied it
    assert {d["record"] for d in dead} == set(range(0, 2000, 10))  # none lost
    assert sum(lines(tmp_path / "out.jsonl").values()) == 1800  # exactly once


def test_flows_sharing_a_checkpoint_directory_keep_their_own_checkpoints(
    tmp_path: Path,
) -> None:
    """One after the other and at the same time: each flow restores its own checkpoint,
    whatever the other saved (keep and ids count per flow)."""
    rows = list(range(3000))
    ckpt = sw.Checkpoints(tmp_path / "shared", interval=0.25, keep=3)

    def build(name: str) -> sw.Flow:
        flow = sw.Flow(name)
        flow.source(sw.sources.Generator(lambda: iter(rows), rate=1000), name="src").sink(
            sw.sinks.JsonLines(tmp_path / f"{name}.jsonl"), name="out"
        )
        return flow

    async def stop_at(flow: sw.Flow, at: float) -> sw.RunResult:
        clock = sw.VirtualClock()
        handle = sw.start(flow, clock=clock, checkpoints=ckpt)
        await clock.sleep(at)
        return await handle.stop()

    asyncio.run(stop_at(build("orders"), 0.8))  # stops at its checkpoint 4
    asyncio.run(_run_until(build("audit"), ckpt, None))  # a dozen checkpoints
    asyncio.run(_run_until(build("orders"), ckpt, None))  # restores its own, not from 0
    for name in ("orders", "audit"):
        assert lines(tmp_path / f"{name}.jsonl") == Counter(str(r) for r in rows), name

    async def both() -> list[sw.RunResult]:
        handles = [
            sw.start(build(name), clock=sw.VirtualClock(), checkpoints=ckpt)
            for name in ("a", "b", "c")
        ]
        return [await h.wait() for h in handles]

    results = asyncio.run(both())
    assert all(r.checkpoints is not None and r.checkpoints.completed > 5 for r in results)
    for name in ("a", "b", "c"):
        assert lines(tmp_path / f"{name}.jsonl") == Counter(str(r) for r in rows), name
    store = CheckpointStore(tmp_path / "shared")
    assert store.flows() == ["a", "audit", "b", "c", "orders"]
    assert all(len(store.list(name)) == 3 for name in store.flows())
    store.close()


def test_a_sinks_final_pre_commit_waits_for_the_commit_in_progress(tmp_path: Path) -> None:
    """The input ends while the previous checkpoint's commit is still running: the sink's
    final ``pre_commit`` must not start until that commit is done (a Kafka sink's final
    pre-commit found its transaction committed under it: "Operation not valid in state
    Ready")."""
    calls: list[str] = []

    class SlowCommit(sw.sinks.Sink):
        def __init__(self) -> None:
            self.committing = False
            self.overlaps: list[int | None] = []
            self.clock: sw.Clock | None = None

        async def open(self, ctx: Any) -> None:
            self.clock = ctx.clock

        async def write(self, batch: Batch) -> None:
            calls.append("write")

        async def pre_commit(self, checkpoint_id: int | None) -> Any:
            if self.committing:
                self.overlaps.append(checkpoint_id)
            calls.append(f"pre_commit {checkpoint_id}")
            return None

        async def commit(self, checkpoint_id: int, state: Any) -> None:
            assert self.clock is not None
            self.committing = True
            await self.clock.sleep(0.3)
            self.committing = False
            calls.append(f"commit {checkpoint_id}")

    sink = SlowCommit()
    f = sw.Flow("slow-commit")
    (
        f.source(sw.sources.Iterable(list(range(200))), name="in")
        .rate_limit(sw.flowcontrol.TokenBucket(rate=100, burst=10), name="pace")
        .sink(sink, name="out")
    )
    sw.run(f, clock=sw.VirtualClock(), checkpoints=sw.Checkpoints(tmp_path / "ck", interval=0.1))
    assert "pre_commit None" in calls
    assert sink.overlaps == []
