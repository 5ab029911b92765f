"""Issue 6, item 3: workers that crash, hang, explode or flood, for real.

A real segfault (``ctypes.string_at(0)``), a real SIGKILL of the worker by
itself, ``os._exit(3)``, a raising or crashing ``init_function``, a hang past
``item_timeout``, results that cannot be pickled, a 2 GiB result under an
``RLIMIT_AS`` cap, and megabytes of output. Each must become a clear per-item
failure (``errors="record"``) or a clear error (``errors="raise"``) with
finished items kept, the run must go on where that makes sense, and nothing
may hang: every test has a hard timeout, and :func:`no_orphans` checks that
no worker outlives it.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

import nbmplock
from nbmplock import _read

from .helpers import FIGURES, alive


# -- the faulty process function and its helpers (module level: fork and hashing) --

def _segfault():
    ctypes.string_at(0)


def _hang():
    time.sleep(3600)


def _trigger(kind: str, shared: dict):
    if kind == "segv":
        _segfault()
    elif kind == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "exit3":
        os._exit(3)
    elif kind == "raise":
        raise KeyError("a plain exception from process")
    elif kind == "hang":
        _hang()
    elif kind == "lambda":
        return lambda: "a lambda cannot be pickled"
    elif kind == "lock":
        return threading.Lock()
    elif kind == "socket":
        return socket.socket()
    elif kind == "huge":
        return "x" * (2 << 30)  # 2 GiB: more than RLIMIT_AS allows
    elif kind == "big":
        return bytes(shared["big_bytes"])  # fits once, not twice (pickling copies it)
    raise AssertionError(kind)


def faulty(item: str, shared: dict, init_values) -> str:
    """Ledger the item; trigger its fault (once, when ``shared["once"]``); return a value."""
    fd = os.open(shared["ledger"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, (json.dumps(item) + "\n").encode())
    os.close(fd)
    kind = shared["faults"].get(item)
    if kind is not None:
        marker = shared["ledger"] + f".{kind}.fired"
        if not (shared.get("once") and os.path.exists(marker)):
            open(marker, "w").close()
            print(f"last words before {kind} on {item}", flush=True)
            value = _trigger(kind, shared)
            if value is not None:
                return value
    return value_of(item)


def value_of(item: str) -> str:
    return item.upper()


def capped_init(shared: dict) -> dict:
    """Cap this worker's address space a little above what it already uses."""
    vms = psutil.Process().memory_info().vms
    limit = vms + shared["headroom"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return {}


def failing_init(shared: dict) -> dict:
    print("init is about to fail", flush=True)
    raise ConnectionError("model server unreachable")


def crashing_init(shared: dict) -> dict:
    os._exit(4)


# -- helpers -----------------------------------------------------------------

ITEMS = [f"job-{i:03d}" for i in range(40)]
FAULT_AT = 17
DEATHS = {  # kind -> (exitcode, words in the message)
    "segv": (-signal.SIGSEGV, "SIGSEGV"),
    "sigkill": (-signal.SIGKILL, "SIGKILL"),
    "exit3": (3, "exited with code 3"),
}


def setup(tmp_path: Path, faults: dict, **extra) -> dict:
    return dict(ledger=str(tmp_path / "ledger"), faults=faults, **extra)


def processed(shared: dict) -> Counter:
    path = Path(shared["ledger"])
    if not path.exists():
        return Counter()
    return Counter(json.loads(line) for line in path.read_text().splitlines())


def output_log(out: Path) -> str:
    return (out / _read.STATE_DIR / "output.log").read_bytes().decode("utf-8", "replace")


def run_value(tmp_path: Path, shared: dict, *, items=ITEMS, workers=2, **kw):
    kw.setdefault("chunk_size", 3)
    return nbmplock.mp_lock_value(items, faulty, None, workers, str(tmp_path / "out"),
                                  shared_data=shared, verbose=False, **kw)


def assert_duplicates_only_in_chunk(counts: Counter, items: list, fault_index: int,
                                    chunk_size: int) -> None:
    """Items run twice: only those sent with the faulty item (their chunk came back lost)."""
    twice = {i for i, n in counts.items() if n > 1}
    first = fault_index - fault_index % chunk_size
    assert twice <= set(items[first:first + chunk_size]) - {items[fault_index]}, twice


# -- dying workers -----------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(DEATHS))
def test_worker_death_is_a_failure_of_its_item_and_the_run_goes_on(tmp_path, kind):
    bad = ITEMS[FAULT_AT]
    shared = setup(tmp_path, {bad: kind})
    values = run_value(tmp_path, shared, errors="record")
    assert values == [None if i == bad else value_of(i) for i in ITEMS]
    snap = nbmplock.read_snapshot(str(tmp_path / "out"))
    assert snap.done == len(ITEMS) - 1 and len(snap.failures) == 1
    failure = snap.failures[0]
    exitcode, words = DEATHS[kind]
    assert (failure.item, failure.kind, failure.exc_type) == (bad, "died", "WorkerDied")
    assert failure.exitcode == exitcode and words in failure.message, failure
    assert failure.worker_pid and not alive(failure.worker_pid)
    counts = processed(shared)
    assert set(counts) == set(ITEMS)
    assert counts[bad] == 1
    assert_duplicates_only_in_chunk(counts, ITEMS, FAULT_AT, 3)
    log = output_log(tmp_path / "out")
    assert f"last words before {kind} on {bad}" in log
    if kind == "segv":
        assert "Segmentation fault" in log  # the worker's faulthandler dump is kept too
    FIGURES.add("faults_injected")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(DEATHS))
