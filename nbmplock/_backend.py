"""What a backend is: the interface the runner drives, and the records that cross it.

A backend runs chunks of items somewhere (local processes, a Dask cluster) and
reports back through :meth:`Backend.wait`, as a list of events
(:class:`ChunkDone`, :class:`ChunksLost`, :class:`WorkerOutput`,
:class:`InitFailed`, :class:`Fatal`). It never touches the run store and never
calls user callbacks other than ``process`` and ``init_function``.

The worker's *slot* is shared memory of four doubles the parent reads without
a message, so that a crash or a timeout is blamed on the exact unit of work:
``SLOT_CHUNK`` (the chunk being run), ``SLOT_UNIT`` (the index of the unit
being run, -1 between units), ``SLOT_STARTED`` (its start, ``time.monotonic``)
and ``SLOT_GIVE_BACK`` (set by the parent to a chunk's id: return it after the
current unit). A worker with ``concurrency`` N runs N *lanes* (threads), each
with its own four doubles (lane ``i`` at ``SLOT_SIZE * i``), followed by one
more: the worker's *drain* flag (set by the parent: every lane hands back the
chunks it takes, undone; see ``item_timeout`` in :mod:`nbmplock._engine`).
"""

from __future__ import annotations

import enum
import pickle
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from ._errors import FailureKind

#: Set when the interpreter exits (see _job's atexit hook): no backend starts a
#: new worker from then on (a kernel restart must not spawn replacements).
exiting = threading.Event()

SLOT_CHUNK, SLOT_UNIT, SLOT_STARTED, SLOT_GIVE_BACK = range(4)
SLOT_SIZE = 4


def new_slot(lanes: int = 1) -> list[float]:
    """A slot's initial values: no chunk, no unit running, nothing asked back
    (per lane; with more than one lane, then the drain flag, not set)."""
    return [0.0, -1.0, 0.0, -1.0] * lanes + ([0.0] if lanes > 1 else [])


def running_units(slot, lanes: int, chunks: dict) -> list[tuple[int, Chunk, int, float]]:
    """``(lane, chunk, unit index, started)`` of each unit a worker's lanes run now,
    read from its slot; ``chunks`` maps the ids of the chunks it holds to them."""
    found = []
    for lane in range(lanes):
        base = SLOT_SIZE * lane
        unit = slot[base + SLOT_UNIT]
        if unit >= 0:
            chunk = chunks.get(int(slot[base + SLOT_CHUNK]))
            if chunk is not None:
                found.append((lane, chunk, int(unit), slot[base + SLOT_STARTED]))
    return found


def set_drain(slot, lanes: int, on: bool) -> None:
    """Set (or clear) a worker's drain flag: its lanes hand back every chunk they
    take, and each lane's running chunk returns after its current unit.

    Invariant: the flag is written before each lane's give-back, so a lane that
    moves on to a new chunk after its give-back was written reads the flag and
    hands that chunk back too.
    """
    slot[SLOT_SIZE * lanes] = 1.0 if on else 0.0
    if on:
        for lane in range(lanes):
            base = SLOT_SIZE * lane
            slot[base + SLOT_GIVE_BACK] = slot[base + SLOT_CHUNK]


class LossKind(str, enum.Enum):
    """Why a worker lost the chunks it held."""

    DIED = "died"              # it died on its own: the running unit is blamed
    TIMEOUT = "timeout"        # killed by item_timeout: the running unit is blamed
    KILLED = "killed"          # a Force stop killed it: nothing is blamed
    TERMINATED = "terminated"  # ended from outside (SIGTERM): a stop, nothing blamed


@dataclass(eq=False)
class Chunk:
    """Items sent to one worker together, by their positions in ``data``
    (the job's item list).

    ``span`` is ``(start, stop)`` when the positions are consecutive: a
    forked worker, which has the list already, is sent only the span.
    """

    id: int
    positions: Sequence[int]
    data: Sequence = ()

    @property
    def span(self) -> tuple[int, int] | None:
        p = self.positions
        if isinstance(p, range):
            return (p.start, p.stop) if p.step == 1 else None
        if len(p) and p[-1] - p[0] + 1 == len(p) and all(
                b == a + 1 for a, b in zip(p, p[1:])):
            return (p[0], p[-1] + 1)
        return None

    @property
    def items(self) -> list:
        span = self.span
        if span is not None:
            return list(self.data[span[0]:span[1]])
        data = self.data
        return [data[i] for i in self.positions]

    def __len__(self) -> int:
        return len(self.positions)


