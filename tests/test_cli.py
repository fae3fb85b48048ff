"""The command line (`sluiceway run`, `sluiceway demo`), the live console view and the demo."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import io
import itertools
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import sluiceway as sw
from sluiceway import cli, console, demo
from sluiceway.metrics import FlowSnapshot, OperatorSnapshot
from sluiceway.runtime.channel import ChannelStatistics, Overflow

# -- helpers --------------------------------------------------------------------------

JOBS = textwrap.dedent(
    """
    import asyncio
    import sluiceway as sw

    flow = sw.Flow("small")
    flow.source(sw.sources.Iterable(range(5))).map(lambda x: x * 10).sink(sw.sinks.Stdout())
    other = sw.Flow("other")   # no source: invalid when run
    answer = 42

    def build():
        f = sw.Flow("built")
        f.source(sw.sources.Iterable("ab")).sink(sw.sinks.Stdout())
        return f

    class Jobs:
        daily = build()

    def needs(x, y=1):
        return build()

    def bad():
        return [1]

    async def coro():
        return build()

    def explodes():
        raise RuntimeError("no config")

    def parse(record):
        return {"amount": record["amount"]}

    def failing():
        f = sw.Flow("failing")
        f.source(sw.sources.Iterable([{"amount": 1}, {"id": 7}])).map(parse).sink(
            sw.sinks.Collect())
        return f

    def dangling():
        f = sw.Flow("dangling")
        f.source(sw.sources.Iterable([1]))
        return f
    """
)


@pytest.fixture(autouse=True)
def _no_global_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI configures the root logger of its own process; not of the test runner's.
    monkeypatch.setattr(cli, "_configure_logging", lambda level: None)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """tmp_path as the current directory, with sys.path and sys.modules restored after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "jobs.py").write_text(JOBS)
    importlib.invalidate_caches()
    yield tmp_path
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(tmp_path.resolve()):
            del sys.modules[name]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


# -- argument parsing -----------------------------------------------------------------


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out
    assert "demo" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sluiceway {sw.__version__}"


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_run_defaults() -> None:
    args = cli.build_parser().parse_args(["run", "jobs:flow"])
    assert args.target == "jobs:flow"
    assert args.grace_period == 10.0
    assert args.max_batch_size == 1024
    assert args.live is False
    assert args.describe is False
    assert args.log_level == "warning"


def test_run_options() -> None:
    args = cli.build_parser().parse_args(
        [
            *("run", "jobs:flow", "--grace-period", "2.5", "--max-batch-size", "64"),
            *("--live", "--log-level", "DEBUG", "--describe"),
        ]
    )
    assert (args.grace_period, args.max_batch_size, args.live) == (2.5, 64, True)
    assert args.log_level == "debug"
    assert args.describe is True
    assert cli.build_parser().parse_args(["run", "j:f", "--no-live"]).live is False


