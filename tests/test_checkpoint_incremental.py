"""Incremental parts in the checkpoint store: per (flow, operator, partition) a base and
the chain of deltas after it; ``keep`` never deletes a segment a kept checkpoint needs;
compaction folds a chain into a new base in one transaction (a SIGKILL in the middle
leaves the old chain valid); a version 2 file is migrated."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest

import sluiceway as sw
from sluiceway.checkpoint import FORMAT_VERSION, CheckpointStore, OperatorState, codec
from sluiceway.checkpoint import store as store_module
from sluiceway.checkpoint.keys import KeyRing
from sluiceway.checkpoint.store import Segment
from sluiceway.core.delta import Changes, Incremental
from sluiceway.core.delta import fold as fold_changes
from sluiceway.errors import CheckpointError
from sluiceway.metrics.prometheus import metric_families
from sluiceway.metrics.registry import OperatorMetrics
from sluiceway.metrics.web import flow_graph, flow_state
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.operators.keyed_state import _KeyedProcessStep
from sluiceway.runtime import compactor
from sluiceway.runtime.executor import Executor
from sluiceway.runtime.messages import Batch
from sluiceway.runtime.segments import decode_changes, encode_changes, fold_segments
from sluiceway.state import KeyedStore
from sluiceway.testing import run_watched
from sluiceway.time import SystemClock

FLOW = "counts"
KEY = KeyRing.parse("k" * 32, source="test").current
BASE = codec.segment_context(FLOW, "sum", "-", base=True)
DELTA = codec.segment_context(FLOW, "sum", "-", base=False)
SRC = Path(__file__).resolve().parents[1] / "src"


def enc(whole: bool, upserts: dict[str, int], deletes: Sequence[str] = ()) -> Segment:
    """A toy encoding (the runtime's is pickle): JSON of the changes."""
    data = json.dumps({"set": upserts, "del": sorted(deletes)}, sort_keys=True).encode()
    return Segment(whole, data)


def fold(operator: str, partition: str, blobs: Sequence[bytes]) -> bytes:
    """The store's fold callable: (operator, partition, the chain's segments)."""
    state: dict[str, int] = {}
    for blob in blobs:
        changes = json.loads(blob)
        for key in changes["del"]:
            state.pop(key, None)
        state.update(changes["set"])
    return json.dumps({"set": state, "del": []}, sort_keys=True).encode()


def folded(chain: Sequence[bytes]) -> dict[str, int]:
    result: dict[str, int] = json.loads(fold("sum", "0", chain))["set"]
    return result


def part(segments: dict[str, Segment], dropped: frozenset[str] = frozenset()) -> OperatorState:
    return OperatorState("sum", "stateful_map", b"", segments, dropped)


def save(
    store: CheckpointStore, cid: int, op: OperatorState, parent: int | None
) -> store_module.CheckpointInfo:
    states = {"src": OperatorState("src", "source", str(cid).encode()), op.name: op}
    return store.save(FLOW, cid, states, created=1e9 + cid, duration=0.1, parent=parent)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[CheckpointStore]:
    with CheckpointStore(tmp_path, keep=2) as s:
        yield s


def segment_count(store: CheckpointStore) -> int:
    with sqlite3.connect(store.path) as conn:
        return int(conn.execute("SELECT count(*) FROM segments").fetchone()[0])


def test_a_chain_is_a_base_then_deltas_and_partitions_carry_on(store: CheckpointStore) -> None:
    info = save(store, 1, part({"0": enc(True, {"a": 1}), "1": enc(True, {"x": 9})}), None)
    assert (info.base_bytes > 0, info.delta_bytes) == (True, 0)
    info = save(store, 2, part({"0": enc(False, {"b": 2}, ["a"])}), 1)
    assert (info.base_bytes, info.delta_bytes > 0) == (0, True)
    latest = store.latest(FLOW)
    assert latest is not None
    chains = latest.chains["sum"]
    assert sorted(chains) == ["0", "1"]
    assert len(chains["0"]) == 2  # base, one delta
    assert folded(chains["0"]) == {"b": 2}
    assert folded(chains["1"]) == {"x": 9}  # no change: the parent's chain, carried on
    assert latest.states["src"].data == b"2"
    save(store, 3, part({}, dropped=frozenset({"1"})), 2)
    latest = store.latest(FLOW)
    assert latest is not None
    assert sorted(latest.chains["sum"]) == ["0"]


def test_keep_never_deletes_a_base_a_kept_checkpoint_needs(store: CheckpointStore) -> None:
    save(store, 1, part({"0": enc(True, {"k0": 0})}), None)
    for cid in range(2, 6):
        save(store, cid, part({"0": enc(False, {f"k{cid}": cid})}), cid - 1)
    assert [info.id for info, _ in store.list()] == [5, 4]  # keep=2: 1 is pruned...
    for cid in (4, 5):  # ...but its base is what 4 and 5 fold from
        chain = store.load(cid, FLOW).chains["sum"]["0"]
        assert folded(chain) == {f"k{n}": n for n in range(cid + 1) if n != 1}
    assert segment_count(store) == 5  # the base and the 4 deltas, all still needed


def test_a_delta_without_a_base_is_refused(store: CheckpointStore) -> None:
    with pytest.raises(CheckpointError, match=r"partition '0', but no parent checkpoint"):
        save(store, 1, part({"0": enc(False, {"a": 1})}), None)
    save(store, 2, part({"0": enc(True, {"a": 1})}), None)
    with pytest.raises(CheckpointError, match=r"partition '7', but checkpoint 2 holds"):
        save(store, 3, part({"7": enc(False, {"a": 1})}), 2)
    assert store.next_id(FLOW) == 3  # the refused save left nothing


def test_a_restored_older_parent_forks_the_chain(tmp_path: Path) -> None:
    """After a restart from checkpoint 2 (3 was not committed by a sink), the next deltas
    follow 2, not 3."""
    with CheckpointStore(tmp_path, keep=3) as store:
        save(store, 1, part({"0": enc(True, {"a": 1})}), None)
        save(store, 2, part({"0": enc(False, {"b": 2})}), 1)
        save(store, 3, part({"0": enc(False, {"c": 3})}), 2)
        save(store, 4, part({"0": enc(False, {"d": 4})}), 2)
        latest = store.latest(FLOW)
        assert latest is not None
        assert folded(latest.chains["sum"]["0"]) == {"a": 1, "b": 2, "d": 4}


def test_compaction_folds_a_long_chain_into_a_new_base(store: CheckpointStore) -> None:
    save(store, 1, part({"0": enc(True, {f"k{i}": i for i in range(100)})}), None)
    for cid in range(2, 5):
        save(store, cid, part({"0": enc(False, {"k0": cid})}), cid - 1)
    assert store.compact(FLOW, fold, after=10) == 0  # small deltas, few of them
    assert store.compact(FLOW, fold, after=3) == 1
    assert segment_count(store) == 4  # 3's base and 2 deltas, 4's new base (its delta went)
    latest = store.latest(FLOW)
    assert latest is not None
    assert len(latest.chains["sum"]["0"]) == 1
    assert folded(latest.chains["sum"]["0"])["k0"] == 4
    older = store.load(3, FLOW).chains["sum"]["0"]  # keeps its own chain
    assert (len(older), folded(older)["k0"]) == (3, 3)
    save(store, 5, part({"0": enc(False, {"k1": 5})}), 4)  # follows the new base
    chain = store.load(5, FLOW).chains["sum"]["0"]
    assert len(chain) == 2
    assert (folded(chain)["k0"], folded(chain)["k1"]) == (4, 5)
    assert segment_count(store) == 2  # 3 is pruned (keep=2), and its chain with it


def test_a_checkpoint_saved_during_a_compaction_gets_the_new_base_too(tmp_path: Path) -> None:
    """Compaction runs beside the flow's next checkpoints: one saved on top of the chain
    being folded (here: from another connection, while the fold runs) starts with the
    new base afterwards, followed by its own delta."""
    with CheckpointStore(tmp_path, keep=5) as store, CheckpointStore(tmp_path, keep=5) as flow:
        save(store, 1, part({"0": enc(True, {"a": 1})}), None)
        for cid in (2, 3):
            save(store, cid, part({"0": enc(False, {f"k{cid}": cid})}), cid - 1)

        def fold_while_the_flow_saves(op: str, partition: str, blobs: Sequence[bytes]) -> bytes:
            save(flow, 4, part({"0": enc(False, {"k4": 4})}), 3)
            return fold(op, partition, blobs)

        assert store.compact(FLOW, fold_while_the_flow_saves, after=2) == 1
        four, three = store.load(4, FLOW), store.load(3, FLOW)
        assert len(three.chains["sum"]["0"]) == 1
        assert len(four.chains["sum"]["0"]) == 2  # the new base, then 4's delta
        assert four.chains["sum"]["0"][0] == three.chains["sum"]["0"][0]
        assert folded(four.chains["sum"]["0"]) == {"a": 1, "k2": 2, "k3": 3, "k4": 4}
        assert folded(store.load(2, FLOW).chains["sum"]["0"]) == {"a": 1, "k2": 2}


def test_compaction_by_bytes(store: CheckpointStore) -> None:
    save(store, 1, part({"0": enc(True, {"a": 1})}), None)
    save(store, 2, part({"0": enc(False, {f"k{i}": i for i in range(20)})}), 1)
    assert store.compact(FLOW, fold, ratio=0.5, after=100) == 1


def test_inspect_shows_base_and_delta_sizes(store: CheckpointStore) -> None:
    base = enc(True, {"a": 1})
    delta = enc(False, {"b": 2})
    save(store, 1, part({"0": base}), None)
    save(store, 2, part({"0": delta}), 1)
    [chain] = next(p for p in store.parts(2, FLOW) if p.name == "sum").chains
    assert (chain.partition, chain.base_size, chain.deltas, chain.delta_size) == (
        "0",
        len(base.data),
        1,
        len(delta.data),
    )


def test_a_missing_or_altered_segment_tears_the_checkpoint(
    store: CheckpointStore, caplog: pytest.LogCaptureFixture
) -> None:
    save(store, 1, part({"0": enc(True, {"a": 1})}), None)
    save(store, 2, part({"0": enc(False, {"b": 2})}), 1)
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE segments SET data = X'00' WHERE whole = 0")
    latest = store.latest(FLOW)
    assert latest is not None
    assert latest.info.id == 1
    assert "segment 1 of partition 0 of operator 'sum' was altered" in caplog.text


def test_a_version_2_store_is_migrated(tmp_path: Path) -> None:
    """A file written by format version 2 gains the tables of incremental parts; its
    checkpoints verify as before and keep format_version 2 in their rows."""
    path = tmp_path / CheckpointStore.FILENAME
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in store_module._SCHEMA_2:
        conn.execute(statement)
    conn.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [("application", "sluiceway-checkpoints"), ("format_version", "2"), ("last_id", "0")],
    )
    data = b"offset=42"
    sha = hashlib.sha256(data).hexdigest()
    digest = store_module._digest(
        3, FLOW, final=False, size=len(data), count=1, format_version=2,
        parts=[("src", "source", sha)],
    )  # fmt: skip
    conn.execute(
        "INSERT INTO checkpoints VALUES (?, 3, 1e9, 0.1, ?, 1, 0, 2, ?)", (FLOW, len(data), digest)
    )
    conn.execute(
        "INSERT INTO parts VALUES (?, 3, 'src', 'source', ?, ?, ?)", (FLOW, len(data), sha, data)
    )
    conn.execute("INSERT INTO flows VALUES (?, 3)", (FLOW,))
    conn.close()
    with CheckpointStore(tmp_path) as store:
        [(info, problem)] = store.list(FLOW)
        assert (info.id, info.format_version, problem) == (3, 2, None)
        save(store, 4, part({"0": enc(True, {"a": 1})}), 3)
        latest = store.latest(FLOW)
        assert latest is not None
        assert latest.info.format_version == FORMAT_VERSION == 3
        assert store.load(3, FLOW).states["src"].data == data
    meta = dict(sqlite3.connect(path).execute("SELECT key, value FROM meta").fetchall())
    assert meta["format_version"] == "3"


