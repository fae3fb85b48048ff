"""``sluiceway checkpoints list|inspect|reset DIR``: look into a checkpoint store (a
directory, or a PostgreSQL store given by its ``postgresql://`` URL).

::

    sluiceway checkpoints list DIR             # a table, newest first, with each one's status
    sluiceway checkpoints inspect DIR [ID]     # one checkpoint (default: the newest) by operator
    sluiceway checkpoints inspect DIR --json   # the same, for scripts
    sluiceway checkpoints reset DIR --yes      # delete every checkpoint
    ... --flow NAME                            # only that flow's (several flows share DIR)

``list`` and ``inspect`` also check every part's signature with the checkpoint keys
available here (the same as ``sluiceway run`` uses, or ``--key-file``; they never create
a key): a checkpoint is ``ok`` only if it is complete *and* every part verifies; else its
status says ``torn``, ``wrong key``, ``altered`` or ``unauthenticated``, and why.

``reset`` says what it means for the outputs: the next run of each flow it reset starts
from the beginning of its input, and a sink that appends gets a second copy of what it
already holds.

Exit codes, as for the rest of the ``sluiceway`` command: 0 done; 1 the store is damaged
or not a store, or the inspected checkpoint does not verify; 2 the command line is wrong
(no store in DIR, no such checkpoint id, ``reset`` without ``--yes`` and no terminal to
ask on).  ``list`` shows torn checkpoints in its status column and still exits 0.

:func:`add_checkpoints_command` registers the subcommand on the ``sluiceway`` parser;
:func:`run_checkpoints_command` carries it out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sluiceway.checkpoint import codec
from sluiceway.checkpoint.keys import KeyRing, load_keys
from sluiceway.checkpoint.store import (
    CheckpointInfo,
    CheckpointNotFoundError,
    CheckpointStore,
    PartInfo,
    is_url,
)
from sluiceway.errors import CheckpointError, CliError

__all__ = ["add_checkpoints_command", "format_bytes", "run_checkpoints_command"]

_EXIT_FAILED: Final = 1  # as in sluiceway.cli: a damaged store, a torn checkpoint
_EXIT_USAGE: Final = 2  # as in sluiceway.cli: the command line names nothing usable
_SHA_PREFIX: Final = 12
_UNITS: Final = ("KiB", "MiB", "GiB", "TiB")
_KIB: Final = 1024


def format_bytes(n: int) -> str:
    """A byte count for people: bytes below 1 KiB, else one decimal in binary units.

    >>> format_bytes(0), format_bytes(1023), format_bytes(1536), format_bytes(5 * 2**30)
    ('0 B', '1023 B', '1.5 KiB', '5.0 GiB')
    """
    if n < _KIB:
        return f"{n} B"
    value = float(n)
    for unit in _UNITS:
        value /= _KIB
        if value < _KIB or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def format_utc(epoch: float) -> str:
    """Epoch seconds as a UTC ISO 8601 time, to the second.

    >>> format_utc(1_700_000_000.4)
    '2023-11-14T22:13:20Z'
    """
    try:
        return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):  # not a time a datetime can hold
        return f"{epoch!r} (epoch seconds)"


def add_checkpoints_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    log_level: Callable[[str], str],
) -> argparse.ArgumentParser:
    """Add ``checkpoints list|inspect|reset`` to the ``sluiceway`` parser's subcommands.

    Args:
        commands: what ``ArgumentParser.add_subparsers()`` returned.
        log_level: the ``--log-level`` argument type of the main parser.

    Returns:
        The ``checkpoints`` parser.
    """
    logging_options = argparse.ArgumentParser(add_help=False)
    logging_options.add_argument(
        "--log-level",
        type=log_level,
        default="warning",
        metavar="LEVEL",
        help="debug, info, warning, error or critical (default: %(default)s); "
        "debug also prints tracebacks",
    )
    directory = argparse.ArgumentParser(add_help=False)
    directory.add_argument(
        "directory",
        metavar="DIR",
        type=_location,
        help="the checkpoint directory (the one given to `sluiceway run --checkpoint-dir`), "
        "which holds checkpoints.db, or a PostgreSQL store: postgresql://USER@HOST/DB?schema=NAME",
    )
    directory.add_argument(
        "--flow",
        metavar="NAME",
        default=None,
        help="only the checkpoints of this flow (flows that share DIR keep their own)",
    )
    verifying = argparse.ArgumentParser(add_help=False)
    verifying.add_argument(
        "--key-file",
        metavar="PATH",
        type=Path,
        default=None,
        help="verify signatures with the key(s) in this file (default: as `sluiceway run`: "
        "SLUICEWAY_CHECKPOINT_KEY, SLUICEWAY_CHECKPOINT_KEY_FILE, else your own key in "
        "~/.config/sluiceway/)",
    )

    checkpoints = commands.add_parser(
        "checkpoints",
        help="list, inspect or reset the checkpoints in a directory",
        description="Look into a checkpoint store: list its checkpoints, inspect one "
        "operator by operator, or delete them all.",
    )
    actions = checkpoints.add_subparsers(
        dest="checkpoints_action", metavar="ACTION", title="actions", required=True
    )

    listing = actions.add_parser(
        "list",
        parents=[directory, verifying, logging_options],
        help="a table of the checkpoints, newest first, with whether each verifies",
        description="List the checkpoints in DIR, newest first: id, flow, when taken (UTC), "
        "size, operators, whether final, and status: ok (complete, every part signed by an "
        "available key), or torn / wrong key / altered / unauthenticated, and why.",
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=run_checkpoints_command)

    inspect = actions.add_parser(
        "inspect",
        parents=[directory, verifying, logging_options],
        help="one checkpoint (default: the newest), operator by operator",
        description="Show one checkpoint: its info and, per operator, name, kind, bytes, "
        "sha256, the key that signed it, whether it verifies, and the classes of the user "
        "objects it holds (none: data only).  Exits 1 if it does not verify.",
    )
    inspect.add_argument(
        "id",
        metavar="ID",
        nargs="?",
        type=_checkpoint_id,
        default=None,
        help="the checkpoint id (default: the newest)",
    )
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(handler=run_checkpoints_command)

    reset = actions.add_parser(
        "reset",
        parents=[directory, logging_options],
        help="delete every checkpoint in DIR",
        description="Delete every checkpoint in DIR (or of --flow NAME), so the next run "
        "starts from the beginning of its input: a sink that appends to its output (a "
        "JsonLines file, an append-mode table) then gets a second copy of what it already "
        "holds; move or empty such outputs first.  Checkpoint ids keep counting up.  Asks "
        "first on a terminal; elsewhere pass --yes.",
    )
    reset.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    reset.set_defaults(handler=run_checkpoints_command)
    return checkpoints


def _checkpoint_id(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a checkpoint id (a whole number >= 1), got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be a checkpoint id (a whole number >= 1), got {text!r}"
        )
    return value


def run_checkpoints_command(args: argparse.Namespace) -> int:
    """Carry out ``sluiceway checkpoints ACTION DIR ...``; returns the exit code.

    Raises:
        CliError: no store in DIR, no such id, a damaged store, a refused reset.
    """
    directory = _store_directory(args.directory)
    try:
        with CheckpointStore(directory) as store:
            if args.checkpoints_action == "list":
                keys = load_keys(key_file=args.key_file, checkpoint_dir=directory, create=False)
                return _list(store, directory, args.flow, keys, as_json=args.json)
            if args.checkpoints_action == "inspect":
                keys = load_keys(key_file=args.key_file, checkpoint_dir=directory, create=False)
                return _inspect(store, args.id, args.flow, keys, as_json=args.json)
            return _reset(store, args.flow, confirmed=args.yes)
    except CheckpointNotFoundError as exc:
        raise CliError(str(exc), _EXIT_USAGE) from exc
    except CheckpointError as exc:
        raise CliError(str(exc), _EXIT_FAILED) from exc


def _location(given: str) -> str | Path:
    """A PostgreSQL URL as it is, anything else a path."""
    return given if is_url(given) else Path(given)


def _store_directory(given: str | Path) -> str | Path:
    """The directory holding the store; also accepts the path of the store file itself.
    A PostgreSQL URL must name a schema that holds a store."""
    if isinstance(given, str):
        from sluiceway.checkpoint.postgres import has_store, split_url  # noqa: PLC0415

        try:
            _, schema, where = split_url(given)
            found = has_store(given)
        except (ValueError, CheckpointError) as exc:
            raise CliError(str(exc), _EXIT_USAGE) from exc
        if not found:
            raise CliError(
                f"no checkpoint store in {where} (schema {schema!r} holds none); give the "
                "URL passed to `sluiceway run --checkpoint-dir`, with its ?schema=",
                _EXIT_USAGE,
            )
        return given
    if given.is_file():
        if given.name == CheckpointStore.FILENAME:
            return given.parent
        raise CliError(
            f"{given} is a file; give the checkpoint directory, which holds "
            f"{CheckpointStore.FILENAME}",
            _EXIT_USAGE,
        )
    store_file = given / CheckpointStore.FILENAME
    if not given.is_dir():
        raise CliError(f"no checkpoint directory {given} (it does not exist)", _EXIT_USAGE)
    if not store_file.exists():
        raise CliError(
            f"no checkpoint store in {given} ({store_file} does not exist); give the "
            "directory passed to `sluiceway run --checkpoint-dir`",
            _EXIT_USAGE,
        )
    return given


def _write(line: str = "") -> None:
    sys.stdout.write(line + "\n")


_TORN: Final = "torn"


def _verdicts(
    store: CheckpointStore, info: CheckpointInfo, keys: KeyRing | None
) -> tuple[dict[str, codec.Verdict], frozenset[str]]:
    """Each part's signature check, and each segment's of every chain the checkpoint
    references (by :func:`codec.segment_label`), and the parts' names (the checkpoint
    must be complete: not torn)."""
    ckpt = store.load(info.id, info.flow)
    verdicts = codec.checkpoint_verdicts(ckpt.states, ckpt.chains, keys, flow=info.flow)
    return verdicts, frozenset(ckpt.states)


def _check(
    store: CheckpointStore, info: CheckpointInfo, problem: str | None, keys: KeyRing | None
) -> tuple[str, str, dict[str, codec.Verdict]]:
    """(auth: ok / torn / wrong key / altered / unauthenticated, status line, verdicts)."""
    if problem is not None:
        return _TORN, f"{_TORN}: {problem}", {}
    verdicts, parts = _verdicts(store, info, keys)
    failed = [(name, v) for name, v in verdicts.items() if not v.ok]
    if not failed:
        return "ok", "ok", verdicts
    order = [codec.PartStatus.ALTERED, codec.PartStatus.WRONG_KEY, codec.PartStatus.UNAUTHENTICATED]
    name, worst = min(failed, key=lambda f: order.index(f[1].status))
    others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    what = f"operator {name!r}" if name in parts else f"segment {name}"
    status = f"{worst.status.value}: {what}: {worst.reason}{others}"
    return worst.status.value, status, verdicts


def _info_json(info: CheckpointInfo, auth: str, status: str) -> dict[str, Any]:
    data = asdict(info)
    data["created_utc"] = format_utc(info.created)
    data["ok"] = auth == "ok"
    data["auth"] = auth
    data["status"] = status
    return data


def _keys_line(keys: KeyRing | None) -> str:
    if keys is None:
        return (
            "no checkpoint key here (none configured, no default key yet): signatures "
            "cannot be verified; see --key-file"
        )
    return f"signatures checked with {keys.describe()}"


def _keys_json(keys: KeyRing | None) -> dict[str, Any] | None:
    if keys is None:
        return None
    return {"source": keys.source, "ids": [k.id for k in keys.keys]}


def _list(
    store: CheckpointStore,
    directory: str | Path,
    flow: str | None,
    keys: KeyRing | None,
    *,
    as_json: bool,
) -> int:
    found = [(info, *_check(store, info, problem, keys)[:2]) for info, problem in store.list(flow)]
    if as_json:
        payload = {
            "store": store.where,
            "keys": _keys_json(keys),
            "checkpoints": [_info_json(info, auth, status) for info, auth, status in found],
        }
        _write(json.dumps(payload, indent=2))
        return 0
    if not found:
        shown = directory if isinstance(directory, Path) else store.where  # no password
        _write(f"no checkpoints{_of(flow)} in {shown}")
        return 0
    header = (
        "ID",
        "FLOW",
        "CREATED (UTC)",
        "SIZE",
        "BASES",
        "DELTAS",
        "OPERATORS",
        "FINAL",
        "STATUS",
    )
    rows = [
        (
            str(info.id),
            info.flow,
            format_utc(info.created),
            format_bytes(info.size),
            format_bytes(info.base_bytes) if info.base_bytes else "-",
            format_bytes(info.delta_bytes) if info.delta_bytes else "-",
            str(info.operators),
            "yes" if info.final else "no",
            status,
        )
        for info, _, status in found
    ]
    right = {0, 3, 4, 5, 6}  # numbers line up on the right
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        _write("  ".join(cells).rstrip())
    counts: dict[str, int] = {}
    for _, auth, _ in found:
        if auth != "ok":
            counts[auth] = counts.get(auth, 0) + 1
    summary = f"{len(found)} checkpoint{'s' if len(found) != 1 else ''} in {store.where}"
    _write(summary + "".join(f", {n} {auth}" for auth, n in counts.items()))
    _write(_keys_line(keys))
    return 0


def _of(flow: str | None) -> str:
    return "" if flow is None else f" of flow {flow!r}"


def _inspect(
    store: CheckpointStore,
    checkpoint_id: int | None,
    flow: str | None,
    keys: KeyRing | None,
    *,
    as_json: bool,
) -> int:
    found = store.list(flow)
    if not found:
        raise CheckpointNotFoundError(f"no checkpoints{_of(flow)} in {store.where} to inspect")
    several = len({i.flow for i, _ in found}) > 1
    if checkpoint_id is None:
        info, problem = max(found, key=lambda f: (f[0].created, f[0].id))
    else:
        matches = [(i, p) for i, p in found if i.id == checkpoint_id]
        if not matches:
            ids = ", ".join(
                f"{i.flow}/{i.id}" if several else str(i.id)
                for i, _ in sorted(found, key=lambda f: (f[0].flow, f[0].id))
            )
            raise CheckpointNotFoundError(
                f"no checkpoint {checkpoint_id}{_of(flow)} in {store.where} (checkpoints "
                f"there: {ids})"
            )
        if len(matches) > 1:
            names = ", ".join(repr(i.flow) for i, _ in matches)
            raise CliError(
                f"flows {names} each have a checkpoint {checkpoint_id} in {store.where}; "
                "say which with --flow NAME",
                _EXIT_USAGE,
            )
        info, problem = matches[0]
    parts = store.parts(info.id, info.flow)
    auth, status, verdicts = _check(store, info, problem, keys)
    code = 0 if auth == "ok" else _EXIT_FAILED
    if as_json:
        payload = _info_json(info, auth, status)
        payload["store"] = store.where
        payload["keys"] = _keys_json(keys)
        payload["parts"] = [_part_json(p, verdicts.get(p.name), verdicts) for p in parts]
        _write(json.dumps(payload, indent=2))
        return code
    _write(f"checkpoint {info.id} of flow {info.flow!r} in {store.where}")
    for label, value in [
        ("created", format_utc(info.created)),
        ("duration", f"{info.duration:.3f} s"),
        ("size", f"{format_bytes(info.size)} ({info.size:,} bytes)"),
        ("bases written", f"{format_bytes(info.base_bytes)} ({info.base_bytes:,} bytes)"),
        ("deltas written", f"{format_bytes(info.delta_bytes)} ({info.delta_bytes:,} bytes)"),
        ("operators", str(info.operators)),
        ("final", "yes" if info.final else "no"),
        ("format version", str(info.format_version)),
        ("status", status),
        ("keys", _keys_line(keys)),
    ]:
        _write(f"  {label + ':':<16}{value}")
    _write(_parts_table(parts, verdicts))
    return code


def _chain(
    verdicts: dict[str, codec.Verdict], part: PartInfo, partition: str
) -> list[codec.Verdict]:
    """The verdicts of one chain's segments (base first)."""
    prefix = f"{part.name!r} partition {partition} "
    return [v for label, v in verdicts.items() if label.startswith(prefix)]


