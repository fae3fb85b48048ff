"""The checkpoint codec: an operator's state <-> the authenticated bytes of one part.

Restoring a checkpoint must not run code that someone else wrote.  Two layers see to it:

* **Every part is signed** with HMAC-SHA256 under a key that lives outside the store
  (:mod:`sluiceway.checkpoint.keys`), and bound to its flow, operator name and kind.  A
  restore verifies *every* part of a checkpoint before it decodes *any*
  (:func:`open_checkpoint`), and refuses one that fails, naming it.  Someone who can
  write the checkpoint store but not read the key cannot make a part verify.
* **The engine's own state is data.**  Positions, watermarks, built-in accumulators,
  timers and TTLs are builtin scalars and containers, a few standard data types
  (``datetime``, ``Decimal``, ``UUID``, ...) and named sluiceway types: they are encoded
  with pickle, but decoded by an unpickler that can build *only* those (an allow-list:
  any other global -- ``os.system``, a user class -- is refused).  Objects of any other
  class (user state holding a dataclass, a custom source's position) go to a separate
  *user section*, pickled as a whole and unpickled only from a verified part.  A part
  whose state is all data has no user section; ``sluiceway checkpoints inspect`` shows
  which parts have one, and of which classes.

A part, format 1::

    magic "SLWCKP" (6 bytes) | format (1 byte) | key id (8 bytes) | HMAC-SHA256 (32 bytes)
    | meta length (4 bytes, big-endian) | meta (JSON: user_objects, user_types)
    | engine length (8 bytes) | engine pickle | user pickle (the rest; empty if none)

The MAC covers the header before it, the part's context (flow, operator, kind) and the
whole body.  The functions are pure (no I/O, no clock, no shared state): the runtime may
call them from a worker thread.

>>> from sluiceway.checkpoint.keys import CheckpointKey, KeyRing
>>> ring = KeyRing((CheckpointKey.of("s" * 32),), source="a test")
>>> ctx = part_context("orders", "totals", "window")
>>> data = encode({"panes": {60: {"a": [3, 4.5]}}, "wm": 59.5}, ring.current, ctx)
>>> verify(data, ring, ctx).status
<PartStatus.OK: 'ok'>
>>> decode(data)
{'panes': {60: {'a': [3, 4.5]}}, 'wm': 59.5}
>>> verify(data, ring, part_context("orders", "other", "window")).status
<PartStatus.ALTERED: 'altered'>
>>> verify(pickle.dumps(1), ring, ctx).status
<PartStatus.UNAUTHENTICATED: 'unauthenticated'>
"""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import fractions
import functools
import hashlib
import hmac
import importlib
import io
import json
import pickle
import struct
import uuid
import zoneinfo
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import BuiltinFunctionType, FunctionType
from typing import Any, Final

from sluiceway.checkpoint.keys import CheckpointKey, KeyRing
from sluiceway.checkpoint.store import OperatorState
from sluiceway.errors import CheckpointAuthError, CheckpointError

__all__ = [
    "FORMAT",
    "MAGIC",
    "Packed",
    "PartStatus",
    "Verdict",
    "decode",
    "encode",
    "open_checkpoint",
    "pack",
    "part_context",
    "unpack",
    "unpacked",
    "verify",
    "verify_checkpoint",
]

MAGIC: Final = b"SLWCKP"
FORMAT: Final = 1
_HEADER: Final = struct.Struct(">6sB8s32s")
_MAC_AT: Final = 6 + 1 + 8
_META_LEN: Final = struct.Struct(">I")
_ENGINE_LEN: Final = struct.Struct(">Q")
_PROTOCOL: Final = pickle.HIGHEST_PROTOCOL
_MAX_TYPES_SHOWN: Final = 20

