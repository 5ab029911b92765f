"""Runners for the peer libraries nbmplock is compared against.

Every runner has the signature ``run(task, items, workers, scratch, receiver)``:
it maps ``task.plain`` over *items* with *workers* processes and hands the
results to ``receiver.take`` in the caller, as they come (see
:mod:`bench.delivery`).  *scratch* is a fresh empty directory (unused by the
peers).  Each call creates and tears down its own worker pool, so every
library starts cold, like a fresh ``mp_lock`` call does.

Progress bars go to a null stream where the peer allows it, so the terminal
stays readable while the bar's cost is still paid.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from .delivery import Receiver
from .records import Runner
from .workloads import Task


def module_problem(module: str) -> Optional[str]:
    """Why *module* cannot be imported, or ``None``."""
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"import {module} failed ({type(exc).__name__}: {exc})"
    return None


def requires(module: str) -> Callable[[], Optional[str]]:
    """A ``Runner.check`` that imports *module*."""
    return functools.partial(module_problem, module)


def pool_map_chunksize(n_items: int, workers: int) -> int:
    """The chunksize ``multiprocessing.Pool.map`` picks: ``ceil(n / (4 * workers))``."""
    chunksize, extra = divmod(n_items, workers * 4)
    return max(1, chunksize + (1 if extra else 0))


@contextlib.contextmanager
def closing_pool(pool) -> Iterator:
    """Close and join *pool* on success; terminate it on failure."""
    try:
        yield pool
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


@contextlib.contextmanager
def null_text_stream() -> Iterator:
    """A writable text stream that discards everything."""
    with open(os.devnull, "w") as sink:
        yield sink


# --------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------

def run_serial(task: Task, items: Sequence, workers: int, scratch: Path, receiver: Receiver) -> None:
    """Plain loop in the caller: the baseline for W2 and W4."""
    receiver.take(task.plain(item) for item in items)


def run_multiprocess(task: Task, items: Sequence, workers: int, scratch: Path, receiver: Receiver) -> None:
    """``multiprocess.Pool.imap_unordered`` with its default chunksize of 1."""
    import multiprocess

    with closing_pool(multiprocess.Pool(workers)) as pool:
        receiver.take(pool.imap_unordered(task.plain, items))


def run_multiprocess_chunked(task: Task, items: Sequence, workers: int, scratch: Path, receiver: Receiver) -> None:
    """``multiprocess.Pool.imap_unordered`` with the ``Pool.map`` chunksize (W6 reference)."""
    import multiprocess

    chunksize = pool_map_chunksize(len(items), workers)
    with closing_pool(multiprocess.Pool(workers)) as pool:
        receiver.take(pool.imap_unordered(task.plain, items, chunksize=chunksize))


def run_multiprocessing(task: Task, items: Sequence, workers: int, scratch: Path, receiver: Receiver) -> None:
    """Stdlib ``multiprocessing.Pool.imap_unordered`` with the ``Pool.map`` chunksize."""
    import multiprocessing

    chunksize = pool_map_chunksize(len(items), workers)
    with closing_pool(multiprocessing.Pool(workers)) as pool:
        receiver.take(pool.imap_unordered(task.plain, items, chunksize=chunksize))


def run_futures(task: Task, items: Sequence, workers: int, scratch: Path, receiver: Receiver) -> None:
    """``concurrent.futures.ProcessPoolExecutor.map`` with the ``Pool.map`` chunksize."""
    from concurrent.futures import ProcessPoolExecutor

    chunksize = pool_map_chunksize(len(items), workers)
    with ProcessPoolExecutor(max_workers=workers) as executor:
        receiver.take(executor.map(task.plain, items, chunksize=chunksize))


def run_mpire(task: Task, items: Sequence, workers: int, scratch: Path, receiver: Receiver) -> None:
    """``mpire.WorkerPool.map_unordered`` without a progress bar (default chunking)."""
    from mpire import WorkerPool

    with WorkerPool(n_jobs=workers) as pool:
        receiver.take(pool.map_unordered(task.plain, items, progress_bar=False))


def run_mpire_bar(task: Task, items: Sequence, workers: int, scratch: Path, receiver: Receiver) -> None:
    """``mpire.WorkerPool.map_unordered`` with its progress bar (stderr sent to devnull)."""
    from mpire import WorkerPool

    with null_text_stream() as sink, contextlib.redirect_stderr(sink):
        with WorkerPool(n_jobs=workers) as pool:
            receiver.take(pool.map_unordered(task.plain, items, progress_bar=True))


def run_joblib(task: Task, items: Sequence, workers: int, scratch: Path, receiver: Receiver) -> None:
    """``joblib.Parallel`` with the loky backend and ``batch_size="auto"``."""
    from joblib import Parallel, delayed

    parallel = Parallel(n_jobs=workers, backend="loky", batch_size="auto")
    receiver.take(parallel(delayed(task.plain)(item) for item in items))


def shutdown_loky(workers: int) -> None:
    """Stop loky's reusable workers so the next joblib run starts cold too."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor(max_workers=workers).shutdown(wait=True)


def run_tqdm_process_map(task: Task, items: Sequence, workers: int, scratch: Path, receiver: Receiver) -> None:
    """``tqdm.contrib.concurrent.process_map`` with the ``Pool.map`` chunksize, bar to devnull."""
    from tqdm.contrib.concurrent import process_map

    chunksize = pool_map_chunksize(len(items), workers)
    with null_text_stream() as sink:
        results = process_map(task.plain, items, max_workers=workers, chunksize=chunksize, file=sink)
    receiver.take(results)


# --------------------------------------------------------------------------
# The runner table
# --------------------------------------------------------------------------

SERIAL = Runner("serial loop (baseline)", run_serial, role="baseline")
MULTIPROCESS = Runner(
    "multiprocess imap_unordered (chunksize=1)", run_multiprocess, check=requires("multiprocess")
)
MULTIPROCESS_CHUNKED = Runner(
    "multiprocess imap_unordered (chunksize=n/4w)", run_multiprocess_chunked, check=requires("multiprocess")
)
MULTIPROCESSING = Runner("multiprocessing imap_unordered (chunksize=n/4w)", run_multiprocessing)
FUTURES = Runner("ProcessPoolExecutor.map (chunksize=n/4w)", run_futures)
MPIRE = Runner("mpire map_unordered", run_mpire, check=requires("mpire"))
MPIRE_BAR = Runner(
    "mpire map_unordered + progress bar",
    run_mpire_bar,
    check=requires("mpire"),
    note="bar drawn to devnull",
)
JOBLIB = Runner(
    "joblib Parallel (loky, batch auto)",
    run_joblib,
    after=shutdown_loky,
    check=requires("joblib"),
    note="loky workers shut down after each run, outside the timing",
)
TQDM = Runner(
    "tqdm process_map (chunksize=n/4w)",
    run_tqdm_process_map,
    check=requires("tqdm.contrib.concurrent"),
    note="bar drawn to devnull",
)

#: Peers compared in the map workloads W1-W4, in table order.
MAP_PEERS: tuple[Runner, ...] = (
    MULTIPROCESS,
    MULTIPROCESSING,
    FUTURES,
    MPIRE,
    MPIRE_BAR,
    JOBLIB,
    TQDM,
)
