"""Starting and stopping flows: :func:`run`, :func:`run_async`, :func:`start`."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from sluiceway.core.query import StateAnswer
from sluiceway.errors import CancelReason
from sluiceway.flow import Flow
from sluiceway.flowcontrol.load import LoadPolicy
from sluiceway.metrics.registry import FlowSnapshot
from sluiceway.runtime.checkpointing import Checkpoints
from sluiceway.runtime.executor import Executor, RunResult
from sluiceway.time import Clock

__all__ = [
    "FlowHandle",
    "Monitor",
    "hold_signals",
    "run",
    "run_async",
    "start",
    "take_held_signals",
]

Monitor = Callable[["FlowHandle"], Awaitable[None]]
"""A coroutine function run beside a flow (a live view, a stop-after timer...).

It receives the flow's handle, is cancelled when the flow ends, and may call
``handle.request_stop()``.  An exception it raises stops the flow and is re-raised.
"""

log = logging.getLogger("sluiceway")


class FlowHandle:
    """A running flow.  Get one from :func:`start` inside a running event loop.

    >>> import asyncio, sluiceway as sw
    >>> async def main() -> int:
    ...     flow = sw.Flow("forever")
    ...     out = sw.sinks.Collect()
    ...     flow.source(sw.sources.Generator(lambda: iter(int, 1), rate=100)).sink(out)
    ...     handle = sw.start(flow, clock=sw.VirtualClock())
    ...     await handle.clock.sleep(2.505)
    ...     result = await handle.stop()
    ...     return result.metrics.operator("sink_Collect").records_in
    >>> asyncio.run(main())
    250
    """

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._task: asyncio.Task[RunResult] = asyncio.get_running_loop().create_task(
            executor.run(), name=f"sluiceway flow {executor.flow.name}"
        )

    @property
    def flow(self) -> Flow:
        return self._executor.flow

    @property
    def clock(self) -> Clock:
        return self._executor.clock

    def metrics(self) -> FlowSnapshot:
        """A snapshot of every counter right now."""
        return self._executor.metrics.snapshot()

    def query(self, operator: str, key: Any, *, at: float | None = None) -> StateAnswer:
        """Read ``operator``'s state for ``key`` while the flow runs.

        Window operators answer with the key's open windows and their values so far
        (``at``: only the windows holding that instant, epoch seconds -- the seed
        documents' ``GetWindow(key, timestamp)``); ``stateful_map`` with the key's state;
        ``process`` with its value and map states.  A snapshot between two records of the
        operator (see :mod:`sluiceway.core.query` for the exact consistency); the
        answer says which worker answered and whether it holds the key.

        Raises:
            ValueError: no operator of that name, or one that keeps no per-key state
                (the message lists the operators that can be queried).
        """
        return self._executor.query(operator, key, at)

    @property
    def running_since(self) -> float | None:
        """The clock's monotonic time at which the flow began running (its checkpoint
        restored, its connectors opened); None while it is still starting."""
        return self._executor.running_since

    async def wait_running(self) -> float | None:
        """Wait until the flow runs (see :attr:`running_since`, returned) or ends first
        (None: it never ran)."""
        running = asyncio.ensure_future(self._executor.running.wait())
        try:
            await asyncio.wait({running, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            running.cancel()
        return self._executor.running_since

    def unflushed(self) -> dict[str, int]:
        """Records held in channels and operators right now."""
        return self._executor.unflushed()

    def describe(self) -> str:
        """The physical plan: stages, fused operators, channels."""
        return self._executor.plan.describe()

    def done(self) -> bool:
        """True once the flow has ended (drained, failed or cancelled)."""
        return self._task.done()

    @property
    def stopping(self) -> bool:
        """True once a stop has been requested (the flow may still be draining)."""
        return self._executor.stop_requested

    def request_stop(self) -> None:
        """Begin a graceful stop (returns at once; safe from a signal handler)."""
        self._executor.request_stop()

    def force_stop(self, reason: str = "forced stop") -> None:
        """Cancel now; :meth:`wait` then raises FlowCancelledError with what was held."""
        self._executor.force_stop(reason)

    def _force_by_signal(self, sig: signal.Signals) -> None:
        self._executor.force_stop(f"second signal ({sig.name})", why=CancelReason.SIGNAL, sig=sig)

    async def wait(self) -> RunResult:
        """Wait for the flow to end; returns its result or raises its error."""
        return await asyncio.shield(self._task)

    async def stop(self) -> RunResult:
        """Stop gracefully (drain within the grace period) and wait for the end."""
        self.request_stop()
        return await self.wait()


def start(
    flow: Flow,
    *,
    clock: Clock | None = None,
    grace_period: float = 10.0,
    max_batch_size: int = 1024,
    seed: int | None = None,
    checkpoints: Checkpoints | None = None,
    load: LoadPolicy | None = None,
) -> FlowHandle:
    """Start ``flow`` in the running event loop and return its handle.

    Args:
        flow: the flow to run (validated first; errors are raised here).
        clock: the clock to use (default :class:`~sluiceway.time.SystemClock`).
        grace_period: seconds a stop may take to drain before the flow is cancelled.
        max_batch_size: the most records a source is asked for at once.
        seed: seeds the random jitter of retry backoff, for reproducible runs.
        checkpoints: take checkpoints (``sw.Checkpoints(directory, interval=...)``) and
            start from the latest one in that directory, if any.  A stop then ends at a
            final checkpoint instead of draining.  See ``docs/checkpoints.md``.
        load: rules that act on the load signals (CPU, event-loop lag, queue delay,
            latency p99, GC): ``sw.LoadPolicy([...])``.  See ``docs/flow-control.md``.
    """
    executor = Executor(
        flow,
        clock=clock,
        grace_period=grace_period,
        max_batch_size=max_batch_size,
        seed=seed,
        checkpoints=checkpoints,
        load=load,
    )
    return FlowHandle(executor)


async def run_async(
    flow: Flow,
    *,
    clock: Clock | None = None,
    grace_period: float = 10.0,
    max_batch_size: int = 1024,
    seed: int | None = None,
    monitor: Monitor | None = None,
    checkpoints: Checkpoints | None = None,
    load: LoadPolicy | None = None,
) -> RunResult:
    """Run ``flow`` to completion in the running event loop (no signal handling).

    ``monitor``, if given, runs beside the flow (see :data:`Monitor`); ``checkpoints``
    and ``load`` as for :func:`start`.
    """
    handle = start(
        flow,
        clock=clock,
        grace_period=grace_period,
        max_batch_size=max_batch_size,
        seed=seed,
        checkpoints=checkpoints,
        load=load,
    )
    return await _wait_with_monitor(handle, monitor)


async def _wait_with_monitor(handle: FlowHandle, monitor: Monitor | None) -> RunResult:
    if monitor is None:
        return await handle.wait()
    watcher = asyncio.ensure_future(monitor(handle))
    try:
        waiter = asyncio.ensure_future(handle.wait())
        await asyncio.wait({watcher, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
            handle._executor.force_stop("monitor failed", why=CancelReason.MONITOR)
            waiter.cancel()
            await asyncio.gather(waiter, handle.wait(), return_exceptions=True)
            watcher.result()  # re-raise the monitor's error
        return await waiter
    finally:
        if not watcher.done():
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)


def run(
    flow: Flow,
    *,
    clock: Clock | None = None,
    grace_period: float = 10.0,
    max_batch_size: int = 1024,
    seed: int | None = None,
    handle_signals: bool = True,
    announce_signals: bool = True,
    monitor: Monitor | None = None,
    checkpoints: Checkpoints | None = None,
    load: LoadPolicy | None = None,
) -> RunResult:
    """Run ``flow`` until its sources end or a stop signal, and return the result.

    On SIGINT or SIGTERM the flow stops gracefully: sources stop pulling, in-flight
    records drain (at most ``grace_period`` seconds), batches flush, sinks close.  A
    second signal, or the grace period running out, cancels the flow and raises
    :class:`~sluiceway.errors.FlowCancelledError` listing what was not flushed.
    ``monitor``, if given, runs beside the flow (see :data:`Monitor`).  With
    ``checkpoints`` (see :func:`start`), a first signal stops at a final checkpoint;
    ``load`` as for :func:`start`.
    ``announce_signals=False`` keeps the one-line notice of a first signal off stderr
    (for a monitor that owns the terminal and shows ``handle.stopping`` itself).

    Raises:
        FlowDefinitionError: the flow is not valid.
        FlowFailedError: an operator failed under the ``fail`` policy (or a connector broke).
        FlowCancelledError: the flow was cancelled before it drained.
        RuntimeError: called from inside a running event loop (use :func:`run_async`).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "sw.run() cannot be called from a running event loop; use `await sw.run_async(flow)`"
        )

    async def main() -> RunResult:
        handle = start(
            flow,
            clock=clock,
            grace_period=grace_period,
            max_batch_size=max_batch_size,
            seed=seed,
            checkpoints=checkpoints,
            load=load,
        )
        installed = _install_signals(handle, announce_signals) if handle_signals else []
        try:
            return await _wait_with_monitor(handle, monitor)
        finally:
            loop = asyncio.get_running_loop()
            for sig in installed:
                loop.remove_signal_handler(sig)

    return asyncio.run(main())


