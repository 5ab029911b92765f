"""The run directory: the only code that touches nbmplock's own files.

``out_path`` belongs to the user's ``save_callback`` (``out_path/data*``);
nbmplock keeps its state beside it in ``out_path/.nbmplock/``:

``log``
    Append-only, checksummed records (their format: :mod:`nbmplock._log`).
    A record is written with one ``write`` call right after its items were
    handed to ``save_callback``, so a SIGKILL of the process loses nothing
    already recorded; the OS has it.
``job.json``
    The fingerprint of the last run (function hash, item count and hash),
    replaced atomically.
``lock``
    An OS file lock (``flock``) held by the live run, released by the kernel
    when the holder dies, and the holder's pid as text.
``output.log``
    Worker stdout and stderr, one prefixed line each.

Why a log and not SQLite: measured on 1,000,000 items (``bench/store_choice.py``)
the log writes several times faster than SQLite in WAL mode at the same batch
sizes, reads the done-set back faster, and is smaller on disk; its
crash-consistency needs only a checksum per record.

Durability policy (group commit): every record reaches the OS at once; a
thread of the store ``fdatasync``-s the file at most every
:data:`SYNC_INTERVAL` seconds while a run writes (so the run never waits for
the disk), and the file is synced when a run ends. A power loss can therefore lose at most
the last 0.2 s of done marks, whose items are simply run again.

Damage: a torn or corrupt *last* record (a crash mid-write) is ignored, and
truncated away by the next run. A damaged record with valid records after it
is never skipped silently: :class:`StoreCorruptError` says where, and
``python -m nbmplock repair`` keeps every readable record.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import InvalidArgumentsError, RunDirectoryLostError, RunLockedError
from ._fingerprint import Fingerprint, items_hash
from ._log import (COMPLETE_SIZE, Contents, Failure, by_time, compact, complete_record,
                   done_record, end_record, fail_record, parse_complete, scan)

log = logging.getLogger("nbmplock")

STATE_DIR = ".nbmplock"
SYNC_INTERVAL = 0.2

_COMPACT_MIN_RECORDS = 4096


def _test_hook(where: str) -> None:
    """Replaced by tests to widen a race window on purpose (see tests/test_store.py)."""


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
        return Fingerprint(data["function"], data["function_hash"],
                           data["n_items"], data["items_hash"], data.get("n_distinct"))
    except (OSError, ValueError, KeyError, TypeError):
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


def read_snapshot(out_path: str) -> Snapshot:
    """Read a run directory without taking its lock (works during a live run)."""
    sdir = state_dir(out_path)
    path = os.path.join(sdir, "log")
    contents = scan(_read_log(path), results=False)
    try:
        last = os.stat(path).st_mtime
    except OSError:
        last = None
    failures = by_time(contents.failures.values())
    return Snapshot(out_path, len(contents.done), failures, read_fingerprint(out_path),
                    last, lock_holder(out_path), contents.torn_bytes, contents.last_end)


def is_complete(out_path: str, items) -> bool:
    """True when every item of ``items`` is recorded done in ``out_path``."""
    if not os.path.isdir(state_dir(out_path)):
        return False
    complete = read_complete(out_path)
    if complete is not None and complete[0] == items_hash(items):
        return True
    done = read_contents(out_path).done
    return bool(done) and done.issuperset(items)


def stored_state(out_path: str, items) -> tuple[int, int, tuple[Failure, ...]]:
    """``(total, done, failures)`` of ``items`` in ``out_path``, without taking its lock:
    what a Job shows before it starts (after a kernel restart, say)."""
    complete = read_complete(out_path)
    if complete is not None and complete[0] == items_hash(items):
        return complete[2], complete[2], ()
    unique = set(items)
    if not os.path.isdir(state_dir(out_path)):
        return len(unique), 0, ()
    contents = read_contents(out_path)
    failures = by_time(f for key, f in contents.failures.items() if key in unique)
    return len(unique), len(unique.intersection(contents.done)), failures


def read_contents(out_path: str, *, results: bool = False, names: bool = True) -> Contents:
    """The done-set (and results) of a run directory, without taking its lock."""
    return scan(_read_log(os.path.join(state_dir(out_path), "log")), results=results,
                names=names)


class RunStore:
    """The run directory opened by a live run: holds the lock, appends records.

    Only the thread that runs the job calls it. Open with :meth:`open`.
    """

    def __init__(self, out_path: str, lock_fd: int, contents: Contents,
                 keep_results: bool):
        self.out_path = out_path
        self.dir = state_dir(out_path)
        self.data_path = os.path.join(out_path, "data")
        self._lock_fd = lock_fd
        self.contents = contents
        self.keep_results = keep_results
        self._log_path = os.path.join(self.dir, "log")
        self._fd = os.open(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._size = os.fstat(self._fd).st_size
        self._out = open(os.path.join(self.dir, "output.log"), "ab")
        # The group-commit handshake (see _sync_loop). One mutex, one condition;
        # every field below is written under ``_cond`` except where noted.
        #   _dirty:   a record was written since the last commit started. The
        #             writer sets it (and notifies) only when it was clear; the
        #             syncer clears it just before it calls fdatasync, so a record
        #             written before the clear is in that commit, and one written
        #             after it finds the flag clear and wakes the next commit.
        #   _closing: close() (or a failed commit) asks the syncer to return.
        # The syncer waits only inside ``while not predicate: wait()``, so a
        # notify sent before it waits is never lost.
        self._cond = threading.Condition(threading.Lock())
        self._write_lock = threading.Lock()
        self._dirty = False
        self._closing = False
        self._sync_error: OSError | None = None
        self._syncer: threading.Thread | None = None
        self.closed = False

    # -- opening ---------------------------------------------------------
    @classmethod
    def open(cls, out_path: str, *, keep_results: bool, items_hash: str | None = None) -> RunStore:
        """Lock ``out_path`` and load what earlier runs recorded.

        When the log ends with a COMPLETE record for ``items_hash`` nothing is
        loaded: ``contents.complete`` says every item is done.

        Raises :class:`RunLockedError` when a live run holds it, and
        :class:`InvalidArgumentsError` when it cannot be written.
        """
        sdir = state_dir(out_path)
        try:
            os.makedirs(sdir, exist_ok=True)
            lock_fd = os.open(os.path.join(sdir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise InvalidArgumentsError(
                "out_path", "a directory this process can create and write",
                f"{out_path!r}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            pid = _pid_in(lock_fd)
            os.close(lock_fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            here = " (this process)" if pid == os.getpid() else ""
            raise RunLockedError(out_path, pid, here) from None
        try:
            os.ftruncate(lock_fd, 0)
            os.pwrite(lock_fd, f"{os.getpid()} {socket.gethostname()} {time.time():.0f}\n".encode(), 0)
            log_path = os.path.join(sdir, "log")
            complete = read_complete(out_path)
            if complete is not None and complete[0] == items_hash:
                contents = Contents(set(), None, {}, complete=complete)
                return cls(out_path, lock_fd, contents, keep_results)
            data = _read_log(log_path)
            contents = scan(data, results=keep_results)
            if contents.torn_bytes:
                log.warning("%s: ignoring a torn last record (%d bytes) left by a crash",
                            out_path, contents.torn_bytes)
                os.truncate(log_path, contents.valid_bytes)
            if contents.records >= _COMPACT_MIN_RECORDS:
                compact(log_path, contents if keep_results else scan(data, results=True))
            return cls(out_path, lock_fd, contents, keep_results)
        except BaseException:
            os.close(lock_fd)
            raise

    def check_place(self) -> None:
        """Raise :class:`RunDirectoryLostError` when the log or the lock file that
        this run holds open is no longer the one at its path (deleted, moved,
        replaced: a second run could then take the directory)."""
        for what, path, fd in (("log", self._log_path, self._fd),
                               ("lock", os.path.join(self.dir, "lock"), self._lock_fd)):
            try:
                there = os.stat(path)
            except FileNotFoundError:
                there = None
            mine = os.fstat(fd)
            if there is None or (there.st_dev, there.st_ino) != (mine.st_dev, mine.st_ino):
                raise RunDirectoryLostError(
                    f"the run directory {self.out_path!r} was deleted, moved or replaced "
                    f"during the run (its {what} file {path!r} is "
                    f"{'gone' if there is None else 'another file'}); the run stopped. What "
                    "it recorded since then is not in the directory: run again to redo it.")

    def private_fds(self) -> list[int]:
        """File descriptors a forked worker must close (so it never holds the lock)."""
        return [self._lock_fd, self._fd, self._out.fileno()]

    # -- writing ---------------------------------------------------------
    def _append(self, record: list[bytes]) -> None:
        # Two threads write records: the manager, and the saver thread that
        # records each save batch done. One lock keeps every record whole and
        # the size bookkeeping (for a clean truncate after a failed write) exact.
        with self._write_lock:
            self._append_locked(record)

    def _append_locked(self, record: list[bytes]) -> None:
        if self._sync_error is not None:
            raise self._sync_error
        start = self._size
        size = sum(map(len, record))
        try:
            views = [memoryview(part) for part in record if part]
            while views:
                written = os.writev(self._fd, views)
                while views and written >= len(views[0]):
                    written -= len(views.pop(0))
                if written:
                    views[0] = views[0][written:]
        except OSError:
            # Never leave half a record in the middle of the log.
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise
        self._size = start + size
        if not self._dirty:  # read without the lock: a stale True is covered (see __init__)
            with self._cond:
                self._dirty = True
                self._cond.notify()
        if self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                            name="nbmplock-fsync")
            self._syncer.start()

    def record_done(self, names: Sequence[str], results: Sequence[Any] | None = None,
                    results_blob: bytes | None = None) -> int:
        """Mark ``names`` done (with ``keep_results``, store their results too;
        ``results_blob``, if given, is the pickle of the list ``results``).

        Returns how many of them had a failure recorded, now superseded.
        """
        if not names:
            return 0
        keep = self.keep_results and results is not None
        self._append(done_record(names, results if keep else None,
                                 results_blob if keep else None))
        cleared = 0
        failures = self.contents.failures
        if failures:
            for name in names:
                if failures.pop(name, None) is not None:
                    cleared += 1
        if keep:
            self.contents.results.update(zip(names, results))
        return cleared

    def record_failures(self, failures: Iterable[Failure]) -> None:
        failures = list(failures)
        if not failures:
            return
        self._append(fail_record(failures))
        for f in failures:
            self.contents.failures[f.item] = f

    def record_complete(self, items_hash: str, n_items: int, n_distinct: int) -> None:
        """Every item of the list with ``items_hash`` is done: end the log saying so."""
        self._append(complete_record(items_hash, n_items, n_distinct))

    def record_end(self, status: str, reason: str = "") -> None:
        """Say how this run ended: "finished", "stopped" or "failed", and why."""
        self._append(end_record(status, reason))

    def write_fingerprint(self, fp: Fingerprint) -> None:
        path = os.path.join(self.dir, "job.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({**fp.__dict__, "updated": time.time()}, f)
        os.replace(tmp, path)

    def append_output(self, data: bytes) -> None:
        self._out.write(data)
        self._out.flush()

    # -- durability ------------------------------------------------------
    def _sync_loop(self) -> None:
        """Group commit, in its own thread so the run never waits for the disk.

        It sleeps until a record is written, lets :data:`SYNC_INTERVAL` seconds
        of records gather, then commits them with one ``fdatasync``. A run
        whose items take minutes therefore costs no wake-ups in between: on a
        machine with as many workers as cores, each wake-up of the parent
        takes a core from a worker.

        Invariant: it returns only when ``_closing`` is set, and every wait is
        ``while not predicate: wait()`` under ``_cond``, whose predicate the
        writers and :meth:`close` change under ``_cond`` before notifying.
        """
        cond = self._cond
        while True:
            with cond:
                while not (self._dirty or self._closing):
                    cond.wait()  # a record was written, or close()
                if self._closing:
                    return
                deadline = time.monotonic() + SYNC_INTERVAL
                while not self._closing:  # let records gather, unless close() comes
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    cond.wait(left)
                if self._closing:
                    return  # close() commits what is left itself
            _test_hook("syncer-before-commit")
            self._sync()

    def _sync(self) -> None:
        with self._cond:
            if not self._dirty:
                return
            self._dirty = False  # records written from now on wake the next commit
        try:
            os.fdatasync(self._fd)
        except OSError as exc:  # e.g. ENOSPC: the next write or close raises it
            with self._cond:
                self._sync_error = exc
                self._closing = True
                self._cond.notify_all()

    def close(self) -> None:
        """Commit everything and release the lock. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        try:
            with self._cond:
                self._closing = True
                self._cond.notify_all()  # the syncer returns whatever it was waiting for
            if self._syncer is not None:
                self._syncer.join()
            self._sync()
            if self._sync_error is not None:
                raise self._sync_error
        finally:
            # The lock is released whatever fails before it: a full disk makes
            # the output log's last flush raise, and the directory must not stay
            # locked for the rest of this process (a notebook kernel, say).
            try:
                os.close(self._fd)
                self._out.close()  # its file is closed even when the flush raises
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)


def repair(out_path: str) -> Contents:
    """Rewrite the log keeping every readable record; returns what it kept.

    ``len(result.done)`` items done and ``len(result.failures)`` failed are
    kept; ``result.damaged`` damaged stretches were dropped (their items run
    again). Refuses while a live run holds the directory.
    """
    holder = lock_holder(out_path)
    if holder is not None:
        raise RunLockedError(out_path, holder if holder > 0 else None)
    path = os.path.join(state_dir(out_path), "log")
    contents = scan(_read_log(path), results=True, skip_damaged=True)
    compact(path, contents)
    return contents
