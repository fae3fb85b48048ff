"""The web view of a worker running a keyed flow as tasks (``--ui-port``).

One port per worker, served by the web view's own server (:class:`HttpMonitor`), for a
:class:`~sluiceway.scaleout.tasks.TaskWorker`: a :class:`~.tasks.TaskManager`, or the
:class:`~.repartition.StagedTasks` of a flow that repartitions through Kafka (its tasks
``p<N>`` of stage 0 and ``s<n>-p<N>`` of stage ``n``, which reads a repartition topic):

* ``GET /``: this worker's page -- the partitions it owns (of each stage's topic), and
  each task's state (starting, restoring, running, stopping), restore time, records in
  and out, lag (its sources' backlog: the records of its partitions not read yet) and
  the entries its operators hold, each linking to the task's graph; the page reloads
  itself every 2 seconds.
* ``GET /api/tasks``: the same as JSON (:func:`tasks_document`).
* ``GET /<task>/`` (``/p<N>/``, ``/s<n>-p<N>/``): the web view's page (the flow's graph
  with live numbers) of that task, which polls ``/<task>/api/flow`` (every task of a
  stage runs the same operators: one layout per stage serves them all).

Nothing here runs per record: a request reads the tasks' counters of that moment.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, cast

from sluiceway.metrics.http import PLAIN, HttpMonitor, Response
from sluiceway.metrics.registry import FlowSnapshot
from sluiceway.metrics.web import flow_graph, flow_state, page
from sluiceway.metrics.web_graph import FlowGraph

if TYPE_CHECKING:
    from sluiceway.runtime.handle import FlowHandle
    from sluiceway.scaleout.tasks import TaskStatus, TaskWorker

__all__ = ["TaskWebView", "owned_summary", "tasks_document"]

_TASK = re.compile(r"/((?:s\d+-)?p\d+)(/.*)")
_RATE_EVERY = 1.0  # seconds of the clock between the two snapshots rates are taken from


def _totals(snapshot: FlowSnapshot | None) -> dict[str, int | None]:
    """Records in (from the sources), out (into the sinks), backlog (the sources' unread
    input, where they know it), entries held."""
    if snapshot is None:
        return dict.fromkeys(("records_in", "records_out", "backlog", "state_entries"))
    ops = snapshot.operators
    backlogs = [o.backlog for o in ops if o.kind == "source" and o.backlog is not None]
    return {
        "records_in": sum(o.records_out for o in ops if o.kind == "source"),
        "records_out": sum(o.records_in for o in ops if o.kind == "sink"),
        "backlog": sum(backlogs) if backlogs else None,
        "state_entries": sum(o.state for o in ops),
    }


def tasks_document(
    manager: TaskWorker, status: list[TaskStatus], worker: str | None
) -> dict[str, Any]:
    """The ``/api/tasks`` document of a worker (``status``: its ``status()``).

    ``owned`` lists the partitions of stage 0 (the flow's input topic) this worker owns;
    ``stages`` each stage's topic and owned partitions (one entry without repartitioning).
    """
    tasks = [
        {
            "task": t.task,
            "stage": t.stage,
            "topic": t.topic,
            "partition": t.partition,
            "owned": t.owned,
            "state": t.state,
            "restore_seconds": t.restore_seconds,
            **_totals(t.snapshot),
        }
        for t in status
    ]
    stages = [
        {
            "stage": i.stage,
            "topic": i.topic,
            "owned": sorted(t.partition for t in status if t.stage == i.stage and t.owned),
        }
        for i in manager.stage_inputs()
    ]
    r = manager.restores
    events = manager.events
    return {
        "flow": manager.flow.name,
        "worker": worker,
        "owned": stages[0]["owned"],
        "stages": stages,
        "tasks": tasks,
        "events": {e: events[e] for e in sorted(events)},
        "restores": {"count": r.count, "total_seconds": r.total},
    }


def owned_summary(doc: dict[str, Any]) -> str:
    """What the worker of ``doc`` (:func:`tasks_document`) owns, as its page and live
    view say it: the tasks of its owned partitions, each stage's topic named when the
    flow has several ("" for nothing).

    >>> def task(name, stage): return {"task": name, "stage": stage, "owned": True}
    >>> one = {"stages": [{"stage": 0, "topic": "in"}], "tasks": [task("p0", 0)]}
    >>> owned_summary(one)
    'p0'
    >>> two = {"stages": [*one["stages"], {"stage": 1, "topic": "t-rep"}],
    ...        "tasks": [task("p0", 0), task("p2", 0), task("s1-p1", 1)]}
    >>> owned_summary(two)
    'p0, p2 of in; s1-p1 of t-rep'
    """
    stages = doc["stages"]
    parts = []
    for st in stages:
        names = [t["task"] for t in doc["tasks"] if t["stage"] == st["stage"] and t["owned"]]
        if names:
            listed = ", ".join(names)
            parts.append(listed if len(stages) == 1 else f"{listed} of {st['topic']}")
    return "; ".join(parts)


def _cell(value: object, digits: int = 0) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _page(doc: dict[str, Any]) -> bytes:
    title = f"flow {doc['flow']!r}, worker {doc['worker'] or '(one)'}"
    owned = owned_summary(doc) or "none (yet)"
    rows = []
    for t in doc["tasks"]:
        name = html.escape(t["task"])
        link = f'<a href="{name}/">{name}</a>' if t["records_in"] is not None else name
        rows.append(
            f'<tr class="{html.escape(t["state"])}"><td>{link}</td>'
            f"<td>{'yes' if t['owned'] else 'no (leaving)'}</td>"
            f"<td>{html.escape(t['state'])}</td>"
            f"<td>{_cell(t['restore_seconds'], 3)}</td><td>{_cell(t['records_in'])}</td>"
            f"<td>{_cell(t['records_out'])}</td><td>{_cell(t['backlog'])}</td>"
            f"<td>{_cell(t['state_entries'])}</td></tr>"
        )
    events = ", ".join(f"{n} {e}" for e, n in doc["events"].items()) or "none"
    r = doc["restores"]
    mean = f"{r['total_seconds'] / r['count']:.3f} s on average" if r["count"] else "none yet"
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>sluiceway: {html.escape(title)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
th, td {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child, td:first-child, td:nth-child(2), td:nth-child(3) {{ text-align: left; }}
tr.restoring td, tr.starting td {{ color: #a60; }} tr.stopping td {{ color: #888; }}
</style></head><body>
<h1>sluiceway: {html.escape(title)}</h1>
<p>Owns partitions: <b id="owned">{html.escape(owned)}</b>. Task events: {html.escape(events)}.
Restores: {r["count"]}, {mean}. The data: <a href="api/tasks">/api/tasks</a>.</p>
<table><thead><tr><th>task</th><th>owned</th><th>state</th><th>restore (s)</th>
<th>records in</th><th>records out</th><th>lag</th><th>state entries</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
    return body.encode()


class _WorkerHandle:
    """What the HTTP server needs of a flow's handle, for a whole worker."""

    def __init__(self, manager: TaskWorker, ended: asyncio.Future[Any]) -> None:
        self.flow = manager.flow
        self.clock = manager.clock
        self._ended = ended

    async def wait(self) -> None:
        await asyncio.shield(self._ended)


async def serve_worker(server: HttpMonitor, manager: TaskWorker) -> None:
    """Serve ``server`` for the whole worker ``manager`` runs, until cancelled."""
    forever: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    await server(cast("FlowHandle", _WorkerHandle(manager, forever)))


class TaskWebView(HttpMonitor):
    """The web view of every task of a worker (see the module's docstring)."""

    what = "the web view"
    home = "/"
    extra_headers = "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"

    def __init__(
        self, manager: TaskWorker, port: int, host: str = "127.0.0.1", *, worker: str | None = None
    ) -> None:
        super().__init__(port, host)
        self._manager = manager
        self._worker = worker
        self._graphs: dict[int, FlowGraph] = {}  # by stage: its tasks run one flow
        self._html = b""
        # (task, task start) -> the two snapshots rates are taken from
        self._samples: dict[tuple[str, float], tuple[FlowSnapshot | None, FlowSnapshot]] = {}

    def _start(self, handle: FlowHandle) -> None:
        self._graphs = {i.stage: flow_graph(i.flow) for i in self._manager.stage_inputs()}
        self._html = page()

    async def serve(self) -> None:
        """Serve until cancelled."""
        await serve_worker(self, self._manager)

    def _route(
        self, handle: FlowHandle, path: str, headers: dict[str, str], query: str = ""
    ) -> Response:
        status = self._manager.status()
        if path in ("/", "/index.html", "/api/tasks"):
            doc = tasks_document(self._manager, status, self._worker)
            if path == "/api/tasks":
                return HTTPStatus.OK, "application/json", json.dumps(doc).encode()
            return HTTPStatus.OK, "text/html; charset=utf-8", _page(doc)
        m = _TASK.fullmatch(path)
        if m is None or m.group(2) not in ("/", "/index.html", "/api/flow"):
            return (
                HTTPStatus.NOT_FOUND,
                PLAIN,
                b"not found; this worker's tasks are at /, their data at /api/tasks, the "
                b"graph of task p<N> (s<n>-p<N> in stage n) at /p<N>/ (/s<n>-p<N>/)\n",
            )
        name = m.group(1)
        task = next((t for t in status if t.task == name and t.snapshot is not None), None)
        if task is None or task.snapshot is None:
            here = ", ".join(t.task for t in status if t.snapshot) or "none"
            message = f"task {name} does not run on this worker (its tasks: {here})\n"
            return HTTPStatus.NOT_FOUND, PLAIN, message.encode()
        if m.group(2) != "/api/flow":
            return HTTPStatus.OK, "text/html; charset=utf-8", self._html
        assert task.started_at is not None
        now = task.snapshot
        key = (name, task.started_at)
        previous, latest = self._samples.get(key, (None, now))
        if now.time - latest.time >= _RATE_EVERY:
            previous, latest = latest, now
        self._samples = {k: v for k, v in self._samples.items() if k[0] != name}
        self._samples[key] = (previous, latest)
        rates = over = None
        if previous is not None and latest.time > previous.time:
            rates, over = latest.rates_since(previous), latest.time - previous.time
        document = flow_state(
            self._graphs[task.stage],
            now,
            rates,
            rates_over=over,
            started=task.started_at,
            stopping=task.state == "stopping",
        )
        return HTTPStatus.OK, "application/json", json.dumps(document, allow_nan=False).encode()
