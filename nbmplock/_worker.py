"""The child side: initialise once, run chunks of items, send results back.

Protocol on two one-way pipes, tasks (parent -> worker) and results (worker ->
parent); every message is ``send_bytes`` of a pickle. The task pipe is large
enough for every task the parent may queue, so the parent never blocks on it
and the worker needs no reader thread:

parent -> worker
    ``(chunk_id, items)``  run these items, in order
    ``b""``                no more work: exit
worker -> parent
    ``("ready", pid)``                           init_function returned
    ``("init_error", exc_type, message, tb, exc_bytes)``
    ``("chunk", chunk_id, n_run, has_results, failures, seconds, results_crc)``
        ``n_run`` items were run (fewer than sent when the stop flag was set);
        ``failures`` lists :class:`~nbmplock._backend.ItemError` records.
        When ``has_results`` (the parent needs them), the next message is the
        pickled list of the ``n_run`` return values, on its own: the parent
        stores that very pickle (``mp_lock_value``) instead of pickling the
        results a second time. ``results_crc`` is that pickle's CRC-32 when it
        is big (:data:`~nbmplock._crc.WORKER_CRC_MIN`), else None: the parent
        then makes its record's CRC without reading it again
        (:class:`~nbmplock._crc.Pickled`).

Shared memory the parent reads without a message (so a crash or a timeout can
be blamed on the exact item): the slot (layout in :mod:`nbmplock._backend`) is
written before each call of ``process``; ``stop_flag`` set to 1 asks every worker
to return after the item it is running, and the parent setting the slot's
``SLOT_GIVE_BACK`` to a chunk's id asks this worker to return that chunk after
its current item (or at once, when it has not started it), so that an idle
worker can take the rest.

stdout and stderr (file descriptors 1 and 2) are a pipe the parent reads, so
output of ``print``, of C extensions and of a dying interpreter is kept.

``concurrency`` N > 1 (:func:`_serve_lanes`): the main thread reads tasks and
N *lanes* (threads) run them, one chunk each at a time, each with its own
slot; ``"chunk"`` messages then come back in the order chunks finish, not the
order they were sent. ``init_function`` runs once per process, before any
lane starts: its ``init_values`` are shared by the lanes. An ``async def``
``process`` or ``init_function`` runs on one event loop per process
(:class:`EventLoop`), each lane awaiting one coroutine at a time.
"""

from __future__ import annotations

import ctypes
import faulthandler
import io
import os
import pickle
import signal
import sys
import threading
import time
import types
import zlib

import dill

from ._backend import (SLOT_CHUNK, SLOT_GIVE_BACK, SLOT_SIZE, SLOT_STARTED, SLOT_UNIT,
                       ItemError)
from ._crc import WORKER_CRC_MIN
from ._errors import FailureKind
from ._wire import describe_exception, dumps

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int | None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies: no orphans.

    If the parent died before the request took effect, exit now.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def _own_process_group() -> None:
    """Lead a process group of our own: whatever ``process`` starts (``Popen``,
    ``os.fork``, a pool) joins it, and the parent kills the whole group when it
    kills this worker or the job ends. (The parent also sets it, right after
    the fork; whichever comes first wins.)"""
    try:
        os.setpgid(0, 0)
    except OSError:  # pragma: no cover - already a group or session leader
        pass


def _allow_children() -> None:
    """Let ``process`` start a ``multiprocess`` pool of its own.

    The parent keeps this worker daemonic (ended with it), which makes
    ``multiprocess`` refuse children here ("daemonic processes are not allowed
    to have children"). Its children are safe: they are in this worker's
    process group, which the parent kills with the worker.
    """
    try:
        import multiprocess.process as mp_process
        mp_process.current_process()._config["daemon"] = False
    except Exception:  # noqa: BLE001 - only a convenience
        pass


def _capture_output(out_fd: int) -> None:
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _send_chunk(conn, chunk_id, n_run, results, failures, seconds) -> None:
    blob = None
    if results is not None:
        try:
            blob = dumps(results)
        except Exception:
            results, failures = without_unpicklable(results, failures)
            blob = dumps(results)
    crc = zlib.crc32(blob) if blob is not None and len(blob) >= WORKER_CRC_MIN else None
    conn.send_bytes(dumps(("chunk", chunk_id, n_run, blob is not None, failures, seconds,
                           crc)))
    if blob is not None:
        conn.send_bytes(blob)


