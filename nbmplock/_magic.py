"""The ``%%mplock`` cell magic: the cell defines the function, the line says how to run it.

Load it with ``%load_ext nbmplock``. The cell body runs in the notebook's
namespace; the function it defines (the one named ``process``, else the only
one) is mapped over the items through :func:`nbmplock.run`, so running the
cell again while its run is going shows that run instead of starting another.

Only this module imports IPython.
"""

from __future__ import annotations

import logging
import types
from dataclasses import fields
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

from ._errors import JobStateError

from ._optional import require

require("IPython")
from IPython.core.error import UsageError  # noqa: E402 - after the check above
from IPython.core.magic import Magics, cell_magic, magics_class  # noqa: E402
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring  # noqa: E402
from IPython.display import display  # noqa: E402

from ._job import Job, run, stop_after_interrupt
from ._options import Options, opt_of
from ._state import Event, JobState

log = logging.getLogger("nbmplock")

DEFAULT_JOB_VAR = "mplock_job"


def _unquote(text: str) -> str:
    """IPython splits magic lines without removing quotes: ``"a b"`` stays quoted."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _is_function(value: Any) -> bool:
    """What counts as "a function the cell defines": any callable but a class or module."""
    return callable(value) and not isinstance(value, (type, types.ModuleType))


def pick_function(before: dict, after: dict, filename: str | None = None
                  ) -> tuple[str, Callable]:
    """The function a cell defined: ``process`` if the cell (re)bound it, else the only one.

    ``before`` and ``after`` are the user namespace before and after the cell;
    ``filename`` is the cell's code name, so that a function written in the
    cell wins over one it merely imported. Raises :class:`UsageError` naming
    what the cell defined when there is no single answer.
    """
    missing = object()
    bound = [name for name, value in after.items()
             if not name.startswith("_") and before.get(name, missing) is not value]
    functions = [name for name in bound if _is_function(after[name])]
    if "process" in functions:
        return "process", after["process"]
    written = [name for name in functions
               if getattr(getattr(after[name], "__code__", None), "co_filename", None) == filename]
    if len(written) == 1:
        return written[0], after[written[0]]
    if len(functions) == 1:
        return functions[0], after[functions[0]]
    if functions:
        raise UsageError(
            "%%mplock: the cell defines several functions (" + ", ".join(sorted(functions))
            + "); name the one to run `process`.")
    others = f" (it set: {', '.join(sorted(bound))})" if bound else ""
    raise UsageError(
        "%%mplock: the cell must define the function to run, e.g. "
        f"`def process(item, shared_data, init_values): ...`; it defined no function{others}.")


def _option_arguments(func):
    """The magic's flag of every option that has one, from the options record."""
    for f in reversed(fields(Options)):
        opt = opt_of(f)
        if opt.flag is None:
            continue
        kwargs: dict[str, Any] = {"dest": f.name, "default": None}
        if opt.choices:
            kwargs["choices"] = opt.choices
        if opt.metavar:
            kwargs["metavar"] = opt.metavar
        if opt.flag_type is not None:
            kwargs["type"] = opt.flag_type
        help_text = opt.help
        if f.default is not None and not opt.choices:
            help_text += f" (default {f.default!r})"
        if opt.from_namespace:
            help_text += "; give the name of a notebook variable (or an expression)"
        func = argument(opt.flag, help=help_text.replace("%", "%%"), **kwargs)(func)
    return func


