"""Runners for nbmplock, coded against its public API.

* ``nbmplock.mp_lock(items, fn, save_callback_or_None, workers, out_path, verbose=False)``
* ``nbmplock.mp_lock_value(...)`` -- same arguments, returns the results in order
* ``nbmplock.Job(items, fn, out_path=..., num_procs=workers, errors="raise")`` driven
  with a headless ``nbmplock._panel.Panel(job)``

The runners share the peers' signature ``run(task, items, workers, scratch)``;
*scratch* is the fresh empty directory used as ``out_path`` (nbmplock resumes
from it, so a reused one would skip the work).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Optional, Sequence

from .peers import Runner
from .workloads import Task


def nbmplock_problem(*attributes: str) -> Optional[str]:
    """Why nbmplock cannot be benchmarked, or ``None`` if it has *attributes*."""
    try:
        import nbmplock
    except Exception as exc:  # the package may be half-written: report anything
        return f"import nbmplock failed ({type(exc).__name__}: {exc})"
    missing = [name for name in attributes if not hasattr(nbmplock, name)]
    if missing:
        return f"nbmplock has no {', '.join(missing)} yet"
    return None


def panel_problem() -> Optional[str]:
    """Why the headless Job+Panel variant cannot run, or ``None``."""
    problem = nbmplock_problem("Job")
    if problem:
        return problem
    try:
        from nbmplock._panel import Panel  # noqa: F401
    except ImportError as exc:
        return f"headless Panel unavailable (ImportError: {exc})"
    except Exception as exc:
        return f"importing nbmplock._panel failed ({type(exc).__name__}: {exc})"
    return None


def payload_bytes(results) -> int:
    """Total length of the bytes objects found in *results*, however nested."""
    if isinstance(results, (bytes, bytearray, memoryview)):
        return len(results)
    if isinstance(results, str):
        return 0
    if isinstance(results, Mapping):
        return payload_bytes(results.values())
    if isinstance(results, Iterable):
        return sum(payload_bytes(r) for r in results)
    return 0


class ByteCounter:
    """``save_callback`` for W3 that only counts the bytes it is handed."""

    def __init__(self) -> None:
        self.total = 0

    def __call__(self, output_filepath, results, names) -> None:
        self.total += payload_bytes(results)


# --------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------

def run_mp_lock(task: Task, items: Sequence[str], workers: int, scratch: Path) -> None:
    """Bare ``mp_lock`` with no save_callback; nothing comes back to count."""
    import nbmplock

    nbmplock.mp_lock(items, task.nbm, None, workers, os.fspath(scratch), verbose=False)
    return None


def run_mp_lock_counting(task: Task, items: Sequence[str], workers: int, scratch: Path) -> int:
    """``mp_lock`` with a save_callback that counts result bytes (W3)."""
    import nbmplock

    counter = ByteCounter()
    nbmplock.mp_lock(items, task.nbm, counter, workers, os.fspath(scratch), verbose=False)
    return counter.total


def run_mp_lock_value(task: Task, items: Sequence[str], workers: int, scratch: Path) -> int:
    """``mp_lock_value``; the returned list is tallied like a peer's results."""
    import nbmplock

    results = nbmplock.mp_lock_value(items, task.nbm, None, workers, os.fspath(scratch), verbose=False)
    return task.tally(results)


def run_job_panel(task: Task, items: Sequence[str], workers: int, scratch: Path) -> None:
    """``nbmplock.Job`` driven with a headless ``Panel`` attached.

    ``keep_results=False`` so that it does what ``mp_lock`` does (which keeps
    no results): the difference is the price of the Job and its panel only.
    """
    import nbmplock
    from nbmplock._panel import Panel

    from .cases import OneOff

    job = nbmplock.Job(items, task.nbm, out_path=os.fspath(scratch), num_procs=workers,
                       errors="raise", keep_results=False)
    built = time.perf_counter()
    panel = Panel(job)  # once per display: a set-up cost, not a throughput cost
    built = time.perf_counter() - built
    job.start()
    job.wait()
    panel.close()
    return OneOff(None, built, "panel_build_s")


MP_LOCK = Runner(
    "nbmplock mp_lock",
    run_mp_lock,
    role="nbmplock",
    check=functools.partial(nbmplock_problem, "mp_lock"),
)
MP_LOCK_COUNTING = Runner(
    "nbmplock mp_lock",
    run_mp_lock_counting,
    role="nbmplock",
    check=functools.partial(nbmplock_problem, "mp_lock"),
    note="save_callback counts len() of the results",
)
MP_LOCK_VALUE = Runner(
    "nbmplock mp_lock_value",
    run_mp_lock_value,
    role="nbmplock",
    check=functools.partial(nbmplock_problem, "mp_lock_value"),
)
JOB_PANEL = Runner("nbmplock Job + headless Panel", run_job_panel, role="nbmplock", check=panel_problem)


# --------------------------------------------------------------------------
# Disk usage (W5)
# --------------------------------------------------------------------------

def disk_usage(path: Path) -> tuple[int, int]:
    """``(allocated, apparent)`` bytes of everything under *path*, like ``du``."""
    allocated = apparent = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            allocated += st.st_blocks * 512
            apparent += st.st_size
    return allocated, apparent
