"""Up-front checks of a run's items, function and directory, and the :class:`Spec`.

Every check raises :class:`InvalidArgumentsError` naming the argument and what
was expected, before a file is touched or a process started. The options are
checked by :mod:`nbmplock._options`.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import InvalidArgumentsError
from ._keys import compute_keys
from ._options import Options
from ._plan import ItemList
from ._text import clip


@dataclass(frozen=True)
class Spec:
    """Everything a run needs: what to do, on which items, where to record it."""

    item_list: ItemList
    process: Callable[..., Any]
    out_path: str
    options: Options

    @property
    def items(self) -> list:
        return self.item_list.items

    @property
    def keys(self) -> Sequence:
        return self.item_list.keys

    @property
    def save_callback(self) -> Callable[[str, list, list], Any] | None:
        return self.options.save_callback

    @property
    def shared_data(self) -> Any:
        return self.options.shared_data

    @property
    def init_function(self) -> Callable[[Any], Any] | None:
        return self.options.init_function


EXPECTED_ITEMS = "a non-empty list (or other iterable) of items"


def check_items(name: str, items: object) -> list:
    """The items as a list of their own: a list or tuple is copied (the run, and
    forked workers, see it as it was given), any other iterable (a generator,
    ``df.itertuples()``, ``Path.glob``) is read once, here."""
    if isinstance(items, (str, bytes, bytearray)) or isinstance(items, Mapping) or not (
            isinstance(items, Iterable)):
        hint = ("; pass list(d.values()) or list(d.items())" if isinstance(items, Mapping)
                else "")
        raise InvalidArgumentsError(name, EXPECTED_ITEMS,
                                    f"got {type(items).__name__}{hint}")
    if isinstance(items, (list, tuple)):
        out = list(items)
    else:
        out = []
        try:
            out.extend(items)
        except Exception as exc:
            raise InvalidArgumentsError(
                name, EXPECTED_ITEMS,
                f"reading it raised {type(exc).__name__}: {clip(str(exc), 200)} after "
                f"{len(out):,} items") from None
    if not out:
        raise InvalidArgumentsError(name, EXPECTED_ITEMS, "got no item")
    return out


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


def check_not_lazy(name: str, fn: object, *, allow_async: bool = False) -> None:
    """Refuse a function whose call only creates a coroutine or generator.

    Run as is, its body would never run, and every item would be recorded
    done without having been processed. ``allow_async``: an ``async def``
    is fine (``process`` and ``init_function``: the worker awaits it on its
    event loop); generator functions never are.
    """
    if fn is None:
        return
    kind = _lazy_kind(fn)
    if allow_async and kind == "an async def function":
        return
    if kind is not None and allow_async:
        raise InvalidArgumentsError(
            name, "a plain function or an async def function (not a generator)",
            f"got {kind}; calling it returns a generator without running its body. "
            "Return the result itself (collect a generator with list(...))")
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
    items = check_items("data_list", items)
    if not callable(process):
        raise InvalidArgumentsError("process", "a callable process(item, shared_data, init_values)",
                                    f"got {type(process).__name__}")
    for name, fn in (("process", process), ("init_function", options.init_function)):
        check_not_lazy(name, fn, allow_async=True)
    check_not_lazy("save_callback", options.save_callback)
    out_path = check_out_path("out_path", out_path)
    return Spec(ItemList.of(items, compute_keys(items, options.key)), process, out_path,
                options)
