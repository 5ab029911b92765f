"""The ipywidgets panel, driven with ``Button.click()`` against real runs.

Every test asserts on widget values and on the run directory; none on timing.
A test waits for a run's last state event with :class:`Settled`, subscribed
after the panels, so the panels have applied it when ``wait`` returns.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import time

import psutil
import pytest

import nbmplock
from nbmplock import Failure, Job, JobState, MissingDependencyError
from nbmplock._panel import REATTACHED_NOTICE, Panel, counts_text, failures_html

from .helpers import alive_children

WAIT = 120  # seconds; a safety net against a hang, never a measurement


# -- process functions (module level) ------------------------------------------
def fast(item, shared_data, init_values):
    return item


def sleepy(item, shared_data, init_values):
    """1 ms per item; fails items ending in "7" while the file shared_data["fail_flag"] exists."""
    time.sleep(0.001)
    flag = shared_data.get("fail_flag")
    if flag and item.endswith("7") and os.path.exists(flag):
        raise ValueError(f"bad <b>{item}</b>")
    print(f"did <i>{item}</i>")
    return item.upper()


def gated(item, shared_data, init_values):
    """Items from shared_data["free"] on wait until the file shared_data["gate"] exists."""
    if int(item) >= shared_data.get("free", 0):
        while not os.path.exists(shared_data["gate"]):
            time.sleep(0.005)
    return item


# -- helpers ------------------------------------------------------------------
class Settled:
    """Set when ``job`` emits a state event for a state that is not active."""

    def __init__(self, job: Job):
        self._event = threading.Event()
        job.subscribe(self._on_event)

    def _on_event(self, event) -> None:
        if event.kind == "state" and not event.progress.state.active:
            self._event.set()

    def clear(self) -> None:
        self._event.clear()

    def wait(self) -> None:
        assert self._event.wait(WAIT), "the run did not end"


class Reached:
    """Set once ``job`` has recorded at least ``done`` items."""

    def __init__(self, job: Job, done: int):
        self._event = threading.Event()
        self._done = done
        job.subscribe(self._on_event)

    def _on_event(self, event) -> None:
        if event.progress.done >= self._done:
            self._event.set()

    def wait(self) -> None:
        assert self._event.wait(WAIT), "the run made no progress"


def enabled(panel: Panel) -> dict:
    """The run's buttons (Start over, which asks first, is tested on its own)."""
    return {button.description: not button.disabled for button in panel.buttons
            if button is not panel.start_over_button}


@pytest.fixture
def jobs():
    """Collects the test's jobs; on teardown stops what still runs and checks for orphans."""
    made: list[Job] = []
    panels: list[Panel] = []
    yield made, panels
    for panel in panels:
        panel.close()
    for job in made:
        gate = (job.spec.shared_data or {}).get("gate")
        if gate:
            open(gate, "a").close()  # let gated workers finish whatever the test did
        if job.state is JobState.RUNNING:
            job.stop(force=True)
        assert job.wait(WAIT)
    gone, alive = psutil.wait_procs(alive_children(), timeout=10)
    assert alive == [], f"worker processes left behind: {alive}"


@pytest.fixture
def make(jobs, tmp_path):
    made, panels = jobs

    def make(n=3000, process=sleepy, out="run", shared=None, **options):
        job = Job([str(i) for i in range(n)], process, str(tmp_path / out), num_procs=2,
                  shared_data=shared or {}, **options)
        made.append(job)
        return job

    def panel(job):
        p = Panel(job)
        panels.append(p)
        return p

    make.panel = panel
    return make


