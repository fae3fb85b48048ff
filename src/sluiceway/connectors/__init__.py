"""Connectors: sources and sinks (memory, files, stdio, and brokers)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_attributes(
    module: str, exported: list[str], table: dict[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a module whose names in ``table`` (name ->
    ``"module"`` or ``"module:attribute"``) are imported on first use: the broker
    connectors, so that ``import sluiceway`` needs none of their client libraries."""

    def getattr_(name: str) -> object:
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, _, attribute = target.partition(":")  # "module:attribute" when names differ
        return getattr(importlib.import_module(where), attribute or name)

    def dir_() -> list[str]:
        return sorted([*exported, *table])

    return getattr_, dir_
