"""Real servers for tests: use the one this machine runs, or start a private one.

The rules (the same for every service that later connectors add here):

* A test that only *uses* a service gets the shared one (e.g. Redis on 127.0.0.1:6379)
  if it answers; otherwise a private server is started on a free port in a temporary
  directory for the session, and stopped afterwards.
* A test that *stops or restarts* a server (outage tests) starts its own:
  :class:`RedisServer`, via the ``own_redis`` fixture.  The shared one is never stopped,
  flushed or reconfigured.
* Data is isolated by key prefix: ``redis_prefix`` gives each test a fresh
  ``sluiceway-test:<uuid>`` and deletes its keys afterwards.  Never FLUSHALL/FLUSHDB.
* When neither the service nor its server binary is there, the test is skipped with a
  message naming what is missing -- unless ``SLUICEWAY_REQUIRE_SERVICES=1`` (CI sets
  it): then it fails.

Fixtures (imported by ``conftest.py``): ``redis_url`` (session), ``redis_prefix``,
``own_redis``.
"""

from __future__ import annotations

import contextlib
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
from types import ModuleType
from typing import Any, ClassVar, NoReturn, Self

import pytest

__all__ = [
    "REQUIRE_ENV",
    "RedisServer",
    "ServerProcess",
    "delete_keys",
    "find_binary",
    "free_port",
    "import_or_missing",
    "own_redis",
    "redis_ping",
    "redis_prefix",
    "redis_url",
    "service_missing",
    "services_required",
    "shared_redis",
]

REQUIRE_ENV = "SLUICEWAY_REQUIRE_SERVICES"

SHARED_REDIS_HOST = "127.0.0.1"
SHARED_REDIS_PORT = 6379
REDIS_SERVER_PATHS = ("redis-server", "/usr/bin/redis-server", "/usr/local/bin/redis-server")


# -- skip or fail ----------------------------------------------------------------------


def services_required() -> bool:
    """True when a missing service must fail the test (``SLUICEWAY_REQUIRE_SERVICES=1``)."""
    return os.environ.get(REQUIRE_ENV, "") == "1"


def service_missing(what: str, *, module_level: bool = False) -> NoReturn:
    """Skip (or, with ``SLUICEWAY_REQUIRE_SERVICES=1``, fail) naming what is missing."""
    if services_required():
        pytest.fail(f"{what} ({REQUIRE_ENV}=1, so this is a failure, not a skip)")
    pytest.skip(
        f"{what} (set {REQUIRE_ENV}=1 to make this a failure)", allow_module_level=module_level
    )


