"""Job: background thread, states, stop/resume/retry, observers, restart-proof."""

from __future__ import annotations

import threading
import time

import pytest

import nbmplock
from nbmplock import Job, JobState, JobStateError
from nbmplock._read import read_contents

from . import helpers
from .helpers import Saver

ITEMS = [f"job-{n:05d}" for n in range(3000)]


def _wait_until(predicate, timeout=30):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("force", [False, True])
def test_stop_from_another_thread_then_resume(tmp_path, force):
    saver = Saver()
    job = Job(ITEMS, helpers.slow, str(tmp_path), num_procs=2, save_callback=saver,
              shared_data={"sleep": 0.002}, save_batch=7)
    events = []
    job.subscribe(events.append)
    assert job.start() is job
    assert job.state is JobState.RUNNING
    _wait_until(lambda: job.progress.done >= 100)
    threading.Thread(target=job.stop, kwargs={"force": force}).start()
    assert job.wait(30)
    assert job.state is JobState.STOPPED
    done = read_contents(str(tmp_path)).done
    assert done == set(saver.names)
    assert 100 <= len(done) < len(ITEMS)
    assert job.progress.done == len(done)
    assert job.progress.in_flight == 0
    states = [e.progress.state for e in events if e.kind == "state"]
    assert states[:2] == [JobState.RUNNING, JobState.STOPPING] and states[-1] is JobState.STOPPED
    job.resume()
    assert job.wait(60) and job.state is JobState.FINISHED
    assert sorted(set(saver.names)) == sorted(ITEMS)
    if not force:
        assert len(saver.names) == len(ITEMS)  # graceful: nothing ran twice
    assert job.progress.done == len(ITEMS) and job.progress.done_before == len(done)


def test_illegal_calls_raise_with_a_reason(tmp_path):
    job = Job(ITEMS[:50], helpers.slow, str(tmp_path), num_procs=1,
              shared_data={"sleep": 0.01})
    assert job.stop() is job and job.state is JobState.IDLE  # a late Stop does nothing
    job.start()
    with pytest.raises(JobStateError, match="running"):
        job.resume()
    with pytest.raises(JobStateError, match="running"):
        job.start()
    job.stop()
    job.wait()
    with pytest.raises(JobStateError, match="stopped; use resume"):
        job.start()
    job.resume().wait()
    assert job.state is JobState.FINISHED
    assert job.stop() is job and job.stop(force=True) is job
    assert job.state is JobState.FINISHED


@pytest.mark.timeout(60)
def test_retry_failed_after_fixing_the_function(tmp_path):
    flag = tmp_path / "fixed"

    def process(item, shared, init):
        if item.endswith("7") and not flag.exists():
            raise ValueError("seven")
        return item

    out = str(tmp_path / "run")
    job = Job(ITEMS[:200], process, out, num_procs=2)
    job.start().wait()
    assert job.state is JobState.FINISHED and job.error is None
    assert job.progress.failed == 20 and len(job.failures) == 20
    flag.touch()
    job.retry_failed().wait()
    assert job.progress.failed == 0 and job.failures == ()
    assert job.progress.done == 200
    assert job.results() == ITEMS[:200]


@pytest.mark.timeout(60)
def test_restart_proof_progress_from_disk(tmp_path):
    out = str(tmp_path)
    job = Job(ITEMS[:300], helpers.fail_on_seven, out, num_procs=2)
    job.start().wait()
    # a new Job object (as after a kernel restart) shows the stored numbers before start
    again = Job(ITEMS[:300], helpers.fail_on_seven, out, num_procs=2)
    p = again.progress
    assert again.state is JobState.IDLE
    assert p.done == 270 and p.failed == 30 and p.total == 300
    assert {f.item for f in again.failures} == {i for i in ITEMS[:300] if i.endswith("7")}
    assert "270/300 done" in repr(again) and "30 failed" in repr(again)


@pytest.mark.timeout(60)
def test_observers_are_coalesced(tmp_path):
    events = []
    job = Job([f"x{n}" for n in range(200_000)], helpers.length, str(tmp_path), num_procs=2)
    job.subscribe(events.append)
    started = time.monotonic()
    job.start().wait()
    elapsed = time.monotonic() - started
    progress_events = [e for e in events if e.kind == "progress"]
    assert len(progress_events) <= elapsed * 10 + 5
    assert events[-1].progress.done == 200_000


