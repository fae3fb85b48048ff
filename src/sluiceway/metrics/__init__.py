"""Metrics: per-operator counters and per-channel statistics, read through snapshots."""

from sluiceway.metrics.registry import (
    FlowSnapshot,
    LoadSnapshot,
    MetricsRegistry,
    OperatorMetrics,
    OperatorSnapshot,
    Rates,
)

__all__ = [
    "FlowSnapshot",
    "LoadSnapshot",
    "MetricsRegistry",
    "OperatorMetrics",
    "OperatorSnapshot",
    "Rates",
]
