"""A private redis-server that keeps what it acknowledged across a kill (for outage tests).

:class:`services.RedisServer` runs without persistence; an outage test that restarts the
server must find every acknowledged write again, so this one runs with
``appendonly yes`` and ``appendfsync always`` (every write is fsynced before Redis
replies) in its own data directory, kept across :meth:`stop` / :meth:`start`.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest

from services import RedisServer, _redis_server_binary, redis_ping, service_missing

__all__ = ["DurableRedisServer", "durable_redis"]


class DurableRedisServer(RedisServer):
    """A :class:`~services.RedisServer` with an fsynced append-only file."""

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        conf = self._dir / "redis.conf"
        conf.write_text(
            f"port {self.port}\n"
            f"bind {self.host}\n"
            "save ''\n"
            "appendonly yes\n"
            "appendfsync always\n"
            f'dir "{self._dir}"\n'
            f'logfile "{self._dir / "redis.log"}"\n'
            "daemonize no\n",
            encoding="utf-8",
        )
        self._proc = subprocess.Popen(
            [self.binary, str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if redis_ping(self.host, self.port, timeout=0.2):
                return
            if self._proc.poll() is not None:
                break
            time.sleep(0.01)
        self.stop()
        log = (self._dir / "redis.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients (the harshest outage)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def durable_redis() -> Iterator[DurableRedisServer]:
    """A private, persistent redis-server the test may kill and restart."""
    binary = _redis_server_binary()
    if binary is None:
        service_missing("no redis-server binary was found for the outage test")
    server = DurableRedisServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.close()
