r"""Redis Streams: a consumer-group source and an ``XADD`` sink.

``sw.sources.RedisStream(url, stream, group)`` reads with ``XREADGROUP`` and
acknowledges (``XACK``) only in :meth:`RedisStreamSource.commit` -- after the sinks wrote
the records (ack barriers) or after a checkpoint holding them was stored::

    stream   1-0  2-0  3-0  4-0  5-0  6-0        (the group's last delivered id: 6-0)
    PEL      1-0  2-0  3-0  4-0  5-0  6-0        (pending: delivered, not acknowledged)
    handed out ---------------^                  position() == {"seq": 4, "hw": "4-0"}
    commit({"seq": 4, ...})  -> XACK 1-0 2-0 3-0 4-0; 5-0 and 6-0 stay pending
    crash, restart           -> XREADGROUP ... 0 reads 5-0 6-0 again, then ``>``

The source asks for at most the credit the runtime gives it (``COUNT``), so a saturated
pipeline leaves the backlog in Redis.  At ``open`` it first reads its own pending entries
(id ``0``) so everything delivered to it but never acknowledged comes again, then new
ones (``>``).  A read that is cancelled or cut by a connection loss may have moved
entries into the pending list without the reply arriving: the next read goes over the
pending list again after the last entry received, so nothing is stranded.

Entries of *other* consumers of the group that stay unacknowledged longer than
``claim_idle`` seconds (a consumer that died for good) are claimed (``XPENDING ... IDLE``
then ``XCLAIM``) into a second consumer named ``<consumer>~claims`` and delivered too.
``XAUTOCLAIM`` is not used: it cannot tell our own slow in-flight entries from a dead
consumer's, and would deliver ours twice.

Under ``rate_limit(when_limited="reject")`` a rejected entry is left pending -- never
acknowledged -- and claimed again (``XCLAIM``) by its own consumer once ``retry_after``
has passed, if it is still that consumer's (:meth:`RedisStreamSource.redeliver_later`).
Should the process die meanwhile, the entry is still pending: the restarted consumer
reads it from its pending list, another consumer's ``claim_idle`` claims it.

Guarantees: at-least-once without checkpoints (an entry is acknowledged after every sink
wrote it; a crash redelivers the unacknowledged ones).  With checkpoints, a position
records the highest id handed out and the claimed ids not yet acknowledged; a restart
from a checkpoint acknowledges the pending entries it covers instead of delivering them
again, so with an exactly-once sink the output is exactly-once.

``sw.sinks.RedisStream(url, stream)`` writes each micro-batch with ``XADD`` in one
``MULTI``/``EXEC`` round trip: a batch goes in whole or not at all.  It is at-least-once:
a batch whose ``EXEC`` reply is lost (connection cut) is sent again, and a record
written after the last checkpoint is written again after a crash.

Both reconnect with backoff on the flow's clock (one WARNING per outage, one INFO on
recovery) and give up after ``reconnect_timeout`` seconds with :class:`RedisStreamError`
naming the server.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.connection import SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider

from sluiceway.connectors.files import _to_json
from sluiceway.connectors.security import (
    Secret,
    SecretLike,
    Tls,
    TlsLike,
    secret,
    tls_failure,
    tls_option,
)
from sluiceway.core.contract import (
    OPEN_TIMEOUT,
    PartialWriteError,
    Sink,
    SinkContext,
    Source,
    SourceContext,
    check_open_timeout,
    open_limit,
    redact,
)
from sluiceway.core.messages import Batch
from sluiceway.errors import BadInputError, SluicewayError, short_repr
from sluiceway.time import Clock
from sluiceway.time.durations import non_negative_seconds, positive_seconds

__all__ = [
    "RedisStreamEntry",
    "RedisStreamError",
    "RedisStreamSink",
    "RedisStreamSource",
]

log = logging.getLogger("sluiceway")

T = TypeVar("T")

StartAt = Literal["$", "0"] | str
"""Where a *new* group starts: ``"$"`` (only entries added from now on), ``"0"`` (the
whole stream) or an entry id.  An existing group keeps its own position."""

_BACKLOG_EVERY = 1.0  # seconds between two XINFO GROUPS for backlog()
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0
_TIMEOUT = 5.0  # seconds a round trip may take (beyond a read's BLOCK) before it counts as lost
_OUTAGE = (
    TimeoutError,  # our deadline on a round trip: a hung server
    redis_errors.ConnectionError,  # also BusyLoadingError: a restarted server loading its AOF
    redis_errors.TimeoutError,
    redis_errors.TryAgainError,
)
_CONFIG = (redis_errors.AuthenticationError, redis_errors.AuthorizationError)


class RedisStreamError(SluicewayError):
    """Redis refused a stream command, or stayed unreachable past ``reconnect_timeout``."""


@dataclass(frozen=True, slots=True)
class RedisStreamEntry:
    """A record with its metadata (``include_metadata=True``).

    Attributes:
        value: the decoded payload.
        id: the entry id, e.g. ``"1700000000000-0"``.
        stream: the stream key.
        redelivered: True when the entry came from a pending list (delivered before and
            never acknowledged, or claimed from a dead consumer).
    """

    value: Any
    id: str
    stream: str
    redelivered: bool


# -- connection handling shared by the source and the sink -----------------------------


@dataclass(frozen=True, slots=True)
class _Security:
    """``tls=``, ``username=`` and ``password=`` of a source or sink (see ``sw.Tls``)."""

    tls: Tls | None
    username: str | None
    password: Secret | None

    @classmethod
    def of(
        cls, url: str, tls: TlsLike, username: str | None, password: SecretLike | None, what: str
    ) -> _Security:
        if username is not None and not (isinstance(username, str) and username):
            raise ValueError(f"{what} username must be a non-empty str or None, got {username!r}")
        pw = secret(password, f"{what} password")
        if pw is not None and "@" in url.partition("://")[2].partition("/")[0]:
            raise ValueError(f"{what}: a password in the URL and password= both given; keep one")
        if username is not None and pw is None:
            raise ValueError(
                f"{what}: username= needs password= (Redis ACL users log in with both)"
            )
        found = tls_option(tls, what)
        if found is not None:
            found.no_server_name(what)
        return cls(found, username, pw)


class _Credentials(CredentialProvider):
    """Reads the password (``sw.Secret``) at every new connection."""

    def __init__(self, username: str | None, password: Secret, what: str) -> None:
        self.username, self.password, self.what = username, password, what

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        pw = self.password.reveal(f"{self.what} password")
        return (pw,) if self.username is None else (self.username, pw)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


class _TlsConnection(SSLConnection):
    """redis-py's TLS connection, but a disconnect that does not wait closes the socket.

    On an error reply during the handshake (a refused login) redis-py disconnects with
    ``nowait=True``: ``writer.close()`` and no ``wait_closed()``.  Over TLS that close is a
    graceful shutdown that needs the server's answer, so the socket stays open until the
    event loop gets it.  A flow that fails to open ends its loop at once; when the server
    was slower than that (under load), the socket was never closed and a ResourceWarning
    came later, in whatever code ran the garbage collector.  A disconnect that does not
    wait now aborts the transport too: the socket is closed on the loop's next turn,
    without a round trip.
    """

    async def disconnect(
        self,
        nowait: bool = False,
        error: Exception | None = None,
        failure_count: int | None = None,
        health_check_failed: bool = False,
    ) -> None:
        writer = self._writer
        await super().disconnect(nowait, error, failure_count, health_check_failed)
        if nowait and writer is not None:
            writer.transport.abort()


def _client(url: str, sec: _Security, what: str) -> aioredis.Redis:
    options: dict[str, Any] = {}
    if url.startswith("rediss://"):  # TLS with the system's trust store
        options["connection_class"] = _TlsConnection
    if sec.tls is not None:
        ca, cert, key = sec.tls.files(what)
        options.update(
            connection_class=_TlsConnection,
            ssl_ca_certs=ca,
            ssl_certfile=cert,
            ssl_keyfile=key,
            ssl_password=sec.tls.password(what),
            ssl_cert_reqs="required" if sec.tls.verify else "none",
            ssl_check_hostname=sec.tls.verify,
        )
    if sec.password is not None:
        options["credential_provider"] = _Credentials(sec.username, sec.password, what)
    # No retries inside redis-py: the connector retries with backoff on the flow's clock,
    # and re-reads its pending list when a read was cut (its reply may be lost).
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=5.0,
        retry=Retry(NoBackoff(), 0),
        **options,
    )


def _describe(client: aioredis.Redis) -> str:
    """``host:port/db`` of a client, without credentials."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


