"""D1: keyed state larger than memory -- ``sw.state.OnDisk`` against the in-memory dict.

``key_by(...).stateful_map(add)`` with one small int of state per key, over a generator
of ``keys`` records, each a key seen for the first time (the state grows to ``keys``
keys), then ``keys // 4`` records of keys seen long before (read-modify-write of keys out
of the cache: the on-disk backend's worst case).  Each system in its own child process:
throughput (records per second of wall time and of CPU time: the machine is shared) and
peak RSS.  The on-disk backend has its default cache of 100,000 keys, files in a temporary
directory.  Targets (issue 20): 20,000,000 keys under 2 GB RSS on disk.

    python benchmarks/bench_disk.py [--quick]
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from typing import Any

from common import Params, Result, Row, fmt_int, module_main, proc_status_kb, run_child

import sluiceway as sw

STRIDE = 7_919  # a prime: i * STRIDE % keys visits every key once per pass


def add(total: int | None, x: int) -> tuple[int, int]:
    total = (total or 0) + x
    return total, total


def records(keys: int) -> Iterator[int]:
    yield from range(keys)
    for i in range(keys // 4):
        yield i * STRIDE % keys


def measure(params: Params) -> Result:
    """Child entry: one run of one backend."""
    keys, system = params["keys"], params["system"]
    backend = sw.state.OnDisk() if system == "disk" else sw.state.InMemory()
    seen = 0

    def count(batch: Any) -> None:
        nonlocal seen
        seen += len(batch)

    flow = sw.Flow("bench-disk", state=backend)
    (
        flow.source(sw.sources.Generator(lambda: records(keys)))
        .key_by(lambda x: x)
        .stateful_map(add)
        .sink(sw.sinks.Function(count, batched=True))
    )
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    sw.run(flow)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = keys + keys // 4
    assert seen == n, (seen, n)
    return {
        "records": n,
        "wall_rate": n / wall,
        "cpu_rate": n / cpu,
        "peak_rss_mb": proc_status_kb("VmHWM") / 1024,
        "load": os.getloadavg()[0],
    }


def run(quick: bool) -> tuple[list[Row], Result]:
    sizes = [200_000] if quick else [2_000_000, 20_000_000]
    rows: list[Row] = []
    details: Result = {}
    for keys in sizes:
        title = f"D1 stateful_map, {fmt_int(keys)} keys"
        got = {}
        for system in ("memory", "disk"):
            res = got[system] = run_child(
                "bench_disk", "measure", {"keys": keys, "system": system}, timeout=3600
            )
            details[f"{system}-{keys}"] = res
        for system, label in (("memory", "in-memory dict"), ("disk", "OnDisk, cache 100,000")):
            res = got[system]
            ratio = res["cpu_rate"] / got["memory"]["cpu_rate"]
            target, status = "", "(info)"
            if system == "disk" and keys >= 20_000_000:
                target = "< 2 GB RSS"
                status = "PASS" if res["peak_rss_mb"] < 2048 else "FAIL"
            rows.append(
                Row(
                    title,
                    label,
                    f"{fmt_int(res['cpu_rate'])} rec/s CPU, {fmt_int(res['wall_rate'])} wall, "
                    f"peak RSS {res['peak_rss_mb']:,.0f} MB (load {res['load']:.1f})",
                    f"{ratio:.2f}x",
                    target,
                    status,
                )
            )
    return rows, details


if __name__ == "__main__":
    module_main(__doc__ or "", run, {"measure": measure})
