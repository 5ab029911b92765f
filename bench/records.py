"""The records every other bench module passes around; this module imports none of them.

* :class:`Runner` -- a named way to run one map call (a peer library or an
  nbmplock entry point), as listed in the results table;
* :class:`Counted` and :class:`OneOff` -- what a runner reports besides the
  results it handed to the caller;
* :class:`Measurement` -- what one timed run of a case produced;
* :class:`Sample` -- one attempted run as the harness records it;
* :class:`ResultMismatch` -- a run did not deliver every item exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

#: Sample statuses.  ``failed``: the run finished but did not deliver every
#: item exactly once (it is not timed); ``error``: it raised or timed out.
OK, FAILED, ERROR, SKIPPED = "ok", "failed", "error", "skipped"


class ResultMismatch(RuntimeError):
    """A run did not deliver every item exactly once (count or content differ)."""


@dataclass(frozen=True)
class Counted:
    """nbmplock's own account of a call that hands no results back.

    ``ran``: items processed by this call; ``already_done``: items skipped
    because an earlier run recorded them; ``failed``: items that failed.
    """

    ran: int
    already_done: int
    failed: int


@dataclass(frozen=True)
class OneOff:
    """A one-off set-up inside the timed call (building the panel's widgets):
    its wall and CPU seconds are taken out of the timing and reported as ``label``."""

    seconds: float
    cpu_seconds: float
    label: str


@dataclass(frozen=True)
class Outcome:
    """What a runner returns besides the results it gave to the receiver."""

    counted: Optional[Counted] = None
    one_off: Optional[OneOff] = None


#: ``run(task, items, workers, scratch, receiver) -> Outcome | None``; see :class:`Runner`.
RunFn = Callable[[Any, Sequence[Any], int, Path, Any], Optional[Outcome]]


@dataclass(frozen=True)
class Runner:
    """A named way to run a map, as listed in the results table.

    ``run(task, items, workers, scratch, receiver)`` maps the task over the
    items with ``workers`` processes and hands every result it gets back to
    ``receiver.take(results)`` (see :mod:`bench.delivery`); a call that gets no
    results back returns an :class:`Outcome` with nbmplock's own counts.
    *scratch* is a fresh empty directory (nbmplock's ``out_path``).

    ``after`` runs outside the timed region once the run is over (used to
    shut down pools that a library would otherwise keep warm).
    ``role`` is ``"peer"``, ``"nbmplock"`` or ``"baseline"``.
    ``check`` says why the runner cannot run here (``None`` when it can).
    """

    library: str
    run: RunFn
    role: str = "peer"
    after: Optional[Callable[[int], None]] = None
    note: str = ""
    check: Optional[Callable[[], Optional[str]]] = None

    def problem(self) -> Optional[str]:
        """Why this runner cannot run here, or ``None``."""
        return self.check() if self.check else None


@dataclass
class Measurement:
    """What one timed run produced.

    ``seconds`` is wall time, ``parent_cpu`` the user + system CPU seconds of
    the benchmark process itself (its threads included, worker processes
    not) over the same region; ``None`` where it is not meaningful.
    """

    seconds: float
    parent_cpu: Optional[float] = None
    extra: dict = field(default_factory=dict)


@dataclass
class Sample:
    """One attempted run (or a skip / setup failure, with ``repeat == -1``)."""

    workload: str
    library: str
    role: str
    repeat: int
    status: str  # OK, FAILED, ERROR or SKIPPED
    n_items: int = 0
    seconds: Optional[float] = None
    parent_cpu: Optional[float] = None
    extra: dict = field(default_factory=dict)
    error: Optional[str] = None
    traceback: Optional[str] = None
