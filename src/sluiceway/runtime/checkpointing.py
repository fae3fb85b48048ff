"""Checkpoints at run time: barriers, snapshots, the two-phase commit, recovery.

The coordinator asks every running source for a barrier every ``interval``.  A source
stage records the source's position between two batches and sends
:class:`~sluiceway.core.messages.Barrier` down its stage; every operator snapshots
when the barrier passes it (fan-in channels align the barrier first, see
:mod:`sluiceway.core.channel`), and a sink pre-commits (makes what it wrote durable).
Once every operator has reported, the checkpoint is serialised (on the event loop, a
chunk of keys at a time between the records) and written to the store in one transaction,
in a worker thread (:meth:`Clock.run_in_thread`) while records keep flowing, and only then
are sinks told to commit and sources that the records before it will never be asked for
again.  One checkpoint is in flight at a time: a slow store
slows checkpoints, not records.

A step whose :meth:`~sluiceway.operators.base.Step.snapshot` returns an
:class:`~sluiceway.core.delta.Incremental` hands over only what changed since its
previous snapshot (per partition); the store keeps a base and the chain of changes per
operator and partition (:mod:`sluiceway.checkpoint.store`), and a restore hands the step
the folded, whole state.  Those change sets are serialised after the barrier, in
chunks with the records running between them (see :meth:`Coordinator._encode` for why
not in the thread); a whole snapshot, which may share mutable objects with the live
step, is pickled at the barrier as before.  After a save,
long chains are compacted: small ones in the store's thread, large ones in a child
process (:mod:`sluiceway.runtime.compactor`) that later checkpoints do not wait for (the
final one does); :mod:`sluiceway.runtime.segments` is where stored bytes are decoded and
encoded.

An operator whose input has ended reports its final state once; it stands for that
operator in every later checkpoint.  When every input ends, a last checkpoint of those
final states is taken, so a restart does not replay what was already written.  A stop
request takes a final checkpoint at a barrier and halts without draining: windows are not
flushed early, the next run goes on from the checkpoint.

Without checkpoints, a flow whose sources acknowledge (broker sources override
:meth:`~sluiceway.core.contract.Source.commit`) still gets barriers: *ack barriers*,
every :data:`ACK_INTERVAL` seconds, carrying no state.  Once one has passed every sink,
everything before it has been written, and the sources commit (acknowledge) up to the
position it carried: acknowledgment after the sink, batched, at-least-once.

See ``docs/checkpoints.md`` for the guarantees.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sluiceway.checkpoint import codec
from sluiceway.checkpoint.keys import KeyRing, load_keys
from sluiceway.checkpoint.store import (
    Checkpoint,
    CheckpointInfo,
    CheckpointStore,
    OperatorState,
    Segment,
    is_url,
)
from sluiceway.core.contract import Sink, Source
from sluiceway.core.delta import Changes, Incremental
from sluiceway.core.messages import Barrier
from sluiceway.errors import CheckpointError, CheckpointMismatchError
from sluiceway.metrics.registry import CheckpointSnapshot, OperatorCheckpoint
from sluiceway.runtime import compactor
from sluiceway.runtime.segments import (
    encoding_changes,
    fold_chain,
    partition_key,
    unchain,
)
from sluiceway.time import Clock, yield_now
from sluiceway.time.durations import positive_seconds

if TYPE_CHECKING:
    from sluiceway.flow import Flow
    from sluiceway.operators.base import Step

__all__ = ["ACK_INTERVAL", "ENV_TRUST", "CheckpointStats", "Checkpoints", "Coordinator"]

log = logging.getLogger("sluiceway")

ACK_INTERVAL = 0.1
"""Seconds between ack barriers when a flow without checkpoints has acknowledging sources."""

ENV_TRUST = "SLUICEWAY_CHECKPOINT_TRUST_UNAUTHENTICATED"
"""The environment's form of ``Checkpoints(trust_unauthenticated=ID)``."""


