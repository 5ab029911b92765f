"""What a run and its Job tell the world: states, numbers, events, outcomes.

All immutable records (but the enums), safe to keep and to read from any thread.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace

from ._log import Failure


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


#: A job whose measured rate is at least this share of its rate_limit is said to be
#: held to the limit (the panel, status).
THROTTLED_SHARE = 0.9


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
    #: Failed items waiting for their retry (``retry_delay``, ``retry_after``).
    retrying: int = 0
    #: The run starts items at about its ``rate_limit``: the limit, not the work, sets the pace.
    throttled: bool = False

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


class EventKind(str, enum.Enum):
    """``"progress"`` (numbers moved, output or failures came) or ``"state"`` (the
    Job's state changed); a ``str`` too, so ``event.kind == "state"`` works."""

    PROGRESS = "progress"
    STATE = "state"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Event:
    """What observers receive: the numbers, and the output lines and failures
    that are new since the last event they received."""

    kind: EventKind
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
    #: What the run wants the user to know (items run again for their values, a
    #: save_callback call abandoned by a Force stop, ...).
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        text = (f"{self.done} done, {self.skipped} already done before, {self.failed} failed "
                f"in {self.elapsed:.1f} s ({self.state.value}; run directory {self.out_path!r})")
        return text + "".join(f". Note: {note}" for note in self.notes)


class StopMode(enum.IntEnum):
    """How hard a stop is; a later request can only make it harder."""

    #: Workers finish the item they run; finished results are saved.
    GRACEFUL = 1
    #: Ctrl-C: workers are killed now; the save call in progress completes.
    NOW = 2
    #: Force stop, a second Ctrl-C, interpreter shutdown: nothing waits,
    #: not even for a save_callback call in progress.
    FORCE = 3


class RunStatus(str, enum.Enum):
    FINISHED = "finished"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class Tally:
    """A run's numbers. Immutable: the manager replaces it as they change
    (per chunk, not per item), so any thread may read the one it holds."""

    total: int = 0
    done_before: int = 0
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    started: float = field(default_factory=time.monotonic)
    in_flight_by_worker: tuple[tuple[str, int], ...] = ()
    retrying: int = 0  # failed items waiting for their retry (retry_delay, retry_after)

    def add(self, **deltas: int) -> Tally:
        """A copy with ``deltas`` added to the named counts."""
        return replace(self, **{name: getattr(self, name) + n for name, n in deltas.items()})


@dataclass(frozen=True)
class Published:
    """What the manager publishes: numbers, new output and failures, every failure."""

    tally: Tally
    output: tuple[str, ...] = ()
    new_failures: tuple[Failure, ...] = ()
    failures: tuple[Failure, ...] = ()  # every failure recorded, oldest first


@dataclass(frozen=True)
class Outcome:
    status: RunStatus
    error: BaseException | None = None
    notes: tuple[str, ...] = ()  # what a stop left undone, in words
