"""Queryable state: ``handle.query(operator, key)`` and ``GET /api/state/<operator>``."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Callable
from typing import Any

import pytest

import sluiceway as sw
from sluiceway.metrics.web import WebView
from sluiceway.runtime.query import OpenWindow, worker_id


async def settle(ready: Callable[[], bool]) -> None:
    for _ in range(2000):
        if ready():
            return
        await asyncio.sleep(0)
    raise AssertionError("the flow never got there")


def spend_flow(
    inbox: sw.sources.Push[dict[str, Any]], out: sw.sinks.Collect[Any], lateness: float = 0.0
) -> sw.Flow:
    flow = sw.Flow("spend")
    (
        flow.source(inbox, name="events")
        .with_timestamps(lambda e: e["ts"])
        .key_by(lambda e: e["user"])
        .window(sw.windows.Tumbling(10.0), allowed_lateness=lateness)
        .aggregate(n=sw.agg.count(), total=sw.agg.sum(lambda e: e["amount"]), name="totals")
        .sink(out, name="out")
    )
    return flow


def test_open_windows_of_a_key_are_read_while_the_flow_runs() -> None:
    async def main() -> None:
        inbox: sw.sources.Push[dict[str, Any]] = sw.sources.Push()
        out: sw.sinks.Collect[Any] = sw.sinks.Collect()
        handle = sw.start(spend_flow(inbox, out, lateness=5.0), clock=sw.VirtualClock())
        inbox.offer_all(
            [
                {"user": "ann", "ts": 1.0, "amount": 2.5},
                {"user": "bob", "ts": 3.0, "amount": 1.0},
                {"user": "ann", "ts": 4.0, "amount": 6.0},
                {"user": "ann", "ts": 12.0, "amount": 4.0},  # watermark 12: [0, 10) fired
            ]
        )
        await settle(lambda: len(out.items) == 2)
        answer = handle.query("totals", "ann")
        assert answer.found
        assert answer.kind == "window"
        assert answer.worker == worker_id()
        assert answer.watermark == 12.0
        assert answer.windows == (
            OpenWindow(0.0, 10.0, {"n": 2, "total": 8.5}, fired=True),  # open for late ones
            OpenWindow(10.0, 20.0, {"n": 1, "total": 4.0}, fired=False),
        )
        # GetWindow(key, timestamp): only the window holding that instant
        assert handle.query("totals", "ann", at=15.0).windows == (
            OpenWindow(10.0, 20.0, {"n": 1, "total": 4.0}, fired=False),
        )
        assert handle.query("totals", "ann", at=25.0).windows == ()
        assert not handle.query("totals", "carol").found
        # the current window moves on while the flow runs
        inbox.offer({"user": "ann", "ts": 13.0, "amount": 1.0})
        await settle(lambda: handle.query("totals", "ann", at=13.0).windows[0].value["n"] == 2)
        answer = handle.query("totals", "ann", at=13.0)
        answer.windows[0].value["n"] = 99  # a copy: the flow is not changed
        assert handle.query("totals", "ann", at=13.0).windows[0].value["n"] == 2
        await handle.stop()
        assert [(r.key, r.start, r.value["n"]) for r in out.items][-1] == ("ann", 10.0, 2)

    asyncio.run(main())


def test_stateful_map_and_process_state_per_key() -> None:
    class Tally:
        def process(self, ctx: sw.state.ProcessContext[Any], word: str) -> None:
            ctx.value("last").set(word)
            counts = ctx.map("counts")
            counts.put(word, counts.get(word, 0) + 1)

    async def main() -> None:
        inbox: sw.sources.Push[str] = sw.sources.Push()
        flow = sw.Flow("words")
        keyed = flow.source(inbox, name="words").key_by(lambda w: w[0])
        keyed.stateful_map(lambda s, w: ((s or 0) + 1, w), name="count").sink(
            sw.sinks.Collect(), name="a"
        )
        keyed.process(Tally, name="tally").sink(sw.sinks.Collect(), name="b")
        handle = sw.start(flow, clock=sw.VirtualClock())
        inbox.offer_all(["apple", "avocado", "banana", "apple"])
        await settle(lambda: handle.metrics().operator("tally").records_in == 4)
        a = handle.query("count", "a")
        assert (a.kind, a.found, a.state, a.windows) == ("stateful_map", True, 3, ())
        assert handle.query("count", "b").state == 1
        assert not handle.query("count", "z").found
        tally = handle.query("tally", "a")
        assert tally.kind == "process"
        assert tally.state == {"last": "apple", "counts": {"apple": 2, "avocado": 1}}
        with pytest.raises(ValueError, match=r"has no operator 'nope'.*'count', 'tally'"):
            handle.query("nope", "a")
        with pytest.raises(ValueError, match="operator 'a' holds no per-key state"):
            handle.query("a", "a")
        await handle.stop()

    asyncio.run(main())


def test_session_windows_are_queryable() -> None:
    async def main() -> None:
        inbox: sw.sources.Push[dict[str, Any]] = sw.sources.Push()
        out: sw.sinks.Collect[Any] = sw.sinks.Collect()
        flow = sw.Flow("sessions")
        (
            flow.source(inbox)
            .with_timestamps(lambda e: e["ts"])
            .key_by(lambda e: e["user"])
            .window(sw.windows.Session(gap=5.0))
            .aggregate(sw.agg.count(), name="visits")
            .sink(out)
        )
        handle = sw.start(flow, clock=sw.VirtualClock())
        inbox.offer_all([{"user": "ann", "ts": t} for t in (1.0, 3.0, 20.0)])
        await settle(lambda: len(out.items) == 1)  # [1, 8) closed at watermark 20
        answer = handle.query("visits", "ann")
        assert answer.windows == (OpenWindow(20.0, 25.0, 1, fired=False),)
        await handle.stop()

    asyncio.run(main())


async def _get(port: int, target: str) -> tuple[int, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    top, _, body = raw.partition(b"\r\n\r\n")
    status = int(top.split(b" ")[1])
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body.decode()


def test_state_over_http_on_the_web_view_port() -> None:
    async def main() -> None:
        inbox: sw.sources.Push[dict[str, Any]] = sw.sources.Push()
        out: sw.sinks.Collect[Any] = sw.sinks.Collect()
        flow = spend_flow(inbox, out)
        (
            flow.source(sw.sources.Iterable([7, 7, 8]), name="nums")
            .key_by(lambda x: x)
            .stateful_map(lambda s, x: ((s or 0) + 1, x), name="seen")
            .sink(sw.sinks.Collect())
        )
        view = WebView(0)
        checked: list[bool] = []

        async def monitor(handle: sw.FlowHandle) -> None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(view(handle))
                port = await view.wait_serving()
                inbox.offer({"user": "ann lee", "ts": 1.0, "amount": 2.0})
                await settle(lambda: handle.query("totals", "ann lee").found)
                key = urllib.parse.quote("ann lee")
                status, doc = await _get(port, f"/api/state/totals?key={key}&at=5")
                assert status == 200
                assert doc["found"]
                assert doc["worker"] == worker_id()
                assert doc["windows"] == [
                    {"start": 0.0, "end": 10.0, "value": {"n": 1, "total": 2.0}, "fired": False}
                ]
                await settle(lambda: handle.query("seen", 7).found)
                status, doc = await _get(port, "/api/state/seen?key=7")  # the int key 7
                assert (status, doc["found"], doc["state"]) == (200, True, 2)
                status, doc = await _get(port, "/api/state/seen?key=9")
                assert (status, doc["found"]) == (200, False)
                status, text = await _get(port, "/api/state/totals")
                assert status == 400
                assert "key=" in text
                status, text = await _get(port, "/api/state/totals?key=a&at=soon")
                assert status == 400
                assert "'soon'" in text
                status, text = await _get(port, "/api/state/out?key=a")
                assert status == 404
                assert "holds no per-key state" in text
                checked.append(True)
                handle.request_stop()

        await sw.run_async(flow, clock=sw.VirtualClock(), monitor=monitor)
        assert checked == [True]

    asyncio.run(main())
