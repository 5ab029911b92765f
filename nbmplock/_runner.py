"""The manager: one thread that owns a run from start to end.

It opens the run store, decides what is left to do, hands chunks to a backend
(local processes or Dask), and for every result that comes back calls the
user's ``save_callback``, writes the done records, re-queues or records
failures, and tells its listener (the Job) what changed, at most every
:data:`PUBLISH_INTERVAL` seconds. Nothing else writes the store or calls
``save_callback``, so neither is ever used concurrently.

Other threads talk to it only through :meth:`Runner.request_stop`, which sets
a field and wakes the backend's wait.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from array import array
import inspect
import logging
import marshal
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import filterfalse

from ._backend import Chunk, ChunkDone, ChunksLost, Fatal, InitFailed, WorkerOutput, WorkPayload
from ._errors import (ItemTimeoutError, RemoteTraceback, RunDirectoryLostError, RunLockedError,
                      SerializationError, WorkerDiedError, WorkerInitError, add_note)
from ._remote import rebuild_exception
from ._saver import Saver, abandoned_call
from ._text import short_repr
from ._store import Failure, Fingerprint, RunStore, read_fingerprint
from ._validate import Spec

log = logging.getLogger("nbmplock")

PUBLISH_INTERVAL = 0.1
#: A chunk's expected run time, from the measured time per item. Stop and
#: Ctrl-C do not wait for a chunk (workers return after the current item), and
#: an idle worker takes back part of a busy one's chunk at the end (work
#: stealing, see _engine), so long chunks do not unbalance skewed work. What is
#: left to trade is progress granularity and the work a SIGKILLed driver
#: loses, against the round trips: on 2 cores each one wakes the parent, which
#: takes a core from a worker. With 0.5 s, W2 was level with Pool in paired
#: runs (0.2 s: 0.6 to 2.5% behind) and W4 unchanged (python -m bench.w2_anatomy).
TARGET_CHUNK_SECONDS = 0.5
MAX_CHUNK_ITEMS = 10_000
MAX_CHUNK_BYTES = 4 << 20
#: Results of one chunk come back in one message: keep it about a pipe's size,
#: so big results stream (the worker never blocks on a message the parent
#: cannot start on) instead of arriving as one huge pickle per chunk.
RESULT_CHUNK_BYTES = 1 << 20
#: After a stop, save_callback calls keep starting for this long (or the longest
#: call's time, if longer) once the workers are done: a stop takes effect within
#: one slow call, and a fast callback still saves what finished.
STOP_SAVE_SECONDS = 0.2
#: A new run waits this long for a save_callback call that a Force stop left
#: running on its directory to return, before it refuses to start.
ABANDONED_SAVE_WAIT = 3.0
#: Seconds between two checks that the run directory is still this run's
#: (deleted or replaced mid-run: the run stops with RunDirectoryLostError).
PLACE_CHECK_INTERVAL = 1.0
_EMA = 0.5


@dataclass
class Counters:
    """Live numbers of one run, written only by the manager thread."""

    total: int = 0
    done_before: int = 0
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    to_do: int = 0
    started: float = field(default_factory=time.monotonic)
    in_flight_by_worker: dict = field(default_factory=dict)


class StopMode(enum.IntEnum):
    """How hard a stop is; a later request can only make it harder."""

    #: Workers finish the item they run; finished results are saved.
    GRACEFUL = 1
    #: Ctrl-C: workers are killed now; the save call in progress completes.
    NOW = 2
    #: Force stop, a second Ctrl-C, interpreter shutdown: nothing waits,
    #: not even for a save_callback call in progress.
    FORCE = 3


@dataclass(frozen=True)
class Outcome:
    status: str  # "finished", "stopped", "failed"
    error: BaseException | None = None
    notes: tuple[str, ...] = ()  # what a stop left undone, in words


def function_identity(fn: Callable) -> tuple[str, str]:
    """A name and a hash of the source (or bytecode) of ``fn``."""
    target = fn
    while isinstance(target, functools.partial):
        target = target.func
    if not (inspect.isfunction(target) or inspect.ismethod(target)) and callable(target):
        target = getattr(type(target), "__call__", target)
    name = getattr(target, "__qualname__", None) or repr(target)
    try:
        text = inspect.getsource(target).encode()
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        text = marshal.dumps(code) if code is not None else name.encode()
    return name, hashlib.blake2b(text, digest_size=16).hexdigest()


def items_hash(items) -> str:
    """A stable hash of the item list, injective: the lengths are hashed too.

    Computed in slices, so memory stays flat for long lists.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(str(len(items)).encode())
    for start in range(0, len(items), 100_000):
        part = items[start:start + 100_000]
        h.update(array("Q", map(len, part)).tobytes())
        h.update("".join(part).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


class Runner:
    """One run over a :class:`Spec`; ``prepare`` in the caller, ``run`` in a thread."""

    def __init__(self, spec: Spec, *, mode: str = "all",
                 backend_factory: Callable[[WorkPayload, RunStore], object],
                 listener: Callable[[Counters, list, list], None] | None = None):
        self.spec = spec
        self.opts = spec.options
        self.mode = mode
        self.counters = Counters()
        self.store: RunStore | None = None
        self.fingerprint_changes: list[str] = []
        self._backend_factory = backend_factory
        self._listener = listener
        self._backend = None
        self._stop_request: StopMode | None = None  # written by other threads
        self._stop_begun: StopMode | None = None
        self._stopping = False
        self._notes: list[str] = []
        self._error: BaseException | None = None
        self._source: Sequence[str] | None = None  # what is left to dispatch, from _cursor
        self._cursor = 0
        self._retry: deque = deque()
        self._returned: deque = deque()  # rests of chunks given back (work stealing)
        self._attempts: dict = {}
        self._per_item: float | None = None
        self._result_bytes: float | None = None  # per item, in the results' pickles
        self._chunk_ids = 0
        self._dispatched = 0
        self._bytes_cap = MAX_CHUNK_ITEMS
        self._buf_names: list = []     # results waiting to fill a save batch
        self._buf_results: list = []
        self._saver: Saver | None = None
        self._saved_seen = 0
        self._cleared_seen = 0
        self._final_since: float | None = None  # when the last saves began (run's end)
        self._new_output: list = []
        self._recent_output: dict = {}
        self._new_failures: list = []
        self._next_publish = 0.0
        self._next_check = 0.0
        self._dirty = True

    # -- preparing (in the caller's thread) ------------------------------
    def prepare(self) -> None:
        """Lock the run directory and plan the work. Raises before any work starts."""
        spec = self.spec
        self._payload = WorkPayload(spec.process, spec.init_function, spec.shared_data,
                                    self.opts.batch_size, self._want_results(), spec.items)
        check = getattr(self._backend_factory, "check", None)
        if check is not None:
            check(self._payload)  # e.g. unpicklable under spawn: before the disk is touched
        held = abandoned_call(spec.out_path, wait=ABANDONED_SAVE_WAIT)
        if held is not None:
            raise RunLockedError(spec.out_path, os.getpid(), message=(
                f"a save_callback call on {spec.out_path!r} that a Force stop abandoned is "
                f"still running (thread {held.name!r} of this process); a new run would call "
                "save_callback while it runs. Wait for it to return and try again, or "
                "restart the kernel if it hangs."))
        fn_name, fn_hash = function_identity(spec.process)
        self._items_hash = items_hash(spec.items)
        previous = read_fingerprint(spec.out_path)
        self.store = store = RunStore.open(spec.out_path, keep_results=self.opts.keep_results,
                                           items_hash=self._items_hash)
        try:
            n_distinct = self._plan(previous)
            fp = Fingerprint(fn_name, fn_hash, len(spec.items), self._items_hash, n_distinct)
            self.fingerprint_changes = fp.changes_from(previous)
            for change in self.fingerprint_changes:
                log.warning("%s: resuming, but %s since the last run; items recorded done "
                            "are not run again", spec.out_path, change)
            if fp != previous:
                store.write_fingerprint(fp)
        except BaseException:
            store.close()
            self.store = None
            raise

    def _plan(self, previous: Fingerprint | None) -> int:
        """Count what is done and line up what is not; returns the distinct item count."""
        items = self.spec.items
        c = self.counters
        contents = self.store.contents
        if contents.complete is not None:  # the log says: every item of this list is done
            c.total = c.done_before = contents.complete[2]
            c.to_do = 0
            return c.total
        if previous is not None and previous.items_hash == self._items_hash and previous.n_distinct:
            n_distinct = previous.n_distinct
        else:
            n_distinct = len(set(items))
        done, failures = contents.done, contents.failures
        pending = list(filterfalse(done.__contains__, items)) if done else None
        if n_distinct != len(items):  # duplicates: each distinct item runs once
            pending = list(dict.fromkeys(items if pending is None else pending))
        left = n_distinct if pending is None else len(pending)
        c.total = n_distinct
        c.done_before = n_distinct - left
        if failures:
            c.failed = sum(map(failures.__contains__, items if pending is None else pending))
        if self.mode == "failed":
            pending = [i for i in (items if pending is None else pending) if i in failures]
            left = len(pending)
        c.to_do = left
        self._source = items if pending is None else pending
        sample = items[:1000]
        self._avg_item_bytes = sum(len(i.encode("utf-8", "surrogatepass")) for i in sample) / len(sample) + 8
        return n_distinct

    # -- control from other threads --------------------------------------
    def request_stop(self, mode: StopMode = StopMode.GRACEFUL, note: str | None = None) -> None:
        """Thread-safe: ask for a stop; the manager carries it out at its next wake-up.

        Invariant: the field is set before the wake-up byte is written, and the
        manager reads the field after every wait, so a request is never missed.
        A request made before the backend exists is read before it is started.
        ``note`` says why, in the run's end record.
        """
        if note:
            self._notes.append(note)
        current = self._stop_request
        if current is None or mode > current:
            self._stop_request = mode
        backend = self._backend
        if backend is not None:
            backend.wakeup()

    # -- the manager loop ------------------------------------------------
    def run(self) -> Outcome:
        store = self.store
        assert store is not None, "prepare() first"
        c = self.counters
        c.started = time.monotonic()
        try:
            if c.to_do > 0 and not self._stop_request:
                self._loop()
        except BaseException as exc:  # noqa: BLE001 - becomes the outcome
            self._error = self._error or exc
        finally:
            self._finish()
        return Outcome(self._status(), self._error, tuple(self._notes))

    def _status(self) -> str:
        c = self.counters
        if self._error is not None:
            return "failed"
        if (self._stop_request or self._stopping) and c.done + c.done_before < c.total:
            return "stopped"
        return "finished"

    def _end_reason(self, status: str) -> str:
        if status == "failed":
            return f"{type(self._error).__name__}: {str(self._error)[:500]}"
        parts = []
        if status == "stopped" and self._stop_begun is not None:
            parts.append({StopMode.GRACEFUL: "Stop", StopMode.NOW: "interrupt (Ctrl-C)",
                          StopMode.FORCE: "Force stop"}[self._stop_begun])
        return "; ".join(parts + self._notes)

    def _loop(self) -> None:
        unit = self.opts.batch_size or 1
        self._backend = backend = self._backend_factory(self._payload, self.store,
                                                        -(-self.counters.to_do // unit))
        cap = getattr(backend, "max_task_bytes", MAX_CHUNK_BYTES)
        self._bytes_cap = max(1, int(cap / self._avg_item_bytes))
        backend.start()
        if self._stop_request:
            backend.wakeup()
        if self.spec.save_callback is not None:
            self._saver = Saver(self.spec.save_callback, self.store.data_path,
                                record=self.store.record_done, wake=backend.wakeup,
                                out_path=self.spec.out_path)
        c = self.counters
        while True:
            request = self._stop_request
            if request is not None and (self._stop_begun is None or request > self._stop_begun):
                self._begin_stop(request)  # also escalates a stop already begun
            self._collect_saves()
            if not self._stopping:
                self._dispatch(backend)
            if c.in_flight == 0 and (self._stopping or self._exhausted()) and self._saves_done():
                break
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + PLACE_CHECK_INTERVAL
                self.store.check_place()
            timeout = self._next_check - now
            due = self._publish_due(now)
            if due is not None:
                timeout = min(timeout, due)
            if self._saver is not None and not self._saver.idle:
                timeout = min(timeout, PUBLISH_INTERVAL)  # its progress, and the stop budget
            for event in backend.wait(timeout):
                self._handle(event)
            self._publish()

    def _want_results(self) -> bool:
        return self.spec.save_callback is not None or self.opts.keep_results

    def _exhausted(self) -> bool:
        return not self._retry and not self._returned and self._source is None

    def _begin_stop(self, mode: StopMode) -> None:
        previous, self._stop_begun = self._stop_begun, mode
        self._stopping = True
        if mode is StopMode.FORCE and self._saver is not None:
            self._abandon_saves()
        if self._backend is None:
            return
        if mode >= StopMode.NOW:
            if previous is None or previous < StopMode.NOW:
                for event in self._backend.kill():
                    self._handle(event)
        else:
            self._backend.request_stop()

    # -- saving (the saver thread calls save_callback) --------------------
    def _collect_saves(self) -> None:
        """Fold the saver's progress into the counters; fail the run on its error."""
        saver = self._saver
        if saver is None:
            return
        saved, cleared = saver.saved, saver.cleared
        if saved != self._saved_seen or cleared != self._cleared_seen:
            self.counters.done += saved - self._saved_seen
            self.counters.failed -= cleared - self._cleared_seen
            self._saved_seen, self._cleared_seen = saved, cleared
            self._dirty = True
        if saver.error is not None and self._error is None:
            self._fail_run(saver.error)

    def _unsaved(self) -> int:
        return len(self._buf_names) + (self._saver.pending if self._saver is not None else 0)

    def _saves_done(self) -> bool:
        """At the run's end: are the saves over? Starts the last saves the first time.

        A run that finishes saves everything. After a stop (or an error), once
        the workers are done, the stop takes effect within one save_callback
        call: no call starts that would end (at the pace of the longest call
        so far) later than that call's time, or :data:`STOP_SAVE_SECONDS` for
        fast callbacks, after the workers were done. Results not handed over
        by then are not recorded done and run again on resume.
        """
        saver = self._saver
        if saver is None:
            return True
        if self._final_since is None:
            self._final_since = now = time.monotonic()
            if self._buf_names and saver.error is None and self._stop_begun is not StopMode.FORCE:
                saver.put(self._buf_names, self._buf_results)
            self._buf_names, self._buf_results = [], []
            if self._stopping:
                saver.finish_by(now + max(STOP_SAVE_SECONDS, saver.longest_call))
            saver.close()
        if not saver.idle:
            return False
        self._collect_saves()
        if saver.dropped:
            self._note(f"{saver.dropped:,} finished items were not handed to save_callback "
                       "before the stop took effect; they are not recorded done and run "
                       "again on resume")
        return True

    def _abandon_saves(self) -> None:
        saver = self._saver
        queued = len(self._buf_names) + saver.drop_pending()
        self._buf_names, self._buf_results = [], []
        running = saver.abandon()
        if running:
            self._note(f"a save_callback call ({running:,} items) had not returned and was "
                       "abandoned: its items are not recorded done (if it returns, it may "
                       "have saved them anyway, and they run again on resume)")
        if queued:
            self._note(f"{queued:,} finished items were not handed to save_callback (stopped "
                       "by force); they are not recorded done and run again on resume")

    def _note(self, text: str) -> None:
        self._notes.append(text)
        log.warning("nbmplock: %s: %s", self.spec.out_path, text)

    # -- dispatch --------------------------------------------------------
    def _unsaved_limit(self, workers: int) -> int:
        """Finished results not yet saved, beyond which no new chunk is dispatched.

        So a slow save_callback never lets results pile up (memory, and work a
        stop would throw away): at most this many plus the items in flight.
        """
        return self.opts.save_batch + workers * self._chunk_size(workers)

    def _chunk_size(self, workers: int) -> int:
        unit = self.opts.batch_size or 1
        if self.opts.chunk_size:
            size = self.opts.chunk_size
        elif self._per_item is None:
            size = unit
        else:
            target = getattr(self._backend, "target_chunk_seconds", TARGET_CHUNK_SECONDS)
            size = int(target / max(self._per_item, 1e-7))
            remaining = self.counters.to_do - self._dispatched
            if self._result_bytes:  # about RESULT_CHUNK_BYTES of results per chunk
                size = min(size, int(RESULT_CHUNK_BYTES / self._result_bytes))
            saving = self._saver.seconds_per_item if self._saver is not None else None
            if saving:  # a chunk's results are saved in about a chunk's time too
                size = min(size, int(target / saving))
            size = min(size, MAX_CHUNK_ITEMS, self._bytes_cap,
                       max(unit, remaining // (2 * workers)))
        return max(unit, size - size % unit)

    def _dispatch(self, backend) -> None:
        saving = self._saver is not None
        while backend.free_slots() > 0:
            if saving and self._unsaved() >= self._unsaved_limit(backend.workers):
                return  # back-pressure: the saver wakes us when it has caught up
            span = None
            if self._retry:
                unit = self.opts.batch_size or 1
                items = [self._retry.popleft() for _ in range(min(unit, len(self._retry)))]
            elif self._returned:  # shared out again, whatever chunk_size says
                rest = self._returned[0]
                unit = self.opts.batch_size or 1
                share = -(-len(rest) // (backend.workers * unit)) * unit
                items = rest[:max(unit, min(share, self._chunk_size(backend.workers)))]
                if len(items) < len(rest):
                    self._returned[0] = rest[len(items):]
                else:
                    self._returned.popleft()
                self._dispatched += len(items)
            elif self._source is not None:
                start = self._cursor
                stop = min(start + self._chunk_size(backend.workers), len(self._source))
                if start >= stop:
                    self._source = None
                    continue
                items = self._source[start:stop]
                span = (start, stop) if self._source is self.spec.items else None
                self._cursor = stop
                self._dispatched += len(items)
            else:
                # Nothing left to hand out: let an idle worker take over part
                # of a busy one's chunk (the local backend can; Dask cannot).
                give_back = getattr(backend, "give_back", None)
                if give_back is not None and not self._stopping:
                    give_back()
                return
            self._chunk_ids += 1
            backend.submit(Chunk(self._chunk_ids, items, span))
            self.counters.in_flight += len(items)
            self._dirty = True

    # -- events ----------------------------------------------------------
    def _handle(self, event) -> None:
        if isinstance(event, ChunkDone):
            self._chunk_done(event)
        elif isinstance(event, WorkerOutput):
            self._recent_output.setdefault(event.worker, deque(maxlen=40)).extend(event.lines)
            prefixed = [f"[{event.worker}] {line}" for line in event.lines]
            self.store.append_output(("\n".join(prefixed) + "\n").encode("utf-8", "replace"))
            self._new_output.extend(prefixed)
            self._dirty = True
        elif isinstance(event, ChunksLost):
            self._chunks_lost(event)
        elif isinstance(event, InitFailed):
            cause = rebuild_exception(event.exc_type, event.message, event.traceback, event.exc_bytes)
            error = WorkerInitError(f"init_function raised in worker {event.worker}: "
                                    f"{event.exc_type}: {event.message}")
            error.__cause__ = cause
            self._fail_run(error)
        elif isinstance(event, Fatal):
            self._fail_run(event.error)

    def _fail_run(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if not self._stopping:
            self._begin_stop(StopMode.GRACEFUL)

    def _chunk_done(self, ev: ChunkDone) -> None:
        items = ev.chunk.items
        self.counters.in_flight -= len(items)
        if ev.n_run:
            per_item = ev.seconds / ev.n_run
            self._per_item = per_item if self._per_item is None else (
                _EMA * per_item + (1 - _EMA) * self._per_item)
            if ev.results_blob:
                size = len(ev.results_blob) / ev.n_run
                self._result_bytes = size if self._result_bytes is None else (
                    _EMA * size + (1 - _EMA) * self._result_bytes)
        results = ev.results
        if not ev.failures:
            names = items[:ev.n_run] if ev.n_run < len(items) else items
            blob = ev.results_blob
            if results is not None and len(results) != len(names):
                results, blob = results[:len(names)], None
            self._deliver(names, results, blob)
        else:
            bad: dict = {}
            for f in ev.failures:
                for pos in range(f[0], f[0] + f[1]):
                    bad[pos] = f
            keep = [i for i in range(ev.n_run) if i not in bad]
            self._deliver([items[i] for i in keep],
                          None if results is None else [results[i] for i in keep])
            rows = []
            for f in ev.failures:
                pos, count, exc_type, message, tb, exc_bytes, seconds, kind = f
                for item in items[pos:pos + count]:
                    row = self._item_failed(item, kind, exc_type, message, tb, exc_bytes,
                                            seconds, None, None)
                    if row is not None:
                        rows.append(row)
            self.store.record_failures(rows)
        if ev.n_run < len(items) and not self._stopping:  # given back: dispatch the rest again
            rest = items[ev.n_run:]
            self._returned.appendleft(rest)
            self._dispatched -= len(rest)
        self._dirty = True

    def _chunks_lost(self, ev: ChunksLost) -> None:
        if ev.kind == "terminated" and self._stop_request is not StopMode.FORCE:
            self._note(ev.message)  # ended from outside: a stop, not a failure
            self.request_stop(StopMode.FORCE)
        blamed: set = set()
        rows = []
        if ev.blame is not None and ev.kind != "killed":
            chunk, pos = ev.blame
            unit = self.opts.batch_size or 1
            exc_type = "ItemTimeout" if ev.kind == "timeout" else "WorkerDied"
            recent = self._recent_output.pop(ev.worker, ())
            tb = ("Last output of the worker:\n" + "\n".join(recent)) if recent else ""
            for item in chunk.items[pos:pos + unit]:
                blamed.add(item)
                row = self._item_failed(item, ev.kind, exc_type, ev.message, tb, None,
                                        ev.seconds, ev.pid, ev.exitcode)
                if row is not None:
                    rows.append(row)
        self.store.record_failures(rows)
        for chunk in ev.chunks:
            self.counters.in_flight -= len(chunk.items)
            if not self._stopping:
                self._retry.extendleft(reversed([i for i in chunk.items if i not in blamed]))
        self._dirty = True

    def _item_failed(self, item, kind, exc_type, message, tb, exc_bytes, seconds, pid,
                     exitcode) -> Failure | None:
        """Retry the item, or make its Failure (returned for one batched record)."""
        attempts = self._attempts[item] = self._attempts.get(item, 0) + 1
        if attempts <= self.opts.max_retries and not self._stopping:
            self._retry.append(item)
            return None
        prev = self.store.contents.failures.get(item)
        failure = Failure(item, kind, exc_type, message, tb,
                          attempts + (prev.attempts if prev else 0), pid, exitcode,
                          seconds, time.time())
        if prev is None:
            self.counters.failed += 1
        self._new_failures.append(failure)
        if self.opts.errors == "raise" and self._error is None:
            self._fail_run(self._exception_for(failure, exc_bytes))
        return failure

    def _exception_for(self, f: Failure, exc_bytes: bytes | None) -> BaseException:
        where = (f"nbmplock: on item {short_repr(f.item, 300)}; finished items are recorded in "
                 f"{self.spec.out_path!r}, run the same call again to resume")
        if f.kind == "died":
            return WorkerDiedError(f"{f.message}, while processing item {short_repr(f.item, 300)}",
                                   f.item, f.exitcode)
        if f.kind == "timeout":
            return ItemTimeoutError(f"item {short_repr(f.item, 300)}: {f.message}", f.item)
        if f.kind == "unpicklable":
            exc = SerializationError(f.message)
            exc.__cause__ = RemoteTraceback(f.traceback)
            return exc
        exc = rebuild_exception(f.exc_type, f.message, f.traceback, exc_bytes)
        add_note(exc, where)
        return exc

    # -- delivering results ----------------------------------------------
    def _deliver(self, names: list, results: list | None, blob: bytes | None = None) -> None:
        """``blob``, when given, is the pickle of exactly ``results``."""
        if not names:
            return
        saver = self._saver
        if saver is None:
            self.counters.failed -= self.store.record_done(names, results, blob)
            self.counters.done += len(names)
            return
        if saver.error is not None or self._stop_begun is StopMode.FORCE:
            return  # not saved, so not done: they run again
        self._buf_names.extend(names)
        self._buf_results.extend(results)
        batch = self.opts.save_batch
        while len(self._buf_names) >= batch:
            saver.put(self._buf_names[:batch], self._buf_results[:batch])
            del self._buf_names[:batch], self._buf_results[:batch]

    # -- publishing ------------------------------------------------------
    def _publish_due(self, now: float) -> float | None:
        if not (self._dirty or self._new_output or self._new_failures):
            return None
        return max(0.0, self._next_publish - now)

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and (now < self._next_publish or not (
                self._dirty or self._new_output or self._new_failures)):
            return
        self._next_publish = now + PUBLISH_INTERVAL
        self._dirty = False
        if self._backend is not None:
            self.counters.in_flight_by_worker = self._backend.in_flight()
        output, self._new_output = self._new_output, []
        failures, self._new_failures = self._new_failures, []
        if self._listener is not None:
            self._listener(self.counters, output, failures)

    def _finish(self) -> None:
        """Save what finished, end the workers, mark completion, commit, unlock."""
        c = self.counters
        try:
            if self._saver is not None and not self._saver.idle:
                # The loop ended by an exception: do not wait for the user's callback.
                self._abandon_saves()
            self._collect_saves()
        finally:
            try:
                if self._backend is not None:
                    for event in self._backend.shutdown() or ():
                        self._handle(event)
                c.in_flight = 0
                c.in_flight_by_worker = {}
                if self._error is None:
                    try:  # never end "finished" on a directory that is no longer ours
                        self.store.check_place()
                    except RunDirectoryLostError as exc:
                        self._error = exc
                if self.store.contents.complete is None and (c.done or self._stop_begun
                                                             or self._error is not None):
                    try:  # how the run ended, for `python -m nbmplock status`
                        status = self._status()
                        self.store.record_end(status, self._end_reason(status))
                    except OSError as exc:
                        log.warning("nbmplock: could not record the end of the run in %r: %s",
                                    self.spec.out_path, exc)
                if (self._error is None and c.done_before + c.done == c.total
                        and self.store.contents.complete is None):
                    try:
                        self.store.record_complete(self._items_hash, len(self.spec.items), c.total)
                    except OSError as exc:  # only a shortcut for the next run: not an error
                        log.warning("nbmplock: could not mark %r complete: %s", self.spec.out_path, exc)
            finally:
                try:
                    self.store.close()
                finally:
                    self._publish(force=True)
