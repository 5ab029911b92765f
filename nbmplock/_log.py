"""The log's records: how done items, failures and a run's end are written and read.

The log (``out_path/.nbmplock/log``) is append-only. Each record is a 12-byte
header (magic ``NL``, kind, flags, payload length, CRC-32 of header and
payload) and a payload:

``LIST``
    An item list's keys, once per list: its hash (32 ASCII bytes) and the
    keys' encoding (:func:`nbmplock._fingerprint.encode_keys`: ``str`` or
    ``bytes`` keys joined by NULs, or, written by earlier releases or for
    keys holding a NUL, their lengths and text; keys of mixed types
    pickled). Spans refer to it.
``RUN``
    A run began: its fingerprint (JSON: what it ran, with a short id). The
    records after it are that run's.
``SPAN``
    Items done, by position in a list: the list's hash, ranges of positions
    (``start, stop`` pairs), and, for runs that keep results, the pickled list
    of their results in that order (the very pickle a worker sent). One per
    chunk (or per save batch): no per-item work in the parent.
``DONE``
    Items done, by key (a pickled list), with their results when kept; what
    the first releases wrote, and still what items outside any list position
    are recorded with.
``FAIL``
    Failure rows (:meth:`Failure.row`).
``FORGET``
    Items forgotten on purpose (all, the failed ones, or some keys): what came
    before about them no longer counts.
``COMPLETE``
    Every item of the list with this hash is done (hash, count, distinct
    count): the next run of that list reads nothing else.
``END``
    How a run ended (finished, stopped, failed, and why), as JSON.

A reader skips a kind it does not know. Damage: a torn or corrupt *last*
record (a crash mid-write) is ignored; a damaged record with valid records
after it is never skipped silently (:class:`StoreCorruptError`) unless the
caller asks to (``repair``). :mod:`nbmplock._store` owns the file; this
module only makes and reads its bytes, and answers "which positions of this
list are done" (:func:`done_mask`) and "what are their results"
(:func:`results_for`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
import time
import zlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._crc import Pickled, crc32_combine
from ._errors import FailureKind, StoreCorruptError
from ._fingerprint import decode_keys
from ._wire import dumps

log = logging.getLogger("nbmplock")

_HEADER = struct.Struct("<2sBBII")
_MAGIC = b"NL"
_DONE, _FAIL, _COMPLETE, _END, _LIST, _RUN, _SPAN, _FORGET = 1, 2, 3, 4, 5, 6, 7, 8
_COMPLETE_BODY = struct.Struct("<32sQQ")
COMPLETE_SIZE = _HEADER.size + _COMPLETE_BODY.size
_HAS_RESULTS = 1
_U32 = struct.Struct("<I")
_SPAN_HEAD = struct.Struct("<32s16sI")  # list hash, run id, number of range ints
_COMPACT_GROUP = 200_000
_MISSING = object()


@dataclass(frozen=True)
class Failure:
    """Why one item is not done.

    ``kind`` is a :class:`FailureKind` (also a ``str``): ``"exception"``
    (``process`` raised), ``"died"`` (the worker process died holding it),
    ``"timeout"`` (longer than ``item_timeout``) or ``"unpicklable"`` (its
    result could not be sent back). ``key`` is the item's key (the item
    itself for a ``str`` item).
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
    key: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, FailureKind):  # read back from the log as text
            object.__setattr__(self, "kind", FailureKind(self.kind))
        if self.key is None:
            object.__setattr__(self, "key", self.item)

    def summary(self) -> str:
        return f"{self.exc_type}: {self.message}" if self.message else self.exc_type

    def row(self) -> tuple:
        """What the log stores. The first releases stored the first ten fields
        (their items were their keys); the item follows when it is not its key."""
        row = (self.key, self.kind.value, self.exc_type, self.message, self.traceback,
               self.attempts, self.worker_pid, self.exitcode, self.duration, self.time)
        return row if self.item is self.key else row + (self.item,)


def _failure(row: tuple) -> Failure:
    key = row[0]
    item = row[10] if len(row) > 10 else key
    return Failure(item, *row[1:10], key=key)


