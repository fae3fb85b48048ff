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

from collections.abc import Hashable, Iterator, Sequence
from itertools import islice
from operator import itemgetter
from typing import Any, Final

from sluiceway.checkpoint import codec
from sluiceway.checkpoint.keys import CheckpointKey, KeyRing
from sluiceway.core.delta import Changes, Incremental, Partition, fold_incremental
from sluiceway.errors import CheckpointAuthError

__all__ = [
    "decode_changes",
    "encode_changes",
    "encoding_changes",
    "fold_chain",
    "fold_segments",
    "partition_key",
    "partition_of",
    "unchain",
]

_CHANGES: Final = "sluiceway-changes-2"
"""The tag of the segments written now: chunks are dicts or columns (:func:`_pack_chunk`)."""
_FORMATS: Final = frozenset({"sluiceway-changes-1", _CHANGES})
"""Tags read: format 1's chunks are all dicts (a sluiceway from before the columns)."""
_CHUNK: Final = 20_000
"""Keys packed per call when serialising a change set: the runtime does it on the event
loop and lets the records run between two chunks (a few milliseconds each)."""


def encode_changes(changes: Changes, key: CheckpointKey, context: bytes) -> bytes:
    """One partition's :class:`Changes` as a signed segment: the upserts packed in chunks
    of ``_CHUNK`` keys (:func:`_pack_chunk`).  ``context``:
    :func:`~sluiceway.checkpoint.codec.segment_context`."""
    *_, segment = encoding_changes(changes, key, context)
    assert segment is not None
    return segment


def encoding_changes(
    changes: Changes, key: CheckpointKey, context: bytes
) -> Iterator[bytes | None]:
    """:func:`encode_changes` a chunk at a time: None after each chunk of ``_CHUNK`` keys,
    then the segment.  The runtime encodes on the event loop and lets the records run
    between two chunks (each a few milliseconds)."""
    upserts = changes.upserts
    keys, entries = iter(upserts.keys()), iter(upserts.values())
    chunks: list[codec.Packed] = []
    while chunk := list(islice(keys, _CHUNK)):
        chunks.append(_pack_chunk(chunk, list(islice(entries, len(chunk))), changes.one_field))
        yield None
    header = (_CHANGES, changes.whole, chunks, changes.deletes, changes.extra)
    yield codec.encode(header, key, context)


def _pack_chunk(
    keys: list[Hashable], entries: list[Any], one_field: str | None = None
) -> codec.Packed:
    """One chunk of upserts, packed: as *columns* ``(field, keys, values)`` when every
    entry is a dict of one and the same str field -- a keyed step's entry of one value
    state, ``{"state": v}`` for ``stateful_map`` -- else as the dict ``key -> entry``.

    Columns are what makes a change set of one-value states cheap to write: pickling two
    flat lists skips a dict per key, which costs about three times as much CPU (measured
    with 400,000 random keys of 2,000,000: ~150 against ~520 ns a key, checks included)
    and half again the bytes; and every millisecond of it is taken from the records (it
    runs on the event loop, between their batches).  ``one_field``: the step vouches that
    every entry is ``{one_field: v}`` (:class:`~sluiceway.core.delta.Changes`), so the
    entries are not checked (two passes of the three)."""
    if one_field is not None:
        return codec.pack((one_field, keys, list(map(itemgetter(one_field), entries))))
    values = _one_field(entries)
    if values is None:
        return codec.pack(dict(zip(keys, entries, strict=True)))
    field, column = values
    return codec.pack((field, keys, column))


def _one_field(entries: list[Any]) -> tuple[str, list[Any]] | None:
    """``(field, [entry[field] ...])`` if every entry is a dict holding just ``field`` (a
    str), else None."""
    first = entries[0]
    if type(first) is not dict or len(first) != 1:
        return None
    (field,) = first
    if type(field) is not str:
        return None
    # Three passes in C (map) rather than one in bytecode: about 210 ns a key instead of
    # 290-400, most of it the cache miss of reaching each entry (random keys of 2,000,000).
    try:  # an entry without the field, or not subscriptable by it, raises
        column = list(map(itemgetter(field), entries))
    except Exception:  # noqa: BLE001 - any entry that is not {field: v}: not columns
        return None
    if set(map(type, entries)) != {dict} or sum(map(len, entries)) != len(entries):
        return None  # another type, or a dict with more than the field
    return field, column


def _unpack_chunk(packed: codec.Packed) -> dict[Hashable, Any]:
    """The inverse of :func:`_pack_chunk`: ``key -> entry``, a new dict per entry (a
    keyed store may change a restored entry in place)."""
    chunk = codec.unpack(packed)
    if type(chunk) is dict:
        return chunk
    field, keys, column = chunk
    return dict(zip(keys, [{field: v} for v in column], strict=True))


def decode_changes(data: bytes) -> Changes:
    """The inverse of :func:`encode_changes`, for a segment that verified."""
    _, whole, chunks, deletes, extra = _segment(data)
    upserts: dict[Hashable, Any] = {}
    for chunk in chunks:
        upserts.update(_unpack_chunk(chunk))
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
    _, whole, chunks, deletes, extra = _segment(blobs[0])
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
    small: dict[Hashable, Any] = {}  # what is left of dict chunks that lost keys
    columns: dict[str, tuple[list[Hashable], list[Any]]] = {}  # ... and of column chunks
    for packed in chunks:
        if not touched:
            kept.append(packed)
            continue
        chunk = codec.unpack(packed)
        if type(chunk) is not dict:  # columns: filtered as columns, no entry is built
            field, keys, values = chunk
            if touched.isdisjoint(keys):
                kept.append(packed)
                continue
            left_keys, left_values = columns.setdefault(field, ([], []))
            for k, v in zip(keys, values, strict=True):
                if k not in touched:
                    left_keys.append(k)
                    left_values.append(v)
            if len(left_keys) >= _CHUNK:  # shrunken chunks are merged: about _CHUNK keys
                kept.append(codec.pack((field, left_keys, left_values)))
                del columns[field]
            continue
        stale = chunk.keys() & touched
        if not stale:
            kept.append(packed)
            continue
        for k in stale:
            del chunk[k]
        small.update(chunk)
        if len(small) >= _CHUNK:
            kept.append(_pack_chunk(list(small), list(small.values())))
            small = {}
    kept.extend(codec.pack((f, ks, vs)) for f, (ks, vs) in columns.items() if ks)
    small.update(upserts)
    keys, entries = iter(small.keys()), iter(small.values())
    while rest := list(islice(keys, _CHUNK)):
        kept.append(_pack_chunk(rest, list(islice(entries, len(rest)))))
    return codec.encode((_CHANGES, True, kept, frozenset(), extra), key, context)


def _segment(data: bytes) -> tuple[str, bool, list[codec.Packed], frozenset[Hashable], Any]:
    """A verified segment's header and its chunks, still packed."""
    found = codec.decode(data)
    if not (isinstance(found, tuple) and len(found) == 5 and found[0] in _FORMATS):
        raise ValueError(f"not a change set of format {_CHANGES!r} (or its predecessor)")
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