_held: list[signal.Signals] = []


def hold_signals() -> None:
    """From now until a run installs its own handlers, remember SIGINT and SIGTERM
    instead of acting on them; the next run that installs handlers acts on them at once.

    For a worker of ``sluiceway run --workers``: its supervisor forwards a Ctrl-C to it
    perhaps while it still imports the flow, where Python's default would end it with a
    ``KeyboardInterrupt`` traceback instead of a flow stopped gracefully (with its totals).
    The supervisor starts workers with both signals blocked, so one sent before this call
    waits; this call unblocks them.  Only in the main thread (signal handlers live there).
    """
    if threading.current_thread() is not threading.main_thread():
        return

    def held(signum: int, _frame: object) -> None:
        _held.append(signal.Signals(signum))

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, held)
    # The supervisor starts its workers with these blocked: let through what waits.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def take_held_signals() -> list[signal.Signals]:
    """The signals :func:`hold_signals` remembered, in order (and forget them)."""
    taken = list(_held)
    _held.clear()
    return taken


def _install_signals(handle: FlowHandle, announce: bool) -> list[signal.Signals]:
    if threading.current_thread() is not threading.main_thread():
        return []
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        if len(received) == 1:
            if announce:
                _announce(sig, handle)
            handle.request_stop()
        else:
            handle._force_by_signal(sig)

    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            continue
        installed.append(sig)
    for sig in take_held_signals():  # received before this run could handle them
        on_signal(sig)
    return installed


def _announce(sig: signal.Signals, handle: FlowHandle) -> None:
    print(  # noqa: T201 - the user pressed Ctrl-C in a terminal: answer there
        f"\nsluiceway: {sig.name} received, stopping flow {handle.flow.name!r} "
        f"({'at a checkpoint' if handle._executor.checkpointing else 'draining'}; "
        "signal again to force)",
        file=sys.stderr,
        flush=True,
    )
