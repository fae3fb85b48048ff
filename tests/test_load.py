"""Load signals and LoadPolicy: pure decisions, injected signals on the virtual clock, and a
CPU-heavy operator on the real clock."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

import sluiceway as sw
from sluiceway.flowcontrol import (
    LimitRate,
    LoadPolicy,
    LoadRule,
    RejectAdmission,
    ShrinkFetch,
    WantMoreInstances,
)
from sluiceway.flowcontrol.load import LoadController
from sluiceway.metrics.prometheus import FlowCollector
from sluiceway.metrics.web import flow_graph, flow_state
from sluiceway.testing import run_watched

# -- the pure part --------------------------------------------------------------------------


def test_rules_switch_once_with_hysteresis_and_the_tightest_effect_wins() -> None:
    shrink = LoadRule("cpu", above=0.8, below=0.6, action=ShrinkFetch(0.5))
    tighter = LoadRule("loop_lag", above=0.1, action=ShrinkFetch(0.1, min_records=8))
    slow = LoadRule("queue_delay", above=1.0, action=LimitRate(50, burst=5))
    slower = LoadRule("latency_p99", above=2.0, action=LimitRate(10))
    ctl = LoadController(LoadPolicy([shrink, tighter, slow, slower]))
    assert ctl.update({"cpu": 0.8}) == []  # not above
    assert ctl.update({"cpu": 0.81}) == [(shrink, True)]
    assert ctl.update({"cpu": 0.7}) == []  # between below and above: stays on
    assert ctl.effects(1000).fetch_cap == 500
    assert ctl.update({"loop_lag": 0.5, "queue_delay": 3.0, "latency_p99": 2.5}) == [
        (tighter, True),
        (slow, True),
        (slower, True),
    ]
    e = ctl.effects(1000)
    assert (e.fetch_cap, e.rate, e.burst) == (100, 10.0, 1)
    assert ctl.effects(40).fetch_cap == 8  # min_records
    assert ctl.update({"cpu": 0.6, "latency_p99": float("nan")}) == [(shrink, False)]
    assert ctl.decisions == 5
    assert ctl.update({}) == []  # no value: nothing changes


def test_bad_rules_are_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match=r"signal must be one of 'cpu'.*got 'ram'"):
        LoadRule("ram", above=1, action=WantMoreInstances())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"below \(2\) must be <= above \(1\)"):
        LoadRule("cpu", above=1, below=2, action=WantMoreInstances())
    with pytest.raises(TypeError, match="action must be ShrinkFetch"):
        LoadRule("cpu", above=1, action="shrink")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"factor must be in \(0, 1\), got 2"):
        ShrinkFetch(2)
    with pytest.raises(ValueError, match="rate must be > 0 records/s, got 0"):
        LimitRate(0)
    with pytest.raises(ValueError, match="interval must be > 0 seconds, got 0"):
        LoadPolicy([], interval=0)
    with pytest.raises(ValueError, match="unknown signal 'ram'"):
        LoadPolicy([], probes={"ram": lambda: 1.0})
    with pytest.raises(TypeError, match=r"load must be sw\.LoadPolicy"):
        sw.start(sw.Flow("x"), load=[1])  # type: ignore[arg-type]


# -- injected signals, virtual clock --------------------------------------------------------


class Counting(sw.sources.Source):
    """Endless; records each pull's ``max_records`` and the clock; 0.05 s per pull."""

    def __init__(self) -> None:
        self.asks: list[tuple[float, int]] = []
        self.clock: sw.Clock | None = None
        self.n = 0

    async def open(self, ctx: sw.sources.SourceContext) -> None:
        self.clock = ctx.clock

    async def next_batch(self, max_records: int) -> sw.Batch | None:
        assert self.clock is not None
        self.asks.append((self.clock.monotonic(), max_records))
        await self.clock.sleep(0.05)
        self.n += max_records
        return sw.Batch(list(range(max_records)))


class Schedule:
    """A signal that follows ``[(from_time, value), ...]`` on the clock."""

    def __init__(self, clock: sw.Clock, steps: list[tuple[float, float]]) -> None:
        self.clock = clock
        self.steps = steps

    def __call__(self) -> float:
        now = self.clock.monotonic()
        return [v for t, v in self.steps if t <= now][-1]


