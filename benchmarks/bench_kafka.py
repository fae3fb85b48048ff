"""Kafka: the source and the sink against raw confluent-kafka loops, and the cost of
exactly-once.

    python benchmarks/bench_kafka.py                 # full (~2 min), prints the table
    python benchmarks/bench_kafka.py --quick         # ~40 s smoke run
    python benchmarks/bench_kafka.py --bootstrap 127.0.0.1:9092

Without a broker answering at ``--bootstrap``, a private one is started from the jars
``scripts/kafka-broker fetch`` caches (and stopped afterwards).

* **source**: ``n`` small JSON records (:func:`common.make_record`) pre-filled into a
  one-partition topic, read back and decoded.  ``sluiceway``: ``sw.sources.Kafka`` with its
  defaults (JSON, event time from the record timestamps, per-partition watermarks) into a
  sink that counts.  ``raw``: ``Consumer.consume(1024, 0.2)`` (the source's default wait)
  and ``json.loads`` of each value.
  Both clocks run from the first record received to the last (the group join before it is
  the same for both and not what is measured).
* **sink**: ``n`` records from memory written as JSON, idempotent producer, acks=all.
  ``sluiceway``: ``sw.sources.Iterable -> sw.sinks.Kafka`` (a batch acknowledged before the
  next is taken).  ``raw``: ``produce(json.dumps(r))`` for each, ``poll(0)`` every 1,000,
  ``flush()`` at the end.
* **exactly-once**: the same sink flow with ``exactly_once=True`` and checkpoints every
  1 s, against the at-least-once sink flow (both sluiceway): the cost of a transaction per
  checkpoint epoch.

Each measurement is a fresh child process on fresh topics; the systems alternate, and the
median of ``repeats`` runs counts.  Target: >= 70 % of the raw client for source and sink.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import confluent_kafka as ck
from common import HERE, Params, Result, Row, fmt_int, make_record, module_main, run_child
from confluent_kafka.admin import AdminClient, NewTopic

import sluiceway as sw
from sluiceway.core.messages import Batch

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
TARGET = 0.70
_QUIET: dict[str, Any] = {"log_level": 3}


def _topic(bootstrap: str, partitions: int = 1) -> str:
    name = f"swbench-{uuid.uuid4().hex[:12]}"
    admin = AdminClient({"bootstrap.servers": bootstrap, **_QUIET})
    for f in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        f.result(30)
    return name


def _delete(bootstrap: str, *topics: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap, **_QUIET})
    for f in admin.delete_topics(list(topics)).values():
        f.result(30)


def _fill(bootstrap: str, topic: str, n: int) -> None:
    p = ck.Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, **_QUIET})
    for i in range(n):
        p.produce(topic, json.dumps(make_record(i)).encode())
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0


# -- the source ------------------------------------------------------------------------------


def _raw_source(bootstrap: str, topic: str, n: int) -> float:
    c = ck.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}.raw",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            **_QUIET,
        }
    )
    c.subscribe([topic])
    got = 0
    t0 = 0.0
    loads = json.loads
    while got < n:
        msgs = c.consume(1024, 0.2)  # the source's default poll_timeout
        if msgs and not t0:
            t0 = time.perf_counter()
        values = [loads(m.value()) for m in msgs if m.error() is None]
        got += len(values)
    elapsed = time.perf_counter() - t0
    c.close()
    return elapsed


class _Count(sw.sinks.Sink):
    def __init__(self, n: int) -> None:
        self.n = n
        self.got = 0
        self.first = 0.0
        self.last = 0.0

    async def write(self, batch: Batch) -> None:
        if not self.got:
            self.first = time.perf_counter()
        self.got += len(batch.values)
        if self.got >= self.n:
            self.last = time.perf_counter()


async def _sluiceway_source(bootstrap: str, topic: str, n: int) -> float:
    sink = _Count(n)
    flow = sw.Flow("bench-kafka-source")
    flow.source(sw.sources.Kafka(bootstrap, topic, f"{topic}.sw", config=_QUIET)).sink(sink)
    handle = sw.start(flow)
    while sink.got < n:  # noqa: ASYNC110 - a counter
        await asyncio.sleep(0.001)
    await handle.stop()
    return sink.last - sink.first


# -- the sink --------------------------------------------------------------------------------


def _raw_sink(bootstrap: str, topic: str, records: list[dict[str, Any]]) -> float:
    p = ck.Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            **_QUIET,
        }
    )
    t0 = time.perf_counter()
    dumps = json.dumps
    produce = p.produce
    for i, r in enumerate(records):
        while True:
            try:
                produce(topic, dumps(r).encode())
                break
            except BufferError:
                p.poll(0.01)
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    return time.perf_counter() - t0


def _sluiceway_sink(
    bootstrap: str, topic: str, records: list[dict[str, Any]], exactly_once: bool
) -> float:
    flow = sw.Flow("bench-kafka-sink")
    flow.source(sw.sources.Iterable(records)).sink(
        sw.sinks.Kafka(bootstrap, topic, exactly_once=exactly_once, config=_QUIET)
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = sw.Checkpoints(Path(tmp) / "ck", interval=1.0) if exactly_once else None
        t0 = time.perf_counter()
        sw.run(flow, checkpoints=ckpt, handle_signals=False)
        return time.perf_counter() - t0


def measure(params: Params) -> Result:
    """Child entry: seconds for ``n`` records of ``what`` with ``system``."""
    bootstrap, n, what, system = params["bootstrap"], params["n"], params["what"], params["system"]
    topic = _topic(bootstrap)
    try:
        if what == "source":
            _fill(bootstrap, topic, n)
            if system == "raw":
                elapsed = _raw_source(bootstrap, topic, n)
            else:
                elapsed = asyncio.run(_sluiceway_source(bootstrap, topic, n))
        else:
            records = [make_record(i) for i in range(n)]
            if system == "raw":
                elapsed = _raw_sink(bootstrap, topic, records)
            else:
                elapsed = _sluiceway_sink(bootstrap, topic, records, system == "sluiceway-eos")
    finally:
        _delete(bootstrap, topic)
    return {"seconds": elapsed, "rate": n / elapsed}


def _broker(bootstrap: str) -> tuple[str, Any]:
    """``bootstrap`` if a broker answers there, else a private one (and its handle)."""
    script = HERE.parent / "scripts" / "kafka-broker"
    loader = importlib.machinery.SourceFileLoader("kafka_broker_script", str(script))
    spec = importlib.util.spec_from_loader("kafka_broker_script", loader)
    assert spec is not None
    kb = importlib.util.module_from_spec(spec)
    loader.exec_module(kb)
    host, _, port = bootstrap.rpartition(":")
    if kb.api_versions(host, int(port)):
        return bootstrap, None
    kb.fetch(quiet=True)
    import socket  # noqa: PLC0415

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    broker = kb.Broker(Path(tempfile.mkdtemp(prefix="swbench-kafka-")), ports[0], ports[1])
    broker.start()
    return f"127.0.0.1:{ports[0]}", broker


def run(quick: bool, bootstrap: str = DEFAULT_BOOTSTRAP) -> tuple[list[Row], Result]:
    """The Kafka rows (for run.py) and the raw figures."""
    n, repeats = (50_000, 3) if quick else (200_000, 5)
    bootstrap, private = _broker(bootstrap)
    raw: Result = {"n": n, "repeats": repeats}
    try:
        pairs = {
            "source": ("raw", "sluiceway"),
            "sink": ("raw", "sluiceway"),
            "eos": ("sluiceway", "sluiceway-eos"),
        }
        for what, systems in pairs.items():
            runs: dict[str, list[float]] = {s: [] for s in systems}
            for rep in range(repeats):  # alternate, starting with each in turn
                order = systems if rep % 2 == 0 else systems[::-1]
                for system in order:
                    params = {
                        "bootstrap": bootstrap,
                        "n": n,
                        "what": "source" if what == "source" else "sink",
                        "system": system,
                    }
                    runs[system].append(run_child("bench_kafka", "measure", params)["rate"])
            raw[what] = runs
    finally:
        if private is not None:
            private.stop()
    med = {
        w: {s: statistics.median(r) for s, r in runs.items()}
        for w, runs in raw.items()
        if isinstance(runs, dict)
    }
    rows: list[Row] = []
    for what, label in (("source", "Kafka source (JSON)"), ("sink", "Kafka sink (JSON)")):
        ratio = med[what]["sluiceway"] / med[what]["raw"]
        rows += [
            Row(
                label,
                f"sluiceway sw.{what}s.Kafka",
                f"{fmt_int(med[what]['sluiceway'])} rec/s",
                f"{ratio:.0%} of raw",
                f">= {TARGET:.0%}",
                "PASS" if ratio >= TARGET else "FAIL",
            ),
            Row(label, "raw confluent-kafka loop", f"{fmt_int(med[what]['raw'])} rec/s"),
        ]
    eos = med["eos"]["sluiceway-eos"] / med["eos"]["sluiceway"]
    rows += [
        Row(
            "Kafka sink, exactly-once, checkpoint every 1 s",
            "sluiceway sinks.Kafka(exactly_once=True)",
            f"{fmt_int(med['eos']['sluiceway-eos'])} rec/s",
            f"{eos:.0%} of at-least-once",
        ),
    ]
    return rows, raw


if __name__ == "__main__":
    module_main(
        __doc__ or "",
        run,
        {"measure": measure},
        ("--bootstrap", DEFAULT_BOOTSTRAP, "the Kafka broker"),
    )
