"""Authenticated checkpoints (issue 18 item 1): a writable checkpoint store must not mean
code execution.

The attack: someone who can write the checkpoint directory (but cannot read the key)
saves a checkpoint with the store's own API whose part, once unpickled, runs their code
(here: creates a marker file).  The flow restarts.  It must refuse the checkpoint, naming
it, the operator and why -- and the marker must not exist.  Also: wrong key, rotation, key
files, one altered byte, checkpoints of the previous (unsigned) version, and the
allow-list decoder of the engine's own state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import pickle
import sqlite3
import stat
import struct
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import sluiceway as sw
from sluiceway import agg, cli
from sluiceway.checkpoint import CheckpointStore, OperatorState, codec
from sluiceway.checkpoint.keys import (
    ENV_KEY,
    ENV_KEY_FILE,
    CheckpointKey,
    KeyRing,
    default_key_path,
    load_keys,
)
from sluiceway.core.delta import Changes, Incremental
from sluiceway.runtime import compactor
from sluiceway.runtime.segments import fold_chain, unchain
from test_checkpoints import FLOWS, _run_until, records

KEY_A = "a" * 20 + "-first-key-of-the-test"
KEY_B = "b" * 20 + "-second-key-of-the-tst"
FLOW = "auth"
N = 2000


@dataclasses.dataclass
class Tally:
    """User state of a class of the user's own: it goes to a part's user section."""

    n: int


def _count(state: Tally | None, x: int) -> tuple[Tally, list[int]]:
    state = state or Tally(0)
    state.n += 1
    return state, [x % 5, state.n]


def build(out: Path) -> sw.Flow:
    flow = sw.Flow(FLOW)
    (
        flow.source(sw.sources.Generator(lambda: iter(range(N)), rate=1000), name="src")
        .key_by(lambda x: x % 5, name="key")
        .stateful_map(_count, name="count")
        .sink(sw.sinks.JsonLines(out), name="out")
    )
    return flow


def stop_midway(out: Path, ckpt: sw.Checkpoints, at: float = 0.7) -> sw.RunResult:
    async def main() -> sw.RunResult:
        clock = sw.VirtualClock()
        handle = sw.start(build(out), clock=clock, checkpoints=ckpt)
        await clock.sleep(at)
        return await handle.stop()

    return asyncio.run(main())


def run_to_end(out: Path, ckpt: sw.Checkpoints) -> sw.RunResult:
    return sw.testing.run_flow(build(out), checkpoints=ckpt)


def uninterrupted(tmp_path: Path) -> list[str]:
    out = tmp_path / "once.jsonl"
    run_to_end(out, sw.Checkpoints(tmp_path / "once-ckpt"))
    return sorted(out.read_text().splitlines())


def list_json(directory: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert cli.main(["checkpoints", "list", str(directory), "--json"]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def status_of(directory: Path, checkpoint_id: int, capsys: pytest.CaptureFixture[str]) -> str:
    rows = list_json(directory, capsys)["checkpoints"]
    (row,) = [r for r in rows if r["id"] == checkpoint_id]
    return str(row["status"])


@pytest.fixture(autouse=True)
def _cli_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_configure_logging", lambda level: None)


# -- the attack ------------------------------------------------------------------------


class Payload:
    """Unpickling it creates ``marker``: the stand-in for code someone else wrote."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _body(engine: bytes, user: bytes = b"") -> bytes:
    """A part body in the codec's format 1 (the layout documented in codec.py)."""
    meta = b'{"user_objects":0,"user_types":[]}'
    return struct.pack(">I", len(meta)) + meta + struct.pack(">Q", len(engine)) + engine + user


def _forgeries(marker: Path, real: bytes, ctx: bytes | None = None) -> dict[str, bytes]:
    """What someone who can write the store, but not read the key, can make (``ctx``:
    the context it claims, by default the 'count' part's)."""
    evil = pickle.dumps(Payload(marker))
    real_key_id = real[7:15]
    own_key = KeyRing.parse("x" * 40, source="the attacker's own key").current
    ctx = ctx or codec.part_context(FLOW, "count", "stateful_map")
    return {
        # what the previous version would have unpickled at once
        "plain pickle": evil,
        # the new format, with a made-up signature
        "made-up key": b"SLWCKP\x01" + b"\x00" * 8 + b"\x00" * 32 + _body(evil),
        # the real key's id (public: it is in every part), a guessed MAC
        "real key id": b"SLWCKP\x01" + real_key_id + b"\x11" * 32 + _body(evil),
        # a real part's whole header (id and MAC), another body
        "copied signature": real[:47] + _body(evil),
        # a payload in the user section, the engine layer referring to it
        "copied signature, user section": real[:47]
        + _body(pickle.dumps([codec._user]), pickle.dumps([Payload(marker)])),
        # properly signed, but with a key of the attacker's own
        "attacker's key": codec.encode(Payload(marker), own_key, ctx),
    }


