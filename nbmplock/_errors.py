"""Every exception nbmplock raises of its own.

::

    NbmplockError                       base of everything below
    ├── InvalidArgumentsError (ValueError)   bad input, raised before any work starts
    ├── SerializationError (TypeError)       a function or shared_data cannot reach a worker
    ├── RunLockedError (RuntimeError)        another live run holds the run directory
    ├── StoreCorruptError (RuntimeError)     a damaged record in the middle of the run store
    ├── RunDirectoryLostError (RuntimeError) the run directory was deleted or replaced mid-run
    ├── WorkChangedError (RuntimeError)      on_change="error", and the work changed
    ├── JobStateError (RuntimeError)         a Job method called in a state that forbids it
    ├── WorkerInitError (RuntimeError)       init_function raised in a worker
    ├── WorkerDiedError (RuntimeError)       a worker process died while holding items
    ├── ItemTimeoutError (TimeoutError)      an item ran longer than item_timeout
    └── MissingDependencyError (ImportError) an optional extra is not installed

An exception raised by the user's ``process`` is re-raised with its own type;
the worker's traceback is attached as ``__cause__`` (a :class:`RemoteTraceback`)
and the item as a note.
"""

from __future__ import annotations

import enum


class FailureKind(str, enum.Enum):
    """Why an item failed; a ``str`` too, so ``kind == "timeout"`` works."""

    EXCEPTION = "exception"      # process raised
    DIED = "died"                # the worker process died holding it
    TIMEOUT = "timeout"          # it ran longer than item_timeout
    UNPICKLABLE = "unpicklable"  # its result could not be sent back

    def __str__(self) -> str:
        return self.value


class NbmplockError(Exception):
    """Base class of every error nbmplock raises itself."""


class InvalidArgumentsError(NbmplockError, ValueError):
    """An argument has a wrong type or value; raised before any work starts.

    The message keeps the seed library's wording:
    ``Invalid <argument>. Expected values: <expected>``.
    """

    def __init__(self, argument: str, expected: str, detail: str | None = None):
        self.argument = argument
        self.expected = expected
        self.detail = detail
        message = f"Invalid {argument}. Expected values: {expected}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.argument, self.expected, self.detail))


class SerializationError(NbmplockError, TypeError):
    """A function, ``shared_data`` or a result cannot be serialised for a worker."""


class RunLockedError(NbmplockError, RuntimeError):
    """Another live run holds the lock on the run directory."""

    def __init__(self, out_path: str, pid: int | None, detail: str = "",
                 message: str | None = None):
        self.out_path = out_path
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(message or (
            f"{out_path!r} is in use by a live run ({holder}{detail}). "
            "Two runs on one out_path would record the same items twice; wait for it "
            "to finish, stop it, or use another out_path."))

    def __reduce__(self):
        return (type(self), (self.out_path, self.pid, "", str(self)))


class StoreCorruptError(NbmplockError, RuntimeError):
    """A record in the middle of the run store is damaged; nothing was discarded."""


class RunDirectoryLostError(NbmplockError, RuntimeError):
    """The run directory's log or lock was deleted, moved or replaced during the run.

    The run stops at once: what it recorded since then went to a file that is
    no longer there, so it cannot claim that work, and another run may now
    hold the directory.
    """


class WorkChangedError(NbmplockError, RuntimeError):
    """``on_change="error"``: items were done by other work (another function,
    init_function, shared_data or batch size) than this run's; nothing ran."""

    def __init__(self, out_path: str, changes: list[str]):
        self.out_path = out_path
        self.changes = changes
        super().__init__(
            f"{out_path!r} holds items done by other work: " + "; ".join(changes)
            + ". Nothing ran. Choose: on_change='warn' (keep them as done), "
            "on_change='rerun' (run them again with this work), forget them "
            "(job.forget(all=True), or `python -m nbmplock forget OUT_PATH --all`), or "
            "use another out_path.")

    def __reduce__(self):
        return (type(self), (self.out_path, self.changes))


class JobStateError(NbmplockError, RuntimeError):
    """A Job method was called in a state where it is not allowed."""


class WorkerInitError(NbmplockError, RuntimeError):
    """``init_function`` raised in a worker; the worker's traceback is the cause."""


class WorkerDiedError(NbmplockError, RuntimeError):
    """A worker process died (signal, ``os._exit``, out of memory) holding items."""

    def __init__(self, message: str, item: str | None = None,
                 exitcode: int | None = None):
        self.item = item
        self.exitcode = exitcode
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.args[0], self.item, self.exitcode))


class ItemTimeoutError(NbmplockError, TimeoutError):
    """An item ran longer than ``item_timeout``; its worker was killed."""

    def __init__(self, message: str, item: str | None = None):
        self.item = item
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.args[0], self.item))


class MissingDependencyError(NbmplockError, ImportError):
    """An optional dependency is missing; the message names the extra."""


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback; set as ``__cause__``."""

    def __init__(self, tb: str):
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note`` on 3.11+, the same attribute by hand on 3.10."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # pragma: no cover - Python 3.10
        notes = getattr(exc, "__notes__", None)
        if notes is None:
            notes = []
            try:
                exc.__notes__ = notes
            except AttributeError:
                return
        notes.append(note)