def test_worker_death_raises_with_errors_raise_then_resume_completes(tmp_path, kind):
    bad = ITEMS[FAULT_AT]
    shared = setup(tmp_path, {bad: kind}, once=True)
    with pytest.raises(nbmplock.WorkerDiedError) as info:
        run_value(tmp_path, shared)
    exitcode, words = DEATHS[kind]
    assert info.value.item == bad and info.value.exitcode == exitcode
    assert words in str(info.value) and repr(bad) in str(info.value)
    out = str(tmp_path / "out")
    contents = _read.read_contents(out)
    assert bad not in contents.done and bad in contents.failures
    before = processed(shared)
    assert contents.done <= set(before)
    # resume: the fault fired once; now everything completes
    values = run_value(tmp_path, shared)
    assert values == [value_of(i) for i in ITEMS]
    assert nbmplock.read_snapshot(out).failures == ()
    counts = processed(shared)
    again = {i for i in contents.done if counts[i] > before[i]}
    assert not again, f"items recorded done ran again on resume: {again}"
    FIGURES.add("faults_injected")


@pytest.mark.timeout(60)
def test_max_retries_absorbs_a_crash_once(tmp_path):
    bad = ITEMS[5]
    shared = setup(tmp_path, {bad: "segv"}, once=True)
    assert run_value(tmp_path, shared, max_retries=1) == [value_of(i) for i in ITEMS]
    assert nbmplock.read_snapshot(str(tmp_path / "out")).failures == ()
    FIGURES.add("faults_injected")


@pytest.mark.timeout(90)
def test_crash_every_attempt_exhausts_retries(tmp_path):
    bad = ITEMS[5]
    shared = setup(tmp_path, {bad: "exit3"})
    values = run_value(tmp_path, shared, max_retries=2, errors="record")
    assert values[5] is None and values[6] == value_of(ITEMS[6])
    (failure,) = nbmplock.read_snapshot(str(tmp_path / "out")).failures
    assert failure.kind == "died" and failure.attempts == 3
    assert processed(shared)[bad] == 3
    FIGURES.add("faults_injected", 3)


@pytest.mark.timeout(60)
def test_plain_exception_keeps_its_type(tmp_path):
    bad = ITEMS[FAULT_AT]
    shared = setup(tmp_path, {bad: "raise"})
    with pytest.raises(KeyError) as info:
        run_value(tmp_path, shared)
    assert isinstance(info.value.__cause__, nbmplock.RemoteTraceback)
    assert "a plain exception from process" in str(info.value.__cause__)
    assert any(repr(bad) in note for note in getattr(info.value, "__notes__", []))
    values = run_value(tmp_path, shared, errors="record")
    assert values == [None if i == bad else value_of(i) for i in ITEMS]
    (failure,) = nbmplock.read_snapshot(str(tmp_path / "out")).failures
    assert failure.kind == "exception" and failure.exc_type == "KeyError"
    FIGURES.add("faults_injected", 2)




@pytest.mark.timeout(60)
def test_items_bigger_than_a_task_pipe(tmp_path):
    items = [f"{i}-" + "x" * (2 << 20) for i in range(4)]  # 2 MB each, one per chunk
    shared = setup(tmp_path, {})
    assert run_value(tmp_path, shared, items=items, workers=1, chunk_size=1) == \
        [value_of(i) for i in items]


