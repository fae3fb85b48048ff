r"""RabbitMQ connectors (AMQP 0-9-1, with ``aio-pika``): a queue source, a publishing sink.

``sw.sources.RabbitMQ(url, queue)`` consumes with **manual acknowledgements**.  Messages
are pushed by the broker into a small buffer, at most ``prefetch`` unacknowledged at a time
(the channel's QoS), and handed out from it only as the pipeline asks for them (the
credit: ``next_batch(max_records)``).  Nothing is acknowledged when it is handed out:
:meth:`RabbitMQSource.commit` acknowledges with ``multiple=True`` up to the last delivery
tag handed out before the position -- after every sink wrote those records (ack barriers,
every 0.1 s) or, with checkpoints, after the checkpoint holding the position was stored::

    broker queue   m1 m2 m3 m4 m5 m6 m7 m8 ...         (ready)
    prefetch=4     [m1 m2 m3 m4]  pushed, unacked      (the broker holds back m5...)
    next_batch(3)  -> m1 m2 m3    position {tag: 3}
    commit({tag: 3})  basic.ack(3, multiple=True)      -> m5 m6 m7 may be pushed

So ``prefetch`` bounds what this source holds: the buffer, the records in the pipeline
and those waiting for their acknowledgement.  The broker keeps the rest.  It also bounds
the throughput to about ``prefetch / commit interval`` (0.1 s without checkpoints, the
checkpoint interval with them): raise it with long checkpoint intervals.

Delivery tags belong to a channel.  When the connection is lost, the broker requeues
every message it had delivered and not seen acknowledged; they come again (with
``redelivered`` set) on the new channel, and positions of the old channel are void
(their commit does nothing).  The same holds when the flow crashes: the broker
redelivers.  Hence **at-least-once**: a record handed out but not acknowledged when a
connection or process dies is delivered again.  With checkpoints, a position also lists
the ``message_id`` of the messages whose acknowledgement may not have reached the broker,
so that after a restore the redeliveries that checkpoint covers are acknowledged and
skipped (see :class:`_AckLedger`): exactly-once output with an exactly-once sink.

``sw.sinks.RabbitMQ(url, exchange, routing_key)`` publishes every record of a batch
concurrently on a channel with **publisher confirms** and returns when the broker
confirmed them all (persistent messages in durable queues are on disk by then; a queue
declared moments before a broker crash may still be lost with them, and a
``declare_queue`` that vanished across an outage stops the sink instead of being declared
again empty).
RabbitMQ has no idempotent publish: the sink is at-least-once (a batch cut by a lost
connection is published again, after a crash the records after the last checkpoint are).

Both reconnect on a lost connection with backoff on the flow's clock (one WARNING per
outage, one INFO on recovery) and give up after ``reconnect_timeout`` seconds with
:class:`RabbitMQUnavailableError` naming the server.  See ``docs/connectors/rabbitmq.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import aio_pika
import aio_pika.abc
import aiormq
import aiormq.abc
from aiormq.exceptions import (
    AuthenticationError,
    ChannelClosed,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    DeliveryError,
    IncompatibleProtocolError,
)
from pamqp import commands as spec

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
from sluiceway.errors import BadInputError, short_repr
from sluiceway.time import Clock

__all__ = [
    "OnBadInput",
    "RabbitMQError",
    "RabbitMQMessage",
    "RabbitMQSink",
    "RabbitMQSource",
    "RabbitMQUnavailableError",
]

log = logging.getLogger("sluiceway")

T = TypeVar("T")

OnBadInput = Literal["ack", "reject"]
"""What a source does with a message it could not decode, once the flow's error policy let
it go (under the default ``Fail`` policy the flow stops and the message stays unacked):
``"ack"`` acknowledges it with the next commit (the flow's dead-letter sink has it);
``"reject"`` rejects it at once without requeueing (``basic.reject(requeue=False)``), so
the queue's own dead-letter exchange (``x-dead-letter-exchange``) receives it."""

_FETCH_WAIT = 0.1  # seconds a pull waits for a message before it returns an empty batch
_BACKLOG_REFRESH = 1.0  # seconds between two queue-depth readings
_CONNECT_TIMEOUT = 10.0
_BACKOFF_FIRST, _BACKOFF_MAX = 0.05, 5.0

# Errors after which connecting again may help (AMQPConnectionError is a ConnectionError,
# so an OSError; a channel used after its connection died raises ChannelInvalidStateError).
_TRANSIENT: tuple[type[BaseException], ...] = (OSError, ChannelInvalidStateError)
_FATAL: tuple[type[BaseException], ...] = (AuthenticationError, IncompatibleProtocolError)
_CLOSING: tuple[type[BaseException], ...] = (*_TRANSIENT, ChannelClosed)


class RabbitMQError(Exception):
    """A RabbitMQ connector cannot go on (a missing queue, a refused declaration...)."""


class RabbitMQUnavailableError(RabbitMQError, ConnectionError):
    """The broker stayed unreachable for longer than ``reconnect_timeout``."""


@dataclass(frozen=True, slots=True)
class RabbitMQMessage:
    """A consumed message, as the source hands it out with ``include_metadata=True``.

    Attributes:
        payload: the decoded body.
        routing_key: the key it was published with.
        exchange: the exchange it was published to (``""``: the default exchange).
        message_id: the publisher's ``message_id`` property, if any.
        headers: the message's headers table.
        redelivered: True when the broker delivered it before (to a consumer that died
            or whose connection was lost before acknowledging it): it may be a duplicate.
        delivery_tag: its tag on the channel that delivered it.
    """

    payload: Any
    routing_key: str
    exchange: str
    message_id: str | None
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    delivery_tag: int = 0


def _check_url(url: object, what: str) -> str:
    if not isinstance(url, str) or not url.startswith(("amqp://", "amqps://")):
        raise ValueError(
            f"{what} url must be an 'amqp://user:password@host:port/vhost' string, "
            f"got {short_repr(url)}"
        )
    return url


def _check_timeout(value: float | None, what: str) -> float | None:
    if value is None:
        return None
    if not (
        isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf
    ):
        raise ValueError(
            f"{what} reconnect_timeout must be a finite number > 0 seconds or None (no limit), "
            f"got {value!r}"
        )
    return float(value)


class _Reconnect:
    """Backoff and the log lines of outages, for one connector.

    An outage starts at the first failure (a lost connection, a refused connect): one
    WARNING.  Attempts are spaced 0.05 s, 0.1 s, ... up to 5 s apart on the flow's clock.
    The first success after an outage logs one INFO; after ``timeout`` seconds without
    one, :class:`RabbitMQUnavailableError` is raised.
    """

    def __init__(self, who: str, url: str, timeout: float | None) -> None:
        self.who = who
        self.server = redact(url)
        self.timeout = timeout
        self.limit_name = "reconnect_timeout"  # or "open_timeout" while opening
        self.security = _Security()
        self.outage_since: float | None = None
        self.attempts = 0
        self.outages = 0
        self.delay = _BACKOFF_FIRST

    def lost(self, clock: Clock, exc: BaseException | None) -> None:
        """The connection is gone (log once per outage)."""
        if self.outage_since is not None:
            return
        self.outage_since = clock.monotonic()
        self.outages += 1
        self.attempts = 0
        self.delay = _BACKOFF_FIRST
        log.warning(
            "%s: no connection to RabbitMQ at %s (%s); reconnecting with backoff",
            self.who,
            self.server,
            "closed" if exc is None else f"{type(exc).__name__}: {redact(exc)}",
        )

    async def opening(
        self, clock: Clock, attempt: Callable[[], Awaitable[T]], open_timeout: float | None
    ) -> T:
        """:meth:`connect` at ``open``: give up after ``open_limit(open_timeout, ...)``."""
        reconnect = self.timeout
        self.timeout, self.limit_name = open_limit(open_timeout, reconnect)
        try:
            return await self.connect(clock, attempt)
        finally:
            self.timeout, self.limit_name = reconnect, "reconnect_timeout"

    async def connect(self, clock: Clock, attempt: Callable[[], Awaitable[T]]) -> T:
        """Call ``attempt`` until it succeeds, waiting between failures.

        Meanwhile aiormq's own ERROR per failed attempt is lowered to DEBUG: the outage
        is reported once, by :meth:`lost`."""
        with _quiet_client_log():
            return await self._connect(clock, attempt)

    async def _connect(self, clock: Clock, attempt: Callable[[], Awaitable[T]]) -> T:
        while True:
            self.attempts += 1
            try:
                result = await attempt()
            except _FATAL:
                raise
            except _TRANSIENT as exc:
                if isinstance(exc, OSError) and exc.filename is not None:
                    raise  # a missing CA, certificate or secret file: not an outage
                if tls_failure(exc):  # trying again cannot help
                    raise RabbitMQError(
                        f"{self.who}: the TLS handshake with RabbitMQ at {self.server} failed "
                        f"({type(exc).__name__}: {redact(exc)}); check tls= (the CA, the "
                        "client certificate) and that the port speaks TLS (5671)"
                    ) from exc
                if "ACCESS_REFUSED" in str(exc):  # a ProbableAuthenticationError that is one
                    raise RabbitMQError(
                        f"{self.who}: RabbitMQ at {self.server} refused the login ({redact(exc)}); "
                        "check the user, password and virtual host in the URL"
                    ) from exc
                self.lost(clock, exc)
                assert self.outage_since is not None
                waited = clock.monotonic() - self.outage_since
                if self.timeout is not None and waited >= self.timeout:
                    raise RabbitMQUnavailableError(
                        f"{self.who}: RabbitMQ at {self.server} unreachable for "
                        f"{waited:.1f} s ({self.attempts} attempts; last error: "
                        f"{type(exc).__name__}: {redact(exc)}); giving up ({self.limit_name}="
                        f"{self.timeout:g})"
                    ) from exc
                pause = self.delay
                if self.timeout is not None:
                    pause = min(pause, max(0.0, self.timeout - waited))
                self.delay = min(self.delay * 2, _BACKOFF_MAX)
                await clock.sleep(pause)
                continue
            if self.outage_since is not None:
                log.info(
                    "%s: reconnected to RabbitMQ at %s after %.1f s (%d attempts)",
                    self.who,
                    self.server,
                    clock.monotonic() - self.outage_since,
                    self.attempts,
                )
                self.outage_since = None
            self.attempts = 0
            return result


class _DemoteToDebug(logging.Filter):
    """Lowers a client library's records to DEBUG while we handle an outage ourselves
    (counted: several connectors may reconnect at once)."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__()
        self.logger = logger
        self.users = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        if not self.logger.isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_CLIENT_LOGGERS = ("aiormq.connection", "aio_pika.robust_connection")
_demoters = [_DemoteToDebug(logging.getLogger(name)) for name in _CLIENT_LOGGERS]


@contextlib.contextmanager
def _quiet_client_log() -> Iterator[None]:
    for d in _demoters:
        if d.users == 0:
            d.logger.addFilter(d)
        d.users += 1
    try:
        yield
    finally:
        for d in _demoters:
            d.users -= 1
            if d.users == 0:
                d.logger.removeFilter(d)


@dataclass(frozen=True, slots=True)
class _Security:
    """``tls=``, ``username=`` and ``password=`` of a source or sink (see ``sw.Tls``)."""

    tls: Tls | None = None
    username: str | None = None
    password: Secret | None = None

    @classmethod
    def of(
        cls, what: str, tls: TlsLike, username: str | None, password: SecretLike | None
    ) -> _Security:
        if username is not None and not (isinstance(username, str) and username):
            raise ValueError(f"{what} username must be a non-empty str or None, got {username!r}")
        found = tls_option(tls, what)
        if found is not None:
            found.no_server_name(what)
        return cls(found, username, secret(password, f"{what} password"))

    def connection(self, url: str, what: str) -> aio_pika.Connection:
        """An unconnected connection: ``amqps`` with the TLS context when ``tls`` is
        given, the login read now (at every connection)."""
        parsed = aio_pika.connection.make_url(url)
        if self.username is not None:
            parsed = parsed.with_user(self.username)
        if self.password is not None:
            parsed = parsed.with_password(self.password.reveal(f"{what} password"))
        if self.tls is None:
            return aio_pika.Connection(parsed)
        context = self.tls.context(what)
        return aio_pika.Connection(parsed.with_scheme("amqps"), ssl_context=context)


async def _connect(
    url: str, security: _Security | None = None, what: str = "RabbitMQ"
) -> aio_pika.abc.AbstractConnection:
    """``aio_pika.connect``, but a connection object whose connect failed is closed here.

    ``aio_pika.connect`` drops it unclosed; its ``__del__`` then creates a ``close()``
    coroutine that, when the garbage collector runs outside the event loop, is never
    awaited (a RuntimeWarning per failed attempt while a broker is down)."""
    conn = (security or _Security()).connection(url, what)
    try:
        await conn.connect(timeout=_CONNECT_TIMEOUT)
    except BaseException:
        with contextlib.suppress(Exception):
            await conn.close()
        raise
    return conn


async def _close_quietly(conn: aio_pika.abc.AbstractConnection | None) -> None:
    if conn is None or conn.is_closed:
        return
    try:
        await conn.close()
    except _CLOSING as exc:  # it is going away anyway
        log.debug("closing a RabbitMQ connection: %s", redact(repr(exc)))


def _decode_json(body: bytes) -> Any:
    return json.loads(body)


def _encode_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class _AckLedger:
    """With checkpoints: the messages a checkpoint covers whose acknowledgement may not
    have reached the broker, and after a restore, recognising their redeliveries.

    The runtime stores a checkpoint, then calls ``commit``, which acknowledges.  A flow
    that stops in between (or whose last ack is lost with the connection: an ack gets
    no reply) has its messages redelivered although the checkpoint holds their output.
    So every position lists the ``message_id`` of what was handed out since the ack
    before the last one (one ack of slack), and ``restore`` takes that list back:
    a redelivery (``redelivered`` set) with one of those ids is acknowledged and skipped.

    Only ``message_id`` is trusted.  A digest of the body and properties would confuse two
    messages published on purpose with the same content and no id: if the covered one's
    ack did reach the broker, its twin's redelivery would be dropped -- a lost message.
    Messages without an id are counted instead, and their redeliveries handed out again
    (logged once).  Memory: at most ~2 x ``prefetch`` entries, plus the restored set
    (<= what the last run listed), which is dropped at the first delivery that is not a
    redelivery (the broker puts requeued messages back ahead of the rest).
    """

    __slots__ = ("anonymous", "covered", "entries", "on", "skipped", "warned")

    def __init__(self) -> None:
        self.on = False  # the flow takes checkpoints
        self.entries: deque[tuple[int, str | None]] = deque()  # (tag, message_id)
        self.covered: set[str] = set()  # restored: ids whose redelivery is skipped
        self.anonymous = 0  # restored: covered messages that had no message_id
        self.warned = False
        self.skipped = 0

    @property
    def restoring(self) -> bool:
        return bool(self.covered) or self.anonymous > 0

    def handed(self, message: aiormq.abc.DeliveredMessage) -> int:
        """``message`` is handed out, skipped or dead-lettered: acked with the next
        commit.  Returns its delivery tag."""
        delivery = message.delivery
        assert isinstance(delivery, spec.Basic.Deliver)
        tag = delivery.delivery_tag or 0
        if self.on:
            self.entries.append((tag, message.header.properties.message_id or None))
        return tag

    def acked(self, before: int) -> None:
        """A new ack is sent: forget what the ack before it (up to ``before``) covered."""
        entries = self.entries
        while entries and entries[0][0] <= before:
            entries.popleft()

    def new_channel(self) -> None:
        """Tags restart; the old channel's unacked messages are requeued and come again
        in this run (the outage window of docs/connectors/rabbitmq.md)."""
        self.entries.clear()

    def requeued(self, tags: set[int]) -> None:
        if tags and self.on:
            self.entries = deque(e for e in self.entries if e[0] not in tags)

    def fields(self) -> dict[str, Any]:
        ids = [mid for _tag, mid in self.entries if mid is not None]
        ids.extend(self.covered)
        anonymous = sum(1 for _tag, mid in self.entries if mid is None) + self.anonymous
        return {"unacked_ids": ids, "unacked_anonymous": anonymous}

    def restore(self, ids: list[str], anonymous: int) -> None:
        self.covered = set(ids)
        self.anonymous = anonymous

    def skips(self, message: aiormq.abc.DeliveredMessage, who: str) -> bool:
        """True for a redelivery of a message the restored checkpoint covers."""
        delivery = message.delivery
        assert isinstance(delivery, spec.Basic.Deliver)
        if not delivery.redelivered:  # the redeliveries are over
            self.covered.clear()
            self.anonymous = 0
            return False
        message_id = message.header.properties.message_id
        if not message_id:
            if self.anonymous and not self.warned:
                self.warned = True
                log.warning(
                    "%s: the restored checkpoint covers %d message(s) without a message_id "
                    "whose acknowledgement may not have reached the broker.  A redelivery "
                    "without message_id cannot be told apart from another message with the "
                    "same content, so it is handed out again and may be written twice; "
                    "publish with unique message_ids to have such redeliveries skipped",
                    who,
                    self.anonymous,
                )
            return False
        if message_id not in self.covered:
            return False
        self.covered.discard(message_id)
        if self.skipped == 0:
            log.info(
                "%s: acknowledging and skipping redelivered messages that the restored "
                "checkpoint already covers (the last run stopped before their "
                "acknowledgement reached the broker); counted in skipped_redeliveries",
                who,
            )
        self.skipped += 1
        return True


# -- the source ----------------------------------------------------------------------


class RabbitMQSource(Source):
    r"""Messages from a RabbitMQ queue (``sw.sources.RabbitMQ``), acknowledged on commit.

    Args:
        url: the broker, ``amqp://user:password@host:port/vhost``.
        queue: the queue to consume.
        declare: declare a missing queue (durable) when the source starts; False: it
            must exist (checked passively).  Only at the start: a queue that is gone
            after a lost connection took its messages along (deleted, or lost by a broker
            crash), so the source then stops with :class:`RabbitMQError` rather than
            declaring an empty one and waiting on it.
        prefetch: the channel's QoS ``prefetch_count``: how many unacknowledged messages
            the broker pushes to this source at most (buffered, in the pipeline, or
            waiting for their commit).  Throughput is at most about ``prefetch`` per
            commit interval (0.1 s without checkpoints, the checkpoint interval with).
        stop_after_idle: end the input (``next_batch`` returns None) after this many
            seconds without a message; None (default): read until stopped.
        decode: ``bytes -> value`` for the body (default ``json.loads``; ``bytes`` keeps
            the raw body).  A body it raises on is bad input.
        include_metadata: hand out :class:`RabbitMQMessage` (payload, routing key,
            headers, ``redelivered``...) instead of the bare payload.
        on_bad_input: see :data:`OnBadInput`.
        reconnect_timeout: seconds to keep reconnecting after the connection is lost
            (None: forever).
        open_timeout: at ``open`` (the flow's start), give up after this many seconds
            (default 10; None: as long as ``reconnect_timeout``): a broker that is not
            there at the start is more likely a wrong URL than an outage.
        tls: ``sw.Tls(ca=..., cert=..., key=...)`` (or True: the system's CAs): connect
            with AMQPS (``amqps://`` in the URL works too); a failed handshake fails at
            once, naming the broker.
        username, password: the login, instead of the one in the URL (the password a
            ``str`` or ``sw.Secret``, read at every connection).

    Raises:
        ValueError: a bad argument.
    """

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        declare: bool = True,
        prefetch: int = 2000,
        stop_after_idle: float | None = None,
        decode: Callable[[bytes], Any] = _decode_json,
        include_metadata: bool = False,
        on_bad_input: OnBadInput = "ack",
        reconnect_timeout: float | None = 60.0,
        open_timeout: float | None = OPEN_TIMEOUT,
        tls: TlsLike = None,
        username: str | None = None,
        password: SecretLike | None = None,
    ) -> None:
        what = "sources.RabbitMQ"
        self._url = _check_url(url, what)
        if not isinstance(queue, str) or not queue:
            raise ValueError(f"{what} queue must be a non-empty string, got {short_repr(queue)}")
        if not (isinstance(prefetch, int) and not isinstance(prefetch, bool) and prefetch > 0):
            raise ValueError(f"{what} prefetch must be an int > 0, got {prefetch!r}")
        if prefetch > 65535:
            raise ValueError(f"{what} prefetch must be <= 65535 (AMQP's limit), got {prefetch}")
        if stop_after_idle is not None and not (
            isinstance(stop_after_idle, int | float) and 0 < stop_after_idle < math.inf
        ):
            raise ValueError(
                f"{what} stop_after_idle must be a finite number > 0 seconds or None, "
                f"got {stop_after_idle!r}"
            )
        if not callable(decode):
            raise TypeError(f"{what} decode must be a callable bytes -> value, got {decode!r}")
        if on_bad_input not in ("ack", "reject"):
            raise ValueError(f"{what} on_bad_input must be 'ack' or 'reject', got {on_bad_input!r}")
        self._queue = queue
        self._declare = bool(declare)
        self._prefetch = prefetch
        self._idle = None if stop_after_idle is None else float(stop_after_idle)
        self._decode = decode
        self._meta = bool(include_metadata)
        self._on_bad: OnBadInput = on_bad_input
        self._reconnect = _Reconnect(self.describe(), url, _check_timeout(reconnect_timeout, what))
        self._open_timeout = check_open_timeout(open_timeout, what)
        self._reconnect.security = _Security.of(what, tls, username, password)
        self._ctx: SourceContext | None = None
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._raw: aiormq.abc.AbstractChannel | None = None
        self._buf: deque[aiormq.abc.DeliveredMessage] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self._broken = False  # the connection went away (set by its close callback)
        self._session = uuid.uuid4().hex  # positions of another run never match
        self._epoch = 0  # one per channel: delivery tags are only valid on their channel
        self._last_tag = 0  # the last tag handed out on this channel
        self._acked = 0  # the last tag acknowledged on this channel
        self._handed = 0  # records handed out by this run
        self._ready: int | None = None  # the queue's ready messages, last we asked
        self._depth_task: asyncio.Task[None] | None = None
        self._last_message = 0.0
        self._closed = False
        self._last_batch: list[tuple[int, Any]] = []  # (tag, channel) per record handed out
        self._nacked: set[int] = set()  # tags requeued on this channel, above _acked
        self._connected = False  # connected once: the queue is never declared again
        self._ledger = _AckLedger()
        self.rejected = 0
        """Messages requeued by ``rate_limit(when_limited="reject")``."""

    def describe(self) -> str:
        """``RabbitMQ(<queue>)``."""
        return f"RabbitMQ({self._queue})"

    # -- connecting ----------------------------------------------------------------

    async def open(self, ctx: SourceContext) -> None:
        """Connect, declare (or check) the queue, set the QoS and start consuming.

        Raises:
            RabbitMQUnavailableError: the broker is not reachable within
                ``reconnect_timeout``.
            RabbitMQError: the queue does not exist (``declare=False``) or cannot be
                declared as a durable queue (it exists with other arguments).
        """
        self._ctx = ctx
        self._ledger.on = ctx.checkpointing
        self._reconnect.who = f"source {ctx.name!r} ({self.describe()})"
        await self._reconnect.opening(ctx.clock, self._connect, self._open_timeout)
        self._last_message = ctx.clock.monotonic()
        self._depth_task = asyncio.get_running_loop().create_task(
            self._watch_depth(ctx.clock), name=f"sluiceway {self.describe()} queue depth"
        )

    async def _connect(self) -> None:
        ctx = self._ctx
        assert ctx is not None
        conn = await _connect(self._url, self._reconnect.security, self.describe())
        try:
            channel = await conn.channel(publisher_confirms=False)
            try:
                # An existing queue is used as it is (with its dead-letter exchange, length
                # limits...): declaring it again with other arguments would be refused.
                queue = await channel.declare_queue(self._queue, passive=True)
            except ChannelNotFoundEntity as exc:
                if self._connected:
                    raise RabbitMQError(self._queue_gone(exc)) from exc
                if not self._declare:
                    raise RabbitMQError(self._queue_problem(exc)) from exc
                channel = await conn.channel(publisher_confirms=False)  # 404 closed the last
                try:
                    await channel.declare_queue(self._queue, durable=True)
                except ChannelClosed as exc2:
                    raise RabbitMQError(self._queue_problem(exc2)) from exc2
                queue = await channel.declare_queue(self._queue, passive=True)
            except ChannelClosed as exc:
                raise RabbitMQError(self._queue_problem(exc)) from exc
            await channel.set_qos(prefetch_count=self._prefetch)
            raw = await channel.get_underlay_channel()
            self._epoch += 1
            self._last_tag = self._acked = 0
            self._nacked = set()
            # The old channel's unacknowledged messages are requeued and come again in
            # this run (the outage window in docs/connectors/rabbitmq.md).
            self._ledger.new_channel()
            self._buf.clear()
            self._raw, self._conn, self._broken = raw, conn, False
            conn.close_callbacks.add(self._on_close)
            self._ready = queue.declaration_result.message_count
            await raw.basic_consume(self._queue, self._on_message, no_ack=False)
            self._connected = True
        except BaseException:
            self._raw = None
            await _close_quietly(conn)
            raise

    def _queue_gone(self, exc: ChannelClosed) -> str:
        return (
            f"{self.describe()} at {self._reconnect.server}: queue {self._queue!r} is gone "
            f"after the connection was lost ({redact(exc)}), and with it the messages it "
            "held.  Either it was deleted, or the broker crashed before it had stored the "
            "queue (RabbitMQ 3.x can lose a durable queue declared moments before a "
            "crash).  The source does not declare it again and wait on an empty queue: "
            "find out what happened to its messages, then start the flow again"
        )

    def _queue_problem(self, exc: ChannelClosed) -> str:
        where = f"{self.describe()} at {self._reconnect.server}"
        if isinstance(exc, ChannelNotFoundEntity):
            return (
                f"{where}: queue {self._queue!r} does not exist ({redact(exc)}); create it, "
                "or pass declare=True to declare it as a durable queue"
            )
        return f"{where}: cannot use queue {self._queue!r}: {redact(exc)}"

    def _on_close(self, _sender: object, exc: BaseException | None = None) -> None:
        self._broken = True
        self._lost = exc
        self._wake()

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        if message.channel is self._raw:  # a delivery of a dead channel is requeued
            self._buf.append(message)
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _usable(self) -> bool:
        raw = self._raw
        return raw is not None and not self._broken and not raw.is_closed

    async def _restore_connection(self, ctx: SourceContext) -> None:
        """The connection is gone: drop what its channel delivered (the broker requeues
        it) and connect again."""
        self._reconnect.lost(ctx.clock, self._lost)
        self._raw = None
        self._buf.clear()
        conn, self._conn = self._conn, None
        await _close_quietly(conn)
        await self._reconnect.connect(ctx.clock, self._connect)
        self._lost = None
        self._last_message = ctx.clock.monotonic()  # an outage is not idleness

    # -- reading -------------------------------------------------------------------

    async def next_batch(self, max_records: int) -> Batch | None:
        """Up to ``max_records`` messages that arrived; waits up to 0.1 s for the first
        (then returns an empty batch, so ack barriers get through).

        Returns None once no message came for ``stop_after_idle`` seconds.  After a lost
        connection it reconnects first (see the module docs).  Cancelling it loses
        nothing: messages stay in the buffer until they are returned.

        Raises:
            RabbitMQUnavailableError: the broker stayed unreachable too long.
            OperatorError: (from the runtime, under the ``Fail`` policy) a body could not
                be decoded; that message stays unacknowledged.
        """
        ctx = self._ctx
        if ctx is None or self._closed:
            raise RuntimeError(
                f"{self.describe()} is not open: the runtime calls open() before next_batch()"
            )
        clock, buf = ctx.clock, self._buf
        if not self._usable():
            await self._restore_connection(ctx)
        now = clock.monotonic()
        if self._last_tag - self._acked >= self._prefetch:
            # Every message the broker may push is handed out and waits for its commit:
            # the broker holds back, which is not the queue being idle.
            self._last_message = now
        if not buf:
            deadline = now + _FETCH_WAIT
            if self._idle is not None:
                idle_end = self._last_message + self._idle
                if now >= idle_end:
                    return None
                deadline = min(deadline, idle_end)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await clock.wait_until(self._waiter, deadline)
            finally:
                self._waiter = None
            if not buf:
                return Batch([])
        self._last_message = clock.monotonic()
        return await self._take(ctx, max_records)

    async def _take(self, ctx: SourceContext, max_records: int) -> Batch:
        buf, decode, meta = self._buf, self._decode, self._meta
        records: list[Any] = []
        self._last_batch = handed = []
        last = self._last_tag
        ledger = self._ledger
        while buf and len(records) < max_records:
            message = buf[0]
            if ledger.restoring and ledger.skips(message, self._reconnect.who):
                buf.popleft()  # acknowledged with the next commit, like a handed-out one
                last = ledger.handed(message)
                continue
            try:
                value = decode(message.body)
            except Exception as exc:  # noqa: BLE001 - any decode failure is bad input
                if records:  # hand out the good ones first; report this one next time
                    break
                last = await self._bad(ctx, message, exc)
                if message.channel is self._raw:  # dead-lettered: acked like a record
                    ledger.handed(message)
                continue
            buf.popleft()
            delivery = message.delivery
            assert isinstance(delivery, spec.Basic.Deliver)
            last = delivery.delivery_tag or 0
            if meta:
                props = message.header.properties
                value = RabbitMQMessage(
                    payload=value,
                    routing_key=delivery.routing_key or "",
                    exchange=delivery.exchange or "",
                    message_id=props.message_id,
                    headers=dict(props.headers or {}),
                    redelivered=bool(delivery.redelivered),
                    delivery_tag=last,
                )
            records.append(value)
            handed.append((last, message.channel))
            ledger.handed(message)
        self._last_tag = last
        self._handed += len(records)
        return Batch(records)

    async def redeliver_later(self, indices: Sequence[int], delay: float) -> None:
        """Requeue the messages at ``indices`` of the last batch (``basic.nack`` with
        ``requeue=True``), before any acknowledgement can cover them.  AMQP has no delay
        on a requeue: the broker offers them again at once (the rate limit then waits for
        the limiter before pulling again, see docs/flow-control.md).  A nack that cannot
        be sent (the connection died) is not needed: the broker requeues what was never
        acknowledged."""
        raw = self._raw
        entries = [self._last_batch[i] for i in indices]
        self.rejected += len(entries)
        # Requeued, not processed: no checkpoint may list them as covered, or their
        # redelivery after a restore would be skipped (lost).
        self._ledger.requeued({tag for tag, channel in entries if channel is raw})
        for tag, channel in entries:
            if channel is not raw or raw is None or not self._usable():
                continue  # an old channel: the broker requeued it when that one closed
            try:
                await raw.basic_nack(tag, multiple=False, requeue=True)
            except _TRANSIENT as exc:
                self._lost = exc
                return
            self._nacked.add(tag)

    async def _bad(
        self, ctx: SourceContext, message: aiormq.abc.DeliveredMessage, exc: Exception
    ) -> int:
        """Report an undecodable message (raises under ``Fail``: it stays unacked)."""
        delivery = message.delivery
        assert isinstance(delivery, spec.Basic.Deliver)
        tag = delivery.delivery_tag or 0
        ident = message.header.properties.message_id or f"delivery tag {tag}"
        hint = (
            "; fix the publisher, or set bad messages aside with "
            "flow.source(..., on_error=sw.DeadLetter(sink))"
            if ctx.fails_on_bad_input
            else ""
        )
        raw = message.body.decode("utf-8", "backslashreplace")
        reason = f"cannot decode the body: {type(exc).__name__}: {exc}{hint}"
        await ctx.bad_input(
            BadInputError(
                where=f"RabbitMQ queue {self._queue!r} message {ident}", raw=raw, reason=reason
            )
        )
        # The flow's policy let it go: it is handled.
        if self._buf and self._buf[0] is message:
            self._buf.popleft()
        if self._on_bad == "reject" and self._usable() and message.channel is self._raw:
            try:
                await message.channel.basic_reject(tag, requeue=False)
            except _TRANSIENT as err:  # the broker requeues it with the rest
                self._lost = err
        return tag if message.channel is self._raw else self._last_tag

    async def _watch_depth(self, clock: Clock) -> None:
        """Read the queue's depth every second, for :meth:`backlog`.

        On a channel of its own, in a task of its own (started by ``open``, cancelled by
        ``close``): a pull that is cancelled (by a checkpoint barrier or a stop) must never
        be inside an AMQP call, since aiormq closes a channel whose call was cancelled.
        """
        channel: aio_pika.abc.AbstractChannel | None = None
        while True:
            await clock.sleep(_BACKLOG_REFRESH)
            conn = self._conn
            if conn is None or conn.is_closed or not self._usable():
                channel = None
                continue
            try:
                if channel is None or channel.is_closed:
                    channel = await conn.channel(publisher_confirms=False)
                queue = await channel.declare_queue(self._queue, passive=True)
            except _CLOSING as exc:  # next_batch reconnects when the connection is gone
                log.debug("%s: cannot read the queue depth: %s", self.describe(), redact(repr(exc)))
                channel = None
                continue
            self._ready = queue.declaration_result.message_count

    # -- positions and acknowledgements ----------------------------------------------

    def position(self) -> dict[str, Any]:
        """``{"session", "epoch", "tag", "handed_out", "unacked_ids", "unacked_anonymous"}``:
        the last delivery tag handed out on the current channel (tags are per channel:
        ``epoch`` counts channels); with checkpoints, the ``message_id`` of every message
        handed out before it whose acknowledgement may not have reached the broker, and
        how many such messages had none.

        ``unacked_ids`` is what :meth:`restore` needs to recognise the redeliveries of
        messages this position covers: a flow that stops between storing the checkpoint
        and acknowledging it gets them again.  It holds the messages since the
        acknowledgement before the last one (one ack of slack: an ack gets no reply, so
        the last one may have been lost with the connection), plus what is left of the
        restored set; at most ~3 x ``prefetch`` ids.
        """
        pos: dict[str, Any] = {
            "session": self._session,
            "epoch": self._epoch,
            "tag": self._last_tag,
            "handed_out": self._handed,
        }
        if self._ledger.on:
            pos.update(self._ledger.fields())
        return pos

    def restore(self, position: Any) -> None:
        """Prepare to skip the redeliveries the checkpoint at ``position`` covers.

        The broker requeued every message the old run had not acknowledged when its
        connection died; they come again with ``redelivered`` set.  Those whose
        ``message_id`` is in the position's ``unacked_ids`` were handed out before the
        checkpoint, so their output is in it: they are acknowledged (with the next
        commit) and not handed out again (:attr:`skipped_redeliveries`).  Every other
        redelivery is handed out: it was not processed before the checkpoint.  A message
        without ``message_id`` cannot be recognised safely (a different message with the
        same content must not be dropped), so it is handed out again too.

        Raises:
            ValueError: ``position`` is not a position of this source.
        """
        if not (isinstance(position, dict) and "tag" in position):
            raise ValueError(
                f"{self.describe()}: a checkpoint position must be a dict from position(), "
                f"got {short_repr(position)}"
            )
        ids = position.get("unacked_ids", [])  # absent in checkpoints of older versions
        anonymous = position.get("unacked_anonymous", 0)
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)) or not (
            isinstance(anonymous, int) and anonymous >= 0
        ):
            raise ValueError(
                f"{self.describe()}: a checkpoint position's unacked_ids must be a list of "
                f"message_id strings and unacked_anonymous an int >= 0, got "
                f"{short_repr(position)}"
            )
        self._ledger.restore(ids, anonymous)

    @property
    def skipped_redeliveries(self) -> int:
        """Redelivered messages acknowledged and not handed out, because the checkpoint
        the flow restored already covers them (the last run stopped between storing that
        checkpoint and acknowledging it)."""
        return self._ledger.skipped

    async def commit(self, position: Any) -> None:
        """Acknowledge (``multiple=True``) every message handed out before ``position``.

        Does nothing for a position of an earlier channel: its messages were requeued
        when that connection died.  An acknowledgement that cannot be sent (the
        connection just died) is dropped the same way: the broker redelivers.
        """
        if not isinstance(position, dict):
            return
        if position.get("session") != self._session or position.get("epoch") != self._epoch:
            return
        tag = position.get("tag", 0)
        nacked = self._nacked
        while tag in nacked:  # requeued by redeliver_later: acking it is a channel error
            tag -= 1
        raw = self._raw
        if tag <= self._acked or raw is None or not self._usable():
            return
        try:
            await raw.basic_ack(tag, multiple=True)
        except _TRANSIENT as exc:
            self._lost = exc
            self._broken = True
            return
        self._ledger.acked(self._acked)  # one ack of slack: see _AckLedger
        self._acked = tag
        if nacked:
            self._nacked = {t for t in nacked if t > tag}

    def backlog(self) -> int | None:
        """Messages ready in the queue, as of the last reading (at most ~1 s old; not
        counting the up to ``prefetch`` pushed to this source); None before the first."""
        return self._ready

    async def close(self) -> None:
        """Close the connection (safe to call twice).  Messages not acknowledged are
        requeued by the broker."""
        if self._closed:
            return
        self._closed = True
        self._raw = None
        self._buf.clear()
        task, self._depth_task = self._depth_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close_callbacks.discard(self._on_close)
        await _close_quietly(conn)


# -- the sink ------------------------------------------------------------------------


class RabbitMQSink(Sink):
    r"""Publishes every record to RabbitMQ (``sw.sinks.RabbitMQ``) with publisher confirms.

    A batch is published concurrently; :meth:`write` returns when the broker confirmed
    every message (``mandatory``: a message no queue takes is an error, not a silent
    drop).  **At-least-once**: RabbitMQ has no idempotent publish, so a batch cut short
    by a lost connection is published again after reconnecting, and after a crash the
    records since the last checkpoint are.

    Args:
        url: the broker, ``amqp://user:password@host:port/vhost``.
        exchange: the exchange (default ``""``: the default exchange, which routes by
            queue name).
        routing_key: a string, or ``value -> str`` per record.  With the default
            exchange and ``declare_queue``, it defaults to that queue.
        declare_queue: a durable queue to declare when the sink starts (handy with the
            default exchange).  After a lost connection it is only checked: a queue that
            is gone (and the messages confirmed into it) is a :class:`RabbitMQError`.
        persistent: publish with ``delivery_mode=2`` (kept on disk in durable queues).
        encode: ``value -> bytes`` (default: compact JSON); a record it raises on is
            pinned to itself (:class:`~sluiceway.core.contract.PartialWriteError`).
        content_type: the ``content_type`` property (default ``application/json``;
            None: not set).
        reconnect_timeout: seconds to keep reconnecting (None: forever).
        open_timeout: at ``open`` (the flow's start), give up after this many seconds
            (default 10; None: as long as ``reconnect_timeout``): a broker that is not
            there at the start is more likely a wrong URL than an outage.
        tls: ``sw.Tls(ca=..., cert=..., key=...)`` (or True: the system's CAs): connect
            with AMQPS (``amqps://`` in the URL works too); a failed handshake fails at
            once, naming the broker.
        username, password: the login, instead of the one in the URL (the password a
            ``str`` or ``sw.Secret``, read at every connection).

    Raises:
        ValueError: a bad argument (no routing key, a bad URL...).
    """

    def __init__(
        self,
        url: str,
        exchange: str = "",
        routing_key: str | Callable[[Any], str] | None = None,
        *,
        declare_queue: str | None = None,
        persistent: bool = True,
        encode: Callable[[Any], bytes] = _encode_json,
        content_type: str | None = "application/json",
        reconnect_timeout: float | None = 60.0,
        open_timeout: float | None = OPEN_TIMEOUT,
        tls: TlsLike = None,
        username: str | None = None,
        password: SecretLike | None = None,
    ) -> None:
        what = "sinks.RabbitMQ"
        self._url = _check_url(url, what)
        if not isinstance(exchange, str):
            raise ValueError(f"{what} exchange must be a string, got {short_repr(exchange)}")
        if routing_key is None:
            if exchange or not declare_queue:
                raise ValueError(
                    f"{what} needs a routing_key (a string or a function of the record); it "
                    "defaults to declare_queue only with the default exchange"
                )
            routing_key = declare_queue
        if not (isinstance(routing_key, str) or callable(routing_key)):
            raise ValueError(
                f"{what} routing_key must be a string or a callable, got {short_repr(routing_key)}"
            )
        if not callable(encode):
            raise TypeError(f"{what} encode must be a callable value -> bytes, got {encode!r}")
        self._exchange = exchange
        self._key = routing_key
        self._declare_queue = declare_queue
        self._delivery_mode = 2 if persistent else 1
        self._content_type = content_type
        self._id_prefix = uuid.uuid4().hex[:16]
        self._seq = 0
        self._encode = encode
        self._reconnect = _Reconnect(self.describe(), url, _check_timeout(reconnect_timeout, what))
        self._open_timeout = check_open_timeout(open_timeout, what)
        self._reconnect.security = _Security.of(what, tls, username, password)
        self._ctx: SinkContext | None = None
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._raw: aiormq.abc.AbstractChannel | None = None
        self._broken = False
        self._lost: BaseException | None = None
        self._declared = False  # declare_queue was declared (on the first connection)
        self._closed = False
        self.published = 0
        """Messages the broker confirmed (including ones published again)."""

    def describe(self) -> str:
        """``RabbitMQ(<exchange> <routing key>)``."""
        key = self._key if isinstance(self._key, str) else getattr(self._key, "__name__", "fn")
        return f"RabbitMQ({self._exchange or 'default exchange'} {key})"

    async def open(self, ctx: SinkContext) -> None:
        """Connect (with confirms) and declare ``declare_queue`` if given.

        Raises:
            RabbitMQUnavailableError: the broker is not reachable within
                ``reconnect_timeout``.
            RabbitMQError: ``declare_queue`` cannot be declared as a durable queue.
        """
        self._ctx = ctx
        self._reconnect.who = f"sink {ctx.name!r} ({self.describe()})"
        await self._reconnect.opening(ctx.clock, self._connect, self._open_timeout)

    async def _connect(self) -> None:
        conn = await _connect(self._url, self._reconnect.security, self.describe())
        try:
            channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
            if self._declare_queue is not None:
                await self._check_queue(channel, self._declare_queue)
            self._raw = await channel.get_underlay_channel()
            self._conn, self._broken = conn, False
            conn.close_callbacks.add(self._on_close)
        except BaseException:
            self._raw = None
            await _close_quietly(conn)
            raise

    async def _check_queue(self, channel: aio_pika.abc.AbstractChannel, queue: str) -> None:
        """Declare ``declare_queue`` (durable) on the first connection; after a lost
        connection, only check that it is still there.

        A queue that vanished across an outage took every message confirmed into it with
        it: re-declaring it would hide that loss behind an empty queue of the same name.
        RabbitMQ 3.x can lose a durable queue it declared moments before it crashed (the
        declaration was not yet on disk), and with it the confirmed messages.
        """
        where = f"{self.describe()} at {self._reconnect.server}"
        if self._declared:
            try:
                await channel.declare_queue(queue, passive=True)
            except ChannelNotFoundEntity as exc:
                raise RabbitMQError(
                    f"{where}: queue {queue!r}, which this sink declared when it started, "
                    f"is gone after the connection was lost ({redact(exc)}), and with it the "
                    "messages the broker had confirmed into it.  Either it was deleted, or "
                    "the broker crashed before it had stored the declaration (RabbitMQ 3.x "
                    "can lose a durable queue declared moments before a crash).  The sink "
                    "does not declare it again silently: find out what happened to its "
                    "messages, then start the flow again"
                ) from exc
            except ChannelClosed as exc:
                raise RabbitMQError(
                    f"{where}: cannot check queue {queue!r}: {redact(exc)}"
                ) from exc
            return
        try:
            await channel.declare_queue(queue, durable=True)
        except ChannelClosed as exc:
            raise RabbitMQError(
                f"{where}: cannot declare queue {queue!r} as a durable queue "
                f"({redact(exc)}); if it exists with other settings, do not pass declare_queue"
            ) from exc
        self._declared = True

    def _on_close(self, _sender: object, exc: BaseException | None = None) -> None:
        self._broken = True
        self._lost = exc

    async def _channel(self, ctx: SinkContext) -> aiormq.abc.AbstractChannel:
        raw = self._raw
        if raw is not None and not self._broken and not raw.is_closed:
            return raw
        conn = self._conn
        if conn is not None and not self._broken and not conn.is_closed:
            # Only the channel is gone: the broker closed it over a refused publish (e.g.
            # an exchange that does not exist).  Not an outage: open another.
            try:
                channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
                self._raw = await channel.get_underlay_channel()
            except _CLOSING as exc:
                self._lost = exc
            else:
                return self._raw
        self._reconnect.lost(ctx.clock, self._lost)
        self._raw = None
        conn, self._conn = self._conn, None
        await _close_quietly(conn)
        await self._reconnect.connect(ctx.clock, self._connect)
        self._lost = None
        assert self._raw is not None
        return self._raw

    async def write(self, batch: Batch) -> None:
        """Publish every record of ``batch``; return once the broker confirmed them all.

        Raises:
            PartialWriteError: record ``written`` could not be encoded, or the broker
                refused it (nack, or no queue took it); the records before it are
                confirmed.  Records after it in the batch may have been published too
                and are published again when the error policy retries (at-least-once).
            RabbitMQUnavailableError: the broker stayed unreachable too long.
            RabbitMQError: ``declare_queue`` is gone after a lost connection.
        """
        ctx = self._ctx
        if ctx is None or self._closed:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        encode, key, values = self._encode, self._key, batch.values
        bodies: list[bytes] = []
        keys: list[str] = []
        bad: tuple[int, Exception] | None = None
        for i, value in enumerate(values):
            try:
                bodies.append(encode(value))
                keys.append(key if isinstance(key, str) else key(value))
            except Exception as exc:  # noqa: BLE001 - pinned to this record, see Raises
                del bodies[i:]
                bad = (i, exc)
                break
        first = self._seq
        self._seq += len(bodies)
        pending = list(range(len(bodies)))
        while pending:
            raw = await self._channel(ctx)
            results = await asyncio.gather(
                *(self._publish(raw, bodies[i], keys[i], first + i) for i in pending),
                return_exceptions=True,
            )
            retry: list[int] = []
            for i, result in zip(pending, results, strict=True):
                if result is None:
                    self.published += 1
                elif isinstance(result, _TRANSIENT):
                    self._broken, self._lost = True, result
                    retry.append(i)
                elif isinstance(result, DeliveryError | ChannelClosed | RabbitMQError):
                    if bad is None or i < bad[0]:
                        bad = (i, result)
                else:
                    raise result
            if bad is not None:  # the runtime gives the records from bad[0] on again
                retry = [i for i in retry if i < bad[0]]
            pending = retry
        if bad is not None:
            raise PartialWriteError(bad[0], bad[1]) from bad[1]

    async def _publish(
        self, raw: aiormq.abc.AbstractChannel, body: bytes, key: str, seq: int
    ) -> None:
        # A fresh properties object each time (aiormq fills in a missing message_id); the
        # id stays the same when a record is published again after a lost connection.
        properties = spec.Basic.Properties(
            delivery_mode=self._delivery_mode,
            content_type=self._content_type,
            message_id=f"{self._id_prefix}-{seq}",
        )
        confirmation = await raw.basic_publish(
            body,
            exchange=self._exchange,
            routing_key=key,
            properties=properties,
            mandatory=True,
        )
        if not isinstance(confirmation, spec.Basic.Ack):
            raise RabbitMQError(
                f"{self.describe()}: the broker did not confirm a message for routing key "
                f"{key!r}: {confirmation!r}"
            )

    async def close(self) -> None:
        """Close the connection (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        self._raw = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close_callbacks.discard(self._on_close)
        await _close_quietly(conn)
