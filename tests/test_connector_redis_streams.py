"""Redis Streams connectors against a real Redis (see services.py for how one is found).

Conformance: order, credit, ack only after durable handling (sink / checkpoint),
redelivery after a crash (in-process force stop; SIGKILL of a checkpointed child:
exactly once into sinks.JsonLines), clean close, resume from a checkpoint position.
Then bad input, claiming a dead consumer's entries, the sink's transaction, and an
outage: a private persistent redis-server SIGKILLed and restarted mid-stream.

Every test uses streams under its own ``redis_prefix`` (deleted afterwards).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from services import import_or_missing
from services_redis_streams import DurableRedisServer, durable_redis  # noqa: F401

import_or_missing("redis")

import redis  # noqa: E402 - after the skip-or-fail check above

import sluiceway as sw  # noqa: E402
from sluiceway.connectors.redis_streams import (  # noqa: E402
    RedisStreamEntry,
    RedisStreamError,
    RedisStreamSink,
    RedisStreamSource,
)

SRC = Path(__file__).resolve().parents[1] / "src"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def preload(url: str, stream: str, n: int, start: int = 0) -> None:
    client = redis.Redis.from_url(url)
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(start, start + n):
            pipe.xadd(stream, {"data": json.dumps({"i": i})})
        pipe.execute()
    finally:
        client.close()


def pending_count(url: str, stream: str, group: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.xpending(stream, group)["pending"])
    finally:
        client.close()


def group_info(url: str, stream: str, group: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    try:
        for g in client.xinfo_groups(stream):
            if g["name"] == group.encode():
                return dict(g)
        raise AssertionError(f"no group {group}")
    finally:
        client.close()


def read_stream(url: str, stream: str) -> list[Any]:
    client = redis.Redis.from_url(url)
    try:
        return [json.loads(f[b"data"]) for _, f in client.xrange(stream)]
    finally:
        client.close()


async def eventually(cond: Any, within: float = 20.0) -> None:
    """Wait (polling) until ``cond()`` holds: a file or Redis has no event to await."""
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.002)


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def source(url: str, stream: str, **kw: Any) -> RedisStreamSource:
    kw.setdefault("start", "0")
    kw.setdefault("stop_after_idle", 0.3)
    kw.setdefault("block_ms", 100)
    return RedisStreamSource(url, stream, kw.pop("group", "g"), **kw)


# -- registration, API ---------------------------------------------------------------


def test_public_names_resolve_lazily() -> None:
    assert sw.sources.RedisStream is RedisStreamSource
    assert sw.sinks.RedisStream is RedisStreamSink
    assert RedisStreamSource.resumable is True or RedisStreamSource("redis://x", "s", "g").resumable
    with pytest.raises(ValueError, match="count must be an int >= 1, got 0"):
        RedisStreamSource("redis://x", "s", "g", count=0)
    with pytest.raises(ValueError, match="maxlen must be an int >= 1"):
        RedisStreamSink("redis://x", "s", maxlen=-1)


# -- conformance ---------------------------------------------------------------------


def test_order_roundtrip_and_everything_acked(redis_url: str, redis_prefix: str) -> None:
    inp, out = f"{redis_prefix}:in", f"{redis_prefix}:out"
    preload(redis_url, inp, 3000)
    flow = sw.Flow("rs-order")
    got = sw.sinks.Collect()
    s = flow.source(source(redis_url, inp, count=100)).map(lambda r: {"i": r["i"] * 2})
    s.sink(got)
    s.sink(RedisStreamSink(redis_url, out))
    sw.run(flow, handle_signals=False)
    assert [r["i"] for r in got.items] == [2 * i for i in range(3000)]
    assert [r["i"] for r in read_stream(redis_url, out)] == [2 * i for i in range(3000)]
    assert pending_count(redis_url, inp, "g") == 0  # acked after the sinks wrote


def test_credit_leaves_the_backlog_in_redis(redis_url: str, redis_prefix: str) -> None:
    inp = f"{redis_prefix}:in"
    preload(redis_url, inp, 5000)
    src = source(redis_url, inp, stop_after_idle=None)
    seen: list[Any] = []

    async def slow(record: Any) -> None:
        seen.append(record)
        await asyncio.sleep(0.01)

    async def main() -> tuple[dict[str, Any], int | None]:
        flow = sw.Flow("rs-credit")
        flow.source(src).buffer(capacity=20).sink(sw.sinks.Function(slow))
        handle = sw.start(flow, max_batch_size=10)
        await asyncio.sleep(1.5)
        info = group_info(redis_url, inp, "g")
        backlog = src.backlog()
        handle.force_stop("test over")
        with pytest.raises(sw.FlowCancelledError):
            await handle.wait()
        return info, backlog

    info, backlog = asyncio.run(main())
    delivered = 5000 - int(info["lag"])
    # the sink took ~1 record per 10 ms; the source may be ahead by the channel (20)
    # plus a few batches of 10, never by thousands
    assert len(seen) < 200
    assert delivered <= len(seen) + 20 + 3 * 10 + 1, (delivered, len(seen))
    assert backlog is not None
    assert backlog >= 5000 - delivered - 50


def test_ack_only_after_the_sink_wrote(redis_url: str, redis_prefix: str) -> None:
    inp = f"{redis_prefix}:in"
    preload(redis_url, inp, 50)
    release = asyncio.Event()
    written: list[Any] = []

    async def gated(record: Any) -> None:
        if record["i"] == 25:
            await release.wait()
        written.append(record)

    async def main() -> tuple[int, int]:
        flow = sw.Flow("rs-ack")
        flow.source(source(redis_url, inp)).sink(sw.sinks.Function(gated))
        handle = sw.start(flow)
        await eventually(lambda: len(written) >= 25)
        await asyncio.sleep(0.5)  # several ack barriers
        held = pending_count(redis_url, inp, "g")
        release.set()
        await handle.wait()
        return held, pending_count(redis_url, inp, "g")

    held, after = asyncio.run(main())
    # the batch holding record 25 is not written: none of it (nor later) is acked
    assert held >= 25
    assert after == 0


def test_ack_only_after_a_complete_checkpoint(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    inp = f"{redis_prefix}:in"
    preload(redis_url, inp, 100)
    out = tmp_path / "out.jsonl"

    async def main() -> tuple[int, int]:
        flow = sw.Flow("rs-ckpt-ack")
        flow.source(source(redis_url, inp, stop_after_idle=None)).sink(sw.sinks.JsonLines(out))
        handle = sw.start(flow, checkpoints=sw.Checkpoints(tmp_path / "ck", interval=3600))
        await eventually(lambda: lines(out) >= 100)
        await asyncio.sleep(0.4)
        held = pending_count(redis_url, inp, "g")  # written, but no checkpoint yet
        await handle.stop()  # a final checkpoint, then the commit
        return held, pending_count(redis_url, inp, "g")

    held, after = asyncio.run(main())
    assert held == 100
    assert after == 0


def test_redelivery_after_a_force_stop(redis_url: str, redis_prefix: str) -> None:
    inp = f"{redis_prefix}:in"
    preload(redis_url, inp, 2000)
    first: list[Any] = []

    async def slow(record: Any) -> None:
        first.append(record["i"])
        if len(first) % 100 == 0:
            await asyncio.sleep(0.02)

    async def crash() -> None:
        flow = sw.Flow("rs-redeliver")
        flow.source(source(redis_url, inp, stop_after_idle=None)).sink(sw.sinks.Function(slow))
        handle = sw.start(flow, max_batch_size=50)
        await eventually(lambda: len(first) >= 500 or handle.done())
        assert not handle.done(), await handle.wait()
        handle.force_stop("simulated crash")
        with pytest.raises(sw.FlowCancelledError):
            await handle.wait()

    asyncio.run(crash())
    assert pending_count(redis_url, inp, "g") > 0
    flow = sw.Flow("rs-redeliver")  # same flow and operator names: same consumer
    second = sw.sinks.Collect()
    flow.source(source(redis_url, inp)).sink(second)
    sw.run(flow, handle_signals=False)
    ids = [r["i"] for r in second.items]
    assert set(first) | set(ids) == set(range(2000))
    assert ids == sorted(ids)  # pending first (in order), then new ones
    assert pending_count(redis_url, inp, "g") == 0


CHILD = textwrap.dedent(
    """
    import sys, time
    import sluiceway as sw
    url, stream, work = sys.argv[1:4]

    def pace(r):
        time.sleep(0.0005)
        return r

    flow = sw.Flow("rs-kill")
    src = sw.sources.RedisStream(url, stream, "g", start="0", block_ms=50, stop_after_idle=0.5)
    flow.source(src).map(pace).sink(sw.sinks.JsonLines(work + "/out.jsonl"))
    print("ready", flush=True)
    ck = sw.Checkpoints(work + "/ck", interval=0.05)
    sw.run(flow, checkpoints=ck, handle_signals=False, max_batch_size=50)
    """
)


def test_sigkill_with_checkpoints_is_exactly_once(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    inp = f"{redis_prefix}:in"
    n = 3000
    preload(redis_url, inp, n)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-c", CHILD, redis_url, inp, str(tmp_path)]
    kills = 0
    for delay in (0.4, 0.25, 0.5):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert p.stdout is not None
        assert p.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate()
    p = subprocess.run(cmd, capture_output=True, env=env, timeout=60, check=False)
    assert p.returncode == 0, p.stderr.decode()
    assert kills >= 2
    rows = [json.loads(line)["i"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(rows) == list(range(n))  # nothing lost, nothing twice
    assert pending_count(redis_url, inp, "g") == 0


def test_resume_from_a_checkpoint_position(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    inp = f"{redis_prefix}:in"
    preload(redis_url, inp, 1000)
    out = tmp_path / "out.jsonl"
    ck = sw.Checkpoints(tmp_path / "ck", interval=0.05)

    def build() -> sw.Flow:
        flow = sw.Flow("rs-resume")
        flow.source(source(redis_url, inp)).sink(sw.sinks.JsonLines(out))
        return flow

    async def part() -> None:
        handle = sw.start(build(), checkpoints=ck, max_batch_size=20)
        await eventually(lambda: lines(out) >= 300)
        await handle.stop()

    asyncio.run(part())
    mid = len(out.read_text().splitlines())
    assert 300 <= mid < 1000
    preload(redis_url, inp, 500, start=1000)
    sw.run(build(), checkpoints=ck, handle_signals=False)
    rows = [json.loads(line)["i"] for line in out.read_text().splitlines()]
    assert rows == list(range(1500))


def test_restore_acks_what_the_checkpoint_covers(redis_url: str, redis_prefix: str) -> None:
    """A crash between storing a checkpoint and its XACK: the restart must not deliver
    the covered entries again (they are acknowledged), only the later ones."""
    inp = f"{redis_prefix}:in"
    preload(redis_url, inp, 30)
    client = redis.Redis.from_url(redis_url)
    client.xgroup_create(inp, "g", id="0")
    entries = client.xreadgroup("g", "me", {inp: ">"}, count=30)[0][1]  # all pending
    client.close()
    hw = entries[19][0].decode()
    src = source(redis_url, inp, consumer="me")
    src.restore({"seq": 20, "hw": hw, "claimed": []})
    out = sw.sinks.Collect()
    flow = sw.Flow("rs-restore")
    flow.source(src).sink(out)
    sw.run(flow, handle_signals=False)
    assert [r["i"] for r in out.items] == list(range(20, 30))
    assert pending_count(redis_url, inp, "g") == 0


def test_restore_acks_the_claimed_entries_the_checkpoint_lists(
    redis_url: str, redis_prefix: str
) -> None:
    inp = f"{redis_prefix}:in"
    preload(redis_url, inp, 10)
    client = redis.Redis.from_url(redis_url)
    client.xgroup_create(inp, "g", id="0")
    claimed = client.xreadgroup("g", "me~claims", {inp: ">"}, count=5)[0][1]
    client.close()
    src = source(redis_url, inp, consumer="me")  # claim_idle off in this run
    src.restore({"seq": 3, "hw": None, "claimed": [i.decode() for i, _ in claimed[:3]]})
    out = sw.sinks.Collect()
    flow = sw.Flow("rs-restore-claims")
    flow.source(src).sink(out)
    sw.run(flow, handle_signals=False)
    assert sorted(r["i"] for r in out.items) == list(range(3, 10))
    assert pending_count(redis_url, inp, "g") == 0


def test_a_flow_run_twice_with_one_source_object_starts_afresh(
    redis_url: str, redis_prefix: str
) -> None:
    """The second run of the same flow (and source object) starts from what is pending in
    Redis, not from the first run's state: its commits acknowledge (the first run's
    close used to leave the source "closed", so nothing was acknowledged again), and the
    first run's restored position is not applied again."""
    inp = f"{redis_prefix}:in"
    preload(redis_url, inp, 30)
    client = redis.Redis.from_url(redis_url)
    client.xgroup_create(inp, "g", id="0")
    first = client.xreadgroup("g", "me", {inp: ">"}, count=10)[0][1]  # pending at "me"
    src = source(redis_url, inp, consumer="me")
    src.restore({"seq": 10, "hw": first[-1][0].decode(), "claimed": []})  # covers 0-9
    out = sw.sinks.Collect()
    flow = sw.Flow("rs-twice")
    flow.source(src).sink(out)
    sw.run(flow, handle_signals=False)
    assert [r["i"] for r in out.items] == list(range(10, 30))
    assert pending_count(redis_url, inp, "g") == 0
    # another reader of "me" takes 30-39 and dies: pending, ids above the old hw
    preload(redis_url, inp, 20, start=30)
    client.xreadgroup("g", "me", {inp: ">"}, count=10)
    client.close()
    out.items.clear()
    sw.run(flow, handle_signals=False)  # no restore this time
    assert [r["i"] for r in out.items] == list(range(30, 50))
    assert pending_count(redis_url, inp, "g") == 0  # acknowledged: the run was not "closed"


