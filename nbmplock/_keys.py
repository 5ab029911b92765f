"""Every item's key: the identity under which it is recorded done, failed and stored.

* A ``str`` item is its own key, byte for byte: every run directory written
  before items could be anything else resumes unchanged.
* ``key=`` (a function of the item returning a ``str``, or the name of a field
  of mapping, named-tuple or dataclass items) gives the key of every item.
* Otherwise an item built from ``int``, ``float``, ``bool``, ``None``,
  ``bytes``, ``str``, ``pathlib`` paths, ``datetime``/``date``/``time``/
  ``timedelta``, ``Decimal``, ``UUID``, and tuples, lists, dicts, sets,
  frozensets, named tuples and dataclasses of these, gets a key from a
  canonical encoding: :func:`encode`, tagged by type and length-prefixed (so
  ``1``, ``1.0``, ``True`` and ``"1"`` are four different items), hashed
  with BLAKE2b to 16 bytes; an ``int``'s key is ``b"i"`` and its decimal
  digits, unhashed (a million int items key in a tenth of a second). Such a
  key is ``bytes``, so it never equals a ``str`` key. It is the same in every
  process, on every Python from 3.10, in every run.
* Anything else (an object whose only identity is its address, an array, a
  function) has no stable key: :class:`InvalidArgumentsError` names the
  first such item's position and type, and says to pass ``key=``.

Two different items with the same key are refused too (one would be skipped
as done); equal items run once, and their results are given back for each
position.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import hashlib
import operator
import pathlib
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._errors import InvalidArgumentsError
from ._fingerprint import value_types
from ._text import clip, short_repr

Key = str | bytes

_LEN = struct.Struct("<Q")


class Unkeyable(TypeError):
    """Raised by :func:`encode` for a value with no canonical encoding."""

    def __init__(self, value: object):
        self.value = value
        super().__init__(type(value).__name__)


def _str(tag: bytes, text: str) -> bytes:
    data = text.encode("utf-8", "surrogatepass")
    return tag + _LEN.pack(len(data)) + data


def encode(value: Any) -> bytes:
    """The canonical bytes of ``value``; :class:`Unkeyable` if there are none."""
    t = type(value)
    if t is str:
        return _str(b"s", value)
    if t is bool:
        return b"T" if value else b"F"
    if t is int:
        return _str(b"i", str(value))
    if t is float:
        return b"f" + struct.pack("<d", value) if value == value else b"fnan"
    if value is None:
        return b"N"
    if t is bytes:
        return b"b" + _LEN.pack(len(value)) + value
    if t is tuple or t is list:
        return (b"(" if t is tuple else b"[") + _LEN.pack(len(value)) + b"".join(map(encode, value))
    if t is dict:
        parts = sorted(encode(k) + encode(v) for k, v in value.items())
        return b"{" + _LEN.pack(len(parts)) + b"".join(parts)
    if t is frozenset or t is set:
        parts = sorted(map(encode, value))
        return b"<" + _LEN.pack(len(parts)) + b"".join(parts)
    if isinstance(value, tuple) and hasattr(t, "_fields"):  # a named tuple
        return _str(b"n", t.__qualname__) + encode(tuple(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = tuple((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        return _str(b"c", t.__qualname__) + encode(fields)
    if isinstance(value, pathlib.PurePath):
        return _str(b"p", value.as_posix())
    if isinstance(value, datetime.datetime):
        return _str(b"D", value.isoformat())
    if isinstance(value, datetime.date):
        return _str(b"d", value.isoformat())
    if isinstance(value, datetime.time):
        return _str(b"t", value.isoformat())
    if isinstance(value, datetime.timedelta):
        return _str(b"e", f"{value.days},{value.seconds},{value.microseconds}")
    if isinstance(value, decimal.Decimal):
        return _str(b"m", str(value))
    if isinstance(value, uuid.UUID):
        return b"u" + value.bytes
    if isinstance(value, (int, float, str, bytes)):  # subclasses: by the base value
        for base in (bool, int, float, str, bytes):
            if isinstance(value, base):
                return encode(base(value))
    raise Unkeyable(value)


def _a(noun: str) -> str:
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def encoded_key(value: Any) -> bytes:
    """The key of an item that is not a ``str``: an integer's is ``b"i"`` and its
    digits (short, and cheap to make for a million of them); any other's is the
    16-byte BLAKE2b hash of :func:`encode`."""
    if isinstance(value, int) and not isinstance(value, bool):
        return b"i%d" % value
    return hashlib.blake2b(encode(value), digest_size=16).digest()


def _int_keys(items: Sequence) -> list[bytes]:
    """Keys of a list of plain ints (see :func:`encoded_key`)."""
    return [b"i%d" % i for i in items]


def field_getter(name: str) -> Callable[[Any], Any]:
    """A key function reading field ``name`` of mapping, named-tuple or dataclass items."""
    item_get = operator.itemgetter(name)
    attr_get = operator.attrgetter(name)

    def get(item: Any) -> Any:
        if isinstance(item, Mapping):
            return item_get(item)
        return attr_get(item)
    get.__qualname__ = f"key={name!r}"
    return get


def compute_keys(items: Sequence, key: Callable | str | None) -> list[Key]:
    """The key of every item, in order; raises :class:`InvalidArgumentsError` naming
    the first item without one (two items with one key: :func:`check_same`)."""
    if key is None:
        types = value_types(items)
        if types == {str}:
            keys: list = items  # their own keys (the caller's list, not copied again)
        elif types == {int}:
            keys = _int_keys(items)
        else:
            keys = []
            append = keys.append
            for index, item in enumerate(items):
                if type(item) is str:
                    append(item)
                    continue
                try:
                    append(encoded_key(item))
                except Unkeyable as exc:
                    raise InvalidArgumentsError(
                        "data_list", "items that have a stable key (str, numbers, paths, "
                        "dates, tuples, dicts and dataclasses of these), or key=",
                        f"the item at index {index} is {_a(type(item).__name__)} "
                        f"({short_repr(item, 80)})" + (
                            f", holding {_a(type(exc.value).__name__)}"
                            if exc.value is not item else "")
                        + ", which has no stable identity: pass key=, a function of the "
                        "item returning a str (or the name of a field of the items)") from None
    else:
        getter = field_getter(key) if isinstance(key, str) else key
        keys = []
        for index, item in enumerate(items):
            try:
                value = getter(item)
            except Exception as exc:
                raise InvalidArgumentsError(
                    "key", "a function of the item returning a str, or the name of a field "
                    "of the items",
                    f"it raised {type(exc).__name__}: {clip(str(exc), 200)} on the "
                    f"item at index {index} ({short_repr(item, 80)})") from None
            if type(value) is not str:
                raise InvalidArgumentsError(
                    "key", "a function of the item returning a str, or the name of a field "
                    "of the items holding a str",
                    f"it returned a {type(value).__name__} ({short_repr(value, 80)}) for the "
                    f"item at index {index}")
            keys.append(value)
    return keys


def check_same(items: Sequence, keys: Sequence, first: int, index: int) -> None:
    """Items ``first`` and ``index`` have one key: refuse them unless they are equal
    (equal items run once; different ones would be skipped as done)."""
    a, b = items[first], items[index]
    try:
        same = a is b or bool(a == b)
    except Exception:  # noqa: BLE001 - cannot compare: they are not the same item
        same = False
    if not same:
        raise InvalidArgumentsError(
            "key", "a different key for every different item",
            f"the items at index {first} ({short_repr(a, 60)}) and {index} "
            f"({short_repr(b, 60)}) have the same key {short_repr(keys[index], 60)}; one "
            "of them would be skipped as done")
