"""What travels between stages: micro-batches of records and in-band control messages.

A :class:`Batch` is a struct of lists: ``values`` always; ``timestamps`` (event time, in
integer microseconds since the epoch) and ``keys`` when an operator has assigned them; and
with timestamps the ``watermarks`` column, the event-time watermark (microseconds) as it
stood just *before* each record.  Carrying the watermark per record makes lateness and
window firing depend only on the order of records, never on where the stream was cut into
batches.  Operators never mutate a batch they received -- a stream may feed several
consumers, which then share it -- they build a new one.

Control messages (:class:`Watermark`, :class:`Barrier`) travel in the same channels as
data, in order, are never dropped and do not count against a channel's capacity.  End of
stream is not a message: a writer closing its side of a channel is the end.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from itertools import accumulate, compress
from typing import Any

__all__ = ["Barrier", "Batch", "Control", "Watermark"]


class Batch:
    """A micro-batch: parallel columns of values, optional timestamps and keys.

    >>> b = Batch([1, 2, 3], timestamps=[10, 11, 12])
    >>> b.select([True, False, True]).values, b.select([True, False, True]).timestamps
    ([1, 3], [10, 12])
    >>> len(b.slice(1, 3))
    2
    """

    __slots__ = ("_watermarks", "keys", "timestamps", "values", "watermark_base")

    def __init__(
        self,
        values: list[Any],
        timestamps: list[int] | None = None,
        keys: list[Hashable] | None = None,
        watermarks: list[float] | None = None,
        *,
        watermark_base: tuple[float, int] | None = None,
    ) -> None:
        self.values = values
        self.timestamps = timestamps
        self.keys = keys
        self._watermarks = watermarks
        self.watermark_base = watermark_base
        """``(base, bound)`` when the watermark column is implicit: before record ``i`` it
        is ``max(base, *timestamps[:i]) - bound``.  ``with_timestamps`` emits this form;
        the column is computed only if an operator asks for it (one that drops or
        reorders records does), and a window operator can often skip it entirely."""

    @property
    def watermarks(self) -> list[float] | None:
        """The watermark before each record (computed once from the implicit form)."""
        wms = self._watermarks
        if wms is None and self.watermark_base is not None:
            assert self.timestamps is not None
            base, bound = self.watermark_base
            acc: list[float] = list(accumulate(self.timestamps, max, initial=base))
            acc.pop()
            wms = self._watermarks = [m - bound for m in acc] if bound else acc
        return wms

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        cols = "values" + (", timestamps" if self.timestamps is not None else "")
        cols += ", keys" if self.keys is not None else ""
        return f"Batch({len(self.values)} records: {cols})"

    def slice(self, start: int, stop: int | None = None) -> Batch:
        """The records ``[start:stop]`` as a new batch."""
        ts, keys, wms = self.timestamps, self.keys, self.watermarks
        return Batch(
            self.values[start:stop],
            None if ts is None else ts[start:stop],
            None if keys is None else keys[start:stop],
            None if wms is None else wms[start:stop],
        )

    def select(self, mask: list[bool] | list[Any]) -> Batch:
        """Keep the records whose mask entry is truthy (one pass per column)."""
        ts, keys, wms = self.timestamps, self.keys, self.watermarks
        return Batch(
            list(compress(self.values, mask)),
            None if ts is None else list(compress(ts, mask)),
            None if keys is None else list(compress(keys, mask)),
            None if wms is None else list(compress(wms, mask)),
        )

    def with_values(self, values: list[Any]) -> Batch:
        """A batch with new values and the same other columns (same length)."""
        return Batch(
            values,
            self.timestamps,
            self.keys,
            self._watermarks,
            watermark_base=self.watermark_base,
        )

    def with_keys(self, keys: list[Hashable]) -> Batch:
        """A batch with new keys and the same other columns (same length)."""
        return Batch(
            self.values,
            self.timestamps,
            keys,
            self._watermarks,
            watermark_base=self.watermark_base,
        )


@dataclass(frozen=True, slots=True)
class Watermark:
    """No record with an event time earlier than ``time`` will follow on this input.

    ``idle=True`` marks the input idle (nothing arrived for its ``idle_timeout``): a
    fan-in then ignores it when combining watermarks until its next record.
    """

    time: float
    idle: bool = False


@dataclass(frozen=True, slots=True)
class Barrier:
    """Checkpoint ``checkpoint_id``: everything before this belongs to that checkpoint."""

    checkpoint_id: int


Control = Watermark | Barrier