# -- tests --------------------------------------------------------------------
def test_stop_mid_run_then_resume(make, tmp_path):
    job = make(3000)
    panel = make.panel(job)
    settled = Settled(job)
    reached = Reached(job, 200)
    assert "nbmplock-panel" in panel._dom_classes
    assert "nbmplock-counts" in panel.counts._dom_classes

    panel.start_button.click()
    reached.wait()
    panel.stop_button.click()
    assert job.wait(WAIT)
    settled.wait()

    p = job.progress
    assert job.state is JobState.STOPPED
    assert 200 <= p.done < p.total
    assert panel.counts.value == counts_text(p)
    assert panel.counts.value == (f"done {p.done} / 3000 · earlier runs 0 · this run {p.done}"
                                  f" · failed 0 · in flight 0")
    assert nbmplock.read_snapshot(job.out_path).done == p.done
    assert alive_children() == []
    assert "stopped" in panel.state_badge.value
    assert panel.bar.value == p.done and panel.bar.max == 3000
    assert enabled(panel) == {"Start": False, "Stop": False, "Force stop": False,
                              "Resume": True, "Retry failed": False}

    stopped_at = p.done
    settled.clear()
    panel.resume_button.click()
    assert panel.message.value == ""
    assert job.wait(WAIT)
    settled.wait()

    p = job.progress
    assert job.state is JobState.FINISHED
    assert p.done == p.total == 3000
    assert panel.counts.value == (f"done 3000 / 3000 · earlier runs {stopped_at} · this run "
                                  f"{3000 - stopped_at} · failed 0 · in flight 0")
    assert nbmplock.read_snapshot(job.out_path).done == 3000
    assert ">finished<" in panel.state_badge.value
    assert panel.bar.bar_style == "success" and panel.bar.value == 3000
    assert enabled(panel) == {"Start": False, "Stop": False, "Force stop": False,
                              "Resume": False, "Retry failed": False}
    # the output tail shows the workers' lines, escaped
    assert "[w" in panel.output_tail.value
    assert "&lt;i&gt;" in panel.output_tail.value and "<i>" not in panel.output_tail.value
    assert job.results()[:3] == ["0", "1", "2"]


def test_retry_failed_after_fixing_the_function(make, tmp_path):
    flag = tmp_path / "fail.flag"
    flag.write_text("fail")
    job = make(200, shared={"fail_flag": str(flag)})
    panel = make.panel(job)
    settled = Settled(job)

    panel.start_button.click()
    assert job.wait(WAIT)
    settled.wait()

    p = job.progress
    assert job.state is JobState.FINISHED
    assert p.failed == 20 and p.done == 180
    assert "finished with failures" in panel.state_badge.value
    assert panel.bar.bar_style == "warning"
    assert "failed 20" in panel.counts.value
    table = panel.failures_table.value
    assert "ValueError" in table and "Failures (20)" in table
    assert "bad &lt;b&gt;17&lt;/b&gt;" in table and "<b>17" not in table
    assert table.count("<details>") == 20 and "Traceback" in table
    assert enabled(panel) == {"Start": False, "Stop": False, "Force stop": False,
                              "Resume": True, "Retry failed": True}
    assert len(nbmplock.read_snapshot(job.out_path).failures) == 20

    flag.unlink()  # "fix" the function
    settled.clear()
    panel.retry_button.click()
    assert job.wait(WAIT)
    settled.wait()

    p = job.progress
    assert job.state is JobState.FINISHED
    assert p.failed == 0 and p.done == 200
    assert job.failures == ()
    assert panel.failures_table.value == ""
    assert ">finished<" in panel.state_badge.value and panel.bar.bar_style == "success"
    assert panel.counts.value == counts_text(p)
    assert enabled(panel)["Retry failed"] is False and enabled(panel)["Resume"] is False
    snap = nbmplock.read_snapshot(job.out_path)
    assert snap.done == 200 and snap.failures == ()


def test_two_panels_of_one_job_both_update(make):
    job = make(500)
    first, second = make.panel(job), make.panel(job)
    settled = Settled(job)
    first.start_button.click()
    assert job.wait(WAIT)
    settled.wait()
    for panel in (first, second):
        assert panel.counts.value == counts_text(job.progress)
        assert "done 500 / 500" in panel.counts.value
        assert ">finished<" in panel.state_badge.value
        assert panel.start_button.disabled
    assert first.model_id != second.model_id

    # displaying the Job twice shows its one panel twice (two views of one widget)
    bundles = [job._repr_mimebundle_() for _ in range(2)]
    ids = [b["application/vnd.jupyter.widget-view+json"]["model_id"] for b in bundles]
    assert ids[0] == ids[1] == job.panel.model_id
    assert bundles[0]["text/plain"].startswith("nbmplock Job on")


def test_job_panel_is_a_widget_to_place_in_a_layout(make):
    """Issue 19: ``job.panel`` is public: one live VBox per job, to put in an HBox,
    a dashboard or Voila, whose buttons drive the job and whose counts follow it."""
    import ipywidgets as widgets

    job = make(400)
    panel = job.panel
    assert isinstance(panel, widgets.VBox) and job.panel is panel
    layout = widgets.HBox([panel, widgets.HTML("a plot")])
    assert layout.children[0] is panel
    settled = Settled(job)
    panel.start_button.click()
    assert job.wait(WAIT)
    settled.wait()
    assert "done 400 / 400" in panel.counts.value and ">finished<" in panel.state_badge.value
    assert job._repr_mimebundle_()["application/vnd.jupyter.widget-view+json"]["model_id"] \
        == panel.model_id


