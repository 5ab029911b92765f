"""Up-front checks of a run's items, function and directory, and the :class:`Spec`.

Every check raises :class:`InvalidArgumentsError` naming the argument and what
was expected, before a file is touched or a process started. The options are
checked by :mod:`nbmplock._options`.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import InvalidArgumentsError
from ._options import Options


@dataclass(frozen=True)
class Spec:
    """Everything a run needs: what to do, on which items, where to record it."""

    items: Sequence
    process: Callable[..., Any]
    out_path: str
    options: Options

    @property
    def save_callback(self) -> Callable[[str, list, list], Any] | None:
        return self.options.save_callback

    @property
    def shared_data(self) -> Any:
        return self.options.shared_data

    @property
    def init_function(self) -> Callable[[Any], Any] | None:
        return self.options.init_function


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


def make_spec(items: object, process: object, out_path: object, options: Options) -> Spec:
    """Check the job's own arguments; ``options`` comes from ``make_options``."""
    # A snapshot: the run (and forked workers) must see the list as it was given.
    items = list(check_items("data_list", items))
    if not callable(process):
        raise InvalidArgumentsError("process", "a callable process(item, shared_data, init_values)",
                                    f"got {type(process).__name__}")
    for name, fn in (("process", process), ("init_function", options.init_function),
                     ("save_callback", options.save_callback)):
        check_not_lazy(name, fn)
    return Spec(items=items, process=process, out_path=check_out_path("out_path", out_path),
                options=options)
