"""Reading a run directory without taking its lock (also during a live run).

What a Job shows before it starts, ``is_mp_lock_completed``, the CLI's
``status``, and :mod:`nbmplock._store` itself when it opens the directory.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass

from ._fingerprint import Fingerprint
from ._log import COMPLETE_SIZE, Contents, Failure, by_time, parse_complete, scan
from ._plan import ItemList, make_plan

STATE_DIR = ".nbmplock"


def read_complete(out_path: str) -> tuple[str, int, int] | None:
    """The COMPLETE record ending the log, if it does: (items_hash, n_items, n_distinct)."""
    path = os.path.join(state_dir(out_path), "log")
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size < COMPLETE_SIZE:
                return None
            f.seek(size - COMPLETE_SIZE)
            return parse_complete(f.read(COMPLETE_SIZE))
    except OSError:
        return None


def state_dir(out_path: str) -> str:
    return os.path.join(out_path, STATE_DIR)


def _read_log(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def read_fingerprint(out_path: str) -> Fingerprint | None:
    try:
        with open(os.path.join(state_dir(out_path), "job.json"), encoding="utf-8") as f:
            data = json.load(f)
        fp = Fingerprint.from_json(data)
        if not all(isinstance(getattr(fp, k), t) for k, t in (
                ("function", str), ("function_hash", str), ("n_items", int),
                ("items_hash", str))):
            return None
        return fp
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def lock_holder(out_path: str) -> int | None:
    """The pid of the live run holding ``out_path``, or None when it is free."""
    path = os.path.join(state_dir(out_path), "lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _pid_in(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _pid_in(fd: int) -> int | None:
    """The pid holding the flock on ``fd``'s file.

    Linux's /proc/locks names the holder even in the instant between its flock
    and writing its pid into the file; elsewhere, the pid written in the file.
    """
    try:
        inode = os.fstat(fd).st_ino
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if ("->" not in fields and len(fields) >= 6 and fields[1] == "FLOCK"
                        and fields[5].rsplit(":", 1)[-1] == str(inode)):
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace")
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Snapshot:
    """A read-only view of a run directory, for status displays and the CLI."""

    out_path: str
    done: int
    failures: tuple[Failure, ...]
    fingerprint: Fingerprint | None
    last_update: float | None
    holder_pid: int | None
    torn_bytes: int
    last_end: dict | None = None  # how the last run ended: status, reason, time, pid
    #: Which run recorded the items done now, oldest run first:
    #: ``(run id, its fingerprint as recorded (a dict, or None), items)``.
    runs: tuple = ()
    #: What the live run said it was doing, about once a second (``live.json``:
    #: in_flight, retrying, done, total, elapsed, rate_limit, time), or None.
    live: dict | None = None


def read_snapshot(out_path: str) -> Snapshot:
    """Read a run directory without taking its lock (works during a live run)."""
    sdir = state_dir(out_path)
    path = os.path.join(sdir, "log")
    contents = scan(_read_log(path), results=False)
    try:
        last = os.stat(path).st_mtime
    except OSError:
        last = None
    by_key = contents.done_by_key()
    done = set(by_key)
    failures = by_time(contents.live_failures(done).values())
    counts: dict = {}
    for run in by_key.values():
        counts[run] = counts.get(run, 0) + 1
    order = {run: i for i, run in enumerate(contents.runs)}
    runs = tuple((run, contents.runs.get(run), n)
                 for run, n in sorted(counts.items(), key=lambda rn: order.get(rn[0], -1)))
    holder = lock_holder(out_path)
    live = None
    if holder is not None:
        try:
            with open(os.path.join(sdir, "live.json"), encoding="utf-8") as f:
                live = json.load(f)
        except (OSError, ValueError):
            pass
    return Snapshot(out_path, len(done), failures, read_fingerprint(out_path),
                    last, holder, contents.torn_bytes, contents.last_end, runs, live)


def is_complete(out_path: str, items: ItemList) -> bool:
    """True when every item of ``items`` is recorded done in ``out_path``."""
    if not os.path.isdir(state_dir(out_path)):
        return False
    complete = read_complete(out_path)
    if complete is not None and items.known_as(complete[0]):
        return True
    plan = make_plan(read_contents(out_path), items)
    return plan.done_before == plan.total


def stored_state(out_path: str, items: ItemList) -> tuple[int, int, tuple[Failure, ...]]:
    """``(total, done, failures)`` of ``items`` in ``out_path``, without taking its lock:
    what a Job shows before it starts (after a kernel restart, say)."""
    complete = read_complete(out_path)
    if complete is not None and items.known_as(complete[0]):
        return complete[2], complete[2], ()
    if not os.path.isdir(state_dir(out_path)):
        return items.distinct, 0, ()
    contents = read_contents(out_path)
    plan = make_plan(contents, items)
    live = set(items.keys[i] for i in plan.pending)
    failures = by_time(f for key, f in contents.failures.items() if key in live)
    return plan.total, plan.done_before, failures


def read_contents(out_path: str, *, results: bool = False) -> Contents:
    """What the log of a run directory holds, without taking its lock."""
    return scan(_read_log(os.path.join(state_dir(out_path), "log")), results=results)


def read_done(out_path: str) -> set:
    """Every key recorded done in a run directory (any item list)."""
    return read_contents(out_path).all_done()