@pytest.mark.timeout(120)
def test_huge_items_travel_and_survive_a_crash(tmp_path):
    """3 MB items: each task is bigger than a task pipe holds, and one worker dies."""
    items = [f"big{i}-" + "x" * (3 << 20) for i in range(4)] + [f"small{i}" for i in range(30)]
    bad = items[1]
    shared = setup(tmp_path, {bad: "segv"}, once=True)
    values = run_value(tmp_path, shared, items=items, errors="record", chunk_size=None)
    assert values == [None if i == bad else value_of(i) for i in items]
    (failure,) = nbmplock.read_snapshot(str(tmp_path / "out")).failures
    assert failure.item == bad and failure.kind == "died"
    assert run_value(tmp_path, shared, items=items) == [value_of(i) for i in items]
    assert processed(shared)[bad] == 2
    FIGURES.add("faults_injected")


@pytest.mark.timeout(120)
def test_retry_failed_runs_only_the_failures(tmp_path):
    bad = {ITEMS[3]: "segv", ITEMS[20]: "exit3", ITEMS[30]: "raise"}
    shared = setup(tmp_path, bad, once=True)
    out = str(tmp_path / "out")
    job = nbmplock.Job(ITEMS, faulty, out, num_procs=2, shared_data=shared, chunk_size=3)
    job.start()
    assert job.wait(60) and job.state is nbmplock.JobState.FINISHED
    assert {f.item for f in job.failures} == set(bad)
    before = processed(shared)
    job.retry_failed()
    assert job.wait(60) and job.state is nbmplock.JobState.FINISHED
    assert job.failures == () and nbmplock.is_mp_lock_completed(ITEMS, out)
    ran = processed(shared) - before
    assert set(ran) == set(bad) and max(ran.values()) == 1
    assert job.results() == [value_of(i) for i in ITEMS]
    FIGURES.add("faults_injected", 3)


# -- init_function -----------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("errors", ["record", "raise"])
def test_init_function_raising_ends_the_run_cleanly(tmp_path, errors):
    shared = setup(tmp_path, {})
    started = time.monotonic()
    with pytest.raises(nbmplock.WorkerInitError) as info:
        run_value(tmp_path, shared, init_function=failing_init, errors=errors)
    assert time.monotonic() - started < 30
    assert "ConnectionError" in str(info.value) and "model server unreachable" in str(info.value)
    cause = info.value.__cause__  # the worker's exception, with its own type
    assert isinstance(cause, ConnectionError), repr(cause)
    assert isinstance(cause.__cause__, nbmplock.RemoteTraceback)
    assert "failing_init" in str(cause.__cause__)
    assert processed(shared) == Counter(), "items ran although init_function failed"
    snap = nbmplock.read_snapshot(str(tmp_path / "out"))
    assert snap.holder_pid is None and snap.done == 0
    assert "init is about to fail" in output_log(tmp_path / "out")
    # the run directory is fine: a good init completes it
    assert run_value(tmp_path, shared) == [value_of(i) for i in ITEMS]
    FIGURES.add("faults_injected")


@pytest.mark.timeout(60)
def test_init_function_crashing_the_process_is_a_clear_error(tmp_path):
    shared = setup(tmp_path, {})
    with pytest.raises(nbmplock.WorkerDiedError) as info:
        run_value(tmp_path, shared, init_function=crashing_init, errors="record")
    assert "before they are ready" in str(info.value) and "code 4" in str(info.value)
    assert processed(shared) == Counter()
    assert run_value(tmp_path, shared) == [value_of(i) for i in ITEMS]
    FIGURES.add("faults_injected")


# -- hangs -------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_hang_becomes_a_timeout_failure_and_the_run_goes_on(tmp_path):
    bad = ITEMS[FAULT_AT]
    shared = setup(tmp_path, {bad: "hang"})
    started = time.monotonic()
    values = run_value(tmp_path, shared, errors="record", item_timeout=1.0)
    assert time.monotonic() - started < 30
    assert values == [None if i == bad else value_of(i) for i in ITEMS]
    (failure,) = nbmplock.read_snapshot(str(tmp_path / "out")).failures
    assert (failure.item, failure.kind, failure.exc_type) == (bad, "timeout", "ItemTimeout")
    assert "item_timeout=1" in failure.message and failure.duration >= 1.0
    FIGURES.add("faults_injected")


