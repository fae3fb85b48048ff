"""Builders of the stateless family: record by record (``map``, ``filter``, ``flat_map``,
``inspect``), keying (``key_by``) and routing (``branch``, ``merge``).

Each builder checks its arguments, adds its node(s) to the graph and returns the node the
new stream comes from; :class:`~sluiceway.flow.Stream` wraps it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sluiceway.errors import FlowDefinitionError
from sluiceway.flow.args import check_callable, fn_label, positive_int
from sluiceway.flow.graph import At, Node, derive
from sluiceway.operators.event_time import MergeSpec
from sluiceway.operators.stateless import BranchSpec, KeyBySpec, PortSpec
from sluiceway.policies import check_policy


def fn_op(
    at: At, spec_cls: type[Any], method: str, fn: object, name: str | None, on_error: object
) -> Node:
    """A one-function operator (``MapSpec``, ``FilterSpec``...): ``spec_cls(fn, policy)``."""
    check_callable(fn, method)
    policy = check_policy(on_error, f"{method}()")
    return derive(at, spec_cls(fn, policy), name, f"{method}_{fn_label(fn)}")


def key_by(
    at: At,
    fn: Callable[[Any], Any],
    name: str | None,
    on_error: object,
    partitioned: object,
    partitions: object = None,
) -> Node:
    check_callable(fn, "key_by")
    policy = check_policy(on_error, "key_by()")
    if not isinstance(partitioned, bool):
        raise TypeError(f"key_by() partitioned must be True or False, got {partitioned!r}")
    if partitions is not None:
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"key_by() partitions must be an int >= 1 or None, got {partitions!r}")
        if partitioned:
            raise FlowDefinitionError(
                f"key_by(partitioned=True, partitions={partitions}): partitions is the "
                "partition count of the topic a flow on several workers repartitions "
                "through, and a partitioned key_by does not repartition; leave one out"
            )
    spec = KeyBySpec(fn, policy, partitioned, partitions)
    return derive(at, spec, name, f"key_by_{fn_label(fn)}", keyed=True)


def merge(at: At, others: Sequence[At], name: str | None, capacity: int | None) -> Node:
    """The fan-in of ``at`` and ``others``, streams of the same flow (checked by the caller)."""
    streams = [at, *others]
    if len({id(s.node) for s in streams}) != len(streams):
        raise FlowDefinitionError("merge(): the same stream is given twice")
    keyed = {s.node.keyed for s in streams}
    if len(keyed) > 1:
        raise FlowDefinitionError(
            "merge(): inputs must be all keyed or all unkeyed; call key_by() after the merge"
        )
    timed = {s.node.timestamped for s in streams}
    if len(timed) > 1:
        untimed = next(s for s in streams if not s.node.timestamped)
        raise FlowDefinitionError(
            f"merge(): the stream from {untimed.node.describe()} has no event time while "
            "others do; call with_timestamps() on it before merging"
        )
    cap = None if capacity is None else positive_int(capacity, "merge capacity")
    event_time = timed.pop()
    return at.flow._add(
        MergeSpec(cap, len(streams), event_time, cap or at.flow.channel_capacity),
        [s.node for s in streams],
        name,
        "merge",
        keyed=keyed.pop(),
        timestamped=event_time,
    )


def branch(at: At, predicate: object, name: str | None, on_error: object) -> tuple[Node, Node]:
    """The ``(matching, rest)`` ports of a branch on ``predicate``."""
    node = fn_op(at, BranchSpec, "branch", predicate, name, on_error)
    yes, no = (
        at.flow._add(
            PortSpec(i),
            [node],
            None,
            f"{node.name}_{label}",
            keyed=node.keyed,
            timestamped=node.timestamped,
        )
        for i, label in enumerate(("true", "false"))
    )
    return yes, no
