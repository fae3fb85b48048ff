"""Built-in sources: ``sw.sources.Iterable``, ``Generator`` (more in the connector docs)."""

from sluiceway.connectors.base import Source, SourceContext
from sluiceway.connectors.memory import Generator, Iterable

__all__ = ["Generator", "Iterable", "Source", "SourceContext"]
