"""The demo clickstream's per-second summaries into a PostgreSQL table (PostgreSQL sink).

Run it (writes table ``click_windows`` on the local server, creating it)::

    sluiceway run examples/postgres_flow.py:flow

It feeds itself: the input is the demo's click generator.  The only change from the demo
(``sluiceway demo``) is the sink line -- ``sink=PostgresSink(...)`` (``sw.sinks.Postgres``)
instead of stdout.  Watch the table fill from another terminal::

    psql postgresql://127.0.0.1:5432/test \
        -c 'SELECT start, events, revenue FROM click_windows ORDER BY start DESC LIMIT 5'

Rows are upserted by window start: a replay after a crash (the generator is seeded, so the
same windows come out again) overwrites the same rows, so the table ends up exactly as if
nothing had failed.  Set ``SLUICEWAY_PG_DSN`` / ``SLUICEWAY_PG_TABLE`` to use another
server or table.
"""

from __future__ import annotations

import os
from typing import Any

import sluiceway as sw
from sluiceway.connectors.postgres import PostgresSink  # also sw.sinks.Postgres
from sluiceway.demo import WindowSummary, build_demo_flow

DSN = os.environ.get("SLUICEWAY_PG_DSN", "postgresql://127.0.0.1:5432/test")
TABLE = os.environ.get("SLUICEWAY_PG_TABLE", "click_windows")


def to_row(summary: WindowSummary) -> dict[str, Any]:
    """A window summary as a row: ``top_pages`` (a list of pairs) as a jsonb object."""
    return {**summary, "top_pages": dict(summary["top_pages"])}


def build(dsn: str = DSN, table: str = TABLE) -> sw.Flow:
    """The demo flow with its summaries upserted into ``table`` (created when missing)."""
    sink = PostgresSink(
        dsn, table, mode="upsert", key=["start"], transform=to_row, create_table=True
    )
    return build_demo_flow(sink=sink)


flow = build()
