"""Change tracking for operators whose snapshots are change sets (windows and joins).

An operator that keeps its state in its own structures (panes of windows, join buffers)
rather than in a :class:`~sluiceway.state.KeyedStore` tracks what changed with a
:class:`ChangeLog`: it *marks* each state key it touches (a window ``(key, start)``, a
join key, a buffered record), and at a barrier the log turns the marks into a
:class:`~sluiceway.core.delta.Incremental` -- the marked keys that still hold something
as ``upserts``, the others as ``deletes``, plus the operator's small rest as ``extra``.
A key that came and went between two snapshots need not be in either: an operator
drops its mark instead of marking it gone (a window opened and closed within one
checkpoint interval, a join record buffered and expired), so a change set follows what
the *checkpoint* sees change, not every record.  The rules are those of the keyed
operators (``operators/keyed_state.py``):

- every snapshot is whole until the checkpoint side says it takes change sets
  (:meth:`~sluiceway.operators.base.Step.accept_changes`), and nothing is marked;
- then the first snapshot, and the first after a restore, is whole, the later ones change
  sets;
- one partition, ``None`` (the operators see no source partitions yet).

>>> log = ChangeLog("op")
>>> state = {k: 0 for k in "abcdef"}
>>> entry = lambda key, mark: state.get(key, GONE)
>>> snap = lambda: log.snapshot(state.items, entry, {"wm": 3}, size=len(state))
>>> snap().whole        # change sets not accepted: whole
True
>>> log.accept(True)
>>> snap().whole        # the first: whole
True
>>> state["a"] = 5; del state["b"]
>>> log.mark("a"); log.mark("b")
>>> changes = snap().partitions[None]
>>> changes.whole, changes.upserts, sorted(changes.deletes), changes.extra
(False, {'a': 5}, ['b'], {'wm': 3})
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from sluiceway.core.delta import Changes, Incremental

__all__ = ["GONE", "ChangeLog", "ChangeSets", "whole_changes"]

GONE: Any = object()
"""What an operator's ``entry`` function returns for a state key that holds nothing now."""


class ChangeLog:
    """The keys an operator changed since its previous snapshot, and when to be whole.

    ``changed`` is None while change sets are not accepted (hot loops test it once per
    call and mark nothing); else a dict, key -> mark, in the order keys were first marked
    (a fold appends new keys in that order, so an operator that keeps its keys in opening
    order gets the same order back).  The mark is the operator's (None, or what its
    ``entry`` function needs to find the key's state).
    """

    __slots__ = ("accepted", "changed", "next_whole", "operator")

    def __init__(self, operator: str) -> None:
        self.operator = operator
        self.accepted = False
        self.next_whole = True
        self.changed: dict[Hashable, Any] | None = None

    def accept(self, accepted: bool) -> None:
        """:meth:`~sluiceway.operators.base.Step.accept_changes`: start (or stop) marking;
        the next snapshot is whole either way."""
        if accepted == self.accepted:
            return
        self.accepted = accepted
        self.changed = {} if accepted else None
        self.next_whole = True

    def mark(self, key: Hashable, mark: Any = None) -> None:
        """``key`` changed (outside the hot loops, which write ``changed`` directly)."""
        if self.changed is not None:
            self.changed[key] = mark

    def snapshot(
        self,
        whole: Callable[[], Iterable[tuple[Hashable, Any]]],
        entry: Callable[[Hashable, Any], Any],
        extra: Any,
        fresh: Callable[[], Iterable[tuple[Hashable, Any]]] | None = None,
        *,
        size: int,
        fresh_size: int = 0,
    ) -> Incremental:
        """The operator's state as one partition's :class:`Changes`.

        A change set that would hold at least as many entries as the whole state (a state
        that changed all over: in-order tumbling windows whose every window is new) is
        given whole instead -- no larger, and it spares the store a fold.

        Args:
            whole: every key's entry (for a whole snapshot).
            entry: ``entry(key, mark)``: a marked key's entry now, or :data:`GONE`.
            extra: the rest of the state, always whole.
            fresh: the entries of a change set the operator did not mark one by one
                (all of a window opened since the previous snapshot), if any.
            size: how many entries the whole state has.
            fresh_size: how many entries ``fresh`` gives.
        """
        changed = self.changed
        if self.next_whole or changed is None or len(changed) + fresh_size >= size:
            changes = Changes(True, dict(whole()), frozenset(), extra)
        else:
            upserts: dict[Hashable, Any] = {}
            deletes: list[Hashable] = []
            for key, mark in changed.items():
                value = entry(key, mark)
                if value is GONE:
                    deletes.append(key)
                else:
                    upserts[key] = value
            if fresh is not None:
                upserts.update(fresh())
            changes = Changes(False, upserts, frozenset(deletes), extra)
        if changed is not None:
            changed.clear()
        self.next_whole = False
        return Incremental({None: changes})

    def restored(self) -> None:
        """The operator loaded a checkpoint: the chain starts again with a whole base."""
        self.next_whole = True
        if self.changed is not None:
            self.changed.clear()


class ChangeSets:
    """The snapshot side of a step whose state is entries marked in a :class:`ChangeLog`
    (the window and join steps): :meth:`_change_set` takes the snapshot from the hooks
    below, which the step fills in."""

    changes: ChangeLog

    def _change_set(self, extra: dict[str, Any]) -> Incremental:
        """The state as one partition's changes (or whole), ``extra`` beside it."""
        snap = self.changes.snapshot(
            self._entries,
            self._entry,
            extra,
            self._fresh_entries,
            size=self._size(),
            fresh_size=self._fresh_size(),
        )
        self._taken()
        return snap

    def _entries(self) -> Iterator[tuple[Any, Any]]:
        """Every entry of the state (a whole snapshot)."""
        raise NotImplementedError

    def _entry(self, key: Any, mark: Any) -> Any:
        """One marked entry now, or :data:`GONE`."""
        raise NotImplementedError

    def _fresh_entries(self) -> Iterator[tuple[Any, Any]]:
        """The entries of a change set that were not marked one by one."""
        return iter(())

    def _fresh_size(self) -> int:
        """How many entries :meth:`_fresh_entries` gives."""
        return 0

    def _size(self) -> int:
        """How many entries the whole state has."""
        raise NotImplementedError

    def _taken(self) -> None:
        """A snapshot was taken (the next change set starts now)."""

    def _load(self, upserts: dict[Any, Any], extra: dict[str, Any]) -> None:
        """Rebuild the state from a whole snapshot's entries and ``extra``."""
        raise NotImplementedError


def whole_changes(operator: str, state: Incremental) -> Changes | None:
    """The one whole partition of a restored :class:`Incremental` (None when the
    checkpoint holds none: the operator starts empty).

    Raises:
        ValueError: a change set (not folded onto its base), or partitions other than
            ``None`` (a checkpoint of a partitioned run).
    """
    if not state.whole:
        raise ValueError(
            f"operator {operator!r}: restore needs every partition whole, got a change set "
            "(fold it onto its base: sluiceway.core.delta.fold_incremental)"
        )
    other = sorted(repr(p) for p in state.partitions if p is not None)
    if other:
        raise ValueError(
            f"operator {operator!r} keeps one partition (None), the checkpoint has "
            f"partition(s) {', '.join(other)}: restore it with the flow that wrote it"
        )
    return state.partitions.get(None)
