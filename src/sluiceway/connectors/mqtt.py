"""MQTT source and sink (``sw.sources.Mqtt``, ``sw.sinks.Mqtt``), QoS 1, on aiomqtt/paho.

Both speak MQTT 5 to the broker (Mosquitto on this machine) through ``aiomqtt``.

**Source: acknowledge on commit, credit by not reading.**  MQTT pushes; a client cannot
ask for N messages.  The source turns on paho's manual acknowledgements (aiomqtt 2.5 has
no switch for it, so it calls ``manual_ack_set`` on the paho client underneath) and sends
each PUBACK only in :meth:`MqttSource.commit`, i.e. after the sinks wrote the record (no
checkpoints) or after a checkpoint holding it was stored.  MQTT 5's Receive Maximum would
bound the unacknowledged messages in flight, but Mosquitto 2.0.11 sends a whole window
more after every PUBACK (measured), so the source bounds itself: with ``max_buffered``
messages waiting in its buffer it stops reading the socket, and TCP flow control holds the
broker back.  So "credit" for MQTT means::

    broker session queue --TCP--> source buffer (<= max_buffered) --(max_records)--> flow
    (Mosquitto max_queued_messages per client,      reading pauses when full
     default 1000: beyond it QoS 1 messages are DROPPED by the broker)

A saturated flow stops pulling, the buffer fills, reading stops, and the backlog stays in
the broker -- up to Mosquitto's ``max_queued_messages`` per client (default 1000, ``0`` =
no limit), past which Mosquitto drops new QoS 1 messages for that session.  That is the
broker's rule, not ours; size it for your backlog.

**Redelivery.**  With ``clean_session=False`` (the default) the session survives a
disconnect or a crash (``session_expiry`` seconds); on reconnect the broker resends every
unacknowledged message with the DUP flag and its original packet id.  The source
recognises a resend of a message it still holds or recently acknowledged (same packet
id, same topic and payload checksum) and does not hand it out twice; a checkpoint
position also lists the packet ids handed out but not yet acknowledged, so a flow
restarted from a checkpoint acknowledges their resends instead of replaying them.
Everything else unacknowledged is delivered again: at-least-once, exactly-once into an
exactly-once sink with checkpoints.

**Sink**: QoS 1 publishes with at most ``max_unacked`` awaiting their PUBACK; a batch
returns once every record is acknowledged by the broker.  A lost connection is re-made
with backoff and the unacknowledged records of the batch are published again, so the sink
is at-least-once (MQTT 5 has no idempotent publish).

Errors::

    ConnectionError
    └── MqttUnavailableError   no connection for reconnect_timeout seconds (names host:port)
    MqttRefusedError           refused login or TLS (at once); or a publish the broker
                               refused (a PUBACK reason code >= 0x80, e.g. Not authorized
                               by its ACL), raised pinned to the record
                               (``PartialWriteError``), so the sink's error policy handles it
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

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
from sluiceway.time import Clock

__all__ = ["MqttMessage", "MqttRefusedError", "MqttSink", "MqttSource", "MqttUnavailableError"]

log = logging.getLogger("sluiceway.connectors.mqtt")

_FETCH_TIMEOUT = 0.1  # seconds a pull waits for the first message before returning empty
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 2.0
_MAX_RECEIVE = 65535  # the largest Receive Maximum MQTT 5 allows
_NEVER_EXPIRES = 0xFFFFFFFF
_DONE_KEEP = 16384  # acknowledged messages remembered, to recognise their resends


class MqttUnavailableError(ConnectionError):
    """No connection to the MQTT broker could be made for ``reconnect_timeout`` seconds."""


class MqttRefusedError(SluicewayError):
    """The broker refused the login, or TLS failed (an untrusted certificate, a broker
    without TLS when ``tls=`` asks for it), or the broker acknowledged a publish with a
    failure reason code (MQTT 5 PUBACK >= 0x80: Not authorized, Quota exceeded, Topic
    name invalid, ...) and did not take the message: trying again cannot help."""


class _TlsContext(ssl.SSLContext):
    """Remembers the socket it wrapped last: paho-mqtt drops it unclosed when the TLS
    handshake fails, and the connector closes it."""

    last: ssl.SSLSocket | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self.last = sock = super().wrap_socket(*args, **kwargs)
        return sock


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
        if password is not None and username is None:
            raise ValueError(f"{what}: password= needs username=")
        found = tls_option(tls, what)
        if found is not None:
            found.no_server_name(what)
        return cls(found, username, secret(password, f"{what} password"))

    def options(self, what: str) -> dict[str, Any]:
        """``aiomqtt.Client`` keywords; the password is read now (at each connection)."""
        out: dict[str, Any] = {}
        if self.tls is not None:
            out["tls_context"] = self.tls.context(what, _TlsContext)
            out["tls_insecure"] = not self.tls.verify
        if self.username is not None:
            out["username"] = self.username
        if self.password is not None:
            out["password"] = self.password.reveal(f"{what} password")
        return out


@dataclass(frozen=True, slots=True)
class MqttMessage:
    """A record of :class:`MqttSource` with ``include_metadata=True``.

    Attributes:
        payload: the decoded payload (``decode(bytes)``).
        topic: the topic it was published to.
        qos: the QoS it was delivered with.
        retain: True for a retained message (sent on subscribing).
        redelivered: True when the broker sent it again (the DUP flag).
        mid: the packet id (meaningful only within one connection).
    """

    payload: Any
    topic: str
    qos: int
    retain: bool
    redelivered: bool
    mid: int


def _json_encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _checksum(topic: bytes, payload: bytes | bytearray) -> int:
    return zlib.crc32(payload, zlib.crc32(topic))


def _positive(value: float | None, what: str, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if not (
        isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < math.inf
    ):
        none = " (None: no limit)" if allow_none else ""
        raise ValueError(f"{what} must be a finite number of seconds > 0{none}, got {value!r}")
    return float(value)


def _int_in(value: object, lo: int, hi: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{what} must be an int in {lo}..{hi}, got {value!r}")
    return value


def _forget(fut: asyncio.Future[None]) -> None:
    """Mark a finished future's exception as seen (aiomqtt leaves it on a lost link)."""
    if fut.done() and not fut.cancelled():
        fut.exception()