def test_clean_close(redis_url: str, redis_prefix: str) -> None:
    inp, outs = f"{redis_prefix}:in", f"{redis_prefix}:out"
    preload(redis_url, inp, 10)
    src = source(redis_url, inp)
    sink = RedisStreamSink(redis_url, outs)

    async def main() -> set[asyncio.Task[Any]]:
        before = asyncio.all_tasks()
        flow = sw.Flow("rs-close")
        flow.source(src).sink(sink)
        t0 = time.monotonic()
        await sw.run_async(flow)
        assert time.monotonic() - t0 < 3  # stop_after_idle ended it
        await src.close()  # a second close is a no-op
        await sink.close()
        return asyncio.all_tasks() - before - {asyncio.current_task()}  # type: ignore[operator]

    left = asyncio.run(main())
    assert not left
    for link in (src._link, sink._link):
        assert link is not None
        pool = link.client.connection_pool
        assert all(not c.is_connected for c in pool._available_connections)
        assert not pool._in_use_connections


# -- bad input, metadata, claims, sink ----------------------------------------------


def test_bad_entry_dead_lettered_and_acked(redis_url: str, redis_prefix: str) -> None:
    inp = f"{redis_prefix}:in"
    client = redis.Redis.from_url(redis_url)
    client.xadd(inp, {"data": b'{"i": 0}'})
    bad_id = client.xadd(inp, {"data": b"{not json"}).decode()
    client.xadd(inp, {"other": b"1"})
    client.xadd(inp, {"data": b'{"i": 3}'})
    client.close()
    dead = sw.sinks.Collect()
    out = sw.sinks.Collect()
    flow = sw.Flow("rs-bad")
    flow.source(source(redis_url, inp), on_error=sw.DeadLetter(dead)).sink(out)
    sw.run(flow, handle_signals=False)
    assert out.items == [{"i": 0}, {"i": 3}]
    assert len(dead.items) == 2
    assert f"{inp} {bad_id}" in dead.items[0].error_message
    assert "no field 'data'" in dead.items[1].error_message
    assert pending_count(redis_url, inp, "g") == 0


