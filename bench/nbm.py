"""Runners for nbmplock, coded against its public API.

* ``nbmplock.mp_lock_value(items, fn, None, workers, out_path, verbose=False)``:
  the results come back, as every peer's do: the like-for-like row;
* ``nbmplock.mp_lock(items, fn, save_callback, ...)`` with a ``save_callback``
  that receives every result;
* ``nbmplock.mp_lock(items, fn, None, ...)``: no results come back (a real
  use: the function saves its own output); its delivery is checked against
  the counts nbmplock reports;
* ``nbmplock.Job(items, fn, out_path=..., num_procs=workers, keep_results=False)``
  driven with a headless ``nbmplock._panel.Panel(job)``, like the bare
  ``mp_lock`` (no results back).

The runners share the peers' signature ``run(task, items, workers, scratch,
receiver)``; *scratch* is the fresh empty directory used as ``out_path``
(nbmplock resumes from it, so a reused one would skip the work).  Items that
are not ``str`` (and ``key=``) are new in nbmplock; :func:`items_problem`
says whether the installed version takes them.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from .delivery import Receiver
from .records import Counted, OneOff, Outcome, Runner
from .workloads import (INT_NUMBER_TASK, NUMBER_TASK, RECORD_NUMBER_TASK, SHUFFLED_NUMBER_TASK,
                        Task)

#: How a row reads when the installed nbmplock refuses its items.
NOT_SUPPORTED = "not supported by this nbmplock version"


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


#: Sample items per task label, for :func:`items_problem`.
_PROBES: dict[str, tuple[Task, list]] = {
    INT_NUMBER_TASK.label: (INT_NUMBER_TASK, [0, 1]),
    RECORD_NUMBER_TASK.label: (RECORD_NUMBER_TASK, [{"id": "a", "n": 0}, {"id": "b", "n": 1}]),
}


@functools.lru_cache(maxsize=None)
def items_problem(label: str) -> Optional[str]:
    """Why nbmplock cannot run the items of *label* (e.g. ``"int items"``), or ``None``.

    Asks nbmplock itself: one ``mp_lock_value`` call over two such items
    with one worker, in a throw-away directory.  An ``InvalidArgumentsError``
    means this version refuses them (today: items must be ``str``, and there
    is no ``key=``).
    """
    problem = nbmplock_problem("mp_lock_value")
    if problem or label not in _PROBES:
        return problem
    import nbmplock

    task, items = _PROBES[label]
    scratch = tempfile.mkdtemp(prefix="nbmplock-bench-probe-")
    try:
        results = nbmplock.mp_lock_value(items, task.nbm, None, 1, scratch, verbose=False,
                                         **task.nbm_options)
    except nbmplock.InvalidArgumentsError as exc:
        return f"{NOT_SUPPORTED} (InvalidArgumentsError: {exc})"
    except Exception as exc:
        return f"probe with {label} failed ({type(exc).__name__}: {exc})"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if list(results) != [0, 1]:
        return f"probe with {label} returned {results!r}, expected [0, 1]"
    return None


def runner_check(entry_point: str, task: Task = NUMBER_TASK):
    """A ``Runner.check``: nbmplock has *entry_point* and takes the items of *task*."""
    return lambda: nbmplock_problem(entry_point) or items_problem(task.label)


def _counted(summary) -> Counted:
    return Counted(summary.done, summary.skipped, summary.failed)


# --------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------

def run_mp_lock_value(task: Task, items: Sequence, workers: int, scratch: Path, receiver: Receiver) -> None:
    """``mp_lock_value``: the returned list goes to the receiver, like a peer's results."""
    import nbmplock

    receiver.take(nbmplock.mp_lock_value(items, task.nbm, None, workers, os.fspath(scratch),
                                         verbose=False, **task.nbm_options))


def run_mp_lock_saving(task: Task, items: Sequence, workers: int, scratch: Path, receiver: Receiver) -> None:
    """``mp_lock`` with a ``save_callback`` that hands every result to the receiver."""
    import nbmplock

    def save(output_filepath, results, names):
        receiver.take(results)

    nbmplock.mp_lock(items, task.nbm, save, workers, os.fspath(scratch), verbose=False,
                     **task.nbm_options)


def run_mp_lock(task: Task, items: Sequence, workers: int, scratch: Path, receiver: Receiver) -> Outcome:
    """Bare ``mp_lock`` without a save_callback: no results come back, only the counts."""
    import nbmplock

    summary = nbmplock.mp_lock(items, task.nbm, None, workers, os.fspath(scratch), verbose=False,
                               **task.nbm_options)
    return Outcome(counted=_counted(summary))


def run_job_panel(task: Task, items: Sequence, workers: int, scratch: Path, receiver: Receiver) -> Outcome:
    """``nbmplock.Job`` driven with a headless ``Panel`` attached.

    ``keep_results=False`` so that it does what bare ``mp_lock`` does (which
    keeps no results): the difference is the price of the Job and its panel
    only.  Building the panel's widgets happens once per display: it is
    reported apart, not timed.
    """
    import nbmplock
    from nbmplock._panel import Panel

    job = nbmplock.Job(items, task.nbm, out_path=os.fspath(scratch), num_procs=workers,
                       errors="raise", keep_results=False, **task.nbm_options)
    wall, cpu = time.perf_counter(), time.process_time()
    panel = Panel(job)
    built = OneOff(time.perf_counter() - wall, time.process_time() - cpu, "panel_build_s")
    job.start()
    job.wait()
    panel.close()
    if job.error is not None:
        raise job.error
    return Outcome(counted=_counted(job.summary), one_off=built)


def _variant(runner: Runner, task: Task) -> Runner:
    """*runner* over the items of *task* (a row of its own)."""
    return Runner(f"{runner.library}, {task.label}", runner.run, role=runner.role,
                  note=runner.note, check=runner_check("mp_lock", task))


MP_LOCK_VALUE = Runner("nbmplock mp_lock_value", run_mp_lock_value, role="nbmplock",
                       check=runner_check("mp_lock_value"))
MP_LOCK_SAVING = Runner("nbmplock mp_lock + save_callback", run_mp_lock_saving, role="nbmplock",
                        check=runner_check("mp_lock"),
                        note="save_callback receives every result")
MP_LOCK = Runner("nbmplock mp_lock, no save_callback", run_mp_lock, role="nbmplock",
                 check=runner_check("mp_lock"),
                 note="for a function that saves its own output: no results come back "
                      "(not like for like); checked against nbmplock's counts")
JOB_PANEL = Runner("nbmplock Job + headless Panel", run_job_panel, role="nbmplock",
                   check=panel_problem,
                   note="keep_results=False: no results back, like the bare mp_lock row")

MP_LOCK_VALUE_INT = _variant(MP_LOCK_VALUE, INT_NUMBER_TASK)
MP_LOCK_VALUE_SHUFFLED = _variant(MP_LOCK_VALUE, SHUFFLED_NUMBER_TASK)
MP_LOCK_VALUE_RECORD = _variant(MP_LOCK_VALUE, RECORD_NUMBER_TASK)
MP_LOCK_INT = _variant(MP_LOCK, INT_NUMBER_TASK)
MP_LOCK_RECORD = _variant(MP_LOCK, RECORD_NUMBER_TASK)


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
