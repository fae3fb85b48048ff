"""Prometheus metrics of a worker running a keyed flow as tasks: one port per worker.

Each task (one per owned partition, :mod:`sluiceway.scaleout.tasks`) is a run of the flow
with its own counters.  :class:`TaskExporter` serves all of them on the worker's
``--metrics-port``, every series labelled ``task="p<partition>"`` (and ``worker``), the
series of one family from every task under one ``# TYPE`` line.  A task that stops (its
partition moved) leaves the scrape; its new owner reports it from there on.  A worker of
a flow that repartitions through Kafka (:class:`~.repartition.StagedTasks`) serves the
tasks of every stage the same way: stage ``n``'s are ``task="s<n>-p<partition>"``, their
sources the repartition topic's (its lag in ``sluiceway_source_partition_backlog``).

Beside them, the worker's own series (labels ``flow`` and ``worker``; ``task`` where per
task): ``sluiceway_task_owned`` (1 per partition the group assigned to this worker, with
labels ``topic`` and ``partition``: the stage's input topic),
``sluiceway_task_state`` (1 per task, label ``state``: starting, restoring, running,
stopping), ``sluiceway_task_events_total`` (label ``event``: started, stopped, ended,
cancelled, fenced, failed), ``sluiceway_task_restore_seconds`` (the last restore time of
each task here: its start to its flow running), the histogram
``sluiceway_task_restore_duration_seconds`` of every restore on this worker, and
``sluiceway_task_state_entries`` (the entries every operator of a task holds: keys,
open windows).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from sluiceway.metrics.prometheus import PrometheusExporter, metric_families
from sluiceway.scaleout.tasks import RESTORE_BUCKETS
from sluiceway.scaleout.web import serve_worker

if TYPE_CHECKING:
    from sluiceway.runtime.handle import FlowHandle
    from sluiceway.scaleout.tasks import TaskStatus, TaskWorker

__all__ = ["TaskCollector", "TaskExporter"]


class TaskCollector(Collector):
    """Every running task's metric families, merged by name, labelled ``task``."""

    def __init__(self, manager: TaskWorker, *, worker: str | None = None) -> None:
        self._manager = manager
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        status = self._manager.status()
        merged: dict[str, Metric] = {}
        for task in status:
            if task.snapshot is None:
                continue
            name, snapshot = task.task, task.snapshot
            for family in metric_families(snapshot, worker=self._worker):
                samples = [s._replace(labels={**s.labels, "task": name}) for s in family.samples]
                have = merged.get(family.name)
                if have is None:
                    family.samples = samples
                    merged[family.name] = family
                else:
                    have.samples.extend(samples)
        yield from merged.values()
        yield from worker_families(self._manager, status, worker=self._worker)


def worker_families(
    manager: TaskWorker, status: list[TaskStatus], *, worker: str | None = None
) -> list[Metric]:
    """The worker's own series: ownership, task states and events, restore times, state
    size per task (see the module's docstring)."""
    flow = manager.flow.name
    extra = [] if worker is None else [worker]
    names = [] if worker is None else ["worker"]
    owned = GaugeMetricFamily(
        "sluiceway_task_owned",
        "1 for each partition the consumer group assigned to this worker (its task runs here), "
        "of topic: the flow's input, or a repartition topic a later stage reads.",
        labels=["flow", "task", "topic", "partition", *names],
    )
    state = GaugeMetricFamily(
        "sluiceway_task_state",
        "1 for each task on this worker, labelled with its state "
        "(starting, restoring, running, stopping).",
        labels=["flow", "task", "state", *names],
    )
    restore = GaugeMetricFamily(
        "sluiceway_task_restore_seconds",
        "Seconds the task's last start here took until its flow ran (checkpoint restore, "
        "connectors opened, exactly-once producer initialised).",
        labels=["flow", "task", *names],
    )
    entries = GaugeMetricFamily(
        "sluiceway_task_state_entries",
        "Entries (keys, open windows) the operators of the task hold now.",
        labels=["flow", "task", *names],
    )
    for t in status:
        task = t.task
        if t.owned:
            owned.add_metric([flow, task, t.topic, str(t.partition), *extra], 1.0)
        state.add_metric([flow, task, t.state, *extra], 1.0)
        if t.restore_seconds is not None:
            restore.add_metric([flow, task, *extra], t.restore_seconds)
        if t.snapshot is not None:
            entries.add_metric([flow, task, *extra], sum(o.state for o in t.snapshot.operators))
    events = CounterMetricFamily(
        "sluiceway_task_events",
        "Task starts and ends on this worker, by event (started, stopped, ended, "
        "cancelled, fenced, failed).",
        labels=["flow", "event", *names],
    )
    counts = manager.events
    for event in ("started", "stopped", "ended", "cancelled", "fenced", "failed"):
        events.add_metric([flow, event, *extra], counts[event])
    r = manager.restores
    duration = HistogramMetricFamily(
        "sluiceway_task_restore_duration_seconds",
        "Restore times of the tasks started on this worker (start to flow running).",
        labels=["flow", *names],
    )
    duration.add_metric(
        [flow, *extra],
        [(f"{b:g}", n) for b, n in zip(RESTORE_BUCKETS, r.buckets, strict=True)]
        + [("+Inf", r.count)],
        sum_value=r.total,
    )
    return [owned, state, events, restore, duration, entries]


class TaskExporter(PrometheusExporter):
    """``/metrics`` of every task of a worker (see the module's docstring)."""

    def __init__(
        self, manager: TaskWorker, port: int, host: str = "127.0.0.1", *, worker: str | None = None
    ) -> None:
        super().__init__(port, host, worker=worker)
        self._manager = manager

    def _start(self, handle: FlowHandle) -> None:
        self._registry = CollectorRegistry()
        self._registry.register(TaskCollector(self._manager, worker=self._worker))

    async def serve(self) -> None:
        """Serve until cancelled."""
        await serve_worker(self, self._manager)
