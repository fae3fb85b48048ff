"""NATS JetStream for tests: the machine's server, or a private ``nats-server -js``.

The rules of ``services.py``, for NATS:

* ``nats_url`` (session): the shared server on 127.0.0.1:4222 when it answers with
  JetStream on; otherwise a private ``nats-server -js`` on a free port in a temporary
  directory, stopped at the end of the session.
* ``nats_names``: a fresh stream / subject / durable name set per test (a uuid); the
  stream (and with it its consumers) is deleted afterwards.  The shared server is never
  stopped or reconfigured.
* ``own_nats``: a private server this test may stop (SIGTERM or SIGKILL) and start
  again on the same port and store directory (outage tests).
* Without a server and without the binary: skip naming what is missing, or fail with
  ``SLUICEWAY_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from services import ServerProcess

__all__ = [
    "NatsNames",
    "NatsServer",
    "delete_stream",
    "nats_info",
    "nats_names",
    "nats_url",
    "own_nats",
]

SHARED_NATS_HOST = "127.0.0.1"
SHARED_NATS_PORT = 4222
NATS_SERVER_PATHS = ("nats-server", "/usr/sbin/nats-server", "/usr/local/bin/nats-server")


def nats_info(host: str, port: int, timeout: float = 0.5) -> dict[str, object] | None:
    """The server's INFO (the first line it sends), or None when nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            data = b""
            while not data.endswith(b"\r\n") and len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    line = data.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return None
    info: dict[str, object] = json.loads(line[5:])
    return info


class NatsServer(ServerProcess):
    """A ``nats-server -js`` of our own, its store in :attr:`dir` (see
    :class:`~services.ServerProcess`): a restart finds its streams, consumers and messages."""

    name = "nats-server"
    paths = NATS_SERVER_PATHS
    log_name = "nats.log"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            self.binary,
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-sd",
            str(self.dir / "store"),
            "-l",
            str(self.dir / self.log_name),
        ]

    def answers(self) -> bool:
        return nats_info(self.host, self.port, timeout=0.2) is not None


@contextlib.contextmanager
def shared_nats() -> Iterator[str]:
    """The URL of a JetStream-enabled NATS tests may share: the machine's, else a private one."""
    info = nats_info(SHARED_NATS_HOST, SHARED_NATS_PORT)
    if info is not None and info.get("jetstream"):
        yield f"nats://{SHARED_NATS_HOST}:{SHARED_NATS_PORT}"
        return
    with NatsServer.start_new() as server:
        yield server.url


def delete_stream(url: str, stream: str) -> None:
    """Delete ``stream`` (and its consumers) if it exists."""
    import nats  # noqa: PLC0415 - only tests that use NATS need the package
    import nats.js.errors  # noqa: PLC0415

    async def main() -> None:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(stream)
        finally:
            await nc.close()

    asyncio.run(main())


@dataclass(frozen=True)
class NatsNames:
    """Names unique to one test: ``stream`` captures ``subject_prefix + ".>"``."""

    url: str
    stream: str
    subject: str
    durable: str

    @property
    def wildcard(self) -> str:
        return self.stream + ".>"


# -- pytest fixtures -------------------------------------------------------------------


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """A NATS URL with JetStream to share (never stop or reconfigure it)."""
    with shared_nats() as url:
        yield url


@pytest.fixture
def nats_names(nats_url: str) -> Iterator[NatsNames]:
    """Fresh stream / subject / durable names; the stream is deleted afterwards."""
    tag = uuid.uuid4().hex[:12]
    names = NatsNames(
        url=nats_url, stream=f"SWTEST_{tag}", subject=f"SWTEST_{tag}.in", durable=f"d{tag}"
    )
    yield names
    delete_stream(nats_url, names.stream)


@pytest.fixture
def own_nats() -> Iterator[NatsServer]:
    """A private nats-server -js this test may stop and restart."""
    with NatsServer.start_new() as server:
        yield server
