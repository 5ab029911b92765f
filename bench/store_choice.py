"""Benchmark: which on-disk format should nbmplock's run store use?

The run store records, for a job over string items, which items are done
(and optionally each item's pickled result).  It must be crash-consistent
(a SIGKILL at any moment loses no done mark already written; a torn last
record is ignored on read) and use group commit: every record reaches the OS
(a write syscall) as soon as it is produced, but fsync happens at most every
0.2 s, never per item or per batch.

Two candidates are compared:

1. SQLite (stdlib ``sqlite3``), WAL mode, ``synchronous=NORMAL`` (commits are
   written to the WAL but only fsynced at checkpoints), one table
   ``(item TEXT PRIMARY KEY, result BLOB)``, one transaction per batch.
2. An append-only log.  Each record is a 12-byte header
   ``<2s magic, u8 kind, u8 flags, u32 payload length, u32 crc32(payload)>``
   (little-endian) followed by the payload: ``pickle(names, protocol=5)``,
   then, if flag HAS_RESULTS is set, ``pickle(results, protocol=5)``.  One
   ``os.write`` per record; ``os.fsync`` at most every 0.2 s and on close.
   The reader stops at the first short, bad-magic or bad-crc record.

Each is run with batches of 10 items (the default save batch) and 1000 items
(a chunk), without and with results (result = ``len(item)``).  Measured per
configuration, median of ``--runs`` repetitions, each in a fresh directory:

* write: open store, write all items batch by batch, close (includes the
  final fsync / checkpoint, and pickling of results);
* read set: open store, build the done-set as a ``set`` of ``str``;
* read dict: open store, build ``dict`` item -> result (results case only);
* bytes on disk (apparent size of all store files after close) against the
  raw bytes (sum of UTF-8 lengths of the items, plus the sum of
  ``len(pickle.dumps(result))`` in the results case).

Reads run against a warm page cache (the files were just written).  Slow
configurations can be measured on fewer items (``--sqlite-b10-items``) and
extrapolated linearly to ``--items``; such rows are marked in the table.

Stdlib only.  Usage::

    python -m bench.store_choice [--items 1000000] [--runs 3]

Prints a Markdown table and writes it to ``bench/results/store_choice.md``.
``python -m bench`` runs it too, as its ``STORE`` study (``--quick``:
100,000 items, one run).
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import platform
import shutil
import sqlite3
import statistics
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

# --------------------------------------------------------------------------
# Append-only log format
# --------------------------------------------------------------------------

MAGIC = b"NB"
KIND_DONE = 1
FLAG_HAS_RESULTS = 0x01
HEADER = struct.Struct("<2sBBII")  # magic, kind, flags, payload len, crc32
assert HEADER.size == 12
FSYNC_INTERVAL = 0.2  # seconds; group-commit window
PICKLE_PROTOCOL = 5


class LogWriter:
    """One ``os.write`` per record, ``os.fsync`` at most every FSYNC_INTERVAL."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.last_fsync = time.monotonic()
        self.fsyncs = 0

    def append(self, names: list[str], results: list | None = None) -> None:
        payload = pickle.dumps(names, PICKLE_PROTOCOL)
        flags = 0
        if results is not None:
            payload += pickle.dumps(results, PICKLE_PROTOCOL)
            flags |= FLAG_HAS_RESULTS
        header = HEADER.pack(MAGIC, KIND_DONE, flags, len(payload), zlib.crc32(payload))
        os.write(self.fd, header + payload)  # reaches the OS now: SIGKILL-safe
        now = time.monotonic()
        if now - self.last_fsync >= FSYNC_INTERVAL:
            os.fsync(self.fd)
            self.last_fsync = now
            self.fsyncs += 1

    def close(self) -> None:
        os.fsync(self.fd)
        self.fsyncs += 1
        os.close(self.fd)


def iter_log_records(path: Path):
    """Yield (flags, payload memoryview) for every intact record.

    Stops at the first torn or corrupt record: with a single appending
    writer, nothing valid can follow it.
    """
    data = path.read_bytes()
    mv = memoryview(data)
    off, end = 0, len(data)
    while off + HEADER.size <= end:
        magic, kind, flags, length, crc = HEADER.unpack_from(mv, off)
        start = off + HEADER.size
        stop = start + length
        if magic != MAGIC or stop > end:
            break
        payload = mv[start:stop]
        if zlib.crc32(payload) != crc:
            break
        if kind == KIND_DONE:
            yield flags, payload
        off = stop


