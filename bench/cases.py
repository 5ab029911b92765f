"""The registry: which libraries run in which workload, and how one run is timed.

A *case* is one (workload, library) pair.  The harness calls ``setup()``
once, ``run()`` once per repeat (each returning a :class:`Measurement`) and
``teardown()`` once.  Each case decides what is inside the timed region:

* :class:`MapCase` (W1-W4) times one full map call, pool start-up and
  shutdown included, with a fresh empty scratch directory as nbmplock's
  ``out_path``; the directory is removed outside the timing.
* :class:`ResumeCase` (W5) prepares a finished run once, untimed, then times
  the identical second call that has nothing left to do.
* :class:`MemoryCase` (W6) runs :mod:`bench.memprobe` in a fresh subprocess.
"""

from __future__ import annotations

import contextlib
import gc
import math
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

from . import memprobe, nbm, peers
from .peers import Runner
from .workloads import (
    BIG_RESULT_BYTES,
    BIG_TASK,
    BUSY_TASK,
    LENGTH_TASK,
    Sizes,
    Task,
    busy_items,
    label_items,
    loops_for_ms,
    skewed_items,
)

if TYPE_CHECKING:
    from .harness import Sample


class ResultMismatch(RuntimeError):
    """A library delivered a different amount of results than expected."""


@dataclass
class Measurement:
    """What one timed run produced."""

    seconds: float
    delivered: Optional[int] = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class OneOff:
    """Returned by a runner: ``seconds`` of its run were a one-off set-up cost
    (building the panel's widgets), taken out of the timing and reported."""

    delivered: Optional[int]
    seconds: float
    label: str


@dataclass(frozen=True)
class Settings:
    """Everything the case builders need to know about this benchmark run."""

    sizes: Sizes
    workers: int
    loops_per_ms: float
    scratch_root: Path
    timeout: Optional[float]


@contextlib.contextmanager
def scratch_dir(root: Path, prefix: str = "nbmplock-bench-") -> Iterator[Path]:
    """A fresh empty directory under *root*, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_delivered(delivered: Optional[int], expected: Optional[int]) -> None:
    """Raise :class:`ResultMismatch` if a counted result differs from *expected*."""
    if delivered is not None and expected is not None and delivered != expected:
        raise ResultMismatch(f"caller received {delivered:,}, expected {expected:,}")


class Case:
    """One (workload, library) pair; subclasses define the attributes and ``run``."""

    workload: str
    library: str
    role: str
    note: str
    n_items: int

    def problem(self) -> Optional[str]:
        """Why this case cannot run here (skip it), or ``None``."""
        return None

    def setup(self) -> None:
        """Untimed preparation, once before the first repeat."""

    def run(self) -> Measurement:
        """One measured run."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Cleanup, once after the last repeat."""


@dataclass(eq=False)
class MapCase(Case):
    """Time one map call of *runner* over *items* (W1-W4)."""

    workload: str
    runner: Runner
    task: Task
    items: Sequence[str]
    workers: int
    expected: Optional[int]
    scratch_root: Path

    @property
    def library(self) -> str:
        return self.runner.library

    @property
    def role(self) -> str:
        return self.runner.role

    @property
    def note(self) -> str:
        return self.runner.note

    @property
    def n_items(self) -> int:
        return len(self.items)

    def problem(self) -> Optional[str]:
        return self.runner.problem()

    def run(self) -> Measurement:
        try:
            with scratch_dir(self.scratch_root) as scratch:
                gc.collect()
                start = time.perf_counter()
                delivered = self.runner.run(self.task, self.items, self.workers, scratch)
                seconds = time.perf_counter() - start
        finally:
            if self.runner.after:
                self.runner.after(self.workers)
        extra = {}
        if isinstance(delivered, OneOff):  # a one-off set-up cost, reported, not timed
            seconds -= delivered.seconds
            extra[delivered.label] = delivered.seconds
            delivered = delivered.delivered
        check_delivered(delivered, self.expected)
        return Measurement(seconds, delivered, extra)


