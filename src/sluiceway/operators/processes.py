"""``stream.map_in_processes(fn, workers=N)``: a CPU-heavy function on every core.

``map`` runs ``fn`` in the flow's one event loop, so one core does all the work however
many the machine has (the GIL).  This operator sends the records to a pool of worker
processes instead: each micro-batch is cut into at most ``workers`` pieces, and each
piece travels as **one pickle** (the records), is mapped in a worker, and comes back as
one pickle (the results)::

    input      [a b c d] [e f g h]  |barrier|  [i j]
    pieces      [a b][c d][e f][g h]            [i][j]      -- one pickle each
    workers     1    2    1    2                1  2        -- up to max_in_flight at once
    output     [A B][C D][E F][G H] |barrier|  [I][J]       -- always in input order

* **Ordered**: results leave in input order, whatever order the pieces finish in.
* **Bounded**: at most ``max_in_flight`` pieces are sent and not yet passed on (finished
  pieces waiting behind a slow one count); then the operator stops taking input and the
  channel in front fills: backpressure reaches the source.
* **Barriers and watermarks** wait for every piece before them and no record after them
  leaves first: a checkpoint holds exactly the results of the records its barrier
  followed (as ``map_async``).
* **Errors** are per record, under the operator's policy: a record ``fn`` raised on is
  retried (in a worker), dead-lettered with the record itself, or fails the flow naming
  it, with the worker's traceback as the cause.  A worker that dies (a crash in native
  code, ``os._exit``) fails its piece's records the same way, and a fresh pool takes
  over.
* **Pickling**: ``fn`` must be importable by name in a fresh interpreter (``def`` at the
  top level of a module; the flow file ``sluiceway run`` loads counts), because workers
  are *spawned*, not forked (forking a process that runs threads -- librdkafka's, the
  event loop's helpers -- can deadlock).  A lambda or a nested function is refused when
  the flow is built, naming it.  Records and results must be picklable too; one that is
  not goes to the error policy.
* **Shutdown**: workers ignore SIGINT and SIGTERM (Ctrl-C reaches the whole process
  group: the flow, not its workers, decides what to drain), exit when the flow ends
  (waited for off the event loop), are killed when it is cancelled mid-piece, and exit
  by themselves if the flow's process dies (SIGKILL included): no orphans.

>>> import sluiceway as sw
>>> sw.testing.run_collect(lambda s: s.map_in_processes(abs, workers=2), [-1, 2, -3])
[1, 2, 3]
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any, ClassVar

from sluiceway.core.messages import Batch, Control
from sluiceway.errors import FlowFailedError, short_repr
from sluiceway.operators.base import BuildContext, OpSpec, Step, without
from sluiceway.operators.errors import ErrorHandler
from sluiceway.policies import ErrorPolicy, Fail
from sluiceway.time import Clock

__all__ = ["ProcessMapSpec", "WorkerTraceback", "default_workers", "pickled_function"]

_PROTOCOL = pickle.HIGHEST_PROTOCOL


def default_workers() -> int:
    """The cores this process may run on (``os.sched_getaffinity`` where it exists)."""
    affinity = getattr(os, "sched_getaffinity", None)
    n = len(affinity(0)) if affinity is not None else os.cpu_count()
    return max(1, n or 1)


def pickled_function(fn: Callable[[Any], Any], method: str) -> bytes:
    """``fn`` pickled for the workers, or a clear error naming it.

    Raises:
        TypeError: ``fn`` cannot be pickled (a lambda, a nested function, a bound method
            of an object that cannot be pickled).
    """
    try:
        return pickle.dumps(fn, _PROTOCOL)
    except Exception as exc:
        name = getattr(fn, "__qualname__", None) or repr(fn)
        code = getattr(fn, "__code__", None)
        if code is not None:
            name = (
                f"{name!r} (defined at {os.path.basename(code.co_filename)}:{code.co_firstlineno})"
            )
        else:
            name = repr(name)
        raise TypeError(
            f"{method}() sends fn to worker processes, but fn {name} cannot be pickled "
            f"({type(exc).__name__}: {exc}); define it with def at the top level of a module "
            "(not a lambda, a nested function or a method of a local class) so that the "
            "workers can import it by name"
        ) from exc


class WorkerTraceback(Exception):
    """The traceback of an exception raised in a worker process (its ``__cause__``)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n(in the worker process)\n{self.text}"


