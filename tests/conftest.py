"""Shared fixtures: every test must leave no child process behind."""

from __future__ import annotations

import os
import time

import psutil
import pytest


def _alive_children() -> list[psutil.Process]:
    alive = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(autouse=True)
def no_orphans(request):
    """Fail a test that leaves worker processes running (after a short grace)."""
    before = {p.pid for p in _alive_children()}
    yield
    deadline = time.monotonic() + 5
    while True:
        left = [p for p in _alive_children() if p.pid not in before]
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
