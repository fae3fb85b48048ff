"""Apache Kafka for tests: the machine's broker, or a private KRaft broker from the jars.

The rules of ``services.py``, for Kafka.  The broker is the real one, run from the jars
``scripts/kafka-broker fetch`` puts into ``.cache/kafka/<version>/jars`` (this module
imports that script to fetch and start brokers, so there is one way to do it):

* ``kafka_bootstrap`` (session): the shared broker on 127.0.0.1:9092 when it answers;
  otherwise one private broker (free ports, a temporary directory) for the whole session.
  A Kafka broker takes seconds to start on two cores: never one per test.
* ``kafka_topics``: makes topics with unique names (``new(partitions)``), deleted after
  the test; ``kafka_topic`` is one such topic with one partition.  Consumer groups and
  transactional ids are named after the topic, so tests never share them.
* ``own_kafka``: a private broker this test may SIGKILL and start again on the same
  ports and data directory (outage tests).
* When no broker answers and the jars are not cached and cannot be fetched (no Maven, no
  network) or Java is missing: skip naming what is missing, or fail with
  ``SLUICEWAY_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import logging
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from services import free_port, service_missing

__all__ = [
    "KafkaServer",
    "KafkaTopics",
    "committed_offsets",
    "kafka_bootstrap",
    "kafka_topic",
    "kafka_topics",
    "own_kafka",
    "produce",
    "read_topic",
]

SHARED_HOST = "127.0.0.1"
SHARED_PORT = 9092
SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "kafka-broker"


def _script() -> ModuleType:
    """``scripts/kafka-broker`` as a module (it has no ``.py`` suffix)."""
    loader = importlib.machinery.SourceFileLoader("kafka_broker_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader("kafka_broker_script", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


kb = _script()


def kafka_answers(host: str, port: int) -> bool:
    """True if a Kafka broker answers an ApiVersions request there."""
    return bool(kb.api_versions(host, port, timeout=0.5))


class KafkaServer:
    """A private single-node KRaft broker on free ports, its data in a temporary directory
    kept across :meth:`stop` / :meth:`start` (a restarted broker finds its topics)."""

    def __init__(self) -> None:
        self.host = SHARED_HOST
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sluiceway-kafka-"))
        self.broker: Any = kb.Broker(self.dir, self.port, free_port())

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def start_new(cls) -> KafkaServer:
        """Fetch the jars if needed and start one; skip/fail (module docs) if impossible."""
        if shutil.which("java") is None:
            service_missing(f"no Kafka answers on {SHARED_HOST}:{SHARED_PORT} and java is missing")
        try:
            kb.fetch(quiet=True)
        except RuntimeError as exc:
            service_missing(
                f"no Kafka answers on {SHARED_HOST}:{SHARED_PORT} and its jars are not cached "
                f"and cannot be fetched (scripts/kafka-broker fetch): {exc}"
            )
        last: Exception | None = None
        for _ in range(3):  # a free port may be taken between choosing and binding
            server = cls()
            try:
                server.start()
            except RuntimeError as exc:
                last = exc
                server.close()
            else:
                return server
        raise RuntimeError(f"could not start a private Kafka broker: {last}")

    def start(self) -> float:
        """Start (or restart) it; returns once it serves clients, with the seconds it took."""
        took: float = self.broker.start()
        return took

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        self.broker.stop(sig)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to clients."""
        self.broker.kill()

    @property
    def running(self) -> bool:
        return bool(self.broker.alive())

    def close(self) -> None:
        self.broker.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> KafkaServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def shared_kafka() -> Iterator[str]:
    """Bootstrap servers of a Kafka tests may share: the machine's, else a private one."""
    if kafka_answers(SHARED_HOST, SHARED_PORT):
        yield f"{SHARED_HOST}:{SHARED_PORT}"
        return
    with KafkaServer.start_new() as server:
        yield server.bootstrap


