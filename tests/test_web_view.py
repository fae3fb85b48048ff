"""The web view: its layout, ``/api/flow`` over HTTP, the page in headless Chromium, ``--ui-port``.

The flow under test is held still by backpressure on a virtual clock that moves only when
told (``autojump=False``): its sink never returns, so the channel in front of it fills and
the source blocks.  Every number the view shows is then exact, and stays put while a
browser loads the page.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

import sluiceway as sw
from services import service_missing
from sluiceway import cli
from sluiceway.demo import build_demo_flow
from sluiceway.metrics import FlowSnapshot, OperatorSnapshot, Rates
from sluiceway.metrics.web import WebView, flow_graph, flow_state, page
from sluiceway.runtime.channel import ChannelStatistics

EPOCH = 1_700_000_000.0

# -- helpers ----------------------------------------------------------------------------


class GatedSource(sw.sources.Source):
    """Waits for ``go``, hands out the given batches, then holds until ``release``."""

    def __init__(self, batches: list[list[Any]], go: asyncio.Event, release: asyncio.Event):
        self._batches = list(batches)
        self._go = go
        self._release = release

    async def next_batch(self, max_records: int) -> sw.Batch | None:
        await self._go.wait()
        if self._batches:
            return sw.Batch(self._batches.pop(0))
        await self._release.wait()
        return None


class HeldSink(sw.sinks.Sink):
    """Takes a batch and does not return until ``gate`` is set: backpressure upstream."""

    def __init__(self, gate: asyncio.Event) -> None:
        self.items: list[Any] = []
        self.gate = gate

    async def write(self, batch: sw.Batch) -> None:
        await self.gate.wait()
        self.items.extend(batch.values)


def _get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def _fetch(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(_get, url, method)


async def _settle(ready: Callable[[], bool], what: str) -> None:
    """Let the loop run (no clock moves) until ``ready()``."""
    for _ in range(2000):
        if ready():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"the flow never got to: {what}")


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def _stalled(check: Callable[[WebView, sw.FlowHandle], Awaitable[None]]) -> int:
    """Run the held flow with a :class:`WebView`; call ``check`` at t=1; return the port.

    ``orders``: src -> stamp (event time) => buf.in (capacity 4) => buf -> double -> out.
    At t=0 the source hands out 10 records in two batches (4, then 6); ``out`` takes 4
    and holds them, the channel fills with 4 more, and the source blocks with the last 2.
    At t=1 the view has sampled twice (t=0, t=1): every rate is over exactly one second.
    """

    async def main() -> int:
        go, release, gate = asyncio.Event(), asyncio.Event(), asyncio.Event()
        flow = sw.Flow("orders")
        (
            flow.source(GatedSource([[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]], go, release), name="src")
            .with_timestamps(lambda x: EPOCH - 10.0 + x, name="stamp")
            .buffer(4, name="buf")
            .map(lambda x: 2 * x, name="double")
            .sink(HeldSink(gate), name="out")
        )
        clock = sw.VirtualClock(epoch=EPOCH, autojump=False)
        view = WebView(0)
        ports: list[int] = []

        async def monitor(handle: sw.FlowHandle) -> None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(view(handle))
                ports.append(await view.wait_serving())
                go.set()

                def stalled() -> bool:
                    m = handle.metrics()
                    return m.channel("buf.in").fill == 4 and m.operator("out").records_in == 4

                await _settle(stalled, "a full channel and a held sink")
                clock.advance(1.0)  # the view samples at t=1
                await _settle(lambda: view._latest is not None and view._latest.time == 1.0, "t=1")
                await check(view, handle)
                gate.set()
                release.set()

        result = await sw.run_async(flow, clock=clock, monitor=monitor)
        assert result.metrics.operator("out").records_in == 10  # nothing was lost
        assert not view.serving
        return ports[0]

    port = asyncio.run(main())
    assert _refused(port)  # the port is free again once the flow has ended
    return port


# -- the layout (pure) ---------------------------------------------------------------------


def test_the_demo_graph_wraps_at_the_merge_and_keeps_stages_apart() -> None:
    graph = flow_graph(build_demo_flow(rate=10))
    place = {n.name: (n.stage, n.column, n.row) for n in graph.nodes}
    assert place == {
        "clicks": (0, 0, 0),
        "enrich": (0, 1, 0),
        "event_time": (0, 2, 0),
        "drop_bots": (0, 3, 0),
        "is_purchase": (0, 4, 0),
        "is_purchase_true": (0, 5, 0),
        "is_purchase_false": (0, 5, 1),
        "price": (0, 6, 0),
        # stage 1 would reach column 10: it wraps to a band of its own, from column 0
        "merge": (1, 0, 2),
        "window_1s": (1, 1, 2),
        "summarize": (1, 2, 2),
        "window_1s_late": (1, 2, 3),
        "summaries": (1, 3, 2),
        "late_clicks": (1, 3, 3),
    }
    assert (graph.columns, graph.rows) == (7, 4)
    into_merge = {(e.source, e.channel) for e in graph.edges if e.target == "merge"}
    assert into_merge == {("price", "merge.in"), ("is_purchase_false", "merge.in")}
    ports = {e.target: e.port for e in graph.edges if e.port}
    assert ports == {"is_purchase_true": "true", "is_purchase_false": "false",
                     "window_1s_late": "late"}  # fmt: skip
    assert [(s.index, s.channel, s.writers) for s in graph.stages] == [
        (0, None, (("merge.in", 2),)),
        (1, "merge.in", ()),
    ]


def test_stages_side_by_side_get_rows_of_their_own() -> None:
    flow = sw.Flow("two")
    a = flow.source(sw.sources.Iterable([1]), name="a")
    a1, a2 = a.branch(lambda x: x > 0, name="split")
    b = flow.source(sw.sources.Iterable([2]), name="b").map(lambda x: x, name="b_map")
    a1.merge(a2, b, name="join").sink(sw.sinks.Collect(), name="out")
    graph = flow_graph(flow)

    boxes: dict[int, tuple[int, int, int, int]] = {}
    for n in graph.nodes:
        c0, r0, c1, r1 = boxes.get(n.stage, (n.column, n.row, n.column, n.row))
        boxes[n.stage] = (min(c0, n.column), min(r0, n.row), max(c1, n.column), max(r1, n.row))
    cells = [
        {(c, r) for c in range(c0, c1 + 1) for r in range(r0, r1 + 1)}
        for c0, r0, c1, r1 in boxes.values()
    ]
    for i, one in enumerate(cells):
        for other in cells[i + 1 :]:
            assert not one & other, boxes  # no two stage boxes overlap
    assert len({(n.column, n.row) for n in graph.nodes}) == len(graph.nodes)


def test_flow_state_without_rates_and_with_stage_backpressure_shares() -> None:
    flow = sw.Flow("fan_in")
    x = flow.source(sw.sources.Iterable([1]), name="x")
    y = flow.source(sw.sources.Iterable([1]), name="y")
    x.merge(y, name="m").sink(sw.sinks.Collect(), name="out")
    graph = flow_graph(flow)
    ops = tuple(
        OperatorSnapshot(name, kind, stage, 5, 5, 0, 0, 0, 0, watermark=EPOCH - 3.0)
        for name, kind, stage in [("x", "source", 0), ("y", "source", 1), ("m", "merge", 2)]
    )  # "out" not registered yet: shown with zeros
    channel = ChannelStatistics("m.in", 8, sw.Overflow.BLOCK, 3, 8, 5, 2, 0, 1.2, 2)
    snapshot = FlowSnapshot("fan_in", 10.0, ops, (channel,), wall_time=EPOCH)

    cold = flow_state(graph, snapshot)
    assert cold["rates_over"] is None
    assert cold["elapsed"] is None
    assert {n["name"]: (n["rate_in"], n["backpressure"]) for n in cold["nodes"]} == {
        "x": (None, None), "y": (None, None), "m": (None, None), "out": (None, None),
    }  # fmt: skip
    assert [n["records_in"] for n in cold["nodes"]] == [5, 5, 5, 0]
    assert cold["nodes"][2]["watermark_lag"] == 3.0

    rates = Rates({"m": 4.0}, {"m": 4.0}, {"m.in": 1.2})
    warm = flow_state(graph, snapshot, rates, rates_over=1.0, started=7.5, stopping=True)
    assert warm["elapsed"] == 2.5
    assert warm["stopping"] is True
    # two writers share the channel's 1.2 s/s of blocked time: 0.6 each
    assert {s["index"]: s["backpressure"] for s in warm["stages"]} == {0: 0.6, 1: 0.6, 2: 0.0}
    into_m = [e for e in warm["edges"] if e["target"] == "m"]
    assert [(e["source"], e["fill"], e["capacity"], e["blocked_ratio"]) for e in into_m] == [
        ("x", 3, 8, 1.2),
        ("y", 3, 8, 1.2),
    ]
    json.dumps(warm, allow_nan=False)  # no NaN or infinity reaches the browser


# -- /api/flow over HTTP ----------------------------------------------------------------------


def test_api_flow_over_http_has_the_exact_numbers_of_the_held_flow() -> None:
    got: dict[str, Any] = {}

    async def check(view: WebView, handle: sw.FlowHandle) -> None:
        base = view.url
        got["api"] = await _fetch(base + "api/flow")
        got["page"] = await _fetch(base)
        got["head"] = await _fetch(base + "api/flow", "HEAD")
        got["missing"] = await _fetch(base + "nope")
        got["post"] = await _fetch(base + "api/flow", "POST")

    _stalled(check)

    status, headers, body = got["api"]
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    state = json.loads(body)
    assert {k: state[k] for k in ("flow", "time", "wall_time", "elapsed", "rates_over")} == {
        "flow": "orders",
        "time": 1.0,
        "wall_time": EPOCH + 1.0,
        "elapsed": 1.0,
        "rates_over": 1.0,
    }
    assert state["stopping"] is False
    assert (state["columns"], state["rows"]) == (5, 1)
    assert state["stages"] == [
        {"index": 0, "operators": ["src", "stamp"], "channel": None, "backpressure": 1.0},
        {"index": 1, "operators": ["buf", "double", "out"], "channel": "buf.in",
         "backpressure": 0.0},
    ]  # fmt: skip
    nodes = {n["name"]: n for n in state["nodes"]}
    assert list(nodes) == ["src", "stamp", "buf", "double", "out"]

    def numbers(name: str) -> tuple[Any, ...]:
        n = nodes[name]
        keys = ("kind", "stage", "column", "records_in", "records_out", "rate_in", "rate_out",
                "errors", "backpressure", "watermark_lag")  # fmt: skip
        return tuple(n[k] for k in keys)

    # the source produced 10 in its one second, and is blocked all the time since
    assert numbers("src") == ("source", 0, 0, 10, 10, 10.0, 10.0, 0, 1.0, None)
    # event time 1_699_999_990 + 3 ended the first batch: the watermark, 8 s behind at t=1
    # (the second batch is still being handed on: its watermark comes after that)
    assert numbers("stamp") == ("with_timestamps", 0, 1, 10, 10, 10.0, 10.0, 0, 1.0, 8.0)
    assert numbers("buf") == ("buffer", 1, 2, 4, 4, 4.0, 4.0, 0, 0.0, None)
    assert numbers("double") == ("map", 1, 3, 4, 4, 4.0, 4.0, 0, 0.0, None)
    assert numbers("out") == ("sink", 1, 4, 4, 0, 4.0, 0.0, 0, 0.0, None)
    assert nodes["stamp"]["watermark"] == EPOCH - 7.0
    # the first batch went through stage 0 at t=0 (the smallest bucket, 1 us); stage 1
    # still holds its first batch, so it has no latency yet
    assert [nodes["src"][f"latency_p{q}"] for q in (50, 95, 99)] == [1e-06, 1e-06, 1e-06]
    assert nodes["buf"]["latency_p99"] is None
    assert nodes["stamp"]["latency_p99"] is None  # not a stage head
    # every operator that took a batch has its own processing time (0 on this clock)
    assert nodes["stamp"]["processing_p99"] == 1e-06
    assert nodes["out"]["processing_p99"] is None  # its first batch is still in it
    assert nodes["buf"]["head"] is True
    assert nodes["double"]["head"] is False
    assert state["edges"] == [
        {"source": "src", "target": "stamp", "port": None, "channel": None, "fill": None,
         "capacity": None, "max_fill": None, "overflow": None, "dropped": None,
         "blocked_ratio": None},
        {"source": "stamp", "target": "buf", "port": None, "channel": "buf.in", "fill": 4,
         "capacity": 4, "max_fill": 4, "overflow": "block", "dropped": 0,
         "blocked_ratio": 1.0},
        {"source": "buf", "target": "double", "port": None, "channel": None, "fill": None,
         "capacity": None, "max_fill": None, "overflow": None, "dropped": None,
         "blocked_ratio": None},
        {"source": "double", "target": "out", "port": None, "channel": None, "fill": None,
         "capacity": None, "max_fill": None, "overflow": None, "dropped": None,
         "blocked_ratio": None},
    ]  # fmt: skip

    status, headers, body = got["page"]
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert body == page()
    status, headers, body = got["head"]
    assert (status, body) == (200, b"")
    assert int(headers["Content-Length"]) > 0
    assert got["missing"][0] == 404
    assert got["post"][0] == 405


def test_the_view_stops_when_the_flow_ends_on_its_own() -> None:
    async def main() -> tuple[int, bool]:
        view = WebView(0)
        flow = sw.Flow("short")
        flow.source(sw.sources.Iterable(range(10)), name="src").sink(sw.sinks.Collect())
        handle = sw.start(flow)
        serving = asyncio.ensure_future(view(handle))
        port = await view.wait_serving()
        await handle.wait()
        await asyncio.wait_for(serving, timeout=5)  # returns by itself: the flow ended
        return port, view.serving

    port, still_serving = asyncio.run(main())
    assert not still_serving
    assert _refused(port)


def test_a_port_in_use_fails_the_run_naming_the_port() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flow = sw.Flow("clash")
        flow.source(sw.sources.Iterable(range(3))).sink(sw.sinks.Collect())
        with pytest.raises(
            OSError, match=f"cannot serve the web view on 127.0.0.1:{port}: address already in use"
        ):
            sw.run(flow, monitor=WebView(port), handle_signals=False)


@pytest.mark.parametrize("port", [-1, 65536, 1.5, True, "8080"])
def test_a_bad_port_is_refused(port: Any) -> None:
    with pytest.raises(ValueError, match=r"port must be a whole number in 0\.\.65535, got"):
        WebView(port)


def test_a_bad_interval_is_refused() -> None:
    with pytest.raises(
        ValueError,
        match="WebView interval must be a finite number > 0 seconds, got 0",
    ):
        WebView(0, interval=0)


def test_the_page_is_self_contained() -> None:
    html = page().decode()
    assert html.startswith("<!doctype html>")
    assert 'fetch("api/flow"' in html
    # nothing is loaded from elsewhere: no scripts, styles or images by URL
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "@import" not in html


# -- the page in headless Chromium ------------------------------------------------------------


class _Svg(HTMLParser):
    """The operator nodes and channels of the dumped DOM: their attributes and texts."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, dict[str, str | None]] = {}
        self.channels: dict[str, dict[str, str | None]] = {}
        self.texts: dict[str, list[str]] = {}
        self.svg = False
        self._stack: list[str | None] = []
        self._in_text = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        owner = self._stack[-1] if self._stack else None
        if tag == "svg" and a.get("id") == "graph":
            self.svg = True
        if tag == "g" and a.get("class") == "node":
            owner = f"node:{a['data-name']}"
            self.nodes[str(a["data-name"])] = a
        elif tag == "g" and a.get("class") == "channel":
            owner = f"channel:{a['data-channel']}"
            self.channels[str(a["data-channel"])] = a
        self._stack.append(owner)
        self._in_text = tag == "text"

    def handle_endtag(self, tag: str) -> None:
        if self._stack:
            self._stack.pop()
        self._in_text = False

    def handle_data(self, data: str) -> None:
        owner = self._stack[-1] if self._stack else None
        if owner and self._in_text:
            self.texts.setdefault(owner, []).append(data)


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        service_missing(
            "the web view test needs Debian's `chromium` (headless); install it with "
            "`sudo apt-get install -y chromium`"
        )
    return found


