"""Where W2's last few percent go: nbmplock against ``Pool`` on 400 x 10 ms of Python.

    python -m bench.w2_anatomy [--repeats 7] [--workers 2] [--items 400]

(``python -m bench`` runs it too, as its ``ANATOMY`` study.)

Runs, interleaved in a seeded shuffled order each repeat:

* the serial loop (the baseline of the speedup);
* ``multiprocessing.Pool.imap_unordered`` with the ``Pool.map`` chunksize;
* ``mp_lock`` as shipped (chunks of about 0.5 s, work stealing at the tail);
* ``mp_lock`` with chunks of about 0.2 s, the default before (an ablation:
  ``TARGET_CHUNK_SECONDS`` of ``nbmplock._dispatch`` (``nbmplock._runner``
  before the engine's split) is set for the run, not a setting users have;
  the row is left out when neither module has that private name);
* ``mp_lock`` with ``Pool``'s chunk size (``chunk_size=``).

For each it reports the speedup, the CPU time of the items themselves (the
sum of ``thread_time`` measured inside the function), the parent's voluntary
context switches (its wake-ups) and the workers' involuntary ones (how often a
worker lost its core), from ``getrusage``. Writes
``bench/results/w2_anatomy.md``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from .peers import pool_map_chunksize
from . import study
from .records import ResultMismatch
from .workloads import busy_items, calibrate_loops_per_ms, loops_for_ms, spin

RESULTS = Path(__file__).resolve().parent / "results" / "w2_anatomy.md"


def timed_item(item: str) -> float:
    """Run one W2 item; return the CPU time it took."""
    started = time.thread_time()
    spin(int(item.rpartition(":")[2]))
    return time.thread_time() - started


def timed_item_nbm(item: str, shared_data, init_values) -> float:
    return timed_item(item)


def _chunk_module():
    """The nbmplock module that holds the automatic chunk length, or None."""
    import importlib

    for name in ("nbmplock._dispatch", "nbmplock._runner"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "TARGET_CHUNK_SECONDS"):
            return module
    return None


def chunk_target_settable() -> bool:
    """Whether this nbmplock still has the private chunk-length constant the ablation sets."""
    return _chunk_module() is not None


@contextlib.contextmanager
def chunk_target(seconds: float | None):
    """Run with another automatic chunk length (``None``: the shipped one)."""
    if seconds is None:
        yield
        return
    module = _chunk_module()
    saved = module.TARGET_CHUNK_SECONDS
    module.TARGET_CHUNK_SECONDS = seconds
    try:
        yield
    finally:
        module.TARGET_CHUNK_SECONDS = saved


def run_pool(items, workers, chunksize) -> list[float]:
    with multiprocessing.Pool(workers) as pool:
        return list(pool.imap_unordered(timed_item, items, chunksize=chunksize))


def run_nbm(items, workers, chunk_size=None, target=None) -> list[float]:
    import nbmplock

    received: list[float] = []

    def save(path, results, names):
        received.extend(results)

    with tempfile.TemporaryDirectory(prefix="nbmplock-w2-") as out, chunk_target(target):
        nbmplock.mp_lock(items, timed_item_nbm, save, workers, out, verbose=False,
                         chunk_size=chunk_size)
    return received


def measure(fn: Callable[[], list[float]], n_items: int) -> dict:
    """Wall time, the items' own CPU and the context switches of one run of *fn*."""
    own0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    item_cpus = fn()
    wall = time.perf_counter() - started
    own1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    if len(item_cpus) != n_items:
        raise ResultMismatch(f"{len(item_cpus):,} results for {n_items:,} items")
    return {"wall": wall, "item_cpu": sum(item_cpus),
            "parent_wakeups": own1.ru_nvcsw - own0.ru_nvcsw,
            "worker_preempted": kids1.ru_nivcsw - kids0.ru_nivcsw}


def anatomy(n_items: int, repeats: int, workers: int) -> str:
    """Run every case *repeats* times, interleaved; return the Markdown report."""
    items = busy_items(n_items, loops_for_ms(calibrate_loops_per_ms(), 10))
    chunk = pool_map_chunksize(len(items), workers)
    cases: dict[str, Callable[[], float]] = {
        "serial loop": lambda: [timed_item(i) for i in items],
        f"multiprocessing.Pool (chunksize {chunk})": lambda: run_pool(items, workers, chunk),
        "mp_lock (default chunks, about 0.5 s)": lambda: run_nbm(items, workers),
    }
    if chunk_target_settable():
        cases["mp_lock, chunks of about 0.2 s (the default before)"] = \
            lambda: run_nbm(items, workers, target=0.2)
    cases[f"mp_lock, chunk_size={chunk}"] = lambda: run_nbm(items, workers, chunk_size=chunk)
    samples: dict[str, list[dict]] = {name: [] for name in cases}
    for repeat in range(repeats):
        order = list(cases)
        random.Random(repeat).shuffle(order)
        for name in order:
            samples[name].append(measure(cases[name], len(items)))
        print(f"  anatomy repeat {repeat + 1}/{repeats} done", flush=True)

    def med(name, key):
        return statistics.median(s[key] for s in samples[name])

    serial = med("serial loop", "wall")
    lines = [
        "# W2 anatomy: nbmplock against Pool on pure-Python items",
        "",
        (f"`python -m bench.w2_anatomy --repeats {repeats} --workers {workers} --items {n_items}` "
         f"on {time.strftime('%Y-%m-%d')}: {len(items)} items of about 10 ms, "
         f"{workers} workers on {multiprocessing.cpu_count()} cores, "
         "medians of interleaved repeats."),
        "",
        "| case | speedup | items' CPU s | parent wake-ups | workers preempted |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in cases:
        lines.append(f"| {name} | {serial / med(name, 'wall'):.3f} | {med(name, 'item_cpu'):.3f} | "
                     f"{med(name, 'parent_wakeups'):.0f} | {med(name, 'worker_preempted'):.0f} |")
    if not chunk_target_settable():
        lines += ["", "The 0.2 s-chunk ablation is left out: this nbmplock has no "
                      "`TARGET_CHUNK_SECONDS` to set."]
    return "\n".join(lines) + "\n"


def regenerate(out_dir: Path, *, quick: bool, workers: int, repeats: Optional[int]) -> Path:
    """Write ``w2_anatomy.md`` into *out_dir* (``python -m bench``'s ANATOMY study)."""
    return study.regenerate(anatomy, RESULTS, out_dir, quick=quick, workers=workers,
                            repeats=repeats, items=400, quick_items=120)


def main(argv: list[str] | None = None) -> int:
    return study.main(anatomy, RESULTS, "python -m bench.w2_anatomy", __doc__, 400, argv)


if __name__ == "__main__":
    raise SystemExit(main())
