"""python -m nbmplock: status and failures, also during a live run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nbmplock import Job

from . import helpers


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "nbmplock", *args], capture_output=True,
                          text=True, timeout=60)


def test_status_and_failures(tmp_path):
    out = str(tmp_path)
    items = [f"c{n}" for n in range(40)]
    Job(items, helpers.fail_on_seven, out, num_procs=2).start().wait()
    status = _cli("status", out)
    assert status.returncode == 0
    assert "done:          36 / 40" in status.stdout
    assert "failed:        4" in status.stdout
    assert "live run:      none" in status.stdout
    assert "ValueError: no sevens" in status.stdout
    failures = _cli("failures", out)
    assert failures.stdout.count("=== 'c") == 4 and "Traceback" in failures.stdout


def _workers_forked(job, timeout: float = 60.0) -> None:
    """Wait until the job's workers are forked and running (an item is done).

    A process started while a live job forks a worker can wait for the job's
    end: the worker keeps the parent's copy of the new process's pipes (its
    exec-error pipe included, which ``Popen`` itself reads to the end), so
    ``subprocess.run`` returns only when that worker exits. Seen as a status
    call that took the whole run (10 s here; in the rate-limit test, 100 s,
    which looked like a stalled run). See the closing note of 2026-12-06."""
    import time

    deadline = time.monotonic() + timeout
    while job.progress.done < 1:
        if time.monotonic() > deadline:
            helpers.dump_stacks("no item done")
            pytest.fail(f"no item done in {timeout} s")
        time.sleep(0.05)


def test_status_during_a_live_run(tmp_path):
    out = str(tmp_path)
    job = Job([f"s{n}" for n in range(200)], helpers.slow, out, num_procs=1,
              shared_data={"sleep": 0.05})
    job.start()
    try:
        _workers_forked(job)
        status = _cli("status", out)
        import os
        assert f"live run:      yes, pid {os.getpid()}" in status.stdout
    finally:
        job.stop()
        job.wait()


def test_status_of_a_live_run_says_what_it_is_doing(tmp_path):
    """Issue 18: status shows items in flight, waiting to retry, and the pace
    against rate_limit, from the live run's live.json (once a second)."""
    import time
    out = str(tmp_path)
    job = Job([f"l{n}" for n in range(2000)], helpers.slow, out, num_procs=1, concurrency=4,
              rate_limit="20/s", shared_data={"sleep": 0.05})  # 100 s at the limit
    job.start()
    try:
        _workers_forked(job)
        deadline = time.monotonic() + 60
        while True:
            text = _cli("status", out).stdout
            if "now:" in text and "items/s" in text:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.3)
        assert "in flight" in text and "rate limit 20/s" in text, text
        _assert_moving(job, seconds=3.0)
    finally:
        job.stop()
        assert job.wait(60)
    assert not (tmp_path / ".nbmplock" / "live.json").exists()  # gone with the run
    assert "now:" not in _cli("status", out).stdout


def _assert_moving(job, seconds: float) -> None:
    """The live run finishes items (20/s here): a run that stalls fails the test
    with the stacks of the driver's threads and of its workers (py-spy), so a
    stall explains itself (seen twice, once in 2026-12, not reproduced since)."""
    import time

    import psutil

    before = job.progress.done
    time.sleep(seconds)
    after = job.progress.done
    if after <= before:
        helpers.dump_stacks(f"live run stalled at {after} done for {seconds} s")
        workers = psutil.Process().children(recursive=True)
        sys.stderr.write(helpers.thread_stacks(workers) + "\n")
        pytest.fail(f"the live run finished nothing in {seconds} s ({after} done; "
                    "stacks on stderr)")


def test_not_a_run_directory(tmp_path):
    result = _cli("status", str(tmp_path))
    assert result.returncode == 2 and "not an nbmplock run directory" in result.stderr


def _fail_all(item, shared_data, init_values):
    raise ValueError("no")


def test_failures_of_odd_and_huge_items_print_under_any_locale_and_into_head(tmp_path):
    """Issue 13, item 6: a lone surrogate crashed the CLI (also under LANG=C), piping
    into head raised BrokenPipeError, and a 1 MB item was printed whole."""
    import os

    out = str(tmp_path)
    items = ["lone \ud800 surrogate", "x" * 1_000_000] + [f"f{n}" for n in range(3000)]
    Job(items, _fail_all, out, num_procs=2).start().wait()
    for env in ({}, {"LANG": "C", "LC_ALL": "C", "PYTHONIOENCODING": ""}):
        result = subprocess.run([sys.executable, "-m", "nbmplock", "failures", out],
                                capture_output=True, env={**os.environ, **env}, timeout=60)
        assert result.returncode == 0, result.stderr
        assert b"\\ud800" in result.stdout and len(result.stdout) < 3_000_000
        assert b"x" * 3000 not in result.stdout
    piped = subprocess.run(f"{sys.executable} -m nbmplock failures {out} | head -3",
                           shell=True, capture_output=True, timeout=60)
    assert piped.returncode == 0 and piped.stderr == b"", piped.stderr
    status = _cli("status", out)
    assert status.returncode == 0 and "x" * 100 not in status.stdout


def test_repair_reports_items_not_records(tmp_path):
    out = str(tmp_path)
    Job([f"r{n}" for n in range(30)], helpers.fail_on_seven, out, num_procs=1).start().wait()
    first = _cli("repair", out)
    second = _cli("repair", out)
    assert first.stdout == second.stdout == (
        "repaired: 27 items done and 3 failed are kept; nothing was damaged\n")


def test_status_says_which_run_did_which_items(tmp_path):
    """Issue 17: the fingerprint is recorded per run, so status names the work that
    made the items done now."""
    out = str(tmp_path)
    items = [f"r{n}" for n in range(30)]
    Job(items[:10], helpers.echo, out, num_procs=1).start().wait()
    Job(items, helpers.fail_on_seven, out, num_procs=1).start().wait()
    text = _cli("status", out).stdout
    assert "done by run:" in text, text
    rows = [line for line in text.splitlines() if line.startswith("  ") and " done  " in line]
    assert len(rows) == 2, text
    assert "10 done  function echo" in rows[0] and "function fail_on_seven (the latest)" in rows[1]
    assert rows[1].split()[1] == "18"  # 20 new items; r17 and r27 failed
