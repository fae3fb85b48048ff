"""MQTT: records/s from an MQTT topic through a ``map`` back into MQTT, QoS 1 both ways.

    python benchmarks/bench_mqtt.py           # full: 50,000 messages, best of 3
    python benchmarks/bench_mqtt.py --quick   # 10,000 messages, best of 2 (~30 s)

A private Mosquitto (``max_queued_messages 0``: the shared broker's default of 1000
queued messages per session would drop most of the preload) runs on a free port, in
memory.  For each measurement a persistent session is created, N JSON messages are
published into it (QoS 1, not timed), then a fresh child process consumes them:

* ``sluiceway``: ``sw.sources.Mqtt -> map -> sw.sinks.Mqtt``; PUBACKs to the broker only
  on commit (after the sink's PUBACKs came back), at most 1000 publishes unacknowledged.
* ``raw aiomqtt``: the same loop with the client library alone -- take what arrived (up
  to 1024), ``json.loads``, the same map, publish each QoS 1 with at most 1000 awaiting a
  PUBACK, then acknowledge the batch (paho's manual ack, as the source does).  Both
  publish on the paho client under aiomqtt: ``aiomqtt.Client.publish`` lists its pending
  calls on every call, which is quadratic with 1000 in flight (~2,000 msgs/s here).

The clock runs from connecting until the last output record is acknowledged.  Target:
sluiceway >= 70 % of the raw loop.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from common import (
    Params,
    Result,
    Row,
    fmt_int,
    module_main,
    run_child,
)

TARGET = 0.70
MOSQUITTO = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def transform(r: dict[str, Any]) -> dict[str, Any]:
    """The map both sides apply."""
    return {"id": r["id"], "user": r["user"], "amount": round(r["amount"] * 1.1, 2)}


def _props(expiry: int) -> Any:
    from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
    from paho.mqtt.properties import Properties  # noqa: PLC0415

    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = expiry
    props.ReceiveMaximum = 65535
    return props


class _Publisher:
    """QoS 1 publishing on the paho client under aiomqtt, at most ``cap`` unacknowledged:
    aiomqtt's own ``publish`` counts its pending calls on every call (quadratic at 1000
    in flight), so both sides publish like this."""

    def __init__(self, client: Any, cap: int) -> None:
        self.paho = client._client
        self.paho.on_publish = self._on_publish
        self.cap = cap
        self.inflight: set[int] = set()
        self.wake = asyncio.Event()

    def _on_publish(self, *args: Any) -> None:
        self.inflight.discard(args[2])
        self.wake.set()

    async def publish_all(self, topic: str, payloads: list[str]) -> None:
        for p in payloads:
            while len(self.inflight) >= self.cap:
                self.wake.clear()
                await self.wake.wait()
            info = self.paho.publish(topic, p, 1)
            if not info.is_published():
                self.inflight.add(info.mid)
        while self.inflight:
            self.wake.clear()
            await self.wake.wait()


async def _preload(port: int, cid: str, topic: str, n: int) -> None:
    import aiomqtt  # noqa: PLC0415

    v5 = aiomqtt.ProtocolVersion.V5
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=cid, protocol=v5, clean_start=True, properties=_props(3600)
    ) as c:
        await c.subscribe(topic, qos=1)
    async with aiomqtt.Client("127.0.0.1", port, protocol=v5, max_inflight_messages=1000) as c:
        records = [
            json.dumps({"id": i, "user": f"user{i % 1000}", "amount": (i % 200) / 10.0})
            for i in range(n)
        ]
        await _Publisher(c, 1000).publish_all(topic, records)


def measure(params: Params) -> Result:
    """Child: consume the preloaded session with one system; records/s."""
    port, cid, n = params["port"], params["cid"], params["n"]
    t_in, t_out = params["topic_in"], params["topic_out"]
    asyncio.run(_preload(port, cid, t_in, n))
    if params["system"] == "sluiceway":
        elapsed = asyncio.run(_sluiceway(port, cid, t_in, t_out, n))
    else:
        elapsed = asyncio.run(_raw(port, cid, t_in, t_out, n))
    return {"elapsed": elapsed, "rate": n / elapsed}


async def _sluiceway(port: int, cid: str, t_in: str, t_out: str, n: int) -> float:
    import sluiceway as sw  # noqa: PLC0415

    done: list[float] = []
    written = [0]

    class Timed(sw.sinks.Mqtt):  # type: ignore[name-defined, misc]
        async def write(self, batch: sw.Batch) -> None:
            await super().write(batch)
            written[0] += len(batch.values)
            if written[0] >= n and not done:
                done.append(time.perf_counter())

    flow = sw.Flow("bench-mqtt")
    src = sw.sources.Mqtt("127.0.0.1", t_in, port=port, client_id=cid, stop_after_idle=0.3)
    flow.source(src).map(transform).sink(Timed("127.0.0.1", t_out, port=port, max_unacked=1000))
    t0 = time.perf_counter()
    await sw.run_async(flow)
    if written[0] < n:
        raise RuntimeError(f"sluiceway wrote {written[0]} of {n} records")
    return done[0] - t0


async def _raw(port: int, cid: str, t_in: str, t_out: str, n: int) -> float:
    import aiomqtt  # noqa: PLC0415

    v5 = aiomqtt.ProtocolVersion.V5
    got: list[Any] = []
    arrived = asyncio.Event()
    t0 = time.perf_counter()
    sub = aiomqtt.Client(
        "127.0.0.1", port, identifier=cid, protocol=v5, clean_start=False, properties=_props(3600)
    )
    paho = sub._client
    paho.manual_ack_set(True)

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        got.append(msg)
        arrived.set()

    paho.on_message = on_message
    async with (
        sub,
        aiomqtt.Client("127.0.0.1", port, protocol=v5, max_inflight_messages=1000) as pub,
    ):
        publisher = _Publisher(pub, 1000)
        await sub.subscribe(t_in, qos=1)
        handled = 0
        while handled < n:
            if not got:
                arrived.clear()
                await arrived.wait()
            batch, got[:] = got[:1024], got[1024:]
            out = [json.dumps(transform(json.loads(m.payload))) for m in batch]
            await publisher.publish_all(t_out, out)
            for m in batch:
                paho.ack(m.mid, 1)
            handled += len(batch)
        return time.perf_counter() - t0  # before disconnecting, like the flow's last write


# -- the broker ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Broker:
    def __init__(self) -> None:
        binary = next((b for b in map(shutil.which, MOSQUITTO) if b), None)
        if binary is None:
            raise RuntimeError("no mosquitto binary (tried: " + ", ".join(MOSQUITTO) + ")")
        self.dir = Path(tempfile.mkdtemp(prefix="sluiceway-bench-mqtt-"))
        self.port = _free_port()
        conf = self.dir / "mosquitto.conf"
        user = f"user {getpass.getuser()}\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n{user}",
            encoding="utf-8",
        )
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        self.close()
        raise RuntimeError(f"mosquitto did not start on port {self.port}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def run(quick: bool) -> tuple[list[Row], Result]:
    """The MQTT rows (for run.py) and the raw figures."""
    n, repeats = (10_000, 2) if quick else (50_000, 3)
    broker = _Broker()
    rates: dict[str, float] = {}
    try:
        for _ in range(repeats):
            for system in ("raw", "sluiceway"):
                tag = uuid.uuid4().hex[:12]
                params = {
                    "port": broker.port,
                    "cid": f"bench-{tag}",
                    "topic_in": f"bench/{tag}/in",
                    "topic_out": f"bench/{tag}/out",
                    "n": n,
                    "system": system,
                }
                rate = run_child("bench_mqtt", "measure", params)["rate"]
                rates[system] = max(rates.get(system, 0.0), rate)
    finally:
        broker.close()
    ratio = rates["sluiceway"] / rates["raw"]
    wl = f"MQTT {fmt_int(n)} msgs, QoS 1 in and out"
    rows = [
        Row(
            wl,
            "sluiceway Mqtt -> map -> Mqtt",
            f"{fmt_int(rates['sluiceway'])} rec/s",
            f"{ratio:.0%} of raw",
            f">= {TARGET:.0%}",
            "PASS" if ratio >= TARGET else "FAIL",
        ),
        Row(wl, "raw aiomqtt loop", f"{fmt_int(rates['raw'])} rec/s"),
    ]
    return rows, {"n": n, "repeats": repeats, "rates": rates, "ratio": ratio}


if __name__ == "__main__":
    module_main(__doc__ or "", run, {"measure": measure})
