"""Process functions for tests: module level, so every start method can use them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

#: Child processes alive when the current test began (set by tests/conftest.py):
#: a resource tracker, a Dask cluster of another module, a session's JupyterLab.
BEFORE_TEST: set = set()


def children() -> list:
    """Live (non-zombie) descendants of this process."""
    alive = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


#: One per interpreter, started by multiprocess for spawn/forkserver: not a worker.
INFRASTRUCTURE = ("resource_tracker", "forkserver")


def _infrastructure(proc) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(word in cmd for word in INFRASTRUCTURE)


def alive_children() -> list:
    """Child processes started since the current test began (not multiprocess's helpers)."""
    return [p for p in children() if p.pid not in BEFORE_TEST and not _infrastructure(p)]


def length(item, shared_data, init_values):
    return len(item)


def frame_of(item, shared_data, init_values):
    import pandas as pd
    return pd.DataFrame({"a": [item, item]})


def echo(item, shared_data, init_values):
    return item


def slow(item, shared_data, init_values):
    time.sleep(shared_data.get("sleep", 0.002))
    return item


def fail_on_seven(item, shared_data, init_values):
    if item.endswith("7"):
        raise ValueError(f"no sevens: {item}")
    return item


def init_pid(shared_data):
    return {"pid": os.getpid(), "token": shared_data.get("token")}


def with_init(item, shared_data, init_values):
    return f"{item}:{init_values['pid']}:{init_values['token']}"


def batch_upper(items, shared_data, init_values):
    return [i.upper() for i in items]


class Saver:
    """A save_callback that remembers every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, path, results, names):
        self.calls.append((path, list(results), list(names)))

    @property
    def names(self):
        return [n for _, _, batch in self.calls for n in batch]


def dump_stacks(why: str) -> None:
    """Print every thread's stack to stderr: a hang must explain itself."""
    import faulthandler
    import sys

    sys.stderr.write(f"\n=== {why}: stacks of every thread of pid {os.getpid()} ===\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def join_or_dump(thread, timeout: float, what: str = "thread") -> None:
    """Join ``thread``; if it is still alive after ``timeout``, dump stacks and fail."""
    import pytest

    thread.join(timeout)
    if thread.is_alive():
        dump_stacks(f"{what} still running after {timeout} s")
        pytest.fail(f"{what} did not end within {timeout} s (stacks dumped to stderr)")


def wait_job(job, timeout: float = 60.0) -> None:
    """``job.wait`` bounded; on timeout dump every thread's stack and fail."""
    import pytest

    if not job.wait(timeout):
        dump_stacks(f"job on {job.out_path!r} still {job.state.value} after {timeout} s")
        pytest.fail(f"the job did not end within {timeout} s (stacks dumped to stderr)")


def py_spy() -> str | None:
    """The py-spy executable (the venv's, else on PATH), or None."""
    here = Path(sys.executable).parent / "py-spy"
    if here.exists():
        return str(here)
    import shutil

    return shutil.which("py-spy")


def thread_stacks(procs: list[psutil.Process], timeout: float = 20.0) -> str:
    """Every thread's Python stack of each process (``py-spy dump``), as text.

    For a test that timed out: what a kernel, a driver or their workers were
    doing. A busy process cannot print its own stacks; py-spy reads them from
    outside."""
    exe = py_spy()
    if exe is None:
        return "(py-spy is not installed: pip install py-spy, to see the kernel's stacks)"
    out = []
    for p in procs:
        try:
            head = f"==== pid {p.pid}: {' '.join(p.cmdline()[:3])}"
        except psutil.Error:
            continue
        try:
            res = subprocess.run([exe, "dump", "--pid", str(p.pid)], capture_output=True,
                                 text=True, timeout=timeout)
            body = (res.stdout + res.stderr).strip()
        except subprocess.TimeoutExpired:
            body = f"(py-spy dump timed out after {timeout:.0f}s)"
        except OSError as e:
            body = f"(py-spy failed: {e})"
        out.append(f"{head}\n{body}")
    return "\n\n".join(out) or "(no process)"