# The engine's own types: instances are data (fields of builtins and of these).  Named,
# resolved lazily (these modules import the codec).  Add a type here only if building it
# from its pickled fields runs nothing but setting them.
_ENGINE_TYPE_NAMES: Final = (
    "sluiceway.state.TTL",
    "sluiceway.core.delta.Changes",
    "sluiceway.core.delta.Incremental",
    "sluiceway.checkpoint.codec.Packed",
    "sluiceway.agg._Empty",
    "sluiceway.state._Upserts",  # keyed state's key -> entry dict: reduces to unpacked(Packed)
)

# Standard types whose pickled form is data: built from plain arguments, nothing else.
_DATA_TYPES: Final[tuple[type, ...]] = (
    complex,
    range,
    slice,
    datetime.datetime,
    datetime.date,
    datetime.time,
    datetime.timedelta,
    datetime.timezone,
    zoneinfo.ZoneInfo,
    decimal.Decimal,
    fractions.Fraction,
    uuid.UUID,
    uuid.SafeUUID,
    collections.OrderedDict,
    collections.deque,
    collections.defaultdict,
    collections.Counter,
)

# Globals the pickled form of builtins and data types refers to (e.g. a defaultdict's
# factory), beside the types themselves.
_BUILTIN_GLOBALS: Final[tuple[type, ...]] = (
    set,
    frozenset,
    list,
    dict,
    tuple,
    bytes,
    bytearray,
    str,
    int,
    float,
    bool,
)


class PartStatus(enum.Enum):
    """Whether a part verifies under the keys available."""

    OK = "ok"
    """Signed with an available key, and unaltered."""
    WRONG_KEY = "wrong key"
    """Signed with a key that is not available here (another machine's, a rotated-out
    one), or no key is available at all."""
    ALTERED = "altered"
    """Signed with an available key's id, but the MAC does not match: altered, moved from
    another operator or flow, or forged."""
    UNAUTHENTICATED = "unauthenticated"
    """No signature at all: written by a sluiceway from before checkpoints were signed
    (or by someone else)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of :func:`verify` for one part.

    Attributes:
        status: ok or why not.
        reason: a sentence for people ("" when ok).
        key_id: the id of the key the part says it is signed with (None: unsigned).
        user_types: for a verified part, the classes of its user section's objects
            (empty: the part is data only).
        user_objects: how many objects its user section holds.
    """

    status: PartStatus
    reason: str = ""
    key_id: str | None = None
    user_types: tuple[str, ...] = ()
    user_objects: int = 0

    @property
    def ok(self) -> bool:
        return self.status is PartStatus.OK


@dataclass(frozen=True, slots=True)
class Packed:
    """A value encoded ahead of time (:func:`pack`), e.g. a snapshot that must share
    nothing with live state; an engine type, so it may sit inside another part.

    Attributes:
        data: the encoded body (no signature: the part it travels in is signed).
        user_types: the classes of its user section's objects.
        user_objects: how many there are.
    """

    data: bytes = field(repr=False)
    user_types: tuple[str, ...] = ()
    user_objects: int = 0


def part_context(flow: str, name: str, kind: str) -> bytes:
    """What a part's MAC binds it to: its flow, operator (part) name and kind."""
    return json.dumps([flow, name, kind], ensure_ascii=True).encode("ascii")


def segment_context(flow: str, operator: str, partition: str, *, base: bool) -> bytes:
    """What a segment's MAC binds it to: its flow, operator and partition, and whether it
    is a chain's base or one of its deltas.  Not the checkpoint id: one stored segment is
    shared by every checkpoint whose chain holds it (docs/checkpoints.md, "Security")."""
    return part_context(flow, f"{operator}/{partition}", "base" if base else "delta")


def segment_label(operator: str, partition: str, position: int) -> str:
    """How messages name a segment: ``'sum' partition 0 base`` / ``... delta 3``."""
    where = "base" if position == 0 else f"delta {position}"
    return f"{operator!r} partition {partition} {where}"


def chain_verdicts(
    flow: str, operator: str, partition: str, chain: Sequence[bytes], keys: KeyRing | None
) -> dict[str, Verdict]:
    """Each segment of one stored chain (base first) checked under ``keys``; decodes
    nothing."""
    return {
        segment_label(operator, partition, i): verify(
            blob, keys, segment_context(flow, operator, partition, base=i == 0)
        )
        for i, blob in enumerate(chain)
    }


