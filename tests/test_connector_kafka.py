"""Kafka connectors against a real Apache Kafka broker (KRaft), see services_kafka.py.

The conformance checks (order, credit, ack after durable handling, redelivery, clean
close, resume) run in test_conformance.py.  Here: what is particular to Kafka -- keys,
headers, timestamps and metadata, deserialisers, bad payloads (dead-lettered with their
topic/partition/offset), per-partition watermarks and idle partitions, lag metrics,
consumer groups and rebalances, the sink's delivery errors, exactly-once transactions
under SIGKILL, and a broker SIGKILLed and restarted under a running flow.

Every test uses its own topics (``kafka_topics``, deleted afterwards) and groups named
after them; only the outage test starts a broker of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import services_kafka
from services import import_or_missing
from services_kafka import KafkaServer, KafkaTopics, committed_offsets, produce, read_topic
from test_checkpoint_crash import go, reap, wait_ready

kafka_bootstrap = services_kafka.kafka_bootstrap
kafka_topic = services_kafka.kafka_topic
kafka_topics = services_kafka.kafka_topics
own_kafka = services_kafka.own_kafka

import_or_missing("confluent_kafka")

import sluiceway as sw  # noqa: E402 - after the skip-or-fail check above
from sluiceway.connectors.kafka import (  # noqa: E402
    KafkaError,
    KafkaRecord,
    KafkaSink,
    KafkaSinkError,
    KafkaSource,
)

SRC = Path(__file__).resolve().parents[1] / "src"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def source(bootstrap: str, topic: str, **kw: Any) -> KafkaSource:
    kw.setdefault("stop_after_idle", 0.5)
    kw.setdefault("poll_timeout", 0.1)
    return KafkaSource(bootstrap, topic, kw.pop("group", f"{topic}.g"), **kw)


async def eventually(cond: Any, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


# -- registration ----------------------------------------------------------------------


def test_public_names_resolve_lazily() -> None:
    code = (
        "import sys, sluiceway as sw\n"
        "assert 'confluent_kafka' not in sys.modules\n"
        "from sluiceway.connectors.kafka import KafkaSource, KafkaSink\n"
        "assert sw.sources.Kafka is KafkaSource and sw.sinks.Kafka is KafkaSink\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_bad_arguments_name_the_fix() -> None:
    with pytest.raises(ValueError, match="auto_offset_reset must be 'earliest' or 'latest'"):
        KafkaSource("h:1", "t", "g", auto_offset_reset="first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="value must be 'bytes', 'utf-8', 'json' or a function"):
        KafkaSource("h:1", "t", "g", value="yaml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="topics must be a topic name"):
        KafkaSource("h:1", [], "g")
    with pytest.raises(TypeError, match="option 'acks' must map a name"):
        KafkaSink("h:1", "t", config={"acks": None})  # type: ignore[dict-item]


def test_exactly_once_needs_checkpoints(kafka_bootstrap: str, kafka_topic: str) -> None:
    flow = sw.Flow("eos-no-ck")
    flow.source(sw.sources.Iterable([1])).sink(
        KafkaSink(kafka_bootstrap, kafka_topic, exactly_once=True)
    )
    # One error at start naming the flow and the sink (ConnectorOpenError), the cause kept.
    needs = "exactly_once=True needs checkpoints"
    with pytest.raises(sw.errors.ConnectorOpenError, match=needs) as e:
        sw.run(flow, handle_signals=False)
    assert "eos-no-ck" in str(e.value)
    assert isinstance(e.value.__cause__, ValueError)


# -- records: keys, headers, timestamps, metadata, decoding ----------------------------------


def test_keys_headers_timestamps_and_partition_by_key(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    topic = kafka_topics.new(3)
    values = [{"user": f"u{i % 5}", "i": i, "ts": 1_700_000_000 + i} for i in range(60)]
    flow = sw.Flow("kafka-meta")
    (
        flow.source(sw.sources.Iterable(values))
        .with_timestamps(lambda v: v["ts"])
        .sink(
            KafkaSink(
                kafka_bootstrap,
                topic,
                key=lambda v: v["user"],
                headers=lambda v: {"i": str(v["i"])},
            )
        )
    )
    sw.run(flow, handle_signals=False, max_batch_size=7)
    out: sw.sinks.Collect[KafkaRecord] = sw.sinks.Collect()
    read = sw.Flow("kafka-meta-read")
    read.source(source(kafka_bootstrap, topic, include_metadata=True, key="utf-8"), name="in").sink(
        out
    )
    sw.run(read, handle_signals=False)
    got = sorted(out.items, key=lambda r: r.value["i"])
    assert [r.value for r in got] == values
    partition_of: dict[str, int] = {}
    for r in got:
        assert r.key == r.value["user"]
        assert partition_of.setdefault(r.key, r.partition) == r.partition  # one per key
        assert r.headers == (("i", str(r.value["i"]).encode()),)
        assert r.timestamp == r.value["ts"]  # the event time became the record timestamp
        assert r.topic == topic
    assert len(set(partition_of.values())) > 1
    # Offsets are per partition, 0.. in order.
    for p in set(partition_of.values()):
        offs = [r.offset for r in sorted(got, key=lambda r: r.offset) if r.partition == p]
        assert offs == list(range(len(offs)))


@pytest.mark.parametrize(
    ("how", "expect"),
    [
        ("utf-8", "héllo"),
        ("bytes", "héllo".encode()),
        (lambda b: b[::-1], "olléh".encode()[::-1][::-1]),
    ],
)
def test_value_deserialisers(kafka_bootstrap: str, kafka_topic: str, how: Any, expect: Any) -> None:
    produce(kafka_bootstrap, kafka_topic, ["héllo".encode()], raw=True)
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("kafka-decode")
    flow.source(source(kafka_bootstrap, kafka_topic, value=how)).sink(out)
    sw.run(flow, handle_signals=False)
    want = "héllo".encode()[::-1] if callable(how) else expect
    assert out.items == [want]


def test_record_timestamps_are_the_event_time(kafka_bootstrap: str, kafka_topic: str) -> None:
    """Windows straight on the source: event time from the Kafka timestamps."""
    base = 1_700_000_000_000
    ts = [base + 100, base + 900, base + 1_100, base + 2_500, base + 1_200]
    produce(kafka_bootstrap, kafka_topic, [{"i": i} for i in range(5)], timestamps_ms=ts)
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("kafka-et")
    (
        flow.source(source(kafka_bootstrap, kafka_topic, max_out_of_orderness=1.0))
        .window(sw.windows.Tumbling(1.0))
        .aggregate(n=sw.agg.count())
        .sink(out)
    )
    sw.run(flow, handle_signals=False)
    assert sorted((w.start - base / 1000, w.value["n"]) for w in out.items) == [
        (0.0, 2),
        (1.0, 2),
        (2.0, 1),
    ]


def test_timestamps_from_the_value(kafka_bootstrap: str, kafka_topic: str) -> None:
    produce(kafka_bootstrap, kafka_topic, [{"t": 10.5}, {"t": 11.2}, {"t": 12.0}])
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("kafka-et-value")
    (
        flow.source(source(kafka_bootstrap, kafka_topic, timestamp=lambda v: v["t"]))
        .window(sw.windows.Tumbling(1.0))
        .aggregate(n=sw.agg.count())
        .sink(out)
    )
    sw.run(flow, handle_signals=False)
    assert sorted((w.start, w.value["n"]) for w in out.items) == [(10.0, 1), (11.0, 1), (12.0, 1)]


def test_bad_payload_is_dead_lettered_with_topic_partition_offset(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    produce(kafka_bootstrap, kafka_topic, [b'{"i": 0}', b"{not json", b'{"i": 2}'], raw=True)
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    dead: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("kafka-dlq")
    flow.source(source(kafka_bootstrap, kafka_topic), name="in", on_error=sw.DeadLetter(dead)).sink(
        out
    )
    sw.run(flow, handle_signals=False)
    assert out.items == [{"i": 0}, {"i": 2}]
    [letter] = dead.items
    assert isinstance(letter.record, KafkaRecord)
    assert (letter.record.topic, letter.record.partition, letter.record.offset) == (
        kafka_topic,
        0,
        1,
    )
    assert letter.record.value == b"{not json"
    assert f"kafka {kafka_topic}[0]@1" in letter.error_message
    # Dead-lettered counts as handled: everything is committed.
    assert committed_offsets(kafka_bootstrap, f"{kafka_topic}.g", kafka_topic) == [3]


def test_bad_payload_fails_and_is_not_committed(kafka_bootstrap: str, kafka_topic: str) -> None:
    produce(kafka_bootstrap, kafka_topic, [b'{"i": 0}', b"\xff"], raw=True)
    flow = sw.Flow("kafka-bad")
    flow.source(source(kafka_bootstrap, kafka_topic), name="in").sink(sw.sinks.Collect())
    with pytest.raises(sw.OperatorError, match=rf"kafka {kafka_topic}\[0\]@1"):
        sw.run(flow, handle_signals=False)
    # The good record before it was handed out and written; the bad one stays unread.
    assert committed_offsets(kafka_bootstrap, f"{kafka_topic}.g", kafka_topic)[0] in (-1001, 1)


# -- watermarks ----------------------------------------------------------------------------


def test_watermark_is_the_minimum_over_partitions(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    topic = kafka_topics.new(2)
    base = 1_700_000_000_000
    produce(kafka_bootstrap, topic, [{"p": 0}] * 3, partition=0, timestamps_ms=[base + 50_000] * 3)
    produce(kafka_bootstrap, topic, [{"p": 1}] * 3, partition=1, timestamps_ms=[base + 20_000] * 3)
    src = source(kafka_bootstrap, topic, idle_timeout=None, stop_after_idle=None)
    flow = sw.Flow("kafka-wm")
    flow.source(src, name="in").sink(sw.sinks.Collect())

    async def main() -> float:
        handle = sw.start(flow)
        await eventually(lambda: handle.metrics().operator("in").records_out == 6)
        await asyncio.sleep(0.3)
        wm = handle.metrics().operator("in").watermark
        await handle.stop()
        return wm

    assert asyncio.run(main()) == pytest.approx(base / 1000 + 20)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_an_idle_partition_does_not_hold_windows_back(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    """Partition 1 gets nothing: after idle_timeout the windows of partition 0 fire while
    the flow runs.  Without the idle timeout they would wait for partition 1 forever."""
    topic = kafka_topics.new(2)
    base = 1_700_000_000_000
    ts = [base + i * 1000 for i in range(6)]
    produce(kafka_bootstrap, topic, [{"i": i} for i in range(6)], partition=0, timestamps_ms=ts)

    async def fired(idle: float | None) -> int:
        out: sw.sinks.Collect[Any] = sw.sinks.Collect()
        flow = sw.Flow("kafka-idle")
        src = source(
            kafka_bootstrap, topic, group=f"{topic}.{idle}", idle_timeout=idle, stop_after_idle=None
        )
        flow.source(src, name="in").window(sw.windows.Tumbling(1.0)).aggregate(
            n=sw.agg.count()
        ).sink(out)
        handle = sw.start(flow)
        await asyncio.sleep(3.0)
        n = len(out.items)
        await handle.stop()
        return n

    assert asyncio.run(fired(0.5)) == 5  # windows 0..4 closed by record 5's watermark
    assert asyncio.run(fired(None)) == 0


# -- lag, assignment, groups ---------------------------------------------------------------


def test_lag_per_partition_in_the_metrics(kafka_bootstrap: str, kafka_topics: KafkaTopics) -> None:
    topic = kafka_topics.new(2)
    produce(kafka_bootstrap, topic, [{"i": i} for i in range(300)], partition=0)
    produce(kafka_bootstrap, topic, [{"i": i} for i in range(100)], partition=1)
    release = asyncio.Event()

    class Gate(sw.sinks.Sink):
        async def write(self, batch: Any) -> None:
            await release.wait()

    flow = sw.Flow("kafka-lag", channel_capacity=16)
    src = source(kafka_bootstrap, topic, stop_after_idle=None)
    flow.source(src, name="in").buffer(16, name="buf").sink(Gate())

    async def main() -> Any:
        handle = sw.start(flow, max_batch_size=16)
        await eventually(lambda: handle.metrics().operator("in").partition_backlog != ())
        await asyncio.sleep(1.5)  # a lag refresh after the first records
        op = handle.metrics().operator("in")
        # The sink holds everything: the channel is full, the source paused its partitions
        # so librdkafka stops prefetching (the backlog stays in Kafka).
        assert src.paused
        release.set()
        handle.force_stop("done")
        with pytest.raises(sw.FlowCancelledError):
            await handle.wait()
        return op

    op = asyncio.run(main())
    lags = dict(op.partition_backlog)
    assert set(lags) == {f"{topic}:0", f"{topic}:1"}
    assert op.backlog == sum(lags.values())
    assert op.backlog >= 400 - op.records_out - 16
    assert lags[f"{topic}:0"] > 0


@pytest.mark.timeout(120)
def test_two_flows_in_one_group_split_the_partitions_and_take_over(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    topic = kafka_topics.new(4)
    group = f"{topic}.shared"
    for p in range(4):
        produce(kafka_bootstrap, topic, [{"p": p, "i": i} for i in range(50)], partition=p)
    seen: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
    owned: dict[str, set[tuple[str, int]]] = {"a": set(), "b": set()}

    def flow_of(who: str) -> sw.Flow:
        def assigned(tps: list[tuple[str, int]]) -> None:
            owned[who].update(tps)

        def revoked(tps: list[tuple[str, int]]) -> None:
            owned[who].difference_update(tps)

        src = KafkaSource(
            kafka_bootstrap,
            topic,
            group,
            poll_timeout=0.1,
            on_assign=assigned,
            on_revoke=revoked,
            config={"session.timeout.ms": 6000},
        )
        flow = sw.Flow(f"kafka-group-{who}")
        flow.source(src, name="in").map(lambda v: (v["p"], v["i"])).sink(
            sw.sinks.Function(seen[who].append)
        )
        return flow

    async def main() -> None:
        a = sw.start(flow_of("a"))
        await eventually(lambda: len(owned["a"]) == 4)
        await eventually(lambda: len(seen["a"]) == 200)
        b = sw.start(flow_of("b"))
        await eventually(lambda: len(owned["b"]) == 2 and len(owned["a"]) == 2, within=30)
        assert owned["a"].isdisjoint(owned["b"])
        # New records: each partition to its one owner.
        await asyncio.to_thread(
            lambda: [
                produce(
                    kafka_bootstrap, topic, [{"p": p, "i": i} for i in range(50, 100)], partition=p
                )
                for p in range(4)
            ]
        )
        await eventually(lambda: len(seen["a"]) + len(seen["b"]) >= 400, within=30)
        a_parts = {p for p, i in seen["a"] if i >= 50}
        b_parts = {p for p, i in seen["b"]}
        assert a_parts == {p for _, p in owned["a"]}
        assert b_parts == {p for _, p in owned["b"]}
        # a stops: b takes its partitions over and reads what comes next.
        await a.stop()
        await eventually(lambda: len(owned["b"]) == 4, within=30)
        await asyncio.to_thread(
            lambda: [
                produce(
                    kafka_bootstrap, topic, [{"p": p, "i": i} for i in range(100, 150)], partition=p
                )
                for p in range(4)
            ]
        )
        await eventually(lambda: sum(1 for _, i in seen["b"] if i >= 100) >= 200, within=30)
        await b.stop()

    asyncio.run(main())
    every = sorted(seen["a"] + seen["b"])
    assert set(every) == {(p, i) for p in range(4) for i in range(150)}
    assert len(every) == len(set(every))  # clean handovers: nothing twice


# -- the sink's errors -------------------------------------------------------------------------


def test_a_record_the_broker_refuses_fails_the_sink(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    topic = kafka_topics.new(1, config={"max.message.bytes": "2000"})
    flow = sw.Flow("kafka-refused")
    flow.source(sw.sources.Iterable([{"s": "x" * 10}, {"s": "y" * 5000}])).sink(
        KafkaSink(kafka_bootstrap, topic), name="out"
    )
    with pytest.raises(sw.OperatorError) as info:
        sw.run(flow, handle_signals=False)
    assert isinstance(info.value.__cause__, KafkaSinkError)
    # The broker refuses the request holding the big record (the small one travels in it).
    assert "Message size too large" in str(info.value.__cause__)
    assert f"for topic {topic!r}" in str(info.value.__cause__)


# -- exactly-once: SIGKILL at random instants ---------------------------------------------------


@pytest.mark.timeout(240)
def test_sigkill_at_random_instants_is_exactly_once_kafka_to_kafka(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    """A keyed windowed job Kafka -> Kafka with the transactional sink, killed (SIGKILL) at
    20+ random instants: a read_committed reader sees exactly the oracle's windows."""
    import random  # noqa: PLC0415

    inp, out = kafka_topics.new(2), kafka_topics.new(2)
    n, base = 20_000, 1_700_000_000.0
    records = [{"id": i, "k": f"k{i % 7}", "t": base + i * 0.002} for i in range(n)]
    # Records of the two partitions interleaved in small batches, as a live topic has them.
    produce(kafka_bootstrap, inp, records, partition=[i % 2 for i in range(n)], batch=50)
    oracle: Counter[tuple[Any, ...]] = Counter()
    sums: dict[tuple[str, float], list[int]] = {}
    for r in records:
        start = float(int(r["t"]))  # one-second windows
        acc = sums.setdefault((r["k"], start), [0, 0])
        acc[0] += 1
        acc[1] += r["id"]
    for (k, start), (count, total) in sums.items():
        oracle[(k, start, count, total)] += 1

    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = str(Path(__file__).with_name("kafka_crash_child.py"))
    cmd = [sys.executable, child, kafka_bootstrap, inp, out, str(tmp_path)]

    runs: list[subprocess.Popen[bytes]] = []

    def spawn(rate: str) -> subprocess.Popen[bytes]:
        """A run that starts its interpreter and builds the flow, then waits for go()."""
        pipe = subprocess.PIPE
        runs.append(subprocess.Popen([*cmd, rate], stdin=pipe, stdout=pipe, stderr=pipe, env=env))
        return runs[-1]

    # Killed runs go at 100 records/s: 20 of them (2 s at most each) cannot finish the
    # job; the last run goes fast.  The pace changes timing only, never the results.
    # Each run is started while the one before it runs (it waits for go()): a kill's
    # instant counts from its run's go, as it counted from its start.
    rng = random.Random(7)
    nxt = spawn("100")
    try:
        for done in range(20):
            p = nxt
            wait_ready(p)
            go(p)
            nxt = spawn("100" if done < 19 else "5000")
            time.sleep(rng.uniform(0.3, 2.0))
            if p.poll() is not None:
                _, err = p.communicate()
                raise AssertionError(f"the child ended by itself: {err.decode()[-3000:]}")
            p.send_signal(signal.SIGKILL)
            p.communicate()
        # The killed runs got somewhere: some windows are committed already.
        progress = committed_offsets(kafka_bootstrap, f"{inp}.crash", inp, 2)
        some = read_topic(kafka_bootstrap, out, partitions=2, expect=1)
        assert some, f"no output; offsets {progress}"
        wait_ready(nxt)
        go(nxt)
        _, err = nxt.communicate(timeout=120)
        assert nxt.returncode == 0, err.decode()[-3000:]
    finally:
        reap(runs)
    rows = read_topic(kafka_bootstrap, out, partitions=2, expect=sum(oracle.values()))
    got = Counter(
        (v["k"], v["start"], v["count"], v["sum"]) for v in (json.loads(r[3]) for r in rows)
    )
    lost, doubled = oracle - got, got - oracle
    assert not lost, (
        f"{sum(lost.values())} windows lost: {sorted(lost)[:5]}; instead: {sorted(doubled)[:5]}"
    )
    assert not doubled, f"{sum(doubled.values())} windows written twice: {sorted(doubled)[:5]}"