def test_displaying_a_job_100_times_adds_no_subscriber_or_thread(make):
    """Issue 14: every display built a Panel that subscribed for ever, and each
    throttle window started a Timer thread."""
    job = make(300)
    job.start()
    try:
        job._repr_mimebundle_()
        subscribers = job._channel.live_subscribers

        def view_threads():  # threads a view could have started (not the run's own)
            return sorted(t.name for t in threading.enumerate()
                          if t.name == "nbmplock-views" or isinstance(t, threading.Timer)
                          or not t.name.startswith("nbmplock-"))

        threads = view_threads()
        for _ in range(100):
            job._repr_mimebundle_()
        assert job._channel.live_subscribers == subscribers == 1
        assert view_threads() == threads and threads.count("nbmplock-views") == 1
        # a new Job on the same directory (the cell run again after the run ended)
        assert job.wait(WAIT)
        old_panel = job.panel
        again = make(300)
        again._repr_mimebundle_()
        assert old_panel._closed and job._channel.live_subscribers == 0
    finally:
        if job.state.active:
            job.stop(force=True)
            job.wait(WAIT)


def test_panel_shows_stored_progress_before_start(make, tmp_path):
    flag = tmp_path / "fail.flag"
    flag.write_text("fail")
    first = make(100, shared={"fail_flag": str(flag)})
    first.start()
    assert first.wait(WAIT)
    assert first.progress.failed == 10

    # as after a kernel restart: a new Job on the same run directory
    flag.unlink()
    job = make(100, shared={"fail_flag": str(flag)})
    panel = make.panel(job)
    assert job.state is JobState.IDLE
    assert panel.counts.value == ("done 90 / 100 · earlier runs 90 · this run 0 · failed 10"
                                  " · in flight 0")
    assert panel.bar.value == 90
    assert ">idle<" in panel.state_badge.value
    assert "Failures (10)" in panel.failures_table.value
    assert "bad &lt;b&gt;7&lt;/b&gt;" in panel.failures_table.value
    assert enabled(panel) == {"Start": True, "Stop": False, "Force stop": False,
                              "Resume": False, "Retry failed": True}

    settled = Settled(job)
    panel.start_button.click()
    assert job.wait(WAIT)
    settled.wait()
    assert panel.counts.value == ("done 100 / 100 · earlier runs 90 · this run 10 · failed 0"
                                  " · in flight 0")
    assert panel.failures_table.value == ""


def test_buttons_follow_the_state(make, tmp_path):
    gate = tmp_path / "gate"
    job = make(40, process=gated, shared={"gate": str(gate), "free": 10}, chunk_size=1)
    panel = make.panel(job)
    settled = Settled(job)
    reached = Reached(job, 10)
    assert enabled(panel) == {"Start": True, "Stop": False, "Force stop": False,
                              "Resume": False, "Retry failed": False}

    panel.start_button.click()
    reached.wait()  # now the workers block on the gate: the job stays running
    assert job.state is JobState.RUNNING
    panel.refresh()
    assert ">running<" in panel.state_badge.value and panel.bar.bar_style == "info"
    assert enabled(panel) == {"Start": False, "Stop": True, "Force stop": True,
                              "Resume": False, "Retry failed": False}

    panel.resume_button.click()  # disabled in the browser; a call still explains itself
    assert "JobStateError" in panel.message.value and "running" in panel.message.value
    assert job.state is JobState.RUNNING

    panel.stop_button.click()  # graceful: the blocked workers cannot finish their items yet
    assert job.state is JobState.STOPPING
    assert panel.message.value == ""
    assert ">stopping<" in panel.state_badge.value and panel.bar.bar_style == "warning"
    assert enabled(panel) == {"Start": False, "Stop": True, "Force stop": True,
                              "Resume": False, "Retry failed": False}

    gate.write_text("open")  # the current items finish and are recorded; nothing new starts
    assert job.wait(WAIT)
    settled.wait()
    assert job.state is JobState.STOPPED
    assert alive_children() == []
    p = job.progress
    assert 10 <= p.done < 40
    assert p.done == nbmplock.read_snapshot(job.out_path).done
    assert panel.counts.value == counts_text(p)
    assert ">stopped<" in panel.state_badge.value and panel.bar.bar_style == ""
    assert enabled(panel) == {"Start": False, "Stop": False, "Force stop": False,
                              "Resume": True, "Retry failed": False}

    settled.clear()
    panel.resume_button.click()
    assert job.wait(WAIT)
    settled.wait()
    assert job.state is JobState.FINISHED and job.progress.done == 40
    assert enabled(panel) == {"Start": False, "Stop": False, "Force stop": False,
                              "Resume": False, "Retry failed": False}


