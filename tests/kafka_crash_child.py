"""The flow the Kafka crash test kills (run as a subprocess by test_connector_kafka.py).

Kafka -> keyed one-second event-time windows (count and sum per key) -> Kafka with the
transactional sink, checkpointed every 0.2 s, paced so that a run lasts long enough to be
killed mid-stream.  The input ends after 1.5 s without records (then the windows flush and
a final checkpoint commits the last transaction).

It prints ``ready`` once the flow is built (nothing opened yet), then waits for a line on
stdin before it runs: the test starts the next run while this one still runs, so that
the kills come one after the other, not an interpreter's start apart.  Stdin closed
without a line: it ends without running.

Usage: kafka_crash_child.py BOOTSTRAP INPUT_TOPIC OUTPUT_TOPIC WORKDIR RATE
"""

from __future__ import annotations

import sys
from pathlib import Path

import sluiceway as sw
from sluiceway.connectors.kafka import KafkaSink, KafkaSource
from sluiceway.flowcontrol import TokenBucket


def build(bootstrap: str, inp: str, out: str, rate: float) -> sw.Flow:
    flow = sw.Flow("kafka-crash")
    src = KafkaSource(
        bootstrap,
        inp,
        f"{inp}.crash",
        timestamp=lambda r: r["t"],
        stop_after_idle=1.5,
        poll_timeout=0.1,
        # Static membership: a restarted run takes its partitions back at once instead of
        # waiting for the killed member's session to time out.
        # Small fetches: records of both partitions arrive interleaved, so the watermark
        # (their minimum) moves while the job is paced slowly.
        config={
            "group.instance.id": "crash-worker",
            "session.timeout.ms": 10000,
            "max.partition.fetch.bytes": 4096,
        },
    )
    (
        flow.source(src, name="input")
        .rate_limit(TokenBucket(rate=rate, burst=200), name="pace")
        .key_by(lambda r: r["k"], name="by_key")
        .window(sw.windows.Tumbling(1.0))
        .aggregate(n=sw.agg.count(), total=sw.agg.sum(lambda r: r["id"]), name="per_second")
        .map(
            lambda w: {
                "k": w.key,
                "start": w.start,
                "count": w.value["n"],
                "sum": w.value["total"],
            },
            name="row",
        )
        .sink(
            # A transactional id of this test's own: runs elsewhere on a shared broker
            # must not fence it.
            KafkaSink(
                bootstrap,
                out,
                key=lambda r: r["k"],
                exactly_once=True,
                transactional_id=f"{out}.tx",
            ),
            name="output",
        )
    )
    return flow


def main() -> None:
    bootstrap, inp, out, work, rate = sys.argv[1:6]
    flow = build(bootstrap, inp, out, float(rate))
    print("ready", flush=True)
    if not sys.stdin.readline():  # the test went away before this run's turn
        return
    ck = sw.Checkpoints(Path(work) / "ck", interval=0.2)
    sw.run(flow, checkpoints=ck, handle_signals=False, max_batch_size=100)


if __name__ == "__main__":
    main()
