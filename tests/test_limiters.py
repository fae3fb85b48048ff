"""Local rate limiters: exact examples, bounds as properties, simple exact oracles, and
the clock-bound wrappers on the virtual clock.

Request sequences are replayed through the pure methods (``reserve``, ``try_take``,
``try_reserve``) at given instants; every *admitted instant* (``now + wait``) is
collected and checked against each algorithm's promise.  Comparisons allow the
documented tolerance (``TOLERANCE``, 1 ns) and no more.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import math
import re
from collections.abc import Callable
from datetime import timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sluiceway as sw
from sluiceway.flowcontrol import limiters
from sluiceway.flowcontrol.limiters import (
    TOLERANCE,
    FixedWindow,
    KeyedLimiter,
    LeakyBucket,
    Limiter,
    SlidingWindowCounter,
    SlidingWindowLog,
    TokenBucket,
)

EPS = TOLERANCE
DOC = Path(__file__).resolve().parent.parent / "docs" / "flow-control.md"

Request = tuple[float, int, str]  # (seconds since the previous request, n, operation)
Admitted = tuple[float, float, int]  # (now, admitted instant, n)


def replay(limiter: Limiter, requests: list[Request]) -> list[Admitted]:
    """Feed ``requests`` to the pure methods; (now, admitted instant, n) of the admitted."""
    out: list[Admitted] = []
    now = 0.0
    for gap, n, op in requests:
        now += gap
        if op == "reserve":
            out.append((now, now + limiter.reserve(n, now), n))
        elif op == "try_take":
            if limiter.try_take(n, now):
                out.append((now, now, n))
        else:
            wait = limiter.try_reserve(n, now)
            if wait is not None:
                out.append((now, now + wait, n))
    return out


def check_common(admitted: list[Admitted]) -> None:
    """Never before ``now``; first come, first served (instants never go back)."""
    for now, at, _ in admitted:
        assert at >= now
    instants = [at for _, at, _ in admitted]
    # Never back -- up to TOLERANCE: 3.001 may come out as 3.0009999999999994.
    assert all(b >= a - EPS for a, b in itertools.pairwise(instants)), instants


def units_within(admitted: list[Admitted], span: float) -> list[tuple[float, float, int]]:
    """For each admitted instant a: (a, b, units admitted in [a, b]), b the last within span."""
    pts = sorted((at, n) for _, at, n in admitted)
    out = []
    for i, (a, _) in enumerate(pts):
        total, b = 0, a
        for t, n in pts[i:]:
            if t > a + span:
                break
            total, b = total + n, t
        out.append((a, b, total))
    return out


gaps = st.one_of(
    st.just(0.0),
    st.integers(1, 400).map(lambda ms: ms / 1000),  # decimal instants: 0.1 + 0.2 ...
    st.floats(0.0, 0.5),
    st.floats(0.5, 5.0),  # long enough to refill / expire
)
ops = st.sampled_from(["reserve", "try_take", "try_reserve"])
rates = st.sampled_from([0.5, 1.0, 2.0, 3.0, 7.5, 10.0, 100.0])
windows = st.sampled_from([0.1, 0.25, 1.0, 1.5, 3.0])


def request_lists(max_n: int) -> st.SearchStrategy[list[Request]]:
    return st.lists(st.tuples(gaps, st.integers(1, max_n), ops), max_size=50)


# -- token bucket ------------------------------------------------------------------------


def test_token_bucket_starts_full_then_refills_at_the_rate() -> None:
    b = TokenBucket(rate=2, burst=3)
    assert [b.try_take(1, 0.0) for _ in range(4)] == [True, True, True, False]
    assert b.delay(1, 0.0) == 0.5
    assert b.tokens(0.25) == 0.5
    assert b.try_take(1, 0.5)
    assert not b.try_take(1, 0.75)
    assert b.tokens(10.0) == 3.0  # never more than burst
    assert b.idle(10.0)
    assert not b.idle(0.9)


def test_token_bucket_reservations_queue_first_come_first_served() -> None:
    b = TokenBucket(rate=1, burst=3)
    assert b.reserve(3, 0.0) == 0.0
    assert b.reserve(3, 0.0) == 3.0  # the bucket is full again at 3.0
    assert b.delay(1, 0.0) == 4.0  # a small request does not overtake
    assert b.tokens(1.0) == -2.0
    assert b.try_reserve(1, 0.0) is None
    assert b.reserve(1, 2.0) == 2.0


@pytest.mark.parametrize("rate", [10, 3, 7.5, 1 / 3])
def test_token_bucket_decimal_instants_are_on_time(rate: float) -> None:
    b = TokenBucket(rate=rate, burst=1)
    step = 1 / rate
    assert all(b.try_take(1, k * step) for k in range(1000))
    assert not b.try_take(1, 1000 * step - 1e-6)
    assert b.try_take(1, 1000 * step)


@given(requests=request_lists(4), rate=rates, burst=st.integers(4, 6))
def test_token_bucket_never_exceeds_rate_times_elapsed_plus_burst(
    requests: list[Request], rate: float, burst: int
) -> None:
    admitted = replay(TokenBucket(rate, burst), requests)
    check_common(admitted)
    for a, b, units in units_within(admitted, math.inf):
        assert units <= rate * (b - a + 2 * EPS) + burst + 1e-9


@given(requests=request_lists(4), rate=rates, burst=st.integers(4, 6))
def test_token_bucket_bound_holds_even_if_now_goes_back(
    requests: list[Request], rate: float, burst: int
) -> None:
    b = TokenBucket(rate, burst)
    admitted = []
    for i, (gap, n, op) in enumerate(requests):
        now = gap * (i % 7)  # jumps back and forth
        if op == "reserve":
            admitted.append((now, now + b.reserve(n, now), n))
        elif b.try_take(n, now):
            admitted.append((now, now, n))
    for a, c, units in units_within(admitted, math.inf):
        assert units <= rate * (c - a + 2 * EPS) + burst + 1e-9


# -- leaky bucket ------------------------------------------------------------------------


def test_leaky_bucket_shapes_to_a_steady_outflow() -> None:
    q = LeakyBucket(rate=2, capacity=3)
    assert [q.reserve(1, 0.0) for _ in range(4)] == [0.0, 0.5, 1.0, 1.5]
    assert q.backlog(0.0) == 4.0  # reserve waits for room: capacity only caps n
    assert q.delay(1, 1.0) == 1.0
    assert not q.try_take(1, 1.9)
    assert q.try_take(1, 2.0)
    assert q.reserve(3, 2.0) == 0.5  # 3 units drain in 1.5 s
    assert q.reserve(1, 2.0) == 2.0


def test_leaky_bucket_capacity_bounds_what_try_reserve_queues() -> None:
    q = LeakyBucket(rate=2, capacity=3)
    assert [q.try_reserve(1, 0.0) for _ in range(4)] == [0.0, 0.5, 1.0, None]
    assert q.backlog(0.25) == 2.5
    assert q.try_reserve(2, 0.5) is None  # 2 queued + 2 > 3
    assert q.try_reserve(1, 0.5) == 1.0
    one = LeakyBucket(rate=2, capacity=1)  # capacity 1: no queue, pure spacing
    assert [one.try_reserve(1, t) for t in (0.0, 0.25, 0.5)] == [0.0, None, 0.0]


def test_leaky_bucket_decimal_instants_are_on_time() -> None:
    q = LeakyBucket(rate=10, capacity=1)
    assert all(q.try_take(1, k / 10) for k in range(1000))


@given(requests=request_lists(3), rate=rates, capacity=st.integers(3, 6))
def test_leaky_bucket_admits_with_steady_spacing_and_bounded_queue(
    requests: list[Request], rate: float, capacity: int
) -> None:
    q = LeakyBucket(rate, capacity)
    admitted: list[Admitted] = []
    now = 0.0
    for gap, n, op in requests:
        now += gap
        if op == "try_reserve":
            wait = q.try_reserve(n, now)
            if wait is not None:  # accepted: it fitted in the queue
                assert wait * rate + n <= capacity + EPS * rate + 1e-9
                admitted.append((now, now + wait, n))
        else:
            admitted.extend(replay_one(q, now, n, op))
    check_common(admitted)
    for (_, a, n), (_, b, _) in itertools.pairwise(admitted):
        assert b - a >= n / rate - 2 * EPS


def replay_one(limiter: Limiter, now: float, n: int, op: str) -> list[Admitted]:
    if op == "reserve":
        return [(now, now + limiter.reserve(n, now), n)]
    return [(now, now, n)] if limiter.try_take(n, now) else []


# -- fixed window ------------------------------------------------------------------------


def test_fixed_windows_are_aligned_to_multiples_of_the_window() -> None:
    w = FixedWindow(limit=2, window=1)
    got = [w.try_take(1, t) for t in (0.1, 0.2, 0.3, 0.9, 1.0, 1.0, 1.0)]
    assert got == [True, True, False, False, True, True, False]
    assert w.delay(1, 1.25) == 0.75
    assert w.reserve(2, 1.25) == 0.75  # the next window, whole
    assert w.reserve(1, 1.25) == 1.75  # 2.0's window is full: 3.0
    assert not w.idle(2.5)
    assert w.idle(4.0)


def test_fixed_window_boundaries_are_exact_for_decimal_instants() -> None:
    w = FixedWindow(limit=1, window=0.1)
    assert all(w.try_take(1, k / 10) for k in range(1000))  # 0.3 opens [0.3, 0.4)
    w = FixedWindow(limit=1, window=timedelta(milliseconds=100))
    assert w.window == 0.1
    assert w.try_take(1, 0.29999)
    assert not w.try_take(1, 0.29999999)
    assert w.try_take(1, 0.3)


def test_fixed_window_allows_twice_the_limit_across_a_boundary() -> None:
    w = FixedWindow(limit=3, window=1)
    assert all(w.try_take(1, 0.99) for _ in range(3))
    assert all(w.try_take(1, 1.0) for _ in range(3))  # documented: 6 within 10 ms


@given(requests=request_lists(3), limit=st.integers(3, 5), window=windows)
def test_fixed_window_never_admits_more_than_limit_per_aligned_window(
    requests: list[Request], limit: int, window: float
) -> None:
    admitted = replay(FixedWindow(limit, window), requests)
    check_common(admitted)
    per_window: dict[float, int] = {}
    for _, at, n in admitted:
        k = (at + EPS) // window
        per_window[k] = per_window.get(k, 0) + n
    assert all(units <= limit for units in per_window.values()), per_window


# -- sliding window log ------------------------------------------------------------------


def test_sliding_log_counts_every_interval_of_the_window() -> None:
    log = SlidingWindowLog(limit=2, window=1)
    got = [log.try_take(1, t) for t in (0.1, 0.2, 0.3, 1.0, 1.1, 1.15, 1.2)]
    assert got == [True, True, False, False, True, False, True]
    assert log.delay(1, 1.5) == pytest.approx(0.6)
    assert log.reserve(2, 1.5) == pytest.approx(0.7)  # both gone at 2.2
    assert log.count(1.5) == 4
    assert not log.idle(3.1)
    assert log.idle(3.2)


def test_sliding_log_forgets_expired_units() -> None:
    log = SlidingWindowLog(limit=100, window=1)
    for k in range(10_000):
        assert log.try_take(1, k / 100)  # exactly at the limit, all admitted
        assert log.count(k / 100) <= 100


@given(requests=request_lists(3), limit=st.integers(3, 5), window=windows)
def test_sliding_log_never_admits_more_than_limit_in_any_window(
    requests: list[Request], limit: int, window: float
) -> None:
    admitted = replay(SlidingWindowLog(limit, window), requests)
    check_common(admitted)
    for _, _, units in units_within(admitted, window - 2 * EPS):
        assert units <= limit


# -- sliding window counter --------------------------------------------------------------


def test_sliding_counter_weighs_the_previous_window() -> None:
    c = SlidingWindowCounter(limit=4, window=1)
    assert [c.try_take(1, t) for t in (0, 0, 0, 0)] == [True] * 4
    assert c.estimate(1.5) == 2.0  # 4 * (1 - 0.5) + 0
    assert [c.try_take(1, 1.5) for _ in range(3)] == [True, True, False]
    assert c.delay(1, 1.5) == pytest.approx(0.25)  # 4 * 0.25 + 2 + 1 == 4
    assert c.try_take(1, 1.75)
    assert c.estimate(1.75) == 4.0
    assert c.reserve(4, 1.75) == pytest.approx(1.25)  # window 2 would count window 1's 3
    assert not c.idle(4.5)
    assert c.idle(5.0)


def test_sliding_counter_on_evenly_spread_traffic_is_one_unit_cautious() -> None:
    below = SlidingWindowCounter(limit=10, window=1)
    assert all(below.try_take(1, k / 9) for k in range(1000))  # 9 per window: all pass
    at = SlidingWindowCounter(limit=10, window=1)  # 10 per window: about 9 pass
    assert sum(at.try_take(1, k / 10) for k in range(1000)) == pytest.approx(900, abs=2)


@given(requests=request_lists(3), limit=st.integers(3, 5), window=windows)
def test_sliding_counter_bounds(requests: list[Request], limit: int, window: float) -> None:
    admitted = replay(SlidingWindowCounter(limit, window), requests)
    check_common(admitted)
    per_window: dict[float, int] = {}
    for _, at, n in admitted:
        k = (at + EPS) // window
        per_window[k] = per_window.get(k, 0) + n
    assert all(units <= limit for units in per_window.values()), per_window
    for _, _, units in units_within(admitted, window - 2 * EPS):
        assert units < 2 * limit  # an approximation: may exceed limit, never 2 * limit


# -- every algorithm: delay, reserve, try_acquire and idle agree --------------------------

Factory = Callable[[], Limiter]
FACTORIES: dict[str, Factory] = {
    "token": lambda: TokenBucket(rate=4, burst=4),
    "leaky": lambda: LeakyBucket(rate=4, capacity=4),
    "fixed": lambda: FixedWindow(limit=4, window=0.5),
    "log": lambda: SlidingWindowLog(limit=4, window=0.5),
    "counter": lambda: SlidingWindowCounter(limit=4, window=0.5),
}
kinds = st.sampled_from(sorted(FACTORIES))


@given(kind=kinds, requests=request_lists(4))
def test_delay_is_what_reserve_waits_and_what_try_acquire_needs(
    kind: str, requests: list[Request]
) -> None:
    clock = sw.VirtualClock(autojump=False)
    limiter = FACTORIES[kind]().bind(clock)
    for gap, n, op in requests:
        clock.advance(gap)
        now = clock.monotonic()
        d = limiter.delay(n, now)
        assert d >= 0.0
        assert copy.deepcopy(limiter).reserve(n, now) == d
        if d > 0:  # the wait is the least: not admitted a little earlier, admitted then
            assert copy.deepcopy(limiter).delay(n, now + d - 1e-6) > 0.0
            assert copy.deepcopy(limiter).delay(n, now + d) == 0.0
        if op == "reserve":
            assert limiter.reserve(n, now) == d
        else:
            assert limiter.try_acquire(n) is (d == 0.0)


@given(kind=kinds, history=request_lists(4), pause=gaps, after=request_lists(4))
def test_an_idle_limiter_behaves_like_a_new_one(
    kind: str, history: list[Request], pause: float, after: list[Request]
) -> None:
    limiter = FACTORIES[kind]()
    admitted = replay(limiter, history)
    now = sum(g for g, _, _ in history) + pause
    last = max([now] + [at for _, at, _ in admitted])
    assert copy.deepcopy(limiter).idle(last + 1.0)  # every limiter goes idle when left alone
    if limiter.idle(now):
        shifted = [(now + after[0][0], *after[0][1:]), *after[1:]] if after else []
        assert replay(limiter, shifted) == replay(FACTORIES[kind](), shifted)


# -- exact oracles -----------------------------------------------------------------------
#
# Deliberately simple re-statements of each rule in exact arithmetic (Fractions), driven
# on decimal instants (whole milliseconds).  The limiter must admit at the same instants:
# not later (too strict) and not earlier (too loose).


class Oracle:
    def earliest(self, n: int, now: Fraction) -> Fraction:
        raise NotImplementedError

    def accepts(self, n: int, now: Fraction) -> bool:
        return self.earliest(n, now) - now <= EPS

    def take(self, n: int, at: Fraction) -> None:
        raise NotImplementedError


class TokenOracle(Oracle):
    """The level of tokens, rising at ``rate`` up to ``burst``, dropping by each ``n``."""

    def __init__(self, rate: Fraction, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.t: Fraction | None = None  # the last admission and the level right after it
        self.level = Fraction(burst)

    def level_at(self, t: Fraction) -> Fraction:
        if self.t is None:
            return Fraction(self.burst)
        return min(Fraction(self.burst), self.level + self.rate * (t - self.t))

    def earliest(self, n: int, now: Fraction) -> Fraction:
        start = now if self.t is None else max(now, self.t)
        if self.level_at(start) >= n:
            return start
        assert self.t is not None
        return self.t + (n - self.level) / self.rate

    def take(self, n: int, at: Fraction) -> None:
        self.level, self.t = self.level_at(at) - n, at


class LeakyOracle(Oracle):
    def __init__(self, rate: Fraction, capacity: int) -> None:
        self.rate, self.capacity = rate, capacity
        self.free: Fraction | None = None

    def earliest(self, n: int, now: Fraction) -> Fraction:
        return now if self.free is None else max(now, self.free)

    def accepts(self, n: int, now: Fraction) -> bool:
        backlog = 0 if self.free is None else max(0, self.free - now) * self.rate
        return backlog + n <= self.capacity + EPS * self.rate

    def take(self, n: int, at: Fraction) -> None:
        self.free = at + n / self.rate


class FixedOracle(Oracle):
    def __init__(self, limit: int, window: Fraction) -> None:
        self.limit, self.window = limit, window
        self.units: dict[int, int] = {}

    def index(self, t: Fraction) -> int:
        return math.floor((t + Fraction(EPS)) / self.window)

    def earliest(self, n: int, now: Fraction) -> Fraction:
        k = max([self.index(now), *self.units])  # not before a window already used
        if self.units.get(k, 0) + n <= self.limit:
            return max(now, k * self.window)
        return (k + 1) * self.window

    def take(self, n: int, at: Fraction) -> None:
        k = self.index(at)
        self.units[k] = self.units.get(k, 0) + n


class LogOracle(Oracle):
    """Brute force: try every instant at which some unit expires."""

    def __init__(self, limit: int, window: Fraction) -> None:
        self.limit, self.window = limit, window
        self.log: list[tuple[Fraction, int]] = []

    def earliest(self, n: int, now: Fraction) -> Fraction:
        lo = max([now, *(t for t, _ in self.log)])
        candidates = sorted({lo} | {t + self.window for t, _ in self.log if t + self.window > lo})
        for c in candidates:
            live = sum(m for t, m in self.log if t > c - self.window + Fraction(EPS))
            if live + n <= self.limit:
                return c
        raise AssertionError("unreachable: the last candidate expires every unit")

    def take(self, n: int, at: Fraction) -> None:
        self.log.append((at, n))


def drive(limiter: Limiter, oracle: Oracle, requests: list[tuple[int, int, str]]) -> None:
    now_ms = 0
    for gap_ms, n, op in requests:
        now_ms += gap_ms
        now = Fraction(now_ms, 1000)
        at = oracle.earliest(n, now)
        on_time = at - now <= EPS
        if op == "reserve":
            expected: float | bool | None = 0.0 if on_time else float(at - now)
            got: float | bool | None = limiter.reserve(n, float(now))
            oracle.take(n, at)
        elif op == "try_take":
            expected, got = on_time, limiter.try_take(n, float(now))
            if on_time:
                oracle.take(n, at)
        else:
            accepted = oracle.accepts(n, now)
            expected = (0.0 if on_time else float(at - now)) if accepted else None
            got = limiter.try_reserve(n, float(now))
            if accepted:
                oracle.take(n, at)
        if isinstance(expected, float) and isinstance(got, float):
            assert got == pytest.approx(expected, abs=1e-9), (now, n, op)
        else:
            assert got == expected, (now, n, op)


ms_requests = st.lists(
    st.tuples(st.sampled_from([0, 0, 1, 7, 50, 100, 125, 250, 333, 1000]), st.integers(1, 3), ops),
    max_size=40,
)
exact_rates = st.sampled_from(["1/2", "1", "2", "3", "4", "10", "1000"]).map(Fraction)
exact_windows = st.sampled_from(["1/10", "1/4", "1", "3/2"]).map(Fraction)


@given(requests=ms_requests, rate=exact_rates, burst=st.integers(3, 5))
def test_token_bucket_matches_the_level_oracle(
    requests: list[tuple[int, int, str]], rate: Fraction, burst: int
) -> None:
    drive(TokenBucket(float(rate), burst), TokenOracle(rate, burst), requests)


@given(requests=ms_requests, rate=exact_rates, capacity=st.integers(3, 5))
def test_leaky_bucket_matches_the_queue_oracle(
    requests: list[tuple[int, int, str]], rate: Fraction, capacity: int
) -> None:
    drive(LeakyBucket(float(rate), capacity), LeakyOracle(rate, capacity), requests)


@given(requests=ms_requests, limit=st.integers(3, 5), window=exact_windows)
def test_fixed_window_matches_the_counting_oracle(
    requests: list[tuple[int, int, str]], limit: int, window: Fraction
) -> None:
    drive(FixedWindow(limit, float(window)), FixedOracle(limit, window), requests)


@given(requests=ms_requests, limit=st.integers(3, 5), window=exact_windows)
def test_sliding_log_matches_the_brute_force_oracle(
    requests: list[tuple[int, int, str]], limit: int, window: Fraction
) -> None:
    drive(SlidingWindowLog(limit, float(window)), LogOracle(limit, window), requests)


# -- arguments and errors ----------------------------------------------------------------


BAD_ARGUMENTS: list[tuple[Callable[[], Any], type[Exception], str]] = [
    (
        lambda: TokenBucket(0, 5),
        ValueError,
        r"TokenBucket rate must be a finite number > 0 \(units per second\), got 0$",
    ),
    (lambda: TokenBucket(-1.5, 5), ValueError, r"got -1.5"),
    (lambda: TokenBucket(math.inf, 5), ValueError, r"finite number > 0 .*got inf"),
    (lambda: TokenBucket(math.nan, 5), ValueError, r"got nan"),
    (lambda: TokenBucket("10", 5), TypeError, r"a number of units per second, got '10'"),
    (lambda: TokenBucket(True, 5), TypeError, r"got True"),
    (lambda: TokenBucket(10, 0), ValueError, r"TokenBucket burst must be an int >= 1 .*, got 0"),
    (lambda: TokenBucket(10, 2.5), TypeError, r"burst must be an int >= 1 \(units\), got 2.5"),
    (lambda: LeakyBucket(10, -3), ValueError, r"LeakyBucket capacity must be an int >= 1 .*-3"),
    (lambda: LeakyBucket(0.0, 3), ValueError, r"LeakyBucket rate must be"),
    (lambda: FixedWindow(0, 1), ValueError, r"FixedWindow limit must be an int >= 1 .*, got 0"),
    (lambda: FixedWindow(5, 0), ValueError, r"FixedWindow window must be > 0 seconds, got 0"),
    (lambda: FixedWindow(5, timedelta(0)), ValueError, r"FixedWindow window must be > 0"),
    (lambda: SlidingWindowLog(5, -1), ValueError, r"SlidingWindowLog window must be > 0 .*-1"),
    (lambda: SlidingWindowLog(5, math.inf), ValueError, r"window must be finite"),
    (
        lambda: SlidingWindowCounter(5, "1s"),
        TypeError,
        r"SlidingWindowCounter window must be seconds .float. or a timedelta, got '1s'",
    ),
    (
        lambda: KeyedLimiter(TokenBucket(1, 1)),  # type: ignore[arg-type]
        TypeError,
        r"KeyedLimiter needs a function that builds a limiter",
    ),
    (lambda: KeyedLimiter(lambda: 5), TypeError, r"factory must return a Limiter .*got 5"),  # type: ignore[arg-type, return-value]
]


@pytest.mark.parametrize(("make", "error", "message"), BAD_ARGUMENTS)
def test_bad_arguments_are_explained(
    make: Callable[[], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@pytest.mark.parametrize("method", ["delay", "reserve", "try_take", "try_reserve"])
def test_n_out_of_range_names_the_limiter_and_the_numbers(kind: str, method: str) -> None:
    limiter = FACTORIES[kind]()
    call = getattr(limiter, method)
    with pytest.raises(
        ValueError, match=r"\(.*=4.*\) can never take n=5 units at once \(at most 4\)"
    ):
        call(5, 0.0)
    with pytest.raises(ValueError, match=r"n must be >= 1 unit, got 0"):
        call(0, 0.0)
    with pytest.raises(TypeError, match=r"n must be an int >= 1 \(units\), got '1'"):
        call("1", 0.0)
    assert replay(limiter, []) == []  # nothing was recorded: still new
    assert limiter.idle(0.0)


def test_n_out_of_range_through_the_wrappers() -> None:
    b = TokenBucket(rate=10, burst=5, clock=sw.VirtualClock())
    with pytest.raises(ValueError, match=r"TokenBucket\(rate=10.0, burst=5\) can never take n=6"):
        b.try_acquire(6)
    with pytest.raises(ValueError, match="n must be >= 1"):
        asyncio.run(b.acquire(0))
    keyed = KeyedLimiter(lambda: FixedWindow(limit=3, window=1))
    with pytest.raises(ValueError, match=r"FixedWindow\(limit=3, window=1.0\) can never take n=4"):
        keyed.reserve("k", 4, 0.0)
    assert keyed.keys_held == 0


def test_reprs_and_properties() -> None:
    assert repr(TokenBucket(10, 5)) == "TokenBucket(rate=10.0, burst=5)"
    assert repr(LeakyBucket(2, 3)) == "LeakyBucket(rate=2.0, capacity=3)"
    assert repr(FixedWindow(5, timedelta(minutes=1))) == "FixedWindow(limit=5, window=60.0)"
    assert repr(SlidingWindowLog(5, 1)) == "SlidingWindowLog(limit=5, window=1.0)"
    assert repr(SlidingWindowCounter(5, 1)) == "SlidingWindowCounter(limit=5, window=1.0)"
    b = TokenBucket(10, 5)
    assert (b.rate, b.burst, b.max_units) == (10.0, 5, 5)
    q = LeakyBucket(2, 3)
    assert (q.rate, q.capacity, q.max_units) == (2.0, 3, 3)
    for w in (FixedWindow(5, 2), SlidingWindowLog(5, 2), SlidingWindowCounter(5, 2)):
        assert (w.limit, w.window, w.max_units) == (5, 2.0, 5)
    assert isinstance(b.clock, sw.SystemClock)


def test_public_names() -> None:
    assert limiters.__all__ == [
        "TOLERANCE",
        "FixedWindow",
        "KeyedLimiter",
        "LeakyBucket",
        "Limiter",
        "SlidingWindowCounter",
        "SlidingWindowLog",
        "TokenBucket",
    ]
    assert TOLERANCE == 1e-9


# -- wrappers on the clock ---------------------------------------------------------------


def test_try_acquire_reads_the_bound_clock() -> None:
    clock = sw.VirtualClock(start=100.0, autojump=False)
    b = TokenBucket(rate=10, burst=2, clock=clock)
    assert [b.try_acquire() for _ in range(3)] == [True, True, False]
    clock.advance(0.1)
    assert b.try_acquire()
    assert not b.try_acquire()
    other = sw.VirtualClock(start=100.3, autojump=False)
    assert b.bind(other) is b
    assert b.clock is other
    assert b.try_acquire(2)
    assert not b.try_acquire()
    with pytest.raises(TypeError, match=r"TokenBucket.bind\(\) needs a sluiceway Clock, got 5"):
        b.bind(5)  # type: ignore[arg-type]


def test_acquire_sleeps_on_the_virtual_clock() -> None:
    clock = sw.VirtualClock()
    b = TokenBucket(rate=10, burst=2, clock=clock)

    async def main() -> list[float]:
        out = []
        for _ in range(5):
            await b.acquire()
            out.append(clock.monotonic())
        await b.acquire(2)
        out.append(clock.monotonic())
        return out

    assert asyncio.run(main()) == pytest.approx([0.0, 0.0, 0.1, 0.2, 0.3, 0.5])
    assert clock.jumps == pytest.approx([0.1, 0.2, 0.3, 0.5])


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_async_with_from_many_tasks_respects_the_limit(kind: str) -> None:
    clock = sw.VirtualClock()
    limiter = FACTORIES[kind]().bind(clock)
    entered: list[float] = []

    async def worker() -> None:
        for _ in range(5):
            async with limiter:
                entered.append(clock.monotonic())

    async def main() -> None:
        async with asyncio.TaskGroup() as tg:
            for _ in range(4):
                tg.create_task(worker())

    asyncio.run(main())
    assert len(entered) == 20
    assert entered == sorted(entered)
    admitted = [(t, t, 1) for t in entered]
    if kind in {"token", "leaky"}:  # rate 4 per second
        for a, b, units in units_within(admitted, math.inf):
            assert units <= 4 * (b - a + 2 * EPS) + (4 if kind == "token" else 1) + 1e-9
    else:  # 4 per 0.5 s window
        for _, _, units in units_within(admitted, 0.5 - 2 * EPS):
            assert units <= (7 if kind == "counter" else 4)
    assert entered[-1] < 5.0  # and it did not wait needlessly: 20 units at 8 per second


def test_leaky_bucket_acquire_spaces_batches_by_their_size() -> None:
    clock = sw.VirtualClock(start=5.0)
    q = LeakyBucket(rate=100, capacity=10, clock=clock)

    async def main() -> list[float]:
        out = []
        for n in (10, 5, 1, 10):
            await q.acquire(n)
            out.append(clock.monotonic())
        return out

    assert asyncio.run(main()) == pytest.approx([5.0, 5.1, 5.15, 5.16])


def test_a_cancelled_acquire_keeps_its_units() -> None:
    clock = sw.VirtualClock()
    b = TokenBucket(rate=1, burst=1, clock=clock)

    async def main() -> None:
        await b.acquire()
        waiter = asyncio.create_task(b.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert clock.monotonic() == 0.0
        assert b.delay(1, 0.0) == 2.0  # the cancelled reservation still counts

    asyncio.run(main())


# -- keyed -------------------------------------------------------------------------------


def test_keyed_limiter_keeps_one_limit_per_key() -> None:
    per_user: KeyedLimiter[str] = KeyedLimiter(lambda: TokenBucket(rate=1, burst=2))
    assert [per_user.try_take("ann", 1, 0.0) for _ in range(3)] == [True, True, False]
    assert per_user.try_take("bob", 2, 0.0)
    assert per_user.delay("ann", 1, 0.0) == 1.0
    assert per_user.delay("eve", 2, 0.0) == 0.0  # a new key: nothing remembered
    assert per_user.keys_held == 2
    assert per_user.reserve("ann", 2, 0.0) == 2.0
    assert per_user.try_reserve("bob", 1, 0.5) is None
    assert per_user.max_units == 2


def test_keyed_limiter_wrappers_use_its_clock() -> None:
    clock = sw.VirtualClock()
    per_key: KeyedLimiter[int] = KeyedLimiter(lambda: LeakyBucket(rate=10, capacity=5), clock=clock)
    assert per_key.clock is clock
    stamps: dict[int, list[float]] = {1: [], 2: []}

    async def worker(key: int) -> None:
        for _ in range(3):
            await per_key.acquire(key)
            stamps[key].append(clock.monotonic())

    async def main() -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(worker(1))
            tg.create_task(worker(2))

    asyncio.run(main())
    assert stamps[1] == stamps[2] == pytest.approx([0.0, 0.1, 0.2])
    assert not per_key.try_acquire(1)  # the next unit of key 1 drains at 0.3
    clock.advance(0.1)
    assert per_key.try_acquire(1)
    assert not per_key.try_acquire(1)
    assert per_key.bind(sw.VirtualClock(start=9.0)) is per_key
    assert per_key.try_acquire(1)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_keyed_limiter_memory_stays_bounded_over_many_keys(kind: str) -> None:
    keyed: KeyedLimiter[int] = KeyedLimiter(FACTORIES[kind])
    most = 0
    for i in range(20_000):  # a new key every 10 ms, each idle again within 1 s
        keyed.reserve(i, 4, i * 0.01)
        most = max(most, keyed.keys_held)
    assert most <= 2 * 100 + 64  # the keys of the last second, twice, at most


def test_keyed_limiter_never_forgets_a_key_that_is_not_idle() -> None:
    keyed: KeyedLimiter[int] = KeyedLimiter(lambda: SlidingWindowLog(limit=1, window=3600))
    for i in range(1_000):
        assert keyed.try_take(i, 1, i * 1.0)
    assert keyed.keys_held == 1_000
    assert not any(keyed.try_take(i, 1, 1_000.0) for i in range(1_000))


def test_keyed_factory_must_build_a_new_limiter_per_key() -> None:
    shared = TokenBucket(1, 1)
    with pytest.raises(ValueError, match="returned the same limiter twice"):
        KeyedLimiter(lambda: shared).try_take("a", 1, 0.0)


# -- the documentation -------------------------------------------------------------------


def rate_limiter_blocks() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Rate limiters", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_docs_examples_run() -> None:
    blocks = rate_limiter_blocks()
    assert len(blocks) >= 3
    for block in blocks:
        exec(block, {"__name__": "docs_example"})