@dataclass(frozen=True, slots=True)
class Checkpoints:
    """Take checkpoints of a flow, and restore the latest one when it starts again.

    >>> Checkpoints("/tmp/ckpt", interval=2)  # doctest: +NORMALIZE_WHITESPACE
    Checkpoints(directory='/tmp/ckpt', interval=2.0, keep=3, compact_ratio=0.5,
                compact_after=10, key_file=None)

    Every part of a checkpoint is signed with a key kept outside the checkpoint directory
    and verified before anything of it is loaded (docs/checkpoints.md, "Security").

    Args:
        directory: where the checkpoint store lives (created at the first checkpoint); a
            ``postgresql://...?schema=NAME`` URL keeps it in PostgreSQL
            (docs/checkpoints.md, "In PostgreSQL").
        interval: seconds between the starts of two checkpoints (on the flow's clock).
        keep: how many complete checkpoints to keep (older ones are deleted).
        compact_ratio: an incremental operator's chain of changes (one partition's) is
            folded into a new base once its bytes exceed this share of the base's...
        compact_after: ...or once it holds this many change sets.
        key_file: the file holding the checkpoint key(s) (first line signs, later lines
            are old keys still accepted).  Default: ``SLUICEWAY_CHECKPOINT_KEY``,
            ``SLUICEWAY_CHECKPOINT_KEY_FILE``, else the user's own key, created once in
            ``~/.config/sluiceway/`` (``$XDG_CONFIG_HOME``).
        trust_unauthenticated: the id of one checkpoint written by a sluiceway from
            before checkpoints were signed, to restore once although nothing proves who
            wrote it (also ``SLUICEWAY_CHECKPOINT_TRUST_UNAUTHENTICATED=ID``).  Only if no
            one else could write the directory; the checkpoints after it are signed.

    Raises:
        ValueError: ``interval`` not > 0 seconds, ``keep`` or ``compact_after`` < 1,
            ``compact_ratio`` not > 0, or ``trust_unauthenticated`` not a checkpoint id.
    """

    directory: str | os.PathLike[str]
    interval: float = 5.0
    keep: int = 3
    compact_ratio: float = 0.5
    compact_after: int = 10
    key_file: str | os.PathLike[str] | None = None
    trust_unauthenticated: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "directory", os.fspath(self.directory))
        object.__setattr__(
            self, "interval", positive_seconds(self.interval, "Checkpoints interval")
        )
        if not isinstance(self.keep, int) or isinstance(self.keep, bool) or self.keep < 1:
            raise ValueError(f"Checkpoints keep must be an int >= 1, got {self.keep!r}")
        after = self.compact_after
        if not isinstance(after, int) or isinstance(after, bool) or after < 1:
            raise ValueError(f"Checkpoints compact_after must be an int >= 1, got {after!r}")
        ratio = self.compact_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1e9:
            raise ValueError(
                f"Checkpoints compact_ratio must be a number > 0 (a share of the base's "
                f"bytes, e.g. 0.5), got {ratio!r}"
            )
        object.__setattr__(self, "compact_ratio", float(ratio))
        if self.key_file is not None:
            object.__setattr__(self, "key_file", os.fspath(self.key_file))
        trust = self.trust_unauthenticated
        if trust is not None and (
            isinstance(trust, bool) or not isinstance(trust, int) or trust < 1
        ):
            raise ValueError(
                "Checkpoints trust_unauthenticated must be the id of a checkpoint (an int "
                f">= 1), got {trust!r}"
            )


