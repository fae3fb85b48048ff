"""The flow-control examples in ``examples/`` run, and show what their docstrings say."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from pathlib import Path
from types import ModuleType

import pytest

import services_nats
from services import import_or_missing

nats_url = services_nats.nats_url

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_submit_accepted_or_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    answers = asyncio.run(load("submit_admission").main())
    assert answers["accepted"] > 0
    assert answers["rejected"] > 0  # the producer is 5x too fast: most are refused
    # every accepted record (and the one put) was processed, none more
    assert answers["processed"] == answers["accepted"] + answers["put_ok"]
    assert "'rejected'" in capsys.readouterr().out


def test_get_window_reads_the_current_window_of_a_key(capsys: pytest.CaptureFixture[str]) -> None:
    seen = asyncio.run(load("get_window").main())
    assert [(ts, v["views"]) for ts, v in seen] == [(5.0, 1), (20.0, 2), (42.0, 3), (65.0, 1)]
    assert seen[2][1]["pages"] == ["/home", "/cart", "/pay"]
    assert "ann's current window" in capsys.readouterr().out


def test_the_load_feedback_rules_switch_on_cue(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sluiceway"):
        timeline = asyncio.run(load("load_feedback").main())
    assert [(t, len(active), ok) for t, active, ok in timeline] == [
        (1.0, 0, True),
        (3.0, 1, True),  # CPU above 80 %: fetch shrunk
        (5.0, 4, False),  # p99 above 2 s: admission refuses
        (7.0, 0, True),
    ]
    switches = [r.getMessage() for r in caplog.records if "load rule" in r.getMessage()]
    assert len(switches) == 8  # each rule on once and off once


def test_try_acquire_or_reject_against_nats(nats_url: str) -> None:
    import_or_missing("nats")
    os.environ["SLUICEWAY_NATS_URL"] = nats_url
    try:
        done, rejected = load("try_acquire_or_reject").main()
    finally:
        del os.environ["SLUICEWAY_NATS_URL"]
    assert sorted((t, n) for t, n, _ in done) == sorted(
        [("a", i) for i in range(10)] + [("b", i) for i in range(2)]
    )  # every job once
    assert rejected > 0
    assert all(d == 1 for t, _, d in done if t == "b")  # b never waited behind a
    assert max(d for t, _, d in done if t == "a") > 1  # a's came back from the server


def test_select_with_timeout_drops_only_after_waiting(capsys: pytest.CaptureFixture[str]) -> None:
    summary = load("select_with_timeout").main()
    assert summary["sent"] == 300
    assert summary["dropped"] > 0  # the consumer is 5x too slow
    assert summary["delivered"] + summary["dropped"] == 300  # every event accounted for
    assert summary["blocked_seconds"] > 0  # the writer waited before it dropped
    assert "'dropped'" in capsys.readouterr().out