def test_demo_defaults_and_options() -> None:
    args = cli.build_parser().parse_args(["demo"])
    assert (args.duration, args.rate, args.live, args.seed) == (0.0, 2000.0, None, 42)
    args = cli.build_parser().parse_args(
        ["demo", "--duration", "3", "--rate", "50", "--no-live", "--seed", "7"]
    )
    assert (args.duration, args.rate, args.live, args.seed) == (3.0, 50.0, False, 7)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--rate", "0"], "argument --rate: must be a number > 0, got '0'"),
        (["demo", "--rate", "fast"], "argument --rate: must be a number > 0, got 'fast'"),
        (["demo", "--duration", "-1"], "argument --duration: must be a number of seconds >= 0"),
        (["run", "j:f", "--grace-period", "-1"], "argument --grace-period: must be a number"),
        (["run", "j:f", "--max-batch-size", "0"], "must be a whole number >= 1, got '0'"),
        (["run", "j:f", "--log-level", "loud"], "must be one of debug, info, warning"),
    ],
)
def test_bad_option_values_exit_2_naming_the_value(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# -- loading targets ------------------------------------------------------------------


def test_load_module_attr_from_the_current_directory(workdir: Path) -> None:
    assert str(workdir) not in sys.path
    flow = cli.load_flow("jobs:flow")
    assert flow.name == "small"
    assert str(workdir) in sys.path


def test_load_file_attr_relative_and_absolute(workdir: Path) -> None:
    sub = workdir / "pipelines"
    sub.mkdir()
    (sub / "helpers.py").write_text("def double(x):\n    return 2 * x\n")
    (sub / "job.py").write_text(
        "import sluiceway as sw\nfrom helpers import double\n"  # a sibling import
        "flow = sw.Flow('file')\n"
        "flow.source(sw.sources.Iterable([1])).map(double).sink(sw.sinks.Collect())\n"
    )
    assert cli.load_flow("pipelines/job.py:flow").name == "file"
    assert cli.load_flow(f"{sub / 'job.py'}:flow").name == "file"


def test_load_callable_and_dotted_attrs(workdir: Path) -> None:
    assert cli.load_flow("jobs:build").name == "built"
    assert cli.load_flow("jobs.py:build").name == "built"
    assert cli.load_flow("jobs:Jobs.daily").name == "built"


def test_load_the_demo_factory(workdir: Path) -> None:
    assert cli.load_flow("sluiceway.demo:build_demo_flow").name == "demo-clickstream"


@pytest.mark.parametrize(
    ("target", "code", "message"),
    [
        ("nocolon", 2, "target 'nocolon' must be MODULE:ATTR or path/to/file.py:ATTR"),
        ("jobs:", 2, "target 'jobs:' must be MODULE:ATTR"),
        (":flow", 2, "target ':flow' must be MODULE:ATTR"),
        ("no_such_module_xyz:flow", 2, "no module named 'no_such_module_xyz' (looked in"),
        ("no_such_pkg_xyz.sub:flow", 2, "no module named 'no_such_pkg_xyz.sub'"),
        ("missing.py:flow", 2, "file 'missing.py' not found (resolved to "),
        ("my-job:flow", 2, "'my-job' is not a module name; give a dotted module"),
        ("jobs:flw", 2, "'jobs' has no attribute 'flw'; Flow objects in it: flow, other"),
        ("empty:flow", 2, "'empty' defines no Flow at module level: define one"),
        ("jobs:Jobs.weekly", 2, "'jobs:Jobs' has no attribute 'weekly'"),
        ("jobs:answer", 2, "'jobs:answer' is an int (42), not a sw.Flow or a function"),
        ("jobs:sw", 2, "'jobs:sw' is a module (sluiceway), not a sw.Flow"),
        ("jobs:needs", 2, "'jobs:needs' needs arguments (x); name a Flow or a function"),
        ("jobs:bad", 2, "jobs:bad() returned a list ([1]), not a sw.Flow"),
        ("jobs:coro", 2, "'jobs:coro' is an async function; it must be a plain function"),
        (
            "jobs:explodes",
            1,
            "calling jobs:explodes() failed: RuntimeError: no config (at jobs.py:",
        ),
        ("broken:flow", 1, "importing module 'broken' failed: ZeroDivisionError: division by zero"),
        (
            "dep:flow",
            1,
            "ModuleNotFoundError: No module named 'no_such_dependency_xyz' (at dep.py:1",
        ),
        ("syntax.py:flow", 1, "importing 'syntax.py' failed: SyntaxError: "),
        ("jobs:dangling", 1, "invalid flow: flow 'dangling' has no sink"),
        ("jobs:other", 1, "invalid flow: flow 'other' has no source"),
    ],
)
def test_bad_targets_give_one_clear_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], target: str, code: int, message: str
) -> None:
    (workdir / "empty.py").write_text("x = 1\n")
    (workdir / "broken.py").write_text("x = 1 / 0\n")
    (workdir / "dep.py").write_text("import no_such_dependency_xyz\n")
    (workdir / "syntax.py").write_text("def f(:\n")
    importlib.invalidate_caches()
    got, out, err = run_cli(["run", target], capsys)
    assert got == code, err
    assert err.startswith("sluiceway: error: ")
    assert message in err
    assert err.count("\n") == 1, err  # one line
    assert "Traceback" not in err
    assert out == ""


def test_a_directory_is_not_a_file_target(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "pkg.py").mkdir()
    code, _, err = run_cli(["run", "pkg.py:flow"], capsys)
    assert code == 2
    assert "file 'pkg.py' is a directory, not a .py file" in err


# -- running a flow in-process --------------------------------------------------------


def test_run_prints_the_flows_output_and_totals(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["run", "jobs:flow"], capsys)
    assert code == 0, err
    assert out.split() == ["0", "10", "20", "30", "40"]
    assert re.search(r"flow 'small' finished after [\d.]+s: 5 records in, 5 out, 0 errors", err)


