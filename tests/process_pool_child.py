"""A flow with ``map_in_processes`` that runs until it is signalled (run as a subprocess
by test_process_map.py).  It prints ``pid <n>`` for every worker process it sees, so the
test can check that none outlives it.

Usage: process_pool_child.py
"""

from __future__ import annotations

import itertools
import sys

import process_fns
import sluiceway as sw


def build() -> sw.Flow:
    seen: set[int] = set()

    def report(pid: int) -> None:
        if pid not in seen:
            seen.add(pid)
            print(f"pid {pid}", flush=True)

    flow = sw.Flow("pool-child")
    (
        flow.source(sw.sources.Generator(itertools.count, rate=2000), name="numbers")
        .map_in_processes(process_fns.pid_of, workers=2, name="pids")
        .sink(sw.sinks.Function(report), name="report")
    )
    return flow


if __name__ == "__main__":
    sw.run(build(), grace_period=5.0)
    print("stopped", flush=True)
    sys.exit(0)
