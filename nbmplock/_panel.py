"""The notebook view of a Job: an ipywidgets ``VBox`` that stays live.

:class:`Panel` builds its widgets once, then only changes their values. It
subscribes to the Job (weakly); events arrive on the views thread of
:mod:`nbmplock._notify`, which already coalesces them to about ten a second,
and are applied as they come. Every text that came from the user (items, messages, tracebacks, worker
output) is HTML-escaped.

Stable hooks for browser tests: the root has the CSS class ``nbmplock-panel``;
the counts line (class ``nbmplock-counts``) always reads::

    done {done} / {total} · earlier runs {done_before} · this run {done_now} · failed {failed} · in flight {in_flight}

and the buttons are described **Start**, **Stop**, **Force stop**, **Resume**
and **Retry failed**.

Only this module imports ipywidgets; without it, importing it raises
:class:`~nbmplock.MissingDependencyError` (and the Job's repr falls back to text).
"""

from __future__ import annotations

import functools
import html
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from ._optional import require

widgets = require("ipywidgets")

from ._fingerprint import function_name
from ._job import Job
from ._state import Event, EventKind, JobState, Progress
from ._log import Failure
from ._text import clip, short_repr

MAX_FAILURE_ROWS = 100
OUTPUT_LINES = 50
REATTACHED_NOTICE = "A run on this out_path is already going in this kernel; showing it."
COUNTS_FORMAT = ("done {done} / {total} · earlier runs {done_before} · this run {done_now}"
                 " · failed {failed} · in flight {in_flight}")

_ITEM_CHARS = 120
_MESSAGE_CHARS = 300

# badge colour and bar_style for each shown state
_LOOK = {
    "idle": ("#9e9e9e", ""),
    "running": ("#1e88e5", "info"),
    "stopping": ("#fb8c00", "warning"),
    "stopped": ("#757575", ""),
    "finished": ("#43a047", "success"),
    "finished with failures": ("#f0a30a", "warning"),
    "failed": ("#e53935", "danger"),
}


def shown_state(progress: Progress) -> str:
    """The state as the badge says it: the enum value, or "finished with failures"."""
    if progress.state is JobState.FINISHED and progress.failed > 0:
        return "finished with failures"
    return progress.state.value


def counts_text(progress: Progress) -> str:
    """The counts line in its stable, parseable format."""
    p = progress
    return COUNTS_FORMAT.format(done=p.done, total=p.total, done_before=p.done_before,
                                done_now=p.done_now, failed=p.failed, in_flight=p.in_flight)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def timing_text(progress: Progress) -> str:
    p = progress
    text = f"rate {p.rate:,.1f} items/s · elapsed {_duration(p.elapsed)} · ETA {_duration(p.eta)}"
    if p.throttled:
        text += " · held to the rate limit"
    if p.retrying:
        text += f" · {p.retrying:,} waiting to retry"
    return text


def workers_text(progress: Progress) -> str:
    if not progress.in_flight_by_worker:
        return "in flight per worker: none"
    per = " · ".join(f"{label} {count}" for label, count in progress.in_flight_by_worker)
    return f"in flight per worker: {per}"


