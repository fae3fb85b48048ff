"""The injected clock: VirtualClock (advance, autojump, timers) and SystemClock basics,
plus the project rule that nothing outside the clock module reads or sleeps on real time.
"""

from __future__ import annotations

import asyncio
import math
import re
import sys
import time
from pathlib import Path

import pytest

import sluiceway as sw
from sluiceway.time import Clock, SystemClock, VirtualClock, yield_now
from sluiceway.time import clock as clock_module
from sluiceway.time.clock import HAND_OVER_EVERY, PROMPT_SWITCH_INTERVAL, _PromptThreads

SRC = Path(__file__).resolve().parents[1] / "src" / "sluiceway"


def manual() -> VirtualClock:
    return VirtualClock(autojump=False)


async def settle(n: int = 10) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


# -- advance --------------------------------------------------------------------------


def test_advance_fires_timers_in_time_order_at_their_own_instant() -> None:
    clock = manual()
    fired: list[tuple[str, float]] = []
    for label, when in [("c", 3.0), ("a", 1.0), ("b", 2.0), ("d", 7.0)]:
        clock.call_at(when, lambda label=label: fired.append((label, clock.monotonic())))
    clock.advance(2.5)
    assert fired == [("a", 1.0), ("b", 2.0)]
    assert clock.monotonic() == 2.5
    clock.advance(1.0)
    assert fired == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert clock.monotonic() == 3.5
    assert clock.next_deadline() == 7.0


def test_a_timer_due_exactly_at_the_target_fires() -> None:
    clock = manual()
    fired: list[float] = []
    clock.call_at(2.0, lambda: fired.append(clock.monotonic()))
    clock.advance(2.0)
    assert fired == [2.0]


def test_timers_scheduled_by_a_timer_fire_within_the_same_advance() -> None:
    clock = manual()
    fired: list[tuple[str, float]] = []

    def first() -> None:
        fired.append(("first", clock.monotonic()))
        clock.call_at(2.0, lambda: fired.append(("second", clock.monotonic())))
        clock.call_at(9.0, lambda: fired.append(("late", clock.monotonic())))

    clock.call_at(1.0, first)
    clock.call_at(3.0, lambda: fired.append(("third", clock.monotonic())))
    clock.advance(5.0)
    assert fired == [("first", 1.0), ("second", 2.0), ("third", 3.0)]
    assert clock.next_deadline() == 9.0


def test_ties_fire_in_scheduling_order() -> None:
    clock = manual()
    fired: list[int] = []
    order = [4, 0, 3, 1, 2]
    for i in order:
        clock.call_at(1.0, lambda i=i: fired.append(i))
    clock.call_at(0.5, lambda: fired.append(-1))
    clock.advance(1.0)
    assert fired == [-1, *order]


def test_cancelled_timers_do_not_fire() -> None:
    clock = manual()
    fired: list[str] = []
    keep = clock.call_at(2.0, lambda: fired.append("kept"))
    gone = clock.call_at(1.0, lambda: fired.append("cancelled"))
    gone.cancel()
    assert clock.next_deadline() == 2.0  # a cancelled timer is not the next deadline
    clock.advance(5.0)
    assert fired == ["kept"]
    keep.cancel()  # cancelling after it ran is harmless
    assert clock.next_deadline() is None


def test_advance_zero_runs_timers_that_are_due() -> None:
    clock = manual()
    clock.advance(3.0)
    fired: list[float] = []
    clock.call_at(3.0, lambda: fired.append(clock.monotonic()))
    clock.advance(0)
    assert fired == [3.0]


def test_advance_backwards_raises() -> None:
    clock = manual()
    clock.advance(1.0)
    with pytest.raises(ValueError, match=r"got -1 \(a clock cannot move backwards\)"):
        clock.advance(-1)
    assert clock.monotonic() == 1.0


def test_advance_nan_raises_and_fires_nothing() -> None:
    clock = manual()
    fired: list[float] = []
    clock.call_at(100.0, lambda: fired.append(clock.monotonic()))
    with pytest.raises(ValueError, match="nan"):
        clock.advance(math.nan)
    assert fired == []
    assert clock.monotonic() == 0.0


