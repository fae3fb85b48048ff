"""File and stdio connectors: JsonLines and Csv sources, the JsonLines sink, Stdin."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import json
import logging
import os
import re
import select
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

import sluiceway as sw
from sluiceway.connectors.base import PartialWriteError, SinkContext, SourceContext
from sluiceway.connectors.files import (
    Csv,
    JsonLinesSink,
    JsonLinesSource,
    LineBuffer,
    LineTooLongError,
)
from sluiceway.connectors.stdio import Stdin
from sluiceway.errors import BadInputError
from sluiceway.runtime.messages import Batch
from sluiceway.time import yield_now

_T = TypeVar("_T")

# -- helpers ---------------------------------------------------------------------------


def source_context(
    clock: sw.Clock | None = None, *, fails: bool = True
) -> tuple[SourceContext, list[BadInputError]]:
    """A context like the runtime's: ``bad_input`` raises (fail) or records (dead letter)."""
    reported: list[BadInputError] = []

    async def bad_input(err: BadInputError) -> None:
        reported.append(err)
        if fails:
            raise err

    return SourceContext("test", "src", clock or sw.VirtualClock(), bad_input, fails), reported


def drain(
    source: sw.sources.Source, max_records: int = 1024, *, fails: bool = True
) -> tuple[list[list[Any]], list[BadInputError]]:
    """Open ``source``, pull batches until the end, close; the batches and bad inputs."""
    ctx, reported = source_context(fails=fails)

    async def main() -> list[list[Any]]:
        await source.open(ctx)
        batches: list[list[Any]] = []
        try:
            while (batch := await source.next_batch(max_records)) is not None:
                batches.append(batch.values)
        finally:
            await source.close()
        return batches

    return asyncio.run(main()), reported


def jsonl(path: Path, *records: Any) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_exported_under_the_public_names() -> None:
    assert sw.sources.JsonLines is JsonLinesSource
    assert sw.sinks.JsonLines is JsonLinesSink
    assert sw.sources.Csv is Csv
    assert sw.sources.Stdin is Stdin
    for name in ("JsonLines", "Csv", "Stdin"):
        assert name in sw.sources.__all__
    assert "JsonLines" in sw.sinks.__all__


# -- JsonLines source ------------------------------------------------------------------


def test_round_trip_source_map_sink(tmp_path: Path) -> None:
    src_path = jsonl(tmp_path / "in.jsonl", *({"id": i, "amount": i * 1.5} for i in range(5)))
    out_path = tmp_path / "out.jsonl"
    flow = sw.Flow("round_trip")
    (
        flow.source(sw.sources.JsonLines(src_path))
        .map(lambda r: {**r, "double": r["amount"] * 2})
        .sink(sw.sinks.JsonLines(out_path))
    )
    result = sw.testing.run_flow(flow)
    assert read_jsonl(out_path) == [
        {"id": i, "amount": i * 1.5, "double": i * 3.0} for i in range(5)
    ]
    assert not result.stopped


