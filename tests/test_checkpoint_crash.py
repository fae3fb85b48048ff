"""The crash test of issue 4: SIGKILL a checkpointed flow at random instants, restart it
each time, and compare its output with an oracle: 0 records lost, 0 duplicated, 0 wrong.

The flow (tests/crash_child.py) reads a file, is paced so a run lasts a few seconds,
aligns barriers at a merge, and runs every operator that holds state or records -- the
crash matrix: rate_limit, merge, tumbling and session windows, stateful_map, a process
function with event-time timers, map_async (unordered, calls finishing out of order),
batch with a delay -- each into an exactly-once JSON Lines sink of its own.  The same
harness with an at-least-once sink must find duplicates: the test can fail.
"""

from __future__ import annotations

import json
import math
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

import services_postgres

pg_dsn = services_postgres.pg_dsn
pg_store_url = services_postgres.pg_store_url

CHILD = Path(__file__).with_name("crash_child.py")
SRC = Path(__file__).resolve().parents[1] / "src"
RECORDS = 300_000
RATE = 100_000  # records/s: a whole run is ~3 s, so kills land mid-stream
KEYS = 50
STATE_EVERY = 50


def make_input(path: Path, n: int, seed: int) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    rows = [
        {"id": i, "k": i % KEYS, "t": round(i / 1000 + rnd.uniform(0, 0.05), 6)} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def expected_windows(rows: list[dict[str, Any]]) -> Counter[tuple[int, float, int, int]]:
    acc: dict[tuple[int, float], list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        a = acc[(r["k"], float(math.floor(r["t"])))]
        a[0] += 1
        a[1] += r["id"]
    return Counter((k, start, n, total) for (k, start), (n, total) in acc.items())


def expected_sessions(rows: list[dict[str, Any]], gap: float) -> Counter[tuple[int, float, int]]:
    times: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        times[r["k"]].append(r["t"])
    out: Counter[tuple[int, float, int]] = Counter()
    for k, ts in times.items():
        ts.sort()
        start, n = ts[0], 0
        for prev, t in zip([ts[0], *ts], ts, strict=False):
            if t - prev >= gap:
                out[(k, start, n)] += 1
                start, n = t, 0
            n += 1
        out[(k, start, n)] += 1
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def start_child(
    work: Path, inp: Path, sink: str, state: str, *extra: str
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [
            sys.executable,
            str(CHILD),
            str(inp),
            str(work),
            str(RATE),
            "--sink",
            sink,
            "--state",
            state,
            *extra,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def go(p: subprocess.Popen[bytes]) -> None:
    """Let a child that is ready (:func:`wait_ready`) run: it waits for a line on stdin."""
    assert p.stdin is not None
    p.stdin.write(b"go\n")
    p.stdin.flush()


def reap(children: list[subprocess.Popen[bytes]]) -> None:
    """Kill whichever of ``children`` still runs (or waits for its go) and reap it."""
    for child in children:
        if child.poll() is None:
            child.kill()
            child.communicate()


def wait_ready(p: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    assert p.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    ready = sel.select(timeout)
    sel.close()
    if not ready:
        p.kill()
        p.communicate()
        raise AssertionError("the crash child did not start in time")
    line = p.stdout.readline()
    if line.strip() != b"ready":
        _, err_bytes = p.communicate()
        err = err_bytes.decode()
        raise AssertionError(f"the crash child failed to start: {line!r}\n{err}")


def crash_and_finish(
    tmp_path: Path,
    *,
    sink: str,
    kills: int,
    seed: int,
    state: str = "memory",
    die_compacting: int | None = None,
    store: str | None = None,
) -> tuple[list[dict[str, Any]], Path, int]:
    """Kill the flow ``kills`` times mid-stream, then let a last run finish.  With
    ``die_compacting``, a first run kills itself inside that compaction's transaction;
    ``store``: a checkpoint store URL (else a directory in the work directory)."""
    at = () if store is None else ("--store", store)
    inp = tmp_path / "input.jsonl"
    rows = make_input(inp, RECORDS, seed)
    work = tmp_path / "work"
    work.mkdir()
    rnd = random.Random(seed)
    done = 0
    # Each run is started while the one before it runs (it waits for go()): a kill's
    # instant counts from its run's go, as it counted from its start.
    children = [start_child(work, inp, sink, state, *at)]
    try:
        if die_compacting is not None:
            p = start_child(work, inp, sink, state, "--die-compacting", str(die_compacting), *at)
            children.append(p)
            wait_ready(p)
            out, err = p.communicate(b"go\n", timeout=60)
            assert p.returncode == -signal.SIGKILL, err.decode()
            assert out == b"dying inside a compaction\n"
            done += 1
        while done < kills:
            p = children[0]
            wait_ready(p)
            go(p)
            children.insert(0, start_child(work, inp, sink, state, *at))  # the next run
            time.sleep(rnd.uniform(0.05, 0.35))
            if p.poll() is not None:
                err = p.communicate()[1].decode()
                raise AssertionError(
                    f"run {done + 1} ended (exit {p.returncode}) before its kill: the input "
                    f"is too short for {kills} kills\n{err}"
                )
            p.send_signal(signal.SIGKILL)
            p.communicate()  # reap it and close its pipes
            done += 1
        p = children[0]
        _, err = p.communicate(b"go\n", timeout=120)
        assert p.returncode == 0, err.decode()
    finally:
        reap(children)
    return rows, work, done


def _exactly_once(name: str, got: Counter[Any], want: Counter[Any]) -> list[str]:
    lost, extra = want - got, got - want
    problems = []
    if lost:
        problems.append(f"{name}: {sum(lost.values())} lost, e.g. {list(lost)[:3]}")
    if extra:
        problems.append(
            f"{name}: {sum(extra.values())} duplicated or wrong, e.g. {list(extra)[:3]}"
        )
    return problems


def check_outputs(rows: list[dict[str, Any]], work: Path) -> list[str]:
    """Every sink of the crash matrix against its oracle: what was lost or doubled."""
    want = expected_windows(rows)
    got = Counter(
        (r["k"], r["start"], r["count"], r["sum"]) for r in read_rows(work / "windows.jsonl")
    )
    problems = _exactly_once("tumbling windows", got, want)

    per_key = Counter(r["k"] for r in rows)
    counts = read_rows(work / "counts.jsonl")
    seen: dict[int, list[int]] = defaultdict(list)
    for r in counts:
        if r["id"] % KEYS != r["k"]:
            problems.append(f"stateful_map: wrong key for record {r}")
        seen[r["k"]].append(r["n"])
    for k, total in per_key.items():
        if sorted(seen[k]) != list(range(STATE_EVERY, total + 1, STATE_EVERY)):
            problems.append(
                f"stateful_map: key {k}: running counts {sorted(seen[k])[:5]}... are not each "
                f"multiple of {STATE_EVERY} up to {total} exactly once"
            )

    delta_seen: dict[int, list[int]] = defaultdict(list)
    for r in read_rows(work / "delta_counts.jsonl"):
        delta_seen[r["k"]].append(r["n"])
    for k, total in per_key.items():
        if sorted(delta_seen[k]) != list(range(STATE_EVERY, total + 1, STATE_EVERY)):
            problems.append(
                f"incremental count: key {k}: running counts {sorted(delta_seen[k])[:5]}... "
                f"are not each multiple of {STATE_EVERY} up to {total} exactly once"
            )

    per_second = Counter((k, start, n) for k, start, n, _ in want.elements() if k % 5 == 0)
    timers = Counter((r["k"], r["start"], r["count"]) for r in read_rows(work / "timers.jsonl"))
    problems += _exactly_once("process timers", timers, per_second)
    sessions = Counter((r["k"], r["start"], r["count"]) for r in read_rows(work / "sessions.jsonl"))
    problems += _exactly_once("session windows", sessions, expected_sessions(rows, 0.5))
    calls = Counter(r["id"] for r in read_rows(work / "calls.jsonl"))
    problems += _exactly_once(
        "map_async", calls, Counter(r["id"] for r in rows if r["id"] % 10 == 0)
    )
    lists = read_rows(work / "lists.jsonl")
    if any(not 1 <= len(r["ids"]) <= 7 for r in lists):
        problems.append("batch: a list of more than 7 (or none)")
    listed = Counter(i for r in lists for i in r["ids"])
    problems += _exactly_once("batch", listed, Counter(r["id"] for r in rows if r["id"] % 10 == 5))
    return problems


@pytest.mark.timeout(180)
@pytest.mark.parametrize("state", ["memory", "disk"])
def test_killed_at_random_instants_nothing_lost_duplicated_or_wrong(
    tmp_path: Path, state: str
) -> None:
    """On both keyed-state backends: with ``OnDisk`` the files of a killed run are stale
    (the checkpoint is the truth), and the last run deletes them with its own."""
    rows, work, kills = crash_and_finish(tmp_path, sink="atomic", kills=20, seed=11, state=state)
    assert kills >= 20
    assert check_outputs(rows, work) == []
    if state == "disk":
        assert list((work / "state").iterdir()) == []


@pytest.mark.timeout(180)
def test_a_sigkill_inside_a_compaction_then_at_random_loses_and_doubles_nothing(
    tmp_path: Path,
) -> None:
    """Incremental checkpoints compacted every three: the first run dies inside the
    transaction of its second compaction (new base written, folded deltas deleted, not
    committed); the restart restores the old base and chain."""
    rows, work, kills = crash_and_finish(
        tmp_path, sink="atomic", kills=6, seed=13, die_compacting=2
    )
    assert kills >= 6
    assert check_outputs(rows, work) == []


@pytest.mark.timeout(180)
def test_on_postgresql_sigkills_in_saves_and_a_compaction_lose_and_double_nothing(
    tmp_path: Path, pg_store_url: str
) -> None:
    """The same flow with its checkpoint store in PostgreSQL: a first run dies inside
    the transaction of its second compaction, the next ones at random instants (with a
    checkpoint every 50 ms, often in a save); the output equals the oracle."""
    rows, work, kills = crash_and_finish(
        tmp_path, sink="atomic", kills=4, seed=14, die_compacting=2, store=pg_store_url
    )
    assert kills >= 4
    assert check_outputs(rows, work) == []
    assert not (work / "ckpt").exists()  # nothing went to a directory


@pytest.mark.timeout(120)
def test_the_same_crashes_with_an_at_least_once_sink_duplicate_output(tmp_path: Path) -> None:
    rows, work, _ = crash_and_finish(tmp_path, sink="naive", kills=5, seed=12)
    want = expected_windows(rows)
    got = Counter(
        (r["k"], r["start"], r["count"], r["sum"]) for r in read_rows(work / "windows.jsonl")
    )
    assert got - want, "a sink that never takes back what it wrote showed no duplicates"