COMPACTOR = textwrap.dedent(
    """
    import json, os, signal, sqlite3, sys
    from sluiceway.checkpoint.store import CheckpointStore, OperatorState, Segment

    directory = sys.argv[1]
    wal = os.path.join(directory, "checkpoints.db-wal")
    armed, threshold = False, 0

    def crash_once_the_wal_holds_uncommitted_pages():
        if armed and os.path.getsize(wal) > threshold:
            os.kill(os.getpid(), signal.SIGKILL)
        return 0

    real_connect = sqlite3.connect

    def connect(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        conn.set_progress_handler(crash_once_the_wal_holds_uncommitted_pages, 50)
        return conn

    sqlite3.connect = connect

    def seg(whole, values):
        return Segment(whole, json.dumps({"set": values, "del": []}).encode())

    def fold(operator, partition, blobs):
        state = {}
        for blob in blobs:
            state.update(json.loads(blob)["set"])
        return json.dumps({"set": state, "del": [], "pad": "x" * 8_000_000}).encode()

    store = CheckpointStore(directory)
    base = {f"k{i}": i for i in range(1000)}
    store.save("crashy", 1, {"op": OperatorState("op", "map", b"", {"0": seg(True, base)})},
               created=1.0, duration=0.0)
    for cid in range(2, 5):
        op = OperatorState("op", "map", b"", {"0": seg(False, {"k0": cid})})
        store.save("crashy", cid, {"op": op}, created=cid, duration=0.0, parent=cid - 1)
    threshold = os.path.getsize(wal) + 4_000_000
    armed = True
    print("compacting", flush=True)
    store.compact("crashy", fold, after=3)
    print("compacted", flush=True)
    """
)


