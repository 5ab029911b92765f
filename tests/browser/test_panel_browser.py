"""The nbmplock panel in a real JupyterLab (headless Chromium): Stop, Resume, Start.

1. A notebook starts a job of 3000 items (``nbmplock.run``; the cell returns at once and
   shows the panel). The test waits until the panel shows progress, clicks **Stop**,
   checks that the done count stops growing and equals what the run directory says
   (``read_snapshot`` and the save_callback's JSON-lines file), clicks **Resume**, waits
   for "finished" and checks that every item was saved and recorded exactly once.
2. A second, smaller job with three items that always fail is shown idle; the test
   clicks **Start**, **Stop**, **Resume** and waits for "finished with failures" with the
   failures table shown. That panel is the README's screenshot: ``docs/panel.png`` is
   written only when ``NBMPLOCK_UPDATE_DOCS=1`` (CI must not modify tracked files);
   copies always go to ``artifacts/``.

The same test runs in JupyterLab (``ui="lab"``) and in Jupyter Notebook 7's interface
(``ui="notebook7"``, the ``/notebooks/<nb>`` URL of the same server; needs the
``notebook`` package, a failure in CI where a missing browser is one too). Screenshots
are prefixed with the interface; the README's picture comes from JupyterLab.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import uuid

import pytest

import nbmplock

from .panelview import jsonl_names, panel_css, read_counts, wait_counts, wait_state
from .lab import (
    REPO_ROOT,
    artifacts_dir,
    click_button,
    notebook_errors,
    open_notebook,
    run_all_cells,
    screenshot,
    widget_render_errors,
    write_notebook,
)

pytestmark = pytest.mark.browser

N_ITEMS = 3000
ITEMS = [f"item-{i:05d}" for i in range(N_ITEMS)]

N_DOCS = 600
BAD_DOCS = ["doc-0517.txt", "doc-0558.txt", "doc-0583.txt"]  # late: not reached before Stop
DOCS_RUN = "runs/embed"  # relative to the notebook (short title in the README picture)

UIS = ("lab", "notebook7")

def cells(run: str) -> list[str]:
    return [
        f"""\
import json, time
import nbmplock

RUN = {run!r}

def process(item, shared_data, init_values):
    time.sleep(0.003)
    return item

def save(data_path, results, names):
    with open(RUN + "/data.jsonl", "a") as f:
        for name in names:
            f.write(json.dumps(name) + "\\n")
""",
        f"""\
job = nbmplock.run([f"item-{{i:05d}}" for i in range({N_ITEMS})], process, RUN,
                   num_procs=2, save_callback=save)
job
""",
        f"""\
# A second job, shown idle (Start is clicked from the browser): three documents fail.
import os

def load_model(shared_data):
    print(f"worker {{os.getpid()}}: model loaded")
    return {{"model": "tiny"}}

def embed(doc, shared_data, init_values):
    time.sleep(0.015)
    if doc in {tuple(BAD_DOCS)!r}:
        raise ValueError(f"{{doc}} is empty: nothing to embed")
    return [len(doc)]

