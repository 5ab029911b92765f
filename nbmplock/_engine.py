"""The local backend: worker processes on this machine, without ``Pool``.

``multiprocess.Pool`` (like the stdlib one) waits forever for a task whose
worker was killed. Here every worker has its own duplex pipe, an output pipe
and a process sentinel, and :meth:`LocalBackend.wait` waits on all of them at
once (plus a wakeup pipe for other threads), as ``concurrent.futures`` does:
a dead worker is seen the moment it dies, and the exact item it was running is
read from the worker's shared ``slot``. A replacement worker is started (its
``init_function`` runs again).

Each worker holds at most :data:`PREFETCH` chunks (one running, one queued), so
memory is bounded whatever the length of the item list. Tasks go down a pipe
enlarged to :data:`PIPE_SIZE`, sized so that queued tasks always fit: the
manager thread never blocks writing one (a task too big for the room left is
written by a short-lived thread, and that worker gets nothing more meanwhile).

Work stealing at the tail: when nothing is left to dispatch and a worker sits
idle, :meth:`LocalBackend.give_back` asks the worker holding the most units it
has not started to return that chunk after its current unit (the slot's ``SLOT_GIVE_BACK``); the
rest comes back as a short ``ChunkDone`` and is dispatched again, to both. So
a chunk of slow items never leaves the other workers idle at the end, and
chunks can be long enough that their round trips cost nothing measurable.

``concurrency`` N > 1: each worker runs N lanes (threads; an ``async def``
process runs on the worker's event loop, one coroutine per lane) and holds up
to N chunks, of one unit each unless ``chunk_size`` says otherwise
(:meth:`LocalBackend._capacity`), each lane with its own slot. A dead worker fails every unit its lanes were running (which of them
killed it cannot be told; with one running, it alone) and requeues the rest.
``item_timeout`` with threads: a thread cannot be killed, so the worker is
*drained* (its drain flag: lanes hand back every chunk they take, undone; the
running items finish) and killed once it holds only the timed-out items, or
after another ``item_timeout``; the timed-out items fail, the others go back to
the queue undone, and a replacement starts. An ``async def`` item is cancelled
by the worker itself (see :class:`nbmplock._worker.EventLoop`); the parent
drains such a worker only if the loop does not get to cancel it within
:data:`ASYNC_TIMEOUT_GRACE` seconds more (a blocking call inside the coroutine).
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import signal
import struct
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import multiprocess
from multiprocess.connection import wait as mp_wait

from . import _worker
from ._backend import (SLOT_CHUNK, SLOT_GIVE_BACK, SLOT_UNIT, BackendBase, Chunk, ChunkDone,
                       ChunksLost, Fatal, InitFailed, LossKind, WorkerOutput, WorkPayload,
                       exiting, new_slot, running_units, set_drain)
from ._crc import Pickled
from ._errors import WorkerDiedError
from ._wire import dumps, serialize_functions

log = logging.getLogger("nbmplock")

PREFETCH = 2
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ, _F_GETPIPE_SZ = 1031, 1032
MAX_START_DEATHS = 3
_SHUTDOWN_GRACE = 2.0
#: An async item the worker's loop failed to cancel after item_timeout: the parent
#: drains and kills the worker this many seconds later.
ASYNC_TIMEOUT_GRACE = 2.0


def describe_exit(exitcode: int | None) -> str:
    """Words for a worker's exit status, with a hint at the likely cause."""
    if exitcode is None:
        return "the worker vanished"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = {
            "SIGKILL": " (possibly out of memory: the kernel's OOM killer sends SIGKILL)",
            "SIGSEGV": " (segmentation fault in native code)",
            "SIGBUS": " (bus error in native code)",
            "SIGABRT": " (aborted by native code)",
            "SIGTERM": " (terminated by another process)",
        }.get(name, "")
        return f"the worker was killed by {name}{hint}"
    return f"the worker exited with code {exitcode} (os._exit or sys.exit in process?)"