# -- encoding -----------------------------------------------------------------------------


def encode(value: Any, key: CheckpointKey, context: bytes) -> bytes:
    """``value`` as a signed part.

    Args:
        value: the state; builtins and engine types are encoded as data, objects of
            other classes go to the user section (they must be picklable).
        key: the key that signs it (``KeyRing.current``).
        context: :func:`part_context` of the part.

    Raises:
        pickle.PicklingError, TypeError, AttributeError: something in ``value`` cannot
            be pickled (the caller names the operator).
    """
    body = _body(value)
    head = MAGIC + bytes([FORMAT]) + bytes.fromhex(key.id)
    mac = _mac(key.secret, head, context, body)
    return b"".join([head, mac, *body])


def pack(value: Any) -> Packed:
    """``value`` encoded now, unsigned, for :func:`unpack` later (see :class:`Packed`)."""
    data = b"".join(_body(value))
    info = _meta(memoryview(data), 0)
    return Packed(data, tuple(info["user_types"]), int(info["user_objects"]))


def _body(value: Any) -> list[bytes | memoryview]:
    """The body's pieces: meta with its length, engine pickle with its length, user pickle."""
    buf = io.BytesIO()
    pickler = _EnginePickler(buf)
    pickler.dump(value)
    users = pickler.users
    user = pickle.dumps(users, protocol=_PROTOCOL) if users else b""
    engine = buf.getbuffer()
    meta = json.dumps(
        {
            "user_objects": len(users) + pickler.nested_objects,
            "user_types": sorted(pickler.user_types),
        },
        separators=(",", ":"),
    ).encode("ascii")
    return [_META_LEN.pack(len(meta)) + meta, _ENGINE_LEN.pack(len(engine)), engine, user]


class _EnginePickler(pickle.Pickler):
    """Pickles builtins and engine types inline; any other object goes to ``users`` and
    is referred to by its index (``_user(i)``).

    ``reducer_override`` is called only for objects that are not exact builtin scalars
    or containers (pickle handles those before asking), so state made of dicts, lists,
    numbers and strings costs what plain pickle costs."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self.users: list[Any] = []
        self.user_types: set[str] = set()
        self.nested_objects = 0
        self._user_kinds: set[type] = set()
        self._engine = _engine_types()
        self._globals = _allowed_global_objects()

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in self._user_kinds:  # the common case of user state: seen this class
            users = self.users
            users.append(obj)
            return _user, (len(users) - 1,)
        if kind in self._engine:
            if kind is Packed:
                self.user_types.update(obj.user_types)
                self.nested_objects += obj.user_objects
            elif kind is zoneinfo.ZoneInfo:  # by its key, not its default getattr(...) form
                return (zoneinfo.ZoneInfo, (obj.key,)) if obj.key is not None else self._user(obj)
            return NotImplemented
        if isinstance(obj, type | FunctionType | BuiltinFunctionType):
            if any(obj is g for g in self._globals):
                return NotImplemented
            self.user_types.add(_qualified(obj))
        else:
            self._user_kinds.add(kind)
            self.user_types.add(_qualified(kind))
        return self._user(obj)

    def _user(self, obj: Any) -> tuple[Any, ...]:
        self.users.append(obj)
        return _user, (len(self.users) - 1,)


def _user(index: int) -> Any:  # pragma: no cover - a name in the engine pickle, never called
    """Stands for the user-section object number ``index`` (resolved by the unpickler)."""
    raise AssertionError(f"user object {index} outside a checkpoint decode")


def _qualified(cls: Any) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"


@functools.cache
def _engine_types() -> frozenset[type]:
    types: set[type] = set(_DATA_TYPES)
    for name in _ENGINE_TYPE_NAMES:
        module, _, attr = name.rpartition(".")
        cls = getattr(importlib.import_module(module), attr)
        if not isinstance(cls, type) or _qualified(cls) != name:
            raise AssertionError(f"engine type {name} resolves to {cls!r}")
        types.add(cls)
    return frozenset(types)


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object: every global an engine pickle may name."""
    allowed: dict[tuple[str, str], Any] = {
        (obj.__module__, obj.__qualname__): obj for obj in (*_engine_types(), *_BUILTIN_GLOBALS)
    }
    allowed[(__name__, "_user")] = _user
    allowed[(__name__, "unpacked")] = unpacked
    return allowed