def test_run_describe_prints_the_plan(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["run", "jobs:flow", "--describe"], capsys)
    assert code == 0
    assert out.startswith("flow 'small': 1 stage(s)\n  stage 0: source_Iterable -> map_lambda")


def test_run_describe_of_an_invalid_flow(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["run", "jobs:other", "--describe"], capsys)
    assert code == 1
    assert "invalid flow: flow 'other' has no source" in err


def test_a_failing_flow_names_operator_record_and_cause(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["run", "jobs:failing"], capsys)
    assert code == 1
    first, second = err.splitlines()
    assert first == (
        "sluiceway: error: operator 'map_parse' in flow 'failing' failed on record "
        "{'id': 7}: KeyError: 'amount'"
    )
    assert re.fullmatch(
        r"sluiceway: caused by KeyError: 'amount' \(at jobs.py:\d+ in parse\)", second
    )


def test_debug_log_level_adds_the_traceback(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(["run", "jobs:failing", "--log-level", "debug"], capsys)
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().splitlines()[-1].startswith("sluiceway: caused by KeyError")


def test_run_live_draws_the_table_on_stderr(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["run", "jobs:flow", "--live"], capsys)
    assert code == 0
    assert out.split() == ["0", "10", "20", "30", "40"]  # stdout stays the flow's own
    assert "\x1b[?25l" in err  # cursor hidden while drawing...
    assert "\x1b[?25h" in err  # ...and given back
    final = console.strip_ansi(err)
    assert re.search(r"sink_Stdout\s+sink\s+0\s+5\s+5", final)


def test_cancelled_exit_codes() -> None:
    def cancelled(reason: sw.CancelReason, sig: signal.Signals | None = None) -> Any:
        return sw.FlowCancelledError("flow 'x' cancelled", {"a": 1}, reason=reason, signal=sig)

    assert cli._cancelled_exit_code(cancelled(sw.CancelReason.SIGNAL, signal.SIGINT)) == 130
    term = cancelled(sw.CancelReason.SIGNAL, signal.SIGTERM)
    assert cli._cancelled_exit_code(term) == 128 + signal.SIGTERM
    assert cli._cancelled_exit_code(cancelled(sw.CancelReason.GRACE_PERIOD)) == 1
    assert cli._cancelled_exit_code(cancelled(sw.CancelReason.MONITOR)) == 1


# -- render ---------------------------------------------------------------------------


def _op(name: str, kind: str, stage: int, n_in: int, n_out: int, errors: int = 0) -> Any:
    return OperatorSnapshot(name, kind, stage, n_in, n_out, errors, 0, 0, 0)


def _ch(name: str, fill: int, blocked: float, dropped: int = 0) -> ChannelStatistics:
    return ChannelStatistics(
        name=name,
        capacity=1000,
        overflow=Overflow.BLOCK,
        fill=fill,
        max_fill=fill,
        records_sent=0,
        records_received=0,
        records_dropped=dropped,
        blocked_seconds=blocked,
        writers_open=1,
    )


def _snapshots() -> tuple[FlowSnapshot, FlowSnapshot]:
    before = FlowSnapshot(
        "orders",
        100.0,
        (
            _op("src", "source", 0, 0, 1000),
            _op("parse", "map", 0, 1000, 1000),
            _op("out", "sink", 1, 900, 900),
        ),
        (_ch("out.in", 100, 1.0),),
    )
    now = FlowSnapshot(
        "orders",
        102.0,
        (
            _op("src", "source", 0, 0, 5000),
            _op("parse", "map", 0, 5000, 4990, errors=10),
            _op("out", "sink", 1, 4490, 4490),
        ),
        (_ch("out.in", 500, 2.5, dropped=3),),
    )
    return before, now


def test_render_shows_counts_rates_and_channels() -> None:
    before, now = _snapshots()
    text = console.render(now, before, 120, started=98.0)
    lines = text.splitlines()
    assert lines[0] == "sluiceway  flow 'orders'  t=4.0s  (rates over the last 2.0s)"
    row = next(line for line in lines if line.startswith("parse"))
    assert row.split() == [
        "parse", "map", "0", "5,000", "4,990", "2,000", "1,995", "10", "0", "0", "-"
    ]  # fmt: skip
    chan = next(line for line in lines if line.startswith("out.in"))
    # 500/1000 full; blocked 1.5 s over 2 s: 75 % backpressure; 3 dropped.
    assert chan.split() == ["out.in", "500/1,000", "[#####.....]", "500", "75%", "3", "block"]
    assert all(len(line) <= 120 for line in lines)


def test_render_first_frame_has_no_rates() -> None:
    _, now = _snapshots()
    text = console.render(now, None, 100)
    row = next(line for line in text.splitlines() if line.startswith("src"))
    assert row.split()[5:7] == ["-", "-"]
    assert "rates over" not in text
    assert "t=" not in text


def test_render_fits_a_narrow_terminal_and_colors_are_optional() -> None:
    before, now = _snapshots()
    for width in (20, 40, 60):
        assert all(len(line) <= width for line in console.render(now, before, width).splitlines())
    plain = console.render(now, before, 100)
    colored = console.render(now, before, 100, color=True)
    assert "\x1b[31m" in colored  # the operator with errors is red
    assert "\x1b[33m" in colored  # the channel under backpressure is yellow
    assert console.strip_ansi(colored) == plain


def test_render_shows_late_records_and_watermark_lag_for_event_time_flows() -> None:
    plain = FlowSnapshot("f", 1.0, (_op("s", "source", 0, 0, 1),), (), wall_time=110.0)
    assert "wm lag" not in console.render(plain, None, 200)
    window = OperatorSnapshot(
        "win", "window", 0, 10, 2, 0, 0, 0, 0, late=3, watermark=100.0, latency_p99=0.0123
    )
    source = _op("s", "source", 0, 10, 10)
    snap = FlowSnapshot("f", 1.0, (source, window), (), wall_time=102.5)
    lines = console.render(snap, None, 200).splitlines()
    assert lines[2].split()[-5:] == ["dead", "p99", "late", "wm", "lag"]
    assert lines[3].split()[-2:] == ["0", "-"]  # the source has no watermark
    assert lines[4].split()[-3:] == ["12ms", "3", "2.5s"]  # p99; 3 late; watermark 2.5 s behind
    assert snap.watermark_lag("win") == 2.5
    assert snap.watermark_lag("s") is None


def test_render_without_channels() -> None:
    snap = FlowSnapshot("f", 1.0, (_op("s", "source", 0, 0, 1),), ())
    assert "no channels" in console.render(snap, None, 80)


def test_render_line() -> None:
    before, now = _snapshots()
    line = console.render_line(now, before, started=98.0)
    assert line == (
        "t=4.0s  in 2,000/s  out 1,795/s  errors 10  dropped 3  backpressure 75% (out.in)"
    )
    assert console.render_line(now, None) == (
        "in -/s  out -/s  errors 10  dropped 3  backpressure -"
    )


# -- the LiveView monitor on a virtual clock ------------------------------------------


def _ticking_flow() -> sw.Flow:
    flow = sw.Flow("ticks")
    flow.source(sw.sources.Generator(itertools.count, rate=100), name="src").buffer(
        50, name="buf"
    ).sink(sw.sinks.Collect(), name="out")
    return flow


def _with_stop(view: Callable[[sw.FlowHandle], Any], after: float) -> sw.Monitor:
    async def monitor(handle: sw.FlowHandle) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(view(handle))
            await handle.clock.sleep(after)
            handle.request_stop()

    return monitor


def test_plain_view_writes_one_line_per_interval_with_the_footer() -> None:
    out = io.StringIO()
    view = console.LiveView(out, interval=1.0, live=False, footer=lambda: "latest: ok")
    sw.run(_ticking_flow(), clock=sw.VirtualClock(), monitor=_with_stop(view, 3.5))
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["t=1.0s", "t=2.0s", "t=3.0s"]
    assert lines[-1] == (
        "t=3.0s  in 100/s  out 100/s  errors 0  dropped 0  backpressure 0% | latest: ok"
    )
    assert "\x1b" not in out.getvalue()


def test_live_view_redraws_in_place_and_ends_with_the_final_counts() -> None:
    out = io.StringIO()
    view = console.LiveView(out, interval=1.0, live=True, width=100, footer=lambda: "foot")
    result = sw.run(_ticking_flow(), clock=sw.VirtualClock(), monitor=_with_stop(view, 2.5))
    text = out.getvalue()
    assert text.startswith("\x1b[?25l")  # cursor hidden while drawing, shown at the end
    assert text.endswith("\x1b[?25h")
    frames = text.removeprefix("\x1b[?25l").removesuffix("\x1b[?25h").split("\x1b[J")
    assert frames[0] == ""
    frames = frames[1:]
    assert len(frames) == 4  # t=0, 1, 2, and the final frame when the flow ended
    for frame in frames[:-1]:
        # Each frame ends by moving the cursor up over itself, for the next to overwrite.
        content, up = frame.rsplit("\x1b[", 1)
        assert up == f"{content.count(chr(10))}F"
    assert "t=2.0s" in frames[2]
    final = frames[-1]
    sunk = result.metrics.operator("out").records_in
    assert re.search(rf"\nout\s+sink\s+1\s+{sunk}\s+{sunk}\s", final)
    assert final.endswith("\n\nfoot\n")
    # The last tick was a moment before the end: the final rates are over the whole run.
    title = re.search(r"t=(\d+\.\d)s  \(rates over the last (\d+\.\d)s\)", final)
    assert title is not None
    assert title.group(1) == title.group(2)
    assert all(len(line) <= 99 for line in console.strip_ansi(text).splitlines())


def test_live_view_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="interval must be a finite number > 0 seconds, got 0"):
        console.LiveView(io.StringIO(), interval=0)
    with pytest.raises(ValueError, match="width must be >= 20 columns, got 5"):
        console.LiveView(io.StringIO(), width=5)


