"""What identifies a run's work, and its item list, as hashes.

The *work* is what can change a result: the ``process`` function (its source,
or bytecode, and the functions and plain values of the notebook or
``__main__`` it uses), ``init_function`` (the same), ``shared_data`` (a hash
of its pickle) and the batch size. Its hash, cut to 16 characters, is the
run id every done record carries, so a later run can tell what was done by
other work (``on_change="rerun"``). The item list is known by the hash of its
keys. A resume compares the fingerprint with the last run's (``job.json``)
and says in words what changed.

``shared_data`` that cannot be pickled is not hashed (its changes cannot be
seen; the fingerprint says so); big data is hashed whole (BLAKE2b reads about
a gigabyte a second), once per run.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import marshal
import operator
import pickle
import types
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

#: The parts of the work, in the words a change is reported with.
PARTS = {"function_hash": "the process function",
         "init_hash": "init_function",
         "shared_hash": "shared_data",
         "batch_size": "batch_size"}
UNHASHABLE = "unhashable"


@dataclass(frozen=True)
class Fingerprint:
    function: str
    function_hash: str
    n_items: int
    items_hash: str
    n_distinct: int | None = None
    init_hash: str = ""
    shared_hash: str = ""
    batch_size: int | None = None
    run: str = ""  # the id of the work: see work_id

    def work(self) -> dict:
        """The fingerprint of the work alone (what a RUN record holds)."""
        return {k: v for k, v in asdict(self).items()
                if k in PARTS or k in ("function", "run")}

    @classmethod
    def from_json(cls, data: dict) -> Fingerprint:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def changes_from(self, old: Fingerprint | None) -> list[str]:
        """Plain-language differences from the run recorded before (work first)."""
        if old is None:
            return []
        changes = self.work_changes_from(old)
        if old.items_hash != self.items_hash:
            changes.append(f"the item list changed ({old.n_items} -> {self.n_items} items)")
        return changes

    def work_changes_from(self, old: Fingerprint) -> list[str]:
        changes = []
        if old.function_hash != self.function_hash:
            if old.function == self.function:
                changes.append(f"the process function {self.function!r} (or a function or "
                               "value of the notebook it uses) changed")
            else:
                changes.append(f"the process function changed ({old.function} -> "
                               f"{self.function})")
        # Runs recorded before these parts were fingerprinted have them empty:
        # nothing can be said about them.
        if old.init_hash and old.init_hash != self.init_hash:
            changes.append("init_function (or what it uses) changed")
        if old.shared_hash and old.shared_hash != self.shared_hash:
            changes.append("shared_data changed" if UNHASHABLE not in (
                old.shared_hash, self.shared_hash) else
                "shared_data may have changed (it cannot be pickled, so it is not compared)")
        if old.run and old.batch_size != self.batch_size:
            changes.append(f"batch_size changed ({old.batch_size} -> {self.batch_size})")
        return changes


def unwrap(fn: Callable) -> Callable:
    """The function a partial, a bound method or a callable object stands for."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)) and callable(fn):
        call = getattr(type(fn), "__call__", None)
        if call is not None and not isinstance(fn, type):
            return call
    return fn


def function_name(fn: Callable) -> str:
    """A readable name of ``fn`` (partials and callable objects unwrapped)."""
    target = unwrap(fn)
    return (getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
            or type(target).__qualname__)


def _code_text(target: Any) -> bytes:
    try:
        return inspect.getsource(target).encode()
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        return marshal.dumps(code) if code is not None else repr(target).encode()


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _is_users(obj: Any) -> bool:
    """Defined in a notebook or a script's ``__main__`` (not a library's)."""
    return getattr(obj, "__module__", None) == "__main__"


def _feed(h, fn: Any, seen: set, depth: int) -> None:
    """Hash the source of ``fn`` and what it uses of the notebook's names."""
    target = unwrap(fn)
    if id(target) in seen:
        return
    seen.add(id(target))
    h.update(_code_text(target))
    if isinstance(fn, functools.partial):  # its bound arguments are part of the work
        h.update(_value_hash((fn.args, sorted(fn.keywords.items()))).encode())
    func = getattr(target, "__func__", target)
    code = getattr(func, "__code__", None)
    if code is None or depth > 5 or not _is_users(func):
        return
    namespace = getattr(func, "__globals__", {})
    for name in sorted(_global_names(code)):
        if name not in namespace:
            continue
        value = namespace[name]
        h.update(name.encode())
        if isinstance(value, types.ModuleType):
            continue  # a library: its version is not the notebook's to change
        if (inspect.isfunction(value) or inspect.isclass(value)) and _is_users(value):
            _feed(h, value, seen, depth + 1)
        elif callable(value):
            continue  # a library's function or class
        else:
            h.update(_value_hash(value).encode())