def failures_html(failures: Iterable[Failure], total_failed: int | None = None) -> str:
    """An escaped HTML table of the last :data:`MAX_FAILURE_ROWS` of ``failures``.

    Each row's message expands (``<details>``) to the worker's full traceback;
    ``total_failed`` (default: how many were given) counts the rows not shown.
    """
    failures = tuple(failures)
    if not failures:
        return ""
    total = max(total_failed or 0, len(failures))
    shown = failures[-MAX_FAILURE_ROWS:]
    esc = html.escape
    rows = []
    for f in shown:
        first_line = f.message.splitlines()[0] if f.message else ""
        summary = esc(clip(first_line, _MESSAGE_CHARS)) or "<i>(no message)</i>"
        detail = esc(f.traceback or f.summary())
        attempts = f" (attempts {f.attempts})" if f.attempts > 1 else ""
        rows.append(
            "<tr>"
            f'<td title="{esc(short_repr(f.item, 2000))}"><code>{esc(short_repr(f.item, _ITEM_CHARS))}'
            "</code></td>"
            f"<td>{esc(f.exc_type)}{esc(attempts)}</td>"
            f"<td><details><summary>{summary}</summary>"
            f'<pre style="white-space:pre-wrap;margin:2px 0">{detail}</pre></details></td>'
            "</tr>")
    more = total - len(shown)
    head = f"<b>Failures ({total})</b>"
    if more > 0:
        head += (f" — showing the last {len(shown)}, and {more} more"
                 " (<code>python -m nbmplock failures OUT_PATH</code> lists all)")
    return (f"<div>{head}</div>"
            "<style>.nbmplock-failures td,.nbmplock-failures th"
            "{padding:2px 12px 2px 0;vertical-align:top}</style>"
            '<table style="border-collapse:collapse;font-size:12px;text-align:left">'
            "<thead><tr><th>item</th><th>exception type</th><th>message</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def output_html(lines: list[str]) -> str:
    if not lines:
        return ""
    text = html.escape("\n".join(lines))
    return ('<pre style="max-height:14em;overflow:auto;font-size:11px;margin:0;'
            f'white-space:pre-wrap">{text}</pre>')


def _nothing() -> None:
    pass


#: The panel shown for each run directory: a new Job on the same directory (the
#: cell was run again) closes the panel of the old one, unless it still runs.
_by_path: dict[str, weakref.ReferenceType] = {}
_by_path_lock = threading.Lock()


def panel_for(job: Job) -> Panel:
    """The panel of ``job`` (``job.panel``): built on first use, then the same one for
    every display, so re-running a cell or displaying a job many times adds no
    subscriber and no thread."""
    panel = job.view_state.get("panel")
    if panel is None or panel._closed:
        panel = job.view_state["panel"] = Panel(job)
        with _by_path_lock:
            old_ref = _by_path.get(job.out_path)
            _by_path[job.out_path] = weakref.ref(panel)
        old = old_ref() if old_ref is not None else None
        if old is not None and old is not panel and not old._job.state.active:
            old.close()
    elif job.reattached and job.state.active:
        panel._set_notice(REATTACHED_NOTICE)
    return panel


class Panel(widgets.VBox):
    """A live view of a :class:`~nbmplock.Job`, with Start/Stop/Resume/Retry buttons.

    ``job.panel`` is the one panel of a job; every display of the job shows it
    (several views of one widget, all live). Close it (:meth:`close`) to stop
    it listening to the job. It subscribes weakly: a closed panel that is
    dropped is no longer called.

    Examples
    --------
    >>> widgets.HBox([job.panel, plot])            # doctest: +SKIP
    """

    def __init__(self, job: Job, **kwargs: Any):
        self._job = job
        self._lock = threading.RLock()
        self._closed = False
        self._unsubscribe: Callable[[], None] = _nothing  # until subscribed, at the end
        # the newest failures by item, fed by events: no full sort of job.failures per update
        self._recent_failures: OrderedDict[Any, Failure] = OrderedDict()  # by key
        self._failures_dirty = True
        self._failed_shown: int | None = None
        self._state_text = ""
        self._notice_text = ""
        self._message_text = ""
        self._message_from_job = False

        self.title = widgets.HTML(value=(
            f"<b>nbmplock</b> · <code>{html.escape(job.out_path)}</code> · "
            f"<code>{html.escape(function_name(job.spec.process))}</code>"))
        self.notice = widgets.HTML(value="")
        self.state_badge = widgets.HTML(value="")
        self.bar = widgets.IntProgress(value=0, min=0, max=1,
                                       layout=widgets.Layout(width="50%"))
        self.percent = widgets.Label(value="")
        self.counts = widgets.Label(value="")
        self.timing = widgets.Label(value="")
        self.workers = widgets.Label(value="")
        self.start_button = widgets.Button(description="Start", icon="play",
                                           tooltip="Start the run")
        self.stop_button = widgets.Button(
            description="Stop", icon="stop",
            tooltip="Stop: workers finish their current items, which are recorded")
        self.force_stop_button = widgets.Button(
            description="Force stop", icon="times",
            tooltip="Kill the workers now; their current items stay not done")
        self.resume_button = widgets.Button(
            description="Resume", icon="forward",
            tooltip="Run every item not recorded done (failed ones included)")
        self.retry_button = widgets.Button(description="Retry failed", icon="redo",
                                           tooltip="Run only the items recorded failed")
        self.start_over_button = widgets.Button(
            description="Start over", icon="undo",
            tooltip="Forget every item recorded (done and failed) and run them all again")
        self.confirm_button = widgets.Button(description="Yes, forget everything",
                                             button_style="danger")
        self.cancel_button = widgets.Button(description="Cancel")
        self.confirm = widgets.HBox(
            [widgets.HTML(value="Forget every item recorded in this run directory and run "
                                "them all again?&nbsp;"), self.confirm_button,
             self.cancel_button], layout=widgets.Layout(display="none"))
        self.message = widgets.HTML(value="")
        self.failures_table = widgets.HTML(value="")
        self.output_tail = widgets.HTML(value="")

        for widget, css in [
            (self.title, "nbmplock-title"), (self.notice, "nbmplock-notice"),
            (self.state_badge, "nbmplock-state"), (self.bar, "nbmplock-bar"),
            (self.counts, "nbmplock-counts"), (self.timing, "nbmplock-timing"),
            (self.workers, "nbmplock-workers"), (self.message, "nbmplock-message"),
            (self.failures_table, "nbmplock-failures"), (self.output_tail, "nbmplock-output"),
        ]:
            widget.add_class(css)
        self.buttons = [self.start_button, self.stop_button, self.force_stop_button,
                        self.resume_button, self.retry_button, self.start_over_button]
        for button, action in zip(self.buttons + [self.confirm_button, self.cancel_button],
                                  ["start", "stop", "force_stop", "resume", "retry_failed",
                                   "start_over", "confirm_start_over", "cancel"]):
            button.add_class("nbmplock-button")
            button.on_click(functools.partial(self._on_click, action))

        children = [
            self.title, self.notice,
            widgets.HBox([self.state_badge, self.bar, self.percent]),
            self.counts, self.timing, self.workers,
            widgets.HBox(self.buttons), self.confirm, self.message,
            self.failures_table, self.output_tail,
        ]
        super().__init__(children=children, **kwargs)
        self.add_class("nbmplock-panel")

        if job.reattached and job.state.active:
            self._set_notice(REATTACHED_NOTICE)
        self._unsubscribe = job.subscribe(self._on_event, weak=True)
        self.refresh()

    # -- the job's events (the views thread, at most ~10 a second) --------
    def _on_event(self, event: Event) -> None:
        with self._lock:
            if self._closed:
                return
            self._add_failures(event.failures)
            if event.kind == EventKind.STATE:
                self._load_failures()
                self._apply(event.progress, output=True, state_event=True)
            else:
                self._apply(event.progress, output=bool(event.output))

    def refresh(self) -> None:
        """Show the job's current numbers now (the panel also does this by itself)."""
        with self._lock:
            self._load_failures()
            self._apply(self._job.progress, output=True, state_event=True)

    def _add_failures(self, failures: Iterable[Failure]) -> None:
        recent = self._recent_failures
        for failure in failures:
            # by key: an item may be unhashable (a dict row, a list)
            key = failure.key if failure.key is not None else failure.item
            recent.pop(key, None)
            recent[key] = failure
            self._failures_dirty = True
        while len(recent) > MAX_FAILURE_ROWS:
            recent.popitem(last=False)

    def _load_failures(self) -> None:
        self._recent_failures.clear()
        self._add_failures(self._job.failures[-MAX_FAILURE_ROWS:])
        self._failures_dirty = True

    # -- applying a snapshot: only trait values change -------------------
    def _apply(self, p: Progress, *, output: bool = False, state_event: bool = False) -> None:
        if self._closed:
            return
        state = self._state_text = shown_state(p)
        colour, bar_style = _LOOK[state]
        self.state_badge.value = (
            f'<span style="background:{colour};color:white;padding:1px 8px;'
            f'border-radius:8px;font-weight:bold">{html.escape(state)}</span>')
        total = max(p.total, 1)
        if self.bar.max != total:
            self.bar.max = total
        self.bar.value = min(p.done, total)
        self.bar.bar_style = bar_style
        self.percent.value = f"{100 * p.fraction:.1f}%"
        self.counts.value = counts_text(p)
        self.timing.value = timing_text(p)
        self.workers.value = workers_text(p)
        self._set_buttons(p)
        if self._failures_dirty or p.failed != self._failed_shown:
            self._failures_dirty = False
            self._failed_shown = p.failed
            rows = self._recent_failures.values() if p.failed else ()
            self.failures_table.value = failures_html(rows, p.failed)
        if output:
            self.output_tail.value = output_html(list(self._job.output)[-OUTPUT_LINES:])
        if state_event:
            self._show_job_message(p)

    def _set_buttons(self, p: Progress) -> None:
        state = p.state
        self.start_button.disabled = state is not JobState.IDLE
        self.stop_button.disabled = not state.active
        self.force_stop_button.disabled = not state.active
        self.resume_button.disabled = not (
            state in (JobState.STOPPED, JobState.FAILED)
            or (state is JobState.FINISHED and p.remaining > 0))
        self.retry_button.disabled = state.active or p.failed == 0
        self.start_over_button.disabled = state.active or (p.done == 0 and p.failed == 0)

    def _show_job_message(self, p: Progress) -> None:
        """Messages about the run itself; a button's error message stays until the next click."""
        job = self._job
        if p.state is JobState.FAILED and job.error is not None:
            self._set_message(f"The run failed: {type(job.error).__name__}: {job.error}",
                              error=True, from_job=True)
        elif p.state is JobState.RUNNING and job.fingerprint_changes:
            rerun = job.spec.options.on_change == "rerun"
            self._set_message("Resumed, but " + "; ".join(job.fingerprint_changes)
                              + " since the last run; " + (
                                  "items done by the old work run again." if rerun else
                                  "items recorded done are not run again (on_change='rerun' "
                                  "runs them again)."), from_job=True)
        elif job.notes and p.state is not JobState.IDLE:
            self._set_message("Note: " + "; ".join(job.notes) + ".", from_job=True)
        elif p.state is JobState.RUNNING and self._message_from_job:
            self._set_message("")
        if not p.state.active and self._notice_text:
            self._set_notice("")

    def _set_notice(self, text: str) -> None:
        self._notice_text = text
        self.notice.value = (f'<span style="color:#b26a00">{html.escape(text)}</span>'
                             if text else "")

    def _set_message(self, text: str, *, error: bool = False, from_job: bool = False) -> None:
        self._message_text = text
        self._message_from_job = from_job
        colour = "#c62828" if error else "inherit"
        self.message.value = (f'<span style="color:{colour}">{html.escape(text)}</span>'
                              if text else "")

    # -- buttons (the kernel's main thread) ------------------------------
    def _on_click(self, action: str, _button=None) -> None:
        job = self._job
        self._set_message("")
        error = None
        try:
            if action == "start":
                job.start()
            elif action == "stop":
                job.stop()
            elif action == "force_stop":
                job.stop(force=True)
            elif action == "resume":
                job.resume()
            elif action == "retry_failed":
                job.retry_failed()
            elif action == "start_over":  # asks first: it forgets every recorded item
                self.confirm.layout.display = "flex"
            elif action == "cancel":
                self.confirm.layout.display = "none"
            elif action == "confirm_start_over":
                self.confirm.layout.display = "none"
                job.forget(all=True)
                job.resume()
        except Exception as exc:  # noqa: BLE001 - shown in the panel, not lost in a callback
            error = exc
        self.refresh()
        if error is not None:
            self._set_message(f"{type(error).__name__}: {error}", error=True)

    # -- text and lifetime -----------------------------------------------
    def status_text(self) -> str:
        """What the panel shows, as plain text (for tests and logs)."""
        lines = [f"nbmplock · {self._job.out_path} · {function_name(self._job.spec.process)}",
                 f"state: {self._state_text}",
                 self.counts.value, self.timing.value, self.workers.value]
        if self._notice_text:
            lines.insert(1, self._notice_text)
        if self._failed_shown:
            lines.append(f"failures: {self._failed_shown}")
        if self._message_text:
            lines.append(self._message_text)
        return "\n".join(lines)

    def close(self) -> None:
        """Stop listening to the job and close every widget of the panel."""
        if not hasattr(self, "_lock"):  # __init__ was interrupted before building anything
            super().close()
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._unsubscribe()
        for child in self._all_children():
            child.close()
        super().close()

    def _all_children(self):
        stack = list(self.children)
        while stack:
            widget = stack.pop()
            stack.extend(getattr(widget, "children", ()))
            yield widget

