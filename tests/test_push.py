"""Push ingestion with admission: ``sources.Push`` (offer/put) and ``sources.HttpIngest``
(``POST /api/ingest/<source>`` on the web view)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sluiceway as sw
from sluiceway.metrics.web import WebView
from sluiceway.testing import run_watched

# -- admission, pure ------------------------------------------------------------------------


def test_offer_answers_at_once_and_never_holds_more_than_capacity() -> None:
    inbox: sw.sources.Push[int] = sw.sources.Push(capacity=3)
    assert [inbox.offer(i) for i in range(5)] == [True, True, True, False, False]
    assert inbox.waiting == 3
    assert (inbox.accepted, inbox.rejected) == (3, 2)
    assert inbox.refusal == "full: 3 of 3 records waiting to be pulled"
    assert not inbox.offer_all([7, 8])  # all or nothing: none of them is taken
    assert inbox.refusal == "full: 3 of 3 records waiting to be pulled"
    assert inbox.waiting == 3
    inbox.shed("cpu 93% > 80%")
    assert inbox.admission() == "shedding load: cpu 93% > 80%"
    inbox.shed(None)
    inbox.end()
    assert not inbox.offer(9)
    assert inbox.refusal is not None
    assert inbox.refusal.startswith("closed")


Op = tuple[str, int]  # ("offer", n records) | ("pull", max records)


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 8),
    ops=st.lists(st.tuples(st.sampled_from(["offer", "pull"]), st.integers(1, 10)), max_size=60),
)
def test_admission_never_accepts_past_the_bound_and_delivers_each_once_in_order(
    capacity: int, ops: list[Op]
) -> None:
    inbox: sw.sources.Push[int] = sw.sources.Push(capacity=capacity)
    accepted: list[int] = []
    pulled: list[int] = []
    seq = 0

    async def drive() -> None:
        nonlocal seq
        for op, n in ops:
            if op == "offer":
                records = list(range(seq, seq + n))
                seq += n
                fits = inbox.waiting + n <= capacity
                assert inbox.offer_all(records) is fits
                if fits:
                    accepted.extend(records)
            elif inbox.waiting:
                batch = await inbox.next_batch(n)
                assert batch is not None
                pulled.extend(batch.values)
            assert inbox.waiting <= capacity  # the documented bound
            assert inbox.waiting == len(accepted) - len(pulled)
        inbox.end()
        while (batch := await inbox.next_batch(capacity)) is not None:
            pulled.extend(batch.values)

    asyncio.run(drive())
    assert pulled == accepted


def test_bad_arguments_are_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match="capacity must be a whole number >= 1, got 0"):
        sw.sources.Push(capacity=0)
    with pytest.raises(ValueError, match="retry_after must be > 0 seconds, got -1"):
        sw.sources.Push(retry_after=-1)
    with pytest.raises(ValueError, match="max_body must be >= 1 byte, got 0"):
        sw.sources.HttpIngest(max_body=0)


# -- in a flow, virtual clock ---------------------------------------------------------------


def test_put_waits_on_the_clock_for_room_up_to_its_timeout() -> None:
    async def main() -> None:
        clock = sw.VirtualClock()
        gate = asyncio.Event()
        out: list[int] = []

        async def held(x: int) -> None:
            await gate.wait()
            out.append(x)

        inbox: sw.sources.Push[int] = sw.sources.Push(capacity=2)
        flow = sw.Flow("put")
        flow.source(inbox, name="inbox").sink(sw.sinks.Function(held), name="out")
        handle = sw.start(flow, clock=clock)
        assert await inbox.put(0)  # pulled, and held in the sink
        await asyncio.sleep(0)
        for _ in range(50):
            await asyncio.sleep(0)
        assert inbox.offer(1)
        assert inbox.offer(2)
        t0 = clock.monotonic()
        assert not await inbox.put(3, timeout=0.5)  # full: waited 0.5 s, refused
        assert clock.monotonic() == pytest.approx(t0 + 0.5)
        waiter = asyncio.ensure_future(inbox.put(3, timeout=10.0))
        await asyncio.sleep(0)
        gate.set()  # the sink goes on, the flow pulls, room appears before the timeout
        assert await waiter
        assert clock.monotonic() < t0 + 10.0
        result = await handle.stop()
        assert out == [0, 1, 2, 3]
        assert result.stopped

    asyncio.run(main())


def test_a_graceful_stop_closes_intake_then_drains_every_accepted_record() -> None:
    async def main() -> None:
        clock = sw.VirtualClock()
        slow: list[int] = []

        async def sink(x: int) -> None:
            await clock.sleep(0.1)
            slow.append(x)

        inbox: sw.sources.Push[int] = sw.sources.Push(capacity=50)
        flow = sw.Flow("drain")
        flow.source(inbox, name="inbox").buffer(4).sink(sw.sinks.Function(sink), name="out")
        handle = sw.start(flow, clock=clock, grace_period=60.0)
        assert inbox.offer_all(range(40))
        await clock.sleep(0.55)  # a few are through, most are still accepted and waiting
        assert inbox.waiting > 0
        handle.request_stop()
        assert not inbox.offer(99)  # intake closed at once
        result = await handle.wait()
        assert result.stopped
        assert slow == list(range(40))  # every accepted record, once, in order
        assert inbox.accepted == 40

    asyncio.run(main())


def test_a_forced_stop_reports_the_accepted_records_it_could_not_drain() -> None:
    async def main() -> None:
        clock = sw.VirtualClock()

        async def sink(x: int) -> None:
            await clock.sleep(1.0)

        inbox: sw.sources.Push[int] = sw.sources.Push(capacity=50)
        flow = sw.Flow("forced")
        flow.source(inbox, name="inbox").buffer(4).sink(sw.sinks.Function(sink), name="out")
        handle = sw.start(flow, clock=clock, grace_period=2.5)
        assert inbox.offer_all(range(20))
        await clock.sleep(0.5)
        handle.request_stop()
        with pytest.raises(sw.FlowCancelledError) as info:
            await handle.wait()
        held = info.value.unflushed
        assert held.get("accepted in source inbox", 0) > 0

    asyncio.run(main())


# -- over HTTP ------------------------------------------------------------------------------


async def _until(ready: Any) -> None:
    for _ in range(2000):
        if ready():
            return
        await asyncio.sleep(0)
    raise AssertionError("never got there")


async def _post(
    port: int, path: str, body: bytes, *, content_length: bool = True
) -> tuple[int, dict[str, str], Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        if content_length:
            head += f"Content-Length: {len(body)}\r\n"
        writer.write(head.encode() + b"\r\n" + body)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    top, _, payload = raw.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    try:
        doc = json.loads(payload)
    except json.JSONDecodeError:
        doc = payload.decode()
    return status, headers, doc


def test_http_ingest_accepts_refuses_with_retry_after_and_names_bad_json() -> None:
    async def main() -> None:
        clock = sw.VirtualClock()
        gate = asyncio.Event()
        out: list[Any] = []

        async def held(x: Any) -> None:
            await gate.wait()
            out.append(x)

        ingest = sw.sources.HttpIngest(capacity=3, retry_after=2.5, max_body=200)
        flow = sw.Flow("ingest")
        flow.source(ingest, name="orders").sink(sw.sinks.Function(held), name="out")
        view = WebView(0)

        async def monitor(handle: sw.FlowHandle) -> None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(view(handle))
                port = await view.wait_serving()
                status, _, doc = await _post(port, "/api/ingest/orders", b'{"id": 1}')
                assert (status, doc) == (202, {"accepted": 1})
                status, _, doc = await _post(port, "/api/ingest/orders", b'[{"id": 2}, {"id": 3}]')
                assert (status, doc) == (202, {"accepted": 2})
                # one record is held in the sink, two wait: room for one, not two
                for _ in range(50):
                    await asyncio.sleep(0)
                status, headers, doc = await _post(port, "/api/ingest/orders", b"[4, 5]")
                assert status == 429
                assert headers["retry-after"] == "3"
                assert doc["accepted"] == 0
                assert doc["error"].startswith("full: 2 of 3")
                status, _, doc = await _post(port, "/api/ingest/orders", b'{"id": 4,}')
                assert status == 400
                assert "not valid JSON" in doc["error"]
                assert "line 1 column 10" in doc["error"]
                status, _, doc = await _post(port, "/api/ingest/orders", b'"just text"')
                assert status == 400
                assert "a JSON str" in doc["error"]
                status, _, doc = await _post(port, "/api/ingest/nope", b"[1]")
                assert status == 404
                assert "'orders'" in doc["error"]
                status, _, doc = await _post(port, "/api/ingest/orders", b"[" + b"1," * 200 + b"1]")
                assert status == 413
                status, _, doc = await _post(port, "/api/ingest/orders", b"[1,2,3,4]")
                assert status == 413
                assert "at most 3 at once" in doc["error"]
                status, _, doc = await _post(
                    port, "/api/ingest/orders", b"[1]", content_length=False
                )
                assert status == 411
                gate.set()
                status, _, doc = await _post(port, "/api/ingest/orders", b"[4]")
                assert status == 202
                await _until(lambda: len(out) == 4)
                gate.clear()  # the next record is held: the flow cannot end yet
                status, _, doc = await _post(port, "/api/ingest/orders", b"[5]")
                assert status == 202
                handle.request_stop()
                status, _, doc = await _post(port, "/api/ingest/orders", b"[6]")
                assert status == 503
                assert doc["accepted"] == 0
                assert doc["error"].startswith("closed")
                checked.append(True)
                gate.set()

        checked: list[bool] = []
        result = await sw.run_async(flow, clock=clock, monitor=monitor)
        assert checked == [True]  # the monitor got through every request
        assert out == [{"id": 1}, {"id": 2}, {"id": 3}, 4, 5]
        assert result.metrics.operator("out").records_in == 5

    asyncio.run(main())


def test_a_post_body_is_read_within_the_request_timeout_and_bare_lf_heads_work() -> None:
    """POST bodies go through the server's bounded connections: a bare-LF head is read,
    and a body that never completes gets 408 at ``request_timeout`` on the flow's clock."""

    async def main() -> None:
        clock = sw.VirtualClock()
        ingest = sw.sources.HttpIngest(capacity=10)
        out: sw.sinks.Collect[Any] = sw.sinks.Collect()
        flow = sw.Flow("ingest-timeout")
        flow.source(ingest, name="orders").sink(out)
        view = WebView(0)
        view.request_timeout = 20.0
        seen: list[tuple[bytes, bytes, float]] = []

        async def monitor(handle: sw.FlowHandle) -> None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(view(handle))
                port = await view.wait_serving()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /api/ingest/orders HTTP/1.1\nContent-Length: 3\n\n[7]")
                lf = await reader.read()
                writer.close()
                t0 = clock.monotonic()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"POST /api/ingest/orders HTTP/1.1\r\nContent-Length: 20\r\n\r\n[1,")
                slow = await reader.read()  # the rest of the body never comes
                seen.append((lf, slow, clock.monotonic() - t0))
                writer.close()
                handle.request_stop()

        await sw.run_async(flow, clock=clock, monitor=monitor)
        ((lf, slow, waited),) = seen
        assert lf.startswith(b"HTTP/1.1 202 Accepted\r\n")
        assert slow.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert 20.0 <= waited < 21.0  # on the flow's clock
        assert out.items == [7]

    asyncio.run(main())


# -- the real clock -------------------------------------------------------------------------


@pytest.mark.slow
def test_put_with_a_timeout_on_the_real_clock() -> None:
    inbox: sw.sources.Push[int] = sw.sources.Push(capacity=4)
    out: sw.sinks.Collect[int] = sw.sinks.Collect()
    answers: list[bool] = []
    flow = sw.Flow("rt_push")
    (
        flow.source(inbox, name="inbox")
        .rate_limit(sw.flowcontrol.TokenBucket(rate=20, burst=1))
        .sink(out)
    )

    async def produce(handle: sw.FlowHandle) -> None:
        for i in range(40):
            answers.append(await inbox.put(i, timeout=0.02))

    result = run_watched(flow, during=produce, grace_period=3.0)
    assert result.stopped
    assert True in answers
    assert False in answers
    accepted = [i for i, ok in enumerate(answers) if ok]
    assert out.items == accepted  # every accepted record, drained at the stop
