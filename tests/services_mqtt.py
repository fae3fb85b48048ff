"""MQTT brokers for tests: the shared Mosquitto on 127.0.0.1:1883, or a private one.

Same rules as ``services.py``: tests that only use a broker share the machine's (or a
private one started for the session when none answers); outage tests start their own
:class:`MosquittoServer` (``own_mosquitto``) on a free port with persistence in a temp
directory, and stop/restart it there.  Isolation: ``mqtt_names`` gives each test a unique
topic prefix and client-id prefix; persistent sessions a test made are ended afterwards
(``end_sessions``: connect with a clean start and session expiry 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from services import ServerProcess

__all__ = [
    "MosquittoServer",
    "MqttNames",
    "end_sessions",
    "mqtt_broker",
    "mqtt_names",
    "mqtt_open",
    "own_mosquitto",
]

SHARED_HOST = "127.0.0.1"
SHARED_PORT = 1883
MOSQUITTO_PATHS = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def mqtt_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if an MQTT broker accepts a CONNECT on ``host:port`` (a raw 3.1.1 exchange)."""
    connect = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 5, 0, 0])
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(connect)
            ok = s.recv(4)[:1] == b"\x20"
            s.sendall(b"\xe0\x00")  # DISCONNECT
            return ok
    except OSError:
        return False


class MosquittoServer(ServerProcess):
    """A ``mosquitto`` of our own with persistence in :attr:`dir` (see
    :class:`~services.ServerProcess`): a restarted broker brings back its persistent
    sessions (as saved: ``autosave_on_changes`` after every change, and on a clean SIGTERM
    shutdown; SIGKILL does not save)."""

    name = "mosquitto"
    paths = MOSQUITTO_PATHS
    log_name = "mosquitto.log"

    def __init__(self, binary: str, port: int | None = None, *, extra: str = "") -> None:
        super().__init__(binary, port)
        self.extra = extra

    def command(self) -> list[str]:
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "autosave_interval 1\n"
            "autosave_on_changes true\n"
            "max_queued_messages 0\n"
            f"log_dest file {self.dir}/{self.log_name}\n"
            # as root, mosquitto switches to the user "mosquitto", which cannot write here
            + (f"user {getpass.getuser()}\n" if os.geteuid() == 0 else "")
            + self.extra,
            encoding="utf-8",
        )
        return [self.binary, "-c", str(conf)]

    def answers(self) -> bool:
        return mqtt_open(self.host, self.port, timeout=0.2)


@dataclass
class MqttNames:
    """Unique names for one test: ``topic(x)``, ``client(x)``; remembers the clients."""

    host: str
    port: int
    prefix: str = field(default_factory=lambda: f"sluiceway-test/{uuid.uuid4().hex}")
    clients: list[str] = field(default_factory=list)

    def topic(self, name: str = "t") -> str:
        return f"{self.prefix}/{name}"

    def client(self, name: str = "c") -> str:
        cid = f"sw-{uuid.uuid4().hex[:16]}-{name}"
        self.clients.append(cid)
        return cid


def end_sessions(host: str, port: int, client_ids: list[str]) -> None:
    """End persistent sessions: connect each id with a clean start and expiry 0."""
    import aiomqtt  # noqa: PLC0415 - only MQTT tests need the package

    async def main() -> None:
        for cid in client_ids:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                async with aiomqtt.Client(
                    host,
                    port,
                    identifier=cid,
                    protocol=aiomqtt.ProtocolVersion.V5,
                    clean_start=True,
                    timeout=2,
                ):
                    pass

    asyncio.run(main())


@contextlib.contextmanager
def _shared() -> Iterator[tuple[str, int]]:
    if mqtt_open(SHARED_HOST, SHARED_PORT):
        yield SHARED_HOST, SHARED_PORT
        return
    with MosquittoServer.start_new() as server:
        yield server.host, server.port


@pytest.fixture(scope="session")
def mqtt_broker() -> Iterator[tuple[str, int]]:
    """``(host, port)`` of a broker to share (never stop or reconfigure it)."""
    with _shared() as address:
        yield address


@pytest.fixture
def mqtt_names(mqtt_broker: tuple[str, int]) -> Iterator[MqttNames]:
    """Unique topics and client ids for this test; its sessions are ended afterwards."""
    names = MqttNames(*mqtt_broker)
    yield names
    end_sessions(names.host, names.port, names.clients)


@pytest.fixture
def own_mosquitto() -> Iterator[MosquittoServer]:
    """A private mosquitto this test may stop and restart (same port and data dir)."""
    with MosquittoServer.start_new() as server:
        yield server
