"""What identifies a run's work: the function and the item list, as hashes.

A resume compares the fingerprint of the new call with the one recorded by the
last run (``job.json``) and says in words what changed.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import marshal
from array import array
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Fingerprint:
    function: str
    function_hash: str
    n_items: int
    items_hash: str
    n_distinct: int | None = None

    def changes_from(self, old: Fingerprint | None) -> list[str]:
        """Plain-language differences from the run recorded before."""
        if old is None:
            return []
        changes = []
        if old.function_hash != self.function_hash:
            if old.function == self.function:
                changes.append(f"the source of the process function {self.function!r} changed")
            else:
                changes.append(f"the process function changed ({old.function} -> {self.function})")
        if old.items_hash != self.items_hash:
            changes.append(f"the item list changed ({old.n_items} -> {self.n_items} items)")
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


def function_identity(fn: Callable) -> tuple[str, str]:
    """A name and a hash of the source (or bytecode) of ``fn``."""
    target = unwrap(fn)
    name = getattr(target, "__qualname__", None) or repr(target)
    try:
        text = inspect.getsource(target).encode()
    except (OSError, TypeError):
        code = getattr(target, "__code__", None)
        text = marshal.dumps(code) if code is not None else name.encode()
    return name, hashlib.blake2b(text, digest_size=16).hexdigest()


def items_hash(items) -> str:
    """A stable hash of the item list, injective: the lengths are hashed too.

    Computed in slices, so memory stays flat for long lists.
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(str(len(items)).encode())
    for start in range(0, len(items), 100_000):
        part = items[start:start + 100_000]
        h.update(array("Q", map(len, part)).tobytes())
        h.update("".join(part).encode("utf-8", "surrogatepass"))
    return h.hexdigest()
