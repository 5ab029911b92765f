"""Issue 6, item 7: two processes start on one ``out_path`` at the same instant.

Both drivers import, report READY, and spin on a barrier file; the test then
creates the file, so both call ``mp_lock`` within a fraction of a millisecond.
Exactly one runs; the other raises :class:`nbmplock.RunLockedError` naming the
winner's pid, having run and saved nothing; the log scans cleanly. The same
``out_path`` is reused every repetition, so the lock file always holds the
pid of an earlier, dead winner when the race starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter

import pytest

import nbmplock
from nbmplock import _read

from . import driver
from .helpers import FIGURES, Driver, Ledger


def ident(item, shared_data, init_values):
    return item


@pytest.mark.timeout(240)
def test_two_writers_at_the_same_instant(tmp_path):
    reps = int(os.environ.get("NBMPLOCK_TWO_WRITER_REPS", "15"))
    out = tmp_path / "out"
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    for rep in range(reps):
        barrier = tmp_path / f"go-{rep}"
        tag = f"w{rep}-"
        cfg = dict(out=str(out), ledger=str(ledger_dir), n_items=300, tag=tag, workers=1,
                   chunk_size=4, save_batch=5, work_ms=[2.0, 4.0], barrier=str(barrier))
        runs = (2 * rep, 2 * rep + 1)
        items = driver.make_items(300, tag)
        done_before = _read.read_contents(str(out)).done if out.exists() else set()
        procs = [Driver(dict(cfg, run=r), ledger_dir) for r in runs]
        try:
            for p in procs:
                p.wait_ready()
            tmp = barrier.with_suffix(".tmp")
            tmp.write_bytes(b"go")
            os.replace(tmp, barrier)
            codes = [p.finish(timeout=120) for p in procs]
        finally:
            for p in procs:
                p.close()
        statuses = [json.loads(
            (ledger_dir / f"status-r{r:04d}.json").read_text()) for r in runs]
        kinds = sorted(s["status"] for s in statuses)
        assert kinds == ["locked", "ran"], (rep, statuses, [p.stderr() for p in procs])
        winner = next(s for s in statuses if s["status"] == "ran")
        loser_index = next(i for i, s in enumerate(statuses) if s["status"] == "locked")
        loser = statuses[loser_index]
        assert sorted(codes) == [0, 3], codes
        # (the loser may read the lock file while the winner is between its flock and
        # writing its pid: 12 of 40 repetitions named no pid before 40f894e)
        assert loser["holder"] == winner["pid"], (
            f"rep {rep}: RunLockedError names pid {loser['holder']}, the holder is "
            f"{winner['pid']}: {loser['message']}")
        assert f"process {winner['pid']}" in loser["message"]
        snap = nbmplock.read_snapshot(str(out))
        assert snap.torn_bytes == 0 and snap.holder_pid is None
        led = Ledger(ledger_dir)
        assert set(items) <= _read.read_contents(str(out)).done
        # ("" and "  edge spaces  " are in every repetition's list: done in the first)
        assert led.saved[runs[1 - loser_index]] == Counter(set(items) - done_before)
        assert not led.processed.get(runs[loser_index]), "the refused run processed items"
        assert not led.saved.get(runs[loser_index]), "the refused run saved items"
    FIGURES.add("two_writer_races", reps)
    FIGURES.add("faults_injected", reps)


_HOLDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("LOCKED", flush=True)
time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_lock_error_names_the_live_holder_even_before_it_wrote_its_pid(tmp_path):
    """The holder has its flock but has not yet replaced the stale pid in the lock file.

    RunLockedError named the earlier, dead holder (or none) here (fixed in 40f894e).
    """
    out = tmp_path / "out"
    nbmplock.mp_lock(["a"], ident, None, 1, str(out),
                     verbose=False)  # leaves this process's pid in the lock file
    lock = out / _read.STATE_DIR / "lock"
    lock.write_text("999999 gone-host 0\n")  # an earlier holder, long dead
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock)],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().startswith(b"LOCKED")
        # the holder is now exactly where a winning RunStore.open is between flock and pwrite
        with pytest.raises(nbmplock.RunLockedError) as info:
            nbmplock.mp_lock(["a", "b"], ident, None, 1, str(out), verbose=False)
        assert info.value.pid == holder.pid, str(info.value)
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()


@pytest.mark.timeout(30)
def test_lock_of_a_killed_run_does_not_block(tmp_path):
    """A process holding the flock is SIGKILLed: the kernel drops its lock at once."""
    out = tmp_path / "out"
    (out / _read.STATE_DIR).mkdir(parents=True)
    lock = out / _read.STATE_DIR / "lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(lock)],
                              stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().startswith(b"LOCKED")
        assert _read.lock_holder(str(out)) is not None
        with pytest.raises(nbmplock.RunLockedError):
            nbmplock.mp_lock(["a"], ident, None, 1,
                             str(out), verbose=False)
    finally:
        holder.kill()
        holder.wait(10)
        holder.stdout.close()
    started = time.monotonic()
    assert nbmplock.mp_lock_value(["a"], ident, None, 1, str(out),
                                  verbose=False) == ["a"]
    assert time.monotonic() - started < 10
    FIGURES.add("faults_injected")
