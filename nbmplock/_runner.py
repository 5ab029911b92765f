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
import pickle
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from ._backend import (Backend, Chunk, ChunkDone, ChunksLost, Fatal, InitFailed, ItemError,
                       LossKind, WorkerOutput, WorkPayload)
from ._dispatch import ChunkSizer, WorkQueue
from ._errors import (FailureKind, ItemTimeoutError, RemoteTraceback, RunDirectoryLostError,
                      RunLockedError, SerializationError, WorkChangedError, WorkerDiedError,
                      WorkerInitError, add_note)
from ._fingerprint import Fingerprint, encode_keys, work_fingerprint
from ._log import ranges_of
from ._plan import make_plan
from ._ratelimit import RateLimit
from ._retry import RetryPolicy, Waiting
from ._worker import is_async
from ._saver import Saver, abandoned_call
from ._state import Outcome, Published, RunStatus, StopMode, Tally
from ._read import read_fingerprint
from ._log import Failure, by_time
from ._store import RunStore
from ._text import short_repr
from ._validate import Spec
from ._wire import dumps, rebuild_exception

log = logging.getLogger("nbmplock")

PUBLISH_INTERVAL = 0.1
#: How often a live run rewrites ``.nbmplock/live.json`` (see RunStore.write_live).
LIVE_INTERVAL = 1.0
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
                 serialized: bytes | None, limit: RateLimit | None = None) -> Backend:
    """The backend ``spec.options`` asks for; no more local workers than ``units``."""
    opts = spec.options
    if opts.backend is not None:
        from ._dask import DaskBackend
        return DaskBackend(payload, opts.backend, workers=opts.num_procs,
                           item_timeout=opts.item_timeout, concurrency=opts.concurrency,
                           limit=limit)
    from ._engine import LocalBackend
    lanes = opts.concurrency
    workers = min(opts.num_procs or os.cpu_count() or 1, max(1, -(-units // lanes)))
    return LocalBackend(payload, workers=workers,
                        start_method=opts.start_method, item_timeout=opts.item_timeout,
                        close_fds=store.private_fds(), serialized=serialized,
                        concurrency=lanes, limit=limit,
                        asynchronous=is_async(spec.process))


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
        self._retries = RetryPolicy(self.opts.max_retries, self.opts.retry_delay,
                                    self.opts.retry_on)
        self._waiting = Waiting()  # failed items waiting for their retry
        self._limit: RateLimit | None = None
        self._reason_cache: tuple | None = None
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
        self._next_live = 0.0
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
        items = spec.item_list
        previous = read_fingerprint(spec.out_path)
        if (previous is not None and items.known_as(previous.items_hash)
                and previous.n_distinct is not None):
            n_distinct = previous.n_distinct  # the same list: no need to find its repeats
        else:
            n_distinct = items.distinct
        fp = work_fingerprint(spec.process, spec.init_function, spec.shared_data,
                              self.opts.batch_size, n_items=len(items.keys),
                              items_hash=items.hash, n_distinct=n_distinct)
        self.fingerprint = fp
        self.fingerprint_changes = fp.changes_from(previous)
        rerun = self.opts.on_change == "rerun"
        need_values = self.opts.keep_results
        self.store = store = RunStore.open(
            spec.out_path, keep_results=need_values, items_hash=items.hash,
            shortcut=not (need_values or rerun or self.opts.on_change == "error"))
        try:
            self._plan_work(previous, fp, rerun, need_values)
            if fp != previous:
                store.write_fingerprint(fp)
        except BaseException:
            store.close()
            self.store = None
            raise

    def _plan_work(self, previous: Fingerprint | None, fp: Fingerprint, rerun: bool,
                   need_values: bool) -> None:
        """Count what is done and line up what is not (positions of the item list)."""
        spec, contents = self.spec, self.store.contents
        work_changes = fp.work_changes_from(previous) if previous is not None else []
        other_work = work_changes and self._done_by_other_work(fp)
        if self.opts.on_change == "error" and other_work:
            raise WorkChangedError(spec.out_path, work_changes)
        plan = make_plan(contents, spec.item_list, mode=self.mode,
                         run=fp.run if rerun else None, need_values=need_values)
        self.tally = Tally(total=plan.total, done_before=plan.done_before, failed=plan.failed)
        self.to_do = len(plan.pending)
        self._queue = WorkQueue(plan.pending, self._unit)
        for change in self.fingerprint_changes:
            if change.startswith("the item list"):
                log.warning("%s: resuming, but %s since the last run", spec.out_path, change)
            elif rerun:
                log.warning("%s: %s since the last run; on_change='rerun': items done before "
                            "run again", spec.out_path, change)
            else:
                log.warning("%s: resuming, but %s since the last run; items recorded done are "
                            "not run again (on_change='rerun' runs them again)",
                            spec.out_path, change)
        if plan.no_value:
            self._note(f"{plan.no_value:,} items were done by a run that kept no results "
                       "(mp_lock, or a save_callback); they run again for their values")
        sample = spec.items[:1000]
        self._avg_item_bytes = sum(map(len, map(_dumps_small, sample))) / len(sample) + 8

    def _done_by_other_work(self, fp: Fingerprint) -> bool:
        """Whether any item of the log was done by another work than ``fp``'s."""
        c = self.store.contents
        if c.complete is not None and not c.spans and not c.done_keys:
            return True  # not loaded (shortcut): the fingerprint said the work changed
        return any(s.run != fp.run for s in c.spans if not s.undo) or any(
            run != fp.run for run in c.done_keys.values())

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
                items = self.spec.item_list
                if items.hash not in self.store.contents.lists:
                    self.store.record_list(items.hash, items.keys,
                                           items.payload or encode_keys(items.keys)[1])
                items.payload = None  # the log holds it from now on
                self.store.record_run(self.fingerprint.run, self.fingerprint.work())
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
        if self.opts.rate_limit is not None:
            self._limit = RateLimit.create(self.opts.rate_limit)
        self._backend = backend = make_backend(self.spec, self._payload, self.store,
                                               -(-self.to_do // self._unit), self._serialized,
                                               self._limit)
        # With lanes, a chunk is one unit: a SIGKILLed driver loses (runs again)
        # only the items running at that instant, as the API promises.
        # (A Dask task runs its items ``concurrency`` at a time itself.)
        lanes = self.opts.concurrency > 1 and self.opts.backend is None
        fixed = self.opts.chunk_size or (self._unit if lanes else None)
        least = self._unit * self.opts.concurrency if self.opts.backend is not None else None
        self._sizer = ChunkSizer(unit=self._unit, fixed=fixed, least=least,
                                 items_cap=int(backend.max_task_bytes / self._avg_item_bytes),
                                 target=backend.target_chunk_seconds)
        backend.start()
        if self._stop_request:
            backend.wakeup()
        if self.spec.save_callback is not None:
            self._saver = Saver(self.spec.save_callback, self.store.data_path,
                                record=self._record_done, wake=backend.wakeup,
                                out_path=self.spec.out_path, items=self.spec.items)
        while True:
            request = self._stop_request
            if request is not None and (self._stop_begun is None or request > self._stop_begun):
                self._begin_stop(request)  # also escalates a stop already begun
            self._collect_saves()
            if not self._stopping:
                self._release_retries()
                self._dispatch(backend)
            if (self.tally.in_flight == 0 and (self._stopping or (
                    self._queue.exhausted and not len(self._waiting))) and self._saves_done()):
                break
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + PLACE_CHECK_INTERVAL
                self.store.check_place()
            timeout = self._next_check - now
            due = self._waiting.next_due()
            if due is not None and not self._stopping:
                timeout = min(timeout, max(0.0, due - now))
            due = self._publish_due(now)
            if due is not None:
                timeout = min(timeout, due)
            if self._saver is not None and not self._saver.idle:
                timeout = min(timeout, PUBLISH_INTERVAL)  # its progress
            self._handle_all(backend.wait(timeout))
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

    def planning_notes(self) -> tuple[str, ...]:
        """The notes :meth:`prepare` made (read before the run starts)."""
        return tuple(self._notes)

    def _note(self, text: str) -> None:
        self._notes.append(text)
        log.warning("nbmplock: %s: %s", self.spec.out_path, text)

    # -- dispatch --------------------------------------------------------
    def _chunk_size(self, workers: int) -> int:
        saver = self._saver
        return self._sizer.size(workers, self.to_do - self._queue.dispatched,
                                saver.seconds_per_item if saver is not None else None)

    def _release_retries(self) -> None:
        """Failed items whose retry delay has passed go back to the work queue."""
        due = self._waiting.take_due(time.monotonic())
        if due:
            self._queue.retry(due)
            self.tally = self.tally.add(retrying=-len(due))
            self._dirty = True

    def _dispatch(self, backend: Backend) -> None:
        saver = self._saver
        workers = backend.lanes
        while backend.free_slots() > 0:
            size = self._chunk_size(workers)
            # Back-pressure: finished results not yet saved stay below save_batch
            # plus a chunk per worker (memory, and work a stop would throw away);
            # the saver wakes the manager when it has caught up.
            if saver is not None and saver.unsaved >= self.opts.save_batch + workers * size:
                return
            positions = self._queue.take(size, workers)
            if positions is None:
                # Nothing left to hand out: let an idle worker take over part of
                # a busy one's chunk (the local backend can; Dask cannot).
                if not self._stopping:
                    backend.give_back()
                return
            self._chunk_ids += 1
            backend.submit(Chunk(self._chunk_ids, positions, self.spec.items))
            self.tally = self.tally.add(in_flight=len(positions))
            self._dirty = True

    # -- events ----------------------------------------------------------
    def _handle_all(self, events: list) -> None:
        """Handle ``events`` in order. (A function of its own, so that no event
        outlives its handling in a variable of the loop: the local backend reads
        a worker's next results into the buffer of its last ones once nothing
        holds them, see ``_engine._spare_buffer``.)"""
        for event in events:
            self._handle(event)

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
        positions = ev.chunk.positions
        self.tally = self.tally.add(in_flight=-len(positions))
        self._sizer.measured(ev.n_run, ev.seconds, len(ev.results_blob or b""))
        if not ev.failures:
            if ev.n_run < len(positions):
                ran = positions[:ev.n_run]
                self._deliver(ran, None if ev.results is None else ev.results[:ev.n_run])
            else:
                # Unpickled here when anyone needs the values (the saver, or a job
                # that keeps results: the values stay in memory, the pickle goes
                # to disk and is dropped).
                needed = self._saver is not None or self.opts.keep_results
                self._deliver(positions, ev.results if needed else ev.results_list,
                              ev.results_blob)
        else:
            bad = {pos for f in ev.failures for pos in range(f.pos, f.pos + f.count)}
            keep = [i for i in range(ev.n_run) if i not in bad]
            results = ev.results
            self._deliver([positions[i] for i in keep],
                          None if results is None else [results[i] for i in keep])
            rows = []
            for f in ev.failures:
                for position in positions[f.pos:f.pos + f.count]:
                    rows += self._item_failed(position, f)
            self.store.record_failures(rows)
        if ev.n_run < len(positions) and not self._stopping:  # given back: the rest again
            self._queue.give_back(positions[ev.n_run:])
        self._dirty = True

    def _chunks_lost(self, ev: ChunksLost) -> None:
        if ev.kind is LossKind.TERMINATED and self._stop_request is not StopMode.FORCE:
            self._note(ev.message)  # ended from outside: a stop, not a failure
            self.request_stop(StopMode.FORCE)
        blamed: set = set()
        rows = []
        if ev.kind in (LossKind.DIED, LossKind.TIMEOUT):
            recent = self._recent_output.pop(ev.worker, ()) if ev.blamed else ()
            for chunk, pos in ev.blamed:
                timeout = ev.kind is LossKind.TIMEOUT
                error = ItemError(pos, self._unit, "ItemTimeout" if timeout else "WorkerDied",
                                  ev.message,
                                  ("Last output of the worker:\n" + "\n".join(recent))
                                  if recent else "", None, ev.seconds,
                                  FailureKind.TIMEOUT if timeout else FailureKind.DIED)
                for position in chunk.positions[pos:pos + self._unit]:
                    blamed.add(position)
                    rows += self._item_failed(position, error, ev.pid, ev.exitcode)
        self.store.record_failures(rows)
        for chunk in ev.chunks:
            self.tally = self.tally.add(in_flight=-len(chunk.positions))
            if not self._stopping:
                self._queue.retry([p for p in chunk.positions if p not in blamed], first=True)
        self._dirty = True

    def _item_failed(self, position: int, error: ItemError, pid: int | None = None,
                     exitcode: int | None = None) -> list[Failure]:
        """Retry the item, or make its Failure (returned for one batched record)."""
        attempts = self._retries.failed(position)
        if self._retries.again(attempts) and not self._stopping:
            reason = self._reason(error)
            if self._retries.worth(reason):
                delay = self._retries.delay(attempts, reason)
                if delay > 0:  # it waits in the manager, holding no worker
                    self._waiting.add(time.monotonic() + delay, position)
                    self.tally = self.tally.add(retrying=1)
                else:
                    self._queue.retry([position])
                return []
        key = self.spec.keys[position]
        prev = self.store.contents.failures.get(key)
        failure = Failure(self.spec.items[position], error.kind, error.exc_type, error.message,
                          error.traceback, attempts + (prev.attempts if prev else 0), pid,
                          exitcode, error.seconds, time.time(), key)
        if prev is None:
            self.tally = self.tally.add(failed=1)
        self._new_failures.append(failure)
        self._failures_changed = True
        if self.opts.errors == "raise" and self._error is None:
            self._fail_run(self._exception_for(failure, error.blob))
        return [failure]

    def _reason(self, error: ItemError) -> BaseException | None:
        """What ``retry_on`` and ``retry_after`` look at: the item's exception (rebuilt
        once per ``ItemError``), an ItemTimeoutError, or None for a dead worker."""
        if error.kind is FailureKind.DIED:
            return None
        if error.kind is FailureKind.TIMEOUT:
            return ItemTimeoutError(error.message)
        cached = self._reason_cache
        if cached is not None and cached[0] is error:
            return cached[1]
        exc = rebuild_exception(error.exc_type, error.message, error.traceback, error.blob)
        self._reason_cache = (error, exc)
        return exc

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
    def _deliver(self, positions, results: list | None, blob: bytes | None = None) -> None:
        """Items done: recorded at once, or handed to the saver. ``blob``, when
        given, is the pickle of exactly ``results`` (the worker's own)."""
        if not len(positions):
            return
        saver = self._saver
        if saver is None:
            cleared = self._record_done(positions, results, blob)
            self.tally = self.tally.add(done=len(positions), failed=-cleared)
            return
        if saver.error is not None or self._stop_begun is StopMode.FORCE:
            return  # not saved, so not done: they run again
        saver.add(positions, results, self.opts.save_batch)

    def _record_done(self, positions, results: list | None, blob: bytes | None = None) -> int:
        """One SPAN record: no per-item work here, unless failures are to be cleared.
        Runs on the manager thread, or on the saver thread after save_callback."""
        if self.opts.keep_results and blob is None and results is not None:
            blob = dumps(list(results))
        items = self.spec.item_list
        return self.store.record_span(items.hash, self.fingerprint.run, ranges_of(positions),
                                      items.keys, blob, results)

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
        if now >= self._next_live and not self.store.closed:  # for status elsewhere, 1/s
            self._next_live = now + LIVE_INTERVAL
            t = self.tally
            self.store.write_live({"in_flight": t.in_flight, "retrying": t.retrying,
                                   "done": t.done, "done_before": t.done_before,
                                   "total": t.total, "elapsed": now - (t.started or now),
                                   "rate_limit": self.opts.rate_limit})

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
                if self._limit is not None:
                    self._limit.remove()
                self._waiting.clear()  # not done, not failed: they run on resume
                self.tally = replace(self.tally, in_flight=0, in_flight_by_worker=(),
                                     retrying=0)
                self._record_end()
            finally:
                try:
                    self.store.write_live(None)
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
                store.record_end(status.value, self._end_reason(status), self.fingerprint.run)
            items = self.spec.item_list
            if status is RunStatus.FINISHED and c.done_before + c.done == c.total:
                store.record_complete(items.hash, len(items.keys), c.total)
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


def _dumps_small(item) -> bytes:
    """The size an item takes in a task, for the task-size cap (a sample's)."""
    try:
        return pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - the worker's dill will say what is wrong
        return b"x" * 64
