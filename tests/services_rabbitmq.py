"""RabbitMQ for tests: the machine's broker, or a private ``rabbitmq-server`` of our own.

The same rules as ``services.py``:

* ``rabbitmq_url`` (session): the shared broker on 127.0.0.1:5672 if it answers the AMQP
  handshake; otherwise a private node is started for the session and stopped afterwards.
* ``rabbitmq_queue``: a fresh queue name ``sluiceway-test-<uuid>`` for one test; that queue
  and ``<name>.out`` / ``<name>.dlq`` are deleted afterwards.  Never purge or delete
  anything else, never stop the shared broker.
* ``own_rabbitmq``: a private node (:class:`RabbitMQServer`) a test may stop (SIGTERM),
  kill (SIGKILL) and start again on the same port, node name and data directory, so
  durable queues and persistent messages survive the restart.

A private node needs the RabbitMQ server scripts (Debian's ``rabbitmq-server`` package:
``/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server``; the ``/usr/sbin``
wrapper is avoided because it switches to the ``rabbitmq`` user).  It gets its own node
name, AMQP and distribution ports, data, log and config files and ``HOME`` (so its own
Erlang cookie) in a temporary directory, with no plugins.  Booting takes ~8 s.  When
neither the shared broker nor the scripts are there, tests are skipped naming what is
missing (or fail with ``SLUICEWAY_REQUIRE_SERVICES=1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services import free_port, service_missing

__all__ = [
    "RabbitMQServer",
    "amqp_ping",
    "delete_queues",
    "own_rabbitmq",
    "rabbitmq_queue",
    "rabbitmq_url",
]

SHARED_HOST = "127.0.0.1"
SHARED_PORT = 5672
SHARED_URL = f"amqp://guest:guest@{SHARED_HOST}:{SHARED_PORT}/"
SERVER_GLOBS = (
    "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server",
    "/usr/local/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server",
)
BOOT_TIMEOUT = 60.0


def amqp_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if an AMQP 0-9-1 broker answers on ``host:port`` (the protocol header is
    answered with a Connection.Start method frame; no client library needed)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            return s.recv(8).startswith(b"\x01\x00\x00")
    except OSError:
        return False


def _server_script() -> str | None:
    found = os.environ.get("SLUICEWAY_RABBITMQ_SERVER")
    if found:
        return found
    for pattern in SERVER_GLOBS:
        matches = sorted(glob.glob(pattern))
        if matches:
            return matches[-1]
    return None


class RabbitMQServer:
    """A private RabbitMQ node on 127.0.0.1 in a temporary directory.

    The ports and node name are chosen once and kept across :meth:`stop`/:meth:`kill`
    and :meth:`start`, so clients reconnect to the same URL and the node finds its
    durable queues again::

        with RabbitMQServer.start_new() as server:
            ...  # server.url; server.stop() or server.kill(); server.start()
    """

    def __init__(self, script: str) -> None:
        self.script = script
        self.host = "127.0.0.1"
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"sw{uuid.uuid4().hex[:12]}@localhost"
        self._dir = Path(tempfile.mkdtemp(prefix="sluiceway-rabbitmq-"))
        for sub in ("mnesia", "log", "home"):
            (self._dir / sub).mkdir()
        (self._dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {self.host}:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = info\n",
            encoding="utf-8",
        )
        (self._dir / "enabled_plugins").write_text("[].\n", encoding="utf-8")
        self._proc: subprocess.Popen[bytes] | None = None
        self.boot_seconds: list[float] = []

    @classmethod
    def start_new(cls) -> RabbitMQServer:
        """Start one on free ports; skip/fail (see the module docs) without the scripts."""
        script = _server_script()
        if script is None:
            service_missing(
                f"no RabbitMQ answers on {SHARED_HOST}:{SHARED_PORT} and no rabbitmq-server "
                "script was found (tried " + ", ".join(SERVER_GLOBS) + "; set "
                "SLUICEWAY_RABBITMQ_SERVER to its path)"
            )
        last: Exception | None = None
        for _ in range(2):  # a free port may be taken between choosing and binding
            server = cls(script)
            try:
                server.start()
            except RuntimeError as exc:
                last = exc
                server.close()
            else:
                return server
        raise RuntimeError(f"could not start a private RabbitMQ node: {last}")

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.port}/"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _env(self) -> dict[str, str]:
        d = self._dir
        return {
            **os.environ,
            "HOME": str(d / "home"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": self.host,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
        }

    def start(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Start (or restart) the node; returns once it answers the AMQP handshake."""
        if self.running:
            return
        t0 = time.monotonic()
        with open(self._dir / "console.log", "ab") as out:
            self._proc = subprocess.Popen(
                [self.script],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(),
                cwd=self._dir,
                start_new_session=True,  # its own process group: kill() reaches the VM
            )
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if amqp_ping(self.host, self.port, timeout=0.2):
                self.boot_seconds.append(time.monotonic() - t0)
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.1)
        tail = ""
        with contextlib.suppress(OSError):
            tail = (self._dir / "console.log").read_text(encoding="utf-8", errors="replace")
        self.kill()
        raise RuntimeError(
            f"RabbitMQ node {self.node} on port {self.port} did not start within "
            f"{timeout:.0f} s:\n{tail[-3000:]}"
        )

    def _wait_gone(self, proc: subprocess.Popen[bytes], timeout: float) -> None:
        proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and amqp_ping(self.host, self.port, timeout=0.2):
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> None:
        """A clean shutdown (SIGTERM: the script stops the Erlang VM).  Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                self._wait_gone(proc, timeout)
            except subprocess.TimeoutExpired:
                self._killpg(proc)
        self._killpg(proc)  # reap anything left of its group (erl_child_setup)

    def kill(self) -> None:
        """A crash: SIGKILL to the whole process group (the VM gets no chance to flush)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._killpg(proc)

    def _killpg(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def close(self) -> None:
        """Stop the node and remove its directory."""
        self.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> RabbitMQServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RabbitMQServer(node={self.node!r}, port={self.port}, running={self.running})"


@contextlib.contextmanager
def shared_rabbitmq() -> Iterator[str]:
    """A broker URL tests may share: the machine's on 5672, else a private node."""
    if amqp_ping(SHARED_HOST, SHARED_PORT):
        yield SHARED_URL
        return
    with RabbitMQServer.start_new() as server:
        yield server.url


def delete_queues(url: str, *names: str) -> None:
    """Delete these queues (if they exist); nothing else is touched."""
    import aio_pika  # noqa: PLC0415 - only tests that use RabbitMQ need the package

    async def main() -> None:
        conn = await aio_pika.connect(url)
        try:
            for name in names:
                channel = await conn.channel()
                await channel.queue_delete(name)
                await channel.close()
        finally:
            await conn.close()

    asyncio.run(main())


# -- pytest fixtures -------------------------------------------------------------------


@pytest.fixture(scope="session")
def rabbitmq_url() -> Iterator[str]:
    """A broker URL to share (never stop it; use ``rabbitmq_queue`` for queue names)."""
    with shared_rabbitmq() as url:
        yield url


@pytest.fixture
def rabbitmq_queue(rabbitmq_url: str) -> Iterator[str]:
    """A fresh queue name for this test; it and ``<name>.out``/``.dlq`` go afterwards."""
    name = f"sluiceway-test-{uuid.uuid4().hex}"
    yield name
    delete_queues(rabbitmq_url, name, f"{name}.out", f"{name}.dlq")


@pytest.fixture
def own_rabbitmq() -> Iterator[RabbitMQServer]:
    """A private RabbitMQ node this test may stop, kill and restart."""
    with RabbitMQServer.start_new() as server:
        yield server
