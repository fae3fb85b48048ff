"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import sluiceway as sw

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_opens_with_the_two_commands() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert first_block is not None
    lines = [ln for ln in first_block.group(1).splitlines() if ln.strip()]
    assert lines[0].startswith("pip install -e . && sluiceway demo")
    test_command = lines[1].split("#", 1)[0].strip()
    assert test_command == "scripts/services up; scripts/test"
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == test_command  # CI runs exactly the README's test command, last
    assert "scripts/services up" in ci[:-1]  # after bringing the servers up itself


def test_tutorial_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    ns: dict[str, Any] = {}
    exec(python_blocks()[0], ns)
    assert ns["out"].items == [{"user": "ann", "amount": 12.0, "amount_eur": 11.04}]
    assert '"amount_eur": 11.04' in capsys.readouterr().out


def test_testing_examples_pass() -> None:
    block = next(b for b in python_blocks() if "def test_doubling" in b)
    ns: dict[str, Any] = {}
    exec(block, ns)
    ns["test_doubling"]()
    ns["test_batches_by_time"]()


def test_connectors_page_custom_sink_example_runs() -> None:
    page = (README.parent / "docs" / "connectors.md").read_text()
    block = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)[-1]
    ns: dict[str, Any] = {"sw": sw}
    exec(block, ns)
    flow = sw.Flow("upper")
    sink = ns["Uppercase"]()
    flow.source(sw.sources.Iterable(["a", "b"])).sink(sink)
    sw.testing.run_flow(flow)
    assert sink.lines == ["A", "B"]


def test_windows_example_in_the_readme_runs(capsys: pytest.CaptureFixture[str]) -> None:
    block = next(b for b in python_blocks() if "sw.windows.Tumbling" in b)
    exec(block, {})
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "('ann', 0.0, {'n': 2, 'total': 8.5})",
        "('bob', 0.0, {'n': 1, 'total': 1.0})",
        "('ann', 10.0, {'n': 1, 'total': 4.0})",
    ]


def test_every_example_in_the_windows_page_runs() -> None:
    page = (README.parent / "docs" / "windows.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(block, {})  # each block asserts its own results
