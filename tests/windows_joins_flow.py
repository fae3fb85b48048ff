"""A flow of every window and join operator, for the checkpoint tests of their change sets
(tests/test_checkpoint_windows_joins.py) and for the checkpoint fixture written by an
earlier sluiceway (tests/data/ckpt_whole_windows_joins.tar.xz, made by ``python
tests/windows_joins_flow.py DIR`` on that version's code).

Two paced keyed inputs (left and right, with pauses so that sessions close) feed
tumbling windows with allowed lateness, sliding windows, session windows, a window join
(tumbling and session), an interval join, an as-of join and the processing-time temporal
join, each into an exactly-once JSON Lines sink of its own under ``out``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import sluiceway as sw

N = 3000
RATE = 1000  # records per second of each input, on the virtual clock
OUTPUTS = ("tumbling", "sliding", "sessions", "wjoin", "sjoin", "ijoin", "asof", "latest")


def rows(first_id: int, n: int = N) -> list[dict[str, Any]]:
    """Records a millisecond apart with a jitter, and a pause of half a second after every
    500 (so sessions close); key ``id % 499`` (a checkpoint interval of 100 records
    changes a fifth of the keys: change sets, not whole states)."""
    out = []
    for i in range(n):
        jitter = ((i * 7919) % 37) / 1000  # up to 36 ms out of order
        t = round(i / 1000 + (i // 500) * 0.5 + jitter, 6)
        out.append({"id": first_id + i, "k": i % 499, "t": t})
    return out


def ids(pair: Any) -> list[int]:
    a, b = pair
    return [-1 if a is None else a["id"], -1 if b is None else b["id"]]


def window_row(w: Any) -> dict[str, Any]:
    return {"k": w.key, "start": w.start, "end": w.end, "value": w.value, "kind": w.kind}


def build(out: Path, n: int = N) -> sw.Flow:
    out.mkdir(parents=True, exist_ok=True)
    flow = sw.Flow("winjoin")

    def side(name: str, data: list[dict[str, Any]]) -> Any:
        return (
            flow.source(sw.sources.Generator(lambda: iter(data), rate=RATE), name=name)
            .with_timestamps(lambda r: r["t"], max_out_of_orderness=0.05, name=f"{name}_ts")
            .key_by(lambda r: r["k"], name=f"{name}_key")
        )

    left, right = side("left", rows(0, n)), side("right", rows(100_000, n))

    def sink(stream: Any, name: str) -> None:
        stream.sink(sw.sinks.JsonLines(out / f"{name}.jsonl"), name=f"{name}_out")

    windows = {
        "tumbling": left.window(sw.windows.Tumbling(0.5), allowed_lateness=0.02).aggregate(
            n=sw.agg.count(), ids=sw.agg.collect(lambda r: r["id"]), name="tumbling"
        ),
        "sliding": left.window(sw.windows.Sliding(1.0, 0.25)).aggregate(
            sw.agg.sum(lambda r: r["id"]), name="sliding"
        ),
        "sessions": right.window(sw.windows.Session(gap=0.6), allowed_lateness=0.02).aggregate(
            n=sw.agg.count(), mean=sw.agg.mean(lambda r: r["id"]), name="sessions"
        ),
    }
    for name, stream in windows.items():
        sink(stream.map(window_row, name=f"{name}_row"), name)
    joins = {
        "wjoin": left.window_join(right, sw.windows.Tumbling(0.5), how="full", name="wjoin"),
        "sjoin": left.window_join(right, sw.windows.Session(gap=0.6), name="sjoin"),
        "ijoin": left.interval_join(right, lower=-0.3, upper=0.3, how="left", name="ijoin"),
        "asof": left.asof_join(right, tolerance=1.0, name="asof"),
        "latest": left.temporal_join(right, time="processing", how="left", name="latest"),
    }
    for name, stream in joins.items():
        sink(stream.map(ids, name=f"{name}_ids"), name)
    return flow


async def run_until(flow: sw.Flow, ckpt: sw.Checkpoints, crash_at: float | None) -> bool:
    """Run ``flow`` on a virtual clock; at ``crash_at`` seconds force it to stop (a crash:
    no final checkpoint).  True when it was stopped before its end."""
    clock = sw.VirtualClock()
    handle = sw.start(flow, clock=clock, checkpoints=ckpt)
    if crash_at is not None:
        await clock.sleep(crash_at)
        if not handle.done():
            handle.force_stop("simulated crash")
            try:
                await handle.wait()
            except sw.FlowCancelledError:
                return True
    await handle.wait()
    return False


def main() -> None:
    """``windows_joins_flow.py DIR``: run the flow with checkpoints in DIR/ckpt and its
    outputs in DIR/out, crashing it 0.9 s into the run (with this sluiceway's code: the
    fixture of an earlier version's checkpoint, kept as ``tar cJf`` of DIR).  The key
    comes from the environment."""
    work = Path(sys.argv[1])
    os.chdir(work)  # relative paths: the fixture can be copied anywhere
    asyncio.run(run_until(build(Path("out")), sw.Checkpoints("ckpt", interval=0.1), 0.9))


if __name__ == "__main__":
    main()
