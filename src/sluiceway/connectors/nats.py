"""NATS JetStream: a source on a durable pull consumer, a sink publishing with PubAcks.

``sw.sources.NatsJetStream`` (:class:`NatsSource`) and ``sw.sinks.NatsJetStream``
(:class:`NatsSink`), on the ``nats-py`` client (``pip install 'sluiceway[nats]'``).

The source pulls from a durable consumer with ``AckExplicit``; the runtime's credit is
the fetch size, so a saturated flow stops fetching and the stream keeps the backlog::

    stream    1  2  3  4  5  6  7  8  9 ...
    fetch(4)  1  2  3  4                      handed out; unacked in the server
    commit    1  2  3  4                      after the sink (or the checkpoint): +ACK
    crash     .  .  .  .  5  6                unacked: redelivered after ack_wait

Acknowledgment happens in :meth:`NatsSource.commit` only: when the checkpoint holding
the position is stored, or -- without checkpoints -- when every record handed out before
the position has passed every sink.  A commit publishes ``+ACK`` to the reply subject of
every message it covers and sends the last one as a request: the server answers it once
it has applied that ack, and a consumer applies its acks in order, so one round trip
confirms the whole commit (``ack_sync`` for the last message, ``ack`` for the others).

Delivery: JetStream redelivers every message not acknowledged within ``ack_wait``, so the
source is at-least-once on its own.  With checkpoints the replay after a restart is exactly
what the checkpoint did not cover: messages handed out after it are unacked and come
back; messages it covered whose acks were lost in a crash (between storing the checkpoint
and acknowledging) are recognised by their stream sequence, which the position records,
and acknowledged without being handed out again.  One flow per durable consumer is
assumed for that (several flows may share a durable, at-least-once).

The sink awaits the PubAck of every message (the stream has stored it) before ``write``
returns; a ``msg_id=`` function sets ``Nats-Msg-Id`` so the server drops a repeated write
within the stream's duplicate window.

Connection loss: both sides reconnect with exponential backoff on the flow's clock (one
WARNING per outage, one INFO on recovery) and give up after ``reconnect_timeout`` seconds
with :class:`NatsUnavailableError` naming the servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, Header, PubAck, StreamConfig

from sluiceway.connectors.security import (
    Secret,
    SecretLike,
    Tls,
    TlsLike,
    auth_refused,
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
from sluiceway.time import Clock, SystemClock

__all__ = [
    "NatsMessage",
    "NatsRefusedError",
    "NatsSink",
    "NatsSource",
    "NatsUnavailableError",
]

log = logging.getLogger("sluiceway")

_ACK = b"+ACK"
_NAK = b"-NAK"
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0
_REDELIVERY_MARGIN = 0.25  # the server finds expired acks on a timer: give it a moment
_ACKED_KEEP = 100_000  # acknowledged seqs remembered at most (see _Acked)

# Errors after which the connection (or JetStream behind it) may come back by itself.
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.StaleConnectionError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoRespondersError,
    nats.errors.NoServersError,
    nats.errors.FlushTimeoutError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,
)
_NATS_ERRORS: tuple[type[BaseException], ...] = (*_TRANSIENT, nats.errors.Error)


class NatsUnavailableError(ConnectionError):
    """The NATS servers stayed unreachable (or JetStream unavailable) longer than
    ``reconnect_timeout``."""


@dataclass(frozen=True, slots=True)
class NatsMessage:
    """A record of :class:`NatsSource` with ``include_metadata=True``.

    Attributes:
        payload: the decoded payload (``decode=`` applied).
        subject: the subject the message was published on.
        stream_seq: its sequence in the stream (unique, increasing).
        delivered: how many times the server delivered it (> 1: a redelivery).
        headers: the NATS headers, or None.
    """

    payload: Any
    subject: str
    stream_seq: int
    delivered: int
    headers: dict[str, str] | None


class NatsRefusedError(SluicewayError):
    """The server refused the login, or TLS failed (an untrusted or misnamed
    certificate, a server without TLS when ``tls=`` asks for it): trying again cannot
    help, so the connector fails at once."""


class _NotTls(Exception):
    """Raised by a credential callback instead of sending a secret over plaintext."""


_CONNECT_ERRORS: tuple[type[BaseException], ...] = (_NotTls, *_NATS_ERRORS)


@dataclass(frozen=True, slots=True)
class _Security:
    """``tls=`` and the login options of a source or sink (see ``sw.Tls``)."""

    tls: Tls | None = None
    user: str | None = None
    password: Secret | None = None
    token: Secret | None = None
    nkeys_seed: str | None = None
    creds: str | None = None

    @classmethod
    def of(cls, what: str, tls: TlsLike, **login: Any) -> _Security:
        user, password, token = login["user"], login["password"], login["token"]
        if user is not None and not (isinstance(user, str) and user):
            raise ValueError(f"{what} user must be a non-empty str or None, got {user!r}")
        if (user is None) != (password is None):
            raise ValueError(f"{what}: user= and password= go together")
        ways = [n for n in ("password", "token", "nkeys_seed", "creds") if login[n] is not None]
        if len(ways) > 1:
            raise ValueError(f"{what}: log in one way, got {' and '.join(ways)}")
        files = {}
        for name in ("nkeys_seed", "creds"):
            value = login[name]
            if value is not None and not (isinstance(value, str | os.PathLike) and value):
                raise TypeError(f"{what} {name} must be a file path or None, got {value!r}")
            files[name] = None if value is None else os.fspath(value)
        return cls(
            tls_option(tls, what),
            user,
            secret(password, f"{what} password"),
            secret(token, f"{what} token"),
            **files,
        )

    def options(self, nc: Client, what: str) -> dict[str, Any]:
        """``nats.connect`` keywords: secrets are read now, and handed to the client
        only once it runs TLS (when ``tls`` asks for it)."""
        out: dict[str, Any] = {}
        tls = self.tls

        def reveal(s: Secret, name: str) -> Callable[[], str]:
            def get() -> str:
                # nats-py upgrades to TLS exactly when the server's INFO requires it
                if tls is not None and not nc._server_info.get("tls_required"):
                    raise _NotTls
                return s.reveal(f"{what} {name}")

            return get

        if tls is not None:
            out["tls"] = tls.context(what)
            if tls.server_name is not None:
                out["tls_hostname"] = tls.server_name
        if self.password is not None:
            out["user"], out["password"] = self.user, reveal(self.password, "password")
        if self.token is not None:
            out["token"] = reveal(self.token, "token")
        for name, key in (("nkeys_seed", "nkeys_seed"), ("creds", "user_credentials")):
            path = getattr(self, name)
            if path is not None:
                if not os.path.isfile(path):
                    raise FileNotFoundError(
                        errno.ENOENT, f"{what}: the NATS {name} file {path!r} does not exist", path
                    )
                out[key] = path
        return out


def _servers(servers: str | Sequence[str]) -> list[str]:
    if isinstance(servers, str):
        found = [s.strip() for s in servers.split(",") if s.strip()]
    else:
        found = [str(s) for s in servers]
    if not found:
        raise ValueError(f"NATS servers must name at least one URL, got {redact(repr(servers))}")
    return found


def _seconds(value: float | None, what: str, *, none_ok: bool = False) -> float | None:
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        none = " (None: no limit)" if none_ok else ""
        raise ValueError(f"{what} must be a finite number > 0 seconds{none}, got {value!r}")
    return float(value)


def _count(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return value


class _Link:
    """One NATS connection, made again with exponential backoff when it breaks.

    nats-py's own reconnect is off: the backoff sleeps on the flow's clock, and an outage
    is reported once (WARNING) and its end once (INFO).  ``generation`` grows with every
    new connection (subscriptions must be made again on it).
    """

    def __init__(
        self, servers: list[str], what: str, reconnect_timeout: float | None, connect_timeout: float
    ) -> None:
        self.servers = servers
        self.what = what
        self.reconnect_timeout = reconnect_timeout
        self.limit_name = "reconnect_timeout"  # or "open_timeout" while opening
        self.connect_timeout = connect_timeout
        self.clock: Clock = SystemClock()
        self.security = _Security()
        self.nc: Client | None = None
        self.generation = 0
        self._lock = asyncio.Lock()
        self._outage_since: float | None = None
        self._delay = _BACKOFF_FIRST
        self._closed = False

    def connected(self) -> Client | None:
        nc = self.nc
        return nc if nc is not None and nc.is_connected else None

    async def client(self) -> Client:
        """A connected client: the current one, or a new one (backing off until then)."""
        nc = self.connected()
        if nc is not None:
            return nc
        async with self._lock:
            while True:
                nc = self.connected()
                if nc is not None:
                    return nc
                if self._closed:
                    raise nats.errors.ConnectionClosedError
                old, self.nc = self.nc, None
                if old is not None:  # it was connected: an outage starts here
                    self._begin_outage(old.last_error or nats.errors.ConnectionClosedError())
                    await _close_quietly(old)
                nc = Client()
                options = self.security.options(nc, self.what)  # a missing file: no retry
                try:
                    await nc.connect(
                        servers=self.servers,
                        allow_reconnect=False,
                        connect_timeout=self.connect_timeout,  # type: ignore[arg-type]  # any number
                        # nats-py tries each server (1 + this) times per call, then
                        # raises NoServersError; 0 would mean: forever
                        max_reconnect_attempts=1,
                        reconnect_time_wait=0,
                        error_cb=self._on_error,
                        name=f"sluiceway {self.what}",
                        **options,
                    )
                    self._check_tls(nc)
                except _CONNECT_ERRORS as exc:
                    _abandon(nc)
                    self._refused(exc)
                    if not isinstance(exc, _TRANSIENT):
                        raise
                    await self.trouble(exc)
                    continue
                self.nc = nc
                self.generation += 1

    def _check_tls(self, nc: Client) -> None:
        if self.security.tls is not None and not nc._server_info.get("tls_required"):
            raise _NotTls

    def _refused(self, exc: BaseException) -> None:
        """Raise :class:`NatsRefusedError` for a refused login or a failed TLS handshake."""
        if isinstance(exc, _NotTls):
            why = (
                "the server does not speak TLS (tls= asks for it): refusing to go on in "
                "plaintext, no credentials were sent"
            )
        elif tls_failure(exc):
            why = f"the TLS handshake failed: {_describe(exc)}"
        elif auth_refused(exc):
            why = f"the login was refused: {_describe(exc)}; check the user and password"
        else:
            return
        raise NatsRefusedError(
            f"{self.what}: NATS at {_shown(self.servers)} refused the connection: {why}"
        ) from exc

    @contextlib.contextmanager
    def opening(self, open_timeout: float | None) -> Iterator[None]:
        """While opening, give up after ``open_limit(open_timeout, reconnect_timeout)``."""
        reconnect = self.reconnect_timeout
        self.reconnect_timeout, self.limit_name = open_limit(open_timeout, reconnect)
        try:
            yield
        finally:
            self.reconnect_timeout, self.limit_name = reconnect, "reconnect_timeout"

    async def _on_error(self, exc: Exception) -> None:
        log.debug("%s: NATS client error: %s", self.what, redact(repr(exc)))

    async def trouble(self, exc: BaseException) -> None:
        """An operation failed for a reason that may pass: wait (backing off), or raise
        :class:`NatsUnavailableError` once ``reconnect_timeout`` is over."""
        self._begin_outage(exc)
        assert self._outage_since is not None
        elapsed = self.clock.monotonic() - self._outage_since
        timeout = self.reconnect_timeout
        if timeout is not None and elapsed >= timeout:
            raise NatsUnavailableError(
                f"{self.what}: NATS at {_shown(self.servers)} unavailable for "
                f"{elapsed:.1f} s ({self.limit_name}={timeout:g}); last error: {_describe(exc)}"
            ) from exc
        wait = self._delay if timeout is None else min(self._delay, timeout - elapsed)
        self._delay = min(self._delay * 2, _BACKOFF_MAX)
        await self.clock.sleep(max(wait, 0.0))

    def _begin_outage(self, exc: BaseException) -> None:
        """Log the start of an outage (once: it lasts until :meth:`ok`)."""
        if self._outage_since is not None:
            return
        self._outage_since = self.clock.monotonic()
        self._delay = _BACKOFF_FIRST
        limit = (
            "for ever"
            if self.reconnect_timeout is None
            else f"giving up after {self.reconnect_timeout:g} s"
        )
        log.warning(
            "%s: NATS at %s unavailable (%s); reconnecting with backoff, %s",
            self.what,
            _shown(self.servers),
            _describe(exc),
            limit,
        )

    def ok(self) -> None:
        """An operation succeeded: an outage, if any, is over."""
        if self._outage_since is not None:
            log.info(
                "%s: NATS at %s available again after %.1f s",
                self.what,
                _shown(self.servers),
                self.clock.monotonic() - self._outage_since,
            )
            self._outage_since = None

    async def close(self) -> None:
        self._closed = True
        nc, self.nc = self.nc, None
        if nc is not None:
            await _close_quietly(nc)


async def _close_quietly(nc: Client) -> None:
    if nc.is_closed:
        return
    try:
        await nc.close()
    except _NATS_ERRORS as exc:
        log.debug("closing a NATS connection: %s", redact(repr(exc)))


def _abandon(nc: Client) -> None:
    """Drop a client whose connect failed part way (after TCP, or after TLS)."""
    transport = nc._transport
    if transport is not None:
        # not wait_closed(): after a failed TLS upgrade it never returns
        transport.close()  # type: ignore[no-untyped-call]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _describe(exc: BaseException) -> str:
    text = redact(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _shown(servers: list[str]) -> str:
    """The server URLs for messages and logs: credentials masked."""
    return redact(",".join(servers))


class _Acked:
    """Stream seqs this source acknowledged, remembered until no copy of them can still
    be on its way in.

    The server redelivers a message whose ack is late (ack_wait over); when the ack
    then arrives, a copy may already be sent: in the reply of a fetch running while the
    commit acknowledged it, or waiting in the subscription's queue for the next fetch.
    Either way it reached this client before the answer to the commit's ack request,
    so the first fetch of more than one message that *starts* after the ack -- which
    takes everything queued -- has ingested every such copy; the seqs acked before it
    are forgotten when it returns.  (A fetch of one takes one queued message only:
    then at most ``_ACKED_KEEP`` seqs are kept.)"""

    def __init__(self) -> None:
        self._seqs: set[int] = set()
        self._order: deque[tuple[int, int]] = deque()  # (fetches started before, seq)
        self.fetches = 0  # fetches of more than one message started so far

    def __contains__(self, seq: int) -> bool:
        return seq in self._seqs

    def add(self, seq: int) -> None:
        if seq not in self._seqs:
            self._seqs.add(seq)
            self._order.append((self.fetches, seq))
            if len(self._order) > _ACKED_KEEP:
                self._seqs.discard(self._order.popleft()[1])

    def fetched(self, started: int) -> None:
        """The fetch numbered ``started`` (:attr:`fetches` when it began) returned:
        forget what was acknowledged before it began."""
        order, seqs = self._order, self._seqs
        while order and order[0][0] < started:
            seqs.discard(order.popleft()[1])


def _ranges(seqs: set[int]) -> list[list[int]]:
    """``{1, 2, 3, 7}`` -> ``[[1, 3], [7, 7]]``."""
    out: list[list[int]] = []
    for s in sorted(seqs):
        if out and out[-1][1] == s - 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


# -- the source ----------------------------------------------------------------------


class NatsSource(Source):
    r"""Records from a JetStream stream, through a durable pull consumer
    (``sw.sources.NatsJetStream``).

    Each pull fetches at most the runtime's credit; messages are acknowledged in
    :meth:`commit` only (see the module docs for the guarantees).  Values are the
    payloads decoded as JSON; a payload that does not decode is bad input naming the
    stream, consumer and sequence (a dead-lettered one is acknowledged at the next
    commit, one that stops the flow is not: it is redelivered).

    Args:
        servers: ``"nats://host:4222"``, a comma-separated list, or a list of URLs.
        stream: the JetStream stream to read.
        subject: the consumer's filter subject (wildcards allowed); None: the whole stream.
        durable: the durable consumer's name: created when missing (``AckExplicit``,
            delivering from the start of the stream); the server remembers what it acked
            across runs.
        create_stream: create ``stream`` when it does not exist, capturing
            ``<stream>.>`` (and ``subject`` if it lies outside that); otherwise a missing
            stream is an error at ``open``.
        batch: the most messages one fetch asks for (the credit may ask for fewer).
        fetch_timeout: seconds a fetch waits for the first message before it returns
            empty (so the source comes back regularly; without checkpoints, acks of an
            idle flow wait up to this long).
        ack_wait: seconds the server waits for an ack before it redelivers (a new
            consumer's setting; an existing consumer keeps its own).  It must exceed the
            time from fetch to commit (the checkpoint interval, with checkpoints), else
            messages come back while in flight (the source drops such copies, and warns).
            After a crash, unacknowledged messages return only after ``ack_wait``; a clean
            close returns them at once (negative acknowledgment).
        max_ack_pending: the most messages the server lets be unacknowledged at once.
            Everything in the flow between source and commit counts, so it must exceed
            the flow's channel capacities plus ``batch`` (and, with checkpoints, what
            flows in one checkpoint interval), or the source starves (a new consumer's
            setting, like ``ack_wait``).
        stop_after_idle: end the input (return None) when no message came for this many
            seconds; None (default): run until stopped.
        decode: ``bytes -> value``; default JSON.  ``decode=bytes`` gives raw payloads.
        include_metadata: hand out :class:`NatsMessage` records instead of payloads.
        ordered_restart: when the consumer has messages an earlier run fetched and did
            not acknowledge (a crash), hold newer messages back until all of those have
            been redelivered (each comes back when its own ``ack_wait`` is over), so the
            stream order holds.  Turn it off when several flows share the durable (their
            in-flight messages look the same) or when order across a crash does not
            matter.
        reconnect_timeout: seconds of outage before giving up (None: never).
        open_timeout: at ``open`` (the flow's start), give up after this many seconds
            (default 10; None: as long as ``reconnect_timeout``): servers that are not
            there at the start are more likely a wrong URL than an outage.
        connect_timeout: seconds one connection attempt may take.
        tls: ``sw.Tls(ca=..., cert=..., key=..., server_name=...)`` (or True: the
            system's CAs): the connection must run TLS; a server without it, an untrusted
            certificate or a refused login fail at once (:class:`NatsRefusedError`).
        user, password: a login (the password a ``str`` or ``sw.Secret``).
        token: a token login (``str`` or ``sw.Secret``).
        nkeys_seed, creds: an NKEY seed file or a ``.creds`` file (needs the ``nkeys``
            package).  Credentials in the URL (``nats://user:pass@host``) work too.

    Raises:
        ValueError: a bad argument.

    >>> NatsSource("nats://127.0.0.1:4222", "orders", durable="billing").describe()
    'NatsJetStream(orders/billing)'
    """

    def __init__(  # noqa: PLR0915 - one check and one field per option
        self,
        servers: str | Sequence[str],
        stream: str,
        subject: str | None = None,
        *,
        durable: str,
        create_stream: bool = False,
        batch: int = 1024,
        fetch_timeout: float = 1.0,
        ack_wait: float = 30.0,
        max_ack_pending: int = 100_000,
        stop_after_idle: float | None = None,
        decode: Callable[[bytes], Any] | None = None,
        include_metadata: bool = False,
        ordered_restart: bool = True,
        reconnect_timeout: float | None = 60.0,
        open_timeout: float | None = OPEN_TIMEOUT,
        connect_timeout: float = 2.0,
        tls: TlsLike = None,
        user: str | None = None,
        password: SecretLike | None = None,
        token: SecretLike | None = None,
        nkeys_seed: str | os.PathLike[str] | None = None,
        creds: str | os.PathLike[str] | None = None,
    ) -> None:
        if not (isinstance(stream, str) and stream):
            raise ValueError(f"sources.NatsJetStream stream must be a name, got {stream!r}")
        if not (isinstance(durable, str) and durable):
            raise ValueError(f"sources.NatsJetStream durable must be a name, got {durable!r}")
        if subject is not None and not (isinstance(subject, str) and subject):
            raise ValueError(f"sources.NatsJetStream subject must be a subject, got {subject!r}")
        if decode is not None and not callable(decode):
            raise TypeError(f"sources.NatsJetStream decode must be callable, got {decode!r}")
        self._servers = _servers(servers)
        self._stream = stream
        self._subject = subject
        self._durable = durable
        self._create_stream = bool(create_stream)
        self._batch = _count(batch, "sources.NatsJetStream batch")
        self._fetch_timeout = _seconds(fetch_timeout, "sources.NatsJetStream fetch_timeout")
        self._ack_wait = _seconds(ack_wait, "sources.NatsJetStream ack_wait")
        self._max_ack_pending = _count(max_ack_pending, "sources.NatsJetStream max_ack_pending")
        self._idle = _seconds(stop_after_idle, "stop_after_idle", none_ok=True)
        self._decode = decode
        self._metadata = bool(include_metadata)
        self._ordered_restart = bool(ordered_restart)
        self._link = _Link(
            self._servers,
            self.describe(),
            _seconds(reconnect_timeout, "sources.NatsJetStream reconnect_timeout", none_ok=True),
            _seconds(connect_timeout, "sources.NatsJetStream connect_timeout") or 2.0,
        )
        self._open_timeout = check_open_timeout(open_timeout, "sources.NatsJetStream")
        self._link.security = _Security.of(
            "sources.NatsJetStream",
            tls,
            user=user,
            password=password,
            token=token,
            nkeys_seed=nkeys_seed,
            creds=creds,
        )
        self._ctx: SourceContext | None = None
        self._run = uuid.uuid4().hex
        self._psub: JetStreamContext.PullSubscription | None = None
        self._psub_generation = -1
        self._fetch_task: asyncio.Task[None] | None = None
        self._buffer: deque[Msg] = deque()  # fetched, not handed out
        self._parked: list[Msg] = []  # newer than what an earlier run left unacked
        # What an earlier run left unacknowledged (ordered_restart): the consumer's
        # highest delivered stream seq at open, how many it had pending, the seqs at or
        # below it that came back so far, when the last of them is due, and when to stop
        # holding newer messages back for ones that never come (deleted meanwhile).
        self._owed_upto = 0
        self._owed = 0
        self._returned: set[int] = set()
        self._owed_due = self._owed_deadline = 0.0
        self._unacked: deque[tuple[int, int, str]] = deque()  # (ordinal, stream seq, reply)
        self._held: set[int] = set()  # stream seqs in _buffer or _unacked
        self._acked = _Acked()  # acknowledged: a copy still coming in is not handed out
        self._covered: set[int] = set()  # seqs a restored checkpoint covered, maybe unacked
        self._handed = 0  # ordinal of the next message handed out
        self._committed = 0  # every ordinal below is committed
        self._last_input = 0.0
        self._pending: int | None = None
        self._warned_redelivery = False
        self.redelivered_in_flight = 0
        """Copies of in-flight messages the server redelivered (ack_wait too short)."""
        self.acked = 0
        """Messages acknowledged so far by this source."""
        self._last_batch: list[tuple[int, int, str]] = []  # what next_batch handed out last
        self.rejected = 0
        """Messages handed back with a delayed NAK (``rate_limit(when_limited="reject")``)."""

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self, ctx: SourceContext) -> None:
        """Connect, check the stream (or create it), create the durable consumer if missing;
        after a crash, note what the earlier run left unacknowledged, so newer messages
        wait for its redelivery (see ``ordered_restart``).

        Raises:
            NatsUnavailableError: no server answered within ``reconnect_timeout``.
            ValueError: the stream does not exist (and ``create_stream`` is off), or the
                durable exists with another filter subject.
        """
        self._ctx = ctx
        self._link.clock = ctx.clock
        try:
            with self._link.opening(self._open_timeout):
                while True:
                    nc = await self._link.client()
                    try:
                        await self._setup(nc.jetstream())
                    except _TRANSIENT as exc:
                        await self._link.trouble(exc)
                        continue
                    break
        except BaseException:
            await self._link.close()  # the runtime closes only what opened
            raise
        self._link.ok()
        self._last_input = ctx.clock.monotonic()

    async def _setup(self, js: JetStreamContext) -> None:
        try:
            await js.stream_info(self._stream)
        except nats.js.errors.NotFoundError:
            if not self._create_stream:
                raise ValueError(
                    f"{self.describe()}: no JetStream stream {self._stream!r} on "
                    f"{_shown(self._servers)}; create it (nats stream add), or pass "
                    "create_stream=True"
                ) from None
            subjects = [f"{self._stream}.>"]
            if self._subject is not None and not self._subject.startswith(self._stream + "."):
                subjects.append(self._subject)
            await js.add_stream(StreamConfig(name=self._stream, subjects=subjects))
        try:
            info = await js.consumer_info(self._stream, self._durable)
        except nats.js.errors.NotFoundError:
            config = ConsumerConfig(
                durable_name=self._durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                ack_wait=self._ack_wait,
                max_ack_pending=self._max_ack_pending,
                filter_subject=self._subject,
            )
            info = await js.add_consumer(self._stream, config)
        else:
            have = info.config.filter_subject or None
            if self._subject is not None and have != self._subject:
                raise ValueError(
                    f"{self.describe()}: the durable consumer {self._durable!r} exists with "
                    f"filter subject {have!r}, not {self._subject!r}; use another durable name"
                )
            if info.num_ack_pending:
                self._expect_redelivery(info)
        self._pending = info.num_pending

    def _expect_redelivery(self, info: Any) -> None:
        """Messages delivered to an earlier run are unacknowledged.  Given back at a clean
        close (NAK), they are redelivered at once and first; left by a crash, each only
        when its own ``ack_wait`` is over -- they were delivered at different moments, so
        they come back over a stretch of time, and newer messages would come in between.

        With ``ordered_restart`` the source therefore holds back the redeliveries and
        every newer message (stream seq above the highest the earlier run was delivered)
        until as many redeliveries as the consumer had pending have come back, then
        hands them out in stream order (one redelivered to that run while in flight is
        due after ones behind it); while it holds messages, it fetches again only once
        the last of them is due (see :meth:`_fetch`).  Counting,
        not timing, decides: a restart in the middle of that stretch, or a server that
        redelivers late, cannot put a newer message first."""
        ack_wait = float(info.config.ack_wait or self._ack_wait or 0.0)
        pending = int(info.num_ack_pending)
        if not self._ordered_restart:
            log.info(
                "%s: %d messages delivered before are not acknowledged; the server "
                "redelivers them after ack_wait=%gs (after newer ones)",
                self.describe(),
                pending,
                ack_wait,
            )
            return
        clock = self._link.clock
        last = info.delivered.last_active
        due = ack_wait
        if last is not None:
            due = last.timestamp() + ack_wait - clock.time()
        due = min(max(due, 0.0), ack_wait) + _REDELIVERY_MARGIN
        now = clock.monotonic()
        self._owed_upto = int(info.delivered.stream_seq)
        self._owed = pending
        self._returned.clear()
        self._owed_due = now + due
        self._owed_deadline = now + due + max(ack_wait, 1.0)

    def _owed_left(self) -> int:
        return max(0, self._owed - len(self._returned)) if self._owed else 0

    def _hold_over(self) -> bool:
        """True when newer messages need no longer be held: every redelivery came back,
        or the ones missing did not come within an extra ``ack_wait`` (warned: the order
        is not kept for them)."""
        left = self._owed_left()
        if left and self._link.clock.monotonic() < self._owed_deadline:
            return False
        if left:
            log.warning(
                "%s: %d of the %d messages an earlier run left unacknowledged did not come "
                "back (deleted from the stream, or another flow on this durable); handing "
                "out %d newer messages held back for them",
                self.describe(),
                left,
                self._owed,
                len(self._parked),
            )
        self._owed = 0
        self._returned.clear()
        return True

    def _release_parked(self) -> None:
        """The redeliveries are through: put the held newer messages back in order."""
        merged = [*self._buffer, *self._parked]
        merged.sort(key=lambda m: m.metadata.sequence.stream)
        self._buffer = deque(merged)
        self._parked.clear()

    def restore(self, position: Any) -> None:
        """Restart from a checkpoint: the server redelivers what is unacknowledged; the
        messages the checkpoint covered (sequences in ``position``) are acknowledged when
        they come back, not handed out again."""
        if not (isinstance(position, dict) and isinstance(position.get("unacked", []), list)):
            raise ValueError(
                f"{self.describe()}: a position must be a dict from position(), got "
                f"{short_repr(position)}"
            )
        for lo, hi in position.get("unacked", []):
            self._covered.update(range(int(lo), int(hi) + 1))

    async def close(self) -> None:
        """Acknowledge what was committed but not acknowledged yet, give back (NAK) what
        was fetched but not committed so it is redelivered at once, and disconnect.
        Safe to call twice."""
        task, self._fetch_task = self._fetch_task, None
        if task is not None:
            # A fetch in progress may hold messages the server already sent: let it end
            # (within fetch_timeout) so they are given back below, not lost until ack_wait.
            clock = self._link.clock
            deadline = clock.monotonic() + (self._fetch_timeout or 1.0) + 0.5
            if not await clock.wait_until(task, deadline):
                task.cancel()
            await asyncio.wait([task])
            if not task.cancelled() and task.exception() is not None:
                log.debug(
                    "%s: the last fetch failed: %s", self.describe(), redact(repr(task.exception()))
                )
        nc = self._link.connected()
        replies = [
            (reply, _ACK if ordinal < self._committed else _NAK)
            for ordinal, _, reply in self._unacked
        ]
        replies += [(msg.reply, _NAK) for msg in [*self._buffer, *self._parked]]
        if nc is not None and replies:
            try:
                for reply, what in replies[:-1]:
                    await nc.publish(reply, what)
                # as a request: answered once the server applied all of them, so a run
                # started right after this one finds them redelivered
                await nc.request(replies[-1][0], replies[-1][1], timeout=2)
            except _NATS_ERRORS as exc:
                log.debug("%s: acks at close failed: %s", self.describe(), redact(repr(exc)))
        self._unacked.clear()
        self._buffer.clear()
        self._parked.clear()
        self._held.clear()
        await self._link.close()

    # -- reading -----------------------------------------------------------------------

    async def next_batch(self, max_records: int) -> Batch | None:
        """Up to ``max_records`` messages: the buffered ones, else one fetch.

        Cancellation-safe: a fetch runs in a task of this source and is not cancelled
        with the caller; what it brings is buffered for the next call.  A fetch that
        brings nothing within ``fetch_timeout`` returns an empty batch (so the runtime
        gets to send its barriers).  Returns None only with ``stop_after_idle``.

        Raises:
            NatsUnavailableError: the servers stayed unreachable for ``reconnect_timeout``.
        """
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        if not self._buffer:
            if self._idle_over(ctx):
                return None
            task = self._fetch_task
            if task is None:
                want = min(max_records, self._batch)
                task = asyncio.get_running_loop().create_task(
                    self._fetch(want), name=f"{self.describe()} fetch"
                )
                self._fetch_task = task
            await asyncio.wait([task])  # a cancelled caller leaves the fetch running
            self._fetch_task = None
            task.result()
            if not self._buffer:  # nothing came within fetch_timeout: let barriers pass
                return None if self._idle_over(ctx) else Batch([])
        return await self._hand_out(ctx, max_records)

    def _idle_over(self, ctx: SourceContext) -> bool:
        idle = self._idle
        if idle is None or self._parked:  # held messages are input still to hand out
            return False
        return ctx.clock.monotonic() - self._last_input >= idle

    async def _subscription(self) -> JetStreamContext.PullSubscription:
        link = self._link
        nc = await link.client()
        if self._psub is None or self._psub_generation != link.generation:
            self._psub = await nc.jetstream().pull_subscribe_bind(
                durable=self._durable, stream=self._stream
            )
            self._psub_generation = link.generation
        return self._psub

    async def _fetch(self, n: int) -> None:
        link, clock = self._link, self._link.clock
        if self._parked and self._owed_left() and clock.monotonic() < self._owed_due:
            # Messages are held for redeliveries not due yet: fetching now would only
            # bring (and hold) newer ones.
            log.info(
                "%s: %d messages delivered before a crash have not come back yet; waiting "
                "%.1f s so the server redelivers them before newer ones",
                self.describe(),
                self._owed_left(),
                self._owed_due - clock.monotonic(),
            )
            await clock.sleep(self._owed_due - clock.monotonic())
        timeout = self._fetch_timeout
        assert timeout is not None
        if self._idle is not None:
            left = self._idle - (clock.monotonic() - self._last_input)
            timeout = max(0.05, min(timeout, left))
        started = 0
        if n > 1:
            self._acked.fetches = started = self._acked.fetches + 1
        try:
            sub = await self._subscription()
            msgs = await sub.fetch(n, timeout=timeout)
        except TimeoutError as exc:  # nats.errors.TimeoutError included: no messages
            if started:
                self._acked.fetched(started)
            if link.connected() is None:
                await link.trouble(exc)
                self._last_input = clock.monotonic()
            else:
                link.ok()
                if self._owed and self._hold_over():
                    self._release_parked()
            return
        except _TRANSIENT as exc:
            await link.trouble(exc)
            self._last_input = clock.monotonic()  # an outage is not idleness
            return
        link.ok()
        await self._ingest(msgs)
        if started:
            self._acked.fetched(started)

    async def _ingest(self, msgs: list[Msg]) -> None:
        held, covered, acked = self._held, self._covered, self._acked
        acks: list[tuple[int, str]] = []
        again: list[str] = []  # copies of acknowledged messages: acknowledged once more
        meta = None
        before = len(self._buffer) + len(self._parked)
        for msg in msgs:
            meta = msg.metadata
            seq = meta.sequence.stream
            if seq in acked:  # sent before the server applied our ack: a copy, not input
                self._in_flight_copy(seq)
                again.append(msg.reply)
                continue
            if seq in held:  # redelivered while still in flight: the first copy counts
                self._in_flight_copy(seq)
                continue
            if self._owed:
                # Held until all the earlier run left is back, then handed out in stream
                # order: newer messages, and the redeliveries too (a message redelivered
                # to that run while in flight comes back after ones behind it).
                # (A redelivery shows as delivered > 1 too: after a NAK of the last
                # message delivered, the server may report a lower delivered seq.)
                if seq <= self._owed_upto or meta.num_delivered > 1:
                    self._returned.add(seq)
                if self._owed_left() and seq not in covered:
                    held.add(seq)
                    self._parked.append(msg)
                    continue
            if seq in covered:  # the restored checkpoint covered it: ack, do not replay
                acks.append((seq, msg.reply))
                continue
            held.add(seq)
            self._buffer.append(msg)
        if self._owed and self._hold_over():
            self._release_parked()
        if meta is not None:
            self._pending = meta.num_pending
        if len(self._buffer) + len(self._parked) > before:  # dropped copies are not input
            self._last_input = self._link.clock.monotonic()
        if acks or again:
            nc = self._link.connected()
            if nc is not None:
                try:
                    for reply in [*again, *(reply for _, reply in acks)]:
                        await nc.publish(reply, _ACK)
                    await nc.flush()
                except _NATS_ERRORS as exc:
                    log.debug(
                        "%s: acks of covered messages failed: %s",
                        self.describe(),
                        redact(repr(exc)),
                    )
                else:
                    for seq, _ in acks:
                        covered.discard(seq)
                        acked.add(seq)
                    self.acked += len(acks)

    def _in_flight_copy(self, seq: int) -> None:
        """The server redelivered message ``seq`` while it was in flight here (or while
        its ack was on the way): the copy is dropped; the first time, a warning."""
        self.redelivered_in_flight += 1
        if not self._warned_redelivery:
            self._warned_redelivery = True
            log.warning(
                "%s: the server redelivered message %d while it was still in "
                "flight: ack_wait is shorter than fetch-to-commit; raise ack_wait",
                self.describe(),
                seq,
            )

    async def _hand_out(self, ctx: SourceContext, max_records: int) -> Batch:
        buffer, unacked = self._buffer, self._unacked
        decode, wrap = self._decode, self._metadata
        records: list[Any] = []
        self._last_batch = handed = []
        while buffer and len(records) < max_records:
            msg = buffer[0]
            try:
                value = json.loads(msg.data) if decode is None else decode(msg.data)
            except Exception as exc:  # noqa: BLE001 - any decoding failure is bad input
                if records:  # hand out the good ones first; report this one next time
                    break
                seq = msg.metadata.sequence.stream
                await ctx.bad_input(
                    BadInputError(
                        where=f"NATS stream {self._stream} seq {seq} (consumer {self._durable})",
                        raw=msg.data,
                        reason=f"cannot decode: {type(exc).__name__}: {exc}",
                    )
                )
                # dead-lettered: acknowledged with the next commit
                buffer.popleft()
                unacked.append((self._handed, seq, msg.reply))
                self._handed += 1
                continue
            buffer.popleft()
            meta = msg.metadata
            if wrap:
                value = NatsMessage(
                    value,
                    msg.subject,
                    meta.sequence.stream,
                    meta.num_delivered,
                    dict(msg.headers) if msg.headers else None,
                )
            records.append(value)
            unacked.append((self._handed, meta.sequence.stream, msg.reply))
            handed.append(unacked[-1])
            self._handed += 1
        return Batch(records)

    async def redeliver_later(self, indices: Sequence[int], delay: float) -> None:
        """NAK the messages at ``indices`` of the last batch with ``delay``: the server
        delivers them again once it has passed.  They leave the acknowledgement queue at
        once, so no commit acknowledges them; a NAK that cannot be sent (connection down)
        changes nothing, as the server redelivers after ``ack_wait`` what was never
        acknowledged."""
        entries = [self._last_batch[i] for i in indices]
        gone = {id(e) for e in entries}
        self._unacked = deque(e for e in self._unacked if id(e) not in gone)
        self._held.difference_update(seq for _, seq, _ in entries)
        self.rejected += len(entries)
        nak = b'-NAK {"delay": %d}' % round(delay * 1e9)
        nc = self._link.connected()
        if nc is None:
            return
        try:
            for _, _, reply in entries:
                await nc.publish(reply, nak)
            await nc.flush()
        except _NATS_ERRORS as exc:
            log.debug("%s: NAKs failed, redelivered after ack_wait: %r", self.describe(), exc)

    # -- positions and acks ------------------------------------------------------------

    def position(self) -> dict[str, Any]:
        """``{"run", "handed_out", "unacked"}``: this run's count of messages handed out,
        and (with checkpoints) the stream sequences handed out but not yet acknowledged,
        as ``[first, last]`` ranges."""
        ctx = self._ctx
        pos: dict[str, Any] = {"run": self._run, "handed_out": self._handed}
        if ctx is not None and ctx.checkpointing:
            pos["unacked"] = _ranges({s for _, s, _ in self._unacked} | self._covered)
        return pos

    async def commit(self, position: Any) -> None:
        """Acknowledge every message handed out before ``position``.

        The acks are published and the last is sent as a request (``ack_sync``): its
        answer means the server applied all of them.  When the connection is down, the
        acks wait for the next commit (the position keeps them covered meanwhile)."""
        if not (isinstance(position, dict) and position.get("run") == self._run):
            return  # from another run: nothing of it is in flight here
        upto = int(position["handed_out"])
        self._committed = max(self._committed, upto)
        unacked = self._unacked
        count = 0
        for ordinal, _, _ in unacked:
            if ordinal >= upto:
                break
            count += 1
        if not count:
            return
        nc = self._link.connected()
        if nc is None:
            return
        try:
            for i in range(count - 1):
                await nc.publish(unacked[i][2], _ACK)
            await nc.request(unacked[count - 1][2], _ACK, timeout=self._ack_timeout())
        except _NATS_ERRORS as exc:
            log.debug(
                "%s: acks failed, retried at the next commit: %s",
                self.describe(),
                redact(repr(exc)),
            )
            return
        held, acked = self._held, self._acked
        for _ in range(count):
            seq = unacked.popleft()[1]
            held.discard(seq)
            acked.add(seq)
        self.acked += count

    def _ack_timeout(self) -> float:
        return max(2.0, self._fetch_timeout or 1.0)

    def backlog(self) -> int | None:
        """Messages the consumer has not delivered yet (as of the last fetch), plus the
        ones fetched and not handed out."""
        if self._pending is None:
            return None
        return self._pending + len(self._buffer)

    def describe(self) -> str:
        """``NatsJetStream(<stream>/<durable>)``."""
        return f"NatsJetStream({self._stream}/{self._durable})"


# -- the sink ------------------------------------------------------------------------


def _to_json(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and not isinstance(value, type):
        return to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable: {short_repr(value)}")


def _encode_default(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return json.dumps(value, default=_to_json, ensure_ascii=False, separators=(",", ":")).encode()


class NatsSink(Sink):
    r"""Publishes every record to JetStream and awaits its PubAck (``sw.sinks.NatsJetStream``).

    When :meth:`write` returns, the stream has stored every record of the batch.  Up to
    ``max_inflight`` publishes are in flight at once (in batch order on one connection,
    so the stream stores them in order).  Values are encoded as JSON (``bytes`` are sent
    as they are).

    Delivery: at-least-once.  A publish whose PubAck is lost (a timeout, a connection
    lost) is sent again after reconnecting, and a restart from a checkpoint writes again
    what came after it.  With ``msg_id=`` the server drops such repeats inside the
    stream's duplicate window (``duplicate_window``, 2 minutes by default): writes
    become idempotent, and output effectively exactly-once for replays within it.

    Args:
        servers: ``"nats://host:4222"``, a comma-separated list, or a list of URLs.
        subject: the subject to publish on, or ``value -> subject``.  A stream must
            capture it (checked at ``open`` for a fixed subject).
        encode: ``value -> bytes``; default JSON (``bytes`` unchanged).
        msg_id: ``value -> str``: the ``Nats-Msg-Id`` header, a stable id of the
            record (e.g. ``lambda r: r["id"]``).
        headers: ``value -> dict`` of extra headers, or None.
        max_inflight: publishes awaiting their PubAck at once.
        ack_timeout: seconds to wait for one PubAck before treating it as lost.
        reconnect_timeout: seconds of outage before giving up (None: never).
        open_timeout: at ``open`` (the flow's start), give up after this many seconds
            (default 10; None: as long as ``reconnect_timeout``): servers that are not
            there at the start are more likely a wrong URL than an outage.
        connect_timeout: seconds one connection attempt may take.
        tls: ``sw.Tls(ca=..., cert=..., key=..., server_name=...)`` (or True: the
            system's CAs): the connection must run TLS; a server without it, an untrusted
            certificate or a refused login fail at once (:class:`NatsRefusedError`).
        user, password: a login (the password a ``str`` or ``sw.Secret``).
        token: a token login (``str`` or ``sw.Secret``).
        nkeys_seed, creds: an NKEY seed file or a ``.creds`` file (needs the ``nkeys``
            package).  Credentials in the URL (``nats://user:pass@host``) work too.

    Raises:
        ValueError: a bad argument.

    A record that cannot be encoded, or that the server refuses (e.g. too large), raises
    :class:`~sluiceway.core.contract.PartialWriteError` pinned to it after the records
    before it are stored.  Records after a refused one that were already in flight are
    published again when the error policy goes on (dropped by the server with ``msg_id``).

    >>> NatsSink("nats://127.0.0.1:4222", "orders.out").describe()
    'NatsJetStream(orders.out)'
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        subject: str | Callable[[Any], str],
        *,
        encode: Callable[[Any], bytes] | None = None,
        msg_id: Callable[[Any], str] | None = None,
        headers: Callable[[Any], dict[str, str]] | None = None,
        max_inflight: int = 256,
        ack_timeout: float = 5.0,
        reconnect_timeout: float | None = 60.0,
        open_timeout: float | None = OPEN_TIMEOUT,
        connect_timeout: float = 2.0,
        tls: TlsLike = None,
        user: str | None = None,
        password: SecretLike | None = None,
        token: SecretLike | None = None,
        nkeys_seed: str | os.PathLike[str] | None = None,
        creds: str | os.PathLike[str] | None = None,
    ) -> None:
        if not (callable(subject) or (isinstance(subject, str) and subject)):
            raise ValueError(f"sinks.NatsJetStream subject must be a subject, got {subject!r}")
        for name, fn in (("encode", encode), ("msg_id", msg_id), ("headers", headers)):
            if fn is not None and not callable(fn):
                raise TypeError(f"sinks.NatsJetStream {name} must be callable, got {fn!r}")
        self._servers = _servers(servers)
        self._subject = subject
        self._encode = encode or _encode_default
        self._msg_id = msg_id
        self._headers = headers
        self._max_inflight = _count(max_inflight, "sinks.NatsJetStream max_inflight")
        self._ack_timeout = _seconds(ack_timeout, "sinks.NatsJetStream ack_timeout")
        self._link = _Link(
            self._servers,
            self.describe(),
            _seconds(reconnect_timeout, "sinks.NatsJetStream reconnect_timeout", none_ok=True),
            _seconds(connect_timeout, "sinks.NatsJetStream connect_timeout") or 2.0,
        )
        self._open_timeout = check_open_timeout(open_timeout, "sinks.NatsJetStream")
        self._link.security = _Security.of(
            "sinks.NatsJetStream",
            tls,
            user=user,
            password=password,
            token=token,
            nkeys_seed=nkeys_seed,
            creds=creds,
        )
        self._js: JetStreamContext | None = None
        self._js_generation = -1
        self.published = 0
        """Records stored (PubAck received) so far, duplicates dropped by the server included."""
        self.duplicates = 0
        """PubAcks that said the server dropped the record as a duplicate (``msg_id``)."""

    async def open(self, ctx: SinkContext) -> None:
        """Connect; with a fixed subject, check that a stream captures it.

        Raises:
            NatsUnavailableError: no server answered within ``reconnect_timeout``.
            ValueError: no stream captures the subject.
        """
        self._link.clock = ctx.clock
        try:
            with self._link.opening(self._open_timeout):
                await self._check_stream()
        except BaseException:
            await self._link.close()  # the runtime closes only what opened
            raise
        self._link.ok()

    async def _check_stream(self) -> None:
        subject = self._subject
        while True:
            nc = await self._link.client()
            if not isinstance(subject, str):
                return
            try:
                await nc.jetstream().find_stream_name_by_subject(subject)
            except nats.js.errors.NotFoundError:
                raise ValueError(
                    f"{self.describe()}: no JetStream stream captures subject {subject!r} on "
                    f"{_shown(self._servers)}; add one (nats stream add --subjects ...)"
                ) from None
            except _TRANSIENT as exc:
                await self._link.trouble(exc)
                continue
            return

    async def write(self, batch: Batch) -> None:
        """Publish every record and wait for every PubAck.

        Raises:
            PartialWriteError: record ``written`` could not be encoded or was refused;
                the ones before it are stored.
            NatsUnavailableError: the servers stayed unreachable for ``reconnect_timeout``.
        """
        items: list[tuple[str, bytes, dict[str, str] | None]] = []
        subject, encode, msg_id, headers = self._subject, self._encode, self._msg_id, self._headers
        for i, value in enumerate(batch.values):
            try:
                subj = subject if isinstance(subject, str) else subject(value)
                hdrs: dict[str, str] | None = None
                if headers is not None:
                    hdrs = dict(headers(value))
                if msg_id is not None:
                    hdrs = hdrs or {}
                    hdrs[Header.MSG_ID] = str(msg_id(value))
                items.append((subj, encode(value), hdrs))
            except Exception as exc:  # pinned to this record, see PartialWriteError
                await self._publish(items)
                raise PartialWriteError(i, exc) from exc
        await self._publish(items)

    async def _jetstream(self) -> JetStreamContext:
        link = self._link
        nc = await link.client()
        if self._js is None or self._js_generation != link.generation:
            self._js = nc.jetstream(timeout=self._ack_timeout or 5.0)
            self._js_generation = link.generation
        return self._js

    async def _publish(self, items: list[tuple[str, bytes, dict[str, str] | None]]) -> None:
        """Publish ``items``, retrying lost ones after reconnecting; raise at the first
        refused one once everything before it is stored."""
        todo = list(range(len(items)))
        refused: tuple[int, BaseException] | None = None
        link, window = self._link, self._max_inflight
        while todo:
            js = await self._jetstream()
            failed: list[tuple[int, BaseException]] = []
            for start in range(0, len(todo), window):
                part = todo[start : start + window]
                results = await self._send(js, [items[i] for i in part])
                for i, res in zip(part, results, strict=True):
                    if isinstance(res, BaseException):
                        failed.append((i, res))
                    else:
                        self.published += 1
                        self.duplicates += bool(res.duplicate)
            for i, exc in failed:
                if not isinstance(exc, _TRANSIENT) and (refused is None or i < refused[0]):
                    refused = (i, exc)
                    break
            todo = [i for i, _ in failed if refused is None or i < refused[0]]
            if todo:
                await link.trouble(failed[0][1])
            elif not failed or refused is not None:
                link.ok()
        if refused is not None:
            i, exc = refused
            raise PartialWriteError(i, exc)

    async def _send(
        self, js: JetStreamContext, items: list[tuple[str, bytes, dict[str, str] | None]]
    ) -> list[PubAck | BaseException]:
        """Publish ``items`` back to back (in order on the connection), then wait for
        their PubAcks, at most ``ack_timeout``: a PubAck or the error, per item."""
        futures: list[asyncio.Future[PubAck]] = []
        error: BaseException | None = None
        for subject, payload, headers in items:
            try:
                futures.append(await js.publish_async(subject, payload, headers=headers))
            except _NATS_ERRORS as exc:  # the connection broke: the rest are not sent
                error = exc
                break
        if futures:
            clock = self._link.clock
            everything = asyncio.gather(*futures, return_exceptions=True)
            acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            everything.add_done_callback(lambda _: _resolve(acked))
            deadline = clock.monotonic() + (self._ack_timeout or 5.0)
            if not await clock.wait_until(acked, deadline):
                for f in futures:
                    f.cancel()  # a PubAck that never came: lost, sent again
            await asyncio.wait([everything])
        results: list[PubAck | BaseException] = []
        for f in futures:
            if f.cancelled():
                results.append(nats.errors.TimeoutError())
            else:
                err = f.exception()
                results.append(f.result() if err is None else err)
        lost = error or nats.errors.ConnectionClosedError()
        results += [lost] * (len(items) - len(futures))
        return results

    async def close(self) -> None:
        """Disconnect (every write has its PubAcks already).  Safe to call twice."""
        await self._link.close()

    def describe(self) -> str:
        """``NatsJetStream(<subject>)``."""
        subject = self._subject
        name = subject if isinstance(subject, str) else getattr(subject, "__name__", "subject")
        return f"NatsJetStream({name})"
