"""The checkpoint store: complete checkpoints of flows' state in one SQLite file (or, for
workers on several machines, a PostgreSQL schema: :mod:`sluiceway.checkpoint.postgres`,
the same tables and SQL behind a :class:`Backend`; a ``postgresql://`` URL in place of the
directory selects it).

A checkpoint is a set of :class:`OperatorState` blobs (pickled by the runtime; the store
never unpickles them) saved under a flow's name and an id in **one** SQLite transaction,
so a crash in the middle of a save leaves the previous checkpoints exactly as they were.
Several flows may share a store, one after the other or at the same time (each process
with its own connection; SQLite serializes the saves): ids count per flow, and the store
keeps the newest ``keep`` checkpoints *of each flow*, pruning older ones of that flow in
the same transaction.

The file, ``DIR/checkpoints.db``, format version 2::

    meta         key -> value: application = sluiceway-checkpoints, format_version = 2,
                 last_id (ids of every flow start above it: the last id of a version 1 file)
    flows        one row per flow that ever saved: flow, last_id (the largest id it ever
                 saved: its ids are never reused)
    checkpoints  one row per checkpoint: flow, id, created, duration, size, operators,
                 final, format_version, digest
    parts        one row per operator state: flow, checkpoint_id, name, kind, size,
                 sha256, data

A file of format version 1 (ids counted across all flows, ``keep`` too) is migrated to
version 2 in one transaction the first time this version opens it; its checkpoints keep
their ids and verify as before.

Every read verifies what it returns: each blob against its sha256, and the checkpoint
row against a digest over its id, flow, operator count and every part's name, kind and
sha256.  A missing part, altered bytes or a changed count make the checkpoint *torn*;
:meth:`CheckpointStore.latest` then falls back to the previous checkpoint that verifies,
with a warning.  A file that is not a checkpoint store, that SQLite cannot read, or that
a newer sluiceway wrote raises :class:`~sluiceway.errors.CheckpointCorruptError`.

>>> import tempfile
>>> with tempfile.TemporaryDirectory() as tmp, CheckpointStore(tmp, keep=2) as store:
...     for n in (1, 2, 3):
...         state = OperatorState("count", "map", bytes([n]))
...         _ = store.save("clicks", n, {"count": state}, created=1.0e9 + n, duration=0.01)
...     [info.id for info, problem in store.list()], store.next_id()
...     store.latest("clicks").states["count"].data
([3, 2], 4)
b'\\x03'
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NoReturn, Self

from sluiceway.checkpoint.backend import Backend, Connection
from sluiceway.errors import CheckpointCorruptError, CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "Backend",
    "ChainInfo",
    "Checkpoint",
    "CheckpointConflictError",
    "CheckpointInfo",
    "CheckpointNotFoundError",
    "CheckpointStore",
    "Connection",
    "OperatorState",
    "PartInfo",
    "Segment",
    "is_url",
    "sub_location",
]

FORMAT_VERSION: Final = 3
"""The layout of the store file.  A file with a newer version is refused, never guessed at;
an older one (1, 2) is migrated."""

_APPLICATION: Final = "sluiceway-checkpoints"
_TABLES: Final = frozenset({"meta", "flows", "checkpoints", "parts", "segments", "refs"})
_URL_SCHEMES: Final = ("postgresql://", "postgres://")
_BUSY_TIMEOUT_MS: Final = 10_000
# A long-lived connection keeps its WAL file; after a checkpoint of the WAL into the
# database, SQLite truncates the WAL back to this size (bytes), so one huge save does not
# leave a huge WAL behind.
_JOURNAL_SIZE_LIMIT: Final = 16 * 1024 * 1024

log = logging.getLogger("sluiceway")

_SCHEMA_2: Final = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS flows (
        flow TEXT PRIMARY KEY,
        last_id INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        flow TEXT NOT NULL,
        id INTEGER NOT NULL,
        created REAL NOT NULL,
        duration REAL NOT NULL,
        size INTEGER NOT NULL,
        operators INTEGER NOT NULL,
        final INTEGER NOT NULL,
        format_version INTEGER NOT NULL,
        digest TEXT NOT NULL,
        PRIMARY KEY (flow, id)
    )""",
    """CREATE TABLE IF NOT EXISTS parts (
        flow TEXT NOT NULL,
        checkpoint_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (flow, checkpoint_id, name)
    )""",
)

_SEGMENTS: Final = (
    """CREATE TABLE IF NOT EXISTS segments (
        id INTEGER PRIMARY KEY,
        flow TEXT NOT NULL,
        operator TEXT NOT NULL,
        partition TEXT NOT NULL,
        whole INTEGER NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        data BLOB NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS refs (
        flow TEXT NOT NULL,
        checkpoint_id INTEGER NOT NULL,
        operator TEXT NOT NULL,
        partition TEXT NOT NULL,
        position INTEGER NOT NULL,
        segment_id INTEGER NOT NULL,
        PRIMARY KEY (flow, checkpoint_id, operator, partition, position)
    )""",
    "CREATE INDEX IF NOT EXISTS refs_by_segment ON refs (segment_id)",
)
"""Version 3: incremental parts.  A segment is one partition's whole state (a base) or its
changes since the segment before (a delta), as the runtime encoded them; ``refs`` lists,
per checkpoint, operator and partition, the chain it needs: a base, then deltas, oldest
first.  Segments are shared by the checkpoints whose chains hold them and deleted when
no kept checkpoint refers to them any more."""

_COLUMNS_3: Final = (
    "ALTER TABLE checkpoints ADD COLUMN base_bytes INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE checkpoints ADD COLUMN delta_bytes INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE parts ADD COLUMN partitions INTEGER",
)

_MIGRATE_FROM_1: Final = (
    "DROP INDEX IF EXISTS checkpoints_by_flow",
    "ALTER TABLE checkpoints RENAME TO checkpoints_v1",
    "ALTER TABLE parts RENAME TO parts_v1",
    *_SCHEMA_2[1:],
    "INSERT INTO checkpoints (flow, id, created, duration, size, operators, final,"
    " format_version, digest) SELECT flow, id, created, duration, size, operators, final,"
    " format_version, digest FROM checkpoints_v1",
    "INSERT INTO parts (flow, checkpoint_id, name, kind, size, sha256, data)"
    " SELECT c.flow, p.checkpoint_id, p.name, p.kind, p.size, p.sha256, p.data"
    " FROM parts_v1 p JOIN checkpoints_v1 c ON c.id = p.checkpoint_id",
    "INSERT INTO flows (flow, last_id) SELECT flow, max(id) FROM checkpoints_v1 GROUP BY flow",
    "DROP TABLE parts_v1",
    "DROP TABLE checkpoints_v1",
    "UPDATE meta SET value = '2' WHERE key = 'format_version'",
)
"""Version 1 -> 2: ids and ``keep`` per flow.  Version 1's ``last_id`` stays in meta as the
floor of every flow's ids, so no id it gave out is given out again."""

