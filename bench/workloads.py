"""Work functions, item builders, calibration and sizes for the workloads.

Every work function lives at module level so that every peer (stdlib pickle,
dill, cloudpickle) can ship it to worker processes by reference.  Each one
comes in two spellings: ``fn(item)`` for the peers and
``fn(item, shared_data, init_values)`` for nbmplock.

Per-item parameters (such as a busy-loop count) travel inside the ``str``
item itself, so no worker depends on state set up in the parent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

#: Size of one W3 result.
BIG_RESULT_BYTES = 256 * 1024


# --------------------------------------------------------------------------
# Work functions (picklable by reference)
# --------------------------------------------------------------------------

def item_length(item: str) -> int:
    """W1/W5/W6: trivial work, the length of the item."""
    return len(item)


def item_length_nbm(item: str, shared_data, init_values) -> int:
    """nbmplock spelling of :func:`item_length`."""
    return len(item)


def spin(loops: int) -> int:
    """Pure-Python busy loop; its cost is linear in *loops*."""
    acc = 0
    for i in range(loops):
        acc = (acc + i * i) % 1_000_003
    return acc


def busy_item(item: str) -> int:
    """W2/W4: CPU work whose loop count is encoded as ``"<name>:<loops>"``."""
    return spin(int(item.rpartition(":")[2]))


def busy_item_nbm(item: str, shared_data, init_values) -> int:
    """nbmplock spelling of :func:`busy_item`."""
    return busy_item(item)


def big_result(item: str) -> bytes:
    """W3: return :data:`BIG_RESULT_BYTES` bytes."""
    return b"x" * BIG_RESULT_BYTES


def big_result_nbm(item: str, shared_data, init_values) -> bytes:
    """nbmplock spelling of :func:`big_result`."""
    return big_result(item)


# --------------------------------------------------------------------------
# Tallies: what the caller counts of the results it received
# --------------------------------------------------------------------------

def count_results(results: Iterable) -> int:
    """Consume *results* and return how many there were."""
    return sum(1 for _ in results)


def total_bytes(results: Iterable) -> int:
    """Consume *results* (bytes objects) and return their total length."""
    return sum(len(r) for r in results)


@dataclass(frozen=True)
class Task:
    """A work function in both spellings plus the caller-side tally."""

    plain: Callable[[str], object]
    nbm: Callable[[str, object, object], object]
    tally: Callable[[Iterable], int]


LENGTH_TASK = Task(item_length, item_length_nbm, count_results)
BUSY_TASK = Task(busy_item, busy_item_nbm, count_results)
BIG_TASK = Task(big_result, big_result_nbm, total_bytes)


# --------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------

def label_items(n: int) -> list[str]:
    """``n`` short distinct string items (W1, W5, W6)."""
    return [f"item-{i:08d}" for i in range(n)]


def busy_items(n: int, loops: int) -> list[str]:
    """``n`` items that each spin *loops* times (W2)."""
    return [f"cpu-{i:06d}:{loops}" for i in range(n)]


def skewed_items(n: int, heavy_fraction: float, heavy_loops: int, light_loops: int) -> list[str]:
    """``n`` items whose first ``heavy_fraction`` spin *heavy_loops* (W4)."""
    heavy = round(n * heavy_fraction)
    return [f"skew-{i:06d}:{heavy_loops if i < heavy else light_loops}" for i in range(n)]


# --------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------

def calibrate_loops_per_ms(probe_loops: int = 200_000, trials: int = 15) -> float:
    """How many :func:`spin` loops take one millisecond on this machine.

    Uses the fastest of *trials* timed calls after one warm-up call: the
    fastest is the one least disturbed by other processes.
    """
    spin(probe_loops)
    timings = []
    for _ in range(trials):
        start = time.perf_counter()
        spin(probe_loops)
        timings.append(time.perf_counter() - start)
    return probe_loops / (min(timings) * 1000.0)


def loops_for_ms(loops_per_ms: float, ms: float) -> int:
    """Loop count for roughly *ms* milliseconds of :func:`spin`."""
    return max(1, round(loops_per_ms * ms))


# --------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    """Item counts and per-item costs for one mode (full or quick)."""

    overhead_items: int = 200_000      # W1
    cpu_items: int = 400               # W2
    cpu_ms: float = 10.0
    big_items: int = 2_000             # W3
    skew_items: int = 200              # W4
    skew_heavy_fraction: float = 0.10
    skew_heavy_ms: float = 50.0
    skew_light_ms: float = 1.0
    resume_items: int = 1_000_000      # W5
    memory_items: int = 5_000_000      # W6

    def describe(self) -> str:
        """One-line human summary of the sizes."""
        return (
            f"W1 {self.overhead_items:,} items; W2 {self.cpu_items:,} x {self.cpu_ms:g} ms; "
            f"W3 {self.big_items:,} x {BIG_RESULT_BYTES // 1024} KiB; "
            f"W4 {self.skew_items:,} items ({self.skew_heavy_fraction:.0%} x {self.skew_heavy_ms:g} ms, "
            f"rest {self.skew_light_ms:g} ms); W5 {self.resume_items:,} items; "
            f"W6 {self.memory_items:,} items"
        )


FULL_SIZES = Sizes()
QUICK_SIZES = Sizes(
    overhead_items=50_000,
    cpu_items=120,
    big_items=800,
    resume_items=200_000,
    memory_items=1_000_000,
)
