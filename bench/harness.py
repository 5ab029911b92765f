"""Run the cases of a workload, interleaved repeat by repeat.

Repeat 1 of every library runs before repeat 2 of any, so machine drift hits
all libraries alike; the order is also shuffled each repeat (seeded by the
repeat number, so runs are reproducible) so that no library always runs
first, nor always right after the same other library.  A failing library
never aborts the suite: its error is recorded as a sample and its remaining
repeats are skipped.  A run that did not deliver every item exactly once
(:class:`~bench.records.ResultMismatch`) is recorded as ``failed``, without
its time.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import traceback
from typing import Callable, Iterator, Optional, Sequence

from .cases import Case
from .records import ERROR, FAILED, OK, SKIPPED, ResultMismatch, Sample

#: Where samples and progress lines go.
Record = Callable[["Sample"], None]
Log = Callable[[str], None]


class RunTimeout(Exception):
    """A run took longer than the per-run timeout."""


@contextlib.contextmanager
def deadline(seconds: Optional[float]) -> Iterator[None]:
    """Raise :class:`RunTimeout` in the main thread after *seconds* (best effort)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise RunTimeout(f"run exceeded the {seconds:g} s timeout")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def reap_children(grace: float = 3.0) -> None:
    """Terminate (then kill) child processes a failed run left behind."""
    try:
        import psutil
    except ImportError:
        return
    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def describe_error(exc: BaseException) -> str:
    """Short one-line description of *exc*."""
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def _sample(case: Case, repeat: int, status: str, **fields) -> Sample:
    return Sample(case.workload, case.library, case.role, repeat, status, case.n_items, **fields)


def _failure(case: Case, repeat: int, exc: Exception, prefix: str = "") -> Sample:
    reap_children()
    status = FAILED if isinstance(exc, ResultMismatch) else ERROR
    return _sample(case, repeat, status, error=prefix + describe_error(exc), traceback=traceback.format_exc())


def run_once(case: Case, repeat: int, timeout: Optional[float]) -> Sample:
    """One measured run of *case*, never raising (except KeyboardInterrupt)."""
    try:
        with deadline(timeout):
            m = case.run()
    except Exception as exc:
        return _failure(case, repeat, exc)
    return _sample(case, repeat, OK, seconds=m.seconds, parent_cpu=m.parent_cpu, extra=m.extra)


def setup_case(case: Case, timeout: Optional[float]) -> Optional[Sample]:
    """Run ``case.setup()``; return a failure sample if it failed."""
    try:
        with deadline(timeout):
            case.setup()
    except Exception as exc:
        return _failure(case, -1, exc, prefix="setup: ")
    return None


def shuffled(cases: Sequence[Case], repeat: int) -> list[Case]:
    """*cases* in the order of *repeat*: a permutation seeded by the repeat number."""
    return random.Random(repeat).sample(list(cases), len(cases))


def format_sample(sample: Sample, repeats: int) -> str:
    """A progress line for *sample*."""
    where = f"[{sample.workload} {sample.repeat + 1}/{repeats}]" if sample.repeat >= 0 else f"[{sample.workload}]"
    if sample.status == OK:
        cpu = "" if sample.parent_cpu is None else f"  parent CPU {sample.parent_cpu:7.3f} s"
        return f"{where:<11} {sample.library:<56} {sample.seconds:9.3f} s{cpu}"
    return f"{where:<11} {sample.library:<56} {sample.status.upper()}: {sample.error}"


def run_workload(
    cases: Sequence[Case],
    repeats: int,
    timeout: Optional[float],
    record: Record,
    log: Log,
) -> None:
    """Set up, run interleaved and tear down *cases*, passing each sample to *record*."""
    available = []
    for case in cases:
        problem = case.problem()
        if problem:
            skip = _sample(case, -1, SKIPPED, error=problem)
            record(skip)
            log(format_sample(skip, repeats))
        else:
            available.append(case)
    try:
        ready = []
        for case in available:
            if type(case).setup is not Case.setup:
                log(f"[{case.workload}]        setting up {case.library} (untimed) ...")
            failure = setup_case(case, timeout)
            if failure:
                record(failure)
                log(format_sample(failure, repeats))
            else:
                ready.append(case)
        failed: set[int] = set()
        for repeat in range(repeats):
            for case in shuffled(ready, repeat):
                if id(case) in failed:
                    continue
                sample = run_once(case, repeat, timeout)
                record(sample)
                log(format_sample(sample, repeats))
                if sample.status != OK:
                    failed.add(id(case))
    finally:
        for case in available:
            with contextlib.suppress(Exception):
                case.teardown()