def test_next_batch_respects_max_records_and_advances_position(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", *range(10))
    src = JsonLinesSource(path)
    ctx, _ = source_context()

    async def main() -> list[tuple[list[Any], dict[str, int]]]:
        await src.open(ctx)
        seen = []
        while (batch := await src.next_batch(3)) is not None:
            seen.append((batch.values, src.position()))
        await src.close()
        return seen

    seen = asyncio.run(main())
    assert [values for values, _ in seen] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [pos for _, pos in seen] == [
        {"offset": 6, "line": 3},
        {"offset": 12, "line": 6},
        {"offset": 18, "line": 9},
        {"offset": 20, "line": 10},
    ]


def test_flow_batches_follow_max_batch_size(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", *range(10))
    sizes: list[int] = []
    flow = sw.Flow("batches")
    flow.source(sw.sources.JsonLines(path)).sink(
        sw.sinks.Function(lambda values: sizes.append(len(values)), batched=True)
    )
    sw.testing.run_flow(flow, max_batch_size=3)
    assert sizes == [3, 3, 3, 1]


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('\n{"a": 1}\n   \n\r\n{"a": 2}\r\n\n')
    src = JsonLinesSource(path)
    batches, _ = drain(src)
    assert batches == [[{"a": 1}, {"a": 2}]]
    assert src.position() == {"offset": path.stat().st_size, "line": 6}


def test_final_line_without_newline_is_read_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')
    src = JsonLinesSource(path)
    assert drain(src)[0] == [[{"a": 1}, {"a": 2}]]
    assert src.position() == {"offset": 17, "line": 2, "unterminated": True}


@pytest.mark.parametrize("make", [JsonLinesSource, Csv])
def test_a_checkpoint_after_a_last_line_without_newline_restarts(tmp_path: Path, make: Any) -> None:
    """The file did not change: the restart reads nothing again and fails on nothing; a
    newline and lines written later are read on the next restart."""
    path = tmp_path / "in.txt"
    header = "n\n" if make is Csv else ""
    path.write_text(header + "1\n2")
    ckpt = sw.Checkpoints(tmp_path / "ckpt")

    def run() -> list[Any]:
        out: sw.sinks.Collect[Any] = sw.sinks.Collect()
        flow = sw.Flow("f")
        flow.source(make(path), name="src").sink(out, name="out")
        sw.testing.run_flow(flow, checkpoints=ckpt)
        return [int(r["n"]) if isinstance(r, dict) else r for r in out.items]

    assert run() == [1, 2]
    assert run() == []  # failed with "not the start of a line" before
    with path.open("a") as f:
        f.write("\n3\n")
    assert run() == [3]
    assert run() == []
    # Old positions (without the flag) at the very end of such a file are accepted too.
    path.write_text(header + "1\n2")
    src = make(path, resume_from={"offset": path.stat().st_size, "line": 2})
    assert drain(src)[0] == []


def test_empty_file_ends_at_once(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert drain(JsonLinesSource(path)) == ([], [])


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n')
    assert drain(JsonLinesSource(path))[0] == [[{"a": 1}]]


def test_long_lines_across_read_chunks(tmp_path: Path) -> None:
    records = [{"i": i, "pad": "x" * 50_000} for i in range(5)]
    path = jsonl(tmp_path / "big.jsonl", *records)
    batches, _ = drain(JsonLinesSource(path), max_records=2)
    assert [r for b in batches for r in b] == records
    assert [len(b) for b in batches] == [2, 2, 1]


def test_resume_from_a_position_reads_the_rest_exactly_once(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", *range(7))
    first = JsonLinesSource(path)
    ctx, _ = source_context()

    async def take_two() -> list[Any]:
        await first.open(ctx)
        batch = await first.next_batch(2)
        await first.close()
        assert batch is not None
        return batch.values

    head = asyncio.run(take_two())
    pos = first.position()
    assert json.loads(json.dumps(pos)) == pos  # JSON-able, for checkpoints
    rest_src = JsonLinesSource(path, resume_from=pos)
    rest, _ = drain(rest_src)
    assert head + [r for b in rest for r in b] == list(range(7))
    assert rest_src.position()["line"] == 7


def test_resume_from_a_position_that_does_not_fit_the_file(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "in.jsonl", 1, 2)
    with pytest.raises(ValueError, match="only 4 bytes"):
        drain(JsonLinesSource(path, resume_from={"offset": 99, "line": 9}))
    with pytest.raises(ValueError, match="not the start of a line"):
        drain(JsonLinesSource(path, resume_from={"offset": 1, "line": 0}))
    with pytest.raises(ValueError, match="resume_from must be a dict returned by position"):
        JsonLinesSource(path, resume_from={"offset": -1})


def test_bad_arguments_are_explained(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match="poll_interval must be a finite number > 0 seconds, got 0",
    ):
        sw.sources.JsonLines(tmp_path / "x", poll_interval=0)
    with pytest.raises(ValueError, match=r"ASCII-compatible.*'utf-16'"):
        sw.sources.JsonLines(tmp_path / "x", encoding="utf-16")
    with pytest.raises(ValueError, match="unknown encoding 'nope'"):
        sw.sources.JsonLines(tmp_path / "x", encoding="nope")
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        drain(sw.sources.JsonLines(tmp_path / "missing.jsonl"))


def test_follow_tails_a_growing_file(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "log.jsonl", {"n": 0})
    clock = sw.VirtualClock()
    src = sw.sources.JsonLines(path, follow=True, poll_interval=0.25)
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("tail")
    flow.source(src).sink(out)

    def append(text: str) -> None:
        with path.open("a") as f:
            f.write(text)

    async def main() -> sw.RunResult:
        handle = sw.start(flow, clock=clock)
        await handle.clock.sleep(1)
        assert out.items == [{"n": 0}]
        append('{"n": 1}\n{"n": 2}\n')
        await handle.clock.sleep(1)
        assert out.items == [{"n": 0}, {"n": 1}, {"n": 2}]
        append('{"n": 3')  # a line still being written
        await handle.clock.sleep(1)
        assert len(out.items) == 3, "a partial line must wait for its newline"
        append('}\n{"n": 4}\n')
        await handle.clock.sleep(1)
        assert out.items[3:] == [{"n": 3}, {"n": 4}]
        append('{"n": 5')  # left partial when the flow stops
        await handle.clock.sleep(1)
        return await handle.stop()

    result = asyncio.run(main())
    assert result.stopped
    assert out.items == [{"n": i} for i in range(5)]  # each exactly once
    size = path.stat().st_size
    assert src.position() == {"offset": size - len('{"n": 5'), "line": 5}
    assert clock.monotonic() == pytest.approx(5.0)


def test_follow_cancelled_while_waiting_loses_nothing(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "log.jsonl", 1)
    clock = sw.VirtualClock()
    src = JsonLinesSource(path, follow=True, poll_interval=10)
    ctx, _ = source_context(clock)

    async def main() -> list[Any]:
        await src.open(ctx)
        got = await src.next_batch(10)
        assert got is not None
        assert got.values == [1]
        waiting = asyncio.ensure_future(src.next_batch(10))
        await clock.sleep(1)  # the source is now waiting for its next poll
        with path.open("a") as f:
            f.write("2\n3")  # "3" is not complete yet
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert src.position() == {"offset": 2, "line": 1}
        again = await src.next_batch(10)
        await src.close()
        assert again is not None
        return again.values

    assert asyncio.run(main()) == [2]
    assert src.position() == {"offset": 4, "line": 2}


def test_malformed_line_stops_the_flow_at_a_resumable_position(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3,,}\n{"id": 4}\n')
    src = sw.sources.JsonLines(path)
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("strict")
    flow.source(src, name="events").sink(out)
    with pytest.raises(sw.OperatorError) as info:
        sw.testing.run_flow(flow)
    err = info.value
    message = str(err)
    assert f"{path}:3" in message
    assert "invalid JSON" in message
    assert '{"id": 3,,}' in message  # quotes the bad line
    assert "on_error=sw.DeadLetter" in message  # and names the way out
    assert err.operator == "events"
    assert err.record == '{"id": 3,,}'
    cause = err.__cause__
    assert isinstance(cause, sw.BadInputError)
    assert cause.where == f"{path}:3"
    assert out.items == [{"id": 1}, {"id": 2}]  # the records before it were delivered
    bad_at = len('{"id": 1}\n{"id": 2}\n')
    assert src.position() == {"offset": bad_at, "line": 2}

    # Fix the line and resume from the position: nothing lost, nothing doubled.
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3}\n{"id": 4}\n')
    rest, _ = drain(sw.sources.JsonLines(path, resume_from=src.position()))
    assert out.items + rest[0] == [{"id": i} for i in range(1, 5)]


def test_bad_line_first_in_a_batch_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("1\n2\nnope\n3\n")
    src = JsonLinesSource(path)
    ctx, reported = source_context()

    async def main() -> None:
        await src.open(ctx)
        first = await src.next_batch(10)
        assert first is not None
        assert first.values == [1, 2]
        with pytest.raises(BadInputError):
            await src.next_batch(10)
        await src.close()

    asyncio.run(main())
    assert [e.where for e in reported] == [f"{path}:3"]
    assert src.position() == {"offset": 4, "line": 2}


def test_invalid_utf8_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'"ok"\n"caf\xe9"\n"fine"\n')
    batches, reported = drain(JsonLinesSource(path), fails=False)
    assert batches == [["ok"], ["fine"]]
    (err,) = reported
    assert err.where == f"{path}:2"
    assert err.raw == '"caf\\xe9"'
    assert "cannot decode as utf-8" in err.reason
    assert "encoding=" in err.reason
    latin, _ = drain(JsonLinesSource(path, encoding="latin-1"))
    assert latin == [["ok", "café", "fine"]]


def test_malformed_lines_go_to_the_dead_letter_sink(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1}\n{oops\n{"id": 2}\n[1, 2\n{"id": 3}\n')
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    flow = sw.Flow("lenient")
    flow.source(sw.sources.JsonLines(path), name="events", on_error=sw.DeadLetter(dlq)).sink(out)
    result = sw.testing.run_flow(flow)
    assert out.items == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert [d.record for d in dlq.items] == ["{oops", "[1, 2"]
    first = dlq.items[0]
    assert first.error_type == "BadInputError"
    assert f"{path}:2" in first.error_message
    assert "invalid JSON" in first.error_message
    assert "on_error" not in first.error_message  # no advice when it is already handled
    assert first.operator == "events"
    assert first.flow == "lenient"
    assert result.metrics.operator("events").dead_letters == 2


# -- Csv source ------------------------------------------------------------------------


def test_csv_header_and_convert(tmp_path: Path) -> None:
    path = tmp_path / "sales.csv"
    path.write_text('item,amount,note\npen,1.5,"a, b"\n\nink,2,"two\nlines"\n')
    got = sw.testing.run_collect(
        lambda s: s, sw.sources.Csv(path, convert={"amount": float}), max_batch_size=1
    )
    assert got == [
        {"item": "pen", "amount": 1.5, "note": "a, b"},
        {"item": "ink", "amount": 2.0, "note": "two\nlines"},
    ]


def test_csv_fieldnames_delimiter_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_bytes(b"a;1\r\nb;2")
    got = sw.testing.run_collect(
        lambda s: s, sw.sources.Csv(path, delimiter=";", fieldnames=["k", "v"], convert={"v": int})
    )
    assert got == [{"k": "a", "v": 1}, {"k": "b", "v": 2}]
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfid,name\r\n1,x\r\n")
    assert sw.testing.run_collect(lambda s: s, sw.sources.Csv(bom)) == [{"id": "1", "name": "x"}]


def test_csv_bad_rows_fail_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "sales.csv"
    path.write_text("item,amount\npen,1.5\nink\nbox,3\n")
    src = sw.sources.Csv(path)
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("csv")
    flow.source(src, name="sales").sink(out)
    with pytest.raises(
        sw.OperatorError, match=r"sales\.csv:3: expected 2 fields \(item, amount\), got 1"
    ):
        sw.testing.run_flow(flow)
    assert out.items == [{"item": "pen", "amount": "1.5"}]
    assert src.position() == {"offset": len("item,amount\npen,1.5\n"), "line": 2}


def test_csv_bad_rows_as_dead_letters(tmp_path: Path) -> None:
    path = tmp_path / "sales.csv"
    path.write_bytes(b'item,amount\npen,1.5\nink,lots\ncup,"x\n2"\nbad,\xff\nbox,3\nfoo,1,2\n')
    batches, reported = drain(Csv(path, convert={"amount": float}), fails=False)
    assert batches == [[{"item": "pen", "amount": 1.5}], [{"item": "box", "amount": 3.0}]]
    assert [(e.where, e.raw) for e in reported] == [
        (f"{path}:3", "ink,lots"),
        (f"{path}:4", 'cup,"x\n2"'),  # a quoted field spanning lines: named by its first line
        (f"{path}:6", "bad,\\xff"),
        (f"{path}:8", "foo,1,2"),
    ]
    assert reported[0].reason.startswith("field 'amount': float('lots') failed: ValueError")
    assert "cannot decode as utf-8" in reported[2].reason
    assert "expected 2 fields" in reported[3].reason


def test_csv_parser_errors_are_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "wide.csv"
    path.write_text("a,b\n1,2\n3," + "x" * 200 + "\n5,6\n")
    limit = csv.field_size_limit(100)
    try:
        batches, reported = drain(Csv(path), fails=False)
    finally:
        csv.field_size_limit(limit)
    assert batches == [[{"a": "1", "b": "2"}], [{"a": "5", "b": "6"}]]
    (err,) = reported
    assert err.where == f"{path}:3"
    assert err.reason.startswith("malformed CSV: field larger than field limit (100)")


def test_csv_resume_reads_the_header_again(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    path.write_text("n\n" + "".join(f"{i}\n" for i in range(6)))
    first = Csv(path, convert={"n": int})
    ctx, _ = source_context()

    async def take() -> list[Any]:
        await first.open(ctx)
        batch = await first.next_batch(4)
        await first.close()
        assert batch is not None
        return batch.values

    head = asyncio.run(take())
    rest, _ = drain(Csv(path, convert={"n": int}, resume_from=first.position()))
    assert [r["n"] for r in head + rest[0]] == list(range(6))


def test_csv_setup_errors_are_explained(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("id,id,x\n1,2,3\n")
    with pytest.raises(ValueError, match=r"h\.csv:1: the header row repeats field names \['id'\]"):
        drain(Csv(path))
    path.write_text("id,amount\n1,2\n")
    with pytest.raises(ValueError, match=r"convert names \['amout'\].*\['id', 'amount'\]"):
        drain(Csv(path, convert={"amout": float}))
    with pytest.raises(TypeError, match="convert\\['amount'\\] must be a callable"):
        Csv(path, convert={"amount": "float"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="delimiter must be one character"):
        Csv(path, delimiter=";;")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert drain(Csv(empty)) == ([], [])


# -- Stdin -----------------------------------------------------------------------------

ECHO = textwrap.dedent(
    """
    import sluiceway as sw
    flow = sw.Flow("echo")
    flow.source(sw.sources.Stdin()).map(str.upper).sink(sw.sinks.Stdout())
    sw.run(flow)
    """
)


def test_stdin_from_a_pipe_in_a_real_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", ECHO],
        input=b"alpha\nbeta\n\ngamma",
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"ALPHA\nBETA\n\nGAMMA\n"


def test_stdin_streams_each_line_as_it_arrives() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", ECHO],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            for word in ("one", "two"):
                proc.stdin.write(f"{word}\n".encode())
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], 60)
                assert ready, "the line did not come through before the input ended"
                assert proc.stdout.readline() == f"{word.upper()}\n".encode()
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_stdin_redirected_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "in.txt"
    path.write_text("x\ny\n")
    with path.open("rb") as stdin:
        proc = subprocess.run(
            [sys.executable, "-c", ECHO], stdin=stdin, capture_output=True, timeout=60, check=False
        )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"X\nY\n"


def test_stdin_pipe_in_process_restores_blocking_mode() -> None:
    r, w = os.pipe()
    os.write(w, b"x\ny\n")
    os.close(w)
    with os.fdopen(r, "rb") as stream:
        got = sw.testing.run_collect(lambda s: s, sw.sources.Stdin(stream=stream))
        assert os.get_blocking(r), "the source must restore the descriptor's blocking mode"
        assert not stream.closed
    assert got == ["x", "y"]


def test_stdin_reads_a_terminal() -> None:
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    try:
        os.write(master, b"hello\nworld\n")
        with os.fdopen(slave, "rb", buffering=0, closefd=False) as stream:
            out: sw.sinks.Collect[Any] = sw.sinks.Collect()
            flow = sw.Flow("tty")
            flow.source(sw.sources.Stdin(stream=stream)).sink(out)

            async def main() -> sw.RunResult:
                handle = sw.start(flow, clock=sw.VirtualClock())
                for _ in range(1000):  # a terminal never ends: wait for the two lines
                    if len(out.items) == 2:
                        break
                    await handle.clock.sleep(1)
                return await handle.stop()

            assert asyncio.run(main()).stopped
            assert out.items == ["hello", "world"]
            assert os.get_blocking(slave)
    finally:
        os.close(slave)
        os.close(master)


def test_stdin_stop_while_waiting_on_an_empty_pipe() -> None:
    r, w = os.pipe()
    try:
        with os.fdopen(r, "rb") as stream:
            flow = sw.Flow("idle")
            out: sw.sinks.Collect[Any] = sw.sinks.Collect()
            flow.source(sw.sources.Stdin(stream=stream)).sink(out)

            async def main() -> sw.RunResult:
                handle = sw.start(flow, clock=sw.VirtualClock())
                await handle.clock.sleep(5)
                return await handle.stop()

            assert asyncio.run(main()).stopped
            assert out.items == []
            assert os.get_blocking(r)
    finally:
        os.close(w)


def test_stdin_parse_failures_are_bad_input() -> None:
    stream = io.BytesIO(b'{"a": 1}\nnot json\n[2]\n')
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    flow = sw.Flow("stdin")
    flow.source(
        sw.sources.Stdin(parse=json.loads, stream=stream), on_error=sw.DeadLetter(dlq)
    ).sink(out)
    sw.testing.run_flow(flow)
    assert out.items == [{"a": 1}, [2]]
    (dead,) = dlq.items
    assert dead.record == "not json"
    assert "<stdin>:2" in dead.error_message
    assert "loads() failed: JSONDecodeError" in dead.error_message

    strict = sw.Flow("strict")
    strict.source(sw.sources.Stdin(parse=int, stream=io.BytesIO(b"1\nx\n"))).sink(
        sw.sinks.Collect()
    )
    with pytest.raises(sw.OperatorError, match=r"<stdin>:2: int\(\) failed: ValueError"):
        sw.testing.run_flow(strict)


# -- JsonLines sink --------------------------------------------------------------------


def test_sink_serializes_dead_letter_records(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1}\n{broken\n')
    dlq_path = tmp_path / "dead.jsonl"
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("dlq")
    dlq = sw.sinks.JsonLines(dlq_path)
    flow.source(sw.sources.JsonLines(path), name="events", on_error=sw.DeadLetter(dlq)).sink(out)
    sw.testing.run_flow(flow)
    (dead,) = read_jsonl(dlq_path)
    assert dead["record"] == "{broken"
    assert dead["error_type"] == "BadInputError"
    assert f"{path}:2" in dead["error_message"]
    assert dead["operator"] == "events"
    assert set(dead) == {f.name for f in dataclasses.fields(sw.DeadLetterRecord)}


@dataclasses.dataclass
class Point:
    x: int
    y: int


def test_sink_serializes_dataclasses_and_falls_back_to_str(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    records = [Point(1, 2), {"p": Point(3, 4), "s": {1}}, "é", None]
    flow = sw.Flow("kinds")
    flow.source(sw.sources.Iterable(records)).sink(sw.sinks.JsonLines(path))
    sw.testing.run_flow(flow)
    assert read_jsonl(path) == [{"x": 1, "y": 2}, {"p": {"x": 3, "y": 4}, "s": "{1}"}, "é", None]


def test_sink_append_overwrite_and_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"old": 1}\n{"torn": ')

    def write(records: list[Any], mode: Any) -> None:
        flow = sw.Flow("w")
        flow.source(sw.sources.Iterable(records)).sink(sw.sinks.JsonLines(path, mode=mode))
        sw.testing.run_flow(flow)

    write([1, 2], "append")
    assert path.read_text() == '{"old": 1}\n{"torn": \n1\n2\n'  # never merged into one line
    write([3], "overwrite")
    assert path.read_text() == "3\n"
    with pytest.raises(ValueError, match="mode must be 'append' or 'overwrite', got 'a'"):
        sw.sinks.JsonLines(path, mode="a")  # type: ignore[arg-type]


def test_sink_partial_write_error_writes_only_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = JsonLinesSink(path, mode="overwrite")

    async def main() -> PartialWriteError:
        await sink.open(SinkContext("t", "out", sw.VirtualClock()))
        try:
            with pytest.raises(PartialWriteError) as info:
                await sink.write(Batch([{"a": 1}, {(1, 2): "tuple key"}, {"b": 2}]))
        finally:
            await sink.close()
        return info.value

    err = asyncio.run(main())
    assert err.written == 1
    assert isinstance(err.cause, TypeError)
    assert path.read_text() == '{"a": 1}\n'


def test_sink_unserializable_record_becomes_a_dead_letter(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    records = [1, {(1, 2): "x"}, 2, cyclic, 3]
    dlq: sw.sinks.Collect[sw.DeadLetterRecord] = sw.sinks.Collect()
    flow = sw.Flow("sink_dlq")
    flow.source(sw.sources.Iterable(records)).sink(
        sw.sinks.JsonLines(path), name="out", on_error=sw.DeadLetter(dlq)
    )
    result = sw.testing.run_flow(flow)
    assert path.read_text() == "1\n2\n3\n"  # the good ones, each exactly once
    assert [d.record for d in dlq.items] == [{(1, 2): "x"}, cyclic]
    assert [d.error_type for d in dlq.items] == ["TypeError", "ValueError"]
    assert result.metrics.operator("out").records_out == 3


def test_sink_unserializable_record_fails_by_default(tmp_path: Path) -> None:
    flow = sw.Flow("sink_fail")
    flow.source(sw.sources.Iterable([1, {(1,): 2}])).sink(sw.sinks.JsonLines(tmp_path / "o.jsonl"))
    with pytest.raises(sw.OperatorError, match=r"failed on record \{\(1,\): 2\}: TypeError"):
        sw.testing.run_flow(flow)
    assert (tmp_path / "o.jsonl").read_text() == "1\n"


# -- the line buffer -------------------------------------------------------------------


def test_line_buffer_rollback_and_pending() -> None:
    buf = LineBuffer(offset=100, line=7)
    buf.feed(b"ab\ncd\nef")
    assert buf.next_line() == b"ab\n"
    buf.commit()
    assert buf.next_line() == b"cd\n"
    assert buf.pending() == b"cd\n"
    buf.rollback()
    assert (buf.offset, buf.line) == (103, 8)
    assert buf.next_line() == b"cd\n"
    assert buf.next_line() is None  # "ef" is incomplete
    buf.commit()
    buf.feed(b"\n")
    assert buf.next_line() == b"ef\n"
    buf.commit()
    assert (buf.offset, buf.line) == (109, 10)
    buf.feed_eof()
    assert buf.next_line() is None


def test_a_file_source_reports_its_unread_bytes_as_backlog(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(f'{{"n": {i}}}\n' for i in range(100)))
    size = path.stat().st_size
    seen: list[int | None] = []
    boxes: list[sw.FlowHandle] = []
    flow = sw.Flow("backlog")
    (
        flow.source(sw.sources.JsonLines(path), name="file")
        .inspect(lambda _: seen.append(boxes[0].metrics().operator("file").backlog))
        .sink(sw.sinks.Collect())
    )

    async def main() -> sw.RunResult:
        handle = sw.start(flow, clock=sw.VirtualClock(), max_batch_size=10)
        boxes.append(handle)
        return await handle.wait()

    result = asyncio.run(main())
    backlogs = [b for b in seen if b is not None]
    assert backlogs[0] == size - 10 * len('{"n": 0}\n')  # after the first batch of 10
    assert backlogs == sorted(backlogs, reverse=True)
    assert backlogs[-1] == 0
    assert result.metrics.operator("file").backlog is None  # closed: unknown


# -- long lines ------------------------------------------------------------------------


def test_line_buffer_refuses_a_line_over_its_limit_and_skips_it_as_fed() -> None:
    buf = LineBuffer(offset=10, line=2, max_line=4)
    buf.feed(b"abcd\nefghij")
    assert buf.next_line() == b"abcd\n"  # 4 bytes: at the limit is fine
    buf.commit()
    with pytest.raises(LineTooLongError) as err:
        buf.next_line()  # 6 bytes, no newline yet: already too long
    assert (err.value.length, err.value.limit, err.value.complete) == (6, 4, False)
    assert err.value.head == b"efghij"
    buf.skip_line()
    assert (buf.offset, buf.line) == (15, 3)  # a position taken now resumes at the line
    buf.feed(b"klmnop")  # still the long line: discarded, not buffered
    assert buf.next_line() is None
    buf.feed(b"q\nrs\n")
    assert (buf.offset, buf.line) == (29, 4)
    assert buf.next_line() == b"rs\n"
    buf.commit()
    buf.feed(b"toolong\nok\n")
    with pytest.raises(LineTooLongError) as err:
        buf.next_line()
    assert (err.value.length, err.value.complete) == (7, True)
    buf.skip_line()  # complete in the buffer: dropped at once
    assert (buf.offset, buf.line) == (40, 6)
    assert buf.next_line() == b"ok\n"


def test_line_buffer_keeps_offsets_exact_across_compactions() -> None:
    buf = LineBuffer(offset=5)
    data = b"".join(b"x" * (i % 50) + b"\n" for i in range(2000))
    got: list[bytes] = []
    for i in range(0, len(data), 37):  # odd chunk sizes: lines split across feeds
        buf.feed(data[i : i + 37])
        while (line := buf.next_line()) is not None:
            got.append(line)
            buf.commit()
    assert b"".join(got) == data
    assert (buf.offset, buf.line) == (5 + len(data), 2000)


@pytest.mark.parametrize("make", [JsonLinesSource, Csv])
def test_an_over_long_line_is_a_dead_letter_naming_file_and_line(tmp_path: Path, make: Any) -> None:
    path = tmp_path / "in.txt"
    header = "n\n" if make is Csv else ""
    long = "9" * 300_000
    path.write_text(header + f"1\n{long}\n2\n{long}")  # the last one without a newline
    src = make(path, max_line_bytes=100_000)
    batches, reported = drain(src, fails=False)
    values = [int(r["n"]) if isinstance(r, dict) else r for b in batches for r in b]
    assert values == [1, 2]
    first = 2 if make is Csv else 1
    assert [e.where for e in reported] == [f"{path}:{first + 1}", f"{path}:{first + 3}"]
    assert re.search(r"line too long: [\d,]+ bytes so far, the limit is 100,000", str(reported[0]))
    assert "max_line_bytes" in str(reported[0])
    assert reported[0].raw == "9" * 1024 + "..."  # the dead letter holds its head only
    assert src.position()["offset"] == path.stat().st_size


@pytest.mark.parametrize("make", [JsonLinesSource, Csv])
def test_an_over_long_line_under_fail_stops_at_it(tmp_path: Path, make: Any) -> None:
    path = tmp_path / "in.txt"
    header = "n\n" if make is Csv else ""
    path.write_text(header + "1\n" + "7" * 5000 + "\n2\n")
    src = make(path, max_line_bytes=1000)
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("strict")
    flow.source(src, name="in").sink(out)
    with pytest.raises(sw.OperatorError) as info:
        sw.testing.run_flow(flow)
    line = 3 if make is Csv else 2
    assert f"{path}:{line}" in str(info.value)
    assert "line too long: 5,000 bytes, the limit is 1,000" in str(info.value)
    assert len(out.items) == 1
    assert src.position() == {"offset": len(header) + 2, "line": line - 1}


def test_max_line_bytes_is_checked() -> None:
    with pytest.raises(ValueError, match=r"max_line_bytes must be a whole number .* got 0"):
        JsonLinesSource("x", max_line_bytes=0)
    with pytest.raises(ValueError, match=r"max_line_bytes must be .* got 'big'"):
        Csv("x", max_line_bytes="big")  # type: ignore[arg-type]


def test_a_followed_file_skips_an_over_long_line_as_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text("1\n" + "5" * 3000)  # a long line still being written
    clock = sw.VirtualClock()
    src = JsonLinesSource(path, follow=True, poll_interval=1, max_line_bytes=1000)
    ctx, reported = source_context(clock, fails=False)

    async def main() -> list[Any]:
        await src.open(ctx)
        got: list[Any] = []
        first = await src.next_batch(10)
        assert first is not None
        got += first.values
        waiting = asyncio.ensure_future(src.next_batch(10))
        await clock.sleep(2.5)
        assert len(reported) == 1
        assert src.position() == {"offset": 2, "line": 1}  # at the long line till its end
        with path.open("a") as f:
            f.write("5" * 3000 + "\n3\n")
        batch = await waiting
        assert batch is not None
        got += batch.values
        await src.close()
        return got

    assert asyncio.run(main()) == [1, 3]
    assert src.position() == {"offset": path.stat().st_size, "line": 3}


@pytest.mark.parametrize("make", [JsonLinesSource, Csv])
def test_reading_a_long_line_lets_other_tasks_run(tmp_path: Path, make: Any) -> None:
    """A 8 MiB line (no limit) must not hold the event loop for the whole read."""
    path = tmp_path / "in.txt"
    field = "x" * 100_000  # (csv's own limit is 128 KiB per field)
    if make is Csv:
        path.write_text(",".join(f"c{i}" for i in range(84)) + "\n" + ",".join([field] * 84))
    else:
        path.write_text(json.dumps([field] * 84) + "\n")
    src = make(path, max_line_bytes=None)
    ctx, _ = source_context()

    async def main() -> tuple[int, list[Any]]:
        await src.open(ctx)
        ticks = 0
        done = False

        async def ticker() -> None:
            nonlocal ticks
            while not done:
                ticks += 1
                await yield_now()

        task = asyncio.ensure_future(ticker())
        values: list[Any] = []
        while (batch := await src.next_batch(10)) is not None:
            values += batch.values
        done = True
        await task
        await src.close()
        return ticks, values

    ticks, values = asyncio.run(main())
    assert len(values) == 1
    assert ticks >= 4  # one per MiB read, at least


# -- a followed file that is truncated or replaced ---------------------------------------


class _Follower:
    """A followed JsonLines source driven by hand on a virtual clock (dead letters on)."""

    def __init__(self, path: Path, clock: sw.Clock) -> None:
        self.path, self.clock = path, clock
        self.src = JsonLinesSource(path, follow=True, poll_interval=0.1)
        self.ctx, self.reported = source_context(clock, fails=False)
        self.got: list[Any] = []

    async def pull(self, polls: int = 3) -> list[Any]:
        """Everything there is now (waiting up to ``polls`` poll intervals)."""
        new: list[Any] = []
        for _ in range(polls):
            try:
                batch = await asyncio.wait_for(self.src.next_batch(100), 0.25)
            except TimeoutError:
                break
            assert batch is not None
            new += batch.values
        self.got += new
        return new


def _write(path: Path, text: str, mode: str = "a") -> None:
    with path.open(mode) as f:
        f.write(text)


@pytest.mark.slow
def test_a_followed_file_truncated_and_written_again_is_read_from_its_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Truncated, then longer than before by the next poll: no new line is skipped."""
    path = tmp_path / "log.jsonl"
    _write(path, "".join(f"{i}\n" for i in (100, 101, 102)), "w")
    clock = sw.SystemClock()

    async def main() -> _Follower:
        fol = _Follower(path, clock)
        await fol.src.open(fol.ctx)
        assert await fol.pull() == [100, 101, 102]
        _write(path, "".join(f"{i}\n" for i in range(1, 9)), "w")  # 16 bytes, more than 12
        with caplog.at_level(logging.WARNING, logger="sluiceway"):
            assert await fol.pull() == list(range(1, 9))
        _write(path, "9\n")
        assert await fol.pull() == [9]
        assert fol.src.position() == {"offset": 18, "line": 9}
        await fol.src.close()
        return fol

    fol = asyncio.run(watched(main, 5))
    assert fol.reported == []
    assert f"{path} was truncated and written again" in caplog.text
    assert "reading it again from its beginning" in caplog.text


@pytest.mark.slow
def test_a_followed_file_truncated_under_a_partial_line_never_delivers_a_fragment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "log.jsonl"
    _write(path, "1\n2\n12345", "w")  # the last line is still being written
    clock = sw.SystemClock()

    async def main() -> _Follower:
        fol = _Follower(path, clock)
        await fol.src.open(fol.ctx)
        assert await fol.pull() == [1, 2]
        _write(path, "", "w")  # truncated (copytruncate), then the new content comes
        assert await fol.pull() == []
        _write(path, "123456789\n")
        assert await fol.pull() == [123456789]
        await fol.src.close()
        return fol

    with caplog.at_level(logging.WARNING, logger="sluiceway"):
        fol = asyncio.run(watched(main, 5))
    assert [(e.where, e.raw) for e in fol.reported] == [(f"{path}:3", "12345")]
    assert "incomplete line: the file was truncated" in str(fol.reported[0])
    assert f"{path} was truncated (to 0 bytes; 9 had been read)" in caplog.text


@pytest.mark.slow
def test_a_followed_file_that_is_rotated_is_read_to_its_end_then_the_new_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "log.jsonl"
    _write(path, "1\n2\n", "w")
    clock = sw.SystemClock()

    async def main() -> _Follower:
        fol = _Follower(path, clock)
        await fol.src.open(fol.ctx)
        assert await fol.pull() == [1, 2]
        _write(path, "3\n4\n")  # written just before the rotation: must not be lost
        path.rename(tmp_path / "log.jsonl.1")
        assert await fol.pull() == [3, 4]  # the old file, to its end
        _write(path, "5\n6\n", "w")  # the new file
        assert await fol.pull() == [5, 6]
        assert fol.src.position() == {"offset": 4, "line": 2}
        await fol.src.close()
        return fol

    with caplog.at_level(logging.WARNING, logger="sluiceway"):
        fol = asyncio.run(watched(main, 5))
    assert fol.got == [1, 2, 3, 4, 5, 6]
    assert fol.reported == []
    assert f"{path} was replaced by a new file (rotated)" in caplog.text


def test_a_followed_file_that_was_truncated_under_fail_stops_naming_the_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "log.jsonl"
    _write(path, '{"n": 1}\n{"n": ', "w")
    clock = sw.VirtualClock()
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("tail")
    flow.source(sw.sources.JsonLines(path, follow=True, poll_interval=0.5), name="in").sink(out)

    async def main() -> None:
        handle = sw.start(flow, clock=clock)
        await clock.sleep(1)
        assert out.items == [{"n": 1}]
        _write(path, "", "w")
        await clock.sleep(1)
        await handle.wait()

    with pytest.raises(sw.OperatorError, match=rf"{path}:2: incomplete line: the file was trunc"):
        asyncio.run(asyncio.wait_for(main(), 10))  # a watchdog: follow never ends by itself


@pytest.mark.slow
def test_follow_on_the_real_clock_tails_survives_truncation_and_rotation_and_stops(
    tmp_path: Path,
) -> None:
    """The whole follow path on SystemClock: polls, a truncation, a rotation, a stop."""
    path = tmp_path / "log.jsonl"
    _write(path, "0\n", "w")
    out: sw.sinks.Collect[Any] = sw.sinks.Collect()
    dead: sw.sinks.Collect[Any] = sw.sinks.Collect()
    flow = sw.Flow("tail")
    flow.source(
        sw.sources.JsonLines(path, follow=True, poll_interval=0.01),
        name="in",
        on_error=sw.DeadLetter(dead),
    ).sink(out)
    clock = sw.SystemClock()

    async def until(n: int) -> None:
        while len(out.items) < n:
            await clock.sleep(0.005)

    async def during(handle: sw.FlowHandle) -> None:
        await until(1)
        _write(path, "1\n2\n")
        await until(3)
        _write(path, "3\n", "w")  # truncated and written again
        await until(4)
        path.rename(tmp_path / "log.jsonl.1")
        _write(path, "4\n", "w")  # rotated
        await until(5)

    result = sw.testing.run_watched(flow, during=during)
    assert result.stopped
    assert out.items == [0, 1, 2, 3, 4]
    assert dead.items == []


async def watched(main: Callable[[], Awaitable[_T]], seconds: float) -> _T:
    """``main()`` on the real clock under the watchdog: the loop keeps turning, and it
    ends within ``seconds``."""
    async with sw.testing.Watchdog(max_stall=1.0) as dog:
        dog.expect_end_within(seconds, "the test")
        return await main()
