"""CRC-32 of a record whose results pickle a worker already checksummed.

A chunk's results come back from a worker as one pickle, which the parent
writes to the log as it came. The worker computes the pickle's CRC-32 (on a
core of its own); the parent combines it with the CRC of the record's head
(:func:`crc32_combine`) instead of reading the megabytes again. The CRC
stored is exactly ``zlib.crc32`` of the record, so the log's format and its
readers do not change.
"""

from __future__ import annotations

import functools


#: A worker sends the CRC-32 of a results pickle this big or bigger; below it,
#: reading the pickle again in the parent costs less than combining CRCs
#: (zlib.crc32 runs at about 3 GB/s here; a combine for a new length, 0.1 ms).
WORKER_CRC_MIN = 256 << 10


class Pickled(bytearray):
    """A chunk's results pickle as a worker sent it, with ``crc``: the CRC-32 the
    worker computed over these very bytes (None for a pickle under
    :data:`WORKER_CRC_MIN`). A record that ends with one that has a CRC combines
    it with the rest's instead of reading the megabytes again (on W3 the
    parent's CRC pass was a fifth of its time); the bytes written and the CRC
    stored are exactly what :func:`zlib.crc32` over the record gives."""

    __slots__ = ("crc",)


_POLY = 0xEDB88320  # CRC-32 (zlib's), reflected


def _multmodp(a: int, b: int) -> int:
    """``a * b`` modulo the CRC-32 polynomial (zlib's ``multmodp``)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    p, table = 1 << 30, []  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()  # x^(2^k) modulo the polynomial


@functools.lru_cache(maxsize=64)
def _shift(len2: int) -> int:
    """``x^(8 * len2)`` modulo the polynomial: moves a CRC past ``len2`` bytes.
    Cached: the pickles of equal chunks of equal results have one length."""
    p, k, n = 1 << 31, 3, len2
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc1 = zlib.crc32(a)``, ``crc2 = zlib.crc32(b)``
    and ``len2 = len(b)`` (zlib's ``crc32_combine``; about 0.1 ms for a new
    ``len2``, whatever its size, 0.01 ms for one seen lately)."""
    return _multmodp(_shift(len2), crc1) ^ crc2
