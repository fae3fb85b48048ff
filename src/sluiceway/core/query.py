"""Queryable state: what a running operator holds for one key, read while it runs.

:meth:`FlowHandle.query(operator, key) <sluiceway.FlowHandle.query>` (and
``GET /api/state/<operator>?key=...`` on the web view) answers with a
:class:`StateAnswer`: for a window operator the key's open windows and their values so
far (:class:`OpenWindow`; ``at=`` picks the windows holding one instant -- the seed
documents' ``GetWindow(key, timestamp)``), for ``stateful_map`` the key's state, for
``process`` every value and map state of the key.

**Consistency.**  The flow runs on one event loop, and a query runs on it too, between
two steps of the flow: every record the operator has taken so far is fully applied and
none is half applied.  Usually that is a boundary between micro-batches; an operator that
waits in the middle of a batch (a retry's backoff, room downstream for its output)
answers with the records of that batch it has applied so far.  Values are deep copies:
changing them changes nothing in the flow.

**Workers.**  The answer names the worker that answered (``host:pid``).  A key lives in
the worker that owns its partition; another worker answers ``found=False`` for it.
(Scale-out itself is not built yet -- ``docs/design/scale-out-and-state.md`` -- so today a
flow is one worker and holds every key.)

>>> OpenWindow(start=60.0, end=120.0, value=3, fired=False).to_json()
{'start': 60.0, 'end': 120.0, 'value': 3, 'fired': False}
"""

from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass, field
from typing import Any

__all__ = ["KeyState", "OpenWindow", "StateAnswer", "worker_id"]


@dataclass(frozen=True, slots=True)
class OpenWindow:
    """One open window of a key: ``[start, end)`` in seconds of event time (epoch; of the
    clock for processing-time windows), the aggregate of its records so far, and whether
    it has fired on time already (then it is open only for late records, within the
    allowed lateness)."""

    start: float
    end: float
    value: Any
    fired: bool

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "value": self.value, "fired": self.fired}


@dataclass(frozen=True, slots=True)
class KeyState:
    """What an operator step reports for a key (the runtime adds who and when)."""

    found: bool
    windows: tuple[OpenWindow, ...] = ()
    state: Any = None
    watermark: float | None = None

    @staticmethod
    def copied(found: bool, state: Any, watermark: float | None = None) -> KeyState:
        return KeyState(found, (), copy.deepcopy(state), watermark)


@dataclass(frozen=True, slots=True)
class StateAnswer:
    """The answer to a state query.

    Attributes:
        operator: the operator asked.
        kind: its kind (``window``, ``stateful_map``, ``process``).
        key: the key asked for.
        found: True when this worker holds state for the key.
        worker: the worker that answered (``host:pid``).
        time: the flow clock's wall time (epoch seconds) of the read.
        watermark: the operator's event-time watermark in seconds (None: none yet, or
            not an event-time operator).
        windows: a window operator's open windows for the key, by start.
        state: ``stateful_map``: the key's state; ``process``: ``{name: value}`` of its
            value states and ``{name: {map key: value}}`` of its map states.
    """

    operator: str
    kind: str
    key: Any
    found: bool
    worker: str
    time: float
    watermark: float | None = None
    windows: tuple[OpenWindow, ...] = field(default=())
    state: Any = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (values that JSON cannot hold are turned into strings when
        served over HTTP)."""
        return {
            "operator": self.operator,
            "kind": self.kind,
            "key": self.key,
            "found": self.found,
            "worker": self.worker,
            "time": self.time,
            "watermark": self.watermark,
            "windows": [w.to_json() for w in self.windows],
            "state": self.state,
        }


def worker_id() -> str:
    """This process as a worker: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"
