"""The jobs of this process: which one runs on which directory, and the exit hook.

A re-run cell finds the live job of its directory (:func:`live_job`); when
the interpreter exits (a script's end, a kernel restart), every live job is
stopped as by Force stop (:func:`stop_every_job_at_exit`).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from typing import Any

from ._backend import exiting
from ._state import StopMode

_live: dict[str, weakref.ReferenceType] = {}
_live_lock = threading.Lock()


def stop_every_job_at_exit(timeout: float = 5.0) -> None:
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


def register_exit_hook() -> None:
    atexit.unregister(stop_every_job_at_exit)
    atexit.register(stop_every_job_at_exit)


def live_job(out_path: str) -> Any:
    """The Job of this process currently running on ``out_path``, if any."""
    with _live_lock:
        ref = _live.get(os.path.realpath(out_path))
    job = ref() if ref is not None else None
    return job if job is not None and job.state.active else None




def register(out_path: str, job: Any) -> None:
    """``job`` now runs on ``out_path``."""
    with _live_lock:
        _live[os.path.realpath(out_path)] = weakref.ref(job)


def unregister(out_path: str, job: Any) -> None:
    with _live_lock:
        key = os.path.realpath(out_path)
        if key in _live and _live[key]() is job:
            del _live[key]
