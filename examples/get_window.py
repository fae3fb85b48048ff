"""``GetWindow(key, timestamp)``: read a running windowed flow's current window for a key.

The seed document's windowed processor exposes the window a key is filling right now.
In sluiceway every running flow answers that, for any window operator:
``handle.query(operator, key, at=timestamp)`` in Python, and
``GET /api/state/<operator>?key=...&at=...`` on the web view's port.

Run it::

    python examples/get_window.py

It runs on a virtual clock: page views arrive through a push source, and between two
arrivals the example asks for ann's current one-minute window.
"""

from __future__ import annotations

import asyncio
from typing import Any

import sluiceway as sw


async def main() -> list[tuple[float, Any]]:
    views: sw.sources.Push[dict[str, Any]] = sw.sources.Push()
    flow = sw.Flow("page-views")
    (
        flow.source(views, name="views")
        .with_timestamps(lambda v: v["ts"])
        .key_by(lambda v: v["user"])
        .window(sw.windows.Tumbling(60.0))
        .aggregate(views=sw.agg.count(), pages=sw.agg.collect(lambda v: v["page"]), name="per_min")
        .sink(sw.sinks.Collect(), name="out")
    )
    handle = sw.start(flow, clock=sw.VirtualClock())

    def get_window(key: str, timestamp: float) -> Any:
        answer = handle.query("per_min", key, at=timestamp)
        return answer.windows[0].value if answer.windows else None

    seen: list[tuple[float, Any]] = []
    for ts, page in [(5.0, "/home"), (20.0, "/cart"), (42.0, "/pay"), (65.0, "/home")]:
        views.offer({"user": "ann", "ts": ts, "page": page})
        await handle.clock.sleep(0.001)  # let the flow take it (a service just goes on)
        seen.append((ts, get_window("ann", ts)))
        print(f"t={ts:>4}: ann's current window = {seen[-1][1]}")  # noqa: T201 - an example
    await handle.stop()
    return seen


if __name__ == "__main__":
    asyncio.run(main())
