"""CK-PG: what keeping checkpoints in PostgreSQL costs against the SQLite file (issue 15).

The CK-2M state (``key_by(...).stateful_map(sum)`` over 2,000,000 keys, one int each,
bench_checkpoints.py) on each backend, in a fresh child process per measurement:

* ``flow restore``: a new run loads the latest checkpoint (read the store, verify, decode,
  restore the operator), as ``CK-2M-restore`` measures it for SQLite;
* ``save`` / ``load``: the store alone, one whole partition of the same size as the
  flow's encoded state (its base and deltas, in bytes) saved in one transaction, then
  read back and verified by ``latest()``; best of three;
* ``small save``: what most checkpoints write, three parts of 1 kB; the median of 50.

PostgreSQL is the server on ``--url`` (default ``postgresql://postgres@127.0.0.1:5432/test``),
in a schema of the benchmark's own, dropped afterwards; on one machine it measures the
server's work and the protocol, not a network.

Usage: ``python benchmarks/bench_checkpoint_store.py [--quick] [--url URL]``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_checkpoints import fill_keyed, time_keyed_restore
from common import Params, Result, Row, module_main, run_child

import sluiceway as sw
from sluiceway.checkpoint import CheckpointStore, OperatorState
from sluiceway.checkpoint.store import Segment

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
REPEATS = 3
SMALL_SAVES = 50


def _location(params: Params) -> tuple[str, Path | None]:
    if params["backend"] == "sqlite":
        tmp = Path(tempfile.mkdtemp(prefix="sw-ck-pg-"))
        return str(tmp), tmp
    return f"{params['url']}?schema=sw_bench_{uuid.uuid4().hex[:12]}", None


def _drop(location: str, tmp: Path | None) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    from sluiceway.checkpoint.postgres import split_url  # noqa: PLC0415

    conninfo, schema, _ = split_url(location)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def flow_restore(params: Params) -> Result:
    """Child entry: fill ``keys`` keys, stop at a checkpoint, time a new run's restore."""
    keys = int(params["keys"])
    location, tmp = _location(params)
    try:
        ck = sw.Checkpoints(location, interval=2.0)
        fill_keyed(ck, keys)
        with CheckpointStore(location) as store:
            latest = store.latest("ck_keyed")
            assert latest is not None
            chains = [c for part in latest.chains.values() for c in part.values()]
            stored = sum(len(blob) for chain in chains for blob in chain)
        dt, held = time_keyed_restore(ck, keys)
        return {"restore_seconds": dt, "state_entries": held, "stored_bytes": stored}
    finally:
        _drop(location, tmp)


def store_cost(params: Params) -> Result:
    """Child entry: save and load one whole partition of ``size`` bytes, best of three."""
    size = int(params["size"])
    blob = os.urandom(size)
    location, tmp = _location(params)
    saves, loads = [], []
    try:
        with CheckpointStore(location, keep=1) as store:
            for n in range(1, REPEATS + 1):
                part = OperatorState("sum", "map", b"", segments={"0": Segment(True, blob)})
                t0 = time.perf_counter()
                store.save("bench", n, {"sum": part}, created=float(n), duration=0.0)
                saves.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                latest = store.latest("bench")
                loads.append(time.perf_counter() - t0)
                assert latest is not None
                assert latest.chains["sum"]["0"] == (blob,)
            small = []  # what most checkpoints write: a few small parts
            for n in range(REPEATS + 1, REPEATS + 1 + SMALL_SAVES):
                parts = {
                    f"op{i}": OperatorState(f"op{i}", "map", os.urandom(1000)) for i in range(3)
                }
                t0 = time.perf_counter()
                store.save("small", n, parts, created=float(n), duration=0.0)
                small.append(time.perf_counter() - t0)
        return {
            "save_seconds": min(saves),
            "load_seconds": min(loads),
            "small_save_ms": statistics.median(small) * 1000,
        }
    finally:
        _drop(location, tmp)


def run(quick: bool, url: str = DEFAULT_URL) -> tuple[list[Row], Result]:
    keys = 200_000 if quick else 2_000_000
    rows: list[Row] = []
    raw: Result = {}
    for backend in ("sqlite", "postgresql"):
        params = {"backend": backend, "url": url, "keys": keys}
        restored = run_child("bench_checkpoint_store", "flow_restore", params)
        cost = run_child(
            "bench_checkpoint_store", "store_cost", {**params, "size": restored["stored_bytes"]}
        )
        raw[backend] = {**restored, **cost}
        mb = restored["stored_bytes"] / 1e6
        rows.append(
            Row(
                "CK-PG",
                f"{backend}, {keys:,} keys ({mb:.1f} MB stored)",
                f"flow restore {restored['restore_seconds']:.2f} s; store save "
                f"{cost['save_seconds']:.2f} s, load {cost['load_seconds']:.2f} s; a save "
                f"of 3 parts of 1 kB {cost['small_save_ms']:.1f} ms (median of {SMALL_SAVES})",
            )
        )
    return rows, raw


if __name__ == "__main__":
    module_main(
        __doc__ or "",
        run,
        {"flow_restore": flow_restore, "store_cost": store_cost},
        target=("--url", DEFAULT_URL, "the PostgreSQL"),
    )
