"""Incremental parts in the checkpoint store: per (flow, operator, partition) a base and
the chain of deltas after it; ``keep`` never deletes a segment a kept checkpoint needs;
compaction folds a chain into a new base in one transaction (a SIGKILL in the middle
leaves the old chain valid); a version 2 file is migrated."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from sluiceway.checkpoint import FORMAT_VERSION, CheckpointStore, OperatorState
from sluiceway.checkpoint import store as store_module
from sluiceway.checkpoint.store import Segment
from sluiceway.errors import CheckpointError

FLOW = "counts"
SRC = Path(__file__).resolve().parents[1] / "src"


def enc(whole: bool, upserts: dict[str, int], deletes: Sequence[str] = ()) -> Segment:
    """A toy encoding (the runtime's is pickle): JSON of the changes."""
    data = json.dumps({"set": upserts, "del": sorted(deletes)}, sort_keys=True).encode()
    return Segment(whole, data)


def fold(blobs: Sequence[bytes]) -> bytes:
    state: dict[str, int] = {}
    for blob in blobs:
        changes = json.loads(blob)
        for key in changes["del"]:
            state.pop(key, None)
        state.update(changes["set"])
    return json.dumps({"set": state, "del": []}, sort_keys=True).encode()


def folded(chain: Sequence[bytes]) -> dict[str, int]:
    result: dict[str, int] = json.loads(fold(chain))["set"]
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

    def fold(blobs):
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