def _value_hash(value: Any) -> str:
    try:
        data = pickle.dumps(value, protocol=4)
    except Exception:  # noqa: BLE001
        try:
            import dill
            data = dill.dumps(value, protocol=4, recurse=True)
        except Exception:  # noqa: BLE001 - cannot be compared
            return UNHASHABLE
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def function_identity(fn: Callable) -> tuple[str, str]:
    """A name and a hash of ``fn``: its source (or bytecode), and the functions,
    classes and plain values of the notebook (``__main__``) it uses."""
    target = unwrap(fn)
    name = getattr(target, "__qualname__", None) or repr(target)
    h = hashlib.blake2b(digest_size=16)
    _feed(h, fn, set(), 0)
    return name, h.hexdigest()


def work_fingerprint(process: Callable, init_function: Callable | None, shared_data: Any,
                     batch_size: int | None, *, n_items: int, items_hash: str,
                     n_distinct: int) -> Fingerprint:
    name, fn_hash = function_identity(process)
    init_hash = function_identity(init_function)[1] if init_function is not None else "-"
    shared_hash = _value_hash(shared_data)
    run = hashlib.blake2b(f"{fn_hash}|{init_hash}|{shared_hash}|{batch_size}".encode(),
                          digest_size=8).hexdigest()
    return Fingerprint(name, fn_hash, n_items, items_hash, n_distinct, init_hash, shared_hash,
                       batch_size, run)


_SLICE = 100_000


class _Hasher:
    """Feeds buffers to a hash in order; for a long list, in a thread of its own.

    ``hashlib`` lets go of the GIL while it hashes a big buffer, so a helper
    thread hashes one slice of the keys while the caller encodes the next
    (on W5, resuming 1,000,000 items, the hashing was a quarter of the call).
    Invariant: one thread feeds ``h`` (the helper, or the caller when
    ``threaded`` is false), in the order the buffers were given; leaving the
    ``with`` waits until every buffer is fed (or the helper failed, which is
    then raised), so ``h.hexdigest()`` after it sees them all. At most two
    slices wait for the helper (the caller waits for the older one first):
    on 10,000,000 keys an unbounded queue raised the peak memory by a tenth.
    """

    def __init__(self, h, threaded: bool):
        self._h = h
        self._pool = None
        self._fed: list = []
        if threaded:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="nbmplock-hash")

    def _feed(self, *buffers: bytes) -> None:
        for buf in buffers:
            self._h.update(buf)

    def __call__(self, *buffers: bytes) -> None:
        if self._pool is None:
            self._feed(*buffers)
        else:  # one worker thread: the updates run in submission order
            if len(self._fed) >= 2:  # at most two slices waiting: memory stays flat
                self._fed.pop(0).result()
            self._fed.append(self._pool.submit(self._feed, *buffers))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self._pool is None:
            return
        if exc_type is not None:  # the caller failed (Ctrl-C, say): the hash is not used
            self._pool.shutdown(wait=False, cancel_futures=True)
            return
        self._pool.shutdown(wait=True)  # every update has run
        for fed in self._fed:
            fed.result()  # raises the helper's error, if any


def value_types(values) -> set:
    """The set of the types of ``values`` (a list). One type for all
    (the usual list) is counted in C without building a set: 3 ms against 5-6 ms
    on 200,000 values."""
    if not len(values):
        return set()
    first = type(values[0])
    if operator.countOf(map(type, values), first) == len(values):
        return {first}
    return set(map(type, values))


#: The first character of a list hash made by :func:`encode_keys` from keys joined
#: by NULs; the other hashes (and those of earlier releases) are hexadecimal.
JOINED = "z"