@pytest.mark.parametrize(
    "forgery",
    [
        "plain pickle",
        "made-up key",
        "real key id",
        "copied signature",
        "copied signature, user section",
        "attacker's key",
    ],
)
def test_a_forged_checkpoint_is_refused_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], forgery: str
) -> None:
    ckdir, out, marker = tmp_path / "ckpt", tmp_path / "out.jsonl", tmp_path / "pwned"
    ckpt = sw.Checkpoints(ckdir, interval=0.25)
    stop_midway(out, ckpt)
    with CheckpointStore(ckdir) as store:  # the store's own API, as an attacker can use it
        real = store.latest(FLOW)
        assert real is not None
        evil = _forgeries(marker, real.states["count"].data)[forgery]
        states = dict(real.states)
        states["count"] = OperatorState("count", "stateful_map", evil)
        forged = store.next_id(FLOW)
        store.save(FLOW, forged, states, created=real.info.created + 1, duration=0.0)
        assert store.latest(FLOW).info.id == forged  # type: ignore[union-attr]  # not torn

    with pytest.raises(sw.CheckpointAuthError) as refused:
        run_to_end(out, ckpt)
    message = str(refused.value)
    assert not marker.exists(), "the forged checkpoint ran its payload"
    assert f"checkpoint {forged} of flow {FLOW!r}" in message
    assert "operator 'count'" in message
    assert "none of it was loaded" in message
    assert f"sluiceway checkpoints reset {ckdir} --flow {FLOW}" in message
    status = status_of(ckdir, forged, capsys)
    assert status != "ok"
    assert status.split(":")[0] in {"unauthenticated", "wrong key", "altered"}
    assert not marker.exists()


def test_every_part_is_verified_before_any_is_unpickled(tmp_path: Path) -> None:
    """A part signed with the right key whose user section would run code (the test holds
    the key) is not decoded when another part of the checkpoint fails: nothing is
    unpickled until every part has verified."""
    ckdir, out, marker = tmp_path / "ckpt", tmp_path / "out.jsonl", tmp_path / "pwned"
    ckpt = sw.Checkpoints(ckdir, interval=0.25)
    stop_midway(out, ckpt)
    keys = load_keys()
    assert keys is not None
    with CheckpointStore(ckdir) as store:
        real = store.latest(FLOW)
        assert real is not None
        states = dict(real.states)
        ctx = codec.part_context(FLOW, "count", "stateful_map")
        states["count"] = OperatorState(
            "count", "stateful_map", codec.encode(Payload(marker), keys.current, ctx)
        )
        src = bytearray(states["src"].data)
        src[-1] ^= 1
        states["src"] = OperatorState("src", "source", bytes(src))
        store.save(FLOW, store.next_id(FLOW), states, created=real.info.created, duration=0)
    assert sorted(states) == ["count", "key", "out", "src"]  # 'count' would come first
    with pytest.raises(sw.CheckpointAuthError, match=r"operator 'src': altered"):
        run_to_end(out, ckpt)
    assert not marker.exists()


# -- the attack on a chain: a forged base or delta segment --------------------------------


_FORGERIES = [
    "plain pickle",
    "made-up key",
    "real key id",
    "copied signature",
    "copied signature, user section",
    "attacker's key",
]


@pytest.mark.parametrize("forgery", _FORGERIES)
@pytest.mark.parametrize("position", [0, -1], ids=["base", "delta"])
def test_a_forged_segment_is_refused_and_runs_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], forgery: str, position: int
) -> None:
    """A base or a delta of the chain the newest checkpoint references, replaced in the
    store file (sha256 recomputed) by what an attacker without the key can make: the
    restart refuses it, naming the segment; nothing is unpickled; `checkpoints list`
    and `inspect` say it is not ok; the compaction of that chain refuses it too."""
    ckdir, out, marker = tmp_path / "ckpt", tmp_path / "out.jsonl", tmp_path / "pwned"
    ckpt = sw.Checkpoints(ckdir, interval=0.25, compact_ratio=100)  # keep the deltas

    def forge(real: bytes) -> bytes:
        ctx = codec.segment_context(FLOW, "count", "-", base=position == 0)
        return _forgeries(marker, real, ctx)[forgery]

    stop_midway(out, ckpt)
    label = _rewrite_segment(ckdir, position, forge)
    with pytest.raises(sw.CheckpointAuthError) as refused:
        run_to_end(out, ckpt)
    message = str(refused.value)
    assert not marker.exists(), "the forged segment ran its payload"
    assert f"segment {label}: " in message
    assert "none of it was loaded" in message
    assert f"sluiceway checkpoints reset {ckdir} --flow {FLOW}" in message
    latest = list_json(ckdir, capsys)["checkpoints"][0]
    assert latest["ok"] is False
    assert latest["status"].split(":")[0] in {"unauthenticated", "wrong key", "altered"}
    assert cli.main(["checkpoints", "inspect", str(ckdir), str(latest["id"])]) == 1
    assert "partition -  base+deltas" in capsys.readouterr().out
    keys = load_keys()
    with CheckpointStore(ckdir) as store, pytest.raises(sw.CheckpointAuthError, match=label):
        store.compact(FLOW, partial(fold_chain, keys, FLOW), after=1)
    assert not marker.exists(), "compaction ran the forged segment's payload"