def _grow_pipe(fd: int) -> int:
    """Enlarge a pipe's buffer (Linux); return its size in bytes."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
        return fcntl.fcntl(fd, _F_GETPIPE_SZ)
    except OSError:
        return 1 << 16


def payload_for_start_method(payload: WorkPayload, start_method: str | None) -> bytes | None:
    """The payload as spawned workers receive it (None under fork: inherited as is)."""
    if multiprocess.get_context(start_method).get_start_method() == "fork":
        return None
    return serialize_functions(payload.functions, "spawned workers")


@dataclass(eq=False)
class _Worker:
    index: int
    process: object
    tasks: object      # parent's end of the task pipe
    conn: object       # parent's end of the result pipe
    out: object        # parent's end of the stdout/stderr pipe
    slot: object
    room: int          # task pipe buffer size
    chunks: dict = field(default_factory=dict)    # chunk id -> Chunk, in order sent
    queued: dict = field(default_factory=dict)    # chunk id -> its task's bytes
    sending: bool = False
    drain_until: float | None = None  # draining (item_timeout, lanes): kill it by then
    ready: bool = False
    partial: bytes = b""
    tail: deque = field(default_factory=lambda: deque(maxlen=15))  # last output lines
    rbufs: list = field(default_factory=list)  # recent results messages (see _spare_buffer)
    inbox: _Inbox | None = None  # reads ``conn`` without waiting (see _Inbox)
    awaiting: tuple | None = None  # a chunk's header whose results are not all read yet

    @property
    def label(self) -> str:
        return f"w{self.index}"


def _quiet_fork_warning() -> None:
    """Hide Python 3.12+'s DeprecationWarning on each fork of a worker.

    Python warns on every ``fork()`` in a process with threads, and workers are
    forked by the manager thread while the caller's threads (a Jupyter
    kernel's among them) run. A worker takes none of their locks: it replaces
    ``sys.stdout`` and ``sys.stderr`` before it writes, CPython re-creates the
    GIL and the import lock in the child, and ``logging`` its locks. The filter
    matches only that message raised by ``multiprocess``'s fork; installing it
    again (pytest resets filters per test) replaces the earlier copy.
    ``start_method="forkserver"`` avoids forking the caller altogether.
    """
    warnings.filterwarnings(
        "ignore", category=DeprecationWarning, module=r"multiprocess\.popen_fork",
        message=r"This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to "
                r"deadlocks in the child")


class LocalBackend(BackendBase):
    """Worker processes on this machine, driven by the runner's thread."""

    def __init__(self, payload: WorkPayload, *, workers: int, start_method: str | None,
                 item_timeout: float | None, close_fds: list[int],
                 serialized: bytes | None = None, concurrency: int = 1, limit=None,
                 asynchronous: bool = False):
        self.workers = workers
        self.concurrency = concurrency
        self._limit = limit
        self._async = asynchronous
        self._ctx = multiprocess.get_context(start_method)
        self._fork = self._ctx.get_start_method() == "fork"
        # A forkserver's children have the forkserver as parent; it dies with us.
        self._parent_pid = None if self._ctx.get_start_method() == "forkserver" else os.getpid()
        self._payload = payload.functions if self._fork else (
            serialized or serialize_functions(payload.functions, "spawned workers"))
        # Forked workers have data_list already: chunks of it travel as spans.
        self._items = payload.items if self._fork else None
        self._want_results = payload.want_results
        self._unit = payload.batch_size or 1
        self._timeout = item_timeout
        self._close_fds = close_fds if self._fork else []
        self._stop_flag = self._ctx.RawValue("i", 0)
        self._workers: dict[int, _Worker] = {}
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._start_deaths = 0
        self._giving_back: int | None = None  # id of the chunk asked back, if any
        self._pipe_size = PIPE_SIZE
        self._stopping = False
        self._closed = False

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        if self._fork:
            _quiet_fork_warning()
        for index in range(self.workers):
            self._spawn(index)

    @property
    def _capacity(self) -> int:
        """Chunks a worker holds: one running and one queued (one lane), or one
        per lane (N lanes): then a SIGKILL loses (runs again) at most N items per
        worker, and a lane that finishes waits one round trip for its next item."""
        n = self.concurrency
        return PREFETCH if n == 1 else n

    @property
    def max_task_bytes(self) -> int:
        """Task size that always fits the task pipe with every chunk queued."""
        return self._pipe_size // (self._capacity + 1)

    def _spawn(self, index: int) -> None:
        task_r, task_w = self._ctx.Pipe(duplex=False)
        res_r, res_w = self._ctx.Pipe(duplex=False)
        out_r, out_w = self._ctx.Pipe(duplex=False)
        room = _grow_pipe(task_w.fileno())
        _grow_pipe(res_w.fileno())
        self._pipe_size = min(self._pipe_size, room)
        slot = self._ctx.RawArray("d", new_slot(self.concurrency))  # layout: see _backend
        close_fds = []
        if self._fork:  # what a forked child inherits and must not keep
            close_fds = [*self._close_fds, task_w.fileno(), res_r.fileno(), out_r.fileno(),
                         self._wake_r, self._wake_w]
            for w in self._workers.values():
                close_fds += [w.tasks.fileno(), w.conn.fileno(), w.out.fileno()]
        proc = self._ctx.Process(
            target=_worker.main, name=f"nbmplock-w{index}", daemon=True,
            args=(task_r, res_w, out_w, self._payload, slot, self._stop_flag,
                  close_fds, self._want_results, self._parent_pid, self._timeout is not None,
                  self._items, self.concurrency, self._limit, self._timeout))
        proc.start()
        _own_group(proc.pid)
        for end in (task_r, res_w, out_w):
            end.close()
        os.set_blocking(out_r.fileno(), False)
        os.set_blocking(res_r.fileno(), False)
        self._workers[index] = _Worker(index, proc, task_w, res_r, out_r, slot, room,
                                       inbox=_Inbox(res_r.fileno()))

    def _accepts(self, w: _Worker) -> bool:
        return (w.ready and not w.sending and w.drain_until is None
                and len(w.chunks) < self._capacity)

    def free_slots(self) -> int:
        if self._stopping:
            return 0
        cap = self._capacity
        return sum(cap - len(w.chunks) for w in self._workers.values() if self._accepts(w))

    def _running(self, w: _Worker) -> list[tuple[int, Chunk, int, float]]:
        """``(lane, chunk, unit index, started)`` of each unit ``w``'s lanes run now."""
        return running_units(w.slot, self.concurrency, w.chunks)

    def submit(self, chunk: Chunk) -> None:
        worker = min((w for w in self._workers.values() if self._accepts(w)),
                     key=lambda w: len(w.chunks))
        span = chunk.span
        sent = span if span is not None and self._items is not None else chunk.items
        data = dumps((chunk.id, sent))
        worker.chunks[chunk.id] = chunk
        worker.queued[chunk.id] = len(data) + 8
        if sum(worker.queued.values()) <= worker.room:
            _send(worker.tasks, data)
        else:  # too big for the room left: never block the manager thread on it
            worker.sending = True
            threading.Thread(target=self._send_slowly, args=(worker, data), daemon=True,
                             name=f"nbmplock-send-{worker.label}").start()

    def _send_slowly(self, worker: _Worker, data: bytes) -> None:
        try:
            if not worker.tasks.closed:
                _send(worker.tasks, data)
        except (OSError, ValueError):
            pass  # the worker died meanwhile; its sentinel tells the manager
        finally:
            worker.sending = False
            self.wakeup()

    def give_back(self) -> bool:
        """If a worker is idle, ask for work back from the one with the most.

        The runner calls this when it has nothing left to dispatch. The
        running chunk with the most units not yet started is asked back, and
        returns after the unit being run; failing that, the biggest queued
        chunk, which returns as soon as its worker reads it. One request at a
        time; returns whether one was made.
        """
        if self._stopping or self._giving_back is not None or self.concurrency > 1:
            return False  # with lanes, chunks are one unit unless chunk_size says otherwise
        if not any(w.ready and not w.chunks for w in self._workers.values()):
            return False
        best, best_key = None, (False, 0)
        for w in self._workers.values():
            for i, chunk in enumerate(w.chunks.values()):
                units = -(-len(chunk) // self._unit)
                running = i == 0 and int(w.slot[SLOT_CHUNK]) == chunk.id
                if i == 0 and not running:
                    # About to start: taking it back would only delay it (and
                    # could ping-pong). The next event, or the progress update
                    # that follows every dispatch, has the runner look again.
                    continue
                if running:
                    pos = int(w.slot[SLOT_UNIT])
                    units = units - pos - 1 if pos >= 0 else 0  # -1: its last unit is done
                if units and (running, units) > best_key:
                    best, best_key = (w, chunk), (running, units)
        if best is None:
            return False
        worker, chunk = best
        worker.slot[SLOT_GIVE_BACK] = chunk.id
        self._giving_back = chunk.id
        return True

    def in_flight(self) -> dict[str, int]:
        return {w.label: sum(len(c) for c in w.chunks.values()) for w in self._workers.values()}

    def wakeup(self) -> None:
        # Thread-safe. Invariant (no lost wake-up): the wake pipe is level-
        # triggered; a byte written stays readable until wait() drains it, and
        # callers change the state they signal (a stop request, ``sending``,
        # the saver's queue) before they write, while the manager reads that
        # state after every wait. A full pipe (EAGAIN) is already readable.
        # Under the lock: after shutdown the descriptor number may belong to
        # another file (the run log!), and a stray byte there would corrupt it.
        with self._wake_lock:
            if self._wake_w is None:
                return
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def request_stop(self) -> None:
        self._stopping = True
        self._stop_flag.value = 1

    # -- waiting ---------------------------------------------------------
    @property
    def _limit_seconds(self) -> float | None:
        """How long an item may run before the parent acts on it."""
        if self._timeout is None:
            return None
        return self._timeout + (ASYNC_TIMEOUT_GRACE if self._async else 0.0)

    def _timeout_in(self, now: float) -> float | None:
        limit = self._limit_seconds
        if limit is None:
            return None
        due = [started + limit - now for w in self._workers.values() if w.chunks
               for _, _, _, started in self._running(w)]
        due += [w.drain_until - now for w in self._workers.values() if w.drain_until]
        return max(0.0, min(due)) if due else None

    def wait(self, timeout: float | None) -> list:
        deadline = self._timeout_in(time.monotonic())
        if deadline is not None:
            timeout = deadline if timeout is None else min(timeout, deadline)
        handles: dict = {self._wake_r: None}
        for w in self._workers.values():
            handles[w.conn] = w
            handles[w.out] = w
            handles[w.process.sentinel] = w
        ready = mp_wait(list(handles), timeout)
        events: list = []
        dead = []
        for handle in ready:
            worker = handles[handle]
            if worker is None:
                _drain_fd(self._wake_r)
            elif handle is worker.out:
                self._read_output(worker, events)
            elif handle is worker.conn:
                self._read_messages(worker, events)
            elif worker not in dead:
                dead.append(worker)
        for worker in dead:
            self._lost(worker, events, kind=LossKind.DIED)
        if self._timeout is not None:
            self._check_timeouts(events)
        return events

    def _read_messages(self, worker: _Worker, events: list) -> None:
        """Handle every whole message the worker's pipe holds now; never waits
        for the rest of one (see :class:`_Inbox`)."""
        inbox = worker.inbox
        try:
            while True:
                msg = worker.awaiting
                if msg is None:
                    data = inbox.message(bytearray)
                    if data is None:
                        return
                    msg = pickle.loads(data)
                    if msg[0] == "chunk" and msg[3]:
                        # A chunk's results follow its header as a message of their own.
                        worker.awaiting = msg
                        continue
                    self._handle(worker, msg, events, None)
                    continue
                blob = inbox.message(lambda size: _blob_buffer(worker, size))
                if blob is None:
                    return
                worker.awaiting = None
                blob.crc = msg[6]
                if len(blob) <= _SPARE_MAX_BYTES:
                    worker.rbufs.append(blob)
                self._handle(worker, msg, events, blob)
        except (EOFError, OSError):
            pass  # the sentinel reports the death

    def _handle(self, worker: _Worker, msg: tuple, events: list, blob: bytes | None) -> None:
        kind = msg[0]
        if kind == "chunk":
            _, chunk_id, n_run, _has_results, failures, seconds, _results_crc = msg
            chunk = worker.chunks.pop(chunk_id)
            worker.queued.pop(chunk_id)
            if chunk.id == self._giving_back:
                self._giving_back = None
            events.append(ChunkDone(chunk, n_run, failures, seconds, worker.label, blob))
        elif kind == "ready":
            worker.ready = True
            self._start_deaths = 0
        elif kind == "init_error":
            _, exc_type, message, tb, exc_bytes = msg
            events.append(InitFailed(exc_type, message, tb, exc_bytes, worker.label))

    def _read_output(self, worker: _Worker, events: list, final: bool = False) -> None:
        data = _drain_fd(worker.out.fileno())
        if not data and not (final and worker.partial):
            return
        text = worker.partial + data
        lines = text.split(b"\n")
        worker.partial = lines.pop()
        if final and worker.partial:
            lines.append(worker.partial)
            worker.partial = b""
        if lines:
            decoded = [line.decode("utf-8", "replace") for line in lines]
            worker.tail.extend(decoded)
            events.append(WorkerOutput(worker.label, decoded))

    # -- losing workers --------------------------------------------------
    def _lost(self, worker: _Worker, events: list, *, kind: LossKind,
              message: str | None = None, blame_lanes: set | None = None) -> None:
        """Account for a dead (or killed) worker and start its replacement.

        A worker ended by SIGTERM, SIGHUP or SIGQUIT was ended from outside
        (a kernel shutdown or restart, ``kill``, a service manager): that is a
        request to stop, not the item's fault. The run stops as a Force stop
        would: nothing is recorded failed and no replacement starts.
        """
        self._read_messages(worker, events)
        self._read_output(worker, events, final=True)
        _reap(worker.process, 5)
        exitcode = worker.process.exitcode
        if kind is LossKind.DIED and exitcode is not None and -exitcode in _ENDED_FROM_OUTSIDE:
            kind = LossKind.TERMINATED
            message = (f"worker {worker.label} (pid {worker.process.pid}) was ended by "
                       f"{signal.Signals(-exitcode).name} from another process (a kernel "
                       "restart or shutdown, kill, a service manager); the run was stopped "
                       "as by Force stop, and nothing was recorded as failed")
            self._stopping = True
        blame = None
        seconds = None
        running = self._running(worker)
        if blame_lanes is not None:
            running = [r for r in running if r[0] in blame_lanes]
        blamed = [(chunk, unit * self._unit) for _, chunk, unit, _ in running]
        if blamed:
            blame = blamed[0]
            if self._timeout is not None:  # item start times are kept only then
                seconds = time.monotonic() - running[0][3]
        if len(blamed) > 1 and kind is LossKind.DIED:
            message = (f"{message or describe_exit(exitcode)}; {len(blamed)} items were "
                       "running at once in this worker (concurrency), each is failed: which "
                       "one killed it cannot be told")
        pid = worker.process.pid
        if any(chunk.id == self._giving_back for chunk in worker.chunks.values()):
            self._giving_back = None
        self._close_worker(worker)
        del self._workers[worker.index]
        if message is None:
            message = describe_exit(exitcode)
        if kind is LossKind.TERMINATED:
            blame, blamed = None, []
        if worker.chunks or kind is not LossKind.DIED:
            events.append(ChunksLost(list(worker.chunks.values()), blame, kind, message,
                                     worker.label, pid, exitcode, seconds,
                                     tuple(blamed[1:])))
        if not worker.ready and kind is LossKind.DIED:
            self._start_deaths += 1
            if self._start_deaths >= MAX_START_DEATHS:
                hint = "Is init_function crashing the process?"
                if not self._fork:
                    hint += (" Under start_method 'spawn' or 'forkserver' a script must keep "
                             "its top-level code under `if __name__ == \"__main__\":`.")
                said = "\n".join(worker.tail)
                if said:
                    hint += f"\nThe worker's last output:\n{said}"
                events.append(Fatal(WorkerDiedError(
                    f"workers keep dying before they are ready: {message}. {hint}",
                    exitcode=exitcode)))
                self._stopping = True
                return
        if kind is LossKind.DIED and not self._stopping and not self._closed:
            log.warning("worker %s (pid %s) died: %s; starting a replacement",
                        worker.label, pid, message)
        if not self._stopping and not self._closed and not exiting.is_set():
            self._spawn(worker.index)

    def _check_timeouts(self, events: list) -> None:
        now = time.monotonic()
        limit = self._limit_seconds
        message = (f"the item ran longer than item_timeout={self._timeout:g} s; its worker "
                   "was killed and replaced")
        for worker in list(self._workers.values()):
            if not worker.chunks:
                continue
            late = {lane for lane, _, _, started in self._running(worker)
                    if now - started > limit}
            if self.concurrency == 1:
                if late:
                    _kill(worker.process)
                    self._lost(worker, events, kind=LossKind.TIMEOUT, message=message)
                continue
            if late and worker.drain_until is None:
                worker.drain_until = now + self._timeout
                set_drain(worker.slot, self.concurrency, True)
            if worker.drain_until is None:
                continue
            held_by_late = {chunk.id for lane, chunk, _, _ in self._running(worker)
                            if lane in late}
            if not late:  # the late items finished after all: back to work
                worker.drain_until = None
                set_drain(worker.slot, self.concurrency, False)
            elif set(worker.chunks) <= held_by_late or now >= worker.drain_until:
                _kill(worker.process)
                self._lost(worker, events, kind=LossKind.TIMEOUT, blame_lanes=late,
                           message=message + (f" (once its other {self.concurrency - 1} lanes "
                                              "had handed back their items)"))

    def kill(self) -> list:
        """Forced stop: SIGKILL every worker; their chunks come back as lost."""
        self._stopping = True
        events: list = []
        for worker in list(self._workers.values()):
            _kill(worker.process)
        for worker in list(self._workers.values()):
            self._lost(worker, events, kind=LossKind.KILLED, message="stopped by force")
        return events

    def shutdown(self) -> list:
        """Ask idle workers to exit, then kill what is left; close every pipe.

        Returns the output the workers wrote last (a final line without a
        newline included).
        """
        events: list = []
        if self._closed:
            return events
        self._closed = True
        self._stopping = True
        workers = list(self._workers.values())
        for worker in workers:
            if not worker.sending:
                _send(worker.tasks, b"")
        deadline = time.monotonic() + _SHUTDOWN_GRACE
        for worker in workers:
            # Processes the worker started (Popen, os.fork, a pool of its own) are
            # in its process group: killed with it, even when it exits by itself.
            if not _reap(worker.process, max(0.0, deadline - time.monotonic())):
                _kill(worker.process)
                _reap(worker.process, 5)
            self._read_output(worker, events, final=True)
            self._close_worker(worker)
        self._workers.clear()
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            self._wake_r = self._wake_w = None
        return events

    def _close_worker(self, worker: _Worker) -> None:
        for handle in (worker.tasks, worker.conn, worker.out):
            try:
                handle.close()
            except OSError:
                pass
        try:
            worker.process.close()
        except ValueError:
            pass


def _send(conn, data: bytes) -> None:
    try:
        conn.send_bytes(data)
    except OSError:
        pass  # the worker just died: its sentinel fires and its chunks are requeued


#: Signals that end a worker from outside: a stop of the run, not an item's fault.
_ENDED_FROM_OUTSIDE = frozenset({signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGINT})


def _own_group(pid: int) -> None:
    """Put a just-started worker in a process group of its own (the worker does
    it too, first thing: whichever runs first wins, the other is a no-op), so
    that the processes it starts can be killed with it."""
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # it exec'd (spawn) or is not our child (forkserver): it does it itself


def _kill(process) -> None:
    """SIGKILL the worker and every process of its group (what ``process`` started)."""
    pid = process.pid
    if pid is not None:
        try:
            os.killpg(pid, signal.SIGKILL)
            return
        except OSError:
            pass  # not (yet) a group leader: kill the process alone
    try:
        process.kill()
    except (OSError, ValueError, AttributeError):
        pass


def _reap(process, timeout: float) -> bool:
    """Wait up to ``timeout`` for the worker to end, then kill what is left of its
    group and collect its exit status; False if it is still running.

    The group is killed before the worker is reaped: until then its pid (the
    group's id) cannot be reused, so the signal reaches only its own processes.
    """
    try:
        sentinel = process.sentinel
    except (ValueError, AttributeError):
        return True  # already closed
    if not mp_wait([sentinel], timeout):
        return False
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass  # no process is left in its group
    process.join(5)
    return True


def _refs_at(buffers: list, i: int) -> int:
    buf = buffers[i]
    return sys.getrefcount(buf)


#: What :func:`_refs_at` counts for a buffer that nothing but its list
#: holds (measured, so that it is right for this interpreter's reference counting).
_UNSHARED_REFS = _refs_at([Pickled()], 0)
#: Buffers a worker keeps for its next results messages.
_SPARE_BUFFERS = 2
#: A bigger buffer is not kept: an item that returned 500 MB must not leave
#: 500 MB held for the rest of the run (chunks are sized to about 1 MiB of
#: results, so only such single big results are bigger).
_SPARE_MAX_BYTES = 16 << 20


def _spare_buffer(worker: _Worker) -> Pickled | None:
    """A buffer of the worker's earlier results messages that nothing else holds
    any more, taken out of its spares, to read the next message into.

    Results messages are megabytes each on W3; a fresh buffer per message is
    fresh memory, zeroed and faulted in page by page (about a sixth of the
    manager thread's time there), while the pages of a reused one are warm. The
    manager uses a message's buffer only while it handles the chunk (it writes
    the pickle to the log and unpickles it); whatever keeps it longer (a SPAN
    kept in memory as its pickle, the event of a chunk not handled yet) holds
    a reference, and such a buffer is let go: reuse is decided by the
    reference count, never assumed. Two spares cover two messages read in one
    go before their events are handled.
    """
    buffers = worker.rbufs
    found = None
    for i in range(len(buffers)):
        if _refs_at(buffers, i) == _UNSHARED_REFS:
            found = buffers.pop(i)
            break
    # the others are still held (or the oldest of enough): keep at most what reuse needs
    del buffers[:max(0, len(buffers) - (_SPARE_BUFFERS - 1))]
    return found


def _blob_buffer(worker: _Worker, size: int) -> Pickled:
    """A buffer of ``size`` bytes for a results message: a spare one resized
    (see :func:`_spare_buffer`), or a new one."""
    buf = _spare_buffer(worker)
    if buf is None:
        return Pickled(size)
    if len(buf) > size:
        del buf[size:]
    elif len(buf) < size:
        buf.extend(bytes(size - len(buf)))
    return buf


class _Inbox:
    """A worker's results pipe, read without ever waiting: whole messages come
    out; a message the pipe holds only part of is kept, and completed by later
    reads.

    Invariant: the pipe's read end is non-blocking, and :meth:`message` returns
    (None) as soon as the pipe is empty; so a worker frozen halfway through a
    message (SIGSTOP, a debugger, a cgroup freezer) cannot hold up the manager,
    which keeps carrying out stops, timeouts and the other workers' messages,
    and a Force stop's SIGKILL ends the frozen worker.

    Each message is read straight into a buffer of its size (given by the
    caller): ``Connection.recv_bytes`` reads a big one piece by piece into a
    ``BytesIO`` and copies it out again, two copies more of every result byte
    (on W3 about a fifth of the manager thread's time). The framing is
    ``multiprocess.connection``'s: a signed 32-bit big-endian length, or -1 and
    then an unsigned 64-bit one.
    """

    __slots__ = ("fd", "_head", "_body", "_view", "_pos")

    def __init__(self, fd: int):
        self.fd = fd
        self._head = bytearray()  # the length prefix read so far
        self._body = None  # the buffer of the message being read
        self._view: memoryview | None = None
        self._pos = 0

    def message(self, buffer_for):
        """The next whole message, in ``buffer_for(size)``; None when the pipe
        has no more of it now. Raises ``EOFError`` at end of file."""
        fd = self.fd
        if self._body is None:
            head = self._head
            while True:
                want = 4 if len(head) < 4 else (12 if head[:4] == b"\xff\xff\xff\xff" else 4)
                if len(head) >= want:
                    break
                try:
                    got = os.read(fd, want - len(head))
                except BlockingIOError:
                    return None
                if not got:
                    raise EOFError("end of file inside a message" if head else "end of file")
                head += got
            size = _U64.unpack_from(head, 4)[0] if want == 12 else _I32.unpack_from(head)[0]
            self._head = bytearray()
            self._body = buffer_for(size)
            self._view = memoryview(self._body)
            self._pos = 0
        view, pos = self._view, self._pos
        size = len(view)
        while pos < size:
            try:
                n = os.readv(fd, [view[pos:]])
            except BlockingIOError:
                self._pos = pos
                return None
            if n == 0:
                raise EOFError("end of file inside a message")
            pos += n
        body = self._body
        self._body = self._view = None
        view.release()  # so that the buffer can be resized when it is reused
        return body


_I32, _U64 = struct.Struct("!i"), struct.Struct("!Q")


def _drain_fd(fd: int) -> bytes:
    parts = []
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        except OSError:
            break
        if not data:
            break
        parts.append(data)
    return b"".join(parts)

