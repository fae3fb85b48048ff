"""Keyed state for user code: ``keyed.process(fn)`` and ``keyed.stateful_map(fn)``.

One step runs both: a keyed process function (``stateful_map`` is one of them, a few
lines below).  Per record it sets the context (key, event time, watermark), calls the
user's code under the operator's error policy, and collects what it emits.  The state
lives in a :class:`~sluiceway.state.KeyedStore`, which logs every change while user code
runs, so a record that fails -- and is dead-lettered, or retried -- leaves the state, the
timers and the output as they were before it.

Event time follows the watermark *column*: before each record the step advances to the
watermark that record came with, expiring event-time TTLs and firing event-time timers
that are due (in time order; at a tie, state expires first), exactly as the window
operator does; ``Watermark`` control messages advance it further.  So what fires before
which record depends only on the order of records, never on batch cuts.  At end of input
the watermark becomes +infinity: every pending event-time timer fires once (the ones
those set do not: see ``KeyedStore.begin_round``).  Processing-time
timers and TTLs run on the flow's clock (``clock.time()``) through the step's
``next_deadline``/``on_timer``; pending processing-time timers are dropped at end of input.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

from sluiceway.core.delta import Incremental, Partition
from sluiceway.core.messages import Batch, Control, Watermark
from sluiceway.core.query import KeyState
from sluiceway.diskstate import (
    DiskMap,
    InMemory,
    OnDisk,
    StateBackend,
    open_run_dir,
    remove_run_dir,
)
from sluiceway.operators.base import BuildContext, OpSpec, Step, without
from sluiceway.operators.errors import ErrorHandler
from sluiceway.policies import ErrorPolicy, Fail
from sluiceway.state import _OWNED, TTL, KeyedStore, Overlay, ProcessContext, TimerEvent
from sluiceway.time import Clock, yield_now

__all__ = ["KeyedProcessSpec", "StatefulMapSpec"]

_INF = math.inf
DEFAULT_BACKEND: StateBackend = InMemory()
"""The backend of a keyed operator when neither it nor its flow names one (tests run the
keyed-state suites on both backends by replacing it)."""
_TICKS = 1_000_000
_YIELD_EVERY = 1024  # timers fired between two turns of the event loop, at most


class _KeyedProcessStep(Step):
    def __init__(self, ctx: BuildContext, spec: KeyedProcessSpec) -> None:
        super().__init__(ctx.name, ctx.metrics)
        assert ctx.errors is not None
        self.errors: ErrorHandler = ctx.errors
        self.clock: Clock = ctx.clock
        self.timestamped = spec.timestamped
        self.timed = spec.boundary
        self.fn = spec.factory()
        self.process_fn: Callable[[ProcessContext[Any], Any], Any] = self.fn.process
        self.timer_fn: Callable[[ProcessContext[Any], Any], Any] | None = getattr(
            self.fn, "on_timer", None
        )
        self.backend: StateBackend = DEFAULT_BACKEND if spec.state is None else spec.state
        self.run_dir: Path | None = None  # OnDisk: this run's directory of files
        self.store = self._new_store(None)
        self.stores: dict[Partition, KeyedStore] = {None: self.store}
        """The state per source partition (one store each, so that one partition's share
        can be snapshotted, restored or dropped alone); today every record belongs to
        partition None."""
        self.changes_accepted = False
        self.next_whole = True  # the next snapshot is whole (the first, or after a restore)
        self.single = isinstance(spec, StatefulMapSpec)  # one state per key: "state"
        self.out: list[Any] = []
        self.out_keys: list[Any] = []
        self.out_ts: list[int] = []
        self.out_wms: list[float] = []
        self.ctx: ProcessContext[Any] = ProcessContext(
            self.store, self._emitter(), self.timer_fn is not None
        )
        self.rec_wm: float = -_INF  # the watermark the last record came with
        self.max_ts: float = -_INF  # the largest event time seen (ticks)
        self.cur_ts: int | None = None  # event time of what is being handled (ticks)
        self.cur_wm: float = -_INF  # the watermark its outputs carry

    def _new_store(self, partition: Partition) -> KeyedStore:
        """A partition's store, on the operator's backend (OnDisk: a file of its own, so
        that a partition's share can be dropped alone)."""
        backend = self.backend
        disk = None
        if isinstance(backend, OnDisk):
            if self.run_dir is None:
                self.run_dir = open_run_dir(backend, self.name)
            part = "all" if partition is None else f"p{partition}"
            disk = DiskMap(self.run_dir / f"{part}.sqlite", backend.cache_keys, self.name)
        store = KeyedStore(self.name, self.clock, self.timestamped, disk)
        # Fail: a failed record stops the flow, nothing is rolled back (see in_place).
        store.in_place(isinstance(self.errors.policy, Fail))
        return store

    def close(self) -> None:
        """Close the on-disk backend's files and delete this run's directory."""
        for store in self.stores.values():
            store.close()
        if self.run_dir is not None:
            remove_run_dir(self.run_dir)
            self.run_dir = None

    # -- output ------------------------------------------------------------------------

    def _emitter(self) -> Callable[[Any], None]:
        """``ctx.emit``: appends to the output columns (kept as the same lists for the
        step's life, so the function holds them directly).

        Without event time it is ``out.append`` itself (a call in C, not a Python
        function per output): the outputs beyond ``out_keys`` are the ones the code that
        ran last emitted, and get its key (:meth:`_stamp`) before other code runs."""
        out, out_keys, out_ts, out_wms = self.out, self.out_keys, self.out_ts, self.out_wms
        step, store = self, self.store

        if not self.timestamped:
            return out.append

        def emit_timed(value: Any) -> None:
            assert step.cur_ts is not None
            out.append(value)
            out_keys.append(store.key)
            out_ts.append(step.cur_ts)
            out_wms.append(step.cur_wm)

        return emit_timed

    def _stamp(self) -> None:
        """Give the outputs not stamped yet the current key (see :meth:`_emitter`)."""
        n = len(self.out) - len(self.out_keys)
        if n:
            self.out_keys.extend([self.store.key] * n)

    def _truncate(self, n: int) -> None:
        del self.out[n:], self.out_keys[n:]
        if self.timestamped:
            del self.out_ts[n:], self.out_wms[n:]

    async def _flush(self) -> None:
        self._stamp()
        for store in self.stores.values():
            store.settle()
        m = self.metrics
        m.state = self._keys_held()
        if self.timestamped:
            m.watermark = self.store.wm / _TICKS
        out = self.out
        if not out:
            return
        if self.timestamped:
            batch = Batch(out[:], self.out_ts[:], self.out_keys[:], self.out_wms[:])
            self.out_ts.clear()
            self.out_wms.clear()
        else:
            batch = Batch(out[:], None, self.out_keys[:])
        out.clear()
        self.out_keys.clear()
        await self.emit(batch)

    def _keys_held(self) -> int:
        return sum(len(store.data) for store in self.stores.values())

    # -- running user code ---------------------------------------------------------------

    async def _guarded(self, call: Callable[[], Any], record: Any) -> None:
        """``call()`` as one transaction: on an exception its changes and outputs are
        undone, and the error policy decides (retry, dead-letter, or fail)."""
        self._stamp()
        mark = len(self.out)
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - any user error goes to the error policy
            await self._recover(call, record, exc, mark)
        else:
            self.store.commit()
        self._stamp()

    async def _recover(
        self, call: Callable[[], Any], record: Any, exc: Exception, mark: int
    ) -> None:
        """``call()`` failed with ``exc``: undo what it did (state, timers, outputs from
        ``mark`` on), then let the error policy retry, dead-letter or fail."""
        store = self.store
        store.rollback()
        self._truncate(mark)

        def again() -> None:
            try:
                call()
            except BaseException:
                store.rollback()
                self._truncate(mark)
                raise

        await self.errors.recover([record], exc, again)
        store.proc_now = self.clock.time()  # retries waited on the clock
        store.commit()  # (a retry succeeded, or nothing is left to keep)

    async def _advance_event(self, wm: float) -> None:
        """Fire the event-time timers the watermark ``wm`` has passed (TTLs expire on
        the way).

        One round (``KeyedStore.begin_round``): a timer set by a timer fires in it only
        when later than its setter; at end of input (``wm`` is +inf), not at all.  So a
        timer that re-arms itself cannot keep the round going."""
        store, ctx, timer_fn = self.store, self.ctx, self.timer_fn
        store.begin_round("event", final=wm == _INF)
        fired = 0
        try:
            while (due := store.next_timer("event", wm)) is not None:
                key, t, registered = due
                assert timer_fn is not None
                secs = registered if isinstance(registered, int | float) else t / _TICKS
                ctx.key, ctx.timestamp, ctx.time_domain = key, secs, "event"
                store.at(key)
                store.event_now = t
                self.cur_ts, self.cur_wm = int(t), self.rec_wm
                await self._guarded(
                    partial(timer_fn, ctx, registered), TimerEvent(key, registered, "event")
                )
                fired += 1
                if fired % _YIELD_EVERY == 0:
                    await self._flush()
                    await yield_now()  # a long round must not stop the event loop
        finally:
            store.end_round()
            ctx.time_domain = None

    async def _fire_processing(self) -> None:
        """Fire the processing-time timers due now: one round, as for event time (a
        timer set at or before the one firing waits for the next round, after the stage
        has yielded)."""
        store, ctx, timer_fn = self.store, self.ctx, self.timer_fn
        now = store.proc_now = self.clock.time()
        store.begin_round("processing")
        fired = 0
        try:
            while (due := store.next_timer("processing", now)) is not None:
                key, _, registered = due
                assert timer_fn is not None
                ctx.key, ctx.timestamp, ctx.time_domain = key, None, "processing"
                store.at(key)
                store.event_now = self.max_ts
                self.cur_ts = int(self.max_ts) if self.max_ts > -_INF else 0
                self.cur_wm = self.rec_wm
                await self._guarded(
                    partial(timer_fn, ctx, registered),
                    TimerEvent(key, registered, "processing"),
                )
                now = store.proc_now
                fired += 1
                if fired % _YIELD_EVERY == 0:
                    await self._flush()
                    await yield_now()
        finally:
            store.end_round()
            ctx.time_domain = None

    # -- the step ------------------------------------------------------------------------

    async def push(self, batch: Batch) -> None:
        values = batch.values
        n = len(values)
        if not n:
            return
        self.metrics.records_in += n
        keys = batch.keys
        if keys is None:  # pragma: no cover - the builder allows this on keyed streams only
            raise TypeError(f"operator {self.name!r} got records without keys")
        store = self.store
        if store.disk is not None:
            store.disk.prefetch(keys)
        store.proc_now = now = self.clock.time()
        if store.next_due("processing") <= now:
            store.expire("processing", now)  # (due timers fired before this batch came in)
        # The loops below are _guarded() inline (KeyedStore.at and commit): the common
        # path (no exception) costs a length, a call and a test of the undo log per record
        # (and with change tracking, whether the key's states dict was replaced).
        if not self.timestamped:
            ctx, fn = self.ctx, self.process_fn
            undo, out, data, dirty = store.undo, self.out, store.data, store.dirty
            out_keys, owned = self.out_keys, store.owned
            ctx.timestamp = None
            self._stamp()
            stamped = len(out)
            for v, k in zip(values, keys, strict=True):
                mark = len(out)
                if mark != stamped:  # the record before emitted (_stamp, inline)
                    if mark - stamped == 1:
                        out_keys.append(store.key)
                    else:
                        out_keys.extend([store.key] * (mark - stamped))
                    stamped = mark
                ctx.key = store.key = k
                store.cur = d = data.get(k)
                store.base = d if owned is None or k not in owned else _OWNED
                try:
                    fn(ctx, v)
                except Exception as exc:  # noqa: BLE001 - any user error: the error policy
                    await self._recover(partial(fn, ctx, v), v, exc, mark)
                    continue
                if undo:
                    if dirty is not None:
                        dirty.add(k)
                    undo.clear()
                if store.cur is not d:  # KeyedStore.made, inline
                    if dirty is not None:
                        dirty.add(k)
                    if owned is not None and store.cur is not None:
                        owned.add(k)
        else:
            await self._push_timed(batch)
        await self._flush()

    async def _push_timed(self, batch: Batch) -> None:
        """:meth:`push` on a timestamped stream: before each record, advance to the
        watermark it came with (firing the timers it passed)."""
        store, ctx, fn = self.store, self.ctx, self.process_fn
        undo, out, data, owned = store.undo, self.out, store.data, store.owned
        values, keys = batch.values, batch.keys
        assert keys is not None
        ts, wms = batch.timestamps, batch.watermarks
        assert ts is not None
        assert wms is not None
        due = store.event_due()
        timer_heap, ttl_heap = store.timer_heaps["event"], store.ttl_heaps["event"]
        last = self.rec_wm
        for v, k, t, w in zip(values, keys, ts, wms, strict=True):
            if w > store.wm:
                store.wm = w
                if w >= due and w >= (due := store.event_due()):
                    self.rec_wm = last
                    await self._advance_event(w)
                    due = store.event_due()
            last = w
            ctx.key = store.key = k
            store.cur = d = data.get(k)
            store.base = d if owned is None or k not in owned else _OWNED
            ctx.timestamp = t / _TICKS
            store.event_now = t
            self.cur_ts, self.cur_wm = t, w
            mark = len(out)
            try:
                fn(ctx, v)
            except Exception as exc:  # noqa: BLE001 - any user error: the error policy
                await self._recover(partial(fn, ctx, v), v, exc, mark)
                due = store.event_due()
                continue
            if undo:
                if store.dirty is not None:
                    store.dirty.add(k)
                undo.clear()
                # a timer or deadline set now may be the next due (one behind the
                # watermark fires at the next advance)
                if timer_heap and timer_heap[0][0] < due:
                    due = timer_heap[0][0]
                if ttl_heap and ttl_heap[0][0] < due:
                    due = ttl_heap[0][0]
            if store.cur is not d:
                store.made(d)
        self.rec_wm = last
        hi = max(ts)
        self.max_ts = max(self.max_ts, hi)

    async def control(self, message: Control) -> None:
        store = self.store
        if (
            isinstance(message, Watermark)
            and not message.idle
            and self.timestamped
            and message.time > store.wm
        ):
            store.wm = message.time
            if message.time >= store.next_due("event"):
                await self._advance_event(message.time)
            await self._flush()
        await super().control(message)  # forwards; a checkpoint barrier snapshots here

    async def finish(self) -> None:
        if self.timestamped and self.store.wm < _INF:  # (+inf may have come as a message)
            self.store.wm = _INF
            await self._advance_event(_INF)
        await self._flush()
        await super().finish()

    def uses_timer(self) -> bool:
        return self.timed

    def next_deadline(self) -> float | None:
        due = self.store.next_due("processing")
        if due == _INF:
            return None
        return self.clock.monotonic() + max(0.0, due - self.clock.time())

    async def on_timer(self, now: float) -> None:
        await self._fire_processing()
        await self._flush()

    def pending(self) -> int:
        return len(self.out)

    # -- checkpoints ---------------------------------------------------------------------

    def query(self, key: Any, at: float | None) -> KeyState:
        data = self.store.entry(key)
        wm = self.store.wm / 1e6 if math.isfinite(self.store.wm) else None
        if data is None:
            return KeyState(False, watermark=wm)
        if self.single:
            return KeyState.copied(True, data.get("state"), wm)
        return KeyState.copied(True, dict(data), wm)

    def accept_changes(self, accepted: bool) -> None:
        """Whether the checkpoint store takes change sets (see :meth:`snapshot`)."""
        if accepted == self.changes_accepted:
            return
        self.changes_accepted = accepted
        for store in self.stores.values():
            store.track(accepted)
        self.next_whole = True

    def snapshot(self) -> Incremental:
        """Every partition's keyed state as :class:`~sluiceway.core.delta.Changes`: each
        key's values, TTL deadlines and pending timers under the key, and the operator's
        watermarks in ``extra``.

        Whole, unless the checkpoint side said it takes change sets
        (:meth:`accept_changes`): then only the first snapshot (and the first after a
        restore) is whole, and each later one holds the keys written, deleted, expired
        or whose timers changed since the one before.  Processing-time deadlines are
        absolute, with the snapshot's clock in ``extra``; :meth:`restore` counts them
        from the restoring run's clock (the time between does not count).
        """
        whole = self.next_whole or not self.changes_accepted
        for store in self.stores.values():
            if store.disk is not None:
                store.disk.write_back()  # (a barrier: the dirty keys go to the files)
        extra = {"format": 2, "wm": self.store.wm, "rec_wm": self.rec_wm, "max_ts": self.max_ts}
        parts = {p: store.changes(whole, extra) for p, store in self.stores.items()}
        self.next_whole = False
        return Incremental(parts)

    def restore(self, state: Any) -> None:
        """Load a whole :class:`~sluiceway.core.delta.Incremental` (or a snapshot of the
        earlier format 1, a dict with one pickled blob)."""
        if isinstance(state, Incremental):
            if not state.whole:
                raise ValueError(
                    f"operator {self.name!r}: restore needs every partition whole, got a "
                    "change set (fold it onto its base: sluiceway.core.delta.fold_incremental)"
                )
            extra: dict[str, Any] = {}
            for p, changes in state.partitions.items():
                store = self.stores.get(p)
                if store is None:
                    store = self.stores[p] = self._new_store(p)
                    store.track(self.changes_accepted)
                extra = store.load(changes)
        else:
            extra = self.store.load_format1(state)
        self.store.wm = extra["wm"]
        self.rec_wm = extra["rec_wm"]
        self.max_ts = extra["max_ts"]
        self.next_whole = True  # deadlines of this run's clock: the chain starts again
        self.metrics.state = self._keys_held()


def _has_on_timer(fn: object) -> bool:
    return callable(getattr(fn, "on_timer", None))


class KeyedProcessSpec(OpSpec):
    """``keyed.process(fn)``: a keyed process function with state and timers.

    ``factory()`` makes the process function for a run.  The operator runs in a stage of
    its own (behind a channel) when the function has ``on_timer`` (it may set
    processing-time timers) or ``stateful_map`` has a processing-time TTL.
    """

    kind: ClassVar[str] = "process"

    def __init__(
        self,
        factory: Callable[[], Any],
        *,
        on_error: ErrorPolicy = Fail(),
        timestamped: bool,
        processing_timers: bool,
        state: StateBackend | None = None,
    ) -> None:
        self.factory = factory
        self.on_error = on_error
        self.state = state
        self.timestamped = timestamped
        self.processing_timers = processing_timers

    @property
    def boundary(self) -> bool:
        return self.processing_timers

    def build(self, ctx: BuildContext) -> Step:
        return _KeyedProcessStep(ctx, self)


def process_factory(fn: object) -> tuple[Callable[[], Any], bool]:
    """``fn`` as ``keyed.process`` accepts it: a class (instantiated per run), an object
    with ``process(ctx, value)``, or a plain function ``fn(ctx, value)``.  Returns the
    factory and whether there is an ``on_timer``."""
    if inspect.isclass(fn):
        cls = fn
        if not callable(getattr(cls, "process", None)):
            raise TypeError(
                f"process() expects an object with a process(ctx, value) method, got class "
                f"{cls.__name__} without one"
            )
        return cls, _has_on_timer(cls)
    if callable(getattr(fn, "process", None)):
        return (lambda: fn), _has_on_timer(fn)
    if callable(fn):
        return (lambda: _FunctionProcess(fn)), False
    raise TypeError(
        f"process() expects an object with a process(ctx, value) method (and optionally "
        f"on_timer(ctx, time)), or a function fn(ctx, value); got {type(fn).__name__} {fn!r}"
    )


class _FunctionProcess:
    def __init__(self, fn: Callable[[ProcessContext[Any], Any], Any]) -> None:
        self.process = fn


class _StatefulMap:
    """``stateful_map`` as a process function: one value state, one output per record."""

    def __init__(self, fn: Callable[[Any, Any], Any], ttl: TTL | None) -> None:
        self.fn = fn
        self.ttl = ttl
        self.state: Any = None

    def process(self, ctx: ProcessContext[Any], value: Any) -> None:
        state = self.state
        if state is None:
            state = self.state = ctx.value("state", ttl=self.ttl)
        new, out = _pair(self.fn(state.get(), value))
        if new is None:
            state.clear()
        else:
            state.set(new)
        ctx.emit(out)


def _pair(result: Any) -> tuple[Any, Any]:
    if type(result) is not tuple or len(result) != 2:
        raise TypeError(
            f"stateful_map's function must return a (state, output) pair, got {result!r}"
        )
    return result


def _call(fn: Callable[[Any, Any], Any], state: Any, value: Any) -> tuple[Any, Any]:
    return _pair(fn(state, value))


class _StatefulMapStep(_KeyedProcessStep):
    """``stateful_map`` without a TTL: the same state layout and semantics as the process
    function above, in a tighter loop.  ``fn`` returns the new state instead of writing
    it, so a failing record has nothing to undo: the state is stored only on success."""

    def __init__(self, ctx: BuildContext, spec: StatefulMapSpec) -> None:
        super().__init__(ctx, spec)
        self.user_fn = spec.fn

    def _new_store(self, partition: Partition) -> KeyedStore:
        """A partition's store, with an overlay of hot keys in memory (the on-disk
        backend has its own cache): :class:`~sluiceway.state.Overlay`."""
        store = super()._new_store(partition)
        store.one_field = "state"
        if store.disk is None:
            store.overlay = Overlay()
        return store

    async def push(self, batch: Batch) -> None:
        values = batch.values
        if not values:
            return
        self.metrics.records_in += len(values)
        keys = batch.keys
        if keys is None:  # pragma: no cover - the builder allows this on keyed streams only
            raise TypeError(f"operator {self.name!r} got records without keys")
        store = self.store
        ov = store.overlay
        if ov is not None and ov.on:
            out, failed = await self._push_hot(values, keys, ov)
        else:
            out, failed = await self._push_through(values, keys)
        if ov is not None:
            ov.records += len(values)
            ov.since += len(values)
            if ov.since >= ov.window:
                store.fold()
        store.settle()
        self.metrics.state = len(store.data)
        await self.emit((batch if failed is None else without(batch, failed)).with_values(out))

    async def _push_through(
        self, values: list[Any], keys: list[Any]
    ) -> tuple[list[Any], list[int] | None]:
        """The outputs, and the records that failed (None: none did), writing each new
        state into the whole state (``data``)."""
        store = self.store
        if store.disk is not None:
            store.disk.prefetch(keys)
        data, fn = store.data, self.user_fn
        # Change tracking (checkpoints take change sets): a new states dict is recorded
        # as it is put in place (the snapshot takes it without a look-up), a delete as a
        # key to look up (discard).  A failed record changed nothing: it records nothing.
        written = store.written
        out: list[Any] = []
        failed: list[int] | None = None
        for i, (v, k) in enumerate(zip(values, keys, strict=True)):
            d = data.get(k)
            state = None if d is None else d["state"]
            try:
                new, o = _pair(fn(state, v))
            except Exception as exc:  # noqa: BLE001 - any user error goes to the error policy
                ok, result = await self.errors.recover([v], exc, partial(_call, fn, state, v))
                if not ok:
                    failed = [i] if failed is None else [*failed, i]
                    continue
                new, o = result
            if new is not None:
                data[k] = nd = {"state": new}  # a new dict: a snapshot may hold the old one
                if written is not None:
                    written[k] = nd
            elif d is not None:
                store.discard(k)
            out.append(o)
        return out, failed

    async def _push_hot(
        self, values: list[Any], keys: list[Any], ov: Overlay
    ) -> tuple[list[Any], list[int] | None]:
        """:meth:`_push_through` with the overlay ``ov`` on: the new state of a key held
        before goes into ``ov.hot`` alone (a value, not a dict), read before the whole
        state; a fold puts it there (and in the change set).  A new key is written
        through (so ``data`` holds every key: its size is the state's).  A loop of its
        own, the user call and error policy written again, rather than a branch per
        record in one loop: this is the record path."""
        store = self.store
        data, hot, written, fn = store.data, ov.hot, store.written, self.user_fn
        get = hot.get
        born = 0  # new keys (written through)
        out: list[Any] = []
        failed: list[int] | None = None
        for i, (v, k) in enumerate(zip(values, keys, strict=True)):
            state = get(k)  # (a state is never None: None deletes the key)
            if state is None:
                d = data.get(k)
                state = None if d is None else d["state"]
            try:
                new, o = _pair(fn(state, v))
            except Exception as exc:  # noqa: BLE001 - any user error goes to the error policy
                ok, result = await self.errors.recover([v], exc, partial(_call, fn, state, v))
                if not ok:
                    failed = [i] if failed is None else [*failed, i]
                    continue
                new, o = result
            if new is None:
                if state is not None:
                    store.discard(k)
            elif state is not None:
                hot[k] = new
            else:
                data[k] = nd = {"state": new}
                if written is not None:
                    written[k] = nd
                born += 1
            out.append(o)
        ov.distinct += born
        return out, failed


class StatefulMapSpec(KeyedProcessSpec):
    """``keyed.stateful_map(fn, ttl=...)``: ``fn(state, value) -> (state, output)``."""

    kind: ClassVar[str] = "stateful_map"

    def __init__(
        self,
        fn: Callable[[Any, Any], Any],
        *,
        ttl: TTL | None,
        on_error: ErrorPolicy = Fail(),
        timestamped: bool,
        state: StateBackend | None = None,
    ) -> None:
        self.fn = fn
        self.ttl = ttl
        super().__init__(
            lambda: _StatefulMap(fn, ttl),
            on_error=on_error,
            timestamped=timestamped,
            processing_timers=ttl is not None and ttl.time == "processing",
            state=state,
        )

    def build(self, ctx: BuildContext) -> Step:
        if self.ttl is None:
            return _StatefulMapStep(ctx, self)
        return _KeyedProcessStep(ctx, self)
