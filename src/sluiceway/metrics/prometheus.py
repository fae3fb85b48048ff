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

import logging
import math
from collections.abc import Callable, Iterator
from http import HTTPStatus

from sluiceway.metrics.http import PLAIN, HttpMonitor, Response
from sluiceway.metrics.registry import CheckpointSnapshot, FlowSnapshot, LoadSnapshot
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

# (metric name without _total, help, OperatorSnapshot attribute)
_OPERATOR_COUNTERS = (
    ("sluiceway_records_in", "Records the operator received.", "records_in"),
    ("sluiceway_records_out", "Records the operator emitted.", "records_out"),
    (
        "sluiceway_errors",
        "Records on which the operator's code raised (once per record, however often retried).",
        "errors",
    ),
    (
        "sluiceway_failed_attempts",
        "Tries that raised, per record (a record failing all 5 tries of a retry counts 5).",
        "failed_attempts",
    ),
    ("sluiceway_retries", "Retries of failed records (retry policy).", "retries"),
    ("sluiceway_dead_letters", "Records sent to a dead-letter output.", "dead_letters"),
    (
        "sluiceway_dropped",
        "Records dropped by the overflow policy of the channel feeding the operator.",
        "dropped",
    ),
    (
        "sluiceway_rejected",
        "Records handed back to the broker for a later delivery (rate_limit reject).",
        "rejected",
    ),
    (
        "sluiceway_late_records",
        "Records that arrived after their window closed (window operators).",
        "late",
    ),
)


