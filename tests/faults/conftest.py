"""Fixtures of the fault-injection suite, and the figures it reports.

Every test here runs under :func:`no_orphans`: while it runs, this process is
a *child subreaper* (``PR_SET_CHILD_SUBREAPER``), so a worker orphaned by a
killed driver subprocess is re-parented here instead of to init, and after
the test any child process still alive fails it (and is then killed).

Figures (kills survived, offsets tried, faults injected, items lost, ...)
are added by the tests through :data:`FIGURES`; at the end of the session
they are written as one JSON line to ``artifacts/reliability.json`` and
printed in the terminal summary. Set ``NBMPLOCK_FAULT_SEED`` to replay a run.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import random
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from . import helpers
from .helpers import FIGURES, infrastructure, reap_zombies

REPO = Path(__file__).resolve().parents[2]
ARTIFACT = REPO / "artifacts" / "reliability.json"

_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_ORPHAN_GRACE = 5.0

_SEED = int(os.environ.get("NBMPLOCK_FAULT_SEED") or (time.time_ns() % 2**31))
_outcomes: Counter = Counter()
_soak: list = []
_started = time.monotonic()


def _prctl(option: int, value: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if option == _PR_GET_CHILD_SUBREAPER:
        out = ctypes.c_int(0)
        libc.prctl(option, ctypes.byref(out), 0, 0, 0)
        return out.value
    return libc.prctl(option, value, 0, 0, 0)


@pytest.fixture(scope="session")
def seed() -> int:
    print(f"\nnbmplock fault suite seed: {_SEED} (replay with NBMPLOCK_FAULT_SEED={_SEED})")
    return _SEED


@pytest.fixture
def rng(seed, request) -> random.Random:
    """A random source per test, derived from the session seed and the test id."""
    value = f"{seed}:{request.node.nodeid}"
    print(f"rng seed {value!r}")
    return random.Random(value)


def _alive_children(baseline: set[int]) -> list[psutil.Process]:
    reap_zombies()
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in baseline or child.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        if not infrastructure(child):
            alive.append(child)
    return alive


@pytest.fixture(autouse=True)
def no_orphans():
    """Fail a test that leaves any child (or re-parented orphan) process alive."""
    baseline = {p.pid for p in psutil.Process().children(recursive=True)}
    # Processes that were there before the test (a session-wide JupyterLab of the
    # browser tests, say) are not the test's workers: own_children() skips them.
    helpers.PREEXISTING = frozenset(baseline)
    before = _prctl(_PR_GET_CHILD_SUBREAPER)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield
        deadline = time.monotonic() + _ORPHAN_GRACE
        alive = _alive_children(baseline)
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = _alive_children(baseline)
        if alive:
            described = []
            for proc in alive:
                try:
                    described.append(f"pid {proc.pid} {' '.join(proc.cmdline())[:120]!r}")
                except psutil.Error:
                    described.append(f"pid {proc.pid}")
                try:
                    proc.kill()  # started by this test: do not let it leak into the next
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=5)
            reap_zombies()
            pytest.fail(f"{len(alive)} child process(es) outlived the test: "
                        + "; ".join(described), pytrace=False)
    finally:
        _prctl(_PR_SET_CHILD_SUBREAPER, before)
        reap_zombies()


# -- figures ------------------------------------------------------------------

def pytest_runtest_logreport(report):
    if "faults/" not in report.nodeid.replace(os.sep, "/"):
        return
    if report.when == "call" and "soak" in report.keywords:
        _soak.append(report.nodeid)
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else (
            "xpassed" if hasattr(report, "wasxfail") else report.outcome)
        _outcomes[outcome] += 1


def _summary() -> dict:
    data = {"suite": "tests/faults", "seed": _SEED}
    data.update(FIGURES.as_dict())
    data.setdefault("items_lost", 0)
    data["tests"] = dict(sorted(_outcomes.items()))
    data["soak"] = bool(_soak)
    data["duration_s"] = round(time.monotonic() - _started, 1)
    data["python"] = platform.python_version()
    data["cpus"] = os.cpu_count()
    data["when"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return data


def pytest_sessionfinish(session, exitstatus):
    if not _outcomes:
        return
    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.write_text(json.dumps(_summary(), sort_keys=False) + "\n", encoding="utf-8")


def pytest_terminal_summary(terminalreporter):
    if not _outcomes:
        return
    data = _summary()
    line = (f"nbmplock reliability: {data.get('kills_survived', 0)} kills survived, "
            f"{data.get('offsets_tried', 0)} offsets tried, "
            f"{data.get('faults_injected', 0)} faults injected, "
            f"{data['items_lost']} items lost (seed {_SEED}) -> {ARTIFACT.relative_to(REPO)}")
    terminalreporter.write_line(line)
