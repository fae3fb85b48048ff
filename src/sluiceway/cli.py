"""The ``sluiceway`` command: ``run`` a flow from a module or file, or ``demo``.

::

    sluiceway run myjob.flows:flow             # a module on the path (the current directory is)
    sluiceway run path/to/job.py:build_flow    # a file; a Flow or a function returning one
    sluiceway run myjob.flows:flow --describe  # print the physical plan and exit
    sluiceway demo --duration 30 --rate 5000   # a synthetic clickstream, live in the terminal
    sluiceway run myjob.flows:flow --metrics-port 9100  # Prometheus metrics at :9100/metrics
    sluiceway run myjob.flows:flow --workers 4 # 4 worker processes (Kafka group), stopped together
    sluiceway demo --ui-port 8080              # the web view: the graph, live, at :8080
    sluiceway checkpoints list DIR             # the checkpoints in DIR (also inspect, reset)

Exit codes: 0 the flow ended or stopped gracefully; 1 the flow failed, is not valid, was
cancelled at the end of its grace period, or its code raised while loading; 2 the command
line is wrong (bad option, target not found, not a Flow); 128 + N when a second signal N
forced the stop (130 for a second Ctrl-C).

This is the one module that wires a process together: it loads user code, chooses the
monitors, runs the flow with :func:`sluiceway.run` (which handles SIGINT and SIGTERM: the
first drains, a second forces) and turns every ending into one clear line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import importlib
import importlib.util
import inspect
import logging
import os
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import sluiceway as sw
from sluiceway.checkpoint.cli import add_checkpoints_command
from sluiceway.console import LiveView, format_count, say
from sluiceway.errors import CliError
from sluiceway.plan import plan as make_plan
from sluiceway.runtime.handle import hold_signals, take_held_signals
from sluiceway.scaleout.checks import (
    check_layout,
    check_scalable,
    check_tasks,
    keyed_state,
    runs_as_tasks,
)
from sluiceway.scaleout.supervisor import WorkerCommand, supervise, watch_supervisor
from sluiceway.scaleout.worker import ENV_SUPERVISOR_FD, worker_id

if TYPE_CHECKING:  # a worker of tasks needs Kafka: imported where one runs
    from sluiceway.scaleout.live import TaskLiveView
    from sluiceway.scaleout.repartition import StagedTasks
    from sluiceway.scaleout.tasks import TaskManager, TaskWorker

__all__ = ["CliError", "build_parser", "load_flow", "main"]

_PACKAGE_DIR = Path(sw.__file__).resolve().parent
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_EXIT_FAILED = 1
_EXIT_USAGE = 2
_EXIT_INTERRUPTED = 130
_MAX_PORT = 65535

log = logging.getLogger("sluiceway.cli")


# -- argument parsing -----------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds >= 0, got {text!r}"
        ) from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535, got {text!r}") from None
    if not 0 <= value <= _MAX_PORT:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535, got {text!r}")
    return value


def _log_level(text: str) -> str:
    level = text.lower()
    if level not in _LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(_LOG_LEVELS)}, got {text!r}")
    return level


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sluiceway`` command."""
    parser = argparse.ArgumentParser(
        prog="sluiceway",
        description="sluiceway: run stream-processing flows from the command line.",
        epilog="Run `sluiceway COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"sluiceway {sw.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--grace-period",
        type=_non_negative_float,
        default=10.0,
        metavar="S",
        help="seconds a stop (Ctrl-C, SIGTERM) may take to drain before the flow is "
        "cancelled (default: %(default)g)",
    )
    common.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=1024,
        metavar="N",
        help="the most records a source is asked for at once (default: %(default)d)",
    )
    common.add_argument(
        "--log-level",
        type=_log_level,
        default="warning",
        metavar="LEVEL",
        help=f"one of {', '.join(_LOG_LEVELS)} (default: %(default)s); "
        "debug also prints tracebacks",
    )

    metrics = argparse.ArgumentParser(add_help=False)
    metrics.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics while the flow "
        "runs (0: any free port; needs `pip install 'sluiceway[prometheus]'`)",
    )
    metrics.add_argument(
        "--ui-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve the web view (the flow's graph with live numbers) at "
        "http://127.0.0.1:PORT/ while the flow runs (0: any free port)",
    )

    run = commands.add_parser(
        "run",
        parents=[common, metrics],
        help="run a flow until its sources end or Ctrl-C",
        description="Run a flow until its sources end, or until SIGINT/SIGTERM (the first "
        "drains in-flight records within the grace period, a second forces the stop).",
    )
    run.add_argument(
        "target",
        metavar="TARGET",
        help="MODULE:ATTR or path/to/file.py:ATTR, where ATTR is a sw.Flow or a function "
        "with no arguments returning one (the current directory is importable)",
    )
    run.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="show a live table of operator and channel metrics on stderr, refreshed "
        "every second (default: off, so the flow's own output stays readable)",
    )
    run.add_argument(
        "--describe",
        action="store_true",
        help="print the physical plan (stages, fused operators, channels) and exit",
    )
    run.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        default=None,
        help="take checkpoints into DIR and, if DIR holds one of this flow, start from the "
        "latest (exactly-once state; a stop then ends at a checkpoint instead of draining)",
    )
    run.add_argument(
        "--checkpoint-interval",
        type=_positive_float,
        default=None,
        metavar="S",
        help="seconds between checkpoints (default: 5; needs --checkpoint-dir, except for "
        "a worker of a stateless flow whose sinks are all exactly-once Kafka sinks: the "
        "seconds between its transactions)",
    )
    run.add_argument(
        "--purge-interval",
        type=_non_negative_float,
        default=30.0,
        metavar="S",
        help="a worker of a flow that repartitions through Kafka: the least seconds "
        "between two deletions of the records of the repartition topics its tasks have "
        "checkpointed (default: 30; 0: after every checkpoint)",
    )
    run.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="start N worker processes of the flow on this machine (the same as starting "
        "it N times), each with SLUICEWAY_WORKER_ID 0..N-1; its sources must split records "
        "between readers (a Kafka group, a RabbitMQ queue); --metrics-port P serves worker "
        "i at P+i; Ctrl-C stops them together (default: 1, no extra process)",
    )
    run.set_defaults(handler=_cmd_run)

    graph = commands.add_parser(
        "graph",
        help="print a flow's graph (Mermaid or Graphviz DOT) and exit",
        description="Print the flow's graph without running it: operators (name, kind), "
        "one subgraph per fused stage, channels labelled with capacity and overflow policy, "
        "side outputs (branch ports, late records) labelled.",
    )
    graph.add_argument(
        "target",
        metavar="TARGET",
        help="MODULE:ATTR or path/to/file.py:ATTR, as for `sluiceway run`",
    )
    graph.add_argument(
        "--format",
        choices=("mermaid", "dot"),
        default="mermaid",
        help="mermaid (a flowchart for Markdown) or dot (for Graphviz: "
        "`| dot -Tsvg > flow.svg`) (default: %(default)s)",
    )
    graph.add_argument(
        "--log-level",
        type=_log_level,
        default="warning",
        metavar="LEVEL",
        help=f"one of {', '.join(_LOG_LEVELS)} (default: %(default)s); "
        "debug also prints tracebacks",
    )
    graph.set_defaults(handler=_cmd_graph)

    demo = commands.add_parser(
        "demo",
        parents=[common, metrics],
        help="run a synthetic clickstream demo, no servers needed",
        description="A synthetic clickstream: clicks are parsed, bots filtered, purchases "
        "priced, and every second summarised (top pages, purchases, revenue).",
    )
    demo.add_argument(
        "--duration",
        type=_non_negative_float,
        default=0.0,
        metavar="S",
        help="stop gracefully after S seconds (default: 0, run until Ctrl-C)",
    )
    demo.add_argument(
        "--rate",
        type=_positive_float,
        default=2000.0,
        metavar="R",
        help="clicks per second (default: %(default)g)",
    )
    demo.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="redraw a live table every second (default: when stdout is a terminal); "
        "--no-live prints one plain line per second",
    )
    demo.add_argument(
        "--seed", type=int, default=42, metavar="N", help="seeds the clicks (default: 42)"
    )
    demo.set_defaults(handler=_cmd_demo)

    # `checkpoints list|inspect|reset DIR` (sluiceway.checkpoint.cli, imported one way only)
    add_checkpoints_command(commands, log_level=_log_level)
    return parser


