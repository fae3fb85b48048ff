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

import heapq
import itertools
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

from sluiceway.errors import CheckpointError
from sluiceway.time import Clock
from sluiceway.time.durations import positive_seconds
from sluiceway.time.ticks import to_ticks

__all__ = [
    "TTL",
    "KeyedProcessFunction",
    "MapState",
    "ProcessContext",
    "TimeDomain",
    "TimerEvent",
    "TimerService",
    "ValueState",
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


@dataclass(frozen=True, slots=True)
class TTL:
    """State not written for ``seconds`` is dropped.

    Args:
        seconds: the time to live, > 0 (float seconds or a ``timedelta``).
        time: ``"processing"`` (default): seconds of the flow's clock since the last
            write; ``"event"``: the watermark has passed the event time of the last
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

# Undo-log entries: what to put back when user code fails half-way through a record.
_U_VALUE, _U_ENTRY, _U_DEADLINE, _U_TIMER_ADD, _U_TIMER_DEL = range(5)


class KeyedStore:
    """Every key's state, its TTL deadlines and the pending timers of one operator.

    Internal to sluiceway (the operator drives it; user code sees the handles).  While
    user code runs for one record, every change is logged so that :meth:`rollback` can
    undo it when the code fails: a failed record leaves the state as it was.

    Layout: ``data[key][name]`` is a value state's value or a map state's ``dict``.  A
    TTL deadline belongs to a *slot*: ``(key, name)`` for a value, ``(key, name, map_key)``
    for a map entry.  Processing-time deadlines and timers are seconds of
    ``clock.time()``; event-time ones integer microseconds.
    """

    def __init__(self, operator: str, clock: Clock, timestamped: bool) -> None:
        self.operator = operator
        self.clock = clock
        self.timestamped = timestamped
        self.data: dict[Any, dict[str, Any]] = {}
        self.kinds: dict[str, tuple[str, TTL | None]] = {}
        self.declared: set[str] = set()
        self.deadlines: dict[tuple[Any, ...], float] = {}
        self.domain_of: dict[tuple[Any, ...], TimeDomain] = {}
        self.scheduled: dict[tuple[Any, ...], float] = {}  # slot -> its heap entry's time
        self.ttl_heaps: dict[str, list[tuple[float, int, tuple[Any, ...]]]] = {
            "processing": [],
            "event": [],
        }
        self.timers: dict[str, dict[tuple[Any, float], int]] = {"processing": {}, "event": {}}
        self.timer_heaps: dict[str, list[tuple[float, int, Any]]] = {"processing": [], "event": []}
        self.deferred: list[tuple[float, int, Any]] = []
        """Timers set during a round of firing that wait for the next (begin_round)."""
        self.round_domain: str | None = None
        self.round_final = False
        self.round_at = -_INF
        self.seq = itertools.count()
        self.undo: list[tuple[Any, ...]] = []
        self.logging = False
        # The context of the code running now.
        self.key: Any = None
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

    def get(self, name: str) -> Any:
        d = self.data.get(self.key)
        return _MISSING if d is None else d.get(name, _MISSING)

    def put(self, name: str, value: Any) -> None:
        key = self.key
        d = self.data.get(key)
        if d is None:
            d = self.data[key] = {}
        if self.logging:
            self.undo.append((_U_VALUE, key, name, d.get(name, _MISSING)))
        d[name] = value

    def delete(self, name: str) -> None:
        key = self.key
        d = self.data.get(key)
        if d is None or name not in d:
            return
        old = d.pop(name)
        if self.logging:
            self.undo.append((_U_VALUE, key, name, old))
        if not d:
            del self.data[key]
        if self.kinds.get(name, ("value", None))[0] == "map":
            for mk in old:
                self.forget((key, name, mk))
        else:
            self.forget((key, name))

    # -- map entries -------------------------------------------------------------------

    def map_of(self, name: str) -> dict[Any, Any] | None:
        d = self.data.get(self.key)
        return None if d is None else d.get(name)

    def put_entry(self, name: str, mk: Any, value: Any) -> None:
        m = self.map_of(name)
        if m is None:
            m = {}
            self.put(name, m)
        if self.logging:
            self.undo.append((_U_ENTRY, self.key, name, mk, m.get(mk, _MISSING)))
        m[mk] = value

    def remove_entry(self, name: str, mk: Any) -> None:
        m = self.map_of(name)
        if m is None or mk not in m:
            return
        if len(m) == 1:  # the last entry: the map goes
            self.delete(name)
            return
        old = m.pop(mk)
        if self.logging:
            self.undo.append((_U_ENTRY, self.key, name, mk, old))
        self.forget((self.key, name, mk))

    # -- TTL -----------------------------------------------------------------------------

    def touch(self, slot: tuple[Any, ...], ttl: TTL) -> None:
        """``slot`` was written now: its TTL restarts."""
        domain = ttl.time
        if domain == "processing":
            deadline: float = self.proc_now + ttl.seconds
        else:
            deadline = self.event_now + round(ttl.seconds * _TICKS)
        old = self.deadlines.get(slot, _MISSING)
        if old is not _MISSING and old >= deadline:  # event time: an out-of-order write
            return
        if self.logging:
            self.undo.append((_U_DEADLINE, slot, old, self.domain_of.get(slot)))
        self.deadlines[slot] = deadline
        self.domain_of[slot] = domain
        self._schedule(slot, deadline, domain)

    def _schedule(self, slot: tuple[Any, ...], deadline: float, domain: str) -> None:
        """Make sure a heap entry comes up at or before ``deadline`` (one entry per slot
        is enough while deadlines only move later; a deleted slot written again with an
        earlier event time needs an earlier one, and the later entry goes stale)."""
        at = self.scheduled.get(slot)
        if at is None or at > deadline:
            self.scheduled[slot] = deadline
            heapq.heappush(self.ttl_heaps[domain], (deadline, next(self.seq), slot))

    def forget(self, slot: tuple[Any, ...]) -> None:
        """``slot`` was deleted: no deadline (its heap entry is dropped when it comes up)."""
        old = self.deadlines.pop(slot, _MISSING)
        if old is not _MISSING:
            domain = self.domain_of.pop(slot)
            if self.logging:
                self.undo.append((_U_DEADLINE, slot, old, domain))

    def _expire(self, slot: tuple[Any, ...]) -> None:
        key, name = slot[0], slot[1]
        self.deadlines.pop(slot, None)
        self.domain_of.pop(slot, None)
        d = self.data.get(key)
        if d is None:
            return
        if len(slot) == 2:
            d.pop(name, None)
        else:
            m = d.get(name)
            if m is not None:
                m.pop(slot[2], None)
                if not m:
                    del d[name]
        if not d:
            del self.data[key]

    def expire(self, domain: str, upto: float) -> float:
        """Expire the TTL slots of ``domain`` whose deadline is at or before ``upto`` and
        earlier than any timer of that domain; return the earliest remaining deadline."""
        heap = self.ttl_heaps[domain]
        scheduled = self.scheduled
        while heap and heap[0][0] <= upto:
            at, _, slot = heapq.heappop(heap)
            if scheduled.get(slot) != at:
                continue  # superseded by an earlier entry
            del scheduled[slot]
            deadline = self.deadlines.get(slot)
            if deadline is None:
                continue  # deleted meanwhile
            if deadline > upto:  # written again since: come back at the new deadline
                self._schedule(slot, deadline, domain)
                continue
            self._expire(slot)
        return heap[0][0] if heap else _INF

    # -- timers --------------------------------------------------------------------------

    def add_timer(self, domain: str, t: float) -> None:
        item = (self.key, t)
        timers = self.timers[domain]
        if item in timers:
            return
        seq = timers[item] = next(self.seq)
        if self.round_domain == domain and (self.round_final or t <= self.round_at):
            self.deferred.append((t, seq, self.key))  # see begin_round
        else:
            heapq.heappush(self.timer_heaps[domain], (t, seq, self.key))
        if self.logging:
            self.undo.append((_U_TIMER_ADD, domain, item))

    def delete_timer(self, domain: str, t: float) -> None:
        item = (self.key, t)
        seq = self.timers[domain].pop(item, None)
        if seq is not None and self.logging:
            self.undo.append((_U_TIMER_DEL, domain, item, seq))

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

    def next_timer(self, domain: str, upto: float) -> tuple[Any, float] | None:
        """The next timer of ``domain`` due at or before ``upto``, in time order (then
        registration order), removed from the pending ones; expiring the TTL slots that
        come due before it on the way.  None when nothing more is due."""
        heap, timers = self.timer_heaps[domain], self.timers[domain]
        while True:
            top = heap[0][0] if heap else _INF
            self.expire(domain, min(upto, top))  # state expires before a timer at a tie
            if not heap or top > upto:
                return None
            t, seq, key = heapq.heappop(heap)
            if timers.get((key, t)) == seq:
                del timers[(key, t)]
                if self.round_domain == domain:
                    self.round_at = t
                return key, t

    def next_due(self, domain: str) -> float:
        """The earliest instant (maybe stale: too early) something of ``domain`` is due."""
        a, b = self.ttl_heaps[domain], self.timer_heaps[domain]
        return min(a[0][0] if a else _INF, b[0][0] if b else _INF)

    def pending_timers(self) -> int:
        return len(self.timers["processing"]) + len(self.timers["event"])

    # -- the undo log --------------------------------------------------------------------

    def begin(self) -> None:
        self.undo.clear()
        self.logging = True

    def commit(self) -> None:
        self.undo.clear()
        self.logging = False

    def rollback(self) -> None:
        """Undo every change since :meth:`begin`, newest first."""
        undo, data = self.undo, self.data
        while undo:
            u = undo.pop()
            op = u[0]
            if op == _U_VALUE:
                _, key, name, old = u
                d = data.setdefault(key, {})
                if old is _MISSING:
                    d.pop(name, None)
                else:
                    d[name] = old
                if not d:
                    del data[key]
            elif op == _U_ENTRY:
                _, key, name, mk, old = u
                m = data[key][name]
                if old is _MISSING:
                    m.pop(mk, None)
                else:
                    m[mk] = old
            elif op == _U_DEADLINE:
                _, slot, old, domain = u
                if old is _MISSING:
                    self.deadlines.pop(slot, None)
                    self.domain_of.pop(slot, None)
                else:
                    self.deadlines[slot] = old
                    self.domain_of[slot] = domain
                    self._schedule(slot, old, domain)
            elif op == _U_TIMER_ADD:
                _, domain, item = u
                self.timers[domain].pop(item, None)
            else:
                _, domain, item, seq = u
                self.timers[domain][item] = seq
                heapq.heappush(self.timer_heaps[domain], (item[1], seq, item[0]))
        self.logging = False

    # -- checkpoints ---------------------------------------------------------------------

    def snapshot(self, extra: dict[str, Any]) -> dict[str, Any]:
        """Everything, pickled: shares nothing with the live store.

        Processing-time deadlines and timers are stored as seconds *remaining* on this
        run's clock; :meth:`restore` counts them from the restoring run's clock.
        """
        now = self.clock.time()

        def in_order(domain: str) -> list[tuple[Any, float]]:
            items = sorted(self.timers[domain].items(), key=lambda kv: (kv[0][1], kv[1]))
            if domain == "processing":
                return [(k, t - now) for (k, t), _ in items]
            return [(k, t) for (k, t), _ in items]

        payload = {
            "data": self.data,
            "kinds": self.kinds,
            "ttl": [
                (slot, dom, dl - now if dom == "processing" else dl)
                for slot, dl in self.deadlines.items()
                if (dom := self.domain_of[slot])
            ],
            "event_timers": in_order("event"),
            "processing_timers": in_order("processing"),
            **extra,
        }
        try:
            blob = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise self._unpicklable(exc) from exc
        return {"format": 1, "operator": self.operator, "keys": len(self.data), "blob": blob}

    def _unpicklable(self, exc: Exception) -> CheckpointError:
        for key, d in self.data.items():
            try:
                pickle.dumps(key)
            except Exception as why:  # noqa: BLE001 - reported below, with the key
                return CheckpointError(
                    f"operator {self.operator!r}: key {key!r} cannot be pickled for a "
                    f"checkpoint: {type(why).__name__}: {why}"
                )
            for name, value in d.items():
                try:
                    pickle.dumps(value)
                except Exception as why:  # noqa: BLE001 - reported below, with the key
                    return CheckpointError(
                        f"operator {self.operator!r}: state {name!r} of key {key!r} cannot be "
                        f"pickled for a checkpoint: {type(why).__name__}: {why}; keep state "
                        "to picklable values (numbers, strings, lists, dicts, dataclasses)"
                    )
        return CheckpointError(
            f"operator {self.operator!r}: its state cannot be pickled for a checkpoint: "
            f"{type(exc).__name__}: {exc}"
        )

    def restore(self, state: Any) -> dict[str, Any]:
        """Load a :meth:`snapshot`; returns the ``extra`` entries it was given."""
        if not isinstance(state, dict) or state.get("format") != 1 or "blob" not in state:
            raise ValueError(
                f"operator {self.operator!r}: not a keyed-state snapshot (format 1): "
                f"{type(state).__name__}"
            )
        payload = pickle.loads(state["blob"])  # our own checkpoint's bytes
        now = self.clock.time()
        self.data = payload.pop("data")
        self.kinds = payload.pop("kinds")
        self.declared = set()
        self.deadlines, self.domain_of, self.scheduled = {}, {}, {}
        self.ttl_heaps = {"processing": [], "event": []}
        for slot, dom, dl in payload.pop("ttl"):
            deadline = now + dl if dom == "processing" else dl
            self.deadlines[slot] = deadline
            self.domain_of[slot] = dom
            self.scheduled[slot] = deadline
            self.ttl_heaps[dom].append((deadline, next(self.seq), slot))
        self.timers = {"processing": {}, "event": {}}
        self.timer_heaps = {"processing": [], "event": []}
        for domain in ("event", "processing"):
            for key, t in payload.pop(f"{domain}_timers"):
                self.key = key
                self.add_timer(domain, now + t if domain == "processing" else t)
        for heap in self.ttl_heaps.values():
            heapq.heapify(heap)
        self.key = None
        return dict(payload)


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

    __slots__ = ("_name", "_store", "_ttl")

    def __init__(self, store: KeyedStore, name: str, ttl: TTL | None) -> None:
        self._store = store
        self._name = name
        self._ttl = ttl

    def __repr__(self) -> str:
        return f"<ValueState {self._name!r} of key {self._store.key!r}>"

    def get(self, default: Any = None) -> Any:
        """The value, or ``default`` when the key has none (never set, cleared, expired)."""
        v = self._store.get(self._name)
        return default if v is _MISSING else v

    def set(self, value: T) -> None:
        """Replace the value (and restart its TTL)."""
        store = self._store
        store.put(self._name, value)
        if self._ttl is not None:
            store.touch((store.key, self._name), self._ttl)

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

    __slots__ = ("_name", "_store", "_ttl")

    def __init__(self, store: KeyedStore, name: str, ttl: TTL | None) -> None:
        self._store = store
        self._name = name
        self._ttl = ttl

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
            store.touch((store.key, self._name, key), self._ttl)

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
    registered ``(key, time, domain)``.

    Event-time timers fire when the watermark reaches their time (``time <= watermark``),
    in time order, and at end of input (the watermark becomes +infinity: the timers
    pending then fire once, the ones they set do not).  A timer set in ``on_timer(t)`` at
    or before ``t`` fires at the next advance, not again in the same one.  Processing-time
    timers fire when the flow's clock (``clock.time()``, epoch seconds) reaches them;
    pending ones are dropped at end of input.
    """

    __slots__ = ("_check", "_store")

    def __init__(self, store: KeyedStore, check: Callable[[], None]) -> None:
        self._store = store
        self._check = check

    def _event_ticks(self, t: float | datetime, what: str) -> int:
        self._check()
        if not self._store.timestamped:
            raise ValueError(
                f"operator {self._store.operator!r}: {what}() needs event time; call "
                "with_timestamps() before key_by(), or use processing-time timers"
            )
        return to_ticks(t)

    def at_event_time(self, t: float | datetime) -> None:
        """Call ``on_timer(ctx, t)`` once the watermark reaches ``t`` (epoch seconds)."""
        self._store.add_timer("event", self._event_ticks(t, "at_event_time"))

    def delete_event_time(self, t: float | datetime) -> None:
        """Cancel the event-time timer at ``t`` for this key (if any)."""
        self._store.delete_timer("event", self._event_ticks(t, "delete_event_time"))

    def _processing(self, t: float) -> float:
        self._check()
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise TypeError(f"a processing-time timer needs finite epoch seconds, got {t!r}")
        return float(t)

    def at_processing_time(self, t: float) -> None:
        """Call ``on_timer(ctx, t)`` once the flow's clock (``ctx.processing_time``)
        reaches ``t``."""
        self._store.add_timer("processing", self._processing(t))

    def delete_processing_time(self, t: float) -> None:
        """Cancel the processing-time timer at ``t`` for this key (if any)."""
        self._store.delete_timer("processing", self._processing(t))

    @property
    def processing_time(self) -> float:
        """The flow's clock now, in epoch seconds (read once per batch)."""
        return self._store.proc_now


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
    """

    __slots__ = ("_emit", "_handles", "_store", "key", "time_domain", "timers", "timestamp")

    def __init__(
        self,
        store: KeyedStore,
        emit: Callable[[Any], None],
        has_on_timer: bool,
    ) -> None:
        self._store = store
        self._emit = emit
        self._handles: dict[tuple[str, object], Any] = {}
        self.key: Any = None
        self.timestamp: float | None = None
        self.time_domain: TimeDomain | None = None

        def check() -> None:
            if not has_on_timer:
                raise TypeError(
                    f"operator {store.operator!r}: registering a timer needs an on_timer(ctx, "
                    "time) method on the process function"
                )

        self.timers = TimerService(store, check)

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

    def emit(self, value: Any) -> None:
        """Send ``value`` downstream, with this key (and event time, when there is one)."""
        self._emit(value)

    def value(self, name: str, *, ttl: float | timedelta | TTL | None = None) -> ValueState[Any]:
        """The value state ``name`` of the current key (declare it with the same ``ttl``
        every time)."""
        h = self._handles.get((name, ttl))
        if not isinstance(h, ValueState):
            t = as_ttl(ttl, f"value({name!r}, ttl=...)")
            self._store.declare(name, "value", t)
            h = self._handles[(name, ttl)] = ValueState(self._store, name, t)
        return h

    def map(self, name: str, *, ttl: float | timedelta | TTL | None = None) -> MapState[Any, Any]:
        """The map state ``name`` of the current key."""
        h = self._handles.get((name, ttl))
        if not isinstance(h, MapState):
            t = as_ttl(ttl, f"map({name!r}, ttl=...)")
            self._store.declare(name, "map", t)
            h = self._handles[(name, ttl)] = MapState(self._store, name, t)
        return h


@runtime_checkable
class KeyedProcessFunction(Protocol):
    """What ``keyed.process(fn)`` expects: ``process``, and ``on_timer`` if it sets timers.

    Keep state in the context (``ctx.value``, ``ctx.map``), not on ``self``: only the
    context's state is per key and in checkpoints.
    """

    def process(self, ctx: ProcessContext[Any], value: Any) -> None: ...
