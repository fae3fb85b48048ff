"""The in-process metrics registry.

Operators own an :class:`OperatorMetrics` and bump its counters once per micro-batch
(plain attribute increments: no locks, no lookups on the hot path).  Channels keep their
own counters (:meth:`~sluiceway.core.channel.ChannelReader.statistics`).  Everything
else -- the live console view, a Prometheus exporter, tests -- reads
:meth:`MetricsRegistry.snapshot`, a frozen copy, and derives rates from two snapshots with
:meth:`FlowSnapshot.rates_since`.  Adding an exporter never touches an operator.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from sluiceway.core.channel import ChannelReader, ChannelStatistics
from sluiceway.metrics.histogram import LatencyHistogram
from sluiceway.time import Clock

__all__ = [
    "CheckpointSnapshot",
    "FlowSnapshot",
    "LoadSnapshot",
    "MetricsRegistry",
    "OperatorCheckpoint",
    "OperatorMetrics",
    "OperatorSnapshot",
    "Rates",
]


class OperatorMetrics:
    """Mutable counters of one operator (source, transform or sink)."""

    __slots__ = (
        "circuit_opens",
        "circuit_state",
        "dead_letters",
        "errors",
        "failed_attempts",
        "kind",
        "late",
        "latency",
        "name",
        "processing",
        "records_in",
        "records_out",
        "rejected",
        "retries",
        "stage",
        "state",
        "watermark",
    )

    def __init__(self, name: str, kind: str, stage: int) -> None:
        self.name = name
        self.kind = kind
        self.stage = stage
        self.records_in = 0
        self.records_out = 0
        self.errors = 0
        """Records on which the operator's code raised (once per record, however often
        it was retried)."""
        self.failed_attempts = 0
        """Calls that raised, counted per record: a record failing every try of
        ``Retry(5)`` adds 1 to ``errors`` and 5 here."""
        self.retries = 0
        self.dead_letters = 0
        self.late = 0
        self.state = 0
        self.watermark = -math.inf
        self.circuit_state = ""
        self.circuit_opens = 0
        self.rejected = 0
        """Records handed back to their broker for a later delivery
        (``rate_limit(when_limited="reject")``); one record rejected twice counts 2."""
        self.latency = LatencyHistogram()
        """Per record, the time its batch took through this operator's stage (recorded
        for stage heads: the operator that takes batches from a source or a channel)."""
        self.processing = LatencyHistogram()
        """Per record, the time this operator alone spent on its batch: the time in its
        ``push`` minus the time in the operators after it in the same stage (and in
        sending to the next channel, which is backpressure, not processing)."""


@dataclass(frozen=True, slots=True)
class OperatorSnapshot:
    """One operator's counters at an instant.

    ``dropped`` counts records dropped by the overflow policy of the channel that feeds
    this operator (0 when it has none).  ``late`` counts records that arrived after their
    window closed; ``state`` is the number of entries the operator holds (open windows);
    ``watermark`` is the event-time watermark it last saw, in epoch seconds (``-inf``
    before any).  With a circuit breaker, ``circuit_state`` is its state (``closed``,
    ``open``, ``half_open``; ``""`` without one) and ``circuit_opens`` how often it opened.
    ``backlog`` is a source's unread input when it knows it (bytes of a file; None
    otherwise).  ``latency_p50/p95/p99`` (seconds; NaN for operators that do not head a
    stage) are percentiles of the time a record's batch took through the operator's
    stage -- every operator fused into it, including waiting for room downstream.
    ``processing_p50/p95/p99`` (seconds; NaN before a batch) are percentiles of the time
    the operator alone spent on a record's batch (its own code, without the operators
    after it and without waiting for room downstream).  ``errors`` counts records on
    which the operator's code raised, once per record however often it was retried;
    ``failed_attempts`` counts every try that raised (``Retry(5)`` on a record that
    always fails: ``errors`` 1, ``failed_attempts`` 5, ``retries`` 4).
    """

    name: str
    kind: str
    stage: int
    records_in: int
    records_out: int
    errors: int
    retries: int
    dead_letters: int
    dropped: int
    late: int = 0
    state: int = 0
    watermark: float = -math.inf
    circuit_state: str = ""
    circuit_opens: int = 0
    backlog: int | None = None
    partition_backlog: tuple[tuple[str, int], ...] = ()
    """A partitioned source's backlog per partition (``("topic:partition", lag)``)."""
    latency_p50: float = math.nan
    latency_p95: float = math.nan
    latency_p99: float = math.nan
    processing_p50: float = math.nan
    processing_p95: float = math.nan
    processing_p99: float = math.nan
    failed_attempts: int = 0
    rejected: int = 0
    """Records a ``rate_limit(when_limited="reject")`` handed back to the broker for a
    later delivery (each time: a record rejected twice counts 2)."""


