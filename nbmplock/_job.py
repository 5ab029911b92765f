"""``Job``: one resumable parallel map you can start, stop, resume and watch.

A Job runs its runner in a background thread so that the notebook cell that
started it returns at once and the kernel stays free for button clicks. Its
state is an explicit :class:`JobState`; every method checks it and says why a
call is not allowed. Views (the panel, the tqdm bar, tests) subscribe with
:meth:`Job.subscribe` and receive :class:`Event` objects, at most about ten
per second whatever the item rate; they are called without any lock held.
"""

from __future__ import annotations

import atexit
import enum
import logging
import os
import threading
import time
import weakref
from collections import deque
from itertools import repeat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._backend import exiting, make_backend_factory
from ._errors import InvalidArgumentsError, JobStateError, RunLockedError
from ._runner import Counters, Runner, StopMode, items_hash
from ._store import Failure, read_complete, read_contents
from ._validate import Spec, check_out_path, make_options, make_spec

log = logging.getLogger("nbmplock")

OUTPUT_TAIL = 500
_MISSING = object()
_RATE_WINDOW = 10.0


class JobState(enum.Enum):
    """Where a Job is. ``RUNNING -> STOPPING -> STOPPED`` on a Stop."""

    IDLE = "idle"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        return self in (JobState.RUNNING, JobState.STOPPING)


@dataclass(frozen=True)
class Progress:
    """A snapshot of a Job's numbers; safe to keep and compare."""

    total: int
    done: int
    done_before: int
    failed: int
    in_flight: int
    in_flight_by_worker: tuple[tuple[str, int], ...]
    rate: float
    elapsed: float
    eta: float | None
    state: JobState

    def __repr__(self) -> str:
        eta = f"{self.eta:.0f} s" if self.eta is not None else "-"
        return (f"Progress({self.state.value}: {self.done}/{self.total} done, "
                f"{self.done_before} in earlier runs, {self.failed} failed, "
                f"{self.in_flight} in flight, {self.rate:.1f} items/s, "
                f"elapsed {self.elapsed:.1f} s, ETA {eta})")

    @property
    def done_now(self) -> int:
        """Items finished by the current (or last) run."""
        return self.done - self.done_before

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.done)

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass(frozen=True)
class Event:
    """What observers receive. ``kind`` is ``"progress"`` or ``"state"``."""

    kind: str
    progress: Progress
    output: tuple[str, ...] = ()
    failures: tuple[Failure, ...] = ()


@dataclass(frozen=True)
class RunSummary:
    """What ``mp_lock`` returns: how the run went."""

    done: int
    failed: int
    skipped: int
    elapsed: float
    failures: tuple[Failure, ...]
    out_path: str
    state: JobState

    def __str__(self) -> str:
        text = (f"{self.done} done, {self.skipped} already done before, {self.failed} failed "
                f"in {self.elapsed:.1f} s ({self.state.value}; run directory {self.out_path!r})")
        return text


_ALLOWED = {
    "start": (JobState.IDLE,),
    "resume": (JobState.IDLE, JobState.STOPPED, JobState.FAILED, JobState.FINISHED),
    "retry_failed": (JobState.IDLE, JobState.STOPPED, JobState.FAILED, JobState.FINISHED),
}
_WHY = {
    JobState.RUNNING: "it is running; stop() it first or wait()",
    JobState.STOPPING: "it is stopping; wait() for it",
    JobState.STOPPED: "it was stopped; use resume()",
    JobState.FINISHED: "it has finished; use resume() to run items not done, or retry_failed()",
    JobState.FAILED: "it failed; use resume()",
    JobState.IDLE: "it has not been started; use start()",
}

_live: dict[str, weakref.ReferenceType] = {}
_live_lock = threading.Lock()


def _stop_every_job_at_exit(timeout: float = 5.0) -> None:
    """The interpreter is exiting (a script's end, a kernel restart or shutdown).

    Every live job stops as a Force stop would: no backend starts a worker any
    more, the workers are killed, nothing is recorded as failed, and each run
    records that it stopped. Registered (again) at every job start, after the
    backend imported ``multiprocess``: atexit handlers run last-registered
    first, and this one must run before ``multiprocess``'s, which would
    SIGTERM the workers, and IPython's, which clears the notebook's names.
    """
    exiting.set()
    with _live_lock:
        jobs = [ref() for ref in _live.values()]
    jobs = [job for job in jobs if job is not None and job.state.active]
    for job in jobs:
        job._stop(StopMode.FORCE, note="the interpreter exited (end of the script, or a "
                                       "kernel restart or shutdown)")
    deadline = time.monotonic() + timeout
    for job in jobs:
        job.wait(max(0.0, deadline - time.monotonic()))


