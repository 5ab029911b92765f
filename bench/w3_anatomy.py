"""What W3's durable results cost: ``mp_lock_value`` with parts of its storage taken out.

    python -m bench.w3_anatomy [--repeats 7] [--workers 2] [--items 2000]

(``python -m bench`` runs it too, as its ``W3ANATOMY`` study.)

Runs, interleaved in a seeded shuffled order each repeat, over W3's items
(each returns 256 KiB):

* mpire ``map_unordered``, the best peer of W3 on some machines;
* ``mp_lock_value`` as shipped: every result is read, kept, written to the
  run directory's log and synced (``fdatasync``, group commit);
* the same without ``fdatasync`` (an ablation: the run store's
  ``os.fdatasync`` is replaced for the run);
* the same without ``fdatasync`` and without writing the results to the log
  (a second ablation: SPAN records then carry no results; such a run
  directory could not give them back, so it is thrown away);
* as shipped but with a fresh buffer for every results message (a third
  ablation: the engine's reuse of a worker's earlier message buffer is
  turned off), which shows what that reuse saves.

The ablations set private names of nbmplock for the run, not settings users
have; a row is left out when those names are gone. Every run of every case is
checked to have delivered every item's result exactly once. Reports the median
wall time, its ratio to mpire's, and the parent's CPU per item. Writes
``bench/results/w3_anatomy.md``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import resource
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

from . import study
from .records import ResultMismatch
from .workloads import BIG_RESULT_BYTES, big_result, big_result_nbm, expect_big, keep_big, label_items

RESULTS = Path(__file__).resolve().parent / "results" / "w3_anatomy.md"


class _NoSync:
    """The ``os`` module as the run store sees it, with ``fdatasync`` doing nothing."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    @staticmethod
    def fdatasync(fd: int) -> None:
        return None


def ablations_possible() -> bool:
    """Whether this nbmplock still has the private names the ablations set."""
    try:
        import nbmplock._store as store
    except ImportError:
        return False
    return hasattr(store, "os") and hasattr(store, "span_record")


def buffer_ablation_possible() -> bool:
    """Whether this nbmplock reuses results buffers (``_engine._spare_buffer``)."""
    try:
        import nbmplock._engine as engine
    except ImportError:
        return False
    return hasattr(engine, "_spare_buffer")


@contextlib.contextmanager
def fresh_buffers():
    """Run with a fresh buffer for every results message (no reuse)."""
    import nbmplock._engine as engine

    saved = engine._spare_buffer
    engine._spare_buffer = lambda worker: None
    try:
        yield
    finally:
        engine._spare_buffer = saved


@contextlib.contextmanager
def ablated(no_sync: bool, no_results_written: bool):
    """Run with the run store's fdatasync and/or its writing of results taken out."""
    if not (no_sync or no_results_written):
        yield
        return
    import nbmplock._store as store

    saved_os, saved_span = store.os, store.span_record
    if no_sync:
        store.os = _NoSync(saved_os)
    if no_results_written:
        def span_without_results(list_hash, run, ranges, results_blob=None):
            return saved_span(list_hash, run, ranges, None)
        store.span_record = span_without_results
    try:
        yield
    finally:
        store.os, store.span_record = saved_os, saved_span


def run_mpire(items, workers) -> list:
    from mpire import WorkerPool

    with WorkerPool(n_jobs=workers) as pool:
        return [keep_big(r) for r in pool.map_unordered(big_result, items)]


def run_nbm(items, workers, no_sync=False, no_results_written=False,
            fresh=False) -> list:
    import nbmplock

    with tempfile.TemporaryDirectory(prefix="nbmplock-w3-") as out, \
            ablated(no_sync, no_results_written), \
            (fresh_buffers() if fresh else contextlib.nullcontext()):
        results = nbmplock.mp_lock_value(items, big_result_nbm, None, workers, out, verbose=False)
    return [keep_big(r) for r in results]


def measure(fn: Callable[[], list], expected: Counter) -> dict:
    """Wall time and parent CPU of one run of *fn*; its results checked."""
    own0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    kept = fn()
    wall = time.perf_counter() - started
    own1 = resource.getrusage(resource.RUSAGE_SELF)
    if Counter(kept) != expected:
        raise ResultMismatch(f"{len(kept):,} results; not exactly one per item")
    cpu = (own1.ru_utime - own0.ru_utime) + (own1.ru_stime - own0.ru_stime)
    return {"wall": wall, "parent_cpu": cpu}


def anatomy(n_items: int, repeats: int, workers: int) -> str:
    """Run every case *repeats* times, interleaved; return the Markdown report."""
    items = label_items(n_items)
    expected = Counter(expect_big(i) for i in items)
    cases: dict[str, Callable[[], list]] = {}
    try:
        import mpire  # noqa: F401
        cases["mpire map_unordered"] = lambda: run_mpire(items, workers)
    except ImportError:
        pass
    cases["mp_lock_value as shipped"] = lambda: run_nbm(items, workers)
    if ablations_possible():
        cases["mp_lock_value, no fdatasync"] = lambda: run_nbm(items, workers, no_sync=True)
        cases["mp_lock_value, no fdatasync, results not written"] = \
            lambda: run_nbm(items, workers, no_sync=True, no_results_written=True)
    if buffer_ablation_possible():
        cases["mp_lock_value, a fresh buffer per results message"] = \
            lambda: run_nbm(items, workers, fresh=True)
    samples: dict[str, list[dict]] = {name: [] for name in cases}
    for repeat in range(repeats):
        order = list(cases)
        random.Random(repeat).shuffle(order)
        for name in order:
            samples[name].append(measure(cases[name], expected))
        print(f"  W3 anatomy repeat {repeat + 1}/{repeats} done", flush=True)

    def med(name, key):
        return statistics.median(s[key] for s in samples[name])

    peer = med("mpire map_unordered", "wall") if "mpire map_unordered" in cases else None
    mib = n_items * BIG_RESULT_BYTES / 2**20
    lines = [
        "# W3 anatomy: what durable results cost",
        "",
        (f"`python -m bench.w3_anatomy --repeats {repeats} --workers {workers} --items {n_items}` "
         f"on {time.strftime('%Y-%m-%d')}: {n_items:,} items each returning "
         f"{BIG_RESULT_BYTES // 1024} KiB ({mib:,.0f} MiB), {workers} workers on "
         f"{multiprocessing.cpu_count()} cores, medians of interleaved repeats; every run's "
         "results checked."),
        "",
        "| case | wall s | vs mpire | parent CPU µs/item |",
        "|---|---:|---:|---:|",
    ]
    for name in cases:
        wall = med(name, "wall")
        ratio = f"{wall / peer:.2f}x" if peer else "—"
        lines.append(f"| {name} | {wall:.3f} | {ratio} | "
                     f"{1e6 * med(name, 'parent_cpu') / n_items:.0f} |")
    if not ablations_possible():
        lines += ["", "The ablations are left out: this nbmplock's run store has no "
                      "`os` / `span_record` to set."]
    return "\n".join(lines) + "\n"


def regenerate(out_dir: Path, *, quick: bool, workers: int, repeats: Optional[int]) -> Path:
    """Write ``w3_anatomy.md`` into *out_dir* (``python -m bench``'s W3ANATOMY study)."""
    return study.regenerate(anatomy, RESULTS, out_dir, quick=quick, workers=workers,
                            repeats=repeats, items=2000, quick_items=500)


def main(argv: list[str] | None = None) -> int:
    return study.main(anatomy, RESULTS, "python -m bench.w3_anatomy", __doc__, 2000, argv)


if __name__ == "__main__":
    raise SystemExit(main())
