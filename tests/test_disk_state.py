"""sw.state.OnDisk beyond what the keyed-state suites check on both backends
(tests/keyed_backends.py): choosing it, its files' life, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import sluiceway as sw
from sluiceway.diskstate import DiskMap, open_run_dir, remove_run_dir


def count(n: int | None, word: str) -> tuple[int, tuple[str, int]]:
    n = (n or 0) + 1
    return n, (word, n)


WORDS = [f"w{i % 37}" for i in range(500)]
WANT = sw.testing.run_collect(lambda s: s.key_by(lambda w: w).stateful_map(count), WORDS)


def run_words(flow: sw.Flow, **kw: Any) -> tuple[list[Any], sw.RunResult]:
    out: list[Any] = []
    (
        flow.source(sw.sources.Iterable(WORDS))
        .key_by(lambda w: w)
        .stateful_map(count, name="count", **kw)
        .sink(sw.sinks.Function(out.append))
    )
    return out, sw.run(flow)


def test_a_flow_default_and_an_operator_choice_both_put_the_state_in_files(tmp_path: Path) -> None:
    opened: list[Path] = []
    real = DiskMap.__init__

    def spy(self: DiskMap, file: Path, *args: Any) -> None:
        opened.append(file)
        real(self, file, *args)

    DiskMap.__init__ = spy  # type: ignore[method-assign]
    try:
        out, _ = run_words(sw.Flow("f", state=sw.state.OnDisk(path=tmp_path, cache_keys=5)))
        assert out == WANT
        out, _ = run_words(sw.Flow("g"), state=sw.state.OnDisk(path=tmp_path / "op"))
        assert out == WANT
        out, _ = run_words(  # the operator's choice wins over the flow's
            sw.Flow("h", state=sw.state.OnDisk(path=tmp_path)), state=sw.state.InMemory()
        )
        assert out == WANT
    finally:
        DiskMap.__init__ = real  # type: ignore[method-assign]
    assert [f.name for f in opened] == ["all.sqlite", "all.sqlite"]
    assert opened[0].parent.parent == tmp_path
    assert opened[1].parent.parent == tmp_path / "op"
    # deleted at the end of the run
    assert list(tmp_path.glob("sw-state-*")) == []
    assert list((tmp_path / "op").iterdir()) == []


def test_state_must_be_a_backend() -> None:
    with pytest.raises(TypeError, match=r"Flow\(state=...\) must be sw.state.InMemory\(\) or"):
        sw.Flow("f", state="disk")  # type: ignore[arg-type]
    flow = sw.Flow("f")
    keyed = flow.source(sw.sources.Iterable([1])).key_by(lambda x: x)
    with pytest.raises(TypeError, match=r"stateful_map\(state=...\) must be .* got 'disk'"):
        keyed.stateful_map(count, state="disk")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"cache_keys=...\) must be an int > 0, got -1"):
        sw.state.OnDisk(cache_keys=-1)


def test_a_directory_that_cannot_be_made_is_an_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    flow = sw.Flow("f", state=sw.state.OnDisk(path=blocker / "state"))
    with pytest.raises(sw.StateStorageError, match=rf"'count'.*{blocker / 'state'}.*writable"):
        run_words(flow)


def test_a_full_disk_is_an_error_naming_the_file(tmp_path: Path) -> None:
    """SQLITE_FULL, as a full disk gives it (here: a page limit on the file)."""
    m = DiskMap(tmp_path / "p.sqlite", 10, "op")
    m.db.execute("PRAGMA max_page_count = 3")
    for i in range(5_000):
        m[f"key-{i}"] = {"state": "x" * 100}
    with pytest.raises(sw.StateStorageError, match=r"'op'.*p\.sqlite.*full.*free disk space"):
        m.write_back()
    m.close()


def test_the_files_of_a_killed_run_are_deleted_by_the_next_run(tmp_path: Path) -> None:
    backend = sw.state.OnDisk(path=tmp_path)
    code = (
        "import os, sluiceway as sw\n"
        "from sluiceway.diskstate import open_run_dir\n"
        f"print(open_run_dir(sw.state.OnDisk(path={str(tmp_path)!r}), 'op'), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(sw.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    dead = Path(done.stdout.strip())
    assert dead.is_dir()  # killed: nothing deleted it
    live = open_run_dir(backend, "op")  # deletes the dead run's directory, keeps its own
    other = open_run_dir(backend, "op")  # and never a live one's
    assert not dead.exists()
    assert live.is_dir()
    assert other.is_dir()
    remove_run_dir(live)
    remove_run_dir(other)
    assert list(tmp_path.iterdir()) == []


def test_a_restore_rebuilds_the_files_from_the_checkpoint(tmp_path: Path) -> None:
    """The file is a cache: a fresh run with a restored snapshot reads the state back from
    its own new file (cache of 2 keys: nearly every key comes from the file)."""
    half = len(WORDS) // 2
    ck = tmp_path / "ck"
    flow = sw.Flow("f", state=sw.state.OnDisk(path=tmp_path, cache_keys=2))
    out: list[Any] = []
    (
        flow.source(sw.sources.Iterable(WORDS[:half]))
        .key_by(lambda w: w)
        .stateful_map(count, name="count")
        .sink(sw.sinks.Function(out.append))
    )
    sw.run(flow, checkpoints=sw.Checkpoints(ck))
    flow2 = sw.Flow("f", state=sw.state.OnDisk(path=tmp_path, cache_keys=2))
    (
        flow2.source(sw.sources.Iterable(WORDS[:half] + WORDS[half:]))
        .key_by(lambda w: w)
        .stateful_map(count, name="count")
        .sink(sw.sinks.Function(out.append))
    )
    sw.run(flow2, checkpoints=sw.Checkpoints(ck))
    assert out == WANT


def test_keys_of_every_kind_come_back_from_the_file_as_they_went_in(tmp_path: Path) -> None:
    """ints and strs have an encoding of their own (in key order); others are pickled."""
    keys: list[Any] = [0, -1, 7, -(2**63), 2**63 - 1, 2**63, -(2**64), "", "ü\udcff", b"x"]
    keys += [("a", 1), None, 2.5, frozenset({1})]
    m = DiskMap(tmp_path / "k.sqlite", 2, "op")
    for i, k in enumerate(keys):
        m[k] = {"state": i}
    m.write_back()
    m.settle()
    assert dict(m.items()) == {k: {"state": i} for i, k in enumerate(keys)}
    assert all(m[k] == {"state": i} for i, k in enumerate(keys))
    assert len(m) == len(keys)
    del m[2**63]
    assert 2**63 not in m
    assert len(m) == len(keys) - 1
    m.close()
