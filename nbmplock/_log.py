"""The log's records: how done items, failures and a run's end are written and read.

The log (``out_path/.nbmplock/log``) is append-only. Each record is a 12-byte
header (magic ``NL``, kind, flags, payload length, CRC-32 of header and
payload) and a payload:

``DONE``
    A pickled list of item names and, for runs that keep results
    (``mp_lock_value``), the pickled list of their results.
``FAIL``
    Failure rows (:meth:`Failure.row`).
``COMPLETE``
    Every item of the list with this hash is done (items hash, count,
    distinct count): the next run of that list reads nothing else.
``END``
    How a run ended (finished, stopped, failed, and why), as JSON.

A reader skips a kind it does not know. Damage: a torn or corrupt *last*
record (a crash mid-write) is ignored; a damaged record with valid records
after it is never skipped silently (:class:`StoreCorruptError`) unless the
caller asks to (``repair``). :mod:`nbmplock._store` owns the file; this
module only makes and reads its bytes.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import FailureKind, StoreCorruptError
from ._wire import dumps

log = logging.getLogger("nbmplock")

_HEADER = struct.Struct("<2sBBII")
_MAGIC = b"NL"
_DONE, _FAIL, _COMPLETE, _END = 1, 2, 3, 4
_COMPLETE_BODY = struct.Struct("<32sQQ")
COMPLETE_SIZE = _HEADER.size + _COMPLETE_BODY.size
_HAS_RESULTS = 1
_U32 = struct.Struct("<I")
_COMPACT_GROUP = 200_000


@dataclass(frozen=True)
class Failure:
    """Why one item is not done.

    ``kind`` is a :class:`FailureKind` (also a ``str``): ``"exception"``
    (``process`` raised), ``"died"`` (the worker process died holding it),
    ``"timeout"`` (longer than ``item_timeout``) or ``"unpicklable"`` (its
    result could not be sent back).
    """

    item: Any
    kind: FailureKind
    exc_type: str
    message: str
    traceback: str
    attempts: int = 1
    worker_pid: int | None = None
    exitcode: int | None = None
    duration: float | None = None
    time: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.kind, FailureKind):  # read back from the log as text
            object.__setattr__(self, "kind", FailureKind(self.kind))

    def summary(self) -> str:
        return f"{self.exc_type}: {self.message}" if self.message else self.exc_type

    def row(self) -> tuple:
        """What the log stores: the fields, ``kind`` as its text."""
        return (self.item, self.kind.value, self.exc_type, self.message, self.traceback,
                self.attempts, self.worker_pid, self.exitcode, self.duration, self.time)


def by_time(failures: Iterable[Failure]) -> tuple[Failure, ...]:
    """Failures oldest first (the order every view shows them in)."""
    return tuple(sorted(failures, key=lambda f: f.time))


@dataclass
class Contents:
    """What the log holds: done items, their results (if loaded), failures."""

    done: set
    results: dict | None
    failures: dict
    records: int = 0
    valid_bytes: int = 0
    torn_bytes: int = 0
    # Set by RunStore.open when the log ends with a COMPLETE record for the run's
    # own item list: (items_hash, n_items, n_distinct); nothing else was loaded.
    complete: tuple | None = None
    # How the last run that recorded its end ended: {"status", "reason", "time", "pid"}.
    last_end: dict | None = None
    damaged: int = 0  # damaged stretches skipped (only with skip_damaged)


def _frame(kind: int, flags: int, *parts: bytes) -> list[bytes]:
    """One record as buffers to write in order: header (with the CRC) and ``parts``.

    The payload is the concatenation of ``parts``; it is never copied into one
    buffer (results can be megabytes).
    """
    head = _HEADER.pack(_MAGIC, kind, flags, sum(map(len, parts)), 0)[:8]
    crc = zlib.crc32(head)
    for part in parts:
        crc = zlib.crc32(part, crc)
    return [head + _U32.pack(crc), *parts]


def _done_payload(names: Sequence[str], results: Sequence[Any] | None,
                  results_blob: bytes | None = None) -> tuple[int, bytes, bytes, bytes]:
    """``(flags, *payload parts)`` of a DONE record; ``results_blob`` is the
    pickle of the list ``results`` when the caller already has it."""
    blob = pickle.dumps(list(names), protocol=pickle.HIGHEST_PROTOCOL)
    if results is None:
        return 0, _U32.pack(len(blob)), blob, b""
    res = results_blob if results_blob is not None else dumps(list(results))
    return _HAS_RESULTS, _U32.pack(len(blob)), blob, res


def _valid_at(buf: memoryview, pos: int) -> int | None:
    """End offset of a valid record starting at ``pos``, else None."""
    n = len(buf)
    if n - pos < _HEADER.size:
        return None
    magic, _kind, _flags, length, crc = _HEADER.unpack_from(buf, pos)
    end = pos + _HEADER.size + length
    if magic != _MAGIC or end > n:
        return None
    if zlib.crc32(buf[pos + _HEADER.size:end], zlib.crc32(buf[pos:pos + 8])) != crc:
        return None
    return end


def _next_valid(buf: memoryview, start: int) -> int | None:
    raw = buf.obj if isinstance(buf.obj, bytes) else bytes(buf)
    pos = raw.find(_MAGIC, start)
    while pos != -1:
        if _valid_at(buf, pos) is not None:
            return pos
        pos = raw.find(_MAGIC, pos + 1)
    return None


def scan(data: bytes, *, results: bool, names: bool = True,
         skip_damaged: bool = False) -> Contents:
    """Parse a log image. See the module docstring for the damage rules.

    ``names=False`` skips building the done-set (for callers that only want
    results).
    """
    buf = memoryview(data)
    done: set = set()
    res: dict | None = {} if results else None
    failures: dict = {}
    pos, records, n = 0, 0, len(buf)
    last_end = None
    damaged = 0
    while pos < n:
        end = _valid_at(buf, pos)
        if end is None:
            following = _next_valid(buf, pos + 1)
            if following is None:
                break  # torn tail: a crash during the last write
            if not skip_damaged:
                raise StoreCorruptError(
                    f"the run store log is damaged at byte {pos} of {n}, and valid "
                    f"records follow at byte {following}; nothing was discarded. Run "
                    "`python -m nbmplock repair OUT_PATH` to keep every readable record "
                    "(items of the damaged one will run again).")
            log.warning("skipping a damaged log record at bytes %d-%d", pos, following)
            damaged += 1
            pos = following
            continue
        _magic, kind, flags, _length, _crc = _HEADER.unpack_from(buf, pos)
        payload = buf[pos + _HEADER.size:end]
        if kind == _DONE:
            (names_len,) = _U32.unpack_from(payload, 0)
            done_names = pickle.loads(payload[4:4 + names_len])
            if names:
                done.update(done_names)
            if res is not None and flags & _HAS_RESULTS:
                res.update(zip(done_names, pickle.loads(payload[4 + names_len:])))
        elif kind == _FAIL:
            for row in pickle.loads(payload):
                failure = Failure(*row)
                failures[failure.item] = failure
        elif kind == _END:
            try:
                last_end = json.loads(bytes(payload))
            except ValueError:
                last_end = None
        records += 1
        pos = end
    for item in [k for k in failures if k in done]:
        del failures[item]
    return Contents(done, res, failures, records, pos, n - pos, last_end=last_end,
                    damaged=damaged)




def done_record(names: Sequence, results: Sequence[Any] | None = None,
                results_blob: bytes | None = None) -> list[bytes]:
    """A DONE record of ``names`` (with their results, when given)."""
    return _frame(_DONE, *_done_payload(names, results, results_blob))


def fail_record(failures: Iterable[Failure]) -> list[bytes]:
    rows = [f.row() for f in failures]
    return _frame(_FAIL, 0, pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL))


def complete_record(items_hash: str, n_items: int, n_distinct: int) -> list[bytes]:
    return _frame(_COMPLETE, 0, _COMPLETE_BODY.pack(items_hash.encode("ascii"), n_items,
                                                    n_distinct))


def end_record(status: str, reason: str) -> list[bytes]:
    body = json.dumps({"status": status, "reason": reason, "time": time.time(),
                       "pid": os.getpid()}).encode()
    return _frame(_END, 0, body)


def parse_complete(tail: bytes) -> tuple[str, int, int] | None:
    """``(items_hash, n_items, n_distinct)`` if ``tail`` (the log's last
    :data:`COMPLETE_SIZE` bytes) is a valid COMPLETE record."""
    if len(tail) != COMPLETE_SIZE:
        return None
    if _valid_at(memoryview(tail), 0) != COMPLETE_SIZE or tail[2] != _COMPLETE:
        return None
    items_hash, n_items, n_distinct = _COMPLETE_BODY.unpack_from(tail, _HEADER.size)
    return items_hash.decode("ascii"), n_items, n_distinct


def compact(log_path: str, contents: Contents) -> None:
    """Rewrite the log from ``contents`` (loaded with results) in a few big records.

    Written to a temporary file, fsynced and renamed over the log: a crash
    leaves either the old log or the new one.
    """
    with_results = [k for k in contents.done if k in contents.results]
    without = [k for k in contents.done if k not in contents.results]
    tmp = log_path + ".compact"
    with open(tmp, "wb") as f:
        for group_start in range(0, len(without), _COMPACT_GROUP):
            names = without[group_start:group_start + _COMPACT_GROUP]
            f.writelines(done_record(names))
        for group_start in range(0, len(with_results), _COMPACT_GROUP):
            names = with_results[group_start:group_start + _COMPACT_GROUP]
            f.writelines(done_record(names, [contents.results[k] for k in names]))
        if contents.failures:
            f.writelines(fail_record(contents.failures.values()))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, log_path)
    dir_fd = os.open(os.path.dirname(log_path), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
