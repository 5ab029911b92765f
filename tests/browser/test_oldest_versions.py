"""The panel with the oldest ipykernel, ipywidgets and IPython nbmplock claims (issue 19).

A venv of its own gets exactly those versions (plus nbmplock's other runtime
dependencies, as ``pyproject.toml`` declares them); a kernel spec pointing at its
python is registered in the test server's isolated data dir; the basic panel scenario
runs in JupyterLab against that kernel: shown idle, Start, Stop, Resume, finished with
failures, the failures table shown. The notebook's first cell prints the versions the
kernel really runs, and the test checks them.

The venv is kept under pytest's cache dir (``.pytest_cache/d/oldest-kernel/``), keyed
by the pins and the Python version, so only the first run pays for the install (about
15 s from the package index); CI starts from a fresh clone and pays once.

``NBMPLOCK_OLDEST_PINS="ipykernel==6.5.1 ipywidgets==8.0.0 ipython==8.0.0"`` tries
other versions (how the minimums below were found).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

import nbmplock

from .lab import (
    REPO_ROOT,
    click_button,
    notebook_errors,
    notebook_outputs,
    open_notebook,
    run_all_cells,
    screenshot,
    widget_render_errors,
    write_notebook,
)
from .panelview import panel_css, read_counts, wait_counts, wait_state

pytestmark = pytest.mark.browser

# The oldest versions that install on Python 3.11 together and work with JupyterLab 4
# (see the report in the commit that set them). ipykernel < 6.5.1 requires IPython < 8,
# which nbmplock[notebook] excludes.
OLDEST = ("ipykernel==6.5.1", "ipywidgets==8.0.0", "ipython==8.0.0")
KERNEL = "nbmplock-oldest"

N_DOCS = 600
BAD_DOCS = ["doc-0517.txt", "doc-0558.txt", "doc-0583.txt"]


def pins() -> tuple[str, ...]:
    env = os.environ.get("NBMPLOCK_OLDEST_PINS")
    return tuple(env.split()) if env else OLDEST


def runtime_requirements() -> list[str]:
    """nbmplock's own dependencies and its ``notebook`` extra, from pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("reading pyproject.toml needs Python 3.11's tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["notebook"])


def venv_python(venv) -> str:
    return str(venv / "bin" / "python")


@pytest.fixture(scope="module")
def oldest_venv(request, tmp_path_factory):
    """A venv with the pinned versions; reused while the pins and Python are the same
    (unless pytest runs without its cache, ``-p no:cacheprovider``)."""
    want = list(pins())
    requirements = runtime_requirements() + want
    key = hashlib.sha256(json.dumps([sys.version, requirements]).encode()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)
    home = cache.mkdir("oldest-kernel") if cache is not None else tmp_path_factory.mktemp("oldest")
    venv = home / f"venv-{key}"
    marker = venv / "nbmplock-installed.json"
    if not marker.exists():
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True,
                       timeout=120)
        res = subprocess.run(
            [venv_python(venv), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             *requirements],
            capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            pytest.fail(f"pip could not install {requirements}:\n{res.stdout[-3000:]}"
                        f"\n{res.stderr[-3000:]}")
        marker.write_text(json.dumps(requirements))
        print(f"installed {want} in {time.monotonic() - t0:.0f}s")
    return venv


def cells(run: str) -> list[str]:
    return [
        "import sys, IPython, ipykernel, ipywidgets\n"
        "print(f'versions: ipykernel=={ipykernel.__version__} ipywidgets=={ipywidgets.__version__} '\n"
        "      f'ipython=={IPython.__version__} python {sys.version_info[0]}.{sys.version_info[1]}')\n",
        f"""\
import time
import nbmplock

def embed(doc, shared_data, init_values):
    time.sleep(0.015)
    if doc in {tuple(BAD_DOCS)!r}:
        raise ValueError(f"{{doc}} is empty: nothing to embed")
    return [len(doc)]

docs = [f"doc-{{i:04d}}.txt" for i in range({N_DOCS})]
job = nbmplock.Job(docs, embed, {run!r}, num_procs=2)
job
""",
    ]


def test_panel_with_oldest_kernel_and_widgets(jupyter_server, browser_page, oldest_venv):
    page, server = browser_page, jupyter_server
    want = pins()
    server.add_kernelspec(KERNEL, venv_python(oldest_venv), f"Python (oldest: {' '.join(want)})")
    nb = "oldest.ipynb"
    run = str(server.root_dir.resolve() / "runs" / f"oldest-{uuid.uuid4().hex[:8]}")
    write_notebook(server.root_dir, nb, cells(run), kernel=KERNEL,
                   kernel_display=f"Python (oldest: {' '.join(want)})")
    open_notebook(page, server, nb)
    assert run_all_cells(page, name=nb), notebook_errors(page, nb)
    assert notebook_errors(page, nb) == []

    # the kernel really is the old one
    text = "".join("".join(o.get("text", "")) for o in notebook_outputs(page, nb)
                   if o["cell"] == 0 and o.get("output_type") == "stream")
    shown = dict(re.findall(r"(\w+)==(\S+)", text))
    for pin in want:
        name, version = pin.split("==")
        assert shown.get(name) == version, f"the kernel runs {text.strip()!r}, not {pin}"

    # the basic panel scenario: idle, Start, Stop, Resume, finished with failures
    wait_state(page, 0, "idle")
    assert read_counts(page, 0)["total"] == N_DOCS
    click_button(page, "Start")
    wait_counts(page, 0, lambda c: c["done"] >= 60, "done >= 60")
    click_button(page, "Stop")
    wait_state(page, 0, "stopped")
    disk = nbmplock.read_snapshot(run).done
    stopped = wait_counts(page, 0, lambda c: c["done"] == disk and c["in_flight"] == 0,
                          f"done {disk} (the run directory's count) after Stop")
    assert stopped["failed"] == 0 and stopped["done"] < 517, stopped
    screenshot(page, "oldest-1-stopped")
    click_button(page, "Resume")
    wait_state(page, 0, "finished with failures")
    final = wait_counts(page, 0, lambda c: c["in_flight"] == 0 and c["failed"] == 3,
                        "finished with 3 failures")
    assert final == dict(done=N_DOCS - 3, total=N_DOCS, done_before=stopped["done"],
                         done_now=N_DOCS - 3 - stopped["done"], failed=3, in_flight=0), final
    table = page.locator(panel_css(0, ".nbmplock-failures")).inner_text()
    for doc in BAD_DOCS:
        assert doc in table, table
    assert widget_render_errors(page) == []
    assert page.get_by_text("Loading widget...").count() == 0
    screenshot(page, "oldest-2-finished")
    print(text.strip())
