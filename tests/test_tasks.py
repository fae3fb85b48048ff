"""Keyed flows on several workers as one task per Kafka partition (``scaleout/tasks.py``).

Every worker is a real process (``python -m sluiceway run`` with ``SLUICEWAY_WORKER_ID``)
on the real broker; the output goes to Kafka through the transactional sink and is read
back ``read_committed``.  The expected output is computed from the input alone (a running
count per key, a 10 s tumbling-window count per key), so "equals the oracle" means: no
record lost, none counted twice, and no key's state started over when its partition moved.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import services_kafka
import sluiceway as sw
from services import import_or_missing
from services_kafka import KafkaTopics, produce, read_topic
from sluiceway.core.contract import Sink
from workers_harness import Lines as _Lines

kafka_bootstrap = services_kafka.kafka_bootstrap
kafka_topics = services_kafka.kafka_topics

import_or_missing("confluent_kafka")

SRC = Path(__file__).resolve().parents[1] / "src"
BASE = 1_700_000_000  # event time of record 0, seconds
KEYS = 8
PARTITIONS = 4

JOB = textwrap.dedent(
    """
    import os

    import sluiceway as sw
    from sluiceway.connectors.kafka import KafkaSink, KafkaSource
    from sluiceway.flowcontrol import TokenBucket

    WID = os.environ.get("SLUICEWAY_WORKER_ID", "solo")
    RATE = float(os.environ.get("JOB_RATE", "0"))


    def count(acc, v):
        acc = (acc or 0) + 1
        return acc, {{"kind": "count", "k": v["k"], "i": v["i"], "n": acc, "w": WID}}


    def window_row(w):
        return {{"kind": "window", "k": w.key, "start": w.start, "n": w.value, "w": WID}}


    def source():
        return KafkaSource(
            {bootstrap!r}, {topic!r}, {group!r}, poll_timeout=0.1,
            timestamp=lambda v: v["t"],
            config={{"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}},
        )


    def flow():
        f = sw.Flow("tasks", channel_capacity=64)
        s = f.source(source(), name="in")
        if RATE:
            s = s.rate_limit(TokenBucket(rate=RATE, burst=5), name="pace")
        keyed = s.key_by(lambda v: v["k"], partitioned=True)
        counts = keyed.stateful_map(count, name="count")
        windows = keyed.window(sw.windows.Tumbling(10)).aggregate(sw.agg.count()).map(window_row)
        counts.merge(windows).sink(
            KafkaSink({bootstrap!r}, {topic!r} + "-out", key=lambda r: r["k"], exactly_once=True),
            name="out",
        )
        return f


    def to_list():
        f = sw.Flow("tasks")
        keyed = f.source(source()).key_by(lambda v: v["k"], partitioned=True)
        keyed.stateful_map(count).sink(sw.sinks.Collect())
        return f


    def pattern():
        f = sw.Flow("tasks")
        keyed = f.source(KafkaSource({bootstrap!r}, "^never.*", "g")).key_by(
            lambda v: v, partitioned=True
        )
        keyed.stateful_map(count).sink(KafkaSink({bootstrap!r}, "x"))
        return f


    def from_file():
        f = sw.Flow("tasks")
        keyed = f.source(sw.sources.JsonLines("in.jsonl")).key_by(lambda v: v, partitioned=True)
        keyed.stateful_map(count).sink(sw.sinks.Kafka({bootstrap!r}, "x"))
        return f
    """
)


def _job(tmp_path: Path, bootstrap: str, topic: str) -> Path:
    path = tmp_path / "job.py"
    path.write_text(JOB.format(bootstrap=bootstrap, topic=topic, group=f"{topic}.tasks"))
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEWAY_WORKER")}
    env["PYTHONPATH"] = str(SRC)
    return {**env, **extra}


def _records(lo: int, hi: int) -> list[dict[str, Any]]:
    return [{"k": f"k{i % KEYS}", "i": i, "t": BASE + i} for i in range(lo, hi)]


def _produce(bootstrap: str, topic: str, records: list[dict[str, Any]]) -> None:
    import confluent_kafka as ck  # noqa: PLC0415

    p = ck.Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for r in records:  # keyed: a key's records are in one partition, in order
        p.produce(topic, json.dumps(r).encode(), key=r["k"].encode())
    assert p.flush(30) == 0


def _flush(bootstrap: str, topic: str) -> None:
    """One far-future record per partition: every window of every task closes."""
    produce(
        bootstrap,
        topic,
        [{"k": "flush", "i": -1, "t": BASE + 100_000}] * PARTITIONS,
        partition=list(range(PARTITIONS)),
    )


def _oracle(records: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    """What one process computes for ``records``: the running count per key, and the
    count per key and 10 s window."""
    out: Counter[tuple[Any, ...]] = Counter()
    seen: Counter[str] = Counter()
    windows: Counter[tuple[str, float]] = Counter()
    for r in records:
        seen[r["k"]] += 1
        out[("count", r["k"], r["i"], seen[r["k"]])] += 1
        windows[(r["k"], float(r["t"] - r["t"] % 10))] += 1
    for (k, start), n in windows.items():
        out[("window", k, start, n)] += 1
    return out


def _got(rows: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    out: Counter[tuple[Any, ...]] = Counter()
    for r in rows:
        if r["k"] == "flush":
            continue
        third = r["i"] if r["kind"] == "count" else r["start"]
        out[(r["kind"], r["k"], third, r["n"])] += 1
    return out


def _output(
    bootstrap: str, topic: str, want: int, *, kind: str | None = None, within: int = 120
) -> list[dict[str, Any]]:
    """The committed output, read until ``want`` rows (of ``kind``; flush windows
    aside) came, or ``within`` reads later."""
    rows: list[dict[str, Any]] = []
    for _ in range(within // 5):
        # quiet_for: a fresh reader's first fetch may take seconds on a loaded machine
        found = read_topic(bootstrap, topic, partitions=PARTITIONS, expect=want, quiet_for=5.0)
        rows = [json.loads(r[3]) for r in found]
        if sum(1 for r in rows if r["k"] != "flush" and kind in (None, r["kind"])) >= want:
            return rows
    return rows


class _Workers:
    """Worker processes: ``--workers N`` under a supervisor, or started by hand with
    ``SLUICEWAY_WORKER_ID`` (as on several machines); every line they print is signed
    ``sluiceway[worker <id>]``."""

    def __init__(
        self,
        tmp_path: Path,
        target: str,
        *args: str,
        checkpoint_dir: str | None = None,
        **env: str,
    ) -> None:
        self.tmp_path = tmp_path
        self.checkpoint_dir = str(tmp_path / "ck") if checkpoint_dir is None else checkpoint_dir
        self.target = target
        self.args = args
        self.env = env
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.lines: dict[str, _Lines] = {}

    def start(
        self,
        name: str,
        *extra: str,
        wid: str | None = None,
        target: str | None = None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """Start process ``name``: worker ``wid``, or (None) a supervisor of ``extra``'s
        ``--workers N``; ``target``, ``cwd`` and ``env`` (added to the workers'), as on a
        machine of its own."""
        more = {**self.env, **(env or {})}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sluiceway",
                "run",
                target or self.target,
                "--checkpoint-dir",
                self.checkpoint_dir,
                "--checkpoint-interval",
                "0.5",
                *self.args,
                *extra,
            ],
            cwd=cwd or self.tmp_path,
            env=_env(**more) if wid is None else _env(SLUICEWAY_WORKER_ID=wid, **more),
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs[name] = proc
        self.lines[name] = _Lines(proc)

    def wait_for(self, name: str, pattern: str, count: int = 1, within: float = 60.0) -> list[Any]:
        return self.lines[name].wait_for(pattern, count, within)

    def started(self, wid: str) -> set[int]:
        """The partitions worker ``wid`` started tasks of so far."""
        rx = rf"sluiceway\[worker {wid}\]: task p(\d+) started"
        return {int(m.group(1)) for lines in self.lines.values() for m in lines.wait_for(rx, 0)}

    def stop_all(self) -> dict[str, str]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        texts = {}
        for name, proc in self.procs.items():
            proc.wait(timeout=60)
            texts[name] = self.lines[name].text()
        return texts

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def _out_topic(kafka_topics: KafkaTopics, topic: str) -> str:
    from confluent_kafka import admin  # noqa: PLC0415

    out = topic + "-out"
    for fut in kafka_topics.admin.create_topics([admin.NewTopic(out, PARTITIONS, 1)]).values():
        fut.result()
    kafka_topics.made.append(out)
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("batch", [1, 1024])
def test_two_workers_equal_the_oracle_and_a_third_joining_moves_state_along(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path, batch: int
) -> None:
    """``--workers 2`` (a supervisor), then a third worker started by hand joins the
    group mid-stream: every output row is the oracle's, once, and the keys whose
    partitions moved to the third go on counting from where they were."""
    topic = kafka_topics.new(PARTITIONS)
    out = _out_topic(kafka_topics, topic)
    first, second = _records(0, 200), _records(200, 400)
    _produce(kafka_bootstrap, topic, first)
    job = _job(tmp_path, kafka_bootstrap, topic)
    workers = _Workers(tmp_path, f"{job}:flow", "--max-batch-size", str(batch))
    try:
        workers.start("pair", "--workers", "2", "--metrics-port", "0")
        _output(kafka_bootstrap, out, len(first), kind="count")  # the first half, all counted
        assert workers.started("0") | workers.started("1") == set(range(PARTITIONS))
        # one port per worker, a series per task it runs now (labelled task="p<partition>");
        # a worker may own no partition at this instant (the other took all at first)
        scraped: set[int] = set()
        for wid in "01":
            [url] = workers.wait_for(
                "pair", rf"sluiceway\[worker {wid}\]: Prometheus metrics at (\S+)"
            )
            metrics = urllib.request.urlopen(url.group(1), timeout=10).read().decode()
            series = {int(p) for p in re.findall(r'records_out_total{[^}]*task="p(\d+)"', metrics)}
            assert series <= workers.started(wid), metrics
            scraped |= series
        assert scraped, "no task series on either worker's metrics port"
        workers.start("third", wid="2")  # joins: the group moves partitions (and tasks) to it
        workers.wait_for("third", r"task p\d+ started")
        _produce(kafka_bootstrap, topic, second)
        _flush(kafka_bootstrap, topic)
        want = _oracle(first + second)
        rows = _output(kafka_bootstrap, out, sum(want.values()))
        texts = workers.stop_all()
    finally:
        workers.kill_all()
    for name, proc in workers.procs.items():
        assert proc.returncode == 0, texts[name]
    got = _got(rows)
    missing, extra = sorted((want - got).elements()), sorted((got - want).elements())
    assert got == want, f"missing {missing[:8]}, extra {extra[:8]}"
    moved = workers.started("2")
    assert moved, texts["third"]
    for p in moved:
        assert re.search(rf"worker [01]\]: task p{p} stopped", texts["pair"]), texts["pair"]
    # State moved along: keys counted on worker 2 go on from where their old owner was.
    counts_on_2 = [r for r in rows if r["kind"] == "count" and r["w"] == "2" and r["i"] >= 0]
    assert counts_on_2, "worker 2 counted nothing after it joined"
    assert min(r["n"] for r in counts_on_2) > 1, "a key's count started over on worker 2"


@pytest.mark.timeout(300)
def test_killed_workers_partitions_restart_elsewhere_exactly_once(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    """Worker 1 is SIGKILLed mid-stream (open transactions, no final checkpoint); worker
    0 takes its partitions over after the session timeout and is SIGKILLed in turn as it
    starts (restores) them; a replacement takes everything.  A ``read_committed`` reader
    sees every row of the oracle exactly once."""
    topic = kafka_topics.new(PARTITIONS)
    out = _out_topic(kafka_topics, topic)
    records = _records(0, 400)
    _produce(kafka_bootstrap, topic, records)
    _flush(kafka_bootstrap, topic)
    want = _oracle(records)
    job = _job(tmp_path, kafka_bootstrap, topic)
    workers = _Workers(tmp_path, f"{job}:flow", JOB_RATE="40")  # slow: killed mid-stream
    try:
        workers.start("0", wid="0")
        workers.start("1", wid="1")
        workers.wait_for("1", r"task p\d+ started")
        _output(kafka_bootstrap, out, 60)
        victim = workers.started("1")
        assert workers.procs["1"].poll() is None
        starts = len(workers.wait_for("0", r"task p\d+ started", 0))
        workers.procs["1"].send_signal(signal.SIGKILL)
        workers.wait_for("0", r"task p\d+ started", count=starts + 1)  # it takes one over
        workers.procs["0"].send_signal(signal.SIGKILL)  # restoring, or just restored
        workers.start("2", wid="2")
        rows = _output(kafka_bootstrap, out, sum(want.values()), within=180)
        texts = workers.stop_all()
    finally:
        workers.kill_all()
    assert workers.procs["1"].returncode == -signal.SIGKILL
    assert workers.procs["0"].returncode == -signal.SIGKILL
    assert workers.procs["2"].returncode == 0, texts["2"]
    assert victim
    assert workers.started("2"), texts  # it took over what the others left
    got = _got(rows)
    lost, doubled = want - got, got - want
    assert not lost, f"lost {sum(lost.values())}: {sorted(lost.elements())[:8]}"
    assert not doubled, f"doubled {sum(doubled.values())}: {sorted(doubled.elements())[:8]}"


def test_a_keyed_flow_that_cannot_run_as_tasks_is_refused(tmp_path: Path) -> None:
    job = _job(tmp_path, "127.0.0.1:1", "never-read")
    cases = [
        (["--workers", "2"], "flow", "give --checkpoint-dir DIR"),
        ([], "flow", "give --checkpoint-dir DIR"),  # a worker started by hand
        (["--workers", "2", "--checkpoint-dir", "ck"], "to_list", "cannot be copied for each"),
        (["--checkpoint-dir", "ck"], "to_list", "cannot be copied for each partition"),
        (["--workers", "2", "--checkpoint-dir", "ck"], "from_file", "would be read whole"),
        (["--checkpoint-dir", "ck"], "pattern", "pattern(s) ['^never.*'] may match topics"),
    ]
    (tmp_path / "in.jsonl").write_text("1\n")
    for extra, target, message in cases:
        env = _env() if "--workers" in extra else _env(SLUICEWAY_WORKER_ID="0")
        p = subprocess.run(
            [sys.executable, "-m", "sluiceway", "run", f"{job}:{target}", *extra],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert p.returncode == 1, (extra, target, p.stderr)
        assert message in p.stderr, (extra, target, p.stderr)
        assert "task p" not in p.stderr


def test_a_checkpoint_directory_of_the_other_layout_is_refused(tmp_path: Path) -> None:
    """One process keeps its checkpoints in DIR/checkpoints.db, workers per partition in
    DIR/tasks/p<N>: switching between the two on one directory would start without the
    state while the group's offsets go on (keys counted from zero, silently)."""
    job = _job(tmp_path, "127.0.0.1:1", "never-read")
    single, workers = tmp_path / "single", tmp_path / "workers"
    sw.run(_one_checkpoint_flow(), checkpoints=sw.Checkpoints(single))
    assert (single / "checkpoints.db").exists()
    (workers / "tasks" / "p0").mkdir(parents=True)
    cases = [
        (["--workers", "2", "--checkpoint-dir", str(single)], {}, "run as one process"),
        (["--checkpoint-dir", str(single)], {"SLUICEWAY_WORKER_ID": "0"}, "run as one process"),
        (["--checkpoint-dir", str(workers)], {}, "per-partition checkpoints of workers"),
    ]
    for extra, env, message in cases:
        p = subprocess.run(
            [sys.executable, "-m", "sluiceway", "run", f"{job}:flow", *extra],
            cwd=tmp_path,
            env=_env(**env),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert p.returncode == 1, (extra, p.stderr)
        assert message in p.stderr, (extra, p.stderr)
        assert "task p" not in p.stderr


def _one_checkpoint_flow() -> sw.Flow:
    flow = sw.Flow("flow")
    flow.source(sw.sources.Iterable([1, 2, 3])).key_by(lambda v: v).stateful_map(
        lambda s, v: ((s or 0) + 1, v)
    ).sink(sw.sinks.Collect())
    return flow


def test_topics_with_different_partition_counts_are_refused(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    from sluiceway.connectors.kafka import KafkaSink, KafkaSource  # noqa: PLC0415
    from sluiceway.scaleout.tasks import check_partitions  # noqa: PLC0415

    a, b = kafka_topics.new(2), kafka_topics.new(3)
    flow = sw.Flow("two")
    left = flow.source(KafkaSource(kafka_bootstrap, a, "g"), name="a")
    right = flow.source(KafkaSource(kafka_bootstrap, b, "g"), name="b")
    left.merge(right).key_by(lambda v: v).stateful_map(lambda s, v: (s, v)).sink(
        KafkaSink(kafka_bootstrap, a)
    )
    with pytest.raises(sw.FlowDefinitionError, match=rf"not co-partitioned.*'{b}': 3"):
        check_partitions(flow)
    flow2 = sw.Flow("one")
    flow2.source(KafkaSource(kafka_bootstrap, "no-such-topic-" + a, "g")).sink(
        KafkaSink(kafka_bootstrap, a)
    )
    with pytest.raises(sw.FlowDefinitionError, match="does not exist"):
        check_partitions(flow2)


def test_a_pinned_source_reads_one_partition_of_every_topic_from_the_group_offset(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    """``KafkaSource.for_task(1)``: partition 1 of both topics, by manual assignment,
    from the group's committed offset (no group membership: it never waits for a
    rebalance), and a copy that is a fresh object (the original stays unopened)."""
    import confluent_kafka as ck  # noqa: PLC0415

    from sluiceway.connectors.kafka import KafkaSource  # noqa: PLC0415

    a, b = kafka_topics.new(2), kafka_topics.new(2)
    for t in (a, b):
        for p in (0, 1):
            produce(kafka_bootstrap, t, [{"t": t, "p": p, "i": i} for i in range(10)], partition=p)
    group = a + ".pinned"
    c = ck.Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    c.commit(offsets=[ck.TopicPartition(a, 1, 4)], asynchronous=False)  # an empty group
    c.close()
    original = KafkaSource(kafka_bootstrap, [a, b], group, stop_after_idle=1.0, poll_timeout=0.1)
    pinned = original.for_task(1)
    assert pinned is not original
    assert (pinned.pinned, original.pinned) == (1, None)
    out = sw.sinks.Collect()
    flow = sw.Flow("pinned")
    flow.source(pinned).sink(out)
    sw.run(flow)
    got = sorted((r["t"] == a, r["p"], r["i"]) for r in out.items)
    assert got == sorted([(True, 1, i) for i in range(4, 10)] + [(False, 1, i) for i in range(10)])
    with pytest.raises(ValueError, match="name the topics"):
        KafkaSource(kafka_bootstrap, "^pat.*", group).for_task(0)


class _SlowSink(Sink):
    """A sink whose writes take ``seconds`` each; copied per task (``for_task``)."""

    def __init__(self, seconds: float, events: list[str]) -> None:
        self.seconds = seconds
        self.events = events
        self.clock: Any = None

    def for_task(self, partition: int) -> _SlowSink:
        return _SlowSink(self.seconds, self.events)

    async def open(self, ctx: Any) -> None:
        self.clock = ctx.clock

    async def write(self, batch: Any) -> None:
        self.events.append("write")
        await self.clock.sleep(self.seconds)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_revoke_during_a_slow_sink_cancels_the_task_at_the_revoke_timeout(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    """Two task managers in one event loop (one process): the second joining takes
    partitions from the first, whose task is stuck in a 30 s write; the revoke waits
    ``revoke_timeout`` (1 s, real clock) and cancels it instead of holding the group."""
    from sluiceway.connectors.kafka import KafkaSource  # noqa: PLC0415
    from sluiceway.scaleout.tasks import TaskManager, TaskSpec  # noqa: PLC0415

    topic = kafka_topics.new(2)
    produce(kafka_bootstrap, topic, [{"i": i} for i in range(20)], partition=[0, 1] * 10)
    events: list[tuple[str, str, int]] = []

    def manager(name: str) -> TaskManager:
        flow = sw.Flow("slow")
        flow.source(
            KafkaSource(kafka_bootstrap, topic, topic + ".g", config={"session.timeout.ms": 6000})
        ).key_by(lambda v: v["i"], partitioned=True).stateful_map(lambda s, v: (s, v)).sink(
            _SlowSink(30.0, [])
        )
        spec = TaskSpec(str(tmp_path / "ck"), checkpoint_interval=0.2, revoke_timeout=1.0)
        return TaskManager(flow, spec, on_task=lambda e, p: events.append((name, e, p)))

    clock = sw.SystemClock()

    async def main() -> None:
        first = manager("first")
        running = asyncio.ensure_future(first.run())
        while not any(e == "started" for _, e, _ in events):
            await clock.sleep(0.1)
        second = manager("second")
        joining = asyncio.ensure_future(second.run())
        while not any(n == "second" and e == "started" for n, e, _ in events):
            await clock.sleep(0.1)
        first.force_stop()
        second.force_stop()
        await asyncio.gather(running, joining, return_exceptions=True)

    asyncio.run(asyncio.wait_for(main(), 90))
    cancelled = {p for n, e, p in events if n == "first" and e == "cancelled"}
    taken = {p for n, e, p in events if n == "second" and e == "started"}
    assert taken, events
    assert taken <= cancelled, events


@pytest.mark.timeout(120)
def test_at_least_once_tasks_commit_their_offsets_through_the_membership(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    """Without a transactional sink, a task's offsets (plain commits, which Kafka refuses
    from a non-member of a group with members) reach the group through the worker's
    membership consumer: after a stop the group's committed offsets are the ends."""
    from services_kafka import committed_offsets  # noqa: PLC0415
    from sluiceway.connectors.kafka import KafkaSink, KafkaSource  # noqa: PLC0415
    from sluiceway.scaleout.tasks import TaskManager, TaskSpec  # noqa: PLC0415

    topic = kafka_topics.new(2)
    sizes = (7, 12)
    for p, n in enumerate(sizes):
        produce(kafka_bootstrap, topic, [{"p": p, "i": i} for i in range(n)], partition=p)
    group = topic + ".alo"
    flow = sw.Flow("alo")
    flow.source(KafkaSource(kafka_bootstrap, topic, group), name="in").key_by(
        lambda v: v["i"]
    ).stateful_map(lambda s, v: (s, v)).sink(
        KafkaSink(kafka_bootstrap, kafka_topics.new(1)), name="out"
    )
    manager = TaskManager(flow, TaskSpec(str(tmp_path / "ck"), checkpoint_interval=0.3))
    clock = sw.SystemClock()

    async def main() -> None:
        running = asyncio.ensure_future(manager.run())
        while sum(s.operator("out").records_in for s in manager.snapshots().values()) < 19:
            await clock.sleep(0.1)
        await clock.sleep(1.0)  # a checkpoint or two after the last record
        manager.request_stop()
        await running

    asyncio.run(asyncio.wait_for(main(), 90))
    assert committed_offsets(kafka_bootstrap, group, topic, 2) == list(sizes)


@pytest.mark.timeout(300)
def test_a_paused_worker_comes_back_as_a_zombie_and_is_fenced(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    """Worker 1 is SIGSTOPped past its session: worker 0 takes its partitions over (and
    fences its transactional ids).  SIGCONT: worker 1's tasks find themselves fenced or
    lost and close without writing anything visible; worker 1 goes on as a member (it does
    not fail), and the output is still exactly the oracle's."""
    topic = kafka_topics.new(PARTITIONS)
    out = _out_topic(kafka_topics, topic)
    records = _records(0, 400)
    _produce(kafka_bootstrap, topic, records)
    _flush(kafka_bootstrap, topic)
    want = _oracle(records)
    job = _job(tmp_path, kafka_bootstrap, topic)
    workers = _Workers(tmp_path, f"{job}:flow", JOB_RATE="40")
    try:
        workers.start("0", wid="0")
        workers.start("1", wid="1")
        workers.wait_for("1", r"task p\d+ started")
        _output(kafka_bootstrap, out, 60)
        starts = len(workers.wait_for("0", r"task p\d+ started", 0))
        workers.procs["1"].send_signal(signal.SIGSTOP)
        workers.wait_for("0", r"task p\d+ started", count=starts + 1)  # took one over
        workers.procs["1"].send_signal(signal.SIGCONT)
        workers.wait_for("1", r"task p\d+ (fenced|cancelled)")
        rows = _output(kafka_bootstrap, out, sum(want.values()), within=180)
        texts = workers.stop_all()
    finally:
        workers.kill_all()
    for name, proc in workers.procs.items():
        assert proc.returncode == 0, texts[name]
    got = _got(rows)
    lost, doubled = want - got, got - want
    assert not lost, f"lost {sum(lost.values())}: {sorted(lost.elements())[:8]}"
    assert not doubled, f"doubled {sum(doubled.values())}: {sorted(doubled.elements())[:8]}"


def test_fencing_is_told_from_other_failures_through_the_causes() -> None:
    import confluent_kafka as ck  # noqa: PLC0415

    from sluiceway.connectors.kafka import KafkaSinkError  # noqa: PLC0415
    from sluiceway.scaleout.tasks import _fenced  # noqa: PLC0415

    def chained(code: int) -> Exception:
        try:
            try:
                raise ck.KafkaException(ck.KafkaError(code))
            except ck.KafkaException as exc:
                raise KafkaSinkError("write failed") from exc
        except KafkaSinkError as exc:
            try:
                raise sw.FlowFailedError("flow 'x' failed", flow="x") from exc
            except sw.FlowFailedError as outer:
                return outer

    assert _fenced(chained(ck.KafkaError._FENCED))
    assert _fenced(chained(ck.KafkaError.PRODUCER_FENCED))
    assert not _fenced(chained(ck.KafkaError._MSG_TIMED_OUT))
    assert not _fenced(ValueError("not Kafka"))


def test_a_zombie_refused_by_the_shared_checkpoint_store_is_superseded_not_failed(
    tmp_path: Path,
) -> None:
    """The new owner of a partition saved checkpoint 7 in the task's directory; the zombie
    (its old owner, paused past its session) then tries to save its own 7. The store
    refuses it with a CheckpointConflictError, which closes the zombie's task like a
    Kafka fencing instead of failing (and stopping) its worker."""
    from sluiceway.checkpoint.store import (  # noqa: PLC0415
        CheckpointConflictError,
        CheckpointStore,
        OperatorState,
    )
    from sluiceway.scaleout.tasks import _fenced  # noqa: PLC0415

    states = {"op": OperatorState("op", "map", b"state")}
    new_owner, zombie = CheckpointStore(tmp_path), CheckpointStore(tmp_path)
    try:
        new_owner.save("flow", 7, states, created=0.0, duration=0.0)
        with pytest.raises(CheckpointConflictError, match="another run") as refused:
            zombie.save("flow", 7, states, created=0.0, duration=0.0)
    finally:
        new_owner.close()
        zombie.close()
    assert isinstance(refused.value, ValueError)  # what it was before it had a class
    with pytest.raises(sw.FlowFailedError) as outer:
        raise sw.FlowFailedError("flow 'x' failed", flow="x") from refused.value
    assert _fenced(outer.value)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stop_at", ["fenced", "restarted"])
def test_a_fenced_task_restarts_while_owned_and_a_stop_before_that_still_ends_the_worker(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path, stop_at: str
) -> None:
    """A task fenced by a newer producer of its transactional id starts again two
    membership polls later (its worker still owns the partition).  A stop that comes
    before those polls (``stop_at="fenced"``) ends the worker all the same, the restart
    dropped -- instead of leaving it idle forever, out of its group, every later SIGTERM
    doing nothing (issue 15: orphan workers that never stopped)."""
    import confluent_kafka as ck  # noqa: PLC0415

    from sluiceway.connectors.kafka import KafkaSink, KafkaSource  # noqa: PLC0415
    from sluiceway.scaleout.tasks import TaskManager, TaskSpec  # noqa: PLC0415

    topic = kafka_topics.new(1)
    tid = topic + ".tid"
    flow = sw.Flow("fenced")
    flow.source(KafkaSource(kafka_bootstrap, topic, topic + ".g", poll_timeout=0.1)).key_by(
        lambda v: v["i"], partitioned=True
    ).stateful_map(lambda s, v: (s, v)).sink(
        KafkaSink(kafka_bootstrap, kafka_topics.new(1), exactly_once=True, transactional_id=tid),
        name="out",
    )
    events: list[str] = []

    def on_task(event: str, p: int) -> None:
        events.append(event)
        if event == "fenced" and stop_at == "fenced":  # before the polls of the restart
            manager.request_stop()
        if event == "started" and len(events) > 1:
            manager.request_stop()

    manager = TaskManager(
        flow, TaskSpec(str(tmp_path / "ck"), checkpoint_interval=0.2), on_task=on_task
    )
    clock = sw.SystemClock()

    def fence() -> None:  # the next owner of p0 initialises its transactional id
        newer = ck.Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": tid + "-p0"})
        newer.init_transactions(30)

    async def main() -> None:
        running = asyncio.ensure_future(manager.run())
        while not any(h.handle and h.handle.running_since for h in manager.tasks.values()):
            await clock.sleep(0.05)
        await clock.run_in_thread(fence)
        i = 0
        while "fenced" not in events and not running.done():  # writes find the fencing
            await clock.run_in_thread(produce, kafka_bootstrap, topic, [{"i": i}])
            i += 1
            await clock.sleep(0.1)
        ended = await clock.wait_until(running, clock.monotonic() + 15.0)  # not forever
        assert ended, f"the worker did not end after its stop: {events}"
        running.result()

    asyncio.run(asyncio.wait_for(main(), 90))
    want = (
        ["started", "fenced"]
        if stop_at == "fenced"
        else ["started", "fenced", "started", "stopped"]
    )
    assert events == want, events


@pytest.mark.timeout(120)
def test_a_failing_task_callback_fails_the_worker_instead_of_leaving_its_task_unwatched(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    """``on_task("started")`` raising (a message that cannot be written) fails the worker
    with that error; the task it announced, already running, is still watched to its
    end, so the worker's stop does not wait forever for a task nobody saw end."""
    from sluiceway.connectors.kafka import KafkaSink, KafkaSource  # noqa: PLC0415
    from sluiceway.scaleout.tasks import TaskManager, TaskSpec  # noqa: PLC0415

    topic = kafka_topics.new(1)
    flow = sw.Flow("loud")
    flow.source(KafkaSource(kafka_bootstrap, topic, topic + ".g", poll_timeout=0.1)).key_by(
        lambda v: v["i"], partitioned=True
    ).stateful_map(lambda s, v: (s, v)).sink(KafkaSink(kafka_bootstrap, kafka_topics.new(1)))

    def on_task(event: str, p: int) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    spec = TaskSpec(str(tmp_path / "ck"), checkpoint_interval=0.2, grace_period=1.0)
    manager = TaskManager(flow, spec, on_task=on_task)
    clock = sw.SystemClock()

    async def main() -> None:
        running = asyncio.ensure_future(manager.run())
        ended = await clock.wait_until(running, clock.monotonic() + 15.0)  # not forever
        assert ended, "the worker did not end after its task's callback failed"
        with pytest.raises(BrokenPipeError):
            running.result()

    asyncio.run(asyncio.wait_for(main(), 90))
    assert not manager.tasks


@pytest.mark.timeout(120)
def test_a_worker_whose_stderr_reader_is_gone_still_stops_at_a_sigterm(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    """A worker outliving what read its stderr (a supervisor killed with -9, the terminal
    or the test that read the pipe gone): its messages cannot be written any more, and
    the SIGTERM that says so ("stopping the tasks...") must stop it all the same, with
    its tasks at a checkpoint -- not raise BrokenPipeError in the signal handler before
    the stop is requested, leaving a worker that runs on (issue 15)."""
    topic = kafka_topics.new(PARTITIONS)
    _out_topic(kafka_topics, topic)
    _produce(kafka_bootstrap, topic, _records(0, 20))
    job = _job(tmp_path, kafka_bootstrap, topic)
    ck = ["--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-interval", "0.5"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sluiceway", "run", f"{job}:flow", *ck],
        cwd=tmp_path,
        env=_env(SLUICEWAY_WORKER_ID="0"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if re.search(r"task p\d+ started", line):
                break
        proc.stderr.close()  # the reader is gone: the worker's next line meets EPIPE
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)  # a stop at a checkpoint: within the grace period
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert code == 0
    assert list((tmp_path / "ck" / "tasks").glob("p*")), "no task checkpointed"


@pytest.mark.timeout(120)
def test_a_worker_ends_once_the_input_of_every_task_it_owns_ended(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    """Sources with ``stop_after_idle``: each task ends by itself (a final checkpoint),
    and the worker, owning nothing that still runs, leaves the group and returns."""
    from sluiceway.connectors.kafka import KafkaSink, KafkaSource  # noqa: PLC0415
    from sluiceway.scaleout.tasks import TaskManager, TaskSpec  # noqa: PLC0415

    topic = kafka_topics.new(2)
    produce(kafka_bootstrap, topic, [{"i": i} for i in range(10)], partition=[0, 1] * 5)
    flow = sw.Flow("ends")
    src = KafkaSource(kafka_bootstrap, topic, topic + ".g", stop_after_idle=1.0, poll_timeout=0.1)
    flow.source(src, name="in").key_by(lambda v: v["i"], partitioned=True).stateful_map(
        lambda s, v: ((s or 0) + 1, v)
    ).sink(KafkaSink(kafka_bootstrap, kafka_topics.new(1)), name="out")
    manager = TaskManager(flow, TaskSpec(str(tmp_path / "ck"), checkpoint_interval=0.3))
    results = asyncio.run(asyncio.wait_for(manager.run(), 90))
    assert sorted(results) == [0, 1]
    assert [r.metrics.operator("out").records_in for _, r in sorted(results.items())] == [5, 5]
    assert not any(r.stopped for r in results.values())  # ended by themselves


def _get(url: str) -> str:
    return str(urllib.request.urlopen(url, timeout=10).read().decode())


def _series(metrics: str, name: str) -> dict[str, float]:
    """``task`` label -> value of the series ``name`` (one per task)."""
    rx = rf'^{name}{{[^}}]*task="(p\d+)"[^}}]*}} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(rx, metrics, re.MULTILINE)}


@pytest.mark.timeout(180)
def test_a_task_worker_reports_ownership_and_restore_times_and_serves_its_page(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    """Worker 0 alone owns every partition: its metrics (label ``worker``) and its web
    view (``--ui-port``) show the four tasks running with their restore times; worker 1
    joins and takes partitions over (restoring their checkpoints): worker 0's owned set
    shrinks to the rest, worker 1 reports the restores of what it took."""
    topic = kafka_topics.new(PARTITIONS)
    _out_topic(kafka_topics, topic)
    _produce(kafka_bootstrap, topic, _records(0, 200))
    job = _job(tmp_path, kafka_bootstrap, topic)
    workers = _Workers(tmp_path, f"{job}:flow", "--metrics-port", "0", "--ui-port", "0")
    try:
        workers.start("w0", wid="0")
        workers.wait_for("w0", r"task p\d+ started", PARTITIONS)
        [metrics_url] = workers.wait_for("w0", r"Prometheus metrics at (\S+)")
        [ui] = workers.wait_for("w0", r"web view at (\S+)")
        ui_url = ui.group(1).rstrip("/")
        # every task running, with its restore time, and the data it holds
        for _ in range(100):
            doc = json.loads(_get(ui_url + "/api/tasks"))
            if [t["state"] for t in doc["tasks"]] == ["running"] * PARTITIONS and all(
                t["state_entries"] for t in doc["tasks"]
            ):
                break
            time.sleep(0.2)
        assert doc["worker"] == "0"
        assert doc["owned"] == list(range(PARTITIONS)), doc
        # one stage (no repartitioning): the input topic's partitions
        assert doc["stages"] == [{"stage": 0, "topic": topic, "owned": list(range(PARTITIONS))}]
        assert [t["state"] for t in doc["tasks"]] == ["running"] * PARTITIONS, doc
        for t in doc["tasks"]:
            assert 0 < t["restore_seconds"] < 60, doc
            assert t["records_in"] > 0, doc
            assert (t["stage"], t["topic"]) == (0, topic), doc
        assert doc["events"]["started"] == PARTITIONS, doc
        page = _get(ui_url + "/")
        assert "p0, p1, p2, p3" in page, page
        assert "running" in page, page
        graph = json.loads(_get(ui_url + "/p1/api/flow"))
        assert {n["name"] for n in graph["nodes"]} >= {"in", "count", "out"}, graph
        assert "<html" in _get(ui_url + "/p1/")
        with pytest.raises(urllib.error.HTTPError, match="404"):
            _get(ui_url + f"/p{PARTITIONS}/api/flow")
        metrics = _get(metrics_url.group(1))
        assert _series(metrics, "sluiceway_task_owned") == {f"p{p}": 1.0 for p in range(4)}
        owned_line = metrics.split("sluiceway_task_owned{")[1].split("\n")[0]
        assert 'worker="0"' in owned_line
        assert f'topic="{topic}"' in owned_line, owned_line
        restore = _series(metrics, "sluiceway_task_restore_seconds")
        assert set(restore) == {f"p{p}" for p in range(PARTITIONS)}, metrics
        assert all(0 < v < 60 for v in restore.values()), restore
        assert re.search(
            rf"^sluiceway_task_restore_duration_seconds_count{{[^}}]*}} {PARTITIONS}\.0$",
            metrics,
            re.MULTILINE,
        ), metrics
        assert re.search(
            r'^sluiceway_task_events_total{[^}]*event="started"[^}]*} 4\.0$', metrics, re.MULTILINE
        ), metrics
        assert all(v > 0 for v in _series(metrics, "sluiceway_task_state_entries").values())

        workers.start("w1", wid="1")  # joins: takes partitions over, restoring them
        workers.wait_for("w1", r"task p\d+ started")
        [ui1] = workers.wait_for("w1", r"web view at (\S+)")
        taken: set[int] = set()
        for _ in range(150):
            doc0 = json.loads(_get(ui_url + "/api/tasks"))
            doc1 = json.loads(_get(ui1.group(1).rstrip("/") + "/api/tasks"))
            taken = set(doc1["owned"])
            running1 = [t for t in doc1["tasks"] if t["state"] == "running"]
            if (
                taken
                and set(doc0["owned"]) == set(range(PARTITIONS)) - taken
                and len(running1) == len(taken)
                and all(t["partition"] in doc0["owned"] for t in doc0["tasks"])
            ):
                break
            time.sleep(0.2)
        assert taken, doc1
        assert set(doc0["owned"]) == set(range(PARTITIONS)) - taken, (doc0, doc1)
        assert doc0["events"]["stopped"] == len(taken), doc0
        for t in doc1["tasks"]:  # a takeover: restored from worker 0's checkpoints
            assert 0 < t["restore_seconds"] < 60, doc1
        metrics0 = _get(metrics_url.group(1))
        owned0 = set(_series(metrics0, "sluiceway_task_owned"))
        assert owned0 == {f"p{p}" for p in set(range(PARTITIONS)) - taken}, metrics0
        texts = workers.stop_all()
    finally:
        workers.kill_all()
    for name, proc in workers.procs.items():
        assert proc.returncode == 0, texts[name]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("flag", "what"), [("--ui-port", "the web view"), ("--metrics-port", "Prometheus metrics")]
)
def test_a_task_worker_whose_port_is_taken_exits_with_a_usage_error(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path, flag: str, what: str
) -> None:
    """The worker names the flag and the port, and exits 2 at once (it waited for the
    server to bind for good, running its tasks without it)."""
    import socket  # noqa: PLC0415

    topic = kafka_topics.new(PARTITIONS)
    job = _job(tmp_path, kafka_bootstrap, topic)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.run(
            [
                sys.executable, "-m", "sluiceway", "run", f"{job}:flow",
                "--checkpoint-dir", str(tmp_path / "ck"), flag, str(port),
            ],
            cwd=tmp_path,
            env=_env(SLUICEWAY_WORKER_ID="0"),
            capture_output=True,
            text=True,
            timeout=50,
            check=False,
        )  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert f"{flag} {port}: cannot serve {what} on 127.0.0.1:{port}" in p.stderr
    assert "task p" not in p.stderr


@pytest.mark.parametrize(
    ("exactly_once", "dead_letter", "interval", "want"),
    [
        (True, None, 1.0, 2.0),  # at least 2 s
        (True, None, 4.0, 4.0),  # an interval
        (True, None, 60.0, 10.0),  # never past the source's revoke_timeout
        (False, None, 1.0, 10.0),  # at-least-once: cancelling would write twice
        (True, False, 1.0, 10.0),  # a dead-letter sink outside the transactions
        (True, True, 1.0, 2.0),
    ],
)
def test_a_transactional_flow_hands_a_revoked_partition_over_within_an_interval(
    exactly_once: bool, dead_letter: bool | None, interval: float, want: float
) -> None:
    """A revoked task stops at a checkpoint, whose barrier queues behind what the task
    fetched: a flow that is behind took up to the source's revoke_timeout (10 s) to hand
    its partition over while the next owner waited (benchmarks/RESULTS.md, SO). With every
    sink transactional, cancelling after an interval is safe (the next owner redoes at
    most an interval, nothing committed twice), so the wait is bounded by it."""
    from sluiceway.connectors.kafka import KafkaSink, KafkaSource  # noqa: PLC0415
    from sluiceway.scaleout.tasks import TaskManager, TaskSpec  # noqa: PLC0415

    flow = sw.Flow("handover")
    keyed = flow.source(KafkaSource("127.0.0.1:9", "in", "g")).key_by(
        lambda v: v["k"], partitioned=True
    )
    policy: Any = sw.Fail()
    if dead_letter is not None:
        policy = sw.DeadLetter(KafkaSink("127.0.0.1:9", "dlq", exactly_once=dead_letter))
    keyed.stateful_map(lambda s, v: (s, v), on_error=policy).sink(
        KafkaSink("127.0.0.1:9", "out", exactly_once=exactly_once)
    )
    manager = TaskManager(flow, TaskSpec("ck", checkpoint_interval=interval))
    assert manager.revoke_timeout == want
    explicit = TaskSpec("ck", checkpoint_interval=interval, revoke_timeout=30.0)
    assert TaskManager(flow, explicit).revoke_timeout == 30.0  # what the user set holds