def _register_exit_hook() -> None:
    atexit.unregister(_stop_every_job_at_exit)
    atexit.register(_stop_every_job_at_exit)


def live_job(out_path: str) -> Job | None:
    """The Job of this process currently running on ``out_path``, if any."""
    with _live_lock:
        ref = _live.get(os.path.realpath(out_path))
    job = ref() if ref is not None else None
    return job if job is not None and job.state.active else None


class _Handoff:
    """Who owns a run being launched: the job's new thread, or the caller of
    start() when it was interrupted first. Exactly one of them claims it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: str | None = None

    def claim(self, who: str) -> bool:
        with self._lock:
            if self._owner is None:
                self._owner = who
            return self._owner == who


class _RunEnd:
    """The end of a run, for threads to wait on; Ctrl-C may land anywhere in wait().

    Neither ``threading.Event`` nor ``Thread.join`` survive that in Python
    3.11: a KeyboardInterrupt just after ``Event.wait`` took its Condition's
    lock (in ``Condition.__enter__``) leaves the lock held, and the run's end
    and every later wait hang; one interrupting ``Thread.join`` while the
    thread runs releases the thread's own lock, and the thread counts as
    ended while it still runs. Here each waiter blocks on a lock of its own,
    which the job's thread releases at the end: an interrupted waiter leaves
    nothing locked that anyone else needs.
    """

    def __init__(self) -> None:
        self.ended = True
        self._waiters: list = []

    def begin(self) -> None:
        self._waiters = []
        self.ended = False

    # Invariant (no lost wake-up): end() sets ``ended`` before it copies the
    # waiter list, and a waiter appends its lock before it reads ``ended``. So
    # a waiter either is in the copy (and released) or reads ``ended`` True
    # (and does not block). begin() runs before the job's thread starts.
    def end(self) -> None:
        self.ended = True
        for lock in list(self._waiters):
            try:
                lock.release()
            except RuntimeError:  # its waiter was interrupted and left
                pass

    def wait(self, timeout: float | None = None) -> bool:
        if self.ended:
            return True
        lock = threading.Lock()
        lock.acquire()
        self._waiters.append(lock)
        try:
            if not self.ended:  # end() may have run before the append
                lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout))
        finally:
            try:
                self._waiters.remove(lock)
            except ValueError:
                pass
        return self.ended


class Job:
    """A resumable parallel map over ``data_list``, recorded in ``out_path``.

    Parameters are those of :func:`nbmplock.mp_lock` (keyword-only after
    ``out_path``), plus ``batch_size`` (``process`` then receives lists of
    items) and ``keep_results`` (store results so :meth:`results` can return
    them; by default only when there is no ``save_callback``). ``errors``
    defaults to ``"record"``: one bad item does not end a long run.

    Examples
    --------
    >>> job = Job(paths, resize, "runs/resize", num_procs=4)   # doctest: +SKIP
    >>> job.start(); job.wait(); job.progress.done               # doctest: +SKIP
    """

    def __init__(self, data_list: Sequence[str], process: Callable, out_path: str, *,
                 save_callback: Callable | None = None, num_procs: int | None = None,
                 save_batch: int = 10, shared_data: Any = None,
                 init_function: Callable | None = None, batch_size: int | None = None,
                 errors: str = "record", max_retries: int = 0,
                 item_timeout: float | None = None, chunk_size: int | None = None,
                 start_method: str | None = None, backend: Any = None,
                 keep_results: bool | None = None):
        if keep_results is None:
            keep_results = save_callback is None
        options = make_options(num_procs=num_procs, save_batch=save_batch,
                               batch_size=batch_size, errors=errors, max_retries=max_retries,
                               item_timeout=item_timeout, chunk_size=chunk_size,
                               start_method=start_method, keep_results=keep_results,
                               backend=backend)
        self.spec: Spec = make_spec(data_list, process, out_path, save_callback=save_callback,
                                    shared_data=shared_data, init_function=init_function,
                                    options=options)
        self.out_path = self.spec.out_path
        self._lock = threading.RLock()
        self._state = JobState.IDLE
        self._observers: list[Callable[[Event], None]] = []
        self._runner: Runner | None = None
        self._thread: threading.Thread | None = None
        self._end = _RunEnd()
        self.error: BaseException | None = None
        #: What the last run's stop left undone, in words (results not saved,
        #: a save_callback call abandoned); empty when nothing was.
        self.notes: tuple[str, ...] = ()
        self.fingerprint_changes: list[str] = []
        self.output: deque[str] = deque(maxlen=OUTPUT_TAIL)
        self._rate_samples: deque = deque()
        self._elapsed_before = 0.0
        self.reattached = False
        self._stored_counters: Counters | None = None
        self._stored_failures: tuple[Failure, ...] = ()

    # -- what the disk says before anything runs -------------------------
    def _stored(self) -> Counters:
        """Counters from the run directory: shown before a start, after a restart.

        Read on first use, so a Job that is started at once never reads twice.
        """
        if self._stored_counters is None:
            self._stored_counters = self._read_stored()
        return self._stored_counters

    def _read_stored(self) -> Counters:
        counters = Counters()
        complete = read_complete(self.out_path)
        if complete is not None and complete[0] == items_hash(self.spec.items):
            counters.total = counters.done_before = complete[2]
            return counters
        unique = set(self.spec.items)
        counters.total = len(unique)
        if os.path.isdir(self.out_path):
            contents = read_contents(self.out_path)
            counters.done_before = len(unique.intersection(contents.done))
            counters.failed = sum(1 for k in contents.failures if k in unique)
            self._stored_failures = tuple(sorted(contents.failures.values(),
                                                 key=lambda f: f.time))
        return counters

    # -- state -----------------------------------------------------------
    @property
    def state(self) -> JobState:
        return self._state

    def _check(self, action: str) -> None:
        if self._state not in _ALLOWED[action]:
            raise JobStateError(f"cannot {action}() this job: {_WHY[self._state]}")

    def _set_state(self, state: JobState) -> None:
        with self._lock:
            self._state = state
        self._emit(Event("state", self.progress))

    # -- control ---------------------------------------------------------
    def start(self) -> Job:
        """Start processing in a background thread; returns at once."""
        with self._lock:
            self._check("start")
            self._launch("all")
        self._emit(Event("state", self.progress))
        return self

    def resume(self) -> Job:
        """Run every item not recorded done (failed ones included) again."""
        with self._lock:
            self._check("resume")
            self._launch("all")
        self._emit(Event("state", self.progress))
        return self

    def retry_failed(self) -> Job:
        """Run only the items recorded failed."""
        with self._lock:
            self._check("retry_failed")
            self._launch("failed")
        self._emit(Event("state", self.progress))
        return self

    def stop(self, force: bool = False) -> Job:
        """Stop: by default workers finish their current item, which is recorded.

        With a ``save_callback``, the stop takes effect within about one call
        of it: results not handed to it by then are not recorded done and run
        again on resume. ``force=True`` kills the workers at once and does not
        wait for a ``save_callback`` call in progress (a hung one is
        abandoned; :attr:`notes` says so); items not saved stay not done.
        Returns at once; :meth:`wait` for the stop to complete. On a job that
        is not running (it finished, or a Stop came late) it does nothing.
        """
        return self._stop(StopMode.FORCE if force else StopMode.GRACEFUL)

    def _stop(self, mode: StopMode, note: str | None = None) -> Job:
        """Stop with ``mode``; ``StopMode.NOW`` is what Ctrl-C does (see _seed)."""
        with self._lock:
            if not self._state.active:
                return self
            runner = self._runner
            self._state = JobState.STOPPING
        if runner is not None:
            runner.request_stop(mode, note)
        self._emit(Event("state", self.progress))
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends (or ``timeout``); True when it has ended.

        Ctrl-C may land anywhere in it (see :class:`_RunEnd`).
        """
        return self._end.wait(timeout)

    def _launch(self, mode: str) -> None:
        existing = live_job(self.out_path)
        if existing is not None and existing is not self:
            raise RunLockedError(self.out_path, os.getpid(),
                                 " (another Job in this process; nbmplock.run() returns it)")
        runner = Runner(self.spec, mode=mode, listener=self._on_runner,
                        backend_factory=make_backend_factory(self.spec.options))
        previous = self._state
        handoff = _Handoff()
        try:
            runner.prepare()  # raises here, in the caller, for a locked or unwritable out_path
            _register_exit_hook()  # now that the backend's modules are imported
            self.fingerprint_changes = runner.fingerprint_changes
            self.error = None
            self.notes = ()
            self.reattached = False
            self._runner = runner
            self._rate_samples.clear()
            self._end.begin()
            self._state = JobState.RUNNING
            with _live_lock:
                _live[os.path.realpath(self.out_path)] = weakref.ref(self)
            self._thread = threading.Thread(target=self._run, args=(runner, handoff),
                                            name=f"nbmplock-{os.path.basename(self.out_path)}",
                                            daemon=True)
            self._thread.start()
        except BaseException:
            # Raised before the job's thread took the run over: an error, or a
            # Ctrl-C between two bytecodes (even inside Thread.start, which can
            # leave the new thread stuck before it runs). Whoever claims the
            # handoff first owns the run; here, nothing is left half-started:
            # the run directory is unlocked and wait() returns.
            if handoff.claim("caller"):
                self._abandon(runner, previous)
            raise

    def _abandon(self, runner: Runner, previous: JobState) -> None:
        try:
            if runner.store is not None:
                runner.store.close()
        finally:
            with _live_lock:
                key = os.path.realpath(self.out_path)
                if key in _live and _live[key]() is self:
                    del _live[key]
            self._state = previous
            self._end.end()

    def _run(self, runner: Runner, handoff: _Handoff) -> None:
        if not handoff.claim("thread"):
            return  # start() was interrupted first and has undone the launch
        try:
            outcome = runner.run()
            self.error = outcome.error
            self.notes = outcome.notes
            state = {"finished": JobState.FINISHED, "stopped": JobState.STOPPED,
                     "failed": JobState.FAILED}[outcome.status]
        except BaseException as exc:  # noqa: BLE001 - a bug must not leave the job RUNNING
            log.exception("nbmplock: the run ended with an internal error")
            self.error = exc
            state = JobState.FAILED
        self._elapsed_before = time.monotonic() - runner.counters.started
        self._stored_failures = tuple(sorted(runner.store.contents.failures.values(),
                                             key=lambda f: f.time))
        with self._lock:
            self._state = state
        try:
            self._emit(Event("state", self.progress))
        finally:
            self._end.end()  # after the views saw the final state

    # -- observing -------------------------------------------------------
    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on every change; returns an unsubscribe function.

        Called from the job's thread, at most about 10 times per second.
        """
        with self._lock:
            self._observers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._observers:
                    self._observers.remove(callback)
        return unsubscribe

    def _emit(self, event: Event) -> None:
        with self._lock:
            observers = list(self._observers)
        for callback in observers:
            try:
                callback(event)
            except Exception:  # noqa: BLE001 - a broken view must not break the run
                log.exception("nbmplock: an observer of the job raised")

    def _on_runner(self, counters: Counters, output: list, failures: list) -> None:
        now = time.monotonic()
        samples = self._rate_samples
        samples.append((now, counters.done))
        while len(samples) > 2 and now - samples[0][0] > _RATE_WINDOW:
            samples.popleft()
        self.output.extend(output)
        self._emit(Event("progress", self.progress, tuple(output), tuple(failures)))

    # -- numbers ---------------------------------------------------------
    @property
    def progress(self) -> Progress:
        runner = self._runner
        c = runner.counters if runner is not None else self._stored()
        state = self._state
        now = time.monotonic()
        done = c.done_before + c.done
        if runner is not None and state.active:
            elapsed = now - c.started
            try:
                t0, d0 = self._rate_samples[0]
            except IndexError:
                t0, d0 = c.started, 0
            rate = (c.done - d0) / (now - t0) if now - t0 > 0.5 else (
                c.done / elapsed if elapsed > 0 else 0.0)
        else:
            elapsed = self._elapsed_before
            rate = c.done / elapsed if elapsed > 0 else 0.0
        remaining = max(0, c.total - done - (c.failed if not state.active else 0))
        eta = remaining / rate if rate > 0 and state.active else None
        return Progress(c.total, done, c.done_before, c.failed, c.in_flight,
                        tuple(sorted(c.in_flight_by_worker.items())), rate, elapsed, eta, state)

    @property
    def failures(self) -> tuple[Failure, ...]:
        """Items recorded failed (latest attempt each), oldest first."""
        runner = self._runner
        if runner is not None and self._state.active and runner.store is not None:
            return tuple(sorted(runner.store.contents.failures.values(), key=lambda f: f.time))
        if runner is None:
            self._stored()  # reads the stored failures from disk, once
        return self._stored_failures

    @property
    def summary(self) -> RunSummary:
        p = self.progress
        return RunSummary(done=p.done_now, failed=p.failed, skipped=p.done_before,
                          elapsed=p.elapsed, failures=self.failures, out_path=self.out_path,
                          state=p.state)

    def results(self) -> list:
        """Results in ``data_list`` order (None for items not done).

        Available when results are kept (``keep_results``, the default without
        a ``save_callback``), from this run and every earlier one.
        """
        if not self.spec.options.keep_results:
            raise JobStateError("this job does not keep results (it has a save_callback); "
                                "create it with keep_results=True to store them")
        if self._state.active:
            raise JobStateError(f"cannot read results(): {_WHY[self._state]}")
        runner = self._runner
        if runner is not None and runner.store is not None and runner.store.contents.results is not None:
            stored = runner.store.contents.results
        else:
            stored = read_contents(self.out_path, results=True, names=False).results
        missing = _MISSING
        out = list(map(stored.get, self.spec.items, repeat(missing)))
        n_missing = out.count(missing)
        if n_missing:
            failed = {f.item for f in self.failures}
            out = [None if r is missing else r for r in out]
            unexplained = n_missing - sum(1 for item in self.spec.items if item in failed)
            if unexplained > 0:
                log.warning("nbmplock: %d items of %r have no stored result (not done yet, or "
                            "done by a run that kept no results, such as mp_lock); their "
                            "results are None", unexplained, self.out_path)
        return out

    # -- display ---------------------------------------------------------
    def status_text(self) -> str:
        """One paragraph of plain text: the repr where widgets cannot render."""
        p = self.progress
        parts = [f"nbmplock Job on {self.out_path!r}: {p.state.value}",
                 f"{p.done:,}/{p.total:,} done"]
        if p.done_before:
            parts.append(f"{p.done_before:,} in earlier runs")
        if p.failed:
            parts.append(f"{p.failed:,} failed")
        if p.in_flight:
            parts.append(f"{p.in_flight:,} in flight")
        if p.rate:
            parts.append(f"{p.rate:,.1f} items/s")
        if p.eta is not None:
            parts.append(f"ETA {p.eta:,.0f} s")
        text = ", ".join(parts) + "."
        if self.error is not None:
            text += f" Error: {type(self.error).__name__}: {self.error}"
        return text

    def __repr__(self) -> str:
        return f"<{self.status_text()}>"

    def _repr_mimebundle_(self, include=None, exclude=None):
        text = self.status_text()
        try:
            from ._panel import Panel
            panel = Panel(self)
        except ImportError:
            return {"text/plain": text}
        if self.state.active:  # the text of an exported notebook is frozen at this moment
            text += " (live panel: open the notebook in Jupyter)"
        bundle = panel._repr_mimebundle_(include=include, exclude=exclude) or {}
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        bundle = dict(bundle)
        bundle["text/plain"] = text
        return bundle


def run(data_list: Sequence[str], process: Callable, out_path: str, **kwargs: Any) -> Job:
    """Build a :class:`Job` and start it; return it (the cell's last line shows its panel).

    If this process already runs a Job on ``out_path`` (the cell was run again),
    no second run starts: that live Job is returned, and a warning says so.
    """
    try:
        existing = live_job(check_out_path("out_path", out_path))
    except InvalidArgumentsError:
        existing = None  # Job() below says what is wrong with it
    if existing is not None:
        log.warning("nbmplock: a run on %r is already going in this kernel; showing it "
                    "instead of starting a second one", out_path)
        existing.reattached = True
        return existing
    job = Job(data_list, process, out_path, **kwargs)
    job.start()
    return job
