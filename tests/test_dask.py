"""The Dask backend against a real ``distributed.LocalCluster`` on 127.0.0.1.

One cluster of two single-threaded worker processes serves the whole module
(starting one takes seconds); it is closed at the end, and the teardown checks
that no worker or nanny process is left. Tests that kill processes do it for
real: SIGKILL of a driver subprocess, of a Dask worker process, ``os._exit``
inside a task.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

distributed = pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")

import dask  # noqa: E402

import nbmplock  # noqa: E402
from nbmplock import _dask, _dask_worker  # noqa: E402
from nbmplock._read import read_contents  # noqa: E402

pytestmark = pytest.mark.timeout(120)


# -- the cluster ---------------------------------------------------------------

def _descendants() -> set[int]:
    """Live child processes, except multiprocessing's resource tracker (it lives as
    long as this process, by design) and zombies."""
    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE or "resource_tracker" in " ".join(p.cmdline()):
                continue
        except psutil.Error:
            continue
        pids.add(p.pid)
    return pids


def _describe(pids) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(f"{pid}: {' '.join(psutil.Process(pid).cmdline())[:200]}")
        except psutil.Error:
            out.append(str(pid))
    return out


@contextlib.contextmanager
def local_cluster(dashboard_address=None, **config):
    """A LocalCluster of two worker processes; on exit, checks none is left."""
    before = _descendants()
    with dask.config.set(config):
        lc = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      host="127.0.0.1", dashboard_address=dashboard_address)
    try:
        yield lc
    finally:
        lc.close(timeout=30)
        deadline = time.monotonic() + 15
        left = _descendants() - before
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = _descendants() - before
        assert not left, f"Dask processes left behind: {_describe(left)}"


@pytest.fixture(scope="module")
def cluster():
    with local_cluster() as lc:
        yield lc


@pytest.fixture(scope="module")
def client(cluster):
    with distributed.Client(cluster, set_as_default=False) as c:
        c.wait_for_workers(2, timeout=60)
        yield c


@pytest.fixture(autouse=True)
def no_orphans(request):
    """Overrides the suite's fixture for this module.

    Every test starts with two live workers (a test before may have killed some).
    Afterwards, the cluster's current worker processes (a nanny replaces a killed
    worker with a new child of this process) belong to the module's cluster; any
    other child process a test leaves behind fails it.
    """
    client = request.getfixturevalue("client") if "client" in request.fixturenames else None
    if client is not None:
        client.wait_for_workers(2, timeout=60)
    before = _descendants()
    yield
    cluster_pids: set = set()
    if client is not None:
        client.wait_for_workers(2, timeout=60)
        cluster_pids = set(worker_pids(client).values())
    deadline = time.monotonic() + 5
    while True:
        left = _descendants() - before - cluster_pids
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not left, f"child processes left behind: {_describe(left)}"


@pytest.fixture
def fragile_client():
    """A cluster of its own for tests whose workers die again and again.

    A nanny does not restart a worker that dies while it is still starting (a
    replacement that at once gets the poison task), so such a test must not
    share the module's cluster. One death per task is forgiven, a second is
    not: a poison item costs two restarts per round instead of four.
    """
    # dashboard_address=":0": a random port; None would take the default 8787
    # for the scheduler's HTTP server, which the module's cluster already holds.
    with local_cluster(":0", **{"distributed.scheduler.allowed-failures": 1}) as lc:
        with distributed.Client(lc, set_as_default=False) as c:
            c.wait_for_workers(2, timeout=60)
            yield c


def worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


# -- work functions (module level: the workers import this module) -----------------

def reverse(item, shared_data, init_values):
    return item[::-1] + shared_data.get("suffix", "")


def slow_reverse(item, shared_data, init_values):
    time.sleep(shared_data.get("sleep", 0.01))
    return item[::-1]


def fail_on_seven(item, shared_data, init_values):
    if item.endswith("7"):
        raise ValueError(f"bad item {item}")
    return len(item)


def chatty(item, shared_data, init_values):
    print(f"processing {item}")
    return item


def write_init(shared_data):
    """Record this call in a file named after the worker process; return the pid."""
    path = os.path.join(shared_data["dir"], str(os.getpid()))
    with open(path, "a") as f:
        f.write("init\n")
    return {"pid": os.getpid()}


def use_init(item, shared_data, init_values):
    time.sleep(shared_data.get("sleep", 0.0))
    assert init_values["pid"] == os.getpid()
    return init_values["pid"]


def broken_init(shared_data):
    raise RuntimeError("no model here")


def poison(item, shared_data, init_values):
    if item == shared_data["poison"]:
        os._exit(3)
    time.sleep(0.005)
    return item


def busy_or_quick(item, shared_data, init_values):
    """Pure-Python busy loop for "slow" items: interruptible by item_timeout."""
    if item.startswith("slow"):
        end = time.monotonic() + 30
        while time.monotonic() < end:
            pass
    return item


def upper_batch(items, shared_data, init_values):
    return [item.upper() for item in items]


class Saved:
    """A save_callback that remembers what it received (called in the driver)."""

    def __init__(self):
        self.calls: list[tuple[str, list, list]] = []

    def __call__(self, output_filepath, data_results, data_names):
        self.calls.append((output_filepath, list(data_results), list(data_names)))

    @property
    def names(self) -> list:
        return [n for _, _, names in self.calls for n in names]

    @property
    def pairs(self) -> dict:
        return {n: r for _, results, names in self.calls for n, r in zip(names, results)}


def items_of(n: int, prefix: str = "item") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


# -- the seed contract --------------------------------------------------------------

def test_mp_lock_on_the_cluster(client, tmp_path):
    out = str(tmp_path / "run")
    items = items_of(500) + ["with\nnewline", " edge spaces ", "ünïcode ✓", "x" * 5000]
    save = Saved()
    summary = nbmplock.mp_lock(items, reverse, save, None, out, save_batch=7,
                               shared_data={"suffix": "!"}, backend=client, verbose=False)
    assert summary.done == len(items) and summary.failed == 0
    assert sorted(save.names) == sorted(items)
    assert save.pairs == {item: item[::-1] + "!" for item in items}
    assert all(path == f"{out}/data" for path, _, _ in save.calls)
    assert all(1 <= len(names) <= 7 for _, _, names in save.calls)
    assert read_contents(out).done == set(items)
    assert nbmplock.is_mp_lock_completed(items, out)
    # Run again: nothing left to do, the callback is not called.
    again = Saved()
    summary = nbmplock.mp_lock(items, reverse, again, None, out, backend=client, verbose=False)
    assert again.calls == [] and summary.skipped == len(items)


def test_mp_lock_value_keeps_order(client, tmp_path):
    items = items_of(300)
    values = nbmplock.mp_lock_value(items, reverse, None, None, str(tmp_path / "run"),
                                    backend=client, verbose=False)
    assert values == [item[::-1] for item in items]


def test_mp_lock_batch_on_the_cluster(client, tmp_path):
    items = items_of(103)
    save = Saved()
    nbmplock.mp_lock_batch(items, upper_batch, save, None, str(tmp_path / "run"), 10,
                           backend=client, verbose=False)
    assert save.pairs == {item: item.upper() for item in items}


def test_scheduler_address_string(cluster, tmp_path):
    items = items_of(50)
    values = nbmplock.mp_lock_value(items, reverse, None, None, str(tmp_path / "run"),
                                    backend=cluster.scheduler_address, verbose=False)
    assert values == [item[::-1] for item in items]


def test_exception_comes_back_with_its_type_and_traceback(client, tmp_path):
    out = str(tmp_path / "run")
    items = items_of(40)
    with pytest.raises(ValueError, match="bad item") as info:
        nbmplock.mp_lock(items, fail_on_seven, None, None, out, backend=client, verbose=False)
    assert isinstance(info.value.__cause__, nbmplock.RemoteTraceback)
    assert "fail_on_seven" in info.value.__cause__.tb
    assert read_contents(out).done <= {i for i in items if not i.endswith("7")}


def test_errors_record_keeps_going(client, tmp_path):
    out = str(tmp_path / "run")
    items = items_of(40)
    summary = nbmplock.mp_lock(items, fail_on_seven, None, None, out, errors="record",
                               backend=client, verbose=False)
    bad = {i for i in items if i.endswith("7")}
    assert {f.item for f in summary.failures} == bad
    assert all(f.kind == "exception" and f.exc_type == "ValueError" for f in summary.failures)
    assert read_contents(out).done == set(items) - bad


@pytest.mark.parametrize("num_procs, cap", [(1, 2), (None, 4)])
def test_tasks_in_flight_are_bounded(client, tmp_path, monkeypatch, num_procs, cap):
    """num_procs=None plans for every thread of the cluster (2 here); PREFETCH each."""
    seen = []
    original = _dask.DaskBackend.submit

    def submit(self, chunk):
        original(self, chunk)
        seen.append(len(self._chunks))

    monkeypatch.setattr(_dask.DaskBackend, "submit", submit)
    values = nbmplock.mp_lock_value(items_of(200), slow_reverse, None, num_procs,
                                    str(tmp_path / "run"), shared_data={"sleep": 0.002},
                                    backend=client, verbose=False)
    assert values == [item[::-1] for item in items_of(200)]
    assert max(seen) == cap


# -- init once per worker, shared_data once --------------------------------------

def test_init_runs_once_per_worker_process(client, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    items = items_of(400)
    values = nbmplock.mp_lock_value(items, use_init, None, None, str(tmp_path / "run"),
                                    shared_data={"dir": str(marks), "sleep": 0.002},
                                    init_function=write_init, backend=client, verbose=False)
    files = {p.name: p.read_text() for p in marks.iterdir()}
    assert files, "init_function never ran"
    assert all(text == "init\n" for text in files.values()), files
    assert set(map(int, files)) == set(values)          # each result came from an inited pid
    assert set(map(int, files)) <= set(worker_pids(client).values())


def test_shared_data_is_sent_once_not_per_task(client, tmp_path, monkeypatch):
    """The payload is stored once (a Variable); chunk tasks carry only their items."""
    submitted, stored = [], []
    submit, store = client.submit, distributed.Variable.set

    def spy_submit(fn, *args, **kwargs):
        submitted.append(sum(len(a) for a in args if isinstance(a, (bytes, str))))
        return submit(fn, *args, **kwargs)

    def spy_set(self, value, *args, **kwargs):
        stored.append(len(value) if isinstance(value, bytes) else 0)
        return store(self, value, *args, **kwargs)

    monkeypatch.setattr(client, "submit", spy_submit)
    monkeypatch.setattr(distributed.Variable, "set", spy_set)
    big = {"blob": "x" * 2_000_000}
    nbmplock.mp_lock(items_of(30), reverse, None, None, str(tmp_path / "run"),
                     shared_data=big, backend=client, verbose=False)
    assert len(stored) == 1 and stored[0] > 2_000_000
    assert len(submitted) > 2 and max(submitted) < 10_000


def test_init_failure_fails_the_run(client, tmp_path):
    with pytest.raises(nbmplock.WorkerInitError, match="no model here") as info:
        nbmplock.mp_lock(items_of(20), reverse, None, None, str(tmp_path / "run"),
                         init_function=broken_init, backend=client, verbose=False)
    assert "broken_init" in info.value.__cause__.__cause__.tb


# -- worker output, timeouts ----------------------------------------------------------

def test_worker_output_is_captured_with_the_worker_name(client, tmp_path):
    job = nbmplock.Job(items_of(20), chatty, str(tmp_path / "run"), backend=client)
    job.start()
    assert job.wait(60)
    lines = list(job.output)
    assert {line.split("] ", 1)[1] for line in lines} == {f"processing {i}" for i in items_of(20)}
    assert {line.split("]")[0] for line in lines} <= {"[dask-0", "[dask-1"}


def test_item_timeout_interrupts_pure_python(client, tmp_path):
    items = ["slow-1"] + items_of(30)
    start = time.monotonic()
    summary = nbmplock.mp_lock(items, busy_or_quick, None, None, str(tmp_path / "run"),
                               errors="record", item_timeout=1.0, backend=client,
                               verbose=False)
    assert time.monotonic() - start < 20
    assert [f.item for f in summary.failures] == ["slow-1"]
    assert summary.failures[0].kind == "timeout"
    assert summary.done == 30


def slow_batch(items, shared_data, init_values):
    return [busy_or_quick(item, shared_data, init_values) for item in items]


def test_item_timeout_in_batch_mode_fails_the_whole_batch(client, tmp_path):
    items = items_of(6) + ["slow-1"] + items_of(5, "z")
    summary = nbmplock.mp_lock_batch(items, slow_batch, None, None, str(tmp_path / "run"), 3,
                                     errors="record", item_timeout=1.0, backend=client,
                                     verbose=False)
    assert {f.item for f in summary.failures} == {"slow-1", "z-00000", "z-00001"}
    assert all(f.kind == "timeout" for f in summary.failures)
    assert read_contents(str(tmp_path / "run")).done == set(items) - {"slow-1", "z-00000",
                                                                      "z-00001"}


def test_item_timeout_raises_item_timeout_error(client, tmp_path):
    with pytest.raises(nbmplock.ItemTimeoutError, match="slow-1"):
        nbmplock.mp_lock(["slow-1", "a", "b"], busy_or_quick, None, None,
                         str(tmp_path / "run"), item_timeout=0.5, backend=client,
                         verbose=False)


# -- Stop --------------------------------------------------------------------------

def test_stop_is_prompt_and_the_run_directory_matches_the_callback(client, tmp_path):
    out = str(tmp_path / "run")
    items = items_of(2000)
    save = Saved()
    job = nbmplock.Job(items, slow_reverse, out, save_callback=save, save_batch=3,
                       shared_data={"sleep": 0.01}, backend=client)
    job.start()
    deadline = time.monotonic() + 60
    while job.progress.done < 30 and time.monotonic() < deadline:
        time.sleep(0.02)
    start = time.monotonic()
    job.stop()
    assert time.monotonic() - start < 0.5
    assert job.wait(10), "the stop did not complete within 10 s"
    assert job.state is nbmplock.JobState.STOPPED
    done = read_contents(out).done
    assert done == set(save.names)
    assert len(save.names) == len(set(save.names))
    assert 30 <= len(done) < len(items)
    # Resume finishes the rest, never handing a done item to the callback again.
    rest = Saved()
    job2 = nbmplock.Job(items, slow_reverse, out, save_callback=rest, shared_data={"sleep": 0},
                        backend=client)
    job2.start()
    assert job2.wait(60)
    assert not (set(rest.names) & done)
    assert set(rest.names) | done == set(items)


def test_forced_stop(client, tmp_path):
    out = str(tmp_path / "run")
    save = Saved()
    job = nbmplock.Job(items_of(1000), slow_reverse, out, save_callback=save, save_batch=1,
                       shared_data={"sleep": 0.01}, backend=client)
    job.start()
    while job.progress.done < 10:
        time.sleep(0.02)
    job.stop(force=True)
    assert job.wait(10)
    assert job.state is nbmplock.JobState.STOPPED
    assert read_contents(out).done == set(save.names)


# -- killed processes ---------------------------------------------------------------

DRIVER = textwrap.dedent("""
    import json, sys, time
    import nbmplock

    def process(item, shared_data, init_values):
        time.sleep(0.01)
        return item[::-1]

    def save(output_filepath, data_results, data_names):
        with open(output_filepath + ".jsonl", "a") as f:
            for name in data_names:
                f.write(json.dumps(name) + "\\n")

    if __name__ == "__main__":
        address, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
        items = [f"item-{i:05d}" for i in range(n)]
        nbmplock.mp_lock(items, process, save, None, out, save_batch=5, backend=address,
                         verbose=False)