class KafkaTopics:
    """Makes uniquely named topics on one broker and deletes them at the end."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka.admin import AdminClient  # noqa: PLC0415 - Kafka tests only

        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap, "logger": _quiet})
        self.made: list[str] = []

    def new(
        self, partitions: int = 1, *, prefix: str = "swtest", config: dict[str, str] | None = None
    ) -> str:
        """A fresh topic with ``partitions`` partitions (created, ready to use)."""
        from confluent_kafka.admin import NewTopic  # noqa: PLC0415

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        topic = NewTopic(name, partitions, 1, config=config or {})
        futures = self.admin.create_topics([topic], operation_timeout=30)
        for f in futures.values():
            f.result(timeout=30)
        self.made.append(name)
        return name

    def delete_all(self) -> None:
        if not self.made:
            return
        futures = self.admin.delete_topics(self.made, operation_timeout=30)
        for f in futures.values():
            with contextlib.suppress(Exception):  # already gone is fine at cleanup
                f.result(timeout=30)
        self.made.clear()


# -- raw client helpers (tests read and write with confluent-kafka itself) ----------------


def produce(
    bootstrap: str,
    topic: str,
    values: list[Any],
    *,
    partition: int | list[int] | None = None,
    timestamps_ms: list[int] | None = None,
    raw: bool = False,
    batch: int | None = None,
    keys: list[str] | None = None,
) -> None:
    """Write ``values`` (JSON, or bytes as they are with ``raw``) in order and wait.
    ``partition`` is one for all or one per record; ``batch`` caps the records per
    record batch (small batches: a consumer receives the partitions interleaved);
    ``keys`` are the records' keys (UTF-8), one per record."""
    import json  # noqa: PLC0415

    import confluent_kafka as ck  # noqa: PLC0415

    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "linger.ms": 5, "logger": _quiet}
    if batch is not None:
        conf["batch.num.messages"] = batch
    p = ck.Producer(conf)
    for i, v in enumerate(values):
        kw: dict[str, Any] = {}
        if isinstance(partition, list):
            kw["partition"] = partition[i]
        elif partition is not None:
            kw["partition"] = partition
        if timestamps_ms is not None:
            kw["timestamp"] = timestamps_ms[i]
        if keys is not None:
            kw["key"] = keys[i].encode()
        p.produce(topic, v if raw else json.dumps(v).encode(), **kw)
        p.poll(0)
    assert p.flush(30) == 0, "records not delivered"


def read_topic(
    bootstrap: str,
    topic: str,
    *,
    partitions: int = 1,
    committed: bool = True,
    expect: int | None = None,
    quiet_for: float = 2.0,
    to_end: bool = False,
) -> list[Any]:
    """Every record of ``topic`` (``read_committed`` unless ``committed=False``) as
    ``(partition, offset, key, value)``, read until ``expect`` came or ``quiet_for``
    seconds brought nothing.

    ``to_end=True`` is for a topic nobody writes to any more (its writers stopped): the
    read also ends once every partition was read to its end -- the reader reached the
    partition's high watermark, as the broker gave it with the records, so a transaction
    whose commit marker is not written yet is waited for.  ``quiet_for`` still bounds a
    wait for a transaction left open (``read_committed`` stops short of it, as before)."""
    import confluent_kafka as ck  # noqa: PLC0415

    c = ck.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed" if committed else "read_uncommitted",
            "enable.partition.eof": to_end,
            **({"fetch.wait.max.ms": 100} if to_end else {}),  # the end comes in a fetch
            "logger": _quiet,
        }
    )
    try:
        c.assign([ck.TopicPartition(topic, p, ck.OFFSET_BEGINNING) for p in range(partitions)])
        out: list[Any] = []
        ended: set[int] = set()  # partitions read to their high watermark
        quiet = 0.0
        while (expect is None or len(out) < expect) and quiet < quiet_for:
            msgs = c.consume(1000, 0.25)
            eof = ck.KafkaError._PARTITION_EOF
            eofs = [m for m in msgs if (e := m.error()) is not None and e.code() == eof]
            quiet = 0.0 if len(msgs) > len(eofs) else quiet + 0.25  # an end is no record
            for m in msgs:
                if m.error() is None:
                    out.append((m.partition(), m.offset(), m.key(), m.value()))
                    ended.discard(m.partition())
            for m in eofs:
                # the end of what is readable: the high watermark (as the fetch that
                # reached the end had it) unless an open transaction (read_committed) or
                # a commit marker still to come holds it back
                tp = ck.TopicPartition(topic, m.partition())
                _, high = c.get_watermark_offsets(tp, cached=True)
                if m.offset() >= high:
                    ended.add(m.partition())
            if to_end and len(ended) == partitions:
                break
        return out
    finally:
        c.close()


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int = 1) -> list[int]:
    """The group's committed offset per partition (-1001 where none)."""
    import confluent_kafka as ck  # noqa: PLC0415

    c = ck.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "logger": _quiet,
            # Not stable-only: a transaction a killed process left open does not block it.
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        tps = c.committed([ck.TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return [tp.offset for tp in tps]
    finally:
        c.close()


class _Quiet:
    """A logger for raw clients in tests: librdkafka's chatter at DEBUG."""

    def log(self, level: int, msg: str, *args: object) -> None:
        logging.getLogger("tests.kafka").debug(msg, *args)


_quiet = _Quiet()


# -- pytest fixtures -------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """``host:port`` of a Kafka to share (never stop or reconfigure it)."""
    with shared_kafka() as bootstrap:
        yield bootstrap


@pytest.fixture
def kafka_topics(kafka_bootstrap: str) -> Iterator[KafkaTopics]:
    """Makes fresh topics (``kafka_topics.new(partitions)``); deleted afterwards."""
    topics = KafkaTopics(kafka_bootstrap)
    yield topics
    topics.delete_all()


@pytest.fixture
def kafka_topic(kafka_topics: KafkaTopics) -> str:
    """A fresh topic with one partition, deleted after the test."""
    return kafka_topics.new(1)


@pytest.fixture
def own_kafka() -> Iterator[KafkaServer]:
    """A private Kafka broker this test may SIGKILL and start again."""
    with KafkaServer.start_new() as server:
        yield server
