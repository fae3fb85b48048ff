"""Which running flow holds each source and sink object, so that two never share one.

A connector object is opened by the flow that runs it and closed when that flow ends.
Given to two flows that run at the same time, the first to end closes it under the
other (which then fails mid-run, missing records).  The executor claims every connector
before opening any, and releases them after closing; a claim on an object that another
running flow holds is refused before anything is opened.

>>> class Thing:
...     def describe(self) -> str:
...         return "Thing"
>>> thing = Thing()
>>> held = claim([("sink", "out", thing)], "first")
>>> try:
...     claim([("sink", "results", thing)], "second")
... except FlowDefinitionError as exc:
...     print(str(exc)[:74])
sink 'results' (Thing) of flow 'second' is already running in flow 'first'
>>> held.release()
>>> claim([("sink", "results", thing)], "second").release()
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol

from sluiceway.errors import FlowDefinitionError

__all__ = ["Claim", "claim"]


class _Describable(Protocol):
    def describe(self) -> str: ...


_lock = threading.Lock()
_held: dict[int, tuple[str, str]] = {}  # id(connector) -> (flow, operator name)


class Claim:
    """The connectors one run holds; :meth:`release` when the run has closed them."""

    def __init__(self, ids: list[int]) -> None:
        self._ids = ids

    def release(self) -> None:
        """Let other runs use these objects (idempotent)."""
        with _lock:
            for i in self._ids:
                _held.pop(i, None)
        self._ids = []


def claim(connectors: Iterable[tuple[str, str, _Describable]], flow: str) -> Claim:
    """Claim ``(kind, operator name, object)`` for ``flow``, all or none.

    Raises:
        FlowDefinitionError: an object is held by another running flow; names the
            object, both flows and both operators.
    """
    wanted = list(connectors)
    with _lock:
        for kind, name, obj in wanted:
            other = _held.get(id(obj))
            if other is not None:
                raise FlowDefinitionError(
                    f"{kind} {name!r} ({obj.describe()}) of flow {flow!r} is already running "
                    f"in flow {other[0]!r} (as {other[1]!r}); a source or sink object serves "
                    "one running flow at a time (the first to end would close it under the "
                    "other): create one per flow"
                )
        ids = []
        for _, name, obj in wanted:
            if id(obj) not in _held:
                _held[id(obj)] = (flow, name)
                ids.append(id(obj))
    return Claim(ids)
