"""Independent readers for the lakehouse tests: the Delta log parsed by hand, with the
data files it lists read by DuckDB (no delta-rs involved)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import duckdb


def delta_log(table: Path) -> list[list[dict[str, Any]]]:
    """The actions of every commit, in version order; asserts the log is well formed:
    versions 0..n without gaps, every line a JSON action, a commitInfo in every commit,
    and an application's txn version only ever growing."""
    files = sorted((table / "_delta_log").glob("*.json"))
    versions = [int(f.stem) for f in files]
    assert versions == list(range(len(versions))), f"gaps in the Delta log: {versions}"
    commits = []
    txn: dict[str, int] = {}
    for f in files:
        actions = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        assert any("commitInfo" in a for a in actions), f"{f.name} has no commitInfo"
        for a in actions:
            if "txn" in a:
                app, version = a["txn"]["appId"], a["txn"]["version"]
                assert version > txn.get(app, 0), f"{f.name}: txn {app} went back to {version}"
                txn[app] = version
        commits.append(actions)
    return commits


def delta_live_files(table: Path) -> list[str]:
    """The data files of the latest version, from the log alone."""
    live: dict[str, None] = {}
    for actions in delta_log(table):
        for a in actions:
            if "add" in a:
                live[unquote(a["add"]["path"])] = None
            elif "remove" in a:
                live.pop(unquote(a["remove"]["path"]), None)
    return [str(table / p) for p in live]


def duckdb_delta_rows(table: Path, columns: str) -> list[tuple[Any, ...]]:
    """``columns`` of every row of the Delta table, read by DuckDB from the files the
    log lists (partition columns from the Hive paths)."""
    files = delta_live_files(table)
    if not files:
        return []
    listed = ", ".join(f"'{f}'" for f in files)
    return duckdb.sql(
        f"SELECT {columns} FROM read_parquet([{listed}], hive_partitioning=true, "
        "union_by_name=true)"
    ).fetchall()
