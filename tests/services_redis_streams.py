"""A private redis-server that keeps what it acknowledged across a kill (for outage tests).

:class:`services.RedisServer` runs without persistence; an outage test that restarts the
server must find every acknowledged write again, so this one runs with
``appendonly yes`` and ``appendfsync always`` (every write is fsynced before Redis
replies) in its own data directory, kept across :meth:`stop` / :meth:`start`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services import RedisServer, _redis_server_binary, service_missing

__all__ = ["DurableRedisServer", "durable_redis"]


class DurableRedisServer(RedisServer):
    """A :class:`~services.RedisServer` with an fsynced append-only file."""

    persistence = "appendonly yes\nappendfsync always\n"


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