def by_time(failures: Iterable[Failure]) -> tuple[Failure, ...]:
    """Failures oldest first (the order every view shows them in)."""
    return tuple(sorted(failures, key=lambda f: f.time))


@dataclass(frozen=True)
class Span:
    """Positions of a list recorded done (or, ``undo``, forgotten) by one record."""

    list_hash: str
    ranges: array  # start, stop, start, stop, ...
    blob: Any = None  # the pickled list of their results, in order (a memoryview)
    run: str = ""     # the id of the run (fingerprint) that recorded them
    undo: bool = False
    #: The results themselves, when the run that recorded them had them at hand
    #: (then ``blob`` is not kept in memory: it is on disk).
    kept: list | None = None

    @property
    def has_values(self) -> bool:
        return self.kept is not None or self.blob is not None

    def values(self) -> list:
        """Their results, in order (requires :attr:`has_values`)."""
        return self.kept if self.kept is not None else pickle.loads(self.blob)

    def positions(self):
        r = self.ranges
        for j in range(0, len(r), 2):
            yield from range(r[j], r[j + 1])


@dataclass
class Contents:
    """What the log holds, as read by :func:`scan`."""

    done_keys: dict = field(default_factory=dict)  # key -> run id, from DONE records
    key_results: dict | None = None                # key -> result, from DONE records
    failures: dict = field(default_factory=dict)    # key -> Failure
    spans: list = field(default_factory=list)       # Span, in log order
    lists: dict = field(default_factory=dict)       # list hash -> pickled keys
    runs: dict = field(default_factory=dict)        # run id -> fingerprint (dict)
    records: int = 0
    valid_bytes: int = 0
    torn_bytes: int = 0
    # Set by RunStore.open when the log ends with a COMPLETE record for the run's
    # own item list: (items_hash, n_items, n_distinct); nothing else was loaded.
    complete: tuple | None = None
    # How the last run that recorded its end ended: {"status", "reason", "time", "pid"}.
    last_end: dict | None = None
    damaged: int = 0  # damaged stretches skipped (only with skip_damaged)
    _keys: dict = field(default_factory=dict)       # list hash -> unpickled keys (cache)

    def keys_of(self, list_hash: str) -> list | None:
        """The keys of a list the log holds (unpickled on first use)."""
        keys = self._keys.get(list_hash)
        if keys is None and list_hash in self.lists:
            keys = self._keys[list_hash] = decode_keys(self.lists[list_hash])
        return keys

    @property
    def done(self) -> set:
        """Every key recorded done (see :meth:`all_done`)."""
        return self.all_done()

    @property
    def results(self) -> dict | None:
        """Every stored result by key, when read with ``results=True``."""
        return self.all_results() if self.key_results is not None else None

    def all_done(self) -> set:
        """Every key recorded done, whatever its list (unpickles every list's keys).

        A position of a list whose keys are lost (a damaged LIST record) counts
        as ``(list hash, position)``: a run of that same list still knows it.
        """
        return set(self.done_by_key())

    def done_by_key(self) -> dict:
        """Every key recorded done -> the id of the run that recorded it last."""
        done = dict(self.done_keys)
        for span in self.spans:
            keys = self.keys_of(span.list_hash)
            for i in span.positions():
                k = keys[i] if keys is not None else (span.list_hash, i)
                if span.undo:
                    done.pop(k, None)
                else:
                    done[k] = span.run
        return done

    def all_results(self) -> dict:
        """Every stored result by key, whatever its list (read with ``results=True``)."""
        out = dict(self.key_results or {})
        for span in self.spans:
            keys = self.keys_of(span.list_hash)
            if keys is None:
                continue
            if span.undo:
                for i in span.positions():
                    out.pop(keys[i], None)
            elif span.has_values:
                out.update(zip((keys[i] for i in span.positions()), span.values()))
        return out

    def live_failures(self, done: set | None = None) -> dict:
        """Failures of items not recorded done since."""
        done = self.all_done() if done is None else done
        return {k: f for k, f in self.failures.items() if k not in done}


# -- making records ------------------------------------------------------

