"""``sluiceway run TARGET --workers N``: N worker processes of one flow over a Kafka
consumer group, each with its worker id and its own metrics port, stopped together by
Ctrl-C, SIGTERM or the supervisor's death; a failing worker stops the others and is named;
flows that cannot be split are refused before anything starts.

Every worker is a real process (``python -m sluiceway run``) on the real broker.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import textwrap
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import services_kafka
from services import import_or_missing
from services_kafka import KafkaTopics, produce, read_topic
from workers_harness import Lines, alive, run_cmd, worker_env

kafka_bootstrap = services_kafka.kafka_bootstrap
kafka_topics = services_kafka.kafka_topics

import_or_missing("confluent_kafka")

JOB = textwrap.dedent(
    """
    import os

    import sluiceway as sw
    from sluiceway.connectors.kafka import KafkaSource
    from sluiceway.flowcontrol import TokenBucket

    WID = os.environ.get("SLUICEWAY_WORKER_ID", "solo")
    MODE = os.environ.get("JOB_MODE", "finite")


    def tag(v):
        return {{"p": v["p"], "i": v["i"], "w": WID}}


    flow = sw.Flow("scaled", channel_capacity=32)  # a small prefetch: both workers get work
    (
        flow.source(
            KafkaSource(
                {bootstrap!r},
                {topic!r},
                {group!r},
                poll_timeout=0.1,
                stop_after_idle=4 if MODE == "finite" else None,
                config={{"session.timeout.ms": 6000}},
            ),
            name="in",
        )
        .rate_limit(TokenBucket(rate=300, burst=30), name="pace")
        .map(tag, name="tag")
        .sink(sw.sinks.JsonLines(f"out-{{WID}}.jsonl"), name="out")
    )


    def to_kafka():
        f = sw.Flow("scaled-kafka", channel_capacity=32)
        (
            f.source(
                KafkaSource(
                    {bootstrap!r},
                    {topic!r},
                    {group!r},
                    poll_timeout=0.1,
                    stop_after_idle=8,
                    config={{"session.timeout.ms": 6000}},
                ),
                name="in",
            )
            .rate_limit(TokenBucket(rate=100, burst=10), name="pace")
            .map(tag, name="tag")
            .sink(sw.sinks.Kafka({bootstrap!r}, {topic!r} + "-out"), name="out")
        )
        return f


    def failing():
        if WID == "1":
            raise ValueError("worker 1 fails on purpose")
        return flow


    def slow():
        import threading

        threading.Event().wait(2.0)  # a flow that takes a while to build (imports, models)
        return flow


    def keyed():
        f = sw.Flow("keyed")
        (
            f.source(KafkaSource({bootstrap!r}, {topic!r}, {group!r}), name="in")
            .key_by(lambda v: v["p"])
            .window(sw.windows.Tumbling(1))
            .aggregate(sw.agg.count(), name="per_second")
            .sink(sw.sinks.Stdout())
        )
        return f


    def from_file():
        f = sw.Flow("file")
        f.source(sw.sources.JsonLines("in.jsonl"), name="lines").sink(sw.sinks.Stdout())
        return f
    """
)


def _job(tmp_path: Path, bootstrap: str, topic: str) -> Path:
    path = tmp_path / "job.py"
    path.write_text(JOB.format(bootstrap=bootstrap, topic=topic, group=f"{topic}.workers"))
    return path


def _outputs(tmp_path: Path) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for path in sorted(tmp_path.glob("out-*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        out[path.stem.removeprefix("out-")] = [(r["p"], r["i"]) for r in rows]
    return out


def _fill(bootstrap: str, topic: str, n: int) -> set[tuple[int, int]]:
    for p in range(4):
        produce(bootstrap, topic, [{"p": p, "i": i} for i in range(n)], partition=p)
    return {(p, i) for p in range(4) for i in range(n)}


def _worker_pids(lines: Lines) -> list[int]:
    [m] = lines.wait_for(r"started 2 workers \(0: pid (\d+), 1: pid (\d+)\)")
    return [int(m.group(1)), int(m.group(2))]


def test_two_workers_split_the_partitions_and_end_together(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    topic = kafka_topics.new(4)
    want = _fill(kafka_bootstrap, topic, 500)
    job = _job(tmp_path, kafka_bootstrap, topic)
    p = subprocess.run(
        run_cmd(f"{job}:flow", "--workers", "2"),
        cwd=tmp_path,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    out = _outputs(tmp_path)
    assert sorted(out) == ["0", "1"], p.stderr
    assert all(out.values()), f"a worker read nothing: {p.stderr}"
    every = out["0"] + out["1"]
    assert set(every) == want  # nothing lost (at-least-once across the first rebalance)
    assert "sluiceway[worker 0]: flow 'scaled' finished" in p.stderr
    assert "sluiceway[worker 1]: flow 'scaled' finished" in p.stderr


def test_ctrl_c_stops_every_worker_and_each_serves_its_metrics_labelled(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    import_or_missing("prometheus_client")
    topic = kafka_topics.new(4)
    _fill(kafka_bootstrap, topic, 50)
    job = _job(tmp_path, kafka_bootstrap, topic)
    proc = subprocess.Popen(
        run_cmd(f"{job}:flow", "--workers", "2", "--metrics-port", "0"),
        cwd=tmp_path,
        env=worker_env(JOB_MODE="endless"),
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = Lines(proc)
    try:
        pids = _worker_pids(lines)
        urls = {
            m.group(1): m.group(2)
            for m in lines.wait_for(
                r"sluiceway\[worker (\d)\]: Prometheus metrics at (\S+)", count=2
            )
        }
        assert sorted(urls) == ["0", "1"]
        for wid, url in urls.items():
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = resp.read().decode()
            assert re.search(
                rf'sluiceway_records_in_total{{.*operator="tag".*worker="{wid}"', body
            ), body[:2000]
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends (the workers are in their own group)
        assert proc.wait(timeout=60) == 0, lines.text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = lines.text()
    assert "stopping 2 worker(s) (SIGINT)" in text
    assert text.count("stopped after") == 2, text
    assert not any(alive(pid) for pid in pids)


def test_a_failing_worker_is_named_and_the_others_stop(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    topic = kafka_topics.new(4)
    _fill(kafka_bootstrap, topic, 200)
    job = _job(tmp_path, kafka_bootstrap, topic)
    p = subprocess.run(
        run_cmd(f"{job}:failing", "--workers", "2"),
        cwd=tmp_path,
        env=worker_env(JOB_MODE="endless"),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert p.returncode == 1, p.stderr
    assert re.search(r"worker 1 \(pid \d+\) failed with exit code 1; stopping the other", p.stderr)
    assert "sluiceway[worker 1]: error: calling" in p.stderr
    assert "worker 1 fails on purpose" in p.stderr
    assert "sluiceway[worker 0]: flow 'scaled' stopped" in p.stderr


def test_ctrl_c_while_the_workers_still_load_the_flow_stops_them_gracefully(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    """The supervisor forwards a Ctrl-C to workers still building their flow: each one
    runs it and stops it at once, gracefully (its totals, exit 0), instead of dying in
    the import with a KeyboardInterrupt traceback and exit code 130."""
    topic = kafka_topics.new(4)
    _fill(kafka_bootstrap, topic, 10)
    job = _job(tmp_path, kafka_bootstrap, topic)
    proc = subprocess.Popen(
        run_cmd(f"{job}:slow", "--workers", "2"),
        cwd=tmp_path,
        env=worker_env(JOB_MODE="endless"),
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = Lines(proc)
    try:
        _worker_pids(lines)
        proc.send_signal(signal.SIGINT)  # the workers are inside slow() for 2 s
        assert proc.wait(timeout=90) == 0, lines.text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = lines.text()
    assert text.count("flow 'scaled' stopped after") == 2, text
    assert "KeyboardInterrupt" not in text
    assert "interrupted" not in text


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    topic = kafka_topics.new(4)
    _fill(kafka_bootstrap, topic, 50)
    job = _job(tmp_path, kafka_bootstrap, topic)
    proc = subprocess.Popen(
        run_cmd(f"{job}:flow", "--workers", "2", "--metrics-port", "0"),
        cwd=tmp_path,
        env=worker_env(JOB_MODE="endless"),
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = Lines(proc)
    try:
        pids = _worker_pids(lines)
        lines.wait_for(r"Prometheus metrics at", count=2)  # both flows are running
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        # Each worker sees the supervisor's pipe close and stops gracefully (SIGTERM to
        # itself): it says so and leaves the group.
        lines.wait_for(r"sluiceway\[worker \d\]: flow 'scaled' stopped after", count=2, within=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    for _ in range(200):
        if not any(alive(pid) for pid in pids):
            break
        threading.Event().wait(0.05)
    assert not any(alive(pid) for pid in pids)


@pytest.mark.parametrize(
    ("target", "extra", "message"),
    [
        (
            "from_file",
            [],
            r"source 'lines' \(JsonLines\(in.jsonl\)\) would be read whole by every worker: "
            r"each record would be processed 2 times\. Read from a broker",
        ),
        (
            "keyed",
            [],
            r"operator 'per_second' \(window, defined at job.py:\d+\) keeps keyed state, "
            r"which moves between workers .* give --checkpoint-dir DIR",
        ),
        (  # the input is repartitioned through Kafka, but Stdout cannot be split
            "keyed",
            ["--checkpoint-dir", "ck"],
            r"sink 'sink_Stdout' .* cannot be copied for each partition's task",
        ),
        (
            "flow",
            ["--checkpoint-dir", "ck"],
            r"2 workers of a flow without keyed state would share one checkpoint directory.*"
            r"Leave out --checkpoint-dir",
        ),
    ],
)
def test_a_flow_that_cannot_be_split_is_refused_before_any_worker_starts(
    tmp_path: Path, target: str, extra: list[str], message: str
) -> None:
    job = _job(tmp_path, "127.0.0.1:1", "never-read")
    p = subprocess.run(
        run_cmd(f"{job}:{target}", "--workers", "2", *extra),
        cwd=tmp_path,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 1, p.stderr
    assert re.search(
        rf"sluiceway: error: cannot run .*job.py:{target} on 2 workers: {message}", p.stderr
    ), p.stderr
    assert "started" not in p.stderr
    assert not (tmp_path / "ck").exists()


def test_live_and_ports_past_the_range_are_refused(tmp_path: Path) -> None:
    job = _job(tmp_path, "127.0.0.1:1", "never-read")
    for extra, message in (
        (["--live"], "--live draws the table of one process"),
        (["--metrics-port", "65535"], "--metrics-port 65535 with --workers 2 needs ports up to"),
    ):
        p = subprocess.run(
            run_cmd(f"{job}:flow", "--workers", "2", *extra),
            cwd=tmp_path,
            env=worker_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert p.returncode == 2, p.stderr
        assert message in p.stderr


@pytest.mark.timeout(300)  # four workers and a reader polling the output, on a loaded machine
def test_workers_joining_crashing_and_replaced_lose_nothing(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    """Workers started by hand as separate processes (what --workers does), a stateless
    flow Kafka -> Kafka: two start, a third joins mid-stream, one is SIGKILLed, a
    replacement joins.  Nothing is lost; the only records written twice are ones the
    killed worker had handed out since its last commit (a member joining moves
    partitions after committing them: it duplicates nothing)."""
    topic = kafka_topics.new(6)
    out_topic = topic + "-out"
    from confluent_kafka import admin  # noqa: PLC0415

    client = admin.AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in client.create_topics([admin.NewTopic(out_topic, 1, 1)]).values():
        fut.result()
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        want: set[tuple[int, int]] = set()
        for p in range(6):
            produce(kafka_bootstrap, topic, [{"p": p, "i": i} for i in range(600)], partition=p)
            want |= {(p, i) for i in range(600)}
        job = _job(tmp_path, kafka_bootstrap, topic)

        def start(wid: str) -> None:
            procs[wid] = subprocess.Popen(
                run_cmd(f"{job}:to_kafka"),
                cwd=tmp_path,
                env=worker_env(SLUICEWAY_WORKER_ID=wid),
                stderr=subprocess.PIPE,
                text=True,
            )

        def written(quiet_for: float = 0.5) -> list[Any]:
            """Every record of the output, once every worker has ended (to its end)."""
            found = read_topic(kafka_bootstrap, out_topic, quiet_for=quiet_for, to_end=True)
            return [json.loads(r[3]) for r in found]

        def wait_written(n: int) -> None:
            # read until n came (not until the topic is quiet: it is being written to)
            for _ in range(120):
                if len(read_topic(kafka_bootstrap, out_topic, expect=n, quiet_for=1.0)) >= n:
                    return
            raise AssertionError(f"fewer than {n} records written")

        start("a")
        start("b")
        wait_written(200)
        start("c")  # joins mid-stream: partitions move to it
        wait_written(700)
        assert procs["b"].poll() is None, "worker b ended before it could be killed mid-stream"
        procs["b"].send_signal(signal.SIGKILL)  # its partitions are lost, not revoked
        start("d")  # the replacement
        errors = {}
        for wid, proc in procs.items():
            _, err = proc.communicate(timeout=120)
            errors[wid] = err
            assert proc.returncode == (-9 if wid == "b" else 0), err
        rows = written(quiet_for=5.0)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
        for fut in client.delete_topics([out_topic]).values():
            fut.result()
    got = [(r["p"], r["i"]) for r in rows]
    assert set(got) == want, f"lost: {sorted(want - set(got))[:10]}"
    by_record: dict[tuple[int, int], list[str]] = {}
    for r in rows:
        by_record.setdefault((r["p"], r["i"]), []).append(r["w"])
    twice = {k: ws for k, ws in by_record.items() if len(ws) > 1}
    assert all(ws[0] == "b" for ws in twice.values()), (
        f"records written twice not by the killed worker first: "
        f"{[(k, ws) for k, ws in twice.items() if ws[0] != 'b'][:10]}"
    )
    print(f"{len(rows)} written, {len(twice)} twice (all first by the killed worker)")
