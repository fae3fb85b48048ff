"""Builders of the flow-control family: grouping (``batch``), decoupling (``buffer``),
concurrency (``map_async``) and pacing (``rate_limit``).  See docs/flow-control.md."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from sluiceway.core.channel import Overflow
from sluiceway.errors import FlowDefinitionError
from sluiceway.flow.args import (
    check_breaker,
    check_callable,
    fn_label,
    is_async_callable,
    positive_int,
)
from sluiceway.flow.graph import At, Node, derive
from sluiceway.flowcontrol.adaptive import Adaptive
from sluiceway.flowcontrol.breaker import CircuitBreaker
from sluiceway.flowcontrol.limiters import KeyedLimiter, Limiter
from sluiceway.operators.async_io import AsyncMapSpec
from sluiceway.operators.batching import BatchSpec
from sluiceway.operators.io import SourceSpec
from sluiceway.operators.rate_limit import RateLimitSpec
from sluiceway.operators.stateless import BufferSpec, KeyBySpec
from sluiceway.policies import Fail, check_policy
from sluiceway.time.durations import non_negative_seconds, positive_seconds


def batch(at: At, max_size: int, max_delay: float | timedelta | None, name: str | None) -> Node:
    size = positive_int(max_size, "batch max_size")
    delay = None if max_delay is None else positive_seconds(max_delay, "batch max_delay")
    return derive(at, BatchSpec(size, delay), name, "batch", keyed=False)


def buffer(
    at: At,
    capacity: int,
    overflow: Overflow,
    block_timeout: float | timedelta | None,
    name: str | None,
) -> Node:
    cap = positive_int(capacity, "buffer capacity")
    if not isinstance(overflow, Overflow):
        raise TypeError(
            f"buffer overflow must be an sw.Overflow (BLOCK, DROP_NEWEST, DROP_OLDEST, "
            f"FAIL), got {overflow!r}"
        )
    wait = None
    if block_timeout is not None:
        if overflow not in (Overflow.DROP_NEWEST, Overflow.DROP_OLDEST):
            raise FlowDefinitionError(
                f"buffer(block_timeout=...) waits and then drops: it needs "
                f"Overflow.DROP_NEWEST or DROP_OLDEST, not {overflow.name}"
            )
        wait = non_negative_seconds(block_timeout, "buffer block_timeout")
    return derive(at, BufferSpec(cap, overflow, wait), name, "buffer")


def map_async(
    at: At,
    fn: Callable[[Any], Awaitable[Any]],
    *,
    concurrency: int | Adaptive,
    ordered: bool,
    timeout: float | timedelta | None,
    breaker: CircuitBreaker | None,
    when_open: str,
    name: str | None,
    on_error: object,
) -> Node:
    check_callable(fn, "map_async")
    if not is_async_callable(fn):
        raise TypeError(
            f"map_async() expects an async function (async def), got {fn!r}; "
            "use map() for a plain function"
        )
    if isinstance(concurrency, bool) or not isinstance(concurrency, int | Adaptive):
        raise TypeError(
            f"map_async(concurrency=...) must be an int or sw.Adaptive(...), got {concurrency!r}"
        )
    if isinstance(concurrency, int) and concurrency < 1:
        raise ValueError(f"map_async(concurrency=...) must be >= 1, got {concurrency!r}")
    policy = check_policy(on_error, "map_async()")
    check_breaker(breaker, when_open, policy, "map_async")
    spec = AsyncMapSpec(
        fn,
        concurrency=concurrency,
        ordered=bool(ordered),
        timeout=None if timeout is None else positive_seconds(timeout, "map_async timeout"),
        breaker=breaker,
        when_open=when_open,
        on_error=policy,
    )
    return derive(at, spec, name, f"map_async_{fn_label(fn)}")


def rate_limit(
    at: At,
    limiter: Limiter | KeyedLimiter[Any],
    name: str | None,
    when_limited: str,
    retry_after: float | timedelta,
) -> Node:
    if when_limited not in ("wait", "reject"):
        raise ValueError(
            f"rate_limit(): when_limited must be 'wait' or 'reject', got {when_limited!r}"
        )
    if when_limited == "reject":
        return _rejecting_rate_limit(at, limiter, name, retry_after)
    if isinstance(limiter, KeyedLimiter):
        if not at.node.keyed:
            raise FlowDefinitionError(
                f"rate_limit(): a KeyedLimiter needs a keyed stream; the stream from "
                f"{at.node.describe()} has no keys: call key_by() first"
            )
        keyed = True
    elif isinstance(limiter, Limiter):
        keyed = False
    elif inspect.iscoroutinefunction(getattr(limiter, "try_acquire", None)) and (
        inspect.iscoroutinefunction(getattr(limiter, "acquire", None))
    ):  # a remote limiter, e.g. sluiceway.flowcontrol.redis.RedisLimiter
        return derive(
            at,
            RateLimitSpec(limiter, keyed=False, remote=True),
            name,
            f"rate_limit_{type(limiter).__name__}",
        )
    else:
        raise TypeError(
            "rate_limit() expects a limiter from sw.flowcontrol (TokenBucket, LeakyBucket, "
            "FixedWindow, SlidingWindowLog, SlidingWindowCounter, KeyedLimiter, or a "
            f"RedisLimiter), got {limiter!r}"
        )
    label = type(limiter).__name__
    return derive(at, RateLimitSpec(limiter, keyed=keyed), name, f"rate_limit_{label}")


def _rejecting_rate_limit(
    at: At, limiter: object, name: str | None, retry_after: float | timedelta
) -> Node:
    delay = positive_seconds(retry_after, "rate_limit() retry_after")
    keyed = isinstance(limiter, KeyedLimiter)
    if not keyed and not isinstance(limiter, Limiter):
        raise TypeError(
            "rate_limit(when_limited='reject') needs a local limiter from sw.flowcontrol "
            f"(TokenBucket, ..., KeyedLimiter), got {limiter!r}"
        )
    source_node = _reject_source(at.node)
    assert isinstance(source_node.spec, SourceSpec)
    source = source_node.spec.source
    if not source.can_redeliver:
        raise FlowDefinitionError(
            f"rate_limit(when_limited='reject'): source {source_node.describe()} "
            f"({source.describe()}) cannot hand records back to a broker for later; "
            "reject works after NATS JetStream, RabbitMQ and Redis Streams sources -- "
            "use when_limited='wait' (the source is paused by backpressure) instead"
        )
    if keyed and not at.node.keyed:
        raise FlowDefinitionError(
            f"rate_limit(): a KeyedLimiter needs a keyed stream; the stream from "
            f"{at.node.describe()} has no keys: call key_by() first"
        )
    spec = RateLimitSpec(limiter, keyed=keyed, source=source, retry_after=delay)
    return derive(at, spec, name, f"rate_limit_{type(limiter).__name__}")


def _reject_source(node: Node) -> Node:
    """The source node a rejecting rate limit hands records back to: ``node`` itself, or
    the source behind a ``key_by`` that cannot drop records (its policy is ``Fail``)."""
    at = node
    if isinstance(at.spec, KeyBySpec) and isinstance(at.spec.on_error, Fail) and at.inputs:
        at = at.inputs[0]
    if not isinstance(at.spec, SourceSpec):
        raise FlowDefinitionError(
            f"rate_limit(when_limited='reject') must follow its broker source directly (or "
            f"through key_by), so each rejected record can be handed back; it follows "
            f"{node.describe()}"
        )
    return at
