"""Keyed state on disk: ``sw.state.OnDisk``, SQLite files behind a bounded cache of hot keys.

The in-memory dict (``sw.state.InMemory()``, the default) holds every key's state in the
process.  ``OnDisk`` keeps it in one SQLite file per operator and partition
and holds at most ``cache_keys`` keys in memory: the keys read or written lately.  Writes
stay in the cache (dirty) and go to the file in one transaction at a checkpoint barrier
or when the dirty keys pass half the cache (write-back); clean keys are dropped least
recently used first.

The files are a cache of the state, not its truth: a checkpoint holds the state (whole or
as change sets, like the in-memory backend's), a restore writes it into fresh files, and
the files are deleted when the flow ends.  Why SQLite: docs/state.md ("Backends").

>>> import sluiceway as sw
>>> def count(n, word):
...     n = (n or 0) + 1
...     return n, (word, n)
>>> sw.testing.run_collect(
...     lambda s: s.key_by(lambda w: w).stateful_map(
...         count, state=sw.state.OnDisk(cache_keys=2)), ["a", "b", "c", "a", "b"])
[('a', 1), ('b', 1), ('c', 1), ('a', 2), ('b', 2)]
"""

from __future__ import annotations

import fcntl
import os
import pickle
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from sluiceway.errors import StateStorageError

__all__ = ["DiskMap", "InMemory", "OnDisk", "StateBackend", "open_run_dir"]


@dataclass(frozen=True, slots=True)
class InMemory:
    """Keyed state in a dict in the process (the default): the fastest; every key's
    state must fit in memory.

    >>> InMemory()
    InMemory()
    """


@dataclass(frozen=True, slots=True)
class OnDisk:
    """Keyed state in SQLite files with a bounded cache of hot keys in front.

    Args:
        path: the directory for the files (a fresh sub-directory per run is made in it
            and deleted at the end of the run); None: a temporary directory.
        cache_keys: keys held in memory at most (> 0): hot keys are served from memory;
            others cost a read from the file (the OS page cache usually has it).

    Keys must pickle to the same bytes whenever they are equal (str, int, bytes, tuples
    of these: the usual keys); values anything picklable.  TTL deadlines and pending
    timers stay in memory (see docs/state.md, "Sizing").

    >>> OnDisk(cache_keys=10_000)
    OnDisk(path=None, cache_keys=10000)
    >>> OnDisk(cache_keys=0)
    Traceback (most recent call last):
    ...
    ValueError: OnDisk(cache_keys=...) must be an int > 0, got 0
    """

    path: str | os.PathLike[str] | None = None
    cache_keys: int = 100_000

    def __post_init__(self) -> None:
        n = self.cache_keys
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"OnDisk(cache_keys=...) must be an int > 0, got {n!r}")
        if self.path is not None and not isinstance(self.path, str | os.PathLike):
            raise TypeError(f"OnDisk(path=...) must be a directory path or None, got {self.path!r}")


StateBackend = InMemory | OnDisk


def as_backend(state: object, what: str) -> StateBackend:
    """``state=`` as users give it: None (the in-memory default), InMemory() or OnDisk()."""
    if state is None:
        return InMemory()
    if isinstance(state, InMemory | OnDisk):
        return state
    raise TypeError(
        f"{what} must be sw.state.InMemory() or sw.state.OnDisk(path=..., cache_keys=...), "
        f"got {state!r}"
    )


_PREFIX = "sw-state-"
_LOCK = "run.lock"
_held: dict[Path, int] = {}  # run directory -> the descriptor holding its lock