# -- in the worker process -----------------------------------------------------------

_fn: Callable[[Any], Any] | None = None
_load_error: str | None = None


def _init_worker(fn_bytes: bytes) -> None:
    """Runs first in every worker: signals belong to the flow, the function is loaded,
    and the worker follows its parent if the parent dies (even by SIGKILL)."""
    global _fn, _load_error  # noqa: PLW0603 - the worker's one function, set once
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(
            target=_exit_with_parent, args=(parent.sentinel,), daemon=True, name="parent-watch"
        ).start()
    try:
        _fn = pickle.loads(fn_bytes)
    except Exception as exc:  # noqa: BLE001 - reported to the parent by _apply
        _load_error = f"{type(exc).__name__}: {exc}"


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # ready once the parent is gone
    os._exit(1)


def _portable(exc: Exception) -> tuple[Exception, str]:
    """``exc`` as it can travel back (itself, or a RuntimeError quoting it), and its
    traceback text."""
    text = "".join(traceback.format_exception(exc))
    try:
        pickle.loads(pickle.dumps(exc, _PROTOCOL))
    except Exception:  # noqa: BLE001 - any failure means: send a stand-in
        return RuntimeError(f"{type(exc).__qualname__}: {exc}"), text
    return exc, text


def _apply(payload: bytes) -> bytes:
    """Map one piece: ``(results, failures)`` pickled, ``failures`` as ``(index,
    exception, traceback text)`` with None in ``results`` at those places."""
    if _fn is None:
        return pickle.dumps(("load", _load_error), _PROTOCOL)
    values: list[Any] = pickle.loads(payload)
    fn = _fn
    out: list[Any] = []
    failures: list[tuple[int, Exception, str]] = []
    it = iter(values)
    while True:
        try:
            out.extend(map(fn, it))  # C speed; leaves `it` just past a failed record
        except Exception as exc:  # noqa: BLE001 - to the operator's error policy
            failures.append((len(out), *_portable(exc)))
            out.append(None)
        else:
            break
    try:
        return pickle.dumps(("ok", out, failures), _PROTOCOL)
    except Exception:  # noqa: BLE001 - find the results that cannot travel
        for i, r in enumerate(out):
            try:
                pickle.dumps(r, _PROTOCOL)
            except Exception as exc:  # noqa: BLE001
                bad = TypeError(f"the result of fn cannot be pickled: {type(exc).__name__}: {exc}")
                out[i] = None
                failures.append((i, bad, f"result {short_repr(r)}"))
        failures.sort(key=lambda f: f[0])
        return pickle.dumps(("ok", out, failures), _PROTOCOL)


# -- in the flow ---------------------------------------------------------------------


class _Piece:
    """Records sent to a worker together; done once their results (or a failure) are
    back."""

    __slots__ = ("batch", "done", "error", "out", "previous", "recovered", "task")

    def __init__(self, batch: Batch, previous: _Piece | None) -> None:
        self.batch = batch
        self.out: Batch | None = None
        self.error: BaseException | None = None
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self.previous = previous
        self.recovered = asyncio.Event()  # set once done: the next piece may recover

    async def after_previous(self) -> None:
        """Wait until the piece before this one is done with its failed records (dead
        letters are written in input order)."""
        previous, self.previous = self.previous, None  # (and let it be collected)
        if previous is not None:
            await previous.recovered.wait()


