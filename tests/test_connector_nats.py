"""NATS JetStream source and sink against a real server (see services_nats.py).

The conformance checks of issue 6 (order, credit, ack only after durable handling,
redelivery after a crash, clean close, resume from a checkpoint), bad input, the sink's
PubAcks and de-duplication, and an outage: a private nats-server killed and restarted
mid-stream.  Each test uses its own stream (a uuid) and deletes it.

Run as a script (``python test_connector_nats.py child ...``), this module is the flow
that the crash tests SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import services_nats
from services import import_or_missing
from services_nats import NatsNames, NatsServer

nats_url = services_nats.nats_url
nats_names = services_nats.nats_names
own_nats = services_nats.own_nats

import_or_missing("nats")

import nats  # noqa: E402 - after the skip-or-fail check above
import nats.errors  # noqa: E402
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig  # noqa: E402

import sluiceway as sw  # noqa: E402
from sluiceway.connectors.nats import (  # noqa: E402
    NatsMessage,
    NatsSink,
    NatsSource,
    NatsUnavailableError,
)
from sluiceway.testing import run_watched  # noqa: E402

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


# -- helpers ---------------------------------------------------------------------------


async def _connect(url: str) -> Any:
    return await nats.connect(url, allow_reconnect=False, connect_timeout=2)


async def make_stream(names: NatsNames, *extra: str) -> None:
    nc = await _connect(names.url)
    try:
        await nc.jetstream().add_stream(
            StreamConfig(name=names.stream, subjects=[names.wildcard, *extra])
        )
    finally:
        await nc.close()


async def publish(url: str, subject: str, values: list[Any], *, raw: bool = False) -> None:
    nc = await _connect(url)
    try:
        js = nc.jetstream()
        for start in range(0, len(values), 500):
            part = values[start : start + 500]
            await asyncio.gather(
                *(js.publish(subject, v if raw else json.dumps(v).encode()) for v in part)
            )
    finally:
        await nc.close()


async def consumer(url: str, stream: str, durable: str) -> Any:
    nc = await _connect(url)
    try:
        return await nc.jetstream().consumer_info(stream, durable)
    finally:
        await nc.close()


async def read_stream(url: str, stream: str, subject: str) -> list[Any]:
    """Every message of ``stream`` on ``subject``, decoded, in stream order."""
    nc = await _connect(url)
    out: list[Any] = []
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            if msg.subject == subject and msg.data is not None:
                out.append(json.loads(msg.data))
    finally:
        await nc.close()
    return out


def source(names: NatsNames, **kw: Any) -> NatsSource:
    kw.setdefault("stop_after_idle", 0.6)
    kw.setdefault("fetch_timeout", 0.2)
    return NatsSource(names.url, names.stream, names.subject, durable=names.durable, **kw)


def ids(records: list[Any]) -> list[int]:
    return [r["id"] for r in records]


async def eventually(check: Callable[[], Any], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(0.02)


class Gate(sw.sinks.Sink):
    """A sink that writes a batch only when allowed to (``allow(n)`` batches)."""

    def __init__(self) -> None:
        self.written: list[Any] = []
        self.allowed = 0
        self.event = asyncio.Event()

    def allow(self, batches: int) -> None:
        self.allowed += batches
        self.event.set()

    async def write(self, batch: sw.Batch) -> None:
        while self.allowed <= 0:
            self.event.clear()
            await self.event.wait()
        self.allowed -= 1
        self.written.extend(batch.values)


# -- registration and arguments ---------------------------------------------------------


def test_registered_lazily_under_one_name() -> None:
    assert sw.sources.NatsJetStream is NatsSource
    assert sw.sinks.NatsJetStream is NatsSink
    assert "NatsJetStream" in dir(sw.sources)
    assert "NatsJetStream" in dir(sw.sinks)


def test_import_sluiceway_does_not_import_nats() -> None:
    code = "import sys, sluiceway; sys.exit('nats' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="batch must be an int >= 1, got 0"):
        NatsSource("nats://x", "s", durable="d", batch=0)
    with pytest.raises(ValueError, match="ack_wait must be a finite number > 0 seconds, got -1"):
        NatsSource("nats://x", "s", durable="d", ack_wait=-1)
    with pytest.raises(ValueError, match="durable must be a name"):
        NatsSource("nats://x", "s", durable="")
    with pytest.raises(ValueError, match="servers must name at least one URL"):
        NatsSink("", "subj")
    with pytest.raises(TypeError, match="msg_id must be callable"):
        NatsSink("nats://x", "subj", msg_id="id")  # type: ignore[arg-type]


# -- conformance -----------------------------------------------------------------------


def test_order_within_a_subject_and_everything_acked(nats_names: NatsNames) -> None:
    asyncio.run(make_stream(nats_names))
    records = [{"id": i} for i in range(2000)]
    asyncio.run(publish(nats_names.url, nats_names.subject, records))
    src = source(nats_names)
    out = sw.sinks.Collect()
    flow = sw.Flow("nats-order")
    flow.source(src).buffer(32).sink(out)
    sw.run(flow, max_batch_size=50, handle_signals=False)
    assert out.items == records
    info = asyncio.run(consumer(nats_names.url, nats_names.stream, nats_names.durable))
    assert info.num_pending == 0
    assert info.num_ack_pending == 0
    assert info.ack_floor.stream_seq == 2000
    assert src.acked == 2000


def test_credit_a_saturated_flow_stops_fetching(nats_names: NatsNames) -> None:
    n, capacity, batch = 3000, 8, 16

    async def main() -> None:
        await make_stream(nats_names)
        await publish(nats_names.url, nats_names.subject, [{"id": i} for i in range(n)])
        gate = Gate()
        flow = sw.Flow("nats-credit")
        flow.source(source(nats_names, stop_after_idle=1.0)).buffer(capacity).sink(gate)
        handle = sw.start(flow, max_batch_size=batch)
        gate.allow(2)
        await eventually(lambda: len(gate.written) > 0)
        await asyncio.sleep(0.5)  # room for a source that ignored credit to run ahead
        info = await consumer(nats_names.url, nats_names.stream, nats_names.durable)
        fetched = info.delivered.consumer_seq
        # channel + one batch in the sink + one pushed + one buffered by the source
        assert fetched <= len(gate.written) + capacity + 3 * batch, fetched
        assert info.num_pending >= n - fetched
        assert info.num_pending > n - 200  # the broker still holds nearly everything
        gate.allow(10**6)
        await handle.wait()
        assert ids(gate.written) == list(range(n))

    asyncio.run(main())


def test_ack_only_after_the_sink_wrote(nats_names: NatsNames) -> None:
    """Without checkpoints: acks follow the sink (ack barriers), never run ahead of it."""
    n, batch = 400, 20

    async def main() -> None:
        await make_stream(nats_names)
        await publish(nats_names.url, nats_names.subject, [{"id": i} for i in range(n)])
        gate = Gate()
        flow = sw.Flow("nats-ack-after-sink")
        flow.source(source(nats_names, stop_after_idle=1.0)).buffer(40).sink(gate)
        handle = sw.start(flow, max_batch_size=batch)
        await asyncio.sleep(0.4)
        info = await consumer(nats_names.url, nats_names.stream, nats_names.durable)
        assert gate.written == []
        assert info.delivered.consumer_seq > 0
        assert info.ack_floor.stream_seq == 0  # fetched, not written: not acked
        assert info.num_ack_pending == info.delivered.consumer_seq
        seen_acks = 0
        for _ in range(6):
            gate.allow(2)
            await eventually(lambda: len(gate.written) % (2 * batch) == 0)
            await asyncio.sleep(0.25)  # a few ack barriers
            info = await consumer(nats_names.url, nats_names.stream, nats_names.durable)
            acked = info.ack_floor.stream_seq
            assert acked <= len(gate.written)  # never ahead of the sink
            seen_acks = max(seen_acks, acked)
        assert seen_acks > 0  # and it does follow the sink
        gate.allow(10**6)
        await handle.wait()
        info = await consumer(nats_names.url, nats_names.stream, nats_names.durable)
        assert info.ack_floor.stream_seq == n
        assert info.num_ack_pending == 0

    asyncio.run(main())


def test_ack_only_after_the_checkpoint(nats_names: NatsNames, tmp_path: Path) -> None:
    """With checkpoints: written but not yet checkpointed records stay unacknowledged."""
    n = 300
    out_path = tmp_path / "out.jsonl"

    async def main() -> None:
        await make_stream(nats_names)
        await publish(nats_names.url, nats_names.subject, [{"id": i} for i in range(n)])
        flow = sw.Flow("nats-ack-after-checkpoint")
        flow.source(source(nats_names, stop_after_idle=None)).sink(sw.sinks.JsonLines(out_path))
        handle = sw.start(flow, checkpoints=sw.Checkpoints(tmp_path / "ckpt", interval=3600))
        await eventually(lambda: out_path.exists() and len(out_path.read_text().splitlines()) == n)
        await asyncio.sleep(0.3)
        info = await consumer(nats_names.url, nats_names.stream, nats_names.durable)
        assert info.num_ack_pending == n  # written, but no checkpoint holds them yet
        assert info.ack_floor.stream_seq == 0
        await handle.stop()  # stops at a final checkpoint, which commits
        info = await consumer(nats_names.url, nats_names.stream, nats_names.durable)
        assert info.num_ack_pending == 0
        assert info.ack_floor.stream_seq == n

    asyncio.run(main())
    assert ids([json.loads(x) for x in out_path.read_text().splitlines()]) == list(range(n))


# -- crashes: a child process running a flow, killed with SIGKILL ----------------------


def child(url: str, stream: str, durable: str, out: str, mode: str, idle: str) -> None:
    """The flow the crash tests kill: ``mode`` "ckpt" (checkpoints + JsonLines sink,
    exactly once) or "plain" (no checkpoints, a file appended per batch)."""
    stop_after_idle = float(idle) if float(idle) > 0 else None
    src = NatsSource(
        url,
        stream,
        f"{stream}.in",
        durable=durable,
        ack_wait=1.0,
        fetch_timeout=0.2,
        stop_after_idle=stop_after_idle,
    )

    def slow(r: Any) -> Any:
        time.sleep(0.0004)
        return r

    flow = sw.Flow("nats-crash")
    stream_ = flow.source(src).map(slow)
    checkpoints = None
    if mode == "ckpt":
        stream_.sink(sw.sinks.JsonLines(out))
        checkpoints = sw.Checkpoints(out + ".ckpt", interval=0.1)
    else:

        def append(batch: list[Any]) -> None:
            with open(out, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in batch))

        stream_.sink(sw.sinks.Function(append, batched=True))
    print("ready", flush=True)
    sw.run(flow, checkpoints=checkpoints, max_batch_size=50, handle_signals=False)


def start_child(names: NatsNames, out: Path, mode: str, idle: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{HERE}"}
    args = [names.url, names.stream, names.durable, str(out), mode, str(idle)]
    return subprocess.Popen(
        [sys.executable, str(Path(__file__)), "child", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def lines(path: Path) -> list[Any]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]


def kill_after(p: subprocess.Popen[bytes], out: Path, at_least: int) -> None:
    deadline = time.monotonic() + 20
    while len(lines(out)) < at_least:
        if p.poll() is not None:
            raise AssertionError(f"child ended early: {p.communicate()[1].decode()}")
        if time.monotonic() > deadline:
            p.kill()
            raise AssertionError(f"child wrote too little: {p.communicate()[1].decode()}")
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.communicate()


def finish(names: NatsNames, out: Path, mode: str) -> None:
    p = start_child(names, out, mode, idle=2.0)  # > ack_wait: redeliveries come first
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err.decode()


def test_redelivery_after_a_crash_at_least_once(nats_names: NatsNames, tmp_path: Path) -> None:
    n = 2000
    asyncio.run(make_stream(nats_names))
    asyncio.run(publish(nats_names.url, nats_names.subject, [{"id": i} for i in range(n)]))
    out = tmp_path / "out.jsonl"
    kill_after(start_child(nats_names, out, "plain", idle=0), out, at_least=300)
    before = Counter(ids(lines(out)))
    assert 0 < len(before) < n
    finish(nats_names, out, "plain")
    got = Counter(ids(lines(out)))
    assert set(got) == set(range(n))  # nothing lost: unacked messages came back
    info = asyncio.run(consumer(nats_names.url, nats_names.stream, nats_names.durable))
    assert info.num_ack_pending == 0
    assert info.ack_floor.stream_seq == n


def _crash_twice_then_finish(names: NatsNames, out: Path, n: int) -> None:
    asyncio.run(make_stream(names))
    asyncio.run(publish(names.url, names.subject, [{"id": i} for i in range(n)]))
    for at_least in (200, 900):
        kill_after(start_child(names, out, "ckpt", idle=0), out, at_least=at_least)
    finish(names, out, "ckpt")
    got = ids(lines(out))
    dups = [i for i, c in Counter(got).items() if c > 1]
    assert dups == []
    assert got == list(range(n))
    info = asyncio.run(consumer(names.url, names.stream, names.durable))
    assert info.ack_floor.stream_seq == n


def test_crashes_with_checkpoints_are_exactly_once(nats_names: NatsNames, tmp_path: Path) -> None:
    """Two SIGKILLs and a finish: every id once, in order, all acknowledged.  (It used to
    hand out a block of 50 ids twice now and then: see
    test_a_copy_sent_before_the_ack_landed_is_not_handed_out_again.)"""
    _crash_twice_then_finish(nats_names, tmp_path / "out.jsonl", 3000)


def test_a_copy_sent_before_the_ack_landed_is_not_handed_out_again(
    nats_names: NatsNames,
) -> None:
    """The server redelivers a message whose ack_wait ran out while the flow still held
    it; a fetch can receive the copies just before the commit acknowledges the original,
    and -- on a busy event loop -- resume only after the commit.  The copies must not go
    out a second time (the two-crash test wrote ids 950-999 twice that way: messages
    held back by ordered_restart for longer than ack_wait).  The fetch's late return is
    forced here by holding it until the commit is done."""
    asyncio.run(make_stream(nats_names))
    asyncio.run(publish(nats_names.url, nats_names.subject, [{"id": i} for i in range(10)]))
    src = source(nats_names, ack_wait=0.5, fetch_timeout=2.0, stop_after_idle=None)

    async def main() -> list[list[int]]:
        async def bad(exc: sw.BadInputError) -> None:
            raise AssertionError(exc)

        ctx = sw.sources.SourceContext(
            flow="f", name="in", clock=sw.SystemClock(), bad_input=bad, fails_on_bad_input=True
        )
        await src.open(ctx)
        try:
            first = await src.next_batch(10)
            assert first is not None
            position = src.position()
            sub = await src._subscription()
            fetch, received, resume = sub.fetch, asyncio.Event(), asyncio.Event()

            async def late_fetch(n: int, timeout: float) -> list[Any]:  # noqa: ASYNC109 - fetch()'s signature
                msgs = await fetch(n, timeout=timeout)
                received.set()
                await resume.wait()  # the fetch task gets the loop back late
                return msgs

            sub.fetch = late_fetch  # type: ignore[method-assign]
            pull = asyncio.ensure_future(src.next_batch(50))
            await received.wait()  # after ack_wait: the server sent the 10 copies
            await src.commit(position)  # the originals are acknowledged meanwhile
            resume.set()
            waited = await pull
            sub.fetch = fetch  # type: ignore[method-assign]
            after = await src.next_batch(50)
            assert waited is not None
            assert after is not None
            return [ids(first.values), ids(waited.values), ids(after.values)]
        finally:
            await src.close()

    first, waited, after = asyncio.run(main())
    assert first == list(range(10))
    assert waited == []  # the copies are not handed out a second time
    assert after == []
    assert src.redelivered_in_flight == 10  # every copy came, and was recognised
    info = asyncio.run(consumer(nats_names.url, nats_names.stream, nats_names.durable))
    assert info.num_ack_pending == 0


async def crashed_run(names: NatsNames, groups: int, group: int, ack_wait: float) -> None:
    """A run that was delivered ``groups`` fetches of ``group`` messages, ``0.6 *
    ack_wait`` apart, and died without acknowledging any; returns once the first group
    is due again (and the others are not)."""
    nc = await _connect(names.url)
    js = nc.jetstream()
    await js.add_consumer(
        names.stream,
        ConsumerConfig(
            durable_name=names.durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            filter_subject=names.subject,
        ),
    )
    sub = await js.pull_subscribe_bind(durable=names.durable, stream=names.stream)
    for i in range(groups):
        if i:
            await asyncio.sleep(0.6 * ack_wait)
        assert len(await sub.fetch(group, timeout=2)) == group
    await nc.close()  # no acks: what a crash leaves
    await asyncio.sleep(0.6 * ack_wait)


@pytest.mark.slow
def test_a_restart_between_two_redeliveries_keeps_the_order(nats_names: NatsNames) -> None:
    """A crashed run was delivered two groups a while apart: the server redelivers the
    first before the second.  A restart in between must not hand out newer messages
    before the second group is back (the source took one redelivery for all of them, and
    the crash test saw ``[.., 149, 250, 150, ..]`` about one run in three).  Run under the
    watchdog: the source waits for the second group on the real clock."""
    n, ack_wait = 60, 2.0
    asyncio.run(make_stream(nats_names))
    asyncio.run(publish(nats_names.url, nats_names.subject, [{"id": i} for i in range(n)]))
    asyncio.run(crashed_run(nats_names, 2, 10, ack_wait))
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("nats-restart-order")
    flow.source(source(nats_names, ack_wait=ack_wait)).sink(out)
    result = run_watched(flow, run_for=15.0)
    assert not result.stopped  # ended by itself, when idle
    assert ids(out.items) == list(range(n))
    info = asyncio.run(consumer(nats_names.url, nats_names.stream, nats_names.durable))
    assert info.num_ack_pending == 0


@pytest.mark.slow
def test_a_restart_hands_out_redeliveries_in_stream_order(nats_names: NatsNames) -> None:
    """The crashed run got messages 1-10, and 1-5 again once they were due (as a run
    under load does when fetch-to-commit exceeds ack_wait): 6-10 are due before 1-5 and
    come back first.  The restart still hands out 1-10 in stream order (the crash test
    saw ``[.., 850, 852, ..]`` with 851 later, in the full suite)."""
    n, ack_wait = 30, 1.5

    async def crashed() -> None:
        nc = await _connect(nats_names.url)
        js = nc.jetstream()
        await js.add_consumer(
            nats_names.stream,
            ConsumerConfig(
                durable_name=nats_names.durable,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ack_wait,
                filter_subject=nats_names.subject,
            ),
        )
        sub = await js.pull_subscribe_bind(durable=nats_names.durable, stream=nats_names.stream)
        assert len(await sub.fetch(10, timeout=2)) == 10
        await asyncio.sleep(ack_wait + 0.5)
        again = await sub.fetch(5, timeout=2)
        assert [m.metadata.sequence.stream for m in again] == [1, 2, 3, 4, 5]
        await nc.close()  # no acks: what a crash leaves

    asyncio.run(make_stream(nats_names))
    asyncio.run(publish(nats_names.url, nats_names.subject, [{"id": i} for i in range(n)]))
    asyncio.run(crashed())
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("nats-restart-redelivery-order")
    flow.source(source(nats_names, ack_wait=ack_wait)).sink(out)
    result = run_watched(flow, run_for=15.0)
    assert not result.stopped
    assert ids(out.items) == list(range(n))


@pytest.mark.slow
def test_a_restart_whose_redeliveries_never_come_stops_holding(
    nats_names: NatsNames, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages a crashed run left are deleted from the stream after the restart read
    the consumer, before they come back: newer messages are held one extra ack_wait at
    most, then handed out, with a WARNING."""
    n, ack_wait = 30, 2.0
    asyncio.run(make_stream(nats_names))
    asyncio.run(publish(nats_names.url, nats_names.subject, [{"id": i} for i in range(n)]))
    asyncio.run(crashed_run(nats_names, 1, 10, ack_wait))
    src = source(nats_names, ack_wait=ack_wait)

    async def delete_five(handle: sw.FlowHandle) -> None:
        await eventually(lambda: src._owed == 10)  # opened: it expects ten back
        nc = await _connect(nats_names.url)
        try:
            for seq in range(6, 11):
                await nc.jetstream().delete_msg(nats_names.stream, seq)
        finally:
            await nc.close()
        await handle.wait()

    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("nats-restart-gone")
    flow.source(src).sink(out)
    with caplog.at_level(logging.WARNING, logger="sluiceway"):
        result = run_watched(flow, during=delete_five)
    assert not result.stopped
    assert ids(out.items) == [*range(5), *range(10, n)]
    assert "5 of the 10 messages an earlier run left unacknowledged did not come back" in (
        caplog.text
    )


