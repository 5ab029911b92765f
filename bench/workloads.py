"""Work functions, item builders, calibration and sizes for the workloads.

Every work function lives at module level so that every peer (stdlib pickle,
dill, cloudpickle) can ship it to worker processes by reference.  Each one
comes in two spellings: ``fn(item)`` for the peers and
``fn(item, shared_data, init_values)`` for nbmplock.

Every result names its item (the item's number is in it), so the caller can
check that every item was delivered exactly once: a :class:`Task` says what
the caller keeps of each result (``keep``) and what it must have kept for
each item (``expect``, computed without doing the work).

Per-item parameters (such as a busy-loop count) travel inside the item
itself, so no worker depends on state set up in the parent.
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

#: Size of one W3 result.
BIG_RESULT_BYTES = 256 * 1024
#: How many leading bytes of a W3 result the caller keeps to check it.
BIG_PREFIX_BYTES = 32
#: Busy results are ``number * SPIN_MODULUS + spin(loops)``; spin's result is below it.
SPIN_MODULUS = 1_000_003


# --------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------

def label_items(n: int) -> list[str]:
    """``n`` short distinct string items ``item-00000042`` (W1, W3, W5, W6)."""
    return [f"item-{i:08d}" for i in range(n)]


def shuffled_label_items(n: int) -> list[str]:
    """:func:`label_items` in a shuffled order (seeded): a list nbmplock cannot
    see to be free of repeats by its order (W1 variant)."""
    items = label_items(n)
    random.Random(20261206).shuffle(items)
    return items


def int_items(n: int) -> list[int]:
    """``n`` int items ``0 .. n-1`` (W1 and W5 variants)."""
    return list(range(n))


def record_items(n: int) -> list[dict]:
    """``n`` dict items ``{"id": "item-00000042", "n": 42}`` (W1 and W5 variants, with ``key=``)."""
    return [{"id": f"item-{i:08d}", "n": i} for i in range(n)]


def busy_items(n: int, loops: int) -> list[str]:
    """``n`` items that each spin *loops* times (W2)."""
    return [f"cpu-{i:06d}:{loops}" for i in range(n)]


def skewed_items(n: int, heavy_fraction: float, heavy_loops: int, light_loops: int) -> list[str]:
    """``n`` items whose first ``heavy_fraction`` spin *heavy_loops* (W4)."""
    heavy = round(n * heavy_fraction)
    return [f"skew-{i:06d}:{heavy_loops if i < heavy else light_loops}" for i in range(n)]


# --------------------------------------------------------------------------
# Work functions (picklable by reference)
# --------------------------------------------------------------------------

def item_number(item: str) -> int:
    """W1/W5/W6: trivial work: the number of a :func:`label_items` item."""
    return int(item[5:])


def item_number_nbm(item: str, shared_data, init_values) -> int:
    """nbmplock spelling of :func:`item_number`."""
    return int(item[5:])


def int_number(item: int) -> int:
    """The int-item variant of :func:`item_number`: the item is its number."""
    return item


def int_number_nbm(item: int, shared_data, init_values) -> int:
    """nbmplock spelling of :func:`int_number`."""
    return item


def record_number(item: dict) -> int:
    """The dict-item variant of :func:`item_number`."""
    return item["n"]


def record_number_nbm(item: dict, shared_data, init_values) -> int:
    """nbmplock spelling of :func:`record_number`."""
    return item["n"]


def record_key(item: dict) -> str:
    """nbmplock ``key=`` for :func:`record_items`: the record's ``id``."""
    return item["id"]


def spin(loops: int) -> int:
    """Pure-Python busy loop; its cost is linear in *loops*."""
    acc = 0
    for i in range(loops):
        acc = (acc + i * i) % 1_000_003
    return acc


def _busy_parts(item: str) -> tuple[int, int]:
    """``(number, loops)`` of a ``"<prefix>-<number>:<loops>"`` item."""
    name, _, loops = item.rpartition(":")
    return int(name.rpartition("-")[2]), int(loops)


def busy_item(item: str) -> int:
    """W2/W4: spin the item's loop count; the result names the item."""
    number, loops = _busy_parts(item)
    return number * SPIN_MODULUS + spin(loops)


def busy_item_nbm(item: str, shared_data, init_values) -> int:
    """nbmplock spelling of :func:`busy_item`."""
    return busy_item(item)


def big_result(item: str) -> bytes:
    """W3: :data:`BIG_RESULT_BYTES` bytes that start with the item."""
    return item.encode().ljust(BIG_RESULT_BYTES, b"x")


def big_result_nbm(item: str, shared_data, init_values) -> bytes:
    """nbmplock spelling of :func:`big_result`."""
    return big_result(item)


# --------------------------------------------------------------------------
# What the caller keeps of a result, and what it must have kept per item
# --------------------------------------------------------------------------

_spin_result = functools.lru_cache(maxsize=None)(spin)  # the parent's copy; workers call spin


def expect_busy(item: str) -> int:
    """The result :func:`busy_item` gives for *item*, without spinning per item."""
    number, loops = _busy_parts(item)
    return number * SPIN_MODULUS + _spin_result(loops)


def keep_big(result: bytes) -> tuple[int, bytes]:
    """What the caller keeps of a W3 result: its length and first bytes (it drops the rest)."""
    return len(result), result[:BIG_PREFIX_BYTES]


def expect_big(item: str) -> tuple[int, bytes]:
    """:func:`keep_big` of ``big_result(item)``, without building the result."""
    encoded = item.encode()
    return max(len(encoded), BIG_RESULT_BYTES), encoded.ljust(BIG_PREFIX_BYTES, b"x")[:BIG_PREFIX_BYTES]


@dataclass(frozen=True)
class Task:
    """A work function in both spellings, and how the caller checks its results.

    ``keep(result)`` is what the caller keeps of each result it receives
    (``None``: the result itself); ``expect(item)`` is what it must have kept
    for *item*.  ``key`` is passed to nbmplock as ``key=`` (``None``: not
    passed).  ``label`` names the item kind in the results table.
    """

    plain: Callable[[Any], Any]
    nbm: Callable[[Any, Any, Any], Any]
    expect: Callable[[Any], Hashable]
    keep: Optional[Callable[[Any], Hashable]] = None
    key: Optional[Callable[[Any], str]] = None
    label: str = "str items"

    @property
    def nbm_options(self) -> dict:
        """Keyword options for nbmplock's entry points."""
        return {} if self.key is None else {"key": self.key}


NUMBER_TASK = Task(item_number, item_number_nbm, item_number)
INT_NUMBER_TASK = Task(int_number, int_number_nbm, int_number, label="int items")
SHUFFLED_NUMBER_TASK = Task(item_number, item_number_nbm, item_number, label="shuffled str items")
RECORD_NUMBER_TASK = Task(record_number, record_number_nbm, record_number, key=record_key,
                          label="dict items + key=")
BUSY_TASK = Task(busy_item, busy_item_nbm, expect_busy)
BIG_TASK = Task(big_result, big_result_nbm, expect_big, keep=keep_big)


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
    memory_items: int = 10_000_000     # W6 (issue 15: a 10,000,000-item generator)

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
