"""Shared fixtures: every test must leave no child process behind."""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from . import helpers


@pytest.fixture(autouse=True)
def no_orphans(request):
    """Fail a test that leaves worker processes running (after a short grace)."""
    helpers.BEFORE_TEST.clear()
    helpers.BEFORE_TEST.update(p.pid for p in helpers.children())
    yield
    deadline = time.monotonic() + 5
    while True:
        left = helpers.alive_children()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if left:
        names = [f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in left]
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        pytest.fail(f"child processes left behind: {names}")


@pytest.fixture(autouse=True)
def hung_jobs_explain_themselves(monkeypatch):
    """A ``job.wait(timeout)`` of 10 s or more that returns False is a hang:
    print every thread's stack before the test's assertion fails on it."""
    import nbmplock

    real_wait = nbmplock.Job.wait

    def wait(self, timeout=None):
        ended = real_wait(self, timeout)
        if not ended and timeout is not None and timeout >= 10:
            helpers.dump_stacks(f"job on {self.out_path!r} still {self.state.value} "
                                f"after wait({timeout})")
        return ended

    monkeypatch.setattr(nbmplock.Job, "wait", wait)


@pytest.fixture
def default_sigint():
    """For a test that sends SIGINT to this process: Python's KeyboardInterrupt
    handler, which is missing when the suite was started with SIGINT ignored
    (in the background by a non-interactive shell, as some CI runners do)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
