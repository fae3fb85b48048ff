"""Profile the W1 sluiceway flow (1,000,000 records through map -> filter -> count).

    python benchmarks/profile_stateless.py              # pyinstrument (pip install pyinstrument)
    python benchmarks/profile_stateless.py --cprofile   # cProfile, top functions by self time
    python benchmarks/profile_stateless.py --sweep      # where the gap to a plain loop comes from

pyinstrument samples the stack (low overhead); cProfile counts every call, which inflates
per-record Python calls.  ``--sweep`` times (best of 3):

* the sluiceway flow at several ``max_batch_size`` values: the slope gives the engine's
  fixed cost per micro-batch;
* the same map -> filter done by hand over 1,024-record chunks, (a) dropping each mapped
  record at once as a plain loop does, (b) materialising the chunk's outputs in a list
  (what any micro-batch engine must do), (c) (b) with the filter as a mask + ``compress``
  like sluiceway's filter -- i.e. the cost of batching itself, without any engine.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import time
from collections.abc import Callable
from itertools import compress
from typing import Any

from bench_stateless import build_flow, is_large, raise_amount, run_loop_fns
from common import fmt_int, make_record

import sluiceway as sw

Record = dict[str, Any]


def _best(fn: Callable[[], object], n: int, repeats: int = 3) -> float:
    best = 0.0
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def sweep(records: list[Record]) -> None:
    n = len(records)
    chunks = [records[i : i + 1024] for i in range(0, n, 1024)]
    f, p = raise_amount, is_large

    def chunked_drop() -> int:
        kept = 0
        for c in chunks:
            for r in c:
                if p(f(r)):
                    kept += 1
        return kept

    def chunked_materialised() -> int:
        kept = 0
        for c in chunks:
            out = [f(r) for r in c]
            kept += sum(1 for r in out if p(r))
        return kept

    def chunked_mask_compress() -> int:
        kept = 0
        for c in chunks:
            out: list[Record] = []
            out.extend(map(f, iter(c)))
            mask: list[bool] = []
            mask.extend(map(p, iter(out)))
            kept += len(list(compress(out, mask)))
        return kept

    print(f"{'variant':58s} {'rec/s':>12s}")
    print(f"{'plain loop (same fns)':58s} {fmt_int(_best(lambda: run_loop_fns(records), n)):>12s}")
    for label, fn in (
        ("by hand, 1,024-chunks, each output dropped at once", chunked_drop),
        ("by hand, 1,024-chunks, outputs materialised in a list", chunked_materialised),
        ("by hand, 1,024-chunks, extend(map) + mask + compress", chunked_mask_compress),
    ):
        print(f"{label:58s} {fmt_int(_best(fn, n)):>12s}")
    for size in (16, 64, 256, 1024, 4096):

        def flow_run(size: int = size) -> None:
            flow, _ = build_flow(records)
            sw.run(flow, handle_signals=False, max_batch_size=size)

        print(f"{f'sluiceway, max_batch_size={size}':58s} {fmt_int(_best(flow_run, n)):>12s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cprofile", action="store_true", help="use cProfile, not pyinstrument")
    mode.add_argument("--sweep", action="store_true", help="batch-size and batching-cost sweep")
    args = parser.parse_args()
    records = [make_record(i) for i in range(args.records)]
    if args.sweep:
        sweep(records)
        return
    flow, sink = build_flow(records)
    gc.collect()
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        sw.run(flow, handle_signals=False)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    else:
        from pyinstrument import Profiler  # noqa: PLC0415 - optional dependency

        profiler = Profiler(interval=0.0005)
        profiler.start()
        sw.run(flow, handle_signals=False)
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False))
    print(f"counted {sink.n} of {args.records} records")


if __name__ == "__main__":
    main()
