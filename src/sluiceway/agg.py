"""Incremental aggregations for windows: ``sw.agg.count()``, ``sw.agg.sum(fn)``, ...

A window holds one *accumulator* per aggregator, updated as each record arrives, never
the records themselves (``collect`` keeps what you ask it to keep).  Your own aggregator
implements :class:`Aggregator`:

>>> class Range(Aggregator):
...     def create(self): return None
...     def add(self, acc, value): return (value, value) if acc is None else (
...         min(acc[0], value), max(acc[1], value))
...     def merge(self, a, b): return a if b is None else b if a is None else (
...         min(a[0], b[0]), max(a[1], b[1]))
...     def result(self, acc): return acc[1] - acc[0]

``merge`` combines two accumulators of the same key; it is used when session windows
merge.  The built-ins also provide an inline form (``_inline``) that the window operator
compiles into one update function per window operator, so a record costs one Python call
however many aggregators a window has.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

__all__ = [
    "Aggregator",
    "collect",
    "count",
    "count_distinct",
    "first",
    "last",
    "max",
    "mean",
    "min",
    "sum",
]

A = TypeVar("A")
R = TypeVar("R")


class Aggregator(Generic[A, R]):
    """An incremental aggregation: ``create``, ``add``, ``merge``, ``result``.

    ``add`` may update ``acc`` in place, but must return the accumulator to keep.
    """

    def create(self) -> A:
        raise NotImplementedError

    def add(self, acc: A, value: Any) -> A:
        raise NotImplementedError

    def merge(self, acc1: A, acc2: A) -> A:
        raise NotImplementedError(
            f"{type(self).__name__} does not implement merge(), which session windows "
            "need to combine two sessions bridged by a record"
        )

    def result(self, acc: A) -> R:
        raise NotImplementedError

    def _inline(self, slot: str, f: str) -> tuple[str, list[str]] | None:
        """Code for the compiled update: (expression creating the accumulator from the
        first record ``v`` at event time ``t``, statements adding ``v`` to ``slot``).
        ``f`` names the extractor function.  None: use create/add calls."""
        return None

    def _inline_result(self, acc: str) -> str | None:
        """An expression for ``result`` of an inline-form accumulator (None: call it)."""
        return None


def _check_fn(fn: object, what: str) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"sw.agg.{what}(fn) expects a callable or None, got {fn!r}")


class _Extracting(Aggregator[Any, Any]):
    """A built-in with an optional extractor ``fn(record) -> value``."""

    name = "aggregator"

    def __init__(self, fn: Callable[[Any], Any] | None = None) -> None:
        _check_fn(fn, self.name)
        self.fn = fn

    def __repr__(self) -> str:
        return f"sw.agg.{self.name}({'' if self.fn is None else self.fn!r})"

    def x(self, value: Any) -> Any:
        return value if self.fn is None else self.fn(value)

    def _x(self, f: str) -> str:
        return "v" if self.fn is None else f"{f}(v)"


class _Count(Aggregator[int, int]):
    def __repr__(self) -> str:
        return "sw.agg.count()"

    def create(self) -> int:
        return 0

    def add(self, acc: int, value: Any) -> int:
        return acc + 1

    def merge(self, acc1: int, acc2: int) -> int:
        return acc1 + acc2

    def result(self, acc: int) -> int:
        return acc

    def _inline_result(self, acc: str) -> str:
        return acc

    def _inline(self, slot: str, f: str) -> tuple[str, list[str]]:
        return "1", [f"{slot} += 1"]


class _Sum(_Extracting):
    name = "sum"

    def create(self) -> Any:
        return 0

    def add(self, acc: Any, value: Any) -> Any:
        return acc + self.x(value)

    def merge(self, acc1: Any, acc2: Any) -> Any:
        return acc1 + acc2

    def result(self, acc: Any) -> Any:
        return acc

    def _inline_result(self, acc: str) -> str:
        return acc

    def _inline(self, slot: str, f: str) -> tuple[str, list[str]]:
        return self._x(f), [f"{slot} += {self._x(f)}"]


class _Mean(_Extracting):
    name = "mean"

    def create(self) -> list[Any]:
        return [0, 0]

    def add(self, acc: list[Any], value: Any) -> list[Any]:
        acc[0] += self.x(value)
        acc[1] += 1
        return acc

    def merge(self, acc1: list[Any], acc2: list[Any]) -> list[Any]:
        return [acc1[0] + acc2[0], acc1[1] + acc2[1]]

    def result(self, acc: list[Any]) -> float:
        return acc[0] / acc[1]  # type: ignore[no-any-return]

    def _inline_result(self, acc: str) -> str:
        return f"{acc}[0] / {acc}[1]"

    def _inline(self, slot: str, f: str) -> tuple[str, list[str]]:
        return f"[{self._x(f)}, 1]", [f"m = {slot}", f"m[0] += {self._x(f)}", "m[1] += 1"]


class _Empty:
    """The accumulator of min/max/first/last/reduce before any value: one object, tested
    with ``is``, so it stays one object through a checkpoint (pickling rebuilds it by
    calling the class, which hands back the same instance)."""

    _instance: _Empty | None = None

    def __new__(cls) -> _Empty:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __reduce__(self) -> tuple[type[_Empty], tuple[()]]:
        return (_Empty, ())

    def __repr__(self) -> str:
        return "<empty>"


EMPTY: Any = _Empty()


class _Extreme(_Extracting):
    """min / max: the accumulator is the best value so far (``EMPTY`` before any)."""

    def better(self, x: Any, best: Any) -> bool:
        raise NotImplementedError

    def create(self) -> Any:
        return EMPTY

    def add(self, acc: Any, value: Any) -> Any:
        x = self.x(value)
        return x if acc is EMPTY or self.better(x, acc) else acc

    def merge(self, acc1: Any, acc2: Any) -> Any:
        if acc1 is EMPTY:
            return acc2
        if acc2 is EMPTY:
            return acc1
        return acc2 if self.better(acc2, acc1) else acc1

    def result(self, acc: Any) -> Any:
        return None if acc is EMPTY else acc


class _Min(_Extreme):
    name = "min"

    def better(self, x: Any, best: Any) -> bool:
        return bool(x < best)

    def _inline_result(self, acc: str) -> str:
        return acc

    def _inline(self, slot: str, f: str) -> tuple[str, list[str]]:
        return self._x(f), [f"x = {self._x(f)}", f"if x < {slot}: {slot} = x"]


class _Max(_Extreme):
    name = "max"

    def better(self, x: Any, best: Any) -> bool:
        return bool(x > best)

    def _inline_result(self, acc: str) -> str:
        return acc

    def _inline(self, slot: str, f: str) -> tuple[str, list[str]]:
        return self._x(f), [f"x = {self._x(f)}", f"if x > {slot}: {slot} = x"]


class _Timed(_Extracting):
    """first / last by event time; the inline accumulator is ``[t, value]``.

    Without event time (the plain ``add`` protocol) they fall back to arrival order.
    """

    latest = False

    def create(self) -> Any:
        return EMPTY

    def add(self, acc: Any, value: Any) -> Any:
        if acc is EMPTY or self.latest:
            return [0, self.x(value)]
        return acc

    def merge(self, acc1: Any, acc2: Any) -> Any:
        # Merged accumulators are disjoint sessions, so their instants never tie.
        if acc1 is EMPTY:
            return acc2
        if acc2 is EMPTY:
            return acc1
        return acc2 if (acc2[0] > acc1[0]) == self.latest else acc1

    def result(self, acc: Any) -> Any:
        return None if acc is EMPTY else acc[1]

    def _inline_result(self, acc: str) -> str:
        return f"{acc}[1]"

    def _inline(self, slot: str, f: str) -> tuple[str, list[str]]:
        cmp = ">=" if self.latest else "<"
        return f"[t, {self._x(f)}]", [f"if t {cmp} {slot}[0]: {slot} = [t, {self._x(f)}]"]


class _First(_Timed):
    name = "first"


class _Last(_Timed):
    name = "last"
    latest = True


class _Collect(_Extracting):
    name = "collect"

    def create(self) -> list[Any]:
        return []

    def add(self, acc: list[Any], value: Any) -> list[Any]:
        acc.append(self.x(value))
        return acc

    def merge(self, acc1: list[Any], acc2: list[Any]) -> list[Any]:
        return acc1 + acc2

    def result(self, acc: list[Any]) -> list[Any]:
        return list(acc)

    def _inline_result(self, acc: str) -> str:
        return f"list({acc})"

    def _inline(self, slot: str, f: str) -> tuple[str, list[str]]:
        return f"[{self._x(f)}]", [f"{slot}.append({self._x(f)})"]


class _CountDistinct(_Extracting):
    name = "count_distinct"

    def create(self) -> set[Hashable]:
        return set()

    def add(self, acc: set[Hashable], value: Any) -> set[Hashable]:
        acc.add(self.x(value))
        return acc

    def merge(self, acc1: set[Hashable], acc2: set[Hashable]) -> set[Hashable]:
        return acc1 | acc2

    def result(self, acc: set[Hashable]) -> int:
        return len(acc)

    def _inline_result(self, acc: str) -> str:
        return f"len({acc})"

    def _inline(self, slot: str, f: str) -> tuple[str, list[str]]:
        return f"{{{self._x(f)}}}", [f"{slot}.add({self._x(f)})"]


class Reduce(Aggregator[Any, Any]):
    """``.reduce(fn)``: the accumulator is the running ``fn(acc, record)``."""

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"reduce() expects a callable fn(a, b), got {fn!r}")
        self.fn = fn

    def create(self) -> Any:
        return EMPTY

    def add(self, acc: Any, value: Any) -> Any:
        return value if acc is EMPTY else self.fn(acc, value)

    def merge(self, acc1: Any, acc2: Any) -> Any:
        if acc1 is EMPTY:
            return acc2
        return acc1 if acc2 is EMPTY else self.fn(acc1, acc2)

    def result(self, acc: Any) -> Any:
        return acc

    def _inline_result(self, acc: str) -> str:
        return acc

    def _inline(self, slot: str, f: str) -> tuple[str, list[str]]:
        return "v", [f"{slot} = {f}({slot}, v)"]


class Apply(Aggregator[list[Any], Any]):
    """``.apply(fn)``: holds every record; the result is ``fn(records)``."""

    def __init__(self, fn: Callable[[list[Any]], Any]) -> None:
        if not callable(fn):
            raise TypeError(f"apply() expects a callable fn(records), got {fn!r}")
        self.fn = fn

    def create(self) -> list[Any]:
        return []

    def add(self, acc: list[Any], value: Any) -> list[Any]:
        acc.append(value)
        return acc

    def merge(self, acc1: list[Any], acc2: list[Any]) -> list[Any]:
        return acc1 + acc2

    def result(self, acc: list[Any]) -> Any:
        return self.fn(list(acc))

    def _inline(self, slot: str, f: str) -> tuple[str, list[str]]:
        return "[v]", [f"{slot}.append(v)"]


def count() -> Aggregator[int, int]:
    """The number of records."""
    return _Count()


def sum(fn: Callable[[Any], Any] | None = None) -> Aggregator[Any, Any]:
    """The sum of ``fn(record)`` (default: the records)."""
    return _Sum(fn)


def mean(fn: Callable[[Any], Any] | None = None) -> Aggregator[Any, float]:
    """The arithmetic mean of ``fn(record)``."""
    return _Mean(fn)


def min(fn: Callable[[Any], Any] | None = None) -> Aggregator[Any, Any]:
    """The smallest ``fn(record)`` (the earliest-arrived one among equals)."""
    return _Min(fn)


def max(fn: Callable[[Any], Any] | None = None) -> Aggregator[Any, Any]:
    """The largest ``fn(record)`` (the earliest-arrived one among equals)."""
    return _Max(fn)


def first(fn: Callable[[Any], Any] | None = None) -> Aggregator[Any, Any]:
    """``fn`` of the record with the earliest event time (ties: the first to arrive)."""
    return _First(fn)


def last(fn: Callable[[Any], Any] | None = None) -> Aggregator[Any, Any]:
    """``fn`` of the record with the latest event time (ties: the last to arrive)."""
    return _Last(fn)


def collect(fn: Callable[[Any], Any] | None = None) -> Aggregator[list[Any], list[Any]]:
    """Every ``fn(record)``, as a list in arrival order (holds them all)."""
    return _Collect(fn)


def count_distinct(fn: Callable[[Any], Hashable] | None = None) -> Aggregator[Any, int]:
    """The number of distinct ``fn(record)`` values (holds the set of them)."""
    return _CountDistinct(fn)