def log_read_set(path: Path) -> set[str]:
    done: set[str] = set()
    for _flags, payload in iter_log_records(path):
        # pickle.loads ignores bytes after the first pickle's STOP opcode.
        done.update(pickle.loads(payload))
    return done


def log_read_dict(path: Path) -> dict:
    out: dict = {}
    for flags, payload in iter_log_records(path):
        if flags & FLAG_HAS_RESULTS:
            buf = io.BytesIO(payload)
            names = pickle.load(buf)
            results = pickle.load(buf)
            out.update(zip(names, results))
        else:
            out.update(dict.fromkeys(pickle.loads(payload)))
    return out


def log_write(dirpath: Path, items: list[str], results: list | None,
              batch: int) -> tuple[list[Path], int]:
    path = dirpath / "run.log"
    w = LogWriter(path)
    for i in range(0, len(items), batch):
        w.append(items[i:i + batch], None if results is None else results[i:i + batch])
    w.close()
    return [path], w.fsyncs


# --------------------------------------------------------------------------
# SQLite
# --------------------------------------------------------------------------

SCHEMA = "CREATE TABLE IF NOT EXISTS done (item TEXT PRIMARY KEY, result BLOB)"


def sqlite_connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def sqlite_write(dirpath: Path, items: list[str], results: list | None,
                 batch: int) -> tuple[list[Path], int | None]:
    path = dirpath / "run.sqlite"
    conn = sqlite_connect(path)
    conn.execute(SCHEMA)
    conn.commit()
    for i in range(0, len(items), batch):
        names = items[i:i + batch]
        if results is None:
            conn.executemany("INSERT INTO done (item) VALUES (?)", [(n,) for n in names])
        else:
            conn.executemany(
                "INSERT INTO done (item, result) VALUES (?, ?)",
                [(n, pickle.dumps(r, PICKLE_PROTOCOL)) for n, r in zip(names, results[i:i + batch])],
            )
        conn.commit()  # one transaction per batch
    conn.close()  # last connection: checkpoints the WAL into the db
    # fsyncs happen inside SQLite (at WAL checkpoints) and are not counted.
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm")], None


def sqlite_read_set(path: Path) -> set[str]:
    conn = sqlite_connect(path)
    try:
        return {item for (item,) in conn.execute("SELECT item FROM done")}
    finally:
        conn.close()


def sqlite_read_dict(path: Path) -> dict:
    conn = sqlite_connect(path)
    loads = pickle.loads
    try:
        return {
            item: (None if blob is None else loads(blob))
            for item, blob in conn.execute("SELECT item, result FROM done")
        }
    finally:
        conn.close()


# --------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------

STORES = {
    "SQLite WAL": (sqlite_write, sqlite_read_set, sqlite_read_dict),
    "append-only log": (log_write, log_read_set, log_read_dict),
}


@dataclass
class Row:
    store: str
    batch: int
    with_results: bool
    measured_items: int
    target_items: int
    write: list[float] = field(default_factory=list)
    read_set: list[float] = field(default_factory=list)
    read_dict: list[float] = field(default_factory=list)
    disk_bytes: int = 0
    fsyncs: list[int] = field(default_factory=list)
    raw_bytes: int = 0

    @property
    def scale(self) -> float:
        return self.target_items / self.measured_items


def make_items(n: int) -> list[str]:
    return [f"item-{i:07d}" for i in range(n)]


def raw_bytes(items: list[str], results: list | None) -> int:
    total = sum(len(s.encode("utf-8")) for s in items)
    if results is not None:
        total += sum(len(pickle.dumps(r)) for r in results)
    return total