# -- close and resume -----------------------------------------------------------------


def test_clean_close_when_idle_ends_the_run(nats_names: NatsNames) -> None:
    async def main() -> None:
        await make_stream(nats_names)
        await publish(nats_names.url, nats_names.subject, [{"id": i} for i in range(50)])
        src = source(nats_names, stop_after_idle=0.3)
        sink = NatsSink(nats_names.url, f"{nats_names.stream}.out")
        out = sw.sinks.Collect()
        flow = sw.Flow("nats-close")
        s = flow.source(src)
        s.sink(out)
        s.sink(sink)
        before = asyncio.all_tasks()
        t0 = time.monotonic()
        await sw.start(flow).wait()
        assert time.monotonic() - t0 < 3
        assert len(out.items) == 50
        await asyncio.sleep(0)
        assert asyncio.all_tasks() == before  # no fetch task, no client task left
        for link in (src._link, sink._link):
            assert link.nc is None
        await src.close()  # a second close is a no-op
        await sink.close()

    asyncio.run(main())


def test_a_stopped_flow_gives_back_what_it_did_not_commit(nats_names: NatsNames) -> None:
    """A clean close NAKs fetched-but-uncommitted messages: the next run gets them at
    once, not after ack_wait."""
    n = 500

    async def main() -> None:
        await make_stream(nats_names)
        await publish(nats_names.url, nats_names.subject, [{"id": i} for i in range(n)])
        gate = Gate()
        flow = sw.Flow("nats-nak")
        flow.source(source(nats_names, ack_wait=60)).buffer(50).sink(gate)
        handle = sw.start(flow, max_batch_size=25)
        gate.allow(3)
        await eventually(lambda: len(gate.written) == 75)
        await asyncio.sleep(0.3)
        handle.force_stop()
        with contextlib.suppress(sw.FlowCancelledError):
            await handle.wait()
        out = sw.sinks.Collect()
        flow2 = sw.Flow("nats-nak-2")
        flow2.source(source(nats_names, ack_wait=60, stop_after_idle=0.5)).sink(out)
        t0 = time.monotonic()
        await sw.start(flow2).wait()
        assert time.monotonic() - t0 < 5  # far less than ack_wait=60
        assert set(ids(gate.written)) | set(ids(out.items)) == set(range(n))

    asyncio.run(main())