def open_run_dir(backend: OnDisk, operator: str) -> Path:
    """A fresh directory for one operator's files in this run, locked while the run
    lives (deleted by :func:`remove_run_dir`).  Directories of runs that ended without
    deleting theirs (killed) are deleted first: their lock is free."""
    base = None if backend.path is None else Path(backend.path)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in operator)[:60]
    try:
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
            _remove_stale(base)
        path = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{safe}-", dir=base))
        fd = os.open(path / _LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _held[path] = fd
        return path
    except OSError as exc:
        where = base if base is not None else Path(tempfile.gettempdir())
        raise StateStorageError(
            f"operator {operator!r}: cannot create the on-disk state directory in "
            f"{str(where)!r}: {type(exc).__name__}: {exc}; give OnDisk(path=...) a "
            "writable directory"
        ) from exc


def remove_run_dir(path: Path) -> None:
    """Delete a directory made by :func:`open_run_dir` with everything in it."""
    fd = _held.pop(path, None)
    shutil.rmtree(path, ignore_errors=True)
    if fd is not None:
        os.close(fd)


def _remove_stale(base: Path) -> None:
    """Delete the run directories in ``base`` whose run is gone (their lock is free)."""
    for path in base.glob(f"{_PREFIX}*"):
        if path in _held or not (path / _LOCK).exists():
            continue
        try:
            fd = os.open(path / _LOCK, os.O_RDWR)
        except OSError:
            continue  # deleted meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live run holds it
        finally:
            os.close(fd)  # (closing drops a lock we took)
        shutil.rmtree(path, ignore_errors=True)


class _Gone:
    def __repr__(self) -> str:
        return "<absent>"


_GONE: Any = _Gone()
"""In the cache: the key has no state (known absent, or deleted and not yet written back)."""

_dumps = pickle.dumps
_loads = pickle.loads
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_INT_OFFSET = 1 << 63


def _key(key: Any) -> bytes:
    """A key as the file's primary key: ints (of 64 bits) and strs in their own order,
    so that keys arriving in order (ids, timestamps) are appended to the B-tree instead of
    scattered over it (a pickled int's bytes are little-endian); anything else pickled."""
    t = type(key)
    if t is int and -_INT_OFFSET <= key < _INT_OFFSET:
        n: int = key + _INT_OFFSET
        return b"\x01" + n.to_bytes(8, "big")
    if t is str:
        text: str = key
        return b"\x02" + text.encode("utf-8", "surrogatepass")
    return b"\x00" + _dumps(key, _PROTOCOL)


def _unkey(blob: bytes) -> Any:
    """The key :func:`_key` made ``blob`` of."""
    tag, body = blob[0], blob[1:]
    if tag == 1:
        return int.from_bytes(body, "big") - _INT_OFFSET
    if tag == 2:
        return body.decode("utf-8", "surrogatepass")
    return _loads(body)


_CHUNK = 500  # keys per query of a prefetch (SQLite allows 999 parameters at least)


class DiskMap(MutableMapping[Any, Any]):
    """A key -> state mapping kept in one SQLite file, with a bounded cache in front.

    ``dirty``: keys written (or deleted: ``_GONE``) since the last write-back; ``clean``:
    keys as in the file (or known absent), least recently used first.  Nothing is written
    to the file while user code runs: :meth:`settle` (after a batch) writes back when the
    dirty keys pass half the cache, :meth:`write_back` (at a snapshot) always; so a value
    changed in place during a record is written as it is at the end of the record.
    """

    def __init__(self, file: Path, cache_keys: int, operator: str) -> None:
        self.file = file
        self.operator = operator
        self.cap = cache_keys
        self.dirty: dict[Any, Any] = {}
        self.clean: dict[Any, Any] = {}
        self.count = 0  # keys with state (file + dirty)
        try:
            self.db = sqlite3.connect(file, isolation_level=None, check_same_thread=False)
            # A cache of the state, never the truth (the checkpoint is; a restore or a new
            # run starts a fresh file): no journal, no fsync -- half the writes of WAL.
            self.db.execute("PRAGMA journal_mode=OFF")
            self.db.execute("PRAGMA synchronous=OFF")
            self.db.execute("PRAGMA cache_size=-16384")  # 16 MB of pages
            self.db.execute("CREATE TABLE s (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")
        except sqlite3.Error as exc:
            raise self._error("create", exc) from exc

    def _error(self, doing: str, exc: Exception) -> StateStorageError:
        hint = "free disk space" if "full" in str(exc) else "check the directory's permissions"
        return StateStorageError(
            f"operator {self.operator!r}: cannot {doing} the on-disk state file "
            f"{str(self.file)!r}: {type(exc).__name__}: {exc}; {hint}"
        )

    # -- reads ---------------------------------------------------------------------------

    def _fetch(self, key: Any) -> Any:
        """``key``'s state as cached (moved to the most recently used end), else read."""
        v = self.dirty.get(key, self)
        if v is not self:
            return v
        clean = self.clean
        v = clean.pop(key, self)
        if v is self:
            try:
                row = self.db.execute("SELECT v FROM s WHERE k = ?", (_key(key),)).fetchone()
            except sqlite3.Error as exc:
                raise self._error("read", exc) from exc
            v = _GONE if row is None else _loads(row[0])
        clean[key] = v
        return v

    def prefetch(self, keys: Iterable[Any]) -> None:
        """Read the keys of a batch that are not cached with one query per 500 (instead
        of one per key when the record comes to it)."""
        dirty, clean = self.dirty, self.clean
        missing: dict[bytes, Any] = {}
        for k in keys:
            if k not in dirty and k not in clean:
                missing[_key(k)] = k
        if not missing:
            return
        blobs = list(missing)
        db = self.db
        try:
            for i in range(0, len(blobs), _CHUNK):
                chunk = blobs[i : i + _CHUNK]
                query = f"SELECT k, v FROM s WHERE k IN ({','.join('?' * len(chunk))})"
                for kb, vb in db.execute(query, chunk):
                    clean[missing.pop(kb)] = _loads(vb)
        except sqlite3.Error as exc:
            raise self._error("read", exc) from exc
        for k in missing.values():
            clean[k] = _GONE

    def get(self, key: Any, default: Any = None) -> Any:
        v = self._fetch(key)
        return default if v is _GONE else v

    def __getitem__(self, key: Any) -> Any:
        v = self._fetch(key)
        if v is _GONE:
            raise KeyError(key)
        return v

    def __contains__(self, key: object) -> bool:
        return self._fetch(key) is not _GONE

    def __len__(self) -> int:
        return self.count

    # -- writes --------------------------------------------------------------------------

    def __setitem__(self, key: Any, value: Any) -> None:
        dirty = self.dirty
        old = dirty.get(key, self)
        if old is self:
            old = self.clean.pop(key, self)
            if old is self:
                old = self._fetch(key)
                del self.clean[key]
        if old is _GONE:
            self.count += 1
        dirty[key] = value

    def __delitem__(self, key: Any) -> None:
        if self._fetch(key) is _GONE:
            raise KeyError(key)
        self.count -= 1
        self.clean.pop(key, None)
        self.dirty[key] = _GONE

    def settle(self) -> None:
        """Between records: write back when the dirty keys fill half the cache, and drop
        the least recently used clean keys beyond it."""
        if len(self.dirty) * 2 > self.cap:
            self.write_back()
        clean = self.clean
        over = len(clean) + len(self.dirty) - self.cap
        if over > 0:
            for key in list(islice(clean, over)):
                del clean[key]

    def write_back(self) -> None:
        """Write every dirty key to the file in one transaction; they become clean."""
        dirty = self.dirty
        if not dirty:
            return
        try:
            puts = [(_key(k), _dumps(v, _PROTOCOL)) for k, v in dirty.items() if v is not _GONE]
        except Exception as exc:
            raise self._unpicklable(exc) from exc
        dels = [(_key(k),) for k, v in dirty.items() if v is _GONE]
        puts.sort()  # in key order: the B-tree is walked once, not at random
        with self._writing() as db:
            if dels:
                db.executemany("DELETE FROM s WHERE k = ?", dels)
            db.executemany("INSERT OR REPLACE INTO s VALUES (?, ?)", puts)
        self.clean.update(dirty)
        dirty.clear()

    def _unpicklable(self, exc: Exception) -> StateStorageError:
        """Which key (and state) of the dirty ones cannot be pickled, as an error."""
        for key, v in self.dirty.items():
            try:
                _key(key)
            except Exception as why:  # noqa: BLE001 - reported below, with the key
                return StateStorageError(
                    f"operator {self.operator!r}: key {key!r} cannot be pickled for the "
                    f"on-disk state: {type(why).__name__}: {why}"
                )
            for name, value in v.items() if isinstance(v, dict) else ():
                try:
                    _dumps(value, _PROTOCOL)
                except Exception as why:  # noqa: BLE001 - reported below, with the key
                    what = f"state {name!r}" if isinstance(name, str) else "a timer or TTL"
                    return StateStorageError(
                        f"operator {self.operator!r}: {what} of key {key!r} cannot be "
                        f"pickled for the on-disk state: {type(why).__name__}: {why}; keep "
                        "state to picklable values (numbers, strings, lists, dicts, "
                        "dataclasses)"
                    )
        return StateStorageError(
            f"operator {self.operator!r}: its state cannot be pickled for the on-disk "
            f"state: {type(exc).__name__}: {exc}"
        )

    # -- whole-state operations ----------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        for k, _ in self._rows("k, NULL"):
            yield _unkey(k)

    def items(self) -> Iterator[tuple[Any, Any]]:  # type: ignore[override]
        """Every key and state (written back first), streamed from the file."""
        for k, v in self._rows("k, v"):
            yield _unkey(k), _loads(v)

    def _rows(self, columns: str) -> Iterator[tuple[bytes, bytes]]:
        self.write_back()
        try:
            cursor = self.db.execute(f"SELECT {columns} FROM s")
            while rows := cursor.fetchmany(10_000):
                yield from rows
        except sqlite3.Error as exc:
            raise self._error("read", exc) from exc

    def clear(self) -> None:
        self.dirty.clear()
        self.clean.clear()
        self.count = 0
        try:
            self.db.execute("DELETE FROM s")
        except sqlite3.Error as exc:
            raise self._error("write", exc) from exc

    def load(self, rows: Iterable[tuple[Any, Any]]) -> None:
        """Replace everything with ``rows`` (a restore): written straight to the file."""
        self.clear()
        n = 0

        def pickled() -> Iterator[tuple[bytes, bytes]]:
            nonlocal n
            for k, v in rows:
                n += 1
                yield _key(k), _dumps(v, _PROTOCOL)

        with self._writing() as db:
            db.executemany("INSERT OR REPLACE INTO s VALUES (?, ?)", pickled())
        self.count = n

    @contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed, or rolled back on any error; SQLite's
        errors become :class:`StateStorageError`."""
        db = self.db
        try:
            db.execute("BEGIN")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # (SQLite rolls back itself on some errors: full)
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._error("write", exc) from exc

    def close(self) -> None:
        """Close the file (the caller deletes the run's directory)."""
        self.dirty.clear()
        self.clean.clear()
        self.db.close()
