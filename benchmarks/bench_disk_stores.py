"""Which embedded store backs sluiceway's on-disk keyed state: SQLite, LMDB or RocksDB.

The access pattern of ``sw.state.OnDisk``: per record a point read of a key that is not
in the cache (a miss), and write-back in batches (the cache's dirty keys at a barrier or
when the cache is full), keys and values a few pickled bytes.  Each store runs in its own
child process; the figures are: the rate of loading ``keys`` new keys in write-back
batches, the rate of random point reads of existing keys (misses of a bounded cache) with
their write-back, and the child's peak RSS.

    python benchmarks/bench_disk_stores.py [keys] [store ...]

lmdb and rocksdict are not dependencies of sluiceway; this script finds them when they
are importable (e.g. ``pip install --target /tmp/disk-libs lmdb rocksdict`` and
``PYTHONPATH=/tmp/disk-libs``).  File name avoids pytest's test_*.py pattern.
"""

from __future__ import annotations

import json
import pickle
import random
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

BATCH = 100_000
READS = 500_000

Put = Callable[[Iterable[tuple[bytes, bytes]]], None]
Get = Callable[[bytes], bytes | None]


def _sqlite(path: Path) -> tuple[Put, Get]:
    db = sqlite3.connect(path / "s.sqlite", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("CREATE TABLE s (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")

    def put(items: Iterable[tuple[bytes, bytes]]) -> None:
        db.execute("BEGIN")
        db.executemany("INSERT OR REPLACE INTO s VALUES (?, ?)", items)
        db.execute("COMMIT")

    def get(k: bytes) -> bytes | None:
        row = db.execute("SELECT v FROM s WHERE k = ?", (k,)).fetchone()
        return None if row is None else bytes(row[0])

    return put, get


def _lmdb(path: Path) -> tuple[Put, Get]:
    import lmdb  # noqa: PLC0415 - optional, measured only when installed

    env = lmdb.open(str(path), map_size=1 << 36, sync=False, writemap=True)

    def put(items: Iterable[tuple[bytes, bytes]]) -> None:
        with env.begin(write=True) as txn:
            txn.cursor().putmulti(items)

    def get(k: bytes) -> bytes | None:
        with env.begin() as txn:
            v = txn.get(k)
        return None if v is None else bytes(v)

    return put, get


def _rocksdict(path: Path) -> tuple[Put, Get]:
    import rocksdict  # noqa: PLC0415 - optional, measured only when installed

    opts = rocksdict.Options(raw_mode=True)
    db = rocksdict.Rdict(str(path / "r"), options=opts)

    def put(items: Iterable[tuple[bytes, bytes]]) -> None:
        wb = rocksdict.WriteBatch(raw_mode=True)
        for k, v in items:
            wb.put(k, v)
        db.write(wb)

    def get(k: bytes) -> bytes | None:
        return db.get(k)  # type: ignore[no-any-return]

    return put, get


STORES: dict[str, Callable[[Path], tuple[Put, Get]]] = {
    "sqlite": _sqlite,
    "lmdb": _lmdb,
    "rocksdict": _rocksdict,
}


def child(store: str, keys: int) -> dict[str, Any]:
    dumps = pickle.dumps
    with tempfile.TemporaryDirectory(prefix="sw-bench-store-") as tmp:
        put, get = STORES[store](Path(tmp))
        t0 = time.perf_counter()
        for lo in range(0, keys, BATCH):
            put(
                [
                    (dumps(f"user-{i}"), dumps({"state": i}))
                    for i in range(lo, min(keys, lo + BATCH))
                ]
            )
        load = keys / (time.perf_counter() - t0)
        rnd = random.Random(1)
        t0 = time.perf_counter()
        dirty: list[tuple[bytes, bytes]] = []
        for _ in range(READS):
            k = dumps(f"user-{rnd.randrange(keys)}")
            v = get(k)
            assert v is not None
            dirty.append((k, dumps({"state": pickle.loads(v)["state"] + 1})))
            if len(dirty) == BATCH:
                put(dirty)
                dirty = []
        put(dirty)
        rmw = READS / (time.perf_counter() - t0)
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "store": store,
        "keys": keys,
        "load_per_s": load,
        "miss_rmw_per_s": rmw,
        "peak_rss_mb": rss,
        "disk_mb": size / 2**20,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]))))
        return
    keys = int(sys.argv[1]) if len(sys.argv) > 1 else 2_000_000
    stores = sys.argv[2:] or list(STORES)
    print(f"load average {Path('/proc/loadavg').read_text().split()[:3]}")
    print("| store | keys | load (keys/s) | miss read-modify-write (/s) | peak RSS MB | disk MB |")
    print("|---|---|---|---|---|---|")
    for store in stores:
        out = subprocess.run(
            [sys.executable, __file__, "--child", store, str(keys)],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode:
            print(f"| {store} | failed: {out.stderr.strip().splitlines()[-1:]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {store} | {keys:,} | {r['load_per_s']:,.0f} | {r['miss_rmw_per_s']:,.0f} "
            f"| {r['peak_rss_mb']:,.0f} | {r['disk_mb']:,.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
