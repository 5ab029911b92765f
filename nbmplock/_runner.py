"""The manager: one thread that owns a run from start to end.

It opens the run store, decides what is left to do, hands chunks to a backend
(local processes or Dask), writes the done records (or hands results to the
saver thread, which calls ``save_callback`` and records them), re-queues or
records failures, and publishes what changed, as immutable snapshots, at most
every :data:`PUBLISH_INTERVAL` seconds. The pieces it uses: what to dispatch
next (:mod:`nbmplock._dispatch`), whether a failure runs again
(:mod:`nbmplock._retry`), saving (:mod:`nbmplock._saver`).

Other threads talk to it only through :meth:`Runner.request_stop`, which sets
a field and wakes the backend's wait.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from itertools import filterfalse

from ._backend import (Backend, Chunk, ChunkDone, ChunksLost, Fatal, InitFailed, ItemError,
                       LossKind, WorkerOutput, WorkPayload)
from ._dispatch import ChunkSizer, WorkQueue
from ._errors import (FailureKind, ItemTimeoutError, RemoteTraceback, RunDirectoryLostError,
                      RunLockedError, SerializationError, WorkerDiedError, WorkerInitError,
                      add_note)
from ._fingerprint import Fingerprint, function_identity, items_hash
from ._retry import RetryPolicy
from ._saver import Saver, abandoned_call
from ._state import Outcome, Published, RunStatus, StopMode, Tally
from ._store import Failure, RunStore, by_time, read_fingerprint
from ._text import short_repr
from ._validate import Spec
from ._wire import rebuild_exception

log = logging.getLogger("nbmplock")

PUBLISH_INTERVAL = 0.1
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
#: Output lines kept per worker, for the traceback of an item that kills it.
_RECENT_OUTPUT = 40


def make_backend(spec: Spec, payload: WorkPayload, store: RunStore, units: int,
                 serialized: bytes | None) -> Backend:
    """The backend ``spec.options`` asks for; no more local workers than ``units``."""
    opts = spec.options
    if opts.backend is not None:
        from ._dask import DaskBackend
        return DaskBackend(payload, opts.backend, workers=opts.num_procs,
                           item_timeout=opts.item_timeout)
    from ._engine import LocalBackend
    return LocalBackend(payload, workers=min(opts.num_procs or os.cpu_count() or 1, max(1, units)),
                        start_method=opts.start_method, item_timeout=opts.item_timeout,
                        close_fds=store.private_fds(), serialized=serialized)


class Runner:
    """One run over a :class:`Spec`; ``prepare`` in the caller, ``run`` in a thread.

    ``mode`` is ``"all"`` (every item not done) or ``"failed"`` (only items
    recorded failed); ``publish`` receives a :class:`Published` on the
    manager thread (the Job hands it to its views' own thread).
    """

    def __init__(self, spec: Spec, *, mode: str = "all",
                 publish: Callable[[Published], None] | None = None):
        self.spec = spec
        self.opts = spec.options
        self.mode = mode
        self.tally = Tally()
        self.to_do = 0  # items this run has to do
        self.store: RunStore | None = None
        self.fingerprint_changes: list[str] = []
        self._publish_to = publish
        self._backend: Backend | None = None
        self._stop_request: StopMode | None = None  # written by other threads
        self._stop_begun: StopMode | None = None
        self._stopping = False
        self._notes: list[str] = []
        self._error: BaseException | None = None
        self._unit = self.opts.batch_size or 1
        self._queue: WorkQueue | None = None
        self._sizer: ChunkSizer | None = None
        self._retries = RetryPolicy(self.opts.max_retries)
        self._chunk_ids = 0
        self._saver: Saver | None = None
        self._saved_seen = 0
        self._cleared_seen = 0
        self._final = False  # the last saves were started (the run's end)
        self._recent_output: dict = {}
        self._new_output: list = []
        self._new_failures: list = []
        self._failures_changed = True
        self._next_publish = 0.0
        self._next_check = 0.0
        self._dirty = True

    # -- preparing (in the caller's thread) ------------------------------
    def prepare(self) -> None:
        """Lock the run directory and plan the work. Raises before any work starts."""
        spec = self.spec
        want_results = spec.save_callback is not None or self.opts.keep_results
        self._payload = WorkPayload(spec.process, spec.init_function, spec.shared_data,
                                    self.opts.batch_size, want_results, spec.items)
        # Under spawn: serialised now, so that an unpicklable function fails
        # before the run directory is touched.
        self._serialized = None
        if self.opts.backend is None:
            from ._engine import payload_for_start_method
            self._serialized = payload_for_start_method(self._payload, self.opts.start_method)
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
        contents = self.store.contents
        if contents.complete is not None:  # the log says: every item of this list is done
            total = contents.complete[2]
            self.tally = Tally(total=total, done_before=total)
            return total
        if previous is not None and previous.items_hash == self._items_hash and previous.n_distinct:
            n_distinct = previous.n_distinct
        else:
            n_distinct = len(set(items))
        done, failures = contents.done, contents.failures
        pending = list(filterfalse(done.__contains__, items)) if done else None
        if n_distinct != len(items):  # duplicates: each distinct item runs once
            pending = list(dict.fromkeys(items if pending is None else pending))
        left = n_distinct if pending is None else len(pending)
        failed = 0
        if failures:
            failed = sum(map(failures.__contains__, items if pending is None else pending))
        self.tally = Tally(total=n_distinct, done_before=n_distinct - left, failed=failed)
        if self.mode == "failed":
            pending = [i for i in (items if pending is None else pending) if i in failures]
            left = len(pending)
        self.to_do = left
        self._queue = WorkQueue(items if pending is None else pending, items, self._unit)
        sample = items[:1000]
        self._avg_item_bytes = sum(len(i.encode("utf-8", "surrogatepass"))
                                   for i in sample) / len(sample) + 8
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
        assert self.store is not None, "prepare() first"
        self.tally = replace(self.tally, started=time.monotonic())
        try:
            if self.to_do > 0 and not self._stop_request:
                self._loop()
        except BaseException as exc:  # noqa: BLE001 - becomes the outcome
            self._error = self._error or exc
        finally:
            self._finish()
        return Outcome(self._status(), self._error, tuple(self._notes))

    def _status(self) -> RunStatus:
        c = self.tally
        if self._error is not None:
            return RunStatus.FAILED
        if (self._stop_request or self._stopping) and c.done + c.done_before < c.total:
            return RunStatus.STOPPED
        return RunStatus.FINISHED

    def _loop(self) -> None:
        self._backend = backend = make_backend(self.spec, self._payload, self.store,
                                               -(-self.to_do // self._unit), self._serialized)
        self._sizer = ChunkSizer(unit=self._unit, fixed=self.opts.chunk_size,
                                 items_cap=int(backend.max_task_bytes / self._avg_item_bytes),
                                 target=backend.target_chunk_seconds)
        backend.start()
        if self._stop_request:
            backend.wakeup()
        if self.spec.save_callback is not None:
            self._saver = Saver(self.spec.save_callback, self.store.data_path,
                                record=self.store.record_done, wake=backend.wakeup,
                                out_path=self.spec.out_path)
        while True:
            request = self._stop_request
            if request is not None and (self._stop_begun is None or request > self._stop_begun):
                self._begin_stop(request)  # also escalates a stop already begun
            self._collect_saves()
            if not self._stopping:
                self._dispatch(backend)
            if (self.tally.in_flight == 0 and (self._stopping or self._queue.exhausted)
                    and self._saves_done()):
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
                timeout = min(timeout, PUBLISH_INTERVAL)  # its progress
            for event in backend.wait(timeout):
                self._handle(event)
            self._publish()

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
            self.tally = self.tally.add(done=saved - self._saved_seen,
                                        failed=self._cleared_seen - cleared)
            if cleared != self._cleared_seen:
                self._failures_changed = True
            self._saved_seen, self._cleared_seen = saved, cleared
            self._dirty = True
        if saver.error is not None and self._error is None:
            self._fail_run(saver.error)

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
        if not self._final:
            self._final = True
            deadline = None
            if self._stopping:
                deadline = time.monotonic() + max(STOP_SAVE_SECONDS, saver.longest_call)
            saver.finish(deadline, keep_buffer=self._stop_begun is not StopMode.FORCE)
        if not saver.idle:
            return False
        self._collect_saves()
        if saver.dropped:
            self._note(f"{saver.dropped:,} finished items were not handed to save_callback "
                       "before the stop took effect; they are not recorded done and run "
                       "again on resume")
        return True

    def _abandon_saves(self) -> None:
        for note in self._saver.abandon_all():
            self._note(note)

    def _note(self, text: str) -> None:
        self._notes.append(text)
        log.warning("nbmplock: %s: %s", self.spec.out_path, text)

    # -- dispatch --------------------------------------------------------
    def _chunk_size(self, workers: int) -> int:
        saver = self._saver
        return self._sizer.size(workers, self.to_do - self._queue.dispatched,
                                saver.seconds_per_item if saver is not None else None)

    def _dispatch(self, backend: Backend) -> None:
        saver = self._saver
        workers = backend.workers
        while backend.free_slots() > 0:
            size = self._chunk_size(workers)
            # Back-pressure: finished results not yet saved stay below save_batch
            # plus a chunk per worker (memory, and work a stop would throw away);
            # the saver wakes the manager when it has caught up.
            if saver is not None and saver.unsaved >= self.opts.save_batch + workers * size:
                return
            chunk = self._queue.take(size, workers)
            if chunk is None:
                # Nothing left to hand out: let an idle worker take over part of
                # a busy one's chunk (the local backend can; Dask cannot).
                if not self._stopping:
                    backend.give_back()
                return
            items, span = chunk
            self._chunk_ids += 1
            backend.submit(Chunk(self._chunk_ids, items, span))
            self.tally = self.tally.add(in_flight=len(items))
            self._dirty = True

    # -- events ----------------------------------------------------------
    def _handle(self, event) -> None:
        if isinstance(event, ChunkDone):
            self._chunk_done(event)
        elif isinstance(event, WorkerOutput):
            self._recent_output.setdefault(
                event.worker, deque(maxlen=_RECENT_OUTPUT)).extend(event.lines)
            prefixed = [f"[{event.worker}] {line}" for line in event.lines]
            self.store.append_output(("\n".join(prefixed) + "\n").encode("utf-8", "replace"))
            self._new_output.extend(prefixed)
            self._dirty = True
        elif isinstance(event, ChunksLost):
            self._chunks_lost(event)
        elif isinstance(event, InitFailed):
            error = WorkerInitError(f"init_function raised in worker {event.worker}: "
                                    f"{event.exc_type}: {event.message}")
            error.__cause__ = rebuild_exception(event.exc_type, event.message, event.traceback,
                                                event.exc_bytes)
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
        self.tally = self.tally.add(in_flight=-len(items))
        self._sizer.measured(ev.n_run, ev.seconds, len(ev.results_blob or b""))
        results = ev.results
        if not ev.failures:
            names = items[:ev.n_run] if ev.n_run < len(items) else items
            blob = ev.results_blob
            if results is not None and len(results) != len(names):
                results, blob = results[:len(names)], None
            self._deliver(names, results, blob)
        else:
            bad = {pos for f in ev.failures for pos in range(f.pos, f.pos + f.count)}
            keep = [i for i in range(ev.n_run) if i not in bad]
            self._deliver([items[i] for i in keep],
                          None if results is None else [results[i] for i in keep])
            rows = []
            for f in ev.failures:
                for item in items[f.pos:f.pos + f.count]:
                    rows += self._item_failed(item, f)
            self.store.record_failures(rows)
        if ev.n_run < len(items) and not self._stopping:  # given back: dispatch the rest again
            self._queue.give_back(items[ev.n_run:])
        self._dirty = True

    def _chunks_lost(self, ev: ChunksLost) -> None:
        if ev.kind is LossKind.TERMINATED and self._stop_request is not StopMode.FORCE:
            self._note(ev.message)  # ended from outside: a stop, not a failure
            self.request_stop(StopMode.FORCE)
        blamed: set = set()
        rows = []
        if ev.blame is not None and ev.kind in (LossKind.DIED, LossKind.TIMEOUT):
            chunk, pos = ev.blame
            timeout = ev.kind is LossKind.TIMEOUT
            recent = self._recent_output.pop(ev.worker, ())
            error = ItemError(pos, self._unit, "ItemTimeout" if timeout else "WorkerDied",
                              ev.message,
                              ("Last output of the worker:\n" + "\n".join(recent)) if recent
                              else "", None, ev.seconds,
                              FailureKind.TIMEOUT if timeout else FailureKind.DIED)
            for item in chunk.items[pos:pos + self._unit]:
                blamed.add(item)
                rows += self._item_failed(item, error, ev.pid, ev.exitcode)
        self.store.record_failures(rows)
        for chunk in ev.chunks:
            self.tally = self.tally.add(in_flight=-len(chunk.items))
            if not self._stopping:
                self._queue.retry([i for i in chunk.items if i not in blamed], first=True)
        self._dirty = True

    def _item_failed(self, item, error: ItemError, pid: int | None = None,
                     exitcode: int | None = None) -> list[Failure]:
        """Retry the item, or make its Failure (returned for one batched record)."""
        attempts = self._retries.failed(item)
        if self._retries.again(attempts) and not self._stopping:
            self._queue.retry([item])
            return []
        prev = self.store.contents.failures.get(item)
        failure = Failure(item, error.kind, error.exc_type, error.message, error.traceback,
                          attempts + (prev.attempts if prev else 0), pid, exitcode,
                          error.seconds, time.time())
        if prev is None:
            self.tally = self.tally.add(failed=1)
        self._new_failures.append(failure)
        self._failures_changed = True
        if self.opts.errors == "raise" and self._error is None:
            self._fail_run(self._exception_for(failure, error.blob))
        return [failure]

    def _exception_for(self, f: Failure, blob: bytes | None) -> BaseException:
        item = short_repr(f.item, 300)
        if f.kind is FailureKind.DIED:
            return WorkerDiedError(f"{f.message}, while processing item {item}", f.item,
                                   f.exitcode)
        if f.kind is FailureKind.TIMEOUT:
            return ItemTimeoutError(f"item {item}: {f.message}", f.item)
        if f.kind is FailureKind.UNPICKLABLE:
            exc = SerializationError(f.message)
            exc.__cause__ = RemoteTraceback(f.traceback)
            return exc
        exc = rebuild_exception(f.exc_type, f.message, f.traceback, blob)
        add_note(exc, f"nbmplock: on item {item}; finished items are recorded in "
                      f"{self.spec.out_path!r}, run the same call again to resume")
        return exc

    # -- delivering results ----------------------------------------------
    def _deliver(self, names: list, results: list | None, blob: bytes | None = None) -> None:
        """``blob``, when given, is the pickle of exactly ``results``."""
        if not names:
            return
        saver = self._saver
        if saver is None:
            cleared = self.store.record_done(names, results, blob)
            self.tally = self.tally.add(done=len(names), failed=-cleared)
            return
        if saver.error is not None or self._stop_begun is StopMode.FORCE:
            return  # not saved, so not done: they run again
        saver.add(names, results, self.opts.save_batch)

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
            self.tally = replace(self.tally, in_flight_by_worker=tuple(
                sorted(self._backend.in_flight().items())))
        output, self._new_output = tuple(self._new_output), []
        new_failures, self._new_failures = tuple(self._new_failures), []
        if self._failures_changed:
            self._failures_changed = False
            self._failures = by_time(self.store.contents.failures.values())
        if self._publish_to is not None:
            self._publish_to(Published(self.tally, output, new_failures,
                                       self._failures))

    def _finish(self) -> None:
        """End the saves and the workers, mark completion, commit, unlock."""
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
                self.tally = replace(self.tally, in_flight=0, in_flight_by_worker=())
                self._record_end()
            finally:
                try:
                    self.store.close()
                finally:
                    self._failures_changed = True
                    self._publish(force=True)

    def _record_end(self) -> None:
        """How the run ended, for `python -m nbmplock status`; COMPLETE when all is done."""
        c, store = self.tally, self.store
        if self._error is None:
            try:  # never end "finished" on a directory that is no longer ours
                store.check_place()
            except RunDirectoryLostError as exc:
                self._error = exc
        if store.contents.complete is not None:
            return
        status = self._status()
        try:
            if c.done or self._stop_begun or self._error is not None:
                store.record_end(status.value, self._end_reason(status))
            if status is RunStatus.FINISHED and c.done_before + c.done == c.total:
                store.record_complete(self._items_hash, len(self.spec.items), c.total)
        except OSError as exc:  # only information for the next run: not an error
            log.warning("nbmplock: could not record the end of the run in %r: %s",
                        self.spec.out_path, exc)

    def _end_reason(self, status: RunStatus) -> str:
        if status is RunStatus.FAILED:
            return f"{type(self._error).__name__}: {str(self._error)[:500]}"
        parts = []
        if status is RunStatus.STOPPED and self._stop_begun is not None:
            parts.append({StopMode.GRACEFUL: "Stop", StopMode.NOW: "interrupt (Ctrl-C)",
                          StopMode.FORCE: "Force stop"}[self._stop_begun])
        return "; ".join(parts + self._notes)
