"""Windows and joins under incremental checkpoints (issue 20): crashed and restarted runs
give the output of one uninterrupted run (0 lost, 0 duplicated), the store holds change
sets for them, and a checkpoint written by the version before -- when windows and joins
snapshotted whole dicts -- still restores.

The flow (tests/windows_joins_flow.py) runs every window and join operator on a virtual
clock; a crash is a forced stop (no final checkpoint).  Results are compared as multisets
of lines: which interval-join pairs leave first follows the inputs' arrival, which a
restart may interleave differently.
"""

from __future__ import annotations

import asyncio
import tarfile
from collections import Counter
from pathlib import Path

import pytest

import sluiceway as sw
from sluiceway.checkpoint import CheckpointStore
from windows_joins_flow import OUTPUTS, build, run_until

FIXTURE = Path(__file__).with_name("data") / "ckpt_whole_windows_joins.tar.xz"
FIXTURE_KEY = "wininc-fixture-key-" + "0" * 24
"""The key that signed the fixture (a test key, in the clear on purpose)."""
OPERATORS = ("tumbling", "sliding", "sessions", "wjoin", "sjoin", "ijoin", "asof", "latest")


def lines(out: Path) -> dict[str, Counter[str]]:
    return {name: Counter((out / f"{name}.jsonl").read_text().splitlines()) for name in OUTPUTS}


def once(tmp_path: Path) -> dict[str, Counter[str]]:
    asyncio.run(run_until(build(tmp_path / "once"), sw.Checkpoints(tmp_path / "a"), None))
    want = lines(tmp_path / "once")
    assert all(want.values())
    assert all(max(c.values()) == 1 for c in want.values())  # every line is distinct
    return want


@pytest.mark.timeout(240)
def test_crashes_with_incremental_window_and_join_checkpoints_lose_and_double_nothing(
    tmp_path: Path,
) -> None:
    want = once(tmp_path)
    ckpt = sw.Checkpoints(tmp_path / "b", interval=0.1, compact_after=3, keep=100)
    deltas: Counter[str] = Counter()  # per operator: checkpoints whose chain had deltas
    for at in (0.7, 0.55, 0.45, 0.6):  # a run goes on from the checkpoint before
        assert asyncio.run(run_until(build(tmp_path / "crashed"), ckpt, at))
        with CheckpointStore(tmp_path / "b") as store:
            for info, _ in store.list("winjoin"):
                for part in store.parts(info.id, "winjoin"):
                    if part.name in OPERATORS:
                        assert part.chains, part.name  # incremental: a base and changes
                        deltas[part.name] += any(ch.deltas for ch in part.chains)
    asyncio.run(run_until(build(tmp_path / "crashed"), ckpt, None))
    assert lines(tmp_path / "crashed") == want
    assert all(deltas[name] for name in OPERATORS), deltas  # change sets were restored


@pytest.mark.timeout(120)
def test_a_checkpoint_of_whole_window_and_join_states_still_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fixture is a run crashed 0.9 s in by the code before windows and joins took
    change sets (49a108b): its checkpoint holds their states as whole dicts, its outputs
    what that run wrote.  This code restores them, finishes the run, and the outputs are
    those of one uninterrupted run."""
    want = once(tmp_path)
    work = tmp_path / "old"
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(work, filter="data")
    monkeypatch.setenv("SLUICEWAY_CHECKPOINT_KEY", FIXTURE_KEY)
    monkeypatch.chdir(work)
    with CheckpointStore(Path("ckpt")) as store:
        info = store.list("winjoin")[0][0]
        parts = {p.name: p for p in store.parts(info.id, "winjoin")}
    assert not any(parts[name].chains for name in OPERATORS)  # whole, as written then
    assert info.id > 3
    ckpt = sw.Checkpoints("ckpt", interval=0.1)
    assert not asyncio.run(run_until(build(Path("out")), ckpt, None))
    assert lines(Path("out")) == want