def import_or_missing(module: str) -> ModuleType:
    """Import a client library a test module needs, or skip/fail the whole module."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        service_missing(
            f"the Python package {module!r} is not installed ({exc}); "
            "pip install -e '.[dev]' installs it",
            module_level=True,
        )


# -- ports -----------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def redis_ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a Redis answers PING on ``host:port`` (a raw RESP exchange, no client)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# -- private servers -------------------------------------------------------------------


def find_binary(paths: tuple[str, ...]) -> str | None:
    """The first of ``paths`` (names on PATH or absolute paths) that exists."""
    for candidate in paths:
        found = shutil.which(candidate)
        if found:
            return found
    return None


class ServerProcess:
    """A server binary of our own on 127.0.0.1, its data in a temporary directory.

    The port and the directory are kept across :meth:`stop` / :meth:`start`, so clients
    reconnect to the same address and a restarted server finds its data again::

        with NatsServer.start_new() as server:
            ...  # server.stop(signal.SIGKILL); server.start()

    A subclass names the binary (:attr:`name`, :attr:`paths`), and gives the command
    line (:meth:`command`, which may write a config file into :attr:`dir`), how to tell
    it answers (:meth:`answers`) and its log file (:attr:`log_name`, shown when it does
    not start).
    """

    name: ClassVar[str]
    paths: ClassVar[tuple[str, ...]]
    log_name: ClassVar[str]

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"sluiceway-{self.name}-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def missing(cls) -> str:
        """Why a test cannot have this server (the skip or failure message)."""
        return f"no {cls.name} binary was found (tried: {', '.join(cls.paths)})"

    @classmethod
    def start_new(cls, **options: Any) -> Self:
        """Start one on a free port; skip/fail (see module docs) without the binary."""
        binary = find_binary(cls.paths)
        if binary is None:
            service_missing(cls.missing())
        last: Exception | None = None
        for _ in range(3):  # the free port may be taken between choosing and binding
            server = cls(binary, **options)
            try:
                server.start()
            except RuntimeError as exc:
                last = exc
                server.close()
            else:
                return server
        raise RuntimeError(f"could not start a private {cls.name}: {last}")

    def command(self) -> list[str]:
        raise NotImplementedError

    def answers(self) -> bool:
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) the server; returns once it answers."""
        if self.running:
            return
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.answers():
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.01)
        log_tail = ""
        with contextlib.suppress(OSError):
            log_tail = (self.dir / self.log_name).read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"{self.name} on port {self.port} did not start:\n{log_tail}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the server with ``sig`` (SIGKILL: a crash), SIGKILL after 5 s.  Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
            proc.send_signal(sig)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to clients (the harshest outage)."""
        self.stop(signal.SIGKILL)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): it keeps its port but answers nothing (a hang)."""
        if self._proc is None:
            raise RuntimeError("the server is not running")
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Undo :meth:`pause` (SIGCONT)."""
        if self._proc is None:
            raise RuntimeError("the server is not running")
        self._proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(port={self.port}, running={self.running})"


def _redis_server_binary() -> str | None:
    return find_binary(REDIS_SERVER_PATHS)


class RedisServer(ServerProcess):
    """A ``redis-server`` of our own, no persistence (see :class:`ServerProcess`)."""

    name = "redis-server"
    paths = REDIS_SERVER_PATHS
    log_name = "redis.log"
    persistence = "appendonly no\n"

    @classmethod
    def missing(cls) -> str:
        return (
            f"no Redis answers on {SHARED_REDIS_HOST}:{SHARED_REDIS_PORT} and " + super().missing()
        )

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        conf = self.dir / "redis.conf"
        conf.write_text(
            f"port {self.port}\n"
            f"bind {self.host}\n"
            "save ''\n"
            f"{self.persistence}"
            f'dir "{self.dir}"\n'
            f'logfile "{self.dir / self.log_name}"\n'
            "daemonize no\n",
            encoding="utf-8",
        )
        return [self.binary, str(conf)]

    def answers(self) -> bool:
        return redis_ping(self.host, self.port, timeout=0.2)


@contextlib.contextmanager
def shared_redis() -> Iterator[str]:
    """The URL of a Redis tests may share: the machine's on 6379, else a private one."""
    if redis_ping(SHARED_REDIS_HOST, SHARED_REDIS_PORT):
        yield f"redis://{SHARED_REDIS_HOST}:{SHARED_REDIS_PORT}/0"
        return
    with RedisServer.start_new() as server:
        yield server.url


def delete_keys(url: str, prefix: str) -> int:
    """Delete every key ``prefix`` or ``prefix:*`` (SCAN + DEL, never FLUSH*); how many."""
    import redis  # noqa: PLC0415 - only tests that use Redis need the package

    client = redis.Redis.from_url(url)
    try:
        keys = [prefix, *client.scan_iter(match=f"{prefix}:*", count=1000)]
        return int(client.delete(*keys))
    finally:
        client.close()


# -- pytest fixtures -------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis URL to share (never stop or flush it; use ``redis_prefix`` for keys)."""
    with shared_redis() as url:
        yield url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix for this test; its keys are deleted afterwards."""
    prefix = f"sluiceway-test:{uuid.uuid4().hex}"
    yield prefix
    delete_keys(redis_url, prefix)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A private redis-server this test may stop, restart or SCRIPT FLUSH."""
    with RedisServer.start_new() as server:
        yield server


def assert_secret_hidden(secret: str, exc: BaseException | None, log_text: str) -> None:
    """Neither ``log_text`` nor any exception in ``exc``'s chain (message, notes) shows
    ``secret`` -- a password given in a connector's URL."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for text in (str(exc), *getattr(exc, "__notes__", ())):
            assert secret not in text, f"{type(exc).__name__} shows the password: {text}"
        exc = exc.__cause__ or exc.__context__
    assert secret not in log_text, f"the log shows the password:\n{log_text}"
