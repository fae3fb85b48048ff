"""The flow the crash test kills (run as a subprocess by test_checkpoint_crash.py).

Reads a JSON Lines file of ``{"id", "k", "t"}`` records, paced by a token bucket so a
run lasts long enough to be killed mid-stream; splits the stream by parity and merges it
back (a fan-in, so barriers are aligned); counts and sums per key in one-second event
time windows; keeps a running count per key in user state; writes both to exactly-once
JSON Lines sinks.  The crash matrix: beside those, every other operator that holds
state or records -- session windows, a process function with event-time timers,
``map_async`` with calls finishing out of order, ``batch`` with a delay, a keyed count
whose checkpoints are change sets (incremental: a base and deltas, compacted every three)
-- writes to a sink of its own.  ``--sink naive`` swaps in a sink that neither truncates
on restore nor at close: the at-least-once sink that must make the test fail.
``--die-compacting N``: the process SIGKILLs itself inside the transaction of its Nth
compaction (after the new base is written, before the commit).

``--state disk`` keeps the keyed state (stateful_map, process) in ``sw.state.OnDisk`` files
under WORKDIR/state with a cache of 8 of the 50 keys.

It prints ``ready`` once the flow is built (nothing opened yet), then waits for a line on
stdin before it runs: the test starts the next run while this one still runs, so that
the kills come one after the other, not an interpreter's start apart.  Stdin closed
without a line: it ends without running.

Usage: crash_child.py INPUT WORKDIR RATE [--sink atomic|naive] [--state memory|disk]
[--die-compacting N]
"""

from __future__ import annotations

import os
import random
import signal
import sys
from pathlib import Path
from typing import Any, ClassVar

import sluiceway as sw
from sluiceway.checkpoint.store import CheckpointStore
from sluiceway.connectors.files import JsonLinesSink
from sluiceway.core.delta import Changes, Incremental
from sluiceway.flowcontrol import TokenBucket
from sluiceway.metrics.registry import OperatorMetrics
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.runtime.messages import Batch

STATE_EVERY = 50  # the user-state branch writes every 50th count of a key


class NaiveJsonLines(JsonLinesSink):
    """Appends and never takes anything back: duplicates after a crash."""

    exactly_once = False

    def restore(self, state: Any) -> None:
        pass

    async def pre_commit(self, checkpoint_id: int | None) -> Any:
        return None

    async def commit(self, checkpoint_id: int, state: Any) -> None:
        pass


def running_count(count: int | None, record: dict[str, Any]) -> tuple[int, Any]:
    n = (count or 0) + 1
    return n, {"k": record["k"], "n": n, "id": record["id"]} if n % STATE_EVERY == 0 else None


class PerSecond:
    """Per key and second of event time: how many records, emitted by a timer at the
    end of the second (the same numbers as the tumbling windows, through user state;
    for every fifth key, to keep the test fast)."""

    def process(self, ctx: Any, record: dict[str, Any]) -> None:
        second = float(int(ctx.timestamp))
        counts = ctx.map("counts")
        counts.put(second, counts.get(second, 0) + 1)
        ctx.timers.at_event_time(second + 1.0)

    def on_timer(self, ctx: Any, time: float) -> None:
        counts = ctx.map("counts")
        ctx.emit({"k": ctx.key, "start": time - 1.0, "count": counts.get(time - 1.0, 0)})
        counts.remove(time - 1.0)


class DeltaCounts(OpSpec):
    """A running count per key, like ``counts``, whose snapshots are change sets: the
    keys counted since the previous snapshot (whole the first time)."""

    kind: ClassVar[str] = "delta_counts"

    def build(self, ctx: BuildContext) -> Step:
        return DeltaCountsStep(ctx.name, ctx.metrics)


class DeltaCountsStep(Step):
    def __init__(self, name: str, metrics: OperatorMetrics) -> None:
        super().__init__(name, metrics)
        self.counts: dict[int, int] = {}
        self.dirty: set[int] = set()
        self.whole = True

    async def push(self, batch: Batch) -> None:
        out = []
        for record in batch.values:
            n = self.counts[record["k"]] = self.counts.get(record["k"], 0) + 1
            self.dirty.add(record["k"])
            if n % STATE_EVERY == 0:
                out.append({"k": record["k"], "n": n, "id": record["id"]})
        self.metrics.state = len(self.counts)
        if out:
            await self.emit(Batch(out))

    def snapshot(self) -> Any:
        upserts = dict(self.counts) if self.whole else {k: self.counts[k] for k in self.dirty}
        changes = Changes(self.whole, upserts)
        self.whole, self.dirty = False, set()
        return Incremental({None: changes})

    def restore(self, state: Any) -> None:
        self.counts = dict(state.partitions[None].upserts) if state.partitions else {}
        self.whole = False