def test_a_sigkill_during_compaction_leaves_the_old_chain(tmp_path: Path) -> None:
    script = tmp_path / "compactor.py"
    script.write_text(COMPACTOR)
    directory = tmp_path / "cp"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run(
        [sys.executable, str(script), str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout == "compacting\n"  # killed inside the compaction's transaction
    with CheckpointStore(directory) as store:
        latest = store.latest("crashy")
        assert latest is not None
        chain = latest.chains["op"]["0"]
        assert len(chain) == 4  # the old base and its three deltas, intact
        assert folded(chain)["k0"] == 4
        assert store.compact("crashy", fold, after=3) == 1  # and it can be done again
        again = store.latest("crashy")
        assert again is not None
        assert folded(again.chains["op"]["0"]) == folded(chain)


# -- at run time: a step that snapshots change sets --------------------------------------


class DeltaCount(OpSpec):
    """Counts records per key and snapshots an :class:`Incremental`: the keys written and
    deleted since its previous snapshot (a key is deleted every 5th record, so deletes
    are exercised), whole the first time and after a restore from nothing."""

    kind: ClassVar[str] = "delta_count"

    def build(self, ctx: BuildContext) -> Step:
        return DeltaCountStep(ctx.name, ctx.metrics)


class DeltaCountStep(Step):
    def __init__(self, name: str, metrics: OperatorMetrics) -> None:
        super().__init__(name, metrics)
        self.counts: dict[Any, int] = {}
        self.dirty: set[Any] = set()
        self.deleted: set[Any] = set()
        self.seen = 0
        self.whole = True  # nothing snapshotted yet: the first snapshot is a base

    async def push(self, batch: Batch) -> None:
        out = []
        for value in batch.values:
            k = value["k"]
            n = self.counts.get(k, 0) + 1
            self.seen += 1
            if n % 5 == 0:
                del self.counts[k]
                self.deleted.add(k)
                self.dirty.discard(k)
            else:
                self.counts[k] = n
                self.dirty.add(k)
                self.deleted.discard(k)
            out.append([value["id"], k, n])
        self.metrics.state = len(self.counts)
        await self.emit(Batch(out))

    def snapshot(self) -> Any:
        if self.whole:
            changes = Changes(True, dict(self.counts), extra=self.seen)
        else:
            upserts = {k: self.counts[k] for k in self.dirty}
            changes = Changes(False, upserts, frozenset(self.deleted), extra=self.seen)
        self.whole = False
        self.dirty, self.deleted = set(), set()
        return Incremental({None: changes})

    def restore(self, state: Any) -> None:
        assert isinstance(state, Incremental)
        assert state.whole
        whole = state.partitions[None]
        self.counts = dict(whole.upserts)
        self.seen = whole.extra
        self.whole = False  # the restored checkpoint is the base of what comes next


def delta_flow(out: Path, rows: list[dict[str, Any]]) -> sw.Flow:
    flow = sw.Flow("delta")
    stream = flow.source(sw.sources.Generator(lambda: iter(rows), rate=1000), name="src")
    stream._wrap(stream._derive(DeltaCount(), "count", "count")).sink(
        sw.sinks.JsonLines(out), name="out"
    )
    return flow


async def run_until(flow: sw.Flow, ckpt: sw.Checkpoints, crash_at: float | None) -> bool:
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


def rows_of(n: int) -> list[dict[str, Any]]:
    return [{"id": i, "k": (i * 7919) % 97} for i in range(n)]


def test_crashes_with_change_sets_give_the_output_of_one_uninterrupted_run(
    tmp_path: Path,
) -> None:
    rows = rows_of(3000)
    once_ckpt = sw.Checkpoints(tmp_path / "a")
    asyncio.run(run_until(delta_flow(tmp_path / "once", rows), once_ckpt, None))
    ckpt = sw.Checkpoints(tmp_path / "b", interval=0.1, keep=2, compact_after=3)
    crashes = sum(
        asyncio.run(run_until(delta_flow(tmp_path / "crashed", rows), ckpt, at))
        for at in (0.65, 0.45, 0.9, 0.3)
    )
    asyncio.run(run_until(delta_flow(tmp_path / "crashed", rows), ckpt, None))
    assert crashes == 4
    once = (tmp_path / "once").read_text().splitlines()
    assert (tmp_path / "crashed").read_text().splitlines() == once
    assert len(once) == len(rows)


def test_a_run_writes_deltas_compacts_and_reports_it(tmp_path: Path) -> None:
    rows = rows_of(2000)
    ckpt = sw.Checkpoints(tmp_path / "c", interval=0.1, compact_after=4)
    result = sw.testing.run_flow(delta_flow(tmp_path / "out", rows), checkpoints=ckpt)
    ck = result.checkpoints
    assert ck is not None
    assert ck.completed > 10
    assert ck.compactions >= 2
    with CheckpointStore(tmp_path / "c") as store:
        infos = [info for info, _ in store.list("delta")]
        assert all(info.delta_bytes > 0 for info in infos[1:])  # deltas, not whole states
        assert all(info.base_bytes == 0 for info in infos)  # the first base is pruned
        [part] = [p for p in store.parts(infos[0].id, "delta") if p.name == "count"]
        [chain] = part.chains
        assert chain.deltas < 4  # compacted
        latest = store.latest("delta")
        assert latest is not None
    metrics = result.metrics.checkpoints
    assert metrics is not None
    [op] = [o for o in metrics.operators if o.name == "count"]
    assert op.bytes == part.size + chain.base_size + chain.delta_size
    assert (op.base_bytes, op.delta_bytes) == (chain.base_size, chain.delta_size)
    assert metrics.last_written == infos[0].written
    assert metrics.last_size == sum(o.bytes for o in metrics.operators)


def test_restore_hands_the_step_the_folded_whole_state(tmp_path: Path) -> None:
    rows = rows_of(1000)
    ckpt = sw.Checkpoints(tmp_path / "c", interval=0.1, compact_after=100, compact_ratio=100)
    asyncio.run(run_until(delta_flow(tmp_path / "out", rows), ckpt, 0.55))
    with CheckpointStore(tmp_path / "c") as store:
        latest = store.latest("delta")
        assert latest is not None
        assert len(latest.chains["count"]["-"]) > 3  # a base and several deltas
    ex = Executor(delta_flow(tmp_path / "out", rows), checkpoints=ckpt)
    assert ex.coordinator is not None
    ex.coordinator.restore(ex._steps)
    step = ex._steps["count"]
    assert isinstance(step, DeltaCountStep)
    want: dict[int, int] = {}
    for row in rows[: step.seen]:
        n = want.get(row["k"], 0) + 1
        if n % 5 == 0:
            del want[row["k"]]
        else:
            want[row["k"]] = n
    assert step.seen > 0
    assert step.counts == want
    ex.coordinator.close()


def test_change_sets_and_compaction_round_trip() -> None:
    base = Changes(True, {f"k{i}": i for i in range(50_000)}, extra={"wm": 1})
    later = Changes(False, {"k1": -1, "new": 7}, frozenset({"k2"}), extra={"wm": 2})
    assert decode_changes(encode_changes(base, KEY, BASE)) == base
    chain = [encode_changes(base, KEY, BASE), encode_changes(later, KEY, DELTA)]
    folded = decode_changes(fold_segments(chain, KEY, BASE))
    assert folded == fold_changes(base, later)
    assert (folded.upserts["k1"], "k2" in folded.upserts, folded.extra) == (-1, False, {"wm": 2})
    with pytest.raises(ValueError, match="not a change set"):
        decode_changes(codec.encode({"a": 1}, KEY, BASE))


def _chunks(segment: bytes) -> list[Any]:
    """A segment's chunks as packed (columns or dicts), for looking at their layout."""
    tag, _, chunks, _, _ = codec.decode(segment)
    assert tag == "sluiceway-changes-2"
    return [codec.unpack(c) for c in chunks]


def test_one_value_states_are_written_as_columns() -> None:
    """stateful_map's entries ({"state": v}) go to the segment as two flat columns, not a
    dict per key (a third of the worker thread's CPU); they come back as entries, a new
    dict each (a keyed store may change a restored entry in place)."""
    upserts = {k: {"state": k * 3} for k in range(45_000)}
    later = Changes(False, upserts, frozenset({"gone"}), extra={"wm": 1})
    segment = encode_changes(later, KEY, DELTA)
    chunks = _chunks(segment)
    assert [type(c) for c in chunks] == [tuple, tuple, tuple]  # 20,000 keys a chunk
    field, keys, values = chunks[2]
    assert (field, keys[:2], values[:2]) == ("state", [40_000, 40_001], [120_000, 120_003])
    back = decode_changes(segment)
    assert back == later
    assert len({id(entry) for entry in back.upserts.values()}) == len(upserts)


def test_a_change_set_of_one_value_states_vouched_for_is_written_the_same() -> None:
    """``Changes.one_field`` (stateful_map's store vouches that every entry is
    ``{"state": v}``): the same columns, without checking each entry; and an entry that
    is not so fails the checkpoint rather than losing a field."""
    upserts = {k: {"state": k * 3} for k in range(45_000)}
    later = Changes(False, upserts, frozenset({"gone"}), extra={"wm": 1}, one_field="state")
    segment = encode_changes(later, KEY, DELTA)
    assert _chunks(segment) == _chunks(encode_changes(replace(later, one_field=None), KEY, DELTA))
    assert decode_changes(segment) == later
    bad = Changes(False, {1: {"other": 2}}, one_field="state")
    with pytest.raises(KeyError):
        encode_changes(bad, KEY, DELTA)


class _Visit:
    """A user's class in a state value: pickled in the segment's user section."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Visit) and other.n == self.n

    __hash__ = None  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("entries", "columns"),
    [
        ([{"state": 1}, {"state": (2, "x")}, {"state": None}], True),
        ([{"state": _Visit(1)}, {"state": _Visit(2)}], True),
        ([{"state": 1}, {"other": 2}], False),  # another field
        ([{"state": 1}, {"state": 2, "more": 3}], False),  # another size
        ([{"state": 1}, {"state": 2, 0: [(("state",), (9.0, "event"))]}], False),  # a TTL
        ([{0: 1}, {0: 2}], False),  # a field that is not a str
        ([{"state": 1}, 7], False),  # an entry that is not a dict
        ([7, {"state": 1}], False),
        ([{"state": 1}, "state"], False),  # a str (subscripted by a str: a TypeError)
        ([{"state": 1}, OrderedDict(state=2)], False),  # a dict, but not exactly one
        ([{}, {}], False),
    ],
)
def test_a_chunk_is_columns_only_if_every_entry_is_one_and_the_same_field(
    entries: list[Any], columns: bool
) -> None:
    later = Changes(False, dict(enumerate(entries)), extra=None)
    segment = encode_changes(later, KEY, DELTA)
    [chunk] = _chunks(segment)
    assert type(chunk) is (tuple if columns else dict)
    assert decode_changes(segment) == later
    user = any(isinstance(v, _Visit) for e in entries if isinstance(e, dict) for v in e.values())
    assert bool(codec.verify(segment, KeyRing((KEY,), source="test"), DELTA).user_types) == user


def test_segments_of_format_1_still_decode_and_fold() -> None:
    """A chain written before the columns (tag 1, dict chunks) restores and compacts,
    also with deltas written after (tag 2) on top of it."""
    old = {k: {"state": k} for k in range(30_000)}
    base = codec.encode(
        (
            "sluiceway-changes-1",
            True,
            [
                codec.pack(dict(list(old.items())[:20_000])),
                codec.pack(dict(list(old.items())[20_000:])),
            ],
            frozenset(),
            {"wm": 0},
        ),
        KEY,
        BASE,
    )
    assert decode_changes(base) == Changes(True, old, extra={"wm": 0})
    later = Changes(False, {1: {"state": -1}, 40_000: {"state": 4}}, frozenset({2}), {"wm": 1})
    folded = decode_changes(fold_segments([base, encode_changes(later, KEY, DELTA)], KEY, BASE))
    assert folded == fold_changes(Changes(True, old, extra={"wm": 0}), later)


def _sum_flow(keys: int) -> sw.Flow:
    flow = sw.Flow("sums")
    (
        flow.source(sw.sources.Iterable(list(range(keys)) * 2), name="in")
        .key_by(lambda x: x, name="key")
        .stateful_map(lambda s, v: ((s or 0) + v, None), name="sum")
        .filter(lambda x: False, name="none")
        .sink(sw.sinks.Collect(), name="out")
    )
    return flow


def test_change_sets_are_encoded_on_the_event_loop_and_restore(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change sets are serialised on the event loop's thread, a chunk at a time, not
    in the store's worker thread: there, asking for the interpreter lock while the loop
    releases and retakes it at every turn took seconds (CK-2M).  What is stored restores
    the keyed state exactly (columns of one-value states, several chunks)."""
    threads: list[str] = []
    real_pack = codec.pack

    def pack(value: Any) -> codec.Packed:
        threads.append(threading.current_thread().name)
        return real_pack(value)

    monkeypatch.setattr(codec, "pack", pack)
    # (no compaction: it folds small chains in the worker thread, from the stored bytes)
    ckpt = sw.Checkpoints(tmp_path, interval=3600, compact_after=100, compact_ratio=1e6)
    result = sw.testing.run_flow(_sum_flow(45_000), checkpoints=ckpt)
    assert result.checkpoints is not None
    assert len(threads) >= 3  # the final checkpoint's 45,000 keys: three chunks at least
    assert set(threads) == {threading.current_thread().name}
    monkeypatch.undo()
    ex = Executor(_sum_flow(45_000), checkpoints=ckpt)
    assert ex.coordinator is not None
    ex.coordinator.restore(ex._steps)
    step = ex._steps["sum"]
    assert isinstance(step, _KeyedProcessStep)
    assert step.store.data == {k: {"state": 2 * k} for k in range(45_000)}
    ex.coordinator.close()


def test_a_change_set_is_let_go_once_encoded_before_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change set keeps alive every state it holds, also those the operator replaced
    since; held until the write, they made the collector run young collections by the
    dozen per checkpoint (CK-2M).  By the time the store writes a checkpoint, its change
    sets are gone -- except an operator's final one, which stands for it later."""
    handed: list[weakref.ref[Any]] = []
    real_changes = KeyedStore.changes

    def changes(self: KeyedStore, whole: bool, extra: dict[str, Any]) -> Changes:
        got = real_changes(self, whole, extra)
        handed.append(weakref.ref(got.upserts))
        return got

    alive: list[tuple[bool, bool]] = []  # (final, the newest change set still alive)
    real_save = CheckpointStore.save

    def save(self: CheckpointStore, *args: Any, **kwargs: Any) -> Any:
        alive.append((kwargs["final"], handed[-1]() is not None))
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(KeyedStore, "changes", changes)
    monkeypatch.setattr(CheckpointStore, "save", save)
    clock = sw.VirtualClock()
    flow = sw.Flow("sums")
    (
        flow.source(sw.sources.Generator(lambda: iter(range(3000)), rate=1000), name="in")
        .key_by(lambda x: x % 700, name="key")
        .stateful_map(lambda s, v: ((s or 0) + v, None), name="sum")
        .filter(lambda x: False, name="none")
        .sink(sw.sinks.Collect(), name="out")
    )
    result = sw.testing.run_flow(flow, clock=clock, checkpoints=sw.Checkpoints(tmp_path, 0.5))
    assert result.checkpoints is not None
    periodic = [held for final, held in alive if not final]
    assert len(periodic) >= 4
    assert not any(periodic)


@pytest.mark.parametrize("entries", ["plain", "one state (columns)", "mixed"])
def test_compaction_folds_like_core_delta_fold_over_many_chunks(entries: str) -> None:
    """Random chains over a base of several chunks: keys written, deleted, written
    again; some chunks untouched.  The compacted base is exactly core.delta's fold --
    with chunks of dicts, of columns (one value state per key), and of both."""
    rnd = random.Random(5)

    def entry(v: float) -> Any:
        if entries == "plain":
            return v
        if entries == "mixed" and rnd.random() < 0.1:
            return {"state": v, "other": 1}
        return {"state": v}

    for _ in range(5):
        base = Changes(True, {k: entry(rnd.random()) for k in range(0, 90_000, 2)}, extra=0)
        chain, want = [encode_changes(base, KEY, BASE)], base
        for step in range(rnd.randint(1, 5)):
            keys = rnd.sample(range(45_000), rnd.randint(0, 2_000))
            deletes = frozenset(keys[: len(keys) // 3])
            upserts = {k: entry(step) for k in keys[len(keys) // 3 :]}
            later = Changes(False, upserts, deletes, extra=step + 1)
            chain.append(encode_changes(later, KEY, DELTA))
            want = fold_changes(want, later)
        folded = fold_segments(chain, KEY, BASE)
        assert decode_changes(folded) == want
        kinds = {type(c) for c in _chunks(folded)}
        assert kinds == {"plain": {dict}, "one state (columns)": {tuple}}.get(entries, kinds)


def test_an_unpicklable_value_in_a_change_set_names_the_operator_and_key(tmp_path: Path) -> None:
    class Holds(DeltaCountStep):
        def snapshot(self) -> Any:
            return Incremental({None: Changes(True, {"bad": lambda: 0})})

    class HoldsSpec(DeltaCount):
        def build(self, ctx: BuildContext) -> Step:
            return Holds(ctx.name, ctx.metrics)

    flow = sw.Flow("unpicklable")
    stream = flow.source(sw.sources.Iterable([{"id": 0, "k": 1}]), name="src")
    stream._wrap(stream._derive(HoldsSpec(), "holder", "holder")).sink(sw.sinks.Collect())
    with pytest.raises(sw.CheckpointError, match=r"operator 'holder'.*\(key 'bad'\)"):
        sw.testing.run_flow(flow, checkpoints=sw.Checkpoints(tmp_path))


# -- truthful metrics ---------------------------------------------------------------------


@pytest.mark.slow
def test_the_last_duration_includes_writing_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``last_duration`` runs from the barrier's injection until the checkpoint is
    durable: for the final checkpoint of a flow whose stages had all ended it used to
    leave the write out (0.00002 s for 30 MB).  Real clock, under a watchdog."""
    clock = SystemClock()
    saves: list[float] = []
    real_save = CheckpointStore.save

    def timed_save(self: CheckpointStore, *args: Any, **kwargs: Any) -> Any:
        began = clock.monotonic()
        try:
            return real_save(self, *args, **kwargs)
        finally:
            saves.append(clock.monotonic() - began)

    monkeypatch.setattr(CheckpointStore, "save", timed_save)
    flow = sw.Flow("big_state")
    (
        flow.source(sw.sources.Iterable(range(200_000)), name="in")
        .key_by(lambda x: x, name="key")
        .stateful_map(lambda s, v: (os.urandom(64), None), name="state")
        .filter(lambda x: False)
        .sink(sw.sinks.Collect(), name="out")
    )
    result = run_watched(flow, run_for=30, checkpoints=sw.Checkpoints(tmp_path, interval=60))
    ck = result.checkpoints
    assert ck is not None
    assert ck.completed == len(saves) == 2  # the first (empty) and the final
    assert ck.last_size > 10_000_000
    assert ck.last_duration >= saves[-1] > 0
    assert ck.last_write >= saves[-1]
    metrics = result.metrics.checkpoints
    assert metrics is not None
    assert metrics.last_duration == ck.last_duration


def test_checkpoint_metrics_reach_prometheus_and_the_web_view(tmp_path: Path) -> None:
    rows = rows_of(1500)
    ckpt = sw.Checkpoints(tmp_path / "c", interval=0.1, compact_after=3)
    result = sw.testing.run_flow(delta_flow(tmp_path / "out", rows), checkpoints=ckpt)
    ck = result.metrics.checkpoints
    assert ck is not None
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for m in metric_families(result.metrics)
        for s in m.samples
        if "checkpoint" in m.name
    }
    flow = (("flow", "delta"),)
    assert values[("sluiceway_checkpoint_written_bytes", flow)] == ck.last_written > 0
    assert values[("sluiceway_checkpoint_delta_bytes", flow)] == ck.last_delta_bytes
    assert values[("sluiceway_checkpoint_compactions_total", flow)] == ck.compactions > 0
    assert values[("sluiceway_checkpoint_duration_seconds", flow)] == ck.last_duration
    assert values[("sluiceway_checkpoint_alignment_seconds", flow)] == ck.last_alignment
    count = (("flow", "delta"), ("operator", "count"))
    [op] = [o for o in ck.operators if o.name == "count"]
    assert values[("sluiceway_checkpoint_operator_bytes", count)] == op.bytes > 0
    state = flow_state(flow_graph(delta_flow(tmp_path / "x", rows)), result.metrics)
    assert state["checkpoints"] is not None
    assert state["checkpoints"]["written"] == ck.last_written
    assert state["checkpoints"]["operators"]["count"]["bytes"] == op.bytes
    json.dumps(state, allow_nan=False)


def test_large_chains_are_compacted_in_a_child_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above compactor.IN_PROCESS_BYTES (here: every chain) the fold runs in a fresh
    interpreter, off the flow's interpreter lock; the result restores the same."""
    monkeypatch.setattr(compactor, "IN_PROCESS_BYTES", 0)
    children: list[int] = []
    real = compactor.Child._result

    def counted(self: compactor.Child) -> int:
        n = real(self)
        children.append(n)
        return n

    monkeypatch.setattr(compactor.Child, "_result", counted)
    rows = rows_of(1500)
    ckpt = sw.Checkpoints(tmp_path / "c", interval=0.2, compact_after=2)
    result = sw.testing.run_flow(delta_flow(tmp_path / "out", rows), checkpoints=ckpt)
    assert result.checkpoints is not None
    assert sum(children) == result.checkpoints.compactions > 0
    ex = Executor(delta_flow(tmp_path / "out", rows), checkpoints=ckpt)
    assert ex.coordinator is not None
    ex.coordinator.restore(ex._steps)
    step = ex._steps["count"]
    assert isinstance(step, DeltaCountStep)
    assert step.seen == len(rows)
    ex.coordinator.close()


def test_checkpoints_go_on_while_the_compactor_process_folds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow does not wait for the compactor process: checkpoints are saved while it
    runs (here it takes a second before it even starts), each of them gets the new base
    when it swaps it in, and the final checkpoint waits for it.  Before, the checkpoint
    loop waited for every compaction, so no checkpoint was taken while one ran."""
    monkeypatch.setattr(compactor, "IN_PROCESS_BYTES", 0)
    slow = tmp_path / "slow-python"
    slow.write_text(f'#!/bin/sh\nsleep 1\nexec "{sys.executable}" "$@"\n')
    slow.chmod(0o755)
    monkeypatch.setattr(compactor.sys, "executable", str(slow))
    directory = tmp_path / "c"

    def next_id() -> int:
        with CheckpointStore(directory) as store:
            return store.next_id("delta")

    spans: list[list[int]] = []  # per child: the next checkpoint id at its start and end
    real_start, real_result = compactor.start_child, compactor.Child._result

    def start(*args: Any, **kwargs: Any) -> compactor.Child:
        spans.append([next_id()])
        return real_start(*args, **kwargs)

    def result(self: compactor.Child) -> int:
        spans[-1].append(next_id())
        return real_result(self)

    monkeypatch.setattr(compactor, "start_child", start)
    monkeypatch.setattr(compactor.Child, "_result", result)
    rows = rows_of(1500)
    ckpt = sw.Checkpoints(directory, interval=0.1, compact_after=2)
    result_ = sw.testing.run_flow(delta_flow(tmp_path / "out", rows), checkpoints=ckpt)
    assert result_.checkpoints is not None
    assert spans
    assert all(len(span) == 2 for span in spans)  # every child was waited for
    assert sum(end - begin for begin, end in spans) > 0  # checkpoints went on meanwhile
    assert result_.checkpoints.compactions > 0
    ex = Executor(delta_flow(tmp_path / "out", rows), checkpoints=ckpt)
    assert ex.coordinator is not None
    ex.coordinator.restore(ex._steps)
    step = ex._steps["count"]
    assert isinstance(step, DeltaCountStep)
    assert step.seen == len(rows)
    ex.coordinator.close()


def test_a_failed_compaction_is_a_warning_and_the_chains_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(compactor, "IN_PROCESS_BYTES", 0)
    monkeypatch.setattr(compactor.sys, "executable", str(tmp_path / "no-python"))
    rows = rows_of(800)
    ckpt = sw.Checkpoints(tmp_path / "c", interval=0.2, compact_after=2)
    result = sw.testing.run_flow(delta_flow(tmp_path / "out", rows), checkpoints=ckpt)
    assert result.checkpoints is not None
    assert result.checkpoints.compactions == 0
    assert "compaction is tried again" in caplog.text
    with CheckpointStore(tmp_path / "c") as store:
        latest = store.latest("delta")
        assert latest is not None
        assert len(latest.chains["count"]["-"]) > 2  # never folded, still whole


def keyed_flow(out: Path, rows: list[dict[str, Any]]) -> sw.Flow:
    flow = sw.Flow("keyed")
    (
        flow.source(sw.sources.Generator(lambda: iter(rows), rate=1000), name="src")
        .key_by(lambda r: r["k"], name="key")
        .stateful_map(lambda n, r: ((n or 0) + 1, [r["id"], r["k"], (n or 0) + 1]), name="n")
        .sink(sw.sinks.JsonLines(out), name="out")
    )
    return flow


def test_stateful_map_checkpoints_change_sets_and_restores_after_crashes(
    tmp_path: Path,
) -> None:
    """The keyed operators snapshot change sets once the coordinator accepts them: the
    store holds deltas, and crashes give the output of one uninterrupted run."""
    rows = rows_of(3000)
    asyncio.run(
        run_until(keyed_flow(tmp_path / "once", rows), sw.Checkpoints(tmp_path / "a"), None)
    )
    ckpt = sw.Checkpoints(tmp_path / "b", interval=0.1, compact_after=3)
    for at in (0.55, 0.85):
        assert asyncio.run(run_until(keyed_flow(tmp_path / "crashed", rows), ckpt, at))
        with CheckpointStore(tmp_path / "b") as store:
            assert store.list("keyed")[0][0].delta_bytes > 0
    asyncio.run(run_until(keyed_flow(tmp_path / "crashed", rows), ckpt, None))
    assert (tmp_path / "crashed").read_text() == (tmp_path / "once").read_text()
