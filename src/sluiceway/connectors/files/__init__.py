"""File connectors: JSON Lines and CSV sources, a JSON Lines sink.

The code lives in :mod:`sluiceway.connectors.files.reading`; import the names from here
(or as ``sw.sources.JsonLines``, ``sw.sources.Csv``, ``sw.sinks.JsonLines``).
"""

# Helpers the stdio, Kafka and Redis Streams connectors import from here (private to
# sluiceway's connectors; re-exported explicitly for mypy).
from sluiceway.connectors.files.reading import _READ_BUDGET as _READ_BUDGET
from sluiceway.connectors.files.reading import (
    DEFAULT_MAX_LINE_BYTES,
    Csv,
    JsonLinesSink,
    JsonLinesSource,
    LineBuffer,
    LineTooLongError,
    WriteMode,
)
from sluiceway.connectors.files.reading import _check_encoding as _check_encoding
from sluiceway.connectors.files.reading import _check_max_line as _check_max_line
from sluiceway.connectors.files.reading import _decode as _decode
from sluiceway.connectors.files.reading import _report as _report
from sluiceway.connectors.files.reading import _to_json as _to_json
from sluiceway.connectors.files.reading import _too_long as _too_long

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "Csv",
    "JsonLinesSink",
    "JsonLinesSource",
    "LineBuffer",
    "LineTooLongError",
    "WriteMode",
]
