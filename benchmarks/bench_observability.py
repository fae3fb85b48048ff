"""OBS: what watching a flow costs -- W1 and W2 with the Prometheus exporter serving (no
scraper) and with the live view redrawing once a second (to /dev/null), against the same
flows with no monitor (the registry's counters are always kept: one increment per batch
per operator, which is its cheapest mode).

Best of ``repeats`` runs each, interleaved (every round runs each variant once, in a
rotated order), each preceded by ``gc.collect()``.  Target (issue 7): overhead <= 5 %.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from typing import Any

import bench_stateless
import bench_windows
from common import Params, Result, Row, child_main, fmt_int, run_child

import sluiceway as sw
from sluiceway.console import LiveView
from sluiceway.metrics.prometheus import PrometheusExporter

TARGET = 0.05


def _monitor(kind: str) -> Any:
    if kind == "none":
        return None
    if kind == "prometheus":
        return PrometheusExporter(0)
    stream = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - closed by the GC at exit
    return LiveView(stream, interval=1.0, live=True, width=120)


def _w1(records: list[Any]) -> Callable[[Any], float]:
    def once(monitor: Any) -> float:
        flow, _ = bench_stateless.build_flow(records)
        t0 = time.perf_counter()
        sw.run(flow, monitor=monitor, handle_signals=False)
        return len(records) / (time.perf_counter() - t0)

    return once


def _w2(events: list[Any]) -> Callable[[Any], float]:
    def once(monitor: Any) -> float:
        flow = bench_windows.build_sluiceway("W2", events, bench_windows.Checksum())
        t0 = time.perf_counter()
        sw.run(flow, monitor=monitor, handle_signals=False)
        return len(events) / (time.perf_counter() - t0)

    return once


def measure(params: Params) -> Result:
    n, repeats = params["records"], params["repeats"]
    workloads = {
        "W1": _w1([bench_stateless.make_record(i) for i in range(n)]),
        "W2": _w2(bench_windows.make_events(n)),
    }
    kinds = ["none", "prometheus", "live view"]
    best: dict[str, dict[str, float]] = {w: dict.fromkeys(kinds, 0.0) for w in workloads}
    for r in range(repeats):
        order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
        for name, once in workloads.items():
            for kind in order:
                gc.collect()
                best[name][kind] = max(best[name][kind], once(_monitor(kind)))
    return {"records": n, "best": best}


def run(quick: bool) -> tuple[list[Row], Result]:
    """Run OBS in a child process; the table rows."""
    params = {"records": 100_000 if quick else 1_000_000, "repeats": 3 if quick else 5}
    res = run_child("bench_observability", "measure", params)
    rows = []
    for wl, rates in res["best"].items():
        label = f"OBS {wl} with monitors ({fmt_int(res['records'])} rec)"
        base = rates["none"]
        rows.append(Row(label, "no monitor", f"{fmt_int(base)} rec/s", "1.00"))
        for kind in ("prometheus", "live view"):
            overhead = 1 - rates[kind] / base
            rows.append(
                Row(
                    label,
                    f"{kind} (no scraper)" if kind == "prometheus" else f"{kind}, 1 s refresh",
                    f"{fmt_int(rates[kind])} rec/s",
                    f"{overhead:+.1%} overhead",
                    f"<= {TARGET:.0%}",
                    "PASS" if overhead <= TARGET else "FAIL",
                )
            )
    return rows, res


if __name__ == "__main__":
    child_main({"measure": measure})
