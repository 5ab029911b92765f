"""nbmplock on Dask against Dask's own ``client.map``, on a LocalCluster.

``python -m bench.dask_bench [--quick] [--repeats N] [--workers N] [--out FILE]`` from the
repository root; the table is printed and written to ``bench/results/dask.md``.
(``python -m bench`` runs it too, as its ``DASK`` study, when ``distributed`` is installed.)

For W1 (trivial items), W2 (~10 ms pure-Python CPU per item) and W4 (skewed:
the first 10% of items 50 ms, the rest 1 ms), at the sizes of ``python -m bench``,
it times, on one ``LocalCluster(n_workers=workers, threads_per_worker=1, processes=True)``
(2 workers unless ``--workers`` says otherwise):

* **plain Dask**: ``client.map`` over batches of ``B`` items (each task runs
  the batch in a list comprehension), then ``client.gather``; results flattened.
  This is the code a Dask user writes, and the reference of the targets;
* **plain Dask, tuned**: the same, but each batch goes in and its results come
  back as one pickle (Dask handles a large list argument or result element by
  element, which costs it ~0.1-0.2 s per 10,000 elements; nbmplock's tasks do
  the same trick);
* **nbmplock**: ``mp_lock_value(items, fn, None, None, out_path, backend=client,
  chunk_size=B)``: the same batches, plus a run directory on disk, the done
  records, results in item order, stop/resume machinery;
* **nbmplock, adaptive chunks**: the same without ``chunk_size`` (what a user
  gets by default; W2's target is checked on it too).

Every run starts from submission and ends with every result in the driver;
after the timer the results are checked as in ``python -m bench``
(:mod:`bench.delivery`: the exact multiset), and a run that fails the check is
not timed.  Repeats are interleaved (repeat 1 of every variant, then repeat 2, ...; the
order rotates each repeat) so machine drift hits all alike. Medians are
reported with min-max. Targets (issue 7): W1 nbmplock within 1.3x of plain
Dask; W2 speedup at least 0.9 x ideal (ideal = the workers; the serial time is
measured in this process, each repeat).  Other processes' CPU use is read
with :mod:`bench.loadmeter`.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import delivery
from .loadmeter import WARN_SHARE, foreign_share, read_cpu
from .records import ResultMismatch
from .workloads import (BUSY_TASK, FULL_SIZES, NUMBER_TASK, QUICK_SIZES, Task, busy_items,
                        calibrate_loops_per_ms, label_items, loops_for_ms, skewed_items)

RESULTS = Path(__file__).resolve().parent / "results" / "dask.md"


# -- what runs on the workers (module level: pickled by reference) -------------------

def run_batch(fn: Callable[[str], object], batch: list) -> list:
    """Plain: one task runs a batch in a list comprehension."""
    return [fn(item) for item in batch]


def run_blob(fn: Callable[[str], object], blob: bytes) -> bytes:
    """Tuned: the batch in and the results out as one pickle each, opaque to Dask."""
    return pickle.dumps([fn(item) for item in pickle.loads(blob)],
                        protocol=pickle.HIGHEST_PROTOCOL)


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    items: list
    task: Task
    batch: int
    cpu_bound: bool

    @functools.cached_property
    def expected(self) -> Counter:
        return delivery.expected_multiset(self.task, self.items)


@dataclass
class Timing:
    seconds: list = field(default_factory=list)
    errors: list = field(default_factory=list)

    @property
    def median(self) -> Optional[float]:
        return statistics.median(self.seconds) if self.seconds else None

    def span(self) -> str:
        if not self.seconds:
            return "—"
        return f"{self.median:.3f} ({min(self.seconds):.3f}–{max(self.seconds):.3f})"


# -- the variants -------------------------------------------------------------------------

def plain_dask(client, w: Workload, scratch: str) -> list:
    batches = [w.items[i:i + w.batch] for i in range(0, len(w.items), w.batch)]
    futures = client.map(functools.partial(run_batch, w.task.plain), batches, pure=False)
    results = [r for part in client.gather(futures) for r in part]
    del futures
    return results


def plain_dask_tuned(client, w: Workload, scratch: str) -> list:
    blobs = [pickle.dumps(w.items[i:i + w.batch], protocol=pickle.HIGHEST_PROTOCOL)
             for i in range(0, len(w.items), w.batch)]
    futures = client.map(functools.partial(run_blob, w.task.plain), blobs, pure=False)
    results = [r for part in client.gather(futures) for r in pickle.loads(part)]
    del futures
    return results


def nbmplock_fixed(client, w: Workload, scratch: str) -> list:
    import nbmplock
    return nbmplock.mp_lock_value(w.items, w.task.nbm, None, None, scratch, backend=client,
                                  chunk_size=w.batch, verbose=False)


def nbmplock_adaptive(client, w: Workload, scratch: str) -> list:
    import nbmplock
    return nbmplock.mp_lock_value(w.items, w.task.nbm, None, None, scratch, backend=client,
                                  verbose=False)


VARIANTS: list[tuple[str, Callable]] = [
    ("plain Dask client.map + gather", plain_dask),
    ("plain Dask, tuned: batches and results pickled", plain_dask_tuned),
    ("nbmplock mp_lock_value, same batches", nbmplock_fixed),
    ("nbmplock mp_lock_value, adaptive chunks", nbmplock_adaptive),
]


def serial_seconds(w: Workload) -> float:
    start = time.perf_counter()
    for item in w.items:
        w.task.plain(item)
    return time.perf_counter() - start


# -- the run ----------------------------------------------------------------------------

def build(quick: bool, loops_per_ms: float) -> list[Workload]:
    """W1, W2 and W4 at the sizes of ``python -m bench`` (quick or full)."""
    z = QUICK_SIZES if quick else FULL_SIZES
    ms = functools.partial(loops_for_ms, loops_per_ms)
    heavy = f"{z.skew_heavy_fraction:.0%} x {z.skew_heavy_ms:g} ms, rest {z.skew_light_ms:g} ms"
    return [
        Workload("W1", f"{z.overhead_items:,} trivial items", label_items(z.overhead_items),
                 NUMBER_TASK, 10_000, False),
        Workload("W2", f"{z.cpu_items} items x {z.cpu_ms:g} ms CPU", busy_items(z.cpu_items, ms(z.cpu_ms)),
                 BUSY_TASK, 5, True),
        Workload("W4", f"{z.skew_items} items: {heavy}",
                 skewed_items(z.skew_items, z.skew_heavy_fraction, ms(z.skew_heavy_ms), ms(z.skew_light_ms)),
                 BUSY_TASK, 5, True),
    ]


def measure(quick: bool, repeats: int, workers: int) -> str:
    """Start a LocalCluster, run every variant *repeats* times, interleaved; return the report."""
    import logging

    import distributed
    logging.getLogger("distributed").setLevel(logging.ERROR)

    loops_per_ms = calibrate_loops_per_ms()
    workloads = build(quick, loops_per_ms)
    root = tempfile.mkdtemp(prefix="nbmplock-dask-bench-")
    timings = {(w.key, name): Timing() for w in workloads for name, _ in VARIANTS}
    serial = {w.key: Timing() for w in workloads}
    load: list[float] = []
    started = time.monotonic()
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                       processes=True, host="127.0.0.1", dashboard_address=None)
    client = distributed.Client(cluster)
    try:
        client.wait_for_workers(workers)
        # Warm up: imports on the workers, first connections.
        for w in workloads:
            small = Workload(w.key, w.title, w.items[:20], w.task, w.batch, w.cpu_bound)
            for _, run in VARIANTS:
                run(client, small, tempfile.mkdtemp(dir=root))
        for repeat in range(repeats):
            for w in workloads:
                w.expected  # built before the first timing
                if w.cpu_bound:
                    serial[w.key].seconds.append(serial_seconds(w))
                order = VARIANTS[repeat % len(VARIANTS):] + VARIANTS[:repeat % len(VARIANTS)]
                before = read_cpu()
                for name, run in order:
                    scratch = tempfile.mkdtemp(dir=root)
                    t0 = time.perf_counter()
                    try:
                        results = run(client, w, scratch)
                        seconds = time.perf_counter() - t0
                        delivery.check_results(results, w.expected)
                    except ResultMismatch as exc:
                        timings[(w.key, name)].errors.append(f"FAILED delivery check: {exc}")
                        continue
                    except Exception as exc:  # noqa: BLE001 - report, go on
                        timings[(w.key, name)].errors.append(f"{type(exc).__name__}: {exc}")
                        continue
                    finally:
                        shutil.rmtree(scratch, ignore_errors=True)
                    timings[(w.key, name)].seconds.append(seconds)
                share = foreign_share(before, read_cpu())
                if share is not None:
                    load.append(share)
                print(f"  dask repeat {repeat + 1}/{repeats} {w.key} done", file=sys.stderr, flush=True)
    finally:
        client.close()
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    return report(workloads, timings, serial, load, loops_per_ms, repeats, workers,
                  time.monotonic() - started, distributed.__version__)


def distributed_problem() -> Optional[str]:
    """Why the Dask study cannot run here, or ``None``."""
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        return f"distributed is not installed ({exc}); pip install nbmplock[dask]"
    return None


def regenerate(out_dir: Path, *, quick: bool, workers: int, repeats: Optional[int]) -> Path:
    """Write ``dask.md`` into *out_dir* (``python -m bench``'s DASK study)."""
    text = measure(quick, repeats or 3, workers)
    path = out_dir / RESULTS.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dask_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the sizes of python -m bench --quick")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes (default 2)")
    parser.add_argument("--out", default=os.fspath(RESULTS),
                        help="Markdown file for the table (default bench/results/dask.md; "
                             "'-' for standard output only)")
    args = parser.parse_args(argv)
    table = measure(args.quick, args.repeats, args.workers)
    print(table)
    if args.out != "-":
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(table + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def report(workloads, timings, serial, load, loops_per_ms, repeats, workers, wall, version) -> str:
    lines = [
        "## nbmplock on Dask vs Dask's own client.map",
        "",
        f"- LocalCluster: {workers} worker processes x 1 thread, 127.0.0.1; distributed {version}; "
        f"Python {sys.version.split()[0]}; {os.cpu_count()} logical cores",
        f"- {repeats} repeats, interleaved, order rotated; median (min–max) wall seconds "
        f"from submission to every result in the driver, every result checked (exact multiset); "
        f"calibration {loops_per_ms:,.0f} loops/ms; total {wall:.0f} s",
    ]
    if load:
        lines.append(f"- other processes' CPU while measuring: median {statistics.median(load):.0%} "
                     f"of all cores (max {max(load):.0%})"
                     + (" — **the machine was not idle; CPU-bound numbers are skewed**"
                        if max(load) > WARN_SHARE else ""))
    lines += [
        "",
        "| Workload | Variant | batch | Wall s: median (min–max) | vs plain Dask | vs tuned Dask | speedup vs serial (x ideal) | Target | Check |",
        "|---|---|---:|---|---:|---:|---|---|---|",
    ]
    for w in workloads:
        plain = timings[(w.key, VARIANTS[0][0])].median
        tuned = timings[(w.key, VARIANTS[1][0])].median
        serial_s = serial[w.key].median
        for name, _ in VARIANTS:
            t = timings[(w.key, name)]
            if t.errors and not t.seconds:
                lines.append(f"| {w.key} | {name} | | error: {t.errors[0][:80]} | | | | | |")
                continue
            ratio = t.median / plain if plain and t.median else None
            ratio_tuned = t.median / tuned if tuned and t.median else None
            batch = "adaptive" if "adaptive" in name else f"{w.batch:,}"
            speed = ""
            if serial_s and t.median:
                s = serial_s / t.median
                speed = f"{s:.2f}x ({s / workers:.2f})"
            target = check = ""
            if name == VARIANTS[2][0] and w.key == "W1" and ratio is not None:
                target, check = "≤1.3x plain Dask", "PASS" if ratio <= 1.3 else "MISS"
            # W2's target is nbmplock's own speedup: checked with the batches of
            # plain Dask and with the adaptive chunks a user gets by default.
            if name in (VARIANTS[2][0], VARIANTS[3][0]) and w.key == "W2" and serial_s \
                    and t.median:
                ok = serial_s / t.median >= 0.9 * workers
                target, check = "≥0.9 x ideal speedup", "PASS" if ok else "MISS"
            lines.append(f"| {w.key} {w.title} | {name} | {batch} | {t.span()} | "
                         f"{'' if ratio is None else f'{ratio:.2f}x'} | "
                         f"{'' if ratio_tuned is None else f'{ratio_tuned:.2f}x'} | "
                         f"{speed} | {target} | {check} |")
        if serial_s:
            lines.append(f"| {w.key} | serial loop in the driver | — | {serial[w.key].span()} | | | "
                         f"1.00x ({1 / workers:.2f}) | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
