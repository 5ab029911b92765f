"""The Dask backend: the same job on a ``distributed`` cluster.

:class:`DaskBackend` implements the :class:`~nbmplock._backend.Backend`
protocol on a ``distributed.Client`` (or a scheduler address, for which it
creates, and later closes, its own Client). The run store, the save callback,
the Job and the panel stay in the driver; the cluster only computes. This is
the only module that imports ``distributed``, and only when a Dask backend is
built: without it, :func:`nbmplock._optional.require` raises
:class:`~nbmplock.MissingDependencyError` naming ``pip install "nbmplock[dask]"``.

How the protocol maps onto Dask
-------------------------------
Functions and ``shared_data`` once
    ``(process, init_function, shared_data, batch_size)`` is serialised with
    dill (``recurse=True``: notebook functions travel with their globals) into
    one blob, stored once on the scheduler in a ``distributed.Variable``. The
    first chunk of a run in a worker process reads it; later chunks use the
    per-process cache below. Nothing is sent per item or per chunk. Why not a
    scattered blob or a task's result passed to every chunk task: Dask runs a
    task only on workers that hold its dependencies (every chunk would pile
    onto the one holder), scattered data whose holders all die is lost for
    good, and a task's result is lost, and counted as killed, with the
    workers it shares (a poison item would take it down). The scheduler
    serves the blob once per worker process, so big data belongs on shared
    storage, loaded by ``init_function`` (a warning says so above
    :data:`LARGE_PAYLOAD` bytes). The Variable is deleted at shutdown. Its
    name carries the driver's client id, so the blob of a driver killed
    mid-run is deleted when the next run starts on that cluster: each start
    sweeps the payload Variables whose client is no longer connected.
``init_function`` once per worker process
    The task function keeps a per-process cache keyed by the run's token
    (a new token per run). The first task of a run in a worker process loads
    the payload and calls ``init_function`` under a lock; later tasks reuse
    ``init_values``. A replacement worker starts with an empty cache, so init
    runs again there. With ``threads_per_worker > 1`` the worker's threads
    share one ``init_values`` (``process`` must then be thread-safe). At
    shutdown every worker drops the run's entry; the entry of a driver that
    was killed is dropped when another run starts on that worker after
    :data:`STALE_AFTER` idle seconds.
One task per chunk, bounded
    Each :meth:`DaskBackend.submit` is one task running
    :func:`nbmplock._worker.run_chunk`, the loop every backend shares, so
    per-item exceptions and tracebacks come back exactly as locally. At most
    :data:`PREFETCH` tasks per worker thread are in flight; the count of
    threads is re-read every :data:`REFRESH` seconds (adaptive clusters).
Results streamed
    A done callback on each future puts it on a :class:`queue.SimpleQueue`;
    :meth:`DaskBackend.wait` blocks on that queue (and :meth:`wakeup` puts a
    marker on it), then gathers every finished future in one call.
Stop
    :meth:`request_stop` returns at once; a helper thread sets a
    ``distributed.Event`` and cancels every task the scheduler has not handed
    to a worker yet. A running task reads the event through :class:`_StopFlag`
    (the ``stop_flag`` of ``run_chunk``) at most every :data:`STOP_POLL`
    seconds, so it returns after its current item with its results: a graceful
    stop records them. :meth:`kill` cancels everything at once; Dask cannot
    interrupt a running task thread, so such a task stops at its next poll of
    the event and its results are discarded.
Lost workers
    When a worker dies mid-task, the scheduler runs the task again on another
    worker (up to ``distributed.scheduler.allowed-failures`` times, default 3).
    After that the future errs with ``KilledWorker``. Dask counts the death
    against every task assigned to that worker, not only the one running, so
    the first ``KilledWorker`` of a chunk is only a retry: it comes back as
    :class:`ChunksLost` without blame and the runner re-sends its items one
    unit per chunk. A unit lost again is blamed: it fails with kind
    ``"died"`` (``WorkerDiedError`` under ``errors="raise"``; ``max_retries``
    tries it again). An item that kills its worker therefore costs about
    ``2 x (allowed-failures + 1)`` worker restarts before it fails, and an
    item that shared a worker with it through both rounds may fail with it.
    A cluster without workers for :data:`NO_WORKERS_TIMEOUT` seconds, a lost
    scheduler, or workers that keep dying before any task succeeded end the
    run with a clear error. Never a hang.
``item_timeout`` (best effort)
    A Dask worker thread cannot be killed. A watchdog thread in the worker
    raises an exception asynchronously in a task thread whose item runs
    longer than ``item_timeout``; the item fails with kind ``"timeout"``
    (re-raised in the driver as :class:`~nbmplock.ItemTimeoutError`) and the
    chunk goes on. Pure-Python code is interrupted within a few milliseconds;
    code blocked in C (``time.sleep``, I/O, a numpy call) only when that call
    returns. The worker is never restarted for a timeout.
Worker output
    ``print`` (``sys.stdout`` and ``sys.stderr``) from the task's own thread,
    ``init_function`` included, is captured per chunk and returned with the
    results; it becomes :class:`WorkerOutput` labelled with the Dask worker's
    name. Output written by other threads or straight to the file descriptors
    goes to the worker's own log.

Requirements on the cluster: ``nbmplock`` (this version) and ``dill`` must be
importable on every worker, and so must every module that ``process`` or
``init_function`` import or are defined in (functions from a notebook or
``__main__`` travel by value).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import queue
import threading
import time
import uuid
from concurrent.futures import CancelledError


from ._backend import (BackendBase, Chunk, ChunkDone, ChunksLost, Fatal, InitFailed, LossKind,
                       WorkerOutput, WorkPayload)
from ._dask_worker import forget_job, run_task
from ._errors import WorkerDiedError, WorkerInitError
from ._optional import require
from ._wire import serialize_functions

log = logging.getLogger("nbmplock")

#: Tasks in flight per worker thread: one running, one ready to start.
PREFETCH = 2
#: Seconds between two looks at the cluster's size.
REFRESH = 2.0
#: A run whose cluster has had no worker this long fails instead of waiting.
NO_WORKERS_TIMEOUT = 120.0
#: Units blamed for dying workers, before any task succeeded, that end the run.
MAX_START_DEATHS = 3
#: Above this size (bytes) the payload gets a warning: the scheduler serves it.
LARGE_PAYLOAD = 50_000_000
#: Bound on each cleanup call to the cluster during shutdown (seconds).
CALL_TIMEOUT = 10.0
#: Names of the scheduler Variables holding a run's payload start with this.
PAYLOAD_PREFIX = "nbmplock-payload-"

_WAKE = object()


class DaskBackend(BackendBase):
    """Run chunks as tasks on a Dask cluster; driven by the runner's thread.

    Parameters
    ----------
    payload
        The functions and ``shared_data`` of the run.
    backend
        A synchronous ``distributed.Client`` (used, never closed) or a
        scheduler address such as ``"tcp://10.0.0.5:8786"`` (a Client is
        created and closed at :meth:`shutdown`).
    workers
        ``num_procs``: plan for this many worker threads (at most
        ``PREFETCH * workers`` tasks in flight). ``None``: every thread of
        the cluster, re-read as it grows or shrinks.
    item_timeout
        Seconds; best effort, see the module docstring.
    concurrency
        Items of one task in flight at once on its worker (threads of the
        task, or coroutines on the worker process's event loop).
    limit
        The job's :class:`~nbmplock._ratelimit.RateLimit`: a file on the
        driver's machine. Workers on that machine share it with each other;
        a worker on another machine opens a file of that name on its own
        machine, so each machine keeps the limit on its own (pass
        ``rate_limit`` divided by the number of machines).

    Examples
    --------
    >>> from distributed import Client                              # doctest: +SKIP
    >>> nbmplock.run(items, process, "runs/x", backend=Client())     # doctest: +SKIP
    """

    #: Items per task are capped at about this many bytes: a task's arguments go
    #: through the scheduler.
    max_task_bytes = 1 << 20
    #: Seconds of work per task. Shorter than the local backend's chunks: a
    #: Dask task cannot be cut once it runs (there is no ``give_back``), so the
    #: tail is balanced by small tasks instead.
    target_chunk_seconds = 0.2

    def __init__(self, payload: WorkPayload, backend, *, workers: int | None = None,
                 item_timeout: float | None = None, concurrency: int = 1, limit=None):
        self._dd = require("distributed")
        self._payload = payload
        self._target = backend
        self._want_results = payload.want_results
        self._unit = payload.batch_size or 1
        self._fixed_workers = workers
        self.workers = workers or 1
        self._timeout = item_timeout
        self.concurrency = concurrency  # items of a task in flight at once on its worker
        self._limit = limit  # the job's RateLimit (one machine; see _ratelimit)
        self._token = uuid.uuid4().hex
        self._stop_name = f"nbmplock-stop-{self._token}"
        self._payload_name = ""  # PAYLOAD_PREFIX, the client's id, "-", the token
        self._variable = None
        self._client = None
        self._owns_client = False
        self._event = None
        self._chunks: dict = {}          # task key -> (Chunk, Future); runner thread only
        self._items_in_flight = 0
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._helpers: list[threading.Thread] = []
        self._stopping = False
        self._forced = False
        self._closed = False
        self._fatal = False
        self._succeeded = False
        self._start_deaths = 0
        self._lost: dict = {}  # items of chunks lost to KilledWorker (insertion-ordered set)
        self._next_refresh = 0.0
        self._no_workers_since: float | None = None

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        """Connect, send the payload to the workers once, create the stop event."""
        dd = self._dd
        target = self._target
        if isinstance(target, str):
            try:
                self._client = dd.Client(target, set_as_default=False)
            except (OSError, TimeoutError) as exc:
                raise ConnectionError(f"nbmplock: cannot connect to the Dask scheduler at "
                                      f"{target!r}: {type(exc).__name__}: {exc}") from exc
            self._owns_client = True
        else:
            if getattr(target, "asynchronous", False):
                raise TypeError("nbmplock: an asynchronous distributed.Client is not supported; "
                                "pass a synchronous Client or the scheduler address")
            if getattr(target, "status", "running") not in ("running", "connecting"):
                raise RuntimeError(f"nbmplock: the Dask client is {target.status}; "
                                   "pass a running Client or the scheduler address")
            self._client = target
        client = self._client
        data = serialize_functions(self._payload.functions, "the Dask workers")
        n_workers, threads = _cluster_size(client)
        if len(data) > LARGE_PAYLOAD:
            log.warning("nbmplock: process, init_function and shared_data take %.0f MB; the "
                        "Dask scheduler sends them to every worker process. Put large data "
                        "on shared storage and load it in init_function.", len(data) / 1e6)
        self._payload_name = f"{PAYLOAD_PREFIX}{client.id}-{self._token}"
        self._variable = dd.Variable(self._payload_name, client=client)
        self._variable.set(data)
        self._helper(_sweep_orphan_payloads, client)
        self._event = dd.Event(self._stop_name, client=client)
        self._apply_size(n_workers, threads, time.monotonic())

    @property
    def lanes(self) -> int:
        """Tasks run at once (each runs ``concurrency`` of its items at once itself)."""
        return self.workers

    def free_slots(self) -> int:
        if self._stopping:
            return 0
        return max(0, PREFETCH * self.workers - len(self._chunks))

    def submit(self, chunk: Chunk) -> None:
        key = f"nbmplock-{self._token}-{chunk.id}"
        blob = pickle.dumps(chunk.items, protocol=pickle.HIGHEST_PROTOCOL)  # opaque to Dask
        future = self._client.submit(run_task, self._payload_name, self._token,
                                     self._stop_name, blob, self._want_results,
                                     self._timeout, self.concurrency, self._limit, key=key)
        self._chunks[key] = (chunk, future)
        self._items_in_flight += len(chunk)
        future.add_done_callback(self._done.put)

    def in_flight(self) -> dict[str, int]:
        return {"dask": self._items_in_flight} if self._items_in_flight else {}

    def wakeup(self) -> None:
        # Invariant (no lost wake-up): the queue is level-triggered, like the
        # local backend's pipe; done callbacks put their future the same way.
        self._done.put(_WAKE)

    def request_stop(self) -> None:
        """Graceful: running tasks return after their current item; queued ones are cancelled."""
        if self._stopping or self._client is None:
            self._stopping = True
            return
        self._stopping = True
        pending = {key: future for key, (_, future) in self._chunks.items()}
        if self._fatal:
            self._helper(self._cancel_all, list(pending.values()))
        else:
            self._helper(self._stop_tasks, pending)

    def kill(self) -> list:
        """Forced: cancel every task now; their chunks come back as lost."""
        self._stopping = True
        self._forced = True
        entries = list(self._chunks.values())
        self._chunks.clear()
        self._items_in_flight = 0
        if self._client is not None:
            self._helper(self._cancel_all, [future for _, future in entries])
        if not entries:
            return []
        return [ChunksLost([chunk for chunk, _ in entries], None, LossKind.KILLED, "stopped by force",
                           "dask")]

    def shutdown(self) -> None:
        """Cancel what is left, free the run's state on the workers, close an owned Client."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        client = self._client
        if client is None:
            return
        leftover = [future for _, future in self._chunks.values()]
        self._chunks.clear()
        self._items_in_flight = 0
        keep_event = self._forced or bool(leftover)
        if leftover:
            self._helper(self._cancel_all, leftover)
        for thread in self._helpers:
            thread.join(CALL_TIMEOUT)
        _bounded(lambda: client.run(forget_job, self._token, on_error="ignore"),
                 CALL_TIMEOUT)
        # After a forced stop, tasks cancelled while running read the event until they
        # return: it stays set (one tiny entry on the scheduler). Otherwise free it.
        if self._event is not None and not keep_event:
            _bounded(self._event.clear, CALL_TIMEOUT)
        if self._variable is not None:
            _bounded(self._variable.delete, CALL_TIMEOUT)
        if self._owns_client:
            _bounded(client.close, CALL_TIMEOUT + 5)

    def _helper(self, target, arg) -> None:
        thread = threading.Thread(target=target, args=(arg,), name="nbmplock-dask-stop",
                                  daemon=True)
        thread.start()
        self._helpers.append(thread)

    def _stop_tasks(self, pending: dict) -> None:
        """Set the stop event, then cancel the tasks no worker has started."""
        self._set_stop_event()
        pending = {key: f for key, f in pending.items() if not f.done()}
        if not pending:
            return
        try:
            started = {key for keys in self._client.processing().values() for key in keys}
        except Exception:  # noqa: BLE001 - then cancel everything: never wait on the unknown
            log.debug("nbmplock: could not read the scheduler's processing tasks",
                      exc_info=True)
            started = set()
        self._cancel([f for key, f in pending.items() if key not in started and not f.done()])

    def _cancel_all(self, futures: list) -> None:
        self._set_stop_event()
        self._cancel(futures)

    def _set_stop_event(self) -> None:
        try:
            self._event.set()
        except Exception:  # noqa: BLE001 - the cancellation still ends the run
            log.debug("nbmplock: could not set the Dask stop event", exc_info=True)

    def _cancel(self, futures: list) -> None:
        if futures:
            try:
                self._client.cancel(futures)
            except Exception:  # noqa: BLE001
                log.warning("nbmplock: could not cancel %d Dask tasks", len(futures),
                            exc_info=True)

    # -- waiting ---------------------------------------------------------
    def wait(self, timeout: float | None) -> list:
        now = time.monotonic()
        if self._chunks:
            tick = max(0.0, self._next_refresh - now)
            timeout = tick if timeout is None else min(timeout, tick)
        got = []
        try:
            got.append(self._done.get(timeout=timeout))
        except queue.Empty:
            pass
        while True:
            try:
                got.append(self._done.get_nowait())
            except queue.Empty:
                break
        events: list = []
        ready = [f for f in got if f is not _WAKE]
        if ready:
            self._collect(ready, events)
        now = time.monotonic()
        if now >= self._next_refresh:
            self._refresh(now, events)
        return events

    def _take(self, future):
        entry = self._chunks.pop(future.key, None)
        if entry is None or entry[1] is not future:
            if entry is not None:  # pragma: no cover - keys are unique per run
                self._chunks[future.key] = entry
            return None
        self._items_in_flight -= len(entry[0])
        return entry[0]

    def _collect(self, futures: list, events: list) -> None:
        finished = []
        for future in futures:
            if future.key not in self._chunks:
                continue  # killed: already reported
            status = future.status
            if status in ("finished", "lost"):
                finished.append(future)
            elif status == "error":
                self._errored(future, events)
            elif status == "cancelled":
                self._cancelled(future, events)
            else:  # pragma: no cover - done callbacks fire only after pending
                future.add_done_callback(self._done.put)
        if not finished:
            return
        try:
            values = self._client.gather(finished)
        except Exception:  # noqa: BLE001 - one of them went wrong: take them one by one
            values = []
            for future in finished:
                try:
                    values.append(future.result())
                except BaseException as exc:  # noqa: BLE001
                    values.append(exc)
        for future, value in zip(finished, values):
            if isinstance(value, BaseException):
                self._errored(future, events, value)
                continue
            chunk = self._take(future)
            if chunk is not None:
                self._result(chunk, value, events)

    def _result(self, chunk: Chunk, value: tuple, events: list) -> None:
        label, output, kind, body = value
        if output:
            lines = output.split("\n")
            if lines[-1] == "":
                lines.pop()
            events.append(WorkerOutput(label, lines))
        if kind == "chunk":
            _, _, n_run, results, failures, seconds = pickle.loads(body)
            self._succeeded = True
            events.append(ChunkDone(chunk, n_run, failures, seconds, label,
                                    results_list=results))
            return
        if kind == "init_error":
            events.append(InitFailed(*body, worker=label))
        events.append(ChunkDone(chunk, 0, [], 0.0, label,
                                results_list=[] if self._want_results else None))

    def _errored(self, future, events: list, exc: BaseException | None = None) -> None:
        if exc is None:
            try:
                exc = future.exception(timeout=CALL_TIMEOUT)
            except BaseException as error:  # noqa: BLE001
                exc = error
        chunk = self._take(future)
        if chunk is None:
            return
        if isinstance(exc, self._dd.KilledWorker):
            # Dask cannot say which of the tasks on a dying worker killed it: every
            # task assigned there counts. So a lost chunk first comes back whole (its
            # items return one unit per chunk); a unit lost a second time is blamed.
            again = any(p in self._lost for p in chunk.positions)
            self._lost.update(dict.fromkeys(chunk.positions))
            blame = (chunk, 0) if again and len(chunk) <= self._unit else None
            message = f"the Dask workers running it died (KilledWorker: {_short(exc)})"
            events.append(ChunksLost([chunk], blame, LossKind.DIED, message, _last_worker(exc)))
            if blame is not None and not self._succeeded:
                self._start_deaths += 1
                if self._start_deaths >= MAX_START_DEATHS:
                    self._fail(events, WorkerDiedError(
                        f"Dask workers keep dying before any task succeeded: {message}. "
                        "Is init_function crashing the worker process?"))
            return
        if isinstance(exc, (CancelledError, asyncio.CancelledError)):
            self._cancelled_chunk(chunk, exc, events)
            return
        # The task function itself failed: nbmplock missing on the workers, or a bug.
        error = WorkerInitError(
            f"nbmplock's task failed on the Dask cluster: {type(exc).__name__}: {exc}. "
            "Are nbmplock (this version) and dill installed on every Dask worker?")
        error.__cause__ = exc
        self._fail(events, error)
        events.append(ChunksLost([chunk], None, LossKind.DIED, f"{type(exc).__name__}: {exc}",
                                  "dask"))

    def _cancelled(self, future, events: list) -> None:
        chunk = self._take(future)
        if chunk is None:
            return
        try:
            future.result(timeout=1.0)
            reason = None
        except BaseException as exc:  # noqa: BLE001 - the cancellation's reason
            reason = exc
        self._cancelled_chunk(chunk, reason, events)

    def _cancelled_chunk(self, chunk: Chunk, reason, events: list) -> None:
        if self._stopping:  # cancelled by request_stop: the chunk did not run
            events.append(ChunkDone(chunk, 0, [], 0.0, "dask",
                                    results_list=[] if self._want_results else None))
            return
        self._fail(events, WorkerDiedError(
            "the Dask cluster cancelled nbmplock's tasks (the connection to the scheduler "
            "was lost, or the client or cluster was restarted or closed)"
            + (f": {reason}" if reason else "")))
        events.append(ChunksLost([chunk], None, LossKind.DIED, "task cancelled by the cluster",
                                  "dask"))

    def _fail(self, events: list, error: BaseException) -> None:
        """End the run: the runner stops, and no task is worth finishing, so the
        stop cancels every task (a task left to run would only kill more workers)."""
        if not self._fatal:
            self._fatal = True
            events.append(Fatal(error))

    # -- the cluster's size ----------------------------------------------
    def _refresh(self, now: float, events: list) -> None:
        self._next_refresh = now + REFRESH
        if self._client is None or self._client.status != "running":
            return
        try:
            n_workers, threads = _cluster_size(self._client)
        except Exception:  # noqa: BLE001 - a lost scheduler cancels the futures anyway
            log.debug("nbmplock: could not read the Dask cluster's size", exc_info=True)
            return
        self._apply_size(n_workers, threads, now, events)

    def _apply_size(self, n_workers: int, threads: int, now: float,
                    events: list | None = None) -> None:
        self._next_refresh = now + REFRESH
        if not self._fixed_workers:
            self.workers = max(1, threads)
        if n_workers or not self._chunks or self._stopping:
            self._no_workers_since = None
            return
        if self._no_workers_since is None:
            self._no_workers_since = now
            log.warning("nbmplock: the Dask cluster has no workers; waiting up to %g s",
                        NO_WORKERS_TIMEOUT)
        elif now - self._no_workers_since > NO_WORKERS_TIMEOUT and events is not None:
            self._fail(events, WorkerDiedError(
                f"the Dask cluster has had no workers for {NO_WORKERS_TIMEOUT:g} s"))


def _cluster_size(client) -> tuple[int, int]:
    """(workers, threads) of the cluster, from one small scheduler call."""
    try:
        info = client.scheduler_info(n_workers=0)
    except TypeError:  # older distributed: no n_workers
        info = client.scheduler_info()
    workers = info.get("workers") or {}
    threads = info.get("total_threads")
    if threads is None:
        threads = sum(w.get("nthreads", 0) for w in workers.values())
    return int(info.get("n_workers", len(workers))), int(threads)


def _bounded(call, seconds: float) -> None:
    """Run ``call`` in a daemon thread; give up waiting after ``seconds``."""
    def target():
        try:
            call()
        except Exception:  # noqa: BLE001 - cleanup is best effort
            log.debug("nbmplock: Dask cleanup call failed", exc_info=True)
    thread = threading.Thread(target=target, name="nbmplock-dask-cleanup", daemon=True)
    thread.start()
    thread.join(seconds)


def _sweep_orphan_payloads(client) -> None:
    """Delete the payload Variables of drivers that are gone (killed mid-run).

    Best effort: a scheduler that refuses ``run_on_scheduler`` keeps them.
    """
    try:
        gone = client.run_on_scheduler(_delete_orphan_payloads)
    except Exception:  # a cleanup of other runs' leftovers: never fails this run
        log.debug("nbmplock: could not sweep payloads of killed drivers", exc_info=True)
        return
    if gone:
        log.info("nbmplock: deleted %d payload(s) left on the scheduler by killed drivers",
                 len(gone))


async def _delete_orphan_payloads(dask_scheduler=None) -> list:
    """On the scheduler: delete payload Variables whose client is not connected."""
    variables = dask_scheduler.extensions.get("variables")
    if variables is None:
        return []
    live = set(dask_scheduler.clients)
    gone = [name for name in list(variables.variables)
            if name.startswith(PAYLOAD_PREFIX)
            and name[len(PAYLOAD_PREFIX):].rpartition("-")[0] not in live]
    for name in gone:
        await variables.delete(name=name)
    return gone


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text.split(" Inspecting worker logs")[0]


def _last_worker(exc: BaseException) -> str:
    worker = getattr(exc, "last_worker", None)
    name = getattr(worker, "name", None)
    if name is None:
        return "dask"
    return f"dask-{name}" if isinstance(name, int) else str(name)
