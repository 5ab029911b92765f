"""When the work changes: say so, and let the user choose what "done" means (issue 17)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import nbmplock
from nbmplock import WorkChangedError, mp_lock, mp_lock_batch, mp_lock_value
from nbmplock._read import read_contents, read_done

from . import helpers

ITEMS = [f"c{i:03d}" for i in range(40)]


def _log(shared, item):
    with open(shared["ledger"], "a", encoding="utf-8") as f:
        f.write(item + "\n")


def work_v1(item, shared_data, init_values):
    _log(shared_data, item)
    return f"v1:{item}:{init_values.get('model')}:{shared_data.get('threshold')}"


def work_v2(item, shared_data, init_values):
    _log(shared_data, item)
    return f"v2:{item}:{init_values.get('model')}:{shared_data.get('threshold')}"


def batch_work(items, shared_data, init_values):
    return [work_v1(i, shared_data, init_values) for i in items]


def init_a(shared_data):
    return {"model": "a"}


def init_b(shared_data):
    return {"model": "b"}


def ran(tmp_path) -> list[str]:
    path = tmp_path / "ledger"
    return path.read_text().splitlines() if path.exists() else []


# change kind -> (first call's overrides, second call's overrides, words of the message)
CHANGES = {
    "process": ({}, {"process": work_v2}, "the process function changed"),
    "init_function": ({"init_function": init_a}, {"init_function": init_b},
                      "init_function (or what it uses) changed"),
    "shared_data": ({"threshold": 1}, {"threshold": 2}, "shared_data changed"),
    "batch_size": ({"batch_size": 2}, {"batch_size": 4}, "batch_size changed (2 -> 4)"),
}


def _call(tmp_path, api, overrides, on_change, caplog=None):
    shared = {"ledger": str(tmp_path / "ledger"), "threshold": overrides.get("threshold", 0)}
    kwargs = dict(shared_data=shared, init_function=overrides.get("init_function"),
                  verbose=False, on_change=on_change)
    out = str(tmp_path / "run")
    if "batch_size" in overrides:
        return mp_lock_batch(ITEMS, batch_work, None, 2, out, overrides["batch_size"], **kwargs)
    return api(ITEMS, overrides.get("process", work_v1), None, 2, out, **kwargs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("on_change", ["warn", "error", "rerun"])
@pytest.mark.parametrize("kind", sorted(CHANGES))
def test_each_change_kind_under_each_on_change(tmp_path, caplog, kind, on_change):
    first, second, words = CHANGES[kind]
    _call(tmp_path, mp_lock_value, first, "warn")
    assert len(ran(tmp_path)) == len(ITEMS)
    log_before = (tmp_path / "run" / ".nbmplock" / "log").read_bytes()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nbmplock"):
        if on_change == "error":
            with pytest.raises(WorkChangedError) as info:
                _call(tmp_path, mp_lock_value, second, on_change)
            assert words in str(info.value) and "on_change='rerun'" in str(info.value)
            assert (tmp_path / "run" / ".nbmplock" / "log").read_bytes() == log_before
            assert len(ran(tmp_path)) == len(ITEMS), "nothing may run"
            return
        result = _call(tmp_path, mp_lock_value, second, on_change)
    assert words in caplog.text
    if on_change == "warn":
        assert len(ran(tmp_path)) == len(ITEMS), "warn keeps done items done"
    else:
        assert len(ran(tmp_path)) == 2 * len(ITEMS), "rerun runs them again"
        if kind != "batch_size":
            assert result == _call_expected(second)
    # the third call, unchanged: nothing runs again
    _call(tmp_path, mp_lock_value, second, on_change)
    assert len(ran(tmp_path)) == len(ITEMS) * (1 if on_change == "warn" else 2)


def _call_expected(overrides):
    fn = overrides.get("process", work_v1)
    init = overrides.get("init_function")
    values = init({}) if init else {}
    shared = {"ledger": os.devnull, "threshold": overrides.get("threshold", 0)}
    return [fn(i, shared, values) for i in ITEMS]


_SCRIPT = """
import sys
import nbmplock
THRESHOLD = {threshold}
def helper(x):
    return x * THRESHOLD