def test_trust_unauthenticated_never_covers_an_unsigned_segment(tmp_path: Path) -> None:
    """Trusting an unsigned checkpoint is for whole parts an older sluiceway wrote; no
    sluiceway wrote unsigned segments, so an unsigned one is refused even then."""
    ckdir, out, marker = tmp_path / "ckpt", tmp_path / "out.jsonl", tmp_path / "pwned"
    ckpt = sw.Checkpoints(ckdir, interval=0.25, compact_ratio=100)
    stop_midway(out, ckpt)
    label = _rewrite_segment(ckdir, -1, lambda _: pickle.dumps(Payload(marker)))
    with CheckpointStore(ckdir) as store:
        latest = store.latest(FLOW)
        assert latest is not None
    trusting = sw.Checkpoints(ckdir, interval=0.25, trust_unauthenticated=latest.info.id)
    with pytest.raises(sw.CheckpointAuthError, match=f"segment {label}: unauthenticated"):
        run_to_end(out, trusting)
    assert not marker.exists()


def test_every_segment_is_verified_before_any_is_unpickled(tmp_path: Path) -> None:
    """A base signed with the right key (the test holds it) whose user section would run
    code is not decoded while a delta of the same chain fails to verify."""
    ckdir, out, marker = tmp_path / "ckpt", tmp_path / "out.jsonl", tmp_path / "pwned"
    ckpt = sw.Checkpoints(ckdir, interval=0.25, compact_ratio=100)
    stop_midway(out, ckpt)
    keys = load_keys()
    assert keys is not None
    ctx = codec.segment_context(FLOW, "count", "-", base=True)
    _rewrite_segment(ckdir, 0, lambda _: codec.encode(Payload(marker), keys.current, ctx))
    label = _rewrite_segment(ckdir, -1, lambda data: _flip(data, "last byte"))
    with pytest.raises(sw.CheckpointAuthError, match=f"segment {label}: altered"):
        run_to_end(out, ckpt)
    assert not marker.exists()
    with CheckpointStore(ckdir) as store, pytest.raises(sw.CheckpointAuthError):
        store.compact(FLOW, partial(fold_chain, keys, FLOW), after=1)
    assert not marker.exists()


def test_a_segment_moved_to_another_partition_or_position_is_refused() -> None:
    """A segment's MAC binds its flow, operator, partition and kind (base or delta): a
    delta cannot pose as a base, nor move to another operator's or partition's chain."""
    key = KeyRing.parse("k" * 32, source="test").current
    ring = KeyRing((key,), "test")
    delta = codec.encode({"a": 1}, key, codec.segment_context(FLOW, "count", "0", base=False))
    assert codec.verify(delta, ring, codec.segment_context(FLOW, "count", "0", base=False)).ok
    for flow, op, partition, base in [
        (FLOW, "count", "0", True),
        (FLOW, "count", "1", False),
        (FLOW, "other", "0", False),
        ("another flow", "count", "0", False),
    ]:
        ctx = codec.segment_context(flow, op, partition, base=base)
        assert codec.verify(delta, ring, ctx).status is codec.PartStatus.ALTERED
    # ...nor pass for the operator's whole part
    ctx = codec.part_context(FLOW, "count/0", "delta")
    assert codec.part_context(FLOW, "count", "stateful_map") != ctx


