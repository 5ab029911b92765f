"""Whether an item that failed runs again, and when: attempts counted per item.

* ``max_retries``: more attempts per item, in this run.
* ``retry_on``: exception types worth a retry; any other exception fails at
  once (a bug must not cost ``max_retries`` x the model load). A timeout counts
  as a ``TimeoutError`` (an :class:`~nbmplock.ItemTimeoutError`); a dead
  worker is always worth a retry (it is not the function's answer).
* ``retry_delay``: the k-th retry of an item waits a random time between 0 and
  ``min(cap, retry_delay * 2**(k-1))`` ("full jitter": items that failed
  together do not come back together), with ``cap`` = max(60 s, retry_delay).
* An exception with a ``retry_after`` attribute (seconds, as an HTTP 429/503
  ``Retry-After`` header says) waits at least that long (at most an hour).

While it waits, an item holds no worker: it sits in :class:`Waiting`, which
the manager thread empties into the work queue as items fall due.
"""

from __future__ import annotations

import heapq
import math
import random

RETRY_DELAY_CAP = 60.0
MAX_RETRY_AFTER = 3600.0


def retry_after(exc: BaseException | None) -> float | None:
    """The ``retry_after`` seconds an exception carries, if it is a usable number."""
    value = getattr(exc, "retry_after", None)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    if math.isnan(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_RETRY_AFTER)


class RetryPolicy:
    """``max_retries`` more attempts per item, in this run (manager thread only)."""

    def __init__(self, max_retries: int, retry_delay: float | None = None,
                 retry_on: tuple | None = None, rng: random.Random | None = None):
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.retry_on = retry_on
        self._rng = rng or random.Random()
        self._attempts: dict = {}

    def failed(self, key) -> int:
        """Count a failed attempt of ``key``; returns its attempts so far in this run."""
        attempts = self._attempts[key] = self._attempts.get(key, 0) + 1
        return attempts

    def again(self, attempts: int) -> bool:
        """Is an item that failed ``attempts`` times worth another attempt?"""
        return attempts <= self.max_retries

    def worth(self, exc: BaseException | None) -> bool:
        """Does ``exc`` (None: the worker died) deserve a retry under ``retry_on``?"""
        return self.retry_on is None or exc is None or isinstance(exc, self.retry_on)

    def delay(self, attempts: int, exc: BaseException | None) -> float:
        """Seconds before the next attempt of an item that failed ``attempts`` times."""
        wait = 0.0
        if self.retry_delay:
            cap = max(RETRY_DELAY_CAP, self.retry_delay)
            wait = self._rng.uniform(0.0, min(cap, self.retry_delay * 2 ** (attempts - 1)))
        after = retry_after(exc)
        return max(wait, after) if after is not None else wait


class Waiting:
    """Positions waiting for their retry, by due time (manager thread only)."""

    def __init__(self):
        self._heap: list[tuple[float, int, int]] = []
        self._n = 0

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, due: float, position: int) -> None:
        self._n += 1
        heapq.heappush(self._heap, (due, self._n, position))

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def take_due(self, now: float) -> list[int]:
        """Positions due at ``now``, removed, oldest due first."""
        out = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        return out

    def clear(self) -> int:
        n = len(self._heap)
        self._heap.clear()
        return n
