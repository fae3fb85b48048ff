"""Distributed rate limits: one limit shared by every process that talks to one Redis.

:class:`RedisLimiter` runs a rate-limiting algorithm as a Lua script inside Redis, so
each decision (read the state, refill or count, admit or refuse, write back) is one
atomic step however many processes, on however many machines, share the limit.  Time is
read by the script (``redis.call('TIME')``), so the clients' clocks never matter.  The
algorithms are those of the local limiters (:mod:`sluiceway.flowcontrol.limiters`), each
chosen with a small frozen spec:

==================================================  ====================================
``RedisLimiter.token_bucket(rate, burst)``          ``burst`` tokens, refilled at
                                                    ``rate`` per second: at most
                                                    ``burst + rate * t`` units in any
                                                    ``t`` seconds
``RedisLimiter.fixed_window(limit, window)``        at most ``limit`` units per window
                                                    ``[k * window, (k + 1) * window)``
                                                    of Redis time; cheap, but up to
                                                    ``2 * limit`` across a boundary
``RedisLimiter.sliding_window_log(limit, window)``  at most ``limit`` units in *every*
                                                    interval of ``window`` seconds
                                                    (exact; a sorted-set entry per unit)
==================================================  ====================================

Requests for one unit each, ``limit=3`` per ``window=1 s``, ``o`` admitted, ``x`` refused::

    time (s)         0.9 0.9 0.9 | 1.1 1.1 1.1 | 1.95
    fixed window      o   o   o  |  o   o   o  |  x     6 units within 0.2 s
    sliding log       o   o   o  |  x   x   x  |  o     never more than 3 in 1 s

The sliding log pays for its exactness in memory (about 80 bytes per unit admitted in the
last ``window``, per key) and ``O(log n)`` per call; the fixed window keeps one counter.
(A sliding-window *counter* is not offered: it is approximate, and the log is exact.)

Keys are ``prefix:name`` or ``prefix:name:key`` (one key per subject, e.g. per user).
Every key has a TTL: an idle key expires once forgetting it changes nothing (a full
bucket, a finished window), so per-user keys do not pile up.  Every client that shares a
``name`` must use the same algorithm and parameters.

>>> RedisLimiter.token_bucket(rate=100, burst=20)
TokenBucketSpec(rate=100.0, burst=20)
>>> RedisLimiter.sliding_window_log(limit=5, window=timedelta(minutes=1))
SlidingWindowLogSpec(limit=5, window=60.0)
>>> RedisLimiter.fixed_window(limit=0, window=1)
Traceback (most recent call last):
    ...
ValueError: fixed_window limit must be an int >= 1, got 0

Use (needs a running Redis)::

    limiter = RedisLimiter("redis://localhost:6379/0", "geocoder",
                           RedisLimiter.token_bucket(rate=50, burst=10))
    if await limiter.try_acquire():         # admitted now, or False at once
        ...
    await limiter.acquire(key="user-42")   # waits until admitted
    await limiter.close()

Unlike the local limiters' FIFO reservations, :meth:`RedisLimiter.acquire` asks Redis
again when the script says the units are due: waiters in several processes are not
queued, and one may be overtaken by another.

When Redis cannot be reached (connection refused or lost, a timeout, a read-only replica
during a failover, a Redis out of memory) the limiter decides alone, as
``on_unavailable`` says: ``"fail_closed"`` (the default) refuses -- ``try_acquire``
returns False and ``acquire`` raises :class:`RedisUnavailableError` -- and
``"fail_open"`` admits everything.  Either way one warning is logged on the
``sluiceway`` logger per outage (and one info line when Redis is back).  During an outage
Redis is tried again at most once per ``recheck_interval`` seconds; the calls in between
decide at once.

Errors (both are :class:`~sluiceway.errors.SluicewayError`; bad arguments are
``ValueError`` / ``TypeError``)::

    RedisLimiterError          Redis answered with an error (e.g. WRONGTYPE: another
    │                          program uses the key; a wrong password)
    └── RedisUnavailableError  acquire() under fail_closed while Redis is unreachable
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from sluiceway.errors import ClosedResourceError, SluicewayError
from sluiceway.flowcontrol.redis_scripts import (
    _US,
    FixedWindowSpec,
    RedisAlgorithm,
    SlidingWindowLogSpec,
    TokenBucketSpec,
    _script_for,
    _window_seconds,
)
from sluiceway.time.clock import Clock, SystemClock
from sluiceway.time.durations import non_negative_seconds, positive_seconds

try:
    import redis.asyncio as aioredis
    from redis import exceptions as redis_errors
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "sluiceway.flowcontrol.redis needs the 'redis' package (>= 5): "
        "pip install 'sluiceway[redis]'"
    ) from exc

__all__ = [
    "FixedWindowSpec",
    "OnUnavailable",
    "RedisAlgorithm",
    "RedisDecision",
    "RedisLimiter",
    "RedisLimiterError",
    "RedisLimiterStatistics",
    "RedisUnavailableError",
    "SlidingWindowLogSpec",
    "TokenBucketSpec",
]

log = logging.getLogger("sluiceway")

OnUnavailable = Literal["fail_closed", "fail_open"]

_MIN_WAIT = 0.001  # acquire() never re-polls Redis sooner than this


class RedisLimiterError(SluicewayError):
    """Redis answered a limiter script with an error (not an outage)."""


class RedisUnavailableError(RedisLimiterError):
    """``acquire()`` under ``on_unavailable="fail_closed"`` while Redis is unreachable."""


# -- results ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RedisDecision:
    """What one call to :meth:`RedisLimiter.decide` concluded.

    Attributes:
        admitted: the units were taken.
        retry_after: seconds until a retry could succeed (0.0 when admitted); a hint,
            since other clients may take the units first.
        remaining: units (tokens) left after this call; None when Redis was unavailable.
        redis_time: Redis' clock (seconds since the epoch) when it decided; None when
            Redis was unavailable and ``on_unavailable`` decided.
    """

    admitted: bool
    retry_after: float
    remaining: float | None
    redis_time: float | None

    @property
    def unavailable(self) -> bool:
        """True when Redis could not be reached and ``on_unavailable`` decided."""
        return self.redis_time is None


@dataclass(frozen=True, slots=True)
class RedisLimiterStatistics:
    """Counters of one :class:`RedisLimiter` (this process only).

    Attributes:
        admitted: calls that took their units (by Redis or by fail_open).
        refused: calls that were refused (by Redis or by fail_closed).
        unavailable: calls decided without Redis (it was unreachable).
        script_loads: SCRIPT LOAD round trips (1, plus one after each NOSCRIPT reply).
    """

    admitted: int
    refused: int
    unavailable: int
    script_loads: int


# -- the limiter -----------------------------------------------------------------------


class _Outage(Exception):
    """Redis could not be reached (internal: turned into a fail_open/closed decision)."""


class RedisLimiter:
    """A rate limit shared through Redis by every process that uses the same ``name``.

    Args:
        url_or_client: a Redis URL (``redis://host:6379/0``; the limiter creates the
            client and :meth:`close` closes it) or a ``redis.asyncio.Redis`` client (the
            caller keeps ownership; its own timeouts and retry policy then apply).
        name: the limit's name; the middle part of every key.  No ``:`` in it.
        algorithm: :meth:`token_bucket`, :meth:`fixed_window` or :meth:`sliding_window_log`.
        on_unavailable: ``"fail_closed"`` (refuse; ``acquire`` raises) or
            ``"fail_open"`` (admit) while Redis cannot be reached.
        key: the default key (subject) of calls that pass none; None means one shared
            limit (key ``prefix:name``).
        prefix: the first part of every key.
        clock: what :meth:`acquire` sleeps on and outages are timed with.  Decisions use
            Redis' own clock, so keep the default :class:`SystemClock` outside tests.
        timeout: seconds a command may take before Redis counts as unavailable (for a
            client built from a URL).
        recheck_interval: during an outage, seconds between attempts to reach Redis.

    Raises:
        ValueError, TypeError: for a bad argument, naming it.
    """

    def __init__(
        self,
        url_or_client: str | aioredis.Redis,
        name: str,
        algorithm: RedisAlgorithm,
        *,
        on_unavailable: OnUnavailable = "fail_closed",
        key: str | None = None,
        prefix: str = "sluiceway",
        clock: Clock | None = None,
        timeout: float | timedelta = 1.0,
        recheck_interval: float | timedelta = 1.0,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"RedisLimiter name must be a str, got {name!r}")
        if not name or ":" in name:
            raise ValueError(f"RedisLimiter name must be a non-empty str without ':', got {name!r}")
        if not isinstance(algorithm, TokenBucketSpec | FixedWindowSpec | SlidingWindowLogSpec):
            raise TypeError(
                "RedisLimiter algorithm must be RedisLimiter.token_bucket(...), "
                f".fixed_window(...) or .sliding_window_log(...), got {algorithm!r}"
            )
        if on_unavailable not in ("fail_closed", "fail_open"):
            raise ValueError(
                "RedisLimiter on_unavailable must be 'fail_closed' or 'fail_open', "
                f"got {on_unavailable!r}"
            )
        if not isinstance(prefix, str):
            raise TypeError(f"RedisLimiter prefix must be a str, got {prefix!r}")
        if not prefix:
            raise ValueError(f"RedisLimiter prefix must be a non-empty str, got {prefix!r}")
        _check_key(key)
        if clock is not None and not isinstance(clock, Clock):
            raise TypeError(f"RedisLimiter clock must be a sluiceway Clock, got {clock!r}")
        timeout_s = positive_seconds(timeout, "RedisLimiter timeout")
        self.recheck_interval = non_negative_seconds(
            recheck_interval, "RedisLimiter recheck_interval"
        )
        if isinstance(url_or_client, str):
            self._client: aioredis.Redis = aioredis.Redis.from_url(
                url_or_client,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                # One retry on a fresh connection (a pooled one dies when Redis restarts),
                # no backoff: an outage must be seen in milliseconds, not seconds.
                retry=Retry(NoBackoff(), 1),
            )
            self._owns_client = True
        elif isinstance(url_or_client, aioredis.Redis):
            self._client = url_or_client
            self._owns_client = False
        else:
            raise TypeError(
                "RedisLimiter needs a Redis URL (str) or a redis.asyncio.Redis client, "
                f"got {url_or_client!r}"
            )
        self.name = name
        self.algorithm = algorithm
        self.on_unavailable: OnUnavailable = on_unavailable
        self.key = key
        self.prefix = prefix
        self._clock = clock if clock is not None else SystemClock()
        self._where = _describe(self._client)
        self._script, self._static_args = _script_for(algorithm)
        self._sha: str | None = None
        self._member_prefix = secrets.token_hex(6)
        self._calls = 0
        self._down_since: float | None = None  # clock.monotonic() of the outage's start
        self._last_error = ""
        self._next_probe = 0.0
        self._closed = False
        self._admitted = 0
        self._refused = 0
        self._unavailable = 0
        self._script_loads = 0

    # -- algorithm constructors ---------------------------------------------------------

    @staticmethod
    def token_bucket(rate: float, burst: int) -> TokenBucketSpec:
        """A token bucket: ``burst`` tokens, refilled at ``rate`` tokens per second.

        Admits at most ``burst + rate * t`` units in any ``t`` seconds.
        """
        return TokenBucketSpec(rate=rate, burst=burst)

    @staticmethod
    def fixed_window(limit: int, window: float | timedelta) -> FixedWindowSpec:
        """At most ``limit`` units per ``window`` (seconds or timedelta, >= 1 ms)."""
        return FixedWindowSpec(limit=limit, window=_window_seconds(window, "fixed_window window"))

    @staticmethod
    def sliding_window_log(limit: int, window: float | timedelta) -> SlidingWindowLogSpec:
        """At most ``limit`` units in every interval of ``window`` (a sliding log)."""
        return SlidingWindowLogSpec(
            limit=limit, window=_window_seconds(window, "sliding_window_log window")
        )

    # -- the API --------------------------------------------------------------------------

    async def try_acquire(self, n: int = 1, key: str | None = None) -> bool:
        """Take ``n`` units now if the limit allows; never waits for units.

        Returns:
            True if admitted (or Redis is unavailable under fail_open), else False.

        Raises:
            TypeError, ValueError: ``n`` is not an int in ``1 .. max_units``.
            RedisLimiterError: Redis answered with an error.
            ClosedResourceError: after :meth:`close`.
        """
        return (await self.decide(n, key)).admitted

    async def acquire(self, n: int = 1, key: str | None = None) -> None:
        """Take ``n`` units, sleeping on the clock until the limit allows it.

        Sleeps for the script's hint of when the units are due, then asks again (other
        clients may have taken them meanwhile).

        Raises:
            RedisUnavailableError: Redis is unreachable and ``on_unavailable`` is
                ``"fail_closed"``.
            TypeError, ValueError, RedisLimiterError, ClosedResourceError: as
                :meth:`try_acquire`.
        """
        while True:
            decision = await self.decide(n, key)
            if decision.admitted:
                return
            if decision.unavailable:
                raise RedisUnavailableError(
                    f"rate limiter {self.name!r} cannot reach Redis at {self._where} "
                    f"({self._last_error}) and is fail_closed; pass "
                    "on_unavailable='fail_open' to admit during outages"
                )
            await self._clock.sleep(max(_MIN_WAIT, decision.retry_after))

    async def decide(self, n: int = 1, key: str | None = None) -> RedisDecision:
        """Like :meth:`try_acquire`, but returns the whole :class:`RedisDecision`.

        ``retry_after`` is what an HTTP ``Retry-After`` header wants;
        ``redis_time`` says when Redis admitted it.
        """
        if self._closed:
            raise ClosedResourceError(f"rate limiter {self.name!r} is closed")
        self._check_n(n)
        full_key = self._full_key(self.key if key is None else _check_key(key))
        now = self._clock.monotonic()
        if self._down_since is not None and now < self._next_probe:
            return self._without_redis()
        if self._down_since is not None:
            self._next_probe = now + self.recheck_interval  # one probe per interval
        try:
            reply = await self._run(full_key, n)
        except _Outage as exc:
            self._note_outage(exc)
            return self._without_redis()
        if self._down_since is not None:
            log.info(
                "rate limiter %r: Redis at %s is reachable again after %.1f s",
                self.name,
                self._where,
                self._clock.monotonic() - self._down_since,
            )
            self._down_since = None
        admitted = bool(int(reply[0]))
        if admitted:
            self._admitted += 1
        else:
            self._refused += 1
        return RedisDecision(
            admitted=admitted,
            retry_after=int(reply[1]) / _US,
            remaining=float(reply[3]),
            redis_time=int(reply[2]) / _US,
        )

    def statistics(self) -> RedisLimiterStatistics:
        """This limiter's counters so far (this process only)."""
        return RedisLimiterStatistics(
            admitted=self._admitted,
            refused=self._refused,
            unavailable=self._unavailable,
            script_loads=self._script_loads,
        )

    async def close(self) -> None:
        """Stop the limiter; closes the Redis client if the limiter created it.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()

    async def aclose(self) -> None:
        """The same as :meth:`close` (for ``contextlib.aclosing``)."""
        await self.close()

    async def __aenter__(self) -> None:
        """``async with limiter:`` acquires one unit, as with the local limiters."""
        await self.acquire(1)

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    @property
    def max_units(self) -> int:
        """The most units one call can take (the bucket's ``burst``, the ``limit``)."""
        return self.algorithm.max_units

    def __repr__(self) -> str:
        return (
            f"RedisLimiter({self._where!r}, {self.name!r}, {self.algorithm!r}, "
            f"on_unavailable={self.on_unavailable!r})"
        )

    # -- internals --------------------------------------------------------------------

    def _check_n(self, n: object) -> None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"rate limiter {self.name!r}: n must be an int >= 1, got {n!r}")
        if n < 1:
            raise ValueError(f"rate limiter {self.name!r}: n must be >= 1 unit, got {n}")
        most = self.algorithm.max_units
        if n > most:
            raise ValueError(
                f"rate limiter {self.name!r} can never take n={n} units at once (at most "
                f"{most}); split the request into parts of at most {most} units"
            )

    def _full_key(self, key: str | None) -> str:
        base = f"{self.prefix}:{self.name}"
        return base if key is None else f"{base}:{key}"

    async def _run(self, full_key: str, n: int) -> list[Any]:
        """Run the script (loading it first if needed, again after NOSCRIPT)."""
        self._calls += 1
        args: list[str | int | float] = [*self._static_args, n]
        if isinstance(self.algorithm, SlidingWindowLogSpec):
            args.append(f"{self._member_prefix}:{self._calls}:")
        try:
            for attempt in range(2):
                if self._sha is None:
                    self._sha = str(await self._client.script_load(self._script))
                    self._script_loads += 1
                try:
                    reply: list[Any] = await self._client.evalsha(self._sha, 1, full_key, *args)
                except redis_errors.NoScriptError:
                    # Redis restarted or SCRIPT FLUSH: load it again and retry once.
                    self._sha = None
                    if attempt == 1:
                        raise
                else:
                    return reply
        except (
            redis_errors.AuthenticationError,
            redis_errors.AuthorizationError,
        ) as exc:  # a ConnectionError subclass, but a configuration mistake, not an outage
            raise RedisLimiterError(
                f"rate limiter {self.name!r}: Redis at {self._where} refused access: {exc}"
            ) from exc
        except (
            redis_errors.ConnectionError,
            redis_errors.TimeoutError,
            redis_errors.ReadOnlyError,  # a replica, during a failover
            redis_errors.ClusterDownError,
            redis_errors.OutOfMemoryError,  # Redis refuses writes: it cannot keep count
        ) as exc:
            raise _Outage(f"{type(exc).__name__}: {exc}") from exc
        except redis_errors.RedisError as exc:
            raise RedisLimiterError(
                f"rate limiter {self.name!r}: Redis at {self._where} failed the "
                f"{type(self.algorithm).__name__} script on key {full_key!r}: "
                f"{type(exc).__name__}: {exc} (is another program using this key?)"
            ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _note_outage(self, exc: _Outage) -> None:
        now = self._clock.monotonic()
        self._next_probe = now + self.recheck_interval
        self._last_error = str(exc)
        if self._down_since is None:
            self._down_since = now
            action = "admitting" if self.on_unavailable == "fail_open" else "refusing"
            log.warning(
                "rate limiter %r cannot reach Redis at %s (%s); %s every request "
                "(on_unavailable=%r) until it is back, retrying every %.3g s",
                self.name,
                self._where,
                exc,
                action,
                self.on_unavailable,
                self.recheck_interval,
            )

    def _without_redis(self) -> RedisDecision:
        self._unavailable += 1
        if self.on_unavailable == "fail_open":
            self._admitted += 1
            return RedisDecision(admitted=True, retry_after=0.0, remaining=None, redis_time=None)
        self._refused += 1
        wait = max(0.0, self._next_probe - self._clock.monotonic())
        return RedisDecision(admitted=False, retry_after=wait, remaining=None, redis_time=None)


def _check_key(key: object) -> str | None:
    if key is not None and not isinstance(key, str):
        raise TypeError(f"rate limiter key must be a str or None, got {key!r}")
    return key


def _describe(client: aioredis.Redis) -> str:
    """``host:port/db`` of a client, without credentials (for log lines and errors)."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
