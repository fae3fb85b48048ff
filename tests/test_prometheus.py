"""The Prometheus exporter: metric families, the /metrics endpoint, ``--metrics-port``."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import sys
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import sluiceway as sw
from sluiceway import cli
from sluiceway.metrics import FlowSnapshot, OperatorSnapshot
from sluiceway.metrics.prometheus import FlowCollector, PrometheusExporter, metric_families
from sluiceway.runtime.channel import ChannelStatistics

# -- helpers ----------------------------------------------------------------------------


class GatedSource(sw.sources.Source):
    """Hands out the given batches, then holds the flow open until ``release`` is set."""

    def __init__(self, batches: list[list[Any]], release: asyncio.Event) -> None:
        self._batches = list(batches)
        self._release = release

    async def next_batch(self, max_records: int) -> sw.Batch | None:
        if self._batches:
            return sw.Batch(self._batches.pop(0))
        await self._release.wait()
        return None


class SignalSink(sw.sinks.Sink):
    """Collects records and sets ``seen`` once ``expected`` have arrived."""

    def __init__(self, expected: int) -> None:
        self.items: list[Any] = []
        self.expected = expected
        self.seen = asyncio.Event()

    async def write(self, batch: sw.Batch) -> None:
        self.items.extend(batch.values)
        if len(self.items) >= self.expected:
            self.seen.set()


def _get(url: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


async def _scrape(url: str, accept: str | None = None) -> tuple[int, str, str]:
    return await asyncio.to_thread(_get, url, accept)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        sample: Sample
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def _labels(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def _window_flow(release: asyncio.Event, late: SignalSink) -> tuple[sw.Flow, SignalSink]:
    """src -> buffer(16) -> timestamps -> key_by -> 60 s tumbling count -> sink; late -> sink.

    Event times 1, 2, 61 (the watermark passes 60: window [0, 60) closes) then 5: late.
    """
    flow = sw.Flow("orders")
    records = [{"k": "a", "t": 1.0}, {"k": "a", "t": 2.0}, {"k": "a", "t": 61.0}]
    source = GatedSource([records, [{"k": "a", "t": 5.0}]], release)
    windowed = (
        flow.source(source, name="src")
        .buffer(16, name="buf")
        .with_timestamps(lambda r: r["t"])
        .key_by(lambda r: r["k"])
        .window(sw.windows.Tumbling(timedelta(seconds=60)))
    )
    counts = windowed.aggregate(sw.agg.count(), name="window_60s")
    results = SignalSink(1)
    counts.sink(results, name="results")
    counts.late().sink(late, name="late_sink")
    return flow, results


# -- metric families (pure) ---------------------------------------------------------------


def _snapshot() -> FlowSnapshot:
    ops = (
        OperatorSnapshot("src", "source", 0, 0, 10, 0, 0, 0, 0),
        OperatorSnapshot(
            "win",
            "window",
            1,
            10,
            3,
            1,
            2,
            1,
            4,
            late=5,
            state=2,
            watermark=120.5,
            failed_attempts=3,
        ),
        OperatorSnapshot(
            "call", "async_map", 1, 3, 3, 0, 0, 0, 0, circuit_state="open", circuit_opens=1
        ),
    )
    channel = ChannelStatistics(
        name="src->win",
        capacity=64,
        overflow=sw.Overflow.BLOCK,
        fill=7,
        max_fill=9,
        records_sent=10,
        records_received=3,
        records_dropped=4,
        blocked_seconds=1.5,
        writers_open=1,
    )
    return FlowSnapshot("f", 3.0, ops, (channel,))


def test_metric_families_names_labels_and_values() -> None:
    families = {f.name: f for f in metric_families(_snapshot())}
    assert {f.name: f.type for f in families.values()} == {
        "sluiceway_records_in": "counter",
        "sluiceway_records_out": "counter",
        "sluiceway_errors": "counter",
        "sluiceway_failed_attempts": "counter",
        "sluiceway_retries": "counter",
        "sluiceway_dead_letters": "counter",
        "sluiceway_dropped": "counter",
        "sluiceway_rejected": "counter",
        "sluiceway_late_records": "counter",
        "sluiceway_window_state": "gauge",
        "sluiceway_watermark_seconds": "gauge",
        "sluiceway_circuit_open": "gauge",
        "sluiceway_source_backlog": "gauge",
        "sluiceway_source_partition_backlog": "gauge",
        "sluiceway_stage_latency_seconds": "gauge",
        "sluiceway_operator_processing_seconds": "gauge",
        "sluiceway_channel_fill": "gauge",
        "sluiceway_channel_capacity": "gauge",
        "sluiceway_channel_blocked_seconds": "counter",
        "sluiceway_channel_dropped": "counter",
    }
    assert all(f.documentation for f in families.values())

    def values(name: str) -> dict[str, float]:
        return {
            s.labels.get("operator", s.labels.get("edge", "")): s.value
            for s in families[name].samples
        }

    win = {"flow": "f", "operator": "win", "kind": "window"}
    assert families["sluiceway_late_records"].samples[1].labels == win
    assert families["sluiceway_late_records"].samples[1].name == "sluiceway_late_records_total"
    assert values("sluiceway_records_in") == {"src": 0, "win": 10, "call": 3}
    assert values("sluiceway_records_out") == {"src": 10, "win": 3, "call": 3}
    assert values("sluiceway_errors")["win"] == 1
    assert values("sluiceway_failed_attempts")["win"] == 3
    assert values("sluiceway_retries")["win"] == 2
    assert values("sluiceway_dead_letters")["win"] == 1
    assert values("sluiceway_dropped")["win"] == 4
    assert values("sluiceway_late_records") == {"src": 0, "win": 5, "call": 0}
    assert values("sluiceway_window_state") == {"src": 0, "win": 2, "call": 0}
    # -inf watermarks (never saw one) are left out; only breakers report a circuit
    assert values("sluiceway_watermark_seconds") == {"win": 120.5}
    assert values("sluiceway_circuit_open") == {"call": 1.0}
    edge = {"flow": "f", "edge": "src->win"}
    assert families["sluiceway_channel_fill"].samples[0].labels == edge
    assert values("sluiceway_channel_fill") == {"src->win": 7}
    assert values("sluiceway_channel_capacity") == {"src->win": 64}
    assert values("sluiceway_channel_blocked_seconds") == {"src->win": 1.5}
    assert values("sluiceway_channel_dropped") == {"src->win": 4}


def test_collector_reads_the_snapshot_at_every_collect() -> None:
    calls: list[int] = []

    def snap() -> FlowSnapshot:
        calls.append(1)
        return _snapshot()

    collector = FlowCollector(snap)
    assert calls == []  # nothing read until a scrape
    assert len(list(collector.collect())) == 20
    assert len(list(collector.collect())) == 20
    assert len(calls) == 2


def test_closed_circuit_reports_zero_and_no_watermark_is_omitted() -> None:
    op = OperatorSnapshot("c", "map", 0, 1, 1, 0, 0, 0, 0, circuit_state="half_open")
    families = {f.name: f for f in metric_families(FlowSnapshot("f", 0.0, (op,), ()))}
    assert [s.value for s in families["sluiceway_circuit_open"].samples] == [0.0]
    assert families["sluiceway_watermark_seconds"].samples == []
    assert math.isinf(op.watermark)


@pytest.mark.parametrize("port", [-1, 65536, 1.5, True, "9100"])
def test_exporter_rejects_a_bad_port(port: Any) -> None:
    with pytest.raises(ValueError, match=r"port must be a whole number in 0\.\.65535, got"):
        PrometheusExporter(port)


# -- the endpoint -------------------------------------------------------------------------


def test_scrape_while_the_flow_runs_then_the_port_is_released() -> None:
    scraped: dict[str, Any] = {}

    async def main() -> sw.RunResult:
        release = asyncio.Event()
        late = SignalSink(1)
        flow, results = _window_flow(release, late)
        exporter = PrometheusExporter(port=0)
        assert exporter.port == 0
        assert not exporter.serving

        async def monitor(handle: sw.FlowHandle) -> None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(exporter(handle))
                port = await exporter.wait_serving()
                scraped["port"] = port
                assert port != 0
                assert exporter.serving
                assert exporter.url == f"http://127.0.0.1:{port}/metrics"
                await late.seen.wait()  # every record has passed the window
                await results.seen.wait()
                scraped["metrics"] = await _scrape(exporter.url)
                scraped["openmetrics"] = await _scrape(
                    exporter.url, "application/openmetrics-text; version=1.0.0"
                )
                scraped["root"] = await _scrape(f"http://127.0.0.1:{port}/")
                scraped["missing"] = await _scrape(f"http://127.0.0.1:{port}/nope")
                snapshot = handle.metrics()
                scraped["edges"] = {c.name: c.capacity for c in snapshot.channels}
                release.set()

        return await sw.run_async(flow, monitor=monitor)

    result = asyncio.run(main())
    assert result.metrics.operator("window_60s").late == 1

    status, content_type, text = scraped["metrics"]
    assert status == 200
    assert content_type.startswith("text/plain; version=0.0.4")
    samples = _samples(text)

    def op(name: str, kind: str) -> frozenset[tuple[str, str]]:
        return _labels(flow="orders", operator=name, kind=kind)

    assert samples["sluiceway_records_out_total", op("src", "source")] == 4
    assert samples["sluiceway_records_in_total", op("window_60s", "window")] == 4
    assert samples["sluiceway_records_out_total", op("window_60s", "window")] == 1
    assert samples["sluiceway_late_records_total", op("window_60s", "window")] == 1
    assert samples["sluiceway_records_in_total", op("late_sink", "sink")] == 1
    assert samples["sluiceway_errors_total", op("window_60s", "window")] == 0
    assert samples["sluiceway_watermark_seconds", op("window_60s", "window")] == 61.0
    assert samples["sluiceway_window_state", op("window_60s", "window")] == 1  # [60, 120)
    edges: dict[str, int] = scraped["edges"]
    assert edges["buf.in"] == 16
    for edge, capacity in edges.items():
        labels = _labels(flow="orders", edge=edge)
        assert samples["sluiceway_channel_capacity", labels] == capacity
        assert samples["sluiceway_channel_fill", labels] == 0
        assert samples["sluiceway_channel_dropped_total", labels] == 0
    assert "# HELP sluiceway_records_in_total Records the operator received." in text
    assert "# TYPE sluiceway_channel_blocked_seconds_total counter" in text

    status, content_type, text = scraped["openmetrics"]
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert scraped["root"][0] == 200
    assert scraped["missing"][0] == 404

    assert _refused(scraped["port"])


def test_exporter_stops_when_the_flow_ends_on_its_own() -> None:
    async def main() -> tuple[int, bool]:
        exporter = PrometheusExporter(port=0)
        flow = sw.Flow("short")
        flow.source(sw.sources.Iterable(range(10)), name="src").sink(sw.sinks.Collect())
        handle = sw.start(flow)
        serving = asyncio.ensure_future(exporter(handle))
        port = await exporter.wait_serving()
        await handle.wait()
        await asyncio.wait_for(serving, timeout=5)  # returns by itself: the flow ended
        return port, exporter.serving

    port, still_serving = asyncio.run(main())
    assert not still_serving
    assert _refused(port)


def test_bad_requests_are_answered_and_do_not_stop_the_flow() -> None:
    answers: list[bytes] = []

    async def raw(port: int, request: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        writer.write_eof()  # half-close: the server sees the end of what we send
        await writer.drain()
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        return data

    async def main() -> None:
        release = asyncio.Event()
        flow = sw.Flow("bad")
        flow.source(GatedSource([[1]], release), name="src").sink(sw.sinks.Collect())
        exporter = PrometheusExporter(port=0)

        async def monitor(handle: sw.FlowHandle) -> None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(exporter(handle))
                port = await exporter.wait_serving()
                answers.append(await raw(port, b"POST /metrics HTTP/1.1\r\n\r\n"))
                answers.append(await raw(port, b"nonsense\r\n\r\n"))
                answers.append(await raw(port, b"HEAD /metrics HTTP/1.1\r\n\r\n"))
                answers.append(await raw(port, b"GET /metr"))  # the client gives up
                # a client that connects and says nothing is closed when the flow ends
                _, idle = await asyncio.open_connection("127.0.0.1", port)
                release.set()
                await handle.wait()
                idle.close()

        await sw.run_async(flow, monitor=monitor)

    asyncio.run(main())
    assert answers[0].startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert answers[1].startswith(b"HTTP/1.1 400 Bad Request\r\n")
    head, _, body = answers[2].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Content-Length: " in head
    assert body == b""
    assert answers[3] == b""


def test_a_port_in_use_fails_the_run_with_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flow = sw.Flow("clash")
        flow.source(sw.sources.Iterable(range(3))).sink(sw.sinks.Collect())
        with pytest.raises(OSError, match=f"cannot serve Prometheus metrics on 127.0.0.1:{port}"):
            sw.run(flow, monitor=PrometheusExporter(port), handle_signals=False)


# -- the command line ---------------------------------------------------------------------


def test_metrics_port_option_parses() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["demo"]).metrics_port is None
    assert parser.parse_args(["demo", "--metrics-port", "9100"]).metrics_port == 9100
    assert parser.parse_args(["run", "m:flow", "--metrics-port", "0"]).metrics_port == 0


@pytest.mark.parametrize("bad", ["-1", "65536", "http"])
def test_metrics_port_option_rejects_bad_ports(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["demo", "--metrics-port", bad])
    assert exit_info.value.code == 2
    assert f"argument --metrics-port: must be a port in 0..65535, got {bad!r}" in (
        capsys.readouterr().err
    )


def test_demo_with_metrics_port_runs_and_ends(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["demo", "--duration", "0.5", "--no-live", "--rate", "200", "--metrics-port", "0"]
    )
    assert code == 0
    assert "demo totals:" in capsys.readouterr().out


def test_run_with_metrics_port_in_use_is_a_usage_error(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = tmp_path / "job_metrics.py"
    job.write_text(
        "import sluiceway as sw\n"
        "flow = sw.Flow('job')\n"
        "flow.source(sw.sources.Iterable(range(5))).sink(sw.sinks.Collect())\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = cli.main(["run", f"{job}:flow", "--metrics-port", str(port)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"sluiceway: error: --metrics-port {port}: cannot serve Prometheus metrics" in err


def test_run_with_metrics_port_serves_and_finishes(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job = tmp_path / "job_metrics_ok.py"
    job.write_text(
        "import sluiceway as sw\n"
        "flow = sw.Flow('job')\n"
        "flow.source(sw.sources.Iterable(range(5))).sink(sw.sinks.Collect())\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", f"{job}:flow", "--metrics-port", "0"]) == 0
    assert "5 records in, 5 out" in capsys.readouterr().err


def test_metrics_port_without_the_extra_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sluiceway.metrics.prometheus", None)
    assert cli.main(["demo", "--duration", "0.1", "--metrics-port", "9100"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran
    assert (
        "sluiceway: error: --metrics-port needs prometheus-client: "
        "pip install 'sluiceway[prometheus]'"
    ) in captured.err


def test_one_exporter_serves_one_flow_at_a_time() -> None:
    async def main() -> None:
        release = asyncio.Event()
        flow = sw.Flow("once")
        flow.source(GatedSource([[1]], release)).sink(sw.sinks.Collect())
        exporter = PrometheusExporter(port=0)

        async def monitor(handle: sw.FlowHandle) -> None:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(exporter(handle))
                await exporter.wait_serving()
                with pytest.raises(RuntimeError, match="create one exporter per flow"):
                    await exporter(handle)
                release.set()

        await sw.run_async(flow, monitor=monitor)
        assert not exporter.serving
        # the same exporter may serve a later run
        again = sw.Flow("again")
        again.source(sw.sources.Iterable([1])).sink(sw.sinks.Collect())
        await sw.run_async(again, monitor=exporter)

    asyncio.run(main())


def test_the_docs_example_runs() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "observability.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(block, {"__name__": "docs_example"})


def test_a_source_backlog_is_a_gauge_only_where_known() -> None:
    ops = (
        OperatorSnapshot("file", "source", 0, 0, 10, 0, 0, 0, 0, backlog=1234),
        OperatorSnapshot("gen", "source", 0, 0, 10, 0, 0, 0, 0),
    )
    families = {f.name: f for f in metric_families(FlowSnapshot("f", 1.0, ops, ()))}
    samples = families["sluiceway_source_backlog"].samples
    assert [(s.labels["operator"], s.value) for s in samples] == [("file", 1234.0)]


def test_stage_latency_quantiles_only_for_stage_heads() -> None:
    ops = (
        OperatorSnapshot(
            "src", "source", 0, 0, 10, 0, 0, 0, 0,
            latency_p50=0.001, latency_p95=0.002, latency_p99=0.004,
        ),
        OperatorSnapshot("out", "sink", 0, 10, 10, 0, 0, 0, 0),
    )  # fmt: skip
    families = {f.name: f for f in metric_families(FlowSnapshot("f", 1.0, ops, ()))}
    samples = families["sluiceway_stage_latency_seconds"].samples
    assert [(s.labels["operator"], s.labels["quantile"], s.value) for s in samples] == [
        ("src", "0.5", 0.001),
        ("src", "0.95", 0.002),
        ("src", "0.99", 0.004),
    ]


# -- connections are bounded: a deadline per request, a cap on open connections --------


async def _serve_while(
    exporter: PrometheusExporter,
    clients: Any,
    clock: sw.Clock | None = None,
) -> Any:
    """Run a held-open flow with ``exporter``; ``await clients(port, clock)`` meanwhile."""
    release = asyncio.Event()
    flow = sw.Flow("conns")
    flow.source(GatedSource([[1]], release), name="src").sink(sw.sinks.Collect())
    out: list[Any] = []

    async def monitor(handle: sw.FlowHandle) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(exporter(handle))
            port = await exporter.wait_serving()
            try:
                out.append(await clients(port, handle.clock))
            finally:
                release.set()
                await handle.wait()

    await sw.run_async(flow, monitor=monitor, clock=clock)
    return out[0]


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    return await reader.read()


def test_an_idle_connection_is_answered_408_and_closed_at_its_deadline() -> None:
    clock = sw.VirtualClock()
    exporter = PrometheusExporter(port=0)
    exporter.request_timeout = 30.0

    async def clients(port: int, clock: sw.Clock) -> tuple[bytes, bytes, float]:
        t0 = clock.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        slow_r, slow_w = await asyncio.open_connection("127.0.0.1", port)
        slow_w.write(b"GET /metrics HTTP/1.1\r\n")  # ... and the rest never comes
        idle, trickled = await asyncio.gather(_read_all(reader), _read_all(slow_r))
        waited = clock.monotonic() - t0
        writer.close()
        slow_w.close()
        return idle, trickled, waited

    idle, trickled, waited = asyncio.run(_serve_while(exporter, clients, clock))
    assert idle.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert trickled.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert 30.0 <= waited < 31.0  # on the flow's clock


def test_bare_lf_line_endings_are_answered() -> None:
    exporter = PrometheusExporter(port=0)

    async def clients(port: int, clock: sw.Clock) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\nHost: x\nAccept: */*\n\n")
        data = await reader.read()
        writer.close()
        return data

    data = asyncio.run(_serve_while(exporter, clients))
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"sluiceway_records_in_total" in body


def test_connections_over_the_cap_are_refused_503_and_the_rest_served() -> None:
    exporter = PrometheusExporter(port=0)
    exporter.max_connections = 3

    async def clients(port: int, clock: sw.Clock) -> tuple[list[bytes], bytes]:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        while len(exporter._connections) < 3:  # noqa: ASYNC110 - no event tells; poll
            await asyncio.sleep(0.001)  # until the server has taken all three
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        refused = await reader.read()
        writer.close()
        for _, w in held:  # the held ones still get their answers
            w.write(b"GET /metrics HTTP/1.1\r\n\r\n")
        answers = [await r.read() for r, _ in held]
        for _, w in held:
            w.close()
        return answers, refused

    answers, refused = asyncio.run(_serve_while(exporter, clients))
    assert refused.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert refused.endswith(b"more than 3 connections\n")
    assert all(a.startswith(b"HTTP/1.1 200 OK\r\n") for a in answers)
