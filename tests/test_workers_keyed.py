"""Keyed flows on several workers (issue 15): elastic chaos against an oracle.

A keyed flow with user state (``tests/flows/keyed_chaos.py``: a running total per key in
``stateful_map`` and one-second event-time tumbling windows per key) reads a topic of 8
partitions keyed by the key and writes with the transactional Kafka sink.  Workers are
real, separate processes (``python -m sluiceway run ... --checkpoint-dir D`` with
``SLUICEWAY_WORKER_ID``), each in a working directory of its own, sharing the checkpoint
directory; while the stream runs, workers join, one is SIGKILLed at a random instant (at
times while another joins), a replacement joins, one is frozen (SIGSTOP) past its session
timeout and woken up -- a zombie the others must fence -- and one stops gracefully
(SIGINT).  A ``read_committed`` reader's
output must equal the oracle computed here from the input -- nothing lost, nothing
written twice, every running total and window aggregate exact -- and a key never has
two owners at once.

The timing is random, from a seed printed at the start (``SLUICEWAY_CHAOS_SEED=<seed>``
replays the same choices; the machine's timing still varies).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import services_kafka
from services import import_or_missing
from services_kafka import KafkaTopics, produce, read_topic
from workers_harness import Lines, Output, Workers, run_cmd, worker_env

kafka_bootstrap = services_kafka.kafka_bootstrap
kafka_topics = services_kafka.kafka_topics

import_or_missing("confluent_kafka")

FLOW = Path(__file__).resolve().parent / "flows" / "keyed_chaos.py"
PARTITIONS = 8
KEYS_PER_PARTITION = 4
RECORDS = 4800  # about 600 per partition
STEP = 1 / 64  # event-time seconds between consecutive records (exact in binary)
BASE = 1_700_000_000.0
# Records per second a worker takes (its tasks share the flow's rate limiter): the
# stream lasts ~50 s, long enough for five membership changes mid-stream (measured: the
# last, a graceful stop, at ~75 % of the outputs).
RATE = 45
CHECKPOINT_INTERVAL = "0.5"
# A partition changes owner about once per membership change (a, b start; c joins; one
# is killed; d joins; one is frozen and comes back; one stops), the assignor sometimes
# swapping two survivors' partitions too.  Two owners writing at once would interleave
# their transactions: far more runs (and duplicates, which the oracle catches anyway).
MAX_OWNER_RUNS = 12
REFUSED = "keeps keyed state, and each worker would hold a share of it"  # main before issue 15


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java clients' default partitioner; librdkafka's
    ``murmur2_random``): a key's partition is ``(murmur2(key) & 0x7FFFFFFF) % n``."""
    m = 0x5BD1E995
    h = (0x9747B28C ^ len(data)) & 0xFFFFFFFF
    whole = len(data) // 4
    for i in range(whole):
        k = (int.from_bytes(data[4 * i : 4 * i + 4], "little") * m) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = data[4 * whole :]
    if len(tail) >= 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h = ((h ^ tail[0]) * m) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


def partition_of(key: str) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS


def test_murmur2_is_kafkas() -> None:
    """Values of Kafka's own test (``UtilsTest.testMurmur2``), as partitions of 8."""
    assert murmur2(b"21") & 0x7FFFFFFF == (-973932308) & 0x7FFFFFFF
    assert murmur2(b"foobar") & 0x7FFFFFFF == (-790332482) & 0x7FFFFFFF
    assert murmur2(b"a-little-bit-long-string") & 0x7FFFFFFF == (-985981536) & 0x7FFFFFFF


def _keys(prefix: str, per_partition: int) -> dict[int, list[str]]:
    """``per_partition`` key names for each partition (the first that hash there)."""
    keys: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
    n = 0
    while any(len(ks) < per_partition for ks in keys.values()):
        key = f"{prefix}{n}"
        n += 1
        if len(keys[partition_of(key)]) < per_partition:
            keys[partition_of(key)].append(key)
    return keys


def make_input(rng: random.Random) -> list[dict[str, Any]]:
    """The input, in the order written: RECORDS records of random keys with increasing
    event times, then per partition one record far later (an ``end`` key of its own)
    whose watermark closes every window of the others."""
    keys = [k for ks in _keys("user-", KEYS_PER_PARTITION).values() for k in ks]
    seen: Counter[str] = Counter()
    records = []
    for j in range(RECORDS):
        k = rng.choice(keys)
        records.append({"k": k, "i": seen[k], "t": BASE + j * STEP, "v": rng.randrange(1, 100)})
        seen[k] += 1
    t_end = BASE + RECORDS * STEP + 5.0
    for [k] in _keys("end-", 1).values():
        records.append({"k": k, "i": 0, "t": t_end, "v": 0})
    return records