def process(item, shared_data, init_values):
    return helper(len(item))
if __name__ == "__main__":
    r = nbmplock.mp_lock_value([str(i) for i in range(20)], process, None, 2, sys.argv[1],
                               verbose=False, on_change=sys.argv[2])
    print(sum(r))
"""


@pytest.mark.timeout(120)
def test_a_changed_notebook_value_the_function_uses_is_a_change(tmp_path):
    """The function's source is the same; a global of __main__ it uses changed."""
    out = str(tmp_path / "run")

    def run(threshold, on_change):
        script = tmp_path / f"s{threshold}.py"
        script.write_text(textwrap.dedent(_SCRIPT.format(threshold=threshold)))
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        return subprocess.run([sys.executable, str(script), out, on_change], env=env,
                              capture_output=True, text=True, timeout=100)

    first = run(1, "warn")
    assert first.returncode == 0 and first.stdout.strip() == str(10 + 10 * 2), first.stderr
    warned = run(3, "warn")
    assert "the process function 'process' (or a function or value of the notebook it uses)" \
           " changed" in warned.stderr
    assert warned.stdout.strip() == first.stdout.strip()  # warn: the old results stay
    rerun = run(3, "rerun")
    assert rerun.stdout.strip() == str(3 * (10 + 10 * 2)), rerun.stderr


@pytest.mark.timeout(60)
def test_forget_items_failures_and_everything(tmp_path):
    shared = {"ledger": str(tmp_path / "ledger")}
    out = str(tmp_path / "run")
    job = nbmplock.Job(ITEMS, helpers.fail_on_seven, out, num_procs=2)
    job.start()
    helpers.wait_job(job)
    assert job.progress.failed == 4 and job.progress.done == 36
    job.forget(failed=True)
    assert job.progress.failed == 0 and job.failures == ()
    job.forget(ITEMS[:5])
    assert job.progress.done == 31
    assert not set(ITEMS[:5]) & read_done(out)
    job.forget(all=True)
    assert job.progress.done == 0 and read_done(out) == set()
    summary = mp_lock(ITEMS, work_v1, None, 2, out, shared_data=shared, verbose=False)
    assert summary.done == 40 and len(ran(tmp_path)) == 40
    with pytest.raises(nbmplock.InvalidArgumentsError, match="Invalid items"):
        job.forget(["not-an-item"])
    with pytest.raises(nbmplock.InvalidArgumentsError, match="Invalid forget"):
        job.forget()