def test_resume_from_a_checkpoint_position(nats_names: NatsNames, tmp_path: Path) -> None:
    n = 2000
    out = tmp_path / "out.jsonl"
    ckpt = sw.Checkpoints(tmp_path / "ckpt", interval=0.05)

    def slow(r: Any) -> Any:
        time.sleep(0.0002)
        return r

    def build(idle: float | None) -> sw.Flow:
        flow = sw.Flow("nats-resume")
        flow.source(source(nats_names, stop_after_idle=idle)).map(slow).sink(
            sw.sinks.JsonLines(out)
        )
        return flow

    async def first() -> None:
        handle = sw.start(build(None), checkpoints=ckpt, max_batch_size=50)
        await eventually(lambda: len(lines(out)) >= 500)
        await handle.stop()  # at a final checkpoint

    asyncio.run(make_stream(nats_names))
    asyncio.run(publish(nats_names.url, nats_names.subject, [{"id": i} for i in range(n)]))
    asyncio.run(first())
    assert 500 <= len(lines(out)) < n
    sw.run(build(0.6), checkpoints=ckpt, handle_signals=False, max_batch_size=50)
    assert ids(lines(out)) == list(range(n))


class LostAcks(NatsSource):
    """A crash between storing a checkpoint and acknowledging it: commits never ack."""

    async def commit(self, position: Any) -> None:
        pass