class _Link:
    """One connection: an entered ``aiomqtt.Client`` and whether it is still up."""

    def __init__(self, client: aiomqtt.Client, gen: int) -> None:
        self.client = client
        self.paho: paho.Client = client._client
        self.gen = gen
        self.lost = False
        self.cause: BaseException | None = None
        self.paused = False  # reading the socket is paused (the source's buffer is full)
        self.ready = False  # subscribed: from now on reading may pause

    def watch(self, on_lost: Callable[[], None]) -> None:
        def done(fut: asyncio.Future[None]) -> None:
            self.lost = True
            if not fut.cancelled():
                self.cause = fut.exception()
            on_lost()

        fut = self.client._disconnected
        fut.add_done_callback(done)

    def pause(self) -> None:
        """Stop reading the socket: TCP flow control then holds the broker back."""
        sock = self.paho.socket()
        if not self.paused and sock is not None:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            self.paused = True

    def resume(self) -> None:
        """Read the socket again (after :meth:`pause`)."""
        sock = self.paho.socket()
        if self.paused:
            self.paused = False
            if sock is not None and not self.lost:
                asyncio.get_running_loop().add_reader(sock.fileno(), self._read)

    def _read(self) -> None:
        # what aiomqtt's own reader does: read, and end the link if the socket broke
        try:
            self.paho.loop_read()
        except Exception as exc:  # noqa: BLE001 - any error here means the link is gone
            fut = self.client._disconnected
            if not fut.done():
                fut.set_exception(exc)

    async def close(self) -> None:
        """Disconnect politely when still up (the session is kept); never raises."""
        self.resume()
        client = self.client
        gone = client._disconnected
        if self.lost and not gone.done():
            # we gave up on it (no PUBACK in time): drop the socket without a goodbye
            self.paho._sock_close()
            gone.set_result(None)
        try:
            await client.__aexit__(None, None, None)
        except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
            log.debug("mqtt: disconnect failed: %s", redact(repr(exc)))
            self.paho._sock_close()
        self.lost = True
        _forget(gone)


