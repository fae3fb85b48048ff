"""What the Redis rate limiter runs in Redis: the algorithm specs users configure it with
(:class:`TokenBucketSpec`, :class:`FixedWindowSpec`, :class:`SlidingWindowLogSpec`) and
the Lua script of each, which decides atomically on the server.  Pure data: no client
needed here; :mod:`sluiceway.flowcontrol.redis` runs them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from sluiceway.time.durations import positive_seconds

__all__ = ["FixedWindowSpec", "RedisAlgorithm", "SlidingWindowLogSpec", "TokenBucketSpec"]

_US = 1_000_000  # microseconds per second: the scripts count time in integer microseconds
_TTL_MARGIN_MS = 1000  # keys live this much longer than strictly needed (clock jitter)
_MAX_TTL_S = 10 * 365 * 86400.0  # cap for absurdly slow buckets (forgetting is then lenient)


def _int_at_least_1(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return value


def _window_seconds(value: object, what: str) -> float:
    seconds = positive_seconds(value, what)
    if seconds < 0.001:
        raise ValueError(f"{what} must be >= 0.001 seconds (1 ms), got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class TokenBucketSpec:
    """A bucket of ``burst`` tokens, refilled continuously at ``rate`` tokens per second.

    Use :meth:`RedisLimiter.token_bucket` to build one (it checks the values).
    """

    rate: float
    burst: int

    def __post_init__(self) -> None:
        rate = self.rate
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise TypeError(f"token_bucket rate must be a number (per second), got {rate!r}")
        if not 0 < rate < math.inf:
            raise ValueError(f"token_bucket rate must be > 0 and finite, got {rate!r}")
        object.__setattr__(self, "rate", float(rate))
        _int_at_least_1(self.burst, "token_bucket burst")

    @property
    def max_units(self) -> int:
        """The most units one call can ever take (``burst``)."""
        return self.burst


@dataclass(frozen=True, slots=True)
class FixedWindowSpec:
    """At most ``limit`` units per ``window`` seconds, windows aligned on Redis time."""

    limit: int
    window: float

    def __post_init__(self) -> None:
        _int_at_least_1(self.limit, "fixed_window limit")
        object.__setattr__(self, "window", _window_seconds(self.window, "fixed_window window"))

    @property
    def max_units(self) -> int:
        """The most units one call can ever take (``limit``)."""
        return self.limit


@dataclass(frozen=True, slots=True)
class SlidingWindowLogSpec:
    """At most ``limit`` units in every interval of ``window`` seconds (a sliding log)."""

    limit: int
    window: float

    def __post_init__(self) -> None:
        _int_at_least_1(self.limit, "sliding_window_log limit")
        window = _window_seconds(self.window, "sliding_window_log window")
        object.__setattr__(self, "window", window)

    @property
    def max_units(self) -> int:
        """The most units one call can ever take (``limit``)."""
        return self.limit


RedisAlgorithm = TokenBucketSpec | FixedWindowSpec | SlidingWindowLogSpec


# -- the Lua scripts -------------------------------------------------------------------
# Each returns {admitted (0/1), wait_us (0 when admitted), now_us, remaining (string)}.
# Numbers passed to redis.call are formatted exactly by Redis ("%.17g"); tostring()
# would round to 14 digits, so none is used on times.

_PREAMBLE = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

_TOKEN_BUCKET = (
    _PREAMBLE
    + """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local s = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(s[1])
local ts = tonumber(s[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
elseif now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000000)
  ts = now
end
if tokens >= n then
  tokens = tokens - n
  redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', ts)
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {1, 0, now, string.format('%.17g', tokens)}
end
local wait = math.ceil((n - tokens) * 1000000 / rate)
if ts > now then wait = wait + (ts - now) end
return {0, wait, now, string.format('%.17g', tokens)}
"""
)

_FIXED_WINDOW = (
    _PREAMBLE
    + """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local win = math.floor(now / window)
local s = redis.call('HMGET', KEYS[1], 'w', 'c')
local w = tonumber(s[1])
local count = 0
if w ~= nil and w >= win then
  win = w
  count = tonumber(s[2]) or 0
end
local reset = (win + 1) * window
if count + n <= limit then
  count = count + n
  redis.call('HSET', KEYS[1], 'w', win, 'c', count)
  redis.call('PEXPIRE', KEYS[1], math.ceil((reset - now) / 1000) + 1000)
  return {1, 0, now, string.format('%d', limit - count)}
end
return {0, reset - now, now, string.format('%d', limit - count)}
"""
)

_SLIDING_WINDOW = (
    _PREAMBLE
    + """
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local member = ARGV[4]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count + n <= limit then
  local args = {}
  for i = 1, n do
    args[#args + 1] = now
    args[#args + 1] = member .. i
    if #args >= 1000 or i == n then
      redis.call('ZADD', KEYS[1], unpack(args))
      args = {}
    end
  end
  redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1000)
  return {1, 0, now, string.format('%d', limit - count - n)}
end
local idx = count + n - limit - 1
local due = redis.call('ZRANGE', KEYS[1], idx, idx, 'WITHSCORES')
local wait = 1
if due[2] then wait = math.max(1, tonumber(due[2]) + window - now) end
return {0, wait, now, string.format('%d', limit - count)}
"""
)


def _script_for(algorithm: RedisAlgorithm) -> tuple[str, list[str | int | float]]:
    """The Lua source and the fixed leading ARGV of ``algorithm``."""
    if isinstance(algorithm, TokenBucketSpec):
        # An idle bucket is full after burst / rate seconds: then forgetting it is exact.
        fill_s = min(algorithm.burst / algorithm.rate, _MAX_TTL_S)
        ttl_ms = math.ceil(fill_s * 1000) + _TTL_MARGIN_MS
        return _TOKEN_BUCKET, [repr(algorithm.rate), algorithm.burst, ttl_ms]
    window_us = max(1, round(algorithm.window * _US))
    if isinstance(algorithm, FixedWindowSpec):
        return _FIXED_WINDOW, [algorithm.limit, window_us]
    return _SLIDING_WINDOW, [algorithm.limit, window_us]