def test_bad_entry_fails_and_stays_pending(redis_url: str, redis_prefix: str) -> None:
    inp = f"{redis_prefix}:in"
    client = redis.Redis.from_url(redis_url)
    client.xadd(inp, {"data": b'{"i": 0}'})
    bad_id = client.xadd(inp, {"data": b"nope"}).decode()
    client.close()
    out = sw.sinks.Collect()
    flow = sw.Flow("rs-bad-fail")
    flow.source(source(redis_url, inp)).sink(out)
    with pytest.raises(sw.OperatorError, match=bad_id):
        sw.run(flow, handle_signals=False)
    assert out.items == [{"i": 0}]
    client = redis.Redis.from_url(redis_url)
    pend = client.xpending_range(inp, "g", "-", "+", 10)
    client.close()
    # the bad entry stays pending (the good one before it may too: the flow stopped
    # before an ack barrier passed its sink)
    assert bad_id in [p["message_id"].decode() for p in pend]


def test_metadata_and_raw_decode(redis_url: str, redis_prefix: str) -> None:
    inp = f"{redis_prefix}:in"
    client = redis.Redis.from_url(redis_url)
    first = client.xadd(inp, {"data": b"\x00raw"}).decode()
    client.close()
    out = sw.sinks.Collect()
    flow = sw.Flow("rs-meta")
    flow.source(source(redis_url, inp, decode=bytes, include_metadata=True)).sink(out)
    sw.run(flow, handle_signals=False)
    assert out.items == [RedisStreamEntry(b"\x00raw", first, inp, redelivered=False)]


