"""Keyed state for user code: value and map state with a time-to-live, and timers.

Two operators on a :class:`~sluiceway.KeyedStream` give user code state of its own, kept
per key by the engine and included in checkpoints:

- ``keyed.stateful_map(fn, ttl=...)``: ``fn(state, value) -> (state, output)``;
- ``keyed.process(fn)``: a keyed process function (like Flink's
  ``KeyedProcessFunction``): ``fn.process(ctx, value)`` with a :class:`ProcessContext`
  giving :class:`ValueState`, :class:`MapState`, :class:`TimerService` and ``emit``, and
  ``fn.on_timer(ctx, time)`` when a timer fires.

A time-to-live is a :class:`TTL`: ``TTL(60)`` (processing time, the default; a plain
``60`` or ``timedelta`` means the same) or ``TTL(60, time="event")``.  State not written
for that long is dropped.  See docs/state.md.

>>> import sluiceway as sw
>>> def running_count(count, word):
...     count = (count or 0) + 1
...     return count, (word, count)
>>> sw.testing.run_collect(
...     lambda s: s.key_by(lambda w: w).stateful_map(running_count), ["a", "b", "a"])
[('a', 1), ('b', 1), ('a', 2)]
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import pickle
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

from sluiceway.checkpoint.codec import pack, unpack, unpacked
from sluiceway.core.delta import Changes
from sluiceway.diskstate import DiskMap, InMemory, OnDisk, StateBackend, as_backend
from sluiceway.errors import CheckpointError
from sluiceway.time import Clock
from sluiceway.time.durations import positive_seconds
from sluiceway.time.ticks import MAX_SECONDS as _MAX_SECONDS
from sluiceway.time.ticks import MIN_SECONDS as _MIN_SECONDS
from sluiceway.time.ticks import to_ticks

__all__ = [
    "TTL",
    "InMemory",
    "KeyedProcessFunction",
    "MapState",
    "OnDisk",
    "ProcessContext",
    "StateBackend",
    "TimeDomain",
    "TimerEvent",
    "TimerService",
    "ValueState",
    "as_backend",
]

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

TimeDomain = Literal["processing", "event"]

_INF = math.inf
_TICKS = 1_000_000


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


class _Owned:
    def __repr__(self) -> str:
        return "<owned>"


_OWNED: Any = _Owned()
"""``KeyedStore.base`` of a key whose states dict the store changes in place (see
``KeyedStore.owned``): no dict is ever ``_OWNED``, so no change copies one."""


@dataclass(frozen=True, slots=True)
class TTL:
    """State not *written* for ``seconds`` is dropped: the time counts since the last
    write, not the last read.

    In ``process``, reading a state (``get``, ``contains``, ``items``) does not extend its
    life; ``set``/``put`` does -- to keep a key that is only read alive, write it back.
    In ``stateful_map`` every record that returns a state writes it: the TTL counts from
    the key's last record.

    Args:
        seconds: the time to live, > 0 (float seconds or a ``timedelta``).
        time: ``"processing"`` (default): seconds of the flow's clock since the last
            write; ``"event"``: the watermark has reached the event time of the last
            write plus ``seconds`` (needs a timestamped stream).

    >>> TTL(30)
    TTL(seconds=30.0, time='processing')
    >>> TTL(timedelta(minutes=1), time="event").seconds
    60.0
    >>> TTL(0)
    Traceback (most recent call last):
    ...
    ValueError: TTL seconds must be > 0 seconds, got 0
    """

    seconds: float
    time: TimeDomain = "processing"

    def __post_init__(self) -> None:
        object.__setattr__(self, "seconds", positive_seconds(self.seconds, "TTL seconds"))
        if self.time not in ("processing", "event"):
            raise ValueError(f"TTL time must be 'processing' or 'event', got {self.time!r}")


def as_ttl(ttl: object, what: str) -> TTL | None:
    """``ttl=`` as users give it: None, seconds, a ``timedelta``, or a :class:`TTL`."""
    if ttl is None or isinstance(ttl, TTL):
        return ttl
    if isinstance(ttl, int | float | timedelta) and not isinstance(ttl, bool):
        return TTL(positive_seconds(ttl, what))
    raise TypeError(
        f"{what} must be seconds, a timedelta or sw.state.TTL(seconds, time=...), got {ttl!r}"
    )


@dataclass(frozen=True, slots=True)
class TimerEvent:
    """A timer firing, as the error policy sees it when ``on_timer`` fails.

    A dead-lettered firing is a :class:`~sluiceway.DeadLetterRecord` whose ``record`` is
    this; a retried one calls ``on_timer`` again.
    """

    key: Any
    time: float
    domain: TimeDomain


# -- the store ---------------------------------------------------------------------------

# Undo-log entries: what to put back when user code fails half-way through a record, other
# than the key's states dict itself.  That needs no entry: the store keeps the dict the
# record started with (``KeyedStore.base``), the record's first change of it puts a copy
# in its place (copy on write: ``cur is base`` says "not copied yet"), and a rollback puts
# ``base`` back (user code changes only the current key).  So the commonest write -- a
# value state's -- logs nothing; map entries (changed in place, in maps the copy shares),
# deadlines and timers have entries of their own.
_U_ENTRY, _U_DEADLINE, _U_TIMER_ADD, _U_TIMER_DEL = range(4)

# A key's entry in a snapshot is a dict of its states by name (str) and, under these two
# non-str names, its TTL deadlines and its pending timers.
_TTL_FIELD = 0
_TIMERS_FIELD = 1

OVERLAY_WINDOW = 1 << 19
"""``stateful_map``'s :class:`Overlay` is folded into the whole state at the latest after
this many records, and whether it pays is judged over a quarter of as many at least."""
OVERLAY_REPEATS = 4
"""The overlay stays on while the keys it held were written at least this many times
each, on average, over a window (:data:`OVERLAY_WINDOW`).  Below it, writing through is
cheaper: the overlay saves a look-up in the whole state per repeated write, and costs a
write into the whole state per key at each fold (measured in
``benchmarks/bench_checkpoints.py``, CK-2M and CK-2M-uniform)."""
OVERLAY_PROBE = 64
"""Writing through untracked, the overlay is tried again after 1, 2, 4, ... decisions
(each try that fails doubles the wait), at most this many."""

Tail = Any
"""Where a TTL deadline belongs within a key: a value state's name, or ``(name, map key)``."""


