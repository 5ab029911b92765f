"""The API of ``doc_ock``, the library nbmplock grew from: switch by one import.

Each function runs a :class:`Job` in the foreground: a tqdm bar when
``verbose``, Ctrl-C (or a Jupyter kernel interrupt) stops at once with every
finished item recorded, and running the same call again resumes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._job import Job, RunSummary, stop_after_interrupt
from ._keys import compute_keys
from ._options import make_options, positive_int
from ._plan import ItemList
from ._read import is_complete
from ._text import clip, short_repr
from ._validate import check_items, check_out_path

log = logging.getLogger("nbmplock")

def _run(data_list, process, save_callback, num_procs, out_path, *, save_batch, shared_data,
         init_function, verbose, batch_size=None, keep_results=False, options) -> Job:
    options = make_options(seed=True, save_callback=save_callback, num_procs=num_procs,
                           save_batch=save_batch, shared_data=shared_data,
                           init_function=init_function, **options)
    if options.backend is None:
        positive_int("num_procs", num_procs)  # the seed library's rule: a number of processes
    job = Job._with_options(data_list, process, out_path, dataclasses.replace(
        options, batch_size=batch_size, keep_results=keep_results))
    bar = None
    if verbose:
        from ._progress import TqdmObserver
        bar = TqdmObserver(job)
    try:
        try:
            job.start()
            job.wait()
        except KeyboardInterrupt:
            stop_after_interrupt(job)
            p = job.progress
            notes = "".join(f" Note: {note}." for note in job.notes)
            raise KeyboardInterrupt(
                f"nbmplock: stopped by the interrupt; {p.done:,} of {p.total:,} items are "
                f"recorded done in {job.out_path!r}. Run the same call again to resume.{notes}"
            ) from None
    finally:
        if bar is not None:
            bar.close()
    if job.error is not None:
        raise job.error
    for failure in job.failures[-5:]:
        log.warning("nbmplock: item %s failed: %s", short_repr(failure.item),
                    clip(failure.summary(), 300))
    return job


def mp_lock(data_list: Iterable, process: Callable, save_callback: Callable | None,
            num_procs: int, out_path: str, save_batch: int = 10, shared_data: Any = None,
            init_function: Callable | None = None, verbose: bool = True,
            **options: Any) -> RunSummary:
    """Run ``process(item, shared_data, init_values)`` on every item not yet done.

    Results go to ``save_callback(f"{out_path}/data", results, names)`` in
    batches of ``save_batch``; an item is recorded done once its batch was
    saved. Run the same call again after a crash, Ctrl-C or an exception and
    only what is not done runs. Options: ``errors`` ("raise" or "record"),
    ``max_retries``, ``item_timeout`` (seconds), ``chunk_size``,
    ``start_method`` ("fork", "spawn", "forkserver"), ``backend`` (a Dask
    client or scheduler address), ``concurrency`` (items in flight per worker:
    threads, or an ``async def`` process on the worker's event loop),
    ``rate_limit`` ("600/min", "10/s" or a number per second, shared by all
    workers), ``retry_delay`` (seconds, doubling with jitter) and ``retry_on``
    (exception types worth a retry).

    Returns a :class:`RunSummary`.

    Examples
    --------
    >>> mp_lock(paths, resize, save, 4, "runs/resize")   # doctest: +SKIP
    """
    return _run(data_list, process, save_callback, num_procs, out_path, save_batch=save_batch,
                shared_data=shared_data, init_function=init_function, verbose=verbose,
                options=options).summary


def mp_lock_value(data_list: Iterable, process: Callable, save_callback: Callable | None,
                  num_procs: int, out_path: str, save_batch: int = 10,
                  shared_data: Any = None, init_function: Callable | None = None,
                  verbose: bool = True, **options: Any) -> list:
    """Like :func:`mp_lock`, and return the results in ``data_list`` order.

    Results are stored in the run directory, so a resumed call returns those of
    earlier runs too. With ``errors="record"`` a failed item's result is None.
    """
    return _run(data_list, process, save_callback, num_procs, out_path, save_batch=save_batch,
                shared_data=shared_data, init_function=init_function, verbose=verbose,
                keep_results=True, options=options).results()


mp_lock_values = mp_lock_value


def mp_lock_batch(data_list: Iterable, process: Callable, save_callback: Callable | None,
                  num_procs: int, out_path: str, batch_size: int, save_batch: int = 10,
                  shared_data: Any = None, init_function: Callable | None = None,
                  verbose: bool = True, **options: Any) -> RunSummary:
    """Like :func:`mp_lock`, but ``process(items, shared_data, init_values)`` gets a
    list of up to ``batch_size`` items and returns a list of as many results."""
    positive_int("batch_size", batch_size)
    return _run(data_list, process, save_callback, num_procs, out_path, save_batch=save_batch,
                shared_data=shared_data, init_function=init_function, verbose=verbose,
                batch_size=batch_size, options=options).summary


def is_mp_lock_completed(data_list: Sequence, out_path: str, *, key: Any = None) -> bool:
    """True when every item of ``data_list`` is recorded done in ``out_path``
    (``key=``: as for the run that recorded them)."""
    items = check_items("data_list", data_list)
    out_path = check_out_path("out_path", out_path)
    make_options(key=key)  # checks key=
    return is_complete(out_path, ItemList.of(items, compute_keys(items, key)))