@pytest.mark.timeout(60)
def test_hang_raises_item_timeout_error(tmp_path):
    bad = ITEMS[3]
    shared = setup(tmp_path, {bad: "hang"}, once=True)
    with pytest.raises(nbmplock.ItemTimeoutError) as info:
        run_value(tmp_path, shared, item_timeout=0.5)
    assert info.value.item == bad and isinstance(info.value, TimeoutError)
    assert run_value(tmp_path, shared, item_timeout=0.5) == [value_of(i) for i in ITEMS]
    FIGURES.add("faults_injected")


@pytest.mark.timeout(60)
def test_every_worker_hangs(tmp_path):
    """Both workers stuck at once: both are killed and replaced, nothing waits forever."""
    shared = setup(tmp_path, {ITEMS[0]: "hang", ITEMS[1]: "hang"})
    values = run_value(tmp_path, shared, errors="record", item_timeout=0.5, chunk_size=1)
    assert values[:2] == [None, None] and values[2:] == [value_of(i) for i in ITEMS[2:]]
    FIGURES.add("faults_injected", 2)


# -- results that cannot come back -------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["lambda", "lock"])
def test_result_only_dill_can_pickle_is_kept(tmp_path, kind):
    """A lambda or a Lock travels back with dill and is stored with dill.

    It once passed the worker, then failed the whole mp_lock_value run in the store's
    pickle.dumps (fixed in 40f894e). It must survive a re-read from disk too.
    """
    bad = ITEMS[FAULT_AT]
    shared = setup(tmp_path, {bad: kind})
    for attempt in range(2):  # the first run stores it, the second reads it from the log
        values = run_value(tmp_path, shared, errors="record")
        assert values[:FAULT_AT] + values[FAULT_AT + 1:] == \
            [value_of(i) for i in ITEMS if i != bad]
        kept = values[FAULT_AT]
        assert callable(kept) if kind == "lambda" else type(kept).__name__ == "lock", kept
    assert nbmplock.read_snapshot(str(tmp_path / "out")).failures == ()
    assert processed(shared)[bad] == 1
    FIGURES.add("faults_injected")


@pytest.mark.timeout(60)
def test_unpicklable_result_is_a_per_item_failure(tmp_path):
    bad = ITEMS[FAULT_AT]
    shared = setup(tmp_path, {bad: "socket"})
    values = run_value(tmp_path, shared, errors="record")
    assert values == [None if i == bad else value_of(i) for i in ITEMS]
    (failure,) = nbmplock.read_snapshot(str(tmp_path / "out")).failures
    assert (failure.item, failure.kind) == (bad, "unpicklable")
    assert "cannot be pickled" in failure.message
    FIGURES.add("faults_injected")


@pytest.mark.timeout(60)
def test_unpicklable_result_raises_serialization_error(tmp_path):
    bad = ITEMS[FAULT_AT]
    shared = setup(tmp_path, {bad: "socket"})
    with pytest.raises(nbmplock.SerializationError, match="cannot be pickled"):
        run_value(tmp_path, shared)
    assert bad not in _read.read_contents(str(tmp_path / "out")).done
    FIGURES.add("faults_injected")


@pytest.mark.timeout(60)
def test_unpicklable_result_is_fine_when_only_saved(tmp_path):
    """mp_lock with a save_callback keeps no results: a lambda result reaches the callback."""
    bad = ITEMS[FAULT_AT]
    shared = setup(tmp_path, {bad: "lambda"})
    got = {}

    def save(path, results, names):
        got.update(zip(names, results))

    nbmplock.mp_lock(ITEMS, faulty, save, 2, str(tmp_path / "out"), shared_data=shared,
                     verbose=False)
    assert set(got) == set(ITEMS) and callable(got[bad])
    FIGURES.add("faults_injected")