class _Upserts(dict[Any, Any]):
    """A snapshot's key -> state dict that, when it cannot be pickled, says which key and
    state could not (the checkpoint pickles the snapshot; a bare ``TypeError: cannot
    pickle '_thread.lock' object`` would not say where it is)."""

    operator = ""

    def __reduce__(self) -> tuple[Any, ...]:
        # Packed by the checkpoint codec (the engine's part as data, user objects pickled
        # in its user section), restored as a plain dict.
        try:
            packed = pack(dict(self))
        except Exception as exc:
            raise _unpicklable(self.operator, self, exc) from exc
        return (unpacked, (packed,))


def _unpicklable(operator: str, states: dict[Any, Any], exc: Exception) -> CheckpointError:
    for key, d in states.items():
        try:
            pickle.dumps(key)
        except Exception as why:  # noqa: BLE001 - reported below, with the key
            return CheckpointError(
                f"operator {operator!r}: key {key!r} cannot be pickled for a "
                f"checkpoint: {type(why).__name__}: {why}"
            )
        for name, value in d.items():
            try:
                pickle.dumps(value)
            except Exception as why:  # noqa: BLE001 - reported below, with the key
                what = f"state {name!r}" if isinstance(name, str) else "a timer or TTL"
                return CheckpointError(
                    f"operator {operator!r}: {what} of key {key!r} cannot be "
                    f"pickled for a checkpoint: {type(why).__name__}: {why}; keep state "
                    "to picklable values (numbers, strings, lists, dicts, dataclasses)"
                )
    return CheckpointError(
        f"operator {operator!r}: its state cannot be pickled for a checkpoint: "
        f"{type(exc).__name__}: {exc}"
    )


class Overlay:
    """``stateful_map``'s overlay of the keys it writes again and again (in memory).

    While on, the loop keeps the new state of a key the store held before in :attr:`hot`
    alone (a value, not a states dict), read before the whole state;
    :meth:`KeyedStore.fold` puts it there (and in the change set being gathered) at
    each snapshot and at the latest after :attr:`window` records.  A hot key is then
    read and written in that small dict, not in the whole state -- whose look-ups miss
    the processor's caches once it holds millions of keys -- and a checkpoint tracking
    its change costs nothing more.  A key the store did not hold is written through, so
    the whole state always holds every key.  On while it pays: see :meth:`decide`.
    """

    __slots__ = (
        "counted",
        "distinct",
        "hot",
        "on",
        "probe",
        "records",
        "since",
        "wait",
        "window",
    )

    def __init__(self, window: int = OVERLAY_WINDOW) -> None:
        self.on = True
        self.hot: dict[Any, Any] = {}
        """Key -> its newest state (a key the whole state holds, with an older entry)."""
        self.window = window
        self.records = 0
        """Records the loop handled since the last decision."""
        self.since = 0
        """Records the loop handled since the last fold."""
        self.distinct = 0
        """Keys written since the last decision, summed over the folds (a key in two
        folds counts twice): those the overlay held and the new ones written through."""
        self.probe = 0
        """Decisions still to write through before the overlay is tried again."""
        self.wait = 1
        """Decisions to write through after the next try that fails (doubling)."""
        self.counted = False
        """Whether :attr:`distinct` counted keys written through (see :meth:`decide`)."""

    def decide(self, through: int | None) -> None:
        """After a fold: ``through`` keys were written through since the last snapshot
        (None: not counted).  Once a quarter of a :attr:`window` of records was handled
        since the last decision, the overlay is on until the next if the keys written
        meanwhile were written :data:`OVERLAY_REPEATS` times each, on average.  Writing
        through, those keys are counted by the change sets (a checkpoint tracks them);
        untracked, the overlay is tried again after 1, 2, 4, ... decisions, at most
        :data:`OVERLAY_PROBE` (a workload whose keys never repeat pays for ever fewer
        tries; one whose keys start repeating gets the overlay back soon)."""
        self.since = 0
        if through is not None:
            self.distinct += through
            self.counted = True
        if self.records < self.window // 4:
            return  # (too few records to judge by: wait for more)
        if self.on or self.counted:
            pays = self.records >= OVERLAY_REPEATS * self.distinct
            if self.on and not pays:
                self.probe = self.wait
                self.wait = min(2 * self.wait, OVERLAY_PROBE)
            elif pays:
                self.wait = 1
            self.on = pays
        else:
            self.probe -= 1
            self.on = self.probe <= 0
        self.records = self.distinct = 0
        self.counted = False