def test_a_checkpoint_whose_acks_were_lost_is_not_replayed(
    nats_names: NatsNames, tmp_path: Path
) -> None:
    n = 300
    out = tmp_path / "out.jsonl"
    ckpt = sw.Checkpoints(tmp_path / "ckpt", interval=3600)

    def build(src: NatsSource) -> sw.Flow:
        flow = sw.Flow("nats-lost-acks")
        flow.source(src, name="in").sink(sw.sinks.JsonLines(out))
        return flow

    async def first() -> None:
        src = LostAcks(nats_names.url, nats_names.stream, nats_names.subject, durable="d")
        handle = sw.start(build(src), checkpoints=ckpt)
        await eventually(lambda: len(lines(out)) == n)
        await handle.stop()  # the final checkpoint holds all n; none is acknowledged

    asyncio.run(make_stream(nats_names))
    asyncio.run(publish(nats_names.url, nats_names.subject, [{"id": i} for i in range(n)]))
    asyncio.run(first())
    info = asyncio.run(consumer(nats_names.url, nats_names.stream, "d"))
    assert info.ack_floor.stream_seq == 0  # all n come back
    src = NatsSource(
        nats_names.url, nats_names.stream, nats_names.subject, durable="d", stop_after_idle=0.5
    )
    sw.run(build(src), checkpoints=ckpt, handle_signals=False)
    assert ids(lines(out)) == list(range(n))  # recognised as covered: not written again
    info = asyncio.run(consumer(nats_names.url, nats_names.stream, "d"))
    assert info.ack_floor.stream_seq == n  # and acknowledged this time
    assert info.num_ack_pending == 0