@dataclass(frozen=True, slots=True)
class Rates:
    """Per-second rates between two snapshots."""

    records_in: dict[str, float]
    records_out: dict[str, float]
    backpressure: dict[str, float]
    """Per channel: the fraction of wall time its writers spent blocked (0..1 per writer)."""


@dataclass(frozen=True, slots=True)
class OperatorCheckpoint:
    """One operator's share of the last checkpoint.

    Attributes:
        name: the operator.
        bytes: what its state takes in the store: its part, plus for an incremental
            operator every base and delta of the chains the checkpoint refers to.
        base_bytes: of those, the bases' bytes (0 for a whole part).
        delta_bytes: the deltas' bytes.
        deltas: the longest chain's number of deltas (0 after a compaction).
        keys: the entries it held at the barrier (keys, open windows; None: not
            reported, e.g. an operator whose input had ended).
        snapshot_seconds: seconds its snapshot took on the processing path (taking the
            state at the barrier, and pickling it when it is not a change set).
    """

    name: str
    bytes: int
    base_bytes: int
    delta_bytes: int
    deltas: int
    keys: int | None
    snapshot_seconds: float


@dataclass(frozen=True, slots=True)
class CheckpointSnapshot:
    """What a flow's checkpoints have done so far (flows with checkpoints only).

    ``last_duration`` is seconds from the barrier's injection to the checkpoint being
    durable in the store (``max_duration``: the longest of the run); ``last_alignment``
    the part of it until every operator had reported (the barrier's way through the
    flow, with the alignment at fan-ins);
    ``last_write`` the serialising of change sets (event loop) and the write (a thread);
    ``last_size`` the bytes of state it holds in the store; ``last_written`` the bytes its
    save wrote, ``last_delta_bytes`` of them change sets; ``compactions`` chains folded
    into new bases by this run; ``restored_from`` the checkpoint the run started from
    (None: a fresh start); ``operators`` each operator's share."""

    completed: int
    last_id: int | None
    last_duration: float
    last_size: int
    restored_from: int | None
    max_duration: float = 0.0
    last_alignment: float = 0.0
    last_write: float = 0.0
    last_written: int = 0
    last_delta_bytes: int = 0
    compactions: int = 0
    operators: tuple[OperatorCheckpoint, ...] = ()


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """The load signals and decisions of a flow at its last check.

    Attributes:
        signals: the value of each signal (``cpu``, ``loop_lag``, ``queue_delay``,
            ``latency_p99``, ``gc_per_minute``) at the last check; empty before the first.
        active: the labels of the rules that hold (``"cpu > 0.8 -> shrink fetch x0.5"``).
        decisions: how many times a rule switched on or off so far.
        fetch_cap: the most records a source is asked for now (None: no cap).
        rate: the pull rate per source now, records/s (None: no limit).
        shedding: why push sources refuse records now (None: they accept).
        wants_more_instances: True while a ``WantMoreInstances`` rule holds.
    """

    signals: dict[str, float]
    active: tuple[str, ...]
    decisions: int
    fetch_cap: int | None
    rate: float | None
    shedding: str | None
    wants_more_instances: bool


@dataclass(frozen=True, slots=True)
class FlowSnapshot:
    """All counters of a flow at one instant of its clock."""

    flow: str
    time: float
    operators: tuple[OperatorSnapshot, ...]
    channels: tuple[ChannelStatistics, ...]
    wall_time: float = math.nan
    """The clock's wall time (epoch seconds) at the snapshot: event-time watermark lag is
    ``wall_time - operator.watermark``."""
    checkpoints: CheckpointSnapshot | None = None
    load: LoadSnapshot | None = None
    """With a load policy: the signals and decisions at its last check."""

    def watermark_lag(self, name: str) -> float | None:
        """How far operator ``name``'s watermark is behind the wall clock, in seconds
        (None before it has one, or once its input ended)."""
        wm = self.operator(name).watermark
        if not math.isfinite(wm) or not math.isfinite(self.wall_time):
            return None
        return self.wall_time - wm

    def operator(self, name: str) -> OperatorSnapshot:
        """The snapshot of one operator, by name."""
        for op in self.operators:
            if op.name == name:
                return op
        known = ", ".join(o.name for o in self.operators)
        raise KeyError(f"no operator named {name!r} in flow {self.flow!r}; known: {known}")

    def channel(self, name: str) -> ChannelStatistics:
        """The statistics of one channel, by name."""
        for ch in self.channels:
            if ch.name == name:
                return ch
        known = ", ".join(c.name for c in self.channels)
        raise KeyError(f"no channel named {name!r} in flow {self.flow!r}; known: {known}")

    def rates_since(self, earlier: FlowSnapshot) -> Rates:
        """Rates per second of clock time from ``earlier`` to this snapshot."""
        dt = self.time - earlier.time
        if dt <= 0:
            return Rates({}, {}, {})
        before = {o.name: o for o in earlier.operators}
        rin: dict[str, float] = {}
        rout: dict[str, float] = {}
        for op in self.operators:
            prev = before.get(op.name)
            if prev is not None:
                rin[op.name] = (op.records_in - prev.records_in) / dt
                rout[op.name] = (op.records_out - prev.records_out) / dt
        ch_before = {c.name: c for c in earlier.channels}
        bp: dict[str, float] = {}
        for ch in self.channels:
            prev_ch = ch_before.get(ch.name)
            if prev_ch is not None:
                bp[ch.name] = (ch.blocked_seconds - prev_ch.blocked_seconds) / dt
        return Rates(rin, rout, bp)