class KeyedStore:
    """Every key's state, its TTL deadlines and the pending timers of one operator -- or,
    once the flow is partitioned, of one partition of it (a step keeps one store per
    partition, so that a partition's share can be snapshotted, restored or dropped alone).

    Internal to sluiceway (the operator drives it; user code sees the handles).  While
    user code runs for one record, the key's states dict it started with is kept
    (:attr:`base`) and every other change is appended to :attr:`undo`, so that
    :meth:`rollback` can undo it when the code fails: a failed record leaves the state as
    it was.  After a record that succeeded the caller clears the log (:meth:`commit`; the
    step's loops inline it: no call per record); a non-empty log or ``cur is not base``
    after a record is also how the step knows that the record's key changed
    (:attr:`dirty`).

    Layout: ``data[key][name]`` is a value state's value or a map state's ``dict``.  A
    key's ``data[key]`` dict is never changed in place once a record is done with it: the
    record's first change puts a copy in its place (:meth:`own`) and :attr:`base` keeps the
    old one for a rollback, so snapshots hold those dicts without copying them (map
    states, changed in place, are copied).  Under the ``Fail`` policy nothing is rolled
    back (:meth:`in_place`), and a dict is copied once after each snapshot, not once per
    record: the dicts no snapshot holds are changed in place (:attr:`owned`).  TTL
    deadlines: ``ttl_of[key][tail] = (deadline, domain)``, ``tail`` a value state's name or
    ``(name, map key)``.  Timers: ``timers[domain][key][time] = (seq, time as registered)``.
    Processing-time deadlines and timers are seconds of ``clock.time()``; event-time ones
    integer microseconds.  Everything per key, so that a snapshot of the keys that changed
    is a walk over those keys alone.
    """

    def __init__(
        self, operator: str, clock: Clock, timestamped: bool, disk: DiskMap | None = None
    ) -> None:
        self.operator = operator
        self.clock = clock
        self.timestamped = timestamped
        self.disk = disk
        """The on-disk backend's mapping (``sw.state.OnDisk``), which is then :attr:`data`;
        None: the in-memory dict."""
        self.data: MutableMapping[Any, dict[str, Any]] = {} if disk is None else disk
        self.kinds: dict[str, tuple[str, TTL | None]] = {}
        self.declared: set[str] = set()
        self.ttl_of: dict[Any, dict[Tail, tuple[float, TimeDomain]]] = {}
        self.scheduled: dict[tuple[Any, Tail], float] = {}  # slot -> its heap entry's time
        self.ttl_heaps: dict[str, list[tuple[float, int, Any, Tail]]] = {
            "processing": [],
            "event": [],
        }
        self.timers: dict[str, dict[Any, dict[float, tuple[int, Any]]]] = {
            "processing": {},
            "event": {},
        }
        self.timer_heaps: dict[str, list[tuple[float, int, Any]]] = {"processing": [], "event": []}
        self.deferred: list[tuple[float, int, Any]] = []
        """Timers set during a round of firing that wait for the next (begin_round)."""
        self.round_domain: str | None = None
        self.round_final = False
        self.round_at = -_INF
        self.seq = itertools.count()
        self.undo: list[tuple[Any, ...]] = []
        self.dirty: set[Any] | None = None
        """Keys written, deleted, expired or whose timers changed since the last snapshot
        (None: not tracked -- every snapshot is whole); the snapshot looks each one up."""
        self.written: _Upserts | None = None
        """Tracked with :attr:`dirty`: keys whose new states dict a step recorded as it put
        it in place since the last snapshot (``stateful_map``'s loop), so that the
        snapshot takes them as they are instead of looking each one up at the barrier
        (copy on write: the dict put in place last is the key's entry until the next
        write).  A key that is also in :attr:`dirty` is looked up (a delete, say).  While
        an :attr:`overlay` is on, the newest state of a key in it is there."""
        self.one_field: str | None = None
        """``"state"`` when every key's entry is ``{"state": value}`` (``stateful_map``'s
        store): its change sets say so (:class:`~sluiceway.core.delta.Changes`)."""
        self.overlay: Overlay | None = None
        """``stateful_map``'s overlay of the keys it writes again and again (in memory;
        None: none): :class:`Overlay`."""
        # The context of the code running now.
        self.key: Any = None
        self.cur: dict[str, Any] | None = None
        """``data.get(key)``: the current key's states, looked up once per record (kept
        up to date by every change to ``data[key]`` while user code runs)."""
        self.base: dict[str, Any] | None = None
        """The current key's states dict as the running code found it (set with
        :attr:`cur`), never changed while it runs: :attr:`cur` is a copy once the code
        changed it (:meth:`own`), and :meth:`rollback` puts it back.  ``_OWNED`` for a
        key in :attr:`owned`."""
        self.owned: set[Any] | None = None
        """None, unless nothing is ever rolled back (:meth:`in_place`): then the keys
        whose states dict the store changes in place instead of copying it -- a dict that
        a record made (:meth:`own`) since the last snapshot (and, on disk, since the last
        write-back), which no snapshot and no file holds."""
        self.wm: float = -_INF  # the event-time watermark (ticks) user code sees
        self.proc_now = 0.0  # clock.time(), read once per batch or timer round
        self.event_now: float = -_INF  # ticks: the record's event time or the timer's

    # -- declarations ------------------------------------------------------------------

    def declare(self, name: str, kind: str, ttl: TTL | None) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"state name must be a non-empty string, got {name!r}")
        prior = self.kinds.get(name)
        if prior is not None and (prior[0] != kind or (name in self.declared and prior[1] != ttl)):
            raise ValueError(
                f"operator {self.operator!r}: state {name!r} is already declared as "
                f"{prior[0]} state with ttl={prior[1]!r}; now asked for {kind} state with "
                f"ttl={ttl!r} (one name, one kind and TTL)"
            )
        if ttl is not None and ttl.time == "event" and not self.timestamped:
            raise ValueError(
                f"operator {self.operator!r}: state {name!r} has an event-time TTL, but the "
                "stream has no event time; call with_timestamps() before key_by(), or use "
                "a processing-time TTL"
            )
        self.kinds[name] = (kind, ttl)
        self.declared.add(name)

    # -- values ------------------------------------------------------------------------

    def at(self, key: Any) -> None:
        """Make ``key`` the current key (user code is about to run for it)."""
        self.key = key
        self.base = self.cur = self.data.get(key)
        if self.owned is not None and key in self.owned:
            self.base = _OWNED

    def in_place(self, on: bool) -> None:
        """Whether nothing is ever rolled back: the operator's error policy is ``Fail``,
        so a record that fails stops the flow (it resumes from its last checkpoint) and
        no later record or snapshot sees what it changed.  Then a key's states dict is
        copied once after each snapshot instead of once per record (:attr:`owned`)."""
        self.owned = set() if on else None

    def made(self, d: dict[str, Any] | None) -> None:
        """The running code succeeded for the current key, which had the states dict
        ``d`` when it started: a dict it made (a copy, or a new one) is the store's own
        (:attr:`owned`), and the key changed (:attr:`dirty`).  The step's loops inline
        it."""
        cur = self.cur
        if cur is not d:
            if self.dirty is not None:
                self.dirty.add(self.key)
            if self.owned is not None and cur is not None:
                self.owned.add(self.key)

    def entry(self, key: Any) -> dict[str, Any] | None:
        """``key``'s states dict (None: the key holds nothing), with the overlay's state
        if it has one (:attr:`overlay`)."""
        v = None if self.overlay is None else self.overlay.hot.get(key)
        return self.data.get(key) if v is None else {"state": v}

    def discard(self, key: Any) -> None:
        """Delete ``key``'s entry, which it holds (``stateful_map``'s function returned
        None for it)."""
        if self.dirty is not None:
            self.dirty.add(key)
        if self.overlay is not None:
            self.overlay.hot.pop(key, None)
        del self.data[key]

    def fold(self, snapshot: bool = False) -> None:
        """Put the overlay's states in :attr:`data` (and :attr:`written`, as changes):
        :attr:`data` is the whole state again.  Then let the overlay decide whether it
        stays on (:meth:`Overlay.decide`), told at a ``snapshot`` how many keys were
        written through since the last one (:attr:`written`) if it was off."""
        ov = self.overlay
        if ov is None:
            return
        hot, written = ov.hot, self.written
        through = None
        if hot:
            entries = dict(zip(hot, [{"state": v} for v in hot.values()], strict=True))
            self.data.update(entries)
            if written is not None:
                written.update(entries)
            ov.distinct += len(hot)
            ov.hot = {}
        elif snapshot and written is not None and not ov.on:
            through = len(written)
        ov.decide(through)

    def get(self, name: str) -> Any:
        d = self.cur
        return _MISSING if d is None else d.get(name, _MISSING)

    def own(self) -> dict[str, Any]:
        """The current key's states dict, to be changed: on the running code's first
        change a copy of :attr:`base` (or a new dict) put in its place."""
        d = self.cur
        if d is None or d is self.base:
            d = self.cur = self.data[self.key] = {} if d is None else d.copy()
        return d

    def commit(self) -> None:
        """The running code succeeded: keep its changes (the key is :attr:`dirty` if it
        changed anything), and start again from them."""
        if self.undo:
            if self.dirty is not None:
                self.dirty.add(self.key)
            self.undo.clear()
        base = self.base
        if base is not _OWNED:
            self.made(base)
        self.at(self.key)

    def put(self, name: str, value: Any) -> None:
        self.own()[name] = value

    def delete(self, name: str) -> None:
        key = self.key
        d = self.cur
        if d is None or name not in d:
            return
        d = self.own()
        old = d.pop(name)
        if not d:
            del self.data[key]
            self.cur = None
        if self.kinds.get(name, ("value", None))[0] == "map":
            for mk in old:
                self.forget((name, mk))
        else:
            self.forget(name)

    # -- map entries -------------------------------------------------------------------

    def map_of(self, name: str) -> dict[Any, Any] | None:
        d = self.cur
        return None if d is None else d.get(name)

    def put_entry(self, name: str, mk: Any, value: Any) -> None:
        m = self.map_of(name)
        if m is None:
            m = {}
            self.put(name, m)
        else:
            self.own()  # (the map changes: on disk, the key is written back again)
        self.undo.append((_U_ENTRY, m, mk, m.get(mk, _MISSING)))
        m[mk] = value

    def remove_entry(self, name: str, mk: Any) -> None:
        m = self.map_of(name)
        if m is None or mk not in m:
            return
        if len(m) == 1:  # the last entry: the map goes
            self.delete(name)
            return
        self.own()  # (as in put_entry)
        old = m.pop(mk)
        self.undo.append((_U_ENTRY, m, mk, old))
        self.forget((name, mk))

    # -- TTL -----------------------------------------------------------------------------

    def touch(self, tail: Tail, ttl: TTL) -> None:
        """The current key's ``tail`` was written now: its TTL restarts."""
        key = self.key
        domain = ttl.time
        if domain == "processing":
            deadline: float = self.proc_now + ttl.seconds
        else:
            deadline = self.event_now + round(ttl.seconds * _TICKS)
        slots = self.ttl_of.get(key)
        old = _MISSING if slots is None else slots.get(tail, _MISSING)
        if old is not _MISSING and old[0] >= deadline:  # event time: an out-of-order write
            return
        self.undo.append((_U_DEADLINE, key, tail, old))
        if slots is None:
            slots = self.ttl_of[key] = {}
        slots[tail] = (deadline, domain)
        self._schedule(key, tail, deadline, domain)

    def _schedule(self, key: Any, tail: Tail, deadline: float, domain: str) -> None:
        """Make sure a heap entry comes up at or before ``deadline`` (one entry per slot
        is enough while deadlines only move later; a deleted slot written again with an
        earlier event time needs an earlier one, and the later entry goes stale)."""
        slot = (key, tail)
        at = self.scheduled.get(slot)
        if at is None or at > deadline:
            self.scheduled[slot] = deadline
            heapq.heappush(self.ttl_heaps[domain], (deadline, next(self.seq), key, tail))

    def forget(self, tail: Tail) -> None:
        """The current key's ``tail`` was deleted: no deadline (its heap entry is dropped
        when it comes up)."""
        key = self.key
        slots = self.ttl_of.get(key)
        if slots is None:
            return
        old = slots.pop(tail, _MISSING)
        if old is _MISSING:
            return
        if not slots:
            del self.ttl_of[key]
        self.undo.append((_U_DEADLINE, key, tail, old))

    def _expire(self, key: Any, tail: Tail) -> None:
        slots = self.ttl_of[key]
        del slots[tail]
        if not slots:
            del self.ttl_of[key]
        if self.dirty is not None:
            self.dirty.add(key)
        d = self.data.get(key)
        if d is None:
            return
        d = d.copy()  # never changed in place: a snapshot may hold it
        if type(tail) is str:
            d.pop(tail, None)
        else:
            name, mk = tail
            m = d.get(name)
            if m is not None:
                m.pop(mk, None)
                if not m:
                    del d[name]
        if d:
            self.data[key] = d
        else:
            del self.data[key]
        if key == self.key:
            self.at(key)

    def expire(self, domain: str, upto: float) -> float:
        """Expire the TTL slots of ``domain`` whose deadline is at or before ``upto``;
        return the earliest remaining deadline."""
        heap = self.ttl_heaps[domain]
        scheduled = self.scheduled
        while heap and heap[0][0] <= upto:
            at, _, key, tail = heapq.heappop(heap)
            slot = (key, tail)
            if scheduled.get(slot) != at:
                continue  # superseded by an earlier entry
            del scheduled[slot]
            slots = self.ttl_of.get(key)
            now = None if slots is None else slots.get(tail)
            if now is None:
                continue  # deleted meanwhile
            if now[0] > upto or now[1] != domain:  # written again since: come back then
                self._schedule(key, tail, now[0], now[1])
                continue
            self._expire(key, tail)
        return heap[0][0] if heap else _INF

    # -- timers --------------------------------------------------------------------------

    def add_timer(self, domain: str, t: float, registered: Any) -> None:
        """A timer for the current key at ``t`` (ticks for event time); ``registered`` is
        the time as user code gave it, handed back to ``on_timer``."""
        key = self.key
        timers = self.timers[domain]
        kt = timers.get(key)
        if kt is None:
            kt = timers[key] = {}
        elif t in kt:
            return
        seq = next(self.seq)
        kt[t] = (seq, registered)
        if self.round_domain == domain and (self.round_final or t <= self.round_at):
            self.deferred.append((t, seq, key))  # see begin_round
        else:
            heapq.heappush(self.timer_heaps[domain], (t, seq, key))
        self.undo.append((_U_TIMER_ADD, domain, key, t))

    def delete_timer(self, domain: str, t: float) -> None:
        key = self.key
        timers = self.timers[domain]
        kt = timers.get(key)
        if kt is None:
            return
        entry = kt.pop(t, None)
        if entry is None:
            return
        if not kt:
            del timers[key]
        self.undo.append((_U_TIMER_DEL, domain, key, t, entry))

    def begin_round(self, domain: str, *, final: bool = False) -> None:
        """Start a round of firing the timers of ``domain`` (:meth:`next_timer` until
        None, then :meth:`end_round`).

        A timer set during the round fires in it only if it is later than the timer
        being fired (as if the watermark had passed the two one after the other).  One
        at or before that instant is behind: it waits for the next round.  In the
        ``final`` round (end of input) every timer set waits -- there is no next round,
        so they never fire.  Either way a timer that re-arms itself cannot keep a round
        going forever."""
        self.round_domain = domain
        self.round_final = final
        self.round_at = -_INF

    def end_round(self) -> None:
        """The round is over: the timers it set aside are pending again."""
        heap = self.timer_heaps[self.round_domain] if self.round_domain else []
        for entry in self.deferred:
            heapq.heappush(heap, entry)
        self.deferred.clear()
        self.round_domain = None

    def next_timer(self, domain: str, upto: float) -> tuple[Any, float, Any] | None:
        """The next timer of ``domain`` due by ``upto``, in time order (then registration
        order), removed from the pending ones, as ``(key, time, time as registered)``;
        expiring the TTL slots that come due before it on the way.  None when nothing
        more is due.

        Due: a processing-time timer at ``t <= upto`` (the clock has reached it); an
        event-time timer at ``t < upto`` (the watermark has *passed* it: records with
        timestamp ``t`` are not late at watermark ``t``, so its timer waits for them)."""
        heap, timers = self.timer_heaps[domain], self.timers[domain]
        strict = domain == "event"
        while True:
            top = heap[0][0] if heap else _INF
            self.expire(domain, min(upto, top))  # state expires before a timer at a tie
            if not heap or top > upto or (strict and top == upto):
                return None
            t, seq, key = heapq.heappop(heap)
            kt = timers.get(key)
            entry = None if kt is None else kt.get(t)
            if kt is not None and entry is not None and entry[0] == seq:
                del kt[t]
                if not kt:
                    del timers[key]
                if self.dirty is not None:
                    self.dirty.add(key)
                if self.round_domain == domain:
                    self.round_at = t
                return key, t, entry[1]

    def event_due(self) -> float:
        """:meth:`next_due` of event time after dropping the deleted (or superseded)
        timers at the top of the heap: a timer deleted and set again per record -- an
        inactivity timeout -- must not start a round of firing for nothing each time."""
        heap, timers = self.timer_heaps["event"], self.timers["event"]
        while heap:
            t, seq, key = heap[0]
            kt = timers.get(key)
            if kt is not None:
                entry = kt.get(t)
                if entry is not None and entry[0] == seq:
                    break
            heapq.heappop(heap)
        ttl = self.ttl_heaps["event"]
        a = ttl[0][0] if ttl else _INF
        b = heap[0][0] if heap else _INF
        return a if a < b else b

    def next_due(self, domain: str) -> float:
        """The earliest instant (maybe stale: too early) something of ``domain`` is due."""
        a, b = self.ttl_heaps[domain], self.timer_heaps[domain]
        return min(a[0][0] if a else _INF, b[0][0] if b else _INF)

    def pending_timers(self) -> int:
        return sum(len(kt) for timers in self.timers.values() for kt in timers.values())

    # -- the undo log --------------------------------------------------------------------

    def rollback(self) -> None:
        """Undo every change in :attr:`undo`, newest first, then put the current key's
        states dict back as the running code found it (:attr:`base`)."""
        undo, data = self.undo, self.data
        while undo:
            u = undo.pop()
            op = u[0]
            if op == _U_ENTRY:
                _, m, mk, old = u
                if old is _MISSING:
                    m.pop(mk, None)
                else:
                    m[mk] = old
            elif op == _U_DEADLINE:
                _, key, tail, old = u
                slots = self.ttl_of.get(key)
                if old is _MISSING:
                    if slots is not None:
                        slots.pop(tail, None)
                        if not slots:
                            del self.ttl_of[key]
                else:
                    if slots is None:
                        slots = self.ttl_of[key] = {}
                    slots[tail] = old
                    self._schedule(key, tail, old[0], old[1])
            elif op == _U_TIMER_ADD:
                _, domain, key, t = u
                timers = self.timers[domain]
                kt = timers[key]
                del kt[t]
                if not kt:
                    del timers[key]
            else:
                _, domain, key, t, entry = u
                self.timers[domain].setdefault(key, {})[t] = entry
                heapq.heappush(self.timer_heaps[domain], (t, entry[0], key))
        base = self.base
        if self.cur is not base and base is not _OWNED:  # (_OWNED: see in_place)
            if base is None:
                data.pop(self.key, None)
            else:
                data[self.key] = base
            self.cur = base

    # -- checkpoints ---------------------------------------------------------------------

    def settle(self) -> None:
        """Between records (after a batch or a round of timers): the on-disk backend
        writes back and bounds its cache (nothing for the in-memory dict)."""
        if self.disk is not None:
            self.disk.settle()
            if self.owned:  # (written back, or evicted: changed in place, lost)
                self.owned.clear()

    def close(self) -> None:
        """The run is over: the on-disk backend closes its file."""
        if self.disk is not None:
            self.disk.close()

    def track(self, on: bool) -> None:
        """Keep :attr:`dirty` and :attr:`written` (on) or not (off: every snapshot is
        whole)."""
        self.fold()
        self.dirty = set() if on else None
        if self.owned:  # (an owned key is dirty: changing it in place marks nothing)
            self.owned.clear()
        self.written = self._upserts() if on else None

    def _upserts(self) -> _Upserts:
        upserts = _Upserts()
        upserts.operator = self.operator
        return upserts

    def changes(self, whole: bool, extra: dict[str, Any]) -> Changes:
        """The state as :class:`~sluiceway.core.delta.Changes`: all of it (``whole``) or
        the keys changed since the previous call (needs :meth:`track`).  Starts a new
        change set either way.

        Shares nothing mutable with the live store (map states are copied; values are the
        user's own objects, as set).  Deadlines and timers are absolute; ``extra`` gets
        ``clock`` (this run's ``clock.time()``), from which :meth:`load` counts the
        processing-time ones again.
        """
        self.fold(snapshot=True)  # (the overlay's: in the state and in the change set)
        maps = [name for name, (kind, _) in self.kinds.items() if kind == "map"]
        upserts = self._upserts()
        deletes: set[Any] = set()
        dirty, written = self.dirty, self.written
        if whole:
            keys: Any = self.data.keys()
            if self.ttl_of or any(self.timers.values()):
                keys = keys | self.ttl_of.keys()
                for timers in self.timers.values():
                    keys |= timers.keys()
            elif not maps:  # the common case: values only, each key's dict as it is
                upserts.update(self.data if self.disk is None else self.disk.items())
                keys = ()
        else:
            if dirty is None or written is None:
                raise AssertionError("changes(whole=False) without dirty-key tracking")
            # The keys written as recorded, as they are: no walk over them here, on the
            # event loop (handed over, not copied: tracking starts a new dict below).
            upserts = written
            keys = dirty
        state_of = self._state_of
        for key in keys:
            st = state_of(key, maps)
            if st is None:
                upserts.pop(key, None)
                deletes.add(key)
            else:
                upserts[key] = st
        if dirty is not None:
            self.dirty = set()
            self.written = self._upserts()
        if self.owned:  # the snapshot holds the dicts: changed in place no more
            self.owned.clear()
        info = {"clock": self.clock.time(), "kinds": dict(self.kinds), **extra}
        return Changes(whole, upserts, frozenset(deletes), info, self.one_field)

    def _state_of(self, key: Any, maps: list[str]) -> dict[Any, Any] | None:
        """One key's entry in a snapshot (None: the key holds nothing)."""
        d = self.data.get(key)
        slots = self.ttl_of.get(key)
        if not (maps or slots) and not any(key in by_key for by_key in self.timers.values()):
            return d  # never changed in place (copy on write): the snapshot may hold it
        st: dict[Any, Any] = {} if d is None else d.copy()
        for name in maps:
            m = st.get(name)
            if m is not None:
                st[name] = m.copy()
        if slots:
            st[_TTL_FIELD] = list(slots.items())
        timers = [
            (domain, t, seq, registered)
            for domain, by_key in self.timers.items()
            if (kt := by_key.get(key))
            for t, (seq, registered) in kt.items()
        ]
        if timers:
            st[_TIMERS_FIELD] = timers
        return st or None

    def load(self, changes: Changes) -> dict[str, Any]:
        """Replace the state with a whole :meth:`changes`; returns its ``extra``.

        Processing-time deadlines and timers move by the time between the snapshot and
        now on this run's clock (the time the flow was down does not count); so does the
        time a processing-time timer hands ``on_timer``."""
        if not changes.whole:
            raise ValueError(
                f"operator {self.operator!r}: restore needs a whole state, got a change set "
                "(fold it onto its base first: sluiceway.core.delta.fold)"
            )
        extra = dict(changes.extra)
        shift = self.clock.time() - extra.pop("clock")
        kinds = extra.pop("kinds")
        maps = [name for name, (kind, _) in kinds.items() if kind == "map"]
        self._reset(kinds)
        timers: list[tuple[str, float, int, Any, Any]] = []
        ttl_of = self.ttl_of
        # (OnDisk: collected, then written to the file in one go)
        data: MutableMapping[Any, Any] = self.data if self.disk is None else {}
        for key, entry in changes.upserts.items():
            if not maps and _TTL_FIELD not in entry and _TIMERS_FIELD not in entry:
                data[key] = entry  # never changed in place (copy on write)
                continue
            st = dict(entry)
            slots = st.pop(_TTL_FIELD, None)
            pending = st.pop(_TIMERS_FIELD, None)
            for name in maps:
                if name in st:
                    st[name] = dict(st[name])
            if st:
                data[key] = st
            if slots:
                ttl_of[key] = {
                    tail: (dl + shift if dom == "processing" else dl, dom)
                    for tail, (dl, dom) in slots
                }
            for domain, t, seq, registered in pending or ():
                moved = shift if domain == "processing" else 0
                timers.append((domain, t + moved, seq, key, registered + moved))
        if self.disk is not None:
            self.disk.load(data.items())
        self._load_deadlines()
        self._load_timers(timers)
        return extra

    def load_format1(self, state: Any) -> dict[str, Any]:
        """Load a snapshot of the earlier format (one pickled blob, processing times as
        seconds remaining); returns its ``extra`` entries."""
        if not isinstance(state, dict) or state.get("format") != 1 or "blob" not in state:
            raise ValueError(
                f"operator {self.operator!r}: not a keyed-state snapshot (an Incremental, or "
                f"format 1): {type(state).__name__}"
            )
        # Only from an unsigned checkpoint of an older sluiceway that its owner chose to
        # trust (Checkpoints(trust_unauthenticated=ID)): signed parts never hold format 1.
        payload = unpack(state["blob"])
        now = self.clock.time()
        self._reset(payload.pop("kinds"))
        if self.disk is None:
            self.data.update(payload.pop("data"))
        else:
            self.disk.load(payload.pop("data").items())
        for slot, dom, dl in payload.pop("ttl"):
            tail = slot[1] if len(slot) == 2 else (slot[1], slot[2])
            deadline = now + dl if dom == "processing" else dl
            self.ttl_of.setdefault(slot[0], {})[tail] = (deadline, dom)
        timers: list[tuple[str, float, int, Any, Any]] = []
        seq = itertools.count()
        for key, t in payload.pop("event_timers"):
            timers.append(("event", t, next(seq), key, t / _TICKS))
        for key, t in payload.pop("processing_timers"):
            timers.append(("processing", now + t, next(seq), key, now + t))
        self._load_deadlines()
        self._load_timers(timers)
        return dict(payload)

    def _reset(self, kinds: dict[str, tuple[str, TTL | None]]) -> None:
        self.data.clear()
        if self.overlay is not None:
            self.overlay = Overlay(self.overlay.window)
        self.base = self.cur = None
        self.kinds = dict(kinds)
        self.declared = set()
        self.ttl_of, self.scheduled = {}, {}
        self.ttl_heaps = {"processing": [], "event": []}
        self.timers = {"processing": {}, "event": {}}
        self.timer_heaps = {"processing": [], "event": []}
        self.undo.clear()
        if self.owned:
            self.owned.clear()

    def _load_deadlines(self) -> None:
        for key, slots in self.ttl_of.items():
            for tail, (deadline, dom) in slots.items():
                self.scheduled[(key, tail)] = deadline
                self.ttl_heaps[dom].append((deadline, next(self.seq), key, tail))
        for heap in self.ttl_heaps.values():
            heapq.heapify(heap)

    def _load_timers(self, timers: list[tuple[str, float, int, Any, Any]]) -> None:
        """Pending timers again, in their firing order (time, then registration)."""
        timers.sort(key=lambda x: (x[1], x[2]))
        for domain, t, _, key, registered in timers:
            self.at(key)
            self.add_timer(domain, t, registered)
        self.at(None)
        self.undo.clear()
        if self.dirty is not None:
            self.dirty = set()
            self.written = self._upserts()


