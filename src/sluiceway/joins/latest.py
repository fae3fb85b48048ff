"""Temporal join in processing time: each left record with its key's *latest* row.

The right input is a changelog (upserts, and deletions where ``is_delete(record)``) kept
as a table of each key's latest row.  A left record joins the row its key has when the
record reaches the operator -- whatever the right input delivered before it.  No
watermarks are waited for, so the answer depends on arrival order: use the event-time
temporal join when it must not.  Results ``(left, right)`` (``(left, None)`` with
``how="left"`` and no row) keep the left record's time and watermark, when it has them;
the right input's watermarks are not passed on.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import compress
from typing import Any, ClassVar, Literal

from sluiceway.core.delta import Incremental
from sluiceway.core.messages import Batch, Control, Watermark
from sluiceway.joins.base import JoinSpec
from sluiceway.operators.base import BuildContext, Step
from sluiceway.operators.incremental import GONE, ChangeLog, whole_changes

__all__ = ["LatestJoinSpec"]

_MISSING: Any = object()


class _LatestJoinStep(Step):
    def __init__(self, ctx: BuildContext, spec: LatestJoinSpec) -> None:
        super().__init__(ctx.name, ctx.metrics)
        self.spec = spec
        self.table: dict[Any, Any] = {}
        self.changes = ChangeLog(ctx.name)  # keys upserted or deleted since the last snapshot

    async def push(self, batch: Batch) -> None:  # pragma: no cover - always a fan-in
        raise AssertionError("a join receives its inputs through push_input")

    async def push_input(self, batch: Batch, index: int) -> None:
        n = len(batch.values)
        if not n:
            return
        self.metrics.records_in += n
        keys = batch.keys
        assert keys is not None, "checked by the flow"
        table = self.table
        if index == 1:
            is_delete = self.spec.is_delete
            for k, v in zip(keys, batch.values, strict=True):
                if is_delete is not None and is_delete(v):
                    table.pop(k, None)
                else:
                    table[k] = v
            if self.changes.changed is not None:
                self.changes.changed.update(dict.fromkeys(keys))
            self.metrics.state = len(table)
            return
        rows = [table.get(k, _MISSING) for k in keys]
        if self.spec.how == "inner":
            mask = [r is not _MISSING for r in rows]
            if not all(mask):
                batch = batch.select(mask)
                rows = list(compress(rows, mask))
        pairs = zip(batch.values, rows, strict=True)
        await self.emit(batch.with_values([(v, None if r is _MISSING else r) for v, r in pairs]))

    async def control_input(self, message: Control, index: int) -> None:
        if isinstance(message, Watermark) and index == 1:
            return  # the output follows the left input's event time only
        await self.control(message)

    def accept_changes(self, accepted: bool) -> None:
        self.changes.accept(accepted)

    def snapshot(self) -> Incremental:
        """The table as :class:`~sluiceway.core.delta.Changes` of partition None, key ->
        row: whole, or (once the checkpoint side takes change sets) the keys upserted
        and deleted since the previous snapshot."""
        table = self.table
        return self.changes.snapshot(
            table.items, lambda k, _: table.get(k, GONE), None, size=len(table)
        )

    def restore(self, state: Any) -> None:
        """Load a whole :class:`~sluiceway.core.delta.Incremental`, or the earlier format
        (the table as a dict)."""
        if isinstance(state, Incremental):
            changes = whole_changes(self.name, state)
            self.table = {} if changes is None else dict(changes.upserts)
        else:
            self.table = dict(state)
        self.changes.restored()
        self.metrics.state = len(self.table)

    def pending(self) -> int:
        return 0


class LatestJoinSpec(JoinSpec):
    """``left.temporal_join(table, time="processing")``."""

    kind: ClassVar[str] = "temporal_join_latest"

    def __init__(self, how: Literal["inner", "left"], is_delete: Callable[[Any], object] | None):
        super().__init__(0)
        self.how = how
        self.is_delete = is_delete

    def build(self, ctx: BuildContext) -> Step:
        return _LatestJoinStep(ctx, self)
