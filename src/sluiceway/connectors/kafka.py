r"""Apache Kafka: a consumer-group source and a producer sink, on confluent-kafka (librdkafka).

``sw.sources.Kafka`` (:class:`KafkaSource`) and ``sw.sinks.Kafka`` (:class:`KafkaSink`)
(``pip install 'sluiceway[kafka]'``).  No protocol code of our own: librdkafka does the
fetching, the group membership (cooperative-sticky rebalancing), reconnection,
idempotence and transactions.

The source reads in a consumer group with auto-commit off.  Offsets are committed in
:meth:`KafkaSource.commit` only -- once every sink wrote the records (ack barriers,
without checkpoints) or once a checkpoint holding them is stored::

    partition 0   0  1  2  3  4  5  6  7 ...
    handed out    0  1  2  3  4  5              position() == {"offsets": {"t:0": 6}, ...}
    commit        committed offset 6 (the next to read)
    crash         a restart (or the next owner of the partition) reads from 6

With checkpoints, :meth:`KafkaSource.restore` seeks every partition the checkpoint knows
to its offset when the partition is assigned; partitions it does not know start at the
group's committed offset (or ``auto_offset_reset``).

Event time: by default every record's event time is its Kafka timestamp (or
``timestamp=fn(value)``), and the source keeps a watermark *per partition* (the largest
timestamp seen there minus ``max_out_of_orderness``); the source's watermark is their
minimum.  A partition that has had no data for ``idle_timeout`` seconds (and has nothing
left to read) stops holding it back until its next record.  Windows can follow the source
directly.

Backpressure: the runtime asks for at most the room of the first channel (the credit);
when that channel is full the source pauses its assigned partitions so librdkafka stops
prefetching, and resumes them when the flow pulls again.  The prefetch buffer is bounded
(``queued.max.messages.kbytes``), so memory stays bounded at any topic size.

Rebalances: the group's assignment may change while the flow runs.  ``on_assign`` /
``on_revoke`` callbacks (and :attr:`KafkaSource.assignment`) tell the flow which
partitions it owns.  Records of a revoked partition that were fetched but not handed out
are dropped (the new owner reads them); the records handed out of it are written and
their offsets committed before the partition goes (the revoke callback waits for the
flow, at most ``revoke_timeout``), so a member joining makes nothing be read twice.  A
partition lost (an expired session) goes at once, nothing committed: its records handed
out since the last commit are read again (at-least-once).

The sink produces every record (key, value, headers, the record timestamp from the
event time) with the idempotent producer and waits for the broker's acknowledgement of
the batch before ``write`` returns; a record the broker refuses makes ``write`` fail
with :class:`KafkaSinkError` (never a silent drop).  ``exactly_once=True`` writes one
Kafka transaction per checkpoint epoch, committed once the checkpoint is stored; a crash
aborts the open transaction.  When the flow reads from Kafka too, the consumed offsets go
into the same transaction (``send_offsets_to_transaction``): consume-transform-produce is
exactly-once for ``read_committed`` readers.  See ``docs/connectors/kafka.md``.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, TypeVar

import confluent_kafka as ck

from sluiceway.connectors.files import _to_json
from sluiceway.connectors.security import Sasl, Tls, TlsLike, tls_option
from sluiceway.core.contract import PartialWriteError, Sink, SinkContext, Source, SourceContext
from sluiceway.core.messages import Batch
from sluiceway.errors import BadInputError, SluicewayError, redact, short_repr
from sluiceway.time.durations import non_negative_seconds, positive_seconds
from sluiceway.time.ticks import to_ticks

__all__ = [
    "KafkaError",
    "KafkaRecord",
    "KafkaSink",
    "KafkaSinkError",
    "KafkaSource",
]

log = logging.getLogger("sluiceway")
_client_log = logging.getLogger("sluiceway.kafka")  # librdkafka's own log lines

_INF = math.inf
_T = TypeVar("_T")
_BACKLOG_EVERY = 1.0  # seconds between two refreshes of the per-partition lag

Deserializer = Literal["bytes", "utf-8", "json"] | Callable[[bytes], Any]
"""How payload bytes become a value: as they are, UTF-8 text, JSON, or your function."""
Serializer = Literal["bytes", "utf-8", "json"] | Callable[[Any], bytes | str]
"""How a value becomes payload bytes: ``bytes`` as they are (``str`` as UTF-8), UTF-8
text (``str(value)``), JSON, or your function."""
ConfigValue = str | int | float | bool

CONTROL: Any = object()
"""What a source's ``_decode`` returns for a control message of an internal topic (a
watermark marker): its offset is consumed, no record is handed out."""


class KafkaError(SluicewayError):
    """Kafka refused something the connector needs (a subscription, a transaction)."""


class KafkaSinkError(KafkaError):
    """The broker did not take records the sink produced (delivery failed)."""


@dataclass(frozen=True, slots=True)
class KafkaRecord:
    """A record with its Kafka metadata (``include_metadata=True``; also the raw input of
    a dead letter, then with the undecoded payload as ``value``).

    Attributes:
        value: the decoded payload (None for a tombstone).
        key: the decoded key (None when the record has none).
        topic, partition, offset: where it is in Kafka.
        timestamp: the record's Kafka timestamp in epoch seconds (None if it has none).
        headers: the record's headers, in order, as ``(name, bytes)`` pairs.
    """

    value: Any
    key: Any
    topic: str
    partition: int
    offset: int
    timestamp: float | None
    headers: tuple[tuple[str, bytes | None], ...] = ()


# -- serialisation ---------------------------------------------------------------------


def _json_loads(raw: bytes) -> Any:
    return json.loads(raw)


def _utf8(raw: bytes) -> str:
    return raw.decode("utf-8")


def _deserializer(spec: object, what: str) -> Callable[[bytes], Any] | None:
    """The decoding function (None: keep the bytes)."""
    if spec == "bytes":
        return None
    if spec == "utf-8":
        return _utf8
    if spec == "json":
        return _json_loads
    if callable(spec):
        return spec
    raise ValueError(f"{what} must be 'bytes', 'utf-8', 'json' or a function, got {spec!r}")


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"serializer 'bytes' needs bytes or str, got {short_repr(value)}")


def _str_bytes(value: Any) -> bytes:
    return str(value).encode("utf-8")


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, default=_to_json, ensure_ascii=False).encode("utf-8")


def _serializer(spec: object, what: str) -> Callable[[Any], bytes | str]:
    if spec == "bytes":
        return _to_bytes
    if spec == "utf-8":
        return _str_bytes
    if spec == "json":
        return _json_bytes
    if callable(spec):
        return spec
    raise ValueError(f"{what} must be 'bytes', 'utf-8', 'json' or a function, got {spec!r}")


def _key_bytes(key: Any) -> bytes | None:
    """The default key serialiser: bytes as they are, str as UTF-8, others as JSON."""
    if key is None or isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    return _json_bytes(key)


def _config(config: Mapping[str, ConfigValue] | None, what: str) -> dict[str, ConfigValue]:
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise TypeError(f"{what} config must be a mapping of librdkafka options, got {config!r}")
    out: dict[str, ConfigValue] = {}
    for k, v in config.items():
        if not isinstance(k, str) or not isinstance(v, str | int | float | bool):
            raise TypeError(
                f"{what} config: option {k!r} must map a name to a str/int/float/bool, got {v!r}"
            )
        out[k] = v
    return out


_SECURITY_KEYS = ("security.", "ssl.", "sasl.", "enable.ssl.")


def _check_security(
    tls: TlsLike, sasl: Sasl | None, config: Mapping[str, ConfigValue], what: str
) -> tuple[Tls | None, Sasl | None]:
    """The checked ``tls=`` and ``sasl=``; they may not be mixed with the same settings
    in ``config=`` (which one would win is not obvious)."""
    found = tls_option(tls, what)
    if found is not None:
        found.no_server_name(what)
    if sasl is not None and not isinstance(sasl, Sasl):
        raise TypeError(f"{what} sasl must be a sw.Sasl(mechanism, username, password)")
    clash = sorted(k for k in config if k.startswith(_SECURITY_KEYS))
    if (found is not None or sasl is not None) and clash:
        raise ValueError(
            f"{what}: tls=/sasl= and the security options {clash} in config= both given; "
            "use one or the other"
        )
    return found, sasl


def _security_config(tls: Tls | None, sasl: Sasl | None, what: str) -> dict[str, ConfigValue]:
    """librdkafka options for ``tls=`` and ``sasl=``; files checked, the password read."""
    conf: dict[str, ConfigValue] = {}
    if tls is not None:
        ca, cert, key = tls.files(what)
        conf["ssl.ca.location"] = ca or "probe"  # probe: the system's trust store
        if cert is not None:
            conf["ssl.certificate.location"] = cert
            conf["ssl.key.location"] = key or cert
        key_password = tls.password(what)
        if key_password is not None:
            conf["ssl.key.password"] = key_password
        conf["enable.ssl.certificate.verification"] = tls.verify
        conf["ssl.endpoint.identification.algorithm"] = "https" if tls.verify else "none"
    if sasl is not None:
        password = sasl.password
        assert not isinstance(password, str)  # Sasl made it a Secret
        conf["sasl.mechanism"] = sasl.mechanism
        conf["sasl.username"] = sasl.username
        conf["sasl.password"] = password.reveal(f"{what} sasl password")
    if conf:
        conf["security.protocol"] = ("SASL_" if sasl else "") + ("SSL" if tls else "PLAINTEXT")
    return conf


def _check_bootstrap(bootstrap_servers: object, what: str) -> None:
    if not (isinstance(bootstrap_servers, str) and bootstrap_servers):
        raise ValueError(
            f"{what} bootstrap_servers must be 'host:port[,...]', got {bootstrap_servers!r}"
        )


def _tp(topic: str, partition: int) -> str:
    """A partition's name in positions and metrics: ``topic:partition`` (``:`` is not
    allowed in topic names)."""
    return f"{topic}:{partition}"


def _untp(name: str) -> tuple[str, int]:
    topic, _, partition = name.rpartition(":")
    return topic, int(partition)


_REFUSED = (
    ck.KafkaError._SSL,
    ck.KafkaError._AUTHENTICATION,
    ck.KafkaError.SASL_AUTHENTICATION_FAILED,
)


# librdkafka's guess when a TLS handshake is dropped at once, as a PLAINTEXT port does
_PLAINTEXT_PEER = "connecting to a PLAINTEXT broker listener?"
_PLAINTEXT_TRIES = 3


# ``PyErr_Occurred()`` called the way ctypes calls the Python API: with the GIL held, and
# raising afterwards the error that is pending in this thread, if there is one.
_pending_error = ctypes.PYFUNCTYPE(ctypes.c_void_p)(("PyErr_Occurred", ctypes.pythonapi))


def _raise_pending() -> None:
    """Raise the error confluent-kafka left pending in this thread, if there is one.

    After a fatal error (a transactional producer fenced by a newer one) confluent-kafka
    sets a ``KafkaException`` and goes on running the client's callbacks in the same
    ``flush``/``poll``: Python code then runs with that error pending.  Where it surfaces
    depends on the interpreter -- as a ``SystemError`` ("returned a result with an
    exception set", the ``KafkaException`` its cause) at a call into C whose result is
    checked, or not at all inside ``logging``, which swallows it -- and the client call
    then fails with "returned NULL without setting an exception", the Kafka error lost.
    A guarded callback calls this first, so it meets the pending error itself and keeps it
    (:meth:`_ErrorLog.guarded`)."""
    _pending_error()


class _ErrorLog:
    """librdkafka's ``error_cb``: one WARNING when the brokers become unreachable, one
    INFO when they answer again; fatal errors are kept for the connector to raise.

    Also the keeper of what the client's Python callbacks could not do.  librdkafka runs
    them (delivery reports, ``error_cb``, its log lines) inside the client's blocking calls
    -- ``flush``, ``poll``, ``consume``, the transactional calls -- where an exception
    escaping a callback comes out of the call as a ``SystemError`` or the callback's own
    error, and a callback that swallowed confluent-kafka's pending fatal error makes the
    call fail with "returned NULL without setting an exception", the Kafka error lost.  So
    every callback is :meth:`guarded` (it never raises; what it met is kept) and every such
    call goes through :meth:`call`, which raises what was kept once the call returned: the
    Kafka error behind it as the cause, the callback and the call named.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.down = False
        self.fatal: ck.KafkaError | None = None
        self.plaintext = 0  # TLS handshakes in a row that a plaintext listener dropped
        self.failures: list[tuple[str, BaseException]] = []  # (callback, what it met)

    def __call__(self, err: ck.KafkaError) -> None:
        try:
            _raise_pending()
            self._report(err)
        except BaseException as exc:  # noqa: BLE001 - never into librdkafka: see call()
            self.failures.append(("error_cb", exc))

    def guarded(self, name: str, fn: Callable[..., object]) -> Callable[..., None]:
        """``fn`` as a callback for librdkafka that never raises: what it meets (also an
        error confluent-kafka left pending) is kept and raised by :meth:`call`."""

        def callback(*args: Any) -> None:
            try:
                _raise_pending()
                fn(*args)
            except BaseException as exc:  # noqa: BLE001 - never into librdkafka: see call()
                self.failures.append((name, exc))

        return callback

    def logger(self) -> _ClientLogger:
        """librdkafka's ``logger``: its log lines to ``sluiceway.kafka``, guarded."""
        return _ClientLogger(self.guarded("logger", _client_log.log))

    def call(self, what: str, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)``, a blocking call of the client during which librdkafka runs its
        callbacks (in a worker thread).

        Raises:
            KafkaError: a callback failed during the call (or the call failed with a
                ``SystemError`` from one): the message names the call, the callback and
                the Kafka error behind it, which is the cause (so a fencing reads as one).
            KafkaException: what the call itself raised.
        """
        try:
            result = fn(*args)
        except SystemError as exc:
            err = self._callback_error(what, exc)
        else:
            if not self.failures:
                return result
            err = self._callback_error(what, None)
        raise err from err.__cause__

    def _callback_error(self, what: str, raised: SystemError | None) -> KafkaError:
        failures, self.failures = self.failures, []
        met = [exc for _, exc in failures] + ([] if raised is None else [raised])
        kafka = next((k for exc in met if (k := _kafka_cause(exc)) is not None), None)
        names = ", ".join(dict.fromkeys(name for name, _ in failures))
        where = f"the client's {names} callback" if names else "a callback of the client"
        first = met[0]
        if kafka is not None:
            then = "" if first is kafka else f", which then failed with {_named(first)}"
            err = KafkaError(
                f"{self.what}: {what} failed: {kafka} (confluent-kafka raised it inside "
                f"{where}{then})"
            )
            err.__cause__ = kafka
        else:
            err = KafkaError(f"{self.what}: {what} failed: {where} raised {_named(first)}")
            err.__cause__ = first
        return err

    def _report(self, err: ck.KafkaError) -> None:
        plaintext = _PLAINTEXT_PEER in err.str()
        self.plaintext = self.plaintext + 1 if plaintext else 0
        if err.fatal() or err.code() in _REFUSED or self.plaintext >= _PLAINTEXT_TRIES:
            # a refused login or TLS handshake: librdkafka would try for ever (a single
            # dropped handshake may be a broker going down: only repeated ones count)
            self.fatal = err
            log.error("%s: fatal Kafka error: %s", self.what, redact(err.str()))
        elif err.code() in (ck.KafkaError._ALL_BROKERS_DOWN, ck.KafkaError._TRANSPORT):
            if not self.down:
                self.down = True
                log.warning(
                    "%s: Kafka unreachable (%s); librdkafka reconnects",
                    self.what,
                    redact(err.str()),
                )
        else:
            log.debug("%s: Kafka: %s", self.what, redact(err.str()))

    def up(self) -> None:
        self.plaintext = 0
        if self.down:
            self.down = False
            log.info("%s: Kafka answers again", self.what)


class _ClientLogger:
    """What librdkafka's ``logger`` option needs: an object with ``log(level, msg, *args)``."""

    def __init__(self, log: Callable[..., None]) -> None:
        self.log = log


def _named(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _kafka_cause(exc: BaseException) -> ck.KafkaException | None:
    """The ``KafkaException`` in ``exc``'s chain of causes, if any."""
    seen: set[int] = set()
    at: BaseException | None = exc
    while at is not None and id(at) not in seen:
        if isinstance(at, ck.KafkaException):
            return at
        seen.add(id(at))
        at = at.__cause__ or at.__context__
    return None


# -- the source ----------------------------------------------------------------------


class _Part:
    """What the source knows of one assigned partition."""

    __slots__ = ("high", "last_data", "max_ts", "next_offset", "start")

    def __init__(self, now: float) -> None:
        self.next_offset: int | None = None  # after the last record handed out
        self.start: int | None = None  # the read position before any was handed out
        self.max_ts: float = -_INF  # the largest event time seen (microseconds)
        self.last_data = now  # clock.monotonic() of the last record (or the assignment)
        self.high: int | None = None  # the partition's end offset, as last seen

    def lag(self) -> int | None:
        """Records after the last one handed out (None: not known yet)."""
        base = self.next_offset if self.next_offset is not None else self.start
        if self.high is None or base is None:
            return None
        return max(0, self.high - base)


@dataclass(slots=True)
class _Revoke:
    """Partitions the group is taking away, held until the records handed out of them
    are written; then the fetching thread commits ``commit`` and lets them go."""

    partitions: set[tuple[str, int]]
    done: threading.Event  # the fetching thread waits on it in the revoke callback
    timer: Any = None  # the revoke_timeout's TimerHandle
    durable: dict[tuple[str, int], int] = field(default_factory=dict)  # written up to
    commit: dict[tuple[str, int], int] = field(default_factory=dict)  # set at release


class KafkaSource(Source):
    r"""Records of Kafka topics, read in a consumer group (``sw.sources.Kafka``).

    Args:
        bootstrap_servers: ``host:port[,host:port...]`` of the brokers.
        topics: a topic name or a list of them; a name starting with ``^`` is a regular
            expression (every matching topic, also ones created later).
        group: the consumer group (``group.id``).  Flows (or processes) in one group
            share the partitions; each partition is read by one of them.
        auto_offset_reset: where a partition without a committed offset starts:
            ``"earliest"`` (default: nothing is skipped) or ``"latest"``.
        value: how payloads become records: ``"json"`` (default), ``"utf-8"``,
            ``"bytes"`` or a function of the bytes.  A payload it fails on is bad input
            (``flow.source(..., on_error=sw.DeadLetter(sink))`` sets it aside).
        key: how keys are decoded (default ``"bytes"``); used with ``include_metadata``.
        include_metadata: records are :class:`KafkaRecord` (value, key, topic, partition,
            offset, timestamp, headers) instead of the bare value.
        timestamp: event time: ``"record"`` (default: the Kafka record timestamp), a
            function of the decoded value returning epoch seconds or an aware datetime,
            or None (no event time; use ``with_timestamps`` if needed).
        max_out_of_orderness: seconds a record may be late within its partition.
        idle_timeout: seconds without data after which a partition (with nothing left to
            read) stops holding the watermark back.  None: never.
        stop_after_idle: end the input after this many seconds without a record (None:
            read forever).
        poll_timeout: the most seconds one fetch waits for records (a barrier or a stop
            also interrupts it).
        revoke_timeout: when the group takes partitions away (another member joined),
            the most seconds the source holds them while the flow writes the records it
            already handed out of them and commits their offsets, so that the next owner
            reads none of them again.  Past it the partitions go anyway (at-least-once).
        on_assign, on_revoke: called with the list of ``(topic, partition)`` the group
            gives to, or takes from, this source, in the flow's event loop.
        config: any librdkafka consumer option (``{"session.timeout.ms": 10000}``,
            security settings, ``group.instance.id`` for static membership); overrides
            the connector's defaults.
        tls: ``sw.Tls(ca=..., cert=..., key=..., key_password=...)`` (or True: the
            system's CAs): ``security.protocol=SSL`` with the certificate and host name
            checked.  A failed handshake stops the flow (``KafkaError``) at the first
            fetch instead of librdkafka retrying for ever.
        sasl: ``sw.Sasl("SCRAM-SHA-256", user, password)`` (``PLAIN``,
            ``SCRAM-SHA-256``, ``SCRAM-SHA-512``): ``SASL_SSL`` with ``tls``, else
            ``SASL_PLAINTEXT``; a refused login stops the flow like a failed handshake.

    A malformed record is bad input named ``kafka <topic>[<partition>]@<offset>``; the
    dead letter's record is a :class:`KafkaRecord` with the raw payload.
    """

    _records_advance_watermark = True
    """Each partition's watermark follows the largest event time of its records.  A
    source whose watermark comes in control messages instead (a repartition topic's,
    :mod:`sluiceway.scaleout.repartition`) sets it False."""

    # A revocation in progress: the partitions being taken away, released (the fetching
    # thread, waiting in librdkafka's callback, goes on) once the records handed out of
    # them are written and committed, or at the revoke_timeout.  Set per run in open().
    _loop: asyncio.AbstractEventLoop | None = None
    _revoking: _Revoke | None = None
    _revoke_wake: asyncio.Future[None] | None = None

    def __init__(  # noqa: PLR0915 - one check and one field per option
        self,
        bootstrap_servers: str,
        topics: str | Sequence[str],
        group: str,
        *,
        auto_offset_reset: Literal["earliest", "latest"] = "earliest",
        value: Deserializer = "json",
        key: Deserializer = "bytes",
        include_metadata: bool = False,
        timestamp: Literal["record"] | Callable[[Any], object] | None = "record",
        max_out_of_orderness: float | timedelta = 0.0,
        idle_timeout: float | timedelta | None = 10.0,
        stop_after_idle: float | timedelta | None = None,
        poll_timeout: float | timedelta = 0.2,
        revoke_timeout: float | timedelta = 10.0,
        on_assign: Callable[[list[tuple[str, int]]], object] | None = None,
        on_revoke: Callable[[list[tuple[str, int]]], object] | None = None,
        config: Mapping[str, ConfigValue] | None = None,
        tls: TlsLike = None,
        sasl: Sasl | None = None,
    ) -> None:
        self._init_args: dict[str, Any] = {
            k: v for k, v in locals().items() if k not in ("self", "__class__")
        }
        what = "sources.Kafka"
        _check_bootstrap(bootstrap_servers, what)
        names = [topics] if isinstance(topics, str) else list(topics)
        if not names or not all(isinstance(t, str) and t for t in names):
            raise ValueError(
                f"{what} topics must be a topic name or a list of them, got {topics!r}"
            )
        if not (isinstance(group, str) and group):
            raise ValueError(f"{what} group must be a non-empty str, got {group!r}")
        if auto_offset_reset not in ("earliest", "latest"):
            raise ValueError(
                f"{what} auto_offset_reset must be 'earliest' or 'latest', "
                f"got {auto_offset_reset!r}"
            )
        if not (timestamp is None or timestamp == "record" or callable(timestamp)):
            raise ValueError(
                f"{what} timestamp must be 'record', a function of the value or None, "
                f"got {timestamp!r}"
            )
        for name, fn in (("on_assign", on_assign), ("on_revoke", on_revoke)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{what} {name} must be callable, got {fn!r}")
        self._bootstrap = bootstrap_servers
        self._topics = names
        self._group = group
        self._reset = auto_offset_reset
        self._value = _deserializer(value, f"{what} value")
        self._key = _deserializer(key, f"{what} key")
        self._metadata = bool(include_metadata)
        self._timestamp = timestamp
        self.event_time = timestamp is not None
        self._bound = round(
            non_negative_seconds(max_out_of_orderness, f"{what} max_out_of_orderness") * 1e6
        )
        self._idle_timeout = (
            None if idle_timeout is None else positive_seconds(idle_timeout, f"{what} idle_timeout")
        )
        self._stop_after_idle = (
            None
            if stop_after_idle is None
            else positive_seconds(stop_after_idle, f"{what} stop_after_idle")
        )
        self._poll, self._revoke_timeout = (
            positive_seconds(poll_timeout, f"{what} poll_timeout"),
            non_negative_seconds(revoke_timeout, f"{what} revoke_timeout"),
        )
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._user_config = _config(config, what)
        self._tls, self._sasl = _check_security(tls, sasl, self._user_config, what)
        self._ctx: SourceContext | None = None
        self._consumer: ck.Consumer | None = None
        self._errors = _ErrorLog(f"source {self.describe()}")
        self._closed = False
        # Filled by librdkafka's rebalance callback (in the fetching thread), applied by
        # the event loop after the fetch returns.
        self._lock = threading.Lock()
        self._events: list[tuple[bool, list[tuple[str, int]]]] = []
        self._parts: dict[tuple[str, int], _Part] = {}
        self._buffer: deque[Any] = deque()  # ck.Message  # fetched, not handed out yet
        self._fetch: asyncio.Future[list[ck.Message]] | None = None  # a fetch in a thread
        self._restored: dict[tuple[str, int], int] = {}
        self._restored_ts: dict[tuple[str, int], float] = {}
        self._committed: dict[tuple[str, int], int] = {}
        self._paused = False
        self._wm = -_INF
        self._last_record = 0.0
        self._ever_assigned = False  # stop_after_idle waits for the group's first assignment
        self._last_position: dict[tuple[str, int], int] = {}
        self.offsets_in_transaction = False
        """Set by a transactional Kafka sink that commits this source's offsets in its
        transactions: :meth:`commit` then leaves them to it."""
        self._backlog_at = -_INF
        self._lag_query: asyncio.Future[None] | None = None
        self._pinned: int | None = None
        self.commit_through: Callable[[dict[tuple[str, int], int]], None] | None = None
        """Pinned mode (:meth:`for_task`): where :meth:`commit` hands the offsets instead
        of committing them itself.  Kafka refuses an offset commit from a consumer that is
        not a member of a group with active members (``UNKNOWN_MEMBER_ID``); the worker's
        membership consumer, a member, commits them (:mod:`sluiceway.scaleout.tasks`)."""

    # -- one task's copy -----------------------------------------------------------

    @property
    def pinned(self) -> int | None:
        """The partition this copy reads of every topic (:meth:`for_task`), or None for
        a source in the consumer group."""
        return self._pinned

    @property
    def topics(self) -> tuple[str, ...]:
        """The topics (or ``^`` patterns) this source reads."""
        return tuple(self._topics)

    @property
    def group(self) -> str:
        """The consumer group (``group.id``)."""
        return self._group

    @property
    def bootstrap_servers(self) -> str:
        return self._bootstrap

    def client_config(self) -> dict[str, ConfigValue]:
        """The librdkafka options of this source's own clients beside the defaults:
        ``config=`` and the security settings of ``tls=``/``sasl=`` (for another client
        of the same group, such as a worker's membership consumer)."""
        return {
            **self._user_config,
            **_security_config(self._tls, self._sasl, self._errors.what),
        }

    def for_task(self, partition: int, *, stage: int = 0) -> KafkaSource:
        """A fresh, unopened copy that reads partition ``partition`` of every topic of
        this source by manual assignment -- no group membership -- for one task of a
        scaled-out keyed flow (:mod:`sluiceway.scaleout.tasks`; ``stage``: the
        sub-topology of a flow that repartitions, :mod:`sluiceway.scaleout.repartition`).

        Offsets still belong to this source's group: a fresh copy starts at the group's
        committed offset (else ``auto_offset_reset``), a transactional sink commits the
        copy's offsets to the group in its transactions (Kafka accepts a transactional
        offset commit from a non-member), and :meth:`commit` hands them to
        :attr:`commit_through`.

        Raises:
            ValueError: a topic pattern (``^...``): a task reads named topics, whose
                partition counts are checked to match.
        """
        patterns = [t for t in self._topics if t.startswith("^")]
        if patterns:
            raise ValueError(
                f"{self.describe()}: a task of a scaled-out keyed flow reads partition "
                f"{partition} of named topics; the pattern(s) {patterns} may match topics "
                "with other partition counts: name the topics"
            )
        if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
            raise ValueError(f"{self.describe()}: partition must be an int >= 0, got {partition!r}")
        copy = self._fresh()
        copy._pinned = partition
        return copy

    def _fresh(self) -> KafkaSource:
        """A new, unopened source with this one's arguments (a subclass keeps its own)."""
        return KafkaSource(**self._init_args)

    # -- lifecycle -----------------------------------------------------------------

    def _consumer_config(self, ctx: SourceContext) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "bootstrap.servers": self._bootstrap,
            "group.id": self._group,
            "client.id": f"sluiceway.{ctx.flow}.{ctx.name}"
            + ("" if self._pinned is None else f"-p{self._pinned}"),
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": self._reset,
            "partition.assignment.strategy": "cooperative-sticky",
            "isolation.level": "read_committed",
            # Bounded prefetch: at most this many KB per consumer wait in librdkafka.
            "queued.max.messages.kbytes": 8192,
            "enable.partition.eof": False,
        }
        conf.update(self._user_config)
        conf.update(_security_config(self._tls, self._sasl, self._errors.what))
        conf["logger"] = self._errors.logger()
        conf["error_cb"] = self._errors
        return conf

    async def open(self, ctx: SourceContext) -> None:
        """Create the consumer and subscribe (the group assigns partitions at the first
        fetch).

        Raises:
            KafkaError: a bad option or subscription.
        """
        self._ctx = ctx
        self._errors.what = f"source {ctx.name!r} ({self.describe()})"
        # Every run starts afresh (a restored position applies to the run it was given to).
        self._closed = False
        self._parts.clear()
        self._buffer.clear()
        self._events.clear()
        self._committed.clear()
        self._last_position.clear()
        self._wm = -_INF
        self._paused = False
        self._ever_assigned = False
        self._loop = asyncio.get_running_loop()
        self._revoking = None
        try:
            self._consumer = ck.Consumer(self._consumer_config(ctx))
            if self._pinned is None:
                self._consumer.subscribe(
                    self._topics,
                    on_assign=self._assigned,
                    on_revoke=self._revoked,
                    on_lost=self._lost,
                )
            else:
                # Manual assignment: the restored offsets, else (OFFSET_INVALID) the
                # group's committed offset, else auto_offset_reset.
                tps = [ck.TopicPartition(t, self._pinned) for t in self._topics]
                self._assigned(self._consumer, tps, incremental=False)
        except (ck.KafkaException, ValueError, TypeError) as exc:
            how = "subscribe" if self._pinned is None else f"assign partition {self._pinned}"
            raise KafkaError(f"{self._errors.what}: cannot {how}: {exc}") from exc
        self._last_record = ctx.clock.monotonic()
        if self._pinned is not None:
            self._apply_events()

    async def close(self) -> None:
        """Leave the group (its partitions go to the other members at once) and close.
        Offsets not committed stay uncommitted: the next reader starts there."""
        if self._closed:
            return
        self._closed = True
        self._release_revoke("the flow is closing")
        consumer = self._consumer
        if consumer is None:
            return
        for pending in (self._fetch, self._lag_query):  # calls still running in threads
            if pending is not None:
                await asyncio.wait([pending])
        self._fetch = None
        assert self._ctx is not None
        await self._ctx.clock.run_in_thread(self._errors.call, "close", consumer.close)
        self._consumer = None
        with self._lock:  # the restored position was this run's
            self._restored = {}
            self._restored_ts = {}

    def describe(self) -> str:
        """``Kafka(<topics>, group=<group>)``."""
        return f"Kafka({','.join(self._topics)}, group={self._group})"

    # -- assignment (librdkafka calls these inside a fetch, in its thread) ------------

    def _assigned(
        self,
        consumer: ck.Consumer,
        partitions: list[ck.TopicPartition],
        *,
        incremental: bool = True,
    ) -> None:
        with self._lock:
            restored = self._restored
            seek = [
                ck.TopicPartition(tp.topic, tp.partition, restored[(tp.topic, tp.partition)])
                if (tp.topic, tp.partition) in restored
                else tp
                for tp in partitions
            ]
            if incremental:
                consumer.incremental_assign(seek)
            else:
                consumer.assign(seek)
            self._events.append((True, [(tp.topic, tp.partition) for tp in partitions]))

    def _revoked(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        """The group takes ``partitions`` away: first let the flow write what it handed
        out of them and commit their offsets (bounded by ``revoke_timeout``), then let
        them go -- the next owner starts after the last record this flow handed out."""
        tps = [(tp.topic, tp.partition) for tp in partitions]
        rev = _Revoke(set(tps), threading.Event())
        if self._drain(rev):
            rev.done.wait()  # set by the event loop: written, timed out, or closing
            offsets = [ck.TopicPartition(t, p, off) for (t, p), off in rev.commit.items()]
            if offsets:
                try:
                    _commit(consumer, offsets)  # in the callback: Kafka allows it here
                except ck.KafkaException as exc:
                    log.warning(
                        "%s: commit of revoked %s failed: %s; their next owner reads the "
                        "records handed out since the last commit again",
                        self._errors.what,
                        _names(rev.partitions),
                        exc,
                    )
        self._release(consumer, partitions)

    def _lost(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        """The partitions were lost (this member's session expired): another member owns
        them already, so nothing is committed for them; their records are read again."""
        self._release(consumer, partitions)

    def _release(self, consumer: ck.Consumer, partitions: list[ck.TopicPartition]) -> None:
        with self._lock:
            consumer.incremental_unassign(partitions)
            self._events.append((False, [(tp.topic, tp.partition) for tp in partitions]))

    def _drain(self, rev: _Revoke) -> bool:
        """Ask the event loop (from the fetching thread) to drain the partitions of
        ``rev`` before they go; False when there is nothing to wait for."""
        loop = self._loop
        if (
            self._closed
            or loop is None
            or self.offsets_in_transaction  # the sink's transaction commits them
            or self._revoke_timeout == 0
        ):
            return False
        try:
            loop.call_soon_threadsafe(self._start_revoke, rev)
        except RuntimeError:  # the loop is closed: the flow is over
            return False
        return True

    def _start_revoke(self, rev: _Revoke) -> None:
        """In the event loop: hold the partitions of ``rev`` until what was handed out of
        them is written (an ack barrier or a checkpoint says so through :meth:`commit`)."""
        ctx = self._ctx
        if self._closed or ctx is None:
            rev.done.set()
            return
        gone = rev.partitions
        if self._buffer:  # fetched, not handed out: the next owner reads these
            self._buffer = deque(m for m in self._buffer if (m.topic(), m.partition()) not in gone)
        clock = ctx.clock
        rev.timer = clock.call_at(
            clock.monotonic() + self._revoke_timeout,
            lambda: self._release_revoke(f"not written within {self._revoke_timeout:g}s"),
        )
        self._revoking = rev
        log.info("%s: revoking %s: committing what was handed out", self._errors.what, _names(gone))
        self._check_revoke()
        self._wake_fetch()

    def _check_revoke(self) -> None:
        """Release the revoked partitions once every record handed out of them is
        committed."""
        rev = self._revoking
        if rev is None:
            return
        for tp in rev.partitions:
            part = self._parts.get(tp)
            handed = None if part is None else part.next_offset
            if handed is not None and rev.durable.get(tp, self._committed.get(tp)) != handed:
                return
        self._release_revoke(None)

    def _release_revoke(self, why: str | None) -> None:
        rev, self._revoking = self._revoking, None
        if rev is None:
            return
        if rev.timer is not None:
            rev.timer.cancel()
        # What the sinks wrote of the revoked partitions: committed by the fetching thread.
        rev.commit = {
            tp: off
            for tp, off in rev.durable.items()
            if tp in rev.partitions and self._committed.get(tp) != off
        }
        if why is not None:
            log.warning(
                "%s: letting %s go although %s: their next owner reads the records "
                "handed out since the last commit again",
                self._errors.what,
                _names(rev.partitions),
                why,
            )
        rev.done.set()
        self._wake_fetch()

    def _wake_fetch(self) -> None:
        if self._revoke_wake is not None:
            _resolve(self._revoke_wake)

    def _apply_events(self) -> None:
        """Apply the assignments and revocations of the last fetch (in the event loop)."""
        with self._lock:
            events, self._events = self._events, []
        if not events:
            return
        assert self._ctx is not None
        now = self._ctx.clock.monotonic()
        for assigned, tps in events:
            if assigned:
                for tp in tps:
                    part = self._parts[tp] = _Part(now)
                    part.max_ts = self._restored_ts.get(tp, -_INF)
                self._last_record = now  # idleness counts from the assignment
                self._ever_assigned = True
                log.info("%s: assigned %s", self._errors.what, _names(tps))
                if self._on_assign is not None:
                    self._on_assign(list(tps))
            else:
                gone = set(tps)
                for tp in tps:
                    self._parts.pop(tp, None)
                    self._last_position.pop(tp, None)
                if self._buffer:
                    self._buffer = deque(
                        m for m in self._buffer if (m.topic(), m.partition()) not in gone
                    )
                log.info("%s: revoked %s", self._errors.what, _names(tps))
                if self._on_revoke is not None:
                    self._on_revoke(list(tps))
        # The partitions changed: so may their minimum (a restored partition brings its
        # event time along; a revoked one no longer holds the watermark back).
        self._wm = max(self._wm, self._low(now))
        if self._paused and self._consumer is not None:
            self._set_paused(True)  # new partitions start unpaused

    @property
    def assignment(self) -> list[tuple[str, int]]:
        """The ``(topic, partition)`` pairs this source owns now, sorted."""
        return sorted(self._parts)

    # -- positions -----------------------------------------------------------------

    def position(self) -> dict[str, Any]:
        """``{"offsets": {"topic:partition": next offset}, "event_time": {...}}`` for every
        partition this source handed records out of (the offset of the next record to
        read), and the largest event time seen per partition."""
        current = {tp: p.next_offset for tp, p in self._parts.items() if p.next_offset is not None}
        self._last_position = dict(current)
        offsets = {_tp(*tp): off for tp, off in current.items()}
        # Partitions restored but not (yet) assigned keep their restored offsets.
        for tp, off in self._restored.items():
            offsets.setdefault(_tp(*tp), off)
        times = {_tp(*tp): p.max_ts for tp, p in self._parts.items() if p.max_ts > -_INF}
        return {"offsets": offsets, "event_time": times}

    def restore(self, position: Any) -> None:
        """Resume from a checkpoint: each partition it knows starts at its offset when it
        is assigned (others at the group's committed offset)."""
        if not (isinstance(position, Mapping) and isinstance(position.get("offsets"), Mapping)):
            raise ValueError(
                f"{self.describe()}: a position must be a dict from position(), got "
                f"{short_repr(position)}"
            )
        with self._lock:
            self._restored = {_untp(k): int(v) for k, v in position["offsets"].items()}
            self._restored_ts = {
                _untp(k): float(v) for k, v in (position.get("event_time") or {}).items()
            }

    async def commit(self, position: Any) -> None:
        """Commit the offsets of ``position`` for the partitions this source still owns."""
        if self.offsets_in_transaction or self._consumer is None or self._closed:
            return
        if not isinstance(position, Mapping):
            return
        offsets = [
            ck.TopicPartition(t, p, off)
            for (t, p), off in ((_untp(k), v) for k, v in position["offsets"].items())
            if (t, p) in self._parts and self._committed.get((t, p)) != off
        ]
        if not offsets:
            return
        if self._pinned is not None and self.commit_through is not None:
            self.commit_through({(tp.topic, tp.partition): tp.offset for tp in offsets})
            for tp in offsets:
                self._committed[(tp.topic, tp.partition)] = tp.offset
            return
        rev = self._revoking
        if rev is not None:
            # The fetching thread is in librdkafka's revoke callback: a commit from here
            # would wait for it.  These offsets are durable (the sinks wrote up to them):
            # that thread commits the revoked ones before it lets them go.
            for tp in offsets:
                rev.durable[(tp.topic, tp.partition)] = tp.offset
            self._check_revoke()
            return
        consumer = self._consumer
        assert self._ctx is not None
        try:
            await self._ctx.clock.run_in_thread(
                self._errors.call, "commit", _commit, consumer, offsets
            )
        except ck.KafkaException as exc:
            # A rebalance took the partitions meanwhile: their next owner reads from the
            # last committed offset (at-least-once), nothing is lost.
            log.warning("%s: commit of %s failed: %s", self._errors.what, offsets, exc)
            return
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset

    def transaction_offsets(self) -> tuple[list[ck.TopicPartition], Any] | None:
        """For a transactional sink: the offsets of the latest :meth:`position` (the
        checkpoint in progress) of the partitions still owned, and the consumer's group
        metadata; None before the consumer exists."""
        if self._consumer is None:
            return None
        offsets = [
            ck.TopicPartition(t, p, off)
            for (t, p), off in self._last_position.items()
            if (t, p) in self._parts
        ]
        return offsets, self._consumer.consumer_group_metadata()

    # -- lag -------------------------------------------------------------------------

    def backlog(self) -> int | None:
        """Records waiting in the owned partitions (end offset minus the next offset to
        hand out), as last seen by the fetcher; None before the first assignment."""
        lags = self.partition_backlog()
        return None if lags is None else sum(lags.values())

    def partition_backlog(self) -> dict[str, int] | None:
        """The lag of every owned partition (``"topic:partition"`` -> records): the end
        offset librdkafka last saw in a fetch response minus the next offset to hand out
        (refreshed at most once a second, from librdkafka's cache: no network)."""
        if not self._parts or self._ctx is None or self._closed:
            return None
        now = self._ctx.clock.monotonic()
        if now - self._backlog_at >= _BACKLOG_EVERY:  # local reads, no network
            self._backlog_at = now
            self._refresh_lag()
        out: dict[str, int] = {}
        for tp, part in list(self._parts.items()):
            lag = part.lag()
            if lag is not None:
                out[_tp(*tp)] = lag
        return out

    def _refresh_lag(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        unknown: list[tuple[str, int]] = []
        for (t, p), part in list(self._parts.items()):
            low: int | None
            high: int | None
            try:
                low, high = consumer.get_watermark_offsets(ck.TopicPartition(t, p), cached=True)
            except ck.KafkaException:
                low = high = None
            if high is None or high < 0:
                unknown.append((t, p))
                continue
            part.high = high
            if part.next_offset is None:  # nothing handed out yet: lag from the position
                try:
                    pos = consumer.position([ck.TopicPartition(t, p)])[0].offset
                except ck.KafkaException:
                    continue
                if pos >= 0:
                    part.start = pos
                elif part.start is None:
                    part.start = self._reset_start(low, high)
        if unknown and self._lag_query is None:
            # Not fetched yet (paused, or behind others): ask the broker, in a thread.
            loop = asyncio.get_running_loop()
            self._lag_query = loop.run_in_executor(None, self._query_ends, consumer, unknown)

    def _reset_start(self, low: int | None, high: int | None) -> int | None:
        """Where a partition nothing was handed out of starts, while the consumer has no
        position for it yet: where ``auto_offset_reset`` points."""
        return None if low is None or low < 0 else (low if self._reset == "earliest" else high)

    def _query_ends(self, consumer: ck.Consumer, tps: list[tuple[str, int]]) -> None:
        try:
            for t, p in tps:
                try:
                    low, high = consumer.get_watermark_offsets(
                        ck.TopicPartition(t, p), timeout=2.0, cached=False
                    )
                except ck.KafkaException:
                    continue
                part = self._parts.get((t, p))
                if part is not None and high is not None and high >= 0:
                    part.high = high
                    if part.start is None and part.next_offset is None:
                        part.start = self._reset_start(low, high)
        finally:
            self._lag_query = None

    # -- event time --------------------------------------------------------------------

    def watermark(self) -> float | None:
        """The minimum of the per-partition watermarks of the partitions that are not
        idle; None before any."""
        return None if self._wm == -_INF else self._wm

    def _advance_idle(self) -> None:
        """Let idle partitions go: recompute the watermark without them."""
        timeout = self._idle_timeout
        if timeout is None or not self._parts:
            return
        assert self._ctx is not None
        low = self._low(self._ctx.clock.monotonic())
        self._wm = max(self._wm, low)

    def idle(self) -> bool:
        """True when every partition this source owns is idle: no data for
        ``idle_timeout`` and nothing left to read (the source's watermark then waits
        for the next record).  False without an idle timeout or partitions."""
        timeout = self._idle_timeout
        if timeout is None or not self._parts or self._ctx is None:
            return False
        now = self._ctx.clock.monotonic()
        return all(now - p.last_data >= timeout and not p.lag() for p in self._parts.values())

    @property
    def paused(self) -> bool:
        """True while the owned partitions are paused because the flow has no room."""
        return self._paused

    def hold(self, full: bool) -> None:
        """Pause fetching while the flow has no room (librdkafka would prefetch)."""
        if full != self._paused and self._consumer is not None and not self._closed:
            self._set_paused(full)

    def _set_paused(self, paused: bool) -> None:
        assert self._consumer is not None
        self._paused = paused
        tps = [ck.TopicPartition(t, p) for t, p in self._parts]
        if not tps:
            return
        try:
            if paused:
                self._consumer.pause(tps)
            else:
                self._consumer.resume(tps)
        except ck.KafkaException as exc:  # a partition revoked meanwhile
            log.debug("%s: pause/resume: %s", self._errors.what, exc)

    # -- reading -------------------------------------------------------------------

    async def next_batch(self, max_records: int) -> Batch | None:
        """Up to ``max_records`` records (waiting at most ``poll_timeout`` for the first).

        Returns an empty batch after a fetch that found nothing, and None once
        ``stop_after_idle`` seconds passed without a record.

        Raises:
            KafkaError: a fatal client error, or a topic that cannot be read.
            OperatorError: (from the runtime, under ``Fail``) a malformed record.
        """
        ctx, consumer = self._ctx, self._consumer
        if ctx is None or consumer is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        clock = ctx.clock
        if not self._buffer:
            if self._fetch is None:
                want = max_records
                self._fetch = asyncio.ensure_future(
                    clock.run_in_thread(
                        self._errors.call, "fetch", consumer.consume, want, self._poll
                    )
                )
            fetch = self._fetch
            if not fetch.done():
                # Cancelled meanwhile (a barrier, a stop): the fetch goes on in its thread
                # and the next call takes its result.
                await self._wait_fetch(clock, fetch)
                if not fetch.done():  # held by a revocation: let barriers through
                    return Batch([])
            try:
                msgs = fetch.result()
            except ck.KafkaException as exc:
                self._fetch = None
                raise KafkaError(f"{self._errors.what}: fetch failed: {exc}") from exc
            self._fetch = None
            self._apply_events()
            self._take(msgs)
            if self._errors.fatal is not None:
                raise KafkaError(f"{self._errors.what}: fatal Kafka error: {self._errors.fatal}")
            now = clock.monotonic()
            if not self._buffer:
                self._advance_idle()
                idle = self._stop_after_idle
                if idle is not None and self._ever_assigned and now - self._last_record >= idle:
                    return None
                return Batch([])
        return await self._hand_out(ctx, max_records)

    async def _wait_fetch(self, clock: Any, fetch: asyncio.Future[Any]) -> None:
        """Wait for the fetch, unless a revocation holds it: librdkafka's revoke callback
        (in the fetching thread) waits for the flow to write and commit the records of
        the revoked partitions, and the commits need barriers, which need this stage to
        come back from its pull -- so then wait at most ``poll_timeout``."""
        loop = asyncio.get_running_loop()
        wake = self._revoke_wake = loop.create_future()
        fetch.add_done_callback(lambda _f: _resolve(wake))
        try:
            if self._revoking is None:
                await wake  # the fetch is done, or a revocation started
            if self._revoking is not None and not fetch.done():
                held = self._revoke_wake = loop.create_future()
                fetch.add_done_callback(lambda _f: _resolve(held))
                await clock.wait_until(held, clock.monotonic() + self._poll)
        finally:
            self._revoke_wake = None

    def _take(self, msgs: list[ck.Message]) -> None:
        """Buffer fetched messages; errors in them are raised or logged."""
        buffer = self._buffer
        parts = self._parts
        for m in msgs:
            err = m.error()
            if err is None:
                if (m.topic(), m.partition()) in parts:
                    buffer.append(m)
                continue
            if err.code() == ck.KafkaError._PARTITION_EOF:
                continue
            if err.fatal() or err.code() in (
                ck.KafkaError.UNKNOWN_TOPIC_OR_PART,
                ck.KafkaError.TOPIC_AUTHORIZATION_FAILED,
                ck.KafkaError.GROUP_AUTHORIZATION_FAILED,
            ):
                if err.code() == ck.KafkaError.UNKNOWN_TOPIC_OR_PART and any(
                    t.startswith("^") for t in self._topics
                ):
                    continue
                raise KafkaError(f"{self._errors.what}: {err.str()}")
            log.debug("%s: %s", self._errors.what, err)
        if msgs:
            self._errors.up()

    async def _hand_out(self, ctx: SourceContext, max_records: int) -> Batch:
        buffer = self._buffer
        parts = self._parts
        decode = self._decode
        event_time = self.event_time
        by_records = self._records_advance_watermark
        bound = self._bound
        records: list[Any] = []
        stamps: list[int] = []
        marks: list[float] = []
        wm = self._wm
        now = ctx.clock.monotonic()
        while buffer and len(records) < max_records:
            m = buffer[0]
            part = parts.get((m.topic(), m.partition()))
            rev = self._revoking
            if part is None or (rev is not None and (m.topic(), m.partition()) in rev.partitions):
                buffer.popleft()  # revoked (or being revoked): the next owner reads it
                continue
            try:
                value, t = decode(m)
            except Exception as exc:  # noqa: BLE001 - any decode failure is bad input
                if records:  # hand out the good ones first; report this one next time
                    break
                await self._bad_input(ctx, m, exc)
                buffer.popleft()
                part.next_offset = m.offset() + 1
                part.last_data = now
                continue
            buffer.popleft()
            part.next_offset = m.offset() + 1
            part.last_data = now
            if value is CONTROL:  # a control message of an internal topic: no record
                wm = max(wm, self._low(now))
                continue
            records.append(value)
            if event_time:
                stamps.append(t)
                marks.append(wm)
                if by_records and t > part.max_ts:
                    before = part.max_ts - bound
                    part.max_ts = t
                    if before <= wm:  # it may have been the lowest: the minimum may rise
                        wm = max(wm, self._low(now))
        if records:
            self._last_record = now
        if not event_time:
            return Batch(records)
        self._wm = wm
        return Batch(records, stamps, None, marks)

    def _decode(self, m: Any) -> tuple[Any, int]:
        """A message's record and event time (microseconds; 0 without event time)."""
        raw = m.value()
        decode = self._value
        value = raw if decode is None or raw is None else decode(raw)
        if self._metadata:
            value = self._record(m, value, self._key)
        how = self._timestamp
        if how is None:
            return value, 0
        if how == "record":
            kind, ms = m.timestamp()
            return value, (ms * 1000 if kind != ck.TIMESTAMP_NOT_AVAILABLE else 0)
        assert callable(how)
        return value, to_ticks(how(value.value if self._metadata else value))

    async def _bad_input(self, ctx: SourceContext, m: Any, exc: Exception) -> None:
        hint = (
            "; set bad records aside with flow.source(..., on_error=sw.DeadLetter(sink))"
            if ctx.fails_on_bad_input
            else ""
        )
        where = f"kafka {m.topic()}[{m.partition()}]@{m.offset()}"
        reason = f"cannot decode: {type(exc).__name__}: {exc}{hint}"
        await ctx.bad_input(BadInputError(where, self._record(m, m.value(), None), reason))

    def _low(self, now: float) -> float:
        """The minimum watermark over the partitions that are not idle (-inf: none yet)."""
        bound, timeout = self._bound, self._idle_timeout
        low = _INF
        for part in self._parts.values():
            if timeout is not None and now - part.last_data >= timeout and not part.lag():
                continue  # idle: no data for a while and nothing left to read
            w = part.max_ts - bound
            low = min(low, w)
        return -_INF if low == _INF else low

    @staticmethod
    def _record(m: Any, value: Any, key_decode: Callable[[bytes], Any] | None) -> KafkaRecord:
        """``m`` as a :class:`KafkaRecord` with ``value`` (keys decoded by ``key_decode``)."""
        key = m.key()
        if key is not None and key_decode is not None:
            key = key_decode(key)
        kind, ms = m.timestamp()
        return KafkaRecord(
            value,
            key,
            m.topic(),
            m.partition(),
            m.offset(),
            None if kind == ck.TIMESTAMP_NOT_AVAILABLE else ms / 1000,
            tuple(m.headers() or ()),
        )


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _commit(consumer: ck.Consumer, offsets: list[ck.TopicPartition]) -> None:
    for tp in consumer.commit(offsets=offsets, asynchronous=False) or ():
        if tp.error is not None:
            raise ck.KafkaException(tp.error)


def _names(tps: Iterable[tuple[str, int]]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in sorted(tps)) or "nothing"


# -- the sink ------------------------------------------------------------------------

_FLUSH_SLICE = 1.0  # seconds one flush call in a thread waits before checking again


class KafkaSink(Sink):
    r"""Produces every record to a Kafka topic (``sw.sinks.Kafka``).

    Args:
        bootstrap_servers: ``host:port[,host:port...]`` of the brokers.
        topic: the topic to write to.
        value: how records become payloads: ``"json"`` (default), ``"utf-8"``,
            ``"bytes"`` or a function returning ``bytes``/``str``.
        key: a function of the record giving its key (None: no key).  Records with
            the same key go to the same partition (murmur2, as Kafka's Java clients).
        key_serializer: how keys become bytes (default: ``bytes`` as they are, ``str``
            as UTF-8, others as JSON).
        headers: a function of the record giving its headers (a mapping or a list of
            ``(name, value)`` pairs; values ``str`` or ``bytes``).
        partition: a function of the record giving its partition (None: by key).
        exactly_once: one Kafka transaction per checkpoint epoch (needs checkpoints),
            committed once the checkpoint is stored; with a Kafka source in the flow its
            consumed offsets commit in the same transaction.  Readers see the output
            exactly once with ``isolation.level=read_committed``.
        transactional_id: the producer's ``transactional.id`` (default
            ``"sluiceway.<flow>.<operator>"``; in a task of a flow on several workers
            ``"sluiceway.<group>.<flow>.<operator>-p<p>"``).  It must be the same across
            restarts of one flow and differ between flows (and workers) running at the
            same time.  A restart from a checkpoint goes on with the id it recorded.
        config: any librdkafka producer option; overrides the connector's defaults.
        tls, sasl: as for ``sw.sources.Kafka`` (a refused handshake or login fails the
            write with :class:`KafkaSinkError`).

    Without ``exactly_once`` the sink is at-least-once: ``write`` returns once the
    broker acknowledged every record of the batch (idempotent producer: a retry inside
    librdkafka never duplicates), and records written after the last checkpoint are
    written again after a crash.  A record the broker refuses fails ``write`` with
    :class:`KafkaSinkError`, handled by the sink's error policy.  When the batch has event
    time, each record's Kafka timestamp is its event time.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        value: Serializer = "json",
        key: Callable[[Any], Any] | None = None,
        key_serializer: Callable[[Any], bytes | str | None] = _key_bytes,
        headers: Callable[[Any], Mapping[str, str | bytes] | Sequence[tuple[str, str | bytes]]]
        | None = None,
        partition: Callable[[Any], int] | None = None,
        exactly_once: bool = False,
        transactional_id: str | None = None,
        config: Mapping[str, ConfigValue] | None = None,
        tls: TlsLike = None,
        sasl: Sasl | None = None,
    ) -> None:
        self._init_args: dict[str, Any] = {
            k: v for k, v in locals().items() if k not in ("self", "__class__")
        }
        what = "sinks.Kafka"
        _check_bootstrap(bootstrap_servers, what)
        if not (isinstance(topic, str) and topic):
            raise ValueError(f"{what} topic must be a non-empty str, got {topic!r}")
        for name, fn in (
            ("key", key),
            ("headers", headers),
            ("partition", partition),
            ("key_serializer", key_serializer),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(f"{what} {name} must be a function or None, got {fn!r}")
        if transactional_id is not None and not (
            isinstance(transactional_id, str) and transactional_id
        ):
            raise ValueError(
                f"{what} transactional_id must be a non-empty str or None, got {transactional_id!r}"
            )
        self._bootstrap = bootstrap_servers
        self._topic = topic
        self._value = _serializer(value, f"{what} value")
        self._key = key
        self._key_serializer = key_serializer
        self._headers = headers
        self._partition = partition
        self.exactly_once = bool(exactly_once)
        self._tid_arg = transactional_id
        self._tid = ""
        self._user_config = _config(config, what)
        self._tls, self._sasl = _check_security(tls, sasl, self._user_config, what)
        self._ctx: SinkContext | None = None
        self._producer: ck.Producer | None = None
        self._errors = _ErrorLog(f"sink {self.describe()}")
        self._failed: list[tuple[ck.KafkaError, Any]] = []  # delivery reports of failures
        self._in_txn = False
        self._txn_records = 0  # records produced in the open transaction
        self._epoch = 0  # transactions committed (exactly_once), restored from checkpoints
        self._prepared: asyncio.Event | None = None  # set: writes may go on
        self._marker: ck.Consumer | None = None
        self._closed = False
        self._tid_suffix = ""  # "-p<partition>" for one task's copy (for_task)

    def describe(self) -> str:
        """``Kafka(<topic>)``."""
        return f"Kafka({self._topic})"

    def for_task(self, partition: int, *, stage: int = 0) -> KafkaSink:
        """A fresh, unopened copy for one task of a scaled-out keyed flow (the task of
        source partition ``partition``, :mod:`sluiceway.scaleout.tasks`).  With
        ``exactly_once`` its transactional id is this sink's followed by
        ``-p<partition>`` (``-s<stage>-p<partition>`` in sub-topology ``stage`` > 0 of a
        flow that repartitions): stable per task, so the next owner of the task fences a
        zombie (its ``init_transactions``) and aborts what that left open, and differs
        between the tasks running at the same time."""
        if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
            raise ValueError(f"{self.describe()}: partition must be an int >= 0, got {partition!r}")
        copy = self._fresh()
        suffix = f"-s{stage}-p{partition}" if stage else f"-p{partition}"
        if self._tid_arg is not None:
            copy._tid_arg = f"{self._tid_arg}{suffix}"
        else:
            copy._tid_suffix = suffix
        return copy

    def _default_tid(self, ctx: SinkContext) -> str:
        """``sluiceway.<flow>.<operator>``; for a task's copy (:meth:`for_task`)
        ``sluiceway.<group>.<flow>.<operator>-p<p>``, the group of the flow's Kafka source
        in it -- the application's name, as Kafka Streams' ``<application.id>-<task>``: two
        deployments of one flow under different groups (staging and production on one
        cluster) would otherwise fence each other's tasks."""
        groups = [s.group for s in ctx.sources if isinstance(s, KafkaSource)]
        if self._tid_suffix and groups:
            return f"sluiceway.{groups[0]}.{ctx.flow}.{ctx.name}{self._tid_suffix}"
        return f"sluiceway.{ctx.flow}.{ctx.name}{self._tid_suffix}"

    def _fresh(self) -> KafkaSink:
        """A new, unopened sink with this one's arguments (a subclass keeps its own)."""
        return KafkaSink(**self._init_args)

    # -- lifecycle -----------------------------------------------------------------

    def _producer_config(self) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "bootstrap.servers": self._bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "linger.ms": 5,
            "delivery.report.only.error": True,
        }
        if self.exactly_once:
            conf["transactional.id"] = self._tid
        conf.update(self._user_config)
        conf.update(_security_config(self._tls, self._sasl, self._errors.what))
        conf["logger"] = self._errors.logger()
        conf["error_cb"] = self._errors
        conf["on_delivery"] = self._errors.guarded("on_delivery", self._delivered)
        return conf

    async def open(self, ctx: SinkContext) -> None:
        """Create the producer; with ``exactly_once`` also initialise transactions (which
        aborts a transaction a crashed run of this flow left open).

        Raises:
            ValueError: ``exactly_once`` in a flow without checkpoints.
            KafkaError: the producer cannot be created or transactions initialised.
        """
        self._ctx = ctx
        self._errors.what = f"sink {ctx.name!r} ({self.describe()})"
        if self.exactly_once and not ctx.checkpointing:
            raise ValueError(
                f"{self._errors.what}: exactly_once=True needs checkpoints (one transaction "
                "per checkpoint epoch); run the flow with checkpoints=sw.Checkpoints(...)"
            )
        self._tid = self._tid or self._tid_arg or self._default_tid(ctx)
        self._prepared = asyncio.Event()
        self._prepared.set()
        self._closed = False
        self._in_txn = False
        self._failed = []
        if self.exactly_once:
            for source in ctx.sources:
                if isinstance(source, KafkaSource):
                    source.offsets_in_transaction = True
        if self._producer is not None:  # made by committed() at a restart, initialised
            return
        self._producer = self._new_producer()
        if self.exactly_once:
            await self._txn("init_transactions", self._producer.init_transactions, 60.0)
            if not ctx.restored:
                # A fresh start (or checkpoints reset): epochs go on above the marker, so
                # that committed() can tell a later epoch's commit from an earlier one's.
                self._epoch = await ctx.clock.run_in_thread(self._read_marker)

    def _new_producer(self) -> ck.Producer:
        try:
            return ck.Producer(self._producer_config())
        except (ck.KafkaException, ValueError, TypeError) as exc:
            raise KafkaError(f"{self._errors.what}: cannot create the producer: {exc}") from exc

    async def close(self) -> None:
        """Deliver what is queued (at-least-once) or abort the open transaction, and
        close the producer (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        producer, ctx = self._producer, self._ctx
        if producer is None or ctx is None:
            return
        if self.exactly_once:
            if self._in_txn:
                self._in_txn = False
                try:
                    await ctx.clock.run_in_thread(
                        self._errors.call, "abort_transaction", producer.abort_transaction, 10.0
                    )
                except ck.KafkaException as exc:
                    log.warning("%s: abort at close failed: %s", self._errors.what, exc)
        elif self._errors.fatal is None:  # after a refused login nothing can be delivered
            await ctx.clock.run_in_thread(self._errors.call, "flush", producer.flush, 10.0)
        if self._marker is not None:
            await ctx.clock.run_in_thread(self._marker.close)
            self._marker = None
        self._producer = None  # a later run of this object makes its own

    # -- writing -----------------------------------------------------------------------

    def _delivered(self, err: ck.KafkaError | None, msg: ck.Message) -> None:
        if err is not None:
            self._failed.append((err, msg))

    async def write(self, batch: Batch) -> None:
        """Produce every record and wait until the broker has them all.

        Raises:
            PartialWriteError: record ``written`` could not be serialised; the ones
                before it are in Kafka (or in the open transaction).
            KafkaSinkError: the broker refused records (delivery failed), naming the
                first error and how many.
        """
        producer, ctx, gate = self._producer, self._ctx, self._prepared
        if producer is None or ctx is None or gate is None:
            raise RuntimeError(f"{self.describe()} is not open: the runtime calls open() first")
        if not gate.is_set():  # a checkpoint's transaction is being committed
            await gate.wait()
        if self.exactly_once and not self._in_txn:
            self._begin()
        produce, topic = producer.produce, self._topic
        message = self._message
        failed: tuple[int, Exception] | None = None
        for i, v in enumerate(batch.values):
            try:
                payload, kwargs = message(batch, i, v)
            except Exception as exc:  # noqa: BLE001 - pinned to this record (PartialWriteError)
                failed = (i, exc)
                break
            while True:
                try:
                    produce(topic, payload, **kwargs)
                    self._txn_records += 1
                    break
                except BufferError:  # librdkafka's queue is full: let it deliver some
                    await ctx.clock.run_in_thread(self._errors.call, "poll", producer.poll, 0.05)
                except (ck.KafkaException, TypeError, ValueError) as exc:
                    failed = (i, exc)
                    break
            if failed is not None:
                break
        await self._flush()
        if failed is not None:
            raise PartialWriteError(failed[0], failed[1]) from failed[1]

    def _message(self, batch: Batch, i: int, v: Any) -> tuple[bytes | str, dict[str, Any]]:
        """Record ``i`` (value ``v``) of ``batch`` as a payload and ``produce`` options."""
        payload = self._value(v)
        kwargs: dict[str, Any] = {}
        if self._key is not None:
            kwargs["key"] = self._key_serializer(self._key(v))
        if self._headers is not None:
            h = self._headers(v)
            kwargs["headers"] = list(h.items()) if isinstance(h, Mapping) else list(h)
        if self._partition is not None:
            kwargs["partition"] = self._partition(v)
        stamps = batch.timestamps
        if stamps is not None:
            kwargs["timestamp"] = stamps[i] // 1000
        return payload, kwargs

    async def _flush(self) -> None:
        """Wait until librdkafka delivered (or gave up on) everything queued."""
        producer, ctx = self._producer, self._ctx
        assert producer is not None
        assert ctx is not None
        call = self._errors.call
        while await ctx.clock.run_in_thread(call, "flush", producer.flush, _FLUSH_SLICE):
            if self._errors.fatal is not None:
                break
        # The client's own error is the cause: what it says (fenced by a newer producer of
        # this transactional id, for one) stays readable by code, not only in the text.
        if self._errors.fatal is not None:
            fatal = self._errors.fatal
            raise KafkaSinkError(
                f"{self._errors.what}: fatal Kafka error: {fatal}"
            ) from ck.KafkaException(fatal)
        if self._failed:
            failed, self._failed = self._failed, []
            err, _ = failed[0]
            raise KafkaSinkError(
                f"{self._errors.what}: Kafka did not take {len(failed)} record(s) for topic "
                f"{self._topic!r}; first error: {err.str()}"
            ) from ck.KafkaException(err)

    # -- transactions -------------------------------------------------------------------

    def _begin(self) -> None:
        assert self._producer is not None
        try:
            self._producer.begin_transaction()
        except ck.KafkaException as exc:
            raise KafkaError(f"{self._errors.what}: cannot begin a transaction: {exc}") from exc
        self._in_txn = True
        self._txn_records = 0

    async def _txn(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A transactional call in a thread, retried while Kafka says it is retriable."""
        assert self._ctx is not None
        clock = self._ctx.clock
        while True:
            try:
                return await clock.run_in_thread(self._errors.call, what, fn, *args)
            except ck.KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if isinstance(err, ck.KafkaError) and err.retriable():
                    log.warning("%s: %s: %s; retrying", self._errors.what, what, err)
                    await clock.sleep(0.2)
                    continue
                if isinstance(err, ck.KafkaError) and err.txn_requires_abort() and self._in_txn:
                    self._in_txn = False
                    assert self._producer is not None
                    try:
                        await clock.run_in_thread(
                            self._errors.call,
                            "abort_transaction",
                            self._producer.abort_transaction,
                            30.0,
                        )
                    except ck.KafkaException as abort_exc:
                        log.warning("%s: abort failed: %s", self._errors.what, abort_exc)
                raise KafkaError(
                    f"{self._errors.what}: {what} failed: {exc}; the flow stops and a restart "
                    "goes on from the last checkpoint"
                ) from exc

    def _marker_group(self) -> str:
        return f"{self._tid}.sluiceway-commits"

    def _marker_consumer(self) -> ck.Consumer:
        if self._marker is None:
            self._marker = ck.Consumer(
                {
                    "bootstrap.servers": self._bootstrap,
                    "group.id": self._marker_group(),
                    "enable.auto.commit": False,
                    "logger": self._errors.logger(),
                    **{k: v for k, v in self._user_config.items() if k.startswith(_SECURITY_KEYS)},
                    **_security_config(self._tls, self._sasl, self._errors.what),
                }
            )
        return self._marker

    async def pre_commit(self, checkpoint_id: int | None) -> Any:
        """At a barrier: deliver everything written so far.  With ``exactly_once`` also add
        the consumed offsets of the flow's Kafka sources and a commit marker to the open
        transaction; writes then wait until :meth:`commit` commits it."""
        if self._producer is None:
            return None
        if not self.exactly_once:
            await self._flush()
            return None
        assert self._ctx is not None
        if not self._in_txn:
            self._begin()
        await self._flush()
        producer = self._producer
        for source in self._ctx.sources:
            if isinstance(source, KafkaSource):
                taken = source.transaction_offsets()
                if taken is not None and taken[0]:
                    offsets, meta = taken
                    await self._txn(
                        "send_offsets_to_transaction",
                        producer.send_offsets_to_transaction,
                        offsets,
                        meta,
                        30.0,
                    )
        # The marker: this epoch's number as the offset of a group of our own, committed
        # with the transaction -- committed() reads it back after a crash.
        epoch = self._epoch + 1
        marker = self._marker_consumer()
        await self._txn(
            "send_offsets_to_transaction",
            producer.send_offsets_to_transaction,
            [ck.TopicPartition(self._topic, 0, epoch)],
            marker.consumer_group_metadata(),
            30.0,
        )
        assert self._prepared is not None
        self._prepared.clear()
        return {"transactional_id": self._tid, "epoch": epoch, "records": self._txn_records}

    async def commit(self, checkpoint_id: int, state: Any) -> None:
        """The checkpoint is stored: commit its transaction."""
        if not self.exactly_once or self._producer is None or not self._in_txn:
            return
        await self._txn("commit_transaction", self._producer.commit_transaction, 60.0)
        self._in_txn = False
        if isinstance(state, Mapping):
            self._epoch = int(state["epoch"])
        assert self._prepared is not None
        self._prepared.set()

    def restore(self, state: Any) -> None:
        """Restart from a checkpoint: transactions go on from its epoch (the one a crash
        left open is aborted at ``open``)."""
        if isinstance(state, Mapping) and "epoch" in state:
            self._epoch = int(state["epoch"])

    def committed(self, state: Any) -> bool:
        """Did the transaction of this checkpoint commit?  Read from the commit marker's
        group (blocking: called once at a restart, before the flow runs)."""
        if not (self.exactly_once and isinstance(state, Mapping) and "epoch" in state):
            return True
        if state.get("records", 1) == 0:  # an epoch that wrote nothing loses nothing
            return True
        epoch = int(state["epoch"])
        self._tid = self._tid_arg or str(state["transactional_id"])
        # First fence the producer of the run that died and abort its open transaction:
        # until then the marker's offset is pending, and reading it would wait for the
        # transaction to time out.
        producer = self._producer = self._new_producer()
        try:
            self._errors.call("init_transactions", producer.init_transactions, 60.0)
        except ck.KafkaException as exc:
            raise KafkaError(
                f"{self._errors.what}: cannot initialise transactions for transactional id "
                f"{self._tid!r}: {exc}"
            ) from exc
        return self._read_marker() >= epoch

    def _read_marker(self) -> int:
        """The epoch of the last committed transaction (0: none), from the marker's group.
        Blocking; only after ``init_transactions`` (else a pending marker blocks it)."""
        consumer = self._marker_consumer()
        try:
            [tp] = consumer.committed([ck.TopicPartition(self._topic, 0)], timeout=30.0)
        except ck.KafkaException as exc:
            raise KafkaError(
                f"{self._errors.what}: cannot read the commit marker of transactional id "
                f"{self._tid!r}: {exc}"
            ) from exc
        finally:
            self._marker = None
            consumer.close()
        return max(0, tp.offset)