async def _dump_dom(chromium: str, url: str, profile: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        chromium,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=3000",  # the page polls at load, then every second
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out.decode()


def test_the_page_draws_the_graph_with_live_numbers_in_headless_chromium(tmp_path: Path) -> None:
    chromium = _chromium()
    dumped: list[str] = []

    async def check(view: WebView, handle: sw.FlowHandle) -> None:
        dumped.append(await _dump_dom(chromium, view.url, tmp_path / "profile"))

    _stalled(check)
    dom = _Svg()
    dom.feed(dumped[0])
    assert dom.svg
    assert list(dom.nodes) == ["src", "stamp", "buf", "double", "out"]
    src = dom.nodes["src"]
    assert (src["data-kind"], src["data-rate-out"], src["data-backpressure"]) == (
        "source",
        "10",
        "1",
    )
    assert dom.nodes["out"]["data-rate-in"] == "4"

    def text(name: str) -> list[str]:
        return dom.texts[f"node:{name}"]

    assert text("src") == [
        "src", "source", "10.0/s \u2192 10.0/s", "bp 100% \u00b7 p99 1us", "err 0",
    ]  # fmt: skip
    assert text("stamp") == [
        "stamp", "with_timestamps", "10.0/s \u2192 10.0/s", "bp 100%", "err 0 \u00b7 wm lag 8.0s",
    ]  # fmt: skip
    assert text("double") == ["double", "map", "4.0/s \u2192 4.0/s", "bp 0%", "err 0"]
    assert text("out") == ["out", "sink", "4.0/s \u2192 0.0/s", "bp 0%", "err 0"]
    channel = dom.channels["buf.in"]
    assert (channel["data-fill"], channel["data-capacity"], channel["data-blocked-ratio"]) == (
        "4", "4", "1",
    )  # fmt: skip
    assert dom.texts["channel:buf.in"] == ["4/4", "bp 100%"]
    # red for a blocked stage, green for a free one
    assert 'fill="hsl(0,70%,86%)"' in dumped[0]
    assert 'fill="hsl(120,70%,86%)"' in dumped[0]
    assert '<span id="status" class="live">live</span>' in dumped[0]
    assert "flow 'orders'" in dumped[0]


# -- the command line ----------------------------------------------------------------------------


def test_ui_port_option_parses_like_metrics_port() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["demo"]).ui_port is None
    assert parser.parse_args(["demo", "--ui-port", "8080"]).ui_port == 8080
    assert parser.parse_args(["run", "m:f", "--ui-port", "0"]).ui_port == 0


