"""RL local rate limiters: calls per second of ``try_acquire`` and ``reserve``.

    python benchmarks/bench_limiters.py            # the full table (~25 s)
    python benchmarks/bench_limiters.py --quick    # smaller counts (~4 s)

Every algorithm of ``sluiceway.flowcontrol.limiters`` is timed in three regimes, each a
``for`` loop making ``calls`` calls of one bound method:

* ``try_acquire, admitting``: ``limiter.try_acquire()`` on the real ``SystemClock``, with
  limits so high that every call is admitted (``rate=1e12``; ``limit=10**12`` per 1 s
  window, so the sliding log keeps and expires one float per call);
* ``try_acquire, refusing``: the same with a limit of one unit per hour, so every call
  but the first is refused -- the hot path of an overloaded limiter;
* ``reserve (pure now)``: ``limiter.reserve(1, now)`` over a precomputed list of
  instants 1 us apart, with limits of 1,000,000 units per second (``rate=1e6``;
  ``limit=100,000`` per 0.1 s window), so the limiter is just kept busy;
* ``keyed try_acquire``: ``keyed.try_acquire(key)`` of a ``KeyedLimiter`` of token
  buckets, cycling over 1,000 busy keys (the per-key lookup), or with a new key per call
  whose bucket is full again at once (a limiter built per call, idle ones swept).

Baselines: ``time.monotonic()`` alone (the floor of any clock-reading ``try_acquire``),
and a plain-Python token bucket -- the dozen lines people write (float tokens, refill
on each call, ``time.monotonic``) -- in the same loop.  The target, from issue 5:
``TokenBucket.try_acquire`` at >= 1,000,000 calls/s with the real clock, in both regimes.

Best of ``repeats`` runs each; runs are interleaved (round r times every case once, in an
order rotated per round) and preceded by ``gc.collect()``.  One child process for all.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable

from common import Params, Result, Row, child_main, fmt_int, render_table, run_child

from sluiceway.flowcontrol.limiters import (
    FixedWindow,
    KeyedLimiter,
    LeakyBucket,
    Limiter,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
)

TARGET_CALLS = 1_000_000

ALGORITHMS = [
    "TokenBucket",
    "LeakyBucket",
    "FixedWindow",
    "SlidingWindowLog",
    "SlidingWindowCounter",
]


def build(name: str, regime: str) -> Limiter:
    """The limiter of one algorithm for one regime (see the module docstring)."""
    if regime == "admitting":
        rate, units, window = 1e12, 10**12, 1.0
    elif regime == "refusing":
        rate, units, window = 1 / 3600, 1, 3600.0
    else:  # reserve: 1,000,000 units per second
        rate, units, window = 1e6, 100_000, 0.1
    if name == "TokenBucket":
        return TokenBucket(rate, min(units, 100) if regime == "reserve" else units)
    if name == "LeakyBucket":
        return LeakyBucket(rate, min(units, 100) if regime == "reserve" else units)
    if name == "FixedWindow":
        return FixedWindow(units, window)
    if name == "SlidingWindowLog":
        return SlidingWindowLog(units, window)
    return SlidingWindowCounter(units, window)


class PlainTokenBucket:
    """The baseline: a token bucket as usually hand-written."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.last = time.monotonic()

    def try_acquire(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def time_calls(fn: Callable[[], object], calls: int) -> tuple[float, int]:
    """(calls per second, how many returned True) of ``calls`` calls of ``fn``."""
    admitted = 0
    t0 = time.perf_counter()
    for _ in range(calls):
        if fn():
            admitted += 1
    return calls / (time.perf_counter() - t0), admitted


def time_reserve(limiter: Limiter, instants: list[float]) -> float:
    """Calls per second of ``limiter.reserve(1, now)`` over ``instants``."""
    reserve = limiter.reserve
    t0 = time.perf_counter()
    for now in instants:
        reserve(1, now)
    return len(instants) / (time.perf_counter() - t0)


def time_keyed(calls: int, keys: int | None) -> float:
    """Calls per second of ``keyed.try_acquire(key)``: cycling over ``keys`` busy keys, or
    (``None``) a new key per call whose bucket is full again at once (swept as idle)."""
    if keys is None:  # churn: build a limiter per call, sweep the idle ones
        keyed: KeyedLimiter[int] = KeyedLimiter(lambda: TokenBucket(1e12, 10**12))
        sequence = list(range(calls))
    else:  # 1 token per second: no key is idle during the run, every call admitted
        keyed = KeyedLimiter(lambda: TokenBucket(1.0, 10**9))
        sequence = [i % keys for i in range(calls)]
    try_acquire = keyed.try_acquire
    admitted = 0
    t0 = time.perf_counter()
    for key in sequence:
        if try_acquire(key):
            admitted += 1
    rate = calls / (time.perf_counter() - t0)
    held = keyed.keys_held
    if admitted != calls or (held != keys if keys is not None else held > 2 * 64):
        raise AssertionError(f"KeyedLimiter: {admitted} of {calls} admitted, {held} keys held")
    return rate


def measure(params: Params) -> Result:
    """Child entry: best-of-``repeats`` calls/s of every case, interleaved."""
    calls, repeats = int(params["calls"]), int(params["repeats"])
    instants = [i * 1e-6 for i in range(calls)]

    def case(name: str, regime: str) -> Callable[[], float]:
        def run() -> float:
            limiter = build(name, regime)
            if regime == "reserve":
                return time_reserve(limiter, instants)
            rate, admitted = time_calls(limiter.try_acquire, calls)
            # refusing: 1 unit per hour; 2 if the run crosses a window boundary
            ok = admitted == calls if regime == "admitting" else 1 <= admitted <= 2
            if not ok:
                raise AssertionError(f"{name} {regime}: {admitted} of {calls} calls admitted")
            return rate

        return run

    def plain(regime: str) -> Callable[[], float]:
        def run() -> float:
            if regime == "admitting":
                bucket = PlainTokenBucket(1e12, 1e12)
            else:
                bucket = PlainTokenBucket(1 / 3600, 1)
            return time_calls(bucket.try_acquire, calls)[0]

        return run

    cases: dict[str, Callable[[], float]] = {
        "monotonic|time.monotonic() alone": lambda: time_calls(time.monotonic, calls)[0],
    }
    for regime in ("admitting", "refusing"):
        cases[f"{regime}|plain-Python token bucket"] = plain(regime)
        for name in ALGORITHMS:
            cases[f"{regime}|{name}"] = case(name, regime)
    for name in ALGORITHMS:
        cases[f"reserve|{name}"] = case(name, "reserve")
    cases["keyed|KeyedLimiter(TokenBucket), 1,000 busy keys"] = lambda: time_keyed(calls, 1_000)
    cases["keyed|KeyedLimiter(TokenBucket), a new key per call"] = lambda: time_keyed(calls, None)

    names = list(cases)
    best = dict.fromkeys(names, 0.0)
    for rnd in range(repeats):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for key in order:
            gc.collect()
            best[key] = max(best[key], cases[key]())
    return {"calls": calls, "repeats": repeats, "best": best}


WORKLOAD = {
    "monotonic": "RL clock floor",
    "admitting": "RL try_acquire, admitting",
    "refusing": "RL try_acquire, refusing",
    "reserve": "RL reserve (pure now)",
    "keyed": "RL keyed try_acquire",
}


def run(quick: bool) -> tuple[list[Row], Result]:
    """Run RL in a child process; the table rows."""
    params = {"calls": 200_000 if quick else 1_000_000, "repeats": 3 if quick else 5}
    res = run_child("bench_limiters", "measure", params)
    best: dict[str, float] = res["best"]
    rows = []
    for key, rate in best.items():
        regime, system = key.split("|")
        ratio = target = status = ""
        plain = best.get(f"{regime}|plain-Python token bucket")
        if regime in {"admitting", "refusing"} and system != "plain-Python token bucket":
            assert plain is not None
            ratio = f"{rate / plain:.2f}x plain"
        if system == "TokenBucket" and regime != "reserve":
            target = f">= {fmt_int(TARGET_CALLS)}/s"
            status = "PASS" if rate >= TARGET_CALLS else "FAIL"
        wl = f"{WORKLOAD[regime]} ({fmt_int(res['calls'])} calls)"
        rows.append(Row(wl, system, f"{fmt_int(rate)} calls/s", ratio, target, status))
    return rows, res


if __name__ == "__main__":
    if len(sys.argv) == 1 or sys.argv[1:] == ["--quick"]:
        table, _ = run(quick=sys.argv[1:] == ["--quick"])
        print(render_table(table))
        sys.exit(1 if any(r.status == "FAIL" for r in table) else 0)
    child_main({"measure": measure})