def test_run_returns_the_live_job_for_the_same_out_path(tmp_path):
    out = str(tmp_path)
    job = nbmplock.run(ITEMS[:100], helpers.slow, out, num_procs=1, shared_data={"sleep": 0.01})
    try:
        again = nbmplock.run(ITEMS[:100], helpers.slow, out, num_procs=1)
        assert again is job and job.reattached
        other = Job(ITEMS[:100], helpers.slow, out, num_procs=1)
        with pytest.raises(nbmplock.RunLockedError, match="another Job in this process"):
            other.start()
    finally:
        job.stop()
        job.wait()


def test_observer_errors_do_not_break_the_run(tmp_path):
    job = Job(ITEMS[:100], helpers.echo, str(tmp_path), num_procs=1)
    job.subscribe(lambda e: 1 / 0)
    job.start().wait()
    assert job.state is JobState.FINISHED and job.results() == ITEMS[:100]


def test_output_tail_and_status_text(tmp_path):
    def noisy(item, shared, init):
        print("hello", item)
        return item

    job = Job(["a", "b"], noisy, str(tmp_path), num_procs=1)
    job.start().wait()
    assert sorted(job.output) == ["[w0] hello a", "[w0] hello b"]
    text = job.status_text()
    assert "finished" in text and "2/2 done" in text


def test_results_need_kept_results(tmp_path):
    job = Job(["a"], helpers.echo, str(tmp_path), save_callback=lambda p, r, n: None)
    job.start().wait()
    with pytest.raises(JobStateError, match="keep_results=True"):
        job.results()


@pytest.mark.timeout(60)
def test_graceful_stop_mid_chunk_keeps_exactly_the_finished_results(tmp_path):
    # Chunks of 50 items: a graceful stop ends each worker's chunk after its
    # current item, and the part that ran comes back with its results. Those
    # are stored (mp_lock_value's store reuses the worker's pickle) for exactly
    # the items recorded done; the resumed run returns every result in order.
    job = Job(ITEMS[:600], helpers.slow, str(tmp_path), num_procs=2, chunk_size=50,
              shared_data={"sleep": 0.002})
    job.start()
    _wait_until(lambda: job.progress.done >= 50)
    job.stop()
    assert job.wait(30) and job.state is JobState.STOPPED
    contents = read_contents(str(tmp_path), results=True)
    assert 50 <= len(contents.done) < 600
    assert contents.results == {i: helpers.slow(i, {"sleep": 0}, {}) for i in contents.done}
    job.resume()
    assert job.wait(60) and job.state is JobState.FINISHED
    assert job.results() == [helpers.slow(i, {"sleep": 0}, {}) for i in ITEMS[:600]]


def _interrupt_at_opcode(n: int) -> list:
    """Trace this thread; raise KeyboardInterrupt at its n-th interrupt point.

    What a Ctrl-C does: CPython raises it where it checks for signals, that is
    on entering a function, on a loop's jump back, and just after a call
    returns; every such point of the traced code counts, in turn. Returns a
    list that gets True once it has fired.
    """
    import dis
    import sys

    calls = {dis.opmap[name] for name in ("CALL", "CALL_FUNCTION_EX") if name in dis.opmap}
    checks = {dis.opmap[name] for name in ("RESUME", "JUMP_BACKWARD") if name in dis.opmap}
    fired: list = []
    count = [0]
    last: dict = {}

    def local(frame, event, arg):
        if event == "opcode" and not fired:
            op = frame.f_code.co_code[frame.f_lasti]
            after_call = last.get(id(frame)) in calls
            last[id(frame)] = op
            if op in checks or after_call:
                count[0] += 1
                if count[0] == n:
                    fired.append(True)
                    raise KeyboardInterrupt
        return local

    def on_call(frame, event, arg):
        # The code under test and threading's; not a weakref callback or a
        # finalizer that happens to run meanwhile (Python ignores their errors).
        if not frame.f_code.co_filename.endswith(("threading.py", "_job.py", "_sync.py",
                                                 "_notify.py")):
            return None
        frame.f_trace_opcodes = True
        return local

    sys.settrace(on_call)
    return fired