# -- the demo flow --------------------------------------------------------------------


def _run_demo(
    seconds: float, *, rate: float = 1000.0, seed: int = 3, late: Any = None
) -> tuple[list[Any], Any]:
    out: sw.sinks.Collect[demo.WindowSummary] = sw.sinks.Collect()
    flow = demo.build_demo_flow(rate=rate, seed=seed, sink=out, late=late)

    async def stop(handle: sw.FlowHandle) -> None:
        await handle.clock.sleep(seconds)
        handle.request_stop()

    result = sw.run(flow, clock=sw.VirtualClock(), monitor=stop)
    return out.items, result


def test_demo_flow_summarises_every_second() -> None:
    late: sw.sinks.Collect[sw.LateRecord] = sw.sinks.Collect()
    summaries, result = _run_demo(3.5, late=late)
    m = result.metrics
    clicks = m.operator("clicks").records_out
    assert 3499 <= clicks <= 3500  # one per millisecond from t=0.001
    humans = m.operator("drop_bots").records_out
    assert 0.9 * clicks < humans < clicks  # about 5 % are bots
    # Three full seconds, and the partial window flushed by the graceful stop.
    assert len(summaries) == 4
    assert all(900 <= s["events"] <= 1000 for s in summaries[:3])
    # Nothing lost between the filter and the windows: every human click is in a window
    # or, more than half a second out of order, in the late output.
    assert late.items, "some clicks arrive up to 0.8 s out of order: a few are late"
    assert all(x.window_end <= x.watermark and x.lateness > 0 for x in late.items)
    assert m.operator("window_1s").late == len(late.items)
    assert sum(s["events"] for s in summaries) + len(late.items) == humans
    late_purchases = sum(x.value["action"] == "purchase" for x in late.items)
    assert (
        sum(s["purchases"] for s in summaries) + late_purchases
        == m.operator("is_purchase_true").records_out
    )
    assert sum(s["views"] + s["purchases"] for s in summaries) == humans - len(late.items)
    for s in summaries[:3]:
        assert s["purchases"] > 0
        assert s["revenue"] > 0
        assert 0 < s["users"] <= s["events"]
        counts = [count for _, count in s["top_pages"]]
        assert len(counts) == 3
        assert counts == sorted(counts, reverse=True)
        assert s["top_pages"][0][0] == "/"  # the home page is the most viewed
        assert s["start"] <= s["end"]


