"""Shared tools of the fault-injection tests: the driver subprocess, ledgers, mounts."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import psutil
import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DRIVER = HERE / "driver.py"


class Figures:
    """Counters the suite reports in ``artifacts/reliability.json``."""

    def __init__(self):
        self._data: dict = {}

    def add(self, name: str, n: int = 1) -> None:
        self._data[name] = self._data.get(name, 0) + n

    def maximum(self, name: str, value) -> None:
        self._data[name] = max(self._data.get(name, value), value)

    def as_dict(self) -> dict:
        return dict(self._data)


FIGURES = Figures()


# -- processes ----------------------------------------------------------------

def reap_zombies() -> None:
    """Collect exit statuses of dead children (orphans re-parented to us)."""
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)
        except (psutil.Error, ChildProcessError, OSError):
            pass


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids, timeout: float = 10.0) -> list[int]:
    """Wait until none of ``pids`` is alive; return those still alive."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        reap_zombies()
        left = [p for p in left if alive(p)]
    return left


def descendants(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


# One per interpreter, started by multiprocess for spawn/forkserver; not a worker.
INFRASTRUCTURE = ("resource_tracker", "forkserver")


def infrastructure(proc: psutil.Process) -> bool:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return any(word in cmd for word in INFRASTRUCTURE)


#: Children of the test process from before the current test (set by conftest).
PREEXISTING: frozenset = frozenset()


def own_children() -> list[int]:
    """Live (non-zombie) descendants of this process, orphans re-parented here included,
    except multiprocess's own helper processes (see :data:`INFRASTRUCTURE`) and
    processes that existed before the test (:data:`PREEXISTING`)."""
    reap_zombies()
    out = []
    for child in psutil.Process().children(recursive=True):
        if child.pid in PREEXISTING:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE and not infrastructure(child):
                out.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return out


class Driver:
    """One ``tests/faults/driver.py`` subprocess."""

    def __init__(self, cfg: dict, log_dir: Path, script: Path = DRIVER):
        self.cfg = cfg
        self.stderr_path = Path(log_dir) / f"driver-r{cfg['run']:04d}-{time.time_ns()}.err"
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        env.pop("NBMPLOCK_FAULT_SEED", None)
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg)],
                                         stdout=subprocess.PIPE, stderr=err, env=env,
                                         cwd=str(REPO))
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the driver printed READY (imports done, about to call nbmplock)."""
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stdout.fileno()
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.dump_stacks()
                self.kill()
                raise AssertionError(f"driver not ready after {timeout} s: {self.stderr(20_000)}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait(10)
                    raise AssertionError(f"driver exited before READY "
                                         f"(rc {self.proc.returncode}): {self.stderr()}")
                buf += chunk
        assert buf.startswith(b"READY"), buf

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(30)

    def kill_with_workers(self, bound: float, late_bound: float = 0.0) -> list[int]:
        """SIGKILL the driver; return the pids of its workers still alive ``bound``
        seconds later (they must die with it: PR_SET_PDEATHSIG), and of children
        started an instant before the kill (under spawn, one still starting its
        interpreter) still alive ``late_bound`` seconds after that."""
        workers_seen = own_children()
        self.kill()
        left = wait_gone(workers_seen, timeout=bound)
        if late_bound:
            left += wait_gone([p for p in own_children() if p not in left], timeout=late_bound)
        return left

    def finish(self, timeout: float) -> int:
        rc = self.wait(timeout)
        if rc is None:
            self.dump_stacks()
            self.kill()
            raise AssertionError(f"driver hung for {timeout} s: {self.stderr(20_000)}")
        return rc

    def dump_stacks(self) -> None:
        """Every thread's stack of the driver into its stderr file (SIGUSR1, see driver)."""
        self.signal(signal.SIGUSR1)
        time.sleep(0.5)

    def stderr(self, limit: int = 4000) -> str:
        try:
            return self.stderr_path.read_text("utf-8", "replace")[-limit:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self.proc.stdout.close()


# -- ledgers ------------------------------------------------------------------

def read_jsonl(path: Path) -> tuple[list, bool]:
    """The JSON values of complete lines, and whether the last line was torn."""
    data = Path(path).read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop() != b""
    return [json.loads(line) for line in lines], torn


class Ledger:
    """What a series of driver runs on one ``out_path`` left in the ledger directory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.processed: dict[int, Counter] = defaultdict(Counter)  # run -> item counts
        self.saved: dict[int, Counter] = defaultdict(Counter)
        self.saved_results: dict[str, list] = {}
        self.bad_results: list[str] = []
        self.workers: dict[int, set[int]] = defaultdict(set)  # run -> worker pids
        self.torn_lines = 0
        self.load()

    def load(self) -> None:
        self.processed.clear()
        self.saved.clear()
        self.workers.clear()
        self.torn_lines = 0
        for path in sorted(self.path.glob("processed-r*-p*.jsonl")):
            run, pid = path.stem.split("-")[1:3]
            items, torn = read_jsonl(path)
            self.torn_lines += torn
            self.processed[int(run[1:])].update(items)
            self.workers[int(run[1:])].add(int(pid[1:]))
        for path in sorted(self.path.glob("saved-r*.jsonl")):
            run = int(path.stem.split("-")[1][1:])
            rows, torn = read_jsonl(path)
            self.torn_lines += torn
            for item, result in rows:
                self.saved[run][item] += 1
                self.saved_results[item] = result

    def all_processed(self) -> Counter:
        total: Counter = Counter()
        for counts in self.processed.values():
            total.update(counts)
        return total

    def all_saved(self) -> Counter:
        total: Counter = Counter()
        for counts in self.saved.values():
            total.update(counts)
        return total

    def final(self, run: int) -> dict:
        return json.loads((self.path / f"final-r{run:04d}.json").read_text("utf-8"))


# -- mounts -------------------------------------------------------------------

def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A size-limited tmpfs at ``path``; the test is skipped when it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield path
    finally:
        res = _run("umount", str(path))
        if res.returncode != 0:
            _run("umount", "-l", str(path))


def remount(path: Path, options: str) -> None:
    res = _run("mount", "-o", f"remount,{options}", str(path))
    assert res.returncode == 0, f"remount {options} failed: {res.stderr}"
