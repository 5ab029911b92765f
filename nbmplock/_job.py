"""``Job``: one resumable parallel map you can start, stop, resume and watch.

A Job runs its runner in a background thread (the manager) so that the
notebook cell that started it returns at once and the kernel stays free for
button clicks. Its state is an explicit :class:`JobState`; every method checks
it and says why a call is not allowed. Views (the panel, the tqdm bar, tests)
subscribe with :meth:`Job.subscribe` and receive :class:`Event` objects on the
views thread (:mod:`nbmplock._notify`), at most about ten per second whatever
the item rate; they never run on the manager thread.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from ._errors import InvalidArgumentsError, JobStateError, RunLockedError
from ._keys import compute_keys
from ._lifetime import live_job, register, register_exit_hook, unregister
from ._notify import notifier
from ._options import Options, make_options, options_doc, signature
from ._runner import Runner
from ._state import (THROTTLED_SHARE, Event, EventKind, JobState, Progress, Published,
                     RunStatus, RunSummary, StopMode, Tally)
from . import _results
from ._log import Failure, by_time
from ._read import stored_state
from ._store import forget_in
from ._text import short_repr
from ._sync import Handoff, RunEnd
from ._validate import Spec, check_out_path, make_spec

log = logging.getLogger("nbmplock")

OUTPUT_TAIL = 500
_MISSING = object()
_RATE_WINDOW = 10.0
#: A run starting items at this share of its rate_limit or more is "held to the limit".
#: How long the end of a run waits for its views to show the final state.
_FLUSH_TIMEOUT = 5.0

_ALLOWED = {
    "start": (JobState.IDLE,),
    "resume": (JobState.IDLE, JobState.STOPPED, JobState.FAILED, JobState.FINISHED),
    "retry_failed": (JobState.IDLE, JobState.STOPPED, JobState.FAILED, JobState.FINISHED),
}
_WHY = {
    JobState.RUNNING: "it is running; stop() it first or wait()",
    JobState.STOPPING: "it is stopping; wait() for it",
    JobState.STOPPED: "it was stopped; use resume()",
    JobState.FINISHED: "it has finished; use resume() to run items not done, or retry_failed()",
    JobState.FAILED: "it failed; use resume()",
    JobState.IDLE: "it has not been started; use start()",
}
_END_STATE = {RunStatus.FINISHED: JobState.FINISHED, RunStatus.STOPPED: JobState.STOPPED,
              RunStatus.FAILED: JobState.FAILED}

#: How a Job shows itself in a notebook: set by ``nbmplock/__init__.py`` to
#: :mod:`nbmplock._display` (a view sits above the Job; the Job only calls it).
views: Any = None

def _key_in(x: Any, known: set, key: Any) -> Any:
    """The key of ``x``, given as an item or as a key, if it is one of ``known``."""
    try:
        if x in known:
            return x
    except TypeError:  # unhashable: an item, not a key
        pass
    try:
        k = compute_keys([x], key)[0]
    except InvalidArgumentsError:
        return None
    return k if k in known else None


class Job:
    """A resumable parallel map over ``data_list``, recorded in ``out_path``.

    ``Job(data_list, process, out_path, **options)``: ``process(item,
    shared_data, init_values)`` runs on every item not yet recorded done in
    the run directory ``out_path``. Built, not started: displaying it shows
    what the run directory holds. ``errors`` defaults to ``"record"``: one bad
    item does not end a long run.

    Options
    -------
    {options}

    Examples
    --------
    >>> job = Job(paths, resize, "runs/resize", num_procs=4)   # doctest: +SKIP
    >>> job.start(); job.wait(); job.progress.done               # doctest: +SKIP
    """

    def __init__(self, data_list: Sequence, process: Callable, out_path: str, **options: Any):
        self._setup(make_spec(data_list, process, out_path, make_options(**options)))

    @classmethod
    def _with_options(cls, data_list: Sequence, process: Callable, out_path: str,
                      options: Options) -> Job:
        """A Job with options already checked (``mp_lock`` & co. check their own)."""
        job = cls.__new__(cls)
        job._setup(make_spec(data_list, process, out_path, options))
        return job

    def _setup(self, spec: Spec) -> None:
        self.spec = spec
        self.out_path = self.spec.out_path
        self._lock = threading.RLock()
        self._state = JobState.IDLE
        self._channel = notifier.channel()
        self._runner: Runner | None = None
        self._published: Published | None = None
        self._thread: threading.Thread | None = None
        self._end = RunEnd()
        self.error: BaseException | None = None
        #: What the last run's stop left undone, in words (results not saved,
        #: a save_callback call abandoned); empty when nothing was.
        self.notes: tuple[str, ...] = ()
        self.fingerprint_changes: list[str] = []
        self.output: deque[str] = deque(maxlen=OUTPUT_TAIL)
        self._rate_samples: deque = deque()
        self._elapsed_before = 0.0
        self.reattached = False
        self._stored: Published | None = None
        #: Views keep their own state here (the panel of this job, say).
        self.view_state: dict = {}

    # -- what the disk says before anything runs -------------------------
    def _from_disk(self) -> Published:
        """Numbers and failures from the run directory: shown before a start, after a
        restart. Read on first use, so a Job that is started at once never reads it."""
        if self._stored is None:
            total, done, failures = stored_state(self.out_path, self.spec.item_list)
            self._stored = Published(Tally(total=total, done_before=done, failed=len(failures)),
                                     failures=failures)
        return self._stored

    def _latest(self) -> Published:
        published = self._published
        return published if published is not None else self._from_disk()

    # -- state -----------------------------------------------------------
    @property
    def state(self) -> JobState:
        return self._state

    def _check(self, action: str) -> None:
        if self._state not in _ALLOWED[action]:
            raise JobStateError(f"cannot {action}() this job: {_WHY[self._state]}")

    # -- control ---------------------------------------------------------
    def start(self) -> Job:
        """Start processing in a background thread; returns at once.

        After a kernel restart, a Job built again with the same arguments
        starts where the last run stopped: items recorded done do not run again.
        """
        return self._begin("start", "all")

    def resume(self) -> Job:
        """Run every item not recorded done (failed ones included) again.

        On a job that has not run yet (a Job built again after a kernel restart,
        say) it is the same as :meth:`start`; the panel then offers **Start**."""
        return self._begin("resume", "all")

    def retry_failed(self) -> Job:
        """Run only the items recorded failed."""
        return self._begin("retry_failed", "failed")

    def _begin(self, action: str, mode: str) -> Job:
        with self._lock:
            self._check(action)
            self._launch(mode)
        self._emit_state()
        return self

    def forget(self, items: Iterable | None = None, *, failed: bool = False,
               all: bool = False) -> Job:  # noqa: A002 - the word users say
        """Forget items on purpose, so that they run again: ``items`` (of this job's
        list, or their keys), every failure (``failed=True``) or everything
        (``all=True``). Recorded in the log (nothing is rewritten: a kill
        halfway loses nothing) and logged. Not while the job runs."""
        if sum((items is not None, failed, all)) != 1:
            raise InvalidArgumentsError("forget", "one of: items, failed=True, all=True",
                                        "got none or several")
        with self._lock:
            if self._state.active:
                raise JobStateError(f"cannot forget() while the job runs: {_WHY[self._state]}")
            keys = None
            if items is not None:
                items = list(items)
                known = set(self.spec.keys)
                keys = [_key_in(x, known, self.spec.options.key) for x in items]
                unknown = [x for x, k in zip(items, keys) if k is None]
                if unknown:
                    raise InvalidArgumentsError("items", "items of this job (or their keys)",
                                                f"got {short_repr(unknown[0], 80)}")
            forget_in(self.out_path, keys=keys, failed=failed, everything=all)
            self._stored = None
            self._runner = None
            self._published = None
        self._emit_state()
        return self

    def stop(self, force: bool = False) -> Job:
        """Stop: by default workers finish their current item, which is recorded.

        With a ``save_callback``, the stop takes effect within about one call
        of it: results not handed to it by then are not recorded done and run
        again on resume. ``force=True`` kills the workers at once and does not
        wait for a ``save_callback`` call in progress (a hung one is
        abandoned; :attr:`notes` says so); items not saved stay not done.
        Returns at once; :meth:`wait` for the stop to complete. On a job that
        is not running (it finished, or a Stop came late) it does nothing.
        """
        return self._stop(StopMode.FORCE if force else StopMode.GRACEFUL)

    def _stop(self, mode: StopMode, note: str | None = None) -> Job:
        """Stop with ``mode``; ``StopMode.NOW`` is what Ctrl-C does."""
        with self._lock:
            if not self._state.active:
                return self
            runner = self._runner
            self._state = JobState.STOPPING
        if runner is not None:
            runner.request_stop(mode, note)
        self._emit_state()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run ends (or ``timeout``); True when it has ended.

        When it returns True, the views have been shown the final state.
        Ctrl-C may land anywhere in it (see :class:`nbmplock._sync.RunEnd`).
        """
        return self._end.wait(timeout)

    def _launch(self, mode: str) -> None:
        existing = live_job(self.out_path)
        if existing is not None and existing is not self:
            raise RunLockedError(self.out_path, os.getpid(),
                                 " (another Job in this process; nbmplock.run() returns it)")
        runner = Runner(self.spec, mode=mode, publish=self._on_published)
        previous = self._state
        handoff = Handoff()
        try:
            runner.prepare()  # raises here, in the caller, for a locked or unwritable out_path
            register_exit_hook()  # now that the backend's modules are imported
            self.fingerprint_changes = runner.fingerprint_changes
            self.error = None
            self.notes = runner.planning_notes()  # what planning found (values never kept, say)
            self.reattached = False
            self._runner = runner
            self._published = Published(runner.tally,
                                        failures=by_time(runner.store.contents.failures.values()))
            self._rate_samples.clear()
            self._end.begin()
            self._state = JobState.RUNNING
            register(self.out_path, self)
            self._thread = threading.Thread(target=self._run, args=(runner, handoff),
                                            name=f"nbmplock-{os.path.basename(self.out_path)}",
                                            daemon=True)
            self._thread.start()
        except BaseException:
            # Raised before the job's thread took the run over: an error, or a
            # Ctrl-C between two bytecodes (even inside Thread.start, which can
            # leave the new thread stuck before it runs). Whoever claims the
            # handoff first owns the run; here, nothing is left half-started:
            # the run directory is unlocked and wait() returns.
            if handoff.claim("caller"):
                self._abandon(runner, previous)
            raise

    def _abandon(self, runner: Runner, previous: JobState) -> None:
        try:
            if runner.store is not None:
                runner.store.close()
        finally:
            unregister(self.out_path, self)
            self._state = previous
            self._end.end()

    def _run(self, runner: Runner, handoff: Handoff) -> None:
        if not handoff.claim("thread"):
            return  # start() was interrupted first and has undone the launch
        try:
            outcome = runner.run()
            self.error = outcome.error
            self.notes = outcome.notes
            state = _END_STATE[outcome.status]
        except BaseException as exc:  # noqa: BLE001 - a bug must not leave the job RUNNING
            log.exception("nbmplock: the run ended with an internal error")
            self.error = exc
            state = JobState.FAILED
        self._elapsed_before = time.monotonic() - runner.tally.started
        with self._lock:
            self._state = state
        try:
            self._emit_state()
            self._channel.flush(_FLUSH_TIMEOUT)
        finally:
            self._end.end()  # after the views saw the final state

    # -- observing -------------------------------------------------------
    def subscribe(self, callback: Callable[[Event], None], *,
                  weak: bool = False) -> Callable[[], None]:
        """Call ``callback(event)`` on every change; returns an unsubscribe function.

        Called on the views thread, at most about 10 times per second (state
        changes at once). ``weak=True`` holds ``callback`` (a bound method
        too) weakly: a view that is gone stops being called.
        """
        return self._channel.subscribe(callback, weak=weak)

    def _emit_state(self) -> None:
        self._channel.post(Event(EventKind.STATE, self.progress), state=True)

    def _on_published(self, published: Published) -> None:
        """The manager thread published its numbers: keep them, tell the views."""
        now = time.monotonic()
        samples = self._rate_samples
        samples.append((now, published.tally.done))
        while len(samples) > 2 and now - samples[0][0] > _RATE_WINDOW:
            samples.popleft()
        self._published = published
        self.output.extend(published.output)
        self._channel.post(Event(EventKind.PROGRESS, self.progress, published.output,
                                 published.new_failures), state=False)

    # -- numbers ---------------------------------------------------------
    @property
    def progress(self) -> Progress:
        c = self._latest().tally
        state = self._state
        now = time.monotonic()
        done = c.done_before + c.done
        if self._runner is not None and state.active:
            elapsed = now - c.started
            try:
                t0, d0 = self._rate_samples[0]
            except IndexError:
                t0, d0 = c.started, 0
            rate = (c.done - d0) / (now - t0) if now - t0 > 0.5 else (
                c.done / elapsed if elapsed > 0 else 0.0)
        else:
            elapsed = self._elapsed_before
            rate = c.done / elapsed if elapsed > 0 else 0.0
        remaining = max(0, c.total - done - (c.failed if not state.active else 0))
        eta = remaining / rate if rate > 0 and state.active else None
        limit = self.spec.options.rate_limit
        throttled = bool(limit and state.active and rate >= THROTTLED_SHARE * limit)
        return Progress(c.total, done, c.done_before, c.failed, c.in_flight,
                        c.in_flight_by_worker, rate, elapsed, eta, state,
                        c.retrying, throttled)

    @property
    def failures(self) -> tuple[Failure, ...]:
        """Items recorded failed (latest attempt each), oldest first."""
        return self._latest().failures

    @property
    def summary(self) -> RunSummary:
        p = self.progress
        return RunSummary(done=p.done_now, failed=p.failed, skipped=p.done_before,
                          elapsed=p.elapsed, failures=self.failures, out_path=self.out_path,
                          state=p.state, notes=self.notes)

    def results(self, *, by_key: bool = False) -> list | dict:
        """Results in ``data_list`` order (None for items not done), or with
        ``by_key=True`` a dict from each done item's key to its result.

        Available when results are kept (``keep_results``, the default without
        a ``save_callback``), from this run and every earlier one; items a run
        that kept no results did (``mp_lock``) run again for their values.
        """
        return _results.results(self, by_key=by_key)

    def iter_results(self) -> Iterator[tuple[Any, Any]]:
        """``(item, result)`` pairs as they are recorded, while the job runs: first
        those stored already, then each as it is recorded, in no fixed order (as
        ``imap_unordered`` or ``as_completed``); it ends when the run ends (a
        Stop ends it cleanly). Needs kept results, as :meth:`results`."""
        return _results.iter_results(self)

    def to_pandas(self):
        """A ``pandas.DataFrame``, one row per item: ``key``, ``item``, ``result``,
        ``state`` ("done", "failed", "not done"), ``error_type``, ``error_message``.
        Needs ``pip install "nbmplock[pandas]"``."""
        return _results.to_pandas(self)

    # -- display ---------------------------------------------------------
    def status_text(self) -> str:
        """One paragraph of plain text: the repr where widgets cannot render."""
        p = self.progress
        parts = [f"nbmplock Job on {self.out_path!r}: {p.state.value}",
                 f"{p.done:,}/{p.total:,} done"]
        if p.done_before:
            parts.append(f"{p.done_before:,} in earlier runs")
        if p.failed:
            parts.append(f"{p.failed:,} failed")
        if p.in_flight:
            parts.append(f"{p.in_flight:,} in flight")
        if p.retrying:
            parts.append(f"{p.retrying:,} waiting to retry")
        if p.throttled:
            parts.append(f"held to rate_limit {self.spec.options.rate_limit:g}/s")
        if p.rate:
            parts.append(f"{p.rate:,.1f} items/s")
        if p.eta is not None:
            parts.append(f"ETA {p.eta:,.0f} s")
        text = ", ".join(parts) + "."
        if self.error is not None:
            text += f" Error: {type(self.error).__name__}: {self.error}"
        return text

    def __repr__(self) -> str:
        return f"<{self.status_text()}>"

    @property
    def panel(self):
        """The live panel of this job, an ipywidgets ``VBox``: the same one for every
        display of the job, to place in a layout (``widgets.HBox([job.panel, plot])``),
        a dashboard or Voila. Needs ``pip install "nbmplock[notebook]"``."""
        return views.panel(self)

    def _repr_mimebundle_(self, include=None, exclude=None):
        if views is None:
            return {"text/plain": self.status_text()}
        return views.mimebundle(self, include, exclude)


