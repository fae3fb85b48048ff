"""The web view of a worker running a keyed flow as tasks (``--ui-port``).

One port per worker, served by the web view's own server (:class:`HttpMonitor`):

* ``GET /``: this worker's page -- the partitions it owns, and each task's state
  (starting, restoring, running, stopping), restore time, records in and out and the
  entries its operators hold, each linking to the task's graph; the page reloads itself
  every 2 seconds.
* ``GET /api/tasks``: the same as JSON (:func:`tasks_document`).
* ``GET /p<N>/``: the web view's page (the flow's graph with live numbers) of task
  ``p<N>``, which polls ``/p<N>/api/flow`` (every task runs the same operators: one
  layout serves them all).

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
    from sluiceway.scaleout.tasks import TaskManager, TaskStatus

__all__ = ["TaskWebView", "tasks_document"]

_TASK = re.compile(r"/p(\d+)(/.*)")
_RATE_EVERY = 1.0  # seconds of the clock between the two snapshots rates are taken from


def _totals(snapshot: FlowSnapshot | None) -> tuple[int | None, int | None, int | None]:
    """Records in (from the sources), out (into the sinks), entries held."""
    if snapshot is None:
        return None, None, None
    ops = snapshot.operators
    return (
        sum(o.records_out for o in ops if o.kind == "source"),
        sum(o.records_in for o in ops if o.kind == "sink"),
        sum(o.state for o in ops),
    )


def tasks_document(
    manager: TaskManager, status: list[TaskStatus], worker: str | None
) -> dict[str, Any]:
    """The ``/api/tasks`` document of a worker (``status``: :meth:`TaskManager.status`)."""
    tasks = []
    for t in status:
        records_in, records_out, entries = _totals(t.snapshot)
        tasks.append(
            {
                "task": f"p{t.partition}",
                "partition": t.partition,
                "owned": t.owned,
                "state": t.state,
                "restore_seconds": t.restore_seconds,
                "records_in": records_in,
                "records_out": records_out,
                "state_entries": entries,
            }
        )
    r = manager.restores
    return {
        "flow": manager.flow.name,
        "worker": worker,
        "owned": sorted(manager.owned),
        "tasks": tasks,
        "events": {e: manager.events[e] for e in sorted(manager.events)},
        "restores": {"count": r.count, "total_seconds": r.total},
    }


def _cell(value: object, digits: int = 0) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _page(doc: dict[str, Any]) -> bytes:
    title = f"flow {doc['flow']!r}, worker {doc['worker'] or '(one)'}"
    owned = ", ".join(f"p{p}" for p in doc["owned"]) or "none (yet)"
    rows = []
    for t in doc["tasks"]:
        name = html.escape(t["task"])
        link = f'<a href="{name}/">{name}</a>' if t["records_in"] is not None else name
        rows.append(
            f'<tr class="{html.escape(t["state"])}"><td>{link}</td>'
            f"<td>{'yes' if t['owned'] else 'no (leaving)'}</td>"
            f"<td>{html.escape(t['state'])}</td>"
            f"<td>{_cell(t['restore_seconds'], 3)}</td><td>{_cell(t['records_in'])}</td>"
            f"<td>{_cell(t['records_out'])}</td><td>{_cell(t['state_entries'])}</td></tr>"
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
<th>records in</th><th>records out</th><th>state entries</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
    return body.encode()


class _WorkerHandle:
    """What the HTTP server needs of a flow's handle, for a whole worker."""

    def __init__(self, manager: TaskManager, ended: asyncio.Future[Any]) -> None:
        self.flow = manager.flow
        self.clock = manager.clock
        self._ended = ended

    async def wait(self) -> None:
        await asyncio.shield(self._ended)


async def serve_worker(server: HttpMonitor, manager: TaskManager) -> None:
    """Serve ``server`` for the whole worker ``manager`` runs, until cancelled."""
    forever: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    await server(cast("FlowHandle", _WorkerHandle(manager, forever)))


class TaskWebView(HttpMonitor):
    """The web view of every task of a worker (see the module's docstring)."""

    what = "the web view"
    home = "/"
    extra_headers = "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n"

    def __init__(
        self, manager: TaskManager, port: int, host: str = "127.0.0.1", *, worker: str | None = None
    ) -> None:
        super().__init__(port, host)
        self._manager = manager
        self._worker = worker
        self._graph: FlowGraph | None = None
        self._html = b""
        # (partition, task start) -> the two snapshots rates are taken from
        self._samples: dict[tuple[int, float], tuple[FlowSnapshot | None, FlowSnapshot]] = {}

    def _start(self, handle: FlowHandle) -> None:
        self._graph = flow_graph(self._manager.flow)
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
                b"graph of task p<N> at /p<N>/\n",
            )
        p = int(m.group(1))
        task = next((t for t in status if t.partition == p and t.snapshot is not None), None)
        if task is None or task.snapshot is None:
            here = ", ".join(f"p{t.partition}" for t in status if t.snapshot) or "none"
            message = f"task p{p} does not run on this worker (its tasks: {here})\n"
            return HTTPStatus.NOT_FOUND, PLAIN, message.encode()
        if m.group(2) != "/api/flow":
            return HTTPStatus.OK, "text/html; charset=utf-8", self._html
        assert self._graph is not None
        assert task.started_at is not None
        now = task.snapshot
        key = (p, task.started_at)
        previous, latest = self._samples.get(key, (None, now))
        if now.time - latest.time >= _RATE_EVERY:
            previous, latest = latest, now
        self._samples = {k: v for k, v in self._samples.items() if k[0] != p}
        self._samples[key] = (previous, latest)
        rates = over = None
        if previous is not None and latest.time > previous.time:
            rates, over = latest.rates_since(previous), latest.time - previous.time
        document = flow_state(
            self._graph,
            now,
            rates,
            rates_over=over,
            started=task.started_at,
            stopping=task.state == "stopping",
        )
        return HTTPStatus.OK, "application/json", json.dumps(document, allow_nan=False).encode()
