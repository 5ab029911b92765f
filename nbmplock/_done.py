"""Which positions of an item list are done, their results, and the log's net state.

Reads what :func:`nbmplock._log.scan` returns: spans (by position, per list),
DONE keys, forgets. :func:`done_mask` answers "which positions of this list
are done", :func:`results_for` "what are their results", and :func:`compact`
rewrites a log as its net state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from itertools import compress

from ._log import (_COMPACT_GROUP, _LIST, _MISSING, Contents, _frame, done_record, fail_record,
                   ranges_of, run_record, span_record)
from ._wire import dumps


def done_mask(c: Contents, keys: Sequence, list_hash: str, *,
              run: str | None = None, need_results: bool = False) -> bytearray:
    """For each position of the list ``keys`` (hash ``list_hash``): 1 if it is
    recorded done, else 0 (a ``bytearray``).

    ``run``: count only what that run (fingerprint) recorded. ``need_results``:
    count only what was recorded with its result.
    """
    n = len(keys)
    mask = bytearray(n)
    one = b"\x01"
    others: dict = {}  # other lists and DONE records: key -> True
    for k, by in c.done_keys.items():
        if (run is None or by == run) and (not need_results or (
                c.key_results is not None and k in c.key_results)):
            others[k] = True
    for span in c.spans:
        if not span.undo and ((run is not None and span.run != run)
                              or (need_results and not span.has_values)):
            continue
        r = span.ranges
        if span.list_hash == list_hash:
            for j in range(0, len(r), 2):
                a, b = r[j], r[j + 1]
                mask[a:b] = (b"\x00" if span.undo else one) * (b - a)
            continue
        list_keys = c.keys_of(span.list_hash)
        if list_keys is None:
            continue
        for i in span.positions():
            if span.undo:
                others.pop(list_keys[i], None)
            else:
                others[list_keys[i]] = True
    if others:
        for i in compress(range(n), map(others.__contains__, keys)):
            mask[i] = 1
    return mask


def results_for(c: Contents, keys: Sequence, list_hash: str) -> list:
    """The stored result of each position of ``keys`` (``_MISSING`` where none)."""
    n = len(keys)
    out = [_MISSING] * n
    by_key: dict = dict(c.key_results or {})
    for span in c.spans:
        r = span.ranges
        if span.list_hash == list_hash:
            if span.undo:
                for j in range(0, len(r), 2):
                    out[r[j]:r[j + 1]] = [_MISSING] * (r[j + 1] - r[j])
                continue
            if not span.has_values:
                continue
            values = span.values()
            if len(r) == 2 and len(values) == r[1] - r[0]:  # no slice copied
                out[r[0]:r[1]] = values
                continue
            at = 0
            for j in range(0, len(r), 2):
                a, b = r[j], r[j + 1]
                out[a:b] = values[at:at + b - a]
                at += b - a
            continue
        list_keys = c.keys_of(span.list_hash)
        if list_keys is None or (not span.has_values and not span.undo):
            continue
        if span.undo:
            for i in span.positions():
                by_key.pop(list_keys[i], None)
            continue
        by_key.update(zip((list_keys[i] for i in span.positions()), span.values()))
    if by_key:
        for i in compress(range(n), (v is _MISSING for v in out)):
            value = by_key.get(keys[i], _MISSING)
            if value is not _MISSING:
                out[i] = value
    return out


# -- compaction ----------------------------------------------------------

def compact(log_path: str, c: Contents) -> None:
    """Rewrite the log from ``c`` (read with results) in a few big records.

    What counts is kept: every list's keys, every run's fingerprint, each
    position's latest state (done by which run, with which result), the DONE
    keys and the live failures; forgotten items are simply absent. Written to
    a temporary file, fsynced and renamed over the log: a crash leaves either
    the old log or the new one.
    """
    tmp = log_path + ".compact"
    with open(tmp, "wb") as f:
        for list_hash, blob in c.lists.items():
            f.writelines(_frame(_LIST, 0, list_hash.encode("ascii"), blob))
        for run, fp in c.runs.items():
            f.writelines(run_record(run, {k: v for k, v in fp.items() if k != "run"}))
        for list_hash in dict.fromkeys(s.list_hash for s in c.spans):
            for record in _net_spans(c, list_hash):
                f.writelines(record)
        done = list(c.done_keys)
        for start in range(0, len(done), _COMPACT_GROUP):
            names = done[start:start + _COMPACT_GROUP]
            if c.key_results is not None and all(k in c.key_results for k in names):
                f.writelines(done_record(names, [c.key_results[k] for k in names]))
            else:
                f.writelines(done_record(names))
        if c.failures:
            f.writelines(fail_record(c.failures.values()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, log_path)
    dir_fd = os.open(os.path.dirname(log_path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _net_spans(c: Contents, list_hash: str):
    """SPAN records of each position's latest state in the list, grouped by run."""
    spans = [s for s in c.spans if s.list_hash == list_hash]
    n = max((int(s.ranges[-1]) for s in spans if len(s.ranges)), default=0)
    by_run: list = [None] * n
    values: list = [_MISSING] * n
    for span in spans:
        r = span.ranges
        got = span.values() if span.has_values else None
        at = 0
        for j in range(0, len(r), 2):
            a, b = r[j], r[j + 1]
            by_run[a:b] = [None if span.undo else span.run] * (b - a)
            values[a:b] = got[at:at + b - a] if got is not None else [_MISSING] * (b - a)
            at += b - a
    groups: dict = {}
    for i, run in enumerate(by_run):
        if run is not None:
            groups.setdefault((run, values[i] is not _MISSING), []).append(i)
    for (run, with_values), positions in groups.items():
        for start in range(0, len(positions), _COMPACT_GROUP):
            part = positions[start:start + _COMPACT_GROUP]
            blob = dumps([values[i] for i in part]) if with_values else None
            yield span_record(list_hash, run, ranges_of(part), blob)