def test_demo_flow_is_reproducible_by_seed() -> None:
    first, _ = _run_demo(2.0, seed=5)
    again, _ = _run_demo(2.0, seed=5)
    other, _ = _run_demo(2.0, seed=6)
    assert first == again
    assert first != other


def test_demo_pieces() -> None:
    raw = list(itertools.islice(demo.generate_clicks(rate=10, seed=1, epoch=100.0), 50))
    assert raw == list(itertools.islice(demo.generate_clicks(rate=10, seed=1, epoch=100.0), 50))
    assert raw[0]["ts"] == 100.0
    assert max(c["ts"] for c in raw) <= 100.0 + 49 / 10
    clicks = [demo.enrich(r) for r in raw]
    assert {c["section"] for c in clicks} <= {"home", "search", "cart", "checkout", "product"}
    bot = demo.enrich({**raw[0], "ua": "Googlebot/2.1"})
    assert bot["is_bot"]
    summary = demo.summarize(clicks)
    assert summary["events"] == 50
    assert summary["views"] + summary["purchases"] == 50
    assert demo.summarize([])["events"] == 0
    assert demo.format_summary(summary, 2).startswith("window #2: 50 clicks, ")
    with pytest.raises(ValueError, match="demo rate must be > 0 clicks/s, got 0"):
        demo.build_demo_flow(rate=0)