@dataclass(eq=False)
class ResumeCase(Case):
    """Time a second, identical nbmplock call over an already finished run (W5)."""

    runner: Runner
    items: Sequence[str]
    workers: int
    scratch_root: Path
    workload: str = "W5"
    _run_dir: Optional[Path] = field(default=None, init=False)
    _extra: dict = field(default_factory=dict, init=False)

    @property
    def library(self) -> str:
        return self.runner.library

    @property
    def role(self) -> str:
        return self.runner.role

    @property
    def note(self) -> str:
        return "prepared once (untimed); every repeat resumes the same finished run"

    @property
    def n_items(self) -> int:
        return len(self.items)

    def problem(self) -> Optional[str]:
        return self.runner.problem()

    def setup(self) -> None:
        self._run_dir = Path(tempfile.mkdtemp(prefix="nbmplock-bench-resume-", dir=self.scratch_root))
        start = time.perf_counter()
        self.runner.run(LENGTH_TASK, self.items, self.workers, self._run_dir)
        self._extra = {"prepare_seconds": time.perf_counter() - start, "raw_bytes": raw_bytes(self.items)}

    def run(self) -> Measurement:
        gc.collect()
        start = time.perf_counter()
        delivered = self.runner.run(LENGTH_TASK, self.items, self.workers, self._run_dir)
        seconds = time.perf_counter() - start
        check_delivered(delivered, len(self.items))
        allocated, apparent = nbm.disk_usage(self._run_dir)
        return Measurement(seconds, delivered, dict(self._extra, disk_bytes=allocated, apparent_bytes=apparent))

    def teardown(self) -> None:
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)


def raw_bytes(items: Sequence[str]) -> int:
    """Bytes of the items (UTF-8) plus their pickled W5 results."""
    return sum(len(s.encode("utf-8")) + len(pickle.dumps(LENGTH_TASK.plain(s))) for s in items)


@dataclass(eq=False)
class MemoryCase(Case):
    """Peak parent RSS of one map over ``n_items`` in a fresh subprocess (W6)."""

    probe: str
    library: str
    role: str
    n_items: int
    workers: int
    scratch_root: Path
    timeout: Optional[float]
    check: Callable[[], Optional[str]]
    note: str = "fresh subprocess per run; trivial function"
    workload: str = "W6"

    def problem(self) -> Optional[str]:
        return self.check()

    def run(self) -> Measurement:
        with scratch_dir(self.scratch_root) as scratch:
            result = memprobe.measure(self.probe, self.n_items, self.workers, scratch, self.timeout)
        return Measurement(result.pop("seconds"), None, result)


# --------------------------------------------------------------------------
# Workloads and their libraries
# --------------------------------------------------------------------------

MAP_LIBRARIES: dict[str, tuple[Runner, ...]] = {
    "W1": (*peers.MAP_PEERS, nbm.MP_LOCK, nbm.MP_LOCK_VALUE, nbm.JOB_PANEL),
    "W2": (peers.SERIAL, *peers.MAP_PEERS, nbm.MP_LOCK, nbm.MP_LOCK_VALUE, nbm.JOB_PANEL),
    "W3": (*peers.MAP_PEERS, nbm.MP_LOCK_COUNTING, nbm.MP_LOCK_VALUE),
    "W4": (peers.SERIAL, *peers.MAP_PEERS, nbm.MP_LOCK, nbm.MP_LOCK_VALUE, nbm.JOB_PANEL),
}
RESUME_LIBRARIES: tuple[Runner, ...] = (nbm.MP_LOCK, nbm.MP_LOCK_VALUE)


def _map_cases(key: str, task: Task, items: Sequence[str], expected: int, s: Settings) -> list[Case]:
    return [
        MapCase(key, runner, task, items, s.workers, expected, s.scratch_root)
        for runner in MAP_LIBRARIES[key]
    ]


def build_w1(s: Settings) -> list[Case]:
    """W1 overhead: trivial work on many items."""
    items = label_items(s.sizes.overhead_items)
    return _map_cases("W1", LENGTH_TASK, items, len(items), s)


def build_w2(s: Settings) -> list[Case]:
    """W2 CPU scaling: ~``cpu_ms`` of pure-Python work per item."""
    items = busy_items(s.sizes.cpu_items, loops_for_ms(s.loops_per_ms, s.sizes.cpu_ms))
    return _map_cases("W2", BUSY_TASK, items, len(items), s)


def build_w3(s: Settings) -> list[Case]:
    """W3 big results: every item returns ``BIG_RESULT_BYTES``."""
    items = label_items(s.sizes.big_items)
    return _map_cases("W3", BIG_TASK, items, len(items) * BIG_RESULT_BYTES, s)