@pytest.mark.parametrize("bad", ["-1", "65536", "http", "80.5"])
def test_a_bad_ui_port_is_a_usage_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--ui-port", bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --ui-port: must be a port in 0..65535, got {bad!r}" in err


def _job(tmp_path: Path, name: str) -> Path:
    job = tmp_path / f"{name}.py"
    job.write_text(
        "import sluiceway as sw\n"
        "flow = sw.Flow('job')\n"
        "flow.source(sw.sources.Iterable(range(5))).sink(sw.sinks.Collect())\n",
        encoding="utf-8",
    )
    return job


def test_run_with_ui_port_serves_and_finishes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _job(tmp_path, "job_web_ok")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", f"{job}:flow", "--ui-port", "0"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"sluiceway: web view at http://127\.0\.0\.1:\d+/\n", err)
    assert "5 records in, 5 out" in err


def test_run_with_ui_port_in_use_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _job(tmp_path, "job_web_clash")
    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.main(["run", f"{job}:flow", "--ui-port", str(port)])
    assert code == 2
    err = capsys.readouterr().err
    assert (
        f"sluiceway: error: --ui-port {port}: cannot serve the web view on "
        f"127.0.0.1:{port}: address already in use"
    ) in err


@pytest.mark.slow
def test_demo_with_ui_port_serves_beside_its_plain_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["demo", "--duration", "0.3", "--rate", "200", "--no-live", "--ui-port", "0"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "sluiceway: web view at http://127.0.0.1:" in captured.err
    assert "demo totals:" in captured.out