def test_whole_entries_as_dicts(redis_url: str, redis_prefix: str) -> None:
    inp = f"{redis_prefix}:in"
    client = redis.Redis.from_url(redis_url)
    client.xadd(inp, {"user": "ada", "n": 3})
    client.close()
    out = sw.sinks.Collect()
    flow = sw.Flow("rs-fields")
    flow.source(source(redis_url, inp, field=None)).sink(out)
    sw.run(flow, handle_signals=False)
    assert out.items == [{"user": "ada", "n": "3"}]


def test_claims_a_dead_consumers_entries(redis_url: str, redis_prefix: str) -> None:
    inp = f"{redis_prefix}:in"
    preload(redis_url, inp, 40)
    client = redis.Redis.from_url(redis_url)
    client.xgroup_create(inp, "g", id="0")
    client.xreadgroup("g", "dead", {inp: ">"}, count=15)  # read, never acked
    client.close()
    time.sleep(0.3)
    out = sw.sinks.Collect()
    flow = sw.Flow("rs-claim")
    flow.source(source(redis_url, inp, claim_idle=0.2)).sink(out)
    sw.run(flow, handle_signals=False)
    assert sorted(r["i"] for r in out.items) == list(range(40))
    assert pending_count(redis_url, inp, "g") == 0


def test_no_claims_without_claim_idle(redis_url: str, redis_prefix: str) -> None:
    inp = f"{redis_prefix}:in"
    preload(redis_url, inp, 10)
    client = redis.Redis.from_url(redis_url)
    client.xgroup_create(inp, "g", id="0")
    client.xreadgroup("g", "dead", {inp: ">"}, count=4)
    client.close()
    out = sw.sinks.Collect()
    flow = sw.Flow("rs-noclaim")
    flow.source(source(redis_url, inp)).sink(out)
    sw.run(flow, handle_signals=False)
    assert [r["i"] for r in out.items] == list(range(4, 10))
    assert pending_count(redis_url, inp, "g") == 4


