"""Issue 18: many items in flight per worker, async functions, rate limits, backoff.

Every item appends a line ``item start end pid thread`` to a ledger file
(``O_APPEND``: whole lines from many processes and threads), so a test can
count how often each item ran, how many ran at once, and when each started.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import sys
import threading
import time
from collections import Counter

import pytest

import nbmplock
from nbmplock import _read
from nbmplock._ratelimit import RateLimit, parse_rate
from nbmplock._retry import RetryPolicy, retry_after

from .helpers import join_or_dump, wait_job

#: A hang fails within two minutes; pytest-timeout prints every thread's stack.
pytestmark = pytest.mark.timeout(120)


def _ledger_line(shared, item, start, end) -> None:
    line = f"{item} {start:.6f} {end:.6f} {os.getpid()} {threading.get_ident()}\n"
    fd = os.open(shared["ledger"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_ledger(path) -> list[tuple]:
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path, encoding="utf-8"):
        item, start, end, pid, tid = line.split()
        rows.append((int(item), float(start), float(end), int(pid), int(tid)))
    return rows


def peak(rows) -> int:
    """Most items running at the same instant."""
    edges = sorted([(s, 1) for _, s, _, _, _ in rows] + [(e, -1) for _, _, e, _, _ in rows])
    now = best = 0
    for _, step in edges:
        now += step
        best = max(best, now)
    return best


def max_in_window(starts, window: float = 1.0) -> int:
    starts = sorted(starts)
    return max((bisect.bisect_right(starts, s + window) - i for i, s in enumerate(starts)),
               default=0)


def sleeper(item, shared, init_values):
    start = time.monotonic()
    time.sleep(shared.get("sleep", 0.05))
    _ledger_line(shared, item, start, time.monotonic())
    return item * 2


async def async_sleeper(item, shared, init_values):
    start = time.monotonic()
    await asyncio.sleep(shared.get("sleep", 0.05))
    _ledger_line(shared, item, start, time.monotonic())
    return (item * 2, init_values["client"])


class Client:
    """Stands for a requests.Session / an httpx client: one per worker process."""

    def __init__(self):
        self.pid = os.getpid()


def init_client(shared):
    fd = os.open(shared["inits"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    return {"client": Client()}


async def async_init(shared):
    await asyncio.sleep(0.01)
    fd = os.open(shared["inits"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    return {"client": (os.getpid(), id(asyncio.get_running_loop()))}


def uses_client(item, shared, init_values):
    start = time.monotonic()
    time.sleep(0.02)
    _ledger_line(shared, item, start, time.monotonic())
    return (os.getpid(), id(init_values["client"]))


@pytest.fixture
def ledger(tmp_path):
    return {"ledger": str(tmp_path / "ledger"), "inits": str(tmp_path / "inits")}


def run_job(items, process, out, timeout=60, **options) -> nbmplock.Job:
    job = nbmplock.Job(items, process, str(out), **options)
    job.start()
    wait_job(job, timeout)
    return job


# -- threads and async ----------------------------------------------------------

def test_threads_run_n_items_at_once_in_one_process(tmp_path, ledger):
    shared = dict(ledger, sleep=0.1)
    began = time.monotonic()
    out = nbmplock.mp_lock_value(list(range(80)), sleeper, None, 1, str(tmp_path / "run"),
                                 shared_data=shared, concurrency=16, verbose=False)
    elapsed = time.monotonic() - began
    assert out == [i * 2 for i in range(80)]
    rows = read_ledger(shared["ledger"])
    assert sorted(r[0] for r in rows) == list(range(80))
    assert len({r[3] for r in rows}) == 1  # one process
    assert 8 <= peak(rows) <= 16
    assert elapsed < 4.0, elapsed  # one at a time: 8 s


def test_async_process_and_init_on_one_event_loop_per_worker(tmp_path, ledger):
    shared = dict(ledger, sleep=0.1)
    job = run_job(list(range(60)), async_sleeper, tmp_path / "run", num_procs=2,
                  concurrency=10, shared_data=shared, init_function=async_init)
    assert job.state is nbmplock.JobState.FINISHED
    results = job.results()
    assert [r[0] for r in results] == [i * 2 for i in range(60)]
    rows = read_ledger(shared["ledger"])
    pids = {r[3] for r in rows}
    inits = open(shared["inits"]).read().split()
    assert sorted(inits) == sorted(map(str, pids)), "init once per process"
    assert len({r[1] for r in results}) == len(pids), "one loop per process"
    assert len({(r[3], r[4]) for r in rows}) == len(pids), "every coroutine on its loop thread"
    assert 4 <= peak(rows) <= 20


def test_async_process_with_concurrency_one(tmp_path, ledger):
    shared = dict(ledger, sleep=0.0)
    out = nbmplock.mp_lock_value(list(range(20)), async_sleeper, None, 1, str(tmp_path / "r"),
                                 shared_data=shared, init_function=init_client, verbose=False)
    assert [o[0] for o in out] == [i * 2 for i in range(20)]
    assert peak(read_ledger(shared["ledger"])) == 1


def test_init_values_are_per_process_shared_by_its_threads(tmp_path, ledger):
    out = nbmplock.mp_lock_value(list(range(120)), uses_client, None, 2, str(tmp_path / "r"),
                                 shared_data=ledger, init_function=init_client,
                                 concurrency=8, verbose=False)
    by_pid: dict = {}
    for pid, client in out:
        by_pid.setdefault(pid, set()).add(client)
    assert all(len(clients) == 1 for clients in by_pid.values()), by_pid
    assert Counter(open(ledger["inits"]).read().split()) == Counter(map(str, by_pid))


class AsyncCallable:
    def __init__(self, suffix):
        self.suffix = suffix

    async def __call__(self, item, shared, init_values):
        await asyncio.sleep(0)
        return f"{item}{self.suffix}{init_values['n']}"


async def async_init_n(shared):
    return {"n": 7}


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_async_callable_object_and_async_init_under_each_start_method(tmp_path, start_method):
    import functools
    out = nbmplock.mp_lock_value(["a", "b", "c"], AsyncCallable("!"), None, 2,
                                 str(tmp_path / "r"), init_function=async_init_n,
                                 start_method=start_method, concurrency=2, verbose=False)
    assert out == ["a!7", "b!7", "c!7"]
    part = functools.partial(AsyncCallable("?").__call__)
    out = nbmplock.mp_lock_value(["d"], part, None, 1, str(tmp_path / "r2"),
                                 init_function=async_init_n, start_method=start_method,
                                 verbose=False)
    assert out == ["d?7"]


def gen_process(item, shared, init_values):
    yield item


async def agen_process(item, shared, init_values):
    yield item


def test_generators_are_still_refused_and_options_checked(tmp_path):
    for fn in (gen_process, agen_process):
        with pytest.raises(nbmplock.InvalidArgumentsError, match="process"):
            nbmplock.Job(["a"], fn, str(tmp_path / "x"))
    bad = [dict(concurrency=0), dict(concurrency=1.5), dict(rate_limit="ten/s"),
           dict(rate_limit=0), dict(rate_limit="5/fortnight"), dict(retry_delay=-1),
           dict(retry_on="ValueError"), dict(retry_on=(ValueError, 3))]
    for options in bad:
        name = next(iter(options))
        with pytest.raises(nbmplock.InvalidArgumentsError) as info:
            nbmplock.Job(["a"], sleeper, str(tmp_path / "x"), **options)
        assert name in str(info.value)
    assert not (tmp_path / "x").exists()
    assert parse_rate("600/min") == 10.0 and parse_rate("10/s") == 10.0
    assert parse_rate(2.5) == 2.5 and parse_rate("3600/h") == 1.0


# -- stop, crash, timeout -------------------------------------------------------

def test_stop_with_items_in_flight_and_waiting_for_tokens_is_quick(tmp_path, ledger):
    shared = dict(ledger, sleep=0.3)
    out = tmp_path / "run"
    items = list(range(200))
    job = nbmplock.Job(items, sleeper, str(out), num_procs=2, concurrency=16,
                       rate_limit="40/s", shared_data=shared, key=str)
    job.start()
    time.sleep(1.0)
    asked = time.monotonic()
    job.stop()
    wait_job(job, 30)
    assert time.monotonic() - asked < 2.0  # the items running (0.3 s) finish; no token waits
    assert job.state is nbmplock.JobState.STOPPED
    done = {int(k) for k in _read.read_done(str(out))}
    ran = Counter(r[0] for r in read_ledger(shared["ledger"]))
    assert done and set(ran) >= done, "no item recorded done without having run"
    assert len(done) < len(items)
    job2 = run_job(items, sleeper, out, num_procs=2, concurrency=16, shared_data=shared,
                   key=str)
    assert job2.state is nbmplock.JobState.FINISHED
    ran = Counter(r[0] for r in read_ledger(shared["ledger"]))
    assert set(ran) == set(items)
    assert all(n == 1 for n in ran.values()), "a graceful stop repeats nothing"


def crash_on_13(item, shared, init_values):
    start = time.monotonic()
    if item == 13 and not os.path.exists(shared["ledger"] + ".crashed"):
        open(shared["ledger"] + ".crashed", "w").close()
        time.sleep(0.05)
        os._exit(3)
    time.sleep(0.05)
    _ledger_line(shared, item, start, time.monotonic())
    return item


def test_a_dead_worker_fails_its_running_items_and_requeues_the_rest(tmp_path, ledger):
    items = list(range(60))
    job = run_job(items, crash_on_13, tmp_path / "run", num_procs=1, concurrency=4,
                  shared_data=ledger, errors="record")
    failed = {f.item for f in job.failures}
    assert 13 in failed and len(failed) <= 4
    assert all(f.kind is nbmplock.FailureKind.DIED for f in job.failures)
    done = set(items) - failed
    assert job.progress.done == len(done)
    ran = Counter(r[0] for r in read_ledger(ledger["ledger"]))
    assert set(ran) >= done, "no item recorded done without having run"
    # with a retry, every item ends done (the crash happens once)
    job = run_job(items, crash_on_13, tmp_path / "run2", num_procs=1, concurrency=4,
                  shared_data=dict(ledger, ledger=str(tmp_path / "l2")), max_retries=1)
    assert job.progress.done == 60 and not job.failures


def hang_on_fives(item, shared, init_values):
    start = time.monotonic()
    time.sleep(30 if item % 10 == 5 else 0.05)
    _ledger_line(shared, item, start, time.monotonic())
    return item


async def async_hang_on_fives(item, shared, init_values):
    start = time.monotonic()
    await asyncio.sleep(30 if item % 10 == 5 else 0.05)
    _ledger_line(shared, item, start, time.monotonic())
    return item


@pytest.mark.parametrize("fn", [hang_on_fives, async_hang_on_fives], ids=["threads", "async"])
def test_item_timeout_with_concurrency_loses_nothing_records_nothing_twice(tmp_path, ledger, fn):
    items = list(range(50))
    out = tmp_path / "run"
    began = time.monotonic()
    job = run_job(items, fn, out, num_procs=1, concurrency=8, item_timeout=1.0,
                  shared_data=ledger, key=str)
    assert time.monotonic() - began < 20
    failed = sorted(f.item for f in job.failures)
    assert failed == [5, 15, 25, 35, 45]
    assert all(f.kind is nbmplock.FailureKind.TIMEOUT for f in job.failures)
    done = {int(k) for k in _read.read_done(str(out))}
    assert done == set(items) - set(failed)
    ran = Counter(r[0] for r in read_ledger(ledger["ledger"]))
    assert set(ran) == done, "every done item ran; no timed-out item was recorded done"
    assert job.progress.done == len(done) and job.progress.failed == 5


# -- retries --------------------------------------------------------------------

class Throttled(Exception):
    def __init__(self, message, retry_after=None):
        super().__init__(message)
        self.retry_after = retry_after


def flaky(item, shared, init_values):
    """Fails the first attempt of every item: Throttled (retry_after 0.4 s) for
    even items, KeyError for items divisible by 5 and odd."""
    start = time.monotonic()
    _ledger_line(shared, item, start, start)
    attempts = sum(1 for r in read_ledger(shared["ledger"]) if r[0] == item)
    if attempts == 1:
        if item % 2 == 0:
            raise Throttled("429 Too Many Requests", retry_after=shared.get("after", 0.4))
        if item % 5 == 0:
            raise KeyError(item)
    return attempts


def test_retry_on_and_retry_after(tmp_path, ledger):
    items = list(range(30))
    job = run_job(items, flaky, tmp_path / "run", num_procs=1, concurrency=8,
                  max_retries=3, retry_on=(Throttled,), shared_data=ledger)
    failed = sorted(f.item for f in job.failures)
    assert failed == [5, 15, 25], "KeyError is not in retry_on: no retry"
    assert all(f.attempts == 1 and f.exc_type == "KeyError" for f in job.failures)
    rows = read_ledger(ledger["ledger"])
    starts: dict = {}
    for item, start, *_ in rows:
        starts.setdefault(item, []).append(start)
    for item in range(0, 30, 2):
        assert len(starts[item]) == 2
        assert starts[item][1] - starts[item][0] >= 0.4, "Retry-After honoured"
    assert job.progress.done == 27


def test_an_item_waiting_for_its_retry_holds_no_worker(tmp_path, ledger):
    shared = dict(ledger, after=2.0)
    items = list(range(0, 40, 2))[:1] + [1, 3, 5, 7, 9, 11, 13, 17, 19, 21]
    began = time.monotonic()
    job = nbmplock.Job(items, flaky, str(tmp_path / "run"), num_procs=1, concurrency=1,
                       max_retries=1, shared_data=shared)
    job.start()
    seen = set()
    while job.state.active and time.monotonic() - began < 30:
        seen.add(job.progress.retrying)
        time.sleep(0.02)
    wait_job(job, 30)
    assert 1 in seen, "progress.retrying counts the item waiting for its retry"
    assert "waiting to retry" in job.status_text() or job.progress.retrying == 0
    rows = read_ledger(shared["ledger"])
    firsts = {r[0]: r[1] for r in reversed(rows)}
    # item 0 waits 2 s; the ten others (one lane!) ran meanwhile
    assert all(firsts[i] - began < 1.9 for i in items[1:])
    assert job.progress.done == len(items) and not job.failures


def test_retry_policy_backoff_has_full_jitter_and_a_cap():
    import random
    policy = RetryPolicy(5, retry_delay=1.0, retry_on=(OSError,), rng=random.Random(1))
    delays = [[policy.delay(k, None) for _ in range(200)] for k in (1, 2, 3, 8)]
    assert all(0 <= d <= 1.0 for d in delays[0]) and max(delays[0]) > 0.8
    assert max(delays[1]) <= 2.0 and max(delays[1]) > 1.5
    assert max(delays[2]) <= 4.0
    assert max(delays[3]) <= 60.0 and max(delays[3]) > 50
    assert policy.delay(1, Throttled("x", retry_after=7)) >= 7
    assert retry_after(Throttled("x", retry_after="nan")) is None
    assert policy.worth(OSError()) and policy.worth(None) and not policy.worth(KeyError())
    assert RetryPolicy(1).delay(1, None) == 0.0


# -- rate limit -----------------------------------------------------------------

def stamp(item, shared, init_values):
    start = time.monotonic()
    _ledger_line(shared, item, start, start)
    return item


@pytest.mark.parametrize("procs,lanes", [(1, 8), (2, 4)])
def test_rate_limit_is_shared_smooth_and_never_above_rate_plus_one(tmp_path, ledger, procs,
                                                                    lanes):
    items = list(range(60))
    began = time.monotonic()
    job = run_job(items, stamp, tmp_path / "run", num_procs=procs, concurrency=lanes,
                  rate_limit="20/s", shared_data=ledger)
    assert job.progress.done == 60 and not job.progress.throttled  # ended: not throttled
    starts = sorted(r[1] for r in read_ledger(ledger["ledger"]))
    span = starts[-1] - starts[0]
    assert 59 / 20 * 0.97 <= span <= 59 / 20 * 1.1, span
    assert max_in_window(starts) <= 21, "documented: at most rate + 1 starts in any 1 s"
    assert time.monotonic() - began < 15


def test_rate_limit_take_is_cancelled_at_once_and_survives_a_killed_holder(tmp_path):
    limit = RateLimit.create(0.5)  # one token per 2 s
    try:
        assert limit.take(1, lambda: False)
        began = time.monotonic()
        assert not limit.take(1, lambda: time.monotonic() - began > 0.2)
        assert time.monotonic() - began < 0.5
        # a process killed while it holds the file lock releases it
        import fcntl
        import multiprocess
        import signal

        def hold(path):
            fd = os.open(path, os.O_RDWR)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            time.sleep(60)

        proc = multiprocess.get_context("fork").Process(target=hold, args=(limit.path,))
        proc.start()
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(5)
        result: list = []
        t = threading.Thread(target=lambda: result.append(limit.take(1, lambda: False)))
        t.start()
        join_or_dump(t, 10, "a take after a killed lock holder")
        assert result == [True]
    finally:
        limit.remove()
    assert not os.path.exists(limit.path)


def test_rate_limit_files_of_dead_drivers_are_removed_by_the_next_run():
    """A SIGKILLed driver cannot remove its bucket file; the next create() does."""
    import subprocess
    import tempfile

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    folder = tempfile.gettempdir()
    left = os.path.join(folder, f"nbmplock-rate-{dead}-abc123")
    mine = os.path.join(folder, f"nbmplock-rate-{os.getpid()}-abc123")
    recent = os.path.join(folder, f"nbmplock-rate-{dead}-def456")
    for path in (left, mine, recent):
        with open(path, "wb") as f:
            f.write(b"\0" * 8)
    hours_ago = time.time() - 7200
    os.utime(left, (hours_ago, hours_ago))
    os.utime(mine, (hours_ago, hours_ago))
    try:
        limit = RateLimit.create(10)
        limit.remove()
        assert not os.path.exists(left)
        assert os.path.exists(mine)  # a live driver's file is its own to remove
        # a file taken from within the hour may be a Dask worker's, whose driver
        # runs on another machine: kept
        assert os.path.exists(recent)
    finally:
        for path in (left, mine, recent):
            if os.path.exists(path):
                os.unlink(path)


def test_the_panel_says_when_items_wait_to_retry_and_the_limit_sets_the_pace():
    pytest.importorskip("ipywidgets")
    from nbmplock._panel import timing_text
    from nbmplock._state import JobState, Progress

    p = Progress(100, 10, 0, 0, 8, (), 19.5, 1.0, 4.6, JobState.RUNNING, 3, True)
    text = timing_text(p)
    assert "held to the rate limit" in text and "3 waiting to retry" in text
    plain = Progress(100, 10, 0, 0, 8, (), 19.5, 1.0, 4.6, JobState.RUNNING)
    assert "rate limit" not in timing_text(plain) and "retry" not in timing_text(plain)