docs = [f"doc-{{i:04d}}.txt" for i in range({N_DOCS})]
embeddings = nbmplock.Job(docs, embed, {DOCS_RUN!r}, num_procs=2, init_function=load_model)
embeddings
""",
    ]


# --------------------------------------------------------------------------- helpers


def quiet_pointer(page) -> None:
    """No hover or focus ring on a button in a screenshot."""
    page.mouse.move(1, 1)
    page.evaluate("() => document.activeElement && document.activeElement.blur()")


def padded(png: bytes, margin: int = 12) -> bytes:
    """The element screenshot on a white margin (the panel's text starts at its edge)."""
    try:
        from PIL import Image
    except ImportError:
        return png
    import io

    img = Image.open(io.BytesIO(png)).convert("RGB")
    out = Image.new("RGB", (img.width + 2 * margin, img.height + 2 * margin), "white")
    out.paste(img, (margin, margin))
    buf = io.BytesIO()
    out.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# --------------------------------------------------------------------------- test


def _require_notebook7() -> None:
    # the `notebook` package's server extension serves /notebooks/<nb>
    if importlib.util.find_spec("notebook") is None:
        missing = pytest.fail if os.environ.get("NBMPLOCK_REQUIRE_BROWSER") == "1" else pytest.skip
        missing("Jupyter Notebook 7 is not installed (pip install 'notebook>=7')")


@pytest.mark.parametrize("ui", UIS)
def test_panel_stop_resume_in_browser(ui, jupyter_server, browser_page):
    if ui == "notebook7":
        _require_notebook7()
    page = browser_page
    root = jupyter_server.root_dir.resolve()
    NOTEBOOK = f"panel_browser_{ui}.ipynb"
    run = str(root / "runs" / f"panel-{uuid.uuid4().hex[:8]}")
    shutil.rmtree(root / DOCS_RUN, ignore_errors=True)
    t0 = time.monotonic()

    write_notebook(root, NOTEBOOK, cells(run))
    open_notebook(page, jupyter_server, NOTEBOOK, ui=ui)
    t_open = time.monotonic()
    app = page.evaluate("() => window.jupyterapp.name")
    assert app == {"lab": "JupyterLab", "notebook7": "Jupyter Notebook"}[ui], app
    assert run_all_cells(page, name=NOTEBOOK), notebook_errors(page, NOTEBOOK)
    assert notebook_errors(page, NOTEBOOK) == []

    # -- the 3000-item job: progress, Stop -------------------------------------------
    wait_counts(page, 0, lambda c: c["done"] > 200, "done > 200")
    click_button(page, "Stop", index=0)
    wait_state(page, 0, "stopped")
    # "stopped" means the run has ended and closed its run directory. The badge and the
    # counts are separate widgets (two messages): wait for the counts to catch up.
    disk_first = nbmplock.read_snapshot(run).done
    wait_counts(page, 0, lambda c: c["done"] == disk_first and c["in_flight"] == 0,
                f"done {disk_first} (the run directory's count) after Stop")
    first = read_counts(page, 0)
    time.sleep(1.5)  # deliberately: the done count must not grow over this interval
    second = read_counts(page, 0)
    disk_second = nbmplock.read_snapshot(run).done
    assert first == second, f"counts changed after Stop: {first} -> {second}"
    assert disk_first == disk_second, f"run directory changed after Stop: {disk_first} -> {disk_second}"
    stopped_at = second["done"]
    assert 200 < stopped_at < N_ITEMS, second
    assert second == dict(done=stopped_at, total=N_ITEMS, done_before=0, done_now=stopped_at,
                          failed=0, in_flight=0), second
    assert stopped_at == disk_second, f"panel says {stopped_at}, read_snapshot says {disk_second}"
    saved = jsonl_names(os.path.join(run, "data.jsonl"))
    assert len(saved) == stopped_at, f"data.jsonl has {len(saved)} lines, panel says {stopped_at}"
    assert len(set(saved)) == len(saved), "an item was saved twice before Stop"
    assert set(saved) <= set(ITEMS)

    # -- Resume to the end ------------------------------------------------------------
    click_button(page, "Resume", index=0)
    wait_state(page, 0, "finished")
    final = wait_counts(page, 0, lambda c: c["done"] == N_ITEMS and c["in_flight"] == 0,
                        f"done {N_ITEMS}")
    assert final == dict(done=N_ITEMS, total=N_ITEMS, done_before=stopped_at,
                         done_now=N_ITEMS - stopped_at, failed=0, in_flight=0), final
    saved = jsonl_names(os.path.join(run, "data.jsonl"))
    assert len(saved) == N_ITEMS, f"data.jsonl has {len(saved)} lines, expected {N_ITEMS}"
    assert len(set(saved)) == N_ITEMS, "an item was saved more than once"
    assert set(saved) == set(ITEMS)
    snap = nbmplock.read_snapshot(run)
    assert snap.done == N_ITEMS and snap.failures == (), snap
    quiet_pointer(page)
    page.locator(panel_css(0)).screenshot(path=str(artifacts_dir() / f"{ui}-panel-finished.png"))
    t_main = time.monotonic()

    # -- the docs job: Start, Stop, Resume, three failures --------------------------------
    wait_state(page, 1, "idle")
    click_button(page, "Start", index=1)
    wait_counts(page, 1, lambda c: c["done"] >= 60, "docs job done >= 60")
    click_button(page, "Stop", index=1)
    wait_state(page, 1, "stopped")
    docs_disk = nbmplock.read_snapshot(str(root / DOCS_RUN)).done
    docs_stop = wait_counts(page, 1, lambda c: c["done"] == docs_disk and c["in_flight"] == 0,
                            f"docs job done {docs_disk} after Stop")
    assert docs_stop["failed"] == 0 and docs_stop["done"] < 517, docs_stop
    click_button(page, "Resume", index=1)
    wait_state(page, 1, "finished with failures")
    docs_final = wait_counts(page, 1, lambda c: c["in_flight"] == 0 and c["failed"] == 3,
                             "docs job finished with 3 failures")
    assert docs_final == dict(done=N_DOCS - 3, total=N_DOCS, done_before=docs_stop["done"],
                              done_now=N_DOCS - 3 - docs_stop["done"], failed=3,
                              in_flight=0), docs_final
    table = page.locator(panel_css(1, ".nbmplock-failures"))
    for doc in BAD_DOCS:
        assert doc in table.inner_text(), table.inner_text()
    assert nbmplock.read_snapshot(str(root / DOCS_RUN)).done == N_DOCS - 3

    # -- nothing went wrong in the notebook ----------------------------------------------
    assert notebook_errors(page, NOTEBOOK) == []
    assert widget_render_errors(page) == []
    assert page.get_by_text("Loading widget...").count() == 0

    # -- pictures --------------------------------------------------------------------------
    quiet_pointer(page)
    docs_panel = page.locator(panel_css(1))
    docs_panel.scroll_into_view_if_needed()
    png = padded(docs_panel.screenshot())
    (artifacts_dir() / f"{ui}-panel-docs.png").write_bytes(png)
    if ui == "lab" and os.environ.get("NBMPLOCK_UPDATE_DOCS") == "1":
        target = REPO_ROOT / "docs" / "panel.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)
    screenshot(page, f"{ui}-panel-page.png")

    print(f"{ui}: open {t_open - t0:.1f}s, stop/resume {t_main - t_open:.1f}s, "
          f"docs job {time.monotonic() - t_main:.1f}s; stopped at {stopped_at}/{N_ITEMS}")