def metric_families(snapshot: FlowSnapshot, *, worker: str | None = None) -> list[Metric]:
    """The Prometheus metric families of one flow snapshot (with ``worker``: every series
    also labelled ``worker``, for the workers of one flow scraped side by side).

    Counters per operator (labels ``flow``, ``operator``, ``kind``):
    ``sluiceway_{records_in,records_out,errors,failed_attempts,retries,dead_letters,dropped,
    rejected,late_records}
    _total``.  Gauges per operator: ``sluiceway_window_state`` (open windows),
    ``sluiceway_watermark_seconds`` (only once the operator has seen a watermark) and
    ``sluiceway_circuit_open`` (only operators with a circuit breaker; 1 while open),
    ``sluiceway_source_backlog`` (only sources that know it: a file's unread bytes) and
    ``sluiceway_source_partition_backlog`` (label ``partition``: a Kafka source's lag per
    partition).
    Per channel (labels ``flow``, ``edge``): gauges ``sluiceway_channel_fill`` and
    ``sluiceway_channel_capacity``, counters ``sluiceway_channel_blocked_seconds_total``
    and ``sluiceway_channel_dropped_total``.  With checkpoints (label ``flow``):
    ``sluiceway_checkpoints_completed_total``, ``sluiceway_checkpoint_compactions_total``
    and, once one is stored, gauges of the last one: ``sluiceway_checkpoint_last_id``,
    ``sluiceway_checkpoint_duration_seconds`` (barrier injected -> durable),
    ``sluiceway_checkpoint_alignment_seconds``, ``sluiceway_checkpoint_write_seconds``,
    ``sluiceway_checkpoint_size_bytes`` (state held), ``sluiceway_checkpoint_written_bytes``
    and ``sluiceway_checkpoint_delta_bytes``; per operator (label ``operator``)
    ``sluiceway_checkpoint_operator_bytes``, ``sluiceway_checkpoint_operator_keys`` and
    ``sluiceway_checkpoint_operator_snapshot_seconds``.  With a load policy (label
    ``flow``): gauges ``sluiceway_load_signal`` (label ``signal``),
    ``sluiceway_load_rule_active`` (label ``rule``, the rules that hold),
    ``sluiceway_wants_more_instances`` and ``sluiceway_admission_shedding``, counter
    ``sluiceway_load_decisions_total``.
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
    processing = GaugeMetricFamily(
        "sluiceway_operator_processing_seconds",
        "Per record, the time the operator alone spent on its batch (without the operators "
        "after it in its stage, without waiting for room downstream), by quantile.",
        labels=[*_OPERATOR_LABELS, "quantile"],
    )
    backlog = GaugeMetricFamily(
        "sluiceway_source_backlog",
        "Input waiting to be read by the source, when it knows (bytes of a file).",
        labels=_OPERATOR_LABELS,
    )
    partition_backlog = GaugeMetricFamily(
        "sluiceway_source_partition_backlog",
        "Records waiting in one partition of a partitioned source (a Kafka source's lag).",
        labels=[*_OPERATOR_LABELS, "partition"],
    )
    for op in snapshot.operators:
        labels = [flow, op.name, op.kind]
        for partition, lag in op.partition_backlog:
            partition_backlog.add_metric([*labels, partition], lag)
        if not math.isnan(op.latency_p50):
            for q, v in (
                ("0.5", op.latency_p50),
                ("0.95", op.latency_p95),
                ("0.99", op.latency_p99),
            ):
                latency.add_metric([*labels, q], v)
        if not math.isnan(op.processing_p50):
            for q, v in (
                ("0.5", op.processing_p50),
                ("0.95", op.processing_p95),
                ("0.99", op.processing_p99),
            ):
                processing.add_metric([*labels, q], v)
        state.add_metric(labels, op.state)
        if math.isfinite(op.watermark):
            watermark.add_metric(labels, op.watermark)
        if op.circuit_state:
            circuit.add_metric(labels, 1.0 if op.circuit_state == "open" else 0.0)
        if op.backlog is not None:
            backlog.add_metric(labels, op.backlog)
    families += [state, watermark, circuit, backlog, partition_backlog, latency, processing]

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
    if snapshot.load is not None:
        families += _load_families(flow, snapshot.load)
    if worker is not None:
        for family in families:
            family.samples = [
                s._replace(labels={**s.labels, "worker": worker}) for s in family.samples
            ]
    return families


def _load_families(flow: str, load: LoadSnapshot) -> list[Metric]:
    signal = GaugeMetricFamily(
        "sluiceway_load_signal",
        "A load signal at the last check: cpu (cores busy), loop_lag (s), queue_delay (s), "
        "latency_p99 (s), gc_per_minute.",
        labels=["flow", "signal"],
    )
    for name, value in load.signals.items():
        if math.isfinite(value):
            signal.add_metric([flow, name], value)
    rules = GaugeMetricFamily(
        "sluiceway_load_rule_active",
        "1 for each load rule that holds now.",
        labels=["flow", "rule"],
    )
    for label in load.active:
        rules.add_metric([flow, label], 1.0)
    decisions = CounterMetricFamily(
        "sluiceway_load_decisions",
        "Times a load rule switched on or off.",
        labels=["flow"],
    )
    decisions.add_metric([flow], load.decisions)
    wants = GaugeMetricFamily(
        "sluiceway_wants_more_instances",
        "1 while a WantMoreInstances load rule holds: scale this flow out (KEDA/HPA trigger).",
        labels=["flow"],
    )
    wants.add_metric([flow], 1.0 if load.wants_more_instances else 0.0)
    shedding = GaugeMetricFamily(
        "sluiceway_admission_shedding",
        "1 while a RejectAdmission load rule makes push sources refuse records.",
        labels=["flow"],
    )
    shedding.add_metric([flow], 0.0 if load.shedding is None else 1.0)
    return [signal, rules, decisions, wants, shedding]


def _checkpoint_families(flow: str, ck: CheckpointSnapshot) -> list[Metric]:
    completed = CounterMetricFamily(
        "sluiceway_checkpoints_completed",
        "Checkpoints stored by this run.",
        labels=["flow"],
    )
    completed.add_metric([flow], ck.completed)
    compactions = CounterMetricFamily(
        "sluiceway_checkpoint_compactions",
        "Chains of incremental state folded into new bases by this run.",
        labels=["flow"],
    )
    compactions.add_metric([flow], ck.compactions)
    out: list[Metric] = [completed, compactions]
    if ck.last_id is not None:
        for name, help_text, value in (
            ("sluiceway_checkpoint_last_id", "The id of the last checkpoint stored.", ck.last_id),
            (
                "sluiceway_checkpoint_duration_seconds",
                "Seconds the last checkpoint took, from barrier injection to stored.",
                ck.last_duration,
            ),
            (
                "sluiceway_checkpoint_alignment_seconds",
                "Seconds from the last checkpoint's barrier injection until every operator "
                "had reported.",
                ck.last_alignment,
            ),
            (
                "sluiceway_checkpoint_write_seconds",
                "Seconds the last checkpoint's serialising (on the event loop, between "
                "the records) and write (in a worker thread) took.",
                ck.last_write,
            ),
            (
                "sluiceway_checkpoint_size_bytes",
                "Bytes of operator state the last checkpoint holds in the store.",
                ck.last_size,
            ),
            (
                "sluiceway_checkpoint_written_bytes",
                "Bytes the last checkpoint wrote (whole parts, bases and deltas).",
                ck.last_written,
            ),
            (
                "sluiceway_checkpoint_delta_bytes",
                "Bytes of change sets (deltas) the last checkpoint wrote.",
                ck.last_delta_bytes,
            ),
        ):
            gauge = GaugeMetricFamily(name, help_text, labels=["flow"])
            gauge.add_metric([flow], value)
            out.append(gauge)
    per_operator = [
        ("bytes", "Bytes an operator's state takes in the store, as of the last checkpoint."),
        ("keys", "Entries (keys, open windows) an operator held at the last checkpoint."),
        ("snapshot_seconds", "Seconds an operator's snapshot took on the processing path."),
    ]
    for attr, help_text in per_operator:
        gauge = GaugeMetricFamily(
            f"sluiceway_checkpoint_operator_{attr}", help_text, labels=["flow", "operator"]
        )
        for op in ck.operators:
            value = getattr(op, attr)
            if value is not None:
                gauge.add_metric([flow, op.name], value)
        out.append(gauge)
    return out


class FlowCollector(Collector):
    """A Prometheus collector reading a flow's counters at scrape time.

    Args:
        snapshot: returns the counters now, e.g. ``handle.metrics``.
    """

    def __init__(self, snapshot: Callable[[], FlowSnapshot], *, worker: str | None = None) -> None:
        self._snapshot = snapshot
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        """Every metric family of the flow, read now."""
        yield from metric_families(self._snapshot(), worker=self._worker)


class PrometheusExporter(HttpMonitor):
    """A monitor serving ``/metrics`` for Prometheus while the flow runs.

    ``await exporter(handle)`` binds ``host:port``, serves until the flow ends (or the
    monitor is cancelled), then closes the listening socket and every open connection.
    Pass ``port=0`` to let the system choose a free port and read it from :attr:`port`
    (after :meth:`wait_serving`).  One exporter serves one flow at a time.

    Args:
        port: TCP port to listen on (0: any free port).  Default 9100.
        host: address to bind.  Default ``127.0.0.1`` (this machine only); use
            ``0.0.0.0`` to let a Prometheus server on another host scrape.
        worker: a ``worker`` label on every series (``sluiceway run --workers N`` passes
            each worker's id), so the workers of one flow can be told apart and summed.

    Raises:
        ValueError: ``port`` is not in 0..65535.
        OSError: (when awaited) the address cannot be bound, e.g. the port is in use.
    """

    what = "Prometheus metrics"
    home = "/metrics"
    one_per_flow = "create one exporter per flow"

    def __init__(
        self, port: int = 9100, host: str = "127.0.0.1", *, worker: str | None = None
    ) -> None:
        super().__init__(port, host)
        self._worker = worker
        self._registry: CollectorRegistry | None = None

    def _start(self, handle: FlowHandle) -> None:
        self._registry = CollectorRegistry()
        self._registry.register(FlowCollector(handle.metrics, worker=self._worker))

    def _route(
        self, handle: FlowHandle, path: str, headers: dict[str, str], query: str = ""
    ) -> Response:
        if path == "/":
            return HTTPStatus.OK, PLAIN, b"sluiceway: Prometheus metrics at /metrics\n"
        if path != "/metrics":
            return HTTPStatus.NOT_FOUND, PLAIN, b"not found; metrics are at /metrics\n"
        assert self._registry is not None
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        return HTTPStatus.OK, content_type, encoder(self._registry)
