"""Metrics: per-operator counters and per-channel statistics, read through snapshots."""

from sluiceway.metrics.registry import (
    FlowSnapshot,
    MetricsRegistry,
    OperatorMetrics,
    OperatorSnapshot,
    Rates,
)

__all__ = ["FlowSnapshot", "MetricsRegistry", "OperatorMetrics", "OperatorSnapshot", "Rates"]
