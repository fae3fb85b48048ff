"""Built-in sinks: ``sw.sinks.Collect``, ``Stdout``, ``Function``, ``JsonLines``."""

from sluiceway.connectors.base import PartialWriteError, Sink, SinkContext
from sluiceway.connectors.files import JsonLinesSink as JsonLines
from sluiceway.connectors.memory import Collect, Function, Stdout

__all__ = [
    "Collect",
    "Function",
    "JsonLines",
    "PartialWriteError",
    "Sink",
    "SinkContext",
    "Stdout",
]