def oracle(records: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    """What the flow must write, each exactly once: a running count and total per record,
    and the count and sum of every one-second window of a key (the ``end`` keys' windows
    never close)."""
    want: Counter[tuple[Any, ...]] = Counter()
    totals: dict[str, tuple[int, int]] = {}
    windows: dict[tuple[str, float], tuple[int, int]] = {}
    for r in records:
        n, total = totals.get(r["k"], (0, 0))
        totals[r["k"]] = n + 1, total + r["v"]
        want[("run", r["k"], r["i"], n + 1, total + r["v"])] += 1
        if not r["k"].startswith("end-"):
            start = float(int(r["t"]))  # BASE is whole seconds, windows are one second
            wn, ws = windows.get((r["k"], start), (0, 0))
            windows[(r["k"], start)] = wn + 1, ws + r["v"]
    for (k, start), (n, s) in windows.items():
        want[("win", k, start, n, s)] += 1
    return want


def canon(row: dict[str, Any]) -> tuple[Any, ...]:
    if row["kind"] == "run":
        return ("run", row["k"], row["i"], row["n"], row["total"])
    return ("win", row["k"], row["start"], row["n"], row["sum"])


@pytest.fixture
def chaos_rng() -> tuple[int, random.Random]:
    seed = int(os.environ.get("SLUICEWAY_CHAOS_SEED") or random.randrange(2**31))
    print(f"chaos seed {seed} (replay: SLUICEWAY_CHAOS_SEED={seed})")
    return seed, random.Random(seed)


def skip_if_refused(bootstrap: str, topics: KafkaTopics, tmp_path: Path) -> None:
    """``--workers 2`` on the keyed flow: skip the test if the CLI refuses keyed flows on
    several workers (sluiceway before issue 15), otherwise it must start both workers and
    stop them on Ctrl-C."""
    probe = tmp_path / "probe"
    probe.mkdir()
    env = worker_env(
        CHAOS_BOOTSTRAP=bootstrap, CHAOS_INPUT=topics.new(2), CHAOS_OUTPUT=topics.new(1)
    )
    cmd = run_cmd(f"{FLOW}:flow", "--workers", "2", "--checkpoint-dir", str(probe / "ck"))
    proc = subprocess.Popen(cmd, cwd=probe, env=env, stderr=subprocess.PIPE, text=True)
    lines = Lines(proc)
    try:
        [first] = lines.wait_for(r"started 2 workers|error:", within=60)[:1]
        if first.group(0) != "error:":
            # Both workers run a task (the topic has 2 partitions), then Ctrl-C.  (Not
            # before: a SIGINT while a worker's interpreter still starts kills it in its
            # imports.)
            for wid in (0, 1):
                lines.wait_for(rf"sluiceway\[worker {wid}\]: task p\d started", within=90)
            proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    text = lines.text()
    if code == 1 and REFUSED in text:
        [why] = [line for line in text.splitlines() if REFUSED in line]
        pytest.skip(f"the CLI refuses keyed flows on several workers: {why.strip()}")
    assert code == 0, f"--workers 2 on the keyed flow did not start and stop cleanly:\n{text}"


@pytest.mark.timeout(300)  # ~65 s: a paced stream, six membership changes
def test_elastic_chaos_keyed_state_and_windows_are_exactly_once(
    kafka_bootstrap: str,
    kafka_topics: KafkaTopics,
    tmp_path: Path,
    chaos_rng: tuple[int, random.Random],
) -> None:
    seed, rng = chaos_rng
    skip_if_refused(kafka_bootstrap, kafka_topics, tmp_path)
    inp, out_topic = kafka_topics.new(PARTITIONS), kafka_topics.new(1)
    records = make_input(rng)
    want = oracle(records)
    produce(
        kafka_bootstrap,
        inp,
        records,
        keys=[r["k"] for r in records],
        partition=[partition_of(r["k"]) for r in records],
    )
    total_runs = len(records)
    env = worker_env(
        CHAOS_BOOTSTRAP=kafka_bootstrap,
        CHAOS_INPUT=inp,
        CHAOS_OUTPUT=out_topic,
        CHAOS_RATE=str(RATE),
    )
    workers = Workers(tmp_path, env, f"{FLOW}:flow", "--checkpoint-interval", CHECKPOINT_INTERVAL)
    out = Output(kafka_bootstrap, out_topic, services_kafka._quiet)

    def at_fraction(lo: float, hi: float) -> None:
        n = int(rng.uniform(lo, hi) * total_runs)
        out.wait(f"{n} outputs", lambda: out.runs() >= n, within=120)
        threading.Event().wait(rng.uniform(0.0, 1.0))  # anywhere in a checkpoint interval

    try:
        workers.start("a")
        workers.start("b")
        at_fraction(0.10, 0.20)
        workers.start("c")  # joins mid-stream: partitions and their state move to it
        when = rng.choice(["while c joins", "later"])
        if when == "later":
            at_fraction(0.30, 0.45)
        else:  # c's interpreter starts, it joins, the others revoke and hand over
            threading.Event().wait(rng.uniform(0.5, 6.0))
        victim = rng.choice(workers.running())
        workers.procs[victim].send_signal(signal.SIGKILL)  # its partitions are lost
        print(f"SIGKILL worker {victim} {when}, at {out.runs()} of {total_runs} outputs")
        threading.Event().wait(rng.uniform(0.0, 3.0))
        workers.start("d")  # the replacement
        at_fraction(0.50, 0.60)
        # A zombie: a worker frozen past its session timeout loses its partitions to the
        # others while it still believes it owns them; woken up, it must not write.
        frozen = rng.choice(workers.running())
        workers.procs[frozen].send_signal(signal.SIGSTOP)
        print(f"SIGSTOP worker {frozen} at {out.runs()} of {total_runs} outputs")
        threading.Event().wait(rng.uniform(8.0, 12.0))  # session.timeout.ms is 6 s
        workers.procs[frozen].send_signal(signal.SIGCONT)
        at_fraction(0.65, 0.75)
        leaving = rng.choice([w for w in workers.running() if w != "d"] or ["d"])
        print(f"SIGINT worker {leaving} at {out.runs()} of {total_runs} outputs")
        assert workers.stop(leaving) == 0, workers.report()
        out.wait(
            f"all {sum(want.values())} outputs",
            lambda: len(out.rows) >= sum(want.values()),
            within=150,
        )
        codes = workers.stop_running()
        assert set(codes.values()) == {0}, f"exit codes {codes}\n{workers.report()}"
        assert workers.procs[victim].returncode == -signal.SIGKILL
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}\n{workers.report()}") from None
    finally:
        workers.kill_all()
        out.close()
    # Everything is committed or aborted now: read it all again, from the start.
    found = read_topic(kafka_bootstrap, out_topic, quiet_for=3, to_end=True)
    rows = [json.loads(v) for (_, _, _, v) in found]
    got = Counter(canon(r) for r in rows)
    lost, extra = want - got, got - want
    summary = f"seed {seed}: {len(lost)} lost, {len(extra)} written twice or wrong"
    assert not lost, f"{summary}; lost e.g. {sorted(lost)[:5]}"
    assert not extra, f"{summary}; twice or wrong e.g. {sorted(extra)[:5]}"
    # In the output's order, each key's running totals come in input order ...
    by_key: dict[str, list[int]] = {}
    for r in rows:
        if r["kind"] == "run":
            by_key.setdefault(r["k"], []).append(r["i"])
    assert all(seq == list(range(len(seq))) for seq in by_key.values())
    # ... and each partition's outputs come from one owner at a time: runs of one worker,
    # never two interleaved.
    owners: dict[int, list[str]] = {}
    turns: dict[int, list[str]] = {}  # "<worker>@<running totals output so far>"
    seen = 0
    for r in rows:
        seen += r["kind"] == "run"
        runs = owners.setdefault(partition_of(r["k"]), [])
        if not runs or runs[-1] != r["w"]:
            runs.append(r["w"])
            turns.setdefault(partition_of(r["k"]), []).append(f"{r['w']}@{seen}")
    print("owners per partition, in turn:", {p: " ".join(ws) for p, ws in sorted(turns.items())})
    assert all(len(ws) <= MAX_OWNER_RUNS for ws in owners.values()), (
        f"seed {seed}: a partition's outputs alternate between workers: {owners}"
    )
    # The workers that joined mid-stream took partitions over (state moved to them) --
    # all but c when it was SIGKILLed while joining: it may die before its first commit.
    joiners = {"d"} if (victim, when) == ("c", "while c joins") else {"c", "d"}
    wrote = {r["w"] for r in rows}
    assert joiners <= wrote, f"seed {seed}: outputs only from {sorted(wrote)}"