@pytest.mark.timeout(180)
def test_ctrl_c_at_any_point_of_wait_never_wedges_the_job(tmp_path):
    """A KeyboardInterrupt injected at each interrupt point of Job.wait in turn: the
    job still ends and the next wait says so. threading.Event.wait failed this:
    an interrupt just after Condition.__enter__ took its lock left the lock held,
    and the job's end and every later wait hung (one Ctrl-C in ~150 in a loop)."""
    import sys

    items = [f"i{n:02d}" for n in range(15)]
    n = 0
    while True:
        n += 1
        assert n < 2000, "wait() should have far fewer interrupt points"
        job = Job(items, helpers.slow, out_path=str(tmp_path / f"run{n}"), num_procs=1,
                  shared_data={"sleep": 0.005})
        job.start()
        fired = _interrupt_at_opcode(n)
        try:
            # bounded: a wedged job fails here with every thread's stack (conftest)
            assert job.wait(60), f"interrupted at point {n} of wait(), the job never ended"
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        ended: list = []
        waiter = threading.Thread(target=lambda j=job, e=ended: e.append(j.wait(20)), daemon=True)
        waiter.start()
        waiter.join(30)
        assert ended == [True], f"interrupted at point {n} of wait(), the job never ended"
        assert job.state is JobState.FINISHED
        if not fired:  # wait() ran to its end in fewer than n bytecodes: all covered
            break
    assert n > 3


@pytest.mark.timeout(300)
def test_ctrl_c_at_any_point_of_start_leaves_no_locked_or_wedged_run(tmp_path):
    """A KeyboardInterrupt injected at each interrupt point of Job.start in turn (its
    own code and threading's, Thread.start included), handled as mp_lock does:
    the job always ends, and the run directory is never left locked."""
    import sys

    items = [f"i{n:02d}" for n in range(6)]
    out = str(tmp_path / "run")
    n = 0
    interrupted = 0
    while True:
        n += 1
        job = Job(items, helpers.slow, out_path=out, num_procs=1, shared_data={"sleep": 0.01})
        fired = _interrupt_at_opcode(n)
        try:
            job.start()
        except (KeyboardInterrupt, RuntimeError):  # threading's own locks may complain
            interrupted += 1
        finally:
            sys.settrace(None)
        if job.state.active:
            job.stop(force=True)
        ended: list = []
        waiter = threading.Thread(target=lambda j=job, e=ended: e.append(j.wait(20)), daemon=True)
        waiter.start()
        waiter.join(30)
        assert ended == [True], f"interrupted at point {n} of start(), the job never ended"
        assert not job.state.active
        if not fired:
            break
    assert interrupted > 20
    # Nothing was left locked or half-written: the same directory runs to the end.
    final = Job(items, helpers.slow, out_path=out, num_procs=1, shared_data={"sleep": 0.001})
    final.start()
    assert final.wait(30) and final.state is JobState.FINISHED
    assert read_contents(out).done == set(items)


@pytest.mark.timeout(60)
def test_relative_out_path_survives_chdir_during_the_run(tmp_path, monkeypatch):
    """Issue 12, case 5: ``%cd`` in a notebook must not move a running job."""
    start_dir, other = tmp_path / "start", tmp_path / "other"
    start_dir.mkdir()
    other.mkdir()
    monkeypatch.chdir(start_dir)
    saver = Saver()
    job = Job(ITEMS[:400], helpers.slow, "rel", num_procs=2, save_callback=saver,
              shared_data={"sleep": 0.005})
    assert job.out_path == str(start_dir / "rel")
    job.start()
    monkeypatch.chdir(other)
    helpers.wait_job(job)
    assert job.state is JobState.FINISHED, job.error
    assert {path for path, _, _ in saver.calls} == {str(start_dir / "rel" / "data")}
    assert read_contents(str(start_dir / "rel")).done == set(ITEMS[:400])
    assert not (other / "rel").exists()


@pytest.mark.timeout(60)
def test_out_path_tilde_and_pathlib_name_the_same_run(tmp_path, monkeypatch):
    """Issue 13, items 5 and 6: ``~`` is expanded; a Path finds the live run of a str."""
    monkeypatch.setenv("HOME", str(tmp_path))
    job = nbmplock.run(ITEMS[:200], helpers.slow, "~/runs/x", num_procs=1,
                       shared_data={"sleep": 0.02})
    try:
        assert job.out_path == str(tmp_path / "runs" / "x")
        again = nbmplock.run(ITEMS[:200], helpers.slow, tmp_path / "runs" / "x", num_procs=1,
                             shared_data={"sleep": 0.02})
        assert again is job and job.reattached
    finally:
        if job.state.active:
            job.stop(force=True)
        helpers.wait_job(job)
    assert not (tmp_path / "~").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["out_path", "state dir", "replaced"])