def test_summary_tracker_keeps_totals_and_a_bounded_history() -> None:
    tracker = demo.SummaryTracker(keep=2)
    one = demo.summarize(
        [demo.enrich(r) for r in itertools.islice(demo.generate_clicks(rate=100, seed=2), 200)]
    )
    asyncio.run(tracker.write(sw.Batch([one, one, one])))
    assert tracker.windows == 3
    assert tracker.events == 600
    assert tracker.purchases == 3 * one["purchases"]
    assert len(tracker.recent) == 2
    assert tracker.latest == one


# -- real processes -------------------------------------------------------------------

SIGNAL_FLOW = textwrap.dedent(
    """
    import asyncio, itertools, os
    import sluiceway as sw

    DELAY = float(os.environ["SINK_DELAY"])
    started = False

    async def slow(batch):
        global started
        if not started:
            started = True
            print(f"started with {len(batch)}", flush=True)
        await asyncio.sleep(DELAY)   # user code may sleep for real

    flow = sw.Flow("endless")
    flow.source(sw.sources.Generator(itertools.count, rate=2000), name="src").buffer(
        100, name="buf").sink(sw.sinks.Function(slow, batched=True), name="out")
    """
)


def _cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sluiceway", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def _wait_for(stream: Any, text: str, timeout: float) -> str:
    """Read the pipe (unbuffered, straight from its descriptor) until ``text`` appears."""
    fd = stream.fileno()
    seen = b""
    for _ in range(1000):
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"{text!r} not seen within {timeout}s; got {seen!r}"
        chunk = os.read(fd, 4096)
        assert chunk, f"the process closed its output before {text!r}; got {seen!r}"
        seen += chunk
        if text.encode() in seen:
            break
    return seen.decode()


def _start_endless(tmp_path: Path, delay: float, *args: str) -> tuple[subprocess.Popen[str], int]:
    """Run the endless flow; returns the process and the size of the sink's first batch
    (the records a generator paced at 2,000/s had due at its first pull: 1 if the pull
    came within half a millisecond of opening it, more on a slower start)."""
    (tmp_path / "endless.py").write_text(SIGNAL_FLOW)
    proc = _cli(tmp_path, "run", "endless.py:flow", *args, env={"SINK_DELAY": str(delay)})
    assert proc.stdout is not None
    try:
        seen = _wait_for(proc.stdout, "\n", 20)
    except BaseException:
        proc.kill()
        proc.communicate(timeout=10)
        raise
    started = re.search(r"started with (\d+)", seen)
    assert started is not None, seen
    return proc, int(started.group(1))


def test_python_m_sluiceway_version(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "--version")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out.strip() == f"sluiceway {sw.__version__}"


def test_run_a_flow_file_in_a_real_process(tmp_path: Path) -> None:
    (tmp_path / "jobs.py").write_text(JOBS)
    proc = _cli(tmp_path, "run", "jobs.py:flow")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.split() == ["0", "10", "20", "30", "40"]
    assert "flow 'small' finished" in err


def test_bad_target_in_a_real_process_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "jobs.py").write_text(JOBS)
    proc = _cli(tmp_path, "run", "jobs:flw")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert out == ""
    assert (
        err == "sluiceway: error: 'jobs' has no attribute 'flw'; Flow objects in it: flow, other\n"
    )


