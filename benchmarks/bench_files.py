"""LL: a file source reading one very long line (issue 13.11).

A 50 MB and a 100 MB line without a newline, read by ``sources.JsonLines`` with no line
limit (the whole line is one record) and with the default limit (10 MiB: the line is a
dead letter holding its first KiB).  Figures: seconds, peak RSS, and the longest time
the event loop was held (a ticker task records the largest gap between its turns).
Before 13.11 the buffer was copied per 64 KiB chunk: 30 s for 50 MB, 92 s and 627 MB
RSS for 100 MB, and the loop was held for all of it.  Targets: linear time (splitting
a 100 MB line takes at most 2.5x the time of a 50 MB one) and, with the limit, the loop
never held longer than 0.25 s.  Without a limit the loop is held while the one huge
value is decoded and parsed (one ``json.loads`` call cannot be split): shown, not
targeted.

Each measurement runs in a fresh child process (see common.py).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import Params, Result, Row, module_main, proc_status_kb, reset_peak_rss, run_child

import sluiceway as sw
from sluiceway.connectors.files import LineBuffer

TARGET_RATIO = 2.5
TARGET_STALL_S = 0.25


def read(params: Params) -> Result:
    """Child entry: read a file holding one ``mb`` MB line, with or without the limit."""
    mb, limited = int(params["mb"]), bool(params["limited"])
    fd, name = tempfile.mkstemp(prefix="sw-ll-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w") as f:
            f.write('"' + "x" * (mb * 1_000_000 - 2) + '"')
        reset_peak_rss()
        base = proc_status_kb("VmRSS")
        out: sw.sinks.Collect[int] = sw.sinks.Collect()
        dead: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
        flow = sw.Flow("ll")
        kwargs = {} if limited else {"max_line_bytes": None}
        flow.source(sw.sources.JsonLines(name, **kwargs), on_error=sw.DeadLetter(dead)).map(
            len
        ).sink(out)

        async def main() -> tuple[float, float]:
            stall, done = 0.0, False

            async def ticker() -> None:
                nonlocal stall
                last = time.perf_counter()
                while not done:
                    await asyncio.sleep(0)  # a benchmark measuring the real loop
                    now = time.perf_counter()
                    stall, last = max(stall, now - last), now

            tick = asyncio.ensure_future(ticker())
            t0 = time.perf_counter()
            await sw.run_async(flow)
            dt = time.perf_counter() - t0
            done = True
            await tick
            return dt, stall

        seconds, stall = asyncio.run(main())
        return {
            "mb": mb,
            "limited": limited,
            "seconds": seconds,
            "stall": stall,
            "peak_rss_mb": (proc_status_kb("VmHWM") - base) / 1024,
            "records": out.items,
            "dead_letters": len(dead.items),
        }
    finally:
        os.unlink(name)


def buffer(params: Params) -> Result:
    """Child entry: the line splitting alone -- ``LineBuffer`` fed a ``mb`` MB line in
    64 KiB chunks (the part that was quadratic), no parsing."""
    mb = int(params["mb"])
    chunk = b"x" * 65536
    n = mb * 1_000_000 // len(chunk)
    t0 = time.perf_counter()
    buf = LineBuffer()
    for _ in range(n):
        buf.feed(chunk)
        if buf.next_line() is not None:
            raise RuntimeError("a line without a newline came out complete")
    buf.feed(b"\n")
    line = buf.next_line()
    dt = time.perf_counter() - t0
    assert line is not None
    return {"mb": mb, "seconds": dt, "bytes": len(line)}


def run(quick: bool) -> tuple[list[Row], Result]:
    """LL rows: 50 and 100 MB lines, unlimited and limited."""
    sizes = (20, 40) if quick else (50, 100)
    got: dict[tuple[int, bool], Result] = {}
    for _ in range(1 if quick else 3):  # alternate, keep each case's fastest run
        for limited in (False, True):
            for mb in sizes:
                r = run_child("bench_files", "read", {"mb": mb, "limited": limited})
                if (mb, limited) not in got or r["seconds"] < got[mb, limited]["seconds"]:
                    got[mb, limited] = r
    rows: list[Row] = []
    for (mb, limited), r in got.items():
        what = "limit 10 MiB: a dead letter" if limited else "no limit: one record"
        want = {"dead_letters": 1} if limited else {"records": [mb * 1_000_000 - 2]}
        if any(r[k] != v for k, v in want.items()):
            raise RuntimeError(f"LL: wrong result {r}")
        rows.append(
            Row(
                "LL",
                f"JsonLines, one {mb} MB line, {what}",
                f"{r['seconds']:.2f} s, +{r['peak_rss_mb']:.0f} MB RSS",
                f"loop held <= {r['stall'] * 1000:.0f} ms",
                f"<= {TARGET_STALL_S * 1000:.0f} ms" if limited else "(the parse)",
                ("PASS" if r["stall"] <= TARGET_STALL_S else "FAIL") if limited else "",
            )
        )
    split = {
        mb: min(run_child("bench_files", "buffer", {"mb": mb})["seconds"] for _ in range(3))
        for mb in sizes
    }
    ratio = split[sizes[1]] / split[sizes[0]]
    rows.append(
        Row(
            "LL",
            f"LineBuffer alone, {sizes[0]} / {sizes[1]} MB line in 64 KiB chunks",
            f"{split[sizes[0]]:.3f} s / {split[sizes[1]]:.3f} s",
            f"{ratio:.2f}x",
            f"<= {TARGET_RATIO:g}x (linear)",
            "PASS" if ratio <= TARGET_RATIO else "FAIL",
        )
    )
    raw = {f"{mb}MB{'-limited' if lim else ''}": r for (mb, lim), r in got.items()}
    return rows, {**raw, "split_seconds": split}


if __name__ == "__main__":
    module_main(__doc__, run, {"read": read, "buffer": buffer})