# -- values, metadata, bad input -------------------------------------------------------


def test_raw_payloads_and_metadata(nats_names: NatsNames) -> None:
    asyncio.run(make_stream(nats_names))
    asyncio.run(publish(nats_names.url, nats_names.subject, [b"a", b"\xff"], raw=True))
    out = sw.sinks.Collect()
    flow = sw.Flow("nats-raw")
    flow.source(source(nats_names, decode=bytes, include_metadata=True)).sink(out)
    sw.run(flow, handle_signals=False)
    assert [m.payload for m in out.items] == [b"a", b"\xff"]
    first = out.items[0]
    assert isinstance(first, NatsMessage)
    assert (first.subject, first.stream_seq, first.delivered) == (nats_names.subject, 1, 1)


def test_bad_input_dead_lettered_then_acked(nats_names: NatsNames) -> None:
    asyncio.run(make_stream(nats_names))
    asyncio.run(
        publish(
            nats_names.url, nats_names.subject, [b'{"id": 0}', b"{nope", b'{"id": 2}'], raw=True
        )
    )
    out, dlq = sw.sinks.Collect(), sw.sinks.Collect()
    flow = sw.Flow("nats-bad-dlq")
    flow.source(source(nats_names), on_error=sw.DeadLetter(dlq)).sink(out)
    sw.run(flow, handle_signals=False)
    assert out.items == [{"id": 0}, {"id": 2}]
    (letter,) = dlq.items
    assert f"NATS stream {nats_names.stream} seq 2" in letter.error_message
    assert letter.record == b"{nope"
    info = asyncio.run(consumer(nats_names.url, nats_names.stream, nats_names.durable))
    assert info.num_ack_pending == 0
    assert info.ack_floor.stream_seq == 3