def without_unpicklable(results: list, failures: list) -> tuple[list, list]:
    """Turn each result that cannot be pickled into a failure of its item."""
    failures = list(failures)
    clean = []
    for pos, value in enumerate(results):
        try:
            dumps(value)
        except Exception as exc:
            name, text, tb, _ = describe_exception(exc)
            failures.append(ItemError(pos, 1, name, "the result of process() cannot be "
                                      f"pickled: {text or name}", tb, None, 0.0,
                                      FailureKind.UNPICKLABLE))
            value = None
        clean.append(value)
    return clean, failures


class _Value0:
    """``flag[0]`` for a stop flag that only has ``.value`` (the Dask backend's)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __getitem__(self, index):
        return self.obj.value


def _view(shared, fmt: str, fallback):
    """A memoryview on shared ctypes memory: indexing it is cheaper than ctypes'."""
    try:
        return memoryview(shared).cast("B").cast(fmt)
    except TypeError:
        return fallback


def run_chunk(items, process, shared_data, init_values, batch_size, slot, stop_flag,
              timing: bool = True, limit=None):
    """Run ``items`` in order; the one loop every backend uses.

    Returns ``(n_run, results, failures, seconds)`` as in the protocol above
    (``failures`` a list of :class:`ItemError`). The slot's ``SLOT_UNIT`` is
    set to the index of the unit (item, or batch of ``batch_size`` items)
    before each call of ``process`` (and to -1 after the last),
    ``SLOT_STARTED`` to its start time when ``timing`` (needed for
    ``item_timeout``; it costs a clock read per item); ``stop_flag.value`` set,
    or ``SLOT_GIVE_BACK`` equal to ``SLOT_CHUNK`` (this chunk's id, written by
    the caller), ends the chunk early. ``limit``, the job's
    :class:`~nbmplock._ratelimit.RateLimit`, gives a token per item before
    each unit starts (a stop while waiting for one ends the chunk there). The
    loop is kept tight: it is the per-item cost (the slot's positions are
    bound to locals).
    """
    CHUNK, UNIT, STARTED, GIVE_BACK = SLOT_CHUNK, SLOT_UNIT, SLOT_STARTED, SLOT_GIVE_BACK
    step = batch_size or 1
    units = items if batch_size is None else [items[i:i + step]
                                              for i in range(0, len(items), step)]
    flag = _view(stop_flag, "i", _Value0(stop_flag))
    where = _view(slot, "d", slot)
    clock = time.monotonic
    chunk_id = where[CHUNK]
    results: list = []
    append = results.append
    failures: list = []
    started = None
    n_run = len(items)
    chunk_start = time.perf_counter()
    take = limit.take if limit is not None else None

    def cancelled() -> bool:
        return bool(flag[0]) or where[GIVE_BACK] == chunk_id

    for index, unit in enumerate(units):
        if flag[0] or where[GIVE_BACK] == chunk_id or (
                take is not None and not take(step if batch_size is None else len(unit),
                                              cancelled)):
            n_run = index * step
            break
        where[UNIT] = index
        if timing:
            started = where[STARTED] = clock()
        try:
            if batch_size is None:
                append(process(unit, shared_data, init_values))
            else:
                out = process(unit, shared_data, init_values)
                if not isinstance(out, (list, tuple)) or len(out) != len(unit):
                    got = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
                    raise TypeError(f"process() got a batch of {len(unit)} items and must "
                                    f"return a list of {len(unit)} results, got {got}")
                results.extend(out)
        except Exception as exc:
            count = 1 if batch_size is None else len(unit)
            seconds = clock() - started if started is not None else None
            if type(exc) is ItemTimedOut:  # an async item cancelled by item_timeout
                failures.append(ItemError(index * step, count, "ItemTimeout", str(exc), "",
                                          None, seconds, FailureKind.TIMEOUT))
            else:
                if exc.__traceback__ is not None:  # start the traceback at the user's frame
                    exc = exc.with_traceback(exc.__traceback__.tb_next)
                failures.append(ItemError(index * step, count, *describe_exception(exc),
                                          seconds, FailureKind.EXCEPTION))
            results.extend([None] * count)
    where[UNIT] = -1.0
    if not _LAZY.isdisjoint(map(type, results)):
        _fail_lazy_results(results, failures)
    return n_run, results, failures, time.perf_counter() - chunk_start