@dataclass(slots=True)
class CheckpointStats:
    """What the checkpoints of a run did (read by the metrics)."""

    completed: int = 0
    last_id: int | None = None
    last_duration: float = 0.0
    """Seconds from the barrier's injection to the checkpoint being durable in the store
    (the barrier's way through the flow, the serialisation and the write)."""
    max_duration: float = 0.0
    """The longest ``last_duration`` of this run: with one checkpoint in flight at a time,
    above the interval means checkpoints fall behind."""
    last_alignment: float = 0.0
    """Seconds from the barrier's injection until every operator had reported."""
    last_write: float = 0.0
    """Seconds from every operator having reported to the checkpoint being durable:
    serialising the change sets (on the event loop) and writing (in a worker thread)."""
    last_size: int = 0
    """Bytes of state the last checkpoint holds (its whole parts and every chain it
    refers to, as stored after compaction)."""
    last_written: int = 0
    """Bytes the last checkpoint wrote (whole parts, bases and deltas)."""
    last_delta_bytes: int = 0
    """Of those, bytes of change sets (deltas)."""
    compactions: int = 0
    """Chains folded into new bases by this run."""
    restored_from: int | None = None
    """The checkpoint this run started from (None: a fresh start)."""
    operators: dict[str, OperatorCheckpoint] = field(default_factory=dict)
    """Per operator, in the last checkpoint."""

    def snapshot(self) -> CheckpointSnapshot:
        return CheckpointSnapshot(
            self.completed,
            self.last_id,
            self.last_duration,
            self.last_size,
            self.restored_from,
            max_duration=self.max_duration,
            last_alignment=self.last_alignment,
            last_write=self.last_write,
            last_written=self.last_written,
            last_delta_bytes=self.last_delta_bytes,
            compactions=self.compactions,
            operators=tuple(self.operators[n] for n in sorted(self.operators)),
        )


@dataclass(slots=True, eq=False)
class _InProgress:
    id: int
    started: float
    waiting: set[str]
    final: bool
    ready: asyncio.Future[None]
    states: dict[str, OperatorState] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    """Unpickled states of sources and sinks: handed to their commit()."""
    changes: dict[str, Incremental] = field(default_factory=dict)
    """The change sets of incremental steps, serialised after the barrier."""
    snapshot_seconds: dict[str, float] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)
    aligned: float | None = None


