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
* :class:`InterruptCase` (INT) times Ctrl-C with every worker busy
  (:mod:`bench.interrupt_latency`).

Around every timed call the case reads the wall clock and the benchmark
process's own CPU time (``time.process_time``: user + system of all its
threads, not of the worker processes).  After the timer stopped it checks
the delivery (:mod:`bench.delivery`): a run that did not deliver every item
exactly once raises :class:`ResultMismatch` and is not timed.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import pickle
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from . import delivery, interrupt_latency, memprobe, nbm, peers
from .delivery import Receiver
from .records import Measurement, Outcome, Runner, Sample
from .workloads import (
    BIG_RESULT_BYTES,
    BIG_TASK,
    BUSY_TASK,
    INT_NUMBER_TASK,
    NUMBER_TASK,
    RECORD_NUMBER_TASK,
    SHUFFLED_NUMBER_TASK,
    Sizes,
    Task,
    busy_items,
    int_items,
    label_items,
    loops_for_ms,
    record_items,
    shuffled_label_items,
    skewed_items,
)


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


class ItemSet:
    """The items of one workload (built on first use, shared by its cases) and what they must give."""

    def __init__(self, n: int, build: Callable[[int], list], task: Task) -> None:
        self.n = n
        self.task = task
        self._build = build

    @functools.cached_property
    def items(self) -> list:
        return self._build(self.n)

    @functools.cached_property
    def expected(self) -> Counter:
        """What a caller must have kept of the results (see :mod:`bench.delivery`)."""
        return delivery.expected_multiset(self.task, self.items)


def timed_call(call: Callable[[], Optional[Outcome]]) -> tuple[float, float, Optional[Outcome]]:
    """``(wall seconds, parent CPU seconds, outcome)`` of *call*, a one-off set-up taken out."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    outcome = call()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if outcome is not None and outcome.one_off is not None:
        wall -= outcome.one_off.seconds
        cpu -= outcome.one_off.cpu_seconds
    return wall, cpu, outcome


def one_off_extra(outcome: Optional[Outcome]) -> dict:
    """The one-off set-up's seconds under its label, for the sample's extras."""
    if outcome is None or outcome.one_off is None:
        return {}
    return {outcome.one_off.label: outcome.one_off.seconds}


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


class RunnerRow(Case):
    """A case whose row is its runner's: the runner's library, role and problem."""

    runner: Runner

    @property
    def library(self) -> str:
        return self.runner.library

    @property
    def role(self) -> str:
        return self.runner.role

    def problem(self) -> Optional[str]:
        return self.runner.problem()


@dataclass(eq=False)
class RunnerCase(RunnerRow):
    """A case that runs a :class:`Runner` over an :class:`ItemSet`."""

    workload: str
    runner: Runner
    item_set: ItemSet
    workers: int
    scratch_root: Path

    @property
    def note(self) -> str:
        return self.runner.note

    @property
    def n_items(self) -> int:
        return self.item_set.n

    def setup(self) -> None:
        self.item_set.expected  # build the items and their expected results, untimed

    def call(self, scratch: Path, receiver: Receiver) -> Callable[[], Optional[Outcome]]:
        """The timed call: the runner over the items, in *scratch*."""
        return functools.partial(self.runner.run, self.item_set.task, self.item_set.items, self.workers,
                                 scratch, receiver)


@dataclass(eq=False)
class MapCase(RunnerCase):
    """Time one map call of the runner over fresh scratch (W1-W4)."""

    def run(self) -> Measurement:
        receiver = Receiver(self.item_set.task)
        try:
            with scratch_dir(self.scratch_root) as scratch:
                seconds, cpu, outcome = timed_call(self.call(scratch, receiver))
        finally:
            if self.runner.after:
                self.runner.after(self.workers)
        checked = delivery.check(receiver, outcome, self.item_set.expected, fresh=True)
        return Measurement(seconds, cpu, {"delivery": checked, **one_off_extra(outcome)})


@dataclass(eq=False)
class ResumeCase(RunnerCase):
    """Time a second, identical nbmplock call over an already finished run (W5)."""

    _run_dir: Optional[Path] = field(default=None, init=False)
    _extra: dict = field(default_factory=dict, init=False)

    @property
    def note(self) -> str:
        return "prepared once (untimed); every repeat resumes the same finished run"

    def setup(self) -> None:
        super().setup()
        self._run_dir = Path(tempfile.mkdtemp(prefix="nbmplock-bench-resume-", dir=self.scratch_root))
        receiver = Receiver(self.item_set.task)
        seconds, _, outcome = timed_call(self.call(self._run_dir, receiver))
        delivery.check(receiver, outcome, self.item_set.expected, fresh=True)
        self._extra = {"prepare_seconds": seconds, "raw_bytes": raw_bytes(self.item_set)}

    def run(self) -> Measurement:
        receiver = Receiver(self.item_set.task)
        seconds, cpu, outcome = timed_call(self.call(self._run_dir, receiver))
        checked = delivery.check(receiver, outcome, self.item_set.expected, fresh=False)
        allocated, apparent = nbm.disk_usage(self._run_dir)
        return Measurement(seconds, cpu, dict(self._extra, delivery=checked, disk_bytes=allocated,
                                              apparent_bytes=apparent))

    def teardown(self) -> None:
        if self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)


def key_text(task: Task, item: Any) -> str:
    """The text an item is known by: its ``key=``, the ``str`` item itself, or its ``repr``."""
    if task.key is not None:
        return task.key(item)
    return item if isinstance(item, str) else repr(item)


def raw_bytes(item_set: ItemSet) -> int:
    """Bytes of the items' keys (UTF-8) plus their pickled results: what a run directory must hold."""
    task = item_set.task
    return sum(len(key_text(task, item).encode("utf-8")) + len(pickle.dumps(task.plain(item)))
               for item in item_set.items)


