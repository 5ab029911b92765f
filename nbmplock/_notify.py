"""Views are called here: on one thread of their own, never on the manager's.

Every Job has a :class:`Channel`: its subscribers (the panel, the tqdm bar,
``%%mplock --into``, a user's callback) and the events waiting for them. Any
thread posts events (the manager publishes progress, ``Job.start``/``stop``
post state changes); one long-lived daemon thread, ``nbmplock-views``, shared
by every job of the process, calls the subscribers: state events at once and
in order, progress events coalesced to at most one per :data:`MIN_INTERVAL`
per job (the output lines and failures of coalesced events are merged, never
dropped). A slow view therefore never holds up dispatch, and a re-rendered
panel costs no thread of its own.

Subscribers may be held weakly (a panel: when it is closed and dropped, it is
gone from here too). A subscriber that raises is logged and kept.

The handshake. Posting threads include the main thread, where Ctrl-C may
land between any two bytecodes, and CPython 3.11's ``Condition`` is not safe
there (an interrupt inside ``Condition.__enter__`` or ``notify`` leaves it
broken). So a post only takes a plain lock (``with _lock``, entered in C) to
change the pending events, then puts a token on a ``SimpleQueue`` (C, never
blocks). The views thread blocks only on that queue: tokens stay until taken,
so a post made while it was busy is seen on its next turn (no lost wake-up).
:meth:`flush` (the job's thread, never the main thread) waits on a Condition
over the same lock until ``delivered`` reaches the ``posted`` it read; the
views thread notifies it after each delivery, and the wait has a timeout, so
a view that blocks cannot hang the end of a run.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("nbmplock")

#: Progress events per job are delivered at most this often (seconds).
MIN_INTERVAL = 0.1


def merge(older: Any, newer: Any) -> Any:
    """One event carrying ``newer``'s numbers and both events' output and failures."""
    if not (older.output or older.failures):
        return newer
    return type(newer)(newer.kind, newer.progress, older.output + newer.output,
                       older.failures + newer.failures)


class Channel:
    """One job's subscribers and pending events (fields guarded by the notifier's lock)."""

    def __init__(self, notifier: Notifier):
        self._notifier = notifier
        self.subscribers: list = []        # (key, get) pairs; get() -> callback or None
        self.states: deque = deque()        # state events, delivered in order
        self.progress = None                # the latest progress event, coalesced
        self.next_progress = 0.0            # when a progress event may be delivered again
        self.posted = 0
        self.delivered = 0

    def subscribe(self, callback: Callable, *, weak: bool = False) -> Callable[[], None]:
        """Call ``callback(event)`` for every event; returns an unsubscribe function.

        ``weak=True`` holds it weakly (a bound method through ``WeakMethod``).
        """
        if weak:
            ref = (weakref.WeakMethod(callback) if hasattr(callback, "__self__")
                   else weakref.ref(callback))
            entry = (object(), ref)
        else:
            entry = (object(), lambda: callback)
        with self._notifier._lock:
            self.subscribers.append(entry)

        def unsubscribe() -> None:
            with self._notifier._lock:
                if entry in self.subscribers:
                    self.subscribers.remove(entry)
        return unsubscribe

    @property
    def live_subscribers(self) -> int:
        with self._notifier._lock:
            return sum(1 for _, get in self.subscribers if get() is not None)

    def post(self, event: Any, *, state: bool) -> None:
        self._notifier.post(self, event, state)

    def flush(self, timeout: float) -> bool:
        """Wait until every event posted so far was delivered; False on timeout."""
        return self._notifier.flush(self, timeout)


class Notifier:
    """The views thread and the lock of every channel."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delivered = threading.Condition(self._lock)  # views thread -> flush()
        self._wake: queue.SimpleQueue = queue.SimpleQueue()
        self._ready: dict[Channel, None] = {}  # channels with pending events, in post order
        self._thread: threading.Thread | None = None

    def channel(self) -> Channel:
        self._start()
        return Channel(self)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="nbmplock-views",
                                                daemon=True)
                self._thread.start()

    def post(self, channel: Channel, event: Any, state: bool) -> None:
        with self._lock:
            if not channel.subscribers:
                return  # nobody to tell (nothing to flush either)
            channel.posted += 1
            if channel.progress is not None:  # carried along: its output and failures
                event = merge(channel.progress, event)
                channel.progress = None
                channel.delivered += 1  # folded into the new event
            if state:
                channel.states.append(event)
            else:
                channel.progress = event
            self._ready[channel] = None
        self._wake.put(None)

    def flush(self, channel: Channel, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._delivered:
            target = channel.posted
            channel.next_progress = 0.0  # a pending progress is due now: flush asks for it
        self._wake.put(None)
        with self._delivered:
            while channel.delivered < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("nbmplock: a view of the job is slow to take its events; "
                                "not waiting for it any longer")
                    return False
                self._delivered.wait(left)
            return True

    def _next_work(self) -> tuple[Channel, Any, list] | None:
        """Under the lock: a channel's next due event and its callbacks, or None."""
        now = time.monotonic()
        for channel in list(self._ready):
            if channel.states:
                event = channel.states.popleft()
            elif channel.progress is not None and now >= channel.next_progress:
                event, channel.progress = channel.progress, None
                channel.next_progress = now + MIN_INTERVAL
            else:
                continue
            if not channel.states and channel.progress is None:
                del self._ready[channel]
            callbacks = []
            for entry in list(channel.subscribers):
                callback = entry[1]()
                if callback is None:
                    channel.subscribers.remove(entry)  # a weak subscriber that is gone
                else:
                    callbacks.append(callback)
            return channel, event, callbacks
        return None

    def _wait_time(self) -> float | None:
        now = time.monotonic()
        due = [c.next_progress - now for c in self._ready if c.progress is not None]
        return max(0.0, min(due)) if due else None

    def _loop(self) -> None:
        while True:
            with self._lock:
                work = self._next_work()
                wait = None if work is not None else self._wait_time()
            if work is None:
                try:  # a post, a flush, or when the next progress is due
                    self._wake.get(timeout=wait)
                except queue.Empty:
                    pass
                continue
            channel, event, callbacks = work
            for callback in callbacks:
                try:
                    callback(event)
                except Exception:  # noqa: BLE001 - a broken view must not break the others
                    log.exception("nbmplock: a view of the job raised")
            with self._delivered:
                channel.delivered += 1
                self._delivered.notify_all()  # flush() waits for this


#: The one notifier of the process.
notifier = Notifier()