# -- what user code sees -----------------------------------------------------------------


class ValueState(Generic[T]):
    """One value per key (the key of the record or timer being handled).

    >>> import sluiceway as sw
    >>> class Dedup:
    ...     def process(self, ctx, value):
    ...         seen = ctx.value("seen")
    ...         if seen.get() is None:
    ...             seen.set(True)
    ...             ctx.emit(value)
    >>> sw.testing.run_collect(lambda s: s.key_by(lambda x: x).process(Dedup()), [1, 2, 1, 3])
    [1, 2, 3]
    """

    __slots__ = ("_arg", "_name", "_store", "_ttl")

    def __init__(self, store: KeyedStore, name: str, ttl: TTL | None, arg: object = None) -> None:
        self._store = store
        self._name = name
        self._ttl = ttl
        self._arg = arg  # ttl= as given (ProcessContext.value's cache)

    def __repr__(self) -> str:
        return f"<ValueState {self._name!r} of key {self._store.key!r}>"

    def get(self, default: Any = None) -> Any:
        """The value, or ``default`` when the key has none (never set, cleared, expired)."""
        d = self._store.cur
        return default if d is None else d.get(self._name, default)

    def set(self, value: T) -> None:
        """Replace the value (and restart its TTL)."""
        store = self._store
        d = store.cur
        if d is store.base or d is None:  # the first change: KeyedStore.own, inline
            d = store.cur = store.data[store.key] = {} if d is None else d.copy()
        d[self._name] = value
        if self._ttl is not None:
            store.touch(self._name, self._ttl)

    def clear(self) -> None:
        """Delete the value."""
        self._store.delete(self._name)

    @property
    def exists(self) -> bool:
        """True when the key has a value (even ``None``)."""
        return self._store.get(self._name) is not _MISSING


