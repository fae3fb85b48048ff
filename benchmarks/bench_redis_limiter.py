"""RL: RedisLimiter.try_acquire calls per second against a real Redis.

    python benchmarks/bench_redis_limiter.py           # full (~40 s), prints the table
    python benchmarks/bench_redis_limiter.py --quick   # ~10 s smoke run
    python benchmarks/bench_redis_limiter.py --url redis://127.0.0.1:6379/0

Modes, each a fresh child process (or four) timed over a fixed wall-clock interval:

* ``1 client, sequential``: one task awaits ``try_acquire()`` in a loop (one round trip
  per call: latency-bound).
* ``1 client, 32 tasks``: 32 tasks share one limiter (its connection pool opens one
  connection per task in flight), so round trips overlap.
* ``4 processes, sequential``: four child processes, one task each, share one limit,
  started together; the figure is their sum.

Every limit is generous (a token bucket of rate 1e9), so every call is admitted and writes
its key: the expensive path.  ``redis PING`` rows run the same loops with ``ping()``
instead: the round-trip floor, so ``ratio`` is the limiter's cost over a bare round trip.
The sequential mode is also measured for the fixed window and the sliding log.  Best of
``repeats``.  Keys live under ``sluiceway-bench:<uuid>`` and are deleted afterwards.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from typing import Any

import redis
import redis.asyncio as aioredis
from common import (
    HERE,
    Params,
    Result,
    Row,
    fmt_int,
    module_main,
    run_child,
)

from sluiceway.flowcontrol.redis import RedisAlgorithm, RedisLimiter

DEFAULT_URL = "redis://127.0.0.1:6379/0"
CONCURRENT_TASKS = 32
PROCESSES = 4

SPECS: dict[str, RedisAlgorithm] = {
    "token bucket": RedisLimiter.token_bucket(rate=1e9, burst=1_000_000_000),
    "fixed window": RedisLimiter.fixed_window(limit=1_000_000_000, window=1.0),
    # a 0.1 s log keeps the sorted set at a few thousand entries at these rates
    "sliding log": RedisLimiter.sliding_window_log(limit=1_000_000_000, window=0.1),
}


async def _loop(call: Any, tasks: int, duration: float) -> int:
    """``tasks`` tasks each awaiting ``call()`` until ``duration`` seconds passed; calls made."""
    end = time.perf_counter() + duration
    counts = [0] * tasks

    async def worker(i: int) -> None:
        n = 0
        while time.perf_counter() < end:
            await call()
            n += 1
        counts[i] = n

    async with asyncio.TaskGroup() as tg:
        for i in range(tasks):
            tg.create_task(worker(i))
    return sum(counts)


def measure(params: Params) -> Result:
    """Child entry: calls/s of ``op`` ("limiter" or "ping") with ``tasks`` tasks.

    With ``start_at`` (a ``time.time()`` instant) it waits for it, then runs once (the
    four-process mode); otherwise it is the best of ``repeats`` runs.
    """
    url, op, tasks = params["url"], params["op"], int(params["tasks"])
    duration, repeats = float(params["duration"]), int(params.get("repeats", 1))

    async def main() -> list[float]:
        algorithm = params.get("algorithm", "token bucket")
        name = algorithm.replace(" ", "-")  # one key per algorithm: their data types differ
        limiter = RedisLimiter(url, name, SPECS[algorithm], prefix=params["prefix"])
        client = aioredis.Redis.from_url(url)
        call = limiter.try_acquire if op == "limiter" else client.ping
        try:
            await _loop(call, tasks, 0.2)  # warm-up: connections, SCRIPT LOAD
            start_at = params.get("start_at")
            if start_at is not None:
                await asyncio.sleep(max(0.0, start_at - time.time()))
            rates = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                n = await _loop(call, tasks, duration)
                rates.append(n / (time.perf_counter() - t0))
            if op == "limiter":
                assert limiter.statistics().refused == 0
            return rates
        finally:
            await limiter.close()
            await client.aclose()

    rates = asyncio.run(main())
    return {"best": max(rates), "runs": rates}


def _run_processes(params: Params, processes: int) -> float:
    """``processes`` children started together; the sum of their calls/s."""
    start_at = time.time() + 1.5  # after every child imported and warmed up
    cmd_params = {**params, "start_at": start_at, "repeats": 1}
    cmd = [sys.executable, str(HERE / "bench_redis_limiter.py"), "measure"]
    procs = [
        subprocess.Popen(
            [*cmd, json.dumps(cmd_params)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    total = 0.0
    for p in procs:
        out, err = p.communicate(timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"benchmark child failed (exit {p.returncode}):\n{out}\n{err}")
        total += json.loads(out.strip().splitlines()[-1])["best"]
    return total


def _delete_keys(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def run(quick: bool, url: str = DEFAULT_URL) -> tuple[list[Row], Result]:
    """The RL rows (for run.py) and the raw figures."""
    duration, repeats = (0.5, 2) if quick else (2.0, 3)
    prefix = f"sluiceway-bench:{uuid.uuid4().hex}"
    base = {"url": url, "prefix": prefix, "duration": duration, "repeats": repeats}
    raw: Result = {"duration": duration, "repeats": repeats}
    rows: list[Row] = []
    wl = "RL redis limiter"
    try:
        modes = [
            ("1 client, sequential", 1, 1),
            (f"1 client, {CONCURRENT_TASKS} tasks", CONCURRENT_TASKS, 1),
            (f"{PROCESSES} processes, sequential", 1, PROCESSES),
        ]
        for mode, tasks, processes in modes:
            rates: dict[str, float] = {}
            for op in ("limiter", "ping"):
                params = {**base, "op": op, "tasks": tasks}
                if processes == 1:
                    rates[op] = run_child("bench_redis_limiter", "measure", params)["best"]
                else:
                    rates[op] = max(
                        _run_processes(params, processes) for _ in range(max(1, repeats - 1))
                    )
            raw[mode] = rates
            ratio = f"{rates['limiter'] / rates['ping']:.2f}x PING"
            rows.append(
                Row(
                    wl,
                    f"try_acquire, token bucket, {mode}",
                    f"{fmt_int(rates['limiter'])} calls/s",
                    ratio,
                )
            )
            rows.append(Row(wl, f"redis PING, {mode}", f"{fmt_int(rates['ping'])} calls/s"))
        for algorithm in ("fixed window", "sliding log"):
            params = {**base, "op": "limiter", "tasks": 1, "algorithm": algorithm}
            rate = run_child("bench_redis_limiter", "measure", params)["best"]
            raw[f"{algorithm}, 1 client, sequential"] = rate
            ping = raw["1 client, sequential"]["ping"]
            rows.append(
                Row(
                    wl,
                    f"try_acquire, {algorithm}, 1 client, sequential",
                    f"{fmt_int(rate)} calls/s",
                    f"{rate / ping:.2f}x PING",
                )
            )
    finally:
        _delete_keys(url, prefix)
    return rows, raw


if __name__ == "__main__":
    module_main(__doc__ or "", run, {"measure": measure}, ("--url", DEFAULT_URL, "the Redis"))
