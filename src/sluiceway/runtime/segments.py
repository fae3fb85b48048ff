"""The bytes of a checkpoint's incremental state: change sets as segments, and their fold.

Every segment the runtime stores is encoded and signed by :mod:`sluiceway.checkpoint.codec`
(:func:`encode_changes`, under :func:`~sluiceway.checkpoint.codec.segment_context`: flow,
operator, partition, base or delta); its chunks are :class:`~sluiceway.checkpoint.codec.Packed`
bodies inside the signed segment, so keyed state stays data-only (the allow-list unpickler)
and user objects stay in their own sections.  Compaction re-encodes through
:func:`fold_chain` -- which verifies every segment it folds first and signs the new base --
in the flow's checkpoint thread or in the compactor's process
(:mod:`sluiceway.runtime.compactor`).  Decoding (:func:`decode_changes`, :func:`unchain`)
is only ever given segments that verified.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from itertools import islice
from typing import Any, Final

from sluiceway.checkpoint import codec
from sluiceway.checkpoint.keys import CheckpointKey, KeyRing
from sluiceway.core.delta import Changes, Incremental, Partition, fold_incremental
from sluiceway.errors import CheckpointAuthError

__all__ = [
    "decode_changes",
    "encode_changes",
    "fold_chain",
    "fold_segments",
    "partition_key",
    "partition_of",
    "unchain",
]

_CHANGES: Final = "sluiceway-changes-1"
_CHUNK: Final = 20_000
"""Keys packed per call when serialising a change set in the worker thread: the event
loop's thread can take the GIL back between two calls (a pickle call holds it)."""


def encode_changes(changes: Changes, key: CheckpointKey, context: bytes) -> bytes:
    """One partition's :class:`Changes` as a signed segment: the upserts packed in dicts
    of ``_CHUNK`` keys, so that serialising millions of keys in a worker thread leaves the
    event loop the GIL between chunks (dicts pickle faster and smaller than lists of
    pairs).  ``context``: :func:`~sluiceway.checkpoint.codec.segment_context`."""
    items = iter(changes.upserts.items())
    chunks: list[codec.Packed] = []
    while chunk := dict(islice(items, _CHUNK)):
        chunks.append(codec.pack(chunk))
    header = (_CHANGES, changes.whole, chunks, changes.deletes, changes.extra)
    return codec.encode(header, key, context)


def decode_changes(data: bytes) -> Changes:
    """The inverse of :func:`encode_changes`, for a segment that verified."""
    _, whole, chunks, deletes, extra = _segment(data)
    upserts: dict[Hashable, Any] = {}
    for chunk in chunks:
        upserts.update(codec.unpack(chunk))
    return Changes(whole, upserts, deletes, extra)


def fold_chain(
    keys: KeyRing | None, flow: str, operator: str, partition: str, blobs: Sequence[bytes]
) -> bytes:
    """Compaction's fold of one stored chain (a base, then deltas): every segment is
    verified under ``keys`` before any is decoded, and the new base is signed with
    ``keys.current``.

    Raises:
        CheckpointAuthError: a segment does not verify (nothing was decoded; the store
            leaves the chain as it is).
    """
    verdicts = codec.chain_verdicts(flow, operator, partition, blobs, keys)
    failed = {label: v for label, v in verdicts.items() if not v.ok}
    if failed or keys is None:
        why = "; ".join(f"{label}: {v.status.value}: {v.reason}" for label, v in failed.items())
        raise CheckpointAuthError(
            f"cannot compact the chain of operator {operator!r} partition {partition} of "
            f"flow {flow!r}: it does not verify, so none of it was loaded: "
            f"{why or 'no checkpoint key is available'}"
        )
    context = codec.segment_context(flow, operator, partition, base=True)
    return fold_segments(blobs, keys.current, context)


def fold_segments(blobs: Sequence[bytes], key: CheckpointKey, context: bytes) -> bytes:
    """The fold itself: verified stored segments (base first) -> the signed base of the
    same state.  Runs on what is stored, never on live state; call :func:`fold_chain`,
    which verifies first.

    The same result as :func:`~sluiceway.core.delta.fold` over the chain, without
    building the whole state: the deltas are folded into one net change, each chunk of
    the base loses the keys that change wrote or deleted (a chunk nothing touched keeps
    its packed bytes as they are), and the net upserts follow as new chunks."""
    tag, whole, chunks, deletes, extra = _segment(blobs[0])
    if not whole or deletes:
        raise ValueError("a stored chain must start with a whole base")
    upserts: dict[Hashable, Any] = {}
    deleted: set[Hashable] = set()
    for blob in blobs[1:]:
        later = decode_changes(blob)
        if later.whole:
            raise ValueError("a stored chain holds a whole state after its base")
        for k in later.deletes:
            upserts.pop(k, None)
        deleted |= later.deletes
        deleted.difference_update(later.upserts.keys())
        upserts.update(later.upserts)
        extra = later.extra
    touched = deleted | upserts.keys()
    kept: list[codec.Packed] = []
    small: dict[Hashable, Any] = {}
    for packed in chunks:
        if not touched:
            kept.append(packed)
            continue
        chunk = codec.unpack(packed)
        stale = chunk.keys() & touched
        if not stale:
            kept.append(packed)
            continue
        for k in stale:
            del chunk[k]
        small.update(chunk)  # shrunken chunks are merged, so chunks stay about _CHUNK keys
        if len(small) >= _CHUNK:
            kept.append(codec.pack(small))
            small = {}
    small.update(upserts)
    items = iter(small.items())
    while rest := dict(islice(items, _CHUNK)):
        kept.append(codec.pack(rest))
    return codec.encode((tag, True, kept, frozenset(), extra), key, context)


def _segment(data: bytes) -> tuple[str, bool, list[codec.Packed], frozenset[Hashable], Any]:
    """A verified segment's header and its chunks, still packed."""
    found = codec.decode(data)
    if not (isinstance(found, tuple) and len(found) == 5 and found[0] == _CHANGES):
        raise ValueError(f"not a change set of format {_CHANGES!r}")
    return found


def unchain(chains: dict[str, tuple[bytes, ...]]) -> Incremental:
    """A stored incremental part whose segments all verified -> the whole
    :class:`Incremental` a step restores."""
    base = {partition_of(key): decode_changes(chain[0]) for key, chain in chains.items()}
    later = [
        Incremental({partition_of(key): decode_changes(chain[i])})
        for key, chain in chains.items()
        for i in range(1, len(chain))
    ]
    return fold_incremental(Incremental(base), *later)


def partition_key(partition: Partition) -> str:
    """How the store names a partition: ``"-"`` for None (an unpartitioned flow)."""
    return "-" if partition is None else str(partition)


def partition_of(key: str) -> Partition:
    """The inverse of :func:`partition_key`."""
    return None if key == "-" else int(key)