def test_the_compactor_child_gets_the_key_ring_in_its_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child folds and signs with the flow's keys, whatever their source (here a key
    file with an older key too); they reach it in its environment, never on its command
    line (which `ps` shows every user) nor in the checkpoint directory."""
    key_file = tmp_path / "keys"
    key_file.write_text(f"{KEY_A}\n{KEY_B}\n")
    key_file.chmod(0o600)
    keys = load_keys(key_file=key_file)
    assert keys is not None
    seen: dict[str, Any] = {}
    real_popen = compactor.subprocess.Popen

    def spy(command: list[str], **kwargs: Any) -> Any:
        seen["command"], seen["env"] = command, kwargs["env"]
        return real_popen(command, **kwargs)

    monkeypatch.setattr(compactor.subprocess, "Popen", spy)
    monkeypatch.setenv(ENV_KEY_FILE, str(key_file))
    # the child unpickles the keys' Tally objects it folds: it must import this module
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    ckdir = tmp_path / "ckpt"
    stop_midway(
        tmp_path / "out.jsonl",
        sw.Checkpoints(ckdir, interval=0.25, key_file=key_file, compact_ratio=100),
    )
    assert compactor.compact_in_child(ckdir, FLOW, keys, ratio=0.5, after=1, larger_than=-1) == 1
    assert not any(KEY_A in arg or KEY_B in arg for arg in seen["command"])
    assert seen["env"][ENV_KEY].splitlines() == [KEY_A, KEY_B]
    assert ENV_KEY_FILE not in seen["env"]  # one source: the ring as the flow loaded it
    assert not any(KEY_A.encode() in p.read_bytes() for p in ckdir.rglob("*") if p.is_file())
    # The new base verifies under the flow's keys, and the flow restores from it.
    with CheckpointStore(ckdir) as store:
        latest = store.latest(FLOW)
        assert latest is not None
        assert len(latest.chains["count"]["-"]) == 1
        codec.verify_checkpoint(
            latest.states, keys, chains=latest.chains, flow=FLOW, where="x", fixes="y"
        )
    # ...and a child without the key refuses rather than fold what it cannot verify
    with pytest.raises(sw.CheckpointError, match="none is available"):
        compactor.compact_in_child(ckdir, FLOW, None, ratio=0.5, after=1, larger_than=-1)


# -- keys: wrong key, rotation ---------------------------------------------------------


def test_a_wrong_key_is_refused_naming_the_way_out_and_the_right_key_restores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    want = uninterrupted(tmp_path)
    ckdir, out = tmp_path / "ckpt", tmp_path / "out.jsonl"
    ckpt = sw.Checkpoints(ckdir, interval=0.25)
    monkeypatch.setenv(ENV_KEY, KEY_A)
    stop_midway(out, ckpt)
    latest = list_json(ckdir, capsys)["checkpoints"][0]
    assert latest["status"] == "ok"

    monkeypatch.setenv(ENV_KEY, KEY_B)
    with pytest.raises(sw.CheckpointAuthError) as refused:
        run_to_end(out, ckpt)
    message = str(refused.value)
    a, b = CheckpointKey.of(KEY_A).id, CheckpointKey.of(KEY_B).id
    assert f"checkpoint {latest['id']} of flow {FLOW!r}" in message
    assert (
        f"operators 'count', 'key', 'out', 'src': wrong key: it is signed with key {a}, "
        "which is not among the keys available here" in message
    )
    assert f"key {b} from the environment variable {ENV_KEY}" in message
    assert "add it on a later line of the key file" in message
    assert "SLUICEWAY_CHECKPOINT_KEY_FILE" in message
    assert KEY_A not in message
    assert KEY_B not in message
    status = status_of(ckdir, latest["id"], capsys)
    assert status.startswith(f"wrong key: operator 'count': it is signed with key {a}")

    monkeypatch.setenv(ENV_KEY, KEY_A)
    run_to_end(out, ckpt)
    assert sorted(out.read_text().splitlines()) == want


def test_rotation_old_keys_read_while_the_new_one_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    want = uninterrupted(tmp_path)
    ckdir, out = tmp_path / "ckpt", tmp_path / "out.jsonl"
    ckpt = sw.Checkpoints(ckdir, interval=0.25, keep=2)
    a, b = CheckpointKey.of(KEY_A).id, CheckpointKey.of(KEY_B).id
    key_file = tmp_path / "keys" / "checkpoint.key"
    key_file.parent.mkdir()
    key_file.write_text(f"{KEY_A}\n")
    key_file.chmod(0o600)
    monkeypatch.setenv(ENV_KEY_FILE, str(key_file))
    stop_midway(out, ckpt, at=0.5)

    # Rotate: the new key first (it signs), the old one below (still read).
    key_file.write_text(f"# rotated\n{KEY_B}\n{KEY_A}\n")
    result = stop_midway(out, ckpt, at=0.5)
    assert result.checkpoints is not None
    assert result.checkpoints.restored_from is not None
    parts = _inspect_parts(ckdir, capsys)
    assert {p["key_id"] for p in parts} == {b}
    assert {p["auth"] for p in parts} == {"ok"}

    # The old key retired: the newest checkpoints are signed with the new one.
    key_file.write_text(f"{KEY_B}\n")
    run_to_end(out, ckpt)
    assert sorted(out.read_text().splitlines()) == want

    # And a run that has only the old key cannot read what the new one signed.
    key_file.write_text(f"{KEY_A}\n")
    with pytest.raises(sw.CheckpointAuthError, match=f"signed with key {b}"):
        run_to_end(out, ckpt)
    assert a != b


def _inspect_parts(directory: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    assert cli.main(["checkpoints", "inspect", str(directory), "--json"]) == 0
    parts: list[dict[str, Any]] = json.loads(capsys.readouterr().out)["parts"]
    return parts


def test_machines_sharing_a_configured_key_restore_each_others_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two 'machines': different default keys (config dirs), one configured key file."""
    want = uninterrupted(tmp_path)
    ckdir, out = tmp_path / "ckpt", tmp_path / "out.jsonl"
    shared = tmp_path / "secrets" / "checkpoint.key"
    shared.parent.mkdir()
    shared.write_text(KEY_A + "\n")
    shared.chmod(0o400)
    ckpt = sw.Checkpoints(ckdir, interval=0.25, key_file=shared)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "machine-1"))
    stop_midway(out, ckpt)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "machine-2"))
    run_to_end(out, ckpt)
    assert sorted(out.read_text().splitlines()) == want
    assert not (tmp_path / "machine-1").exists()  # a configured key: no default key made
    # Without the shared key, machine 2's own default key does not verify them.
    with pytest.raises(sw.CheckpointAuthError, match="wrong key"):
        run_to_end(out, sw.Checkpoints(ckdir, interval=0.25))


# -- one altered byte ------------------------------------------------------------------


