"""NATS JetStream in, JetStream out: big clicks become alerts.

Run it (nats-server -js on 127.0.0.1:4222)::

    sluiceway run examples/nats_flow.py:flow

The source creates the stream ``SLUICEWAY_DEMO`` (subjects ``SLUICEWAY_DEMO.>``) when it
is missing, and reads ``SLUICEWAY_DEMO.clicks`` through the durable consumer
``clicks-alerts``.  Feed it from another terminal (the ``nats`` CLI, or any client)::

    nats pub SLUICEWAY_DEMO.clicks '{"user": "ann", "amount": 12.5}'
    nats sub SLUICEWAY_DEMO.alerts

Clicks published while the flow is down wait in the stream; each one is acknowledged
only after its alert has been stored (PubAck).  The alert's ``Nats-Msg-Id`` is the click's
stream sequence (``include_metadata=True`` hands out :class:`NatsMessage` records), so an
alert written again after a crash is dropped by the server as a duplicate.
Environment: ``SLUICEWAY_NATS_URL`` (default ``nats://127.0.0.1:4222``),
``SLUICEWAY_NATS_STREAM`` (default ``SLUICEWAY_DEMO``).
"""

from __future__ import annotations

import os
from typing import Any

import sluiceway as sw
from sluiceway.connectors.nats import NatsMessage


def build(sink: sw.sinks.Sink | None = None) -> sw.Flow:
    """The flow; alerts go to ``<stream>.alerts`` unless another ``sink`` is given."""
    url = os.environ.get("SLUICEWAY_NATS_URL", "nats://127.0.0.1:4222")
    stream = os.environ.get("SLUICEWAY_NATS_STREAM", "SLUICEWAY_DEMO")

    def alert(msg: NatsMessage) -> dict[str, Any]:
        click = msg.payload
        return {"click": msg.stream_seq, "user": click["user"], "amount": click["amount"]}

    flow = sw.Flow("nats-alerts")
    (
        flow.source(
            sw.sources.NatsJetStream(
                url,
                stream,
                f"{stream}.clicks",
                durable="clicks-alerts",
                create_stream=True,
                include_metadata=True,
            )
        )
        .filter(lambda m: m.payload["amount"] > 10)
        .map(alert)
        .sink(
            sink
            or sw.sinks.NatsJetStream(
                url, f"{stream}.alerts", msg_id=lambda a: f"click-{a['click']}"
            )
        )
    )
    return flow


flow = build()