@functools.cache
def _allowed_global_objects() -> tuple[Any, ...]:
    return tuple(_allowed_globals().values())


# -- verifying ----------------------------------------------------------------------------


def _mac(secret: bytes, head: bytes, context: bytes, body: Iterable[bytes | memoryview]) -> bytes:
    h = hmac.new(secret, head, hashlib.sha256)
    h.update(_ENGINE_LEN.pack(len(context)))
    h.update(context)
    for piece in body:
        h.update(piece)
    return h.digest()


def verify(data: bytes, keys: KeyRing | None, context: bytes) -> Verdict:
    """Whether ``data`` is a part signed by one of ``keys`` for ``context``; decodes nothing.

    Args:
        data: the part's bytes, as stored.
        keys: the keys available (None: none is, so nothing signed verifies).
        context: :func:`part_context` of the part, as the restoring flow names it.
    """
    if not data.startswith(MAGIC):
        return Verdict(
            PartStatus.UNAUTHENTICATED,
            "it is not signed (written by a sluiceway from before checkpoints were "
            "authenticated, or by someone else)",
        )
    if len(data) < _HEADER.size + _META_LEN.size:
        return Verdict(PartStatus.ALTERED, f"its header is cut short ({len(data)} bytes)")
    _, fmt, raw_id, mac = _HEADER.unpack_from(data)
    key_id = raw_id.hex()
    if fmt != FORMAT:
        return Verdict(
            PartStatus.ALTERED,
            f"it says it is in part format {fmt}; this sluiceway writes and reads format "
            f"{FORMAT} (a newer sluiceway may have written it, or it was altered)",
            key_id,
        )
    if keys is None:
        return Verdict(
            PartStatus.WRONG_KEY,
            f"it is signed with key {key_id}, and no checkpoint key is available here",
            key_id,
        )
    key = keys.find(key_id)
    if key is None:
        return Verdict(
            PartStatus.WRONG_KEY,
            f"it is signed with key {key_id}, which is not among the keys available here",
            key_id,
        )
    view = memoryview(data)
    expected = _mac(key.secret, bytes(view[:_MAC_AT]), context, (view[_HEADER.size :],))
    if not hmac.compare_digest(expected, mac):
        return Verdict(
            PartStatus.ALTERED,
            f"its signature (key {key_id}) does not match its contents: it was altered, "
            "forged, or moved from another operator or flow",
            key_id,
        )
    meta = _meta(view)
    return Verdict(
        PartStatus.OK,
        "",
        key_id,
        tuple(meta["user_types"]),
        int(meta["user_objects"]),
    )


def _meta(body_or_part: memoryview, at: int = _HEADER.size) -> dict[str, Any]:
    (n,) = _META_LEN.unpack_from(body_or_part, at)
    meta: dict[str, Any] = json.loads(
        bytes(body_or_part[at + _META_LEN.size : at + _META_LEN.size + n])
    )
    return meta


# -- decoding -----------------------------------------------------------------------------


def decode(data: bytes) -> Any:
    """The value of a part that :func:`verify` found ok (it is not checked again here).

    Raises:
        pickle.UnpicklingError: the engine layer names a global that is not an engine
            type (never the case for a part this codec wrote).
    """
    if not data.startswith(MAGIC):
        raise ValueError("not a signed checkpoint part (verify it first)")
    return _decode_body(memoryview(data)[_HEADER.size :])