def encode_keys(keys, all_str: bool = False, keep: bool = True,
                legacy: bool = False) -> tuple[str, list[bytes] | None]:
    """``(hash, payload)`` of an item list's keys; the payload (a list of buffers)
    is what a LIST record stores, and decodes with :func:`decode_keys`.

    ``str`` keys none of which holds a NUL character (nearly every list) are
    encoded as their UTF-8 text joined by NULs: the hash is ``z`` and 31 hex
    digits of the BLAKE2b of that text, and the payload is the text itself.
    That takes one ``join`` and one hash per slice, no per-key work in Python
    (on 200,000 short keys, 7 ms against 17 ms for the lengths-and-text
    encoding below). ``bytes`` keys (those of ints and other plain values)
    likewise, under a hash of their own. ``legacy=True``, or a key holding a
    NUL: the encoding of earlier releases, each slice's lengths and its text
    (or bytes); for ``str`` keys under the hash earlier releases gave them
    (a run directory written before keeps its hash:
    :meth:`nbmplock._plan.ItemList.known_as`). Keys of mixed types are pickled.
    ``all_str``: the caller knows every key is a ``str``.
    ``keep=False``: the hash alone (the payload is ``None``; memory stays flat).
    """
    types = {str} if all_str else value_types(keys)
    if (types <= {str} or types == {bytes}) and not legacy:
        joined = _encode_joined(keys, keep, types <= {str})
        if joined is not None:
            return joined
    if types <= {str} or types == {bytes}:
        text_keys = types <= {str}
        h = hashlib.blake2b(digest_size=16)
        h.update(str(len(keys)).encode() if text_keys else b"bytes:%d" % len(keys))
        parts = [b"S" if text_keys else b"B", len(keys).to_bytes(8, "little")]
        with _Hasher(h, len(keys) > _SLICE) as feed:
            for start in range(0, len(keys), _SLICE):
                part = keys[start:start + _SLICE]
                lengths = array("Q", map(len, part)).tobytes()
                data = ("".join(part).encode("utf-8", "surrogatepass") if text_keys
                        else b"".join(part))
                feed(lengths, data)
                if keep:
                    parts += [len(part).to_bytes(8, "little"), lengths,
                              len(data).to_bytes(8, "little"), data]
        return h.hexdigest(), parts if keep else None
    h = hashlib.blake2b(digest_size=16)
    h.update(b"keys:" + str(len(keys)).encode())
    for k in keys:
        data = k.encode("utf-8", "surrogatepass") if type(k) is str else k
        h.update((b"s" if type(k) is str else b"b") + len(data).to_bytes(8, "little") + data)
    return h.hexdigest(), [b"P", pickle.dumps(list(keys), protocol=pickle.HIGHEST_PROTOCOL)]


def _encode_joined(keys, keep: bool, text_keys: bool) -> tuple[str, list[bytes] | None] | None:
    """The NUL-joined encoding of ``str`` (or ``bytes``) keys (see :func:`encode_keys`),
    or None when a key holds a NUL (the text could not be split back into the keys).

    The hashed bytes are the keys joined by NULs (``str`` keys in UTF-8), made
    slice by slice (memory stays flat) with a NUL between slices; the payload
    is ``Z`` (``Y`` for ``bytes`` keys), the number of keys, and those same bytes.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update((b"nul-joined:%d:" if text_keys else b"nul-joined-bytes:%d:") % len(keys))
    parts = [b"Z" if text_keys else b"Y", len(keys).to_bytes(8, "little")]
    with _Hasher(h, len(keys) > _SLICE) as feed:
        for start in range(0, len(keys), _SLICE):
            part = keys[start:start + _SLICE]
            if text_keys:
                text = "\0".join(part)
                if text.count("\0") != len(part) - 1:
                    return None  # a key holds a NUL
                data = text.encode("utf-8", "surrogatepass")
            else:
                data = b"\0".join(part)
                if data.count(b"\0") != len(part) - 1:
                    return None
            if start:
                feed(b"\0", data)
            else:
                feed(data)
            if keep:
                parts += [b"\0", data] if start else [data]
    return JOINED + h.hexdigest()[:31], parts if keep else None


def decode_keys(payload) -> list:
    """The keys a LIST record's payload holds (see :func:`encode_keys`)."""
    data = memoryview(payload)
    if bytes(data[:1]) == b"P":
        return pickle.loads(data[1:])
    if bytes(data[:1]) in (b"Z", b"Y"):
        n = int.from_bytes(data[1:9], "little")
        if not n:
            return []
        keys = (str(data[9:], "utf-8", "surrogatepass").split("\0") if bytes(data[:1]) == b"Z"
                else bytes(data[9:]).split(b"\0"))
        if len(keys) != n:
            raise ValueError("a LIST record's key count does not match its keys")
        return keys
    text_keys = bytes(data[:1]) == b"S"
    n = int.from_bytes(data[1:9], "little")
    keys: list = []
    pos = 9
    while len(keys) < n:
        count = int.from_bytes(data[pos:pos + 8], "little")
        lengths = array("Q")
        lengths.frombytes(data[pos + 8:pos + 8 + 8 * count])
        pos += 8 + 8 * count
        size = int.from_bytes(data[pos:pos + 8], "little")
        text = bytes(data[pos + 8:pos + 8 + size])
        if text_keys:
            text = text.decode("utf-8", "surrogatepass")
        pos += 8 + size
        at = 0
        for length in lengths:
            keys.append(text[at:at + length])
            at += length
    return keys