def _flip(data: bytes, where: str) -> bytes:
    """``data`` (a signed part or segment) with one bit changed in its ``where``."""
    (meta_len,) = struct.unpack_from(">I", data, 47)
    offsets = {
        "magic": 0,
        "format": 6,
        "key id": 9,
        "mac": 30,
        "meta": 51 + meta_len // 2,
        "engine": 51 + meta_len + 8 + 1,
    }
    flipped = bytearray(data)
    flipped[offsets.get(where, len(data) - 1)] ^= 0x01
    return bytes(flipped)


def _rewrite_segment(ckdir: Path, position: int, forge: Callable[[bytes], bytes]) -> str:
    """Replace a segment of the newest checkpoint's 'count' chain in the store file, as
    someone who can write it (but cannot read the key) can: new bytes, and the sha256 the
    store keeps beside them to catch accidents.  ``position``: 0 the base, -1 the last
    delta.  Returns how messages name it (:func:`codec.segment_label`)."""
    with CheckpointStore(ckdir) as store:
        real = store.latest(FLOW)
        assert real is not None
        cid = real.info.id
        (partition,) = real.chains["count"]
    conn = sqlite3.connect(ckdir / "checkpoints.db")
    try:
        ids = [
            sid
            for (sid,) in conn.execute(
                "SELECT segment_id FROM refs WHERE flow = ? AND checkpoint_id = ? AND"
                " operator = 'count' ORDER BY position",
                (FLOW, cid),
            )
        ]
        assert len(ids) >= 2, "the test needs a chain with a delta"
        sid = ids[position]
        (data,) = conn.execute("SELECT data FROM segments WHERE id = ?", (sid,)).fetchone()
        forged = forge(bytes(data))
        with conn:
            conn.execute(
                "UPDATE segments SET data = ?, size = ?, sha256 = ? WHERE id = ?",
                (forged, len(forged), hashlib.sha256(forged).hexdigest(), sid),
            )
    finally:
        conn.close()
    return codec.segment_label("count", partition, position % len(ids))


_ONE_BYTE = [
    ("magic", "unauthenticated"),
    ("format", "altered"),
    ("key id", "wrong key"),
    ("mac", "altered"),
    ("meta", "altered"),
    ("engine", "altered"),
    ("last byte", "altered"),
]


@pytest.mark.parametrize(("where", "status"), _ONE_BYTE)
def test_a_part_altered_by_one_byte_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, status: str
) -> None:
    ckdir, out = tmp_path / "ckpt", tmp_path / "out.jsonl"
    ckpt = sw.Checkpoints(ckdir, interval=0.25)
    stop_midway(out, ckpt)
    with CheckpointStore(ckdir) as store:
        real = store.latest(FLOW)
        assert real is not None
        data = _flip(real.states["src"].data, where)
        states = {**real.states, "src": OperatorState("src", "source", data)}
        altered = store.next_id(FLOW)
        store.save(FLOW, altered, states, created=real.info.created, duration=0, parent=altered - 1)
    with pytest.raises(sw.CheckpointAuthError, match=f"operator 'src': {status}"):
        run_to_end(out, ckpt)
    assert status_of(ckdir, altered, capsys).startswith(f"{status}: operator 'src'")
    code = cli.main(["checkpoints", "inspect", str(ckdir), str(altered)])
    assert code == 1
    assert capsys.readouterr().out


@pytest.mark.parametrize("position", [0, -1], ids=["base", "delta"])
@pytest.mark.parametrize(("where", "status"), _ONE_BYTE)
def test_a_segment_altered_by_one_byte_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, status: str, position: int
) -> None:
    """A base or a delta of an incremental operator's chain, one bit changed (and the
    store's sha256 recomputed): refused, named, and `checkpoints list` says why."""
    ckdir, out = tmp_path / "ckpt", tmp_path / "out.jsonl"
    ckpt = sw.Checkpoints(ckdir, interval=0.25, compact_ratio=100)  # keep the deltas
    stop_midway(out, ckpt)
    label = _rewrite_segment(ckdir, position, lambda data: _flip(data, where))
    with pytest.raises(sw.CheckpointAuthError) as refused:
        run_to_end(out, ckpt)
    assert f"segment {label}: {status}" in str(refused.value)
    latest = list_json(ckdir, capsys)["checkpoints"][0]
    assert latest["ok"] is False
    assert latest["status"].startswith(f"{status}: segment {label}")


# -- checkpoints of the previous version -----------------------------------------------


def _as_written_before(value: Any) -> Any:
    """A decoded state as the previous version pickled it (keyed state: format 1)."""
    if isinstance(value, dict) and value.get("format") == 2:
        return {**value, "format": 1, "blob": pickle.dumps(codec.unpack(value["blob"]))}
    return value


