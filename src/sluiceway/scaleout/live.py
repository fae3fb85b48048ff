"""The live terminal view of a worker running a keyed flow as tasks (``run --live``).

It shows what the worker's web page shows (:mod:`sluiceway.scaleout.web`), from the same
document (:func:`~sluiceway.scaleout.web.tasks_document` of the worker's
:meth:`~sluiceway.scaleout.tasks.TaskWorker.status`): the partitions the worker owns, its
task events and restores, and a row per task with its state, restore time, records in and
out (and their rates), lag (its sources' backlog: the records of its partitions not read
yet) and the entries its operators hold::

    sluiceway  flow 'spend'  worker 0  t=12.0s
    owns p0, p1, p3; task events: 3 started; restores: 3, 0.412 s on average

    task  owned  state      restore (s)  records in  records out  in/s  out/s  lag  state entries
    p0    yes    running          0.402       1,204        1,204    98     98    0            310
    p1    yes    restoring            -           -            -     -      -    -              -
    p3    yes    running          0.431       1,187        1,187   101    101   12            296

A worker of a flow that repartitions through Kafka shows the tasks of every stage
(``s1-p2`` reads partition 2 of the repartition topic), and what it owns per topic
(``owns p0, p1 of orders; s1-p2 of spend-by_user-repartition``).

The table is redrawn in place every ``interval`` seconds of the worker's clock; the
worker's own lines (``task p1 started``) scroll above it (:meth:`TaskLiveView.say`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TextIO

from sluiceway.console import Frames, cut, format_count, format_rate, table
from sluiceway.scaleout.web import owned_summary, tasks_document

if TYPE_CHECKING:
    from sluiceway.scaleout.tasks import TaskWorker

__all__ = ["TaskLiveView", "render_tasks"]

_NONE = "-"


def _count(value: int | None) -> str:
    return _NONE if value is None else format_count(value)


def _rate(task: dict[str, Any], key: str, previous: dict[str, Any] | None, seconds: float) -> str:
    """Records per second of ``task[key]`` since ``previous`` (the same run of the task)."""
    if previous is None or seconds <= 0 or task[key] is None or previous.get(key) is None:
        return _NONE
    return format_rate((task[key] - previous[key]) / seconds)


def render_tasks(
    doc: dict[str, Any],
    width: int,
    *,
    previous: dict[str, Any] | None = None,
    seconds: float = 0.0,
    age: float | None = None,
    stopping: bool = False,
) -> str:
    """The worker's page as text of at most ``width`` columns.

    >>> doc = {"flow": "spend", "worker": "0", "events": {"started": 2},
    ...        "stages": [{"stage": 0, "topic": "orders", "owned": [0, 1]}],
    ...        "restores": {"count": 1, "total_seconds": 0.25}, "tasks": [
    ...     {"task": "p0", "stage": 0, "partition": 0, "owned": True, "state": "running",
    ...      "restore_seconds": 0.25, "records_in": 1200, "records_out": 1190,
    ...      "backlog": 3, "state_entries": 40},
    ...     {"task": "p1", "stage": 0, "partition": 1, "owned": True, "state": "restoring",
    ...      "restore_seconds": None, "records_in": None, "records_out": None,
    ...      "backlog": None, "state_entries": None}]}
    >>> print(render_tasks(doc, 100, age=3.0))
    sluiceway  flow 'spend'  worker 0  t=3.0s
    owns p0, p1; task events: 2 started; restores: 1, 0.250 s on average
    <BLANKLINE>
    task  owned  state      restore (s)  records in  records out  in/s  out/s  lag  state entries
    p0    yes    running          0.250       1,200        1,190     -      -    3             40
    p1    yes    restoring            -           -            -     -      -    -              -

    Args:
        doc: the worker's ``/api/tasks`` document (:func:`tasks_document`).
        width: the widest a line may be (longer lines are cut, ending in ``~``).
        previous: the document ``seconds`` earlier, for rates (None: rates show ``-``).
        seconds: the clock seconds between ``previous`` and ``doc``.
        age: seconds since the view started (None: not shown).
        stopping: the worker is stopping its tasks at a checkpoint (said in the frame).
    """
    title = f"sluiceway  flow {doc['flow']!r}  worker {doc['worker'] or '(one)'}"
    if age is not None:
        title += f"  t={age:.1f}s"
    owned = owned_summary(doc) or "nothing"
    events = ", ".join(f"{n} {e}" for e, n in doc["events"].items()) or "none"
    r = doc["restores"]
    mean = f"{r['total_seconds'] / r['count']:.3f} s on average" if r["count"] else "none yet"
    before = {} if previous is None else {t["task"]: t for t in previous["tasks"]}
    rows = []
    for t in doc["tasks"]:
        restore = t["restore_seconds"]
        # rates only within one run of a task (a task that restarted counts from zero)
        was = before.get(t["task"])
        if was is not None and (t["records_in"] or 0) < (was["records_in"] or 0):
            was = None
        rows.append(
            [
                t["task"],
                "yes" if t["owned"] else "no (leaving)",
                t["state"],
                _NONE if restore is None else f"{restore:.3f}",
                _count(t["records_in"]),
                _count(t["records_out"]),
                _rate(t, "records_in", was, seconds),
                _rate(t, "records_out", was, seconds),
                _count(t["backlog"]),
                _count(t["state_entries"]),
            ]
        )
    header = ["task", "owned", "state", "restore (s)", "records in", "records out"]
    header += ["in/s", "out/s", "lag", "state entries"]
    lines = [title, f"owns {owned}; task events: {events}; restores: {r['count']}, {mean}"]
    if stopping:
        lines.insert(0, "stopping: every task at a checkpoint (Ctrl-C again to force)")
    lines.append("")
    lines += table(header, rows, left=3) if rows else ["(no task runs here now)"]
    return "\n".join(cut(line, width) for line in lines)


class TaskLiveView:
    """The live view of a worker's tasks on a terminal (see the module's docstring).

    Args:
        stream: the terminal (``sys.stderr`` for ``run --live``).
        interval: seconds of the worker's clock between two frames.
        worker: the worker's id, for the title.
        width: the widest a line may be (default: the terminal's width).
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = 1.0,
        worker: str | None = None,
        width: int | None = None,
    ) -> None:
        if not 0 < interval < math.inf:
            raise ValueError(
                f"TaskLiveView interval must be a finite number > 0 seconds, got {interval!r}"
            )
        self.interval = float(interval)
        self.worker = worker
        self.stopping = False
        """Set when the worker stops its tasks at a checkpoint (shown in the frame)."""
        self._frames = Frames(stream, width)

    def say(self, line: str) -> None:
        """A line of the worker's (``task p1 started``), above the frame."""
        self._frames.above(line)

    async def __call__(self, manager: TaskWorker) -> None:
        """Draw a frame every ``interval`` until cancelled; then a last one."""
        clock = manager.clock
        started = clock.monotonic()
        previous: dict[str, Any] | None = None
        previous_at = started

        def frame() -> tuple[dict[str, Any], float]:
            doc = tasks_document(manager, manager.status(), self.worker)
            now = clock.monotonic()
            text = render_tasks(
                doc,
                self._frames.columns(),
                previous=previous,
                seconds=now - previous_at,
                age=now - started,
                stopping=self.stopping,
            )
            self._frames.show(text)
            return doc, now

        self._frames.begin()
        try:
            previous, previous_at = frame()
            next_tick = started + self.interval
            while True:
                await clock.sleep_until(next_tick)
                previous, previous_at = frame()
                next_tick += self.interval
                if next_tick <= clock.monotonic():  # fell behind: skip, do not burst
                    next_tick = clock.monotonic() + self.interval
        finally:
            frame()
            self._frames.end()