class _Link:
    """Runs Redis calls, retrying through outages with backoff on the flow's clock."""

    def __init__(self, client: aioredis.Redis, what: str, clock: Clock, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self.what = what
        self.where = _describe(client)
        self.reconnect_timeout: float | None = None
        self.limit_name = "reconnect_timeout"  # or "open_timeout" while opening
        self.outages = 0
        self.down_since: float | None = None  # clock.monotonic() when the outage began
        self.clock = clock

    async def opening(self, fn: Callable[[], Awaitable[T]], open_timeout: float | None) -> T:
        """:meth:`call` with the limit of a first connection (``open_limit``)."""
        reconnect = self.reconnect_timeout
        self.reconnect_timeout, self.limit_name = open_limit(open_timeout, reconnect)
        try:
            return await self.call(fn)
        finally:
            self.reconnect_timeout, self.limit_name = reconnect, "reconnect_timeout"

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """``await fn()``; on a connection loss retry (at once, then with backoff).

        The outage is the link's, not the call's: concurrent calls (a read and a
        commit) log one WARNING when it starts and one INFO when it ends."""
        clock = self.clock
        first_failure: float | None = None
        delay = _BACKOFF_FIRST
        task = asyncio.current_task()
        cancels = 0 if task is None else task.cancelling()
        while True:
            try:
                # One deadline per round trip (not redis-py's socket_timeout, which
                # costs a timer per reply: 1,000 of them for a pipeline of 1,000 XADDs).
                async with asyncio.timeout(self.timeout):
                    result = await _cancellable(fn, task, cancels)
            except _CONFIG as exc:
                raise RedisStreamError(
                    f"{self.what}: Redis at {self.where} refused access: {redact(exc)}"
                ) from exc
            except _OUTAGE as exc:
                if tls_failure(exc):  # trying again cannot help: fail now, naming the cause
                    raise RedisStreamError(
                        f"{self.what}: the TLS handshake with Redis at {self.where} failed: "
                        f"{type(exc).__name__}: {redact(exc)}"
                    ) from exc
                now = clock.monotonic()
                if first_failure is None and self.down_since is None:
                    first_failure = now  # a pooled connection may just be stale: retry at once
                    continue
                if self.down_since is None:
                    self.down_since = first_failure if first_failure is not None else now
                    self.outages += 1
                    log.warning(
                        "%s: lost Redis at %s (%s: %s); reconnecting with backoff%s",
                        self.what,
                        self.where,
                        type(exc).__name__,
                        redact(exc),
                        ""
                        if self.reconnect_timeout is None
                        else f" for up to {self.reconnect_timeout:g} s",
                    )
                down_for = now - self.down_since
                limit = self.reconnect_timeout
                if limit is not None and down_for >= limit:
                    raise RedisStreamError(
                        f"{self.what}: Redis at {self.where} unreachable for "
                        f"{down_for:.1f} s ({self.limit_name}={limit:g}): "
                        f"{type(exc).__name__}: {redact(exc)}"
                    ) from exc
                wait = delay if limit is None else min(delay, max(0.0, limit - down_for))
                await clock.sleep(wait)
                delay = min(delay * 2, _BACKOFF_MAX)
            else:
                if self.down_since is not None:
                    log.info(
                        "%s: Redis at %s is back after %.1f s",
                        self.what,
                        self.where,
                        clock.monotonic() - self.down_since,
                    )
                    self.down_since = None
                return result


async def _cancellable(
    fn: Callable[[], Awaitable[T]], task: asyncio.Task[Any] | None, cancels: int
) -> T:
    """``await fn()``, raising CancelledError if the task was cancelled meanwhile.

    redis-py 8's asyncio client can swallow a cancellation that lands while a command
    completes (the command returns its reply and the task runs on).  The runtime
    cancels a pull to inject a barrier or stop, and a commit when the flow is cancelled:
    the cancellation must arrive.  Whatever ``fn`` stored before it (a reply's entries
    go to the buffer first) stays there, so nothing is lost.
    """
    try:
        result = await fn()
    except Exception:
        if task is not None and task.cancelling() > cancels:
            raise asyncio.CancelledError from None
        raise
    if task is not None and task.cancelling() > cancels:
        raise asyncio.CancelledError
    return result


def _reconnect_timeout(value: object, what: str) -> float | None:
    if value is None:
        return None
    return positive_seconds(value, f"{what} reconnect_timeout")


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


def _text(entry_id: bytes) -> str:
    return entry_id.decode("ascii")


def _decode_json(raw: bytes) -> Any:
    return json.loads(raw)


def _encode_json(value: Any) -> bytes:
    return json.dumps(value, default=_to_json, ensure_ascii=False).encode("utf-8")


# Claims entries back for a redelivery (``redeliver_later``), each only while it is still
# pending at its owner: an entry acknowledged meanwhile, or claimed by another consumer
# (its ``claim_idle``), is theirs now.  XCLAIM drops an entry deleted from the stream
# from the pending list (Redis 7; older servers answer nil: acknowledged here).  Claiming
# an entry twice (a reply lost, the call made again) only counts one more delivery.
# KEYS[1] stream; ARGV[1] group, then pairs: owner, id.
# Returns {entries claimed ({id, {field, value, ...}}), ids deleted}.
_RECLAIM = """
local claimed, deleted = {}, {}
for i = 2, #ARGV, 2 do
  local owner, id = ARGV[i], ARGV[i + 1]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1, owner)
  if p[1] then
    local got = redis.call('XCLAIM', KEYS[1], ARGV[1], owner, 0, id)
    if got[1] then
      claimed[#claimed + 1] = got[1]
    else
      redis.call('XACK', KEYS[1], ARGV[1], id)
      deleted[#deleted + 1] = id
    end
  end
end
return {claimed, deleted}
"""


def _check_field(field: object, what: str) -> str | None:
    if field is not None and not (isinstance(field, str) and field):
        raise ValueError(f"{what} field must be a non-empty str or None, got {field!r}")
    return field


# -- the source ----------------------------------------------------------------------

_Fetched = tuple[bytes, dict[bytes, bytes] | None, bool, bool]
"""(entry id, fields or None when the entry was deleted, claimed, redelivered)"""


class _Rejections:
    """Entries handed back by ``redeliver_later``, pending until claimed again."""

    def __init__(self) -> None:
        self.ids: dict[bytes, bool] = {}
        """Rejected and not handed out again: id -> claimed (held by the claims consumer)."""
        self._due: list[tuple[float, int, list[bytes]]] = []  # heap: (due, order, ids)
        self._order = itertools.count()
        self.last_batch: list[tuple[bytes, bool]] = []
        """The entries of the last batch handed out, per record: (id, claimed)."""
        self.restored: set[bytes] = set()
        """Ids a restored position listed as rejected: pending, never covered by it."""
        self.count = 0

    def add(self, entries: list[tuple[bytes, bool]], due: float) -> None:
        self.ids.update(entries)
        self.count += len(entries)
        heapq.heappush(self._due, (due, next(self._order), [i for i, _ in entries]))

    def next_due(self) -> float | None:
        """When the first of them is due (clock.monotonic()), or None."""
        return self._due[0][0] if self._due else None

    def take_due(self, now: float) -> list[tuple[float, int, list[bytes]]]:
        """Remove and return the groups due by ``now``; :meth:`put_back` undoes it."""
        items: list[tuple[float, int, list[bytes]]] = []
        while self._due and self._due[0][0] <= now:
            items.append(heapq.heappop(self._due))
        return items

    def put_back(self, items: list[tuple[float, int, list[bytes]]]) -> None:
        for item in items:
            heapq.heappush(self._due, item)

    def clear(self) -> None:
        self.ids.clear()
        self._due.clear()


class RedisStreamSource(Source):
    r"""Entries of a Redis stream, read in a consumer group (``sw.sources.RedisStream``).

    Args:
        url: the Redis URL, e.g. ``"redis://127.0.0.1:6379/0"``.
        stream: the stream key.
        group: the consumer group; created (with ``MKSTREAM``) when missing.
        consumer: this reader's name in the group.  Default ``"<flow>.<operator>"``:
            stable across restarts, so a restarted flow finds its pending entries.  Give
            each process a distinct name when several read the same group.
        start: where a new group starts: ``"$"`` (new entries only, default), ``"0"`` (the
            whole stream) or an id.
        count: the most entries fetched per read (the runtime's credit caps it too).
        block_ms: how long one read waits for new entries (milliseconds); the call then
            returns (empty) so barriers and stops are not held up.
        claim_idle: claim entries other consumers left unacknowledged for longer than
            this (seconds), checked every ``claim_idle / 2`` (at most every 30 s).  None:
            never claim.
        stop_after_idle: end the input after this many seconds without a new entry
            (None: read forever).
        decode: turns the payload bytes into the record (default ``json.loads``).  An
            exception makes the entry bad input.
        field: the entry field holding the payload (default ``"data"``).  None: the
            record is the whole entry as a ``dict`` of ``str`` to ``str``.
        include_metadata: records are :class:`RedisStreamEntry` (value, id, stream,
            redelivered) instead of the bare value.
        reconnect_timeout: give up (:class:`RedisStreamError`) after this many seconds
            without Redis (None: never).
        open_timeout: at ``open`` (the flow's start), give up after this many seconds
            (default 10; None: as long as ``reconnect_timeout``): a Redis that is not
            there at the start is more likely a wrong URL than an outage.
        tls: ``sw.Tls(ca=..., cert=..., key=...)`` (or True: the system's CAs) to connect
            over TLS (like ``rediss://``); a failed handshake fails at once, naming it.
        username: the ACL user (Redis 6+); with ``password``.
        password: the password, a ``str`` or ``sw.Secret.env(...)``/``.file(...)``, read
            at every connection (or ``redis://user:password@host`` in the URL).

    A malformed entry is bad input named ``redis <host:port/db> <stream> <id>``: under
    ``Fail`` the flow stops and the entry stays pending; under ``DeadLetter`` it is
    dead-lettered and acknowledged at the next commit.
    """

    def __init__(
        self,
        url: str,
        stream: str,
        group: str,
        consumer: str | None = None,
        *,
        start: StartAt = "$",
        count: int = 1000,
        block_ms: int = 500,
        claim_idle: float | timedelta | None = None,
        stop_after_idle: float | timedelta | None = None,
        decode: Callable[[bytes], Any] = _decode_json,
        field: str | None = "data",
        include_metadata: bool = False,
        reconnect_timeout: float | timedelta | None = 60.0,
        open_timeout: float | None = OPEN_TIMEOUT,
        tls: TlsLike = None,
        username: str | None = None,
        password: SecretLike | None = None,
    ) -> None:
        what = "sources.RedisStream"
        for name, value in (("url", url), ("stream", stream), ("group", group)):
            if not (isinstance(value, str) and value):
                raise ValueError(f"{what} {name} must be a non-empty str, got {value!r}")
        if consumer is not None and not (isinstance(consumer, str) and consumer):
            raise ValueError(f"{what} consumer must be a non-empty str or None, got {consumer!r}")
        if not isinstance(start, str) or not start:
            raise ValueError(f"{what} start must be '$', '0' or an entry id, got {start!r}")
        if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
            raise ValueError(f"{what} count must be an int >= 1, got {count!r}")
        if not (isinstance(block_ms, int) and not isinstance(block_ms, bool) and block_ms >= 1):
            raise ValueError(
                f"{what} block_ms must be an int >= 1 (milliseconds), got {block_ms!r}"
            )
        if not callable(decode):
            raise TypeError(f"{what} decode must be callable, got {decode!r}")
        self._url = url
        self._stream = stream
        self._group = group
        self._consumer_arg = consumer
        self._start = start
        self._count = count
        self._block_ms = block_ms
        self._claim_idle = (
            None if claim_idle is None else positive_seconds(claim_idle, f"{what} claim_idle")
        )
        self._stop_after_idle = (
            None
            if stop_after_idle is None
            else non_negative_seconds(stop_after_idle, f"{what} stop_after_idle")
        )
        self._decode = decode
        self._field = _check_field(field, what)
        self._field_b = None if field is None else field.encode()
        self._metadata = bool(include_metadata)
        self._reconnect_timeout = _reconnect_timeout(reconnect_timeout, what)
        self._open_timeout = check_open_timeout(open_timeout, what)
        self._security = _Security.of(url, tls, username, password, what)
        self._ctx: SourceContext | None = None
        self._link: _Link | None = None
        self._consumer = self._claimer = ""
        self._where = ""
        # What restore() was given, for the next run only (close() forgets it).
        self._restore_hw: tuple[int, int] | None = None
        self._restore_claimed: set[bytes] = set()
        self._rejections = _Rejections()
        self._backlog: int | None = None
        self._backlog_at = float("-inf")
        self._new_run()

    def _new_run(self) -> None:
        """The state of one run, fresh: a flow may run more than once with this object,
        and what an earlier run held is pending in Redis, read again from there.  (The
        ids a restored position listed as rejected are kept: they are for this run.)"""
        self._closed = False
        # Fetched, not handed out yet.
        self._buffer: deque[_Fetched] = deque()
        # Handed out, not acknowledged: (seq of the batch's last record, ids, claimed ids).
        self._unacked: deque[tuple[int, list[bytes], list[bytes]]] = deque()
        self._seq = 0  # records handed out in this run
        self._hw: bytes | None = None  # the highest id handed out from our own reads
        self._claims_out: set[bytes] = set()  # claimed, handed out, not acknowledged
        self._claims_buffered: set[bytes] = set()
        # Reading our own pending list: the cursor, or None when reading new entries.
        self._pending_cursor: bytes | None = b"0"
        self._last_fetched: bytes = b"0"  # the last id our own reads received
        self._uncertain = False  # a ">" read was cut: its entries may be pending unseen
        self._claims_cursor: bytes | None = b"0"  # scanning the claims consumer's list
        self._next_claim = 0.0
        restored = self._rejections.restored
        self._rejections = _Rejections()
        self._rejections.restored = restored
        self._idle = 0.0  # seconds spent in empty reads of new entries since the last one

    # -- lifecycle -----------------------------------------------------------------

    async def open(self, ctx: SourceContext) -> None:
        """Connect and create the group if missing (``XGROUP CREATE ... MKSTREAM``).

        Raises:
            RedisStreamError: Redis refuses, or stays unreachable past
                ``reconnect_timeout``.
        """
        self._new_run()
        self._ctx = ctx
        self._consumer = self._consumer_arg or f"{ctx.flow}.{ctx.name}"
        self._claimer = f"{self._consumer}~claims"
        what = f"source {ctx.name!r} ({self.describe()})"
        client = _client(self._url, self._security, what)
        self._link = _Link(client, what, ctx.clock, self._block_ms / 1000 + _TIMEOUT)
        self._link.reconnect_timeout = self._reconnect_timeout
        self._where = f"redis {self._link.where} {self._stream}"
        await self._link.opening(self._create_group, self._open_timeout)
        now = ctx.clock.monotonic()
        self._idle = 0.0
        if self._claim_idle is not None:
            self._next_claim = now  # claim at the first read
        self._pending_cursor = b"0"
        # The claims consumer exists only where claiming is (or was) on: reading creates it.
        # (A claimed entry that was rejected stays there until claimed back.)
        claiming = (
            self._claim_idle is not None or self._restore_claimed or self._rejections.restored
        )
        self._claims_cursor = b"0" if claiming else None

    async def _create_group(self) -> None:
        assert self._link is not None
        try:
            await self._link.client.xgroup_create(
                self._stream, self._group, id=self._start, mkstream=True
            )
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise RedisStreamError(
                    f"{self.describe()}: cannot create group {self._group!r} on "
                    f"{self._where}: {redact(exc)}"
                ) from exc

    async def close(self) -> None:
        """Close the connection pool (safe to call twice).  Unacknowledged entries stay
        pending in Redis and are delivered again to this consumer at the next start."""
        if self._closed:
            return
        self._closed = True
        self._restore_hw = None  # a later run of this object restores anew, or not at all
        self._restore_claimed = set()
        self._rejections.restored = set()
        if self._link is not None:
            await self._link.client.aclose()

    def describe(self) -> str:
        """``RedisStream(<stream>, group=<group>)``."""
        return f"RedisStream({self._stream}, group={self._group})"

    # -- positions -----------------------------------------------------------------

    def position(self) -> dict[str, Any]:
        """``{"seq": records handed out, "hw": highest id read, "claimed": [ids],
        "rejected": [ids]}``.

        ``claimed`` lists the claimed entries handed out and not yet acknowledged;
        ``rejected`` the entries handed back (:meth:`redeliver_later`) and not handed out
        again: they are pending although ``hw`` is past them, and no restart from this
        position may acknowledge them."""
        return {
            "seq": self._seq,
            "hw": None if self._hw is None else _text(self._hw),
            "claimed": sorted(_text(i) for i in self._claims_out),
            "rejected": sorted(_text(i) for i in self._rejections.ids),
        }

    def restore(self, position: Any) -> None:
        """Restart from a checkpoint: pending entries it covers are acknowledged at
        ``open`` instead of delivered again; the others are delivered again."""
        if not (isinstance(position, Mapping) and "hw" in position):
            raise ValueError(
                f"{self.describe()}: a position must be a dict from position(), got "
                f"{short_repr(position)}"
            )
        hw = position["hw"]
        self._restore_hw = None if hw is None else _id_key(str(hw).encode())
        self._restore_claimed = {str(i).encode() for i in position.get("claimed", ())}
        self._rejections.restored = {str(i).encode() for i in position.get("rejected", ())}

    async def commit(self, position: Any) -> None:
        """Acknowledge (``XACK``) every entry handed out before ``position``."""
        upto = position["seq"] if isinstance(position, Mapping) else None
        if not isinstance(upto, int) or self._link is None or self._closed:
            return
        ids: list[bytes] = []
        claimed: list[bytes] = []
        taken = 0
        for seq, batch_ids, batch_claims in self._unacked:
            if seq > upto:
                break
            ids += batch_ids
            claimed += batch_claims
            taken += 1
        if not taken:
            return
        if ids:
            client = self._link.client
            await self._link.call(lambda: client.xack(self._stream, self._group, *ids))
        for _ in range(taken):
            self._unacked.popleft()
        self._claims_out.difference_update(claimed)

    @property
    def rejected(self) -> int:
        """Entries left pending for a later delivery so far
        (``rate_limit(when_limited="reject")``)."""
        return self._rejections.count

    def backlog(self) -> int | None:
        """Entries of the group not yet delivered (``lag``) plus entries pending at other
        consumers, as last seen (refreshed at most every second while reading)."""
        return self._backlog

    # -- reading -------------------------------------------------------------------

    async def next_batch(self, max_records: int) -> Batch | None:
        """Up to ``max_records`` entries (waiting at most ``block_ms`` for the first).

        Returns an empty batch after a read that found nothing, and None once
        ``stop_after_idle`` seconds passed without an entry.

        Raises:
            RedisStreamError: Redis unreachable past ``reconnect_timeout``, or an error
                reply (e.g. the key holds another type).
            OperatorError: (from the runtime, under ``Fail``) a malformed entry.
        """
        ctx, link = self._ctx, self._link
        if ctx is None or link is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        clock = ctx.clock
        if not self._buffer:
            now = clock.monotonic()
            if now - self._backlog_at >= _BACKLOG_EVERY:
                self._backlog_at = now
                await link.call(self._refresh_backlog)
            if self._claim_idle is not None and now >= self._next_claim:
                self._next_claim = now + min(30.0, self._claim_idle / 2)
                await link.call(self._claim)
            want = min(max_records, self._count)
            got = await link.call(lambda: self._read(want))
            if not got and not self._buffer:
                idle = self._stop_after_idle
                if idle is not None and self._idle >= idle and not self._rejections.ids:
                    return None  # (rejected entries are input still to come)
                return Batch([])
        return await self._hand_out(ctx, max_records)

    async def redeliver_later(self, indices: Sequence[int], delay: float) -> None:
        """Leave the entries at ``indices`` of the last batch pending, to be claimed
        again (``XCLAIM``, by their own consumer) after ``delay`` seconds.

        Nothing is sent to Redis now: the entries are taken out of what commits
        acknowledge, and listed in :meth:`position` until they are handed out again, so a
        restart from a checkpoint does not acknowledge them either.  If this process
        dies meanwhile, they are still pending: the restarted consumer reads them from its
        pending list, another consumer's ``claim_idle`` claims them."""
        assert self._ctx is not None
        entries = [self._rejections.last_batch[i] for i in indices]
        if not entries:
            return
        gone = {entry_id for entry_id, _ in entries}
        left = len(gone)
        for _, ids, claims in reversed(self._unacked):  # the last batch is at the end
            kept = [i for i in ids if i not in gone]
            if len(kept) < len(ids):
                left -= len(ids) - len(kept)
                ids[:] = kept
                claims[:] = [i for i in claims if i not in gone]
            if not left:
                break
        self._claims_out.difference_update(gone)
        self._rejections.add(entries, self._ctx.clock.monotonic() + delay)

    async def _read(self, want: int) -> bool:
        """:meth:`_fetch`, recreating the group if it vanished (a restarted Redis that
        kept no data) and naming the stream in any other error reply."""
        try:
            return await self._fetch(want)
        except redis_errors.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise RedisStreamError(
                    f"{self.describe()}: Redis refused a read of {self._where}: {redact(exc)}"
                ) from exc
        log.warning(
            "%s: group %r of %s is gone (Redis lost its data?); creating it again at %r",
            self.describe(),
            self._group,
            self._where,
            self._start,
        )
        await self._create_group()
        self._pending_cursor = b"0"
        if self._rejections.ids:  # their pending list went with the group
            log.warning(
                "%s: %d rejected entries waiting to be claimed again were pending in the "
                "lost group; they are delivered again only if the new group's start covers them",
                self.describe(),
                len(self._rejections.ids),
            )
            self._rejections.clear()
        return False

    async def _fetch(self, want: int) -> bool:
        """Fill the buffer with one read; True if anything came (ack-skipped included)."""
        client = self._link.client if self._link is not None else None
        assert client is not None
        due = self._rejections.next_due()
        if due is not None and due <= self._clock_now() and await self._reclaim():
            return True
        if self._uncertain:  # a cut ">" read: look at our pending list after the last id
            self._uncertain = False
            self._pending_cursor = self._last_fetched
        if self._pending_cursor is not None:
            reply = await client.xreadgroup(
                self._group, self._consumer, {self._stream: self._pending_cursor}, count=want
            )
            entries = _entries(reply)
            if entries:
                self._pending_cursor = entries[-1][0]
                self._last_fetched = max(self._last_fetched, entries[-1][0], key=_id_key)
                return await self._take(entries, claimed=False, redelivered=True)
            self._pending_cursor = None
        if self._claims_cursor is not None and await self._fetch_claimed(want):
            return True
        return await self._fetch_new(client, want)

    async def _fetch_new(self, client: aioredis.Redis, want: int) -> bool:
        """Read new entries (``>``), waiting up to ``block_ms``; False if none came."""
        idle = self._stop_after_idle
        block = self._block_ms
        if idle is not None:
            block = max(1, min(block, int((idle - self._idle) * 1000) + 1))
        assert self._ctx is not None
        clock = self._ctx.clock
        due = self._rejections.next_due()
        if due is not None:  # wake up when rejected entries are due
            block = max(1, min(block, int((due - clock.monotonic()) * 1000) + 1))
        t0 = clock.monotonic()
        self._uncertain = True
        try:
            reply = await client.xreadgroup(
                self._group, self._consumer, {self._stream: ">"}, count=want, block=block
            )
        except BaseException:
            self._idle += clock.monotonic() - t0  # a barrier cut the wait: it still counts
            raise
        self._uncertain = False
        entries = _entries(reply)
        if not entries:
            # Real time a read waited; a virtual clock does not move during network I/O.
            self._idle += max(clock.monotonic() - t0, block / 1000)
            return False
        self._idle = 0.0
        self._last_fetched = entries[-1][0]
        return await self._take(entries, claimed=False, redelivered=False)

    async def _fetch_claimed(self, want: int) -> bool:
        """One read of the claims consumer's pending list (entries we do not hold yet)."""
        cursor = self._claims_cursor
        if cursor is None or self._link is None:
            return False
        reply = await self._link.client.xreadgroup(
            self._group, self._claimer, {self._stream: cursor}, count=want
        )
        entries = _entries(reply)
        if not entries:
            self._claims_cursor = None
            return False
        self._claims_cursor = entries[-1][0]
        held = self._claims_out | self._claims_buffered | self._rejections.ids.keys()
        fresh = [e for e in entries if e[0] not in held]
        await self._take(fresh, claimed=True, redelivered=True)
        return True

    def _clock_now(self) -> float:
        assert self._ctx is not None
        return self._ctx.clock.monotonic()

    async def _reclaim(self) -> bool:
        """Claim back the rejected entries that are due, each by the consumer that holds
        it (ours, or the claims consumer) if it still does, in one round trip; True if
        any came.  A call cut before its reply leaves them due: the next one claims them
        again."""
        assert self._link is not None
        rejected = self._rejections.ids
        items = self._rejections.take_due(self._clock_now())
        ids = [i for _, _, batch in items for i in batch if i in rejected]
        if not ids:
            return False
        args: list[bytes | str] = []
        for entry_id in ids:
            args += [self._claimer if rejected[entry_id] else self._consumer, entry_id]
        try:
            back, deleted = await self._link.client.eval(
                _RECLAIM, 1, self._stream, self._group, *args
            )
        except BaseException:
            self._rejections.put_back(items)
            raise
        got: set[bytes] = set()
        for entry_id, flat in back:
            claimed = rejected[entry_id]
            fields = dict(zip(flat[::2], flat[1::2], strict=True)) or None
            self._buffer.append((entry_id, fields, claimed, True))
            if claimed:
                self._claims_buffered.add(entry_id)
            got.add(entry_id)
        for entry_id in ids:
            if entry_id not in got:  # acknowledged, claimed by another, or deleted
                del rejected[entry_id]
        if deleted:
            log.warning(
                "%s: %d rejected entr%s deleted from %s before being delivered again "
                "(XDEL or trimming): %s; nothing to deliver, acknowledged",
                self.describe(),
                len(deleted),
                "y was" if len(deleted) == 1 else "ies were",
                self._where,
                ", ".join(_text(i) for i in deleted),
            )
        return bool(got)

    async def _take(
        self,
        entries: list[tuple[bytes, dict[bytes, bytes] | None]],
        *,
        claimed: bool,
        redelivered: bool,
    ) -> bool:
        """Buffer ``entries``, acknowledging at once those a restored checkpoint covers."""
        covered: list[bytes] = []
        buffer = self._buffer
        restore_hw, restore_claimed = self._restore_hw, self._restore_claimed
        for entry_id, fields in entries:
            if (
                redelivered
                and entry_id not in self._rejections.restored  # pending since a rejection
                and (
                    (claimed and entry_id in restore_claimed)
                    or (not claimed and restore_hw is not None and _id_key(entry_id) <= restore_hw)
                )
            ):
                covered.append(entry_id)
                continue
            buffer.append((entry_id, fields, claimed, redelivered))
            if claimed:
                self._claims_buffered.add(entry_id)
        if covered and self._link is not None:
            await self._link.client.xack(self._stream, self._group, *covered)
            self._restore_claimed.difference_update(covered)
        return bool(entries)

    async def _hand_out(self, ctx: SourceContext, max_records: int) -> Batch:
        buffer = self._buffer
        metadata = self._metadata
        records: list[Any] = []
        ids: list[bytes] = []
        claims: list[bytes] = []
        hw = self._hw
        deleted: list[bytes] = []
        self._rejections.last_batch = handed = []
        rejected = self._rejections.ids
        while buffer and len(records) < max_records:
            entry_id, fields, claimed, redelivered = buffer[0]
            value, raw, problem = self._decode_entry(fields)
            if problem:
                if records:  # hand out the good ones first; report this one next time
                    break
                hint = (
                    "; set bad entries aside with flow.source(..., on_error=sw.DeadLetter(sink))"
                    if ctx.fails_on_bad_input
                    else ""
                )
                where = f"{self._where} {_text(entry_id)}"
                await ctx.bad_input(BadInputError(where=where, raw=raw, reason=problem + hint))
            elif fields is not None:
                if metadata:
                    value = RedisStreamEntry(value, _text(entry_id), self._stream, redelivered)
                records.append(value)
                handed.append((entry_id, claimed))
            else:
                deleted.append(entry_id)
            buffer.popleft()
            ids.append(entry_id)
            if rejected:
                rejected.pop(entry_id, None)
            if claimed:
                claims.append(entry_id)
                self._claims_buffered.discard(entry_id)
            elif hw is None or _id_key(entry_id) > _id_key(hw):
                hw = entry_id
        if deleted:
            log.warning(
                "%s: %d pending entr%s deleted from %s before being acknowledged (XDEL or "
                "trimming): %s; nothing to deliver, acknowledged and skipped",
                self.describe(),
                len(deleted),
                "y was" if len(deleted) == 1 else "ies were",
                self._where,
                ", ".join(_text(i) for i in deleted),
            )
        if ids:
            self._seq += len(ids)
            self._hw = hw
            self._unacked.append((self._seq, ids, claims))
            self._claims_out.update(claims)
        return Batch(records)

    def _decode_entry(self, fields: dict[bytes, bytes] | None) -> tuple[Any, object, str]:
        """``(record, raw input, problem or "")`` of an entry's fields."""
        if fields is None:  # deleted (trimmed) while pending: nothing to deliver
            return None, None, ""
        if self._field_b is None:
            try:
                return {k.decode(): v.decode() for k, v in fields.items()}, fields, ""
            except UnicodeDecodeError as exc:
                return None, fields, f"a field is not UTF-8 ({exc.reason})"
        payload = fields.get(self._field_b)
        if payload is None:
            names = sorted(k.decode(errors="backslashreplace") for k in fields)
            return None, fields, f"no field {self._field!r} (fields: {names}); pass field=..."
        try:
            return self._decode(payload), payload, ""
        except Exception as exc:  # noqa: BLE001 - any decode failure is bad input
            return None, payload, f"cannot decode: {type(exc).__name__}: {exc}"

    # -- claiming and backlog ------------------------------------------------------

    async def _claim(self) -> None:
        """Claim entries other consumers left pending longer than ``claim_idle``."""
        assert self._link is not None
        assert self._claim_idle is not None
        client = self._link.client
        idle_ms = int(self._claim_idle * 1000)
        pending = await client.xpending_range(
            self._stream, self._group, "-", "+", self._count, idle=idle_ms
        )
        mine = {self._consumer.encode(), self._claimer.encode()}
        ids: list[Any] = [p["message_id"] for p in pending if _as_bytes(p["consumer"]) not in mine]
        if not ids:
            return
        self._claims_cursor = b"0"  # set first: a cut XCLAIM is found by the next scan
        await client.xclaim(self._stream, self._group, self._claimer, idle_ms, ids, justid=True)

    async def _refresh_backlog(self) -> None:
        assert self._link is not None
        try:
            groups = await self._link.client.xinfo_groups(self._stream)
        except redis_errors.ResponseError:
            return  # the key is gone; the next read recreates nothing, report unknown
        for g in groups:
            if _as_bytes(g.get("name")) == self._group.encode():
                lag = g.get("lag")
                pending = int(g.get("pending") or 0)
                mine = sum(len(ids) for _, ids, _ in self._unacked)
                others = max(0, pending - mine - len(self._buffer))
                self._backlog = None if lag is None else int(lag) + others
                return


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
    """The entries of an ``XREADGROUP`` reply for one stream (``[]`` when none).

    A pending entry deleted since (``XDEL``, trimming) comes back without fields: as
    ``None`` or, from redis-py 5 on, as ``{}`` (an entry always has a field otherwise);
    both become ``None``.
    """
    if not reply:
        return []
    entries: list[tuple[bytes, dict[bytes, bytes] | None]] = reply[0][1]
    if not all(fields for _, fields in entries):
        entries = [(entry_id, fields or None) for entry_id, fields in entries]
    return entries


def _as_bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


# -- the sink ------------------------------------------------------------------------


class RedisStreamSink(Sink):
    r"""Appends every record to a Redis stream with ``XADD`` (``sw.sinks.RedisStream``).

    Each micro-batch is one ``MULTI``/``EXEC`` pipeline: one round trip, all entries or
    none.  At-least-once: a batch whose reply is lost to a connection cut is sent again
    (its entries may then be there twice), and after a crash the records written since
    the last checkpoint are written again.  Idempotent writes (de-duplication by a
    record key) are not offered.

    Args:
        url: the Redis URL.
        stream: the stream key (created by the first ``XADD``).
        maxlen: trim the stream to about this many entries (``MAXLEN ~``); None: never.
        encode: turns a record into the payload bytes (default: JSON, with the same
            fallbacks as ``sinks.JsonLines``).
        field: the entry field for the payload (default ``"data"``).  None: each
            record must be a mapping, written as the entry's fields (``str``, ``bytes``,
            ``int`` and ``float`` values as they are, others as JSON).
        reconnect_timeout: give up (:class:`RedisStreamError`) after this many seconds
            without Redis (None: never).
        open_timeout: at ``open`` (the flow's start), give up after this many seconds
            (default 10; None: as long as ``reconnect_timeout``): a Redis that is not
            there at the start is more likely a wrong URL than an outage.
        tls: ``sw.Tls(ca=..., cert=..., key=...)`` (or True: the system's CAs) to connect
            over TLS (like ``rediss://``); a failed handshake fails at once, naming it.
        username: the ACL user (Redis 6+); with ``password``.
        password: the password, a ``str`` or ``sw.Secret.env(...)``/``.file(...)``, read
            at every connection (or ``redis://user:password@host`` in the URL).
    """

    def __init__(
        self,
        url: str,
        stream: str,
        *,
        maxlen: int | None = None,
        encode: Callable[[Any], bytes | str] = _encode_json,
        field: str | None = "data",
        reconnect_timeout: float | timedelta | None = 60.0,
        open_timeout: float | None = OPEN_TIMEOUT,
        tls: TlsLike = None,
        username: str | None = None,
        password: SecretLike | None = None,
    ) -> None:
        what = "sinks.RedisStream"
        for name, value in (("url", url), ("stream", stream)):
            if not (isinstance(value, str) and value):
                raise ValueError(f"{what} {name} must be a non-empty str, got {value!r}")
        if maxlen is not None and not (
            isinstance(maxlen, int) and not isinstance(maxlen, bool) and maxlen >= 1
        ):
            raise ValueError(f"{what} maxlen must be an int >= 1 or None, got {maxlen!r}")
        if not callable(encode):
            raise TypeError(f"{what} encode must be callable, got {encode!r}")
        self._url = url
        self._stream = stream
        self._maxlen = maxlen
        self._encode = encode
        self._field = _check_field(field, what)
        self._reconnect_timeout = _reconnect_timeout(reconnect_timeout, what)
        self._open_timeout = check_open_timeout(open_timeout, what)
        self._security = _Security.of(url, tls, username, password, what)
        self._link: _Link | None = None
        self._closed = False

    async def open(self, ctx: SinkContext) -> None:
        """Connect (a ``PING``), so that a Redis not there fails the flow's start.

        Raises:
            RedisStreamError: Redis unreachable for ``open_timeout`` (or refused access).
        """
        what = f"sink {ctx.name!r} ({self.describe()})"
        client = _client(self._url, self._security, what)
        link = self._link = _Link(client, what, ctx.clock, _TIMEOUT)
        link.reconnect_timeout = self._reconnect_timeout
        await link.opening(link.client.ping, self._open_timeout)

    def _fields(self, value: Any) -> dict[str | bytes, bytes | str | int | float]:
        if self._field is not None:
            return {self._field: self._encode(value)}
        if not isinstance(value, Mapping):
            raise TypeError(
                f"with field=None every record must be a mapping, got {short_repr(value)}"
            )
        out: dict[str | bytes, bytes | str | int | float] = {}
        for k, v in value.items():
            key = k if isinstance(k, str | bytes) else str(k)
            ok = isinstance(v, str | bytes | int | float) and not isinstance(v, bool)
            out[key] = v if ok else _encode_json(v)
        if not out:
            raise ValueError("an entry needs at least one field, got an empty mapping")
        return out

    async def write(self, batch: Batch) -> None:
        """``XADD`` every record in one transaction.

        Raises:
            PartialWriteError: record ``written`` could not be encoded; the records
                before it are in the stream, it and the ones after are not.
            RedisStreamError: Redis unreachable past ``reconnect_timeout`` or an error
                reply (e.g. the key holds another type).
        """
        link = self._link
        if link is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        entries: list[dict[str | bytes, bytes | str | int | float]] = []
        failed: tuple[int, Exception] | None = None
        for i, value in enumerate(batch.values):
            try:
                entries.append(self._fields(value))
            except Exception as exc:  # noqa: BLE001 - pinned to this record (PartialWriteError)
                failed = (i, exc)
                break
        if entries:
            await link.call(lambda: self._xadd(entries))
        if failed is not None:
            raise PartialWriteError(failed[0], failed[1]) from failed[1]

    async def _xadd(self, entries: list[dict[str | bytes, bytes | str | int | float]]) -> None:
        assert self._link is not None
        pipe = self._link.client.pipeline(transaction=True)
        stream, maxlen = self._stream, self._maxlen
        for fields in entries:
            pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)  # type: ignore[arg-type]
        try:
            await pipe.execute()
        except redis_errors.ResponseError as exc:
            raise RedisStreamError(
                f"{self.describe()}: Redis at {self._link.where} refused XADD to {stream!r}: "
                f"{redact(exc)}"
            ) from exc

    async def close(self) -> None:
        """Close the connection pool (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        if self._link is not None:
            await self._link.client.aclose()

    def describe(self) -> str:
        """``RedisStream(<stream>)``."""
        return f"RedisStream({self._stream})"
