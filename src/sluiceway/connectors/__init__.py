"""Connectors: sources and sinks (memory, files, stdio, and brokers)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

# The extra that installs each broker connector's client library (pyproject.toml).
EXTRAS: dict[str, str] = {
    "sluiceway.connectors.redis_streams": "redis",
    "sluiceway.connectors.nats": "nats",
    "sluiceway.connectors.rabbitmq": "rabbitmq",
    "sluiceway.connectors.mqtt": "mqtt",
    "sluiceway.connectors.postgres": "postgres",
    "sluiceway.connectors.kafka": "kafka",
}


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
        try:
            loaded = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            extra = EXTRAS.get(where)
            if extra is None or missing == "sluiceway" or missing.startswith("sluiceway."):
                raise
            short = module.removeprefix("sluiceway.")
            raise ModuleNotFoundError(
                f"sw.{short}.{name} needs the {missing.partition('.')[0]!r} package, which is "
                f"not installed: pip install 'sluiceway[{extra}]'",
                name=missing,
            ) from exc
        return getattr(loaded, attribute or name)

    def dir_() -> list[str]:
        return sorted([*exported, *table])

    return getattr_, dir_