def unpack(packed: Packed | bytes) -> Any:
    """The value :func:`pack` packed.  Call it only on what came out of a verified part
    (or, as ``bytes``, out of an unauthenticated part its owner chose to trust: the
    pickled form older versions wrote)."""
    if isinstance(packed, Packed):
        return _decode_body(memoryview(packed.data))
    if isinstance(packed, bytes):
        return pickle.loads(packed)  # an old checkpoint restored under an explicit trust
    raise TypeError(f"not a packed value: {type(packed).__name__}")


def unpacked(packed: Packed) -> Any:
    """:func:`unpack` of a :class:`Packed` only: what an engine type's ``__reduce__`` may
    name to be rebuilt from a packed value (the engine layer may call it; it never
    unpickles bare bytes)."""
    if not isinstance(packed, Packed):
        raise TypeError(f"not a packed value: {type(packed).__name__}")
    return _decode_body(memoryview(packed.data))


def _decode_body(body: memoryview) -> Any:
    (n,) = _META_LEN.unpack_from(body, 0)
    at = _META_LEN.size + n
    (engine_len,) = _ENGINE_LEN.unpack_from(body, at)
    at += _ENGINE_LEN.size
    engine = body[at : at + engine_len]
    user = body[at + engine_len :]
    users: list[Any] | None = pickle.loads(user) if len(user) else None
    return _EngineUnpickler(io.BytesIO(engine), users).load()


class _EngineUnpickler(pickle.Unpickler):
    """Builds builtins and engine types only; ``_user(i)`` is the user section's object i."""

    def __init__(self, file: io.BytesIO, users: list[Any] | None) -> None:
        super().__init__(file)
        self._users = users
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == (__name__, "_user"):
            if self._users is None:
                raise pickle.UnpicklingError("a user object is named, but the part has none")
            return self._users.__getitem__
        found = self._allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not a type the engine's state may hold"
            )
        return found


# -- a whole checkpoint -------------------------------------------------------------------


def checkpoint_verdicts(
    states: Mapping[str, OperatorState],
    chains: Mapping[str, Mapping[str, Sequence[bytes]]],
    keys: KeyRing | None,
    *,
    flow: str,
) -> dict[str, Verdict]:
    """The verdict of every part and of every segment of every chain of a checkpoint
    (segments named by :func:`segment_label`); decodes nothing."""
    verdicts = {
        name: verify(st.data, keys, part_context(flow, name, st.kind))
        for name, st in sorted(states.items())
    }
    for operator, partitions in sorted(chains.items()):
        for partition, chain in sorted(partitions.items()):
            verdicts.update(chain_verdicts(flow, operator, partition, chain, keys))
    return verdicts


def verify_checkpoint(
    states: Mapping[str, OperatorState],
    keys: KeyRing | None,
    *,
    chains: Mapping[str, Mapping[str, Sequence[bytes]]] | None = None,
    flow: str,
    where: str,
    fixes: str,
    trust_unauthenticated: bool = False,
) -> dict[str, Verdict]:
    """Verify every part of a checkpoint and every segment of every chain it references
    (``Checkpoint.chains``: operator -> partition -> base, deltas); decodes nothing.

    Args: as :func:`open_checkpoint`.

    Returns:
        Each part's verdict (all ok, or unauthenticated and trusted).

    Raises:
        CheckpointAuthError: some part does not verify; every failing part is named,
            with why, the keys tried and what to do.
    """
    verdicts = checkpoint_verdicts(states, chains or {}, keys, flow=flow)
    failed = {
        name: v
        for name, v in verdicts.items()
        if not v.ok
        and not (
            trust_unauthenticated
            and name in states  # a segment is never trusted unsigned: none predates signing
            and v.status is PartStatus.UNAUTHENTICATED
        )
    }
    if failed:
        raise CheckpointAuthError(_refusal(where, failed, keys, fixes, states))
    return verdicts


