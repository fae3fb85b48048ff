"""Per-operator error policies: fail, retry with backoff on the clock, dead letters."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

import sluiceway as sw
from sluiceway.runtime.messages import Batch


class Flaky:
    """Fails for the given records the first ``times`` calls on each, then succeeds."""

    def __init__(self, bad: set[int], times: int = 10**9) -> None:
        self.bad = bad
        self.times = times
        self.calls: dict[int, int] = {}

    def __call__(self, x: int) -> int:
        self.calls[x] = self.calls.get(x, 0) + 1
        if x in self.bad and self.calls[x] <= self.times:
            raise ValueError(f"bad record {x}")
        return x * 10


def make_flow(
    fn: Any, on_error: sw.ErrorPolicy, items: Any = range(6)
) -> tuple[sw.Flow, sw.sinks.Collect[Any]]:
    flow = sw.Flow("policies")
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow.source(sw.sources.Iterable(items)).map(fn, name="times_ten", on_error=on_error).sink(out)
    return flow, out


def test_fail_names_operator_record_and_cause() -> None:
    flow, out = make_flow(Flaky({3}), sw.Fail())
    with pytest.raises(sw.OperatorError) as info:
        sw.testing.run_flow(flow)
    err = info.value
    assert err.operator == "times_ten"
    assert err.record == 3
    assert err.flow == "policies"
    assert isinstance(err.__cause__, ValueError)
    assert "'times_ten'" in str(err)
    assert "record 3" in str(err)
    assert "ValueError: bad record 3" in str(err)
    assert out.items == []  # the failing batch never reached the sink


def test_fail_truncates_huge_records_in_the_message_but_keeps_them() -> None:
    big = {"payload": "x" * 10_000}

    def boom(_: Any) -> Any:
        raise KeyError("amount")

    flow, _ = make_flow(boom, sw.Fail(), items=[big])
    with pytest.raises(sw.OperatorError) as info:
        sw.testing.run_flow(flow)
    assert len(str(info.value)) < 600
    assert info.value.record is big


def test_default_policy_is_fail() -> None:
    flow = sw.Flow("default")
    flow.source(sw.sources.Iterable([1, 0])).map(lambda x: 1 / x).sink(sw.sinks.Collect())
    with pytest.raises(sw.OperatorError, match="ZeroDivisionError"):
        sw.testing.run_flow(flow)


def test_retry_succeeds_and_calls_only_the_failing_record_again() -> None:
    fn = Flaky({2, 4}, times=1)
    flow, out = make_flow(fn, sw.Retry(3, sw.Backoff(initial=0.5, jitter=0.0)))
    sw.testing.run_flow(flow)
    assert out.items == [0, 10, 20, 30, 40, 50]
    assert fn.calls == {0: 1, 1: 1, 2: 2, 3: 1, 4: 2, 5: 1}


def test_retry_backoff_sleeps_on_the_injected_clock_exponentially() -> None:
    clock = sw.VirtualClock()
    fn = Flaky({1})
    policy = sw.Retry(4, sw.Backoff(initial=1.0, multiplier=2.0, max_delay=3.0, jitter=0.0))
    flow, _ = make_flow(fn, policy, items=[1])
    with pytest.raises(sw.OperatorError, match="after 4 attempts") as info:
        sw.testing.run_flow(flow, clock=clock)
    assert info.value.attempts == 4
    assert fn.calls[1] == 4
    # delays 1, 2, then 4 capped at 3: the clock jumped to t=1, t=3, t=6
    assert clock.jumps == [1.0, 3.0, 6.0]


def test_retry_linear_backoff_sleeps_on_the_injected_clock_linearly() -> None:
    clock = sw.VirtualClock()
    fn = Flaky({1})
    backoff = sw.Backoff(kind="linear", initial=1.0, step=0.5, max_delay=1.8, jitter=0.0)
    flow, _ = make_flow(fn, sw.Retry(5, backoff), items=[1])
    with pytest.raises(sw.OperatorError, match="after 5 attempts"):
        sw.testing.run_flow(flow, clock=clock)
    assert fn.calls[1] == 5
    # delays 1, 1.5, then 2 and 2.5 capped at 1.8: t=1, 2.5, 4.3, 6.1
    assert clock.jumps == pytest.approx([1.0, 2.5, 4.3, 6.1])


def test_linear_backoff_step_defaults_to_initial_and_jitter_stays_within_bounds() -> None:
    plain = sw.Backoff(kind="linear", initial=0.2, max_delay=10.0, jitter=0.0)
    assert [plain.delay(n) for n in (1, 2, 3, 4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    jittered = sw.Backoff(kind="linear", initial=1.0, step=1.0, max_delay=100.0, jitter=0.1)
    rng = random.Random(3)
    for retry in range(1, 8):
        for _ in range(50):
            assert retry * 0.9 <= jittered.delay(retry, rng) <= retry * 1.1


def test_backoff_jitter_stays_within_bounds() -> None:
    b = sw.Backoff(initial=1.0, multiplier=2.0, max_delay=100.0, jitter=0.25)
    rng = random.Random(7)
    for retry in range(1, 8):
        base = 2.0 ** (retry - 1)
        for _ in range(50):
            d = b.delay(retry, rng)
            assert base * 0.75 <= d <= base * 1.25


def test_retry_then_dead_letter() -> None:
    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    policy = sw.Retry(2, sw.Backoff(initial=0.1, jitter=0.0), then=sw.DeadLetter(dlq))
    flow, out = make_flow(Flaky({1, 5}), policy)
    sw.testing.run_flow(flow)
    assert out.items == [0, 20, 30, 40]
    assert [d.record for d in dlq.items] == [1, 5]
    assert all(d.attempts == 2 for d in dlq.items)


def test_retry_only_the_listed_exception_types() -> None:
    calls = []

    def fn(x: int) -> int:
        calls.append(x)
        raise TypeError("not transient")

    policy = sw.Retry(5, retry_on=(ConnectionError,))
    flow, _ = make_flow(fn, policy, items=[1])
    with pytest.raises(sw.OperatorError, match="TypeError"):
        sw.testing.run_flow(flow)
    assert calls == [1]


def test_dead_letter_record_carries_everything() -> None:
    clock = sw.VirtualClock(epoch=1_000_000.0)
    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    flow, out = make_flow(Flaky({0, 3}), sw.DeadLetter(dlq))
    result = sw.testing.run_flow(flow, clock=clock)
    assert out.items == [10, 20, 40, 50]
    first = dlq.items[0]
    assert first.record == 0
    assert first.error_type == "ValueError"
    assert first.error_message == "bad record 0"
    assert first.operator == "times_ten"
    assert first.flow == "policies"
    assert first.attempts == 1
    assert first.time == 1_000_000.0
    assert first.to_dict()["record"] == 0
    m = result.metrics.operator("times_ten")
    assert (m.records_in, m.records_out, m.errors, m.dead_letters) == (6, 4, 2, 2)


@pytest.mark.parametrize("op", ["filter", "flat_map", "inspect", "key_by", "branch"])
def test_every_user_function_operator_honours_dead_letters(op: str) -> None:
    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()

    def fn(x: int) -> Any:
        if x == 2:
            raise RuntimeError("two")
        return [x] if op == "flat_map" else x

    flow = sw.Flow("ops")
    s = flow.source(sw.sources.Iterable([1, 2, 3]))
    policy = sw.DeadLetter(dlq)
    if op == "branch":
        yes, no = s.branch(fn, on_error=policy)
        yes.merge(no).sink(out)
    else:
        getattr(s, op)(fn, on_error=policy).sink(out)
    sw.testing.run_flow(flow)
    assert sorted(out.items) == [1, 3]
    assert [d.record for d in dlq.items] == [2]


def test_dead_letters_keep_timestamps_and_keys_aligned() -> None:
    keys_seen: list[Any] = []

    class KeySink(sw.sinks.Sink):
        async def write(self, batch: Batch) -> None:
            keys_seen.extend(zip(batch.values, batch.keys or [], strict=True))

    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    flow = sw.Flow("aligned")
    (
        flow.source(sw.sources.Iterable(range(6)))
        .key_by(lambda x: f"k{x}")
        .map(Flaky({1, 4}), on_error=sw.DeadLetter(dlq))
        .sink(KeySink())
    )
    sw.testing.run_flow(flow)
    assert keys_seen == [(0, "k0"), (20, "k2"), (30, "k3"), (50, "k5")]


def test_sink_partial_failure_is_pinned_to_the_record() -> None:
    written: list[int] = []

    def write(x: int) -> None:
        if x == 3:
            raise OSError("disk said no")
        written.append(x)

    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    flow = sw.Flow("sinkfail")
    flow.source(sw.sources.Iterable(range(6))).sink(
        sw.sinks.Function(write), name="writer", on_error=sw.DeadLetter(dlq)
    )
    result = sw.testing.run_flow(flow)
    assert written == [0, 1, 2, 4, 5]  # each good record written exactly once
    assert [d.record for d in dlq.items] == [3]
    assert dlq.items[0].operator == "writer"
    assert result.metrics.operator("writer").records_out == 5


def test_sink_whole_batch_failure_retries_the_batch() -> None:
    attempts: list[list[int]] = []

    async def write_batch(values: list[int]) -> None:
        attempts.append(list(values))
        if len(attempts) == 1:
            raise ConnectionError("broker went away")

    flow = sw.Flow("batchretry")
    flow.source(sw.sources.Iterable([1, 2, 3])).sink(
        sw.sinks.Function(write_batch, batched=True),
        on_error=sw.Retry(3, sw.Backoff(jitter=0.0)),
    )
    sw.testing.run_flow(flow)
    assert attempts == [[1, 2, 3], [1, 2, 3]]


def test_failing_dead_letter_sink_stops_the_flow_loudly() -> None:
    class Broken(sw.sinks.Sink):
        async def write(self, batch: Batch) -> None:
            raise OSError("dlq is full")

    flow, _ = make_flow(Flaky({2}), sw.DeadLetter(Broken()))
    with pytest.raises(sw.FlowFailedError, match="dead-letter sink 'Broken' failed"):
        sw.testing.run_flow(flow)


def test_policy_arguments_are_checked() -> None:
    s = sw.Flow("x").source(sw.sources.Iterable([1]))
    with pytest.raises(TypeError, match="on_error must be"):
        s.map(str, on_error="retry")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attempts must be >= 1"):
        sw.Retry(0)
    with pytest.raises(ValueError, match="jitter must be in"):
        sw.Backoff(jitter=2.0)
    with pytest.raises(ValueError, match="kind must be 'exponential' or 'linear', got 'cubic'"):
        sw.Backoff(kind="cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"step=0\.5 applies only to kind='linear'"):
        sw.Backoff(step=0.5)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        sw.Backoff(kind="linear", step=-1)
    with pytest.raises(TypeError, match=r"then=\.\.\."):
        sw.Retry(2, then=sw.Retry(2))  # type: ignore[arg-type]


def test_async_iterable_source_and_async_sink() -> None:
    seen: list[int] = []

    async def gen() -> Any:
        for i in range(3):
            yield i

    async def sink(x: int) -> None:
        await asyncio.sleep(0)
        seen.append(x)

    flow = sw.Flow("async")
    flow.source(sw.sources.Iterable(gen())).sink(sw.sinks.Function(sink))
    sw.testing.run_flow(flow)
    assert seen == [0, 1, 2]


def test_errors_count_records_and_failed_attempts_count_tries() -> None:
    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    policy = sw.Retry(5, sw.Backoff(initial=0.1, jitter=0.0), then=sw.DeadLetter(dlq))
    flow, _ = make_flow(Flaky({1}), policy, items=[0, 1, 2])
    result = sw.testing.run_flow(flow)
    m = result.metrics.operator("times_ten")
    # one record failed (on all 5 tries): errors count records, attempts count tries
    assert (m.errors, m.failed_attempts, m.retries, m.dead_letters) == (1, 5, 4, 1)


def test_errors_count_a_record_that_a_retry_saved_once() -> None:
    flow, out = make_flow(Flaky({2, 4}, times=2), sw.Retry(3, sw.Backoff(initial=0.1, jitter=0.0)))
    result = sw.testing.run_flow(flow)
    assert out.items == [0, 10, 20, 30, 40, 50]
    m = result.metrics.operator("times_ten")
    assert (m.errors, m.failed_attempts, m.retries) == (2, 4, 4)


def test_dead_letter_accepts_a_path_as_a_json_lines_file(tmp_path: Any) -> None:
    path = tmp_path / "dlq.jsonl"
    flow, out = make_flow(Flaky({1, 4}), sw.DeadLetter(str(path)))
    sw.testing.run_flow(flow)
    assert out.items == [0, 20, 30, 50]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(d["record"], d["error_type"], d["operator"]) for d in lines] == [
        (1, "ValueError", "times_ten"),
        (4, "ValueError", "times_ten"),
    ]
    assert isinstance(sw.DeadLetter(path).sink, sw.sinks.JsonLines)  # a Path too


def test_dead_letter_refuses_what_is_neither_a_sink_nor_a_path() -> None:
    with pytest.raises(TypeError, match=r"DeadLetter\(sink\) needs a sink .* got \[1, 2\]"):
        sw.DeadLetter([1, 2])  # type: ignore[arg-type]


class CloseFails(sw.sinks.Sink):
    """A sink whose ``close`` raises."""

    def __init__(self) -> None:
        self.items: list[Any] = []

    async def write(self, batch: Batch) -> None:
        self.items.extend(batch.values)

    async def close(self) -> None:
        raise OSError("flush on close failed")


def test_a_failing_close_does_not_hide_the_flows_own_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def boom(r: dict[str, int]) -> int:
        return r["missing"]

    flow = sw.Flow("hides")
    flow.source(sw.sources.Iterable([{"id": 1}])).map(boom, name="lookup").sink(CloseFails())
    with pytest.raises(sw.OperatorError, match=r"failed on record \{'id': 1\}") as info:
        sw.testing.run_flow(flow)
    assert isinstance(info.value.__cause__, KeyError)
    # the close failure is attached and logged, not lost
    assert any("closing" in n and "flush on close failed" in n for n in info.value.__notes__)
    assert "flush on close failed" in caplog.text


def test_a_failing_close_after_a_clean_run_still_fails_the_flow() -> None:
    flow = sw.Flow("closes")
    sink = CloseFails()
    flow.source(sw.sources.Iterable([1, 2])).sink(sink)
    with pytest.raises(sw.FlowFailedError, match=r"closing 1 connector\(s\).*flush on close"):
        sw.testing.run_flow(flow)
    assert sink.items == [1, 2]