def test_a_checkpoint_whose_transaction_never_committed_is_not_restored(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    """The process dies between storing a checkpoint and committing its transaction
    (Kafka aborts it): the restart restores the checkpoint before, and the replay writes
    that epoch's output again.  Restoring the stored one would lose it."""
    inp, out = kafka_topics.new(1), kafka_topics.new(1)
    produce(kafka_bootstrap, inp, [{"i": i} for i in range(400)])
    ck = sw.Checkpoints(tmp_path / "ck", interval=0.1)
    tid = f"{out}.tx"

    class DiesBeforeCommit(KafkaSink):
        written = 0
        died = False

        async def write(self, batch: Any) -> None:
            await super().write(batch)
            DiesBeforeCommit.written += len(batch.values)

        async def commit(self, checkpoint_id: int, state: Any) -> None:
            if DiesBeforeCommit.written >= 100:  # stored, never committed: the process dies
                DiesBeforeCommit.died = True
                await asyncio.Event().wait()
            await super().commit(checkpoint_id, state)

    def flow(sink: KafkaSink, rate: float) -> sw.Flow:
        f = sw.Flow("kafka-dies")
        (
            f.source(source(kafka_bootstrap, inp, stop_after_idle=1.0), name="in")
            .rate_limit(sw.flowcontrol.TokenBucket(rate=rate, burst=10), name="pace")
            .sink(sink, name="out")
        )
        return f

    async def first() -> None:
        handle = sw.start(
            flow(
                DiesBeforeCommit(kafka_bootstrap, out, exactly_once=True, transactional_id=tid), 300
            ),
            checkpoints=ck,
        )
        await eventually(lambda: DiesBeforeCommit.died)
        handle.force_stop("the process died")
        with pytest.raises(sw.FlowCancelledError):
            await handle.wait()

    asyncio.run(first())
    sw.run(
        flow(KafkaSink(kafka_bootstrap, out, exactly_once=True, transactional_id=tid), 10_000),
        checkpoints=ck,
        handle_signals=False,
    )
    got = [json.loads(r[3])["i"] for r in read_topic(kafka_bootstrap, out, expect=400)]
    assert sorted(got) == list(range(400))


# -- the broker dies and comes back ------------------------------------------------------------


@pytest.mark.timeout(120)
def test_broker_sigkilled_and_restarted_mid_stream_loses_nothing(
    own_kafka: KafkaServer,
) -> None:
    """A private broker is SIGKILLed while a flow reads from it and writes back to it, and
    started again: the flow goes on by itself (librdkafka reconnects, the group rejoins)
    and every record arrives, in the flow and in the output topic (at-least-once)."""
    bootstrap = own_kafka.bootstrap
    topics = KafkaTopics(bootstrap)
    inp, out = topics.new(1), topics.new(1)
    n = 3000
    produce(bootstrap, inp, [{"i": i} for i in range(n)])
    seen: list[int] = []
    flow = sw.Flow("kafka-outage")
    (
        flow.source(source(bootstrap, inp, stop_after_idle=None), name="in")
        .rate_limit(sw.flowcontrol.TokenBucket(rate=1000, burst=50), name="pace")
        .inspect(lambda v: seen.append(v["i"]))
        .sink(KafkaSink(bootstrap, out), name="out")
    )

    async def main() -> None:
        handle = sw.start(flow)
        await eventually(lambda: len(seen) >= 500, within=30)
        await asyncio.to_thread(own_kafka.kill)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(own_kafka.start)
        await eventually(lambda: set(seen) >= set(range(n)), within=60)
        await handle.stop()  # raises if the flow failed meanwhile

    asyncio.run(main())
    assert set(seen) == set(range(n))
    written = {json.loads(r[3])["i"] for r in read_topic(bootstrap, out, expect=n)}
    assert written == set(range(n))


# -- the example ----------------------------------------------------------------------------------


def test_example_flow_builds_and_runs(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import kafka_flow  # noqa: PLC0415
    finally:
        sys.path.remove(str(EXAMPLES))
    orders, out = kafka_topics.new(2), kafka_topics.new(1)
    t = 1_700_000_050_000  # 10 s into the minute that starts at 1_700_000_040
    produce(
        kafka_bootstrap,
        orders,
        [
            {"user": "ada", "amount": 120},
            {"user": "bob", "amount": 3},
            {"user": "ada", "amount": 5},
        ],
        timestamps_ms=[t, t + 1000, t + 2000],
    )
    flow = kafka_flow.build(
        kafka_bootstrap, orders, out, stop_after_idle=1.0, transactional_id=f"{out}.tx"
    )
    sw.run(flow, checkpoints=sw.Checkpoints(tmp_path / "ck"), handle_signals=False)
    rows = sorted(
        (json.loads(r[3]) for r in read_topic(kafka_bootstrap, out, expect=2)),
        key=lambda r: r["user"],
    )
    assert rows == [
        {"user": "ada", "minute": 1_700_000_040.0, "orders": 2, "spent": 125},
        {"user": "bob", "minute": 1_700_000_040.0, "orders": 1, "spent": 3},
    ]
    assert isinstance(kafka_flow.flow, sw.Flow)


def test_a_member_joining_mid_stream_reads_nothing_twice(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    """While records of the partitions being moved are still in the first flow (a slow
    sink behind a channel), a second member joins: the first writes and commits them
    before it lets the partitions go, so the second starts after them -- nothing read
    twice, nothing lost (issue 15: on revoke, commit before release)."""
    topic = kafka_topics.new(4)
    group = f"{topic}.join"
    n = 400
    for p in range(4):
        produce(kafka_bootstrap, topic, [{"p": p, "i": i} for i in range(n)], partition=p)
    seen: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
    owned: dict[str, set[tuple[str, int]]] = {"a": set(), "b": set()}

    def flow_of(who: str) -> sw.Flow:
        src = KafkaSource(
            kafka_bootstrap,
            topic,
            group,
            poll_timeout=0.1,
            stop_after_idle=5,
            on_assign=owned[who].update,
            on_revoke=owned[who].difference_update,
            # Small fetches: the partitions are handed out interleaved, so every one still
            # has records to read when the second member joins (with whole-backlog
            # fetches the first member had handed out all of the partitions that then
            # moved, and the second had nothing left to read).
            config={"session.timeout.ms": 6000, "max.partition.fetch.bytes": 2048},
        )
        flow = sw.Flow(f"kafka-join-{who}", channel_capacity=200)
        (
            flow.source(src, name="in")
            .rate_limit(sw.flowcontrol.TokenBucket(rate=300, burst=20), name="slow")
            .map(lambda v: (v["p"], v["i"]))
            .sink(sw.sinks.Function(seen[who].append))
        )
        return flow

    async def main() -> None:
        a = sw.start(flow_of("a"))
        await eventually(lambda: len(seen["a"]) >= 100, within=30)
        b = sw.start(flow_of("b"))
        await eventually(lambda: len(owned["b"]) == 2, within=30)
        await a.wait()
        await b.wait()

    asyncio.run(main())
    assert seen["b"], "the second member got no records"
    every = sorted(seen["a"] + seen["b"])
    assert set(every) == {(p, i) for p in range(4) for i in range(n)}
    twice = len(every) - len(set(every))
    assert twice == 0, f"{twice} records read twice across the rebalance"


@pytest.mark.timeout(60)
def test_a_sink_fenced_during_a_flush_fails_with_the_fencing_not_a_system_error(
    kafka_bootstrap: str, kafka_topics: KafkaTopics
) -> None:
    """A newer producer of the sink's transactional id fences it while records are in
    flight.  confluent-kafka raises the fatal error by leaving it pending while it goes on
    running the delivery reports of the failed records, so the sink's delivery callback
    ran with an error set and the flush died with ``SystemError`` ("<method 'append' of
    'list' objects> returned a result with an exception set") -- which no one recognises
    as a fencing (a worker's task failed the worker instead of closing as superseded).
    Now every callback keeps what it met, and the flush raises a KafkaError naming the
    call and the callback, the fencing as its cause."""
    import confluent_kafka as ck  # noqa: PLC0415

    from sluiceway.core.contract import SinkContext  # noqa: PLC0415
    from sluiceway.scaleout.tasks import _fenced  # noqa: PLC0415

    topic = kafka_topics.new(1)
    tid = f"{topic}.tx"
    sink = KafkaSink(kafka_bootstrap, topic, exactly_once=True, transactional_id=tid)
    clock = sw.SystemClock()

    async def main() -> BaseException:
        await sink.open(SinkContext("fenced", "out", clock, checkpointing=True))
        try:
            await sink.write(sw.Batch(list(range(10))))  # the transaction is open
            newer = ck.Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": tid})
            await clock.run_in_thread(newer.init_transactions, 30.0)  # fences the sink
            with pytest.raises(Exception) as failed:  # noqa: PT011 - the type is the point
                await sink.write(sw.Batch(list(range(2000))))
            return failed.value
        finally:
            await sink.close()

    err = asyncio.run(asyncio.wait_for(main(), 50))
    assert not isinstance(err, SystemError), repr(err)
    assert isinstance(err, KafkaError), repr(err)
    assert "flush failed" in str(err), err
    assert "the client's on_delivery callback" in str(err), err
    assert isinstance(err.__cause__, ck.KafkaException), repr(err.__cause__)
    assert _fenced(err)


def test_a_callback_that_fails_inside_a_client_call_is_raised_after_it_naming_both() -> None:
    """A callback librdkafka runs inside ``flush``/``poll`` never raises into it (the C
    extension would turn that into a ``SystemError``): what it met is kept, and raised
    once the call returned, naming the call and the callback."""
    from sluiceway.connectors.kafka import _ErrorLog  # noqa: PLC0415

    errors = _ErrorLog("sink 'out' (Kafka(t))")

    def report(err: object, msg: object) -> None:
        raise ValueError(f"cannot record {err!r}")

    on_delivery = errors.guarded("on_delivery", report)

    def poll(timeout: float) -> int:
        on_delivery("boom", None)  # what librdkafka does inside the call
        return 0

    with pytest.raises(KafkaError, match=r"poll failed: the client's on_delivery callback") as e:
        errors.call("poll", poll, 0.1)
    assert str(e.value).startswith("sink 'out' (Kafka(t)): poll failed"), e.value
    assert isinstance(e.value.__cause__, ValueError)
    assert errors.failures == []  # raised once
    assert errors.call("poll", lambda t: 7, 0.1) == 7