def test_sink_maxlen_fields_and_partial_write(redis_url: str, redis_prefix: str) -> None:
    outs, raw = f"{redis_prefix}:out", f"{redis_prefix}:raw"
    flow = sw.Flow("rs-sink")
    flow.source(sw.sources.Iterable(range(5000))).map(lambda i: {"i": i}).sink(
        RedisStreamSink(redis_url, outs, maxlen=1000)
    )
    sw.run(flow, handle_signals=False)
    client = redis.Redis.from_url(redis_url)
    assert 1000 <= client.xlen(outs) < 5000
    last = client.xrevrange(outs, count=1)[0][1]
    assert json.loads(last[b"data"]) == {"i": 4999}

    dead = sw.sinks.Collect()
    flow = sw.Flow("rs-sink-fields")
    flow.source(sw.sources.Iterable([{"a": "x", "n": 1}, "not a mapping", {"b": [1]}])).sink(
        RedisStreamSink(redis_url, raw, field=None), on_error=sw.DeadLetter(dead)
    )
    sw.run(flow, handle_signals=False)
    rows = [f for _, f in client.xrange(raw)]
    client.close()
    assert rows == [{b"a": b"x", b"n": b"1"}, {b"b": b"[1]"}]
    assert len(dead.items) == 1


def test_sink_error_reply_names_the_stream(redis_url: str, redis_prefix: str) -> None:
    key = f"{redis_prefix}:string"
    client = redis.Redis.from_url(redis_url)
    client.set(key, "not a stream")
    client.close()
    flow = sw.Flow("rs-wrongtype")
    flow.source(sw.sources.Iterable([1])).sink(RedisStreamSink(redis_url, key))
    with pytest.raises(sw.FlowFailedError) as info:
        sw.run(flow, handle_signals=False)
    assert isinstance(info.value.__cause__, RedisStreamError) or "WRONGTYPE" in str(info.value)


