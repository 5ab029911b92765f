"""A tqdm bar over a whole Job: the terminal view used by ``mp_lock(verbose=True)``.

One bar for the run (not one per process): done of total, items done in
earlier runs as the bar's ``initial``, the failed count in the postfix. Worker
output is written above the bar with ``tqdm.write`` so it never garbles it.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from tqdm.auto import tqdm

from ._job import Job
from ._state import Event, EventKind


#: Lines of worker output written to the terminal per second, at most; the rest
#: are counted and named in one line (every line is in the run's output.log).
MAX_LINES_PER_SECOND = 100


class TqdmObserver:
    """Subscribe a tqdm bar to ``job``; :meth:`close` when the run is over."""

    def __init__(self, job: Job, *, show_output: bool = True, file=None):
        p = job.progress
        self._bar = tqdm(total=p.total, initial=p.done, unit="item", dynamic_ncols=True,
                         desc="nbmplock", file=file, smoothing=0.1)
        self._file = file
        self._show_output = show_output
        self._log_path = os.path.join(job.out_path, ".nbmplock", "output.log")
        self._window = 0.0  # start of the current second
        self._shown = 0     # lines written in it
        self._hidden = 0    # lines not written since the last note
        self._failed = -1
        self._set_failed(p.failed)
        self._job = job
        # Events come on the views thread; close() comes from the caller's: one
        # lock keeps them from drawing the bar at once.
        self._lock = threading.Lock()
        self._closed = False
        self._told = False
        self._unsubscribe = job.subscribe(self._on_event)

    def _set_failed(self, failed: int) -> None:
        if failed != self._failed:
            self._failed = failed
            self._bar.set_postfix(failed=failed, refresh=False)

    def _write_output(self, lines) -> None:
        """One write per event (tqdm redraws the bar once), at most
        :data:`MAX_LINES_PER_SECOND` lines a second; a chatty job is not slowed
        down by the terminal."""
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._window, self._shown = now, 0
        room = max(0, MAX_LINES_PER_SECOND - self._shown)
        shown = list(lines[:room])
        self._hidden += len(lines) - len(shown)
        if self._hidden and (room > len(shown) or not shown):
            shown.append(f"[nbmplock: {self._hidden:,} more lines of worker output not "
                          f"shown here; every line is in {self._log_path}]")
            self._hidden = 0
        if shown:
            self._shown += len(shown)
            self._bar.write("\n".join(shown), file=self._file or sys.stdout)

    def _on_event(self, event: Event) -> None:
        with self._lock:
            if self._closed:
                return
            p = event.progress
            if not self._told and event.kind == EventKind.STATE and p.state.active:
                self._told = True  # once, above the bar: what changed since the last run
                for change in self._job.fingerprint_changes:
                    self._bar.write(f"nbmplock: resuming, but {change} since the last run",
                                    file=self._file or sys.stdout)
            if self._show_output and (event.output or self._hidden):
                self._write_output(event.output)
            self._show(p)

    def _show(self, p) -> None:
        self._set_failed(p.failed)
        if p.done != self._bar.n:
            self._bar.update(p.done - self._bar.n)

    def close(self) -> None:
        """Show the final numbers and close the bar (the run is over)."""
        self._unsubscribe()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._hidden:
                self._window = 0.0
                self._write_output(())
            self._show(self._job.progress)
            self._bar.close()
