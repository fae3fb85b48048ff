"""``map_in_processes``: a function on every core, in order, bounded, with the error
policy, barriers that wait for the pieces in flight, and no worker outliving its flow.

The checkpoint equivalence (crashes and restarts give the output of one run) is in
test_checkpoints.py (``map_in_processes`` in its FLOWS); the speed-up is a benchmark
(benchmarks/bench_processes.py), never a timed assertion here.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import process_fns
import sluiceway as sw
from sluiceway.core.messages import Barrier, Batch, Control, Watermark
from sluiceway.metrics.registry import OperatorMetrics
from sluiceway.operators.base import BuildContext, Step
from sluiceway.operators.errors import ErrorHandler
from sluiceway.operators.processes import ProcessMapSpec, WorkerTraceback, pickled_function
from sluiceway.testing import run_watched

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("max_batch_size", [1, 7, 1024])
def test_results_equal_map_and_keep_input_order(max_batch_size: int) -> None:
    """Even records take much longer, so pieces finish out of order; the output does not."""
    items = list(range(300))
    got = sw.testing.run_collect(
        lambda s: s.map_in_processes(process_fns.late_first, workers=2, max_in_flight=3),
        items,
        max_batch_size=max_batch_size,
    )
    assert got == [process_fns.late_first(x) for x in items]


def test_keys_and_event_time_travel_with_the_results() -> None:
    flow = sw.Flow("keys")
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    (
        flow.source(sw.sources.Iterable(list(range(40))))
        .with_timestamps(lambda x: 1000.0 + x)
        .key_by(lambda x: x % 3)
        .map_in_processes(process_fns.square, workers=2)
        .window(sw.windows.Tumbling(10))
        .aggregate(sw.agg.sum(lambda v: v))
        .map(lambda w: (w.key, w.start, w.value))
        .sink(out)
    )
    sw.testing.run_flow(flow, max_batch_size=5)
    want: dict[tuple[int, float], int] = {}
    for x in range(40):
        k = (x % 3, 1000.0 + (x // 10) * 10)
        want[k] = want.get(k, 0) + x * x
    assert sorted(out.items) == sorted((k, s, v) for (k, s), v in want.items())


class _Recorder(Step):
    """Records what reaches it: record values and control messages, in order."""

    def __init__(self) -> None:
        super().__init__("recorder", OperatorMetrics("recorder", "sink", 0))
        self.seen: list[Any] = []

    async def push(self, batch: Batch) -> None:
        self.seen.extend(batch.values)

    async def control(self, message: Control) -> None:
        self.seen.append(message)


def test_no_record_overtakes_a_barrier_or_a_watermark() -> None:
    """Pieces before a barrier finish after pieces behind it (even records are slow); the
    barrier leaves after every record before it and before any record after it."""

    async def main() -> list[Any]:
        clock = sw.SystemClock()
        metrics = OperatorMetrics("rows", "map_in_processes", 0)
        errors = ErrorHandler(
            sw.Fail(),
            flow="f",
            operator="rows",
            clock=clock,
            metrics=metrics,
            dead_letters={},
            rng=random.Random(0),
        )
        fn = process_fns.late_first
        spec = ProcessMapSpec(
            fn, pickled_function(fn, "test"), workers=2, max_in_flight=8, on_error=sw.Fail()
        )
        step = spec.build(BuildContext("f", "rows", clock, metrics, errors, 1024))
        rec = _Recorder()
        step.children.append(rec)
        try:
            await step.push(Batch([0, 2]))  # two slow pieces
            await step.control(Barrier(1))
            await step.push(Batch([1, 3]))  # two fast pieces, done first
            await step.control(Watermark(5.0))
            await step.push(Batch([4, 5, 6]))
            await step.finish()
        finally:
            step.close()
        return rec.seen

    seen = asyncio.run(main())
    assert seen == [0, 20, Barrier(1), 10, 30, Watermark(5.0), 40, 50, 60]


def test_a_lambda_is_refused_when_the_flow_is_built_naming_it() -> None:
    flow = sw.Flow("lam")
    s = flow.source(sw.sources.Iterable([1]))
    lambda_refused = (
        r"fn '.*<lambda>' \(defined at test_process_map.py:\d+\) cannot be pickled"
        r".*top level of a module"
    )
    with pytest.raises(TypeError, match=lambda_refused):
        s.map_in_processes(lambda x: x)

    def nested(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"nested.*cannot be pickled"):
        s.map_in_processes(nested)
    with pytest.raises(ValueError, match=r"workers=\.\.\.\) must be >= 1, got 0"):
        s.map_in_processes(process_fns.square, workers=0)
    with pytest.raises(TypeError, match=r"max_in_flight=\.\.\.\) must be an int"):
        s.map_in_processes(process_fns.square, max_in_flight=1.5)  # type: ignore[arg-type]


def test_failed_records_are_dead_lettered_with_the_record_and_the_others_go_on() -> None:
    dead: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    got = sw.testing.run_collect(
        lambda s: s.map_in_processes(
            process_fns.fail_on_sevens, workers=2, on_error=sw.DeadLetter(dead)
        ),
        list(range(1, 50)),
        max_batch_size=10,
    )
    assert got == [x + 1 for x in range(1, 50) if x % 7]
    assert [d.record for d in dead.items] == [7, 14, 21, 28, 35, 42, 49]
    assert all(d.error_type == "ValueError" for d in dead.items)
    assert dead.items[0].error_message == "no sevens: 7"


def test_retries_run_in_a_worker_then_dead_letter() -> None:
    dead: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    policy = sw.Retry(3, then=sw.DeadLetter(dead))
    got = sw.testing.run_collect(
        lambda s: s.map_in_processes(process_fns.fail_on_sevens, workers=2, on_error=policy),
        list(range(1, 10)),
    )
    assert got == [x + 1 for x in range(1, 10) if x != 7]
    assert [(d.record, d.attempts) for d in dead.items] == [(7, 3)]


def test_a_failure_under_fail_names_the_record_with_the_worker_traceback() -> None:
    with pytest.raises(sw.OperatorError) as info:
        sw.testing.run_collect(
            lambda s: s.map_in_processes(process_fns.fail_on_sevens, workers=2),
            list(range(1, 10)),
        )
    err = info.value
    assert err.record == 7
    assert "no sevens: 7" in str(err)
    cause = err.__cause__
    assert isinstance(cause, ValueError)
    assert isinstance(cause.__cause__, WorkerTraceback)
    assert "fail_on_sevens" in cause.__cause__.text


def test_a_worker_that_dies_fails_its_piece_and_a_fresh_pool_goes_on() -> None:
    dead: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    got = sw.testing.run_collect(
        lambda s: s.map_in_processes(
            process_fns.die_on_13, workers=2, on_error=sw.DeadLetter(dead)
        ),
        list(range(40)),
        max_batch_size=4,
    )
    # The piece holding 13 went to the dead letters, every record of it, as itself.
    lost = [d.record for d in dead.items]
    assert 13 in lost
    assert "worker process" in dead.items[0].error_message
    assert sorted(got + [x + 1 for x in lost]) == [x + 1 for x in range(40)]
    assert got == sorted(got)


def test_records_and_results_that_cannot_be_pickled_go_to_the_error_policy() -> None:
    dead: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    lock = threading.Lock()  # a record that cannot be pickled
    got = sw.testing.run_collect(
        lambda s: s.map_in_processes(
            process_fns.lambda_result, workers=2, on_error=sw.DeadLetter(dead)
        ),
        [1, 2, 3, lock, 5],
    )
    assert got == [1, 3, 5]
    # (pieces recover side by side: dead letters of two pieces may come in either order)
    why = {id(d.record): d.error_message for d in dead.items}
    assert sorted(why) == sorted([id(2), id(lock)])
    assert "result of fn cannot be pickled" in why[id(2)]
    assert "record cannot be pickled" in why[id(lock)]


@pytest.mark.slow
def test_pieces_in_flight_are_bounded_on_the_real_clock(tmp_path: Path) -> None:
    """Record 0 hangs in a worker while the others finish: their results wait behind it
    and count, so no more than max_in_flight pieces are ever sent."""
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("bounded", channel_capacity=2)
    (
        flow.source(sw.sources.Iterable([(str(tmp_path), i) for i in range(30)]))
        .map_in_processes(process_fns.hold_zero, workers=2, max_in_flight=3)
        .sink(out)
    )
    started: list[int] = []

    async def during(handle: sw.FlowHandle) -> None:
        for _ in range(600):  # the workers start (slowly on a loaded machine)
            if len(os.listdir(tmp_path)) >= 3:
                break
            await handle.clock.sleep(0.05)
        await handle.clock.sleep(1.0)  # time for a 4th piece to start, if one could
        started.extend(sorted(int(name.split(".")[0]) for name in os.listdir(tmp_path)))
        with open(tmp_path / "release", "w"):  # noqa: ASYNC230 - a tiny local file
            pass
        await handle.wait()

    run_watched(flow, during=during, max_batch_size=1, grace_period=5.0)
    assert started == [0, 1, 2]
    assert out.items == list(range(30))


@pytest.mark.slow
def test_a_flow_cancelled_mid_piece_kills_its_workers_without_blocking(tmp_path: Path) -> None:
    """The grace period runs out while a piece hangs in a worker: the flow is cancelled,
    the workers (which ignore SIGTERM) are killed, and the event loop never stalls
    (the watchdog) -- closing the pool used to wait for its processes on the loop."""
    flow = sw.Flow("hung")
    (
        flow.source(sw.sources.Iterable([str(tmp_path)] * 2))
        .map_in_processes(process_fns.hang, workers=2)
        .sink(sw.sinks.Collect())
    )

    async def until_both_hang(handle: sw.FlowHandle) -> None:
        for _ in range(600):  # the workers start (slowly on a loaded machine)
            if len(os.listdir(tmp_path)) >= 2:
                return
            await handle.clock.sleep(0.05)

    with pytest.raises(sw.FlowCancelledError):
        run_watched(flow, during=until_both_hang, grace_period=0.5, max_batch_size=1)
    pids = [int(name) for name in os.listdir(tmp_path)]
    assert pids
    assert _gone_within(pids, 5.0), [pid for pid in pids if _alive(pid)]


# -- no orphans: Ctrl-C, SIGTERM, SIGKILL --------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _start_child() -> tuple[subprocess.Popen[str], list[int]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE)])}
    p = subprocess.Popen(
        [sys.executable, str(HERE / "process_pool_child.py")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: a Ctrl-C reaches it and its workers
    )
    assert p.stdout is not None
    pids: list[int] = []
    while len(pids) < 2:
        line = p.stdout.readline()
        assert line, f"the child ended early: {p.communicate(timeout=10)}"
        pids.append(int(line.split()[1]))
    return p, pids


def _gone_within(pids: list[int], seconds: float) -> bool:
    for _ in range(int(seconds * 20)):
        if not any(_alive(pid) for pid in pids):
            return True
        threading.Event().wait(0.05)
    return False


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_signal_stops_the_flow_and_its_workers_with_it(how: str) -> None:
    p, pids = _start_child()
    if how == "ctrl-c":
        os.killpg(p.pid, signal.SIGINT)  # as a terminal does: the whole group
    else:
        p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "stopped" in out
    assert "Traceback" not in err  # no KeyboardInterrupt from a worker either
    assert _gone_within(pids, 5.0), [pid for pid in pids if _alive(pid)]


def test_workers_exit_when_the_flow_process_is_killed() -> None:
    p, pids = _start_child()
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    assert _gone_within(pids, 10.0), [pid for pid in pids if _alive(pid)]