def test_run_directory_deleted_mid_run_stops_with_a_clear_error(tmp_path, what):
    """Issue 12, case 4: never claim work the directory cannot prove."""
    import shutil

    from nbmplock import RunDirectoryLostError

    out = tmp_path / "run"
    job = Job(ITEMS[:600], helpers.slow, str(out), num_procs=2, shared_data={"sleep": 0.01})
    job.start()
    _wait_until(lambda: job.progress.done >= 20)
    if what == "out_path":
        shutil.rmtree(out)
    elif what == "state dir":
        shutil.rmtree(out / ".nbmplock")
    else:  # another run's directory moved into its place
        other = tmp_path / "other"
        nbmplock.mp_lock(["z"], helpers.echo, None, 1, str(other), verbose=False)
        shutil.rmtree(out)
        other.rename(out)
    helpers.wait_job(job, 30)
    assert job.state is JobState.FAILED
    assert isinstance(job.error, RunDirectoryLostError), job.error
    assert "deleted, moved or replaced" in str(job.error)
    assert not nbmplock.is_mp_lock_completed(ITEMS[:600], str(out))
    # the directory is free: a new run starts and finishes
    again = Job(ITEMS[:600], helpers.slow, str(out), num_procs=2, shared_data={"sleep": 0.0})
    again.start()
    helpers.wait_job(again)
    assert again.state is JobState.FINISHED
    assert nbmplock.is_mp_lock_completed(ITEMS[:600], str(out))


class SlowSaver(Saver):
    """A save_callback that takes ``seconds`` per call, and hangs while ``gate`` is clear
    from call number ``hang_from`` on."""

    def __init__(self, seconds=0.0, hang_from=None):
        super().__init__()
        self.seconds = seconds
        self.hang_from = hang_from
        self.gate = threading.Event()
        self.started = 0

    def __call__(self, path, results, names):
        self.started += 1
        if self.hang_from is not None and self.started >= self.hang_from:
            self.gate.wait()
        time.sleep(self.seconds)
        super().__call__(path, results, names)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("force", [False, True])
def test_a_stop_does_not_wait_for_the_buffered_results_to_be_saved(tmp_path, force):
    """Issue 12, case 2: once 'stopping' for over 60 s while done climbed to 2,020."""
    saver = SlowSaver(0.3)
    job = Job([f"x{i}" for i in range(2000)], helpers.echo, str(tmp_path), num_procs=2,
              save_callback=saver, save_batch=10)
    job.start()
    _wait_until(lambda: job.progress.done >= 30)
    calls_at_stop = saver.started
    job.stop(force=force)
    helpers.wait_job(job, 10)
    assert job.state is JobState.STOPPED
    # graceful: the call in progress completes, and none starts after it; force: not even that
    assert saver.started - calls_at_stop <= (0 if force else 1)
    done = read_contents(str(tmp_path)).done
    assert done == set(saver.names) if not force else done <= set(saver.names)
    assert job.progress.done == len(done) and len(done) < 2000
    saver.seconds = 0.0
    job.resume()
    helpers.wait_job(job)
    assert job.state is JobState.FINISHED
    assert set(saver.names) == {f"x{i}" for i in range(2000)}


@pytest.mark.timeout(60)
def test_force_stop_abandons_a_hung_save_and_no_second_run_overlaps_it(tmp_path):
    saver = SlowSaver(hang_from=3)
    items = [f"h{i}" for i in range(500)]
    job = Job(items, helpers.echo, str(tmp_path), num_procs=2, save_callback=saver,
              save_batch=10)
    job.start()
    _wait_until(lambda: saver.started >= 3)
    job.stop()
    assert not job.wait(1.0) and job.state is JobState.STOPPING  # waits for the call
    job.stop(force=True)
    helpers.wait_job(job, 10)
    assert job.state is JobState.STOPPED
    assert any("abandoned" in note for note in job.notes), job.notes
    assert len(read_contents(str(tmp_path)).done) == 20  # two calls returned
    with pytest.raises(nbmplock.RunLockedError, match="that a Force stop abandoned"):
        job.resume()  # after waiting a few seconds for it
    saver.gate.set()  # the hung call returns: nothing is recorded for it
    _wait_until(lambda: not [t for t in threading.enumerate() if t.name == "nbmplock-save"])
    assert len(read_contents(str(tmp_path)).done) == 20
    job.resume()
    helpers.wait_job(job)
    assert job.state is JobState.FINISHED
    assert set(saver.names) == set(items)
