"""What crosses a process boundary: objects, the run's functions, user exceptions.

:func:`dumps` pickles with the C pickler and falls back to dill for what only
dill can do (lambdas, notebook classes). :func:`serialize_functions` ships
``process``, ``init_function`` and ``shared_data`` to spawned or Dask workers
with dill's ``recurse=True``, so functions defined in a notebook travel with
the globals they use.

An exception raised in a worker comes back to the caller with its own type:
a worker calls :func:`describe_exception`, the parent
:func:`rebuild_exception`. The promise: ``except MyErr`` in the caller catches
a ``MyErr`` raised by ``process``, also when ``MyErr`` is defined in a
notebook or ``__main__``, under every start method, and also when its
``__init__`` takes other arguments than its ``args`` (which plain pickling
cannot rebuild: it calls ``MyErr(*args)``).

How, in order, until one works:

1. ``pickle`` of the exception, checked in the worker by loading it back.
2. Its parts: the class's module and qualified name, ``args`` and
   ``__dict__`` (pickled with dill). The parent finds the class under that
   name in its own modules (``__main__`` included: under ``spawn`` the
   worker's copy of a notebook class is not the notebook's, so the parent's
   own class is used) and rebuilds the instance without calling
   ``__init__``, as ``BaseException.__reduce__`` describes it.
3. The class itself by value (dill), when the parent has no class of that
   name: the type's name is right, though ``except`` cannot name it.
4. ``RuntimeError("module.QualName: message")`` when nothing else works.

The remote traceback is attached as ``__cause__`` (a :class:`RemoteTraceback`).
"""

from __future__ import annotations

import importlib
import pickle
import sys
import traceback
from typing import Any

from ._errors import RemoteTraceback, SerializationError

_PARTS = b"NBX1"  # marks a blob of parts (2-3 above) rather than a pickled exception


def _dill():
    import dill
    return dill


def dumps(obj: Any) -> bytes:
    """Fast C pickle, falling back to dill for lambdas and the like."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - dill can do more
        return _dill().dumps(obj, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)


def serialize_functions(functions: tuple, where: str) -> bytes:
    """``(process, init_function, shared_data, batch_size)`` as one dill blob.

    ``where`` names the receivers in the error ("spawned workers", "the Dask
    workers"), raised as :class:`SerializationError` before any work starts.
    """
    try:
        return _dill().dumps(functions, protocol=pickle.HIGHEST_PROTOCOL, recurse=True)
    except Exception as exc:
        raise SerializationError(
            f"cannot send process/init_function/shared_data to {where}: "
            f"{type(exc).__name__}: {exc}. Everything they use must be picklable by dill; "
            "create unpicklable objects (models, sessions, locks, open files) in "
            "init_function instead of passing them in shared_data or capturing them"
            + (", or use start_method='fork'." if where == "spawned workers" else ".")
        ) from exc


def describe_exception(exc: BaseException) -> tuple[str, str, str, bytes | None]:
    """(type name, message, formatted traceback, blob for :func:`rebuild_exception`)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return type(exc).__qualname__, str(exc), tb, _pack(exc)


def _pack(exc: BaseException) -> bytes | None:
    try:
        blob = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)  # a class whose __init__ does not take its args fails here
        return blob
    except Exception:  # noqa: BLE001 - try the parts
        pass
    cls = type(exc)
    dill = _dill()
    parts: dict[str, Any] = {"module": cls.__module__, "qualname": cls.__qualname__}
    try:
        parts["args"] = dill.dumps(exc.args, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001
        parts["args"] = dill.dumps(tuple(map(repr, exc.args)))
    try:
        state = {k: v for k, v in vars(exc).items() if not k.startswith("__")}
        parts["state"] = dill.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - attributes that cannot travel stay behind
        parts["state"] = None
    try:
        parts["by_value"] = dill.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL, byref=False,
                                       recurse=True)
    except Exception:  # noqa: BLE001
        parts["by_value"] = None
    try:
        return _PARTS + pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001
        return None


def _find_class(module: str, qualname: str) -> type | None:
    """The class named so in this process, if there is one (never imports __main__)."""
    mod = sys.modules.get(module)
    if mod is None and module != "__main__":
        try:
            mod = importlib.import_module(module)
        except Exception:  # noqa: BLE001
            return None
    obj: Any = mod
    for name in qualname.split("."):
        if name == "<locals>":
            return None
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


def _from_parts(parts: dict) -> BaseException | None:
    dill = _dill()
    cls = _find_class(parts["module"], parts["qualname"])
    if cls is not None:
        try:
            exc = cls.__new__(cls)
            exc.args = tuple(dill.loads(parts["args"]))
            if parts.get("state"):
                exc.__dict__.update(dill.loads(parts["state"]))
            return exc
        except Exception:  # noqa: BLE001 - try the class by value
            pass
    if parts.get("by_value"):
        try:
            exc = dill.loads(parts["by_value"])
            if isinstance(exc, BaseException):
                return exc
        except Exception:  # noqa: BLE001
            pass
    return None


def rebuild_exception(exc_type: str, message: str, tb: str,
                      blob: bytes | None, module: str | None = None) -> BaseException:
    """The worker's exception with its own type, the remote traceback as ``__cause__``."""
    exc: BaseException | None = None
    if blob is not None:
        try:
            if blob.startswith(_PARTS):
                parts = pickle.loads(blob[len(_PARTS):])
                module = parts.get("module", module)
                exc = _from_parts(parts)
            else:
                exc = pickle.loads(blob)
        except Exception:  # noqa: BLE001
            exc = None
    if not isinstance(exc, BaseException):
        name = f"{module}.{exc_type}" if module and module != "builtins" else exc_type
        exc = RuntimeError(f"{name}: {message}" if message else name)
    exc.__cause__ = RemoteTraceback(tb)
    return exc
