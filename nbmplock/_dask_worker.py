"""The Dask backend's worker side: what runs inside Dask worker processes.

The driver (:mod:`nbmplock._dask`) submits :func:`run_task` once per chunk.
Each worker process keeps, per run (its token), the functions and the
``init_values`` of ``init_function`` (:class:`_JobCache`), reads the run's stop
event at most every :data:`STOP_POLL` seconds (:class:`_StopFlag`), captures
what the task's thread prints (:class:`_Capture`), and interrupts an item that
overruns ``item_timeout`` (:class:`_Watchdog`). Items run through
:func:`nbmplock._worker.run_chunk`, the one loop every backend shares.

This module imports ``distributed`` only inside functions that run on a worker.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import sys
import threading
import time
from collections import OrderedDict

import dill

from . import _worker
from ._backend import new_slot
from ._errors import FailureKind, ItemTimeoutError
from ._wire import describe_exception, dumps

#: Seconds between two reads of the stop event in a running task.
STOP_POLL = 0.2
#: Output kept per chunk (characters); the rest is dropped with a note.
MAX_OUTPUT_CHARS = 1 << 20
#: A worker forgets a run's init_values after this long unused (its driver was killed).
STALE_AFTER = 300.0
#: How long a worker waits for the run's payload (seconds).
PAYLOAD_TIMEOUT = 120.0


class _JobCache:
    """One run's functions and ``init_values`` in one worker process."""

    __slots__ = ("lock", "ready", "process", "shared_data", "batch_size", "init_values", "error",
                 "active", "last_used")

    def __init__(self):
        self.lock = threading.Lock()
        self.ready = False
        self.process = self.shared_data = self.batch_size = self.init_values = None
        self.error: tuple | None = None
        self.active = 0
        self.last_used = time.monotonic()


_jobs: dict[str, _JobCache] = {}
_jobs_lock = threading.Lock()
_stopped: OrderedDict = OrderedDict()  # tokens of runs seen stopped or ended, newest last
_STOPPED_KEEP = 1024
_local = threading.local()


def _job(token: str, payload_name: str, item_timeout: float | None = None) -> _JobCache:
    """This process's cache entry of the run; loads and initialises it the first time.

    The caller holds it (``active``) until :func:`_release`. A new run evicts the
    entries of runs idle for :data:`STALE_AFTER` seconds: those of drivers that
    were killed before their shutdown could clean up.
    """
    with _jobs_lock:
        job = _jobs.get(token)
        if job is None:
            now = time.monotonic()
            for old_token, old in list(_jobs.items()):
                if not old.active and now - old.last_used > STALE_AFTER:
                    del _jobs[old_token]
            job = _jobs[token] = _JobCache()
        job.active += 1
    if job.ready:
        return job
    # Fetched before taking the lock, so that a slow fetch holds no other thread.
    blob = fetch_error = None
    try:
        blob = _fetch_payload(payload_name)
    except BaseException as exc:  # noqa: BLE001 - reported to the driver
        fetch_error = exc
    with job.lock:
        if not job.ready:
            try:
                if fetch_error is not None:
                    raise fetch_error
                # init_function once per process (awaited on the process's event
                # loop when async); an async process runs on that loop.
                process, shared_data, init_values, batch_size = _worker.initialise(
                    dill.loads(blob), item_timeout)
            except BaseException as exc:  # noqa: BLE001 - reported to the driver
                job.error = describe_exception(exc)
            else:
                job.process, job.shared_data = process, shared_data
                job.batch_size, job.init_values = batch_size, init_values
            job.ready = True
    return job


def _fetch_payload(name: str) -> bytes:
    """The run's payload blob, from the scheduler's Variable ``name``."""
    from distributed import Variable

    return Variable(name).get(timeout=PAYLOAD_TIMEOUT)


def _release(job: _JobCache) -> None:
    with _jobs_lock:
        job.active -= 1
        job.last_used = time.monotonic()


def _mark_stopped(token: str) -> None:
    with _jobs_lock:
        _stopped[token] = None
        while len(_stopped) > _STOPPED_KEEP:
            _stopped.popitem(last=False)


def forget_job(token: str) -> bool:
    """Run on every worker at shutdown: drop the run's ``init_values``."""
    _mark_stopped(token)
    with _jobs_lock:
        return _jobs.pop(token, None) is not None