def _make_unsigned(ckdir: Path) -> int:
    """Rewrite the newest checkpoint as the previous sluiceway wrote it: plain pickles."""
    with CheckpointStore(ckdir) as store:
        real = store.latest(FLOW)
        assert real is not None
        values = {name: codec.decode(st.data) for name, st in real.states.items()}
        values.update({name: unchain(chains) for name, chains in real.chains.items()})
        states = {
            name: OperatorState(name, st.kind, pickle.dumps(_as_written_before(values[name])))
            for name, st in real.states.items()
        }
        old = store.next_id(FLOW)
        store.save(FLOW, old, states, created=real.info.created, duration=0)
    return old


def test_an_unsigned_checkpoint_of_the_previous_version_is_refused_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckdir, out = tmp_path / "ckpt", tmp_path / "out.jsonl"
    ckpt = sw.Checkpoints(ckdir, interval=0.25)
    stop_midway(out, ckpt)
    old = _make_unsigned(ckdir)
    with pytest.raises(sw.CheckpointAuthError) as refused:
        run_to_end(out, ckpt)
    message = str(refused.value)
    assert f"checkpoint {old} of flow {FLOW!r}" in message
    assert "unauthenticated: it is not signed" in message
    assert "trust_unauthenticated=ID" in message
    assert "SLUICEWAY_CHECKPOINT_TRUST_UNAUTHENTICATED=ID" in message
    assert f"sluiceway checkpoints reset {ckdir} --flow {FLOW}" in message
    assert status_of(ckdir, old, capsys).startswith("unauthenticated: operator ")
    # Trusting another id does not trust this one.
    with pytest.raises(sw.CheckpointAuthError):
        run_to_end(out, sw.Checkpoints(ckdir, interval=0.25, trust_unauthenticated=old - 1))


@pytest.mark.parametrize("how", ["option", "environment"])
def test_an_unsigned_checkpoint_trusted_once_restores_and_the_next_ones_are_signed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    want = uninterrupted(tmp_path)
    ckdir, out = tmp_path / "ckpt", tmp_path / "out.jsonl"
    stop_midway(out, sw.Checkpoints(ckdir, interval=0.25))
    old = _make_unsigned(ckdir)
    if how == "option":
        ckpt = sw.Checkpoints(ckdir, interval=0.25, trust_unauthenticated=old)
    else:
        monkeypatch.setenv("SLUICEWAY_CHECKPOINT_TRUST_UNAUTHENTICATED", str(old))
        ckpt = sw.Checkpoints(ckdir, interval=0.25)
    with caplog.at_level(logging.WARNING, logger="sluiceway"):
        result = run_to_end(out, ckpt)
    assert result.checkpoints is not None
    assert result.checkpoints.restored_from == old
    assert "because it was explicitly trusted" in caplog.text
    assert sorted(out.read_text().splitlines()) == want
    newest = list_json(ckdir, capsys)["checkpoints"][0]
    assert newest["id"] > old
    assert newest["status"] == "ok"


def test_a_malformed_trust_variable_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckdir, out = tmp_path / "ckpt", tmp_path / "out.jsonl"
    stop_midway(out, sw.Checkpoints(ckdir, interval=0.25))
    monkeypatch.setenv("SLUICEWAY_CHECKPOINT_TRUST_UNAUTHENTICATED", "yes")
    with pytest.raises(sw.CheckpointError, match="must be the id of the unsigned checkpoint"):
        run_to_end(out, sw.Checkpoints(ckdir, interval=0.25))


def test_trust_unauthenticated_must_be_an_id(tmp_path: Path) -> None:
    for bad in (0, True, "3", -1):
        with pytest.raises(ValueError, match="trust_unauthenticated must be the id"):
            sw.Checkpoints(tmp_path, trust_unauthenticated=bad)  # type: ignore[arg-type]


# -- key files -------------------------------------------------------------------------


def test_the_suite_never_touches_the_real_config_directory() -> None:
    config = os.environ["XDG_CONFIG_HOME"]
    assert Path(config).resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert default_key_path().is_relative_to(config)


def test_the_default_key_is_created_once_private_and_outside_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = tmp_path / "config" / "sluiceway" / "checkpoint.key"
    ids: list[str] = []

    def load() -> None:
        keys = load_keys(checkpoint_dir=tmp_path / "ckpt")
        assert keys is not None
        ids.append(keys.current.id)

    threads = [threading.Thread(target=load) for _ in range(8)]  # racing to create it
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 8
    assert len(set(ids)) == 1  # one key, created once
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.key"]  # no temp left
    text = path.read_text()
    assert len([line for line in text.splitlines() if not line.startswith("#")]) == 1
    load()
    assert path.read_text() == text  # not recreated
    assert not (tmp_path / "ckpt").exists()


def test_reading_keys_for_the_command_line_creates_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert load_keys(create=False) is None
    assert not (tmp_path / "config").exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644])
def test_a_key_file_others_can_read_or_write_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    path = tmp_path / "config" / "sluiceway" / "checkpoint.key"
    path.parent.mkdir(parents=True)
    path.write_text(KEY_A + "\n")
    path.chmod(mode)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    with pytest.raises(sw.CheckpointKeyError) as refused:
        load_keys()
    assert f"mode {mode:04o}" in str(refused.value)
    assert f"chmod 600 {path}" in str(refused.value)
    with pytest.raises(sw.CheckpointKeyError, match="accessible to group or others"):
        load_keys(key_file=path)
    monkeypatch.setenv(ENV_KEY_FILE, str(path))
    with pytest.raises(sw.CheckpointKeyError, match="accessible to group or others"):
        load_keys()
    # And a flow does not start with it.
    with pytest.raises(sw.CheckpointKeyError):
        run_to_end(tmp_path / "out", sw.Checkpoints(tmp_path / "ckpt"))
    assert KEY_A not in str(refused.value)