def _run_for(flow: sw.Flow, clock: sw.VirtualClock, seconds: float, **kw: Any) -> sw.RunResult:
    async def main() -> sw.RunResult:
        handle = sw.start(flow, clock=clock, **kw)
        await clock.sleep(seconds)
        return await handle.stop()

    return asyncio.run(main())


def test_cpu_above_80_percent_shrinks_the_fetch_size_and_logs_each_switch_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = sw.VirtualClock()
    cpu = Schedule(clock, [(0.0, 0.5), (2.0, 0.93), (4.0, 0.3)])
    source = Counting()
    flow = sw.Flow("shrink")
    flow.source(source).sink(sw.sinks.Function(lambda x: None, batched=True))
    rule = LoadRule("cpu", above=0.8, action=ShrinkFetch(0.25))
    policy = LoadPolicy([rule], interval=0.5, probes={"cpu": cpu})
    with caplog.at_level(logging.INFO, logger="sluiceway"):
        result = _run_for(flow, clock, 6.0, load=policy, max_batch_size=400)
    # checks at 0.5, 1.0, ...: on at the check of t=2.0, off at the check of t=4.0
    asks = dict(source.asks)
    assert {n for t, n in source.asks if t < 2.0} == {400}
    assert {n for t, n in source.asks if 2.0 < t < 4.0} == {100}
    assert {n for t, n in source.asks if t > 4.0} == {400}
    assert asks
    lines = [r.getMessage() for r in caplog.records if "load rule" in r.getMessage()]
    assert lines == [
        "flow 'shrink': load rule 'cpu > 0.8 -> shrink fetch x0.25' on (cpu = 0.93)",
        "flow 'shrink': load rule 'cpu > 0.8 -> shrink fetch x0.25' off (cpu = 0.3)",
    ]
    load = result.metrics.load
    assert load is not None
    assert load.decisions == 2
    assert load.active == ()
    assert load.signals["cpu"] == 0.3


def test_queue_delay_over_a_second_switches_a_rate_limit_on() -> None:
    clock = sw.VirtualClock()
    delay = Schedule(clock, [(0.0, 0.0), (1.0, 1.5), (3.0, 0.2)])
    source = Counting()
    flow = sw.Flow("limit")
    flow.source(source).sink(sw.sinks.Function(lambda x: None, batched=True))
    policy = LoadPolicy(
        [LoadRule("queue_delay", above=1.0, action=LimitRate(20, burst=2))],
        interval=0.5,
        probes={"queue_delay": delay},
    )
    _run_for(flow, clock, 4.0, load=policy, max_batch_size=100)
    during = [(t, n) for t, n in source.asks if 1.0 < t <= 3.0]
    # at most rate * t + burst records were asked for while the rule held
    assert sum(n for _, n in during) <= 20 * 2.0 + 2
    assert {n for _, n in during} == {2}
    assert {n for t, n in source.asks if t > 3.1} == {100}


def test_reject_admission_and_want_more_instances_are_published() -> None:
    async def main() -> None:
        clock = sw.VirtualClock()
        p99 = Schedule(clock, [(0.0, 0.01), (1.0, 3.0)])
        gcs = Schedule(clock, [(0.0, 0.0), (1.0, 12.0)])
        inbox: sw.sources.Push[int] = sw.sources.Push(capacity=10)
        flow = sw.Flow("shed")
        flow.source(inbox, name="inbox").sink(sw.sinks.Collect(), name="out")
        policy = LoadPolicy(
            [
                LoadRule("latency_p99", above=2.0, action=RejectAdmission()),
                LoadRule("gc_per_minute", above=5, action=WantMoreInstances()),
            ],
            interval=0.5,
            probes={"latency_p99": p99, "gc_per_minute": gcs},
        )
        handle = sw.start(flow, clock=clock, load=policy)
        assert inbox.offer(1)
        await clock.sleep(1.2)
        assert not inbox.offer(2)
        assert inbox.refusal == "shedding load: latency_p99 3 > 2"
        snap = handle.metrics()
        assert snap.load is not None
        assert snap.load.wants_more_instances
        assert snap.load.shedding == "latency_p99 3 > 2"
        registry = CollectorRegistry()
        registry.register(FlowCollector(handle.metrics))
        text = generate_latest(registry).decode()
        assert 'sluiceway_wants_more_instances{flow="shed"} 1.0' in text
        assert 'sluiceway_admission_shedding{flow="shed"} 1.0' in text
        assert 'sluiceway_load_signal{flow="shed",signal="gc_per_minute"} 12.0' in text
        assert (
            'sluiceway_load_rule_active{flow="shed",rule="gc_per_minute > 5 -> want more '
            'instances"} 1.0'
        ) in text
        doc = flow_state(flow_graph(flow), snap, None)
        assert doc["load"] is not None
        assert doc["load"]["wants_more_instances"]
        assert "latency_p99 > 2 -> reject admission" in doc["load"]["active"]
        await handle.stop()

    asyncio.run(main())


