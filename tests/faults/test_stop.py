"""Issue 6, item 4: Stop (graceful and forced) and Ctrl-C at random instants, many times.

* ``Job.stop()`` / ``Job.stop(force=True)`` from another thread while the job
  runs: the job ends (no hang), no worker outlives it (checked by pid), the
  done-set is exactly what ``save_callback`` received, a graceful stop runs no
  item twice, a forced one only items in flight or not yet saved, and ``resume()`` completes
  with every item saved exactly once.
* SIGINT to a script running ``mp_lock`` (the script user's Ctrl-C): it exits
  with ``KeyboardInterrupt`` within seconds, its workers are gone, the done-set
  matches the saved items, and running it again resumes to completion.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import zlib
from collections import Counter

import pytest

import nbmplock
from nbmplock import _engine, _read

from . import driver
from .helpers import FIGURES, Driver, Ledger, descendants, wait_gone


def slow(item: str, shared: dict, init_values) -> str:
    """Ledger the item in a per-worker file, then work 0.5-2 ms."""
    path = os.path.join(shared["ledger"], f"processed-r{shared['run']:04d}-p{os.getpid()}.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, (json.dumps(item) + "\n").encode())
    os.close(fd)
    end = time.perf_counter() + (0.5 + zlib.crc32(item.encode()) % 1000 / 667) / 1000
    while time.perf_counter() < end:
        pass
    return item[::-1]


class Recorder:
    """A save_callback that keeps every (name, result) it receives, in order."""

    def __init__(self):
        self.names: list[str] = []
        self.wrong: list[str] = []
        self._busy = threading.Lock()
        self.concurrent = False

    def __call__(self, path, results, names):
        if not self._busy.acquire(blocking=False):
            self.concurrent = True
        try:
            self.names.extend(names)
            self.wrong.extend(n for n, r in zip(names, results) if r != n[::-1])
        finally:
            self._busy.release()


def _stop_later(job: nbmplock.Job, delay: float, mode: str, errors: list) -> threading.Thread:
    def stop():
        time.sleep(delay)
        try:
            job.stop(force=(mode == "force"))
            if mode == "escalate":
                time.sleep(delay / 4)
                job.stop(force=True)  # Stop pressed again while stopping
        except nbmplock.JobStateError:
            if job.state.active:  # too late is fine: the job has already ended
                errors.append(f"stop() refused in state {job.state}")
    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["graceful", "force", "escalate"])
def test_job_stop_from_another_thread_at_random_instants(tmp_path, rng, mode):
    reps = {"graceful": 12, "force": 12, "escalate": 6}[mode]
    stopped = 0
    for rep in range(reps):
        items = [f"{mode}-{rep}-{i:04d}" for i in range(600)]
        out = tmp_path / f"rep{rep}" / "out"
        ledger = tmp_path / f"rep{rep}" / "ledger"
        ledger.mkdir(parents=True)
        workers, chunk, batch = rng.choice([1, 2, 3]), rng.choice([1, 4, 8]), rng.choice([1, 5, 10])
        saver = Recorder()
        shared = {"ledger": str(ledger), "run": 0}
        job = nbmplock.Job(items, slow, str(out), save_callback=saver, num_procs=workers,
                           chunk_size=chunk, save_batch=batch, shared_data=shared)
        errors: list = []
        delay = rng.choice([0.0, rng.uniform(0, 0.05), rng.uniform(0.05, 0.6)])
        job.start()
        stopper = _stop_later(job, delay, mode, errors)
        FIGURES.add("runs_not_killed")
        assert job.wait(60), f"rep {rep}: the job did not end after stop({mode})"
        FIGURES.add("runs_ended_cleanly")
        stopper.join(10)
        assert not errors, errors
        assert job.error is None, repr(job.error)
        assert job.state in (nbmplock.JobState.STOPPED, nbmplock.JobState.FINISHED)
        stopped += job.state is nbmplock.JobState.STOPPED

        led = Ledger(ledger)
        assert wait_gone(led.workers[0], timeout=5) == [], "a worker outlived stop()"
        saved = Counter(saver.names)
        done = _read.read_contents(str(out)).done
        assert set(saved) == done, (f"rep {rep}: saved {len(saved)} but recorded "
                                    f"{len(done)}: {sorted(set(saved) ^ done)[:5]}")
        assert max(saved.values(), default=1) == 1 and not saver.wrong and not saver.concurrent
        assert job.progress.done == len(done)
        ran = led.processed[0]
        assert max(ran.values(), default=1) == 1
        in_flight = set(ran) - done
        if mode == "graceful":
            assert not in_flight, f"graceful stop lost finished items: {sorted(in_flight)[:5]}"
        else:  # dispatched, plus finished results not yet saved (the runner's unsaved limit)
            assert len(in_flight) <= workers * _engine.PREFETCH * chunk + batch + workers * chunk

        shared["run"] = 1
        job.resume()
        FIGURES.add("runs_not_killed")
        assert job.wait(60) and job.state is nbmplock.JobState.FINISHED, job.error
        FIGURES.add("runs_ended_cleanly")
        led.load()
        assert Counter(saver.names) == Counter(items), "an item was saved twice or never"
        assert _read.read_contents(str(out)).done == set(items)
        again = set(led.processed[1]) & done
        assert not again, f"resume ran items recorded done: {sorted(again)[:5]}"
        twice = {i for i, n in led.all_processed().items() if n > 1}
        assert twice <= in_flight
        assert wait_gone(led.workers[1], timeout=5) == []
    FIGURES.add("stops", reps)
    FIGURES.add("faults_injected", stopped)
    print(f"{mode}: {stopped} of {reps} jobs were stopped before finishing")


# -- Ctrl-C of a script ---------------------------------------------------------

@pytest.mark.timeout(240)
def test_sigint_stops_a_script_cleanly_and_it_resumes(tmp_path, rng):
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    out = tmp_path / "out"
    items = driver.make_items(12_000, "c")
    cfg = dict(out=str(out), ledger=str(ledger_dir), n_items=len(items), tag="c",
               workers=2, chunk_size=4, save_batch=10, verbose=True, work_ms=[0.5, 1.5])
    done_after: dict[int, set] = {}
    interrupts = 6
    stops_seen = 0
    for run in range(interrupts):
        proc = Driver(dict(cfg, run=run), ledger_dir)
        try:
            proc.wait_ready()
            delay = rng.uniform(0.02, 0.1) if run == 0 else rng.uniform(0.1, 0.5)
            if proc.wait(delay) is not None:
                pytest.fail(f"the run finished before the interrupt: {proc.stderr()}")
            pids = descendants(proc.pid)
            sent = time.monotonic()
            proc.signal(signal.SIGINT)
            rc = proc.finish(timeout=30)
            took = time.monotonic() - sent
        finally:
            proc.close()
        err = proc.stderr()
        assert rc != 0 and "KeyboardInterrupt" in err, (rc, err)
        started = "stopped by the interrupt" in err
        if started:
            assert "Run the same call again" in err, err
        assert took < 10, f"Ctrl-C took {took:.1f} s to stop the run"
        assert wait_gone(pids, timeout=5) == [], "a worker outlived the interrupted script"
        led = Ledger(ledger_dir)
        assert wait_gone(led.workers[run], timeout=5) == []
        done = set(_read.read_contents(str(out)).done)
        saved = set(led.saved[run])
        previous = done_after.get(run - 1, set())
        assert max(led.saved[run].values(), default=1) == 1
        assert done - previous == saved, "the done-set does not match what was saved"
        assert started or not saved, f"work was done but mp_lock did not say so: {err}"
        stops_seen += started
        assert not set(led.processed[run]) & previous
        assert nbmplock.read_snapshot(str(out)).holder_pid is None
        done_after[run] = done

    proc = Driver(dict(cfg, run=interrupts), ledger_dir)
    try:
        proc.wait_ready()
        assert proc.finish(timeout=120) == 0, proc.stderr()
    finally:
        proc.close()
    led = Ledger(ledger_dir)
    assert led.final(interrupts)["completed"] is True
    assert led.all_saved() == Counter(items), "across interrupts each item is saved once"
    in_flight = set().union(*(set(led.processed[r]) - done_after[r] for r in done_after))
    twice = {i for i, n in led.all_processed().items() if n > 1}
    assert twice <= in_flight
    assert stops_seen >= interrupts - 1, "most interrupts should land in a running job"
    FIGURES.add("interrupts", interrupts)
    FIGURES.add("faults_injected", interrupts)


# -- interrupts at the edges of a run -----------------------------------------

def _long(item, shared, init_values):
    time.sleep(0.002)
    return item


@pytest.mark.timeout(60)
def test_interrupt_as_the_run_finishes(tmp_path, monkeypatch):
    """Ctrl-C landing after the run ended but before wait() returned.

    Once raised JobStateError from stop() on the FINISHED job (fixed in 40f894e).
    """
    real_wait = nbmplock.Job.wait
    fired = []

    def wait_then_interrupt(self, timeout=None):
        ended = real_wait(self, timeout)  # the run ends ...
        if not fired:
            fired.append(True)
            raise KeyboardInterrupt  # ... and Ctrl-C lands before wait() returns
        return ended

    monkeypatch.setattr(nbmplock.Job, "wait", wait_then_interrupt)
    with pytest.raises(KeyboardInterrupt, match="stopped by the interrupt"):
        nbmplock.mp_lock(["a", "b", "c"], _long, None, 1, str(tmp_path / "out"), verbose=False)
    assert fired and nbmplock.is_mp_lock_completed(["a", "b", "c"], str(tmp_path / "out"))


@pytest.mark.timeout(60)
def test_the_bar_is_never_drawn_in_the_callers_thread(tmp_path, monkeypatch):
    """Views run on the views thread only (issue 14). Once the first tqdm update was
    drawn in start(), in the caller's thread, and a Ctrl-C landing there escaped
    with the job still running in the background (fixed in 40f894e)."""
    from nbmplock import _progress

    real = _progress.TqdmObserver._on_event
    drawn_in: set = set()

    def on_event(self, event):
        drawn_in.add(threading.current_thread().name)
        return real(self, event)

    monkeypatch.setattr(_progress.TqdmObserver, "_on_event", on_event)
    items = [f"k{i}" for i in range(3000)]
    nbmplock.mp_lock(items, _long, None, 2, str(tmp_path / "out"), verbose=True)
    assert drawn_in == {"nbmplock-views"}


# -- a stop takes effect within one save_callback call (issue 12, case 2) -------

def _save_calls(ledger_dir, run: int) -> list[float]:
    path = ledger_dir / f"save-calls-r{run:04d}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _wait_for_calls(ledger_dir, run: int, n: int, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(_save_calls(ledger_dir, run)) < n:
        if proc.wait(0.02) is not None:
            pytest.fail(f"the driver ended before {n} save calls: {proc.stderr()}")
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {n} save calls after {timeout} s")


def _check_done_is_saved_and_resume(ledger_dir, out, cfg, runs: int, items) -> None:
    led = Ledger(ledger_dir)
    done = set(_read.read_contents(str(out)).done)
    saved = set().union(*(set(led.saved[r]) for r in range(runs)))
    assert done <= saved, "an item is recorded done that save_callback did not get"
    proc = Driver(dict(cfg, run=runs, save_sleep=0.0, save_hang_after=None), ledger_dir)
    try:
        proc.wait_ready()
        assert proc.finish(timeout=120) == 0, proc.stderr()
    finally:
        proc.close()
    led = Ledger(ledger_dir)
    assert led.final(runs)["completed"] is True
    assert set(led.all_saved()) == set(items)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("calls_before", [1, 3, 6])
def test_ctrl_c_with_a_slow_save_takes_effect_within_one_save_call(tmp_path, calls_before):
    """Once: 67 s and 134 more save calls after Ctrl-C with a 0.5 s save_callback."""
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    out = tmp_path / "out"
    items = driver.make_items(2000, "s")
    cfg = dict(out=str(out), ledger=str(ledger_dir), n_items=len(items), tag="s",
               workers=2, save_batch=10, work_ms=[0.01, 0.02], save_sleep=0.5)
    proc = Driver(dict(cfg, run=0), ledger_dir)
    try:
        proc.wait_ready()
        _wait_for_calls(ledger_dir, 0, calls_before, proc)
        pids = descendants(proc.pid)
        sent_at, sent = time.time(), time.monotonic()
        proc.signal(signal.SIGINT)
        rc = proc.finish(timeout=30)
        took = time.monotonic() - sent
    finally:
        proc.close()
    err = proc.stderr()
    assert rc != 0 and "stopped by the interrupt" in err, err
    started_after = [t for t in _save_calls(ledger_dir, 0) if t > sent_at]
    assert len(started_after) <= 1, (
        f"{len(started_after)} save calls started after Ctrl-C; a stop takes effect within "
        "the call in progress (one more only when none was running)")
    FIGURES.add("interrupts")
    FIGURES.add("stops_with_slow_save")
    assert took < 10, f"Ctrl-C took {took:.1f} s with a 0.5 s save_callback"
    FIGURES.add("stops_within_one_save")
    assert wait_gone(pids, timeout=5) == []
    _check_done_is_saved_and_resume(ledger_dir, out, cfg, 1, items)


@pytest.mark.timeout(120)
def test_a_second_ctrl_c_abandons_a_save_that_never_returns(tmp_path):
    """Once: three Ctrl-Cs were swallowed and only SIGTERM ended the script."""
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    out = tmp_path / "out"
    items = driver.make_items(2000, "h")
    cfg = dict(out=str(out), ledger=str(ledger_dir), n_items=len(items), tag="h",
               workers=2, save_batch=10, work_ms=[0.01, 0.02], save_hang_after=3)
    proc = Driver(dict(cfg, run=0), ledger_dir)
    try:
        proc.wait_ready()
        _wait_for_calls(ledger_dir, 0, 4, proc)  # the 4th call hangs
        pids = descendants(proc.pid)
        proc.signal(signal.SIGINT)
        assert proc.wait(1.0) is None, "the first Ctrl-C waits for the save in progress"
        sent = time.monotonic()
        proc.signal(signal.SIGINT)
        rc = proc.finish(timeout=30)
        took = time.monotonic() - sent
    finally:
        proc.close()
    err = proc.stderr()
    FIGURES.add("interrupts", 2)
    FIGURES.add("stops_with_hung_save")
    assert rc != 0 and "KeyboardInterrupt" in err, err
    assert "abandoned" in err, err
    assert took < 10, f"the second Ctrl-C took {took:.1f} s"
    FIGURES.add("stops_within_one_save")
    assert wait_gone(pids, timeout=5) == []
    assert nbmplock.read_snapshot(str(out)).holder_pid is None
    _check_done_is_saved_and_resume(ledger_dir, out, cfg, 1, items)
