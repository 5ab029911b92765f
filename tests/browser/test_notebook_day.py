"""A notebook user's day in a real JupyterLab (headless Chromium), issue 19.

1. **Kernel restart mid-run**, from JupyterLab's own Kernel menu.
2. **Interrupt kernel** (the toolbar's ■) during a ``%%mplock ... --wait`` cell.
3. **A busy kernel**: another cell sleeps 5 s while a job runs in the background.
4. **Reload the page** during a run.

(Scenario 5, Notebook 7, is the parametrized test in ``test_panel_browser.py``; 6, the
oldest ipykernel and ipywidgets, is ``test_oldest_versions.py``.)

Jobs are small (items of 20 ms, 2 workers) so each scenario stays under about a minute
on two slow cores. Each test's notebook appends every item its ``save_callback`` got to
``<run>/data.jsonl``; the restart test's ``process`` also appends every call to
``<run>.calls.jsonl``, so "which item ran twice" is known, not guessed. Screenshots of
the key moments go to ``artifacts/<scenario>-<n>-<moment>.png``.

What "intact" means after a restart, an interrupt or a reload is the product contract
(PRODUCT.md, "Resume: the run directory"): an item is recorded done only after its result
was handed to ``save_callback``; items in flight when the run was cut may run twice,
nothing else. So an item saved twice must be one whose save happened and whose record
did not land, i.e. it is **not** recorded done at the cut, and there are at most
``save_batch`` of them (the runner saves and records one batch at a time, in one thread:
a cut falls between one save and its record at most once). An item recorded done at the
cut is never run (``calls.jsonl``) nor saved again.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid

import psutil
import pytest

import nbmplock
from nbmplock._read import read_contents

from .lab import (
    STEP_TIMEOUT,
    _is_alive,
    _reap,
    click_button,
    click_menu,
    accept_dialog,
    interrupt_from_toolbar,
    kernel_id,
    notebook_errors,
    notebook_outputs,
    open_notebook,
    run_all_cells,
    save_notebook,
    screenshot,
    start_run_all,
    wait_kernel_idle,
    wait_notebook_ready,
    wait_run_all,
    widget_render_errors,
    write_notebook,
)
from .panelview import (
    button_states,
    jsonl_names,
    parse_counts,
    read_counts,
    repeated,
    wait_counts,
    wait_panel_rendered,
    wait_state,
)

pytestmark = pytest.mark.browser

SAVE_BATCH = 10


def items(n: int) -> list[str]:
    return [f"item-{i:05d}" for i in range(n)]


def new_run(server, name: str) -> str:
    return str(server.root_dir.resolve() / "runs" / f"{name}-{uuid.uuid4().hex[:8]}")


def defs_cell(run: str, *, calls: bool = False, bad: str | None = None,
              process: bool = True) -> str:
    """The first cell: RUN, ``save`` (one JSON line per item in ``RUN/data.jsonl``) and,
    unless a ``%%mplock`` cell defines it, ``process`` (20 ms an item; with ``calls``
    it appends each call to ``RUN.calls.jsonl``; item ``bad`` raises)."""
    lines = [
        "import json, os, time",
        "import nbmplock",
        "",
        f"RUN = {run!r}",
        "",
        "def save(data_path, results, names):",
        '    with open(RUN + "/data.jsonl", "a") as f:',
        "        for name in names:",
        '            f.write(json.dumps(name) + "\\n")',
        "",
    ]
    if not process:
        return "\n".join(lines)
    lines.append("def process(item, shared_data, init_values):")
    if calls:
        lines += [
            '    with open(RUN + ".calls.jsonl", "a") as f:  # every call, from the workers',
            '        f.write(json.dumps(item) + "\\n")',
        ]
    lines.append("    time.sleep(0.02)")
    if bad is not None:
        lines += [
            f"    if item == {bad!r}:",
            '        raise ValueError(f"{item} is broken on purpose")',
        ]
    lines += ["    return item", ""]
    return "\n".join(lines)


def saved(run: str) -> list[str]:
    return jsonl_names(os.path.join(run, "data.jsonl"))


def check_saved_once(run: str, expected: set[str], done_at_cut: set[str],
                     saved_at_cut: int) -> dict:
    """Every expected item saved; none recorded done at the cut saved after it (the
    first ``saved_at_cut`` lines were written before it); at most SAVE_BATCH items
    saved twice (see the module docstring). Returns the repeats."""
    names = saved(run)
    assert set(names) == expected, (
        f"saved items differ: {len(expected - set(names))} missing "
        f"(e.g. {sorted(expected - set(names))[:5]}), unexpected {sorted(set(names) - expected)[:5]}")
    again = set(names[saved_at_cut:]) & done_at_cut
    assert not again, f"items recorded done at the cut were saved again: {sorted(again)[:10]}"
    twice = repeated(names)
    assert len(twice) <= SAVE_BATCH, (
        f"{len(twice)} items saved more than once (at most one save batch, {SAVE_BATCH}, "
        f"may be saved without being recorded): {sorted(twice)[:20]}")
    return twice


def wait_until(ok, what: str, timeout: float = STEP_TIMEOUT, interval: float = 0.1):
    """Poll ``ok()`` until it returns a true value (returned); fail saying ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = ok()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)  # polling interval