@dataclass(frozen=True)
class WorkPayload:
    """What every worker needs once: the functions and ``shared_data``."""

    process: Any
    init_function: Any
    shared_data: Any
    batch_size: int | None
    want_results: bool
    items: Sequence | None = None  # the job's data_list, for spans

    @property
    def functions(self) -> tuple:
        """What a worker unpacks: ``(process, init_function, shared_data, batch_size)``."""
        return (self.process, self.init_function, self.shared_data, self.batch_size)


class ItemError(NamedTuple):
    """Units of a chunk that failed in the worker (``count`` items from ``pos``)."""

    pos: int
    count: int
    exc_type: str
    message: str
    traceback: str
    blob: bytes | None  # for nbmplock._wire.rebuild_exception
    seconds: float | None
    kind: FailureKind


@dataclass(frozen=True)
class ChunkDone:
    """A chunk came back: ``n_run`` items ran (fewer when stopped or given back).

    Its results travel as the worker's pickle, ``results_blob``: the parent
    stores that very pickle and unpickles it only when it needs the values
    (a ``save_callback``, failures to take out).
    """

    chunk: Chunk
    n_run: int
    failures: list[ItemError]
    seconds: float
    worker: str
    results_blob: bytes | None = None
    results_list: list | None = None  # when the backend has the values already (Dask)

    @property
    def results(self) -> list | None:
        if self.results_list is None and self.results_blob is not None:
            object.__setattr__(self, "results_list", pickle.loads(self.results_blob))
        return self.results_list


@dataclass(frozen=True)
class ChunksLost:
    """A worker died or was killed holding ``chunks``.

    ``blame`` is ``(chunk, pos)`` for the unit of work that was running (it
    fails); ``also_blamed`` the other units running at the same time in the
    worker's other lanes (``concurrency`` > 1), which fail too; every other
    item of the chunks simply goes back to the queue.
    """

    chunks: list[Chunk]
    blame: tuple[Chunk, int] | None
    kind: LossKind
    message: str
    worker: str
    pid: int | None = None
    exitcode: int | None = None
    seconds: float | None = None
    also_blamed: tuple = ()

    @property
    def blamed(self) -> list:
        """Every ``(chunk, pos)`` blamed."""
        return ([self.blame] if self.blame is not None else []) + list(self.also_blamed)


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
    """Implemented by :class:`nbmplock._engine.LocalBackend` and
    :class:`nbmplock._dask.DaskBackend`; both derive from :class:`BackendBase`,
    which gives the optional members their defaults."""

    workers: int
    #: Items that may run at once: ``workers`` x ``concurrency``.
    lanes: int
    #: Items per chunk are capped at about this many bytes.
    max_task_bytes: int
    #: Seconds of work a chunk aims at; None: the runner's default.
    target_chunk_seconds: float | None

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

    def shutdown(self) -> list:
        """End every worker and release resources; nothing outlives this.
        Returns the last events (the workers' last output)."""

    def in_flight(self) -> dict[str, int]:
        """Items held per worker label."""

    def give_back(self) -> bool:
        """Nothing is left to dispatch: if a worker is idle, ask a busy one to
        return a chunk early (it comes back as a ``ChunkDone`` with ``n_run``
        short of its length, and the runner dispatches the rest again).
        Returns whether a request was made."""


class BackendBase:
    """Defaults of :class:`Backend`'s optional members."""

    max_task_bytes: int = 4 << 20
    target_chunk_seconds: float | None = None

    @property
    def lanes(self) -> int:
        return self.workers * getattr(self, "concurrency", 1)

    def give_back(self) -> bool:
        return False  # tasks that cannot be cut (Dask)
