"""A Prometheus ``/metrics`` endpoint for a running flow, as a :data:`~sluiceway.Monitor`.

::

    import sluiceway as sw
    from sluiceway.metrics.prometheus import PrometheusExporter

    sw.run(flow, monitor=PrometheusExporter(9100))   # scrape http://127.0.0.1:9100/metrics

Nothing here runs per record: the exporter registers one collector whose ``collect()``
reads :meth:`FlowHandle.metrics() <sluiceway.FlowHandle.metrics>` when Prometheus scrapes.
The collector lives in the exporter's own ``CollectorRegistry`` (never the global one), so
two flows in one process, or two tests, do not clash.  The HTTP server runs on the flow's
event loop (asyncio streams), so a scrape reads the counters between two steps of the flow
-- a consistent snapshot, no threads -- and closing it when the flow ends releases the port.

:func:`metric_families` is the pure part, a snapshot in, metric families out:

>>> from prometheus_client import generate_latest
>>> from prometheus_client.registry import CollectorRegistry
>>> from sluiceway.metrics import FlowSnapshot, OperatorSnapshot
>>> op = OperatorSnapshot("parse", "map", 0, records_in=7, records_out=6, errors=1,
...                       retries=0, dead_letters=1, dropped=0)
>>> registry = CollectorRegistry()
>>> registry.register(FlowCollector(lambda: FlowSnapshot("orders", 0.0, (op,), ())))
>>> text = generate_latest(registry).decode()
>>> print(next(line for line in text.splitlines() if line.startswith("sluiceway_records_in")))
sluiceway_records_in_total{flow="orders",kind="map",operator="parse"} 7.0

Requires the ``prometheus`` extra: ``pip install 'sluiceway[prometheus]'``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from sluiceway.metrics.registry import CheckpointSnapshot, FlowSnapshot
from sluiceway.runtime.handle import FlowHandle

try:
    from prometheus_client.exposition import choose_encoder
    from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector, CollectorRegistry
except ModuleNotFoundError as exc:  # pragma: no cover - the extra is part of dev
    raise ModuleNotFoundError(
        "sluiceway.metrics.prometheus needs prometheus-client: pip install 'sluiceway[prometheus]'",
        name=exc.name,
    ) from exc

__all__ = ["FlowCollector", "PrometheusExporter", "metric_families"]

log = logging.getLogger("sluiceway.metrics")

_OPERATOR_LABELS = ("flow", "operator", "kind")
_CHANNEL_LABELS = ("flow", "edge")
_MAX_REQUEST_HEAD = 16 * 1024  # request line + headers; a scrape sends a few hundred bytes
_MAX_PORT = 65535

# (metric name without _total, help, OperatorSnapshot attribute)
_OPERATOR_COUNTERS = (
    ("sluiceway_records_in", "Records the operator received.", "records_in"),
    ("sluiceway_records_out", "Records the operator emitted.", "records_out"),
    ("sluiceway_errors", "Records on which the operator's code raised.", "errors"),
    ("sluiceway_retries", "Retries of failed records (retry policy).", "retries"),
    ("sluiceway_dead_letters", "Records sent to a dead-letter output.", "dead_letters"),
    (
        "sluiceway_dropped",
        "Records dropped by the overflow policy of the channel feeding the operator.",
        "dropped",
    ),
    (
        "sluiceway_late_records",
        "Records that arrived after their window closed (window operators).",
        "late",
    ),
)


def metric_families(snapshot: FlowSnapshot) -> list[Metric]:
    """The Prometheus metric families of one flow snapshot.

    Counters per operator (labels ``flow``, ``operator``, ``kind``):
    ``sluiceway_{records_in,records_out,errors,retries,dead_letters,dropped,late_records}
    _total``.  Gauges per operator: ``sluiceway_window_state`` (open windows),
    ``sluiceway_watermark_seconds`` (only once the operator has seen a watermark) and
    ``sluiceway_circuit_open`` (only operators with a circuit breaker; 1 while open),
    ``sluiceway_source_backlog`` (only sources that know it: a file's unread bytes).
    Per channel (labels ``flow``, ``edge``): gauges ``sluiceway_channel_fill`` and
    ``sluiceway_channel_capacity``, counters ``sluiceway_channel_blocked_seconds_total``
    and ``sluiceway_channel_dropped_total``.  With checkpoints (label ``flow``):
    ``sluiceway_checkpoints_completed_total`` and, once one is stored, gauges
    ``sluiceway_checkpoint_last_id``, ``sluiceway_checkpoint_duration_seconds`` and
    ``sluiceway_checkpoint_size_bytes`` (of the last one).
    """
    flow = snapshot.flow
    families: list[Metric] = []
    for name, help_text, attr in _OPERATOR_COUNTERS:
        counter = CounterMetricFamily(name, help_text, labels=_OPERATOR_LABELS)
        for op in snapshot.operators:
            counter.add_metric([flow, op.name, op.kind], getattr(op, attr))
        families.append(counter)

    state = GaugeMetricFamily(
        "sluiceway_window_state",
        "Entries the operator holds (open windows).",
        labels=_OPERATOR_LABELS,
    )
    watermark = GaugeMetricFamily(
        "sluiceway_watermark_seconds",
        "Event-time watermark the operator last saw, in Unix epoch seconds.",
        labels=_OPERATOR_LABELS,
    )
    circuit = GaugeMetricFamily(
        "sluiceway_circuit_open",
        "1 while the operator's circuit breaker is open, else 0.",
        labels=_OPERATOR_LABELS,
    )
    latency = GaugeMetricFamily(
        "sluiceway_stage_latency_seconds",
        "Per record, the time its batch took through the operator's stage (stage heads "
        "only), by quantile; upper bounds of log buckets, within 19 %.",
        labels=[*_OPERATOR_LABELS, "quantile"],
    )
    backlog = GaugeMetricFamily(
        "sluiceway_source_backlog",
        "Input waiting to be read by the source, when it knows (bytes of a file).",
        labels=_OPERATOR_LABELS,
    )
    for op in snapshot.operators:
        labels = [flow, op.name, op.kind]
        if not math.isnan(op.latency_p50):
            for q, v in (
                ("0.5", op.latency_p50),
                ("0.95", op.latency_p95),
                ("0.99", op.latency_p99),
            ):
                latency.add_metric([*labels, q], v)
        state.add_metric(labels, op.state)
        if math.isfinite(op.watermark):
            watermark.add_metric(labels, op.watermark)
        if op.circuit_state:
            circuit.add_metric(labels, 1.0 if op.circuit_state == "open" else 0.0)
        if op.backlog is not None:
            backlog.add_metric(labels, op.backlog)
    families += [state, watermark, circuit, backlog, latency]

    fill = GaugeMetricFamily(
        "sluiceway_channel_fill", "Records queued in the channel now.", labels=_CHANNEL_LABELS
    )
    capacity = GaugeMetricFamily(
        "sluiceway_channel_capacity",
        "The most records the channel holds.",
        labels=_CHANNEL_LABELS,
    )
    blocked = CounterMetricFamily(
        "sluiceway_channel_blocked_seconds",
        "Seconds the channel's writers spent blocked on a full channel (backpressure).",
        labels=_CHANNEL_LABELS,
    )
    dropped = CounterMetricFamily(
        "sluiceway_channel_dropped",
        "Records the channel's overflow policy dropped.",
        labels=_CHANNEL_LABELS,
    )
    for ch in snapshot.channels:
        labels = [flow, ch.name]
        fill.add_metric(labels, ch.fill)
        capacity.add_metric(labels, ch.capacity)
        blocked.add_metric(labels, ch.blocked_seconds)
        dropped.add_metric(labels, ch.records_dropped)
    families += [fill, capacity, blocked, dropped]
    if snapshot.checkpoints is not None:
        families += _checkpoint_families(flow, snapshot.checkpoints)
    return families


def _checkpoint_families(flow: str, ck: CheckpointSnapshot) -> list[Metric]:
    completed = CounterMetricFamily(
        "sluiceway_checkpoints_completed",
        "Checkpoints stored by this run.",
        labels=["flow"],
    )
    completed.add_metric([flow], ck.completed)
    out: list[Metric] = [completed]
    if ck.last_id is not None:
        for name, help_text, value in (
            ("sluiceway_checkpoint_last_id", "The id of the last checkpoint stored.", ck.last_id),
            (
                "sluiceway_checkpoint_duration_seconds",
                "Seconds the last checkpoint took, from barrier injection to stored.",
                ck.last_duration,
            ),
            (
                "sluiceway_checkpoint_size_bytes",
                "Bytes of operator state in the last checkpoint.",
                ck.last_size,
            ),
        ):
            gauge = GaugeMetricFamily(name, help_text, labels=["flow"])
            gauge.add_metric([flow], value)
            out.append(gauge)
    return out


class FlowCollector(Collector):
    """A Prometheus collector reading a flow's counters at scrape time.

    Args:
        snapshot: returns the counters now, e.g. ``handle.metrics``.
    """

    def __init__(self, snapshot: Callable[[], FlowSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """Every metric family of the flow, read now."""
        yield from metric_families(self._snapshot())


class PrometheusExporter:
    """A monitor serving ``/metrics`` for Prometheus while the flow runs.

    ``await exporter(handle)`` binds ``host:port``, serves until the flow ends (or the
    monitor is cancelled), then closes the listening socket and every open connection.
    Pass ``port=0`` to let the system choose a free port and read it from :attr:`port`
    (after :meth:`wait_serving`).  One exporter serves one flow at a time.

    Args:
        port: TCP port to listen on (0: any free port).  Default 9100.
        host: address to bind.  Default ``127.0.0.1`` (this machine only); use
            ``0.0.0.0`` to let a Prometheus server on another host scrape.

    Raises:
        ValueError: ``port`` is not in 0..65535.
        OSError: (when awaited) the address cannot be bound, e.g. the port is in use.
    """

    def __init__(self, port: int = 9100, host: str = "127.0.0.1") -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= _MAX_PORT:
            raise ValueError(f"port must be a whole number in 0..{_MAX_PORT}, got {port!r}")
        self.host = host
        self._port = port
        self._bound: int | None = None
        self._running = False
        self._serving = asyncio.Event()
        self._connections: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The port being served (the chosen one for ``port=0``), else the configured one."""
        return self._port if self._bound is None else self._bound

    @property
    def url(self) -> str:
        """``http://host:port/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def serving(self) -> bool:
        """True while the endpoint accepts scrapes."""
        return self._bound is not None

    async def wait_serving(self) -> int:
        """Wait until the endpoint accepts scrapes; returns the port."""
        await self._serving.wait()
        return self.port

    async def __call__(self, handle: FlowHandle) -> None:
        if self._running:
            raise RuntimeError(
                f"this PrometheusExporter already serves {self.url}; create one exporter per flow"
            )
        self._running = True  # before the first await: a second call is refused at once
        try:
            await self._serve(handle)
        finally:
            self._running = False

    async def _serve(self, handle: FlowHandle) -> None:
        registry = CollectorRegistry()
        registry.register(FlowCollector(handle.metrics))

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve_connection(registry, reader, writer)

        try:
            server = await asyncio.start_server(
                on_connect, self.host, self._port, limit=_MAX_REQUEST_HEAD
            )
        except OSError as exc:
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            error = OSError(
                f"cannot serve Prometheus metrics on {self.host}:{self._port}: {reason}"
            )
            error.errno = exc.errno
            raise error from exc
        self._bound = int(server.sockets[0].getsockname()[1])
        self._serving.set()
        log.info("serving Prometheus metrics of flow %r on %s", handle.flow.name, self.url)
        ended = asyncio.ensure_future(handle.wait())
        try:
            await asyncio.wait({ended})
        finally:
            # Everything that must happen is done before the first await: the monitor is
            # usually cancelled as the flow ends, maybe again while this cleanup waits.
            ended.cancel()
            server.close()
            connections = list(self._connections)
            self._connections.clear()
            for task in connections:
                task.cancel()
            self._bound = None
            self._serving = asyncio.Event()  # a fresh one: the next run may be another loop
            log.info("stopped serving Prometheus metrics of flow %r", handle.flow.name)
            closing = asyncio.ensure_future(_closed(server, [ended, *connections]))
            try:
                await asyncio.shield(closing)
            except asyncio.CancelledError:
                await closing  # quick: every task in it is cancelled already
                raise

    async def _serve_connection(
        self,
        registry: CollectorRegistry,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return  # the client left, or sent no HTTP request we can read
            status, content_type, body = _respond(registry, head)
            method = head.split(b" ", 1)[0]
            writer.write(
                (
                    f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                    f"Content-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n"
                ).encode("latin-1")
            )
            if method != b"HEAD":
                writer.write(body)
            await writer.drain()
        except ConnectionError:
            return  # the client left mid-response: nothing to tell it
        finally:
            writer.close()
            if task is not None:
                self._connections.discard(task)


async def _closed(server: asyncio.Server, tasks: list[asyncio.Future[Any]]) -> None:
    """Wait for cancelled ``tasks`` and a closed ``server`` to finish."""
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.wait_closed()


def _respond(registry: CollectorRegistry, head: bytes) -> tuple[HTTPStatus, str, bytes]:
    """Status, content type and body for one request (``head``: request line + headers)."""
    plain = "text/plain; charset=utf-8"
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):  # method, target, version
        return HTTPStatus.BAD_REQUEST, plain, b"bad request line\n"
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        return HTTPStatus.METHOD_NOT_ALLOWED, plain, b"only GET and HEAD\n"
    path = urlsplit(target).path
    if path == "/":
        return HTTPStatus.OK, plain, b"sluiceway: Prometheus metrics at /metrics\n"
    if path != "/metrics":
        return HTTPStatus.NOT_FOUND, plain, b"not found; metrics are at /metrics\n"
    accept = ""
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    encoder, content_type = choose_encoder(accept)
    try:
        body = encoder(registry)
    except Exception as exc:  # a failed scrape must not stop the flow: answer 500
        log.exception("collecting Prometheus metrics failed")
        return HTTPStatus.INTERNAL_SERVER_ERROR, plain, f"collect failed: {exc!r}\n".encode()
    return HTTPStatus.OK, content_type, body