# -- memory ------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("errors", ["record", "raise"])
@pytest.mark.parametrize("kind,headroom", [("huge", 512 << 20), ("big", 400 << 20)])
def test_result_too_big_for_capped_memory(tmp_path, errors, kind, headroom):
    """RLIMIT_AS in init_function: a MemoryError (or a dead worker), never a hang."""
    bad = ITEMS[FAULT_AT]
    shared = setup(tmp_path, {bad: kind}, headroom=headroom, big_bytes=300 << 20)
    started = time.monotonic()
    if errors == "record":
        values = run_value(tmp_path, shared, errors="record", init_function=capped_init)
        assert values == [None if i == bad else value_of(i) for i in ITEMS]
        (failure,) = nbmplock.read_snapshot(str(tmp_path / "out")).failures
        assert failure.item == bad and failure.kind in ("exception", "unpicklable", "died")
        if failure.kind != "died":
            assert failure.exc_type == "MemoryError", failure
    else:
        with pytest.raises((MemoryError, nbmplock.WorkerDiedError,
                            nbmplock.SerializationError)):
            run_value(tmp_path, shared, init_function=capped_init)
        assert bad not in _read.read_contents(str(tmp_path / "out")).done
    assert time.monotonic() - started < 90
    FIGURES.add("faults_injected")


# -- output ------------------------------------------------------------------

LINES_PER_ITEM = 800


def chatty(item: str, shared: dict, init_values) -> str:
    """~100 KB of output per item on stdout and stderr, by print and by raw os.write."""
    for n in range(LINES_PER_ITEM):
        stream = sys.stdout if n % 2 else sys.stderr
        print(f"{item} line {n:04d} " + "." * 80, file=stream)
    os.write(1, f"{item} raw \xff\xfe bytes\n".encode("latin-1"))
    if shared.get("partial"):
        print(f"{item} has no newline at the end", end="", flush=True)
    return item


@pytest.mark.timeout(120)
def test_megabytes_of_output_all_land_in_output_log(tmp_path):
    items = [f"chat-{i:02d}" for i in range(50)]
    out = tmp_path / "out"
    job = nbmplock.Job(items, chatty, str(out), num_procs=2, shared_data={})
    job.start()
    assert job.wait(100), "the run did not finish"
    assert job.state is nbmplock.JobState.FINISHED and job.error is None
    data = (out / _read.STATE_DIR / "output.log").read_bytes()
    assert len(data) > 4_000_000
    lines = data.decode("utf-8", "replace").split("\n")
    assert lines.pop() == ""
    bodies = Counter()
    for line in lines:
        prefix, _, body = line.partition("] ")
        assert prefix in ("[w0", "[w1", "[w2", "[w3"), line[:80]
        bodies[body] += 1
    for item in items:
        for n in range(LINES_PER_ITEM):
            assert bodies[f"{item} line {n:04d} " + "." * 80] == 1, (item, n)
        assert bodies[f"{item} raw \ufffd\ufffd bytes"] == 1
    assert len(lines) == len(items) * (LINES_PER_ITEM + 1)
    assert len(job.output) == nbmplock._job.OUTPUT_TAIL
    FIGURES.add("faults_injected")


@pytest.mark.timeout(60)
def test_last_line_without_newline_is_kept(tmp_path):
    items = ["only-one"]
    out = tmp_path / "out"
    nbmplock.mp_lock(items, chatty, None, 1, str(out), shared_data={"partial": True},
                     verbose=False)
    assert "only-one has no newline at the end" in output_log(out)


# -- what process starts, and who ends a worker (issues 12 case 6, 13 items 3-4) --

def _starts_children(item, shared, init_values):
    """Start a ``sleep`` and an ``os.fork`` child that outlive the call, note their pids."""
    import subprocess

    pids = [subprocess.Popen(["sleep", "37"]).pid]
    child = os.fork()
    if child == 0:  # a grandchild that would live on
        try:
            time.sleep(37)
        finally:
            os._exit(0)
    pids.append(child)
    with open(os.path.join(shared["dir"], f"{item}.pids"), "w") as f:
        json.dump(pids, f)
    if item == "slow":
        subprocess.Popen(["sleep", "38"]).wait()  # the item_timeout kills it with the worker
    return item


def _grandchildren(tmp_path) -> list[int]:
    pids = []
    for path in tmp_path.glob("*.pids"):
        pids += json.loads(path.read_text())
    return pids


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_processes_started_by_process_do_not_outlive_the_item_or_the_job(tmp_path, start_method):
    """Once: after item_timeout=1 'sleep 26' kept running, and grandchildren outlived the job."""
    summary = nbmplock.mp_lock(["a", "slow", "b"], _starts_children, None, 2,
                               str(tmp_path / "out"), verbose=False, errors="record",
                               item_timeout=1, shared_data={"dir": str(tmp_path)},
                               start_method=start_method)
    assert [f.kind for f in summary.failures] == ["timeout"]
    pids = _grandchildren(tmp_path)
    assert len(pids) == 6
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], "a process started by process() outlived the job"
    left = [p for p in psutil.process_iter(["cmdline"])
            if (p.info["cmdline"] or [None])[:2] == ["sleep", "38"]]
    assert not left, "the timed-out item's subprocess was not killed with its worker"
    FIGURES.add("faults_injected", 3)