# -- loading a target -----------------------------------------------------------------


def load_flow(target: str) -> sw.Flow:
    """The flow named by ``MODULE:ATTR`` or ``path/to/file.py:ATTR``.

    ``ATTR`` (dots allowed: ``jobs.daily``) is a :class:`~sluiceway.Flow`, or a callable
    taking no arguments that returns one.  The current directory is put on ``sys.path``
    first, as ``python -m`` does; for a file, its directory too, as ``python file.py`` does.

    Raises:
        CliError: with exit code 2 when the target cannot be found or is not a flow, and 1
            when the user's code raised while importing or building the flow.
    """
    where, colon, attr = target.rpartition(":")
    if not colon or not where or not attr:
        raise CliError(
            f"target {target!r} must be MODULE:ATTR or path/to/file.py:ATTR "
            "(e.g. myjob.flows:flow)",
            _EXIT_USAGE,
        )
    _put_on_path(os.getcwd())
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    module = _import_file(where) if is_file else _import_module(where)
    return _as_flow(_resolve(module, where, attr), f"{where}:{attr}")


def _put_on_path(directory: str) -> None:
    if directory not in sys.path:
        sys.path.insert(0, directory)


def _import_module(name: str) -> ModuleType:
    if not all(part.isidentifier() for part in name.split(".")):
        raise CliError(
            f"{name!r} is not a module name; give a dotted module (myjob.flows) or a file "
            "ending in .py (path/to/job.py)",
            _EXIT_USAGE,
        )
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise CliError(
                f"no module named {name!r} (looked in {os.getcwd()} and sys.path); run from "
                "the directory that contains it, or give a file: path/to/file.py:ATTR",
                _EXIT_USAGE,
            ) from exc
        raise _user_code_error(f"importing module {name!r} failed", exc) from exc
    except Exception as exc:
        raise _user_code_error(f"importing module {name!r} failed", exc) from exc