def _chain_verdict(chain: list[codec.Verdict]) -> codec.Verdict | None:
    """One chain as one verdict: its first failing segment's, else ok with every
    segment's user objects summed (None: not verified)."""
    if not chain:
        return None
    bad = [v for v in chain if not v.ok]
    if bad:
        return bad[0]
    types = sorted({t for v in chain for t in v.user_types})
    keys = ",".join(sorted({v.key_id or "-" for v in chain}))
    return codec.Verdict(
        codec.PartStatus.OK, "", keys, tuple(types), sum(v.user_objects for v in chain)
    )


def _part_json(
    part: PartInfo, verdict: codec.Verdict | None, verdicts: dict[str, codec.Verdict]
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": part.name,
        "kind": part.kind,
        "bytes": part.size,
        "sha256": part.sha256,
    }
    if verdict is not None:
        data["auth"] = verdict.status.value
        data["key_id"] = verdict.key_id
        data["user_objects"] = verdict.user_objects
        data["user_types"] = list(verdict.user_types)
    if part.incremental:
        data["chains"] = []
        for c in part.chains:
            chain = _chain_verdict(_chain(verdicts, part, c.partition))
            data["chains"].append(
                {
                    "partition": c.partition,
                    "base_bytes": c.base_size,
                    "deltas": c.deltas,
                    "delta_bytes": c.delta_size,
                    "auth": None if chain is None else chain.status.value,
                    "user_objects": None if chain is None else chain.user_objects,
                    "user_types": [] if chain is None else list(chain.user_types),
                }
            )
    return data