_SCHEMA: Final = (
    _SCHEMA_2[0],
    _SCHEMA_2[1],
    _SCHEMA_2[2].replace(
        "digest TEXT NOT NULL,",
        "digest TEXT NOT NULL,\n        base_bytes INTEGER NOT NULL DEFAULT 0,"
        "\n        delta_bytes INTEGER NOT NULL DEFAULT 0,",
    ),
    _SCHEMA_2[3].replace("data BLOB NOT NULL,", "data BLOB NOT NULL, partitions INTEGER,"),
    *_SEGMENTS,
)
"""A new file: version 3 (idempotent, as another process may create it at the same time)."""

_MIGRATE_FROM_2: Final = (
    *_COLUMNS_3,
    *_SEGMENTS,
    "UPDATE meta SET value = '3' WHERE key = 'format_version'",
)
"""Version 2 -> 3: the tables of incremental parts, and two columns; every checkpoint of
version 2 keeps its rows, digest and ``format_version`` 2 (it has no incremental part)."""


@dataclass(frozen=True, slots=True)
class Segment:
    """One partition's state in an incremental part: whole (a base) or the changes since
    the checkpoint the save names as its ``parent`` (a delta), encoded by the runtime."""

    whole: bool
    data: bytes


@dataclass(frozen=True, slots=True)
class OperatorState:
    """The saved state of one operator.

    Attributes:
        name: the operator's name, unique in its flow.
        kind: the operator's kind, e.g. ``"map"``, ``"window"``, ``"source"``, ``"sink"``.
        data: the state, encoded and signed by the runtime
            (:mod:`sluiceway.checkpoint.codec`).  The store hashes and keeps these bytes
            and never decodes them; its sha256 digests catch accidents, the signatures
            inside the bytes catch forgeries.
        segments: None for a whole part.  For an *incremental* part: partition ->
            :class:`Segment` of what is new for that partition since the parent
            checkpoint (each one signed by the runtime too); a partition that is absent
            keeps the parent's chain.  ``data`` then holds what the runtime keeps beside
            the partitions (often nothing).
        dropped: partitions of an incremental part that are gone (their chains are not
            carried into this checkpoint).
    """

    name: str
    kind: str
    data: bytes
    segments: Mapping[str, Segment] | None = None
    dropped: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """What the store knows about a checkpoint, without its state.

    Attributes:
        id: the checkpoint id; ids of a flow increase within a store file and are never
            reused (each flow counts its own).
        flow: the name of the flow that took it.
        created: when it was taken, in epoch seconds (passed in by the caller's clock).
        duration: how many seconds taking it took (passed in by the caller).
        size: the total bytes of operator state.
        operators: how many :class:`OperatorState` entries it holds.
        final: whether it was taken as the flow stopped or ended.
        format_version: the store format it was written in.
        base_bytes: bytes of whole partition states (bases) this checkpoint wrote for its
            incremental parts.
        delta_bytes: bytes of partition changes (deltas) it wrote.  What the save wrote
            in all is ``size + base_bytes + delta_bytes``.
    """

    id: int
    flow: str
    created: float
    duration: float
    size: int
    operators: int
    final: bool
    format_version: int
    base_bytes: int = 0
    delta_bytes: int = 0

    @property
    def written(self) -> int:
        """The bytes this checkpoint's save wrote: parts, bases and deltas."""
        return self.size + self.base_bytes + self.delta_bytes


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A complete, verified checkpoint: its info and every operator's state by name.

    ``chains`` holds the incremental parts: operator -> partition -> the encoded base and
    the deltas after it, oldest first (what the runtime folds into the whole state)."""

    info: CheckpointInfo
    states: dict[str, OperatorState]
    chains: dict[str, dict[str, tuple[bytes, ...]]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChainInfo:
    """One partition's chain in an incremental part (for ``inspect``).

    Attributes:
        partition: the partition, as the runtime named it.
        base_size: bytes of its base.
        deltas: how many deltas follow the base.
        delta_size: their bytes.
    """

    partition: str
    base_size: int
    deltas: int
    delta_size: int


@dataclass(frozen=True, slots=True)
class PartInfo:
    """One operator state as stored, without its bytes (for ``inspect``).

    Attributes:
        name: the operator's name.
        kind: the operator's kind.
        size: the stored number of bytes.
        sha256: the stored sha256 of the bytes, in hex.
        chains: for an incremental part, its partitions' chains (empty for a whole part).
    """

    name: str
    kind: str
    size: int
    sha256: str
    chains: tuple[ChainInfo, ...] = ()

    @property
    def incremental(self) -> bool:
        """True for a part kept as per-partition bases and deltas."""
        return bool(self.chains)


class CheckpointNotFoundError(CheckpointError, KeyError):
    """No checkpoint with the asked-for id is in the store (also a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointConflictError(CheckpointError, ValueError):
    """Another run of the flow saved this checkpoint id (or a later one) in the same store
    first: two runs share the checkpoint directory at once.  Also a ``ValueError``, as
    before it had a class of its own."""


def _digest(
    checkpoint_id: int,
    flow: str,
    *,
    final: bool,
    size: int,
    count: int,
    format_version: int,
    parts: list[tuple[Any, ...]],
) -> str:
    """The checkpoint-level digest: over the row's identity and every part's hash."""
    canonical = json.dumps(
        [format_version, checkpoint_id, flow, final, size, count, sorted(parts)],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _check_state(key: object, state: object) -> OperatorState:
    if not isinstance(state, OperatorState):
        raise TypeError(f"states[{key!r}] must be an OperatorState, got {type(state).__name__}")
    if key != state.name:
        raise ValueError(
            f"states must be keyed by operator name: key {key!r} holds the state of "
            f"operator {state.name!r}"
        )
    if not isinstance(state.name, str) or not state.name:
        raise ValueError(f"operator name must be a non-empty string, got {state.name!r}")
    if not isinstance(state.kind, str) or not state.kind:
        raise ValueError(
            f"operator kind must be a non-empty string, got {state.kind!r} "
            f"(operator {state.name!r})"
        )
    if not isinstance(state.data, bytes):
        raise TypeError(
            f"state data must be bytes, got {type(state.data).__name__} (operator {state.name!r})"
        )
    for partition, segment in (state.segments or {}).items():
        if not isinstance(partition, str) or not isinstance(segment, Segment):
            raise TypeError(
                f"segments of operator {state.name!r} must map partition names (str) to "
                f"Segment, got {partition!r}: {type(segment).__name__}"
            )
        if not isinstance(segment.data, bytes):
            raise TypeError(
                f"segment data must be bytes, got {type(segment.data).__name__} (operator "
                f"{state.name!r}, partition {partition!r})"
            )
    if state.dropped and state.segments is None:
        raise ValueError(f"operator {state.name!r}: dropped partitions need an incremental part")
    return state


class CheckpointStore:
    """Complete checkpoints in ``DIR/checkpoints.db``, the newest ``keep`` of them.

    Args:
        directory: where the store file lives.  Created by the first :meth:`save`; the
            reading methods never create it (a missing file reads as no checkpoints).
        keep: how many checkpoints to keep of each flow in the file, at least 1.

    Raises:
        ValueError: ``keep`` is below 1.

    Threading: the store holds one SQLite connection (``check_same_thread=False``) and a
    lock that every method takes for its whole call.  So one writer thread (the runtime
    saves through ``asyncio.to_thread``) and reads from the event-loop thread are safe; a
    read waits at most for the save in progress.  Other *processes* (``sluiceway
    checkpoints list`` beside a running flow) read without blocking the writer, because
    the file is in WAL mode (see :meth:`_prepare_for_writing`); other stores on the same
    file (flows sharing a directory, in this process or others) save in turn, each save
    one short transaction.
    """

    FILENAME: Final = "checkpoints.db"

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 3) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a whole number >= 1, got {keep!r}")
        self._backend = _backend_for(directory)
        self._keep = keep
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._writable = False
        self._closed = False

    # -- public API ---------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The store file: ``directory / "checkpoints.db"`` (SQLite only).

        Raises:
            ValueError: the store is in PostgreSQL (see :attr:`where`).
        """
        if not isinstance(self._backend, _SQLite):
            raise ValueError(f"the checkpoint store {self.where} is not a file")
        return self._backend.path

    @property
    def where(self) -> str:
        """The store, for messages: its file, or its PostgreSQL URL without the password."""
        return self._backend.where

    @property
    def keep(self) -> int:
        """How many checkpoints of each flow the store keeps."""
        return self._keep

    def save(
        self,
        flow: str,
        checkpoint_id: int,
        states: Mapping[str, OperatorState],
        *,
        created: float,
        duration: float,
        final: bool = False,
        parent: int | None = None,
    ) -> CheckpointInfo:
        """Save a complete checkpoint atomically, then prune the flow's to the newest ``keep``.

        Args:
            flow: the flow's name.
            checkpoint_id: greater than every id this flow saved in this file before (see
                :meth:`next_id`).
            states: every operator's state, keyed by operator name.
            created: when the checkpoint was taken, in epoch seconds.
            duration: how long taking it took, in seconds (>= 0).
            final: taken as the flow stopped or ended.
            parent: the checkpoint the deltas of incremental parts follow (the one the
                steps last snapshotted into, or restored from); its chains are carried
                on for partitions without a new segment.  None: no parent, every
                partition must be given whole.

        Returns:
            The saved checkpoint's info.

        Raises:
            CheckpointConflictError: the id does not increase (another run saved it).
            ValueError: an argument is out of range.
            TypeError: a state is not an :class:`OperatorState` of bytes.
            CheckpointCorruptError: the file is not a store this version can write.
            CheckpointError: the database failed to write (disk full, permissions, the
                server gone...), or a
                delta has no base in ``parent`` to follow.
        """
        if not isinstance(flow, str) or not flow:
            raise ValueError(f"flow must be a non-empty string, got {flow!r}")
        if isinstance(checkpoint_id, bool) or not isinstance(checkpoint_id, int):
            raise TypeError(f"checkpoint id must be an int, got {checkpoint_id!r}")
        if checkpoint_id < 1:
            raise ValueError(f"checkpoint id must be >= 1, got {checkpoint_id}")
        if not math.isfinite(created):
            raise ValueError(f"created must be a finite number of epoch seconds, got {created!r}")
        if not (math.isfinite(duration) and duration >= 0):
            raise ValueError(f"duration must be a number of seconds >= 0, got {duration!r}")
        checked = [_check_state(key, state) for key, state in states.items()]
        shas = [hashlib.sha256(s.data).hexdigest() for s in checked]
        segment_shas = {
            (s.name, p): hashlib.sha256(seg.data).hexdigest()
            for s in checked
            for p, seg in (s.segments or {}).items()
        }
        size = sum(len(s.data) for s in checked)
        base_bytes = sum(
            len(seg.data) for s in checked for seg in (s.segments or {}).values() if seg.whole
        )
        delta_bytes = sum(
            len(seg.data) for s in checked for seg in (s.segments or {}).values() if not seg.whole
        )
        info = CheckpointInfo(
            id=checkpoint_id,
            flow=flow,
            created=float(created),
            duration=float(duration),
            size=size,
            operators=len(checked),
            final=bool(final),
            format_version=FORMAT_VERSION,
            base_bytes=base_bytes,
            delta_bytes=delta_bytes,
        )
        with self._lock:
            conn = self._open_for_writing()
            try:
                with self._transaction(conn):
                    last = self._last_id(conn, flow)
                    if checkpoint_id <= last:
                        raise CheckpointConflictError(
                            f"checkpoint ids must increase: got {checkpoint_id}, but "
                            f"{last} was already saved for flow {flow!r} in {self.where} "
                            f"(next_id() is {last + 1}); is another run of flow {flow!r} "
                            "using this checkpoint directory at the same time?"
                        )
                    counts = {
                        s.name: self._save_chains(
                            conn, flow, checkpoint_id, parent, s, segment_shas
                        )
                        for s in checked
                        if s.segments is not None
                    }
                    hashes = [
                        (s.name, s.kind, sha)
                        if s.segments is None
                        else (s.name, s.kind, sha, counts[s.name])
                        for s, sha in zip(checked, shas, strict=True)
                    ]
                    digest = _digest(
                        checkpoint_id,
                        flow,
                        final=info.final,
                        size=size,
                        count=len(checked),
                        format_version=FORMAT_VERSION,
                        parts=hashes,
                    )
                    conn.execute(
                        "INSERT INTO checkpoints (flow, id, created, duration, size, operators,"
                        " final, format_version, digest, base_bytes, delta_bytes)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            info.flow,
                            info.id,
                            info.created,
                            info.duration,
                            info.size,
                            info.operators,
                            int(info.final),
                            info.format_version,
                            digest,
                            base_bytes,
                            delta_bytes,
                        ),
                    )
                    conn.executemany(
                        "INSERT INTO parts (flow, checkpoint_id, name, kind, size, sha256, data,"
                        " partitions) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            (
                                flow,
                                checkpoint_id,
                                s.name,
                                s.kind,
                                len(s.data),
                                sha,
                                s.data,
                                counts.get(s.name),
                            )
                            for s, sha in zip(checked, shas, strict=True)
                        ),
                    )
                    conn.execute(
                        "INSERT INTO flows (flow, last_id) VALUES (?, ?) ON CONFLICT (flow)"
                        " DO UPDATE SET last_id = excluded.last_id",
                        (flow, checkpoint_id),
                    )
                    self._prune(conn, flow)
            except self._backend.Error as exc:
                raise CheckpointError(
                    f"could not save checkpoint {checkpoint_id} of flow {flow!r} to "
                    f"{self.where}: {exc}"
                ) from exc
        return info

    def _save_chains(
        self,
        conn: Connection,
        flow: str,
        checkpoint_id: int,
        parent: int | None,
        state: OperatorState,
        shas: Mapping[tuple[str, str], str],
    ) -> int:
        """Write an incremental part's new segments and the chains the checkpoint needs
        (the parent's, carried on, with the new segments); returns how many partitions."""
        chains = {} if parent is None else self._chains(conn, flow, parent, state.name)
        for partition in state.dropped:
            chains.pop(partition, None)
        for partition, segment in sorted((state.segments or {}).items()):
            if not segment.whole and partition not in chains:
                of = "no parent checkpoint" if parent is None else f"checkpoint {parent}"
                raise CheckpointError(
                    f"could not save checkpoint {checkpoint_id} of flow {flow!r} to "
                    f"{self.where}: operator {state.name!r} gave changes for partition "
                    f"{partition!r}, but {of} holds a base for them to follow (the first "
                    "snapshot of a partition, and the first after a restore from a whole "
                    "part, must be whole)"
                )
            sid = self._insert_segment(
                conn,
                (
                    flow,
                    state.name,
                    partition,
                    int(segment.whole),
                    len(segment.data),
                    shas[(state.name, partition)],
                    segment.data,
                ),
            )
            chains[partition] = [sid] if segment.whole else [*chains[partition], sid]
        conn.executemany(
            "INSERT INTO refs (flow, checkpoint_id, operator, partition, position, segment_id)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                (flow, checkpoint_id, state.name, partition, position, sid)
                for partition, ids in chains.items()
                for position, sid in enumerate(ids)
            ),
        )
        return len(chains)

    def _insert_segment(self, conn: Connection, row: tuple[Any, ...]) -> int:
        """Insert one segment; its new id."""
        cursor = conn.execute(
            "INSERT INTO segments (flow, operator, partition, whole, size, sha256, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)" + self._backend.returning_id,
            row,
        )
        sid = self._backend.inserted_id(cursor)
        assert sid is not None
        return sid

    @staticmethod
    def _chains(
        conn: Connection, flow: str, checkpoint_id: int, operator: str
    ) -> dict[str, builtins.list[int]]:
        """The segment ids of each partition's chain of an incremental part, oldest first."""
        chains: dict[str, builtins.list[int]] = {}
        for partition, sid in conn.execute(
            "SELECT partition, segment_id FROM refs WHERE flow = ? AND checkpoint_id = ? AND"
            " operator = ? ORDER BY partition, position",
            (flow, checkpoint_id, operator),
        ):
            chains.setdefault(str(partition), []).append(int(sid))
        return chains

    def latest(self, flow: str) -> Checkpoint | None:
        """The newest checkpoint of ``flow`` that verifies, or None if it has none.

        A torn newest checkpoint is skipped with a WARNING on the ``sluiceway`` logger
        (naming its id, the file and why) and the previous one is returned.

        Raises:
            CheckpointCorruptError: ``flow`` has checkpoints but none verifies (the message
                lists each one's reason), or the file is not a readable store.
        """
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return None
            with self._reading():
                ids = [
                    row[0]
                    for row in conn.execute(
                        "SELECT id FROM checkpoints WHERE flow = ? ORDER BY id DESC", (flow,)
                    )
                ]
                problems: list[str] = []
                for checkpoint_id in ids:
                    checkpoint, problem = self._read(conn, flow, checkpoint_id)
                    if problem is None:
                        return checkpoint
                    problems.append(f"checkpoint {checkpoint_id}: {problem}")
                    log.warning(
                        "checkpoint %d of flow %r in %s is torn (%s); trying the previous "
                        "checkpoint",
                        checkpoint_id,
                        flow,
                        self.where,
                        problem,
                    )
        if not problems:
            return None
        raise CheckpointCorruptError(
            f"no checkpoint of flow {flow!r} in {self.where} verifies: " + "; ".join(problems)
        )

    def load(self, checkpoint_id: int, flow: str | None = None) -> Checkpoint:
        """The checkpoint with this id (of ``flow``; None: of the one flow that has it),
        verified.

        Raises:
            CheckpointNotFoundError: no such checkpoint (also a ``KeyError``).
            CheckpointCorruptError: it does not verify, or the file is not a readable store.
            ValueError: ``flow`` is None and several flows have a checkpoint with this id.
        """
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                raise CheckpointNotFoundError(
                    f"no checkpoint {checkpoint_id}: {self.where} does not exist"
                )
            with self._reading():
                flow = self._flow_of(conn, checkpoint_id, flow)
                checkpoint, problem = self._read(conn, flow, checkpoint_id)
        if problem is not None:
            raise CheckpointCorruptError(
                f"checkpoint {checkpoint_id} of flow {flow!r} in {self.where} is torn: {problem}"
            )
        return checkpoint

    def list(self, flow: str | None = None) -> list[tuple[CheckpointInfo, str | None]]:
        """Every checkpoint (of ``flow``, or of every flow by name), newest first, each
        with None if it verifies, else why not.

        Raises:
            CheckpointCorruptError: the file is not a readable store.
        """
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return []
            with self._reading():
                rows = conn.execute(
                    "SELECT flow, id FROM checkpoints WHERE CAST(? AS TEXT) IS NULL OR flow = ?"
                    " ORDER BY flow, id DESC",
                    (flow, flow),
                ).fetchall()
                found: builtins.list[tuple[CheckpointInfo, str | None]] = []
                for name, checkpoint_id in rows:
                    checkpoint, problem = self._read(conn, str(name), int(checkpoint_id))
                    found.append((checkpoint.info, problem))
        return found

    def flows(self) -> builtins.list[str]:
        """The names of the flows that have checkpoints in the store, sorted."""
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return []
            with self._reading():
                rows = conn.execute("SELECT DISTINCT flow FROM checkpoints ORDER BY flow")
                return [str(row[0]) for row in rows]

    def parts(self, checkpoint_id: int, flow: str | None = None) -> builtins.list[PartInfo]:
        """The stored parts of a checkpoint (name, kind, size, sha256), sorted by name.

        Unlike :meth:`load` this does not verify: it shows what is there, also for a torn
        checkpoint.  ``flow`` as for :meth:`load`.

        Raises:
            CheckpointNotFoundError: no such checkpoint.
            CheckpointCorruptError: the file is not a readable store.
            ValueError: ``flow`` is None and several flows have a checkpoint with this id.
        """
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                raise CheckpointNotFoundError(
                    f"no checkpoint {checkpoint_id}: {self.where} does not exist"
                )
            with self._reading():
                flow = self._flow_of(conn, checkpoint_id, flow)
                rows = conn.execute(
                    "SELECT name, kind, size, sha256 FROM parts WHERE flow = ? AND"
                    " checkpoint_id = ? ORDER BY name",
                    (flow, checkpoint_id),
                ).fetchall()
                chains: dict[str, builtins.list[ChainInfo]] = {}
                for name, partition, base, deltas, delta_size in conn.execute(
                    "SELECT r.operator, r.partition, sum(CASE WHEN r.position = 0 THEN s.size"
                    " ELSE 0 END), count(*) - 1, sum(CASE WHEN r.position > 0 THEN s.size"
                    " ELSE 0 END) FROM refs r LEFT JOIN segments s ON s.id = r.segment_id"
                    " WHERE r.flow = ? AND r.checkpoint_id = ?"
                    " GROUP BY r.operator, r.partition ORDER BY r.operator, r.partition",
                    (flow, checkpoint_id),
                ):
                    chains.setdefault(str(name), []).append(
                        ChainInfo(str(partition), int(base or 0), int(deltas), int(delta_size or 0))
                    )
        return [
            PartInfo(str(n), str(k), int(s), str(h), tuple(chains.get(str(n), ())))
            for n, k, s, h in rows
        ]

    def due(
        self, flow: str, *, ratio: float = 0.5, after: int = 10
    ) -> builtins.list[tuple[str, str, int]]:
        """The chains of ``flow``'s newest checkpoint that :meth:`compact` would fold:
        ``(operator, partition, bytes of the chain)``.

        A chain (one operator's partition) is due when its deltas' bytes exceed ``ratio``
        times its base's, or when it has ``after`` deltas or more.
        """
        return [(op, p, size) for op, p, _, size in self._due(flow, ratio, after)[1]]

    def _due(
        self, flow: str, ratio: float, after: int
    ) -> tuple[int | None, builtins.list[tuple[str, str, builtins.list[int], int]]]:
        if not (ratio > 0 and math.isfinite(ratio)):
            raise ValueError(f"compaction ratio must be a finite number > 0, got {ratio!r}")
        if isinstance(after, bool) or not isinstance(after, int) or after < 1:
            raise ValueError(f"compaction after must be a whole number >= 1, got {after!r}")
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return None, []
            with self._reading():
                row = conn.execute(
                    "SELECT max(id) FROM checkpoints WHERE flow = ?", (flow,)
                ).fetchone()
                newest = None if row is None or row[0] is None else int(row[0])
                chains: dict[tuple[str, str], builtins.list[tuple[int, int]]] = {}
                for operator, partition, sid, size in conn.execute(
                    "SELECT r.operator, r.partition, r.segment_id, s.size"
                    " FROM refs r JOIN segments s ON s.id = r.segment_id"
                    " WHERE r.flow = ? AND r.checkpoint_id = ?"
                    " ORDER BY r.operator, r.partition, r.position",
                    (flow, newest),
                ):
                    chains.setdefault((str(operator), str(partition)), []).append(
                        (int(sid), int(size))
                    )
        due = []
        for (operator, partition), chain in chains.items():
            deltas = sum(size for _, size in chain[1:])
            if len(chain) > 1 and (len(chain) - 1 >= after or deltas > ratio * chain[0][1]):
                total = chain[0][1] + deltas
                due.append((operator, partition, [sid for sid, _ in chain], total))
        return newest, due

    def compact(
        self,
        flow: str,
        fold: Callable[[str, str, Sequence[bytes]], bytes],
        *,
        ratio: float = 0.5,
        after: int = 10,
        larger_than: int = -1,
        at_most: int | None = None,
    ) -> int:
        """Fold the due chains (see :meth:`due`) of ``flow``'s newest checkpoint into new
        bases; returns how many.  ``larger_than`` / ``at_most``: only the chains of that
        many bytes (the runtime folds small chains in its thread, large ones in a
        process of their own).

        ``fold(operator, partition, segments)`` turns a chain's encoded segments (base
        first) into the encoded whole state; the store never decodes them itself (the
        runtime's fold verifies their signatures first and signs the new base).  Each
        chain is swapped for its new base in one transaction, which also deletes the
        segments no kept checkpoint needs any more (older checkpoints keep their own
        chains): a crash at any point leaves either the old chain or the new base, both
        valid.  Works from what is
        stored, never from a running flow's state, so it may run while the flow takes its
        next checkpoints: every checkpoint whose chain starts with the folded one -- also
        one saved meanwhile, on top of it -- gets the new base in its place.

        Raises:
            CheckpointError: the database failed, or a segment does not verify (the chain is
                left as it is).
        """
        newest, due = self._due(flow, ratio, after)
        done = 0
        for operator, partition, chain, size in due:
            if size <= larger_than or (at_most is not None and size > at_most):
                continue
            assert newest is not None
            conn = self._conn
            assert conn is not None
            done += self._compact_chain(conn, flow, newest, operator, partition, chain, fold)
        return done

    def _compact_chain(
        self,
        conn: Connection,
        flow: str,
        checkpoint_id: int,
        operator: str,
        partition: str,
        chain: builtins.list[int],
        fold: Callable[[str, str, Sequence[bytes]], bytes],
    ) -> int:
        """Fold one chain and swap it in (if it is still the newest checkpoint's)."""
        with self._lock, self._reading():
            blobs: builtins.list[bytes] = []
            for sid in chain:
                found = conn.execute(
                    "SELECT data, sha256 FROM segments WHERE id = ?", (sid,)
                ).fetchone()
                if found is None or hashlib.sha256(bytes(found[0])).hexdigest() != found[1]:
                    raise CheckpointError(
                        f"cannot compact checkpoint {checkpoint_id} of flow {flow!r} in "
                        f"{self.where}: segment {sid} of operator {operator!r} partition "
                        f"{partition} is missing or altered"
                    )
                blobs.append(bytes(found[0]))
        # Outside the lock: the runtime verifies, decodes, folds, encodes and signs.
        data = fold(operator, partition, blobs)
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            self._prepare_for_writing(conn)
            try:
                with self._transaction(conn):
                    # Every kept checkpoint whose chain starts with the folded one (the
                    # compacted checkpoint, and those saved on top of it meanwhile) now
                    # starts with the new base instead.
                    users: dict[int, builtins.list[int]] = {}
                    for cid, sid in conn.execute(
                        "SELECT checkpoint_id, segment_id FROM refs WHERE flow = ? AND"
                        " operator = ? AND partition = ? ORDER BY checkpoint_id, position",
                        (flow, operator, partition),
                    ):
                        users.setdefault(int(cid), []).append(int(sid))
                    users = {c: ids for c, ids in users.items() if ids[: len(chain)] == chain}
                    if not users:
                        return 0  # pruned meanwhile: nothing to swap
                    new = self._insert_segment(
                        conn, (flow, operator, partition, 1, len(data), sha, data)
                    )
                    for cid, ids in users.items():
                        conn.execute(
                            "DELETE FROM refs WHERE flow = ? AND checkpoint_id = ? AND"
                            " operator = ? AND partition = ?",
                            (flow, cid, operator, partition),
                        )
                        conn.executemany(
                            "INSERT INTO refs (flow, checkpoint_id, operator, partition,"
                            " position, segment_id) VALUES (?, ?, ?, ?, ?, ?)",
                            (
                                (flow, cid, operator, partition, position, sid)
                                for position, sid in enumerate([new, *ids[len(chain) :]])
                            ),
                        )
                    self._drop_unreferenced(conn, flow)
            except self._backend.Error as exc:
                raise CheckpointError(
                    f"could not compact checkpoint {checkpoint_id} of flow {flow!r} in "
                    f"{self.where}: {exc}"
                ) from exc
        return 1

    def next_id(self, flow: str | None = None) -> int:
        """The id for ``flow``'s next checkpoint: 1 + the largest id it ever saved here
        (ids are never reused, not even after :meth:`reset`); 1 for a new store.  With no
        ``flow``: 1 + the largest id any flow saved."""
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return 1
            with self._reading():
                return self._last_id(conn, flow) + 1

    def reset(self, flow: str | None = None) -> int:
        """Delete every checkpoint (of ``flow``, or of every flow); returns how many there
        were.

        The id counters are kept, so ids are never reused: something keyed by a checkpoint
        id elsewhere (a sink's part file) cannot be mistaken for a later checkpoint.
        Deleting the file starts a store over at 1.
        """
        with self._lock:
            conn = self._open(create=False)
            if conn is None:
                return 0
            self._prepare_for_writing(conn)
            where = ("WHERE CAST(? AS TEXT) IS NULL OR flow = ?", (flow, flow))
            try:
                with self._transaction(conn):
                    count = int(
                        conn.execute(
                            f"SELECT count(*) FROM checkpoints {where[0]}", where[1]
                        ).fetchone()[0]
                    )
                    conn.execute(f"DELETE FROM parts {where[0]}", where[1])
                    conn.execute(f"DELETE FROM checkpoints {where[0]}", where[1])
                    conn.execute(f"DELETE FROM refs {where[0]}", where[1])
                    self._drop_unreferenced(conn, flow)
            except self._backend.DatabaseError as exc:
                raise self._unreadable(exc) from exc
        return count

    def close(self) -> None:
        """Close the store's connection.  Idempotent; the store cannot be used after."""
        with self._lock:
            self._closed = True
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointStore({self.where!r}, keep={self._keep})"

    # -- opening ------------------------------------------------------------------------

    def _open(self, *, create: bool) -> Connection | None:
        """The connection, opened on first use; None if there is no store and not ``create``.

        Called with the lock held.  A reading method never creates the store (a directory
        or file; a schema); an empty one (a creation that was interrupted) reads as no
        store, and the first save initializes it.  A connection the server broke (a
        PostgreSQL restart) is replaced.
        """
        if self._closed:
            raise CheckpointError(f"the checkpoint store at {self.where} is closed")
        if self._conn is not None and self._backend.broken(self._conn):
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn, self._writable = None, False
        if self._conn is None:
            self._conn = self._connect(create=create)
        if self._conn is not None and create:
            self._prepare_for_writing(self._conn)
        return self._conn

    def _open_for_writing(self) -> Connection:
        conn = self._open(create=True)
        assert conn is not None  # create=True opens or raises
        return conn

    def _connect(self, *, create: bool) -> Connection | None:
        conn = self._backend.connect(create=create)
        if conn is None:
            return None
        try:
            is_store = self._validate(conn, initialize=create)
            if is_store:
                self._backend.configure(conn)
        except BaseException:
            conn.close()
            raise
        if not is_store:
            conn.close()
            return None
        return conn

    def _validate(self, conn: Connection, *, initialize: bool) -> bool:
        """Check that the store is a sluiceway store of a format this version reads.

        Returns False for an empty store when not ``initialize`` (it is initialized
        otherwise).
        """
        try:
            tables = self._backend.tables(conn)
            if not tables:
                if not initialize:
                    return False
                self._initialize(conn)  # idempotent: another process may be at it too
                tables = set(_TABLES)
            if "meta" not in tables:
                found = f"{self._backend.kind} with tables {', '.join(sorted(tables))}"
                raise self._not_a_store(found)
            meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        except self._backend.DatabaseError as exc:
            raise self._unreadable(exc) from exc
        if meta.get("application") != _APPLICATION:
            raise self._not_a_store(
                f"{self._backend.kind} whose meta table has application={meta.get('application')!r}"
            )
        raw = meta.get("format_version")
        try:
            version = int(raw) if raw is not None else 0
        except ValueError:
            version = 0
        if version > FORMAT_VERSION:
            raise CheckpointCorruptError(
                f"{self.where} was written in checkpoint format version {version}, newer than "
                f"this sluiceway reads (version {FORMAT_VERSION}); upgrade sluiceway, or use "
                "another checkpoint directory"
            )
        if version < 1:
            raise CheckpointCorruptError(
                f"{self.where} is a sluiceway checkpoint store with an invalid format version "
                f"{raw!r}; expected {FORMAT_VERSION}"
            )
        if version == 1:
            self._migrate_from_1(conn)
            tables = (tables - {"checkpoints_v1", "parts_v1"}) | {"flows"}
        if version <= 2:
            self._migrate_from_2(conn)
            tables |= {"segments", "refs"}
        missing = _TABLES - tables
        if missing or "last_id" not in meta:
            what = f"tables {', '.join(sorted(missing))}" if missing else "the last_id entry"
            raise CheckpointCorruptError(
                f"{self.where} is a damaged sluiceway checkpoint store: {what} missing"
            )
        return True

    def _initialize(self, conn: Connection) -> None:
        """Create the tables.  Safe when another process initializes the store at the same
        time: one transaction waits for the other, and nothing is created twice."""
        with self._transaction(conn):
            for statement in self._backend.schema:
                conn.execute(statement)
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                [
                    ("application", _APPLICATION),
                    ("format_version", str(FORMAT_VERSION)),
                    ("last_id", "0"),
                ],
            )
        self._backend.initialized()

    def _migrate_from_1(self, conn: Connection) -> None:
        """Rewrite a version 1 file as version 2; then on to 3."""
        self._migrate(conn, 1, 2, _MIGRATE_FROM_1)

    def _migrate_from_2(self, conn: Connection) -> None:
        """Add the tables and columns of incremental parts to a version 2 file."""
        self._migrate(conn, 2, FORMAT_VERSION, _MIGRATE_FROM_2)

    def _migrate(self, conn: Connection, old: int, new: int, statements: Sequence[str]) -> None:
        """Run ``statements`` on a version ``old`` file in one transaction, once: a
        process that finds it done already when it gets the write lock does nothing."""
        try:
            with self._transaction(conn):
                row = conn.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
                if row is not None and str(row[0]) == str(old):
                    for statement in statements:
                        conn.execute(statement)
        except self._backend.Error as exc:
            raise CheckpointError(
                f"cannot migrate the checkpoint store {self.where} from format version {old} "
                f"to {new} (it needs to be written once): {exc}"
            ) from exc
        log.info("checkpoint store %s migrated to format version %d", self.where, new)

    def _prepare_for_writing(self, conn: Connection) -> None:
        """Make the connection ready to write, once (SQLite: WAL mode, see
        :meth:`_SQLite.prepare_for_writing`)."""
        if self._writable:
            return
        try:
            self._backend.prepare_for_writing(conn)
        except self._backend.Error as exc:
            raise CheckpointError(f"cannot write the checkpoint store {self.where}: {exc}") from exc
        self._writable = True

    # -- reading ------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A read transaction (one consistent snapshot); database errors become
        errors naming the store (damage: CheckpointCorruptError)."""
        assert self._conn is not None
        conn = self._conn
        try:
            for statement in self._backend.begin_read:
                conn.execute(statement)
            try:
                yield
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        except self._backend.DatabaseError as exc:
            raise self._unreadable(exc) from exc

    @contextlib.contextmanager
    def _transaction(self, conn: Connection) -> Iterator[None]:
        """A write transaction, one writer of the store at a time (SQLite: BEGIN IMMEDIATE;
        PostgreSQL: a transaction lock on the store's schema) ... COMMIT, rolled back on
        any error."""
        try:
            for statement in self._backend.begin_write:
                conn.execute(statement)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @staticmethod
    def _last_id(conn: Connection, flow: str | None) -> int:
        """The largest id ``flow`` (None: any flow) saved, or the floor below every id."""
        row = conn.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()
        floor = int(row[0]) if row is not None else 0
        row = conn.execute(
            "SELECT max(last_id) FROM flows WHERE CAST(? AS TEXT) IS NULL OR flow = ?", (flow, flow)
        ).fetchone()
        return max(floor, int(row[0]) if row is not None and row[0] is not None else 0)

    def _flow_of(self, conn: Connection, checkpoint_id: int, flow: str | None) -> str:
        """The flow whose checkpoint ``checkpoint_id`` is meant (``flow`` if given)."""
        if flow is not None:
            return flow
        flows = [
            str(r[0])
            for r in conn.execute(
                "SELECT flow FROM checkpoints WHERE id = ? ORDER BY flow", (checkpoint_id,)
            )
        ]
        if len(flows) > 1:
            raise ValueError(
                f"flows {', '.join(map(repr, flows))} each have a checkpoint {checkpoint_id} "
                f"in {self.where}; say which flow (flow=...)"
            )
        if not flows:
            self._missing(conn, checkpoint_id, None)
        return flows[0]

    def _missing(self, conn: Connection, checkpoint_id: int, flow: str | None) -> NoReturn:
        have = [
            (str(f), int(i))
            for f, i in conn.execute(
                "SELECT flow, id FROM checkpoints WHERE CAST(? AS TEXT) IS NULL OR flow = ?"
                " ORDER BY flow, id",
                (flow, flow),
            )
        ]
        several = len({f for f, _ in have}) > 1
        listed = ", ".join(f"{f}/{i}" if several else str(i) for f, i in have) or "none"
        of = f" of flow {flow!r}" if flow is not None else ""
        raise CheckpointNotFoundError(
            f"no checkpoint {checkpoint_id}{of} in {self.where} (checkpoints there: {listed})"
        )

    def _row(self, conn: Connection, flow: str, checkpoint_id: int) -> tuple[Any, ...]:
        row = conn.execute(
            "SELECT id, flow, created, duration, size, operators, final, format_version, digest,"
            " base_bytes, delta_bytes FROM checkpoints WHERE flow = ? AND id = ?",
            (flow, checkpoint_id),
        ).fetchone()
        if row is None:
            self._missing(conn, checkpoint_id, flow)
        return tuple(row)

    def _read(
        self, conn: Connection, flow: str, checkpoint_id: int
    ) -> tuple[Checkpoint, str | None]:
        """The checkpoint as stored, and None if it verifies, else the reason it does not."""
        row = self._row(conn, flow, checkpoint_id)
        cid, flow, created, duration, size, count, final, version, digest, based, delta = row
        info = CheckpointInfo(
            id=int(cid),
            flow=str(flow),
            created=float(created),
            duration=float(duration),
            size=int(size),
            operators=int(count),
            final=bool(final),
            format_version=int(version),
            base_bytes=int(based),
            delta_bytes=int(delta),
        )
        states: dict[str, OperatorState] = {}
        chains: dict[str, dict[str, tuple[bytes, ...]]] = {}
        hashes: list[tuple[Any, ...]] = []
        problems: list[str] = []
        for name, kind, part_size, sha, data, partitions in conn.execute(
            "SELECT name, kind, size, sha256, data, partitions FROM parts WHERE flow = ? AND"
            " checkpoint_id = ? ORDER BY name",
            (flow, checkpoint_id),
        ):
            if partitions is not None:
                chains[str(name)] = self._read_chains(
                    conn, flow, checkpoint_id, str(name), int(partitions), problems
                )
                hashes.append((str(name), str(kind), str(sha), int(partitions)))
            else:
                hashes.append((str(name), str(kind), str(sha)))
            blob = bytes(data) if isinstance(data, bytes | bytearray | memoryview) else None
            if blob is None:
                problems.append(f"the state of operator {name!r} is not bytes")
                continue
            actual = hashlib.sha256(blob).hexdigest()
            if len(blob) != part_size or actual != sha:
                problems.append(
                    f"the state of operator {name!r} was altered ({len(blob)} bytes with "
                    f"sha256 {actual[:12]}, stored as {part_size} bytes with sha256 "
                    f"{str(sha)[:12]})"
                )
            states[str(name)] = OperatorState(str(name), str(kind), blob)
        if info.format_version > FORMAT_VERSION:
            problems.append(
                f"written in format version {info.format_version}, newer than this "
                f"sluiceway reads ({FORMAT_VERSION})"
            )
        if len(states) != info.operators:
            problems.append(f"{info.operators} operator states recorded but {len(states)} stored")
        total = sum(len(s.data) for s in states.values())
        if not problems and total != info.size:
            problems.append(f"{info.size} bytes of state recorded but {total} stored")
        if not problems:
            expected = _digest(
                info.id,
                info.flow,
                final=info.final,
                size=info.size,
                count=info.operators,
                format_version=info.format_version,
                parts=hashes,
            )
            if expected != digest:
                problems.append("its digest does not match its row and parts (altered)")
        return Checkpoint(info, states, chains), "; ".join(problems) or None

    def _read_chains(
        self,
        conn: Connection,
        flow: str,
        checkpoint_id: int,
        operator: str,
        partitions: int,
        problems: builtins.list[str],
    ) -> dict[str, tuple[bytes, ...]]:
        """An incremental part's chains, verified: each a base then deltas, every segment
        present and matching its sha256; adds what is wrong to ``problems``."""
        found: dict[str, builtins.list[bytes]] = {}
        for partition, position, sid, whole, seg_size, sha, data in conn.execute(
            "SELECT r.partition, r.position, r.segment_id, s.whole, s.size, s.sha256, s.data"
            " FROM refs r LEFT JOIN segments s ON s.id = r.segment_id"
            " WHERE r.flow = ? AND r.checkpoint_id = ? AND r.operator = ?"
            " ORDER BY r.partition, r.position",
            (flow, checkpoint_id, operator),
        ):
            where = f"segment {position} of partition {partition} of operator {operator!r}"
            chain = found.setdefault(str(partition), [])
            if data is None:
                problems.append(f"{where} (id {sid}) is missing")
                continue
            blob = bytes(data)
            actual = hashlib.sha256(blob).hexdigest()
            if len(blob) != seg_size or actual != sha:
                problems.append(
                    f"{where} was altered ({len(blob)} bytes with sha256 {actual[:12]}, "
                    f"stored as {seg_size} bytes with sha256 {str(sha)[:12]})"
                )
            if position != len(chain) or bool(whole) != (position == 0):
                problems.append(f"{where} is out of place (a chain is a base, then deltas)")
            chain.append(blob)
        if len(found) != partitions:
            problems.append(
                f"operator {operator!r}: {partitions} partition chains recorded but "
                f"{len(found)} stored"
            )
        return {p: tuple(chain) for p, chain in found.items()}

    # -- writing ------------------------------------------------------------------------

    def _prune(self, conn: Connection, flow: str) -> None:
        """Delete ``flow``'s checkpoints older than its newest ``keep`` (other flows'
        are theirs to prune)."""
        args = (flow, flow, self._keep)
        conn.execute(
            "DELETE FROM parts WHERE flow = ? AND checkpoint_id NOT IN"
            " (SELECT id FROM checkpoints WHERE flow = ? ORDER BY id DESC LIMIT ?)",
            args,
        )
        conn.execute(
            "DELETE FROM checkpoints WHERE flow = ? AND id NOT IN"
            " (SELECT id FROM checkpoints WHERE flow = ? ORDER BY id DESC LIMIT ?)",
            args,
        )
        conn.execute(
            "DELETE FROM refs WHERE flow = ? AND checkpoint_id NOT IN"
            " (SELECT id FROM checkpoints WHERE flow = ?)",
            (flow, flow),
        )
        self._drop_unreferenced(conn, flow)

    @staticmethod
    def _drop_unreferenced(conn: Connection, flow: str | None) -> None:
        """Delete the segments (of ``flow``) that no kept checkpoint's chain holds."""
        conn.execute(
            "DELETE FROM segments WHERE (CAST(? AS TEXT) IS NULL OR flow = ?) AND NOT EXISTS"
            " (SELECT 1 FROM refs WHERE refs.segment_id = segments.id)",
            (flow, flow),
        )

    # -- errors -------------------------------------------------------------------------

    def _not_a_store(self, found: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"{self.where} is not a sluiceway checkpoint store: found {found}; expected a "
            f"store written by sluiceway (format version {FORMAT_VERSION}). Move the file "
            "away or choose another checkpoint directory"
        )

    def _unreadable(self, exc: Exception) -> CheckpointError:
        """A database error while reading, as the backend judges it: damage
        (CheckpointCorruptError) or not (busy, I/O, permissions: CheckpointError)."""
        return self._backend.unreadable(exc, self.where)


