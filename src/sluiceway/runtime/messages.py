"""What travels between stages: micro-batches of records and in-band control messages.

A :class:`Batch` is a struct of lists: ``values`` always, ``timestamps`` (event time, in
seconds) and ``keys`` when an operator has assigned them.  Operators never mutate a batch
they received -- a stream may feed several consumers, which then share it -- they build
a new one.

Control messages (:class:`Watermark`, :class:`Barrier`) travel in the same channels as
data, in order, are never dropped and do not count against a channel's capacity.  End of
stream is not a message: a writer closing its side of a channel is the end.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from itertools import compress
from typing import Any

__all__ = ["Barrier", "Batch", "Control", "Watermark"]


class Batch:
    """A micro-batch: parallel columns of values, optional timestamps and keys.

    >>> b = Batch([1, 2, 3], timestamps=[10.0, 11.0, 12.0])
    >>> b.select([True, False, True]).values, b.select([True, False, True]).timestamps
    ([1, 3], [10.0, 12.0])
    >>> len(b.slice(1, 3))
    2
    """

    __slots__ = ("keys", "timestamps", "values")

    def __init__(
        self,
        values: list[Any],
        timestamps: list[float] | None = None,
        keys: list[Hashable] | None = None,
    ) -> None:
        self.values = values
        self.timestamps = timestamps
        self.keys = keys

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        cols = "values" + (", timestamps" if self.timestamps is not None else "")
        cols += ", keys" if self.keys is not None else ""
        return f"Batch({len(self.values)} records: {cols})"

    def slice(self, start: int, stop: int | None = None) -> Batch:
        """The records ``[start:stop]`` as a new batch."""
        ts, keys = self.timestamps, self.keys
        return Batch(
            self.values[start:stop],
            None if ts is None else ts[start:stop],
            None if keys is None else keys[start:stop],
        )

    def select(self, mask: list[bool] | list[Any]) -> Batch:
        """Keep the records whose mask entry is truthy (one pass per column)."""
        ts, keys = self.timestamps, self.keys
        return Batch(
            list(compress(self.values, mask)),
            None if ts is None else list(compress(ts, mask)),
            None if keys is None else list(compress(keys, mask)),
        )

    def with_values(self, values: list[Any]) -> Batch:
        """A batch with new values and the same timestamps and keys (same length)."""
        return Batch(values, self.timestamps, self.keys)


@dataclass(frozen=True, slots=True)
class Watermark:
    """No record with an event time earlier than ``time`` will follow on this input."""

    time: float


@dataclass(frozen=True, slots=True)
class Barrier:
    """Checkpoint ``checkpoint_id``: everything before this belongs to that checkpoint."""

    checkpoint_id: int


Control = Watermark | Barrier