def test_measured_signals_queue_delay_from_a_stalled_channel() -> None:
    async def main() -> None:
        clock = sw.VirtualClock()
        gate = asyncio.Event()

        async def held(x: int) -> None:
            await gate.wait()

        flow = sw.Flow("measured")
        (
            flow.source(sw.sources.Iterable(range(100)))
            .buffer(10, name="buf")
            .sink(sw.sinks.Function(held), name="out")
        )
        policy = LoadPolicy([], interval=1.0)
        handle = sw.start(flow, clock=clock, load=policy)
        await clock.sleep(3.5)
        snap = handle.metrics().load
        assert snap is not None
        assert set(snap.signals) == {
            "cpu",
            "loop_lag",
            "queue_delay",
            "latency_p99",
            "gc_per_minute",
        }
        # the channel has been full and has not moved since t=0 (the sink took one record
        # then): 3 s, measured to within one interval
        assert 2.0 <= snap.signals["queue_delay"] <= 3.0
        assert snap.signals["loop_lag"] == 0.0  # the virtual clock is never late
        gate.set()
        await handle.stop()

    asyncio.run(main())


# -- the real clock -------------------------------------------------------------------------


def _burn(x: int) -> int:
    total = 0
    for i in range(20_000):  # a couple of milliseconds of pure CPU per record
        total += i * i
    return x + total % 2


@pytest.mark.slow
def test_a_cpu_heavy_operator_on_the_real_clock_trips_the_cpu_rule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The machine is shared: this process may get a fraction of a core, so the threshold
    # is low; an idle flow would measure about 0.
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("rt_cpu")
    flow.source(sw.sources.Generator(lambda: iter(range(10**9)))).map(_burn).sink(out)
    policy = LoadPolicy(
        [LoadRule("cpu", above=0.05, action=ShrinkFetch(0.5))],
        interval=0.25,
    )
    seen: list[sw.FlowSnapshot] = []

    async def watch(handle: sw.FlowHandle) -> None:
        for _ in range(6):
            await handle.clock.sleep(0.25)
            seen.append(handle.metrics())

    with caplog.at_level(logging.WARNING, logger="sluiceway"):
        result = run_watched(flow, during=watch, max_batch_size=8, load=policy)
    assert result.stopped
    assert len(out.items) > 0
    loads = [s.load for s in seen if s.load is not None and s.load.active]
    assert loads, f"the cpu rule never held: {[s.load for s in seen]}"
    assert loads[0].active == ("cpu > 0.05 -> shrink fetch x0.5",)
    assert loads[0].signals["cpu"] > 0.05
    assert loads[0].fetch_cap == 4
    switched = "load rule 'cpu > 0.05 -> shrink fetch x0.5' on"
    assert any(switched in r.getMessage() for r in caplog.records)


def test_a_flow_with_a_load_policy_ends_by_itself_when_its_input_ends() -> None:
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    flow = sw.Flow("ends")
    flow.source(sw.sources.Iterable(range(5))).sink(out)
    clock = sw.VirtualClock()
    result = asyncio.run(sw.run_async(flow, clock=clock, load=LoadPolicy([], interval=1.0)))
    assert out.items == [0, 1, 2, 3, 4]
    assert not result.stopped
    assert clock.monotonic() < 1.0  # the load checks did not keep the flow alive
