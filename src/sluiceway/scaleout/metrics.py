"""Prometheus metrics of a worker running a keyed flow as tasks: one port per worker.

Each task (one per owned partition, :mod:`sluiceway.scaleout.tasks`) is a run of the flow
with its own counters.  :class:`TaskExporter` serves all of them on the worker's
``--metrics-port``, every series labelled ``task="p<partition>"`` (and ``worker``), the
series of one family from every task under one ``# TYPE`` line.  A task that stops (its
partition moved) leaves the scrape; its new owner reports it from there on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from sluiceway.metrics.prometheus import PrometheusExporter, metric_families

if TYPE_CHECKING:
    from sluiceway.runtime.handle import FlowHandle
    from sluiceway.scaleout.tasks import TaskManager

__all__ = ["TaskCollector", "TaskExporter"]


class TaskCollector(Collector):
    """Every running task's metric families, merged by name, labelled ``task``."""

    def __init__(self, manager: TaskManager, *, worker: str | None = None) -> None:
        self._manager = manager
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for p, snapshot in self._manager.snapshots().items():
            for family in metric_families(snapshot, worker=self._worker):
                samples = [s._replace(labels={**s.labels, "task": f"p{p}"}) for s in family.samples]
                have = merged.get(family.name)
                if have is None:
                    family.samples = samples
                    merged[family.name] = family
                else:
                    have.samples.extend(samples)
        yield from merged.values()


class _WorkerHandle:
    """What the HTTP server needs of a flow's handle, for a whole worker."""

    def __init__(self, manager: TaskManager, ended: asyncio.Future[Any]) -> None:
        self.flow = manager.flow
        self.clock = manager.clock
        self._ended = ended

    async def wait(self) -> None:
        await asyncio.shield(self._ended)


class TaskExporter(PrometheusExporter):
    """``/metrics`` of every task of a worker (see the module's docstring)."""

    def __init__(
        self, manager: TaskManager, port: int, host: str = "127.0.0.1", *, worker: str | None = None
    ) -> None:
        super().__init__(port, host, worker=worker)
        self._manager = manager

    def _start(self, handle: FlowHandle) -> None:
        self._registry = CollectorRegistry()
        self._registry.register(TaskCollector(self._manager, worker=self._worker))

    async def serve(self) -> None:
        """Serve until cancelled."""
        forever: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self(cast("FlowHandle", _WorkerHandle(self._manager, forever)))
