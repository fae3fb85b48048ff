"""A stateless flow on several workers whose sinks are all exactly-once Kafka sinks is
exactly-once across rebalances and crashes (issue 15): a worker runs it as one task per
partition (``sluiceway.scaleout.tasks``) with no checkpoint directory -- each task's
consumed offsets commit in the transaction of its output, and the next owner of a
partition fences the previous one and starts from the offsets committed there.

Workers are real, separate processes (``python -m sluiceway run`` with
``SLUICEWAY_WORKER_ID``), each in a working directory of its own; the flow is
``tests/flows/eos_stateless.py`` (Kafka -> ``map`` -> exactly-once Kafka sink).
"""

from __future__ import annotations

import json
import os
import random
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import services_kafka
from services import import_or_missing
from services_kafka import KafkaTopics, produce, read_topic
from workers_harness import Output, Workers, worker_env

kafka_bootstrap = services_kafka.kafka_bootstrap
kafka_topics = services_kafka.kafka_topics

import_or_missing("confluent_kafka")

import sluiceway as sw  # noqa: E402
from sluiceway import cli  # noqa: E402
from sluiceway.connectors.kafka import KafkaSink, KafkaSource  # noqa: E402
from sluiceway.scaleout.checks import check_scalable  # noqa: E402
from sluiceway.scaleout.kinds import exactly_once_kafka, runs_as_tasks  # noqa: E402
from sluiceway.scaleout.tasks import TaskManager, TaskSpec  # noqa: E402
from sluiceway.scaleout.worker import ENV_WORKER_ID  # noqa: E402

FLOW = Path(__file__).resolve().parent / "flows" / "eos_stateless.py"
PARTITIONS = 6
PER_PARTITION = 50
BOOT = "127.0.0.1:1"  # never reached: the flows below are only checked


@pytest.fixture
def chaos_rng() -> tuple[int, random.Random]:
    seed = int(os.environ.get("SLUICEWAY_CHAOS_SEED") or random.randrange(2**31))
    print(f"chaos seed {seed} (replay: SLUICEWAY_CHAOS_SEED={seed})")
    return seed, random.Random(seed)