""")


def read_jsonl(path) -> list:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def test_resume_after_the_driver_is_killed(cluster, client, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    out = str(tmp_path / "run")
    n = 600
    proc = subprocess.Popen([sys.executable, str(script), cluster.scheduler_address, out, str(n)],
                            cwd=str(tmp_path))
    try:
        deadline = time.monotonic() + 60
        while len(read_jsonl(f"{out}/data.jsonl")) < 60:
            assert proc.poll() is None, "the driver ended before it was killed"
            assert time.monotonic() < deadline, "the driver made no progress"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    first = read_jsonl(f"{out}/data.jsonl")
    done = read_contents(out).done
    assert done <= set(first) and len(done) < n
    # The killed driver's payload is still on the scheduler, its client gone.
    left = client.run_on_scheduler(_payloads)
    assert len(left) == 1, left
    dead_client = left[0][len(_dask.PAYLOAD_PREFIX):].rpartition("-")[0]
    deadline = time.monotonic() + 30
    while dead_client in client.run_on_scheduler(_clients):
        assert time.monotonic() < deadline, "the scheduler never noticed the killed driver"
        time.sleep(0.05)
    # Resume in this process, on the same cluster.
    items = [f"item-{i:05d}" for i in range(n)]
    save = Saved()
    nbmplock.mp_lock(items, slow_reverse, save, None, out, save_batch=5,
                     shared_data={"sleep": 0.001}, backend=client, verbose=False)
    assert not (set(save.names) & done), "an item recorded done was processed again"
    assert set(first) | set(save.names) == set(items)
    assert read_contents(out).done == set(items)
    # The new run swept the orphan and deleted its own payload at the end (a
    # message the scheduler handles soon after).
    deadline = time.monotonic() + 10
    while (left := client.run_on_scheduler(_payloads)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == []


def _payloads(dask_scheduler=None) -> list:
    return [name for name in dask_scheduler.extensions["variables"].variables
            if name.startswith(_dask.PAYLOAD_PREFIX)]


def _clients(dask_scheduler=None) -> list:
    return list(dask_scheduler.clients)


def test_killed_worker_mid_run_never_hangs(client, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    out = str(tmp_path / "run")
    items = items_of(300)
    job = nbmplock.Job(items, use_init, out, shared_data={"dir": str(marks), "sleep": 0.02},
                       init_function=write_init, backend=client)
    job.start()
    while job.progress.done < 20:
        assert job.state.active
        time.sleep(0.02)
    victim = sorted(worker_pids(client).values())[0]
    os.kill(victim, signal.SIGKILL)
    assert job.wait(90), "the run hung after a worker was killed"
    assert job.state is nbmplock.JobState.FINISHED, job.error
    assert read_contents(out).done == set(items)
    # The replacement worker ran init_function once, like the others.
    files = {p.name: p.read_text() for p in marks.iterdir()}
    assert all(text == "init\n" for text in files.values())
    client.wait_for_workers(2, timeout=60)


def test_poison_item_fails_and_the_rest_is_done(fragile_client, tmp_path):
    """A task whose worker keeps dying ends in KilledWorker: its item fails, never a hang."""
    out = str(tmp_path / "run")
    items = items_of(60)
    summary = nbmplock.mp_lock(items, poison, None, None, out, errors="record",
                               shared_data={"poison": "item-00030"}, backend=fragile_client,
                               verbose=False)
    failed = {f.item: f for f in summary.failures}
    assert "item-00030" in failed
    assert all(f.kind == "died" and "KilledWorker" in f.message for f in failed.values())
    done = read_contents(out).done
    assert done | set(failed) == set(items) and not done & set(failed)
    # Dask charges a death to every task assigned to the dying worker, so an item
    # that followed the poison through both rounds may fail with it; rarely more.
    assert len(failed) <= 3, sorted(failed)
    # A resume with a process that no longer crashes finishes the job.
    nbmplock.mp_lock(items, reverse, None, None, out, backend=fragile_client, verbose=False)
    assert read_contents(out).done == set(items)


def test_poison_item_raises_worker_died_error(fragile_client, tmp_path):
    with pytest.raises(nbmplock.WorkerDiedError, match="KilledWorker") as info:
        nbmplock.mp_lock(items_of(6), poison, None, None, str(tmp_path / "run"),
                         shared_data={"poison": "item-00002"}, backend=fragile_client,
                         verbose=False)
    assert info.value.item in items_of(6)


def exit_in_init(shared_data):
    os._exit(7)


def test_init_that_kills_every_worker_fails_the_run(fragile_client, tmp_path):
    start = time.monotonic()
    with pytest.raises(nbmplock.WorkerDiedError, match="keep dying"):
        nbmplock.mp_lock(items_of(50), reverse, None, None, str(tmp_path / "run"),
                         init_function=exit_in_init, errors="record", backend=fragile_client,
                         verbose=False)
    assert time.monotonic() - start < 60


def test_unreachable_scheduler_is_a_clear_error(tmp_path):
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(ConnectionError, match="cannot connect to the Dask scheduler"):
            nbmplock.mp_lock(items_of(5), reverse, None, None, str(tmp_path / "run"),
                             backend="tcp://127.0.0.1:9", verbose=False)


# -- no distributed ----------------------------------------------------------------

def test_missing_distributed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(nbmplock.MissingDependencyError, match=r'pip install "nbmplock\[dask\]"'):
        nbmplock.mp_lock(["a"], reverse, None, None, "unused", backend="tcp://127.0.0.1:9",
                         verbose=False)


def _cached_runs() -> list:
    from nbmplock import _dask_worker as worker_side
    return sorted(worker_side._jobs)


def test_worker_side_cache_is_dropped_at_shutdown(client, tmp_path):
    """Each worker forgets the run's init_values when it ends (a killed driver's
    entries stay until they are stale, so compare with what was there before)."""
    before = client.run(_cached_runs)
    nbmplock.mp_lock(items_of(20), use_init, None, None, str(tmp_path / "run"),
                     shared_data={"dir": str(tmp_path)}, init_function=write_init,
                     backend=client, verbose=False)
    after = client.run(_cached_runs)
    assert all(set(after[w]) <= set(before.get(w, [])) for w in after), (before, after)


def test_stop_flag_polls_rarely():
    """Reading the flag costs nothing between polls: no scheduler call per item."""
    flag = _dask_worker._StopFlag("token-not-running", "nbmplock-stop-none")
    start = time.perf_counter()
    for _ in range(100_000):
        assert not flag.value
    assert time.perf_counter() - start < 1.0
    _dask_worker._mark_stopped("token-not-running")
    assert flag.value


def test_watchdog_never_leaks_the_interrupt():
    """An interrupt fired as the item ends is cleared, not raised later."""
    guarded, timed_out = _dask_worker._with_timeout(lambda i, s, v: i, 0.0, 1)
    for _ in range(2000):
        try:
            guarded("x", None, None)
        except nbmplock.ItemTimeoutError:
            pass
        for _ in range(50):  # any pending interrupt would be delivered here
            pass
    assert threading.current_thread().is_alive()


# -- values never kept (issue 17) -------------------------------------------------

def counted_row(item, shared_data, init_values):
    """Log the row's id (the workers are processes of this machine), return a value."""
    with open(shared_data["ledger"], "a", encoding="utf-8") as f:
        f.write(item["id"] + "\n")
    time.sleep(0.002)
    return [item["id"][::-1], item["n"] * 2]