class _Connector:
    """Connects with backoff on the flow's clock; one WARNING per outage, one INFO after."""

    def __init__(self, host: str, port: int, what: str, reconnect_timeout: float | None) -> None:
        self.host, self.port, self.what = host, port, what
        self.timeout = reconnect_timeout
        self.limit_name = "reconnect_timeout"  # or "open_timeout" while opening
        self.security = _Security()
        self.outage_since: float | None = None
        self.gen = 0

    def lost(self, clock: Clock, cause: BaseException | None) -> None:
        if self.outage_since is None:
            self.outage_since = clock.monotonic()
            log.warning(
                "%s: lost the connection to %s:%d (%s); reconnecting with backoff",
                self.what,
                self.host,
                self.port,
                redact(cause),
            )

    @contextlib.contextmanager
    def opening(self, open_timeout: float | None) -> Iterator[None]:
        """While opening, give up after ``open_limit(open_timeout, reconnect_timeout)``."""
        reconnect = self.timeout
        self.timeout, self.limit_name = open_limit(open_timeout, reconnect)
        try:
            yield
        finally:
            self.timeout, self.limit_name = reconnect, "reconnect_timeout"

    async def replace(
        self, link: _Link | None, clock: Clock, make: Callable[[], aiomqtt.Client]
    ) -> _Link:
        """A new connection in place of ``link`` (None: the first), which was lost."""
        if link is not None:
            self.lost(clock, link.cause)
            await link.close()
        return await self.connect(clock, make)

    def _refused(self, exc: BaseException) -> None:
        """Raise :class:`MqttRefusedError` for a refused login or a failed TLS handshake."""
        if tls_failure(exc):
            why = "the TLS handshake failed"
        elif auth_refused(exc):
            why = "the login was refused (check username= and password=)"
        else:
            return
        raise MqttRefusedError(
            f"{self.what}: the MQTT broker at {self.host}:{self.port} refused the connection: "
            f"{why}: {type(exc).__name__}: {redact(exc)}"
        ) from exc

    async def connect(self, clock: Clock, make: Callable[[], aiomqtt.Client]) -> _Link:
        delay = _BACKOFF_FIRST
        started = clock.monotonic() if self.outage_since is None else self.outage_since
        while True:
            self.gen += 1  # messages may arrive before __aenter__ returns: same generation
            client = make()
            try:
                await client.__aenter__()
            except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
                ctx = client._client._ssl_context
                if isinstance(ctx, _TlsContext) and ctx.last is not None:
                    ctx.last.close()  # paho-mqtt leaves it open when the handshake fails
                _forget(client._disconnected)
                self._refused(exc)
                if self.outage_since is None:
                    self.outage_since = started
                    log.warning(
                        "%s: cannot connect to %s:%d (%s); retrying with backoff",
                        self.what,
                        self.host,
                        self.port,
                        redact(exc),
                    )
                waited = clock.monotonic() - started
                if self.timeout is not None and waited + delay > self.timeout:
                    raise MqttUnavailableError(
                        f"{self.what}: no connection to the MQTT broker at {self.host}:"
                        f"{self.port} for {waited:.1f} s ({self.limit_name}={self.timeout:g}); "
                        f"last error: {redact(exc)}"
                        + (
                            " (connecting with TLS: is the broker speaking TLS on this port? "
                            "One that does not drops the handshake)"
                            if self.security.tls is not None
                            else ""
                        )
                    ) from exc
                await clock.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            except BaseException:
                client._client._sock_close()
                _forget(client._disconnected)
                raise
            if self.outage_since is not None:
                log.info(
                    "%s: connected to %s:%d again after %.1f s",
                    self.what,
                    self.host,
                    self.port,
                    clock.monotonic() - self.outage_since,
                )
                self.outage_since = None
            return _Link(client, self.gen)


# -- source ----------------------------------------------------------------------------


class _Held:
    """A received QoS 1 message the source holds until it is acknowledged."""

    __slots__ = ("crc", "gen", "msg", "seq")

    def __init__(self, msg: paho.MQTTMessage, crc: int, gen: int) -> None:
        self.msg = msg
        self.crc = crc
        self.gen = gen  # the connection it was (last) delivered on: only that one can ack it
        self.seq = 0  # set when handed out