class MapState(Generic[K, V]):
    """A dict per key; with a TTL, each entry expires on its own.

    >>> import sluiceway as sw
    >>> class Counts:
    ...     def process(self, ctx, word):
    ...         m = ctx.map("counts")
    ...         m.put(word, m.get(word, 0) + 1)
    ...         ctx.emit(sorted(m.items()))
    >>> sw.testing.run_collect(
    ...     lambda s: s.key_by(len).process(Counts()), ["ab", "cd", "ab"])[-1]
    [('ab', 2), ('cd', 1)]
    """

    __slots__ = ("_arg", "_name", "_store", "_ttl")

    def __init__(self, store: KeyedStore, name: str, ttl: TTL | None, arg: object = None) -> None:
        self._store = store
        self._name = name
        self._ttl = ttl
        self._arg = arg  # ttl= as given (ProcessContext.map's cache)

    def __repr__(self) -> str:
        return f"<MapState {self._name!r} of key {self._store.key!r}>"

    def _map(self) -> dict[Any, Any]:
        m = self._store.map_of(self._name)
        return {} if m is None else m

    def get(self, key: K, default: Any = None) -> Any:
        """The value under ``key``, or ``default``."""
        return self._map().get(key, default)

    def put(self, key: K, value: V) -> None:
        """Set ``key`` to ``value`` (and restart that entry's TTL)."""
        store = self._store
        store.put_entry(self._name, key, value)
        if self._ttl is not None:
            store.touch((self._name, key), self._ttl)

    def remove(self, key: K) -> None:
        """Delete ``key`` (nothing happens when it is absent)."""
        self._store.remove_entry(self._name, key)

    def contains(self, key: K) -> bool:
        """True when ``key`` has an entry."""
        return key in self._map()

    __contains__ = contains

    def items(self) -> list[tuple[K, V]]:
        """The entries, as a list (a copy: safe to change the map while looping)."""
        return list(self._map().items())

    def keys(self) -> list[K]:
        """The keys, as a list."""
        return list(self._map())

    def values(self) -> list[V]:
        """The values, as a list."""
        return list(self._map().values())

    def __iter__(self) -> Iterator[K]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._map())

    def clear(self) -> None:
        """Delete every entry."""
        self._store.delete(self._name)