Job.__init__.__signature__ = signature(
    inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    *(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
      for name in ("data_list", "process", "out_path")))
Job.__doc__ = Job.__doc__.replace("{options}", options_doc().replace("\n", "\n    "))


def run(data_list: Sequence, process: Callable, out_path: str, **options: Any) -> Job:
    """Build a :class:`Job` and start it; return it (the cell's last line shows its panel).

    If this process already runs a Job on ``out_path`` (the cell was run again),
    no second run starts: that live Job is returned, and a warning says so.
    Takes the options of :class:`Job`.
    """
    try:
        existing = live_job(check_out_path("out_path", out_path))
    except InvalidArgumentsError:
        existing = None  # Job() below says what is wrong with it
    if existing is not None:
        log.warning("nbmplock: a run on %r is already going in this kernel; showing it "
                    "instead of starting a second one", out_path)
        existing.reattached = True
        return existing
    job = Job(data_list, process, out_path, **options)
    job.start()
    return job


run.__signature__ = signature(*(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD)
                                for name in ("data_list", "process", "out_path")))


def stop_after_interrupt(job: Job) -> None:
    """Stop ``job`` at once after Ctrl-C (a script's, or the kernel's interrupt),
    wherever the interrupt landed.

    The first Ctrl-C kills the workers and lets a ``save_callback`` call in
    progress complete (the stop takes effect within about one call); another
    one, while this waits, stops by force, without waiting for ``save_callback``.
    """
    mode = StopMode.NOW
    while True:
        try:
            job._stop(mode)
            job.wait()
            return
        except KeyboardInterrupt:
            mode = StopMode.FORCE
