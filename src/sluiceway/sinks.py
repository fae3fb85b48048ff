"""Built-in sinks: ``sw.sinks.Collect``, ``Stdout``, ``Function`` (more in the docs)."""

from sluiceway.connectors.base import PartialWriteError, Sink, SinkContext
from sluiceway.connectors.memory import Collect, Function, Stdout

__all__ = ["Collect", "Function", "PartialWriteError", "Sink", "SinkContext", "Stdout"]
