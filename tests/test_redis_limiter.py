"""RedisLimiter against a real Redis (see services.py for how one is found or started).

Shared-limit tests hammer the machine's Redis from four OS processes and check, from the
Redis time of every admission, that the algorithm's promise held exactly.  Tests that
flush scripts or stop Redis use a private redis-server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import queue
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import pytest

from services import RedisServer, delete_keys, import_or_missing

import_or_missing("redis")

import redis.asyncio as aioredis  # noqa: E402 - after the skip-or-fail check above

import sluiceway as sw  # noqa: E402
from sluiceway.errors import ClosedResourceError  # noqa: E402
from sluiceway.flowcontrol.redis import (  # noqa: E402
    FixedWindowSpec,
    RedisAlgorithm,
    RedisLimiter,
    RedisLimiterError,
    RedisUnavailableError,
    SlidingWindowLogSpec,
    TokenBucketSpec,
)
from sluiceway.time.clock import VirtualClock  # noqa: E402

US = 1_000_000


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


# -- four processes, one limit ---------------------------------------------------------

PROCESSES = 4
DURATION = 0.7  # seconds (of Redis time) of hammering per algorithm
SHARED_SPECS: dict[str, RedisAlgorithm] = {
    "token_bucket": RedisLimiter.token_bucket(rate=300.0, burst=30),
    "fixed_window": RedisLimiter.fixed_window(limit=25, window=0.1),
    "sliding_window": RedisLimiter.sliding_window_log(limit=25, window=0.15),
}


def _hammer(url: str, prefix: str, barrier: Any, results: Any) -> None:
    """Child process: for each algorithm, call decide() for DURATION after a barrier."""

    async def one(name: str, spec: RedisAlgorithm) -> list[int]:
        admitted: list[int] = []
        async with aclosing(RedisLimiter(url, name, spec, prefix=prefix)) as limiter:
            barrier.wait()  # every process starts together
            end_at: float | None = None
            while True:
                decision = await limiter.decide()
                assert decision.redis_time is not None
                if end_at is None:
                    end_at = decision.redis_time + DURATION
                if decision.admitted:
                    admitted.append(round(decision.redis_time * US))
                if decision.redis_time >= end_at:
                    return admitted

    out = {name: asyncio.run(one(name, spec)) for name, spec in SHARED_SPECS.items()}
    results.put(out)


@pytest.fixture(scope="module")
def shared_runs(redis_url: str) -> dict[str, list[int]]:
    """Four processes share each limit in turn; sorted admission times (us) per algorithm.

    One set of processes serves the three tests below (spawning costs ~1 s).
    """
    ctx = multiprocessing.get_context("spawn")
    prefix = f"sluiceway-test:{uuid.uuid4().hex}"
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_hammer, args=(redis_url, prefix, barrier, results))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    try:
        per_child: list[dict[str, list[int]]] = []
        deadline = time.monotonic() + 60
        while len(per_child) < PROCESSES:
            try:
                per_child.append(results.get(timeout=0.2))
            except queue.Empty:
                crashed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not crashed, f"a hammering process failed (exit codes {crashed})"
                assert time.monotonic() < deadline, "the hammering processes hang"
        for p in procs:
            p.join(timeout=10)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        delete_keys(redis_url, prefix)
    merged = {}
    for name in SHARED_SPECS:
        assert sum(1 for out in per_child if out[name]) >= 2, f"{name}: limit not shared"
        merged[name] = sorted(t for out in per_child for t in out[name])
    return merged


@pytest.mark.slow
def test_token_bucket_shared_by_four_processes(shared_runs: dict[str, list[int]]) -> None:
    spec = SHARED_SPECS["token_bucket"]
    assert isinstance(spec, TokenBucketSpec)
    rate, burst, times = spec.rate, spec.burst, shared_runs["token_bucket"]
    # In every interval [t_j, t_i]: admitted <= burst + rate * (t_i - t_j).  Linear form:
    # (i + 1) - rate * t_i <= burst + min over j <= i of (j - rate * t_j).
    best = math.inf
    for i, t in enumerate(times):
        best = min(best, i - rate * t / US)
        assert (i + 1) - rate * t / US <= burst + best + 1e-6, f"over the limit at #{i}"
    bound = burst + rate * (times[-1] - times[0]) / US
    assert len(times) >= 0.8 * bound, f"only {len(times)} admitted of {bound:.0f} allowed"


@pytest.mark.slow
def test_fixed_window_shared_by_four_processes(shared_runs: dict[str, list[int]]) -> None:
    spec = SHARED_SPECS["fixed_window"]
    assert isinstance(spec, FixedWindowSpec)
    times = shared_runs["fixed_window"]
    window_us = round(spec.window * US)
    per_window = Counter(t // window_us for t in times)
    assert max(per_window.values()) == spec.limit  # reached, never exceeded
    inner = range(times[0] // window_us + 1, times[-1] // window_us)  # windows fully in the run
    assert len(inner) >= 4
    full = sum(1 for w in inner if per_window[w] == spec.limit)
    assert full >= 0.8 * len(inner), f"only {full} of {len(inner)} windows were saturated"


@pytest.mark.slow
def test_sliding_window_shared_by_four_processes(shared_runs: dict[str, list[int]]) -> None:
    spec = SHARED_SPECS["sliding_window"]
    assert isinstance(spec, SlidingWindowLogSpec)
    times = shared_runs["sliding_window"]
    window_us = round(spec.window * US)
    lo = 0
    for hi, t in enumerate(times):  # admissions in (t - window, t], for every admission
        while times[lo] <= t - window_us:
            lo += 1
        assert hi - lo + 1 <= spec.limit, f"{hi - lo + 1} admitted within {spec.window} s"
    periods = (times[-1] - times[0]) // window_us
    assert len(times) >= 0.8 * spec.limit * periods, f"only {len(times)} admitted"


# -- one process -----------------------------------------------------------------------


def test_keys_are_namespaced_separate_and_expire(redis_url: str, redis_prefix: str) -> None:
    async def main() -> None:
        spec = RedisLimiter.fixed_window(2, 10.0)
        async with aclosing(
            RedisLimiter(redis_url, "api", spec, prefix=redis_prefix, key="a")
        ) as lim:
            assert [await lim.try_acquire() for _ in range(3)] == [True, True, False]
            assert await lim.try_acquire(key="b")
            refused = await lim.decide()
            assert not refused.admitted
            assert 0 < refused.retry_after <= 10.0
            assert refused.remaining == 0
        bucket = RedisLimiter.token_bucket(rate=10, burst=5)  # idle for 0.5 s: full again
        async with aclosing(RedisLimiter(redis_url, "tb", bucket, prefix=redis_prefix)) as lim:
            assert await lim.try_acquire(5)
        admin = aioredis.Redis.from_url(redis_url)
        try:
            keys = sorted([k.decode() async for k in admin.scan_iter(match=f"{redis_prefix}:*")])
            assert keys == [f"{redis_prefix}:api:a", f"{redis_prefix}:api:b", f"{redis_prefix}:tb"]
            assert 0 < await admin.pttl(f"{redis_prefix}:api:a") <= 11_000
            assert 0 < await admin.pttl(f"{redis_prefix}:tb") <= 1_500
        finally:
            await admin.aclose()

    run(main())


def test_decisions_report_remaining_and_retry_after(redis_url: str, redis_prefix: str) -> None:
    async def main() -> None:
        spec = RedisLimiter.token_bucket(rate=1, burst=3)
        async with aclosing(RedisLimiter(redis_url, "tb", spec, prefix=redis_prefix)) as lim:
            first = await lim.decide(2)
            assert first.admitted
            assert first.remaining == pytest.approx(1.0, abs=0.01)
            second = await lim.decide(3)
            assert not second.admitted
            assert first.redis_time is not None
            assert second.redis_time is not None
            assert second.redis_time >= first.redis_time
            # 2 tokens missing at 1/s, less what flowed in between the two decisions on
            # Redis' clock (48 ms once under load: a fixed 2.0 +- 0.01 failed)
            elapsed = second.redis_time - first.redis_time
            assert second.retry_after == pytest.approx(2.0 - elapsed, abs=0.01)
            assert lim.statistics().admitted == 1
            assert lim.statistics().refused == 1

    run(main())


def test_async_with_takes_one_unit_like_the_local_limiters(
    redis_url: str, redis_prefix: str
) -> None:
    async def main() -> None:
        spec = RedisLimiter.sliding_window_log(2, 60.0)
        async with aclosing(RedisLimiter(redis_url, "cm", spec, prefix=redis_prefix)) as lim:
            async with lim:
                pass
            assert (await lim.decide()).remaining == 0
            assert not await lim.try_acquire()

    run(main())


@pytest.mark.slow
def test_acquire_waits_for_the_next_window(redis_url: str, redis_prefix: str) -> None:
    async def main() -> None:
        spec = RedisLimiter.fixed_window(1, 0.2)
        async with aclosing(RedisLimiter(redis_url, "w", spec, prefix=redis_prefix)) as lim:
            await lim.acquire()
            t0 = time.monotonic()
            await lim.acquire()  # sleeps (on the SystemClock) until the window turns
            waited = time.monotonic() - t0
            assert 0.0 < waited < 0.2 + 0.15
            assert lim.statistics().admitted == 2

    run(main())


def test_script_is_reloaded_after_script_flush(own_redis: RedisServer) -> None:
    async def main() -> None:
        spec = RedisLimiter.fixed_window(3, 60.0)
        async with aclosing(RedisLimiter(own_redis.url, "reload", spec)) as lim:
            assert await lim.try_acquire()
            assert lim.statistics().script_loads == 1
            admin = aioredis.Redis.from_url(own_redis.url)
            try:
                await admin.script_flush()
                assert await lim.try_acquire()  # NOSCRIPT -> SCRIPT LOAD -> EVALSHA
                assert lim.statistics().script_loads == 2
                assert await lim.try_acquire()
                assert not await lim.try_acquire()  # the count survived the reload
                assert lim.statistics().script_loads == 2
            finally:
                await admin.aclose()

    run(main())


def _warnings(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name == "sluiceway" and repr(name) in r.getMessage()
    ]


def test_outage_fail_open_admits_fail_closed_refuses(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sluiceway")
    clock = VirtualClock(autojump=False)  # times the re-probes; Redis keeps its own time
    spec = RedisLimiter.token_bucket(rate=1000, burst=1000)

    def limiter(name: str, mode: Any) -> RedisLimiter:
        return RedisLimiter(
            own_redis.url, name, spec, on_unavailable=mode, clock=clock, recheck_interval=5.0
        )

    async def main() -> None:
        async with (
            aclosing(limiter("open", "fail_open")) as lim_open,
            aclosing(limiter("closed", "fail_closed")) as lim_closed,
        ):
            assert await lim_open.try_acquire()
            assert await lim_closed.try_acquire()

            own_redis.stop()
            for _ in range(5):
                assert await lim_open.try_acquire()
                assert not await lim_closed.try_acquire()
            await lim_open.acquire()
            unavailable = r"'closed' cannot reach Redis at .*ConnectionError.*fail_closed"
            with pytest.raises(RedisUnavailableError, match=unavailable):
                await lim_closed.acquire()
            refused = await lim_closed.decide()
            assert refused.unavailable
            assert refused.retry_after == pytest.approx(5.0)
            clock.advance(5.0)  # a re-probe: still down, and no second warning
            assert await lim_open.try_acquire()
            assert not await lim_closed.try_acquire()
            assert _warnings(caplog, "open") == [_warnings(caplog, "open")[0]]
            assert len(_warnings(caplog, "closed")) == 1
            assert "fail_open" in _warnings(caplog, "open")[0]
            assert "refusing" in _warnings(caplog, "closed")[0]

            own_redis.start()  # a fresh server: no scripts, no keys
            assert not await lim_closed.try_acquire()  # re-probe not due yet
            clock.advance(5.0)
            for lim in (lim_open, lim_closed):
                back = await lim.decide()
                assert back.admitted
                assert not back.unavailable
            assert lim_open.statistics().script_loads == 2  # NOSCRIPT on the new server
            assert lim_closed.statistics().script_loads == 1  # found the one lim_open loaded
            assert lim_open.statistics().unavailable == 7
            assert lim_closed.statistics().unavailable == 9
            assert len(_warnings(caplog, "closed")) == 1
            assert any("reachable again" in r.getMessage() for r in caplog.records)

    run(main())


@pytest.mark.slow
def test_a_hung_redis_counts_as_unavailable(own_redis: RedisServer) -> None:
    async def main() -> None:
        spec = RedisLimiter.fixed_window(10, 60.0)
        async with aclosing(RedisLimiter(own_redis.url, "hang", spec, timeout=0.1)) as lim:
            assert await lim.try_acquire()
            own_redis.pause()
            try:
                t0 = time.monotonic()
                assert not await lim.try_acquire()
                assert time.monotonic() - t0 < 1.0
                assert not await lim.try_acquire()  # decided at once until the re-probe
            finally:
                own_redis.resume()
            assert lim.statistics().unavailable == 2

    run(main())


# -- errors ----------------------------------------------------------------------------

BAD_SPECS: list[tuple[Callable[[], object], type[Exception], str]] = [
    (lambda: RedisLimiter.token_bucket(0, 5), ValueError, "rate must be > 0 and finite, got 0"),
    (lambda: RedisLimiter.token_bucket(float("inf"), 5), ValueError, "rate must be > 0"),
    (lambda: RedisLimiter.token_bucket("10", 5), TypeError, "rate must be a number"),  # type: ignore[arg-type]
    (lambda: RedisLimiter.token_bucket(10, 0), ValueError, "burst must be an int >= 1, got 0"),
    (lambda: RedisLimiter.token_bucket(10, 2.5), ValueError, "burst must be an int >= 1"),  # type: ignore[arg-type]
    (lambda: RedisLimiter.fixed_window(True, 1), ValueError, "limit must be an int >= 1"),
    (lambda: RedisLimiter.fixed_window(5, 0), ValueError, "window must be > 0 seconds, got 0"),
    (lambda: RedisLimiter.fixed_window(5, "1s"), TypeError, "window must be seconds"),  # type: ignore[arg-type]
    (lambda: RedisLimiter.sliding_window_log(5, 0.0001), ValueError, ">= 0.001 seconds"),
    (lambda: SlidingWindowLogSpec(limit=-1, window=1.0), ValueError, "limit must be an int >= 1"),
]


@pytest.mark.parametrize(("make", "error", "message"), BAD_SPECS)
def test_bad_algorithm_arguments(
    make: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")):
        make()


GOOD = TokenBucketSpec(rate=10.0, burst=5)
URL = "redis://127.0.0.1:1/0"  # never connected to by these tests

BAD_LIMITERS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"name": 5}, TypeError, "name must be a str, got 5"),
    ({"name": ""}, ValueError, "name must be a non-empty str without ':', got ''"),
    ({"name": "a:b"}, ValueError, "without ':', got 'a:b'"),
    ({"algorithm": "token_bucket"}, TypeError, "algorithm must be RedisLimiter.token_bucket"),
    ({"on_unavailable": "open"}, ValueError, "'fail_closed' or 'fail_open', got 'open'"),
    ({"url_or_client": 6379}, TypeError, "needs a Redis URL .* got 6379"),
    ({"key": 42}, TypeError, "key must be a str or None, got 42"),
    ({"prefix": ""}, ValueError, "prefix must be a non-empty str"),
    ({"timeout": 0}, ValueError, "timeout must be > 0 seconds"),
    ({"recheck_interval": -1}, ValueError, "recheck_interval must be finite and >= 0"),
    ({"clock": "system"}, TypeError, "clock must be a sluiceway Clock"),
]


@pytest.mark.parametrize(("override", "error", "message"), BAD_LIMITERS)
def test_bad_limiter_arguments(
    override: dict[str, Any], error: type[Exception], message: str
) -> None:
    kwargs: dict[str, Any] = {"url_or_client": URL, "name": "api", "algorithm": GOOD}
    kwargs.update(override)
    with pytest.raises(error, match=message.replace("(", r"\(")):
        RedisLimiter(**kwargs)


@pytest.mark.parametrize(
    ("n", "error", "message"),
    [
        (0, ValueError, "'api': n must be >= 1 unit, got 0"),
        (True, TypeError, "'api': n must be an int >= 1, got True"),
        (1.5, TypeError, "'api': n must be an int >= 1, got 1.5"),
        (6, ValueError, r"'api' can never take n=6 units at once \(at most 5\); split"),
    ],
)
def test_bad_n_is_refused_before_any_redis_call(
    n: Any, error: type[Exception], message: str
) -> None:
    async def main() -> None:
        async with aclosing(RedisLimiter(URL, "api", GOOD)) as lim:
            assert lim.max_units == 5
            with pytest.raises(error, match=message):
                await lim.try_acquire(n)
            with pytest.raises(error, match=message):
                await lim.acquire(n)
            with pytest.raises(TypeError, match="key must be a str or None, got 7"):
                await lim.try_acquire(key=7)  # type: ignore[arg-type]

    run(main())


def test_closed_limiter_refuses_calls_and_keeps_a_borrowed_client(
    redis_url: str, redis_prefix: str
) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            lim = RedisLimiter(client, "api", GOOD, prefix=redis_prefix)
            assert await lim.try_acquire()
            await lim.close()
            await lim.close()  # idempotent
            with pytest.raises(ClosedResourceError, match="rate limiter 'api' is closed"):
                await lim.try_acquire()
            assert await client.ping()  # the caller's client is still open
        finally:
            await client.aclose()

    run(main())


def test_a_key_of_another_type_is_a_clear_error(redis_url: str, redis_prefix: str) -> None:
    async def main() -> None:
        admin = aioredis.Redis.from_url(redis_url)
        try:
            await admin.set(f"{redis_prefix}:api", "not a limiter")
            async with aclosing(RedisLimiter(redis_url, "api", GOOD, prefix=redis_prefix)) as lim:
                with pytest.raises(RedisLimiterError, match=r"WRONGTYPE.*another program"):
                    await lim.try_acquire()
        finally:
            await admin.aclose()

    run(main())


def test_rate_limit_operator_over_a_redis_limiter(redis_url: str, redis_prefix: str) -> None:
    """A flow shaped by a limit kept in Redis: 20 per second, bursts of 2. Real time (the
    limit is in Redis's clock): 12 records take at least (12 - 2) / 20 = 0.5 s."""
    limiter = RedisLimiter(
        redis_url, "flow", RedisLimiter.token_bucket(rate=20, burst=2), prefix=redis_prefix
    )
    flow = sw.Flow("redis-paced")
    out = sw.testing.TimedCollect()
    flow.source(sw.sources.Iterable(range(12))).rate_limit(limiter).sink(out)

    async def main() -> float:
        started = time.monotonic()
        try:
            await sw.run_async(flow)
        finally:
            await limiter.close()  # on the loop its connections belong to
        return time.monotonic() - started

    elapsed = asyncio.run(main())
    assert out.values == list(range(12))  # nothing dropped, order kept
    assert elapsed >= 0.45
    assert elapsed < 3.0