def _frame(kind: int, flags: int, *parts: bytes) -> list[bytes]:
    """One record as buffers to write in order: header (with the CRC) and ``parts``.

    The payload is the concatenation of ``parts``; it is never copied into one
    buffer (results can be megabytes). A last part that is :class:`Pickled`
    with a CRC is not read: its worker's CRC is combined in.
    """
    head = _HEADER.pack(_MAGIC, kind, flags, sum(map(len, parts)), 0)[:8]
    crc = zlib.crc32(head)
    last = parts[-1] if parts else None
    combine = type(last) is Pickled and last.crc is not None
    for part in parts[:-1] if combine else parts:
        crc = zlib.crc32(part, crc)
    if combine:
        crc = crc32_combine(crc, last.crc, len(last))
    return [head + _U32.pack(crc), *parts]



def done_record(names: Sequence, results: Sequence[Any] | None = None,
                results_blob: bytes | None = None) -> list[bytes]:
    """A DONE record of the keys ``names`` (with their results, when given;
    ``results_blob`` is the pickle of the list ``results`` when the caller has it)."""
    blob = pickle.dumps(list(names), protocol=pickle.HIGHEST_PROTOCOL)
    if results is None:
        return _frame(_DONE, 0, _U32.pack(len(blob)), blob)
    res = results_blob if results_blob is not None else dumps(list(results))
    return _frame(_DONE, _HAS_RESULTS, _U32.pack(len(blob)), blob, res)


def span_record(list_hash: str, run: str, ranges: array,
                results_blob: bytes | None = None) -> list[bytes]:
    """A SPAN record: ``ranges`` (an ``array("Q")`` of start, stop pairs) of the list
    ``list_hash`` done by run ``run``, with the pickle of their results in order."""
    head = _SPAN_HEAD.pack(list_hash.encode("ascii"), run.encode("ascii"), len(ranges))
    data = ranges.tobytes()
    if results_blob is None:
        return _frame(_SPAN, 0, head, data)
    return _frame(_SPAN, _HAS_RESULTS, head, data, results_blob)


def list_record(list_hash: str, payload: list[bytes]) -> list[bytes]:
    """A LIST record: ``payload`` from :func:`nbmplock._fingerprint.encode_keys`."""
    return _frame(_LIST, 0, list_hash.encode("ascii"), *payload)


def run_record(run: str, fingerprint: dict) -> list[bytes]:
    return _frame(_RUN, 0, json.dumps({"run": run, **fingerprint}).encode())


def forget_record(*, keys: Sequence | None = None, failed: bool = False,
                  everything: bool = False) -> list[bytes]:
    what = "all" if everything else ("failed" if failed else "keys")
    body = pickle.dumps((what, list(keys or ())), protocol=pickle.HIGHEST_PROTOCOL)
    return _frame(_FORGET, 0, body)


def fail_record(failures: Iterable[Failure]) -> list[bytes]:
    rows = [f.row() for f in failures]
    return _frame(_FAIL, 0, pickle.dumps(rows, protocol=pickle.HIGHEST_PROTOCOL))


def complete_record(items_hash: str, n_items: int, n_distinct: int) -> list[bytes]:
    return _frame(_COMPLETE, 0, _COMPLETE_BODY.pack(items_hash.encode("ascii"), n_items,
                                                    n_distinct))


def end_record(status: str, reason: str, run: str = "") -> list[bytes]:
    body = json.dumps({"status": status, "reason": reason, "time": time.time(),
                       "pid": os.getpid(), "run": run}).encode()
    return _frame(_END, 0, body)


def ranges_of(positions: Sequence[int]) -> array:
    """Sorted-or-not positions as ``start, stop`` pairs of their consecutive runs."""
    out = array("Q")
    if isinstance(positions, range) and positions.step == 1:
        if len(positions):
            out.extend((positions.start, positions.stop))
        return out
    start = prev = None
    for p in positions:
        if prev is not None and p == prev + 1:
            prev = p
            continue
        if start is not None:
            out.extend((start, prev + 1))
        start = prev = p
    if start is not None:
        out.extend((start, prev + 1))
    return out


# -- reading -------------------------------------------------------------

