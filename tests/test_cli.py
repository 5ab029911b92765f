"""python -m nbmplock: status and failures, also during a live run."""

from __future__ import annotations

import subprocess
import sys

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


def test_status_during_a_live_run(tmp_path):
    out = str(tmp_path)
    job = Job([f"s{n}" for n in range(200)], helpers.slow, out, num_procs=1,
              shared_data={"sleep": 0.05})
    job.start()
    try:
        status = _cli("status", out)
        import os
        assert f"live run:      yes, pid {os.getpid()}" in status.stdout
    finally:
        job.stop()
        job.wait()


def test_not_a_run_directory(tmp_path):
    result = _cli("status", str(tmp_path))
    assert result.returncode == 2 and "not an nbmplock run directory" in result.stderr