#: Return values that mean "not run yet": recording such an item done would be a lie.
_LAZY = frozenset({types.CoroutineType, types.GeneratorType, types.AsyncGeneratorType})


def _fail_lazy_results(results: list, failures: list) -> None:
    """Each coroutine or generator returned by ``process`` fails its item.

    Its body never ran: an ``async def`` or generator function was called and
    only created the object. It is closed, so Python does not warn that it
    was never awaited.
    """
    failed = {pos for pos, count, *_ in failures for pos in range(pos, pos + count)}
    for pos, value in enumerate(results):
        if type(value) in _LAZY and pos not in failed:
            what = {types.CoroutineType: "a coroutine (is process an async def function?)",
                    types.GeneratorType: "a generator (does process use yield?)",
                    types.AsyncGeneratorType: "an async generator"}[type(value)]
            try:
                value.close() if not isinstance(value, types.AsyncGeneratorType) else None
            except Exception:  # noqa: BLE001 - closing is a courtesy
                pass
            exc = TypeError(f"process() returned {what}: its body never ran, so the item "
                            "is not done. Return the result itself (collect a generator "
                            "with list(...), run a coroutine with asyncio.run(...)).")
            failures.append(ItemError(pos, 1, *describe_exception(exc), None,
                                      FailureKind.EXCEPTION))
            results[pos] = None
    failures.sort(key=lambda f: f.pos)


class ItemTimedOut(Exception):
    """An ``async def`` item cancelled by ``item_timeout`` (its kind: timeout)."""


class EventLoop:
    """One asyncio event loop per worker process, on a thread of its own.

    ``async def`` functions run on it: :meth:`wrap` turns ``process`` into a
    plain function that a lane's thread calls and that waits for the
    coroutine's result, so the one item loop (:func:`run_chunk`) serves both
    kinds, and at most ``concurrency`` coroutines await at once (one per
    lane). ``item_timeout`` cancels the item's task: the item fails with
    kind ``timeout`` and the worker goes on.
    """

    def __init__(self):
        import asyncio
        self._asyncio = asyncio
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="nbmplock-loop",
                         daemon=True).start()

    def run(self, coro):
        """Run ``coro`` on the loop from another thread; its result or exception."""
        return self._asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def wrap(self, fn, timeout: float | None):
        asyncio = self._asyncio

        async def guarded(item, shared_data, init_values):
            task = asyncio.ensure_future(fn(item, shared_data, init_values))
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
                raise ItemTimedOut(f"the item ran longer than item_timeout={timeout:g} s; "
                                   "its task was cancelled")
            return task.result()

        def call(item, shared_data, init_values):
            coro = (guarded if timeout is not None else fn)(item, shared_data, init_values)
            return self.run(coro)

        call.on_event_loop = True  # item_timeout is kept by the loop: no watchdog
        return call


def is_async(fn) -> bool:
    """Whether calling ``fn`` returns a coroutine to await (``async def``,
    a partial of one, an object whose ``__call__`` is one)."""
    import functools
    import inspect
    if fn is None:
        return False
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)
    return (call is not None and not inspect.isroutine(fn)
            and not isinstance(fn, functools.partial) and inspect.iscoroutinefunction(call))


def initialise(payload_functions, item_timeout: float | None):
    """``(process, shared_data, init_values, batch_size)`` ready to run: ``init_function``
    called once for the process (awaited on the worker's loop when it is async), and
    an async ``process`` wrapped for that loop."""
    process, init_function, shared_data, batch_size = payload_functions
    loop = EventLoop() if is_async(process) or is_async(init_function) else None
    if init_function is None:
        init_values = {}
    elif is_async(init_function):
        init_values = loop.run(init_function(shared_data))
    else:
        init_values = init_function(shared_data)
    if is_async(process):
        process = loop.wrap(process, item_timeout)
    return process, shared_data, init_values, batch_size


def lane_slots(slot, lanes: int) -> list:
    """Each lane's four doubles in a worker's slot (layout in :mod:`nbmplock._backend`)."""
    if lanes == 1:
        return [slot]
    view = memoryview(slot).cast("B").cast("d")
    return [view[SLOT_SIZE * i:SLOT_SIZE * (i + 1)] for i in range(lanes)]