class TimerService:
    """Register and delete timers for the current key; ``on_timer`` fires once per
    registered ``(key, time, domain)`` and receives the time exactly as it was registered.

    Event-time timers fire once the watermark has *passed* their time
    (``time < watermark``), so a timer at ``t`` fires after the records with timestamp
    ``t``: a record at ``t`` is not late while the watermark is ``t``, and its timer waits
    for it.  They fire in time order, and at end of input (the watermark becomes
    +infinity: the timers pending then fire once, the ones they set do not).  A timer set
    in ``on_timer(t)`` at or before ``t`` fires at the next advance, not again in the same
    one.  Processing-time timers fire when the flow's clock (``clock.time()``, epoch
    seconds) reaches them (``time <= now``); pending ones are dropped at end of input.

    Marble (bound 0: the watermark before a record is the largest timestamp before it)::

        records (ts):      1    2    2    3    4
        watermark before: -inf  1    2    2    3
        timer at 2:                             fires here (watermark 3 > 2), after the
                                                records at 2 (and the one at 3)
    """

    __slots__ = ("_check", "_fast", "_store")

    def __init__(self, store: KeyedStore, check: Callable[[], None], has_on_timer: bool) -> None:
        self._store = store
        self._check = check
        self._fast = has_on_timer and store.timestamped  # a float needs no other check

    def _event_ticks(self, t: float | datetime, what: str) -> int:
        self._check()
        if not self._store.timestamped:
            raise ValueError(
                f"operator {self._store.operator!r}: {what}() needs event time; call "
                "with_timestamps() before key_by(), or use processing-time timers"
            )
        return to_ticks(t)

    def at_event_time(self, t: float | datetime) -> None:
        """Call ``on_timer(ctx, t)`` once the watermark has passed ``t`` (epoch seconds or
        an aware datetime; ``on_timer`` gets ``t`` back as given)."""
        if self._fast and type(t) is float and _MIN_SECONDS <= t <= _MAX_SECONDS:
            self._store.add_timer("event", round(t * _TICKS), t)  # = to_ticks(t)
        else:
            self._store.add_timer("event", self._event_ticks(t, "at_event_time"), t)

    def delete_event_time(self, t: float | datetime) -> None:
        """Cancel the event-time timer at ``t`` for this key (if any)."""
        if self._fast and type(t) is float and _MIN_SECONDS <= t <= _MAX_SECONDS:
            self._store.delete_timer("event", round(t * _TICKS))
        else:
            self._store.delete_timer("event", self._event_ticks(t, "delete_event_time"))

    def _processing(self, t: float) -> float:
        self._check()
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise TypeError(f"a processing-time timer needs finite epoch seconds, got {t!r}")
        return float(t)

    def at_processing_time(self, t: float) -> None:
        """Call ``on_timer(ctx, t)`` once the flow's clock (``ctx.processing_time``)
        reaches ``t``."""
        self._store.add_timer("processing", self._processing(t), t)

    def delete_processing_time(self, t: float) -> None:
        """Cancel the processing-time timer at ``t`` for this key (if any)."""
        self._store.delete_timer("processing", self._processing(t))

    @property
    def processing_time(self) -> float:
        """The flow's clock now, in epoch seconds (read once per batch)."""
        return self._store.proc_now