def test_values_never_kept_are_computed_again_on_the_cluster(client, tmp_path, caplog):
    """mp_lock (no save_callback) records rows done without their values; mp_lock_value
    on the same directory runs them again for their values, says so, and the run
    stays complete throughout. Items are dicts keyed by key="id"."""
    import logging

    out = str(tmp_path / "run")
    ledger = tmp_path / "ledger"
    shared = {"ledger": str(ledger)}
    items = [{"id": f"row-{i:03d}", "n": i} for i in range(80)]
    expected = [[r["id"][::-1], r["n"] * 2] for r in items]

    def ran() -> int:
        return len(ledger.read_text().splitlines())

    summary = nbmplock.mp_lock(items, counted_row, None, None, out, key="id",
                               shared_data=shared, backend=client, verbose=False)
    assert summary.done == len(items) and ran() == len(items)
    assert nbmplock.is_mp_lock_completed(items, out, key="id")
    seen_incomplete = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if not nbmplock.is_mp_lock_completed(items, out, key="id"):
                seen_incomplete.append(time.monotonic())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with caplog.at_level(logging.WARNING, logger="nbmplock"):
            values = nbmplock.mp_lock_value(items, counted_row, None, None, out, key="id",
                                            shared_data=shared, backend=client,
                                            verbose=False)
    finally:
        stop.set()
        watcher.join(10)
    assert values == expected
    assert ran() == 2 * len(items), "every row ran once more, for its value"
    assert "kept no results" in caplog.text and "run again for their values" in caplog.text
    assert seen_incomplete == [], "is_mp_lock_completed turned false during the recompute"
    assert nbmplock.is_mp_lock_completed(items, out, key="id")
    # the values are kept now: nothing runs a third time
    assert nbmplock.mp_lock_value(items, counted_row, None, None, out, key="id",
                                  shared_data=shared, backend=client, verbose=False) == expected
    assert ran() == 2 * len(items)