def die_inside_compaction(nth: int) -> None:
    """SIGKILL this process inside the transaction of its ``nth`` compaction."""
    compact, drop = CheckpointStore._compact_chain, CheckpointStore._drop_unreferenced
    seen = [0, False]

    def compact_chain(self: CheckpointStore, *args: Any) -> int:
        seen[0] += 1
        seen[1] = True
        try:
            return compact(self, *args)
        finally:
            seen[1] = False

    def drop_unreferenced(conn: Any, flow: str | None) -> None:
        drop(conn, flow)
        if seen[1] and seen[0] >= nth:
            print("dying inside a compaction", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    CheckpointStore._compact_chain = compact_chain  # type: ignore[method-assign]
    CheckpointStore._drop_unreferenced = staticmethod(drop_unreferenced)  # type: ignore[method-assign,assignment]


def build(
    inp: str, work: Path, rate: float, naive: bool, clock: sw.Clock, disk: bool = False
) -> sw.Flow:
    sink = NaiveJsonLines if naive else sw.sinks.JsonLines
    state = sw.state.OnDisk(path=work / "state", cache_keys=8) if disk else None
    flow = sw.Flow("crash", state=state)
    s = flow.source(sw.sources.JsonLines(inp), name="input")
    s = s.rate_limit(TokenBucket(rate=rate, burst=500), name="pace")
    s = s.with_timestamps(lambda r: r["t"], max_out_of_orderness=0.1, name="stamp")
    evens = s.filter(lambda r: r["id"] % 2 == 0, name="evens")
    odds = s.filter(lambda r: r["id"] % 2 == 1, name="odds")
    keyed = evens.merge(odds, name="merged").key_by(lambda r: r["k"], name="by_key")
    (
        keyed.window(sw.windows.Tumbling(1.0))
        .aggregate(n=sw.agg.count(), total=sw.agg.sum(lambda r: r["id"]), name="per_second")
        .map(
            lambda w: {
                "k": w.key,
                "start": w.start,
                "count": w.value["n"],
                "sum": w.value["total"],
            },
            name="window_row",
        )
        .sink(sink(work / "windows.jsonl"), name="windows_out")
    )
    (
        keyed.stateful_map(running_count, name="counts")
        .filter(lambda row: row is not None, name="every_50th")
        .sink(sink(work / "counts.jsonl"), name="counts_out")
    )
    (
        keyed.window(sw.windows.Session(gap=0.5))
        .aggregate(sw.agg.count(), name="sessions")
        .map(lambda w: {"k": w.key, "start": w.start, "count": w.value}, name="session_row")
        .sink(sink(work / "sessions.jsonl"), name="sessions_out")
    )
    keyed._wrap(keyed._derive(DeltaCounts(), "delta_counts", "delta_counts")).sink(
        sink(work / "delta_counts.jsonl"), name="delta_counts_out"
    )
    keyed.filter(lambda r: r["k"] % 5 == 0, name="fifth").process(
        PerSecond, name="per_second_timers"
    ).sink(sink(work / "timers.jsonl"), name="timers_out")
    jitter = random.Random()

    async def call(record: dict[str, Any]) -> dict[str, Any]:
        await clock.sleep(jitter.uniform(0.0, 0.003))  # calls finish out of order
        return {"id": record["id"]}

    (
        keyed.filter(lambda r: r["id"] % 10 == 0, name="tenth")
        .map_async(call, concurrency=32, ordered=False, name="call")
        .sink(sink(work / "calls.jsonl"), name="calls_out")
    )
    (
        s.filter(lambda r: r["id"] % 10 == 5, name="other_tenth")
        .map(lambda r: r["id"], name="ids")
        .batch(7, max_delay=0.02, name="lists")
        .map(lambda ids: {"ids": ids}, name="list_row")
        .sink(sink(work / "lists.jsonl"), name="lists_out")
    )
    return flow


def main() -> None:
    inp, work, rate = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    naive = "--sink" in sys.argv and sys.argv[sys.argv.index("--sink") + 1] == "naive"
    if "--die-compacting" in sys.argv:
        die_inside_compaction(int(sys.argv[sys.argv.index("--die-compacting") + 1]))
    disk = "--state" in sys.argv and sys.argv[sys.argv.index("--state") + 1] == "disk"
    clock = sw.SystemClock()
    flow = build(inp, work, rate, naive, clock, disk)
    print("ready", flush=True)
    if not sys.stdin.readline():  # the test went away before this run's turn
        return
    store = sys.argv[sys.argv.index("--store") + 1] if "--store" in sys.argv else work / "ckpt"
    checkpoints = sw.Checkpoints(store, interval=0.05, compact_after=3)
    sw.run(flow, clock=clock, checkpoints=checkpoints)


if __name__ == "__main__":
    main()