def _serve_lanes(tasks, conn, run, slot, lanes: int, want_results: bool, all_items) -> None:
    """``concurrency`` > 1: ``lanes`` threads, each running one chunk at a time.

    The main thread reads tasks and puts them on ``work``; a lane takes the
    next, writes its id in its own slot, runs it and sends it back (one lane
    sends at a time: ``send_lock``). When the parent set the worker's drain
    flag (``slot[drain_index]``, an item_timeout elsewhere in this worker),
    a lane hands back every chunk it takes, undone.
    Invariant: every chunk read is put on ``work``, and every lane takes
    chunks until it takes the ``None`` put once per lane at the end, so each
    chunk is sent back once (or the process dies, and the parent blames and
    requeues what it held).
    """
    import queue
    work: queue.SimpleQueue = queue.SimpleQueue()
    send_lock = threading.Lock()
    slots = lane_slots(slot, lanes)
    drain = _view(slot, "d", slot)
    drain_index = SLOT_SIZE * lanes

    def lane(index: int) -> None:
        where = slots[index]
        while True:
            task = work.get()
            if task is None:
                return
            chunk_id, items = task
            where[SLOT_CHUNK] = chunk_id
            if drain[drain_index]:
                n_run, results, failures, seconds = 0, [], [], 0.0
            else:
                n_run, results, failures, seconds = run(items, where)
            with send_lock:
                _flush_output()
                _send_chunk(conn, chunk_id, n_run, results if want_results else None,
                            failures, seconds)

    threads = [threading.Thread(target=lane, args=(i,), name=f"nbmplock-lane{i}", daemon=True)
               for i in range(lanes)]
    for thread in threads:
        thread.start()
    while True:
        try:
            msg = tasks.recv_bytes()
        except (EOFError, OSError):
            return  # the parent is gone: the lanes die with the process
        if not msg:
            break
        chunk_id, items = pickle.loads(msg)
        if type(items) is tuple:
            items = all_items[items[0]:items[1]]
        work.put((chunk_id, items))
    for _ in threads:
        work.put(None)
    for thread in threads:
        thread.join()


def main(tasks, conn, out_conn, payload, slot, stop_flag, close_fds, want_results,
         parent_pid, timing, all_items=None, lanes=1, limit=None, item_timeout=None) -> None:
    """Entry point of a worker process (``multiprocess.Process`` target).

    ``close_fds`` are descriptors a forked worker inherited and must not keep:
    the run store's (so it never holds the lock) and the parent's ends of
    every pipe (so the parent's death reads as end-of-file). ``lanes`` is the
    job's ``concurrency``; ``limit`` its rate limit, if any.
    """
    _own_process_group()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent(parent_pid)
    _allow_children()
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _capture_output(out_conn.fileno())
    out_conn.close()
    # A segfault's Python traceback lands in the captured output (output.log).
    faulthandler.enable(file=sys.stderr, all_threads=lanes > 1)

    try:
        if isinstance(payload, bytes):
            payload = dill.loads(payload)
        process, shared_data, init_values, batch_size = initialise(payload, item_timeout)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit
        _flush_output()
        conn.send_bytes(dumps(("init_error",) + describe_exception(exc)))
        return
    _flush_output()
    conn.send_bytes(dumps(("ready", os.getpid())))

    def run(items, where):
        return run_chunk(items, process, shared_data, init_values, batch_size, where,
                         stop_flag, timing, limit)

    if lanes > 1:
        _serve_lanes(tasks, conn, run, slot, lanes, want_results, all_items)
        _flush_output()
        return
    while True:
        try:
            msg = tasks.recv_bytes()
        except (EOFError, OSError):
            break  # the parent is gone
        if not msg:
            break
        chunk_id, items = pickle.loads(msg)
        if type(items) is tuple:  # a span of data_list, which a forked worker has
            items = all_items[items[0]:items[1]]
        slot[SLOT_CHUNK] = chunk_id
        n_run, results, failures, seconds = run(items, slot)
        _flush_output()
        _send_chunk(conn, chunk_id, n_run, results if want_results else None,
                    failures, seconds)
    _flush_output()