class MqttSource(Source):
    """Messages of MQTT topics, QoS 1, acknowledged on commit (``sw.sources.Mqtt``).

    Args:
        host: the broker's host name or address.
        topics: a topic filter (``"sensors/+/temp"``) or a list of them.
        port: the broker's port.
        client_id: the MQTT client id.  Required with ``clean_session=False``: the
            broker keeps the session (subscriptions and unacknowledged messages) under it.
        qos: the subscription QoS, 1 (at-least-once) or 0 (at-most-once, no acks).
        clean_session: False (default) keeps a persistent session: messages published
            while the flow is down wait in the broker.  True starts empty every time.
        session_expiry: seconds the broker keeps the session after a disconnect (None:
            forever).
        stop_after_idle: end the input (``next_batch`` returns None) after this many
            seconds without a message; None (default) runs until stopped.
        decode: turns a payload (bytes) into the record; default ``json.loads``.  An
            exception makes the message bad input (named ``mqtt://host:port/topic#mid``).
        include_metadata: records are :class:`MqttMessage` (payload, topic, flags).
        reconnect_timeout: give up (:class:`MqttUnavailableError`) after this many
            seconds without a connection; None retries forever.
        open_timeout: at ``open`` (the flow's start), give up after this many seconds
            (default 10; None: as long as ``reconnect_timeout``): a broker that is not
            there at the start is more likely a wrong address than an outage.
        max_buffered: the most received messages held that the flow has not taken;
            when full, the source stops reading its socket (1..65535).
        keepalive: seconds between MQTT pings (how fast a dead broker is noticed).
        tls: ``sw.Tls(ca=..., cert=..., key=...)`` (or True: the system's CAs) to
            connect over TLS (usually port 8883); a failed handshake or a refused login
            fails at once (:class:`MqttRefusedError`).
        username, password: the login (the password a ``str`` or ``sw.Secret``, read at
            every connection).

    Raises:
        ValueError: a bad argument (no topic, a missing ``client_id``, qos not 0/1...).
    """

    def __init__(
        self,
        host: str,
        topics: str | Sequence[str],
        *,
        port: int = 1883,
        client_id: str | None = None,
        qos: int = 1,
        clean_session: bool = False,
        session_expiry: float | None = None,
        stop_after_idle: float | None = None,
        decode: Callable[[bytes], Any] = json.loads,
        include_metadata: bool = False,
        reconnect_timeout: float | None = 60.0,
        open_timeout: float | None = OPEN_TIMEOUT,
        max_buffered: int = 1000,
        keepalive: int = 30,
        tls: TlsLike = None,
        username: str | None = None,
        password: SecretLike | None = None,
    ) -> None:
        what = "sources.Mqtt"
        self._topics = [topics] if isinstance(topics, str) else list(topics)
        if not self._topics or not all(isinstance(t, str) and t for t in self._topics):
            raise ValueError(f"{what} needs one or more non-empty topic filters, got {topics!r}")
        if not clean_session and not client_id:
            raise ValueError(
                f"{what}: a persistent session (clean_session=False) needs a stable "
                "client_id=... (the broker keeps unacknowledged messages under it); "
                "or pass clean_session=True"
            )
        self._host, self._port = host, _int_in(port, 1, 65535, f"{what} port")
        self._client_id = client_id or f"sluiceway-{uuid.uuid4().hex[:12]}"
        self._qos = _int_in(qos, 0, 1, f"{what} qos")
        self._clean = bool(clean_session)
        expiry = _positive(session_expiry, f"{what} session_expiry")
        self._expiry = 0 if self._clean else (_NEVER_EXPIRES if expiry is None else int(expiry))
        self._idle = _positive(stop_after_idle, f"{what} stop_after_idle")
        self._decode = decode
        self._meta = bool(include_metadata)
        self._window = _int_in(max_buffered, 1, _MAX_RECEIVE, f"{what} max_buffered")
        self._keepalive = _int_in(keepalive, 1, 65535, f"{what} keepalive")
        self._conn = _Connector(
            host,
            self._port,
            self.describe(),
            _positive(reconnect_timeout, f"{what} reconnect_timeout"),
        )
        self._open_timeout = check_open_timeout(open_timeout, what)
        self._conn.security = _Security.of(what, tls, username, password)
        self._ctx: SourceContext | None = None
        self._link: _Link | None = None
        self._buffer: deque[_Held] = deque()  # received, not handed out
        self._handed: deque[_Held] = deque()  # handed out, not acknowledged
        self._by_mid: dict[int, _Held] = {}  # every held message, by packet id
        # mid -> crc of messages handled and acknowledged (or covered by the restored
        # checkpoint): a resend of one of them is acknowledged again, not handed out
        self._done: dict[int, int] = {}
        self._seq = 0  # messages handed out so far
        self._wake: asyncio.Future[None] | None = None
        self._last_activity = 0.0
        self._closed = False
        self._refused: str | None = None
        self._held_client: paho.Client | None = None  # a connecting client not read

    # -- connection ----------------------------------------------------------------------

    def _make_client(self) -> aiomqtt.Client:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self._expiry
        props.ReceiveMaximum = _MAX_RECEIVE  # the bound is max_buffered, see _pause
        client = aiomqtt.Client(
            self._host,
            self._port,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=self._clean,
            properties=props,
            keepalive=self._keepalive,
            **self._conn.security.options(self.describe()),
        )
        p = client._client
        p.manual_ack_set(self._qos == 1)
        p.on_message = self._on_message
        p.on_subscribe = self._on_subscribe
        return client

    def _on_subscribe(
        self, _c: paho.Client, _u: Any, _mid: int, codes: list[Any], _props: Any = None
    ) -> None:
        refused = [c for c in codes if getattr(c, "is_failure", False)]
        if refused:
            self._refused = (
                f"{self.describe()}: the broker refused the subscription to "
                f"{self._topics}: {refused}"
            )
            self._wake_up()

    async def _ensure_link(self) -> _Link:
        link = self._link
        if link is not None and not link.lost:
            return link
        ctx = self._ctx
        assert ctx is not None
        self._link = None
        self._held_client = None
        link = await self._conn.replace(link, ctx.clock, self._make_client)
        if self._held_client is link.paho:
            link.paused = True  # the window filled while it connected: not read since
        self._held_client = None
        # Subscribe without waiting for the SUBACK: reading may pause before it comes
        # (a persistent session's messages flow right after the CONNACK).
        opts = SubscribeOptions(qos=self._qos, retainHandling=1)  # retained: first time
        rc, _mid = link.paho.subscribe([(t, opts) for t in self._topics])
        if rc != paho.MQTT_ERR_SUCCESS:
            await link.close()
            link.lost, link.cause = True, aiomqtt.MqttCodeError(rc, "Could not subscribe")
        self._link = link
        link.watch(self._wake_up)
        link.ready = True
        if len(self._buffer) >= self._window:
            link.pause()
        self._last_activity = ctx.clock.monotonic()  # an outage is not idleness
        return link

    def _wake_up(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _on_message(self, client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        """paho's callback (on the event loop's thread): buffer, or recognise a resend."""
        link = self._link
        gen = link.gen if link is not None else self._conn.gen
        crc = _checksum(msg._topic, msg.payload)
        if msg.dup and msg.qos == 1:
            held = self._by_mid.get(msg.mid)
            if held is not None and held.crc == crc:
                held.gen = gen  # a resend of one we hold: ack that one on this connection
                if held.seq < 0:  # committed already: ack it now
                    client.ack(msg.mid, 1)
                    del self._by_mid[msg.mid]
                    self._done[msg.mid] = crc
                return
            if self._done.get(msg.mid) == crc:  # handled; our PUBACK was lost
                client.ack(msg.mid, 1)
                return
        elif self._done:
            self._done.pop(msg.mid, None)  # the broker reused the packet id
        held = _Held(msg, crc, gen)
        if msg.qos == 1:
            self._by_mid[msg.mid] = held
        self._buffer.append(held)
        if len(self._buffer) >= self._window:
            # credit: the rest waits in the broker (and the TCP buffers)
            if link is not None and link.paho is client:
                if link.ready:
                    link.pause()
            else:
                self._hold_connecting(client)
        self._wake_up()

    def _hold_connecting(self, client: paho.Client) -> None:
        """The window filled while a connection is being made: a persistent session's
        backlog flows right after the CONNACK, before ``_ensure_link`` has the link (on
        a loaded machine, for many loop turns).  Stop reading that socket now; the link
        starts paused."""
        sock = client.socket()
        if sock is not None and self._held_client is not client:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            self._held_client = client

    # -- the Source protocol -------------------------------------------------------------

    async def open(self, ctx: SourceContext) -> None:
        """Connect (retrying up to ``reconnect_timeout``) and subscribe.

        Raises:
            MqttUnavailableError: the broker could not be reached in time.
        """
        self._ctx = ctx
        self._closed = False
        self._last_activity = ctx.clock.monotonic()
        with self._conn.opening(self._open_timeout):
            await self._ensure_link()

    async def next_batch(self, max_records: int) -> Batch | None:
        """Up to ``max_records`` messages received so far.

        Waits up to 0.1 s for the first one, then returns an empty batch (so commits
        and barriers keep flowing); None once ``stop_after_idle`` seconds passed without
        a message.  Cancelling it loses nothing: messages stay in the buffer.  A lost
        connection is re-made here, with backoff.

        Raises:
            MqttUnavailableError: no connection for ``reconnect_timeout`` seconds.
        """
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        clock = ctx.clock
        if self._refused is not None:
            raise ValueError(self._refused)
        if not self._buffer:
            await self._ensure_link()
            if not self._buffer:
                loop = asyncio.get_running_loop()
                self._wake = wake = loop.create_future()
                deadline = clock.monotonic() + _FETCH_TIMEOUT
                if self._idle is not None:
                    deadline = min(deadline, self._last_activity + self._idle)
                try:
                    await clock.wait_until(wake, deadline)
                finally:
                    self._wake = None
                    wake.cancel()
            if not self._buffer:
                if self._idle is not None and clock.monotonic() >= self._last_activity + (
                    self._idle
                ):
                    return None
                return Batch([])
        self._last_activity = clock.monotonic()
        batch = await self._hand_out(ctx, max_records)
        link = self._link
        if link is not None and link.paused and len(self._buffer) < self._window:
            link.resume()
        return batch

    async def _hand_out(self, ctx: SourceContext, max_records: int) -> Batch:
        buffer, handed, decode, meta = self._buffer, self._handed, self._decode, self._meta
        records: list[Any] = []
        while buffer and len(records) < max_records:
            held = buffer[0]
            msg = held.msg
            try:
                value = decode(bytes(msg.payload))
            except Exception as exc:  # noqa: BLE001 - any decode failure is bad input
                if records and ctx.fails_on_bad_input:
                    break  # hand out the good ones first; report this one next time
                topic = msg._topic.decode("utf-8", "replace")
                reason = f"cannot decode the payload: {type(exc).__name__}: {exc}"
                if ctx.fails_on_bad_input:
                    reason += (
                        "; the message stays unacknowledged in the broker; set bad messages "
                        "aside with flow.source(..., on_error=sw.DeadLetter(sink))"
                    )
                await ctx.bad_input(
                    BadInputError(
                        where=f"mqtt://{self._host}:{self._port}/{topic}#{msg.mid}",
                        raw=short_repr(msg.payload),
                        reason=reason,
                    )
                )
                # dead-lettered: acknowledged with the next commit
                buffer.popleft()
                self._seq += 1
                held.seq = self._seq
                handed.append(held)
                continue
            buffer.popleft()
            self._seq += 1
            held.seq = self._seq
            if msg.qos == 1:
                handed.append(held)
            if meta:
                value = MqttMessage(
                    payload=value,
                    topic=msg._topic.decode("utf-8", "replace"),
                    qos=msg.qos,
                    retain=bool(msg.retain),
                    redelivered=bool(msg.dup),
                    mid=msg.mid,
                )
            records.append(value)
        return Batch(records)

    def position(self) -> dict[str, Any]:
        """``{"seq": messages handed out, "pending": [[mid, crc], ...]}``.

        ``pending`` lists the messages handed out but not yet acknowledged: after a
        restart from this position their resends are acknowledged, not replayed.
        """
        pending = [[h.msg.mid, h.crc] for h in self._handed]
        pending += [[mid, h.crc] for mid, h in self._by_mid.items() if h.seq < 0]
        return {"seq": self._seq, "pending": pending}

    def restore(self, position: Any) -> None:
        """Restart after a checkpoint: the broker resends what was not acknowledged; the
        resends of messages the checkpoint covers are acknowledged, not handed out."""
        if not (isinstance(position, dict) and isinstance(position.get("seq"), int)):
            raise ValueError(
                f"{self.describe()}: a position must be a dict from position(), like "
                f"{{'seq': 10, 'pending': []}}, got {short_repr(position)}"
            )
        self._seq = position["seq"]
        self._done = {int(mid): int(crc) for mid, crc in position.get("pending", [])}

    async def commit(self, position: Any) -> None:
        """Acknowledge (PUBACK) every message handed out up to ``position``.

        A message whose connection is gone cannot be acknowledged now; it is marked
        done and acknowledged when the broker resends it."""
        if position is None:
            return
        upto = position["seq"] if isinstance(position, dict) else int(position)
        link = self._link
        handed, by_mid, done = self._handed, self._by_mid, self._done
        while handed and handed[0].seq <= upto:
            held = handed.popleft()
            mid = held.msg.mid
            if link is not None and not link.lost and held.gen == link.gen:
                link.paho.ack(mid, 1)
                if by_mid.get(mid) is held:
                    del by_mid[mid]
                done.pop(mid, None)
                done[mid] = held.crc  # (re)inserted: the newest last
            elif by_mid.get(mid) is held:
                held.seq = -1  # done, but its connection is gone: ack its resend
        while len(done) > _DONE_KEEP:
            del done[next(iter(done))]

    def backlog(self) -> int | None:
        """Messages received and not yet handed out (the broker's own queue for this
        session is not visible over MQTT, so this is a lower bound)."""
        return len(self._buffer)

    async def close(self) -> None:
        """Disconnect (the persistent session stays in the broker); safe to call twice.

        What this run held and did not acknowledge is the broker's again (it resends it
        to the next connection), so the run's state is dropped: a later run of this
        object starts from its own restored position, or none.  (The count of messages
        handed out goes on; positions only compare it within a run.)"""
        if self._closed:
            return
        self._closed = True
        link, self._link = self._link, None
        if link is not None:
            await link.close()
        self._buffer.clear()
        self._handed.clear()
        self._by_mid.clear()
        self._done = {}

    def describe(self) -> str:
        """``Mqtt(host:port/topic)``."""
        return f"Mqtt({self._host}:{self._port}/{','.join(self._topics)})"


# -- sink ------------------------------------------------------------------------------


class MqttSink(Sink):
    """Publishes each record as a QoS 1 message (``sw.sinks.Mqtt``); at-least-once.

    ``write`` returns once the broker acknowledged (PUBACK) every record of the batch,
    keeping at most ``max_unacked`` publishes in flight.  When the connection drops, the
    sink reconnects with backoff and publishes the unacknowledged records again (a
    record the broker had received before the drop then arrives twice); so the sink is
    at-least-once, also with checkpoints.

    Args:
        host: the broker's host name or address.
        topic: the topic to publish to, or a function ``record -> topic``.
        port: the broker's port.
        qos: 1 (default: acknowledged) or 0 (fire and forget, at-most-once).
        retain: publish as retained messages.
        encode: turns a record into the payload (bytes or str); default compact JSON.
            A record it cannot encode is pinned to itself (``PartialWriteError``).
        max_unacked: the cap on publishes awaiting their PUBACK (1..65535).
        reconnect_timeout: give up (:class:`MqttUnavailableError`) after this many
            seconds without a connection; None retries forever.
        open_timeout: at ``open`` (the flow's start), give up after this many seconds
            (default 10; None: as long as ``reconnect_timeout``): a broker that is not
            there at the start is more likely a wrong address than an outage.
        ack_timeout: seconds to wait for PUBACKs before the connection counts as dead.
        client_id: the MQTT client id (default: a random one; the sink keeps no session).
        tls, username, password: as for ``sw.sources.Mqtt``.

    Raises:
        ValueError: a bad argument.
    """

    def __init__(
        self,
        host: str,
        topic: str | Callable[[Any], str],
        *,
        port: int = 1883,
        qos: int = 1,
        retain: bool = False,
        encode: Callable[[Any], bytes | str] = _json_encode,
        max_unacked: int = 1000,
        reconnect_timeout: float | None = 60.0,
        open_timeout: float | None = OPEN_TIMEOUT,
        ack_timeout: float = 10.0,
        client_id: str | None = None,
        keepalive: int = 30,
        tls: TlsLike = None,
        username: str | None = None,
        password: SecretLike | None = None,
    ) -> None:
        what = "sinks.Mqtt"
        if not (callable(topic) or (isinstance(topic, str) and topic)):
            raise ValueError(f"{what} topic must be a topic name or a function, got {topic!r}")
        if isinstance(topic, str) and ("+" in topic or "#" in topic):
            raise ValueError(f"{what} cannot publish to a wildcard topic, got {topic!r}")
        self._host, self._port = host, _int_in(port, 1, 65535, f"{what} port")
        self._topic = topic
        self._qos = _int_in(qos, 0, 1, f"{what} qos")
        self._retain = bool(retain)
        self._encode = encode
        self._max_unacked = _int_in(max_unacked, 1, _MAX_RECEIVE, f"{what} max_unacked")
        self._ack_timeout = float(ack_timeout)
        _positive(ack_timeout, f"{what} ack_timeout", allow_none=False)
        self._client_id = client_id or f"sluiceway-sink-{uuid.uuid4().hex[:12]}"
        self._keepalive = _int_in(keepalive, 1, 65535, f"{what} keepalive")
        self._conn = _Connector(
            host,
            self._port,
            self.describe(),
            _positive(reconnect_timeout, f"{what} reconnect_timeout"),
        )
        self._open_timeout = check_open_timeout(open_timeout, what)
        self._conn.security = _Security.of(what, tls, username, password)
        self._ctx: SinkContext | None = None
        self._link: _Link | None = None
        self._inflight: dict[int, int] = {}  # packet id -> index in the batch
        self._done: list[bool] = []  # per record of the batch being written: acknowledged
        self._refused: dict[int, Any] = {}  # index -> the failing PUBACK reason code
        self._wake: asyncio.Future[None] | None = None
        self._closed = False

    def _make_client(self) -> aiomqtt.Client:
        client = aiomqtt.Client(
            self._host,
            self._port,
            identifier=self._client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            keepalive=self._keepalive,
            **self._conn.security.options(self.describe()),
            max_inflight_messages=self._max_unacked,
        )
        p = client._client
        p.on_publish = self._on_publish
        return client

    def _on_publish(self, _c: paho.Client, _u: Any, mid: int, rc: Any, _props: Any = None) -> None:
        i = self._inflight.pop(mid, None)
        if i is not None:
            self._done[i] = True  # answered: not published again
            if getattr(rc, "is_failure", False):  # answered "no": not written either
                self._refused.setdefault(i, rc)
            wake = self._wake
            if wake is not None and not wake.done():
                wake.set_result(None)

    def _wake_up(self) -> None:
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    async def _ensure_link(self) -> _Link:
        link = self._link
        if link is not None and not link.lost:
            return link
        ctx = self._ctx
        assert ctx is not None
        self._link = None
        link = await self._conn.replace(link, ctx.clock, self._make_client)
        link.watch(self._wake_up)
        self._link = link
        return link

    async def open(self, ctx: SinkContext) -> None:
        """Connect (retrying up to ``reconnect_timeout``).

        Raises:
            MqttUnavailableError: the broker could not be reached in time.
        """
        self._ctx = ctx
        self._closed = False
        with self._conn.opening(self._open_timeout):
            await self._ensure_link()

    async def write(self, batch: Batch) -> None:
        """Publish every record and wait for the broker's acknowledgements.

        Raises:
            PartialWriteError: record ``written`` could not be encoded (the ones before
                it are acknowledged), or the broker stayed away for ``reconnect_timeout``
                after ``written`` records were acknowledged.
            MqttUnavailableError: the same, before any record of the batch got in.
        """
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        messages: list[tuple[str, bytes | str]] = []
        error: tuple[int, Exception] | None = None
        topic, encode = self._topic, self._encode
        for i, value in enumerate(batch.values):
            try:
                payload = encode(value)
                name = topic if isinstance(topic, str) else topic(value)
                if not isinstance(payload, bytes | str):
                    raise TypeError(f"encode returned {type(payload).__name__}, not bytes/str")
            except Exception as exc:  # noqa: BLE001 - pinned to this record below
                error = (i, exc)
                break
            messages.append((name, payload))
        await self._publish_all(ctx.clock, messages)
        refused, self._refused = self._refused, {}
        if refused:
            i = min(refused)
            no = MqttRefusedError(
                f"{self.describe()}: the broker refused record {i} of the batch on topic "
                f"{messages[i][0]!r}: {refused[i]} (PUBACK reason code "
                f"{getattr(refused[i], 'value', '?')}); check the broker's ACL and limits"
            )
            raise PartialWriteError(i, no) from no
        if error is not None:
            raise PartialWriteError(error[0], error[1]) from error[1]

    async def _publish_all(  # noqa: PLR0915 - one loop: publish, wait, reconnect
        self, clock: Clock, messages: list[tuple[str, bytes | str]]
    ) -> int:
        """Publish with at most ``max_unacked`` in flight; republish after a reconnect.

        Returns how many were acknowledged (all of them)."""
        done = self._done = [False] * len(messages)
        self._refused = {}
        inflight = self._inflight
        qos, retain, cap = self._qos, self._retain, self._max_unacked
        try:
            while True:
                link = await self._ensure_link()
                client = link.paho
                inflight.clear()
                todo = deque(i for i, ok in enumerate(done) if not ok)
                deadline = clock.monotonic() + self._ack_timeout
                while todo or inflight:
                    while todo and len(inflight) < cap:
                        i = todo.popleft()
                        name, payload = messages[i]
                        info = client.publish(name, payload, qos, retain)
                        if info.rc != paho.MQTT_ERR_SUCCESS:
                            link.lost = True
                            link.cause = aiomqtt.MqttCodeError(info.rc, "Could not publish")
                            break
                        if qos == 0 or info.is_published():
                            done[i] = True
                        else:
                            inflight[info.mid] = i
                    if link.lost or not inflight:
                        if link.lost:
                            break
                        continue
                    before = len(inflight)
                    self._wake = wake = asyncio.get_running_loop().create_future()
                    try:
                        await clock.wait_until(wake, deadline)
                    finally:
                        self._wake = None
                        wake.cancel()
                    if len(inflight) < before:
                        deadline = clock.monotonic() + self._ack_timeout
                    elif link.lost:
                        break
                    elif clock.monotonic() >= deadline:
                        link.lost = True
                        link.cause = TimeoutError(
                            f"no PUBACK within ack_timeout={self._ack_timeout} s"
                        )
                        break
                if all(done):
                    return len(done)
                # the connection is gone: reconnect and publish the unacknowledged again
                try:
                    await self._ensure_link()
                except MqttUnavailableError as exc:
                    written = next((i for i, ok in enumerate(done) if not ok), len(done))
                    if written:
                        raise PartialWriteError(written, exc) from exc
                    raise
        finally:
            inflight.clear()
            self._done = []

    async def close(self) -> None:
        """Disconnect; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        link, self._link = self._link, None
        if link is not None:
            await link.close()

    def describe(self) -> str:
        """``Mqtt(host:port/topic)``."""
        name = self._topic if isinstance(self._topic, str) else "<fn>"
        return f"Mqtt({self._host}:{self._port}/{name})"
