"""Builders of the keyed-state family: ``stateful_map`` and ``process`` (state per key,
timers, TTL).  See docs/state.md."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sluiceway.errors import FlowDefinitionError
from sluiceway.flow.args import check_callable, fn_label
from sluiceway.flow.graph import At, Node, derive
from sluiceway.operators.keyed_state import KeyedProcessSpec, StatefulMapSpec, process_factory
from sluiceway.policies import check_policy
from sluiceway.state import TTL, StateBackend, as_backend, as_ttl


def _backend(at: At, state: object, what: str) -> StateBackend | None:
    """The operator's ``state=``, else its flow's (None: the engine's default)."""
    if state is None:
        return at.flow.state
    return as_backend(state, what)


def stateful_map(
    at: At,
    fn: Callable[[Any, Any], Any],
    name: str | None,
    ttl: float | timedelta | TTL | None,
    on_error: object,
    state: object = None,
) -> Node:
    check_callable(fn, "stateful_map")
    policy = check_policy(on_error, "stateful_map()")
    t = as_ttl(ttl, "stateful_map(ttl=...)")
    timestamped = at.node.timestamped
    if t is not None and t.time == "event" and not timestamped:
        raise FlowDefinitionError(
            f"stateful_map(ttl=TTL(..., time='event')): the stream from "
            f"{at.node.describe()} has no event time; call .with_timestamps(...) "
            "before it, or use a processing-time TTL"
        )
    backend = _backend(at, state, "stateful_map(state=...)")
    spec = StatefulMapSpec(fn, ttl=t, on_error=policy, timestamped=timestamped, state=backend)
    return derive(at, spec, name, f"stateful_map_{fn_label(fn)}")


def process(at: At, fn: object, name: str | None, on_error: object, state: object = None) -> Node:
    factory, has_timer = process_factory(fn)
    policy = check_policy(on_error, "process()")
    spec = KeyedProcessSpec(
        factory,
        on_error=policy,
        timestamped=at.node.timestamped,
        processing_timers=has_timer,
        state=_backend(at, state, "process(state=...)"),
    )
    return derive(at, spec, name, f"process_{fn_label(fn)}")