def test_bad_input_that_stops_the_flow_is_not_acked(nats_names: NatsNames) -> None:
    asyncio.run(make_stream(nats_names))
    asyncio.run(
        publish(
            nats_names.url, nats_names.subject, [b'{"id": 0}', b"{nope", b'{"id": 2}'], raw=True
        )
    )
    out = sw.sinks.Collect()
    flow = sw.Flow("nats-bad-fail")
    flow.source(source(nats_names)).sink(out)
    with pytest.raises(sw.OperatorError, match="seq 2"):
        sw.run(flow, handle_signals=False)
    assert out.items == [{"id": 0}]
    info = asyncio.run(consumer(nats_names.url, nats_names.stream, nats_names.durable))
    assert info.ack_floor.stream_seq <= 1  # the bad message (seq 2) is not acknowledged
    assert info.num_pending + info.num_ack_pending >= 2  # it and the one after it remain


# -- the sink --------------------------------------------------------------------------


def test_sink_publishes_in_order_with_pubacks(nats_names: NatsNames) -> None:
    asyncio.run(make_stream(nats_names))
    subject = f"{nats_names.stream}.out"
    sink = NatsSink(nats_names.url, subject, max_inflight=64)
    records = [{"id": i} for i in range(1500)]
    flow = sw.Flow("nats-sink")
    flow.source(sw.sources.Iterable(records)).sink(sink)
    sw.run(flow, handle_signals=False, max_batch_size=500)
    assert sink.published == 1500
    assert asyncio.run(read_stream(nats_names.url, nats_names.stream, subject)) == records


def test_sink_msg_id_makes_writes_idempotent(nats_names: NatsNames) -> None:
    asyncio.run(make_stream(nats_names))
    subject = f"{nats_names.stream}.out"
    records = [{"id": i} for i in range(100)]
    sinks = []
    for _ in range(2):  # the same records twice, as a replay would
        sink = NatsSink(nats_names.url, subject, msg_id=lambda r: f"rec-{r['id']}")
        flow = sw.Flow("nats-dedupe")
        flow.source(sw.sources.Iterable(records)).sink(sink)
        sw.run(flow, handle_signals=False)
        sinks.append(sink)
    assert sinks[1].duplicates == 100
    assert asyncio.run(read_stream(nats_names.url, nats_names.stream, subject)) == records


