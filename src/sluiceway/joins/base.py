"""What every event-time join shares: two inputs, their watermarks, late records, output.

A join is a two-input operator: both inputs arrive through one fan-in channel, each batch
tagged with its input index (0: left, 1: right).  Each input keeps its own watermark; the
join's watermark is their minimum (an input marked idle is left out until its next record,
an ended input announces +inf), and only that minimum makes results due and frees state.

Lateness is judged per input, against that input's *own* watermark as it stood just before
the record (the watermark column of its batch): it depends only on the order of that
input, never on where batches were cut or how the two inputs interleave.  Everything is in
integer microseconds ("ticks").
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from sluiceway.core.delta import Incremental
from sluiceway.core.messages import Batch, Control, Watermark
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.operators.incremental import ChangeLog, ChangeSets, whole_changes
from sluiceway.operators.late import Lateness, LateOutputStep

__all__ = ["JoinSpec", "JoinStep", "LateJoinRecord", "Side"]

INF = math.inf
Side = Literal["left", "right"]
WatermarkColumn = list[float] | None
"""A batch's watermark column as a join gets it: None when no record can be late (see
:meth:`JoinStep._records`)."""
SIDES: tuple[Side, Side] = ("left", "right")


@dataclass(slots=True)
class LateJoinRecord(Lateness):
    """A join input that arrived too late to take part (its join's ``.late()`` output).

    Attributes:
        value: the record.
        key: its key.
        side: ``"left"`` (the stream the join was called on) or ``"right"``.
        timestamp: its event time (epoch seconds).
        watermark: its own input's watermark when it arrived (epoch seconds).
    """

    value: Any
    key: Any
    side: Side
    timestamp: float
    watermark: float


def _watermarks(batch: Batch, ts: list[int], lateness: int) -> tuple[WatermarkColumn, float]:
    """The watermark column of ``batch`` -- None if no record of it can be late (see
    :meth:`JoinStep._records`) -- and the watermark before its last record.

    Every join's lateness test implies ``t + lateness < watermark``, so a batch whose
    earliest time is at least ``lateness`` above its highest watermark has no late record.
    In the implicit form ``with_timestamps`` emits, that highest watermark -- before the
    last record -- is ``max(base, *ts[:-1]) - bound``: no column needs to be built.
    """
    implicit = batch.watermark_base
    if implicit is not None:
        base, bound = implicit
        last = max(base, max(ts[:-1], default=base)) - bound
        if min(ts) + lateness >= last:
            return None, last
        return batch.watermarks, last
    wms = batch.watermarks
    assert wms is not None, "checked by the flow"
    return (None if min(ts) + lateness >= max(wms) else wms), wms[-1]


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused while a join makes a burst of results.

    A window join makes every ``(left, right)`` pair of a closing window at once --
    thousands of tuples -- and the collector would scan the young ones every 700
    allocations and, as they wait in the output, the older generations again: a quarter
    of the time of benchmark J1, for tuples that never form a cycle.  Paused, it sees
    them once, after.  A collector the user disabled stays disabled.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class JoinSpec(OpSpec):
    """A two-input join: a boundary whose channel carries both inputs."""

    kind: ClassVar[str] = "join"

    def __init__(self, lateness: int) -> None:
        self.lateness = lateness
        self.late_output = False  # set by .late()

    @property
    def boundary(self) -> bool:
        return True

    def build(self, ctx: BuildContext) -> Step:
        raise NotImplementedError


class JoinStep(ChangeSets, LateOutputStep):
    """The two-input machinery; subclasses implement :meth:`_records` and :meth:`_advance`.

    Each record gets a sequence number on its side (``seq[side]``, in that input's order):
    results made at one watermark are sorted by keys built from times and these numbers,
    so their order does not depend on how the inputs interleaved either.
    """

    what = "join"

    def __init__(self, ctx: BuildContext, spec: JoinSpec) -> None:
        super().__init__(ctx.name, ctx.metrics, ctx.flow, spec.late_output)
        self.spec = spec
        self.lateness = spec.lateness
        self.wms: list[float] = [-INF, -INF]
        self.idle = [False, False]
        self.wm: float = -INF  # the join's watermark: the minimum over active inputs
        self.seq = [0, 0]
        self.out: list[Any] = []
        self.out_ts: list[int] = []
        self.out_keys: list[Any] = []
        self.late: list[LateJoinRecord] = []
        self.late_ts: list[int] = []
        self.late_keys: list[Any] = []
        self.changes = ChangeLog(ctx.name)  # what changed since the last snapshot
        # ``seq`` at the last snapshot: a record numbered above it came after (a join
        # that buffers records forgets their marks when they expire before the next one)
        self.snap_seq = [0, 0]

    # -- subclasses ----------------------------------------------------------------------

    def _records(
        self, side: int, values: list[Any], ts: list[int], keys: list[Any], wms: WatermarkColumn
    ) -> None:
        """Take the records of one batch of input ``side``.

        ``wms`` is the watermark column, or None when no record of the batch can be late:
        each one's time is at least ``lateness`` above every watermark of the batch (the
        usual case -- records within the inputs' out-of-orderness bound); the column is
        then not even computed, and a join may take a loop without the lateness test.
        """
        raise NotImplementedError

    def _advance(self, wm: float) -> None:
        """The join's watermark moves to ``wm``: emit what is due, free what is done."""
        raise NotImplementedError

    def held(self) -> int:
        """Records held in state."""
        raise NotImplementedError

    _STATE: ClassVar[tuple[str, ...]] = ("wms", "idle", "wm", "seq")
    """The attributes a snapshot of the earlier format held (a dict of them)."""

    # -- output --------------------------------------------------------------------------

    def result(self, value: Any, t: int, key: Any) -> None:
        self.out.append(value)
        self.out_ts.append(t)
        self.out_keys.append(key)

    def late_record(self, side: int, value: Any, t: int, key: Any, wm: float) -> None:
        self.late.append(LateJoinRecord(value, key, SIDES[side], t / 1e6, wm / 1e6))
        self.late_ts.append(t)
        self.late_keys.append(key)

    async def emit(self, batch: Batch) -> None:  # pragma: no cover - output goes by ports
        raise AssertionError("a join emits through _flush")

    async def _flush(self, carried: float) -> None:
        """Send the results and late records gathered so far.  The results carry
        ``carried``, the join's watermark before they were made."""
        main = self.outputs()[0]
        m = self.metrics
        m.state = self.held()
        if self.out:
            n = len(self.out)
            batch = Batch(self.out, self.out_ts, self.out_keys, [carried] * n)
            self.out, self.out_ts, self.out_keys = [], [], []
            m.records_out += n
            for child in main:
                await child.push(batch)
        if self.late:
            late = Batch(self.late, self.late_ts, self.late_keys, [self.wm] * len(self.late))
            m.late += len(self.late)
            self.late, self.late_ts, self.late_keys = [], [], []
            await self.send_late(late)

    # -- input ---------------------------------------------------------------------------

    async def push(self, batch: Batch) -> None:  # pragma: no cover - always a fan-in
        raise AssertionError("a join receives its inputs through push_input")

    async def push_input(self, batch: Batch, index: int) -> None:
        n = len(batch.values)
        if not n:
            return
        self.metrics.records_in += n
        self.idle[index] = False
        ts, keys = batch.timestamps, batch.keys
        assert ts is not None, "checked by the flow"
        assert keys is not None, "checked by the flow"
        wms, last = _watermarks(batch, ts, self.lateness)
        self._records(index, batch.values, ts, keys, wms)
        self.wms[index] = max(self.wms[index], last)
        if self.wm > -INF:
            # Records already due: from an input that was idle while the join's watermark
            # passed their time.  They are answered now with what the join still holds.
            self._advance(self.wm)
        await self._flush(self.wm)

    async def control_input(self, message: Control, index: int) -> None:
        if not isinstance(message, Watermark):
            await self.control(message)
            return
        if message.idle:
            self.idle[index] = True
        elif message.time > self.wms[index]:
            self.wms[index] = message.time
        active = [w for w, idle in zip(self.wms, self.idle, strict=True) if not idle]
        if not active:  # both inputs idle: so is the join's output
            await self.control(Watermark(self.wm, idle=True))
            return
        await self._move_to(min(active))

    async def _move_to(self, wm: float) -> None:
        if wm <= self.wm:
            return
        before = self.wm
        self._advance(wm)
        self.wm = wm
        self.metrics.watermark = wm / 1e6
        await self._flush(before)
        await self.control(Watermark(wm))

    async def finish(self) -> None:
        await self._move_to(INF)
        await super().finish()

    # -- checkpoints ---------------------------------------------------------------------

    def accept_changes(self, accepted: bool) -> None:
        """Whether the checkpoint store takes change sets (see :meth:`snapshot`)."""
        self.changes.accept(accepted)

    def snapshot(self) -> Incremental:
        """What the join holds as :class:`~sluiceway.core.delta.Changes` of partition
        None -- entries keyed as each join keeps its buffers (see ``_entries``), the
        watermarks and sequence numbers in ``extra``.

        Whole, unless the checkpoint side takes change sets (:meth:`accept_changes`):
        then only the first snapshot (and the first after a restore) is whole, and each
        later one holds the entries appended to, matched or expired since the one
        before.  It shares nothing the join changes afterwards.
        """
        assert not self.out, "snapshot mid-batch"
        assert not self.late, "snapshot mid-batch"
        extra = {"format": 2, "wms": list(self.wms), "idle": list(self.idle), "wm": self.wm}
        extra.update(self._extra(), seq=list(self.seq))
        return self._change_set(extra)

    def _extra(self) -> dict[str, Any]:
        """The rest of the state (small), copied."""
        return {}

    def _taken(self) -> None:
        """A snapshot was taken (or loaded): the next change set starts now."""
        self.snap_seq = list(self.seq)

    def restore(self, state: Any) -> None:
        """Load a whole :class:`~sluiceway.core.delta.Incremental`, or a snapshot of the
        earlier format (a dict of the join's attributes)."""
        if isinstance(state, Incremental):
            changes = whole_changes(self.name, state)
            if changes is not None:
                extra = changes.extra
                self.wms, self.idle, self.wm = list(extra["wms"]), list(extra["idle"]), extra["wm"]
                self.seq = list(extra["seq"])
                self._load(changes.upserts, extra)
        else:
            for name in self._STATE:
                setattr(self, name, state[name])
        self.changes.restored()
        self._taken()
        self.metrics.state = self.held()
        if self.wm > -INF:
            self.metrics.watermark = self.wm / 1e6

    def pending(self) -> int:
        return self.held()