def _user_cell(verdict: codec.Verdict | None) -> str:
    """What the part's user section holds: "-" for data only ("?" if unverified)."""
    if verdict is None or not verdict.ok:
        return "?"
    if not verdict.user_objects:
        return "-"
    names = ", ".join(verdict.user_types[:3]) + (", ..." if len(verdict.user_types) > 3 else "")
    return f"{verdict.user_objects:,} ({names})"


def _parts_table(parts: list[PartInfo], verdicts: dict[str, codec.Verdict]) -> str:
    if not parts:
        return "no operator states"
    header = ("OPERATOR", "KIND", "BYTES", "SHA256", "KEY", "AUTH", "USER OBJECTS")
    rows: list[tuple[str, ...]] = []
    for p in parts:
        v = verdicts.get(p.name)
        rows.append(
            (
                p.name,
                p.kind,
                f"{p.size:,}",
                p.sha256[:_SHA_PREFIX],
                (v.key_id or "-") if v is not None else "?",
                v.status.value if v is not None else "?",
                _user_cell(v),
            )
        )
        for c in p.chains:  # an incremental part: a row per partition chain below it
            w = _chain_verdict(_chain(verdicts, p, c.partition))
            rows.append(
                (
                    f"  partition {c.partition}",
                    "base+deltas",
                    f"{c.base_size:,}+{c.delta_size:,}",
                    f"{c.deltas} delta{'s' if c.deltas != 1 else ''}",
                    (w.key_id or "-") if w is not None else "?",
                    w.status.value if w is not None else "?",
                    _user_cell(w),
                )
            )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(widths[i]) if i == 2 else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append(("  " + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def _reset(store: CheckpointStore, flow: str | None, *, confirmed: bool) -> int:
    def what(n: int) -> str:
        return f"{n} checkpoint{'s' if n != 1 else ''}{_of(flow)} in {store.where}"

    if not confirmed:
        count = len(store.list(flow))
        if count == 0:
            _write(f"no checkpoints{_of(flow)} in {store.where}; nothing to delete")
            return 0
        counted = what(count)
        if not sys.stdin.isatty():
            raise CliError(
                f"refusing to delete {counted} without confirmation: pass --yes",
                _EXIT_USAGE,
            )
        sys.stderr.write(f"delete all {counted}? [y/N] ")
        sys.stderr.flush()
        if sys.stdin.readline().strip().lower() not in {"y", "yes"}:
            _write("nothing deleted")
            return _EXIT_FAILED
    flows = store.flows() if flow is None else [flow]
    flows = [f for f in flows if store.list(f)]
    deleted = store.reset(flow)
    next_id = store.next_id(flow)
    _write(
        f"deleted {deleted} checkpoint{'s' if deleted != 1 else ''}{_of(flow)} from "
        f"{store.where} (the next checkpoint id is {next_id})"
    )
    if flows:
        names = ", ".join(repr(f) for f in flows)
        sys.stderr.write(
            f"warning: the next run of {'flow' if len(flows) == 1 else 'flows'} {names} "
            "starts from the beginning of its input: a sink that appends (sinks.JsonLines, "
            "an append-mode table, a broker topic) gets a second copy of what it already "
            "holds; move or empty such outputs before that run\n"
        )
    return 0
