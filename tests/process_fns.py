"""Functions for ``map_in_processes`` tests: top level in a module the worker processes can
import by name (the tests directory is on ``sys.path``, which spawned workers inherit).
Kept free of test imports so a worker starts quickly."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def square(x: int) -> int:
    return x * x


def burn(n: int) -> int:
    """CPU-bound: a sum of squares, about ``n`` iterations of Python bytecode."""
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def late_first(x: int) -> int:
    """Even records take longer than odd ones: pieces finish out of input order."""
    burn(20_000 if x % 2 == 0 else 10)
    return x * 10


def fail_on_sevens(x: int) -> int:
    if x % 7 == 0:
        raise ValueError(f"no sevens: {x}")
    return x + 1


def die_on_13(x: int) -> int:
    if x == 13:
        os._exit(3)  # the worker dies: a crash in native code looks like this
    return x + 1


def lambda_result(x: int) -> Any:
    if x == 2:
        return lambda: x  # cannot be pickled back
    return x


def pid_of(_: object) -> int:
    return os.getpid()


def hold_zero(arg: tuple[str, int]) -> int:
    """Record 0 waits until ``<dir>/release`` exists; each record marks its start."""
    where, x = arg
    Path(where, f"{x}.start").touch()
    while x == 0 and not Path(where, "release").exists():
        time.sleep(0.01)
    return x


def uneven_row(r: dict[str, Any]) -> list[Any]:
    """A checkpointed flow's row: even ids take longer, so pieces finish out of order."""
    burn(3_000 if r["id"] % 2 == 0 else 10)
    return [r["k"], r["id"]]


def hang(where: str) -> None:
    """Writes its worker's pid into ``where``, then never returns."""
    Path(where, str(os.getpid())).touch()
    while True:
        time.sleep(0.05)
