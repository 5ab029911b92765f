"""``%%mplock`` through a real IPython shell (``IPython.testing.globalipapp``)."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest
from IPython.core.error import UsageError
from IPython.testing import globalipapp

import nbmplock
from nbmplock import InvalidArgumentsError, Job, JobState
from nbmplock._magic import MplockMagics

from .helpers import alive_children

WAIT = 120  # seconds; a safety net against a hang, never a measurement

GATED = """\
import os, time
def process(item, shared_data, init_values):
    while not os.path.exists(shared_data["gate"]):
        time.sleep(0.005)
    return item
"""


def eventually(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


@pytest.fixture
def ip(tmp_path):
    """The test shell with the extension loaded; the names a test adds are removed after it."""
    globalipapp.start_ipython()
    shell = globalipapp.get_ipython()
    shell.run_line_magic("load_ext", "nbmplock")
    before = set(shell.user_ns)
    shell.user_ns["items"] = [str(i) for i in range(50)]
    shell.user_ns["gate"] = str(tmp_path / "gate")
    yield shell
    open(shell.user_ns["gate"], "a").close()
    for name in set(shell.user_ns) - before:
        value = shell.user_ns.pop(name)
        if isinstance(value, Job):
            if value.state is JobState.RUNNING:
                value.stop(force=True)
            assert value.wait(WAIT)
    gone, alive = psutil.wait_procs(alive_children(), timeout=10)
    assert alive == [], f"worker processes left behind: {alive}"


def test_picks_process_among_helpers(ip, tmp_path):
    out = tmp_path / "run"
    ip.run_cell_magic("mplock", f"items --out {out} --procs 2 --into doubled --wait", """\
def helper(text):
    return text * 2

def process(item, shared_data, init_values):
    return helper(item)
