"""Lookup join: enrich each record with a row fetched by its key from an external system.

``keyed.lookup_join(fetch, ...)`` is ``map_async`` with a cache in front: ``fetch(key)``
(an async function: a database query, an HTTP call) returns the key's row, or None when
there is none.  Concurrency, timeout, circuit breaker and error policy (retries, dead
letters) are map_async's; results leave in input order.  A record whose key's row is in
the cache -- fetched at most ``ttl`` seconds ago (time since it was *written* to the
cache, on the flow's clock), and among the ``cache_size`` most recently used -- is answered
at once without a call.  Rows that were not found (None) are cached too.  Records whose key
is being fetched already wait for that call instead of starting another.

The cache is not state: it is not checkpointed, and a restarted flow starts with it empty.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Any, ClassVar

from sluiceway.operators.async_io import AsyncMapSpec, Row, _AsyncMapStep
from sluiceway.operators.base import BuildContext, Step

__all__ = ["LookupCache", "LookupJoinSpec"]


class LookupCache:
    """A bounded LRU cache whose entries expire ``ttl`` seconds after they were written.

    Time-dependent logic is pure: every method takes ``now``.

    >>> c = LookupCache(size=2, ttl=10.0)
    >>> c.put("a", 1, now=0.0); c.put("b", 2, now=1.0)
    >>> c.get("a", now=5.0)
    (True, 1)
    >>> c.put("c", 3, now=6.0)  # evicts "b", the least recently used
    >>> c.get("b", now=6.0), c.get("a", now=10.0)
    ((False, None), (False, None))
    """

    def __init__(self, size: int, ttl: float | None) -> None:
        self.size = size
        self.ttl = ttl
        self.entries: OrderedDict[Hashable, tuple[Any, float]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, now: float) -> tuple[bool, Any]:
        """``(True, row)`` for a fresh entry, else ``(False, None)`` (an expired one goes)."""
        entry = self.entries.get(key)
        if entry is not None:
            row, written = entry
            if self.ttl is None or now < written + self.ttl:
                self.entries.move_to_end(key)
                self.hits += 1
                return True, row
            del self.entries[key]
        self.misses += 1
        return False, None

    def put(self, key: Hashable, row: Any, now: float) -> None:
        self.entries[key] = (row, now)
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class _LookupStep(_AsyncMapStep):
    """map_async whose call is ``fetch(key)`` through the cache; a hit skips the call."""

    def __init__(self, ctx: BuildContext, spec: LookupJoinSpec) -> None:
        super().__init__(ctx, spec)
        self.fetch = spec.fetch
        self.cache = LookupCache(spec.cache_size, spec.ttl)
        self.fetching: dict[Hashable, asyncio.Task[Any]] = {}  # one call per key at a time
        self.fn = self._lookup

    def _arg(self, row: Row) -> Any:
        return (row[2], row[0])

    async def _lookup(self, arg: tuple[Hashable, Any]) -> tuple[Any, Any]:
        """One attempt for one record: join the key's call in flight, or start it.  The
        call is shielded: a record that times out does not cancel it for the others."""
        key, value = arg
        task = self.fetching.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(key))
            self.fetching[key] = task
            task.add_done_callback(partial(self._fetched, key))
        return (value, await asyncio.shield(task))

    async def _fetch(self, key: Hashable) -> Any:
        row = await self.fetch(key)
        self.cache.put(key, row, self.clock.monotonic())
        return row

    def _fetched(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self.fetching.get(key) is task:
            del self.fetching[key]
        if not task.cancelled():
            task.exception()  # every waiter got it (and its error policy handles it)

    def close(self) -> None:
        super().close()
        for task in self.fetching.values():
            task.cancel("flow over")

    def _start(self, row: Row) -> None:
        hit, cached = self.cache.get(row[2], self.clock.monotonic())
        if not hit:
            super()._start(row)
            return
        self.done[self._claim(row)] = ((row[0], cached), row[1], row[2], row[3])

    async def _send_ready(self) -> None:
        self.metrics.state = len(self.cache.entries)
        await super()._send_ready()


class LookupJoinSpec(AsyncMapSpec):
    """``keyed.lookup_join(fetch, ...)``."""

    kind: ClassVar[str] = "lookup_join"

    def __init__(
        self,
        fetch: Callable[[Any], Awaitable[Any]],
        *,
        cache_size: int,
        ttl: float | None,
        **map_async: Any,
    ) -> None:
        super().__init__(fetch, **map_async)
        self.fetch = fetch
        self.cache_size = cache_size
        self.ttl = ttl

    def build(self, ctx: BuildContext) -> Step:
        return _LookupStep(ctx, self)