def test_a_key_inside_the_checkpoint_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckdir = tmp_path / "ckpt"
    inside = ckdir / "checkpoint.key"
    ckdir.mkdir()
    inside.write_text(KEY_A)
    inside.chmod(0o600)
    with pytest.raises(sw.CheckpointKeyError, match="inside the checkpoint directory"):
        run_to_end(tmp_path / "out", sw.Checkpoints(ckdir, key_file=inside))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(ckdir / "config"))  # the default key, too
    with pytest.raises(sw.CheckpointKeyError, match="inside the checkpoint directory"):
        run_to_end(tmp_path / "out", sw.Checkpoints(ckdir))
    assert not (ckdir / "config").exists()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({ENV_KEY: "short"}, "at least 32 characters"),
        ({ENV_KEY: "   "}, "holds no checkpoint key"),
        ({ENV_KEY: KEY_A, ENV_KEY_FILE: "/x"}, "set one of them"),
        ({ENV_KEY_FILE: ""}, "is set but empty"),
        ({ENV_KEY_FILE: "/nonexistent/key"}, "does not exist"),
    ],
)
def test_unusable_key_settings_name_the_fix(env: dict[str, str], message: str) -> None:
    with pytest.raises(sw.CheckpointKeyError, match=message) as refused:
        load_keys(env=env)
    assert "short" not in str(refused.value).replace("shorter", "")


def test_the_key_file_option_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "k"
    path.write_text(KEY_B)
    path.chmod(0o600)
    monkeypatch.setenv(ENV_KEY, KEY_A)
    keys = load_keys(key_file=path)
    assert keys is not None
    assert keys.current.id == CheckpointKey.of(KEY_B).id
    assert KEY_B not in repr(keys)


# -- the codec -------------------------------------------------------------------------


def test_the_engine_layer_builds_only_engine_types_even_when_signed(tmp_path: Path) -> None:
    """Defence in depth: a correctly signed part whose *engine* layer names a global
    outside the allow-list (here Path.touch) is refused by the decoder; only the user
    section may name other classes."""
    marker = tmp_path / "pwned"
    key = CheckpointKey.of(KEY_A)
    ring = KeyRing((key,), source="test")
    ctx = codec.part_context(FLOW, "count", "stateful_map")
    head = b"SLWCKP\x01" + bytes.fromhex(key.id)
    body = _body(pickle.dumps(Payload(marker)))
    mac = hmac.new(key.secret, head, hashlib.sha256)
    for piece in (struct.pack(">Q", len(ctx)), ctx, body):
        mac.update(piece)
    part = head + mac.digest() + body
    assert codec.verify(part, ring, ctx).ok
    with pytest.raises(pickle.UnpicklingError, match=r"pathlib\.Path\.touch is not a type"):
        codec.decode(part)
    assert not marker.exists()


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


def test_round_trip_of_data_and_user_objects() -> None:
    import collections  # noqa: PLC0415
    import datetime  # noqa: PLC0415
    import decimal  # noqa: PLC0415
    import uuid  # noqa: PLC0415
    import zoneinfo  # noqa: PLC0415

    key = CheckpointKey.of(KEY_A)
    ring = KeyRing((key,), source="test")
    ctx = codec.part_context("f", "op", "process")
    shared = Point(1, 2)
    value = {
        "numbers": [1, 2.5, -3, float("inf"), 10**30, True, None],
        "text": ("é", b"\x00", bytearray(b"ab")),
        "sets": ({1, 2}, frozenset({"a"})),
        "time": datetime.datetime(2024, 5, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
        "utc": datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC),
        "money": decimal.Decimal("1.10"),
        "id": uuid.UUID(int=7),
        "containers": (
            collections.deque([1, 2], maxlen=3),
            collections.defaultdict(list, {"a": [1]}),
            collections.OrderedDict(b=1),
            collections.Counter("aab"),
        ),
        "ttl": sw.state.TTL(5, time="event"),
        "changes": Incremental(
            {None: Changes(False, {"k": [1]}, frozenset({"gone"}), extra={"wm": 1.5})},
            dropped=frozenset({3}),
        ),
        "user": [shared, shared, Point(3, 4)],
        "packed": codec.pack({"inner": Point(5, 6)}),
    }
    part = codec.encode(value, key, ctx)
    verdict = codec.verify(part, ring, ctx)
    assert verdict.ok
    assert verdict.user_types == (f"{__name__}.Point",)
    assert verdict.user_objects == 3  # two distinct in "user", one packed
    back = codec.decode(part)
    packed = back.pop("packed")
    assert codec.unpack(packed) == {"inner": Point(5, 6)}
    value.pop("packed")
    assert back == value
    assert back["user"][0] is back["user"][1]  # shared references stay shared