""")
    assert ip.user_ns["doubled"] == [str(i) * 2 for i in range(50)]
    job = ip.user_ns["mplock_job"]
    assert isinstance(job, Job) and job.state is JobState.FINISHED
    assert nbmplock.read_snapshot(str(out)).done == 50


def test_picks_the_only_function(ip, tmp_path):
    ip.run_cell_magic("mplock", f"items --out {tmp_path / 'run'} --procs 2 --into shouted --wait",
                      "from os.path import basename\n"  # imported, not defined: not a candidate
                      "def shout(item, shared_data, init_values):\n"
                      "    return basename(item) + '!'\n")
    assert ip.user_ns["shouted"] == [f"{i}!" for i in range(50)]


def test_several_functions_is_an_error_naming_them(ip, tmp_path):
    with pytest.raises(UsageError, match=r"several functions \(first, second\).*`process`"):
        ip.run_cell_magic("mplock", f"items --out {tmp_path / 'run'}",
                          "def first(item, s, i):\n    return 1\n"
                          "def second(item, s, i):\n    return 2\n")
    assert "mplock_job" not in ip.user_ns
    assert not (tmp_path / "run").exists()


def test_no_function_is_an_error_naming_what_was_set(ip, tmp_path):
    with pytest.raises(UsageError, match=r"defined no function \(it set: answer\)"):
        ip.run_cell_magic("mplock", f"items --out {tmp_path / 'run'}", "answer = 42\n")


def test_into_without_wait_is_filled_when_the_run_finishes(ip, tmp_path):
    ip.user_ns["items"] = [f"item-{i}" for i in range(300)]
    ip.run_cell_magic("mplock", f"items --out {tmp_path / 'run'} --procs 2 --into lengths",
                      "def process(item, shared_data, init_values):\n    return len(item)\n")
    job = ip.user_ns["mplock_job"]
    assert job.wait(WAIT)
    eventually(lambda: "lengths" in ip.user_ns, "--into filled")
    assert ip.user_ns["lengths"] == [len(f"item-{i}") for i in range(300)]


def test_wait_blocks_until_the_run_ends_and_job_names_the_variable(ip, tmp_path):
    ip.run_cell_magic("mplock", f"items --out {tmp_path / 'run'} --procs 2 --job embed --wait",
                      "def process(item, shared_data, init_values):\n    return item\n")
    job = ip.user_ns["embed"]
    assert "mplock_job" not in ip.user_ns
    assert job.state is JobState.FINISHED and job.progress.done == 50
    assert job.out_path == str(tmp_path / "run")


def test_wait_reraises_with_errors_raise(ip, tmp_path):
    with pytest.raises(ValueError, match="no sevens"):
        ip.run_cell_magic("mplock", f"items --out {tmp_path / 'run'} --procs 2 --errors raise "
                          "--wait",
                          "def process(item, shared_data, init_values):\n"
                          "    if item.endswith('7'):\n"
                          "        raise ValueError('no sevens: ' + item)\n"
                          "    return item\n")
    assert ip.user_ns["mplock_job"].state is JobState.FAILED


def test_rerunning_the_cell_reattaches_to_the_live_run(ip, tmp_path):
    ip.user_ns["cfg"] = {"gate": ip.user_ns["gate"]}
    line = f"items --out {tmp_path / 'run'} --procs 2 --shared cfg --into got"
    ip.run_cell_magic("mplock", line, GATED)
    job = ip.user_ns["mplock_job"]
    assert job.state is JobState.RUNNING and not job.reattached

    ip.run_cell_magic("mplock", line, GATED)
    assert ip.user_ns["mplock_job"] is job
    assert job.reattached and job.state is JobState.RUNNING

    open(ip.user_ns["gate"], "a").close()
    assert job.wait(WAIT)
    eventually(lambda: "got" in ip.user_ns, "--into filled")
    assert ip.user_ns["got"] == ip.user_ns["items"]
    assert job.progress.done == 50  # one run, not two


def test_bad_arguments_give_clear_errors(ip, tmp_path):
    body = "def process(item, shared_data, init_values):\n    return item\n"
    out = tmp_path / "run"
    with pytest.raises(InvalidArgumentsError, match=r"Invalid num_procs\. Expected values"):
        ip.run_cell_magic("mplock", f"items --out {out} --procs 0", body)
    with pytest.raises(InvalidArgumentsError, match=r"Invalid data_list"):
        ip.run_cell_magic("mplock", f"[object()] --out {out}", body)
    with pytest.raises(UsageError, match="--out"):
        ip.run_cell_magic("mplock", "items --procs 2", body)
    with pytest.raises(UsageError, match="invalid choice"):
        ip.run_cell_magic("mplock", f"items --out {out} --errors ignore", body)
    with pytest.raises(UsageError, match=r"cannot evaluate items 'missing_name'.*NameError"):
        ip.run_cell_magic("mplock", f"missing_name --out {out}", body)
    with pytest.raises(UsageError, match=r"cannot evaluate --init 'no_such_init'"):
        ip.run_cell_magic("mplock", f"items --out {out} --init no_such_init", body)
    with pytest.raises(UsageError, match=r"--into needs a variable name"):
        ip.run_cell_magic("mplock", f"items --out {out} --into 1x", body)
    assert "mplock_job" not in ip.user_ns


def test_init_shared_save_and_a_quoted_items_expression(ip, tmp_path):
    out = tmp_path / "run"
    ip.user_ns["cfg"] = {"suffix": "!"}
    ip.run_cell(
        "def load(shared_data):\n"
        "    return {'prefix': '>'}\n"
        "saved = []\n"
        "def save(output_filepath, data_results, data_names):\n"
        "    saved.extend(zip(data_names, data_results))\n")
    ip.run_cell_magic(
        "mplock",
        f'"[str(i) for i in range(30)]" --out {out} --procs 2 --init load --shared cfg '
        "--save save --save-batch 4 --retries 1 --timeout 60 --into res --wait",
        "def process(item, shared_data, init_values):\n"
        "    return init_values['prefix'] + item + shared_data['suffix']\n")
    expected = [f">{i}!" for i in range(30)]
    assert ip.user_ns["res"] == expected
    assert sorted(ip.user_ns["saved"]) == sorted(zip(map(str, range(30)), expected))
    assert ip.user_ns["mplock_job"].spec.options.save_batch == 4


def test_ctrl_c_during_wait_stops_cleanly_and_the_cell_resumes(ip, tmp_path, caplog,
                                                                default_sigint):
    out = tmp_path / "run"
    ip.user_ns["items"] = [str(i) for i in range(2000)]
    ip.user_ns["cfg"] = {"gate": ip.user_ns["gate"]}
    body = ("import os, time\n"
            "def process(item, shared_data, init_values):\n"
            "    if int(item) >= 1990:  # the last items wait for the gate\n"
            "        while not os.path.exists(shared_data['gate']):\n"
            "            time.sleep(0.005)\n"
            "    return item\n")
    line = f"items --out {out} --procs 2 --shared cfg --wait"
    ip.user_ns["mplock_job"] = None
    sent = []

    def interrupt_when_half_done():
        def ready():
            job = ip.user_ns.get("mplock_job")
            return job is not None and job.progress.done >= 1000
        try:
            eventually(ready, "1000 items done")
        except AssertionError:
            open(ip.user_ns["gate"], "a").close()  # never leave the magic blocked
            raise
        sent.append(True)
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C / "interrupt kernel" sends

    sender = threading.Thread(target=interrupt_when_half_done, daemon=True)
    sender.start()
    with pytest.raises(KeyboardInterrupt):  # the cell stays interrupted ("Run all" stops)
        ip.run_cell_magic("mplock", line, body)
    sender.join()
    assert sent

    job = ip.user_ns["mplock_job"]
    assert job.state is JobState.STOPPED
    assert alive_children() == []
    p = job.progress
    assert 1000 <= p.done < 2000 and p.failed == 0  # the killed items stay not done
    assert nbmplock.read_snapshot(str(out)).done == p.done
    err = caplog.text
    assert "interrupted" in err and "mplock_job.resume()" in err
    assert f"{p.done} of 2000 items are recorded done" in err

    stopped_at = p.done
    open(ip.user_ns["gate"], "a").close()
    ip.run_cell_magic("mplock", line, body)
    job = ip.user_ns["mplock_job"]
    p = job.progress
    assert job.state is JobState.FINISHED
    assert (p.done, p.done_before) == (2000, stopped_at)


def test_help_explains_the_magic(ip):
    doc = ip.find_cell_magic("mplock").__doc__
    assert doc == MplockMagics.mplock.__doc__
    for text in ("%%mplock", "--out OUT_PATH", "--into VAR", "--wait", "Example",
                 "def process(item, shared_data, init_values)"):
        assert text in doc


def test_start_method_option_and_static_output_of_a_waited_cell(ip, tmp_path, monkeypatch):
    """Issue 13, item 10: no --start-method; an exported notebook kept 'running, 0/12 done'."""
    from nbmplock import _magic

    shown = []

    class Handle:
        def update(self, obj):
            shown.append(("update", obj.status_text(), obj._repr_mimebundle_()["text/plain"]))

    def display(obj, display_id=None):
        shown.append(("display", obj._repr_mimebundle_()["text/plain"]))
        return Handle()

    monkeypatch.setattr(_magic, "display", display)
    ip.run_cell_magic("mplock", f"items --out {tmp_path / 'run'} --procs 2 "
                      "--start-method fork --wait",
                      "def process(item, shared_data, init_values):\n    return item\n")
    job = ip.user_ns["mplock_job"]
    assert job.spec.options.start_method == "fork" and job.state is JobState.FINISHED
    (kind, first), (kind2, final_status, final_text) = shown
    assert kind == "display" and "live panel: open the notebook in Jupyter" in first
    assert kind2 == "update" and "finished" in final_status and "50/50 done" in final_text
    assert "live panel" not in final_text


def test_concurrency_rate_limit_and_retries_from_the_magic_with_an_async_cell(ip, tmp_path):
    out = tmp_path / "run"
    began = time.monotonic()
    ip.run_cell_magic("mplock", f"items --out {out} --procs 1 --concurrency 8 --rate-limit 100/s "
                      "--retry-delay 0.1 --retries 2 --retry-on ValueError --into got --wait",
                      """\
import asyncio

async def process(item, shared_data, init_values):
    await asyncio.sleep(0.05)
    return item + "!"
""")
    assert ip.user_ns["got"] == [f"{i}!" for i in range(50)]
    job = ip.user_ns["mplock_job"]
    opts = job.spec.options
    assert time.monotonic() - began >= 49 / 100
    assert (opts.concurrency, opts.rate_limit, opts.retry_delay, opts.retry_on) == (
        8, 100.0, 0.1, (ValueError,))