class _SQLite:
    """The default backend: ``DIR/checkpoints.db``, a SQLite file in WAL mode with
    ``synchronous = FULL``."""

    Error: type[Exception] = sqlite3.Error
    DatabaseError: type[Exception] = sqlite3.DatabaseError
    kind = "a SQLite database"
    schema: Sequence[str] = _SCHEMA
    begin_read: Sequence[str] = ("BEGIN",)
    begin_write: Sequence[str] = ("BEGIN IMMEDIATE",)
    returning_id = ""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / CheckpointStore.FILENAME
        self.where = str(self.path)

    def connect(self, *, create: bool) -> Connection | None:
        path = self.path
        if path.is_dir():
            raise CheckpointCorruptError(
                f"{path} is a directory; expected the checkpoint store file (a SQLite "
                "database) there"
            )
        if not path.exists():
            if not create:
                return None
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CheckpointError(
                    f"cannot create the checkpoint directory {self.directory}: {exc}"
                ) from exc
        # mode=rw never creates a file, so a reading method leaves no empty store behind.
        mode = "rwc" if create else "rw"
        try:
            return sqlite3.connect(
                f"{path.resolve().as_uri()}?mode={mode}",
                uri=True,
                isolation_level=None,  # autocommit: transactions are explicit BEGIN/COMMIT
                check_same_thread=False,  # used by one thread at a time, under the lock
                timeout=_BUSY_TIMEOUT_MS / 1000,
            )
        except sqlite3.Error as exc:
            raise CheckpointError(f"cannot open the checkpoint store {path}: {exc}") from exc

    def configure(self, conn: Connection) -> None:
        conn.execute("PRAGMA synchronous = FULL")

    def tables(self, conn: Connection) -> set[str]:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {str(row[0]) for row in rows}

    def initialized(self) -> None:
        _fsync_directory(self.directory)  # the new file's directory entry is durable too

    def prepare_for_writing(self, conn: Connection) -> None:
        """Switch the file to WAL mode, once per connection, before the first write.

        Why WAL rather than a rollback journal (DELETE): with synchronous=FULL both are
        durable at COMMIT and atomic across a crash (uncommitted WAL frames are ignored on
        recovery; a hot rollback journal is rolled back).  WAL adds that readers in other
        processes (``sluiceway checkpoints list`` beside a running flow) never block the
        flow's saves nor are blocked by them, and a commit is one sequential append plus
        one fsync.  The cost: ``-wal``/``-shm`` files beside the store while it is open,
        and a local file system (not NFS), as SQLite's WAL always needs.
        """
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT}")
        if str(mode).lower() != "wal":  # pragma: no cover - only on file systems without WAL
            log.warning("checkpoint store %s: WAL mode unavailable, using %s", self.where, mode)

    def inserted_id(self, cursor: Any) -> int | None:
        rowid = cursor.lastrowid
        return None if rowid is None else int(rowid)

    def broken(self, conn: Connection) -> bool:
        return False

    def unreadable(self, exc: Exception, where: str) -> CheckpointError:
        """Damage (CheckpointCorruptError) or not (busy, I/O, permissions:
        CheckpointError), both naming the file."""
        name = getattr(exc, "sqlite_errorname", "") or ""
        damaged = name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or (
            not name and not isinstance(exc, sqlite3.OperationalError)
        )
        if not damaged:
            return CheckpointError(f"cannot read the checkpoint store {where}: {exc}")
        return CheckpointCorruptError(
            f"{where} is not a readable sluiceway checkpoint store: SQLite says "
            f"{str(exc)!r} (the file is truncated, damaged or not a SQLite database); "
            f"expected a store written by sluiceway (format version {FORMAT_VERSION})"
        )


def is_url(location: str | os.PathLike[str]) -> bool:
    """Is ``location`` a PostgreSQL URL (``postgresql://...``) rather than a directory?"""
    return isinstance(location, str) and location.startswith(_URL_SCHEMES)


def sub_location(location: str | os.PathLike[str], *names: str) -> str:
    """The location of a store inside ``location``: ``DIR/tasks/p3`` for a directory;
    for a PostgreSQL URL, the same URL whose schema is ``<schema>/tasks/p3``."""
    if is_url(location):
        from sluiceway.checkpoint.postgres import sub_url  # noqa: PLC0415 - optional

        return sub_url(str(location), *names)
    return os.path.join(os.fspath(location), *names)


def _backend_for(location: str | os.PathLike[str]) -> Backend:
    if is_url(location):
        from sluiceway.checkpoint.postgres import PostgresBackend  # noqa: PLC0415 - optional

        return PostgresBackend(str(location), tables=_SCHEMA)
    return _SQLite(Path(location))


def _fsync_directory(directory: Path) -> None:
    """Make a new file's directory entry durable (POSIX; a no-op elsewhere)."""
    if os.name != "posix":  # pragma: no cover - Windows has no directory fsync
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
