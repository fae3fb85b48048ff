"""Load signals and the rules that act on them: :class:`LoadPolicy`.

The engine measures five signals of the process running a flow, every ``interval``
seconds of the flow's clock (see ``docs/flow-control.md``):

=================  ===========================================================================
``cpu``            CPU time of the process per second of clock time (1.0: one core busy)
``loop_lag``       seconds the event loop was late for the load check's own timer
``queue_delay``    seconds records wait in the flow's channels (the largest over channels:
                   queued records / drain rate, or how long a full-but-stalled channel has
                   not moved)
``latency_p99``    the 99th percentile of the time a batch took through its stage, over the
                   last interval, the largest over stages (seconds)
``gc_per_minute``  full (generation 2) garbage collections per minute
=================  ===========================================================================

A :class:`LoadRule` maps one signal above a threshold to an action:

* :class:`ShrinkFetch` -- sources are asked for fewer records per pull (a broker source
  maps that to its fetch size: Redis ``COUNT``, NATS fetch batch, AMQP prefetch use);
* :class:`LimitRate` -- each source is pulled no faster than ``rate`` records/s;
* :class:`RejectAdmission` -- push sources (``sources.Push``, ``HttpIngest``) refuse new
  records (HTTP 429) while it holds;
* :class:`WantMoreInstances` -- the flow publishes ``wants_more_instances = 1``
  (Prometheus ``sluiceway_wants_more_instances``), for an autoscaler to read.

A rule switches on when its signal goes above ``above`` and off when it falls to
``below`` or under (``below`` defaults to ``above``; set it lower for hysteresis).  Each
switch is logged once, on the ``sluiceway`` logger, and counted.  The decisions are pure:
:meth:`LoadController.update` takes the signal values and returns the switches.

>>> rules = LoadPolicy([
...     LoadRule("cpu", above=0.8, action=ShrinkFetch(0.5)),
...     LoadRule("queue_delay", above=1.0, below=0.5, action=LimitRate(100)),
...     LoadRule("gc_per_minute", above=5, action=WantMoreInstances()),
... ])
>>> ctl = LoadController(rules)
>>> [(r.label, on) for r, on in ctl.update({"cpu": 0.93, "queue_delay": 1.5})]
[('cpu > 0.8 -> shrink fetch x0.5', True), ('queue_delay > 1 -> limit rate 100/s', True)]
>>> ctl.update({"cpu": 0.93, "queue_delay": 0.7})  # still above `below`: no change
[]
>>> ctl.effects(max_batch_size=1000).fetch_cap, ctl.effects(1000).rate
(500, 100.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

__all__ = [
    "LimitRate",
    "LoadController",
    "LoadEffects",
    "LoadPolicy",
    "LoadRule",
    "RejectAdmission",
    "ShrinkFetch",
    "Signal",
    "WantMoreInstances",
]

Signal = Literal["cpu", "loop_lag", "queue_delay", "latency_p99", "gc_per_minute"]
SIGNALS: tuple[str, ...] = get_args(Signal)


@dataclass(frozen=True, slots=True)
class ShrinkFetch:
    """Ask sources for at most ``factor`` x the flow's ``max_batch_size`` records per
    pull (at least ``min_records``)."""

    factor: float = 0.5
    min_records: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.factor < 1:
            raise ValueError(f"ShrinkFetch factor must be in (0, 1), got {self.factor!r}")
        if self.min_records < 1:
            raise ValueError(f"ShrinkFetch min_records must be >= 1, got {self.min_records!r}")

    def describe(self) -> str:
        return f"shrink fetch x{self.factor:g}"


@dataclass(frozen=True, slots=True)
class LimitRate:
    """Pull each source no faster than ``rate`` records per second (bursts of ``burst``)."""

    rate: float
    burst: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"LimitRate rate must be > 0 records/s, got {self.rate!r}")
        if self.burst < 1:
            raise ValueError(f"LimitRate burst must be >= 1, got {self.burst!r}")
        object.__setattr__(self, "rate", float(self.rate))

    def describe(self) -> str:
        return f"limit rate {self.rate:g}/s"


@dataclass(frozen=True, slots=True)
class RejectAdmission:
    """Push sources refuse new records while the rule holds (accepted ones still flow)."""

    def describe(self) -> str:
        return "reject admission"


@dataclass(frozen=True, slots=True)
class WantMoreInstances:
    """Publish ``wants_more_instances = 1`` while the rule holds (for an autoscaler)."""

    def describe(self) -> str:
        return "want more instances"


Action = ShrinkFetch | LimitRate | RejectAdmission | WantMoreInstances


@dataclass(frozen=True, slots=True)
class LoadRule:
    """``signal`` above ``above`` switches ``action`` on; at or below ``below`` (default:
    ``above``) it switches off."""

    signal: Signal
    above: float
    action: Action
    below: float | None = None

    def __post_init__(self) -> None:
        if self.signal not in SIGNALS:
            known = ", ".join(repr(s) for s in SIGNALS)
            raise ValueError(f"LoadRule signal must be one of {known}, got {self.signal!r}")
        if not math.isfinite(self.above):
            raise ValueError(f"LoadRule above must be a finite number, got {self.above!r}")
        if self.below is not None and not self.below <= self.above:
            raise ValueError(f"LoadRule below ({self.below!r}) must be <= above ({self.above!r})")
        if not isinstance(self.action, Action):
            raise TypeError(
                "LoadRule action must be ShrinkFetch(...), LimitRate(...), RejectAdmission() "
                f"or WantMoreInstances(), got {self.action!r}"
            )

    @property
    def label(self) -> str:
        """``"cpu > 0.8 -> shrink fetch x0.5"``: in logs, metrics and the web view."""
        return f"{self.signal} > {self.above:g} -> {self.action.describe()}"

    @property
    def off_at(self) -> float:
        return self.above if self.below is None else self.below


@dataclass(frozen=True, slots=True, eq=False)
class LoadPolicy:
    """Rules that act on the load signals, checked every ``interval`` seconds.

    Args:
        rules: the rules (each signal may appear in several).
        interval: seconds of the flow's clock between two checks (> 0).
        probes: replace the measurement of some signals by functions returning their
            value (for tests, or a signal measured elsewhere): ``{"cpu": read_cpu}``.
    """

    rules: Iterable[LoadRule]
    interval: float = 1.0
    probes: Mapping[str, Callable[[], float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        for r in rules:
            if not isinstance(r, LoadRule):
                raise TypeError(f"LoadPolicy rules must be LoadRule objects, got {r!r}")
        object.__setattr__(self, "rules", rules)
        if not (math.isfinite(self.interval) and self.interval > 0):
            raise ValueError(f"LoadPolicy interval must be > 0 seconds, got {self.interval!r}")
        for name in self.probes:
            if name not in SIGNALS:
                known = ", ".join(repr(s) for s in SIGNALS)
                raise ValueError(f"LoadPolicy probes: unknown signal {name!r}; known: {known}")


@dataclass(frozen=True, slots=True)
class LoadEffects:
    """What the active rules ask of the flow now."""

    fetch_cap: int | None
    """The most records a source is asked for per pull (None: no cap)."""
    rate: float | None
    burst: int
    shedding: str | None
    """Why push sources refuse records (None: they accept)."""
    wants_more_instances: bool


class LoadController:
    """Which rules hold, from the signal values: pure, one :meth:`update` per check."""

    def __init__(self, policy: LoadPolicy) -> None:
        self.rules: tuple[LoadRule, ...] = tuple(policy.rules)
        self.active: dict[LoadRule, float] = {}
        """The rules that hold, with the signal value that switched each on."""
        self.values: dict[str, float] = {}
        self.decisions = 0

    def update(self, values: Mapping[str, float]) -> list[tuple[LoadRule, bool]]:
        """Take the signals now; return the rules that switched (True: on), in order.

        A signal missing from ``values`` (or NaN) leaves its rules as they are."""
        self.values = {k: v for k, v in values.items() if not math.isnan(v)}
        changes: list[tuple[LoadRule, bool]] = []
        for rule in self.rules:
            v = self.values.get(rule.signal)
            if v is None:
                continue
            if rule not in self.active and v > rule.above:
                self.active[rule] = v
                changes.append((rule, True))
            elif rule in self.active and v <= rule.off_at:
                del self.active[rule]
                changes.append((rule, False))
        self.decisions += len(changes)
        return changes

    def effects(self, max_batch_size: int) -> LoadEffects:
        """The combined asks of the active rules: the smallest fetch and rate win."""
        cap: int | None = None
        rate: float | None = None
        burst = 1
        shedding: list[str] = []
        more = False
        for rule in self.active:
            a = rule.action
            if isinstance(a, ShrinkFetch):
                c = max(a.min_records, int(max_batch_size * a.factor))
                cap = c if cap is None else min(cap, c)
            elif isinstance(a, LimitRate):
                if rate is None or a.rate < rate:
                    rate, burst = a.rate, a.burst
            elif isinstance(a, RejectAdmission):
                v = self.values.get(rule.signal, self.active[rule])
                shedding.append(f"{rule.signal} {v:.3g} > {rule.above:g}")
            else:
                more = True
        return LoadEffects(cap, rate, burst, "; ".join(shedding) or None, more)
