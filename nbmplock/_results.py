"""A job's results as users take them: in item order, by key, as they come, as a table.

Results are stored in the run directory (when the job keeps them), as the
pickles workers sent, one per chunk: reading them unpickles each once.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from typing import Any

from ._errors import JobStateError
from ._done import done_mask, results_for
from ._log import _MISSING, Contents
from ._optional import require
from ._read import read_contents

log = logging.getLogger("nbmplock")


def _check(job: Any) -> None:
    if not job.spec.options.keep_results:
        raise JobStateError("this job does not keep results (it has a save_callback); "
                            "create it with keep_results=True to store them")


def _contents(job: Any) -> Contents:
    runner = job._runner
    if runner is not None and runner.store is not None and runner.store.contents.complete is None:
        return runner.store.contents  # the last run's, with what it recorded since
    return read_contents(job.out_path, results=True)


def _values(job: Any, contents: Contents) -> list:
    items = job.spec.item_list
    items.recognize(contents)
    values = results_for(contents, items.keys, items.hash)
    for i, first in items.repeats.items():
        values[i] = values[first]
    return values


def results(job: Any, *, by_key: bool = False) -> list | dict:
    _check(job)
    if job.state.active:
        raise JobStateError("cannot read results() while the job runs; wait() for it, or "
                            "use iter_results() to take them as they come")
    contents = _contents(job)
    values = _values(job, contents)
    keys = job.spec.keys
    if by_key:
        return {k: v for k, v in zip(keys, values) if v is not _MISSING}
    # by identity: values.count() would call each result's __eq__ (a numpy
    # array's answers with an array, whose truth value raises)
    n_missing = sum(1 for v in values if v is _MISSING)
    if n_missing:
        failed = {f.key for f in job.failures}
        unexplained = sum(1 for k, v in zip(keys, values) if v is _MISSING and k not in failed)
        if unexplained:
            items = job.spec.item_list
            done = done_mask(contents, items.keys, items.hash)
            kept_none = sum(1 for d, v in zip(done, values) if d and v is _MISSING)
            if kept_none:
                log.warning("nbmplock: %d items of %r are done by a run that kept no results "
                            "(mp_lock, or a save_callback); their results are None until a run "
                            "that keeps results (mp_lock_value, keep_results=True) runs them "
                            "again for their values", kept_none, job.out_path)
            if unexplained - kept_none:
                log.warning("nbmplock: %d items of %r have no result yet (not done); their "
                            "results are None", unexplained - kept_none, job.out_path)
        values = [None if v is _MISSING else v for v in values]
    return values


def iter_results(job: Any) -> Iterator[tuple[Any, Any]]:
    """``(item, result)`` pairs as they are recorded; see :meth:`Job.iter_results`."""
    _check(job)
    items = job.spec.item_list
    woken: queue.SimpleQueue = queue.SimpleQueue()
    unsubscribe = job.subscribe(lambda event: woken.put(None))
    try:
        contents = _contents(job)
        seen = len(contents.spans)
        given: set = set()
        for position, value in enumerate(_values(job, contents)):  # stored so far
            if value is not _MISSING and position not in items.repeats:
                given.add(position)
                yield items.items[position], value
        while True:
            active = job.state.active  # read first: spans recorded before the end are seen
            current = _contents(job)
            if current is not contents:  # a new run (resume): its own record of spans
                contents, seen = current, 0
            fresh, seen = contents.spans[seen:], len(contents.spans)
            for span in fresh:
                if span.undo or not span.has_values or span.list_hash != items.hash:
                    continue
                for position, value in zip(span.positions(), span.values()):
                    if position not in given:
                        given.add(position)
                        yield items.items[position], value
            if not active:
                return
            try:
                woken.get(timeout=0.5)  # an event of the job (results are published with one)
            except queue.Empty:
                pass
    finally:
        unsubscribe()


def to_pandas(job: Any):
    """One row per item: key, item, result, state, error type and message."""
    pd = require("pandas")
    contents = _contents(job) if job.spec.options.keep_results else read_contents(job.out_path)
    items = job.spec.item_list
    items.recognize(contents)
    values = _values(job, contents) if job.spec.options.keep_results else None
    done = done_mask(contents, items.keys, items.hash)
    for i, first in items.repeats.items():
        done[i] = done[first]
    failures = {f.key: f for f in job.failures}
    rows = []
    for position, (item, key) in enumerate(zip(items.items, items.keys)):
        failure = failures.get(key) if not done[position] else None
        value = values[position] if values is not None else _MISSING
        rows.append({
            "key": key, "item": item,
            "result": None if value is _MISSING else value,
            "state": "done" if done[position] else ("failed" if failure else "not done"),
            "error_type": failure.exc_type if failure else None,
            "error_message": failure.message if failure else None,
        })
    return pd.DataFrame(rows, columns=["key", "item", "result", "state", "error_type",
                                       "error_message"])