def parse_complete(tail: bytes) -> tuple[str, int, int] | None:
    """``(items_hash, n_items, n_distinct)`` if ``tail`` (the log's last
    :data:`COMPLETE_SIZE` bytes) is a valid COMPLETE record."""
    if len(tail) != COMPLETE_SIZE:
        return None
    if _valid_at(memoryview(tail), 0) != COMPLETE_SIZE or tail[2] != _COMPLETE:
        return None
    items_hash, n_items, n_distinct = _COMPLETE_BODY.unpack_from(tail, _HEADER.size)
    return items_hash.decode("ascii"), n_items, n_distinct


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


def scan(data: bytes, *, results: bool, skip_damaged: bool = False) -> Contents:
    """Parse a log image. See the module docstring for the damage rules.

    ``results``: also load the results of DONE records (SPAN records keep
    theirs as pickles, read by :func:`results_for`).
    """
    buf = memoryview(data)
    c = Contents(key_results={} if results else None)
    run = ""
    pos, n = 0, len(buf)
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
            c.damaged += 1
            pos = following
            continue
        _magic, kind, flags, _length, _crc = _HEADER.unpack_from(buf, pos)
        payload = buf[pos + _HEADER.size:end]
        if kind == _SPAN:
            list_hash, run_id, n_ints = _SPAN_HEAD.unpack_from(payload, 0)
            start = _SPAN_HEAD.size
            ranges = array("Q")
            ranges.frombytes(payload[start:start + 8 * n_ints])
            blob = payload[start + 8 * n_ints:] if flags & _HAS_RESULTS else None
            span = Span(list_hash.decode("ascii"), ranges, blob, run_id.decode("ascii"))
            c.spans.append(span)
            if c.failures:
                # Failures recorded before these positions were done are superseded,
                # as RunStore.record_span drops them when it writes this record.
                _clear_failures(c, span)
        elif kind == _DONE:
            (names_len,) = _U32.unpack_from(payload, 0)
            done_names = pickle.loads(payload[4:4 + names_len])
            c.done_keys.update(dict.fromkeys(done_names, run))
            if c.key_results is not None and flags & _HAS_RESULTS:
                c.key_results.update(zip(done_names, pickle.loads(payload[4 + names_len:])))
        elif kind == _FAIL:
            for row in pickle.loads(payload):
                failure = _failure(row)
                c.failures[failure.key] = failure
        elif kind == _LIST:
            c.lists[bytes(payload[:32]).decode("ascii")] = payload[32:]
        elif kind == _RUN:
            try:
                fp = json.loads(bytes(payload))
                run = fp.get("run", "")
                c.runs[run] = fp
            except ValueError:
                pass
        elif kind == _FORGET:
            _forget(c, *pickle.loads(payload))
        elif kind == _END:
            try:
                c.last_end = json.loads(bytes(payload))
            except ValueError:
                c.last_end = None
        c.records += 1
        pos = end
    c.valid_bytes, c.torn_bytes = pos, n - pos
    for key in [k for k in c.failures if k in c.done_keys]:
        del c.failures[key]  # done since (by key; by position: see _clear_failures)
    return c


def _clear_failures(c: Contents, span: Span) -> None:
    keys = c.keys_of(span.list_hash)
    if keys is None:
        return
    failures = c.failures
    for i in span.positions():
        if failures.pop(keys[i], None) is not None and not failures:
            return


def _forget(c: Contents, what: str, keys: list) -> None:
    if what == "all":
        c.done_keys.clear()
        c.spans.clear()
        c.failures.clear()
        if c.key_results is not None:
            c.key_results.clear()
        return
    if what == "failed":
        c.failures.clear()
        return
    gone = set(keys)
    for k in gone:
        c.done_keys.pop(k, None)
        c.failures.pop(k, None)
        if c.key_results is not None:
            c.key_results.pop(k, None)
    for list_hash in {s.list_hash for s in c.spans if not s.undo}:
        list_keys = c.keys_of(list_hash)
        if list_keys is None:
            continue
        positions = [i for i, k in enumerate(list_keys) if k in gone]
        if positions:
            c.spans.append(Span(list_hash, ranges_of(positions), undo=True))
