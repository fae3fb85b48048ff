"""Measuring the load signals of a running flow and applying a :class:`LoadPolicy`.

The pure part (rules, decisions, combined effects) is
:mod:`sluiceway.flowcontrol.load`; this module reads the process and the flow's
counters every ``interval`` of the flow's clock and hands the effects to the runtime.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Callable

from sluiceway.core.channel import ChannelReader
from sluiceway.flowcontrol.load import SIGNALS, LoadController, LoadEffects, LoadPolicy
from sluiceway.metrics.histogram import LatencyHistogram
from sluiceway.metrics.registry import LoadSnapshot
from sluiceway.time import Clock

__all__ = ["LoadMonitor"]

log = logging.getLogger("sluiceway")


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])


class LoadMonitor:
    """Samples the signals and keeps the controller's decisions (one per flow).

    Args:
        policy: the rules.
        clock: the flow's clock.
        channels: the flow's channel readers (queue delay).
        latencies: the stage heads' latency histograms (p99 over each interval).
    """

    def __init__(
        self,
        policy: LoadPolicy,
        clock: Clock,
        channels: list[ChannelReader],
        latencies: list[LatencyHistogram],
        flow: str,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.flow = flow
        self.controller = LoadController(policy)
        self._channels = channels
        self._latencies = latencies
        self._last = clock.monotonic()
        self._cpu = _cpu_seconds()
        self._gc = _full_collections()
        self._received = {r.name: r.statistics().records_received for r in channels}
        self._stalled = {r.name: 0.0 for r in channels}
        self._counts = [list(h.counts) for h in latencies]
        self.effects = LoadEffects(None, None, 1, None, False)
        self.signals: dict[str, float] = {}

    def measure(self, lag: float) -> dict[str, float]:
        """Every signal since the previous call (``lag``: how late this check woke)."""
        now = self.clock.monotonic()
        dt = now - self._last
        self._last = now
        cpu, gcs = _cpu_seconds(), _full_collections()
        values: dict[str, float] = {"loop_lag": max(0.0, lag)}
        values["cpu"] = (cpu - self._cpu) / dt if dt > 0 else 0.0
        values["gc_per_minute"] = (gcs - self._gc) * 60.0 / dt if dt > 0 else 0.0
        self._cpu, self._gc = cpu, gcs
        values["queue_delay"] = self._queue_delay(dt)
        values["latency_p99"] = self._latency_p99()
        probes: dict[str, Callable[[], float]] = dict(self.policy.probes)
        for name, read in probes.items():
            values[name] = float(read())
        return {k: values[k] for k in SIGNALS}

    def _queue_delay(self, dt: float) -> float:
        """The largest wait over channels: records queued / records taken per second
        (Little's law), or, for a channel whose reader took nothing meanwhile, how long
        it has held records without moving."""
        worst = 0.0
        for r in self._channels:
            st = r.statistics()
            taken = st.records_received - self._received[st.name]
            self._received[st.name] = st.records_received
            if st.fill == 0:
                self._stalled[st.name] = 0.0
                continue
            if taken > 0 and dt > 0:
                self._stalled[st.name] = 0.0
                delay = st.fill / (taken / dt)
            else:
                self._stalled[st.name] += dt
                delay = self._stalled[st.name]
            worst = max(worst, delay)
        return worst

    def _latency_p99(self) -> float:
        worst = math.nan
        for i, h in enumerate(self._latencies):
            now = list(h.counts)
            diff = LatencyHistogram()
            diff.counts = [a - b for a, b in zip(now, self._counts[i], strict=True)]
            diff.count = sum(diff.counts)
            self._counts[i] = now
            p = diff.percentile(99)
            if not math.isnan(p) and (math.isnan(worst) or p > worst):
                worst = p
        return 0.0 if math.isnan(worst) else worst

    def check(self, lag: float, max_batch_size: int) -> LoadEffects:
        """Measure, decide, log each switch once; returns the effects now."""
        self.signals = self.measure(lag)
        for rule, on in self.controller.update(self.signals):
            value = self.signals[rule.signal]
            if on:
                log.warning(
                    "flow %r: load rule %r on (%s = %.3g)",
                    self.flow,
                    rule.label,
                    rule.signal,
                    value,
                )
            else:
                log.info(
                    "flow %r: load rule %r off (%s = %.3g)",
                    self.flow,
                    rule.label,
                    rule.signal,
                    value,
                )
        self.effects = self.controller.effects(max_batch_size)
        return self.effects

    def snapshot(self) -> LoadSnapshot:
        e = self.effects
        return LoadSnapshot(
            signals=dict(self.signals),
            active=tuple(r.label for r in self.controller.active),
            decisions=self.controller.decisions,
            fetch_cap=e.fetch_cap,
            rate=e.rate,
            shedding=e.shedding,
            wants_more_instances=e.wants_more_instances,
        )
