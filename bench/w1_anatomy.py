"""Where W1's time goes: ``mp_lock_value`` on trivial items, phase by phase, beside ``Pool``.

    python -m bench.w1_anatomy [--repeats 7] [--workers 2] [--items 200000]

(``python -m bench`` runs it too, as its ``W1ANATOMY`` study.)

Runs, interleaved in a seeded shuffled order each repeat, over W1's items:

* ``multiprocessing.Pool.imap_unordered`` with the ``Pool.map`` chunksize, the
  fastest peer of W1;
* ``mp_lock_value`` into a fresh run directory, with its phases timed: the
  time until the first chunk is handed to a worker, and within it the
  preparation of the item list that a resumable run needs (copying it,
  computing its keys, hashing it for the log, finding repeated items) and
  the start of the worker processes; and the close of the run (workers
  ended, the log committed).

The phases are read by wrapping private functions of nbmplock for the run
(they are not settings users have); a phase is left out when its name is gone.
Every run is checked to have delivered every item's result exactly once.
Reports the median of each number. Writes ``bench/results/w1_anatomy.md``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Optional

from . import study
from .records import ResultMismatch
from .peers import pool_map_chunksize
from .workloads import item_number, item_number_nbm, label_items

RESULTS = Path(__file__).resolve().parent / "results" / "w1_anatomy.md"

#: (label, module, owner class or None, function name): the phases timed.
PHASES = (
    ("copy the list, compute its keys", "nbmplock._validate", None, "check_items"),
    ("copy the list, compute its keys", "nbmplock._validate", None, "compute_keys"),
    ("hash the list for the log", "nbmplock._plan", None, "encode_keys"),
    ("find repeated items (the keys' order, else a set)", "nbmplock._plan", "ItemList", "_find_repeats"),
    ("write the list's keys to the log", "nbmplock._store", "RunStore", "record_list"),
    ("start the workers (fork)", "nbmplock._engine", "LocalBackend", "start"),
    ("end the run (workers ended, log committed)", "nbmplock._runner", "Runner", "_finish"),
)


@contextlib.contextmanager
def timed_phases(spent: dict, first: dict):
    """Wrap the phases' functions (and the first chunk's hand-out) for one run."""
    import importlib

    undo = []

    def wrap(owner, name, label):
        real = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - started

        setattr(owner, name, timed)
        undo.append((owner, name, real))

    try:
        for label, module_name, cls, name in PHASES:
            try:
                module = importlib.import_module(module_name)
                owner = getattr(module, cls) if cls else module
                getattr(owner, name)
            except (ImportError, AttributeError):
                continue
            wrap(owner, name, label)
        try:
            from nbmplock._engine import LocalBackend
            real_submit = LocalBackend.submit

            def submit(self, chunk):
                first.setdefault("t", time.perf_counter())
                return real_submit(self, chunk)

            LocalBackend.submit = submit
            undo.append((LocalBackend, "submit", real_submit))
        except (ImportError, AttributeError):
            pass
        yield
    finally:
        for owner, name, real in reversed(undo):
            setattr(owner, name, real)


def run_pool(items, workers) -> dict:
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = list(pool.imap_unordered(item_number, items,
                                           chunksize=pool_map_chunksize(len(items), workers)))
    return {"wall": time.perf_counter() - started, "results": results}


def run_nbm(items, workers) -> dict:
    import nbmplock

    spent: dict = defaultdict(float)
    first: dict = {}
    with tempfile.TemporaryDirectory(prefix="nbmplock-w1-") as out, timed_phases(spent, first):
        started = time.perf_counter()
        results = nbmplock.mp_lock_value(items, item_number_nbm, None, workers, out,
                                         verbose=False)
        wall = time.perf_counter() - started
    out = {"wall": wall, "results": results, **spent}
    if "t" in first:
        out["until the first chunk is handed out"] = first["t"] - started
    return out


def anatomy(n_items: int, repeats: int, workers: int) -> str:
    """Run both cases *repeats* times, interleaved; return the Markdown report."""
    items = label_items(n_items)
    expected = Counter(map(item_number, items))
    cases: dict[str, Callable[[], dict]] = {
        "multiprocessing Pool imap_unordered (chunksize n/4w)": lambda: run_pool(items, workers),
        "mp_lock_value": lambda: run_nbm(items, workers),
    }
    samples: dict[str, list[dict]] = {name: [] for name in cases}
    for repeat in range(repeats):
        order = list(cases)
        random.Random(repeat).shuffle(order)
        for name in order:
            sample = cases[name]()
            if Counter(sample.pop("results")) != expected:
                raise ResultMismatch(f"{name}: not exactly one result per item")
            samples[name].append(sample)
        print(f"  W1 anatomy repeat {repeat + 1}/{repeats} done", flush=True)

    def med(name, key):
        values = [s[key] for s in samples[name] if key in s]
        return statistics.median(values) if values else None

    pool = med("multiprocessing Pool imap_unordered (chunksize n/4w)", "wall")
    nbm = med("mp_lock_value", "wall")
    lines = [
        "# W1 anatomy: where the time of a durable map of trivial items goes",
        "",
        (f"`python -m bench.w1_anatomy --repeats {repeats} --workers {workers} --items {n_items}` "
         f"on {time.strftime('%Y-%m-%d')}: {n_items:,} trivial `str` items, {workers} workers on "
         f"{multiprocessing.cpu_count()} cores, medians of {repeats} interleaved repeats; every "
         "run's results checked; each `mp_lock_value` run into a fresh run directory."),
        "",
        "| case | wall ms | vs Pool |",
        "|---|---:|---:|",
        f"| multiprocessing Pool imap_unordered (chunksize n/4w) | {1e3 * pool:.1f} | 1.00x |",
        f"| mp_lock_value | {1e3 * nbm:.1f} | {nbm / pool:.2f}x |",
        "",
        "Phases of `mp_lock_value` (median ms; the first row includes the next five):",
        "",
        "| phase | ms | share of its wall time |",
        "|---|---:|---:|",
    ]
    labels = ["until the first chunk is handed out"] + list(dict.fromkeys(p[0] for p in PHASES))
    for label in labels:
        value = med("mp_lock_value", label)
        if value is not None:
            lines.append(f"| {label} | {1e3 * value:.1f} | {value / nbm:.0%} |")
    return "\n".join(lines) + "\n"


def regenerate(out_dir: Path, *, quick: bool, workers: int, repeats: Optional[int]) -> Path:
    """Write ``w1_anatomy.md`` into *out_dir* (``python -m bench``'s W1ANATOMY study)."""
    return study.regenerate(anatomy, RESULTS, out_dir, quick=quick, workers=workers,
                            repeats=repeats, items=200_000, quick_items=20_000)


def main(argv: list[str] | None = None) -> int:
    return study.main(anatomy, RESULTS, "python -m bench.w1_anatomy", __doc__, 200_000, argv)


if __name__ == "__main__":
    raise SystemExit(main())
