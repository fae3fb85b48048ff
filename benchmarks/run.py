"""Run every sluiceway core benchmark and print one results table.

    python benchmarks/run.py            # the full suite (~25 min; figures in RESULTS.md)
    python benchmarks/run.py --quick    # smaller sizes and durations, ~5 min (smoke test)
    python benchmarks/run.py --only W2  # one workload (see --help); may be repeated
    python benchmarks/run.py --json out.json   # also write every raw figure

Workloads: W1 stateless map/filter, BP backpressure memory, LAT end-to-end latency, and the
event-time windows W2 (tumbling), W3 (sliding) and W4 (session), which are compared with a
plain Python loop and, when installed (``pip install -e '.[bench]'``), with Bytewax.
W2-mem, W3-mem and W4-mem measure the memory the same window computations add at scale
(100,000 users, ~10^5 open windows), for the plain loop and sluiceway.  J1, J2, J3: the
window, interval and as-of joins against a plain hand-written join loop.  K1-K3: keyed
``stateful_map`` / ``process`` (value states, event-time timers) against a plain loop doing
the same work, with and without change tracking; K4: a whole keyed-state snapshot against a
change set; D1: keyed state on disk (``sw.state.OnDisk``) against the in-memory dict
at 2,000,000 and 20,000,000 keys (throughput, peak RSS).  IO, RL, RRL:
map_async and the rate limiters (local, Redis); OBS: the cost of the exporter and the live
view; CK: checkpoints' overhead on W2 and the restore of 100,000 keys; LL: a file source
reading one 50 / 100 MB line (time, memory, how long the loop is held); RS, NATS, RMQ,
MQTT, PG, KAFKA: each broker connector end to end against the raw client library doing the
same batched loop, on the real servers (KAFKA also the cost of exactly-once); LH: the
Parquet, Delta Lake and Iceberg sinks against pyarrow, deltalake and pyiceberg used directly.

Each measurement runs in its own child process (see ``common.run_child``).  Run it on an
otherwise idle machine: the workloads are single-threaded, but a busy second core still
disturbs timer wake-ups and therefore the latency figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import bench_async_io
import bench_backpressure
import bench_checkpoints
import bench_disk
import bench_files
import bench_joins
import bench_kafka
import bench_keyed
import bench_lakehouse
import bench_latency
import bench_limiters
import bench_mqtt
import bench_nats
import bench_observability
import bench_postgres
import bench_rabbitmq
import bench_redis_limiter
import bench_redis_streams
import bench_stateless
import bench_windows
from common import Result, Row, render_table

Workload = Callable[[bool], tuple[list[Row], Result]]


WORKLOADS: dict[str, Workload] = {
    "W1": bench_stateless.run,
    "BP": bench_backpressure.run,
    "LAT": bench_latency.run,
    "W2": bench_windows.run_w2,
    "W3": bench_windows.run_w3,
    "W4": bench_windows.run_w4,
    "W2-mem": bench_windows.run_w2_mem,
    "W3-mem": bench_windows.run_w3_mem,
    "W4-mem": bench_windows.run_w4_mem,
    "J1": bench_joins.run_j1,
    "J2": bench_joins.run_j2,
    "J3": bench_joins.run_j3,
    "K1": bench_keyed.run_k1,
    "K2": bench_keyed.run_k2,
    "K3": bench_keyed.run_k3,
    "K4": bench_keyed.run_k4,
    "D1": bench_disk.run,
    "IO": bench_async_io.run,
    "RL": bench_limiters.run,
    "RRL": bench_redis_limiter.run,
    "OBS": bench_observability.run,
    "CK": bench_checkpoints.run,
    "LL": bench_files.run,
    "PG": bench_postgres.run,
    "RMQ": bench_rabbitmq.run,
    "MQTT": bench_mqtt.run,
    "NATS": bench_nats.run,
    "RS": bench_redis_streams.run,
    "LH": bench_lakehouse.run,
    "KAFKA": bench_kafka.run,
}


def code_version() -> str:
    """The checkout measured: ``git rev-parse --short HEAD``, ``+ local changes`` when
    ``src/`` differs from it (read-only: ``--no-optional-locks`` leaves the index alone)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        cmd = ["git", "--no-optional-locks", "-C", str(root), *args]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "src")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit} + local changes in src/" if dirty else commit


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = "unknown"
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
                    break
    except OSError:
        pass
    return {
        "commit": code_version(),
        "date": datetime.date.today().isoformat(),
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a ~75 s smoke run")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(WORKLOADS),
        help="run only these workloads: W1 stateless, BP backpressure, LAT latency, "
        "W2/W3/W4 tumbling/sliding/session windows, W2-mem/W3-mem/W4-mem their memory at "
        "scale, J1/J2/J3 window/interval/as-of joins, K1/K2/K3 keyed state, K4 keyed "
        "snapshots, IO map_async, RL/RRL rate limiters, "
        "OBS monitoring overhead, CK checkpoints, LL a long line in a file, "
        "RS/NATS/RMQ/MQTT/PG/KAFKA broker connectors, LH lakehouse sinks (repeat --only for "
        "several)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every raw figure as JSON")
    args = parser.parse_args(argv)

    info = machine()
    print(
        f"sluiceway benchmarks ({'quick' if args.quick else 'full'}) - {info['date']}, "
        f"{info['cpus']} CPUs ({info['cpu']}), {info['ram']} RAM, {info['python']}, "
        f"code {info['commit']}",
        flush=True,
    )
    rows: list[Row] = []
    raw: dict[str, object] = {"machine": info, "quick": args.quick}
    t0 = time.monotonic()
    for name in args.only or list(WORKLOADS):
        started = time.monotonic()
        print(f"  {name} ...", end="", flush=True)
        got, details = WORKLOADS[name](args.quick)
        print(f" {time.monotonic() - started:.1f} s", flush=True)
        rows += got
        raw[name] = details
    print()
    print(render_table(rows))
    failed = [r for r in rows if r.status == "FAIL"]
    print(
        f"\n{sum(r.status == 'PASS' for r in rows)} passed, {len(failed)} failed "
        f"in {time.monotonic() - t0:.1f} s"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
