"""What a backend is: the interface the runner drives, and the events it returns.

A backend runs chunks of items somewhere (local processes, a Dask cluster) and
reports back through :meth:`Backend.wait`. It never touches the run store and
never calls user callbacks other than ``process`` and ``init_function``; the
runner does all of that in one thread.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Protocol


#: Set when the interpreter exits (see _job's atexit hook): no backend starts a
#: new worker from then on (a kernel restart must not spawn replacements).
exiting = threading.Event()


@dataclass(eq=False)
class Chunk:
    """Items sent to one worker together.

    ``span`` is ``(start, stop)`` when the items are ``data_list[start:stop]``:
    a forked worker, which has the list already, is sent only the span.
    """

    id: int
    items: list[str]
    span: tuple[int, int] | None = None


@dataclass(frozen=True)
class WorkPayload:
    """What every worker needs once: the functions and ``shared_data``."""

    process: Any
    init_function: Any
    shared_data: Any
    batch_size: int | None
    want_results: bool
    items: Sequence[str] | None = None  # the job's data_list, for spans


@dataclass(frozen=True)
class ChunkDone:
    chunk: Chunk
    n_run: int
    results: list | None
    failures: list  # (pos, count, exc_type, message, tb, exc_bytes, seconds, kind)
    seconds: float
    worker: str
    results_blob: bytes | None = None  # the pickle of ``results``, if the backend has it


@dataclass(frozen=True)
class ChunksLost:
    """A worker died or was killed holding ``chunks``.

    ``blame`` is ``(chunk, pos)`` for the unit of work that was running (it
    fails); every other item of the chunks simply goes back to the queue.
    """

    chunks: list[Chunk]
    blame: tuple[Chunk, int] | None
    kind: str  # "died", "timeout", "killed" (by a forced stop), "terminated" (from outside)
    message: str
    worker: str
    pid: int | None = None
    exitcode: int | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class WorkerOutput:
    worker: str
    lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class InitFailed:
    exc_type: str
    message: str
    traceback: str
    exc_bytes: bytes | None
    worker: str


@dataclass(frozen=True)
class Fatal:
    """The backend cannot go on (workers keep dying at start, cluster gone)."""

    error: BaseException


class Backend(Protocol):
    """Implemented by :class:`nbmplock._engine.LocalBackend` and the Dask backend."""

    workers: int

    def start(self) -> None:
        """Start the workers; they initialise in the background."""

    def free_slots(self) -> int:
        """How many chunks :meth:`submit` accepts now without queueing deep."""

    def submit(self, chunk: Chunk) -> None:
        """Send a chunk to a worker."""

    def wait(self, timeout: float | None) -> list:
        """Block until something happens or ``timeout``; return the events."""

    def wakeup(self) -> None:
        """Thread-safe: make a blocked :meth:`wait` return now."""

    def request_stop(self) -> None:
        """Graceful: every worker returns after the item it is running."""

    def kill(self) -> list:
        """Forced: end every worker now; returns ``ChunksLost`` events."""

    def shutdown(self) -> None:
        """End every worker and release resources; nothing outlives this."""

    def in_flight(self) -> dict[str, int]:
        """Items held per worker label."""

    # Optional: ``give_back() -> bool``. Called when nothing is left to
    # dispatch; if a worker is idle, asks a busy one to return a chunk early.
    # The chunk comes back as a ``ChunkDone`` with ``n_run`` short of its
    # length, and the runner dispatches the rest again. The local backend has
    # it; the Dask backend does not (its tasks cannot be cut).


def make_backend_factory(options):
    """A function ``(payload, store, units) -> Backend`` for ``options.backend``.

    ``units`` is how many units of work (items, or batches) the run has to do:
    the local backend starts no more workers than that.

    It may have a ``check(payload)`` attribute, called before the run directory
    is touched, that raises if the payload cannot reach the workers.
    """
    if options.backend is None:
        serialized: dict = {}

        def local(payload: WorkPayload, store, units: int):
            from ._engine import LocalBackend
            workers = min(options.num_procs or os.cpu_count() or 1, max(1, units))
            return LocalBackend(payload, workers=workers,
                                start_method=options.start_method,
                                item_timeout=options.item_timeout,
                                close_fds=store.private_fds(),
                                serialized=serialized.pop(id(payload), None))

        def check(payload: WorkPayload) -> None:
            from ._engine import payload_for_start_method
            data = payload_for_start_method(payload, options.start_method)
            if data is not None:
                serialized[id(payload)] = data

        local.check = check
        return local

    def dask(payload: WorkPayload, store, units: int):
        from ._dask import DaskBackend
        return DaskBackend(payload, options.backend, workers=options.num_procs,
                           item_timeout=options.item_timeout)
    return dask
