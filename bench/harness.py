"""Run the cases of a workload, interleaved repeat by repeat.

Repeat 1 of every library runs before repeat 2 of any, so machine drift hits
all libraries alike; the order is also shuffled each repeat (seeded by the
repeat number, so runs are reproducible) so that no library always runs
first, nor always right after the same other library.  A failing library
never aborts the suite: its error is recorded as a sample and its remaining
repeats are skipped.
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

from .cases import Case

#: Where samples and progress lines go.
Record = Callable[["Sample"], None]
Log = Callable[[str], None]


@dataclass
class Sample:
    """One attempted run (or a skip / setup failure, with ``repeat == -1``)."""

    workload: str
    library: str
    role: str
    repeat: int
    status: str  # "ok", "error" or "skipped"
    n_items: int = 0
    seconds: Optional[float] = None
    delivered: Optional[int] = None
    extra: dict = field(default_factory=dict)
    error: Optional[str] = None
    traceback: Optional[str] = None


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


def run_once(case: Case, repeat: int, timeout: Optional[float]) -> Sample:
    """One measured run of *case*, never raising (except KeyboardInterrupt)."""
    try:
        with deadline(timeout):
            m = case.run()
    except Exception as exc:
        reap_children()
        return _sample(case, repeat, "error", error=describe_error(exc), traceback=traceback.format_exc())
    return _sample(case, repeat, "ok", seconds=m.seconds, delivered=m.delivered, extra=m.extra)


def setup_case(case: Case, timeout: Optional[float]) -> Optional[Sample]:
    """Run ``case.setup()``; return an error sample if it failed."""
    try:
        with deadline(timeout):
            case.setup()
    except Exception as exc:
        reap_children()
        return _sample(case, -1, "error", error="setup: " + describe_error(exc), traceback=traceback.format_exc())
    return None


def shuffled(cases: Sequence[Case], repeat: int) -> list[Case]:
    """*cases* in the order of *repeat*: a permutation seeded by the repeat number."""
    return random.Random(repeat).sample(list(cases), len(cases))


def format_sample(sample: Sample, repeats: int) -> str:
    """A progress line for *sample*."""
    where = f"[{sample.workload} {sample.repeat + 1}/{repeats}]" if sample.repeat >= 0 else f"[{sample.workload}]"
    if sample.status == "ok":
        return f"{where:<11} {sample.library:<48} {sample.seconds:9.3f} s"
    return f"{where:<11} {sample.library:<48} {sample.status.upper()}: {sample.error}"


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
            skip = _sample(case, -1, "skipped", error=problem)
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
                if sample.status != "ok":
                    failed.add(id(case))
    finally:
        for case in available:
            with contextlib.suppress(Exception):
                case.teardown()