class MetricsRegistry:
    """Holds every operator's counters and every channel of one running flow."""

    def __init__(self, flow: str, clock: Clock) -> None:
        self.flow = flow
        self.clock = clock
        self._operators: dict[str, OperatorMetrics] = {}
        self._channels: dict[str, ChannelReader] = {}
        self._feeds: dict[str, str] = {}
        self._backlogs: dict[str, Callable[[], int | None]] = {}
        self._partition_backlogs: dict[str, Callable[[], dict[str, int] | None]] = {}
        self._checkpoints: Callable[[], CheckpointSnapshot] | None = None
        self._load: Callable[[], LoadSnapshot] | None = None

    def add_checkpoints(self, read: Callable[[], CheckpointSnapshot]) -> None:
        """Register how to read the flow's checkpoint statistics (at snapshot time)."""
        self._checkpoints = read

    def add_load(self, read: Callable[[], LoadSnapshot]) -> None:
        """Register how to read the flow's load signals and decisions (at snapshot time)."""
        self._load = read

    def operator(self, name: str, kind: str, stage: int) -> OperatorMetrics:
        """Register (or return) the counters of operator ``name``."""
        m = self._operators.get(name)
        if m is None:
            m = self._operators[name] = OperatorMetrics(name, kind, stage)
        return m

    def add_backlog(
        self,
        operator: str,
        backlog: Callable[[], int | None],
        per_partition: Callable[[], dict[str, int] | None] | None = None,
    ) -> None:
        """Register how to read a source's backlog, in total and per partition (called
        at snapshot time)."""
        self._backlogs[operator] = backlog
        if per_partition is not None:
            self._partition_backlogs[operator] = per_partition

    def _partition_backlog(self, name: str) -> tuple[tuple[str, int], ...]:
        read = self._partition_backlogs.get(name)
        if read is None:
            return ()
        try:
            lags = read()
        except (OSError, ValueError):
            return ()
        return () if not lags else tuple(sorted(lags.items()))

    def add_channel(self, reader: ChannelReader, feeds: str) -> None:
        """Register a channel and the operator it feeds."""
        self._channels[reader.name] = reader
        self._feeds[feeds] = reader.name

    def _backlog(self, name: str) -> int | None:
        read = self._backlogs.get(name)
        if read is None:
            return None
        try:
            return read()
        except (OSError, ValueError):  # a file closed or gone meanwhile: unknown
            return None

    def snapshot(self) -> FlowSnapshot:
        """A frozen copy of every counter, stamped with the clock's monotonic time."""
        channels = tuple(r.statistics() for r in self._channels.values())
        dropped = {c.name: c.records_dropped for c in channels}
        ops = tuple(
            OperatorSnapshot(
                name=m.name,
                kind=m.kind,
                stage=m.stage,
                records_in=m.records_in,
                records_out=m.records_out,
                errors=m.errors,
                retries=m.retries,
                dead_letters=m.dead_letters,
                dropped=dropped.get(self._feeds.get(m.name, ""), 0),
                late=m.late,
                state=m.state,
                watermark=m.watermark,
                circuit_state=m.circuit_state,
                circuit_opens=m.circuit_opens,
                backlog=self._backlog(m.name),
                partition_backlog=self._partition_backlog(m.name),
                latency_p50=m.latency.percentile(50),
                latency_p95=m.latency.percentile(95),
                latency_p99=m.latency.percentile(99),
                processing_p50=m.processing.percentile(50),
                processing_p95=m.processing.percentile(95),
                processing_p99=m.processing.percentile(99),
                failed_attempts=m.failed_attempts,
                rejected=m.rejected,
            )
            for m in self._operators.values()
        )
        return FlowSnapshot(
            self.flow,
            self.clock.monotonic(),
            ops,
            channels,
            wall_time=self.clock.time(),
            checkpoints=None if self._checkpoints is None else self._checkpoints(),
            load=None if self._load is None else self._load(),
        )
