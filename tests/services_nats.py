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
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services import free_port, service_missing

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


def _binary() -> str | None:
    for candidate in NATS_SERVER_PATHS:
        found = shutil.which(candidate)
        if found:
            return found
    return None


class NatsServer:
    """A ``nats-server -js`` of our own on 127.0.0.1, its store in a temporary directory.

    The port and the store directory are kept across :meth:`stop` / :meth:`start`, so a
    restart finds its streams, consumers and messages again::

        with NatsServer.start_new() as server:
            ...  # server.url; server.stop(signal.SIGKILL); server.start()
    """

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="sluiceway-nats-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def start_new(cls) -> NatsServer:
        """Start one on a free port; skip/fail (see module docs) without the binary."""
        binary = _binary()
        if binary is None:
            service_missing(
                "no nats-server binary was found (tried: " + ", ".join(NATS_SERVER_PATHS) + ")"
            )
        last: Exception | None = None
        for _ in range(3):  # the free port may be taken between choosing and binding
            server = cls(binary)
            try:
                server.start()
            except RuntimeError as exc:
                last = exc
                server.close()
            else:
                return server
        raise RuntimeError(f"could not start a private nats-server: {last}")

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) the server; returns once it sends its INFO."""
        if self.running:
            return
        log = self.dir / "nats.log"
        self._proc = subprocess.Popen(
            [
                self.binary,
                "-js",
                "-a",
                self.host,
                "-p",
                str(self.port),
                "-sd",
                str(self.dir / "store"),
                "-l",
                str(log),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = nats_info(self.host, self.port, timeout=0.2)
            if info is not None:
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.01)
        log_tail = ""
        with contextlib.suppress(OSError):
            log_tail = log.read_text(encoding="utf-8")[-2000:]
        self.stop()
        raise RuntimeError(f"nats-server on port {self.port} did not start:\n{log_tail}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the server with ``sig`` (SIGKILL: a crash), SIGKILL after 5 s.  Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"NatsServer(port={self.port}, running={self.running})"


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
