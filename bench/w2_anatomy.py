"""Where W2's last few percent go: nbmplock against ``Pool`` on 400 x 10 ms of Python.

    python -m bench.w2_anatomy [--repeats 7] [--workers 2]

Runs, interleaved in a seeded shuffled order each repeat:

* the serial loop (the baseline of the speedup);
* ``multiprocessing.Pool.imap_unordered`` with the ``Pool.map`` chunksize;
* ``mp_lock`` as shipped (chunks of about 0.5 s, work stealing at the tail);
* ``mp_lock`` with chunks of about 0.2 s, the default before (an ablation:
  ``TARGET_CHUNK_SECONDS`` is set for the run, not a setting users have);
* ``mp_lock`` with ``Pool``'s chunk size (``chunk_size=``).

For each it reports the speedup, the CPU time of the items themselves (the
sum of ``thread_time`` measured inside the function), the parent's voluntary
context switches (its wake-ups) and the workers' involuntary ones (how often a
worker lost its core), from ``getrusage``. Writes
``bench/results/w2_anatomy.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

from .peers import pool_map_chunksize
from .workloads import calibrate_loops_per_ms, spin

RESULTS = Path(__file__).resolve().parent / "results" / "w2_anatomy.md"


def timed_item(item: str) -> float:
    """Run one W2 item; return the CPU time it took."""
    started = time.thread_time()
    spin(int(item.rpartition(":")[2]))
    return time.thread_time() - started


def timed_item_nbm(item: str, shared_data, init_values) -> float:
    return timed_item(item)


@contextlib.contextmanager
def chunk_target(seconds: float | None):
    """Run with another automatic chunk length (``None``: the shipped one)."""
    import nbmplock._runner as runner

    saved = runner.TARGET_CHUNK_SECONDS
    if seconds is not None:
        runner.TARGET_CHUNK_SECONDS = seconds
    try:
        yield
    finally:
        runner.TARGET_CHUNK_SECONDS = saved


def run_pool(items, workers, chunksize):
    with multiprocessing.Pool(workers) as pool:
        return sum(pool.imap_unordered(timed_item, items, chunksize=chunksize))


def run_nbm(items, workers, chunk_size=None, target=None):
    import nbmplock

    total = [0.0]

    def save(path, results, names):
        total[0] += sum(results)

    with tempfile.TemporaryDirectory(prefix="nbmplock-w2-") as out, chunk_target(target):
        nbmplock.mp_lock(items, timed_item_nbm, save, workers, out, verbose=False,
                         chunk_size=chunk_size)
    return total[0]


def measure(fn) -> dict:
    own0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    item_cpu = fn()
    wall = time.perf_counter() - started
    own1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": wall, "item_cpu": item_cpu,
            "parent_wakeups": own1.ru_nvcsw - own0.ru_nvcsw,
            "worker_preempted": kids1.ru_nivcsw - kids0.ru_nivcsw}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.w2_anatomy", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--items", type=int, default=400)
    args = parser.parse_args(argv)

    loops = int(calibrate_loops_per_ms() * 10)
    items = [f"cpu-{i:06d}:{loops}" for i in range(args.items)]
    chunk = pool_map_chunksize(len(items), args.workers)
    cases = {
        "serial loop": lambda: sum(timed_item(i) for i in items),
        f"multiprocessing.Pool (chunksize {chunk})": lambda: run_pool(items, args.workers, chunk),
        "mp_lock (default chunks, about 0.5 s)": lambda: run_nbm(items, args.workers),
        "mp_lock, chunks of about 0.2 s (the default before)":
            lambda: run_nbm(items, args.workers, target=0.2),
        f"mp_lock, chunk_size={chunk}": lambda: run_nbm(items, args.workers, chunk_size=chunk),
    }
    samples: dict[str, list[dict]] = {name: [] for name in cases}
    for repeat in range(args.repeats):
        order = list(cases)
        random.Random(repeat).shuffle(order)
        for name in order:
            samples[name].append(measure(cases[name]))
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    def med(name, key):
        return statistics.median(s[key] for s in samples[name])

    serial = med("serial loop", "wall")
    lines = [
        "# W2 anatomy: nbmplock against Pool on pure-Python items",
        "",
        (f"`python -m bench.w2_anatomy --repeats {args.repeats} --workers {args.workers}` "
         f"on {time.strftime('%Y-%m-%d')}: {len(items)} items of about 10 ms, "
         f"{args.workers} workers on {multiprocessing.cpu_count()} cores, "
         "medians of interleaved repeats."),
        "",
        "| case | speedup | items' CPU s | parent wake-ups | workers preempted |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in cases:
        lines.append(f"| {name} | {serial / med(name, 'wall'):.3f} | {med(name, 'item_cpu'):.3f} | "
                     f"{med(name, 'parent_wakeups'):.0f} | {med(name, 'worker_preempted'):.0f} |")
    text = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text, encoding="utf-8")
    print(text + f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
