"""Waiting for a run's end, and handing a run over to its thread, safe under Ctrl-C.

CPython 3.11's ``threading`` is not interrupt-safe: a KeyboardInterrupt just
after ``Event.wait`` took its Condition's lock leaves the lock held, and one
interrupting ``Thread.join`` while the thread runs releases the thread's own
lock (the thread counts as ended while it still runs). The main thread of a
script or a kernel waits on a Job, and Ctrl-C lands there: these two
primitives leave nothing locked that anyone else needs wherever it lands.
"""

from __future__ import annotations

import threading


class Handoff:
    """Who owns a run being launched: the job's new thread, or the caller of
    start() when it was interrupted first. Exactly one of them claims it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: str | None = None

    def claim(self, who: str) -> bool:
        with self._lock:
            if self._owner is None:
                self._owner = who
            return self._owner == who


class RunEnd:
    """The end of a run, for threads to wait on; Ctrl-C may land anywhere in wait().

    Neither ``threading.Event`` nor ``Thread.join`` survive that in Python
    3.11: a KeyboardInterrupt just after ``Event.wait`` took its Condition's
    lock (in ``Condition.__enter__``) leaves the lock held, and the run's end
    and every later wait hang; one interrupting ``Thread.join`` while the
    thread runs releases the thread's own lock, and the thread counts as
    ended while it still runs. Here each waiter blocks on a lock of its own,
    which the job's thread releases at the end: an interrupted waiter leaves
    nothing locked that anyone else needs.
    """

    def __init__(self) -> None:
        self.ended = True
        self._waiters: list = []

    def begin(self) -> None:
        self._waiters = []
        self.ended = False

    # Invariant (no lost wake-up): end() sets ``ended`` before it copies the
    # waiter list, and a waiter appends its lock before it reads ``ended``. So
    # a waiter either is in the copy (and released) or reads ``ended`` True
    # (and does not block). begin() runs before the job's thread starts.
    def end(self) -> None:
        self.ended = True
        for lock in list(self._waiters):
            try:
                lock.release()
            except RuntimeError:  # its waiter was interrupted and left
                pass

    def wait(self, timeout: float | None = None) -> bool:
        if self.ended:
            return True
        lock = threading.Lock()
        lock.acquire()
        self._waiters.append(lock)
        try:
            if not self.ended:  # end() may have run before the append
                lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout))
        finally:
            try:
                self._waiters.remove(lock)
            except ValueError:
                pass
        return self.ended