def test_start_and_epoch() -> None:
    clock = VirtualClock(start=10.0, epoch=1_000.0, autojump=False)
    assert (clock.monotonic(), clock.time()) == (10.0, 1_000.0)
    clock.advance(2.5)
    assert (clock.monotonic(), clock.time()) == (12.5, 1_002.5)
    assert isinstance(clock, Clock)
    assert "12.5" in repr(clock)


# -- autojump -------------------------------------------------------------------------


def test_autojump_makes_an_hour_long_sleep_instant_and_records_the_jump() -> None:
    clock = VirtualClock()

    async def main() -> float:
        await clock.sleep(3600)
        return clock.monotonic()

    started = time.perf_counter()
    assert asyncio.run(main()) == 3600.0
    assert time.perf_counter() - started < 1.0  # "did not actually sleep", not a perf bound
    assert clock.jumps == [3600.0]


def test_autojump_wakes_sleepers_in_time_order() -> None:
    clock = VirtualClock()
    woke: list[tuple[str, float]] = []

    async def sleeper(label: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((label, clock.monotonic()))

    async def main() -> None:
        await asyncio.gather(sleeper("five", 5), sleeper("one", 1), sleeper("three", 3))

    asyncio.run(main())
    assert woke == [("one", 1.0), ("three", 3.0), ("five", 5.0)]
    assert clock.jumps == [1.0, 3.0, 5.0]


def test_autojump_does_not_move_time_while_a_task_is_runnable() -> None:
    clock = VirtualClock()
    seen: list[float] = []

    async def busy() -> None:
        for _ in range(200):
            seen.append(clock.monotonic())
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(clock.sleep(10), busy())

    asyncio.run(main())
    assert set(seen) == {0.0}
    assert clock.monotonic() == 10.0


def test_autojump_ignores_cancelled_sleeps() -> None:
    clock = VirtualClock()

    async def main() -> None:
        long = asyncio.ensure_future(clock.sleep(100))
        await settle()
        long.cancel()
        await clock.sleep(5)

    asyncio.run(main())
    assert clock.jumps == [5.0]
    assert clock.monotonic() == 5.0
    assert clock.next_deadline() is None


def test_a_virtual_clock_can_be_used_by_successive_event_loops() -> None:
    clock = VirtualClock()
    asyncio.run(clock.sleep(2))
    asyncio.run(clock.sleep(3))
    assert clock.monotonic() == 5.0
    assert clock.jumps == [2.0, 5.0]


def test_without_autojump_sleep_waits_for_advance() -> None:
    clock = manual()

    async def main() -> None:
        task = asyncio.ensure_future(clock.sleep(2))
        await settle()
        assert not task.done()
        clock.advance(1.999)
        await settle()
        assert not task.done()
        clock.advance(0.001)
        await settle()
        assert task.done()

    asyncio.run(main())
    assert clock.jumps == []


# -- sleep and wait_until -------------------------------------------------------------


@pytest.mark.parametrize("seconds", [-5.0, -1e-9, 0.0])
def test_sleep_negative_or_zero_returns_without_moving_time(seconds: float) -> None:
    clock = manual()  # would hang if it waited for a timer

    async def main() -> None:
        await clock.sleep(seconds)
        await clock.sleep_until(-3.0)

    asyncio.run(main())
    assert clock.monotonic() == 0.0
    assert clock.next_deadline() is None


def test_zero_sleep_still_lets_other_tasks_run() -> None:
    clock = manual()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    async def main() -> None:
        task = asyncio.ensure_future(other())
        await clock.sleep(0)
        assert ran == ["other"]
        await task

    asyncio.run(main())


def test_wait_until_future_first() -> None:
    clock = VirtualClock()

    async def main() -> tuple[bool, float]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        clock.call_at(2.0, lambda: fut.set_result(None))
        ok = await clock.wait_until(fut, 5.0)
        return ok, clock.monotonic()

    assert asyncio.run(main()) == (True, 2.0)
    assert clock.next_deadline() is None  # the deadline timer was cancelled


def test_wait_until_deadline_first_leaves_the_future_alone() -> None:
    clock = VirtualClock()

    async def main() -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        assert await clock.wait_until(fut, 5.0) is False
        assert clock.monotonic() == 5.0
        assert not fut.done()  # not cancelled: the caller still owns it
        fut.set_result(None)
        assert await clock.wait_until(fut, 6.0) is True  # already done: at once
        assert clock.monotonic() == 5.0

    asyncio.run(main())


def test_wait_until_without_deadline_waits_for_the_future() -> None:
    clock = VirtualClock()

    async def main() -> float:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        clock.call_at(42.0, lambda: fut.set_result(None))
        assert await clock.wait_until(fut, None) is True
        return clock.monotonic()

    assert asyncio.run(main()) == 42.0


def test_wait_until_deadline_with_manual_advance() -> None:
    clock = manual()

    async def main() -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(clock.wait_until(fut, 3.0))
        await settle()
        clock.advance(2.0)
        await settle()
        assert not task.done()
        clock.advance(1.0)
        await settle()
        assert task.done()
        assert task.result() is False

    asyncio.run(main())


def test_wait_until_a_deadline_already_reached_returns_false_at_once() -> None:
    clock = manual()
    clock.advance(10.0)

    async def main() -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(clock.wait_until(fut, 4.0))
        await settle(50)
        done = task.done()
        task.cancel()
        assert done

    asyncio.run(main())


# -- SystemClock ----------------------------------------------------------------------


def test_system_clock_monotonic_never_goes_back() -> None:
    clock = SystemClock()
    reads = [clock.monotonic() for _ in range(2_000)]
    assert reads == sorted(reads)
    assert abs(clock.time() - time.time()) < 1.0
    assert repr(clock) == "SystemClock()"
    assert isinstance(clock, Clock)


def test_system_clock_call_at_fires_not_before_its_instant() -> None:
    clock = SystemClock()

    async def main() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        fired: asyncio.Future[float] = loop.create_future()
        when = clock.monotonic() + 0.005
        clock.call_at(when, lambda: fired.set_result(clock.monotonic()))
        return when, await fired

    when, at = asyncio.run(main())
    assert at >= when - 1e-3  # loop timer granularity


def test_system_clock_cancelled_timer_does_not_fire() -> None:
    clock = SystemClock()
    fired: list[int] = []

    async def main() -> None:
        h = clock.call_at(clock.monotonic() + 0.002, lambda: fired.append(1))
        h.cancel()
        await clock.sleep(0.005)

    asyncio.run(main())
    assert fired == []


def test_system_clock_short_and_negative_sleeps() -> None:
    clock = SystemClock()

    async def main() -> None:
        t0 = clock.monotonic()
        await clock.sleep(-1)
        await clock.sleep_until(t0 - 5)
        await clock.sleep(0.003)
        assert clock.monotonic() - t0 >= 0.002

    asyncio.run(main())


def test_yield_now_lets_other_tasks_run() -> None:
    ran: list[int] = []

    async def other() -> None:
        ran.append(1)

    async def main() -> None:
        task = asyncio.ensure_future(other())
        await yield_now()
        assert ran == [1]
        await task

    asyncio.run(main())
    assert ran == [1]


# -- the rule: time is injected -------------------------------------------------------

_FORBIDDEN = re.compile(
    r"time\.time\(|time\.sleep\(|time\.monotonic\(|asyncio\.sleep\("
    r"|^\s*import time\b|^\s*from time import|^\s*from asyncio import[^\n]*\bsleep\b",
    re.MULTILINE,
)


def test_only_the_clock_module_reads_or_sleeps_on_real_time() -> None:
    clock_module = SRC / "time" / "clock.py"
    files = sorted(SRC.rglob("*.py"))
    assert clock_module in files
    offenders = []
    for path in files:
        if path == clock_module:
            continue
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _FORBIDDEN.search(line):
                offenders.append(f"{path.relative_to(SRC.parent)}:{lineno}: {line.strip()}")
    assert not offenders, "time must be injected (use a Clock):\n" + "\n".join(offenders)


def test_the_scan_would_catch_each_forbidden_call() -> None:
    for snippet in [
        "t = time.time()",
        "time.sleep(1)",
        "x = time.monotonic()",
        "await asyncio.sleep(0.1)",
        "import time",
        "from time import perf_counter",
        "from asyncio import gather, sleep",
    ]:
        assert _FORBIDDEN.search(snippet), snippet
    for allowed in ["from sluiceway.time import Clock", "await clock.sleep(1)", "clock.time()"]:
        assert not _FORBIDDEN.search(allowed), allowed


def test_public_api_exports_the_clocks() -> None:
    assert sw.VirtualClock is VirtualClock
    assert sw.SystemClock is SystemClock
    assert sw.testing.VirtualClock is VirtualClock


def test_the_idle_check_survives_the_ready_queue_growing_while_it_looks() -> None:
    """A worker thread (another clock's ``run_in_thread`` finishing) may queue a callback
    while the virtual clock checks the loop's ready queue; that once raised "deque mutated
    during iteration" inside the clock's driver, which then stopped: every virtual sleep
    hung (seen with three flows on three virtual clocks sharing a checkpoint store)."""

    async def main() -> None:
        clock, other = VirtualClock(), VirtualClock()
        loop = asyncio.get_running_loop()
        ready = loop._ready  # type: ignore[attr-defined]

        class Arriving:
            """Another clock's idle check; as it is looked at, a thread queues a callback."""

            _cancelled = False

            @property
            def _callback(self) -> object:
                ready.append(asyncio.Handle(lambda: None, (), loop))
                return other._check_idle

            def _run(self) -> None:
                pass

        sleeper = asyncio.ensure_future(clock.sleep(5))
        await asyncio.sleep(0)  # the sleep registers its timer and starts the driver
        ready.appendleft(Arriving())
        clock._check_idle()  # what the loop runs: it must not raise
        await asyncio.wait_for(sleeper, timeout=2)  # real seconds: the driver goes on
        assert clock.monotonic() == 5

    asyncio.run(main())


def test_the_switch_interval_is_lowered_while_threads_work_and_put_back_after() -> None:
    """run_in_thread lowers the interpreter's switch interval (a busy event loop would
    starve the thread otherwise, see _PromptThreads) and puts the caller's back when the
    last thread call ends -- unless the caller changed it meanwhile, or had it lower."""
    prompt = _PromptThreads()
    before = sys.getswitchinterval()
    try:
        prompt.enter()
        prompt.enter()  # two calls under way
        assert sys.getswitchinterval() == pytest.approx(PROMPT_SWITCH_INTERVAL)
        prompt.exit()
        assert sys.getswitchinterval() == pytest.approx(PROMPT_SWITCH_INTERVAL)  # one left
        prompt.exit()
        assert sys.getswitchinterval() == before

        prompt.enter()
        sys.setswitchinterval(0.01)  # the application's own choice, made meanwhile
        prompt.exit()
        assert sys.getswitchinterval() == pytest.approx(0.01)

        sys.setswitchinterval(0.0001)  # lower already: left alone
        prompt.enter()
        assert sys.getswitchinterval() == pytest.approx(0.0001)
        prompt.exit()
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    finally:
        sys.setswitchinterval(before)


def test_the_loop_hands_the_lock_over_at_most_once_per_interval_while_threads_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """hand_over (at the loop's yield points) lets a waiting thread have the interpreter
    lock with a time.sleep(0) -- only while work runs in threads, and at most once per
    HAND_OVER_EVERY of the loop's time (each costs the loop ~0.1 ms)."""
    prompt = _PromptThreads()
    now = [100.0]
    slept: list[float] = []
    monkeypatch.setattr(clock_module._time, "monotonic", lambda: now[0])
    monkeypatch.setattr(clock_module._time, "sleep", slept.append)
    prompt.hand_over()
    assert slept == []  # no thread at work: nothing to hand over
    before = sys.getswitchinterval()
    try:
        prompt.enter()
        for _ in range(3):  # at one instant: once
            prompt.hand_over()
        assert slept == [0]
        now[0] += HAND_OVER_EVERY / 2
        prompt.hand_over()
        assert slept == [0]  # too soon
        now[0] += HAND_OVER_EVERY  # (past the interval, whatever the rounding)
        prompt.hand_over()
        assert slept == [0, 0]
        prompt.exit()
        now[0] += 1.0
        prompt.hand_over()
        assert slept == [0, 0]
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize("clock", [SystemClock(), VirtualClock()], ids=["system", "virtual"])
def test_run_in_thread_lowers_the_switch_interval_while_it_runs(clock: Clock) -> None:
    before = sys.getswitchinterval()
    seen = asyncio.run(clock.run_in_thread(sys.getswitchinterval))
    assert seen == pytest.approx(PROMPT_SWITCH_INTERVAL)
    assert sys.getswitchinterval() == before
