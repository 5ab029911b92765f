"""Up-front argument checks and the frozen options they produce.

Every check raises :class:`InvalidArgumentsError` naming the argument and what
was expected, before a file is touched or a process started.
"""

from __future__ import annotations

import functools
import inspect
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import InvalidArgumentsError

ERRORS_MODES = ("raise", "record")
START_METHODS = ("fork", "spawn", "forkserver")


@dataclass(frozen=True)
class Options:
    """How a run is executed; built once by :func:`make_options`."""

    num_procs: int | None = None
    save_batch: int = 10
    batch_size: int | None = None
    errors: str = "raise"
    max_retries: int = 0
    item_timeout: float | None = None
    chunk_size: int | None = None
    start_method: str | None = None
    keep_results: bool = False
    backend: Any = None


@dataclass(frozen=True)
class Spec:
    """Everything a run needs: what to do, on which items, where to record it."""

    items: Sequence[str]
    process: Callable[..., Any]
    out_path: str
    save_callback: Callable[[str, list, list], Any] | None
    shared_data: Any
    init_function: Callable[[Any], Any] | None
    options: Options


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        expected = "a positive int" + (" or None" if allow_none else "")
        raise InvalidArgumentsError(name, expected, f"got {value!r}")
    return int(value)


def optional_callable(name: str, value: object) -> Callable | None:
    if value is not None and not callable(value):
        raise InvalidArgumentsError(name, "a callable or None",
                                    f"got {type(value).__name__}")
    return value


def check_items(name: str, items: object) -> Sequence[str]:
    """A non-empty list (or other sequence) whose every element is a ``str``."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        hint = ""
        if hasattr(items, "__next__") or hasattr(items, "__iter__"):
            hint = "; an iterator or generator cannot be resumed, pass list(...)"
        raise InvalidArgumentsError(
            name, "a non-empty list of str", f"got {type(items).__name__}{hint}")
    if len(items) == 0:
        raise InvalidArgumentsError(name, "a non-empty list of str", "got an empty list")
    types = set(map(type, items))
    if types != {str} and not all(issubclass(t, str) for t in types):
        for index, item in enumerate(items):
            if not isinstance(item, str):
                raise InvalidArgumentsError(
                    name, "a non-empty list of str",
                    f"item at index {index} is {type(item).__name__}: {item!r:.80}")
    return items


def _lazy_kind(fn: object) -> str | None:
    """"an async def function" (etc.) when calling ``fn`` would not run its body."""
    targets = [fn]
    call = getattr(type(fn), "__call__", None)
    if call is not None and not inspect.isroutine(fn) and not isinstance(fn, functools.partial):
        targets.append(call)  # a callable object: its __call__ decides
    for target in targets:
        if inspect.iscoroutinefunction(target):
            return "an async def function"
        if inspect.isasyncgenfunction(target):
            return "an async generator function"
        if inspect.isgeneratorfunction(target):
            return "a generator function"
    return None


def check_not_lazy(name: str, fn: object) -> None:
    """Refuse a function whose call only creates a coroutine or generator.

    Run as is, its body would never run, and every item would be recorded
    done without having been processed.
    """
    if fn is None:
        return
    kind = _lazy_kind(fn)
    if kind is not None:
        raise InvalidArgumentsError(
            name, "a plain function (not async def, not a generator)",
            f"got {kind}; calling it returns a coroutine or generator without running its "
            "body. Make it a plain def that returns its result (e.g. wrap a coroutine: "
            "def f(item, s, v): return asyncio.run(g(item, s, v)))")


def check_out_path(name: str, out_path: object) -> str:
    """The run directory as an absolute path, ``~`` expanded.

    Made absolute once, when the job is created: a notebook's ``%cd`` (or
    ``os.chdir``) during a run must not move the run, nor the
    ``output_filepath`` given to ``save_callback``.
    """
    if isinstance(out_path, os.PathLike):
        out_path = os.fspath(out_path)
    if not isinstance(out_path, str) or not out_path.strip():
        raise InvalidArgumentsError(name, "a non-empty str path of a directory",
                                    f"got {out_path!r}")
    out_path = os.path.abspath(os.path.expanduser(out_path))
    if os.path.exists(out_path) and not os.path.isdir(out_path):
        raise InvalidArgumentsError(name, "a directory path (it is an existing file)",
                                    f"got {out_path!r}")
    return out_path


def make_options(*, num_procs: object = None, save_batch: object = 10,
                 batch_size: object = None, errors: object = "raise",
                 max_retries: object = 0, item_timeout: object = None,
                 chunk_size: object = None, start_method: object = None,
                 keep_results: bool = False, backend: object = None) -> Options:
    """Check every option and return them frozen."""
    if backend is None:
        num_procs = positive_int("num_procs", num_procs, allow_none=True)
    elif num_procs is not None:
        num_procs = positive_int("num_procs", num_procs)
    if errors not in ERRORS_MODES:
        raise InvalidArgumentsError("errors", " or ".join(map(repr, ERRORS_MODES)),
                                    f"got {errors!r}")
    if not _is_int(max_retries) or max_retries < 0:
        raise InvalidArgumentsError("max_retries", "an int >= 0", f"got {max_retries!r}")
    if item_timeout is not None and (
            not isinstance(item_timeout, numbers.Real) or isinstance(item_timeout, bool)
            or not item_timeout > 0):
        raise InvalidArgumentsError("item_timeout", "a number of seconds > 0 or None",
                                    f"got {item_timeout!r}")
    if start_method is not None and start_method not in START_METHODS:
        raise InvalidArgumentsError("start_method",
                                    " or ".join(map(repr, START_METHODS)) + " or None",
                                    f"got {start_method!r}")
    if backend is not None and not isinstance(backend, str) and not hasattr(backend, "submit"):
        raise InvalidArgumentsError(
            "backend", "None, a dask distributed.Client or a scheduler address str",
            f"got {type(backend).__name__}")
    if backend is not None:  # a missing extra is bad input too: say so before any work
        from ._dask import import_distributed
        import_distributed()
    return Options(
        num_procs=num_procs,
        save_batch=positive_int("save_batch", save_batch),
        batch_size=positive_int("batch_size", batch_size, allow_none=True),
        errors=errors,
        max_retries=int(max_retries),
        item_timeout=float(item_timeout) if item_timeout is not None else None,
        chunk_size=positive_int("chunk_size", chunk_size, allow_none=True),
        start_method=start_method,
        keep_results=bool(keep_results),
        backend=backend,
    )


def make_spec(items: object, process: object, out_path: object, *,
              save_callback: object = None, shared_data: Any = None,
              init_function: object = None, options: Options) -> Spec:
    """Check the job's own arguments; ``options`` comes from :func:`make_options`."""
    # A snapshot: the run (and forked workers) must see the list as it was given.
    items = list(check_items("data_list", items))
    if not callable(process):
        raise InvalidArgumentsError("process", "a callable process(item, shared_data, init_values)",
                                    f"got {type(process).__name__}")
    for name, fn in (("process", process), ("init_function", init_function),
                     ("save_callback", save_callback)):
        check_not_lazy(name, fn)
    return Spec(
        items=items,
        process=process,
        out_path=check_out_path("out_path", out_path),
        save_callback=optional_callable("save_callback", save_callback),
        shared_data={} if shared_data is None else shared_data,
        init_function=optional_callable("init_function", init_function),
        options=options,
    )
