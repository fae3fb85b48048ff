"""``sluiceway run --live`` for a worker of a keyed flow: the worker's tasks in a table
redrawn on stderr (``scaleout/live.py``), the same data as its web page."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import services_kafka
from services_kafka import KafkaTopics, produce
from sluiceway.console import strip_ansi
from workers_harness import Lines

kafka_bootstrap = services_kafka.kafka_bootstrap
kafka_topics = services_kafka.kafka_topics

SRC = Path(__file__).resolve().parents[1] / "src"

JOB = """
import sluiceway as sw
from sluiceway.connectors.kafka import KafkaSink, KafkaSource


def flow():
    f = sw.Flow("livetasks")
    src = KafkaSource({bootstrap!r}, {topic!r}, {topic!r} + ".g", poll_timeout=0.1,
                      config={{"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}})
    f.source(src, name="in").key_by(lambda v: v["k"], partitioned=True).stateful_map(
        lambda s, v: ((s or 0) + 1, v), name="count"
    ).sink(KafkaSink({bootstrap!r}, {out!r}), name="out")
    return f
"""


@pytest.mark.timeout(120)
def test_a_task_worker_with_live_draws_its_tasks_with_its_lines_above(
    kafka_bootstrap: str, kafka_topics: KafkaTopics, tmp_path: Path
) -> None:
    """The table: which partitions the worker owns and a row per task (state, restore
    time, records in and out, state entries); the worker's own lines ("task p0 started")
    scroll above it; a stop is shown in the frame, and the cursor is given back."""
    topic, out = kafka_topics.new(2), kafka_topics.new(1)
    produce(
        kafka_bootstrap, topic, [{"k": i % 4, "i": i} for i in range(20)], partition=[0, 1] * 10
    )
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(JOB.format(bootstrap=kafka_bootstrap, topic=topic, out=out)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEWAY_WORKER")}
    env.update(PYTHONPATH=str(SRC), SLUICEWAY_WORKER_ID="0", COLUMNS="120", LINES="40")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "sluiceway", "run", f"{job}:flow", "--live",
            "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-interval", "0.5",
        ],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    lines = Lines(proc)
    try:
        lines.wait_for(r"sluiceway\[worker 0\]: task p1 started")
        lines.wait_for(r"owns p0, p1; task events: 2 started")
        for p in (0, 1):  # each task's row, once it has run its ten records through
            lines.wait_for(rf"^p{p}\s+yes\s+running\s+\d+\.\d{{3}}\s+10\s+10\s.*\s[1-9]\d*$")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    text = lines.text()
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in admin.delete_consumer_groups([topic + ".g"], request_timeout=10).values():
        with contextlib.suppress(Exception):  # best effort at cleanup
            fut.result(timeout=10)
    assert proc.returncode == 0, text
    assert text.startswith("\x1b[?25l"), text[:200]  # the cursor hidden while drawing...
    assert "\x1b[?25h" in text  # ...and given back
    plain = strip_ansi(text)
    assert "sluiceway  flow 'livetasks'  worker 0  t=" in plain
    assert "stopping: every task at a checkpoint (Ctrl-C again to force)" in plain
    final = strip_ansi(text.split("\x1b[J")[-1])  # the last frame: the worker left
    assert "owns nothing; task events: 2 started, 2 stopped" in final, final
    assert "(no task runs here now)" in final, final
    # the worker's lines are whole lines above the frames, never inside a row
    started = [line for line in plain.splitlines() if "task p0 started" in line]
    assert started == ["sluiceway[worker 0]: task p0 started"], started
    assert "sluiceway[worker 0]: task p0: " in plain  # its totals after the view ended
