"""What the manager hands out next, and in chunks of what size.

:class:`ChunkSizer` turns measurements (seconds per item, result bytes per
item, the saver's seconds per item) into a chunk size; :class:`WorkQueue`
holds what is left to dispatch: items to retry first, then the rests of chunks
given back by work stealing, then the pending items in order. Both are used by
the manager thread only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

#: A chunk's expected run time, from the measured time per item. Stop and
#: Ctrl-C do not wait for a chunk (workers return after the current item), and
#: an idle worker takes back part of a busy one's chunk at the end (work
#: stealing, see _engine), so long chunks do not unbalance skewed work. What is
#: left to trade is progress granularity and the work a SIGKILLed driver
#: loses, against the round trips: on 2 cores each one wakes the parent, which
#: takes a core from a worker. With 0.5 s, W2 was level with Pool in paired
#: runs (0.2 s: 0.6 to 2.5% behind) and W4 unchanged (python -m bench.w2_anatomy).
TARGET_CHUNK_SECONDS = 0.5
MAX_CHUNK_ITEMS = 10_000
#: Results of one chunk come back in one message: keep it about a pipe's size,
#: so big results stream (the worker never blocks on a message the parent
#: cannot start on) instead of arriving as one huge pickle per chunk.
RESULT_CHUNK_BYTES = 1 << 20
_EMA = 0.5


def _ema(old: float | None, new: float) -> float:
    return new if old is None else _EMA * new + (1 - _EMA) * old


class ChunkSizer:
    """Chunk sizes from what was measured so far.

    Until the first chunk came back a chunk is one unit (an item, or a batch);
    then about :data:`TARGET_CHUNK_SECONDS` of work (the backend's own target,
    if it has one), at most :data:`RESULT_CHUNK_BYTES` of results, a chunk's
    time of saving, :data:`MAX_CHUNK_ITEMS`, the bytes a task may take, and
    half of what is left per worker, so the end is shared out.
    """

    def __init__(self, *, unit: int, fixed: int | None, items_cap: int,
                 target: float | None = None, least: int | None = None):
        self.unit = unit
        #: The smallest chunk: ``concurrency`` units when a task runs that many at once (Dask).
        self.least = max(unit, least or unit)
        self.fixed = fixed
        self.items_cap = max(1, items_cap)
        self.target = target or TARGET_CHUNK_SECONDS
        self.per_item: float | None = None
        self.result_bytes: float | None = None  # per item, in the results' pickles

    def measured(self, n_run: int, seconds: float, results_bytes: int) -> None:
        if n_run:
            self.per_item = _ema(self.per_item, seconds / n_run)
            if results_bytes:
                self.result_bytes = _ema(self.result_bytes, results_bytes / n_run)

    def size(self, workers: int, remaining: int, saving_per_item: float | None = None) -> int:
        unit = self.unit
        if self.fixed:
            return max(unit, self.fixed - self.fixed % unit)
        if self.per_item is None:
            size = self.least
        else:
            size = int(self.target / max(self.per_item, 1e-7))
            if self.result_bytes:  # about RESULT_CHUNK_BYTES of results per chunk
                size = min(size, int(RESULT_CHUNK_BYTES / self.result_bytes))
            if saving_per_item:  # a chunk's results are saved in about a chunk's time too
                size = min(size, int(self.target / saving_per_item))
            size = min(size, MAX_CHUNK_ITEMS, self.items_cap,
                       max(unit, remaining // (2 * workers)))
        return max(self.least, size - size % unit)


class WorkQueue:
    """Positions of the item list left to dispatch, and the order they go out in.

    ``pending`` is the positions to run, in order (a ``range`` when nothing
    is done yet). :meth:`take` returns the next chunk's positions: retries
    first, then rests given back, then the next slice of ``pending``.
    """

    def __init__(self, pending: Sequence[int], unit: int):
        self._pending: Sequence[int] | None = pending if len(pending) else None
        self._cursor = 0
        self._unit = unit
        self._retry: deque = deque()
        self._returned: deque = deque()  # rests of chunks given back (work stealing)
        self.dispatched = 0  # positions handed out from pending and rests (not retries)

    @property
    def exhausted(self) -> bool:
        return not self._retry and not self._returned and self._pending is None

    def take(self, size: int, workers: int) -> Sequence[int] | None:
        """The next chunk's positions, or None when nothing is left."""
        unit = self._unit
        if self._retry:
            return [self._retry.popleft() for _ in range(min(unit, len(self._retry)))]
        if self._returned:  # shared out again, whatever chunk_size says
            rest = self._returned[0]
            share = -(-len(rest) // (workers * unit)) * unit
            positions = rest[:max(unit, min(share, size))]
            if len(positions) < len(rest):
                self._returned[0] = rest[len(positions):]
            else:
                self._returned.popleft()
            self.dispatched += len(positions)
            return positions
        if self._pending is not None:
            start = self._cursor
            stop = min(start + size, len(self._pending))
            self._cursor = stop
            if stop >= len(self._pending):
                pending, self._pending = self._pending, None
            else:
                pending = self._pending
            self.dispatched += stop - start
            return pending[start:stop]
        return None

    def retry(self, positions, first: bool = False) -> None:
        """Send ``positions`` again: before everything else when ``first``."""
        if first:
            self._retry.extendleft(reversed(list(positions)))
        else:
            self._retry.extend(positions)

    def give_back(self, rest: Sequence[int]) -> None:
        """The rest of a chunk a worker returned early: it goes out again next."""
        self._returned.appendleft(rest)
        self.dispatched -= len(rest)
