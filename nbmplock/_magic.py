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
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

from ._errors import JobStateError, MissingDependencyError

try:
    from IPython.core.error import UsageError
    from IPython.core.magic import Magics, cell_magic, magics_class
    from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
    from IPython.display import display
except ImportError as exc:  # pragma: no cover - IPython is there whenever a magic can run
    raise MissingDependencyError(
        'the %%mplock magic needs IPython: pip install "nbmplock[notebook]"') from exc

from ._job import Event, Job, JobState, run
from ._runner import StopMode

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


@magics_class
class MplockMagics(Magics):
    """Holds the ``%%mplock`` cell magic."""

    def __init__(self, shell=None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self._into: WeakKeyDictionary[Job, set] = WeakKeyDictionary()

    @magic_arguments(name="%mplock")
    @argument("items", help="expression giving the list of str items, evaluated in the "
              "notebook (quote it if it contains spaces)")
    @argument("--out", required=True, metavar="OUT_PATH",
              help="run directory: every finished item is recorded there (required)")
    @argument("--procs", type=int, default=None, metavar="N",
              help="number of worker processes (default: one per CPU)")
    @argument("--init", default=None, metavar="NAME",
              help="init_function(shared_data), run once per worker; its return value "
              "is init_values")
    @argument("--shared", default=None, metavar="NAME",
              help="shared_data passed to every call")
    @argument("--save", default=None, metavar="NAME",
              help="save_callback(output_filepath, data_results, data_names)")
    @argument("--save-batch", type=int, default=None, metavar="N",
              help="results per save_callback call (default 10)")
    @argument("--batch", type=int, default=None, metavar="N",
              help="give the function lists of N items (batch mode)")
    @argument("--errors", choices=("raise", "record"), default=None,
              help="'record' (default) records a failing item and carries on; 'raise' "
              "stops the run")
    @argument("--retries", type=int, default=None, metavar="N",
              help="retry a failing item up to N times")
    @argument("--timeout", type=float, default=None, metavar="SECONDS",
              help="fail an item that runs longer than this (its worker is killed)")
    @argument("--start-method", choices=("fork", "spawn", "forkserver"), default=None,
              help="how worker processes start (default: the platform's)")
    @argument("--backend", default=None, metavar="ADDRESS",
              help="Dask scheduler address, or the name of a distributed.Client variable")
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
        for option, key in (("init", "init_function"), ("shared", "shared_data"),
                            ("save", "save_callback")):
            expr = getattr(args, option)
            if expr is not None:
                kwargs[key] = self._evaluate(f"--{option}", _unquote(expr))
        for option, key in (("procs", "num_procs"), ("save_batch", "save_batch"),
                            ("batch", "batch_size"), ("errors", "errors"),
                            ("retries", "max_retries"), ("timeout", "item_timeout"),
                            ("start_method", "start_method")):
            value = getattr(args, option)
            if value is not None:
                kwargs[key] = value
        if args.backend is not None:
            kwargs["backend"] = self._backend(_unquote(args.backend))
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
        mode = StopMode.NOW  # the workers now; a save_callback call in progress completes
        while True:
            try:
                job._stop(mode)
                job.wait()
                break
            except KeyboardInterrupt:
                mode = StopMode.FORCE  # interrupted again: wait for nothing
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
