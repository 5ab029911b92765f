"""Every option of a run, declared once.

:class:`Options` is the one record. Each field's metadata (an :class:`Opt`)
says what the option means, how it is checked, and where it is taken:
``Job`` and ``run`` (every option, by keyword), the ``doc_ock`` functions
``mp_lock`` & co. (positionally where the seed library had them, the rest by
keyword) and the ``%%mplock`` magic (its flag). :func:`make_options` checks
them; the entry points' signatures, the magic's arguments and their help are
built from the same fields, so a new option is written here only.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from ._errors import InvalidArgumentsError
from ._optional import require
from ._ratelimit import parse_rate

ERRORS_MODES = ("raise", "record")
ON_CHANGE = ("warn", "error", "rerun")
START_METHODS = ("fork", "spawn", "forkserver")
_UNSET = object()


# -- checks: (argument name, value) -> the value to keep, or InvalidArgumentsError ------

def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value: object, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not _is_int(value) or value < 1:
        expected = "a positive int" + (" or None" if allow_none else "")
        raise InvalidArgumentsError(name, expected, f"got {value!r}")
    return int(value)


def optional_positive_int(name: str, value: object) -> int | None:
    return positive_int(name, value, allow_none=True)


def optional_callable(name: str, value: object) -> Callable | None:
    if value is not None and not callable(value):
        raise InvalidArgumentsError(name, "a callable or None",
                                    f"got {type(value).__name__}")
    return value


def _anything(name: str, value: object) -> object:
    return value


def _one_of(*choices: object, none: bool = False) -> Callable[[str, object], object]:
    def check(name: str, value: object) -> object:
        if (value is None and none) or value in choices:
            return value
        expected = " or ".join(map(repr, choices)) + (" or None" if none else "")
        raise InvalidArgumentsError(name, expected, f"got {value!r}")
    return check


def _non_negative_int(name: str, value: object) -> int:
    if not _is_int(value) or value < 0:
        raise InvalidArgumentsError(name, "an int >= 0", f"got {value!r}")
    return int(value)


def _seconds_or_none(name: str, value: object) -> float | None:
    if value is None:
        return None
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or not value > 0):  # also refuses nan
        raise InvalidArgumentsError(name, "a number of seconds > 0 or None", f"got {value!r}")
    return float(value)


def _backend(name: str, value: object) -> object:
    if value is None:
        return None
    if not isinstance(value, str) and not hasattr(value, "submit"):
        raise InvalidArgumentsError(
            name, "None, a dask distributed.Client or a scheduler address str",
            f"got {type(value).__name__}")
    require("distributed")  # a missing extra is bad input too: say so before any work
    return value


def _key(name: str, value: object) -> Callable | str | None:
    if value is None or callable(value) or (isinstance(value, str) and value):
        return value
    raise InvalidArgumentsError(name, "None, a function of the item returning a str, or a "
                                "field name (str)", f"got {type(value).__name__}")


def _rate(name: str, value: object) -> float | None:
    """``rate_limit``: items per second, from "600/min", "10/s", "3600/h" or a number."""
    if value is None:
        return None
    try:
        return parse_rate(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentsError(name, "None, a number of items per second > 0, or a "
                                    "str such as '600/min', '10/s' or '3600/h'",
                                    str(exc)) from None


def _non_negative_seconds(name: str, value: object) -> float | None:
    if value is None:
        return None
    if (not isinstance(value, numbers.Real) or isinstance(value, bool)
            or not 0 <= value < float("inf")):
        raise InvalidArgumentsError(name, "a number of seconds >= 0 or None", f"got {value!r}")
    return float(value)


def _exception_types(name: str, value: object) -> tuple | None:
    """``retry_on``: None, an exception class, or a tuple/list of them (kept as a tuple)."""
    if value is None:
        return None
    types = tuple(value) if isinstance(value, (tuple, list, set, frozenset)) else (value,)
    if not types or not all(isinstance(t, type) and issubclass(t, BaseException)
                            for t in types):
        raise InvalidArgumentsError(name, "None, an exception class or a tuple of them",
                                    f"got {value!r}")
    return types


def _bool_or_none(name: str, value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise InvalidArgumentsError(name, "True, False or None", f"got {value!r}")
    return value


# -- the record ---------------------------------------------------------------------

@dataclass(frozen=True)
class Opt:
    """What an option means and where it is taken."""

    help: str
    check: Callable[[str, Any], Any]
    #: ``mp_lock`` & co. take it (positionally, or as a keyword option).
    seed: bool = True
    #: Its default in ``mp_lock`` & co., when it differs from ``Job``'s.
    seed_default: Any = _UNSET
    #: The magic's flag, e.g. ``"--procs"``; None: not a flag of the magic.
    flag: str | None = None
    metavar: str | None = None
    #: The magic evaluates the flag's text in the notebook (a name of a function...).
    from_namespace: bool = False
    #: The type the magic converts the flag's text to.
    flag_type: type | None = None
    choices: tuple | None = None


def option(default: Any, **opt: Any) -> Any:
    return field(default=default, metadata={"opt": Opt(**opt)})


def count(flag: str) -> dict:
    """The magic takes the option as ``flag N``."""
    return {"flag": flag, "metavar": "N", "flag_type": int}


def named(flag: str) -> dict:
    """The magic takes the option as ``flag NAME``: a notebook variable (or expression)."""
    return {"flag": flag, "metavar": "NAME", "from_namespace": True}


@dataclass(frozen=True)
class Options:
    """How a run is executed (everything but its items, function and directory)."""

    save_callback: Callable | None = option(
        None, check=optional_callable, **named("--save"),
        help="save_callback(output_filepath, data_results, data_names), called in the "
             "parent with up to save_batch results, never twice at once; an item is "
             "recorded done once its batch was saved")
    num_procs: int | None = option(
        None, check=optional_positive_int, **count("--procs"),
        help="worker processes (default: one per CPU; on Dask: every worker thread)")
    save_batch: int = option(
        10, check=positive_int, **count("--save-batch"),
        help="results per save_callback call")
    shared_data: Any = option(
        None, check=_anything, **named("--shared"),
        help="passed to every call of process and init_function (default {})")
    init_function: Callable | None = option(
        None, check=optional_callable, **named("--init"),
        help="init_function(shared_data), run once per worker process; its return value "
             "is init_values")
    batch_size: int | None = option(
        None, check=optional_positive_int, seed=False, **count("--batch"),
        help="give process lists of up to N items; it returns a list of as many results")
    errors: str = option(
        "record", check=_one_of(*ERRORS_MODES), seed_default="raise", flag="--errors",
        choices=ERRORS_MODES,
        help="'record': a failing item is recorded and the run goes on; 'raise': the run "
             "stops and the item's exception is raised (default 'record' for a Job and "
             "the magic, 'raise' for mp_lock & co.)")
    max_retries: int = option(
        0, check=_non_negative_int, **count("--retries"),
        help="try a failing item up to N more times")
    item_timeout: float | None = option(
        None, check=_seconds_or_none, flag="--timeout", metavar="SECONDS", flag_type=float,
        help="an item running longer fails with kind 'timeout' (its worker is killed and "
             "replaced)")
    chunk_size: int | None = option(
        None, check=optional_positive_int, **count("--chunk-size"),
        help="items sent to a worker at once (default: about 0.5 s of work, measured; one "
             "item when concurrency > 1)")
    concurrency: int = option(
        1, check=positive_int, **count("--concurrency"),
        help="items in flight at once per worker process: a plain process runs on N "
             "threads of the worker, an async def process on the worker's event loop, at "
             "most N awaiting; init_values are shared by the threads (one per process)")
    rate_limit: float | None = option(
        None, check=_rate, flag="--rate-limit", metavar="RATE", flag_type=str,
        help="items started per second, shared by every worker of the job: '600/min', "
             "'10/s', '3600/h' or a number; smooth, no burst (starts spaced 1/rate apart)")
    retry_delay: float | None = option(
        None, check=_non_negative_seconds, flag="--retry-delay", metavar="SECONDS",
        flag_type=float,
        help="seconds before the first retry of a failed item; then doubling, with full "
             "jitter, capped at 60 s; the item holds no worker while it waits (default: "
             "retry at once)")
    retry_on: tuple | None = option(
        None, check=_exception_types, **named("--retry-on"),
        help="exception types worth a retry (others fail at once); default: every failure "
             "is retried up to max_retries times. An exception with a retry_after attribute "
             "(seconds) waits at least that long")
    start_method: str | None = option(
        None, check=_one_of(*START_METHODS, none=True), flag="--start-method",
        choices=START_METHODS,
        help="how worker processes start (default: the platform's)")
    backend: Any = option(
        None, check=_backend, flag="--backend", metavar="ADDRESS",
        help="a Dask distributed.Client or a scheduler address (the magic: an address, or "
             "the name of a Client variable)")
    on_change: str = option(
        "warn", check=_one_of(*ON_CHANGE), flag="--on-change", choices=ON_CHANGE,
        help="when process, init_function, shared_data or batch_size changed since items "
             "were done: 'warn' (they stay done; the panel, the bar and the log say what "
             "changed), 'error' (refuse to resume, saying what changed), 'rerun' (items done "
             "by other work run again; their old results stay until replaced)")
    key: Callable | str | None = option(
        None, check=lambda name, value: _key(name, value), flag="--key", metavar="KEY",
        help="the identity under which an item is recorded: a function of the item "
             "returning a str, or the name of a field of the items (dicts, named tuples, "
             "dataclasses); default: a str item is its own key, other plain values get "
             "one from their content (the magic: a notebook function's name, or a field)")
    keep_results: bool | None = option(
        None, check=_bool_or_none, seed=False,
        help="store every result in the run directory, for results() (default: when there "
             "is no save_callback)")

    @classmethod
    def names(cls, *, seed: bool = False) -> tuple[str, ...]:
        """The options, in declaration order (``seed``: those ``mp_lock`` & co. take)."""
        return tuple(f.name for f in fields(cls) if not seed or opt_of(f).seed)


def opt_of(f) -> Opt:
    return f.metadata["opt"]


def default(name: str, *, seed: bool = False) -> Any:
    """The default of option ``name`` in ``Job`` (or, with ``seed``, in ``mp_lock`` & co.)."""
    f = next(f for f in fields(Options) if f.name == name)
    opt = opt_of(f)
    if seed and opt.seed_default is not _UNSET:
        return opt.seed_default
    return f.default


def make_options(*, seed: bool = False, **given: Any) -> Options:
    """Check the options given by keyword; the others take their defaults.

    ``seed``: the defaults and the option list of ``mp_lock`` & co.
    """
    known = Options.names(seed=seed)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise InvalidArgumentsError(", ".join(unknown), "keyword options among " + ", ".join(known))
    values = {}
    for f in fields(Options):
        value = given.get(f.name, default(f.name, seed=seed))
        values[f.name] = opt_of(f).check(f.name, value)
    if values["keep_results"] is None:
        values["keep_results"] = values["save_callback"] is None
    if values["shared_data"] is None:
        values["shared_data"] = {}
    return Options(**values)


def signature(*leading: inspect.Parameter, seed: bool = False) -> inspect.Signature:
    """``leading`` parameters, then every option as a keyword with its default."""
    params = list(leading)
    taken = {p.name for p in params}
    for name in Options.names(seed=seed):
        if name not in taken:
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                            default=default(name, seed=seed)))
    return inspect.Signature(params)


def options_doc(*, seed: bool = False) -> str:
    """The options as a numpy-style parameter list, for docstrings."""
    lines = []
    for f in fields(Options):
        opt = opt_of(f)
        if seed and not opt.seed:
            continue
        lines.append(f"{f.name} : default {default(f.name, seed=seed)!r}")
        lines.append(f"    {opt.help}")
    return "\n".join(lines)