def build_w4(s: Settings) -> list[Case]:
    """W4 skew: the first items are much slower than the rest."""
    z = s.sizes
    items = skewed_items(
        z.skew_items,
        z.skew_heavy_fraction,
        loops_for_ms(s.loops_per_ms, z.skew_heavy_ms),
        loops_for_ms(s.loops_per_ms, z.skew_light_ms),
    )
    return _map_cases("W4", BUSY_TASK, items, len(items), s)


def build_w5(s: Settings) -> list[Case]:
    """W5 resume: a second call over a finished run."""
    items = label_items(s.sizes.resume_items)
    return [ResumeCase(runner, items, s.workers, s.scratch_root) for runner in RESUME_LIBRARIES]


def build_w6(s: Settings) -> list[Case]:
    """W6 memory: peak parent RSS against the size of the item list."""
    n = s.sizes.memory_items
    common = dict(n_items=n, workers=s.workers, scratch_root=s.scratch_root, timeout=s.timeout)
    return [
        MemoryCase("mp_lock", nbm.MP_LOCK.library, "nbmplock",
                   check=nbm.MP_LOCK.problem, **common),
        MemoryCase("multiprocess", peers.MULTIPROCESS_CHUNKED.library, "peer",
                   check=peers.MULTIPROCESS_CHUNKED.problem,
                   note="reference; fresh subprocess per run", **common),
    ]


# --------------------------------------------------------------------------
# Scores: one number per sample
# --------------------------------------------------------------------------

def _nan_if_none(value: Optional[float]) -> float:
    return math.nan if value is None else value


def score_throughput(sample: "Sample", baseline: Optional[float], workers: int) -> float:
    """Items per second."""
    return sample.n_items / sample.seconds


def score_speedup(sample: "Sample", baseline: Optional[float], workers: int) -> float:
    """Serial time of the same repeat divided by this run's time."""
    return _nan_if_none(baseline) / sample.seconds


def score_bytes_per_second(sample: "Sample", baseline: Optional[float], workers: int) -> float:
    """Result bytes delivered to the caller per second."""
    return _nan_if_none(sample.delivered) / sample.seconds


def score_vs_ideal(sample: "Sample", baseline: Optional[float], workers: int) -> float:
    """Wall time divided by the ideal ``serial / workers``."""
    return sample.seconds / (_nan_if_none(baseline) / workers)


def score_seconds(sample: "Sample", baseline: Optional[float], workers: int) -> float:
    """Plain wall seconds."""
    return sample.seconds


def score_rss_ratio(sample: "Sample", baseline: Optional[float], workers: int) -> float:
    """Peak parent RSS divided by the size of the item list."""
    return sample.extra["peak_rss"] / sample.extra["list_bytes"]


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload: how to build its cases and how to score a sample."""

    key: str
    title: str
    unit: str
    higher_is_better: bool
    build: Callable[[Settings], list[Case]]
    score: Callable[["Sample", Optional[float], int], float]
    description: str


WORKLOADS: tuple[WorkloadSpec, ...] = (
    WorkloadSpec("W1", "overhead", "items/s", True, build_w1, score_throughput,
                 "trivial work (len(item)); items per second, higher is better"),
    WorkloadSpec("W2", "CPU scaling", "speedup", True, build_w2, score_speedup,
                 "~10 ms of pure-Python work per item; speedup over the serial loop "
                 "of the same repeat, ideal = workers"),
    WorkloadSpec("W3", "big results", "MiB/s", True, build_w3, score_bytes_per_second,
                 f"each item returns {BIG_RESULT_BYTES // 1024} KiB; bytes per second "
                 "through to the caller"),
    WorkloadSpec("W4", "skew", "x ideal", False, build_w4, score_vs_ideal,
                 "first 10% of items take 50 ms, the rest 1 ms (busy loops); wall time "
                 "over serial/workers, 1.0 is ideal, lower is better"),
    WorkloadSpec("W5", "resume", "s", False, build_w5, score_seconds,
                 "second identical call over a finished run (nothing left to do); "
                 "seconds, plus the run directory's size on disk against the raw bytes"),
    WorkloadSpec("W6", "memory", "x list", False, build_w6, score_rss_ratio,
                 "peak RSS of the parent (fresh subprocess) divided by the size of the "
                 "item list, lower is better"),
)
WORKLOADS_BY_KEY: dict[str, WorkloadSpec] = {w.key: w for w in WORKLOADS}
