"""Workers of a keyed flow on two "machines" that share no directory: each worker runs in
a working directory (and a configuration home) of its own, with its own copy of the job,
and the tasks' checkpoints live in PostgreSQL (``--checkpoint-dir postgresql://...``).
The harness is test_tasks.py's: real worker processes, the real broker, the output read
``read_committed`` and compared with the oracle."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

import services_kafka
import services_postgres
from services_kafka import KafkaTopics
from sluiceway.checkpoint.postgres import split_url, stores_under
from test_tasks import (
    PARTITIONS,
    _flush,
    _got,
    _job,
    _oracle,
    _out_topic,
    _output,
    _produce,
    _records,
    _Workers,
)

kafka_bootstrap = services_kafka.kafka_bootstrap
kafka_topics = services_kafka.kafka_topics
pg_dsn = services_postgres.pg_dsn
pg_store_url = services_postgres.pg_store_url


@pytest.mark.timeout(240)
def test_a_partition_moves_between_machines_on_a_join_and_a_kill_through_postgresql(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path, pg_store_url: str
) -> None:
    """Worker 0 starts alone on machine a; worker 1 joins from machine b (partitions move
    to it, their state restored from PostgreSQL); worker 0 is SIGKILLed (open
    transactions, no final checkpoint) and worker 1 takes the rest over.  Every output
    row is the oracle's, once; keys that moved go on counting; no checkpoint file was
    written anywhere."""
    topic = kafka_topics.new(PARTITIONS)
    out = _out_topic(kafka_topics, topic)
    records = _records(0, 400)
    _produce(kafka_bootstrap, topic, records)
    _flush(kafka_bootstrap, topic)
    want = _oracle(records)
    machines: dict[str, tuple[Path, str]] = {}
    for name in "ab":
        home = tmp_path / f"machine-{name}"
        home.mkdir()
        machines[name] = (home, f"{_job(home, kafka_bootstrap, topic)}:flow")
    workers = _Workers(
        tmp_path,
        machines["a"][1],
        checkpoint_dir=pg_store_url,
        JOB_RATE="12",  # records/s per task: both moves land mid-stream
        SLUICEWAY_CHECKPOINT_KEY="a-key-every-machine-is-given-" + "k" * 8,
    )

    def start(wid: str, machine: str) -> None:
        home, target = machines[machine]
        workers.start(wid, wid=wid, target=target, cwd=home, env={"XDG_CONFIG_HOME": str(home)})

    try:
        start("0", "a")
        workers.wait_for("0", r"task p\d+ started", count=PARTITIONS)
        _output(kafka_bootstrap, out, 40, kind="count")
        start("1", "b")  # joins: the group moves partitions (and their state) to it
        workers.wait_for("1", r"task p\d+ started")
        joined = workers.started("1")
        _output(kafka_bootstrap, out, 120, kind="count")
        starts = len(workers.wait_for("1", r"task p\d+ started", 0))
        workers.procs["0"].send_signal(signal.SIGKILL)
        workers.wait_for("1", r"task p\d+ started", count=starts + 1)  # takes the rest over
        rows = _output(kafka_bootstrap, out, sum(want.values()), within=180)
        texts = workers.stop_all()
    finally:
        workers.kill_all()
    assert workers.procs["0"].returncode == -signal.SIGKILL
    assert workers.procs["1"].returncode == 0, texts["1"]
    got = _got(rows)
    lost, doubled = want - got, got - want
    assert not lost, f"lost {sum(lost.values())}: {sorted(lost.elements())[:8]}"
    assert not doubled, f"doubled {sum(doubled.values())}: {sorted(doubled.elements())[:8]}"
    assert joined, texts["1"]
    for p in joined:
        assert re.search(rf"worker 0\]: task p{p} stopped", texts["0"]), texts["0"]
    assert workers.started("1") == set(range(PARTITIONS)), texts["1"]
    # State moved along: keys counted on worker 1 go on from where worker 0 was.
    counts_on_1 = [r for r in rows if r["kind"] == "count" and r["w"] == "1" and r["i"] >= 0]
    assert min(r["n"] for r in counts_on_1) > 1, "a key's count started over on worker 1"
    # The tasks' stores are schemas in PostgreSQL; no checkpoint file on either machine.
    schema = split_url(pg_store_url)[1]
    assert stores_under(pg_store_url, "tasks") == [
        f"{schema}/tasks/p{p}" for p in range(PARTITIONS)
    ]
    assert not [p for p in tmp_path.rglob("*") if p.name in {"checkpoints.db", "tasks"}]