def disk_size(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


def check_torn_tail(workdir: Path) -> None:
    """The log reader must ignore a torn last record and keep everything before it."""
    d = workdir / "torn"
    d.mkdir()
    (path,), _ = log_write(d, make_items(25), None, 10)  # records of 10, 10, 5
    size = path.stat().st_size
    for cut in range(1, HEADER.size + 20):
        with open(path, "r+b") as f:
            f.truncate(size - cut)
        got = log_read_set(path)
        assert got == set(make_items(20)), (cut, len(got))
    path.unlink()
    log_write(d, make_items(25), None, 10)
    with open(path, "r+b") as f:  # complete last record, one payload byte flipped
        f.seek(size - 30)
        b = f.read(1)
        f.seek(size - 30)
        f.write(bytes([b[0] ^ 0xFF]))
    assert log_read_set(path) == set(make_items(20))
    shutil.rmtree(d)


def run_config(row: Row, runs: int, workdir: Path) -> None:
    write_fn, read_set_fn, read_dict_fn = STORES[row.store]
    items = make_items(row.measured_items)
    results = [len(s) for s in items] if row.with_results else None
    expected = set(items)
    row.raw_bytes = raw_bytes(items, results)
    for run in range(runs):
        d = workdir / f"{row.store.split()[0]}-b{row.batch}-r{int(row.with_results)}-{run}"
        d.mkdir()
        t0 = time.perf_counter()
        paths, fsyncs = write_fn(d, items, results, row.batch)
        row.write.append(time.perf_counter() - t0)
        if fsyncs is not None:
            row.fsyncs.append(fsyncs)
        row.disk_bytes = disk_size(paths)

        t0 = time.perf_counter()
        done = read_set_fn(paths[0])
        row.read_set.append(time.perf_counter() - t0)
        assert done == expected, f"{row.store}: read {len(done)} of {len(expected)}"
        del done

        if row.with_results:
            t0 = time.perf_counter()
            got = read_dict_fn(paths[0])
            row.read_dict.append(time.perf_counter() - t0)
            assert len(got) == len(items) and got[items[-1]] == len(items[-1])
            del got
        shutil.rmtree(d)


def fmt_time(samples: list[float], scale: float) -> str:
    if not samples:
        return "—"
    return f"{statistics.median(samples) * scale:.3f}"


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def render(rows: list[Row], items: int, runs: int, total_s: float) -> str:
    lines = [
        "# Run-store format benchmark",
        "",
        f"{items:,} items (`item-0000000` ...), median of {runs} runs, "
        f"each in a fresh directory. Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs. Generated by `python -m bench.store_choice` in {total_s:.0f} s.",
        "",
        "Write = open, write every batch, close (incl. final fsync/checkpoint). "
        "Reads are warm-cache. Disk = apparent size of all store files after close. "
        "fsyncs = explicit fsyncs by the log writer (group commit, >= 0.2 s apart, "
        "plus one on close); SQLite's own checkpoint fsyncs are not counted.",
        "",
        "| store | batch | results | write (s) | items/s | read set (s) | read dict (s) "
        "| disk | raw | disk/raw | fsyncs |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in rows:
        mark = ""
        if r.measured_items != r.target_items:
            mark = " *"
            note = (f"\\* measured on {r.measured_items:,} items and extrapolated "
                    f"linearly to {r.target_items:,}.")
            if note not in notes:
                notes.append(note)
        write = statistics.median(r.write) * r.scale
        lines.append(
            f"| {r.store}{mark} | {r.batch} | {'len(item)' if r.with_results else 'no'} "
            f"| {write:.3f} | {r.target_items / write:,.0f} "
            f"| {fmt_time(r.read_set, r.scale)} | {fmt_time(r.read_dict, r.scale)} "
            f"| {fmt_bytes(r.disk_bytes * r.scale)} | {fmt_bytes(r.raw_bytes * r.scale)} "
            f"| {r.disk_bytes / r.raw_bytes:.2f} "
            f"| {round(statistics.median(r.fsyncs)) if r.fsyncs else '—'} |"
        )
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def measure(items: int, runs: int, sqlite_b10_items: int | None = None) -> str:
    """Measure every configuration; return the Markdown table."""
    t_start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="nbmplock-store-bench-"))
    rows: list[Row] = []
    try:
        check_torn_tail(workdir)
        for with_results in (False, True):
            for store in STORES:
                for batch in (10, 1000):
                    measured = items
                    if store == "SQLite WAL" and batch == 10 and sqlite_b10_items:
                        measured = min(items, sqlite_b10_items)
                    row = Row(store, batch, with_results, measured, items)
                    t0 = time.perf_counter()
                    run_config(row, runs, workdir)
                    print(f"  {store}, batch {batch}, results={with_results}: "
                          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
                    rows.append(row)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return render(rows, items, runs, time.perf_counter() - t_start)


def regenerate(out_dir: Path, *, quick: bool, workers: int, repeats: int | None) -> Path:
    """Write ``store_choice.md`` into *out_dir* (``python -m bench``'s STORE study; no workers)."""
    path = out_dir / "store_choice.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(measure(100_000 if quick else 1_000_000, repeats or (1 if quick else 3)))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000, help="items per job (default 1,000,000)")
    p.add_argument("--runs", type=int, default=3, help="repetitions per measurement (median reported)")
    p.add_argument("--sqlite-b10-items", type=int, default=None,
                   help="measure SQLite with batch 10 on this many items and extrapolate "
                        "to --items (default: all items)")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).resolve().parent / "results" / "store_choice.md")
    args = p.parse_args(argv)
    table = measure(args.items, args.runs, args.sqlite_b10_items)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
