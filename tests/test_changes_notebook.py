"""Issue 17, what tests/test_changes.py leaves out: a changed notebook global or helper
under each ``on_change``, Retry failed after a fix (notebook 01's flow), and a real
SIGKILL during ``python -m nbmplock forget``."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import nbmplock
from nbmplock._read import read_contents, read_done

from . import helpers

ROOT = Path(__file__).resolve().parents[1]

# A notebook's cells as a script: the function's source never changes; what it uses
# from __main__ (a value, a helper function) does between two runs.
_SCRIPT = """
import sys
import nbmplock
THRESHOLD = {threshold}
def helper(x):
    return {helper_body}
def process(item, shared_data, init_values):
    with open(shared_data["ledger"], "a") as f:
        f.write(item + "\\n")
    return helper(len(item))
if __name__ == "__main__":
    try:
        r = nbmplock.mp_lock_value([str(i) for i in range(20)], process, None, 2, sys.argv[1],
                                   verbose=False, on_change=sys.argv[2],
                                   shared_data={{"ledger": sys.argv[3]}})
    except nbmplock.WorkChangedError as exc:
        print("CHANGED", exc)
        sys.exit(3)
    print(sum(r))
"""

# change -> (first script's fields, second script's fields)
NOTEBOOK_CHANGES = {
    "a global": (dict(threshold=1, helper_body="x * THRESHOLD"),
                 dict(threshold=3, helper_body="x * THRESHOLD")),
    "a helper function": (dict(threshold=1, helper_body="x * THRESHOLD"),
                          dict(threshold=1, helper_body="x * THRESHOLD * 3")),
}
FIRST_SUM = 10 * 1 + 10 * 2  # 10 one-digit items, 10 two-digit items, times 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("on_change", ["warn", "error", "rerun"])
@pytest.mark.parametrize("change", sorted(NOTEBOOK_CHANGES))
def test_a_changed_notebook_global_or_helper_under_each_on_change(tmp_path, change, on_change):
    out = str(tmp_path / "run")
    ledger = tmp_path / "ledger"

    def run(fields, mode, name):
        script = tmp_path / f"{name}.py"
        script.write_text(textwrap.dedent(_SCRIPT.format(**fields)))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        return subprocess.run([sys.executable, str(script), out, mode, str(ledger)], env=env,
                              capture_output=True, text=True, timeout=100)

    def ran() -> int:
        return len(ledger.read_text().splitlines())

    first_fields, second_fields = NOTEBOOK_CHANGES[change]
    first = run(first_fields, "warn", "first")
    assert first.returncode == 0 and first.stdout.strip() == str(FIRST_SUM), first.stderr
    assert ran() == 20
    log_before = (tmp_path / "run" / ".nbmplock" / "log").read_bytes()
    second = run(second_fields, on_change, "second")
    words = "the process function 'process' (or a function or value of the notebook it uses)" \
            " changed"
    if on_change == "error":
        assert second.returncode == 3, second.stderr
        assert words in second.stdout and "on_change='rerun'" in second.stdout
        assert (tmp_path / "run" / ".nbmplock" / "log").read_bytes() == log_before
        assert ran() == 20, "nothing may run"
        return
    assert second.returncode == 0, second.stderr
    assert words in second.stderr
    if on_change == "warn":
        assert second.stdout.strip() == str(FIRST_SUM)  # the old results stay
        assert ran() == 20
    else:
        assert second.stdout.strip() == str(3 * FIRST_SUM)
        assert ran() == 40
    # the same script again: unchanged, nothing runs
    again = run(second_fields, on_change, "second")
    assert again.returncode == 0 and again.stdout.strip() == second.stdout.strip()
    assert ran() == (20 if on_change == "warn" else 40)


# -- Retry failed after a fix (notebook 01) ------------------------------------

ORDERS = [f"o{i:03d},{i}.5" for i in range(30)]
ORDERS[7] = "o007,N/A"


def amount_v1(item, shared_data, init_values):
    return float(item.split(",")[1])


def amount_v2(item, shared_data, init_values):
    amount = item.split(",")[1]
    return None if amount == "N/A" else float(amount)


@pytest.mark.timeout(60)
def test_retry_failed_after_a_fix_runs_the_fixed_function(tmp_path):
    """Fix the function, build the job again on the same directory, Retry failed: the
    fixed function runs on the failed item, the change is shown, nothing else runs."""
    out = str(tmp_path / "run")
    old = nbmplock.Job(ORDERS, amount_v1, out, num_procs=2)
    old.start()
    helpers.wait_job(old)
    assert old.progress.failed == 1 and old.failures[0].item == ORDERS[7]
    job = nbmplock.Job(ORDERS, amount_v2, out, num_procs=2)
    assert [f.item for f in job.failures] == [ORDERS[7]]  # read from disk, before a start
    job.retry_failed()
    helpers.wait_job(job)
    p = job.progress
    assert (p.failed, p.done, p.done_now) == (0, 30, 1)
    assert job.failures == ()
    assert any("process function changed" in c for c in job.fingerprint_changes), \
        job.fingerprint_changes
    assert job.results()[7] is None and job.results()[8] == 8.5


@pytest.mark.timeout(60)
def test_a_failure_fixed_by_a_later_run_stays_fixed_for_every_later_job(tmp_path):
    """Bug: a failure superseded by a later run's done (SPAN) record came back from the
    log on the next open: ``job.failures`` listed it again (with 0 failed counted)
    after a ``retry_failed()`` that had nothing to do, and in any later Job."""
    out = str(tmp_path / "run")
    job = nbmplock.run(ORDERS, amount_v1, out, num_procs=2)
    helpers.wait_job(job)
    assert job.progress.failed == 1
    job = nbmplock.run(ORDERS, amount_v2, out, num_procs=2)  # the cell run again, fixed
    helpers.wait_job(job)
    assert job.progress.failed == 0 and job.failures == ()
    assert read_contents(out).failures == {}
    job.retry_failed()  # nothing to retry: it opens the log again
    helpers.wait_job(job)
    assert job.failures == () and job.progress.failed == 0
    later = nbmplock.Job(ORDERS, amount_v2, out, num_procs=1)
    assert later.failures == () and later.progress.failed == 0
    later.start()
    helpers.wait_job(later)
    assert later.failures == () and later.progress.done_now == 0


# -- a SIGKILL during forget ----------------------------------------------------

ITEMS = [f"k{i:05d}" for i in range(3000)]


def _forget_cli(out: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "nbmplock", "forget", out, *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("what", ["--items", "--all", "--failed"])
def test_a_sigkill_during_forget_from_the_command_line_loses_nothing(tmp_path, what):
    """``python -m nbmplock forget`` SIGKILLed at random instants (start-up, opening the
    store, writing the record): the forget happened whole or not at all, the store
    opens, the lock is free, and a resume runs exactly what was forgotten."""
    rng = random.Random(int(os.environ.get("NBMPLOCK_FAULT_SEED", "17")))
    base = tmp_path / "base"
    nbmplock.mp_lock(ITEMS, helpers.fail_on_seven, None, 2, str(base), verbose=False,
                     errors="record")
    failed = {i for i in ITEMS if i.endswith("7")}
    done_before = read_done(str(base))
    assert done_before == set(ITEMS) - failed
    forgotten_items = ITEMS[100:1100]
    items_file = tmp_path / "items.txt"
    items_file.write_text("\n".join(forgotten_items) + "\n")
    args = {"--items": ["--items", str(items_file)], "--all": ["--all"],
            "--failed": ["--failed"]}[what]
    expected_done = {"--items": done_before - set(forgotten_items), "--all": set(),
                     "--failed": done_before}[what]
    # how long a whole forget takes here, to aim the kills at all of it
    out = tmp_path / "timing"
    shutil.copytree(base, out)
    started = time.monotonic()
    proc = _forget_cli(str(out), *args)
    assert proc.wait(60) == 0, proc.stderr.read()
    proc.stderr.close()
    whole = time.monotonic() - started
    outcomes = {"before": 0, "after": 0}
    for rep in range(12):
        out = tmp_path / f"rep{rep}"
        shutil.copytree(base, out)
        proc = _forget_cli(str(out), *args)
        try:
            proc.wait(rng.uniform(0.3, 1.1) * whole)
        except subprocess.TimeoutExpired:
            pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
        snap = nbmplock.read_snapshot(str(out))
        assert snap.holder_pid is None
        done = read_done(str(out))
        failures = {f.item for f in snap.failures}
        if done == done_before and (what != "--failed" or failures == failed):
            outcomes["before"] += 1
        else:
            assert done == expected_done, f"a half-done forget (rep {rep})"
            outcomes["after"] += 1
        if what == "--failed" or done == done_before:
            assert failures in (failed, set()), failures
        # a resume runs exactly what is not done
        summary = nbmplock.mp_lock(ITEMS, helpers.echo, None, 2, str(out), verbose=False)
        assert summary.done == len(ITEMS) - len(done)
        assert read_done(str(out)) == set(ITEMS)
        shutil.rmtree(out)
    print(f"forget {what}: {outcomes} (a whole forget takes {whole * 1000:.0f} ms)")


@pytest.mark.timeout(120)
def test_a_sigkill_during_job_forget_loses_nothing(tmp_path):
    """``job.forget(...)`` in a process SIGKILLed at random instants while it forgets."""
    rng = random.Random(int(os.environ.get("NBMPLOCK_FAULT_SEED", "17")))
    base = tmp_path / "base"
    nbmplock.mp_lock(ITEMS, helpers.echo, None, 2, str(base), verbose=False)
    script = tmp_path / "forget.py"
    script.write_text(textwrap.dedent("""
        import sys
        import nbmplock
        from tests import helpers
        items = [f"k{i:05d}" for i in range(3000)]
        job = nbmplock.Job(items, helpers.echo, sys.argv[1], num_procs=1)
        print("READY", flush=True)
        job.forget(items[:2000])
        print("FORGOT", flush=True)
    """))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    outcomes = {"before": 0, "after": 0}
    for rep in range(10):
        out = tmp_path / f"rep{rep}"
        shutil.copytree(base, out)
        proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
        assert proc.stdout.readline().startswith(b"READY")
        time.sleep(rng.uniform(0.0, 0.006))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
        done = read_done(str(out))
        assert nbmplock.read_snapshot(str(out)).holder_pid is None
        if done == set(ITEMS):
            outcomes["before"] += 1
        else:
            assert done == set(ITEMS[2000:]), f"a half-done forget (rep {rep})"
            outcomes["after"] += 1
        summary = nbmplock.mp_lock(ITEMS, helpers.echo, None, 2, str(out), verbose=False)
        assert summary.done == len(ITEMS) - len(done)
        shutil.rmtree(out)
    print(f"job.forget: {outcomes}")