class _ValueOf(Protocol):
    def __call__(
        self, name: str, *, ttl: float | timedelta | TTL | None = None
    ) -> ValueState[Any]: ...


class _MapOf(Protocol):
    def __call__(
        self, name: str, *, ttl: float | timedelta | TTL | None = None
    ) -> MapState[Any, Any]: ...


class ProcessContext(Generic[K]):
    """What ``process(ctx, value)`` and ``on_timer(ctx, time)`` work with.

    Attributes:
        key: the key of the record (or of the timer) being handled.
        timestamp: its event time in epoch seconds (a timer's: its time), or None on a
            stream without event time and for processing-time timers.
        watermark: the event-time watermark in seconds (the one the record came with;
            +infinity at end of input), or None on a stream without event time.
        time_domain: None in ``process``; ``"event"`` or ``"processing"`` in ``on_timer``.
        timers: the :class:`TimerService`.
        emit: ``emit(value)`` sends ``value`` downstream, with this key (and event time,
            when there is one).
        value: ``value(name, *, ttl=None)``: the :class:`ValueState` ``name`` of the
            current key (declare it with the same ``ttl`` every time).
        map: ``map(name, *, ttl=None)``: the :class:`MapState` ``name`` of the current
            key (the same).

    ``value`` and ``map`` return the same handle for the same arguments (a cache in C:
    user code asks for its handles on every record); a ``ttl`` must be hashable, as
    every valid one is.
    """

    __slots__ = (
        "_maps",
        "_store",
        "_values",
        "emit",
        "key",
        "map",
        "time_domain",
        "timers",
        "timestamp",
        "value",
    )

    def __init__(
        self,
        store: KeyedStore,
        emit: Callable[[Any], None],
        has_on_timer: bool,
    ) -> None:
        self._store = store
        self.emit = emit
        self._values: dict[str, ValueState[Any]] = {}
        self._maps: dict[str, MapState[Any, Any]] = {}
        self.key: Any = None
        self.timestamp: float | None = None
        self.time_domain: TimeDomain | None = None

        def check() -> None:
            if not has_on_timer:
                raise TypeError(
                    f"operator {store.operator!r}: registering a timer needs an on_timer(ctx, "
                    "time) method on the process function"
                )

        self.timers = TimerService(store, check, has_on_timer)
        self.value: _ValueOf = functools.lru_cache(maxsize=None)(self._value)
        self.map: _MapOf = functools.lru_cache(maxsize=None)(self._map)

    def __repr__(self) -> str:
        return f"<ProcessContext key={self.key!r} timestamp={self.timestamp!r}>"

    @property
    def watermark(self) -> float | None:
        store = self._store
        return store.wm / _TICKS if store.timestamped else None

    @property
    def processing_time(self) -> float:
        """The flow's clock now, in epoch seconds (read once per batch)."""
        return self._store.proc_now

    def _value(self, name: str, *, ttl: float | timedelta | TTL | None = None) -> ValueState[Any]:
        """:attr:`value` behind its cache: the handle, declared on its first use."""
        h = self._values.get(name)
        if h is None or (h._arg is not ttl and h._arg != ttl):  # (is: the usual None)
            t = as_ttl(ttl, f"value({name!r}, ttl=...)")
            self._store.declare(name, "value", t)
            h = self._values[name] = ValueState(self._store, name, t, ttl)
        return h

    def _map(self, name: str, *, ttl: float | timedelta | TTL | None = None) -> MapState[Any, Any]:
        """:attr:`map` behind its cache: the handle, declared on its first use."""
        h = self._maps.get(name)
        if h is None or (h._arg is not ttl and h._arg != ttl):
            t = as_ttl(ttl, f"map({name!r}, ttl=...)")
            self._store.declare(name, "map", t)
            h = self._maps[name] = MapState(self._store, name, t, ttl)
        return h


@runtime_checkable
class KeyedProcessFunction(Protocol):
    """What ``keyed.process(fn)`` expects: ``process``, and ``on_timer`` if it sets timers.

    Keep state in the context (``ctx.value``, ``ctx.map``), not on ``self``: only the
    context's state is per key and in checkpoints.
    """

    def process(self, ctx: ProcessContext[Any], value: Any) -> None: ...
