"""`sluiceway checkpoints list|inspect|reset DIR`, through ``sluiceway.cli.main``."""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
from pathlib import Path

import pytest

from sluiceway import cli
from sluiceway.checkpoint import CheckpointStore, OperatorState, Segment
from sluiceway.checkpoint.cli import format_bytes, format_utc
from sluiceway.checkpoint.codec import encode, part_context, segment_context
from sluiceway.checkpoint.keys import load_keys

CREATED = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.fixture(autouse=True)
def _no_global_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    # The CLI configures the root logger of its own process; not of the test runner's.
    monkeypatch.setattr(cli, "_configure_logging", lambda level: None)


def signed(flow: str, name: str, kind: str, value: object) -> OperatorState:
    """A part as the runtime writes it: signed with the key it would use (the suite's own
    default key, see conftest.py)."""
    keys = load_keys()
    assert keys is not None
    return OperatorState(name, kind, encode(value, keys.current, part_context(flow, name, kind)))


def clicks(n: int) -> bytes:
    return signed("orders", "clicks", "source", f"offset={n}".encode()).data


def totals(n: int) -> bytes:
    return signed("orders", "totals", "window", b"w" * 2048 * n).data


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """Checkpoints 2, 3 and 4 of flow 'orders' (1 was pruned); 4 is final."""
    with CheckpointStore(tmp_path) as store:
        for n in range(1, 5):
            store.save(
                "orders",
                n,
                {
                    "clicks": OperatorState("clicks", "source", clicks(n)),
                    "totals": OperatorState("totals", "window", totals(n)),
                },
                created=CREATED + n,
                duration=0.125,
                final=n == 4,
            )
    return tmp_path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def tear(directory: Path, checkpoint_id: int) -> None:
    with sqlite3.connect(directory / CheckpointStore.FILENAME) as conn:
        conn.execute(
            "DELETE FROM parts WHERE checkpoint_id = ? AND name = 'totals'", (checkpoint_id,)
        )
    conn.close()


# -- list -----------------------------------------------------------------------------


