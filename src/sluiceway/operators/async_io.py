"""``stream.map_async(fn, concurrency=N)``: calls to an async function, many at a time.

The operator starts a call per record while fewer than the limit are in flight; when the
limit is reached it waits for one to finish, and so stops taking input: the channel in
front fills and backpressure reaches the source.  Results leave in input order
(``ordered=True``, the default) or as they complete.  Control messages (watermarks,
checkpoint barriers) split the records by arrival, whatever order the calls finish in: a
control message waits until every record before it has left, and no record that arrived
after it leaves before it -- so no record falls behind a watermark that overtook it, and a
checkpoint holds exactly the results of the records its barrier followed.

Each call can time out (on the flow's clock); a failed or timed-out call goes to the
error policy (retry with backoff, dead letter, or fail).  ``concurrency=sw.Adaptive()``
moves the limit with the measured latency; ``breaker=sw.CircuitBreaker(...)`` stops
calls while the service fails, holding records back (``when_open="wait"``) or sending
them to the dead-letter sink (``when_open="dead_letter"``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Any, ClassVar

from sluiceway.core.messages import Batch, Control
from sluiceway.flowcontrol.adaptive import Adaptive
from sluiceway.flowcontrol.breaker import CircuitBreaker, CircuitOpenError, watch_breaker
from sluiceway.operators.base import BuildContext, OpSpec, Step
from sluiceway.operators.errors import ErrorHandler
from sluiceway.policies import ErrorPolicy, Fail
from sluiceway.time import Clock

__all__ = ["AsyncMapSpec", "Row"]

_INF = float("inf")
_Row = tuple[Any, int | None, Hashable, float | None]  # value, timestamp, key, watermark
Row = _Row


class _AsyncMapStep(Step):
    def __init__(self, ctx: BuildContext, spec: AsyncMapSpec) -> None:
        super().__init__(ctx.name, ctx.metrics)
        assert ctx.errors is not None
        self.spec = spec
        self.fn = spec.fn
        self.clock: Clock = ctx.clock
        self.errors: ErrorHandler = ctx.errors
        self.adaptive = spec.concurrency if isinstance(spec.concurrency, Adaptive) else None
        self.fixed = spec.concurrency if isinstance(spec.concurrency, int) else 0
        self.breaker = spec.breaker
        if self.breaker is not None:
            watch_breaker(self.breaker, self.metrics)
        self.in_flight = 0
        self.seq = 0  # the next record's number
        self.next_out = 0  # ordered: the next number to leave
        self.done: dict[int, _Row | None] = {}  # finished, not yet sent (None: dead letter)
        # Started, not yet sent: number -> the watermark the record came with.
        self.outstanding: dict[int, float | None] = {}
        self.controls: deque[tuple[int, Control]] = deque()  # wait for records before them
        self.tasks: set[asyncio.Task[None]] = set()
        self.failure: BaseException | None = None
        self._slot: asyncio.Future[None] | None = None
        self._has_ts = False
        self._has_keys = False
        self.unstarted = 0  # records of the push under way not started yet

    # -- limits ------------------------------------------------------------------------

    def limit(self) -> int:
        return self.adaptive.limit if self.adaptive is not None else self.fixed

    def _full(self) -> bool:
        """No new call now: the limit is in flight, or as many finished results wait to
        leave (behind a slow call, in order, or behind a held control message) -- the
        bound that keeps memory bounded when one call hangs and the others flow."""
        limit = self.limit()
        return self.in_flight >= limit or len(self.done) >= limit

    async def _wait_for_slot(self) -> None:
        while self._full():
            await self._send_ready()
            if not self._full():
                return
            self._slot = asyncio.get_running_loop().create_future()
            await self._slot
            self._raise_failure()

    async def _pass_breaker(self, row: _Row) -> bool:
        """Wait until the breaker lets a call start (True), or dead-letter (False)."""
        breaker = self.breaker
        assert breaker is not None
        while not breaker.try_start(self.clock.monotonic()):
            if self.spec.when_open == "dead_letter":
                err = CircuitOpenError(f"circuit breaker {breaker.name!r} is open")
                await self.errors.recover([row[0]], err, _refuse(err))
                return False
            await self._send_ready()
            await self.clock.sleep(max(breaker.wait(self.clock.monotonic()), 0.001))
            self._raise_failure()
        return True

    # -- records -----------------------------------------------------------------------

    async def push(self, batch: Batch) -> None:
        n = len(batch.values)
        if not n:
            return
        self._raise_failure()
        self.metrics.records_in += n
        ts, keys, wms = batch.timestamps, batch.keys, batch.watermarks
        self._has_ts = ts is not None
        self._has_keys = keys is not None
        for i, v in enumerate(batch.values):
            self.unstarted = n - i
            row: _Row = (
                v,
                None if ts is None else ts[i],
                None if keys is None else keys[i],
                None if wms is None else wms[i],
            )
            await self._wait_for_slot()
            if self.breaker is not None and not await self._pass_breaker(row):
                self.done[self._claim(row)] = None
                continue
            self._start(row)
        self.unstarted = 0
        await self._send_ready()

    def _claim(self, row: _Row) -> int:
        """The next record's number, registered as outstanding (until it leaves)."""
        seq = self.seq
        self.seq += 1
        self.outstanding[seq] = row[3]
        return seq

    def _start(self, row: _Row) -> None:
        seq = self._claim(row)
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(seq, row, self.in_flight))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _arg(self, row: _Row) -> Any:
        """What ``fn`` is called with for ``row`` (the record; a lookup join: the row)."""
        return row[0]

    async def _run(self, seq: int, row: _Row, in_flight: int) -> None:
        v = row[0]
        arg = self._arg(row)
        try:
            try:
                result = await self._call(arg, in_flight)
                out: _Row | None = (result, row[1], row[2], row[3])
            except Exception as exc:  # noqa: BLE001 - to the error policy
                retry = partial(self._call, arg, in_flight, gate=True)
                ok, result = await self.errors.recover([v], exc, retry)
                out = (result, row[1], row[2], row[3]) if ok else None
            self.done[seq] = out
        except BaseException as exc:  # a Fail policy, or cancellation: the stage raises it
            if self.failure is None and not isinstance(exc, asyncio.CancelledError):
                self.failure = exc
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.in_flight -= 1
            if self._slot is not None and not self._slot.done():
                self._slot.set_result(None)
            self.wake()

    async def _call(self, v: Any, in_flight: int, *, gate: bool = False) -> Any:
        """One attempt: the timeout, and the latency and outcome for the controllers.

        ``gate``: a retry, which must pass the circuit breaker like a first call (the first
        call passed it in :meth:`push`)."""
        clock = self.clock
        breaker = self.breaker
        if gate and breaker is not None:
            await breaker.enter(clock, self.spec.when_open)
        started = clock.monotonic()
        timeout = self.spec.timeout
        handle = None
        timed_out = False
        task = asyncio.current_task()
        assert task is not None
        if timeout is not None:

            def expire() -> None:
                nonlocal timed_out
                timed_out = True
                task.cancel("map_async timeout")

            handle = clock.call_at(started + timeout, expire)
        ok = False
        try:
            result = await self.fn(v)
            ok = True
            return result
        except asyncio.CancelledError:
            if timed_out and task.uncancel() == 0:
                raise TimeoutError(
                    f"map_async call to {_name(self.fn)} timed out after {timeout:g}s"
                ) from None
            raise
        finally:
            if handle is not None:
                handle.cancel()
            now = clock.monotonic()
            if self.adaptive is not None:
                self.adaptive.on_complete(now - started, ok=ok, in_flight=in_flight)
            if breaker is not None:
                (breaker.on_success if ok else breaker.on_failure)(now)

    # -- output ------------------------------------------------------------------------

    def _ready(self) -> list[int]:
        """The finished records that may leave now, in the order they leave.

        Never one that arrived after a control message still held back: a barrier or
        watermark splits the records by arrival, whatever order the calls finish in.
        Unordered, a result overtakes a record still in flight only if it carries no
        later watermark than that record: the watermark never passes a record this
        step holds, so which records are late does not depend on which call finished
        first (or on where the batches were cut).
        """
        limit = self.controls[0][0] if self.controls else self.seq
        done = self.done
        if self.spec.ordered:
            out = []
            n = self.next_out
            while n < limit and n in done:
                out.append(n)
                n += 1
            return out
        ready = [s for s in done if s < limit]  # in the order they completed
        if not self._has_ts or not ready:
            return ready
        # By watermark (in the order they completed among equals), up to the lowest
        # watermark of the records still in flight (or behind a held control).
        held = self.outstanding
        ready_set = set(ready)
        floor = min(
            (_INF if wm is None else wm for s, wm in held.items() if s not in ready_set),
            default=_INF,
        )
        ready.sort(key=lambda s: _INF if (wm := held[s]) is None else wm)
        return [s for s in ready if (_INF if (wm := held[s]) is None else wm) <= floor]

    async def _send_ready(self) -> None:
        while True:
            seqs = self._ready()
            if seqs:
                rows = [self.done.pop(s) for s in seqs]
                for s in seqs:
                    del self.outstanding[s]
                if self.spec.ordered:
                    self.next_out = seqs[-1] + 1
                kept = [r for r in rows if r is not None]
                if kept:
                    values = [r[0] for r in kept]
                    ts = [r[1] for r in kept] if self._has_ts else None
                    keys = [r[2] for r in kept] if self._has_keys else None
                    wms = [r[3] for r in kept] if self._has_ts else None
                    await self.emit(Batch(values, ts, keys, wms))  # type: ignore[arg-type]
            low = min(self.outstanding, default=self.seq)
            if self.controls and self.controls[0][0] <= low:
                # Every record before the first held control has left: it goes on, and
                # the records that arrived after it may follow.
                while self.controls and self.controls[0][0] <= low:
                    await super().control(self.controls.popleft()[1])
            elif not seqs:
                return

    async def control(self, message: Control) -> None:
        self.controls.append((self.seq, message))
        await self._send_ready()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    # -- timers and the end ------------------------------------------------------------

    def uses_timer(self) -> bool:
        return True

    def next_deadline(self) -> float | None:
        if self.failure is not None or self._ready():
            return self.clock.monotonic()
        return None

    async def on_timer(self, now: float) -> None:
        self._raise_failure()
        await self._send_ready()

    async def finish(self) -> None:
        while self.tasks:
            await asyncio.wait(set(self.tasks), return_when=asyncio.FIRST_COMPLETED)
            self._raise_failure()
            await self._send_ready()
        self._raise_failure()
        await self._send_ready()
        await super().finish()

    def pending(self) -> int:
        return self.in_flight + sum(r is not None for r in self.done.values())

    def in_process(self, n: int, passed: bool) -> int:
        return self.unstarted  # the rest of the push are in pending()

    def close(self) -> None:
        # A cancelled flow must not leave calls running behind it.
        for task in self.tasks:
            task.cancel("flow over")


def _refuse(err: Exception) -> Callable[[], Any]:
    def again() -> Any:
        raise err

    return again


def _name(fn: object) -> str:
    return getattr(fn, "__qualname__", repr(fn))


class AsyncMapSpec(OpSpec):
    """``stream.map_async(fn, concurrency=...)``."""

    kind: ClassVar[str] = "map_async"

    def __init__(
        self,
        fn: Callable[[Any], Awaitable[Any]],
        *,
        concurrency: int | Adaptive,
        ordered: bool,
        timeout: float | None,
        breaker: CircuitBreaker | None,
        when_open: str,
        on_error: ErrorPolicy = Fail(),
    ) -> None:
        self.fn = fn
        self.concurrency = concurrency
        self.ordered = ordered
        self.timeout = timeout
        self.breaker = breaker
        self.when_open = when_open
        self.on_error = on_error

    @property
    def boundary(self) -> bool:  # its own stage: woken when a call completes
        return True

    def build(self, ctx: BuildContext) -> Step:
        return _AsyncMapStep(ctx, self)