class Coordinator:
    """Runs the checkpoints of one flow run (built by the executor when they are on)."""

    def __init__(
        self,
        flow: Flow,
        config: Checkpoints | None,
        clock: Clock,
        sources: dict[str, Source],
        sinks: dict[str, Sink],
        request_barrier: Callable[[int], None],
    ) -> None:
        """``config`` None: ack barriers only (no state, no store, no restore)."""
        self.flow = flow
        self.config = config
        self.clock = clock
        self.store = None if config is None else CheckpointStore(config.directory, keep=config.keep)
        self.keys: KeyRing | None = None
        if config is not None:
            self.keys = load_keys(key_file=config.key_file, checkpoint_dir=config.directory)
        self.interval = ACK_INTERVAL if config is None else config.interval
        self.kinds = {n.name: n.kind for n in flow.nodes}
        self.sources = sources
        self.sinks = sinks
        self.request_barrier = request_barrier
        self.stats = CheckpointStats()
        self.final: dict[str, tuple[OperatorState | None, Any]] = {}
        """Operators whose input ended: their pickled final state (None for a change set,
        serialised with the checkpoint) and its value."""
        self._final_stored: set[str] = set()
        """Incremental operators whose final change set is stored: later checkpoints
        carry their chains on unchanged."""
        self.parent: int | None = None
        """The checkpoint the steps' change sets follow: the last one stored, or the one
        this run restored."""
        self.current: _InProgress | None = None
        self._compactor: compactor.Child | None = None
        """The compactor process under way, if any (one at a time; checkpoints do not
        wait for it, except the final one)."""
        self.next_id = 1
        self.stop_wanted = False
        self.all_ended = False
        self._wake: asyncio.Future[None] | None = None
        self._last_final = False
        self.committing = asyncio.Lock()
        """Held while sinks commit a checkpoint: a sink's final ``pre_commit`` (its input
        ended, :meth:`~sluiceway.runtime.executor.Executor.stage_finished`) takes it too, so a
        sink never pre-commits while it is committing."""
        for name, source in sources.items():
            if config is not None and not source.resumable:
                raise CheckpointError(
                    f"flow {flow.name!r} takes checkpoints, but its source {name!r} "
                    f"({source.describe()}) cannot resume from a position: a restart would "
                    "have nothing to replay.  Give it input that can be read again (a "
                    "list instead of a one-shot iterator or generator, sources.Generator "
                    "with a factory, a file, a broker), or run the flow without checkpoints"
                )

    def _store_arg(self) -> str:
        """The store as ``sluiceway checkpoints`` takes it: the directory, or the URL
        without its password."""
        assert self.config is not None
        assert self.store is not None
        directory = str(self.config.directory)
        return self.store.where if is_url(directory) else directory

    # -- recovery ----------------------------------------------------------------------

    @property
    def durable(self) -> bool:
        """True for checkpoints (state stored), False for ack barriers only."""
        return self.store is not None

    def restore(self, steps: dict[str, Step]) -> Checkpoint | None:
        """Load the latest complete checkpoint into the steps, sources and sinks."""
        assert self.store is not None
        ckpt = self.store.latest(self.flow.name)
        self.next_id = self.store.next_id(self.flow.name)
        if ckpt is None:
            return None
        codec.verify_checkpoint(ckpt.states, self.keys, **self._auth(ckpt))  # before all else
        self._check_compatible(ckpt)
        ckpt, values = self._committed(ckpt)
        self.parent = ckpt.info.id
        where = f"checkpoint {ckpt.info.id} in {self.store.where}"
        for name, value in values.items():
            if name in self.sources:
                self.sources[name].restore(value)
            elif value is not None:
                steps[name].restore(value)
        self.stats.restored_from = ckpt.info.id
        log.info("flow %r restored from checkpoint %d (%s)", self.flow.name, ckpt.info.id, where)
        return ckpt

    def _load(self, ckpt: Checkpoint) -> dict[str, Any]:
        """Every part and every segment of every chain verified under the keys, then (only
        if all verify) decoded; an incremental part is its chains, folded."""
        assert self.store is not None
        values = codec.open_checkpoint(ckpt.states, self.keys, **self._auth(ckpt), warn=log.warning)
        for name, chains in ckpt.chains.items():
            try:
                values[name] = unchain(chains)
            except Exception as exc:
                raise CheckpointError(
                    f"checkpoint {ckpt.info.id} in {self.store.where}: the state of operator "
                    f"{name!r} verifies but cannot be loaded: {type(exc).__name__}: {exc}"
                ) from exc
        return values

    def _auth(self, ckpt: Checkpoint) -> dict[str, Any]:
        """What verifying ``ckpt`` needs beside its parts and the keys."""
        assert self.store is not None
        assert self.config is not None
        return {
            "chains": ckpt.chains,
            "flow": self.flow.name,
            "where": f"checkpoint {ckpt.info.id} of flow {self.flow.name!r} in {self.store.where}",
            "fixes": f"`sluiceway checkpoints reset {shlex.quote(self._store_arg())} "
            f'--flow {shlex.quote(self.flow.name)}` (docs/checkpoints.md, "Security")',
            "trust_unauthenticated": ckpt.info.id == self._trusted(),
        }

    def _trusted(self) -> int | None:
        """The id of the unsigned checkpoint the user chose to trust, if any."""
        assert self.config is not None
        if self.config.trust_unauthenticated is not None:
            return self.config.trust_unauthenticated
        raw = os.environ.get(ENV_TRUST)
        if raw is None or not raw.strip():
            return None
        try:
            trusted = int(raw)
        except ValueError:
            trusted = 0
        if trusted < 1:
            raise CheckpointError(
                f"{ENV_TRUST} must be the id of the unsigned checkpoint to trust once (a "
                f"whole number >= 1, see `sluiceway checkpoints list`), got {raw!r}"
            )
        return trusted

    def _committed(self, ckpt: Checkpoint) -> tuple[Checkpoint, dict[str, Any]]:
        """``ckpt``, or the newest earlier one, whose sinks all committed it.

        A process that died between storing a checkpoint and its sinks' commit leaves a
        checkpoint whose output a sink may have lost (a Kafka transaction is aborted when
        its producer dies): :meth:`Sink.committed` says so, and the checkpoint before it
        is restored instead, so that the replay writes that output again."""
        assert self.store is not None
        values = self._load(ckpt)
        refused = [n for n, sink in self.sinks.items() if not sink.committed(values.get(n))]
        if not refused:
            return ckpt, values
        older = [
            info.id
            for info, problem in self.store.list(self.flow.name)
            if info.id < ckpt.info.id and problem is None
        ]
        if not older:
            raise CheckpointError(
                f"checkpoint {ckpt.info.id} in {self.store.where} was stored, but sink(s) "
                f"{', '.join(map(repr, refused))} never committed it and no earlier "
                "checkpoint is kept to go back to; start over with `sluiceway checkpoints "
                "reset`"
            )
        log.warning(
            "flow %r: sink(s) %s did not commit checkpoint %d before the process ended; "
            "restoring checkpoint %d, the one before, to write that output again",
            self.flow.name,
            ", ".join(map(repr, refused)),
            ckpt.info.id,
            max(older),
        )
        return self._committed(self.store.load(max(older), self.flow.name))

    def _check_compatible(self, ckpt: Checkpoint) -> None:
        stored = {name: st.kind for name, st in ckpt.states.items()}
        if stored == self.kinds:
            return
        problems = [
            f"operator {n!r} ({k}) is new" for n, k in self.kinds.items() if n not in stored
        ]
        problems += [
            f"operator {n!r} ({k}) is gone" for n, k in stored.items() if n not in self.kinds
        ]
        problems += [
            f"operator {n!r} was a {k}, is now a {self.kinds[n]}"
            for n, k in stored.items()
            if n in self.kinds and self.kinds[n] != k
        ]
        assert self.store is not None
        assert self.config is not None
        raise CheckpointMismatchError(
            f"checkpoint {ckpt.info.id} in {self.store.where} was taken by a different "
            f"version of flow {self.flow.name!r}: {'; '.join(sorted(problems))}.  Restore "
            "the flow as it was, or start over with `sluiceway checkpoints reset "
            f"{shlex.quote(self._store_arg())} --flow {shlex.quote(self.flow.name)}`"
            " -- the run after that reads "
            "its input from the beginning, so move or empty the outputs of sinks that "
            "append (sinks.JsonLines, append-mode tables) first, or they get a second copy"
        )

    # -- reports from the stages -------------------------------------------------------

    def _pickle(self, name: str, value: Any) -> OperatorState:
        """The signed part of ``value`` (see :mod:`sluiceway.checkpoint.codec`)."""
        if self.store is None:
            return _NO_STATE
        assert self.keys is not None
        kind = self.kinds[name]
        try:
            data = codec.encode(
                value, self.keys.current, codec.part_context(self.flow.name, name, kind)
            )
        except Exception as exc:
            raise CheckpointError(
                f"flow {self.flow.name!r}: the state of operator {name!r} cannot be "
                f"checkpointed (pickled): {type(exc).__name__}: {exc}"
            ) from exc
        return OperatorState(name, kind, data)

    def _capture(self, c: _InProgress, name: str, value: Any) -> None:
        """Take operator ``name``'s state into checkpoint ``c``: a change set as it is (the
        step hands over copies; serialised once every operator has reported), anything else pickled
        now (a whole snapshot may share mutable objects with the live step)."""
        if isinstance(value, Incremental) and self.store is not None:
            c.changes[name] = value
        else:
            c.states[name] = self._pickle(name, value)
        if name in self.sinks or name in self.sources:
            c.values[name] = value
        c.waiting.discard(name)
        if not c.waiting and not c.ready.done():
            c.aligned = self.clock.monotonic()
            c.ready.set_result(None)

    def _report(self, checkpoint_id: int, name: str, value: Any) -> None:
        c = self.current
        if c is None or c.id != checkpoint_id:
            raise AssertionError(f"barrier {checkpoint_id} at {name!r} with no such checkpoint")
        self._capture(c, name, value)

    async def on_barrier(self, step: Step, barrier: Barrier) -> None:
        """The hook the runtime sets on every operator step."""
        if self.store is None:  # an ack barrier: it only has to get through
            self._report(barrier.checkpoint_id, step.name, None)
            return
        began = self.clock.monotonic()
        value = await step.prepare_checkpoint(barrier.checkpoint_id)
        self._report(barrier.checkpoint_id, step.name, value)
        c = self.current
        if c is not None and c.id == barrier.checkpoint_id:
            c.snapshot_seconds[step.name] = self.clock.monotonic() - began
            c.keys[step.name] = step.metrics.state

    def source_barrier(self, name: str, checkpoint_id: int, position: Any) -> None:
        self._report(checkpoint_id, name, position)

    def finished(self, name: str, value: Any) -> None:
        """Operator ``name``'s input ended; ``value`` is its final state."""
        incremental = isinstance(value, Incremental) and self.store is not None
        self.final[name] = (None if incremental else self._pickle(name, value), value)
        c = self.current
        if c is not None and name in c.waiting:
            self._capture(c, name, value)

    # -- taking checkpoints ------------------------------------------------------------

    def _begin(self, *, final: bool, inject: bool = True) -> _InProgress:
        c = _InProgress(
            self.next_id,
            self.clock.monotonic(),
            set(self.kinds) - set(self.final),
            final,
            asyncio.get_running_loop().create_future(),
        )
        self.next_id += 1
        for name, (state, value) in self.final.items():
            if state is not None:
                c.states[name] = state
            elif name in self._final_stored:  # stored once: its chains carry on as they are
                c.changes[name] = Incremental({})
            else:
                c.changes[name] = value
            c.values[name] = value
        self.current = c
        if not c.waiting:
            c.aligned = c.started
            c.ready.set_result(None)
        elif inject:
            self.request_barrier(c.id)
        return c

    async def _complete(self, c: _InProgress) -> None:
        await c.ready
        self.current = None
        if self.store is None:  # ack barrier: everything before it is written
            for name, source in self.sources.items():
                await source.commit(c.values.get(name))
            return
        created = self.clock.time()
        writing = self.clock.monotonic()
        states = await self._encode(c)
        for name in c.changes:
            if name not in self.final:  # encoded: let the change set go (see _encode)
                c.changes[name] = _ENCODED
        info = await self.clock.run_in_thread(self._write, c, states, created, writing - c.started)
        durable = self.clock.monotonic()
        self.current = None
        self._last_final = c.final
        self.parent = c.id
        self._final_stored.update(n for n in c.changes if n in self.final)
        s = self.stats
        s.completed += 1
        s.last_id, s.last_duration = c.id, durable - c.started
        s.max_duration = max(s.max_duration, s.last_duration)
        s.last_alignment = (c.aligned if c.aligned is not None else writing) - c.started
        s.last_write = durable - writing
        s.last_written, s.last_delta_bytes = info.written, info.delta_bytes
        log.debug(
            "flow %r: checkpoint %d stored (%d bytes written, %.3f s)",
            self.flow.name,
            c.id,
            info.written,
            s.last_duration,
        )
        async with self.committing:
            for name, sink in self.sinks.items():
                await sink.commit(c.id, c.values.get(name))
        for name, source in self.sources.items():
            await source.commit(c.values.get(name))
        await self.clock.run_in_thread(self._compact, c)

    async def _encode(self, c: _InProgress) -> dict[str, OperatorState]:
        """Every part of checkpoint ``c``, the change sets serialised now: on the event
        loop, a chunk at a time, the records running between two chunks.

        Not in the worker thread: Python threads take turns on one interpreter lock, and
        a thread asking for it while the event loop releases and takes it back at every
        turn (its ``select``) waits until it wins a race -- measured: 0.07 s of pickling
        that took 4 s to get done, a checkpoint late by as much (CK-2M in
        ``benchmarks/RESULTS.md``).  Here it costs what it costs, a few milliseconds per
        chunk; the thread is left with hashing and SQLite, which run without the lock.
        (``Clock.run_in_thread`` now lowers the switch interval, which ends that race for
        the write too; the encoding stays here all the same: in a thread it would hold the
        same lock for the same time, with no say in when the records run.)

        The caller lets the change sets go once they are encoded, not after the write: a
        change set keeps every state it holds alive, also those the operator has replaced
        since, and keeping them for the write and the commits had the collector run young
        collections by the hundred (each freed state would have cancelled an allocation)
        and, every few checkpoints, a full one over the whole keyed state."""
        states = dict(c.states)
        for name, changes in c.changes.items():
            states[name] = await self._incremental_part(name, changes)
        return states

    def _write(
        self, c: _InProgress, states: dict[str, OperatorState], created: float, duration: float
    ) -> CheckpointInfo:
        """In the worker thread: save the checkpoint."""
        assert self.store is not None
        return self.store.save(
            self.flow.name,
            c.id,
            states,
            created=created,
            duration=duration,
            final=c.final,
            parent=self.parent,
        )

    async def _incremental_part(self, name: str, changes: Incremental) -> OperatorState:
        """Each partition's change set as a segment, signed for its flow, operator,
        partition and kind (base or delta); the part beside them signed as any part.
        Yields to the event loop between two chunks of keys."""
        assert self.keys is not None
        key, flow = self.keys.current, self.flow.name
        segments: dict[str, Segment] = {}
        for partition, part in changes.partitions.items():
            where = partition_key(partition)
            context = codec.segment_context(flow, name, where, base=part.whole)
            try:
                for data in encoding_changes(part, key, context):
                    if data is None:
                        await yield_now()
            except Exception as exc:
                raise CheckpointError(
                    f"flow {self.flow.name!r}: the state of operator {name!r} cannot be "
                    f"checkpointed (pickled){_unpicklable_key(part)}: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            assert data is not None
            segments[where] = Segment(part.whole, data)
        kind = self.kinds[name]
        return OperatorState(
            name,
            kind,
            codec.encode(None, key, codec.part_context(flow, name, kind)),  # nothing beside
            segments,
            frozenset(partition_key(p) for p in changes.dropped),
        )

    def _compact(self, c: _InProgress) -> None:
        """In the worker thread, after the commits: fold long chains into new bases --
        small ones here, large ones in a child process, off this process's interpreter
        lock (:mod:`sluiceway.runtime.compactor`), which the next checkpoints do not wait
        for (the final one does) -- then read back what each operator's state takes in
        the store."""
        assert self.store is not None
        assert self.config is not None
        flow, ratio, after = self.flow.name, self.config.compact_ratio, self.config.compact_after
        self._reap(wait=c.final)
        limit = compactor.IN_PROCESS_BYTES
        due = [size for _, _, size in self.store.due(flow, ratio=ratio, after=after)]
        if any(size <= limit for size in due):
            self.stats.compactions += self.store.compact(
                flow,
                functools.partial(fold_chain, self.keys, flow),
                ratio=ratio,
                after=after,
                at_most=limit,
            )
        if self._compactor is None and any(size > limit for size in due):
            try:
                self._compactor = compactor.start_child(
                    self.config.directory,
                    flow,
                    self.keys,
                    ratio=ratio,
                    after=after,
                    larger_than=limit,
                    now=self.clock.monotonic(),
                )
            except CheckpointError as exc:  # the chains stay valid: tried again next time
                log.warning("%s; the chains stay as they are, compaction is tried again", exc)
            if c.final:
                self._reap(wait=True)
        parts = self.store.parts(c.id, flow)
        ops: dict[str, OperatorCheckpoint] = {}
        before = self.stats.operators
        for p in parts:
            base = sum(ch.base_size for ch in p.chains)
            deltas = sum(ch.delta_size for ch in p.chains)
            ops[p.name] = OperatorCheckpoint(
                name=p.name,
                bytes=p.size + base + deltas,
                base_bytes=base,
                delta_bytes=deltas,
                deltas=max((ch.deltas for ch in p.chains), default=0),
                # an operator whose input ended reports no new figures: its last ones stand
                keys=c.keys[p.name]
                if p.name in c.keys
                else getattr(before.get(p.name), "keys", None),
                snapshot_seconds=c.snapshot_seconds.get(
                    p.name, getattr(before.get(p.name), "snapshot_seconds", 0.0)
                ),
            )
        self.stats.operators = ops
        self.stats.last_size = sum(o.bytes for o in ops.values())

    async def initial(self, steps: dict[str, Step]) -> None:
        """A fresh start: checkpoint the state before the first record, so that a crash
        before the first periodic checkpoint goes back here (a sink then takes back
        what it wrote, instead of keeping it and writing it again)."""
        c = self._begin(final=False, inject=False)
        for name in self.kinds:
            if name in self.sources:
                self._report(c.id, name, self.sources[name].position())
            else:
                self._report(c.id, name, await steps[name].prepare_checkpoint(c.id))
        await self._complete(c)

    async def run(self, halt: Callable[[], None]) -> None:
        """Take a checkpoint every ``interval`` until the flow ends; on a stop, take a
        final one and call ``halt``."""
        clock, interval = self.clock, self.interval
        next_at = clock.monotonic() + interval
        while not self.stop_wanted:
            if self.all_ended:  # before this task first ran (a finished flow run again)
                return
            self._wake = asyncio.get_running_loop().create_future()
            woke = await clock.wait_until(self._wake, next_at)
            if self.all_ended:
                return
            if self.stop_wanted:
                break
            if not woke:
                next_at = clock.monotonic() + interval
                await self._complete(self._begin(final=False))
        await self._complete(self._begin(final=True))
        halt()

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def stop(self) -> None:
        """Stop at a final checkpoint (after the one in progress, if any)."""
        self.stop_wanted = True
        self._poke()

    def stages_ended(self) -> None:
        self.all_ended = True
        self._poke()

    def is_final(self, checkpoint_id: int) -> bool:
        c = self.current
        return c is not None and c.id == checkpoint_id and c.final

    async def end(self) -> None:
        """Every stage has finished: a last checkpoint of the final states."""
        if self.current is None and not self._last_final:
            await self._complete(self._begin(final=True))

    def _reap(self, *, wait: bool) -> None:
        """Count what the compactor process folded once it has ended (``wait``: wait for
        it); a failure is a warning, the chains stay valid and are folded later."""
        child = self._compactor
        if child is None:
            return
        try:
            done = child.wait() if wait else child.poll(self.clock.monotonic())
        except CheckpointError as exc:
            self._compactor = None
            log.warning("%s; the chains stay as they are, compaction is tried again", exc)
            return
        if done is not None:
            self._compactor = None
            self.stats.compactions += done

    def close(self) -> None:
        """The run is over: a compactor process still under way is stopped (a run that
        ends normally waited for it at its final checkpoint; the chains stay valid)."""
        if self._compactor is not None:
            self._compactor.stop()
            self._compactor = None
        if self.store is not None:
            self.store.close()


_NO_STATE = OperatorState("", "", b"")
_ENCODED = Incremental({})
"""Stands for a change set in a checkpoint in progress once it is encoded."""


def _unpicklable_key(changes: Changes) -> str:
    """`` (key K)`` naming the first key whose state cannot be pickled, or ``""``."""
    for key, value in changes.upserts.items():
        try:
            codec.pack((key, value))
        except Exception:  # noqa: BLE001 - named in the caller's message
            return f" (key {key!r})"
    return ""