@magics_class
class MplockMagics(Magics):
    """Holds the ``%%mplock`` cell magic."""

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self._into: WeakKeyDictionary[Job, set] = WeakKeyDictionary()

    @magic_arguments(name="%mplock")
    @argument("items", help="expression giving the items (a list, or any iterable: read "
              "once), evaluated in the notebook (quote it if it contains spaces)")
    @argument("--out", required=True, metavar="OUT_PATH",
              help="run directory: every finished item is recorded there (required)")
    @_option_arguments
    @argument("--into", default=None, metavar="VAR",
              help="when the run finishes, store the results, in item order, in VAR")
    @argument("--job", default=DEFAULT_JOB_VAR, metavar="VAR",
              help=f"variable for the Job (default {DEFAULT_JOB_VAR})")
    @argument("--wait", action="store_true",
              help="block until the run ends; Ctrl-C (interrupt the kernel) stops it cleanly")
    @cell_magic
    def mplock(self, line: str, cell: str) -> None:
        """Map the function this cell defines over items, resumably, on many cores.

        The cell body runs in the notebook's namespace and defines the function
        ``process(item, shared_data, init_values)`` (or any single function).
        The run is recorded in ``--out``: stop it, restart the kernel, run the
        cell again, and it continues where it left off. The cell returns at
        once and shows a live panel (unless ``--wait``); the Job is stored in
        ``mplock_job`` (``--job``). Running the cell again while its run is
        going shows that run instead of starting a second one. With ``--wait``,
        interrupting the kernel (Ctrl-C) stops the run cleanly; run the cell
        again to resume.

        Example::

            %load_ext nbmplock

            %%mplock paths --out runs/thumbs --procs 4 --into sizes
            from PIL import Image
            def process(item, shared_data, init_values):
                with Image.open(item) as im:
                    return im.size
        """
        args = parse_argstring(self.mplock, line)
        shell = self.shell
        job_var = _unquote(args.job)
        into = _unquote(args.into) if args.into else None
        for option, name in (("--job", job_var), ("--into", into)):
            if name is not None and not name.isidentifier():
                raise UsageError(f"%%mplock: {option} needs a variable name, got {name!r}")

        _, process = self._run_body(cell)
        items = self._evaluate("items", _unquote(args.items))
        kwargs: dict[str, Any] = {}
        for f in fields(Options):
            opt = opt_of(f)
            value = getattr(args, f.name, None) if opt.flag else None
            if value is None:
                continue
            if f.name == "backend":
                value = self._backend(_unquote(value))
            elif f.name == "key":
                value = self._key(_unquote(value))
            elif opt.from_namespace:
                value = self._evaluate(opt.flag, _unquote(value))
            kwargs[f.name] = value
        if into is not None:
            kwargs["keep_results"] = True

        job = run(items, process, _unquote(args.out), **kwargs)
        try:  # from here on, Ctrl-C stops the run cleanly
            shell.user_ns[job_var] = job
            if into is not None:
                self._deliver_into(job, into)
            handle = display(job, display_id=True)
            if args.wait:
                self._wait(job, into)
                if handle is not None:
                    # What an exported notebook (nbconvert, nbval) keeps: the final
                    # status, not the "running, 0/12 done" of the moment it started.
                    handle.update(job)
        except KeyboardInterrupt:
            self._interrupted(job, job_var)
            raise  # an interrupted cell stays interrupted: "Run all" stops here

    # -- helpers ---------------------------------------------------------
    def _run_body(self, cell: str) -> tuple[str, Callable]:
        """Execute the cell in the user namespace; return the function it defined."""
        shell = self.shell
        before = dict(shell.user_ns)
        code = shell.transform_cell(cell)
        # registered with linecache, so tracebacks and inspect.getsource see the cell
        filename = shell.compile.cache(code, shell.execution_count)
        exec(shell.compile(code, filename, "exec"), shell.user_global_ns, shell.user_ns)
        return pick_function(before, shell.user_ns, filename)

    def _evaluate(self, what: str, expr: str) -> Any:
        try:
            return self.shell.ev(expr)
        except Exception as exc:
            raise UsageError(f"%%mplock: cannot evaluate {what} {expr!r}: "
                             f"{type(exc).__name__}: {exc}") from exc

    def _key(self, text: str) -> Any:
        """``--key NAME``: a function of the notebook of that name, else a field name."""
        value = self.shell.user_ns.get(text) if text.isidentifier() else None
        return value if callable(value) else text

    def _backend(self, address: str) -> Any:
        value = self.shell.user_ns.get(address) if address.isidentifier() else None
        return value if value is not None else address

    def _deliver_into(self, job: Job, var: str) -> None:
        """Store ``job.results()`` in ``var`` whenever the job finishes."""
        if not job.spec.options.keep_results:
            log.warning("nbmplock: the running job on %r does not keep results, so --into %s "
                        "cannot be filled; stop it and run the cell again", job.out_path, var)
            return
        names = self._into.setdefault(job, set())
        if var in names:
            return
        names.add(var)
        user_ns = self.shell.user_ns

        def on_event(event: Event) -> None:
            if event.kind == "state" and event.progress.state is JobState.FINISHED:
                _store_results(job, user_ns, var)

        job.subscribe(on_event)
        if job.state is JobState.FINISHED:  # it may have ended before we subscribed
            _store_results(job, user_ns, var)

    def _wait(self, job: Job, into: str | None) -> None:
        # job.wait is _RunEnd's (safe under Ctrl-C, no lost wake-up); short
        # waits keep the kernel's interrupt prompt.
        while not job.wait(0.5):
            pass
        if job.state is JobState.FAILED and job.error is not None:
            raise job.error
        if into is not None and job.state is JobState.FINISHED:
            _store_results(job, self.shell.user_ns, into)  # the observer may not have run yet

    def _interrupted(self, job: Job, job_var: str) -> None:
        stop_after_interrupt(job)  # a second interrupt meanwhile stops by force
        if job.state is JobState.FINISHED:
            return
        p = job.progress
        log.warning("nbmplock: interrupted; the run on %r was stopped. %d of %d items are "
                    "recorded done. Run the cell again, or call %s.resume(), to continue "
                    "where it left off.", job.out_path, p.done, p.total, job_var)


def _store_results(job: Job, user_ns: dict, var: str) -> None:
    try:
        user_ns[var] = job.results()
    except JobStateError:  # resumed again in the meantime; the next finish fills it
        pass


def load_ipython_extension(ipython) -> None:
    """``%load_ext nbmplock``: register ``%%mplock``."""
    ipython.register_magics(MplockMagics)