def test_force_stop_kills_busy_workers(make, tmp_path):
    gate = tmp_path / "gate"  # never opened: only a kill ends these items
    job = make(40, process=gated, shared={"gate": str(gate), "free": 10}, chunk_size=1)
    panel = make.panel(job)
    settled = Settled(job)
    reached = Reached(job, 10)
    panel.start_button.click()
    reached.wait()
    panel.force_stop_button.click()
    assert job.wait(WAIT)
    settled.wait()
    assert job.state is JobState.STOPPED
    assert alive_children() == []
    p = job.progress
    assert p.done == 10 and p.failed == 0  # killed items stay not done, and are no failures
    assert nbmplock.read_snapshot(job.out_path).done == 10
    assert panel.counts.value == ("done 10 / 40 · earlier runs 0 · this run 10 · failed 0"
                                  " · in flight 0")


def test_force_stop_after_a_graceful_stop(make, tmp_path):
    gate = tmp_path / "gate"
    job = make(40, process=gated, shared={"gate": str(gate), "free": 10}, chunk_size=1)
    panel = make.panel(job)
    reached = Reached(job, 10)
    panel.start_button.click()
    reached.wait()
    panel.stop_button.click()
    assert job.state is JobState.STOPPING
    time.sleep(1.0)  # not a measurement: lets the manager thread begin the graceful stop
    panel.force_stop_button.click()
    assert panel.message.value == ""
    assert job.wait(10), "Force stop did not end a stopping run"  # the teardown opens the gate
    assert job.state is JobState.STOPPED


def test_reattached_run_shows_a_notice_and_a_second_run_is_refused(jobs, tmp_path):
    made, panels = jobs
    gate = tmp_path / "gate"
    out = str(tmp_path / "run")
    items = [str(i) for i in range(20)]
    job = nbmplock.run(items, gated, out, num_procs=2, shared_data={"gate": str(gate)})
    made.append(job)
    again = nbmplock.run(items, gated, out, num_procs=2, shared_data={"gate": str(gate)})
    assert again is job and job.reattached
    panel = Panel(job)
    panels.append(panel)
    assert REATTACHED_NOTICE in panel.notice.value
    assert REATTACHED_NOTICE in panel.status_text()

    # a second Job object on the same out_path cannot start while the first runs
    other = Job(items, gated, out, num_procs=2, shared_data={"gate": str(gate)})
    made.append(other)
    other_panel = Panel(other)
    panels.append(other_panel)
    other_panel.start_button.click()
    assert "RunLockedError" in other_panel.message.value
    assert other.state is JobState.IDLE

    settled = Settled(job)
    gate.write_text("open")
    assert job.wait(WAIT)
    settled.wait()
    assert job.state is JobState.FINISHED
    assert panel.notice.value == ""  # the run it pointed at is over


def test_closed_panel_stops_listening(make):
    job = make(100)
    panel = make.panel(job)
    before = panel.counts.value
    panel.close()
    panel.close()  # twice is fine
    settled = Settled(job)
    job.start()
    assert job.wait(WAIT)
    settled.wait()
    assert job.progress.done == 100
    assert panel.counts.value == before


