"""Helpers shared by the benchmark modules: records, /proc readings, child processes.

Every measurement runs in a fresh child process (``python benchmarks/<module>.py
<entry> '<json params>'``) that prints one JSON object as its last line of stdout, so
one workload's garbage, heap growth or GC state never leaks into another's figures.

File names deliberately avoid pytest's ``test_*.py`` / ``*_test.py`` patterns.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "HERE",
    "Params",
    "Result",
    "Row",
    "child_main",
    "fmt_int",
    "make_record",
    "module_main",
    "percentile",
    "proc_status_kb",
    "render_table",
    "reset_peak_rss",
    "run_child",
]

HERE = Path(__file__).resolve().parent

Params = dict[str, Any]
Result = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the results table."""

    workload: str
    system: str
    result: str
    ratio: str = ""
    target: str = ""
    status: str = ""  # "PASS", "FAIL" or "" (a baseline, nothing to pass)


def make_record(i: int) -> dict[str, Any]:
    """The record every workload uses: ``{"id", "user", "amount"}``.

    ``amount`` cycles through 0.0 .. 19.9, so ``amount * 1.1 > 10`` keeps 54.5 % of them.
    """
    return {"id": i, "user": f"user{i % 1000}", "amount": (i % 200) / 10.0}


def proc_status_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``: now, ``VmHWM``: peak so far)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current ``VmRSS`` (Linux >= 4.0); False if not possible.

    Lets a child measure the peak of one phase (a run) after an earlier, larger one
    (building its input data).
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def fmt_int(n: float) -> str:
    """``1234567`` -> ``1,234,567``."""
    return f"{round(n):,}"


def run_child(module: str, entry: str, params: Params, *, timeout: float = 600.0) -> Result:
    """Run ``entry`` of ``benchmarks/<module>.py`` in a fresh interpreter; its JSON result."""
    cmd = [sys.executable, str(HERE / f"{module}.py"), entry, json.dumps(params)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"benchmark child {module}.{entry} failed (exit {proc.returncode}):\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    result: Result = json.loads(lines[-1])
    return result


def child_main(entries: dict[str, Callable[[Params], Result]]) -> None:
    """The ``__main__`` of a benchmark module: run one entry, print its JSON result."""
    if len(sys.argv) != 3 or sys.argv[1] not in entries:
        names = ", ".join(sorted(entries))
        raise SystemExit(f"usage: {sys.argv[0]} {{{names}}} '<json params>'")
    result = entries[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps(result))


def module_main(
    doc: str,
    run: Callable[..., tuple[list[Row], Result]],
    entries: dict[str, Callable[[Params], Result]],
    target: tuple[str, str, str] | None = None,
) -> None:
    """The ``__main__`` of a benchmark module: a child entry (``<entry> '<json params>'``,
    see :func:`child_main`), or, run by hand, the module's rows as a table.

    ``target`` is ``(flag, default, what)`` for a server to measure against, e.g.
    ``("--url", "redis://127.0.0.1:6379/0", "the Redis")``: passed to ``run`` after
    ``quick``.
    """
    if len(sys.argv) > 1 and sys.argv[1] in entries:
        child_main(entries)
        return
    parser = argparse.ArgumentParser(description=doc.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run: a smoke test")
    if target is not None:
        flag, default, what = target
        parser.add_argument(flag, default=default, help=f"{what} to measure against")
    args = parser.parse_args(sys.argv[1:])
    extra = [] if target is None else [getattr(args, target[0].lstrip("-"))]
    rows, _ = run(args.quick, *extra)
    print(render_table(rows))


def render_table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (readable in a terminal, pasteable into RESULTS.md)."""
    header = ("workload", "system", "result", "ratio", "target", "pass/fail")
    cells = [header] + [(r.workload, r.system, r.result, r.ratio, r.target, r.status) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]

    def line(c: Sequence[str]) -> str:
        return "| " + " | ".join(s.ljust(w) for s, w in zip(c, widths, strict=True)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(c) for c in cells[1:]]
    return "\n".join(out)
