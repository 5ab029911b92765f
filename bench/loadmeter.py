"""How much CPU *other* processes took while a workload ran.

The benchmark assumes it has the machine to itself.  This compares the
machine-wide busy CPU time (including hypervisor steal) with the CPU time of
this process and its children -- reaped ones, and live ones such as a Dask
cluster's workers; the difference, as a share of all cores over the wall
time, is load the benchmark did not cause.  CPU-bound results (W2, W4) are
skewed when it is high.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Optional

#: Foreign load above this share of all cores gets a warning in the report.
WARN_SHARE = 0.10


@dataclass(frozen=True)
class CpuReading:
    """Machine-wide busy CPU seconds and our own CPU seconds at one instant."""

    wall: float
    busy: float
    own: float


def own_cpu_seconds() -> float:
    """User + system CPU of this process and all its children, reaped or alive.

    A live child's own reaped children count too (``children_user`` and
    ``children_system``): that is where their time goes once the child is
    reaped and appears in ``RUSAGE_CHILDREN``.
    """
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    try:
        import psutil
    except ImportError:
        return total
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:  # gone meanwhile: counted once reaped, or lost
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def read_cpu() -> Optional[CpuReading]:
    """A reading now, or ``None`` without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    t = psutil.cpu_times()
    fields = ("user", "nice", "system", "irq", "softirq", "steal")
    busy = sum(getattr(t, name, 0.0) for name in fields)
    return CpuReading(time.monotonic(), busy, own_cpu_seconds())


def foreign_share(start: Optional[CpuReading], end: Optional[CpuReading]) -> Optional[float]:
    """Share of all cores used by other processes between two readings."""
    if start is None or end is None or end.wall <= start.wall:
        return None
    capacity = (end.wall - start.wall) * (os.cpu_count() or 1)
    foreign = (end.busy - start.busy) - (end.own - start.own)
    return min(1.0, max(0.0, foreign / capacity))