def test_views_get_throttled_updates_off_the_manager_thread_and_the_last_one_shows(make):
    """Issue 14: progress reaches views on the views thread, coalesced to about ten a
    second (output lines merged, not dropped); a state event comes at once."""
    job = make(10_000)  # never started: the test posts events itself
    panel = make.panel(job)
    seen, threads = [], set()

    def view(event):
        seen.append(event)
        threads.add(threading.current_thread().name)

    job.subscribe(view)
    base = job.progress

    def progress(done, state=JobState.RUNNING):
        return nbmplock.Progress(base.total, done, 0, 0, 0, (), 0.0, 0.0, None, state)

    for done in range(1, 201):
        job._channel.post(nbmplock.Event("progress", progress(done), (f"line {done}",)),
                          state=False)
    assert job._channel.flush(WAIT)
    progress_events = [e for e in seen if e.kind == "progress"]
    assert 1 <= len(progress_events) < 200
    assert progress_events[-1].progress.done == 200
    assert [line for e in progress_events for line in e.output] == [
        f"line {d}" for d in range(1, 201)]
    assert threads == {"nbmplock-views"}
    assert panel.counts.value == counts_text(progress(200))

    job._channel.post(nbmplock.Event("progress", progress(201)), state=False)
    job._channel.post(nbmplock.Event("state", progress(202, JobState.STOPPED)), state=True)
    assert job._channel.flush(WAIT)
    assert seen[-1].kind == "state" and seen[-1].progress.done == 202
    assert panel.counts.value == counts_text(progress(202))
    assert ">stopped<" in panel.state_badge.value


def test_failures_table_shows_the_last_100_and_counts_the_rest():
    failures = tuple(
        Failure(item=f"item <{i}>", kind="exception", exc_type="KeyError",
                message=f"no <key> {i}", traceback=f"Traceback <{i}>\nKeyError", time=i)
        for i in range(150))
    table = failures_html(failures, 150)
    assert table.count("<tr>") == 101  # header row + 100
    assert "and 50 more" in table
    assert "item &lt;149&gt;" in table and "item &lt;49&gt;" not in table
    assert "no &lt;key&gt; 120" in table and "Traceback &lt;120&gt;" in table
    assert "<key>" not in table
    assert failures_html((), 0) == ""


def test_without_ipywidgets_the_job_shows_text(monkeypatch, make):
    job = make(10)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    monkeypatch.delitem(sys.modules, "nbmplock._panel")
    with pytest.raises(MissingDependencyError, match=r'pip install "nbmplock\[notebook\]"'):
        importlib.import_module("nbmplock._panel")
    bundle = job._repr_mimebundle_()
    assert list(bundle) == ["text/plain"]
    assert "nbmplock Job on" in bundle["text/plain"] and "idle" in bundle["text/plain"]


def test_a_failed_run_is_red_and_says_why(make, tmp_path):
    flag = tmp_path / "fail.flag"
    flag.write_text("fail")
    job = make(100, shared={"fail_flag": str(flag)}, errors="raise")
    panel = make.panel(job)
    settled = Settled(job)
    panel.start_button.click()
    assert job.wait(WAIT)
    settled.wait()
    assert job.state is JobState.FAILED
    assert ">failed<" in panel.state_badge.value and "#e53935" in panel.state_badge.value
    assert panel.bar.bar_style == "danger"
    assert "The run failed: ValueError: bad &lt;b&gt;" in panel.message.value
    assert enabled(panel) == {"Start": False, "Stop": False, "Force stop": False,
                              "Resume": True, "Retry failed": True}
    assert panel.counts.value == counts_text(job.progress)
    assert nbmplock.read_snapshot(job.out_path).done == job.progress.done


def test_resuming_with_a_changed_function_says_so(make, tmp_path):
    first = make(50, process=gated, shared={"gate": str(tmp_path / "gate"), "free": 50})
    first.start()
    assert first.wait(WAIT)
    job = make(50)  # same run directory, another function
    panel = make.panel(job)
    settled = Settled(job)
    panel.start_button.click()
    assert job.wait(WAIT)
    settled.wait()
    assert "the process function changed" in panel.message.value
    assert panel.counts.value == ("done 50 / 50 · earlier runs 50 · this run 0 · failed 0"
                                  " · in flight 0")


def test_start_over_asks_first_then_forgets_everything_and_runs_again(make):
    job = make(30, process=fast)
    job.start()
    assert job.wait(WAIT) and job.progress.done == 30
    panel = job.panel
    assert not panel.start_over_button.disabled
    panel.start_over_button.click()
    assert panel.confirm.layout.display == "flex" and job.progress.done == 30
    panel.cancel_button.click()
    assert panel.confirm.layout.display == "none" and job.progress.done == 30
    panel.start_over_button.click()
    panel.confirm_button.click()
    assert job.wait(WAIT)
    assert job.state is JobState.FINISHED
    p = job.progress
    assert (p.done, p.done_before, p.done_now) == (30, 0, 30)