@dataclass(eq=False)
class MemoryCase(RunnerRow):
    """Peak parent RSS of one map over ``n_items`` in a fresh subprocess (W6)."""

    probe: str
    runner: Runner
    n_items: int
    workers: int
    scratch_root: Path
    timeout: Optional[float]
    note: str = "fresh subprocess per run; trivial function"
    workload: str = "W6"

    @property
    def library(self) -> str:
        suffix = ", generator" if self.probe in memprobe.GENERATOR_PROBES else ""
        return self.runner.library + suffix

    def run(self) -> Measurement:
        with scratch_dir(self.scratch_root) as scratch:
            result = memprobe.measure(self.probe, self.n_items, self.workers, scratch, self.timeout)
        return Measurement(result.pop("seconds"), result.pop("parent_cpu"), result)


@dataclass(eq=False)
class InterruptCase(Case):
    """Seconds from SIGINT to a script's exit, workers included, with every worker busy (INT)."""

    workers: int
    scratch_root: Path
    workload: str = "INT"
    library: str = "nbmplock mp_lock"
    role: str = "nbmplock"
    note: str = "a script in a subprocess, every worker in a 5 s item; SIGINT to its exit, workers gone"
    n_items: int = 0

    def problem(self) -> Optional[str]:
        return nbm.nbmplock_problem("mp_lock") or peers.module_problem("psutil")

    def run(self) -> Measurement:
        with scratch_dir(self.scratch_root) as scratch:
            return Measurement(interrupt_latency.measure_once(scratch, self.workers))


# --------------------------------------------------------------------------
# Workloads and their libraries
# --------------------------------------------------------------------------

#: The nbmplock rows of the map workloads; ``mp_lock_value`` (results back) is the headline.
NBM_MAP_ROWS: tuple[Runner, ...] = (nbm.MP_LOCK_VALUE, nbm.MP_LOCK_SAVING, nbm.MP_LOCK, nbm.JOB_PANEL)

MAP_LIBRARIES: dict[str, tuple[Runner, ...]] = {
    "W1": (*peers.MAP_PEERS, *NBM_MAP_ROWS),
    "W2": (peers.SERIAL, *peers.MAP_PEERS, *NBM_MAP_ROWS),
    "W3": (*peers.MAP_PEERS, nbm.MP_LOCK_VALUE, nbm.MP_LOCK_SAVING),
    "W4": (peers.SERIAL, *peers.MAP_PEERS, *NBM_MAP_ROWS),
}
#: W1 and W5 again with items that are not ``str`` (skipped while nbmplock refuses them).
KEYED_VARIANTS: tuple[tuple[Task, Callable[[int], list]], ...] = (
    (INT_NUMBER_TASK, int_items),
    (RECORD_NUMBER_TASK, record_items),
)
W1_KEYED: dict[str, Runner] = {
    INT_NUMBER_TASK.label: nbm.MP_LOCK_VALUE_INT,
    RECORD_NUMBER_TASK.label: nbm.MP_LOCK_VALUE_RECORD,
    SHUFFLED_NUMBER_TASK.label: nbm.MP_LOCK_VALUE_SHUFFLED,
}
#: W1 again with W1's str items shuffled: the list's order no longer shows that it
#: has no repeats (nbmplock then finds them with a set of the keys).
W1_ONLY_VARIANTS: tuple[tuple[Task, Callable[[int], list]], ...] = (
    (SHUFFLED_NUMBER_TASK, shuffled_label_items),
)
RESUME_LIBRARIES: dict[str, tuple[Runner, ...]] = {
    NUMBER_TASK.label: (nbm.MP_LOCK, nbm.MP_LOCK_VALUE),
    INT_NUMBER_TASK.label: (nbm.MP_LOCK_INT, nbm.MP_LOCK_VALUE_INT),
    RECORD_NUMBER_TASK.label: (nbm.MP_LOCK_RECORD, nbm.MP_LOCK_VALUE_RECORD),
}


def _map_cases(key: str, item_set: ItemSet, s: Settings) -> list[Case]:
    return [MapCase(key, runner, item_set, s.workers, s.scratch_root) for runner in MAP_LIBRARIES[key]]