class _ProcessMapStep(Step):
    def __init__(self, ctx: BuildContext, spec: ProcessMapSpec) -> None:
        super().__init__(ctx.name, ctx.metrics)
        assert ctx.errors is not None
        self.spec = spec
        self.flow = ctx.flow
        self.clock: Clock = ctx.clock
        self.errors: ErrorHandler = ctx.errors
        self.queue: deque[_Piece | Control] = deque()  # in arrival order
        self.in_flight = 0  # pieces in the queue
        self.unstarted = 0  # records of the push under way not sent yet
        self.pool: ProcessPoolExecutor | None = None
        self.last: _Piece | None = None  # the piece sent last

    # -- the pool ------------------------------------------------------------------------

    def _pool(self) -> ProcessPoolExecutor:
        pool = self.pool
        if pool is None:
            pool = self.pool = ProcessPoolExecutor(
                max_workers=self.spec.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.spec.fn_bytes,),
            )
        return pool

    async def _map(self, values: list[Any]) -> tuple[list[Any], list[tuple[int, Exception]]]:
        """``fn`` over ``values`` in a worker: the results and the failures by index.

        Raises:
            BrokenProcessPool: a worker died (its pool is replaced for the next call).
            FlowFailedError: the workers cannot load ``fn``.
            pickle.PicklingError (or others): ``values`` cannot be pickled.
        """
        payload = pickle.dumps(values, _PROTOCOL)
        pool = self._pool()
        try:
            raw = await self.clock.wait_outside(pool.submit(_apply, payload))
        except BrokenProcessPool:
            if self.pool is pool:  # the next piece gets a fresh pool
                self.pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise
        reply = pickle.loads(raw)
        if reply[0] == "load":
            raise FlowFailedError(
                f"operator {self.name!r}: the worker processes cannot load "
                f"{self.spec.label} ({reply[1]}); fn must be importable by name in a fresh "
                "interpreter: a def at the top level of a module on sys.path",
                flow=self.flow,
                operator=self.name,
            )
        _, out, failures = reply
        errors: list[tuple[int, Exception]] = []
        for i, exc, text in failures:
            if exc.__cause__ is None:
                exc.__cause__ = WorkerTraceback(text)
            errors.append((i, exc))
        return out, errors

    async def _one(self, value: Any) -> Any:
        """``fn(value)`` in a worker (a retry); raises what ``fn`` raised."""
        out, errors = await self._map([value])
        if errors:
            raise errors[0][1]
        return out[0]

    async def _run(self, piece: _Piece) -> None:
        try:
            try:
                piece.out = await self._process(piece)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - raised by the stage, in order
                piece.error = exc
            await piece.after_previous()  # so that `recovered` is set in input order
        finally:
            piece.previous = None
            piece.done = True
            piece.recovered.set()
            self.wake()

    async def _process(self, piece: _Piece) -> Batch | None:
        batch = piece.batch
        values = batch.values
        try:
            out, errors = await self._map(values)
        except BrokenProcessPool as exc:
            await piece.after_previous()

            died = RuntimeError(
                f"a worker process of {self.spec.label} died while mapping "
                f"{len(values)} record(s) ({exc})"
            )
            ok, result = await self.errors.recover(values, died, partial(self._map_all, values))
            return batch.with_values(result) if ok else None
        except (FlowFailedError, asyncio.CancelledError):
            raise
        except Exception:  # noqa: BLE001 - the records cannot be pickled: find which
            await piece.after_previous()
            return await self._one_by_one(batch)
        if errors:  # failures go to the error policy in input order, piece after piece
            await piece.after_previous()
        failed: list[int] = []
        for i, err in errors:
            ok, result = await self.errors.recover([values[i]], err, partial(self._one, values[i]))
            if ok:
                out[i] = result
            else:
                failed.append(i)
        if not failed:
            return batch.with_values(out)
        gone = set(failed)
        kept = [r for i, r in enumerate(out) if i not in gone]
        return without(batch, failed).with_values(kept)

    async def _map_all(self, values: list[Any]) -> list[Any]:
        """A retry of a whole piece: every result, or the first failure raised."""
        out, errors = await self._map(values)
        if errors:
            raise errors[0][1]
        return out

    async def _one_by_one(self, batch: Batch) -> Batch | None:
        """A piece that could not be pickled as a whole: record by record, each one that
        cannot travel to a worker going to the error policy."""
        out: list[Any] = []
        failed: list[int] = []
        for i, v in enumerate(batch.values):
            try:
                pickle.dumps(v, _PROTOCOL)
            except Exception as exc:  # noqa: BLE001
                err = TypeError(
                    f"record cannot be pickled to send to a worker process: "
                    f"{type(exc).__name__}: {exc}"
                )
                ok, result = await self.errors.recover([v], err, _raiser(err))
            else:
                try:
                    ok, result = True, await self._one(v)
                except (FlowFailedError, BrokenProcessPool):
                    raise
                except Exception as exc:  # noqa: BLE001 - to the error policy
                    ok, result = await self.errors.recover([v], exc, partial(self._one, v))
            if ok:
                out.append(result)
            else:
                failed.append(i)
        return (without(batch, failed) if failed else batch).with_values(out)

    # -- records ---------------------------------------------------------------------------

    async def push(self, batch: Batch) -> None:
        n = len(batch.values)
        if not n:
            return
        self.metrics.records_in += n
        pieces = min(self.spec.workers, n)
        size = math.ceil(n / pieces)
        for start in range(0, n, size):
            self.unstarted = n - start
            await self._wait_for_room()
            piece = _Piece(batch if size >= n else batch.slice(start, start + size), self.last)
            self.last = piece
            piece.task = asyncio.get_running_loop().create_task(self._run(piece))
            self.queue.append(piece)
            self.in_flight += 1
        self.unstarted = 0
        await self._send_ready()

    async def _wait_for_room(self) -> None:
        while True:
            await self._send_ready()
            if self.in_flight < self.spec.max_in_flight:
                return
            head = self.queue[0]
            assert isinstance(head, _Piece)
            assert head.task is not None
            await asyncio.wait([head.task])

    async def control(self, message: Control) -> None:
        self.queue.append(message)  # leaves once every piece before it has
        await self._send_ready()

    async def _send_ready(self) -> None:
        queue = self.queue
        while queue:
            head = queue[0]
            if isinstance(head, _Piece):
                if not head.done:
                    return
                queue.popleft()
                self.in_flight -= 1
                if head.error is not None:
                    raise head.error
                if head.out is not None:
                    await self.emit(head.out)
            else:
                queue.popleft()
                await super().control(head)

    # -- timers and the end ------------------------------------------------------------

    def uses_timer(self) -> bool:
        return True  # woken when a piece comes back

    def next_deadline(self) -> float | None:
        if self.queue:
            head = self.queue[0]
            if not isinstance(head, _Piece) or head.done:
                return self.clock.monotonic()
        return None

    async def on_timer(self, now: float) -> None:
        await self._send_ready()

    async def finish(self) -> None:
        while self.queue:
            head = self.queue[0]
            if isinstance(head, _Piece) and head.task is not None and not head.done:
                await asyncio.wait([head.task])
            await self._send_ready()
        pool, self.pool = self.pool, None
        if pool is not None:  # the workers exit; wait for them off the event loop
            await self.clock.run_in_thread(pool.shutdown)
        await super().finish()

    def pending(self) -> int:
        return sum(len(p.batch.values) for p in self.queue if isinstance(p, _Piece))

    def in_process(self, n: int, passed: bool) -> int:
        return self.unstarted  # the pieces sent are in pending()

    def close(self) -> None:
        unfinished = False
        for p in self.queue:
            if isinstance(p, _Piece) and p.task is not None and not p.done:
                p.task.cancel("flow over")
                unfinished = True
        pool, self.pool = self.pool, None
        if pool is None:
            return
        if unfinished:  # cancelled mid-piece: stop the work (workers ignore SIGTERM)
            for process in list(getattr(pool, "_processes", {}).values()):
                process.kill()
        # Without blocking the event loop: the pool's own thread sends the idle workers
        # their end and reaps them (and Python joins it at exit).
        pool.shutdown(wait=False, cancel_futures=True)


def _raiser(err: Exception) -> Callable[[], Any]:
    def again() -> Any:
        raise err

    return again


class ProcessMapSpec(OpSpec):
    """``stream.map_in_processes(fn, workers=..., max_in_flight=...)``."""

    kind: ClassVar[str] = "map_in_processes"

    def __init__(
        self,
        fn: Callable[[Any], Any],
        fn_bytes: bytes,
        *,
        workers: int,
        max_in_flight: int,
        on_error: ErrorPolicy = Fail(),
    ) -> None:
        self.fn = fn
        self.fn_bytes = fn_bytes
        self.workers = workers
        self.max_in_flight = max_in_flight
        self.on_error = on_error
        self.label = f"fn {getattr(fn, '__qualname__', None) or short_repr(fn)}"

    @property
    def boundary(self) -> bool:  # its own stage: woken when a piece comes back
        return True

    def build(self, ctx: BuildContext) -> Step:
        return _ProcessMapStep(ctx, self)
