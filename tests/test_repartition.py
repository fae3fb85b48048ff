"""Keyed flows on several workers whose input is not keyed by the flow's key (issue 15):
the workers repartition through Kafka (``sluiceway.scaleout.repartition``).

``tests/flows/repart_flow.py`` keeps a running count and total per key (``stateful_map``)
and one-second event-time windows per key, behind ``key_by(fn)`` without
``partitioned=True``; its input topic's records of a key are spread over every partition.
Workers are real, separate processes (``python -m sluiceway run ... --checkpoint-dir D``
with ``SLUICEWAY_WORKER_ID``), each in a working directory of its own, sharing the
checkpoint directory.  A ``read_committed`` reader's output must match the input exactly:
every record counted once in its key's state (the counts a key's outputs carry are
1..N), every window's count and sum exact, and a key's outputs from one worker at a time.

The records of a key reach its state in an order that depends on timing (they come from
several partitions, in one process too), so running totals are checked by what does not
depend on it: each count once, the last total, and the order within one input partition.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import services_kafka
from services import import_or_missing
from services_kafka import KafkaTopics, committed_offsets, produce, read_topic
from workers_harness import Lines, Output, Workers, run_cmd, worker_env

kafka_bootstrap = services_kafka.kafka_bootstrap
kafka_topics = services_kafka.kafka_topics

import_or_missing("confluent_kafka")

import sluiceway as sw  # noqa: E402
from sluiceway.checkpoint.keys import CheckpointKey, KeyRing  # noqa: E402
from sluiceway.connectors.kafka import KafkaSink, KafkaSource  # noqa: E402
from sluiceway.console import strip_ansi  # noqa: E402
from sluiceway.core.contract import SinkContext  # noqa: E402
from sluiceway.scaleout.checks import check_tasks  # noqa: E402
from sluiceway.scaleout.repartition import (  # noqa: E402
    Purger,
    RepartitionSink,
    RepartitionSource,
    StagedTasks,
    ensure_topics,
    partition_key,
    repartition_topic,
    stages,
)
from sluiceway.scaleout.tasks import TaskSpec, task_dir, task_name  # noqa: E402
from sluiceway.scaleout.web import tasks_document  # noqa: E402
from sluiceway.time import SystemClock  # noqa: E402

FLOW = Path(__file__).resolve().parent / "flows" / "repart_flow.py"
PARTITIONS = 4
KEYS = 24
BASE = 1_700_000_000.0
STEP = 1 / 64  # event-time seconds between consecutive records (exact in binary)
CHECKPOINTS = ("--checkpoint-interval", "0.5")


def make_input(rng: random.Random, records: int) -> list[dict[str, Any]]:
    """``records`` records of random keys with increasing event times, each to a random
    partition (the topic is not keyed by the key), then one record per partition far
    later (an ``end`` key of its own) whose watermark closes every window."""
    seen: Counter[str] = Counter()
    out = []
    for j in range(records):
        k = f"user-{rng.randrange(KEYS)}"
        p = rng.randrange(PARTITIONS)
        out.append({"k": k, "i": seen[k], "p": p, "t": BASE + j * STEP, "v": rng.randrange(100)})
        seen[k] += 1
    t_end = BASE + records * STEP + 5.0
    out += [{"k": f"end-{p}", "i": 0, "p": p, "t": t_end, "v": 0} for p in range(PARTITIONS)]
    return out


def windows_oracle(records: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    """Every one-second window of a key, with its count and sum (end keys' never close)."""
    windows: dict[tuple[str, float], tuple[int, int]] = {}
    for r in records:
        if not r["k"].startswith("end-"):
            start = float(int(r["t"]))
            n, s = windows.get((r["k"], start), (0, 0))
            windows[(r["k"], start)] = n + 1, s + r["v"]
    return Counter(("win", k, start, n, s) for (k, start), (n, s) in windows.items())


def check_output(records: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """The output of the flow for ``records``, read in its order, is exact (see the module
    docstring); fails naming what differs."""
    runs = [r for r in rows if r["kind"] == "run"]
    got = Counter((r["k"], r["i"]) for r in runs)
    want = Counter((r["k"], r["i"]) for r in records)
    lost, twice = want - got, got - want
    assert not lost, f"{len(lost)} records lost, e.g. {sorted(lost)[:5]}"
    assert not twice, f"{len(twice)} written twice or unknown, e.g. {sorted(twice)[:5]}"
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_key.setdefault(r["k"], []).append(r)
    totals: Counter[str] = Counter()
    for r in records:
        totals[r["k"]] += r["v"]
    partition = {(r["k"], r["i"]): r["p"] for r in records}
    for k, outs in by_key.items():
        counts = sorted(o["n"] for o in outs)
        assert counts == list(range(1, len(outs) + 1)), f"key {k}: counts {counts}"
        last = max(outs, key=lambda o: o["n"])
        assert last["total"] == totals[k], f"key {k}: total {last['total']} != {totals[k]}"
        for p in range(PARTITIONS):  # within one input partition, in order
            ns = [o["n"] for o in sorted(outs, key=lambda o: o["i"]) if partition[(k, o["i"])] == p]
            assert ns == sorted(ns), f"key {k}, partition {p}: counts out of order {ns}"
    wins = Counter(
        ("win", r["k"], r["start"], r["n"], r["sum"]) for r in rows if r["kind"] == "win"
    )
    want_wins = windows_oracle(records)
    lost_w, extra_w = want_wins - wins, wins - want_wins
    assert not lost_w, f"windows: {len(lost_w)} missing or wrong, e.g. {sorted(lost_w)[:3]}"
    assert not extra_w, f"windows: {len(extra_w)} twice or wrong, e.g. {sorted(extra_w)[:3]}"


def owner_runs(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """For each key, the workers that wrote its outputs, in turn (``["a", "b"]``: a,
    then b took the key over)."""
    owners: dict[str, list[str]] = {}
    for r in rows:
        seq = owners.setdefault(r["k"], [])
        if not seq or seq[-1] != r["w"]:
            seq.append(r["w"])
    return owners


@pytest.fixture
def chaos_rng() -> tuple[int, random.Random]:
    seed = int(os.environ.get("SLUICEWAY_CHAOS_SEED") or random.randrange(2**31))
    print(f"chaos seed {seed} (replay: SLUICEWAY_CHAOS_SEED={seed})")
    return seed, random.Random(seed)


@pytest.fixture
def repart(kafka_bootstrap: str, kafka_topics: KafkaTopics) -> dict[str, str]:
    """An input topic (``PARTITIONS``), an output topic, and the environment of the flow;
    the repartition topic the workers create is deleted at the end too."""
    inp, out = kafka_topics.new(PARTITIONS), kafka_topics.new(1)
    kafka_topics.made.append(repartition_topic(f"{inp}.repart", "repart", "by_key"))
    return {"REPART_BOOTSTRAP": kafka_bootstrap, "REPART_INPUT": inp, "REPART_OUTPUT": out}


def _run_to_the_end(
    tmp_path: Path,
    env: dict[str, str],
    records: list[dict[str, Any]],
    *args: str,
    within: float = 120.0,
) -> list[dict[str, Any]]:
    """Two workers until every output is in; stopped with Ctrl-C; every row, from the start."""
    bootstrap, out_topic = env["REPART_BOOTSTRAP"], env["REPART_OUTPUT"]
    workers = Workers(tmp_path, worker_env(**env), f"{FLOW}:flow", *CHECKPOINTS, *args)
    out = Output(bootstrap, out_topic, services_kafka._quiet)
    wins = sum(windows_oracle(records).values())
    try:
        workers.start("a")
        workers.start("b")
        out.wait_for(len(records), "run", within)
        out.wait_for(wins, "win", 30)
        for wid in workers.running():
            assert workers.stop(wid) == 0, workers.report()
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{workers.report()}") from None
    finally:
        workers.kill_all()
        out.close()
    found = read_topic(bootstrap, out_topic, quiet_for=3, to_end=True)
    return [json.loads(v) for (_, _, _, v) in found]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("batch", [1, 1024])
def test_two_workers_repartition_exactly_once(
    repart: dict[str, str],
    tmp_path: Path,
    batch: int,
    chaos_rng: tuple[int, random.Random],
) -> None:
    """The input is keyed by something else: two workers repartition it (into 3 partitions,
    ``key_by(partitions=3)``) and every running total and window is exact, each once."""
    _, rng = chaos_rng
    records = make_input(rng, 1500)
    produce(
        repart["REPART_BOOTSTRAP"],
        repart["REPART_INPUT"],
        records,
        partition=[r["p"] for r in records],
    )
    env = {**repart, "REPART_PARTITIONS": "3", "REPART_WINDOWS": "1"}
    rows = _run_to_the_end(tmp_path, env, records, "--max-batch-size", str(batch))
    check_output(records, rows)
    owners = owner_runs(rows)
    print("owners per key, in turn:", {k: " ".join(ws) for k, ws in sorted(owners.items())})
    assert all(len(ws) <= 3 for ws in owners.values()), f"a key alternates owners: {owners}"


@pytest.mark.timeout(240)
def test_an_idle_upstream_partition_does_not_hold_the_windows_back(
    repart: dict[str, str], tmp_path: Path, chaos_rng: tuple[int, random.Random]
) -> None:
    """As in one process: an input partition without data for ``idle_timeout`` (its
    stage-0 task says so in its markers) leaves the watermark after the repartition to
    the others, and every window closes."""
    _, rng = chaos_rng
    records = [r for r in make_input(rng, 600) if r["p"] != 3]  # partition 3 stays empty
    produce(
        repart["REPART_BOOTSTRAP"],
        repart["REPART_INPUT"],
        records,
        partition=[r["p"] for r in records],
    )
    env = {**repart, "REPART_WINDOWS": "1", "REPART_IDLE": "1"}
    rows = _run_to_the_end(tmp_path, env, records)
    check_output(records, rows)


# -- the split, without workers ------------------------------------------------------------

RING = KeyRing((CheckpointKey.of("r" * 32),), source="a test")


def _counting(state: int | None, v: Any) -> tuple[int, int]:
    return (state or 0) + 1, (state or 0) + 1


def _flow(bootstrap: str, inp: str, out: str, *, partitions: int | None = None) -> sw.Flow:
    f = sw.Flow("split")
    (
        f.source(KafkaSource(bootstrap, inp, "g"), name="in")
        .map(lambda v: v, name="clean")
        .key_by(lambda v: v["k"], name="by_k", partitions=partitions)
        .stateful_map(_counting, name="count")
        .key_by(lambda n: n % 2, name="by_parity")
        .stateful_map(_counting, name="again")
        .sink(KafkaSink(bootstrap, out, exactly_once=True), name="out")
    )
    return f


def test_a_flow_is_split_at_each_unpartitioned_key_by() -> None:
    """Stage 0 ends in the internal sink after the key_by; stage n starts with the internal
    source and the key_by, partitioned now; two key_bys make three stages."""
    plan = stages(_flow("127.0.0.1:1", "in", "out", partitions=3), RING)
    assert [[n.name for n in st.flow.topological_order()] for st in plan] == [
        ["in", "clean", "by_k", "by_k_repartition"],
        ["by_k_repartitioned", "by_k", "count", "by_parity", "by_parity_repartition"],
        ["by_parity_repartitioned", "by_parity", "again", "out"],
    ]
    assert [(st.index, st.topic, st.partitions) for st in plan] == [
        (0, "g-split-by_k-repartition", 3),
        (1, "g-split-by_parity-repartition", None),
        (2, None, None),
    ]
    sink = plan[0].flow.nodes[-1].spec.sink  # type: ignore[attr-defined]
    assert isinstance(sink, RepartitionSink)
    assert sink.exactly_once  # the flow's sinks are: the internal ones are too
    source = plan[1].flow.nodes[0].spec.source  # type: ignore[attr-defined]
    assert isinstance(source, RepartitionSource)
    assert source.group == "g"
    key_by = plan[1].flow.nodes[1].spec
    assert key_by.partitioned  # type: ignore[attr-defined]
    # the internal sink's transactional ids are the topic's: of the group, not only the
    # flow (the same flow in another group must not fence them)
    assert sink._tid_arg == "sluiceway.g-split-by_k-repartition"
    assert sink.for_task(2)._tid_arg == "sluiceway.g-split-by_k-repartition-p2"
    # each task of stage n writes with its own transactional id, keeps its own checkpoints
    copy = KafkaSink("127.0.0.1:1", "out", exactly_once=True, transactional_id="t").for_task(
        3, stage=2
    )
    assert copy._tid_arg == "t-s2-p3"
    assert task_dir("ck", 3, 2).endswith("tasks/s2-p3")
    assert task_dir("ck", 3).endswith("tasks/p3")


def test_a_tasks_default_transactional_id_names_its_consumer_group() -> None:
    """Two deployments of one flow under different groups on one cluster (staging and
    production) must not fence each other's tasks: the default id of a task's sink is
    sluiceway.<group>.<flow>.<sink>-p<p> (-s<n>-p<p> in stage n); a flow in one process
    keeps sluiceway.<flow>.<sink>."""
    clock = sw.VirtualClock()

    def tid(sink: KafkaSink, *sources: sw.sources.Source) -> str:
        return sink._default_tid(SinkContext("spend", "out", clock, True, sources=sources))

    sink = KafkaSink("127.0.0.1:1", "out", exactly_once=True)
    staging = KafkaSource("127.0.0.1:1", ["in"], group="spend-staging")
    production = KafkaSource("127.0.0.1:1", ["in"], group="spend-prod")
    assert tid(sink.for_task(3), staging.for_task(3)) == "sluiceway.spend-staging.spend.out-p3"
    assert tid(sink.for_task(3), production.for_task(3)) == "sluiceway.spend-prod.spend.out-p3"
    assert (
        tid(sink.for_task(1, stage=1), production.for_task(1, stage=1))
        == "sluiceway.spend-prod.spend.out-s1-p1"
    )
    assert tid(sink, production) == "sluiceway.spend.out"  # one process: as before


def test_repartitioning_is_refused_where_it_cannot_serve() -> None:
    """A non-Kafka source; a repartitioned stream joined with one that is not."""
    f = sw.Flow("file")
    f.source(sw.sources.JsonLines("in.jsonl"), name="lines").key_by(lambda v: v).stateful_map(
        _counting, name="count"
    ).sink(KafkaSink("127.0.0.1:1", "x"))
    with pytest.raises(
        sw.FlowDefinitionError,
        match=r"must be repartitioned by the key, which goes through Kafka, and source 'lines'",
    ):
        check_tasks(f, checkpoint_dir=True)
    f = sw.Flow("mixed")
    a = f.source(KafkaSource("127.0.0.1:1", "a", "g"), name="a").key_by(lambda v: v)
    b = f.source(KafkaSource("127.0.0.1:1", "b", "g"), name="b").key_by(
        lambda v: v, partitioned=True
    )
    a.merge(b, name="both").stateful_map(_counting).sink(KafkaSink("127.0.0.1:1", "x"))
    with pytest.raises(
        sw.FlowDefinitionError, match=r"'both' .* together with a stream that is not"
    ):
        check_tasks(f, checkpoint_dir=True)
    with pytest.raises(sw.FlowDefinitionError, match=r"leave one out"):
        sw.Flow("x").source(KafkaSource("127.0.0.1:1", "a", "g")).key_by(
            lambda v: v, partitioned=True, partitions=3
        )


def test_partition_keys_are_the_same_bytes_for_equal_keys() -> None:
    assert partition_key(1) == partition_key(1.0) == partition_key(True)
    assert partition_key(("a", 2)) == partition_key(["a", 2.0])
    assert partition_key(None) == b"null"  # never a null key: that would go anywhere
    with pytest.raises(TypeError, match=r"key_by a tuple of its fields"):
        partition_key(object())


def test_records_that_do_not_verify_are_bad_input() -> None:
    """A message written by someone without the key is refused, never unpickled."""
    import pickle  # noqa: PLC0415

    src = RepartitionSource(KafkaSource("127.0.0.1:1", "in", "g"), "t", "f", RING, event_time=True)

    class Message:
        def __init__(self, value: bytes) -> None:
            self._value = value

        def value(self) -> bytes:
            return self._value

        def headers(self) -> None:
            return None

    with pytest.raises(ValueError, match=r"not a record of flow 'f'.*not signed"):
        src._decode(Message(pickle.dumps((0, "x"))))


def ensure_topics_now(plan: list[Any]) -> None:
    """:func:`ensure_topics` on the real clock, under the test's timeout (its wait for the
    metadata sleeps on the clock)."""
    asyncio.run(asyncio.wait_for(ensure_topics(plan, SystemClock()), 60))


@pytest.mark.slow  # the real clock: ensure_topics waits on it for the metadata
def test_the_topic_is_created_once_and_a_wrong_count_refused(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    inp = kafka_topics.new(2)
    flow = _flow(kafka_bootstrap, inp, "out", partitions=3)
    plan = stages(flow, RING)
    kafka_topics.made += [st.topic for st in plan if st.topic]
    ensure_topics_now(plan)
    ensure_topics_now(plan)  # a second worker: the topic is there already
    assert plan[0].flow.nodes[-1].spec.sink.partitions == 3  # type: ignore[attr-defined]
    assert plan[1].flow.nodes[0].spec.source.upstreams == 2  # type: ignore[attr-defined]
    assert plan[2].flow.nodes[0].spec.source.upstreams == 3  # type: ignore[attr-defined]
    again = stages(_flow(kafka_bootstrap, inp, "out", partitions=4), RING)
    with pytest.raises(sw.FlowDefinitionError, match=r"exists with 3 partitions.*into 4"):
        ensure_topics_now(again)


def test_a_worker_runs_a_task_manager_per_stage(tmp_path: Path) -> None:
    spec = TaskSpec(str(tmp_path / "ck"))
    staged = StagedTasks(_flow("127.0.0.1:1", "in", "out"), spec, keys=RING)
    assert [m.stage for m in staged.managers] == [0, 1, 2]
    # its monitoring surface: every stage's input topic and operators, events and
    # restores of all its managers together
    topics = ["in", repartition_topic("g", "split", "by_k"), "g-split-by_parity-repartition"]
    assert [(i.stage, i.topic) for i in staged.stage_inputs()] == list(enumerate(topics))
    assert [i.flow for i in staged.stage_inputs()] == [m.flow for m in staged.managers]
    for m, seconds in zip(staged.managers, (0.05, 0.3, 0.7), strict=True):
        m.events["started"] += 1
        m.restores.observe(task_name(0, m.stage), seconds)
    staged.managers[2].events["stopped"] += 1
    assert staged.events == {"started": 3, "stopped": 1}
    r = staged.restores
    assert (r.count, round(r.total, 2), r.buckets[:4]) == (3, 1.05, [1, 1, 2, 3])
    assert r.last == {"p0": 0.05, "s1-p0": 0.3, "s2-p0": 0.7}
    doc = tasks_document(staged, staged.status(), "w")
    assert doc["stages"] == [{"stage": i, "topic": t, "owned": []} for i, t in enumerate(topics)]
    assert (doc["owned"], doc["tasks"], doc["events"]) == ([], [], {"started": 3, "stopped": 1})


# -- the purge ---------------------------------------------------------------------------


def _lows(bootstrap: str, topic: str, partitions: int) -> list[int]:
    """The low watermark (the first offset still held) of each partition of ``topic``."""
    import confluent_kafka as ck  # noqa: PLC0415

    c = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": "lows", "logger": _quiet})
    try:
        return [
            c.get_watermark_offsets(ck.TopicPartition(topic, p), timeout=10)[0]
            for p in range(partitions)
        ]
    finally:
        c.close()


def _topic_config(bootstrap: str, topic: str) -> dict[str, str]:
    from confluent_kafka.admin import AdminClient, ConfigResource  # noqa: PLC0415

    admin = AdminClient({"bootstrap.servers": bootstrap})
    [future] = admin.describe_configs([ConfigResource("topic", topic)]).values()
    return {name: entry.value for name, entry in future.result(timeout=10).items()}


_quiet = services_kafka._quiet


@pytest.mark.timeout(90)
def test_stage_n_deletes_the_records_it_has_checkpointed(
    repart: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The repartition topic is created never to expire by time, and a stage-1 task
    deletes its partition's records below the offsets of each durable checkpoint (a
    worker in this process, the real clock, a purge every 0.2 s): once the flow has read
    everything, each partition's low watermark is the group's committed offset -- and the
    output is still exact."""
    bootstrap, inp, out_topic = (
        repart["REPART_BOOTSTRAP"],
        repart["REPART_INPUT"],
        repart["REPART_OUTPUT"],
    )
    records = make_input(random.Random(15), 300)
    produce(bootstrap, inp, records, partition=[r["p"] for r in records])
    for name, value in {**repart, "REPART_PARTITIONS": "2", "REPART_WINDOWS": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.syspath_prepend(str(FLOW.parent))
    import repart_flow  # noqa: PLC0415 - from tests/flows, configured by the environment

    group, topic = f"{inp}.repart", repartition_topic(f"{inp}.repart", "repart", "by_key")
    spec = TaskSpec(str(tmp_path / "ck"), checkpoint_interval=0.3, purge_interval=0.2)
    staged = StagedTasks(repart_flow.flow(), spec, keys=RING)
    output = Output(bootstrap, out_topic, _quiet)
    wins = sum(windows_oracle(records).values())
    clock = SystemClock()
    seen: dict[str, list[int]] = {}

    async def main() -> None:
        running = asyncio.ensure_future(staged.run())
        try:
            while output.count("run") < len(records) or output.count("win") < wins:
                assert not running.done(), running.result()
                await clock.sleep(0.1)
            # everything is read; the checkpoints go on, and the purge catches up
            while True:
                committed = await clock.run_in_thread(committed_offsets, bootstrap, group, topic, 2)
                lows = await clock.run_in_thread(_lows, bootstrap, topic, 2)
                seen.update(committed=committed, lows=lows)
                if min(committed) > 0 and lows == committed:
                    break
                await clock.sleep(0.2)
        finally:
            staged.request_stop()
            await running

    try:
        asyncio.run(asyncio.wait_for(main(), 45))
    except TimeoutError:
        raise AssertionError(f"not purged to the committed offsets: {seen}") from None
    finally:
        output.close()
    config = _topic_config(bootstrap, topic)
    assert (config["cleanup.policy"], config["retention.ms"]) == ("delete", "-1"), config
    assert staged.purger is not None
    stats = staged.purger.statistics()
    assert stats.failures == 0, stats.last_error
    found = read_topic(bootstrap, out_topic, quiet_for=1, to_end=True)
    check_output(records, [json.loads(v) for (_, _, _, v) in found])


def test_a_task_purges_below_the_checkpoint_before_its_latest(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    """One checkpoint behind: should the latest turn out torn, the store falls back to
    the one before it, whose records must still be there.  A restored task's first
    checkpoint purges below the checkpoint it restored."""
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415

    from sluiceway.core.contract import SourceContext  # noqa: PLC0415

    topic = kafka_topics.new(1)
    produce(kafka_bootstrap, topic, [{"i": i} for i in range(60)], partition=0)
    flow_source = KafkaSource(kafka_bootstrap, "in", topic + ".g")
    src = RepartitionSource(flow_source, topic, "f", RING, event_time=False).for_task(0)
    assert isinstance(src, RepartitionSource)
    purger = Purger(AdminClient({"bootstrap.servers": kafka_bootstrap}), 0.0, "f")
    src.purger = purger
    clock = SystemClock()
    lows: list[int] = []

    async def bad(exc: Exception) -> None:
        raise exc

    async def main() -> None:
        ctx = SourceContext("f", "in", clock, bad, True, checkpointing=True)
        src.restore({"offsets": {f"{topic}:0": 10}})
        await src.open(ctx)
        try:
            for n, offset in enumerate((30, 50), start=1):
                await src.commit({"offsets": {f"{topic}:0": offset}})
                while (st := purger.statistics()).purged + st.failures < n:
                    await clock.sleep(0.02)
                lows.extend(await clock.run_in_thread(_lows, kafka_bootstrap, topic, 1))
        finally:
            await src.close()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert purger.statistics().failures == 0, purger.statistics().last_error
    assert lows == [10, 30]


@pytest.mark.slow  # the real clock: a purge at most every interval
@pytest.mark.timeout(60)
def test_a_purge_waits_for_its_interval_on_the_real_clock(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    """Offered a higher offset every 20 ms, a purger with an interval of 0.3 s sends a
    request at most every 0.3 s of the real clock (and only once the last one is
    answered), and the topic's low watermark ends at the last offset it sent."""
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415

    topic = kafka_topics.new(1)
    records = 1500  # offsets for 30 s of offers: a slow answer never runs out of them
    produce(kafka_bootstrap, topic, [{"i": i} for i in range(records)], partition=0)
    purger = Purger(AdminClient({"bootstrap.servers": kafka_bootstrap}), 0.3, "smoke")
    clock = SystemClock()
    sent: list[float] = []

    async def main() -> None:
        offset = 0
        while len(sent) < 4:
            offset = min(records, offset + 1)
            before, now = purger.statistics().requests, clock.monotonic()
            purger.durable({(topic, 0): offset}, now)
            if purger.statistics().requests > before:
                sent.append(now)
            await clock.sleep(0.02)
        while (st := purger.statistics()).purged + st.failures < 4:  # the last answer
            await clock.sleep(0.02)

    asyncio.run(asyncio.wait_for(main(), 30))
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert all(g >= 0.3 for g in gaps), gaps
    stats = purger.statistics()
    assert (stats.requests, stats.purged, stats.failures) == (4, 4, 0), stats
    assert _lows(kafka_bootstrap, topic, 1) == [stats.offsets[(topic, 0)]]


# -- chaos -----------------------------------------------------------------------------------

CHAOS_RECORDS = 1200
CHAOS_RATE = 20  # records per second a worker's stage 0 lets through: ~30 s of stream


@pytest.mark.timeout(240)  # ~50 s: a paced stream, four membership changes
def test_elastic_chaos_with_repartitioning_is_exactly_once(
    repart: dict[str, str], tmp_path: Path, chaos_rng: tuple[int, random.Random]
) -> None:
    """The elastic chaos of test_workers_keyed.py with the input keyed by something else:
    two workers, a third joining, one SIGKILLed at a random instant (at times while the
    third joins), a replacement, one stopping gracefully; the ``read_committed`` output
    is exact (no record lost or counted twice, every window exact) and a key's outputs
    come from one worker at a time."""
    seed, rng = chaos_rng
    records = make_input(rng, CHAOS_RECORDS)
    bootstrap = repart["REPART_BOOTSTRAP"]
    produce(bootstrap, repart["REPART_INPUT"], records, partition=[r["p"] for r in records])
    env = {**repart, "REPART_WINDOWS": "1", "REPART_RATE": str(CHAOS_RATE)}
    workers = Workers(tmp_path, worker_env(**env), f"{FLOW}:flow", *CHECKPOINTS)
    out = Output(bootstrap, repart["REPART_OUTPUT"], services_kafka._quiet)
    wins = sum(windows_oracle(records).values())

    def at_fraction(lo: float, hi: float) -> None:
        n = int(rng.uniform(lo, hi) * len(records))
        out.wait_for(n, "run", 90)
        threading.Event().wait(rng.uniform(0.0, 1.0))  # anywhere in a checkpoint interval

    try:
        workers.start("a")
        workers.start("b")
        at_fraction(0.10, 0.20)
        workers.start("c")  # joins mid-stream: tasks of both stages move to it
        when = rng.choice(["while c joins", "later"])
        if when == "later":
            at_fraction(0.30, 0.40)
        else:
            threading.Event().wait(rng.uniform(0.5, 5.0))
        victim = rng.choice(workers.running())
        workers.procs[victim].send_signal(signal.SIGKILL)
        print(f"SIGKILL worker {victim} {when}, at {out.count('run')} of {len(records)}")
        threading.Event().wait(rng.uniform(0.0, 2.0))
        workers.start("d")  # the replacement
        at_fraction(0.55, 0.70)
        leaving = rng.choice([w for w in workers.running() if w != "d"] or ["d"])
        print(f"SIGINT worker {leaving} at {out.count('run')} of {len(records)}")
        assert workers.stop(leaving) == 0, workers.report()
        out.wait_for(len(records), "run", 120)
        out.wait_for(wins, "win", 60)
        codes = workers.stop_running()
        assert set(codes.values()) == {0}, f"exit codes {codes}\n{workers.report()}"
        assert workers.procs[victim].returncode == -signal.SIGKILL
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}\n{workers.report()}") from None
    finally:
        workers.kill_all()
        out.close()
    found = read_topic(bootstrap, repart["REPART_OUTPUT"], quiet_for=3, to_end=True)
    rows = [json.loads(v) for (_, _, _, v) in found]
    try:
        check_output(records, rows)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from None
    owners = owner_runs(rows)
    print("owners per key, in turn:", {k: " ".join(ws) for k, ws in sorted(owners.items())})
    # a key's stage-1 partition changes owner about once per membership change
    assert all(len(ws) <= 8 for ws in owners.values()), f"seed {seed}: owners alternate: {owners}"


def _get(url: str) -> str:
    return str(urllib.request.urlopen(url, timeout=10).read().decode())


def _samples(metrics: str, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of ``name`` in a scrape (with its value as
    ``"value"``)."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    return [
        {**s.labels, "value": str(s.value)}
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
        if s.name == name
    ]


@pytest.mark.timeout(120)
def test_a_worker_of_a_repartitioning_flow_shows_every_stage_in_its_views(
    repart: dict[str, str], tmp_path: Path
) -> None:
    """One worker (``--metrics-port``, ``--ui-port`` and ``--live`` at once) owns every
    partition of both stages: the input topic's 4 (tasks ``p0``-``p3``) and the
    repartition topic's 3 (``s1-p0``-``s1-p2``).  Its ``/api/tasks``, its page, its
    Prometheus series (labels ``task``, ``topic``, ``partition``, ``worker``) and its live
    table show each task of each stage with the partition and topic it owns, its restore
    time, records, lag and state; each task's graph is its stage's."""
    records = make_input(random.Random(15), 200)
    bootstrap, inp = repart["REPART_BOOTSTRAP"], repart["REPART_INPUT"]
    produce(bootstrap, inp, records, partition=[r["p"] for r in records])
    rep = repartition_topic(f"{inp}.repart", "repart", "by_key")
    env = worker_env(**repart, REPART_PARTITIONS="3", SLUICEWAY_WORKER_ID="a", COLUMNS="250")
    ports = ("--metrics-port", "0", "--ui-port", "0")
    proc = subprocess.Popen(
        run_cmd(f"{FLOW}:flow", "--checkpoint-dir", "ck", *CHECKPOINTS, *ports, "--live"),
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = Lines(proc)
    stage0 = [f"p{p}" for p in range(PARTITIONS)]
    stage1 = [f"s1-p{p}" for p in range(3)]
    try:
        [metrics_at] = lines.wait_for(r"Prometheus metrics at (\S+)")
        [ui_at] = lines.wait_for(r"web view at (\S+)")
        ui = ui_at.group(1).rstrip("/")
        doc: dict[str, Any] = {}
        for _ in range(300):  # every record through both stages, every lag known
            doc = json.loads(_get(ui + "/api/tasks"))
            tasks = {t["task"]: t for t in doc["tasks"]}
            if (
                sorted(tasks) == sorted(stage0 + stage1)
                and all(t["state"] == "running" and t["backlog"] is not None for t in doc["tasks"])
                and sum(tasks[t]["records_out"] for t in stage1) == len(records)
            ):
                break
            threading.Event().wait(0.2)
        tasks = {t["task"]: t for t in doc["tasks"]}
        assert sorted(tasks) == sorted(stage0 + stage1), doc
        assert doc["worker"] == "a"
        assert doc["owned"] == list(range(PARTITIONS)), doc  # stage 0's, as before
        assert doc["stages"] == [
            {"stage": 0, "topic": inp, "owned": list(range(PARTITIONS))},
            {"stage": 1, "topic": rep, "owned": [0, 1, 2]},
        ], doc
        for name, t in tasks.items():
            stage = 1 if name.startswith("s1-") else 0
            assert (t["stage"], t["topic"], t["owned"]) == (stage, rep if stage else inp, True)
            assert t["state"] == "running", doc
            assert 0 < t["restore_seconds"] < 60, doc
            assert isinstance(t["backlog"], int), doc
        # every record crossed once: out of stage 0, into and out of stage 1
        assert sum(tasks[t]["records_out"] for t in stage0) == len(records), doc
        assert sum(tasks[t]["records_in"] for t in stage1) == len(records), doc
        assert sum(tasks[t]["records_out"] for t in stage1) == len(records), doc
        assert all(tasks[t]["state_entries"] > 0 for t in stage1), doc  # the keys' totals
        assert doc["events"] == {"started": 7}, doc
        assert doc["restores"]["count"] == 7, doc
        page = _get(ui + "/")
        assert f"p0, p1, p2, p3 of {inp}; s1-p0, s1-p1, s1-p2 of {rep}" in page, page
        assert '<a href="s1-p2/">s1-p2</a>' in page, page
        graph1 = {n["name"] for n in json.loads(_get(ui + "/s1-p2/api/flow"))["nodes"]}
        graph0 = {n["name"] for n in json.loads(_get(ui + "/p3/api/flow"))["nodes"]}
        assert {"by_key_repartitioned", "totals", "out"} <= graph1, graph1
        assert {"in", "by_key", "by_key_repartition"} <= graph0, graph0
        assert "totals" not in graph0, graph0
        with pytest.raises(urllib.error.HTTPError, match="404"):
            _get(ui + "/s1-p3/api/flow")

        metrics = _get(metrics_at.group(1))
        owned = _samples(metrics, "sluiceway_task_owned")
        assert sorted((o["task"], o["topic"], o["partition"], o["worker"]) for o in owned) == [
            *((f"p{p}", inp, str(p), "a") for p in range(PARTITIONS)),
            *((f"s1-p{p}", rep, str(p), "a") for p in range(3)),
        ], owned
        restore = {s["task"] for s in _samples(metrics, "sluiceway_task_restore_seconds")}
        assert restore == set(stage0 + stage1), metrics
        started = [
            s for s in _samples(metrics, "sluiceway_task_events_total") if s["event"] == "started"
        ]
        assert [s["value"] for s in started] == ["7.0"], started
        totals = _samples(metrics, "sluiceway_records_out_total")
        by_stage1 = [s for s in totals if s["operator"] == "totals"]
        assert {s["task"] for s in by_stage1} == set(stage1), totals
        assert sum(float(s["value"]) for s in by_stage1) == len(records), by_stage1
        want = {(f"s1-p{p}", f"{rep}:{p}") for p in range(3)}
        for _ in range(50):  # a partition's backlog is left out while its end is unknown
            lag = {
                (s["task"], s["partition"])
                for s in _samples(metrics, "sluiceway_source_partition_backlog")
            }
            if want <= lag:
                break
            threading.Event().wait(0.2)
            metrics = _get(metrics_at.group(1))
        assert want <= lag, lag
        entries = _samples(metrics, "sluiceway_task_state_entries")
        assert {s["task"] for s in entries if float(s["value"]) > 0} >= set(stage1), entries

        # --live: a row per task of each stage, what it owns per topic
        lines.wait_for(rf"owns p0, p1, p2, p3 of {inp}; s1-p0, s1-p1, s1-p2 of {rep}; task")
        for name in stage1:
            lines.wait_for(rf"^{name}\s+yes\s+running\s+\d+\.\d{{3}}\s+\d+\s+\d+\s.*\s[1-9]\d*$")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    text = lines.text()
    assert proc.returncode == 0, text
    final = strip_ansi(text.split("\x1b[J")[-1])  # the last frame: the worker left
    assert "task events: 7 started, 7 stopped" in final, final


def test_the_internal_source_reads_every_committed_record_as_its_own_member() -> None:
    """The flow source's ``latest``/``read_uncommitted`` would skip or double records of
    the repartition topic; its static member id would clash with stage 0's membership."""
    src = KafkaSource(
        "127.0.0.1:1",
        "in",
        "g",
        auto_offset_reset="latest",
        config={"isolation.level": "read_uncommitted", "group.instance.id": "pod-1"},
    )
    inner = RepartitionSource(src, "t", "f", RING, event_time=False)
    conf = inner.client_config()
    assert "isolation.level" not in conf
    assert "auto.offset.reset" not in conf
    assert conf["group.instance.id"] == "pod-1-t"
    assert inner._reset == "earliest"