def _import_file(where: str) -> ModuleType:
    path = Path(where).expanduser()
    if not path.is_file():
        hint = f" (resolved to {path.resolve()})" if not path.is_absolute() else ""
        what = "is a directory, not a .py file" if path.is_dir() else "not found"
        raise CliError(f"file {where!r} {what}{hint}", _EXIT_USAGE)
    path = path.resolve()
    _put_on_path(str(path.parent))
    name = path.stem if path.stem.isidentifier() else "sluiceway_target"
    if name in sys.modules:
        loaded = sys.modules[name]
        if getattr(loaded, "__file__", None) == str(path):
            return loaded
        name = f"sluiceway_target_{path.stem if path.stem.isidentifier() else 'file'}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py path always has one
        raise CliError(f"cannot load {where!r} as a Python file", _EXIT_USAGE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would, so dataclasses and pickling work
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[name]
        if isinstance(exc, Exception):
            raise _user_code_error(f"importing {where!r} failed", exc) from exc
        raise
    return module


def _resolve(module: ModuleType, label: str, attr: str) -> object:
    value: object = module
    walked: list[str] = []
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            if walked:
                owner = f"{label}:{'.'.join(walked)}"
                raise CliError(f"{owner!r} has no attribute {part!r}", _EXIT_USAGE) from None
            raise CliError(
                f"{label!r} has no attribute {part!r}; {_flows_in(module, label)}", _EXIT_USAGE
            ) from None
        walked.append(part)
    return value


def _flows_in(module: ModuleType, label: str) -> str:
    names = sorted(k for k, v in vars(module).items() if isinstance(v, sw.Flow))
    if names:
        return f"Flow objects in it: {', '.join(names)}"
    return (
        f"{label!r} defines no Flow at module level: define one "
        "(flow = sw.Flow(...)) or name a function that returns one"
    )


def _as_flow(value: object, target: str) -> sw.Flow:
    if isinstance(value, sw.Flow):
        return value
    if not callable(value):
        raise CliError(
            f"{target!r} is {_kind(value)}, not a sw.Flow or a function returning one",
            _EXIT_USAGE,
        )
    required = _required_parameters(value)
    if required:
        raise CliError(
            f"{target!r} needs arguments ({', '.join(required)}); name a Flow or a function "
            "that can be called with no arguments",
            _EXIT_USAGE,
        )
    try:
        made = value()
    except sw.FlowDefinitionError as exc:
        raise CliError(f"{target}() built an invalid flow: {exc}", _EXIT_FAILED) from exc
    except Exception as exc:
        raise _user_code_error(f"calling {target}() failed", exc) from exc
    if inspect.isawaitable(made):
        if inspect.iscoroutine(made):
            made.close()  # never awaited on purpose: say so instead of warning
        raise CliError(
            f"{target!r} is an async function; it must be a plain function returning a sw.Flow",
            _EXIT_USAGE,
        )
    if not isinstance(made, sw.Flow):
        raise CliError(
            f"{target}() returned {_kind(made)}, not a sw.Flow; return the flow you built",
            _EXIT_USAGE,
        )
    return made


def _required_parameters(fn: Any) -> list[str]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: just call them
        return []
    return [
        p.name
        for p in sig.parameters.values()
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _kind(value: object) -> str:
    if inspect.ismodule(value):
        return f"a module ({value.__name__})"
    if isinstance(value, type):
        return f"a class ({value.__name__})"
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{article} {name} ({text})"


def _user_code_error(what: str, exc: BaseException) -> CliError:
    return CliError(f"{what}: {_describe_exception(exc)}", _EXIT_FAILED)


def _describe_exception(exc: BaseException) -> str:
    """``Type: message (at file.py:12 in fn)``, on one line."""
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    head = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    where = _where(exc)
    return f"{head} (at {where})" if where and not isinstance(exc, SyntaxError) else head


def _where(exc: BaseException) -> str | None:
    """``file.py:12 in fn``: the innermost frame outside sluiceway (else the innermost)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    outside = [f for f in frames if not _in_sluiceway(f.filename)]
    frame = (outside or frames)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"


def _in_sluiceway(filename: str) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE_DIR)
    except OSError:  # pragma: no cover - odd pseudo-filenames
        return False


def _cause_chain(exc: BaseException) -> str | None:
    """``caused by KeyError: 'amount' (at jobs.py:7 in parse)``, following __cause__."""
    parts: list[str] = []
    seen = {id(exc)}
    cause = _next_cause(exc)
    while cause is not None and id(cause) not in seen and len(parts) < 3:
        seen.add(id(cause))
        parts.append(_describe_exception(cause))
        cause = _next_cause(cause)
    return "caused by " + " <- ".join(parts) if parts else None


def _next_cause(exc: BaseException) -> BaseException | None:
    if exc.__cause__ is not None:
        return exc.__cause__
    return None if exc.__suppress_context__ else exc.__context__


# -- running --------------------------------------------------------------------------


def _together(*monitors: sw.Monitor) -> sw.Monitor:
    """One monitor that runs several side by side (all cancelled when the flow ends)."""

    async def run_all(handle: sw.FlowHandle) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                for monitor in monitors:
                    tg.create_task(_awaited(monitor(handle)))
        except BaseExceptionGroup as group:
            first = _first_error(group)
            raise first from first.__cause__  # the monitor's own error, not the group

    return run_all


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real error in a task group's exceptions (a monitor's own, unwrapped)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group.exceptions[0]


async def _awaited(awaitable: Awaitable[None]) -> None:
    await awaitable


def _stop_after(seconds: float) -> sw.Monitor:
    """A monitor that requests a graceful stop after ``seconds`` of the flow's clock."""

    async def stop(handle: sw.FlowHandle) -> None:
        await handle.clock.sleep(seconds)
        log.info("stopping flow %r after %gs (--duration)", handle.flow.name, seconds)
        handle.request_stop()

    return stop


def _metrics_exporter(port: int | None) -> sw.Monitor | None:
    """The Prometheus exporter of ``--metrics-port`` (None without the option)."""
    if port is None:
        return None
    try:
        from sluiceway.metrics.prometheus import (  # noqa: PLC0415 - an optional extra
            PrometheusExporter,
        )
    except ModuleNotFoundError as exc:
        raise CliError(
            "--metrics-port needs prometheus-client: pip install 'sluiceway[prometheus]'",
            _EXIT_USAGE,
        ) from exc
    wid = worker_id()
    exporter = PrometheusExporter(port, worker=wid)

    async def announce() -> None:
        await exporter.wait_serving()
        _say(f"Prometheus metrics at {exporter.url}")

    async def serve(handle: sw.FlowHandle) -> None:
        try:
            if wid is None:
                await exporter(handle)
                return
            async with asyncio.TaskGroup() as tg:  # a worker says where it serves
                tg.create_task(exporter(handle))
                tg.create_task(announce())
        except OSError as exc:  # binding failed (port in use, no permission)
            raise CliError(f"--metrics-port {port}: {exc}", _EXIT_USAGE) from exc
        except BaseExceptionGroup as group:
            first = _first_error(group)
            if isinstance(first, OSError):
                raise CliError(f"--metrics-port {port}: {first}", _EXIT_USAGE) from first
            raise first from first.__cause__

    return serve


def _with_web_view(port: int | None, inner: sw.Monitor | None) -> sw.Monitor | None:
    """``inner`` beside the web view of ``--ui-port`` (``inner`` alone without the option).

    The view binds first and its URL is printed on stderr before ``inner`` starts, so
    the line comes before a live table's first frame.
    """
    if port is None:
        return inner
    from sluiceway.metrics.web import WebView  # noqa: PLC0415 - only --ui-port needs it

    view = WebView(port)

    async def serve(handle: sw.FlowHandle) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(view(handle))
                await view.wait_serving()
                print(f"sluiceway: web view at {view.url}", file=sys.stderr, flush=True)
                if inner is not None:
                    await inner(handle)
        except BaseExceptionGroup as group:
            first = _first_error(group)
            if isinstance(first, OSError):  # binding failed (port in use, no permission)
                raise CliError(f"--ui-port {port}: {first}", _EXIT_USAGE) from first
            raise first from first.__cause__

    return serve


def _run_flow(
    flow: sw.Flow,
    args: argparse.Namespace,
    monitor: sw.Monitor | None,
    *,
    live_table: bool = False,
    checkpoints: sw.Checkpoints | None = None,
) -> sw.RunResult:
    """``sw.run`` with every ending turned into a :class:`CliError` with its exit code.

    With a live table on the terminal, the table shows a stop in progress itself (a
    notice printed beside it would break its in-place redraw).
    """
    try:
        return sw.run(
            flow,
            grace_period=args.grace_period,
            max_batch_size=args.max_batch_size,
            monitor=monitor,
            announce_signals=not live_table,
            checkpoints=checkpoints,
        )
    except sw.FlowDefinitionError as exc:
        raise CliError(f"invalid flow: {exc}", _EXIT_FAILED) from exc
    except sw.CheckpointError as exc:
        raise CliError(str(exc), _EXIT_FAILED) from exc
    except sw.ConnectorOpenError as exc:  # the message already holds the cause and the fix
        raise CliError(str(exc), _EXIT_FAILED) from exc
    except sw.FlowFailedError as exc:
        raise CliError(str(exc), _EXIT_FAILED, _cause_chain(exc)) from exc
    except sw.FlowCancelledError as exc:
        raise CliError(str(exc), _cancelled_exit_code(exc)) from exc


def _cancelled_exit_code(exc: sw.FlowCancelledError) -> int:
    # A second signal N is an interruption (128 + N); anything else (the grace period
    # ran out, a failing monitor) means records were not flushed: a failure.
    if exc.reason is sw.CancelReason.SIGNAL and exc.signal is not None:
        return 128 + exc.signal.value
    return _EXIT_FAILED


def _totals(result: sw.RunResult) -> str:
    ops = result.metrics.operators
    produced = sum(o.records_out for o in ops if o.kind == "source")
    delivered = sum(o.records_in for o in ops if o.kind == "sink")
    errors = sum(o.errors for o in ops)
    dead = sum(o.dead_letters for o in ops)
    dropped = sum(c.records_dropped for c in result.metrics.channels)
    how = "stopped" if result.stopped else "finished"
    ck = result.checkpoints
    if ck is not None:
        if ck.restored_from is not None:
            how = f"restored from checkpoint {ck.restored_from}, {how}"
        if ck.last_id is not None:
            how += f" at checkpoint {ck.last_id}" if result.stopped else ""
    return (
        f"flow {result.flow!r} {how} after {result.elapsed:.1f}s: "
        f"{format_count(produced)} records in, {format_count(delivered)} out, "
        f"{format_count(errors)} errors, {format_count(dead)} dead letters, "
        f"{format_count(dropped)} dropped"
    )


def _worker_commands(args: argparse.Namespace) -> list[WorkerCommand]:
    """The command lines of ``--workers N``: this ``run`` without ``--workers``, worker
    ``i`` serving metrics and the web view at the given ports + ``i`` (0 stays 0)."""
    commands = []
    for i in range(args.workers):
        argv = [
            "-m",
            "sluiceway",
            "run",
            args.target,
            "--grace-period",
            repr(args.grace_period),
            "--max-batch-size",
            str(args.max_batch_size),
            "--log-level",
            args.log_level,
        ]
        for flag, port in (("--metrics-port", args.metrics_port), ("--ui-port", args.ui_port)):
            if port is not None:
                argv += [flag, str(port + i if port else 0)]
        if args.checkpoint_dir is not None:  # keyed flows: every task's checkpoints
            argv += ["--checkpoint-dir", args.checkpoint_dir]
        if args.checkpoint_interval is not None:
            argv += ["--checkpoint-interval", repr(args.checkpoint_interval)]
        commands.append(WorkerCommand(i, tuple(argv)))
    return commands


def _run_workers(flow: sw.Flow, args: argparse.Namespace) -> int:
    """``--workers N``: check the flow can be split, then start and supervise N workers."""
    if args.live:
        raise CliError(
            "--live draws the table of one process; with --workers use --metrics-port "
            "(worker i serves at PORT+i) or --ui-port",
            _EXIT_USAGE,
        )
    for flag, port in (("--metrics-port", args.metrics_port), ("--ui-port", args.ui_port)):
        if port and port + args.workers - 1 > _MAX_PORT:
            raise CliError(
                f"{flag} {port} with --workers {args.workers} needs ports up to "
                f"{port + args.workers - 1}, past {_MAX_PORT}; choose a lower port or 0",
                _EXIT_USAGE,
            )
    try:
        tasks = check_scalable(flow, args.workers, checkpoint_dir=args.checkpoint_dir is not None)
        if tasks and args.checkpoint_dir is not None:
            check_layout(args.checkpoint_dir, tasks=True)
    except (sw.FlowDefinitionError, sw.CheckpointError) as exc:  # PG unreachable
        raise CliError(
            f"cannot run {args.target} on {args.workers} workers: {exc}", _EXIT_FAILED
        ) from exc
    # (a stateless exactly-once flow's tasks take the interval of their transactions)
    if args.checkpoint_interval is not None and args.checkpoint_dir is None and not tasks:
        raise CliError("--checkpoint-interval needs --checkpoint-dir DIR", _EXIT_USAGE)
    return supervise(_worker_commands(args))


async def _task_server(
    manager: TaskWorker, flag: str, port: int, say: Callable[[str], None]
) -> None:
    """Serve this worker's Prometheus metrics (``flag`` --metrics-port) or web view
    (--ui-port) at ``port``, for every task it runs (``say``: where the URL is told)."""
    if flag == "--ui-port":
        from sluiceway.scaleout.web import TaskWebView  # noqa: PLC0415 - only --ui-port

        server: Any = TaskWebView(manager, port, worker=worker_id())
        what = "web view"
    else:
        try:
            from sluiceway.scaleout.metrics import TaskExporter  # noqa: PLC0415 - an extra
        except ModuleNotFoundError as exc:
            raise CliError(
                "--metrics-port needs prometheus-client: pip install 'sluiceway[prometheus]'",
                _EXIT_USAGE,
            ) from exc
        server = TaskExporter(manager, port, worker=worker_id())
        what = "Prometheus metrics"
    serving = asyncio.ensure_future(server.serve())
    bound = asyncio.ensure_future(server.wait_serving())
    try:
        # serve() fails without ever serving when the port cannot be bound
        await asyncio.wait({serving, bound}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            say(f"{what} at {server.url}")
        await serving
    except OSError as exc:
        raise CliError(f"{flag} {port}: {exc}", _EXIT_USAGE) from exc
    finally:
        for f in (serving, bound):
            f.cancel()
        await asyncio.gather(serving, bound, return_exceptions=True)


async def _tasks_main(
    manager: TaskManager | StagedTasks,
    ports: dict[str, int],
    forced: list[int],
    view: TaskLiveView | None = None,
) -> Any:
    """Run the task manager with SIGINT/SIGTERM handled (the first stops the tasks at a
    checkpoint, a second, recorded in ``forced``, cancels them), the metrics and the web
    view served (``ports``: by flag) and the live view (``view``, --live) drawn."""
    loop = asyncio.get_running_loop()
    # Every task keeps a Kafka fetch in a worker thread, and the membership consumer's
    # poll waits in one through a revoke: the default pool (cores + 4 threads) would make
    # the tasks of a worker owning many partitions queue for threads.  Threads start
    # lazily; 128 is a bound, not a cost.
    loop.set_default_executor(
        concurrent.futures.ThreadPoolExecutor(max_workers=128, thread_name_prefix="sluiceway")
    )
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            manager.request_stop()  # first: nothing said after it can keep it from happening
            if view is None:
                _say(f"stopping the tasks at a checkpoint ({signal.Signals(signum).name})")
            else:  # in the frame, which the line would push out of place
                view.stopping = True
        else:
            forced.append(signum)
            manager.force_stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    for held in take_held_signals():  # received while the worker was loading the flow
        on_signal(held)
    drawing = None if view is None else asyncio.ensure_future(view(manager))
    try:
        if not ports:
            return await manager.run()
        say = _say if view is None else (lambda text: view.say(f"{_me()}: {text}"))
        servers = [
            asyncio.ensure_future(_task_server(manager, f, p, say)) for f, p in ports.items()
        ]
        running = asyncio.ensure_future(manager.run())
        try:
            await asyncio.wait({*servers, running}, return_when=asyncio.FIRST_COMPLETED)
            failed = [s for s in servers if s.done()]
            if failed and not running.done():  # binding failed
                manager.force_stop()
                await asyncio.gather(running, return_exceptions=True)
                failed[0].result()
            return await running
        finally:
            for s in servers:
                s.cancel()
            await asyncio.gather(*servers, return_exceptions=True)
    finally:
        if drawing is not None:  # a last frame, with the tasks as they ended
            drawing.cancel()
            await asyncio.gather(drawing, return_exceptions=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _run_tasks(flow: sw.Flow, args: argparse.Namespace) -> int:
    """A worker of a keyed flow: one task per owned Kafka partition, each the flow itself
    with its own checkpoints in ``--checkpoint-dir``/tasks/p<p> (``sluiceway.scaleout.tasks``);
    with a task manager per stage of a flow that repartitions through Kafka (tasks
    ``s<n>-p<p>`` too, ``sluiceway.scaleout.repartition``).  --metrics-port, --ui-port and
    --live show every task of every stage (``sluiceway.scaleout.metrics``, ``.web``, ``.live``).
    A stateless exactly-once flow runs as the same tasks, without a checkpoint directory."""
    try:
        check_tasks(flow, checkpoint_dir=args.checkpoint_dir is not None)
        if args.checkpoint_dir is not None:
            check_layout(args.checkpoint_dir, tasks=True)
    except (sw.FlowDefinitionError, sw.CheckpointError) as exc:  # PG unreachable
        raise CliError(f"cannot run {args.target} as a worker: {exc}", _EXIT_FAILED) from exc
    from sluiceway.scaleout.live import TaskLiveView  # noqa: PLC0415 - a worker of tasks
    from sluiceway.scaleout.repartition import StagedTasks, stages  # noqa: PLC0415 - needs Kafka
    from sluiceway.scaleout.tasks import TaskManager, TaskSpec  # noqa: PLC0415 - needs Kafka

    interval = 5.0 if args.checkpoint_interval is None else args.checkpoint_interval
    spec = TaskSpec(
        args.checkpoint_dir,
        checkpoint_interval=interval,
        grace_period=args.grace_period,
        max_batch_size=args.max_batch_size,
        purge_interval=args.purge_interval,
    )
    ports = {
        flag: port
        for flag, port in (("--metrics-port", args.metrics_port), ("--ui-port", args.ui_port))
        if port is not None
    }
    # repartitions through Kafka (for keyed state only): a task manager per stage
    staged = bool(keyed_state(flow)) and len(stages(flow)) > 1
    # --live: the worker's tasks in a table on stderr; its own lines scroll above it
    view = TaskLiveView(sys.stderr, worker=worker_id()) if args.live else None
    say = _say if view is None else (lambda text: view.say(f"{_me()}: {text}"))
    manager: TaskManager | StagedTasks
    if staged:
        manager = StagedTasks(flow, spec, on_task=lambda event, name: say(f"task {name} {event}"))
    else:
        manager = TaskManager(flow, spec, on_task=lambda event, p: say(f"task p{p} {event}"))
    forced: list[int] = []
    try:
        results = asyncio.run(_tasks_main(manager, ports, forced, view))
    except sw.FlowDefinitionError as exc:
        raise CliError(f"invalid flow: {exc}", _EXIT_FAILED) from exc
    except sw.FlowCancelledError as exc:
        code = 128 + forced[0] if forced else _EXIT_FAILED
        raise CliError(str(exc), code) from exc
    except (sw.CheckpointError, sw.ConnectorOpenError) as exc:
        raise CliError(str(exc), _EXIT_FAILED) from exc
    except sw.SluicewayError as exc:
        raise CliError(str(exc), _EXIT_FAILED, _cause_chain(exc)) from exc
    if forced:
        return 128 + forced[0]
    for p, result in sorted(results.items()):
        _say(f"task {p if isinstance(p, str) else f'p{p}'}: {_totals(result)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    flow = load_flow(args.target)
    if args.describe:
        try:
            print(make_plan(flow).describe())
        except sw.FlowDefinitionError as exc:
            raise CliError(f"invalid flow: {exc}", _EXIT_FAILED) from exc
        return 0
    if args.workers > 1:
        return _run_workers(flow, args)
    watch_supervisor()  # a worker of --workers: stop when the supervisor is gone
    if worker_id() is not None and runs_as_tasks(flow):
        return _run_tasks(flow, args)
    monitors: list[sw.Monitor] = []
    if args.live:
        monitors.append(LiveView(sys.stderr, interval=1.0, live=True))
    exporter = _metrics_exporter(args.metrics_port)
    if exporter is not None:
        monitors.append(exporter)
    monitor = _with_web_view(args.ui_port, _together(*monitors) if monitors else None)
    checkpoints = None
    if args.checkpoint_dir is not None:
        try:
            check_layout(args.checkpoint_dir, tasks=False)
        except (sw.FlowDefinitionError, sw.CheckpointError) as exc:  # PG unreachable
            raise CliError(f"cannot run {args.target}: {exc}", _EXIT_FAILED) from exc
        interval = 5.0 if args.checkpoint_interval is None else args.checkpoint_interval
        checkpoints = sw.Checkpoints(args.checkpoint_dir, interval=interval)
    elif args.checkpoint_interval is not None:
        raise CliError("--checkpoint-interval needs --checkpoint-dir DIR", _EXIT_USAGE)
    result = _run_flow(flow, args, monitor, live_table=bool(args.live), checkpoints=checkpoints)
    _say(_totals(result))
    return 0


def _cmd_graph(args: argparse.Namespace) -> int:
    from sluiceway.graph import render  # noqa: PLC0415 - only the graph command needs it

    flow = load_flow(args.target)
    try:
        print(render(flow, args.format))
    except sw.FlowDefinitionError as exc:
        raise CliError(f"invalid flow: {exc}", _EXIT_FAILED) from exc
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sluiceway import demo  # noqa: PLC0415 - only the demo command needs it

    out: TextIO = sys.stdout
    live = out.isatty() if args.live is None else args.live
    exporter = _metrics_exporter(args.metrics_port)
    # Event time starts now on the wall clock (read through the injected clock).
    tracker = demo.SummaryTracker()
    late = demo.LateCounter()
    flow = demo.build_demo_flow(
        rate=args.rate, seed=args.seed, sink=tracker, epoch=sw.SystemClock().time(), late=late
    )

    def latest() -> str | None:
        summary = tracker.latest
        if summary is None:
            return "waiting for the first window..."
        label = "latest " if live else ""
        return label + demo.format_summary(summary, tracker.windows)

    until = f"for {args.duration:g}s" if args.duration else "until Ctrl-C"
    print(
        f"sluiceway demo: a synthetic clickstream at {args.rate:,.0f} clicks/s "
        f"(seed {args.seed}), {until}",
        file=out,
        flush=True,
    )
    monitors: list[sw.Monitor] = [LiveView(out, interval=1.0, live=live, footer=latest)]
    if args.duration:
        monitors.append(_stop_after(args.duration))
    if exporter is not None:
        monitors.append(exporter)
    monitor = _with_web_view(args.ui_port, _together(*monitors))
    result = _run_flow(flow, args, monitor, live_table=live)

    m = result.metrics
    clicks = m.operator("clicks").records_out
    bots = m.operator("drop_bots").records_in - m.operator("drop_bots").records_out
    seconds = max(result.elapsed, 1e-9)
    print(
        f"demo totals: {format_count(clicks)} clicks in {result.elapsed:.1f}s "
        f"({clicks / seconds:,.0f}/s), {format_count(bots)} from bots dropped, "
        f"{format_count(tracker.purchases)} purchases, EUR {tracker.revenue:,.2f} revenue, "
        f"{format_count(tracker.windows)} windows, {format_count(late.count)} late clicks, "
        f"{format_count(sum(o.errors for o in m.operators))} errors",
        file=out,
        flush=True,
    )
    return 0


# -- entry point ----------------------------------------------------------------------


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _me() -> str:
    """How this process signs its messages: ``sluiceway``, or ``sluiceway[worker 1]`` in
    a worker of ``--workers`` (their lines share one terminal)."""
    wid = worker_id()
    return "sluiceway" if wid is None else f"sluiceway[worker {wid}]"


def _say(text: str) -> None:
    """One line on stderr, signed, in one write (the lines of several workers share a
    terminal: a line must not be cut by another's)."""
    say(f"{_me()}: {text}")


def _fail(parser: argparse.ArgumentParser) -> NoReturn:
    parser.print_help(sys.stderr)
    raise SystemExit(_EXIT_USAGE)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sluiceway`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns the exit code.  ``--help``, ``--version`` and bad options exit through
    :class:`SystemExit`, as argparse does.
    """
    if os.environ.get(ENV_SUPERVISOR_FD):
        # A worker of --workers: the supervisor may forward a Ctrl-C while this process
        # still loads the flow; the flow then stops at once, gracefully.
        hold_signals()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        _fail(parser)
    _configure_logging(args.log_level)
    debug = args.log_level == "debug"
    try:
        code: int = args.handler(args)
    except CliError as exc:
        if debug and (exc.__cause__ is not None):
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        _say(f"error: {exc}")
        if exc.detail:
            _say(exc.detail)
        return exc.code
    except KeyboardInterrupt:  # Ctrl-C while loading, before sw.run handles signals
        print("sluiceway: interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `sluiceway demo --no-live | head`: the reader left
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return _EXIT_FAILED
    return code


if __name__ == "__main__":
    raise SystemExit(main())