def test_a_vanished_group_is_created_again(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    inp = f"{redis_prefix}:in"
    preload(redis_url, inp, 10)
    got: list[int] = []

    async def main() -> None:
        flow = sw.Flow("rs-nogroup")
        flow.source(source(redis_url, inp, stop_after_idle=None)).sink(
            sw.sinks.Function(lambda r: got.append(r["i"]))
        )
        handle = sw.start(flow)
        await eventually(lambda: len(got) >= 10)
        client = redis.Redis.from_url(redis_url)
        client.xgroup_destroy(inp, "g")  # as if Redis restarted without its data
        client.close()
        preload(redis_url, inp, 10, start=10)
        await eventually(lambda: set(range(10, 20)) <= set(got))
        await handle.stop()

    with caplog.at_level(logging.WARNING, logger="sluiceway"):
        asyncio.run(main())
    assert any("is gone" in r.getMessage() for r in caplog.records)
    assert set(got) == set(range(20))  # start="0": the new group reads from the start


def test_unreachable_redis_gives_up_naming_the_server() -> None:
    from services import free_port  # noqa: PLC0415

    port = free_port()
    flow = sw.Flow("rs-down")
    src = RedisStreamSource(f"redis://127.0.0.1:{port}/0", "s", "g", reconnect_timeout=0.5)
    flow.source(src).sink(sw.sinks.Collect())
    with pytest.raises(
        sw.ConnectorOpenError, match=f"127.0.0.1:{port}/0 unreachable for 0.5 s"
    ) as info:
        sw.run(flow, handle_signals=False)
    assert isinstance(info.value.__cause__, RedisStreamError)


# -- outage ---------------------------------------------------------------------------


def test_outage_reconnects_and_loses_nothing_acknowledged(
    durable_redis: DurableRedisServer,  # noqa: F811 - the fixture imported above
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = durable_redis.url
    n = 4000
    preload(url, "in", n)
    got: list[int] = []

    def note(r: Any) -> Any:
        got.append(r["i"])
        return r

    async def main() -> None:
        flow = sw.Flow("rs-outage")
        src = RedisStreamSource(url, "in", "g", start="0", block_ms=50, stop_after_idle=1.0)
        flow.source(src).map(note).sink(RedisStreamSink(url, "out"))
        handle = sw.start(flow, max_batch_size=20)
        await eventually(lambda: len(got) >= n // 3)
        durable_redis.kill()  # mid-stream, no shutdown
        await asyncio.sleep(0.8)
        durable_redis.start()  # same port, same data dir: the AOF is replayed
        await handle.wait()

    with caplog.at_level(logging.INFO, logger="sluiceway"):
        asyncio.run(main())
    out = [r["i"] for r in read_stream(url, "out")]
    assert set(out) == set(range(n))  # every input entry reached the output (>= once)
    assert pending_count(url, "in", "g") == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if "is back after" in r.getMessage()]
    # one per connector that saw the outage (the sink may have been idle through it)
    assert 1 <= len(warnings) <= 2
    assert len({w.getMessage().split(":")[0] for w in warnings}) == len(warnings)
    assert all("lost Redis at" in w.getMessage() for w in warnings)
    assert len(infos) == len(warnings)


# -- the example ------------------------------------------------------------------------


def test_example_flow_builds_and_runs(redis_url: str, redis_prefix: str) -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import redis_streams_flow  # noqa: PLC0415
    finally:
        sys.path.remove(str(EXAMPLES))
    inp, outs = f"{redis_prefix}:orders", f"{redis_prefix}:big-orders"
    client = redis.Redis.from_url(redis_url)
    for amount in (5, 50, 500):
        client.xadd(inp, {"data": json.dumps({"user": "u", "amount": amount})})
    client.close()
    flow = redis_streams_flow.build(redis_url, inp, outs, stop_after_idle=0.3)
    sw.run(flow, handle_signals=False)
    assert [r["amount"] for r in read_stream(redis_url, outs)] == [50, 500]
    assert isinstance(redis_streams_flow.flow, sw.Flow)


def test_credentials_in_the_url_are_never_shown(
    redis_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    from services import assert_secret_hidden, free_port  # noqa: PLC0415

    caplog.set_level(logging.DEBUG, logger="sluiceway")
    secret = "s3cret-pw"
    nobody = f"redis://ann:{secret}@127.0.0.1:{free_port()}/0"
    # the shared Redis has no such user: the login is refused
    refused = redis_url.replace("redis://", f"redis://ann:{secret}@")
    stream = f"{redis_prefix}:s"
    failing: list[tuple[str, Any]] = [
        ("unreachable for", RedisStreamSource(nobody, stream, "g", reconnect_timeout=0.3)),
        ("unreachable for", RedisStreamSink(nobody, stream, reconnect_timeout=0.3)),
        ("refused access", RedisStreamSource(refused, stream, "g", reconnect_timeout=0.3)),
        ("refused access", RedisStreamSink(refused, stream, reconnect_timeout=0.3)),
    ]
    for expected, connector in failing:
        flow = sw.Flow("rs-secret")
        if isinstance(connector, RedisStreamSource):
            flow.source(connector).sink(sw.sinks.Collect())
        else:
            flow.source(sw.sources.Iterable([1])).sink(connector)
        with pytest.raises(sw.SluicewayError, match=expected) as info:
            sw.run(flow, handle_signals=False)
        assert_secret_hidden(secret, info.value, caplog.text)


def test_a_bad_pending_entry_then_deleted_neither_blocks_nor_doubles_output(
    redis_url: str, redis_prefix: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The docs say: fix or delete a bad pending entry.  Restarts that fail on it must not
    write the good records before it again; once it is deleted (XDEL), a restart
    acknowledges and skips it, with one WARNING, and reads on."""
    stream = f"{redis_prefix}:in"
    client = redis.Redis.from_url(redis_url)
    try:
        for i in range(5):
            client.xadd(stream, {"data": json.dumps({"i": i})})
        bad_id = client.xadd(stream, {"other": "no data field"})
        for i in range(6, 10):
            client.xadd(stream, {"data": json.dumps({"i": i})})
    finally:
        client.close()
    out = tmp_path / "out.jsonl"

    def run_once() -> None:
        flow = sw.Flow("rs-bad-pending")
        flow.source(source(redis_url, stream), name="in").sink(sw.sinks.JsonLines(out))
        sw.run(flow, handle_signals=False)

    for _ in range(3):  # every restart fails on the bad entry, naming it
        with pytest.raises(sw.OperatorError, match="no field 'data'"):
            run_once()
    written = [json.loads(line)["i"] for line in out.read_text().splitlines()]
    assert written == [0, 1, 2, 3, 4]  # once, however often the flow was restarted

    client = redis.Redis.from_url(redis_url)
    try:
        assert client.xdel(stream, bad_id) == 1
    finally:
        client.close()
    caplog.set_level(logging.WARNING, logger="sluiceway")
    run_once()
    written = [json.loads(line)["i"] for line in out.read_text().splitlines()]
    assert written == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    warnings = [r.getMessage() for r in caplog.records if "deleted from" in r.getMessage()]
    assert len(warnings) == 1
    assert bad_id.decode() in warnings[0]
    assert "acknowledged and skipped" in warnings[0]
    assert pending_count(redis_url, stream, "g") == 0
