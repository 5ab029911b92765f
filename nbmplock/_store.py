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
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

from ._errors import InvalidArgumentsError, RunDirectoryLostError, RunLockedError
from ._fingerprint import Fingerprint
from ._done import compact
from ._read import _pid_in, _read_log, lock_holder, read_complete, state_dir
from ._log import (Contents, Failure, Span, _forget,
                   complete_record, done_record, end_record, fail_record, forget_record,
                   list_record, run_record, scan, span_record)

log = logging.getLogger("nbmplock")

SYNC_INTERVAL = 0.2

_COMPACT_MIN_RECORDS = 4096


def _test_hook(where: str) -> None:
    """Replaced by tests to widen a race window on purpose (see tests/test_store.py)."""


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
    def open(cls, out_path: str, *, keep_results: bool, items_hash: str | None = None,
             shortcut: bool = True) -> RunStore:
        """Lock ``out_path`` and load what earlier runs recorded.

        When the log ends with a COMPLETE record for ``items_hash`` (and
        ``shortcut``) nothing is loaded: ``contents.complete`` says every item
        is done.

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
            if complete is not None and complete[0] != items_hash:
                complete = None  # another list's
            if shortcut and complete is not None:
                return cls(out_path, lock_fd, Contents(complete=complete), keep_results)
            data = _read_log(log_path)
            contents = scan(data, results=keep_results)
            contents.complete = complete
            if contents.torn_bytes:
                log.warning("%s: ignoring a torn last record (%d bytes) left by a crash",
                            out_path, contents.torn_bytes)
                os.truncate(log_path, contents.valid_bytes)
            if contents.records >= _COMPACT_MIN_RECORDS:
                compact(log_path, contents if keep_results else scan(data, results=True))
                contents = scan(_read_log(log_path), results=keep_results)
                contents.complete = complete if contents.records else None
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
        self.contents.done_keys.update(dict.fromkeys(names, ""))
        if keep:
            if self.contents.key_results is None:
                self.contents.key_results = {}
            self.contents.key_results.update(zip(names, results))
        return cleared

    def record_span(self, list_hash: str, run: str, ranges: array, keys: Sequence,
                    results_blob: bytes | None = None, results: list | None = None) -> int:
        """Positions ``ranges`` of the list ``list_hash`` (whose keys are ``keys``) are
        done by run ``run``, with the pickle of their results in order when results
        are kept (and ``results``, that pickle's values, when the caller has them:
        then they are what stays in memory, not the pickle).
        Returns how many of them had a failure recorded, now superseded."""
        if not len(ranges):
            return 0
        blob = results_blob if self.keep_results else None
        self._append(span_record(list_hash, run, ranges, blob))
        if blob is not None and results is not None:
            span = Span(list_hash, ranges, None, run, kept=results)
        else:
            span = Span(list_hash, ranges, blob, run)
        self.contents.spans.append(span)
        failures = self.contents.failures
        cleared = 0
        if failures:
            for i in span.positions():
                if failures.pop(keys[i], None) is not None:
                    cleared += 1
        return cleared

    def record_list(self, list_hash: str, keys: Sequence, payload: list[bytes]) -> None:
        """The keys of the list that spans will refer to (once per list and log);
        ``payload`` is their encoding (:func:`nbmplock._fingerprint.encode_keys`)."""
        if list_hash not in self.contents.lists:
            self._append(list_record(list_hash, payload))
            self.contents.lists[list_hash] = None
            self.contents._keys[list_hash] = keys

    def record_run(self, run: str, fingerprint: dict) -> None:
        """A run begins: its fingerprint; the records after it are its own."""
        self._append(run_record(run, fingerprint))
        self.contents.runs[run] = {"run": run, **fingerprint}

    def record_forget(self, *, keys: Sequence | None = None, failed: bool = False,
                      everything: bool = False) -> None:
        """Forget items on purpose: recorded, so a kill halfway loses nothing."""
        self._append(forget_record(keys=keys, failed=failed, everything=everything))
        _forget(self.contents, "all" if everything else ("failed" if failed else "keys"),
                list(keys or ()))

    def record_failures(self, failures: Iterable[Failure]) -> None:
        failures = list(failures)
        if not failures:
            return
        self._append(fail_record(failures))
        for f in failures:
            self.contents.failures[f.key] = f

    def record_complete(self, items_hash: str, n_items: int, n_distinct: int) -> None:
        """Every item of the list with ``items_hash`` is done: end the log saying so."""
        self._append(complete_record(items_hash, n_items, n_distinct))

    def record_end(self, status: str, reason: str = "", run: str = "") -> None:
        """Say how this run ended: "finished", "stopped" or "failed", and why."""
        self._append(end_record(status, reason, run))

    def write_fingerprint(self, fp: Fingerprint) -> None:
        path = os.path.join(self.dir, "job.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({**fp.__dict__, "updated": time.time()}, f)
        os.replace(tmp, path)

    def write_live(self, status: dict | None) -> None:
        """What a live run is doing, for ``python -m nbmplock status`` in another
        process (in flight, waiting to retry, pace): ``live.json``, replaced
        whole; ``None`` removes it. Best effort: a failure here stops nothing."""
        path = os.path.join(self.dir, "live.json")
        try:
            if status is None:
                os.unlink(path)
                return
            tmp = path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({**status, "pid": os.getpid(), "time": time.time()}, f)
            os.replace(tmp, path)
        except OSError:
            pass

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


def forget_in(out_path: str, *, keys: Sequence | None = None, failed: bool = False,
              everything: bool = False) -> None:
    """Forget items of the run directory on purpose (they run again): recorded in
    its log under its lock, and logged. Refused while a live run holds it."""
    store = RunStore.open(out_path, keep_results=False, shortcut=False)
    try:
        store.record_forget(keys=keys, failed=failed, everything=everything)
    finally:
        store.close()
    n = len(keys or ())
    what = "every item" if everything else ("every failure" if failed else
                                            f"{n:,} item" + ("" if n == 1 else "s"))
    log.warning("nbmplock: %s: forgot %s on request; they run again", out_path, what)


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
