"""RS: records/s through Redis stream -> map -> Redis stream, sluiceway vs raw redis.asyncio.

    python benchmarks/bench_redis_streams.py           # full (~30 s), prints the table
    python benchmarks/bench_redis_streams.py --quick   # ~10 s smoke run
    python benchmarks/bench_redis_streams.py --url redis://127.0.0.1:6379/0

Each run preloads ``n`` JSON records (:func:`common.make_record`) into a fresh stream, then
times reading them back in a consumer group, a ``map`` (one field added) and an ``XADD``
of every result to a second stream.  The clock stops when every result is in the output
stream *and* every input entry is acknowledged (the group's pending list is empty).

* ``sluiceway``: ``sw.sources.RedisStream -> map -> sw.sinks.RedisStream`` with the
  defaults (reads of up to 1,000 entries, one MULTI/EXEC per sink batch, XACK every
  ~0.1 s after the sink).
* ``raw redis.asyncio``: the loop a careful user writes with the same client:
  ``XREADGROUP COUNT 1000``, decode, map, encode, one ``MULTI``/``EXEC`` pipeline of
  ``XADD``s, then one ``XACK`` of the batch's ids.

Each measurement is a fresh child process on its own keys (deleted afterwards); best of
``repeats``.  Target: sluiceway >= 70 % of the raw loop.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
from common import (
    Params,
    Result,
    Row,
    fmt_int,
    make_record,
    module_main,
    run_child,
)

import sluiceway as sw

DEFAULT_URL = "redis://127.0.0.1:6379/0"
COUNT = 1000
TARGET = 0.70


def transform(r: dict[str, Any]) -> dict[str, Any]:
    return {**r, "amount_eur": round(r["amount"] * 0.92, 2)}


async def _preload(client: aioredis.Redis, stream: str, n: int) -> None:
    for start in range(0, n, 5000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + 5000)):
            pipe.xadd(stream, {"data": json.dumps(make_record(i))})
        await pipe.execute()
    await client.xgroup_create(stream, "bench", id="0")


async def _check(client: aioredis.Redis, inp: str, out: str, n: int) -> None:
    assert await client.xlen(out) == n
    pending = await client.xpending(inp, "bench")
    assert pending["pending"] == 0, pending
    [group] = await client.xinfo_groups(inp)
    assert group["lag"] == 0, group


async def _raw(client: aioredis.Redis, inp: str, out: str, n: int) -> float:
    t0 = time.perf_counter()
    done = 0
    while done < n:
        reply = await client.xreadgroup("bench", "raw", {inp: ">"}, count=COUNT, block=1000)
        entries = reply[0][1]
        pipe = client.pipeline(transaction=True)
        for _, fields in entries:
            result = transform(json.loads(fields[b"data"]))
            pipe.xadd(out, {"data": json.dumps(result).encode()})
        await pipe.execute()
        await client.xack(inp, "bench", *[entry_id for entry_id, _ in entries])
        done += len(entries)
    return time.perf_counter() - t0


async def _sluiceway(client: aioredis.Redis, url: str, inp: str, out: str, n: int) -> float:
    flow = sw.Flow("bench-redis-streams")
    src = sw.sources.RedisStream(url, inp, "bench", "sluiceway")
    flow.source(src).map(transform).sink(sw.sinks.RedisStream(url, out))
    handle = sw.start(flow)
    t0 = time.perf_counter()
    # Polls Redis (no event to await); the clock includes these round trips.
    while await client.xlen(out) < n:  # noqa: ASYNC110 - polling Redis
        await asyncio.sleep(0.002)
    while (await client.xpending(inp, "bench"))["pending"]:  # noqa: ASYNC110 - polling Redis
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - t0
    await handle.stop()
    return elapsed


def measure(params: Params) -> Result:
    """Child entry: seconds for ``n`` records with ``system`` ("raw" or "sluiceway")."""
    url, n, system = params["url"], int(params["n"]), params["system"]
    prefix = f"sluiceway-bench:{uuid.uuid4().hex}"
    inp, out = f"{prefix}:in", f"{prefix}:out"

    async def main() -> float:
        client = aioredis.Redis.from_url(url)
        try:
            await _preload(client, inp, n)
            if system == "raw":
                elapsed = await _raw(client, inp, out, n)
            else:
                elapsed = await _sluiceway(client, url, inp, out, n)
            await _check(client, inp, out, n)
            return elapsed
        finally:
            await client.delete(inp, out)
            await client.aclose()

    elapsed = asyncio.run(main())
    return {"seconds": elapsed, "rate": n / elapsed}


def run(quick: bool, url: str = DEFAULT_URL) -> tuple[list[Row], Result]:
    """The RS rows (for run.py) and the raw figures."""
    n, repeats = (20_000, 2) if quick else (100_000, 3)
    raw: Result = {"n": n, "repeats": repeats}
    rates: dict[str, float] = {}
    for system in ("raw", "sluiceway"):
        params = {"url": url, "n": n, "system": system}
        runs = [run_child("bench_redis_streams", "measure", params)["rate"] for _ in range(repeats)]
        raw[system] = runs
        rates[system] = max(runs)
    ratio = rates["sluiceway"] / rates["raw"]
    wl = "RS redis stream->map->stream"
    rows = [
        Row(
            wl,
            "sluiceway RedisStream source + sink",
            f"{fmt_int(rates['sluiceway'])} rec/s",
            f"{ratio:.0%} of raw",
            f">= {TARGET:.0%}",
            "PASS" if ratio >= TARGET else "FAIL",
        ),
        Row(wl, "raw redis.asyncio XREADGROUP/XADD/XACK loop", f"{fmt_int(rates['raw'])} rec/s"),
    ]
    return rows, raw


if __name__ == "__main__":
    module_main(__doc__ or "", run, {"measure": measure}, ("--url", DEFAULT_URL, "the Redis"))