def test_sink_routes_by_subject_function_with_headers(nats_names: NatsNames) -> None:
    asyncio.run(make_stream(nats_names))
    records = [{"id": i, "kind": "a" if i % 2 else "b"} for i in range(10)]

    def route(r: dict[str, Any]) -> str:
        return f"{nats_names.stream}.{r['kind']}"

    flow = sw.Flow("nats-route")
    flow.source(sw.sources.Iterable(records)).sink(
        NatsSink(nats_names.url, route, headers=lambda r: {"kind": r["kind"]})
    )
    sw.run(flow, handle_signals=False)
    for kind in ("a", "b"):
        got = asyncio.run(read_stream(nats_names.url, nats_names.stream, route({"kind": kind})))
        assert got == [r for r in records if r["kind"] == kind]

    async def headers_of_first() -> Any:
        nc = await _connect(nats_names.url)
        try:
            return (await nc.jetstream().get_msg(nats_names.stream, 1)).headers
        finally:
            await nc.close()

    assert asyncio.run(headers_of_first()) == {"kind": "b"}


def test_sink_pins_a_record_it_cannot_encode(nats_names: NatsNames) -> None:
    asyncio.run(make_stream(nats_names))
    subject = f"{nats_names.stream}.out"
    records: list[Any] = [{"id": 0}, {"id": 1}, {"bad": {1, 2}}, {"id": 3}]
    dlq = sw.sinks.Collect()
    flow = sw.Flow("nats-sink-bad")
    flow.source(sw.sources.Iterable(records)).sink(
        NatsSink(nats_names.url, subject), on_error=sw.DeadLetter(dlq)
    )
    sw.run(flow, handle_signals=False)
    assert [d.record for d in dlq.items] == [{"bad": {1, 2}}]
    stored = asyncio.run(read_stream(nats_names.url, nats_names.stream, subject))
    assert stored == [{"id": 0}, {"id": 1}, {"id": 3}]  # each once


def test_sink_without_a_stream_fails_at_open(nats_url: str) -> None:
    flow = sw.Flow("nats-sink-nostream")
    flow.source(sw.sources.Iterable([1])).sink(NatsSink(nats_url, "no.stream.here.at.all"))
    with pytest.raises(Exception, match="no JetStream stream captures subject"):
        sw.run(flow, handle_signals=False)


def test_source_without_a_stream_fails_at_open(nats_url: str) -> None:
    flow = sw.Flow("nats-source-nostream")
    flow.source(NatsSource(nats_url, "SWTEST_MISSING_STREAM", durable="d")).sink(sw.sinks.Collect())
    with pytest.raises(Exception, match="no JetStream stream 'SWTEST_MISSING_STREAM'"):
        sw.run(flow, handle_signals=False)


def test_gives_up_after_reconnect_timeout_naming_the_server() -> None:
    from services import free_port  # noqa: PLC0415

    url = f"nats://127.0.0.1:{free_port()}"
    flow = sw.Flow("nats-nobody")
    flow.source(NatsSource(url, "S", durable="d", reconnect_timeout=0.3)).sink(sw.sinks.Collect())
    t0 = time.monotonic()
    with pytest.raises(sw.ConnectorOpenError, match=f"NATS at {url} unavailable for") as info:
        sw.run(flow, handle_signals=False)
    assert isinstance(info.value.__cause__, NatsUnavailableError)
    assert time.monotonic() - t0 < 3


# -- outage: a private server killed and restarted mid-stream --------------------------