def test_a_part_of_plain_data_has_no_user_section() -> None:
    key = CheckpointKey.of(KEY_A)
    ctx = codec.part_context("f", "op", "window")
    part = codec.encode({"panes": {0: {"k": [1, 2.0]}}}, key, ctx)
    verdict = codec.verify(part, KeyRing((key,), source="t"), ctx)
    assert (verdict.user_objects, verdict.user_types) == (0, ())


@pytest.mark.parametrize("name", list(FLOWS))
def test_the_engines_own_state_is_data_only(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Windows with the built-in aggregators, merge, batch, map_async, joins, keyed
    operators: their checkpoints -- whole parts and every segment of a chain -- hold no
    user section (nothing the general unpickler would build)."""
    build_flow: Callable[[Path, list[dict[str, Any]]], sw.Flow] = FLOWS[name]
    ckdir = tmp_path / "ckpt"
    ckpt = sw.Checkpoints(ckdir, interval=0.25)
    assert asyncio.run(_run_until(build_flow(tmp_path / "out", records()), ckpt, 0.6))
    parts = _inspect_parts(ckdir, capsys)
    assert parts
    for part in parts:
        assert part["auth"] == "ok"
        assert part["user_types"] == [], part
        for chain in part.get("chains", []):  # an incremental part's segments, chunked
            assert chain["auth"] == "ok"
            assert chain["user_types"] == [], (part["name"], chain)


def test_list_without_any_key_creates_none_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ckdir, out = tmp_path / "ckpt", tmp_path / "out.jsonl"
    key_file = tmp_path / "k"
    key_file.write_text(KEY_A)
    key_file.chmod(0o600)
    stop_midway(out, sw.Checkpoints(ckdir, interval=0.25, key_file=key_file))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "fresh"))
    assert cli.main(["checkpoints", "list", str(ckdir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    a = CheckpointKey.of(KEY_A).id
    assert f"wrong key: operator 'count': it is signed with key {a}" in lines[1]
    assert "and no checkpoint key is available here" in lines[1]
    assert lines[-1].startswith("no checkpoint key here (none configured, no default key yet)")
    assert not (tmp_path / "fresh").exists()
    # With the key given on the command line, every checkpoint verifies.
    assert cli.main(["checkpoints", "list", str(ckdir), "--key-file", str(key_file)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.endswith("  ok") for line in lines[1:-2])
    assert lines[-1] == f"signatures checked with key {a} from the key file {key_file}"
    assert cli.main(["checkpoints", "inspect", str(ckdir), "--key-file", str(key_file)]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert rows["count"][-2:] == ["ok", "-"]  # incremental: the state is in its chain...
    assert rows["partition"][-3] == "ok"  # ...whose segments hold the keys' Tally objects
    assert rows["partition"][-1] == f"({__name__}.Tally)"
    assert rows["src"][-2:] == ["ok", "-"]  # a position: data only


def test_a_forgery_is_named_as_such_even_when_its_operators_do_not_match_the_flow(
    tmp_path: Path,
) -> None:
    """Verification comes before everything else a restart checks: a forged checkpoint
    with made-up operators is a CheckpointAuthError, not 'a different version of the
    flow' (which would hide the attack)."""
    ckdir, out, marker = tmp_path / "ckpt", tmp_path / "out.jsonl", tmp_path / "pwned"
    ckpt = sw.Checkpoints(ckdir, interval=0.25)
    stop_midway(out, ckpt)
    with CheckpointStore(ckdir) as store:
        evil = OperatorState("x", "map", pickle.dumps(Payload(marker)))
        store.save(FLOW, store.next_id(FLOW), {"x": evil}, created=0.0, duration=0.0)
    with pytest.raises(sw.CheckpointAuthError, match="operator 'x': unauthenticated"):
        run_to_end(out, ckpt)
    assert not marker.exists()


def test_no_home_directory_names_the_other_ways_to_give_a_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    with pytest.raises(sw.CheckpointKeyError, match="set XDG_CONFIG_HOME, SLUICEWAY_CHECKPOINT"):
        load_keys(env={})
    assert default_key_path({"XDG_CONFIG_HOME": "/etc/x"}) == Path(
        "/etc/x/sluiceway/checkpoint.key"
    )


def test_the_empty_accumulator_is_itself_after_a_round_trip(tmp_path: Path) -> None:
    """min/max/first/last/reduce accumulators test ``acc is EMPTY``: a restored window that
    held no value yet must hold the very same marker, or the next value is compared with
    a stranger (``x < <empty>``: TypeError) instead of taking its place."""
    key = KeyRing.parse(KEY_A, source="the test").current
    ctx = codec.part_context(FLOW, "w", "window")
    back = codec.decode(codec.encode({"acc": agg.EMPTY}, key, ctx))
    assert back["acc"] is agg.EMPTY
    assert pickle.loads(pickle.dumps(agg.EMPTY)) is agg.EMPTY
    assert agg.max().add(back["acc"], 3) == 3
