"""Incremental state: what a stateful step hands a checkpoint instead of its whole state.

A keyed operator whose state is large should not serialise all of it at every barrier.
Its :meth:`~sluiceway.operators.base.Step.snapshot` may return an :class:`Incremental`:
per *partition* (the source partition the keys came from; ``None`` for an unpartitioned
flow) a :class:`Changes` that is either the whole state of that partition (``whole``) or
only what changed since the step's previous snapshot -- keys written (``upserts``) and
keys deleted (``deletes``) -- plus ``extra``, the small rest of the state (timers,
watermark, counters) that is always given whole.

The checkpoint store keeps, per operator and partition, a whole base and the chain of
changes after it; restore folds them (:func:`fold`) and hands the step an
:class:`Incremental` in which every partition is whole.  A partition the step gave up
(scale-out: revoked) is listed in ``dropped`` and disappears from the folded state.

>>> base = Changes(True, {"a": 1, "b": 2})
>>> later = Changes(False, {"b": 3, "c": 4}, frozenset({"a"}), extra={"wm": 7})
>>> folded = fold(base, later)
>>> folded.whole, sorted(folded.upserts.items()), folded.extra
(True, [('b', 3), ('c', 4)], {'wm': 7})
>>> state = fold_incremental(
...     Incremental({0: base, 1: Changes(True, {"x": 0})}),
...     Incremental({0: later}, dropped=frozenset({1})),
... )
>>> sorted(state.partitions), sorted(state.partitions[0].upserts)
([0], ['b', 'c'])
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Changes", "Incremental", "fold", "fold_incremental"]

Partition = int | None
"""A source partition number, or None for an unpartitioned flow (one implicit partition)."""


@dataclass(frozen=True, slots=True)
class Changes:
    """One partition's keyed state, whole or as the changes since the previous snapshot.

    Args:
        whole: True: ``upserts`` is the entire state (a base); False: only the keys
            written since the previous snapshot.
        upserts: key -> that key's state, as of the snapshot.
        deletes: keys deleted since the previous snapshot (empty when ``whole``).  A key
            is in ``upserts`` or in ``deletes``, never both.
        extra: the rest of the partition's state, always whole (the newest wins).
        one_field: set when every upsert is the dict ``{one_field: value}``, as the step
            made them (``stateful_map``'s): a checkpoint then writes them as columns
            without checking each.

    Raises:
        ValueError: a whole state with deletes, or a key both written and deleted.
    """

    whole: bool
    upserts: dict[Hashable, Any]
    deletes: frozenset[Hashable] = frozenset()
    extra: Any = None
    one_field: str | None = field(default=None, compare=False)  # a hint, not state

    def __post_init__(self) -> None:
        if self.whole and self.deletes:
            raise ValueError(
                f"a whole state has no deletes, got {len(self.deletes)} deleted key(s)"
            )
        if self.deletes and not self.upserts.keys().isdisjoint(self.deletes):
            both = sorted(map(repr, self.upserts.keys() & self.deletes))[:3]
            raise ValueError(
                f"key(s) both written and deleted in one change set: {', '.join(both)}"
            )


@dataclass(frozen=True, slots=True)
class Incremental:
    """A step's snapshot as per-partition :class:`Changes`.

    Args:
        partitions: partition -> its changes (a partition with nothing new may be absent
            from a change set; it keeps its previous state).
        dropped: partitions whose state the step gave up since the previous snapshot.
    """

    partitions: dict[Partition, Changes]
    dropped: frozenset[Partition] = field(default_factory=frozenset)

    @property
    def whole(self) -> bool:
        """True when every partition is whole and nothing is dropped (a full snapshot)."""
        return not self.dropped and all(c.whole for c in self.partitions.values())


def fold(base: Changes, later: Changes) -> Changes:
    """The whole state after ``later`` is applied to ``base`` (which must be whole)."""
    if not base.whole:
        raise ValueError("fold needs a whole base to apply changes to")
    if later.whole:
        return later
    upserts = dict(base.upserts)
    for key in later.deletes:
        upserts.pop(key, None)
    upserts.update(later.upserts)
    return Changes(True, upserts, frozenset(), later.extra)


def fold_incremental(base: Incremental, *later: Incremental) -> Incremental:
    """Fold a chain: a whole ``base`` and the change sets after it, oldest first."""
    parts = dict(base.partitions)
    for changes in _chain(base, later):
        for p in changes.dropped:
            parts.pop(p, None)
        for p, c in changes.partitions.items():
            parts[p] = c if c.whole or p not in parts else fold(parts[p], c)
            if not parts[p].whole:
                raise ValueError(f"partition {p!r} has changes but no whole base to apply them to")
    return Incremental(parts)


def _chain(base: Incremental, later: Iterable[Incremental]) -> Iterable[Incremental]:
    if not base.whole:
        raise ValueError("fold_incremental needs a whole base (every partition whole)")
    yield from later