def build_w1(s: Settings) -> list[Case]:
    """W1 overhead: trivial work on many items (and the same with int and dict items)."""
    n = s.sizes.overhead_items
    cases = _map_cases("W1", ItemSet(n, label_items, NUMBER_TASK), s)
    for task, build in (*KEYED_VARIANTS, *W1_ONLY_VARIANTS):
        cases.append(MapCase("W1", W1_KEYED[task.label], ItemSet(n, build, task), s.workers, s.scratch_root))
    return cases


def build_w2(s: Settings) -> list[Case]:
    """W2 CPU scaling: ~``cpu_ms`` of pure-Python work per item."""
    loops = loops_for_ms(s.loops_per_ms, s.sizes.cpu_ms)
    return _map_cases("W2", ItemSet(s.sizes.cpu_items, functools.partial(busy_items, loops=loops), BUSY_TASK), s)


def build_w3(s: Settings) -> list[Case]:
    """W3 big results: every item returns ``BIG_RESULT_BYTES``."""
    return _map_cases("W3", ItemSet(s.sizes.big_items, label_items, BIG_TASK), s)


def build_w4(s: Settings) -> list[Case]:
    """W4 skew: the first items are much slower than the rest."""
    z = s.sizes
    build = functools.partial(
        skewed_items,
        heavy_fraction=z.skew_heavy_fraction,
        heavy_loops=loops_for_ms(s.loops_per_ms, z.skew_heavy_ms),
        light_loops=loops_for_ms(s.loops_per_ms, z.skew_light_ms),
    )
    return _map_cases("W4", ItemSet(z.skew_items, build, BUSY_TASK), s)


def build_w5(s: Settings) -> list[Case]:
    """W5 resume: a second call over a finished run, with str, int and dict items."""
    n = s.sizes.resume_items
    cases: list[Case] = []
    for task, build in ((NUMBER_TASK, label_items), *KEYED_VARIANTS):
        item_set = ItemSet(n, build, task)
        cases += [ResumeCase("W5", runner, item_set, s.workers, s.scratch_root)
                  for runner in RESUME_LIBRARIES[task.label]]
    return cases


def build_w6(s: Settings) -> list[Case]:
    """W6 memory: peak parent RSS against the size of the item list."""
    common = dict(n_items=s.sizes.memory_items, workers=s.workers, scratch_root=s.scratch_root,
                  timeout=s.timeout)
    return [
        MemoryCase("mp_lock", nbm.MP_LOCK, **common),
        MemoryCase("mp_lock-generator", nbm.MP_LOCK,
                   note="fresh subprocess per run; items given as a one-shot generator", **common),
        MemoryCase("multiprocess", peers.MULTIPROCESS_CHUNKED, note="reference; fresh subprocess per run",
                   **common),
    ]


def build_int(s: Settings) -> list[Case]:
    """INT: Ctrl-C with every worker busy."""
    return [InterruptCase(s.workers, s.scratch_root)]


# --------------------------------------------------------------------------
# Scores: one number per sample
# --------------------------------------------------------------------------

def _nan_if_none(value: Optional[float]) -> float:
    return math.nan if value is None else value


def score_throughput(sample: Sample, baseline: Optional[float], workers: int) -> float:
    """Items per second."""
    return sample.n_items / sample.seconds


def score_speedup(sample: Sample, baseline: Optional[float], workers: int) -> float:
    """Serial time of the same repeat divided by this run's time."""
    return _nan_if_none(baseline) / sample.seconds


def score_bytes_per_second(sample: Sample, baseline: Optional[float], workers: int) -> float:
    """Result bytes delivered to the caller per second (every one checked)."""
    return sample.n_items * BIG_RESULT_BYTES / sample.seconds


def score_vs_ideal(sample: Sample, baseline: Optional[float], workers: int) -> float:
    """Wall time divided by the ideal ``serial / workers``."""
    return sample.seconds / (_nan_if_none(baseline) / workers)


def score_seconds(sample: Sample, baseline: Optional[float], workers: int) -> float:
    """Plain wall seconds."""
    return sample.seconds


def score_rss_ratio(sample: Sample, baseline: Optional[float], workers: int) -> float:
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
    score: Callable[[Sample, Optional[float], int], float]
    description: str


WORKLOADS: tuple[WorkloadSpec, ...] = (
    WorkloadSpec("W1", "overhead", "items/s", True, build_w1, score_throughput,
                 "trivial work (the number in the item's label); items per second, higher is "
                 "better; also with int items, with dict items + `key=`, and with the str "
                 "items shuffled (their order no longer shows they have no repeats)"),
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
                 "seconds, plus the run directory's size on disk against the raw bytes; "
                 "also with int items and with dict items + `key=`"),
    WorkloadSpec("W6", "memory", "x list", False, build_w6, score_rss_ratio,
                 "peak RSS of the parent (fresh subprocess) divided by the size of the "
                 "item list, lower is better"),
    WorkloadSpec("INT", "Ctrl-C", "s", False, build_int, score_seconds,
                 "SIGINT to a script whose every worker is in a 5 s item: seconds until the "
                 "script and its workers are gone, lower is better"),
)
WORKLOADS_BY_KEY: dict[str, WorkloadSpec] = {w.key: w for w in WORKLOADS}
