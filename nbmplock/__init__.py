"""nbmplock: a resumable parallel map for Jupyter.

Run a function over a list of items (strings, numbers, paths, rows) on every core; every finished item
is recorded in a run directory, so after a crash, a kernel restart or a Stop
the next run continues exactly where the last one left off.

>>> import nbmplock                                                   # doctest: +SKIP
>>> job = nbmplock.run(items, process, "runs/embed", num_procs=4)     # doctest: +SKIP
>>> job        # the live panel: progress, failures, output, Start/Stop/Resume

The seed library's API is kept: ``mp_lock``, ``mp_lock_value`` (alias
``mp_lock_values``), ``mp_lock_batch`` and ``is_mp_lock_completed``.

``import nbmplock`` imports neither ipywidgets nor IPython; the panel and the
``%%mplock`` magic load on first use (``%load_ext nbmplock``).
"""

from __future__ import annotations

try:
    import fcntl as _fcntl  # noqa: F401 - the run directory's lock
except ModuleNotFoundError:  # Windows
    raise ImportError(
        "nbmplock runs on Linux (tested) and other POSIX systems such as macOS (untested); "
        "not on Windows, which lacks the fcntl file locks, fork and process groups it relies "
        "on. On Windows, use it in WSL.") from None

from ._errors import (InvalidArgumentsError, ItemTimeoutError, JobStateError,
                      MissingDependencyError, NbmplockError, RemoteTraceback,
                      RunDirectoryLostError, RunLockedError, WorkChangedError,
                      SerializationError, StoreCorruptError, WorkerDiedError, WorkerInitError)
from . import _display, _job
from ._errors import FailureKind
from ._job import Job, run
from ._seed import is_mp_lock_completed, mp_lock, mp_lock_batch, mp_lock_value, mp_lock_values
from ._state import Event, EventKind, JobState, Progress, RunSummary
from ._log import Failure
from ._read import Snapshot, read_snapshot

_job.views = _display  # a Job shows its panel through the views above it

__version__ = "0.1.0"

__all__ = [
    "Event",
    "EventKind",
    "Failure",
    "FailureKind",
    "InvalidArgumentsError",
    "ItemTimeoutError",
    "Job",
    "JobState",
    "JobStateError",
    "MissingDependencyError",
    "NbmplockError",
    "Progress",
    "RemoteTraceback",
    "RunDirectoryLostError",
    "RunLockedError",
    "RunSummary",
    "SerializationError",
    "Snapshot",
    "StoreCorruptError",
    "WorkChangedError",
    "WorkerDiedError",
    "WorkerInitError",
    "is_mp_lock_completed",
    "load_ipython_extension",
    "mp_lock",
    "mp_lock_batch",
    "mp_lock_value",
    "mp_lock_values",
    "read_snapshot",
    "run",
]


def load_ipython_extension(ipython) -> None:
    """``%load_ext nbmplock``: register the ``%%mplock`` cell magic."""
    from ._magic import load_ipython_extension as load

    load(ipython)