def test_list_prints_a_table_newest_first(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(["checkpoints", "list", str(store_dir)], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID", "FLOW", "CREATED", "(UTC)", "SIZE", "BASES", "DELTAS", "OPERATORS", "FINAL",
        "STATUS",
    ]  # fmt: skip
    assert lines[1].split() == [
        "4",
        "orders",
        "2023-11-14T22:13:24Z",
        "8.2",
        "KiB",
        "-",
        "-",
        "2",
        "yes",
        "ok",
    ]
    assert lines[2].split() == [
        "3",
        "orders",
        "2023-11-14T22:13:23Z",
        "6.2",
        "KiB",
        "-",
        "-",
        "2",
        "no",
        "ok",
    ]
    assert lines[3].split()[0] == "2"
    assert lines[4] == f"3 checkpoints in {store_dir / 'checkpoints.db'}"
    assert lines[5].startswith(f"signatures checked with key {load_keys().current.id} from ")  # type: ignore[union-attr]
    assert len(lines) == 6


def test_list_shows_why_a_checkpoint_is_torn(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tear(store_dir, 4)
    code, out, _ = run_cli(["checkpoints", "list", str(store_dir)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[1].endswith("torn: 2 operator states recorded but 1 stored")
    assert lines[2].endswith("ok")
    assert lines[-2].endswith(", 1 torn")


def test_list_json(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["checkpoints", "list", str(store_dir), "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["store"] == str(store_dir / "checkpoints.db")
    assert [c["id"] for c in data["checkpoints"]] == [4, 3, 2]
    assert data["checkpoints"][0] == {
        "id": 4,
        "flow": "orders",
        "created": CREATED + 4,
        "created_utc": "2023-11-14T22:13:24Z",
        "duration": 0.125,
        "size": len(clicks(4)) + len(totals(4)),
        "operators": 2,
        "final": True,
        "format_version": 3,
        "base_bytes": 0,
        "delta_bytes": 0,
        "ok": True,
        "auth": "ok",
        "status": "ok",
    }


def test_list_of_an_empty_store(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with CheckpointStore(store_dir) as store:
        store.reset()
    code, out, _ = run_cli(["checkpoints", "list", str(store_dir)], capsys)
    assert (code, out) == (0, f"no checkpoints in {store_dir}\n")


def test_the_store_file_itself_is_accepted(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_cli(["checkpoints", "list", str(store_dir / "checkpoints.db")], capsys)
    assert code == 0
    assert out.splitlines()[1].split()[0] == "4"


@pytest.mark.parametrize("action", [["list"], ["inspect"], ["reset", "--yes"]])
def test_a_directory_without_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: list[str]
) -> None:
    code, out, err = run_cli(["checkpoints", action[0], str(tmp_path), *action[1:]], capsys)
    assert code == 2
    assert out == ""
    assert err == (
        f"sluiceway: error: no checkpoint store in {tmp_path} ({tmp_path / 'checkpoints.db'} "
        "does not exist); give the directory passed to `sluiceway run --checkpoint-dir`\n"
    )
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    code, _, err = run_cli(["checkpoints", "list", str(missing)], capsys)
    assert code == 2
    assert err == f"sluiceway: error: no checkpoint directory {missing} (it does not exist)\n"
    assert not missing.exists()


def test_another_file_in_place_of_the_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    code, _, err = run_cli(["checkpoints", "list", str(other)], capsys)
    assert code == 2
    assert f"{other} is a file; give the checkpoint directory" in err


def test_a_damaged_store_exits_1_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "checkpoints.db").write_bytes(b"garbage" * 1000)
    for action in ("list", "inspect"):
        code, out, err = run_cli(["checkpoints", action, str(tmp_path)], capsys)
        assert code == 1
        assert out == ""
        assert err.startswith(
            f"sluiceway: error: {tmp_path / 'checkpoints.db'} is not a readable sluiceway "
            "checkpoint store: SQLite says 'file is not a database'"
        )
        assert err.count("\n") == 1


# -- inspect --------------------------------------------------------------------------


def test_inspect_the_newest(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["checkpoints", "inspect", str(store_dir)], capsys)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"checkpoint 4 of flow 'orders' in {store_dir / 'checkpoints.db'}"
    assert "  created:        2023-11-14T22:13:24Z" in lines
    assert "  duration:       0.125 s" in lines
    size = len(clicks(4)) + len(totals(4))
    assert f"  size:           8.2 KiB ({size:,} bytes)" in lines
    assert "  operators:      2" in lines
    assert "  final:          yes" in lines
    assert "  format version: 3" in lines
    assert "  status:         ok" in lines
    key = load_keys().current.id  # type: ignore[union-attr]
    table = lines[lines.index("  status:         ok") + 2 :]
    assert [row.split() for row in table] == [
        ["OPERATOR", "KIND", "BYTES", "SHA256", "KEY", "AUTH", "USER", "OBJECTS"],
        [
            "clicks",
            "source",
            f"{len(clicks(4)):,}",
            hashlib.sha256(clicks(4)).hexdigest()[:12],
            key,
            "ok",
            "-",
        ],
        [
            "totals",
            "window",
            f"{len(totals(4)):,}",
            hashlib.sha256(totals(4)).hexdigest()[:12],
            key,
            "ok",
            "-",
        ],
    ]


def test_inspect_an_id_as_json(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(["checkpoints", "inspect", str(store_dir), "2", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["id"] == 2
    assert data["final"] is False
    assert data["status"] == "ok"
    assert data["store"] == str(store_dir / "checkpoints.db")
    key = load_keys().current.id  # type: ignore[union-attr]
    assert data["parts"] == [
        {
            "name": "clicks",
            "kind": "source",
            "bytes": len(clicks(2)),
            "sha256": hashlib.sha256(clicks(2)).hexdigest(),
            "auth": "ok",
            "key_id": key,
            "user_objects": 0,
            "user_types": [],
        },
        {
            "name": "totals",
            "kind": "window",
            "bytes": len(totals(2)),
            "sha256": hashlib.sha256(totals(2)).hexdigest(),
            "auth": "ok",
            "key_id": key,
            "user_objects": 0,
            "user_types": [],
        },
    ]


def test_inspect_a_torn_checkpoint_exits_1(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tear(store_dir, 3)
    code, out, _ = run_cli(["checkpoints", "inspect", str(store_dir), "3"], capsys)
    assert code == 1
    assert "  status:         torn: 2 operator states recorded but 1 stored" in out.splitlines()
    code, out, _ = run_cli(["checkpoints", "inspect", str(store_dir), "3", "--json"], capsys)
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False
    assert [p["name"] for p in data["parts"]] == ["clicks"]


def test_inspect_an_absent_id(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["checkpoints", "inspect", str(store_dir), "1"], capsys)
    assert code == 2
    assert out == ""
    assert err == (
        f"sluiceway: error: no checkpoint 1 in {store_dir / 'checkpoints.db'} "
        "(checkpoints there: 2, 3, 4)\n"
    )


@pytest.mark.parametrize("bad", ["x", "0", "-3", "1.5"])
def test_inspect_a_bad_id(store_dir: Path, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["checkpoints", "inspect", str(store_dir), bad])
    assert info.value.code == 2
    assert f"must be a checkpoint id (a whole number >= 1), got {bad!r}" in capsys.readouterr().err


def test_inspect_an_empty_store(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with CheckpointStore(store_dir) as store:
        store.reset()
    code, _, err = run_cli(["checkpoints", "inspect", str(store_dir)], capsys)
    assert code == 2
    assert err == f"sluiceway: error: no checkpoints in {store_dir / 'checkpoints.db'} to inspect\n"


# -- reset ----------------------------------------------------------------------------


def test_reset_without_yes_off_a_terminal_refuses(
    store_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # not a terminal, even if it says y
    code, out, err = run_cli(["checkpoints", "reset", str(store_dir)], capsys)
    assert code == 2
    assert out == ""
    assert err == (
        f"sluiceway: error: refusing to delete 3 checkpoints in {store_dir / 'checkpoints.db'} "
        "without confirmation: pass --yes\n"
    )
    with CheckpointStore(store_dir) as store:
        assert len(store.list()) == 3


RESET_WARNING = (
    "warning: the next run of flow 'orders' starts from the beginning of its input: a sink "
    "that appends (sinks.JsonLines, an append-mode table, a broker topic) gets a second "
    "copy of what it already holds; move or empty such outputs before that run\n"
)


def test_reset_with_yes_deletes_all(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(["checkpoints", "reset", str(store_dir), "--yes"], capsys)
    assert code == 0
    assert out == (
        f"deleted 3 checkpoints from {store_dir / 'checkpoints.db'} (the next checkpoint id is 5)\n"
    )
    assert err == RESET_WARNING  # says what a rerun does to appending sinks
    with CheckpointStore(store_dir) as store:
        assert store.list() == []
    code, out, err = run_cli(["checkpoints", "reset", str(store_dir), "--yes"], capsys)
    assert (code, err) == (0, "")  # nothing was reset: nothing to warn about
    assert out.startswith("deleted 0 checkpoints from")


def test_reset_and_inspect_of_one_flow_among_several(
    store_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with CheckpointStore(store_dir) as store:
        for n in (1, 2, 3):
            part = signed("audit", "a", "source", b"x")
            store.save("audit", n, {"a": part}, created=CREATED, duration=0)
    code, out, err = run_cli(["checkpoints", "inspect", str(store_dir), "3"], capsys)
    assert code == 2
    assert err == (
        f"sluiceway: error: flows 'audit', 'orders' each have a checkpoint 3 in "
        f"{store_dir / 'checkpoints.db'}; say which with --flow NAME\n"
    )
    code, out, _ = run_cli(
        ["checkpoints", "inspect", str(store_dir), "3", "--flow", "audit"], capsys
    )
    assert code == 0
    assert out.startswith("checkpoint 3 of flow 'audit' in")
    code, out, err = run_cli(
        ["checkpoints", "reset", str(store_dir), "--flow", "orders", "--yes"], capsys
    )
    assert code == 0
    assert out.startswith("deleted 3 checkpoints of flow 'orders' from")
    assert err == RESET_WARNING
    with CheckpointStore(store_dir) as store:
        assert store.flows() == ["audit"]
    code, out, _ = run_cli(["checkpoints", "list", str(store_dir), "--flow", "orders"], capsys)
    assert (code, out) == (0, f"no checkpoints of flow 'orders' in {store_dir}\n")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "code", "left"), [("y\n", 0, 0), ("\n", 1, 3), ("no\n", 1, 3)])
def test_reset_on_a_terminal_asks(
    store_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    answer: str,
    code: int,
    left: int,
) -> None:
    monkeypatch.setattr("sys.stdin", _Terminal(answer))
    got, out, err = run_cli(["checkpoints", "reset", str(store_dir)], capsys)
    assert got == code
    question = f"delete all 3 checkpoints in {store_dir / 'checkpoints.db'}? [y/N] "
    assert err == question + (RESET_WARNING if left == 0 else "")
    assert out.startswith("deleted 3" if left == 0 else "nothing deleted")
    with CheckpointStore(store_dir) as store:
        assert len(store.list()) == left


def test_checkpoints_needs_an_action(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["checkpoints"])
    assert info.value.code == 2
    assert "required: ACTION" in capsys.readouterr().err


def test_help_lists_the_checkpoints_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "checkpoints" in capsys.readouterr().out


# -- formatting -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (10 * 2**20, "10.0 MiB"),
        (2**50, "1024.0 TiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_format_utc_of_a_time_out_of_range() -> None:
    assert format_utc(1e20) == "1e+20 (epoch seconds)"


def test_list_and_inspect_show_bases_and_deltas(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = load_keys()
    assert keys is not None
    key = keys.current
    sizes = []
    with CheckpointStore(tmp_path) as store:
        for n, whole, body in ((1, True, b"b" * 3000), (2, False, b"d" * 500)):
            seg = Segment(
                whole, encode(body, key, segment_context("counts", "sum", "-", base=whole))
            )
            sizes.append(len(seg.data))
            data = encode(None, key, part_context("counts", "sum", "stateful_map"))
            store.save(
                "counts",
                n,
                {"sum": OperatorState("sum", "stateful_map", data, {"-": seg})},
                created=CREATED + n,
                duration=0.1,
                parent=n - 1 or None,
            )
    base, delta = sizes
    code, out, _ = run_cli(["checkpoints", "list", str(tmp_path)], capsys)
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:3]]
    assert [r[5:8] for r in rows] == [
        ["-", *format_bytes(delta).split()],
        [*format_bytes(base).split(), "-"],
    ]
    assert [r[-1] for r in rows] == ["ok", "ok"]
    code, out, _ = run_cli(["checkpoints", "inspect", str(tmp_path)], capsys)
    assert code == 0
    lines = out.splitlines()
    assert f"  deltas written: {format_bytes(delta)} ({delta} bytes)" in lines
    assert lines[-1].split() == [
        "partition",
        "-",
        "base+deltas",
        f"{base:,}+{delta:,}",
        "1",
        "delta",
        key.id,
        "ok",
        "-",
    ]
    code, out, _ = run_cli(["checkpoints", "inspect", str(tmp_path), "--json"], capsys)
    [part] = json.loads(out)["parts"]
    assert part["chains"] == [
        {
            "partition": "-",
            "base_bytes": base,
            "deltas": 1,
            "delta_bytes": delta,
            "auth": "ok",
            "user_objects": 0,
            "user_types": [],
        }
    ]