def open_checkpoint(
    states: Mapping[str, OperatorState],
    keys: KeyRing | None,
    *,
    chains: Mapping[str, Mapping[str, Sequence[bytes]]] | None = None,
    flow: str,
    where: str,
    fixes: str,
    trust_unauthenticated: bool = False,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Verify every part of a checkpoint and every segment of its chains, then -- only if
    all verify -- decode the parts (the caller decodes the verified chains).

    Args:
        states: the checkpoint's parts by operator name.
        chains: its incremental parts' chains (``Checkpoint.chains``): every segment
            must verify, unsigned ones included (trust never covers a segment).
        keys: the keys available.
        flow: the flow's name (part of each part's context).
        where: what the checkpoint is, for messages (``checkpoint 4 of flow 'x' in F``).
        fixes: what the user can do, appended to a refusal (how to reset, the docs).
        trust_unauthenticated: decode unsigned parts with plain pickle (an explicit,
            one-time opt-in for checkpoints an older sluiceway wrote).  Signed parts
            must still verify.
        warn: called with one sentence when unsigned parts are trusted.

    Returns:
        Operator name -> its state.

    Raises:
        CheckpointAuthError: some part does not verify; every failing part is named,
            with why; nothing was decoded.
        CheckpointError: a verified part cannot be decoded (a class it holds is gone).
    """
    verdicts = verify_checkpoint(
        states,
        keys,
        chains=chains,
        flow=flow,
        where=where,
        fixes=fixes,
        trust_unauthenticated=trust_unauthenticated,
    )
    trusted = [
        n for n, v in verdicts.items() if n in states and v.status is PartStatus.UNAUTHENTICATED
    ]
    if trusted and warn is not None:
        warn(
            f"{where}: restoring the unsigned state of {', '.join(map(repr, trusted))} "
            "because it was explicitly trusted; the checkpoints taken from now on are signed"
        )
    values: dict[str, Any] = {}
    for name, st in states.items():
        try:
            values[name] = pickle.loads(st.data) if name in trusted else decode(st.data)
        except Exception as exc:
            raise CheckpointError(
                f"{where}: the state of operator {name!r} verifies but cannot be loaded: "
                f"{type(exc).__name__}: {exc} (is a class it holds gone or renamed?)"
            ) from exc
    return values


def _refusal(
    where: str,
    failed: Mapping[str, Verdict],
    keys: KeyRing | None,
    fixes: str,
    parts_named: Iterable[str],
) -> str:
    """The refusal: the failing parts (``parts_named``) by operator name, the failing
    segments by :func:`segment_label`, each group with why; then the keys and the fixes."""
    whole = set(parts_named)
    same: dict[tuple[PartStatus, str, bool], list[str]] = {}
    for name, v in failed.items():
        part = name in whole
        same.setdefault((v.status, v.reason, part), []).append(repr(name) if part else name)
    parts = "; ".join(
        f"{'operator' if part else 'segment'}{'s' if len(names) > 1 else ''} "
        f"{', '.join(names)}: {status.value}: {reason}"
        for (status, reason, part), names in same.items()
    )
    statuses = {v.status for v in failed.values()}
    advice: list[str] = []
    if PartStatus.WRONG_KEY in statuses:
        advice.append(
            "if it was signed with another key (another machine's, or one rotated out), "
            "make that key available: add it on a later line of the key file, or set "
            "SLUICEWAY_CHECKPOINT_KEY / SLUICEWAY_CHECKPOINT_KEY_FILE to it"
        )
    if PartStatus.UNAUTHENTICATED in statuses:
        advice.append(
            "if an older sluiceway wrote it and no one else could have written the "
            "checkpoint directory since, trust it once: Checkpoints(..., "
            "trust_unauthenticated=ID) or SLUICEWAY_CHECKPOINT_TRUST_UNAUTHENTICATED=ID "
            "with this checkpoint's id"
        )
    if PartStatus.ALTERED in statuses or not advice:
        advice.append("someone or something changed it after it was written")
    using = keys.describe() if keys is not None else "no key"
    return (
        f"{where} does not verify, so none of it was loaded (it could run code someone "
        f"else wrote): {parts}.  Keys used: {using}.  What to do: {'; '.join(advice)}; "
        f"if you cannot trust it, start over: {fixes}"
    )