# -- issue 18: concurrency and rate_limit on the cluster -----------------------

def test_concurrency_runs_items_of_a_task_at_once_on_the_cluster(client, tmp_path):
    from .test_concurrency import async_sleeper, peak, read_ledger, sleeper

    for fn in (sleeper, async_sleeper):
        shared = {"ledger": str(tmp_path / f"ledger-{fn.__name__}"), "sleep": 0.2}
        began = time.monotonic()
        out = nbmplock.mp_lock_value(list(range(40)), fn, None, 2, str(tmp_path / fn.__name__),
                                     shared_data=shared, backend=client, concurrency=8,
                                     init_function=write_init_client, verbose=False)
        elapsed = time.monotonic() - began
        assert [o if fn is sleeper else o[0] for o in out] == [i * 2 for i in range(40)]
        rows = read_ledger(shared["ledger"])
        assert sorted(r[0] for r in rows) == list(range(40))
        assert peak(rows) >= 4, "items of a task in flight at once"
        assert elapsed < 4.0 * 0.9, elapsed  # 2 threads, one item each: 4 s


def write_init_client(shared_data):
    return {"client": os.getpid()}


def test_rate_limit_is_shared_by_the_dask_workers_of_one_machine(client, tmp_path):
    from .test_concurrency import max_in_window, read_ledger, stamp

    shared = {"ledger": str(tmp_path / "ledger")}
    nbmplock.mp_lock_value(list(range(50)), stamp, None, 2, str(tmp_path / "run"),
                           shared_data=shared, backend=client, concurrency=4,
                           rate_limit="20/s", verbose=False)
    starts = sorted(r[1] for r in read_ledger(shared["ledger"]))
    assert len(starts) == 50
    assert max_in_window(starts) <= 21
    assert starts[-1] - starts[0] >= 49 / 20 * 0.97
