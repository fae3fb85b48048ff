"""Helpers for testing flows: run on a virtual clock, collect the output.

Users import these in their own tests; sluiceway's tests use them too.

>>> import sluiceway as sw
>>> sw.testing.run_collect(lambda s: s.map(lambda x: x + 1), [1, 2, 3])
[2, 3, 4]
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Iterable
from typing import Any

from sluiceway.connectors.base import Source
from sluiceway.connectors.memory import Collect
from sluiceway.connectors.memory import Iterable as IterableSource
from sluiceway.flow import Flow, Stream
from sluiceway.runtime.executor import RunResult
from sluiceway.runtime.handle import run_async
from sluiceway.time import Clock, VirtualClock

__all__ = ["VirtualClock", "run_collect", "run_flow"]


def run_flow(
    flow: Flow,
    *,
    clock: Clock | None = None,
    max_batch_size: int = 1024,
    seed: int | None = 0,
) -> RunResult:
    """Run ``flow`` to completion on a virtual clock (default) in a fresh event loop."""
    return asyncio.run(
        run_async(flow, clock=clock or VirtualClock(), max_batch_size=max_batch_size, seed=seed)
    )


def run_collect(
    build: Callable[[Stream[Any]], Stream[Any]],
    items: Iterable[Any] | AsyncIterable[Any] | Source,
    *,
    clock: Clock | None = None,
    max_batch_size: int = 1024,
) -> list[Any]:
    """Feed ``items`` through ``build(stream)`` on a virtual clock; return what came out."""
    flow = Flow("test")
    source = items if isinstance(items, Source) else IterableSource(items)
    out: Collect[Any] = Collect()
    build(flow.source(source)).sink(out)
    run_flow(flow, clock=clock, max_batch_size=max_batch_size)
    return out.items
