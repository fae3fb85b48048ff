"""File connectors: JSON Lines and CSV sources, a JSON Lines sink.

By responsibility: :mod:`.lines` splits bytes into lines (offsets, the line-length
limit); :mod:`.reading` reads and follows a file (resume, rotation, bad input), what the
sources share, and holds the JSON Lines source; :mod:`.csv_source` the CSV source;
:mod:`.writing` the JSON Lines sink.  Import the names from here (or as
``sw.sources.JsonLines``, ``sw.sources.Csv``, ``sw.sinks.JsonLines``).  The helpers
the stdio, Kafka and Redis Streams connectors import from here are re-exported too
(``name as name``: private to sluiceway's connectors).
"""

from sluiceway.connectors.files.csv_source import Csv
from sluiceway.connectors.files.lines import LineBuffer, LineTooLongError
from sluiceway.connectors.files.reading import _READ_BUDGET as _READ_BUDGET
from sluiceway.connectors.files.reading import DEFAULT_MAX_LINE_BYTES, JsonLinesSource
from sluiceway.connectors.files.reading import _check_encoding as _check_encoding
from sluiceway.connectors.files.reading import _check_max_line as _check_max_line
from sluiceway.connectors.files.reading import _decode as _decode
from sluiceway.connectors.files.reading import _report as _report
from sluiceway.connectors.files.reading import _too_long as _too_long
from sluiceway.connectors.files.writing import JsonLinesSink, WriteMode
from sluiceway.connectors.files.writing import _to_json as _to_json

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "Csv",
    "JsonLinesSink",
    "JsonLinesSource",
    "LineBuffer",
    "LineTooLongError",
    "WriteMode",
]