def gone(procs, timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` for ``procs`` to exit; return the survivors."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _is_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)  # polling interval
        alive = [p for p in alive if _is_alive(p)]
    return alive


def describe(procs) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"pid {p.pid} ({p.status()}, ppid {p.ppid()})")
        except psutil.Error:
            out.append(f"pid {p.pid} (gone)")
    return out


class TreeWatcher:
    """Samples the descendants of ``root`` every 20 ms in a thread, until ``root`` is
    gone; keeps each process seen and when it was first seen."""

    def __init__(self, root: psutil.Process):
        self.root = root
        self.seen: dict[int, tuple[psutil.Process, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-watcher", daemon=True)

    def __enter__(self) -> "TreeWatcher":
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _sample(self) -> bool:
        try:
            children = self.root.children(recursive=True)
        except psutil.Error:
            return False
        now = time.monotonic()
        for c in children:
            self.seen.setdefault(c.pid, (c, now))
        return _is_alive(self.root)

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            if not self._sample():
                return

    def procs(self) -> list[psutil.Process]:
        return [p for p, _ in self.seen.values()]

    def started_after(self, t: float) -> list[psutil.Process]:
        return [p for p, first in self.seen.values() if first > t]


class KernelShutdownGap(AssertionError):
    """The restart left the job working or blamed the user's code (issue 12, case 6:
    the dying kernel took ipykernel's SIGTERMs to its workers as worker deaths, recorded
    WorkerDied failures and started replacement workers). Checked last, so that the
    rest of the scenario still runs and reports when this is what broke."""


# --------------------------------------------------------------------------- 1. restart

RESTART_N = 1200
RESTART_BAD = "item-00007"  # fails early: the panel after the restart has a failure to retry


def test_kernel_restart_mid_run(jupyter_server, browser_page):
    """Restart the kernel from the Kernel menu while a job runs; Run All; Start.

    The notebook builds the job with ``nbmplock.Job(...)`` and shows it, without starting
    it; the user clicks **Start**. That is the one cell that works before and after a
    restart: "Run All" after the restart shows the stored progress and runs nothing
    (``nbmplock.run`` would start at once), and the panel of that fresh, idle job offers
    **Start** and **Retry failed**, not Resume.
    """
    page, server = browser_page, jupyter_server
    nb = "restart.ipynb"
    run = new_run(server, "restart")
    all_items = set(items(RESTART_N))
    write_notebook(server.root_dir, nb, [
        defs_cell(run, calls=True, bad=RESTART_BAD),
        f"job = nbmplock.Job([f'item-{{i:05d}}' for i in range({RESTART_N})], process, RUN,\n"
        f"                   num_procs=2, save_callback=save, save_batch={SAVE_BATCH})\n"
        "job\n",
    ])
    open_notebook(page, server, nb)
    assert run_all_cells(page, name=nb), notebook_errors(page, nb)
    wait_state(page, 0, "idle")
    click_button(page, "Start")
    before = wait_counts(page, 0, lambda c: c["done"] >= 200 and c["failed"] >= 1,
                         "done >= 200 with the broken item failed")
    kid = kernel_id(page, nb)
    old_kernel = server.kernel_process(kid)
    assert old_kernel is not None, f"no process for kernel {kid}"
    screenshot(page, "restart-1-running")

    # -- restart from the Kernel menu, as a user does ----------------------------------
    gaps: list[str] = []  # what issue 12 case 6 fixed; reported last, see KernelShutdownGap
    with TreeWatcher(old_kernel) as watcher:
        workers = old_kernel.children(recursive=True)
        assert len(workers) == 2, f"expected 2 workers, found {describe(workers)}"
        click_menu(page, "Kernel", "kernelmenu:restart")
        t_restart = time.monotonic()
        dialog = accept_dialog(page)
        assert "Restart" in dialog, dialog
        wait_until(lambda: not _is_alive(old_kernel), "the old kernel process exits", 60)
        t_dead = time.monotonic()
    wait_kernel_idle(page, name=nb)
    new_kernel = wait_until(lambda: server.kernel_process(kid), "the new kernel process")
    assert new_kernel.pid != old_kernel.pid
    screenshot(page, "restart-2-restarted")

    # no worker of the old kernel survives: the two seen before, and any started since
    survivors = gone(watcher.procs(), 10)
    replacements = watcher.started_after(t_restart + 0.05)
    _reap(survivors, 1)  # leave nothing behind whatever happens next
    assert not survivors, f"old kernel's processes still alive 10 s after it died: {describe(survivors)}"
    if replacements:
        gaps.append(f"the dying kernel started {len(replacements)} new worker(s) after the "
                    f"restart was confirmed: {describe(replacements)}")

    # -- the run directory is intact --------------------------------------------------
    snap = nbmplock.read_snapshot(run)
    assert snap.holder_pid is None, f"the run directory is still locked by pid {snap.holder_pid}"
    done_at_cut = set(read_contents(run).done)
    assert len(done_at_cut) == snap.done
    assert snap.done >= before["done"], (snap.done, before)
    saved_at_cut = saved(run)
    assert done_at_cut <= set(saved_at_cut), "items recorded done that save_callback never got"
    false_failures = [f for f in snap.failures if f.item != RESTART_BAD]
    assert RESTART_BAD in {f.item for f in snap.failures}, snap.failures
    if false_failures:
        gaps.append(f"{len(false_failures)} false failure(s) recorded by the restart, e.g. "
                    + "; ".join(f"{f.item}: {f.exc_type}: {f.message}" for f in false_failures[:3]))
    calls_at_cut = len(jsonl_names(run + ".calls.jsonl"))

    # -- Run All again: the stored progress, before anything runs ----------------------
    assert run_all_cells(page, name=nb), notebook_errors(page, nb)
    wait_state(page, 0, "idle")
    shown = read_counts(page, 0)
    failed_at_cut = len(snap.failures)
    assert shown == dict(done=snap.done, total=RESTART_N, done_before=snap.done, done_now=0,
                         failed=failed_at_cut, in_flight=0), (shown, snap)
    assert len(jsonl_names(run + ".calls.jsonl")) == calls_at_cut, "Run All ran items"
    assert len(saved(run)) == len(saved_at_cut), "Run All saved items"
    buttons = button_states(page, 0)
    assert buttons == {"Start": True, "Stop": False, "Force stop": False, "Resume": False,
                       "Retry failed": True}, buttons
    screenshot(page, "restart-3-run-all-after-restart")

    # -- Start finishes the run ----------------------------------------------------------
    click_button(page, "Start")
    wait_state(page, 0, "finished with failures")
    final = wait_counts(page, 0, lambda c: c["in_flight"] == 0 and c["done"] == RESTART_N - 1,
                        f"done {RESTART_N - 1}")
    assert final == dict(done=RESTART_N - 1, total=RESTART_N, done_before=snap.done,
                         done_now=RESTART_N - 1 - snap.done, failed=1, in_flight=0), final
    screenshot(page, "restart-4-finished")
    end = nbmplock.read_snapshot(run)
    assert end.done == RESTART_N - 1 and [f.item for f in end.failures] == [RESTART_BAD], end
    check_saved_once(run, all_items - {RESTART_BAD}, done_at_cut, len(saved_at_cut))
    calls = jsonl_names(run + ".calls.jsonl")
    ran_again = set(calls[calls_at_cut:]) & done_at_cut
    assert not ran_again, (
        f"items recorded done before the restart ran again after it: {sorted(ran_again)[:10]}")
    ran_twice = repeated(calls)
    assert notebook_errors(page, nb) == []
    assert widget_render_errors(page) == []
    print(f"restart at done {before['done']} (disk {snap.done}); old kernel gone "
          f"{t_dead - t_restart:.1f}s after the click; {len(ran_twice)} items ran twice")
    if gaps:
        raise KernelShutdownGap("\n".join(gaps))


# --------------------------------------------------------------------------- 2. interrupt

INTERRUPT_N = 1200


def prompts(page) -> list[str]:
    """The input prompts of the notebook's cells ("[1]:", "[*]:", "[ ]:").

    "[*]" on a cell whose predecessors show numbers is the cell executing. (The kernel's
    status is no guide: ipykernel 7 reports "idle" after each widget message it handles
    on its own threads, while a cell still runs.)"""
    return [t.strip() for t in page.locator(".jp-Notebook .jp-Cell .jp-InputPrompt").all_inner_texts()]


def cell_text(page, nb: str, cell: int) -> str:
    """Everything cell ``cell`` shows: its streams, and its error's name, value and
    traceback, ANSI codes stripped."""
    ansi = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    parts = []
    for o in notebook_outputs(page, nb):
        if o["cell"] != cell:
            continue
        if o.get("output_type") == "stream":
            text = o.get("text", "")
            parts.append("".join(text) if isinstance(text, list) else text)
        elif o.get("output_type") == "error":
            parts.append(f"{o.get('ename')}: {o.get('evalue')}")
            parts.extend(o.get("traceback", []))
    return ansi.sub("", "\n".join(parts))


def test_interrupt_kernel_during_mplock_wait(jupyter_server, browser_page):
    """The toolbar's interrupt during ``%%mplock ... --wait``: the cell ends with
    KeyboardInterrupt and a message saying the run stopped and how to continue; no worker
    is left; running the cell again resumes and finishes (every item saved once)."""
    page, server = browser_page, jupyter_server
    nb = "interrupt.ipynb"
    run = new_run(server, "interrupt")
    all_items = items(INTERRUPT_N)
    write_notebook(server.root_dir, nb, [
        "%load_ext nbmplock\n" + defs_cell(run, process=False)
        + f"items = [f'item-{{i:05d}}' for i in range({INTERRUPT_N})]\n",
        f'%%mplock items --out "{run}" --procs 2 --save save --save-batch {SAVE_BATCH} --wait\n'
        "def process(item, shared_data, init_values):\n"
        "    time.sleep(0.02)\n"
        "    return item\n",
    ])
    open_notebook(page, server, nb)
    start_run_all(page, nb)
    # the magic shows the panel, then blocks: the kernel is busy, the panel still moves
    wait_counts(page, 0, lambda c: c["done"] >= 150, "done >= 150 while the cell waits")
    assert prompts(page) == ["[1]:", "[*]:"], prompts(page)
    kernel = server.kernel_process(kernel_id(page, nb))
    workers = kernel.children(recursive=True)
    assert len(workers) == 2, describe(workers)
    screenshot(page, "interrupt-1-running")

    interrupt_from_toolbar(page)
    t_interrupt = time.monotonic()
    ok = wait_run_all(page, name=nb)
    t_ended = time.monotonic()
    screenshot(page, "interrupt-2-interrupted")
    assert not ok, "Run All reported success: the interrupted cell did not raise"
    errors = notebook_errors(page, nb)
    assert [(e["cell"], e["ename"]) for e in errors] == [(1, "KeyboardInterrupt")], errors
    text = cell_text(page, nb, 1)
    assert re.search(r"\binterrupted\b", text, re.I) and re.search(r"\bstopped\b", text, re.I), text
    assert re.search(r"run the cell again|resume", text, re.I), text
    wait_state(page, 0, "stopped")

    # nothing left running
    survivors = gone(workers, 10)
    _reap(survivors, 1)
    assert not survivors, f"workers alive 10 s after the interrupt: {describe(survivors)}"
    assert gone(kernel.children(recursive=True), 10) == [], describe(kernel.children(recursive=True))
    snap = nbmplock.read_snapshot(run)
    assert snap.holder_pid is None, f"the run directory is still locked by pid {snap.holder_pid}"
    assert snap.failures == (), f"the interrupt recorded failures: {snap.failures[:3]}"
    assert 150 <= snap.done < INTERRUPT_N, snap
    shown = wait_counts(page, 0, lambda c: c["done"] == snap.done and c["in_flight"] == 0,
                        f"done {snap.done} (the run directory's count)")
    done_at_cut = set(read_contents(run).done)
    saved_at_cut = len(saved(run))

    # running the cell again resumes and finishes
    assert run_all_cells(page, name=nb), notebook_errors(page, nb)
    wait_state(page, 0, "finished")
    final = read_counts(page, 0)
    assert final == dict(done=INTERRUPT_N, total=INTERRUPT_N, done_before=snap.done,
                         done_now=INTERRUPT_N - snap.done, failed=0, in_flight=0), final
    screenshot(page, "interrupt-3-rerun-finished")
    assert nbmplock.read_snapshot(run).done == INTERRUPT_N
    check_saved_once(run, set(all_items), done_at_cut, saved_at_cut)
    assert notebook_errors(page, nb) == []
    print(f"interrupted at done {shown['done']}; the cell ended "
          f"{t_ended - t_interrupt:.1f}s after the click")


# --------------------------------------------------------------------------- 3. busy kernel

BUSY_N = 1000
BUSY_SECONDS = 5

# One look at the page: the cells' prompts and the counts line.
_BUSY_SAMPLE = (
    "() => { const counts = document.querySelector('.nbmplock-panel .nbmplock-counts');"
    " return {prompts: Array.from(document.querySelectorAll('.jp-Notebook .jp-Cell .jp-InputPrompt'))"
    "          .map((e) => e.textContent.trim()),"
    "   counts: counts ? counts.innerText : null}; }"
)
_SLEEPING = ["[1]:", "[2]:", "[*]:"]  # cells 0 and 1 ran, cell 2 (the sleep) executes


def test_panel_moves_while_another_cell_runs(jupyter_server, browser_page):
    """A job runs in the background; another cell sleeps 5 s; meanwhile the counts line
    in the page keeps changing (widget updates from the job's thread do not wait for
    the busy cell; button clicks do, which the README says)."""
    page, server = browser_page, jupyter_server
    nb = "busy.ipynb"
    run = new_run(server, "busy")
    write_notebook(server.root_dir, nb, [
        defs_cell(run),
        f"job = nbmplock.run([f'item-{{i:05d}}' for i in range({BUSY_N})], process, RUN,\n"
        f"                   num_procs=2, save_callback=save)\n"
        "job\n",
        f"time.sleep({BUSY_SECONDS})  # the kernel is busy; the job is not\n",
    ])
    open_notebook(page, server, nb)
    start_run_all(page, nb)
    samples = []  # (time, done) seen while cell 2 runs and the kernel is busy
    deadline = time.monotonic() + STEP_TIMEOUT
    seen_running = False
    while time.monotonic() < deadline:
        s = page.evaluate(_BUSY_SAMPLE)
        counts = parse_counts(s["counts"] or "")
        if s["prompts"] == _SLEEPING:
            seen_running = True
            if counts is not None:
                samples.append((time.monotonic(), counts["done"]))
                if len(samples) == 20:
                    screenshot(page, "busy-1-while-sleeping")
        elif seen_running:
            break  # the sleeping cell ended
        time.sleep(0.1)  # sampling interval
    assert seen_running, f"the sleeping cell was never seen running; prompts {s['prompts']}"
    assert wait_run_all(page, name=nb), notebook_errors(page, nb)
    changes = [(t, d) for (t, d), (_, prev) in zip(samples[1:], samples) if d != prev]
    span = changes[-1][0] - changes[0][0] if len(changes) >= 2 else 0.0
    values = sorted({d for _, d in samples})
    assert len(changes) >= 8 and span >= BUSY_SECONDS * 0.6, (
        f"the panel did not keep moving while the kernel was busy: {len(samples)} samples "
        f"in {samples[-1][0] - samples[0][0] if samples else 0:.1f}s, {len(changes)} changes "
        f"over {span:.1f}s, done values {values[:5]}...{values[-5:]}")
    wait_state(page, 0, "finished")
    final = read_counts(page, 0)
    assert final["done"] == BUSY_N and final["in_flight"] == 0, final
    screenshot(page, "busy-2-finished")
    check_saved_once(run, set(items(BUSY_N)), set(), 0)
    print(f"{len(changes)} changes over {span:.1f}s while the kernel was busy "
          f"(done {values[0]} -> {values[-1]})")


# --------------------------------------------------------------------------- 4. reload

RELOAD_N = 1500


def test_reload_page_during_run(jupyter_server, browser_page):
    """Reload the page while a job runs: the panel renders again (no "Error displaying
    widget", no "Loading widget..."), keeps updating, and its buttons still reach the
    kernel (Stop, Resume)."""
    page, server = browser_page, jupyter_server
    nb = "reload.ipynb"
    run = new_run(server, "reload")
    write_notebook(server.root_dir, nb, [
        defs_cell(run),
        f"job = nbmplock.run([f'item-{{i:05d}}' for i in range({RELOAD_N})], process, RUN,\n"
        f"                   num_procs=2, save_callback=save)\n"
        "job\n",
    ])
    open_notebook(page, server, nb)
    assert run_all_cells(page, name=nb), notebook_errors(page, nb)
    wait_counts(page, 0, lambda c: c["done"] >= 100, "done >= 100")
    # The page shows what the notebook file holds: save it, outputs included, as a
    # user's Ctrl+S (or autosave) does; the panel's output refers to the live widget.
    save_notebook(page, nb)
    before = read_counts(page, 0)
    screenshot(page, "reload-1-before")

    page.reload(wait_until="domcontentloaded")
    wait_notebook_ready(page, nb)
    wait_panel_rendered(page)
    after = wait_counts(page, 0, lambda c: c["done"] >= before["done"],
                        "the panel rendered again after the reload")
    screenshot(page, "reload-2-after")
    assert widget_render_errors(page) == []
    assert page.get_by_text("Loading widget...").count() == 0
    assert after["total"] == RELOAD_N
    # live: the numbers keep moving, and a click still reaches the kernel
    wait_counts(page, 0, lambda c: c["done"] >= after["done"] + 50,
                f"done >= {after['done'] + 50}: the panel updating after the reload")
    click_button(page, "Stop")
    wait_state(page, 0, "stopped")
    snap = nbmplock.read_snapshot(run)
    wait_counts(page, 0, lambda c: c["done"] == snap.done and c["in_flight"] == 0,
                f"done {snap.done} after Stop")
    click_button(page, "Resume")
    wait_state(page, 0, "finished")
    final = read_counts(page, 0)
    assert final == dict(done=RELOAD_N, total=RELOAD_N, done_before=snap.done,
                         done_now=RELOAD_N - snap.done, failed=0, in_flight=0), final
    screenshot(page, "reload-3-finished")
    check_saved_once(run, set(items(RELOAD_N)), set(), 0)
    assert len(saved(run)) == RELOAD_N, "a graceful Stop saved an item twice"
    assert widget_render_errors(page) == []
    print(f"reloaded at done {before['done']}, shown again at {after['done']}")