@pytest.mark.timeout(60)
def test_forget_from_the_command_line(tmp_path):
    out = str(tmp_path / "run")
    mp_lock(ITEMS, helpers.echo, None, 2, out, verbose=False)
    items_file = tmp_path / "items.txt"
    items_file.write_text("\n".join(ITEMS[:3]) + "\n")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "nbmplock", "forget", out, *args],
                              capture_output=True, text=True, timeout=60)

    result = cli("--items", str(items_file))
    assert result.returncode == 0 and "forgot 3 items" in result.stdout
    assert read_done(out) == set(ITEMS[3:])
    # keys the run directory does not hold are named, and forget nothing
    items_file.write_text("no-such-key\n" + ITEMS[3] + "\n")
    result = cli("--items", str(items_file))
    assert result.returncode == 0 and "forgot 1 item:" in result.stdout
    assert "1 of the 2 keys are neither done nor failed" in result.stderr
    items_file.write_text("no-such-key\n")
    assert cli("--items", str(items_file)).returncode == 1
    assert read_done(out) == set(ITEMS[4:])
    assert cli("--all").returncode == 0 and read_done(out) == set()
    assert cli().returncode == 2  # one of --failed, --all, --items is required
    # int items: a line "7" is the item 7 (keyed as an int, not as the text "7")
    ints = str(tmp_path / "ints")
    mp_lock(list(range(10)), helpers.echo, None, 2, ints, verbose=False)
    items_file.write_text("7\n 8\nx\n")
    result = subprocess.run([sys.executable, "-m", "nbmplock", "forget", ints, "--items",
                             str(items_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "forgot 2 items" in result.stdout, result.stderr
    assert "1 of the 3 keys" in result.stderr
    assert mp_lock(list(range(10)), helpers.echo, None, 2, ints, verbose=False).done == 2


@pytest.mark.timeout(120)
def test_a_kill_during_forget_loses_nothing(tmp_path):
    """The FORGET record is one append: torn at any byte, it simply did not happen."""
    base = tmp_path / "base"
    mp_lock(ITEMS, helpers.echo, None, 2, str(base), verbose=False)
    log = base / ".nbmplock" / "log"
    before = log.stat().st_size
    nbmplock._store.forget_in(str(base), keys=ITEMS[:10])
    after = log.stat().st_size
    for cut in range(before, after + 1):
        out = tmp_path / f"cut{cut}"
        shutil.copytree(base, out)
        os.truncate(out / ".nbmplock" / "log", cut)
        done = read_done(str(out))
        assert done == (set(ITEMS[10:]) if cut == after else set(ITEMS)), cut
        summary = mp_lock(ITEMS, helpers.echo, None, 1, str(out), verbose=False)
        assert summary.done == (10 if cut == after else 0)
        shutil.rmtree(out)


def _no_value_process(item, shared_data, init_values):
    _log(shared_data, item)
    return item.upper()


@pytest.mark.timeout(60)
def test_values_never_kept_are_computed_again(tmp_path, caplog):
    """mp_lock kept no values; mp_lock_value on the same directory used to return None."""
    shared = {"ledger": str(tmp_path / "ledger")}
    out = str(tmp_path / "run")
    mp_lock(ITEMS, _no_value_process, None, 2, out, shared_data=shared, verbose=False)
    assert nbmplock.is_mp_lock_completed(ITEMS, out)
    with caplog.at_level(logging.WARNING, logger="nbmplock"):
        values = mp_lock_value(ITEMS, _no_value_process, None, 2, out, shared_data=shared,
                               verbose=False)
    assert values == [i.upper() for i in ITEMS]
    assert len(ran(tmp_path)) == 80
    assert "kept no results" in caplog.text and "run again for their values" in caplog.text
    assert nbmplock.is_mp_lock_completed(ITEMS, out)
    assert mp_lock_value(ITEMS, _no_value_process, None, 2, out, shared_data=shared,
                         verbose=False) == values
    assert len(ran(tmp_path)) == 80
    assert len(read_contents(out, results=True).results) == len(ITEMS)


def test_values_never_kept_are_said_in_the_summary_and_the_panel(tmp_path):
    """Issue 17: not only in the log: the summary and the panel say it too."""
    from nbmplock._panel import Panel

    out = str(tmp_path / "run")
    mp_lock(ITEMS, helpers.echo, None, 2, out, verbose=False)
    job = nbmplock.Job(ITEMS, helpers.echo, out, num_procs=2, keep_results=True)
    panel = Panel(job)
    try:
        job.start()
        assert job.wait(60)
        assert "run again for their values" in str(job.summary)
        assert job.results() == ITEMS
        deadline = time.monotonic() + 10
        while "run again for their values" not in panel.message.value:
            assert time.monotonic() < deadline, panel.message.value
            time.sleep(0.05)
    finally:
        panel.close()


@pytest.mark.timeout(60)
def test_the_change_shows_in_the_bar_and_the_panel(tmp_path, capsys):
    shared = {"ledger": str(tmp_path / "ledger")}
    out = str(tmp_path / "run")
    mp_lock(ITEMS[:5], work_v1, None, 1, out, shared_data=shared, verbose=False)
    mp_lock(ITEMS, work_v2, None, 1, out, shared_data=shared, verbose=True)
    assert "resuming, but the process function changed (work_v1 -> work_v2)" in \
        capsys.readouterr().out
    pytest.importorskip("ipywidgets")
    job = nbmplock.Job(ITEMS, work_v1, out, shared_data=shared, num_procs=1)
    job.start()
    helpers.wait_job(job)
    assert "the process function changed (work_v2 -> work_v1)" in " ".join(
        job.fingerprint_changes)
