"""Builders of the joins family: two keyed streams joined by window, interval, as-of or
as a temporal table, and a keyed stream enriched from an external system
(``lookup_join``).  See docs/joins.md."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Literal

from sluiceway.errors import FlowDefinitionError
from sluiceway.flow.args import (
    check_breaker,
    check_callable,
    check_choice,
    fn_label,
    is_async_callable,
    positive_int,
    ticks_of,
)
from sluiceway.flow.graph import At, Node, derive
from sluiceway.flowcontrol.adaptive import Adaptive
from sluiceway.flowcontrol.breaker import CircuitBreaker
from sluiceway.joins.asof import AsOfJoinSpec, TemporalJoinSpec
from sluiceway.joins.base import JoinSpec
from sluiceway.joins.interval import IntervalJoinSpec
from sluiceway.joins.latest import LatestJoinSpec
from sluiceway.joins.lookup import LookupJoinSpec
from sluiceway.joins.window import WindowJoinSpec
from sluiceway.operators.stateless import FilterSpec
from sluiceway.policies import Fail, check_policy
from sluiceway.time.durations import positive_seconds
from sluiceway.windows.assigners import Session, Sliding, Tumbling


def join(
    at: At, other: At, spec: JoinSpec, method: str, name: str | None, *, event_time: bool = True
) -> Node:
    """Add the two-input join ``spec`` of ``at`` (input 0) and ``other`` (1), a stream
    (checked by the caller)."""
    if other.flow is not at.flow:
        raise FlowDefinitionError(
            f"{method}(): {other!r} belongs to flow {other.flow.name!r}, not {at.flow.name!r}"
        )
    if other.node is at.node:
        raise FlowDefinitionError(f"{method}(): a stream cannot be joined with itself")
    for side, s in (("left", at), ("right", other)):
        if not s.node.keyed:
            raise FlowDefinitionError(
                f"{method}(): the {side} input, the stream from {s.node.describe()}, has "
                "no keys; call .key_by(fn) on it first (both inputs are joined by key)"
            )
        if event_time and not s.node.timestamped:
            raise FlowDefinitionError(
                f"{method}(): the {side} input, the stream from {s.node.describe()}, has "
                "no event time; call .with_timestamps(fn, max_out_of_orderness) on it first"
            )
    return at.flow._add(
        spec,
        [at.node, other.node],
        name,
        f"{method}_{other.node.name}",
        keyed=True,
        timestamped=event_time or at.node.timestamped,
    )


def window_join_spec(
    assigner: object, how: Literal["inner", "left", "full"], allowed_lateness: float | timedelta
) -> WindowJoinSpec:
    if not isinstance(assigner, Tumbling | Sliding | Session):
        raise TypeError(
            "window_join() expects sw.windows.Tumbling(...), Sliding(...) or "
            f"Session(...), got {assigner!r}"
        )
    check_choice(how, ("inner", "left", "full"), "window_join(how=...)")
    lateness = ticks_of(allowed_lateness, "window_join(allowed_lateness=...)")
    return WindowJoinSpec(assigner, how, lateness)


def interval_join_spec(
    lower: float | timedelta,
    upper: float | timedelta,
    how: Literal["inner", "left"],
    allowed_lateness: float | timedelta,
) -> IntervalJoinSpec:
    check_choice(how, ("inner", "left"), "interval_join(how=...)")
    lo = ticks_of(lower, "interval_join(lower=...)", signed=True)
    hi = ticks_of(upper, "interval_join(upper=...)", signed=True)
    if lo > hi:
        raise ValueError(f"interval_join(): lower ({lower!r}) must be <= upper ({upper!r})")
    lateness = ticks_of(allowed_lateness, "interval_join(allowed_lateness=...)")
    return IntervalJoinSpec(lo, hi, how, lateness)


def asof_join_spec(
    tolerance: float | timedelta | None,
    how: Literal["inner", "left"],
    allowed_lateness: float | timedelta,
) -> AsOfJoinSpec:
    check_choice(how, ("inner", "left"), "asof_join(how=...)")
    tol = None if tolerance is None else ticks_of(tolerance, "asof_join(tolerance=...)")
    lateness = ticks_of(allowed_lateness, "asof_join(allowed_lateness=...)")
    return AsOfJoinSpec(how, lateness, tolerance=tol)


def temporal_join_spec(
    is_delete: Callable[[Any], object] | None,
    how: Literal["inner", "left"],
    time: Literal["event", "processing"],
    allowed_lateness: float | timedelta,
) -> JoinSpec:
    """The event-time temporal join (a :class:`TemporalJoinSpec`, whose results have late
    records) or, with ``time="processing"``, the latest-row join."""
    check_choice(how, ("inner", "left"), "temporal_join(how=...)")
    if is_delete is not None:
        check_callable(is_delete, "temporal_join(is_delete=...)")
    if time == "processing":
        if allowed_lateness:
            raise TypeError(
                "temporal_join(time='processing') does not wait for watermarks: "
                "allowed_lateness has no meaning there"
            )
        return LatestJoinSpec(how, is_delete)
    check_choice(time, ("event", "processing"), "temporal_join(time=...)")
    lateness = ticks_of(allowed_lateness, "temporal_join(allowed_lateness=...)")
    return TemporalJoinSpec(how, lateness, tolerance=None, is_delete=is_delete)


def lookup_join(
    at: At,
    fetch: Callable[[Any], Awaitable[Any]],
    *,
    how: Literal["inner", "left"],
    cache_size: int,
    ttl: float | timedelta | None,
    concurrency: int | Adaptive,
    timeout: float | timedelta | None,
    breaker: CircuitBreaker | None,
    when_open: str,
    name: str | None,
    on_error: object,
) -> Node:
    if not is_async_callable(fetch):
        raise TypeError(
            f"lookup_join() expects an async function fetch(key) (async def), got {fetch!r}"
        )
    check_choice(how, ("inner", "left"), "lookup_join(how=...)")
    size = positive_int(cache_size, "lookup_join cache_size")
    ttl_s = None if ttl is None else positive_seconds(ttl, "lookup_join ttl")
    if isinstance(concurrency, bool) or not isinstance(concurrency, int | Adaptive):
        raise TypeError(
            f"lookup_join(concurrency=...) must be an int or sw.Adaptive(...), got {concurrency!r}"
        )
    if isinstance(concurrency, int):
        positive_int(concurrency, "lookup_join concurrency")
    policy = check_policy(on_error, "lookup_join()")
    check_breaker(breaker, when_open, policy, "lookup_join")
    spec = LookupJoinSpec(
        fetch,
        cache_size=size,
        ttl=ttl_s,
        concurrency=concurrency,
        ordered=True,
        timeout=None if timeout is None else positive_seconds(timeout, "lookup_join timeout"),
        breaker=breaker,
        when_open=when_open,
        on_error=policy,
    )
    node = derive(at, spec, name, f"lookup_join_{fn_label(fetch)}")
    if how == "inner":
        node = at.flow._add(
            FilterSpec(_has_row, Fail()),
            [node],
            None,
            f"{node.name}_found",
            keyed=True,
            timestamped=node.timestamped,
        )
    return node


def _has_row(pair: tuple[Any, Any]) -> bool:
    return pair[1] is not None
