"""``rate_limit=``: one smooth limit on items started, shared by every worker of a job.

Design: a token bucket in its GCRA form (one number, the *theoretical
arrival time* ``tat``), kept in a small file that every worker process of
the job opens. A worker takes a token right before it calls ``process`` on
an item (a batch takes ``batch_size`` tokens):

* allowed at ``now`` when ``now >= tat - (burst - 1) / rate``; then
  ``tat = max(tat, now) + n / rate``;
* otherwise it sleeps until then, in steps of at most :data:`POLL` seconds,
  checking the run's stop flag between steps: Stop and Ctrl-C never wait
  for a token (an item that got none is handed back undone).

The burst is :data:`BURST` (1): starts are spaced ``1 / rate`` apart, never
bunched, so any window of ``T`` seconds holds at most ``rate * T + 1`` starts
(``rate + 1`` per second).

Why a file: the read-modify-write of ``tat`` is guarded by ``fcntl.lockf``,
a lock the kernel releases when its process dies. A worker SIGKILLed by
``item_timeout``, a Force stop or the OOM killer while it held the lock would
leave a shared-memory semaphore held forever, and every other worker would
hang on it. ``lockf`` locks belong to a process, not a thread, so the threads
of one worker first take turns on a ``threading.Lock`` (only one thread per
process waits for the bucket; the others wait for their turn).

``time.monotonic`` is the system-wide ``CLOCK_MONOTONIC`` on Linux: the
workers of one machine share it. On a Dask cluster spread over several
machines each machine has its own file: see ``docs/calling-an-api.md``.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import tempfile
import threading
import time
from collections.abc import Callable

#: Tokens the bucket holds when full: starts are never bunched.
BURST = 1
#: Longest sleep between two looks at the stop flag while waiting for a token.
POLL = 0.05
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
        "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*/\s*([a-z]+)\s*$")
_TAT = struct.Struct("d")


def parse_rate(value: object) -> float:
    """Items per second from ``"600/min"``, ``"10/s"``, ``"3600/h"`` or a number.

    Raises ``ValueError`` (or ``TypeError``) with the reason.
    """
    if isinstance(value, bool):
        raise TypeError("a bool is not a rate")
    if isinstance(value, (int, float)):
        rate = float(value)
    elif isinstance(value, str):
        match = _RATE.match(value.lower())
        if match is None or match.group(2) not in _PER:
            raise ValueError(f"cannot read {value!r} as a rate; write e.g. '600/min', "
                             "'10/s', '3600/h' or a number per second")
        rate = float(match.group(1)) / _PER[match.group(2)]
    else:
        raise TypeError(f"a rate is a str or a number, not {type(value).__name__}")
    if not rate > 0 or rate == float("inf"):
        raise ValueError(f"a rate must be > 0 and finite, got {value!r}")
    return rate


class RateLimit:
    """The job's limiter: ``take(n, cancelled)`` in any worker process or thread.

    Pickles as ``(rate, path)``: each process opens the file on first use.
    The job's driver makes it with :meth:`create` and removes the file with
    :meth:`remove` at the run's end.
    """

    def __init__(self, rate: float, path: str, burst: int = BURST):
        self.rate = rate
        self.path = path
        self.burst = burst

    @classmethod
    def create(cls, rate: float) -> RateLimit:
        """A new bucket in a file of its own, named after this process (the driver).

        First removes the files of drivers that are gone: a SIGKILLed driver
        cannot remove its own (:meth:`remove` runs at a run's end)."""
        _sweep()
        fd, path = tempfile.mkstemp(prefix=f"{_PREFIX}{os.getpid()}-")
        try:
            os.write(fd, _TAT.pack(0.0))
        finally:
            os.close(fd)
        return cls(rate, path)

    def remove(self) -> None:
        with _opened_lock:
            opened = _opened.pop(self.path, None)
        if opened is not None and opened[0] == os.getpid():
            try:
                os.close(opened[1])
            except OSError:
                pass
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def __getstate__(self) -> dict:
        return {"rate": self.rate, "path": self.path, "burst": self.burst}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["rate"], state["path"], state["burst"])

    def _open(self) -> tuple[int, threading.Lock]:
        """This process's descriptor of the file and its threads' turn lock.

        One pair per process and file, whatever the number of ``RateLimit``
        copies (a Dask worker unpickles one per task): ``lockf`` does not
        exclude the threads of one process, the turn lock does. After a fork
        the inherited pair is the parent's: the child opens its own.
        """
        pid = os.getpid()
        with _opened_lock:
            opened = _opened.get(self.path)
            if opened is None or opened[0] != pid:
                opened = _opened[self.path] = (
                    pid, os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600), threading.Lock())
        return opened[1], opened[2]

    def _try(self, fd: int, n: int) -> float:
        """Take ``n`` tokens if allowed now (returns 0.0), else the seconds to wait."""
        interval = 1.0 / self.rate
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            raw = os.pread(fd, _TAT.size, 0)
            tat = _TAT.unpack(raw)[0] if len(raw) == _TAT.size else 0.0
            now = time.monotonic()
            allowed_at = tat - (self.burst - 1) * interval
            if now < allowed_at:
                return allowed_at - now
            os.pwrite(fd, _TAT.pack(max(tat, now) + n * interval), 0)
            return 0.0
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)

    def take(self, n: int, cancelled: Callable[[], bool]) -> bool:
        """Wait for ``n`` tokens; False (none taken) as soon as ``cancelled()``.

        Invariant: a thread holds its process's turn lock while it waits for
        the bucket and releases it before returning; every wait is at most
        :data:`POLL` long and re-checks ``cancelled`` after it.
        """
        fd, turn = self._open()
        while not turn.acquire(timeout=POLL):
            if cancelled():
                return False
        try:
            while True:
                if cancelled():
                    return False
                wait = self._try(fd, n)
                if wait <= 0.0:
                    return True
                time.sleep(min(wait, POLL))
        finally:
            turn.release()


_PREFIX = "nbmplock-rate-"


#: A bucket file untouched this long (every token taken rewrites it) may be swept.
SWEEP_AGE = 3600.0


def _sweep() -> None:
    """Remove the bucket files of drivers no longer alive (``nbmplock-rate-<pid>-*``
    in the temp directory) and untouched for :data:`SWEEP_AGE` seconds: on a
    Dask worker's machine the pid is another machine's driver's, and the file
    is in use as long as tokens are taken. A file whose pid was reused by
    another process stays until that one is gone too; files of other users are
    left alone."""
    folder = tempfile.gettempdir()
    now = time.time()
    try:
        names = [n for n in os.listdir(folder) if n.startswith(_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(_PREFIX):].partition("-")[0]
        if not pid.isdigit() or int(pid) <= 0:
            continue  # a file of a release that did not name its driver
        try:
            os.kill(int(pid), 0)
            continue  # alive (or reused): keep
        except ProcessLookupError:
            pass
        except OSError:
            continue  # alive, another user's
        path = os.path.join(folder, name)
        try:
            if now - os.stat(path).st_mtime >= SWEEP_AGE:
                os.unlink(path)
        except OSError:
            pass


#: path -> (pid, descriptor, turn lock) of this process (see RateLimit._open).
_opened: dict[str, tuple[int, int, threading.Lock]] = {}
_opened_lock = threading.Lock()