class _StopFlag:
    """``stop_flag`` for ``run_chunk``: reads the run's Dask Event at most every STOP_POLL s."""

    def __init__(self, token: str, event_name: str):
        self._token = token
        self._name = event_name
        self._event = None
        self._next = time.monotonic() + STOP_POLL

    @property
    def value(self) -> bool:
        if self._token in _stopped:
            return True
        if time.monotonic() < self._next:
            return False
        try:
            if self._event is None:
                from distributed import Event
                self._event = Event(self._name)
            stopped = bool(self._event.is_set())
        except Exception:  # noqa: BLE001 - cannot ask: keep going; a cancel still ends us
            stopped = False
        self._next = time.monotonic() + STOP_POLL
        if stopped:
            _mark_stopped(self._token)
        return stopped


class _Capture:
    """Text written to sys.stdout/sys.stderr by one task's thread."""

    def __init__(self):
        self.parts: list[str] = []
        self.size = 0
        self.dropped = 0

    def write(self, text: str) -> None:
        if self.size + len(text) > MAX_OUTPUT_CHARS:
            self.dropped += len(text)
            return
        self.parts.append(text)
        self.size += len(text)

    def text(self) -> str:
        out = "".join(self.parts)
        if self.dropped:
            if out and not out.endswith("\n"):
                out += "\n"
            out += f"[nbmplock: {self.dropped:,} more characters of output dropped]\n"
        return out


class _ThreadRouter:
    """Stands in for sys.stdout/sys.stderr: a task thread's writes go to its capture."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        capture = getattr(_local, "capture", None)
        if capture is not None:
            capture.write(text)
            return len(text)
        if self._stream is None:
            return len(text)
        return self._stream.write(text)

    def flush(self) -> None:
        if getattr(_local, "capture", None) is None and self._stream is not None:
            self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


_router_lock = threading.Lock()


def _install_router() -> None:
    if isinstance(sys.stdout, _ThreadRouter) and isinstance(sys.stderr, _ThreadRouter):
        return
    with _router_lock:
        for name in ("stdout", "stderr"):
            if not isinstance(getattr(sys, name), _ThreadRouter):
                setattr(sys, name, _ThreadRouter(getattr(sys, name)))


def _worker_label() -> str:
    try:
        from distributed import get_worker
        name = get_worker().name
    except Exception:  # noqa: BLE001 - not in a worker (tests call the task directly)
        return f"pid{os.getpid()}"
    return f"dask-{name}" if isinstance(name, int) else str(name)


# -- item_timeout: interrupt an overrunning item in its thread -------------

class _Interrupt(BaseException):
    """Raised asynchronously in a task thread whose item overran ``item_timeout``.

    A BaseException, so that ``except Exception`` in user code does not swallow it.
    """


def _async_raise(thread_id: int, exc_type) -> None:
    """Raise ``exc_type`` in thread ``thread_id`` at its next bytecode; None clears it."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type) if exc_type is not None else None)


