"""Built-in sources: ``Iterable``, ``Generator``, ``JsonLines``, ``Csv``, ``Stdin``."""

from sluiceway.connectors.base import Source, SourceContext
from sluiceway.connectors.files import Csv
from sluiceway.connectors.files import JsonLinesSource as JsonLines
from sluiceway.connectors.memory import Generator, Iterable
from sluiceway.connectors.stdio import Stdin

__all__ = [
    "Csv",
    "Generator",
    "Iterable",
    "JsonLines",
    "Source",
    "SourceContext",
    "Stdin",
]
