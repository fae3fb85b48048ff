"""The core: contracts and in-band types every other layer imports, importing none of them.

- :mod:`~sluiceway.core.contract`: the Source/Sink contract (``Source``, ``Sink``, their
  contexts, ``PartialWriteError``) -- what a custom connector implements;
- :mod:`~sluiceway.core.messages`: what travels between stages (``Batch``, ``Watermark``,
  ``Barrier``, ``Control``);
- :mod:`~sluiceway.core.channel`: the bounded channel they travel in (``Overflow``);
- :mod:`~sluiceway.core.query`: the answers of queryable state;
- :mod:`~sluiceway.core.topology`: the plain description of a flow's graph that the plan
  publishes and the views read;
- :mod:`~sluiceway.core.delta`: the shape of incremental, per-partition state.

The core imports, of sluiceway, only :mod:`sluiceway.errors`, :mod:`sluiceway.time` and
other core modules (``tests/test_layers.py`` checks it).  See ``docs/architecture.md``
("Layers and imports").
"""

from __future__ import annotations

from sluiceway.core.contract import PartialWriteError, Sink, SinkContext, Source, SourceContext
from sluiceway.core.messages import Barrier, Batch, Control, Watermark

__all__ = [
    "Barrier",
    "Batch",
    "Control",
    "PartialWriteError",
    "Sink",
    "SinkContext",
    "Source",
    "SourceContext",
    "Watermark",
]