class _Watchdog:
    """One thread per worker process that interrupts items past their deadline.

    ``arm`` and ``disarm`` bracket each call of ``process``; the watchdog fires at
    most once per arm, and only while armed (under the same lock), and ``disarm``
    clears an exception fired but not yet delivered, so it never escapes the call.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._armed: dict[int, list] = {}
        self._thread: threading.Thread | None = None

    def arm(self, thread_id: int, deadline: float) -> None:
        with self._cond:
            self._armed[thread_id] = [deadline, False]
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nbmplock-timeout",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def disarm(self, thread_id: int) -> None:
        with self._cond:
            entry = self._armed.pop(thread_id, None)
            if entry is not None and entry[1]:
                _async_raise(thread_id, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                soonest = None
                for thread_id, entry in self._armed.items():
                    if entry[1]:
                        continue
                    if now >= entry[0]:
                        _async_raise(thread_id, _Interrupt)
                        entry[1] = True
                    elif soonest is None or entry[0] < soonest:
                        soonest = entry[0]
                self._cond.wait(None if soonest is None else soonest - now)


_watchdog = _Watchdog()


def _with_timeout(process, seconds: float, step: int):
    """``process`` interrupted after ``seconds``; also the set of positions that were.

    ``run_chunk`` calls it once per unit (an item, or a batch of ``step`` items),
    in order, so the n-th call is the unit at position ``n * step``.
    """
    timed_out: set = set()
    calls = 0

    def guarded(item, shared_data, init_values):
        nonlocal calls
        position = calls * step
        calls += 1
        thread_id = threading.get_ident()
        try:
            _watchdog.arm(thread_id, time.monotonic() + seconds)
            try:
                return process(item, shared_data, init_values)
            finally:
                _watchdog.disarm(thread_id)
        except _Interrupt:
            timed_out.add(position)
            raise ItemTimeoutError(
                f"the item ran longer than item_timeout={seconds:g} s and was interrupted "
                "in its Dask worker thread") from None

    return guarded, timed_out


def _run_lanes(items, process, job: _JobCache, stop_flag, limit, lanes: int) -> tuple:
    """``concurrency`` > 1: the task's units on ``lanes`` threads, taken in order.

    Returns what :func:`nbmplock._worker.run_chunk` returns for the whole list.
    Units are taken in order and every unit taken is run (or found not run
    when a stop came first); ``n_run`` is the length of the prefix that ran.
    After a stop, units that ran beyond a unit that did not are not reported
    (they run again on resume; at most ``lanes - 1`` of them).
    """
    step = job.batch_size or 1
    units = [items[i:i + step] for i in range(0, len(items), step)]
    outcome: list = [None] * len(units)
    lock = threading.Lock()
    cursor = 0
    capture = getattr(_local, "capture", None)
    began = time.perf_counter()

    def lane() -> None:
        nonlocal cursor
        _local.capture = capture  # the task's output, from its lanes too
        while True:
            with lock:
                index = cursor
                cursor += 1
            if index >= len(units):
                return
            outcome[index] = _worker.run_chunk(units[index], process, job.shared_data,
                                               job.init_values, job.batch_size, new_slot(),
                                               stop_flag, True, limit)
            if outcome[index][0] == 0:
                return  # stopped before it started

    threads = [threading.Thread(target=lane, name=f"nbmplock-dask-lane{i}", daemon=True)
               for i in range(min(lanes, len(units)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    n_run, results, failures = 0, [], []
    for index, got in enumerate(outcome):
        if got is None or got[0] < len(units[index]):
            break
        ran, unit_results, unit_failures, _ = got
        failures += [f._replace(pos=f.pos + n_run) for f in unit_failures]
        results += unit_results
        n_run += ran
    return n_run, results, failures, time.perf_counter() - began


def run_task(payload_name: str, token: str, stop_name: str, blob: bytes, want_results: bool,
             item_timeout: float | None, concurrency: int = 1, limit=None) -> tuple:
    """One chunk on a Dask worker: ``(label, output, kind, body)``.

    ``kind`` is ``"chunk"`` (``body`` is the pickled message of
    :mod:`nbmplock._worker`'s protocol), ``"init_error"`` (``body`` is
    ``describe_exception(exc)``) or ``"stopped"`` (the run was stopped before
    this task started; nothing ran).
    """
    label = _worker_label()
    if token in _stopped:
        return label, "", "stopped", None
    _install_router()
    capture = _local.capture = _Capture()
    job = None
    try:
        job = _job(token, payload_name, item_timeout)
        if job.error is not None:
            return label, capture.text(), "init_error", job.error
        items = pickle.loads(blob)
        slot = new_slot()  # nobody asks a Dask task to give work back
        process, timed_out = job.process, None
        # An async process is cancelled on its loop (see _worker.EventLoop).
        if item_timeout is not None and not getattr(process, "on_event_loop", False):
            process, timed_out = _with_timeout(job.process, item_timeout, job.batch_size or 1)
            if concurrency > 1:
                timed_out = None  # positions are per lane: the error's type says it
        if concurrency > 1:
            n_run, results, failures, seconds = _run_lanes(
                items, process, job, _StopFlag(token, stop_name), limit, concurrency)
        else:
            n_run, results, failures, seconds = _worker.run_chunk(
                items, process, job.shared_data, job.init_values, job.batch_size, slot,
                _StopFlag(token, stop_name), True, limit)
    finally:
        _local.capture = None
        if job is not None:
            _release(job)
    if timed_out:
        failures = [f._replace(kind=FailureKind.TIMEOUT) if f.pos in timed_out else f
                    for f in failures]
    elif item_timeout is not None:  # lanes: an interrupted item raised ItemTimeoutError
        failures = [f._replace(kind=FailureKind.TIMEOUT) if f.exc_type == "ItemTimeoutError"
                    else f for f in failures]
    results = results if want_results else None
    msg = ("chunk", 0, n_run, results, failures, seconds)
    try:
        body = dumps(msg)
    except Exception:  # noqa: BLE001 - an unpicklable result fails its item only
        if results is None:
            raise
        results, failures = _worker.without_unpicklable(results, failures)
        body = dumps(("chunk", 0, n_run, results, failures, seconds))
    return label, capture.text(), "chunk", body
