"""The demo clickstream's per-second window results into a Delta Lake table (Delta sink).

Run it (writes the table ``click_windows/`` in the current directory, creating it)::

    sluiceway run examples/delta_flow.py:flow --checkpoint-dir ckpt --checkpoint-interval 1

It feeds itself: the input is the demo's click generator.  The only change from the demo
(``sluiceway demo``) is the sink -- ``sw.sinks.Delta(...)`` instead of stdout.  With
``--checkpoint-dir`` every checkpoint is one Delta transaction, applied exactly once even
if the flow is killed and restarted; without it, the sink commits every
``flush_interval`` seconds (at-least-once).  Read the table from another terminal::

    python -c "import deltalake; print(deltalake.DeltaTable('click_windows').to_pandas().tail())"
    duckdb -c "INSTALL delta; LOAD delta; SELECT start, events, revenue
               FROM delta_scan('click_windows') ORDER BY start DESC LIMIT 5"

Set ``SLUICEWAY_DELTA_TABLE`` to write elsewhere (needs ``pip install 'sluiceway[delta]'``).
"""

from __future__ import annotations

import os
from typing import Any

import sluiceway as sw
from sluiceway.demo import WindowSummary, build_demo_flow

TABLE = os.environ.get("SLUICEWAY_DELTA_TABLE", "click_windows")


def to_row(summary: WindowSummary) -> dict[str, Any]:
    """A window summary as a row: ``top_pages`` (pairs) as a list of page names."""
    return {**summary, "top_pages": [page for page, _ in summary["top_pages"]]}


def build(table: str = TABLE) -> sw.Flow:
    """The demo flow with its window results appended to the Delta table ``table``."""
    return build_demo_flow(sink=sw.sinks.Delta(table, transform=to_row, flush_interval=5.0))


def flow() -> sw.Flow:
    """For ``sluiceway run examples/delta_flow.py:flow`` (the sink is built when run)."""
    return build()