@pytest.mark.slow
def test_demo_with_duration_in_a_real_process(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "demo", "--duration", "2", "--no-live", "--rate", "1000")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("sluiceway demo: a synthetic clickstream at 1,000 clicks/s")
    per_second = [line for line in lines if line.startswith("t=")]
    assert len(per_second) >= 1
    assert any("window #1: " in line for line in per_second)
    assert re.fullmatch(
        r"demo totals: [\d,]+ clicks in 2\.\ds \([\d,]+/s\), [\d,]+ from bots dropped, "
        r"[\d,]+ purchases, EUR [\d,.]+ revenue, [234] windows, [\d,]+ late clicks, 0 errors",
        lines[-1],
    ), lines[-1]
    clicks = int(lines[-1].split()[2].replace(",", ""))
    assert 1500 <= clicks <= 2100


@pytest.mark.slow
def test_sigint_drains_and_exits_0(tmp_path: Path) -> None:
    proc, _ = _start_endless(tmp_path, 0.001)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "SIGINT received, stopping flow 'endless'" in err
    totals = re.search(
        r"flow 'endless' stopped after [\d.]+s: ([\d,]+) records in, ([\d,]+) out", err
    )
    assert totals is not None, err
    assert totals.group(1) == totals.group(2)  # everything pulled was delivered


@pytest.mark.slow
def test_second_sigint_forces_exit_130(tmp_path: Path) -> None:
    proc, first = _start_endless(tmp_path, 30.0, "--grace-period", "60")  # minutes to drain
    assert proc.stderr is not None
    proc.send_signal(signal.SIGINT)
    _wait_for(proc.stderr, "(draining; signal again to force)\n", 20)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert (
        "sluiceway: error: flow 'endless' cancelled: second signal (SIGINT); not flushed: " in err
    )
    # The sink is stuck in its first write, of the first batch.
    assert f"in process in stage 1 (buf -> out): {first}" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_grace_period_running_out_exits_1(tmp_path: Path) -> None:
    proc, first = _start_endless(tmp_path, 30.0, "--grace-period", "0.5")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    assert "sluiceway: error: flow 'endless' cancelled: grace period of 0.5s exceeded; " in err
    assert f"in process in stage 1 (buf -> out): {first}" in err


def test_live_view_shows_a_stop_in_progress_inside_its_frame() -> None:
    clock = sw.VirtualClock()
    out = io.StringIO()

    class Slow(sw.sinks.Sink):
        async def write(self, batch: sw.Batch) -> None:
            await clock.sleep(1.0 * len(batch.values))

    flow = sw.Flow("slowdrain")
    flow.source(sw.sources.Iterable(range(5))).buffer(10).sink(Slow())
    view = console.LiveView(out, interval=1.0, live=True, width=100, color=False)

    async def main() -> None:
        handle = sw.start(flow, clock=clock, max_batch_size=1)
        watcher = asyncio.ensure_future(view(handle))
        await clock.sleep(0.5)
        handle.request_stop()
        await handle.wait()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    asyncio.run(main())
    frames = out.getvalue()
    assert "stopping: draining in-flight records (Ctrl-C again to force)" in frames


OPEN_FAILURES = """
import sluiceway as sw

missing_input = sw.Flow("reader")
missing_input.source(sw.sources.JsonLines("nope.jsonl"), name="events").sink(sw.sinks.Collect())

missing_dir = sw.Flow("writer")
out = sw.sinks.JsonLines("no/dir/out.jsonl")
missing_dir.source(sw.sources.Iterable([1])).sink(out, name="out")
"""


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (
            "missing_input",
            "sluiceway: error: source 'events' (JsonLines(nope.jsonl)) of flow 'reader' could "
            "not open: FileNotFoundError: [Errno 2] No such file or directory: 'nope.jsonl'; "
            "no file at {dir}/nope.jsonl: check the path (relative paths start at {dir})",
        ),
        (
            "missing_dir",
            "sluiceway: error: sink 'out' (JsonLines(no/dir/out.jsonl)) of flow 'writer' could "
            "not open: FileNotFoundError: [Errno 2] No such file or directory: "
            "'no/dir/out.jsonl'; the directory {dir}/no/dir does not exist: create it, or fix "
            "the path",
        ),
    ],
)
def test_a_connector_that_cannot_open_is_one_error_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], target: str, expected: str
) -> None:
    (workdir / "opens.py").write_text(OPEN_FAILURES)
    code, _, err = run_cli(["run", f"opens.py:{target}", "--no-live"], capsys)
    assert code == 1
    assert err.splitlines() == [expected.format(dir=os.getcwd())]