def test_outage_reconnects_and_loses_nothing_acknowledged(
    own_nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sluiceway")
    names = NatsNames(own_nats.url, "OUTAGE", "OUTAGE.in", "worker")
    out_subject = "OUTAGE.out"
    n_pre, n_live = 1500, 1500
    acked_in: set[int] = set()

    async def producer() -> None:
        """Publishes n_live more while the server goes down; counts PubAcks."""
        i = n_pre
        nc = None
        while i < n_pre + n_live:
            try:
                if nc is None or not nc.is_connected:
                    nc = await _connect(names.url)
                js = nc.jetstream(timeout=1)
                ack = await js.publish(
                    names.subject,
                    json.dumps({"id": i}).encode(),
                    headers={"Nats-Msg-Id": f"in-{i}"},
                )
                assert ack.seq > 0
                acked_in.add(i)
                i += 1
                if i % 50 == 0:
                    await asyncio.sleep(0.01)
            except (TimeoutError, OSError, nats.errors.Error):
                nc = None
                await asyncio.sleep(0.05)
        if nc is not None:
            await nc.close()

    async def main() -> list[Any]:
        await make_stream(names)
        await publish(names.url, names.subject, [{"id": i} for i in range(n_pre)])
        acked_in.update(range(n_pre))
        out = sw.sinks.Collect()
        src = source(names, ack_wait=2.0, stop_after_idle=3.0, reconnect_timeout=30)
        sink = NatsSink(names.url, out_subject, msg_id=lambda r: f"out-{r['id']}", ack_timeout=1)

        def slow(r: Any) -> Any:
            time.sleep(0.0003)
            return r

        flow = sw.Flow("nats-outage")
        s = flow.source(src).map(slow)
        s.sink(out)
        s.sink(sink)
        handle = sw.start(flow, max_batch_size=50)
        prod = asyncio.get_running_loop().create_task(producer())
        await eventually(lambda: len(out.items) >= 600)
        own_nats.stop(signal.SIGKILL)  # a crash: no clean shutdown of the store
        await asyncio.sleep(1.5)
        own_nats.start()
        await prod
        await handle.wait()
        return out.items

    got = asyncio.run(main())
    assert set(ids(got)) >= acked_in  # nothing the broker acknowledged is lost
    info = asyncio.run(consumer(names.url, names.stream, names.durable))
    assert info.num_ack_pending == 0  # the acks owed across the outage were sent
    assert info.num_pending == 0
    stored = asyncio.run(read_stream(names.url, "OUTAGE", out_subject))
    assert set(ids(stored)) >= acked_in
    messages = [r.getMessage() for r in caplog.records if r.name == "sluiceway"]
    warnings = [m for m in messages if "unavailable" in m]
    recoveries = [m for m in messages if "available again" in m]
    # one WARNING and one INFO per connection (source, sink), not one per retry
    for who in ("NatsJetStream(OUTAGE/worker)", "NatsJetStream(OUTAGE.out)"):
        assert sum(m.startswith(who) for m in warnings) == 1, warnings
        assert sum(m.startswith(who) for m in recoveries) == 1, recoveries
    dups = len(got) - len(set(ids(got)))
    print(
        f"outage: {len(acked_in)} acknowledged in, {len(set(ids(got)))} handed out "
        f"({dups} twice), {len(stored)} stored out ({len(stored) - len(set(ids(stored)))} twice)"
    )


# -- the example -----------------------------------------------------------------------


def test_example_flow_runs(nats_names: NatsNames, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEWAY_NATS_URL", nats_names.url)
    monkeypatch.setenv("SLUICEWAY_NATS_STREAM", nats_names.stream)
    path = HERE.parent / "examples" / "nats_flow.py"
    spec = importlib.util.spec_from_file_location("nats_flow_example", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = sw.sinks.Collect()
    module.flow.nodes  # noqa: B018 - it builds
    clicks = [{"user": "ann", "amount": 3.0}, {"user": "bob", "amount": 12.5}]

    async def main() -> None:
        handle = sw.start(module.build(out))

        async def created() -> bool:  # the source creates the stream at open
            nc = await _connect(nats_names.url)
            try:
                await nc.jetstream().stream_info(nats_names.stream)
            except nats.errors.Error:
                return False
            finally:
                await nc.close()
            return True

        await eventually(created)
        await publish(nats_names.url, f"{nats_names.stream}.clicks", clicks)
        await eventually(lambda: len(out.items) == 1)
        await handle.stop()

    asyncio.run(main())
    assert out.items[0]["user"] == "bob"


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "child":
        child(*sys.argv[2:])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} child URL STREAM DURABLE OUT MODE IDLE")


def test_credentials_in_the_url_are_never_shown(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from services import assert_secret_hidden, free_port  # noqa: PLC0415

    caplog.set_level(logging.DEBUG, logger="sluiceway")
    secret = "s3cret-pw"
    nobody = f"127.0.0.1:{free_port()}"
    failing: list[tuple[str, Any]] = [
        # unreachable: the outage WARNING, then NatsUnavailableError
        (
            "unavailable for",
            NatsSource(f"nats://ann:{secret}@{nobody}", "S", durable="d", reconnect_timeout=0.3),
        ),
        (
            "unavailable for",
            NatsSource(f"nats://{secret}@{nobody}", "S", durable="d", reconnect_timeout=0.3),
        ),  # a token
        (
            "unavailable for",
            NatsSink(f"nats://ann:{secret}@{nobody}", "s.x", reconnect_timeout=0.3),
        ),
        # reachable with credentials, but no such stream: a ValueError naming the server
        (
            "no JetStream stream",
            NatsSource(
                nats_url.replace("nats://", f"nats://ann:{secret}@"),
                "SWTEST_NO_STREAM",
                durable="d",
            ),
        ),
    ]
    for expected, connector in failing:
        flow = sw.Flow("nats-secret")
        if isinstance(connector, NatsSource):
            flow.source(connector).sink(sw.sinks.Collect())
        else:
            flow.source(sw.sources.Iterable([1])).sink(connector)
        with pytest.raises(Exception, match=expected) as info:
            sw.run(flow, handle_signals=False)
        assert "***@" in str(info.value)
        assert_secret_hidden(secret, info.value, caplog.text)
    assert "***@" in caplog.text
