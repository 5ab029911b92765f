"""A tqdm bar over a whole Job: the terminal view used by ``mp_lock(verbose=True)``.

One bar for the run (not one per process): done of total, items done in
earlier runs as the bar's ``initial``, the failed count in the postfix. Worker
output is written above the bar with ``tqdm.write`` so it never garbles it.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from ._job import Event, Job


class TqdmObserver:
    """Subscribe a tqdm bar to ``job``; :meth:`close` when the run is over."""

    def __init__(self, job: Job, *, show_output: bool = True, file=None):
        p = job.progress
        self._bar = tqdm(total=p.total, initial=p.done, unit="item", dynamic_ncols=True,
                         desc="nbmplock", file=file, smoothing=0.1)
        self._file = file
        self._show_output = show_output
        self._failed = -1
        self._set_failed(p.failed)
        self._unsubscribe = job.subscribe(self._on_event)

    def _set_failed(self, failed: int) -> None:
        if failed != self._failed:
            self._failed = failed
            self._bar.set_postfix(failed=failed, refresh=False)

    def _on_event(self, event: Event) -> None:
        p = event.progress
        if self._show_output and event.output:
            for line in event.output:
                self._bar.write(line, file=self._file or sys.stdout)
        self._set_failed(p.failed)
        if p.done != self._bar.n:
            self._bar.update(p.done - self._bar.n)

    def close(self) -> None:
        self._unsubscribe()
        self._bar.close()
