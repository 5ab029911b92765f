"""A Jupyter kernel restarted in the middle of a run (issue 12, case 6).

The kernel is started and restarted through ``jupyter_client``, the way the
Jupyter server does it for the Kernel menu's "Restart Kernel": a
``shutdown_request`` with ``restart=True``, then a new kernel. ipykernel
SIGTERMs the children in its process group while it shuts down, and the
interpreter exits. Expected: the job stops as a Force stop would, no worker
of the old kernel survives it by more than a second, nothing is recorded as
failed, no item starts after the restart, the run records that it stopped,
and the same cell in the new kernel resumes and finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections import Counter

import psutil
import pytest

import nbmplock

from .helpers import dump_stacks

jupyter_client = pytest.importorskip("jupyter_client")

N_ITEMS = 4000

CELL = """
import json, os, time
import nbmplock

LEDGER = {ledger!r}

def work(item, shared_data, init_values):
    with open(os.path.join(LEDGER, f"started-{{os.getpid()}}.jsonl"), "a") as f:
        f.write(json.dumps([time.time(), item]) + "\\n")
    time.sleep(float(os.environ.get("ITEM_SECONDS", "0.05")))
    return item

def save(output_filepath, data_results, data_names):
    with open(output_filepath + ".jsonl", "a") as f:
        f.write("".join(json.dumps(n) + "\\n" for n in data_names))

items = [f"k{{i:05d}}" for i in range({n})]
job = nbmplock.run(items, work, {out!r}, num_procs=2, save_callback=save, save_batch=5)
"""


def _execute(kc, code: str, timeout: float = 120) -> None:
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=lambda msg: None)
    assert reply["content"]["status"] == "ok", reply["content"]


def _kernel_pid(km) -> int:
    provisioner = getattr(km, "provisioner", None)
    process = getattr(provisioner, "process", None) or getattr(km, "kernel", None)
    return process.pid


def _explain_hang(pid: int | None, why: str) -> None:
    """A hang must explain itself: the kernel's thread stacks (py-spy), then ours."""
    spy = shutil.which("py-spy")
    if pid is not None and spy and psutil.pid_exists(pid):
        out = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True,
                             timeout=30)
        print(f"=== py-spy dump of the kernel (pid {pid}) ===\n{out.stdout}{out.stderr}")
    dump_stacks(why)


def _started(ledger) -> list[tuple[float, str]]:
    rows = []
    for name in os.listdir(ledger):
        if name.startswith("started-"):
            with open(os.path.join(ledger, name), encoding="utf-8") as f:
                rows += [tuple(json.loads(line)) for line in f if line.endswith("\n")]
    return rows


@pytest.mark.timeout(240)
def test_kernel_restart_stops_the_job_like_a_force_stop_and_the_cell_resumes(
        tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    out, ledger = tmp_path / "run", tmp_path / "ledger"
    ledger.mkdir()
    cell = CELL.format(ledger=str(ledger), out=str(out), n=N_ITEMS)
    km, kc = jupyter_client.manager.start_new_kernel(kernel_name="python3",
                                                     startup_timeout=120)
    kernel_pid = None
    try:
        kernel_pid = _kernel_pid(km)
        _execute(kc, cell)
        deadline = time.monotonic() + 60
        while nbmplock.read_snapshot(str(out)).done < 40:
            if time.monotonic() > deadline:
                _explain_hang(kernel_pid, "the job made no progress")
                pytest.fail("the job made no progress in the kernel")
            time.sleep(0.05)
        workers = [p.pid for p in psutil.Process(kernel_pid).children(recursive=True)
                   if "nbmplock" in " ".join(p.cmdline()) or p.name().startswith("python")]
        assert workers, "no worker process found under the kernel"

        km.restart_kernel(now=False)  # what the Kernel menu's "Restart Kernel" does
        confirmed = time.time()
        gone, alive = psutil.wait_procs([psutil.Process(p) for p in workers
                                         if psutil.pid_exists(p)], timeout=1.0)
        if alive:
            _explain_hang(None, "workers of the old kernel survive the restart")
        assert not alive, f"workers of the old kernel survive the restart: {alive}"

        snap = nbmplock.read_snapshot(str(out))
        assert snap.failures == (), [f"{f.item}: {f.summary()}" for f in snap.failures]
        assert snap.holder_pid is None
        assert snap.last_end is not None and snap.last_end["status"] == "stopped", snap.last_end
        started = _started(ledger)
        late = [item for t, item in started if t > confirmed]
        assert not late, f"{len(late)} items started after the restart was confirmed"
        done_at_restart = snap.done
        assert 40 <= done_at_restart < N_ITEMS

        # The same cell in the new kernel resumes where the old one stopped.
        kc.wait_for_ready(timeout=60)
        kernel_pid = _kernel_pid(km)
        _execute(kc, "import os; os.environ['ITEM_SECONDS'] = '0.001'")  # the rest, quickly
        _execute(kc, cell)
        _execute(kc, "assert job.wait(180), job.progress\n"
                     "assert job.state.value == 'finished', (job.state, job.error)\n"
                     f"assert job.progress.done_before == {done_at_restart}, job.progress\n",
                 timeout=200)
    except BaseException:
        _explain_hang(kernel_pid, "the kernel restart test failed")
        raise
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)

    with open(out / "data.jsonl", encoding="utf-8") as f:
        saved = Counter(json.loads(line) for line in f)
    assert set(saved) == {f"k{i:05d}" for i in range(N_ITEMS)}
    started_before = {item for t, item in started}
    twice = {item for item, n in saved.items() if n > 1}
    # saved twice only if it was in flight (started, not recorded done) at the restart
    assert twice <= started_before, sorted(twice - started_before)[:5]
    assert len(twice) <= 2 * 2 * 10 + 5 + 2 * 10  # in flight + unsaved, see test_kill_loop
