"""Calling ``save_callback``: in a thread of its own, so that no stop waits for it.

The manager thread (:mod:`nbmplock._runner`) cuts results into batches of
``save_batch`` and puts them here. The saver thread hands each batch to
``save_callback``, in order and never two at once, and records the batch done
in the run store as soon as the call returned: an item is done only after its
result was saved. The manager is therefore never blocked by the user's
callback: a Stop is seen while a slow save runs, a Force stop leaves a hung
save behind, and the workers keep computing meanwhile (up to the bound on
unsaved results that the runner applies).

The handshake: one lock with one condition, ``_cond``, over every field below.

``_todo``
    Batches not yet handed to ``save_callback``. The manager appends, the
    saver pops.
``_closed``
    No more batches come; the saver returns once ``_todo`` is empty.
``_abandoned``
    The manager left without waiting (Force stop, an error): the saver drops
    ``_todo``, records nothing more, and returns after its call, if that ever
    returns. Recording happens under ``_cond``, so once :meth:`abandon`
    returned the store is never written by this thread again.
``_busy``
    Items the saver holds: in the ``save_callback`` call, or saved and not yet
    recorded (see "Recording" below).
``_deadline``
    Set by a stop: no call starts that would, at the pace of the longest
    call so far, end after it; the batches left are dropped (:attr:`dropped`).

Recording: each call's batch is recorded done after the call returned, and
consecutive calls share one record while more batches are queued (up to
:data:`RECORD_EVERY` seconds of calls or :data:`RECORD_BATCHES` batches):
a record costs a write and a wake-up of the run store's fsync thread, which
at ``save_batch=10`` cost more than the trivial callback itself. A batch is
never recorded before its call returned; the queue running empty, a stop, a
close or an error records what is held at once. A Force stop records what is
held before it leaves (:meth:`abandon`); only a kill can leave saved batches
unrecorded: they run again, as a call in progress would.

The saver waits only in ``while not (_todo or _closed or _abandoned):
wait()``, and every change of those fields is made under ``_cond`` followed by
``notify``: no wake-up is lost. The manager never waits on ``_cond``: it
waits in its backend's ``wait``, which ``wake`` interrupts through a pipe
(a byte written stays readable until the next wait drains it). The saver
calls ``wake`` after it updated the fields under ``_cond``, whenever it went
idle or hit an error; the manager reads the fields after every wait. So the
manager cannot miss the saver going idle. Progress while the saver works is
read by the manager at its publish interval, without a wake-up.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from ._errors import add_note

#: Consecutive save calls share one done record for at most this many seconds ...
RECORD_EVERY = 0.05
#: ... or this many batches, whichever comes first.
RECORD_BATCHES = 16

#: Saves that never returned, by run directory: a new run on that directory
#: would call save_callback while the old call may still be running.
_abandoned_calls: dict[str, threading.Thread] = {}
_abandoned_lock = threading.Lock()


def abandoned_call(out_path: str, wait: float = 0.0) -> threading.Thread | None:
    """The thread of a save_callback call on ``out_path`` abandoned and still running.

    Waits up to ``wait`` seconds for it to end (polling: ``Thread.join`` is not
    safe against Ctrl-C in the caller's thread on Python 3.11).
    """
    with _abandoned_lock:
        thread = _abandoned_calls.get(out_path)
    deadline = time.monotonic() + wait
    while thread is not None and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if thread is not None and not thread.is_alive():
        with _abandoned_lock:
            if _abandoned_calls.get(out_path) is thread:
                del _abandoned_calls[out_path]
        thread = None
    return thread


class Saver:
    """The thread that calls ``save_callback(data_path, results, names)``.

    ``record(positions, results)`` writes the done record; ``wake()`` interrupts
    the manager's wait. Counters read by the manager: :attr:`saved` (items
    recorded done) and :attr:`cleared` (of them, items that had a failure
    recorded), written only by the saver thread.
    """

    def __init__(self, callback: Callable, data_path: str, *,
                 record: Callable[[list, list], int], wake: Callable[[], None],
                 out_path: str, items: Sequence):
        self._callback = callback
        self._data_path = data_path
        self._items = items  # what save_callback gets as data_names, by position
        self._buf_positions: list = []  # manager side: results waiting to fill a batch
        self._buf_results: list = []
        self._record = record
        self._wake = wake
        self._out_path = out_path
        self._cond = threading.Condition(threading.Lock())
        self._todo: deque[tuple[list, list]] = deque()
        self._todo_items = 0
        self._closed = False
        self._abandoned = False
        self._busy = 0  # items in the call being made, or saved and not yet recorded
        self._held: tuple[list, list] = ([], [])  # saved, not yet recorded (saver thread)
        self._held_batches = 0
        self._held_since = 0.0
        self._deadline: float | None = None
        self.dropped = 0
        self.saved = 0
        self.cleared = 0
        self.error: BaseException | None = None
        self.longest_call = 0.0
        self.seconds_per_item: float | None = None
        self._thread: threading.Thread | None = None

    # -- the manager's side ----------------------------------------------
    def add(self, positions, results: list, batch: int) -> None:
        """Results of finished items (by position): handed over in batches of
        ``batch``; the last, short batch waits for :meth:`finish`."""
        self._buf_positions.extend(positions)
        self._buf_results.extend(results)
        full = len(self._buf_positions) - len(self._buf_positions) % batch
        if full:
            bp, br = self._buf_positions, self._buf_results
            self.put_many([(bp[i:i + batch], br[i:i + batch]) for i in range(0, full, batch)])
            del bp[:full], br[:full]

    @property
    def unsaved(self) -> int:
        """Finished items not yet recorded done: buffered, queued or being saved."""
        return len(self._buf_positions) + self.pending

    def finish(self, stop_deadline: float | None, keep_buffer: bool = True) -> None:
        """No more results: hand over the last batch (unless ``keep_buffer`` is
        False) and let the thread end once it has saved what it holds.
        ``stop_deadline``: a stop, see :meth:`finish_by`."""
        if self._buf_positions and keep_buffer and self.error is None:
            self.put(self._buf_positions, self._buf_results)
        self._buf_positions, self._buf_results = [], []
        if stop_deadline is not None:
            self.finish_by(stop_deadline)
        self.close()

    def abandon_all(self) -> list[str]:
        """A Force stop (or an error): :meth:`abandon`, and what it left, in words."""
        queued = len(self._buf_positions) + self.drop_pending()
        self._buf_positions, self._buf_results = [], []
        running = self.abandon()
        notes = []
        if running:
            notes.append(f"a save_callback call ({running:,} items) had not returned and was "
                         "abandoned: its items are not recorded done (if it returns, it may "
                         "have saved them anyway, and they run again on resume)")
        if queued:
            notes.append(f"{queued:,} finished items were not handed to save_callback (stopped "
                         "by force); they are not recorded done and run again on resume")
        return notes

    def put(self, positions: list, results: list) -> None:
        self.put_many([(positions, results)])

    def put_many(self, batches: list[tuple[list, list]]) -> None:
        """Queue batches ``(positions, results)`` for save_callback, in order."""
        with self._cond:
            if self._closed or self._abandoned or self.error is not None:
                return
            self._todo.extend(batches)
            self._todo_items += sum(len(positions) for positions, _ in batches)
            self._cond.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="nbmplock-save")
            self._thread.start()

    @property
    def pending(self) -> int:
        """Items handed over and not yet recorded done (queued or in the call)."""
        with self._cond:
            return self._todo_items + self._busy

    @property
    def idle(self) -> bool:
        """Nothing queued and no call running (or the saver was abandoned)."""
        with self._cond:
            return self._abandoned or (not self._todo and not self._busy)

    def finish_by(self, deadline: float) -> None:
        """A stop: start no call that would end after ``deadline`` (time.monotonic)."""
        with self._cond:
            self._deadline = deadline
            self._cond.notify()

    def drop_pending(self) -> int:
        """Forget the batches not yet handed to save_callback; returns their items."""
        with self._cond:
            dropped = self._todo_items
            self._todo.clear()
            self._todo_items = 0
            return dropped

    def close(self) -> None:
        """No more batches: the thread returns once it has saved what it holds."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def abandon(self) -> int:
        """Leave now: drop what is queued; a call in progress records nothing.

        Returns how many items were in the call that is left running (0 when
        none was): those are not recorded done.
        """
        with self._cond:
            try:
                self._record_held_locked()  # their calls returned: recorded, by this thread
            finally:
                self._abandoned = True
                self._todo.clear()
                self._todo_items = 0
                busy = self._busy
            self._cond.notify()
        thread = self._thread
        if busy and thread is not None and thread.is_alive():
            with _abandoned_lock:
                _abandoned_calls[self._out_path] = thread
        return busy

    # -- the saver thread ------------------------------------------------
    def _loop(self) -> None:
        try:
            while self._save_one():
                pass
        except BaseException as exc:  # noqa: BLE001 - e.g. the store's write failed
            with self._cond:
                if self.error is None:
                    self.error = exc
                self._fail_locked()
        finally:
            self._wake()  # the manager sees this thread idle (or failed) at once

    def _fail_locked(self) -> None:
        self._busy = 0
        self._held = ([], [])
        self._held_batches = 0
        self._todo.clear()
        self._todo_items = 0

    def _record_held_locked(self) -> None:
        """Record the batches saved and not yet recorded (under ``_cond``)."""
        positions, results = self._held
        if positions:
            self._held = ([], [])
            self._held_batches = 0
            self.cleared += self._record(positions, results)
            self.saved += len(positions)
            self._busy -= len(positions)

    def _save_one(self) -> bool:
        """Save one batch (and record it, or hold it for the next record);
        False when the thread should return."""
        cond = self._cond
        with cond:
            while not (self._todo or self._closed or self._abandoned):
                cond.wait()  # put(), close() or abandon() notifies
            if self._abandoned:
                return False  # what is held is not recorded: it runs again
            if not self._todo:
                self._record_held_locked()  # closed with nothing left
                return False
            if (self._deadline is not None
                    and time.monotonic() + self.longest_call > self._deadline):
                self._record_held_locked()
                self.dropped += self._todo_items  # a stop: not saved, so not done
                self._todo.clear()
                self._todo_items = 0
                return False
            positions, results = self._todo.popleft()
            self._todo_items -= len(positions)
            self._busy += len(positions)
        started = time.monotonic()
        names = [self._items[p] for p in positions]
        try:
            self._callback(self._data_path, results, names)
        except BaseException as exc:  # noqa: BLE001 - the run fails with it
            add_note(exc, f"nbmplock: raised by save_callback; these {len(names)} items "
                          "are not recorded done and run again on resume")
            with cond:
                if not self._abandoned:
                    self._busy -= len(positions)
                    self._record_held_locked()  # the calls before it did return
            raise
        now = time.monotonic()
        seconds = now - started
        with cond:
            if self._abandoned:
                return False  # a Force stop left: this batch is not recorded
            held_positions, held_results = self._held
            if not held_positions:
                self._held_since = started
            held_positions.extend(positions)
            if results is not None:
                held_results.extend(results)
            self._held_batches += 1
            if (not self._todo or self._deadline is not None or self._closed
                    or self._held_batches >= RECORD_BATCHES
                    or now - self._held_since >= RECORD_EVERY):
                self._record_held_locked()
            self.longest_call = max(self.longest_call, seconds)
            per_item = seconds / len(names)
            self.seconds_per_item = per_item if self.seconds_per_item is None else (
                0.5 * per_item + 0.5 * self.seconds_per_item)
            went_idle = not self._todo
        if went_idle:
            self._wake()
        return True