def _pool_inside(item, shared, init_values):
    import multiprocess

    with multiprocess.Pool(2) as pool:
        return sum(pool.map(abs, [-1, -2, int(item)]))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_a_pool_inside_process_works(tmp_path, start_method):
    """Issue 13, item 4: workers are daemonic, yet process may start its own pool."""
    values = nbmplock.mp_lock_value(["3", "4"], _pool_inside, None, 2, str(tmp_path / "out"),
                                    verbose=False, start_method=start_method)
    assert values == [6, 7]


def _pid_then_sleep(item, shared, init_values):
    with open(os.path.join(shared["dir"], f"w{os.getpid()}"), "w"):
        pass
    time.sleep(0.02)
    return item


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_worker_ended_from_outside_stops_the_run_without_failures(tmp_path, sig):
    """A kernel shutdown SIGTERMs the kernel's children: a stop, not the item's fault.

    Once: each was recorded as a failure of its item and a replacement worker started.
    """
    job = nbmplock.Job([f"t{i}" for i in range(2000)], _pid_then_sleep, str(tmp_path / "out"),
                       num_procs=2, shared_data={"dir": str(tmp_path)})
    job.start()
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("w*"))) < 2:
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.01)
    victim = int(sorted(tmp_path.glob("w*"))[0].name[1:])
    os.kill(victim, sig)
    assert job.wait(30), "the job did not end"
    assert job.state is nbmplock.JobState.STOPPED, (job.state, job.error)
    assert job.failures == () and job.progress.failed == 0
    assert any(signal.Signals(sig).name in note for note in job.notes), job.notes
    assert len(list(tmp_path.glob("w*"))) == 2, "a replacement worker was started"
    snap = nbmplock.read_snapshot(str(tmp_path / "out"))
    assert snap.failures == () and snap.last_end["status"] == "stopped"
    job.resume()
    assert job.wait(60) and job.state is nbmplock.JobState.FINISHED
    FIGURES.add("faults_injected")


_MAIN_EXCEPTIONS = '''
import signal, sys, tempfile
signal.signal(signal.SIGINT, signal.default_int_handler)
import nbmplock

class MyErr(Exception):
    pass

class TwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")
        self.a, self.b = a, b

class Unpicklable(Exception):
    def __init__(self, msg):
        super().__init__(msg)
        self.lock = __import__("threading").Lock()

def raise_my(item, s, v):
    raise MyErr("custom")

def raise_two(item, s, v):
    raise TwoArgs("x", 2)

def raise_unpicklable(item, s, v):
    raise Unpicklable("with a lock")

if __name__ == "__main__":
    method = sys.argv[1]
    for fn, cls in ((raise_my, MyErr), (raise_two, TwoArgs), (raise_unpicklable, Unpicklable)):
        try:
            nbmplock.mp_lock(["a"], fn, None, 1, tempfile.mkdtemp(), verbose=False,
                             start_method=method)
        except cls as exc:
            assert isinstance(exc.__cause__, nbmplock.RemoteTraceback), exc.__cause__
            assert "raise" in exc.__cause__.tb
            print(cls.__name__, "caught", str(exc), getattr(exc, "a", "-"))
        except BaseException as exc:
            print(cls.__name__, "WRONG", type(exc).__name__, exc)
'''


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_exceptions_defined_in_main_keep_their_type(tmp_path, start_method):
    """Issue 13, item 1: once RuntimeError('MyErr: custom') under spawn and forkserver,
    and RuntimeError for an exception whose __init__ takes two arguments."""
    import subprocess

    script = tmp_path / "main_exceptions.py"
    script.write_text(_MAIN_EXCEPTIONS)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run([sys.executable, str(script), start_method], capture_output=True,
                         text=True, timeout=100, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "MyErr caught custom -",
        "TwoArgs caught x and 2 x",
        "Unpicklable caught with a lock -",
    ], out.stdout + out.stderr