@pytest.mark.timeout(120)
def test_a_stateless_flow_is_exactly_once_when_a_worker_is_killed_mid_stream(
    kafka_bootstrap: str,
    kafka_topics: KafkaTopics,
    tmp_path: Path,
    chaos_rng: tuple[int, random.Random],
) -> None:
    """Two workers, one SIGKILLed at a random instant mid-stream (open transactions, its
    partitions lost, not revoked), a replacement started: a ``read_committed`` reader
    sees every input record exactly once -- 0 lost, 0 duplicated."""
    _, rng = chaos_rng
    inp, out_topic = kafka_topics.new(PARTITIONS), kafka_topics.new(1)
    for p in range(PARTITIONS):
        produce(kafka_bootstrap, inp, [{"p": p, "i": i} for i in range(PER_PARTITION)], partition=p)
    want = Counter((p, i) for p in range(PARTITIONS) for i in range(PER_PARTITION))
    env = worker_env(
        EOS_BOOTSTRAP=kafka_bootstrap,
        EOS_INPUT=inp,
        EOS_OUTPUT=out_topic,
        EOS_RATE="60",
        TMPDIR=str(tmp_path),  # the tasks' private stores: a killed worker leaves its own
    )
    workers = Workers(
        tmp_path, env, f"{FLOW}:flow", "--checkpoint-interval", "0.3", checkpoints=False
    )
    out = Output(kafka_bootstrap, out_topic, services_kafka._quiet)

    def seen() -> int:
        return len({(r["p"], r["i"]) for r in out.rows})

    def wait(what: str, done: Callable[[], bool], within: float) -> None:
        """Until ``done()``; at once, with their stderr, if a worker exits by itself."""
        for _ in range(int(within / 0.25)):
            with out.cond:
                if out.cond.wait_for(done, 0.25):
                    return
            failed = [w for w, p in workers.procs.items() if p.poll() not in (None, -9)]
            assert not failed, f"worker(s) {failed} exited while waiting for {what}"
        raise AssertionError(f"timed out after {within:g} s waiting for {what}")

    try:
        workers.start("a")
        workers.start("b")
        kill_at = rng.randrange(len(want) // 8, len(want) // 3)
        victim = rng.choice("ab")

        def mid_stream() -> bool:  # the victim has committed output (a third at most)
            return seen() >= kill_at and any(r["w"] == victim for r in out.rows)

        wait(f"{kill_at} outputs, some by worker {victim}", mid_stream, 40)
        workers.procs[victim].send_signal(signal.SIGKILL)
        print(f"SIGKILL worker {victim} at {seen()} of {len(want)} outputs")
        workers.env = {**env, "EOS_RATE": "400"}  # nothing left to pace: finish soon
        workers.start("c")  # the replacement
        wait("every output", lambda: seen() >= len(want), 60)
        running = workers.running()
        for wid in running:  # Ctrl-C: each stops its tasks at a checkpoint
            workers.procs[wid].send_signal(signal.SIGINT)
        for wid in running:
            assert workers.procs[wid].wait(timeout=60) == 0, workers.report()
        assert workers.procs[victim].wait(timeout=10) == -signal.SIGKILL
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{workers.report()}") from None
    finally:
        workers.kill_all()
        out.close()
    found = read_topic(kafka_bootstrap, out_topic, quiet_for=1.0, to_end=True)
    rows = [json.loads(v) for (_, _, _, v) in found]
    got = Counter((r["p"], r["i"]) for r in rows)
    lost, twice = want - got, got - want
    by_worker = Counter(r["w"] for r in rows)
    print(f"{len(rows)} outputs, by worker {dict(by_worker)}")
    assert not lost, f"{sum(lost.values())} records lost, e.g. {sorted(lost)[:5]}"
    assert not twice, f"{sum(twice.values())} records written twice, e.g. {sorted(twice)[:5]}"
    assert by_worker["c"] > 0, "the replacement took nothing over: the kill was not mid-stream"


def _flow(*, exactly_once: bool = True, dead_letter: Any = None, keyed: bool = False) -> sw.Flow:
    f = sw.Flow("eos-check")
    s = f.source(KafkaSource(BOOT, "in", "g"), name="in")
    if keyed:
        s = s.key_by(lambda r: r, partitioned=True).stateful_map(lambda st, r: (st, r))
    policy = sw.DeadLetter(dead_letter) if dead_letter is not None else sw.Fail()
    s.map(lambda r: r, name="m", on_error=policy).sink(
        KafkaSink(BOOT, "out", exactly_once=exactly_once), name="out"
    )
    return f


def test_which_stateless_flows_run_as_tasks_and_the_checkpoint_directory_is_refused() -> None:
    """Only a flow whose sinks -- dead-letter sinks included -- are all exactly-once Kafka
    sinks runs as tasks without keyed state; it takes no checkpoint directory (refused,
    saying why); any other stateless flow stays a plain member of the group."""
    eos = _flow()
    assert exactly_once_kafka(eos)
    assert runs_as_tasks(eos)
    assert check_scalable(eos, 2, checkpoint_dir=False)
    with pytest.raises(sw.FlowDefinitionError, match=r"Leave out\s+--checkpoint-dir"):
        check_scalable(eos, 2, checkpoint_dir=True)
    for plain in (
        _flow(exactly_once=False),
        _flow(dead_letter=sw.sinks.Collect()),
        _flow(dead_letter=KafkaSink(BOOT, "dlq")),  # at-least-once dead letters
    ):
        assert not exactly_once_kafka(plain)
        assert not runs_as_tasks(plain)
        assert not check_scalable(plain, 2, checkpoint_dir=False)
    assert runs_as_tasks(_flow(dead_letter=KafkaSink(BOOT, "dlq", exactly_once=True)))
    # a task manager without a checkpoint directory serves only such flows
    TaskManager(eos, TaskSpec(None))
    for flow, why in (
        (_flow(keyed=True), "keeps keyed state"),
        (_flow(exactly_once=False), "not an exactly-once Kafka sink"),
    ):
        with pytest.raises(sw.FlowDefinitionError, match=why):
            TaskManager(flow, TaskSpec(None))


def test_a_worker_refuses_a_checkpoint_directory_for_a_stateless_exactly_once_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --workers and by hand alike, before anything connects: the message says to
    leave it out, and nothing is written there."""
    for name, value in (("EOS_BOOTSTRAP", BOOT), ("EOS_INPUT", "in"), ("EOS_OUTPUT", "out")):
        monkeypatch.setenv(name, value)
    ck = str(tmp_path / "ck")
    for extra, wid in ((["--workers", "2"], None), ([], "a")):
        if wid is None:
            monkeypatch.delenv(ENV_WORKER_ID, raising=False)
        else:
            monkeypatch.setenv(ENV_WORKER_ID, wid)
        assert cli.main(["run", f"{FLOW}:flow", "--checkpoint-dir", ck, *extra]) == 1
        err = capsys.readouterr().err
        assert "Leave out --checkpoint-dir" in err, err
        assert not (tmp_path / "ck").exists()
