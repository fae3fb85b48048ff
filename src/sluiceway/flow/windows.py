"""Builders of the event-time and windows family: ``with_timestamps`` (event time and
watermarks), ``window(...)`` and its aggregations, and the late-record side output that
windows and joins share.  See docs/windows.md."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from sluiceway.agg import Aggregator
from sluiceway.errors import FlowDefinitionError
from sluiceway.flow.args import check_callable, fn_label
from sluiceway.flow.graph import At, Node, derive
from sluiceway.joins.base import JoinSpec
from sluiceway.operators.event_time import WithTimestampsSpec
from sluiceway.operators.stateless import LateOutputSpec
from sluiceway.policies import check_policy
from sluiceway.time.durations import non_negative_seconds, positive_seconds
from sluiceway.watermarks import BoundedOutOfOrderness, Monotonic, WatermarkStrategy
from sluiceway.windows.assigners import Session, Sliding, Tumbling
from sluiceway.windows.operator import Aggregation, WindowSpec


def with_timestamps(
    at: At,
    fn: Callable[[Any], object],
    max_out_of_orderness: float | timedelta | None,
    *,
    watermarks: WatermarkStrategy | None,
    idle_timeout: float | timedelta | None,
    advance_when_idle: float | timedelta | None,
    name: str | None,
    on_error: object,
) -> Node:
    check_callable(fn, "with_timestamps")
    if watermarks is not None and max_out_of_orderness is not None:
        raise TypeError("with_timestamps(): give max_out_of_orderness or watermarks, not both")
    if watermarks is None:
        watermarks = BoundedOutOfOrderness(max_out_of_orderness or 0.0)
    elif not isinstance(watermarks, BoundedOutOfOrderness | Monotonic):
        raise TypeError(
            "with_timestamps(watermarks=...) expects sw.watermarks.BoundedOutOfOrderness(...) "
            f"or sw.watermarks.Monotonic(), got {watermarks!r}"
        )
    bound = round(watermarks.bound * 1_000_000)
    idle = None if idle_timeout is None else positive_seconds(idle_timeout, "idle_timeout")
    adv = (
        None
        if advance_when_idle is None
        else positive_seconds(advance_when_idle, "advance_when_idle")
    )
    policy = check_policy(on_error, "with_timestamps()")
    spec = WithTimestampsSpec(fn, bound, idle_timeout=idle, advance_when_idle=adv, on_error=policy)
    return derive(at, spec, name, f"with_timestamps_{fn_label(fn)}", timestamped=True)


def window_args(
    at: At,
    assigner: object,
    allowed_lateness: float | timedelta,
    early_every: float | timedelta | None,
    time: str,
) -> tuple[int, float | None, bool]:
    """``window(...)``'s arguments checked: ``(lateness in ticks, early_every,
    processing_time)``."""
    if not isinstance(assigner, Tumbling | Sliding | Session):
        raise TypeError(
            "window() expects sw.windows.Tumbling(...), Sliding(...) or Session(...), "
            f"got {assigner!r}"
        )
    if time not in ("event", "processing"):
        raise ValueError(f"window(time=...) must be 'event' or 'processing', got {time!r}")
    if time == "event" and not at.node.timestamped:
        raise FlowDefinitionError(
            f"window(): the stream from {at.node.describe()} has no event time; call "
            ".with_timestamps(fn, max_out_of_orderness) before it, or use "
            "window(..., time='processing')"
        )
    lateness = non_negative_seconds(allowed_lateness, "allowed_lateness")
    early = None if early_every is None else positive_seconds(early_every, "early_every")
    return round(lateness * 1_000_000), early, time == "processing"


def aggregation(
    agg: Sequence[Aggregator[Any, Any]], named: dict[str, Aggregator[Any, Any]]
) -> Aggregation:
    """``aggregate(one)`` or ``aggregate(name=one, ...)``, checked."""
    if agg and named:
        raise TypeError("aggregate(): give one aggregator, or named ones, not both")
    if len(agg) > 1:
        raise TypeError(
            "aggregate(): several aggregators need names, e.g. aggregate(n=sw.agg.count(), "
            "total=sw.agg.sum(f))"
        )
    if not agg and not named:
        raise TypeError("aggregate() needs an aggregator, e.g. aggregate(sw.agg.count())")
    if agg:
        return Aggregation(agg, None)
    return Aggregation(list(named.values()), list(named))


def window(
    at: At,
    assigner: Tumbling | Sliding | Session,
    aggregation: Aggregation,
    *,
    lateness: int,
    early_every: float | None,
    processing_time: bool,
    name: str | None,
    what: str,
) -> Node:
    """The window operator of ``stream.window(assigner, ...).<what>(...)``."""
    spec = WindowSpec(
        assigner,
        aggregation,
        lateness=lateness,
        early_every=early_every,
        processing_time=processing_time,
    )
    label = type(assigner).__name__.lower()
    return derive(at, spec, name, f"window_{label}_{what}", timestamped=True)


def late_port(at: At) -> Node:
    """The late-record side output of a window or join operator (its last child)."""
    spec = at.node.spec
    assert isinstance(spec, WindowSpec | JoinSpec)
    spec.late_output = True
    return at.flow._add(
        LateOutputSpec(1),
        [at.node],
        None,
        f"{at.node.name}_late",
        keyed=at.node.keyed,
        timestamped=True,
    )
