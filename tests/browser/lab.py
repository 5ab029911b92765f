"""Helpers to drive a real JupyterLab in headless Chromium (playwright, sync API).

Used by ``tests/browser/conftest.py`` (fixtures ``jupyter_server`` and ``browser_page``)
and importable from browser tests::

    from .lab import write_notebook, open_notebook, run_all_cells, click_button, wait_text

See the shared notes on browser testing (shared/notes/browser-testing.md) for why things are done the way they are.
All waits are condition-based (no fixed sleeps); default step timeout is 90 s because the
CI machines have 2 slow shared cores.
"""

from __future__ import annotations

import json as _json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Pattern

import psutil

from ..helpers import thread_stacks

STEP_TIMEOUT = 90.0  # seconds, per waiting step
REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# JupyterLab user settings that keep the UI quiet and every cell in the DOM.
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def artifacts_dir() -> Path:
    """``<repo>/artifacts`` (git-ignored), created on demand."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def _ms(seconds: float) -> float:
    return float(seconds) * 1000.0


# --------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterServer:
    """A JupyterLab subprocess with isolated config dirs, on 127.0.0.1.

    Attributes: ``url`` (``http://127.0.0.1:<port>``, no trailing slash), ``token``,
    ``root_dir`` (Path notebooks are written to), ``port``, ``proc``, ``log_path``.
    """

    def __init__(self, base_dir: Path, root_dir: Path | None = None):
        self.base_dir = Path(base_dir)
        self.root_dir = Path(root_dir) if root_dir else self.base_dir / "work"
        self.root_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.token = secrets.token_hex(24)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "jupyter-server.log"
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    # -- lifecycle

    def start(self, timeout: float = STEP_TIMEOUT) -> "JupyterServer":
        b = self.base_dir
        dirs = {
            "JUPYTER_CONFIG_DIR": b / "config",
            "JUPYTER_DATA_DIR": b / "data",
            "JUPYTER_RUNTIME_DIR": b / "runtime",
            "JUPYTERLAB_SETTINGS_DIR": b / "lab-settings",
            "JUPYTERLAB_WORKSPACES_DIR": b / "lab-workspaces",
            "IPYTHONDIR": b / "ipython",
        }
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        checkpoints = b / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        for rel, content in LAB_SETTINGS.items():
            p = dirs["JUPYTERLAB_SETTINGS_DIR"] / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(_json.dumps(content, indent=2))

        env = dict(os.environ)
        env.update({k: str(v) for k, v in dirs.items()})
        env.pop("JUPYTER_TOKEN", None)
        env["PYTHONUNBUFFERED"] = "1"
        # Kernels started by this server can import the package under test.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )

        cmd = [
            sys.executable, "-m", "jupyter", "lab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--port-retries=0",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root_dir}",
            "--expose-app-in-browser",
            # Notebook 7's interface (/notebooks/<nb>, when `notebook` is installed) has
            # its own switch for window.jupyterapp; unused otherwise.
            "--JupyterNotebookApp.expose_app_in_browser=True",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly",
            f"--FileCheckpoints.checkpoint_dir={checkpoints.resolve()}",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")

        self._log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=str(self.root_dir),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_err: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"jupyter lab exited with code {self.proc.returncode}\n{self.log_tail()}"
                )
            try:
                self.api("GET", "/api/status", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                last_err = e
            time.sleep(0.25)  # polling interval, not a fixed wait
        raise TimeoutError(
            f"jupyter lab not ready after {timeout:.0f}s ({last_err!r})\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 30.0) -> None:
        """POST /api/shutdown, wait for the pid, then kill that pid and any of its
        remaining descendants by pid. Leaves nothing running."""
        proc = self.proc
        if proc is None:
            return
        descendants: list[psutil.Process] = []
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            pass
        if proc.poll() is None:
            try:
                self.api("POST", "/api/shutdown", timeout=10)
            except Exception:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=10)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    pass
        # Anything the server started that is still alive (kernels, terminals):
        # psutil.Process checks pid + create time, so a reused pid is never hit.
        try:
            descendants += psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        _reap(descendants, timeout=5)
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        self.proc = None

    def shutdown_kernels(self, timeout: float = 30.0) -> None:
        """Delete every session and kernel through the REST API, wait for the kernel
        processes (and anything they started) to exit, and kill survivors by pid.
        The server keeps running; the next notebook opened gets a fresh kernel."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            procs = []
        for kind in ("sessions", "kernels"):
            try:
                items = self.api("GET", f"/api/{kind}") or []
            except Exception:
                items = []
            for item in items:
                try:
                    self.api("DELETE", f"/api/{kind}/{item['id']}", timeout=timeout)
                except Exception:
                    pass  # already gone (a session delete also removes its kernel)
        _reap(procs, timeout)

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "---- jupyter server log (tail) ----\n" + "\n".join(lines[-n:])

    # -- REST

    def api(self, method: str, path: str, json: Any = None, timeout: float = 30.0) -> Any:
        """Call the Jupyter REST API with the token (urllib only).

        Returns the decoded JSON body, or None for an empty body. Raises
        urllib.error.HTTPError (with the body in ``.msg``) on HTTP errors."""
        data = None
        headers = {"Authorization": f"token {self.token}"}
        if json is not None:
            data = _json.dumps(json).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(
            self.url + "/" + path.lstrip("/"), data=data, method=method.upper(), headers=headers
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise urllib.error.HTTPError(e.url, e.code, f"{e.msg}: {detail}", e.hdrs, None)
        if not body:
            return None
        return _json.loads(body)

    def lab_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{urllib.request.pathname2url(str(name))}?token={self.token}"

    def reset_workspaces(self) -> None:
        """Forget every saved JupyterLab workspace, so the next page opens only the
        notebook asked for (else it restores the notebooks of earlier tests, whose
        cells and widgets would share the page)."""
        ids = (self.api("GET", "/lab/api/workspaces") or {}).get("workspaces", {}).get("ids", [])
        for wid in ids:
            try:
                self.api("DELETE", f"/lab/api/workspaces/{urllib.request.pathname2url(wid)}")
            except urllib.error.HTTPError:
                pass  # already gone

    def notebook_url(self, name: str, ui: str = "lab") -> str:
        """URL of notebook ``name`` in JupyterLab (``ui="lab"``) or in Jupyter
        Notebook 7's interface (``ui="notebook7"``, needs the ``notebook`` package)."""
        if ui == "lab":
            return self.lab_url(name)
        if ui == "notebook7":
            quoted = urllib.request.pathname2url(str(name))
            return f"{self.url}/notebooks/{quoted}?token={self.token}"
        raise ValueError(f"unknown ui {ui!r}: 'lab' or 'notebook7'")

    @property
    def data_dir(self) -> Path:
        """The server's isolated JUPYTER_DATA_DIR (kernel specs go in ``kernels/``)."""
        return self.base_dir / "data"

    def add_kernelspec(self, name: str, python: str | os.PathLike, display_name: str) -> Path:
        """Register a kernel spec ``name`` running ``python -m ipykernel_launcher`` in
        this server's isolated data dir (read when a kernel starts: no restart needed)."""
        d = self.data_dir / "kernels" / name
        d.mkdir(parents=True, exist_ok=True)
        spec = {
            "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": display_name,
            "language": "python",
            "metadata": {"debugger": False},
        }
        (d / "kernel.json").write_text(_json.dumps(spec, indent=1))
        return d

    def kernel_processes(self) -> list[psutil.Process]:
        """Live kernel processes this server started (its children running
        ``ipykernel_launcher``), oldest first. Their own children are not included."""
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []
        kernels = []
        for c in children:
            try:
                if _is_alive(c) and "ipykernel_launcher" in " ".join(c.cmdline()):
                    kernels.append(c)
            except psutil.Error:
                pass
        return sorted(kernels, key=lambda c: c.create_time())

    def kernel_process(self, kernel_id: str) -> psutil.Process | None:
        """The live process of kernel ``kernel_id`` (its connection file is
        ``kernel-<id>.json``; a restarted kernel keeps its id, so this is the newest)."""
        tag = f"kernel-{kernel_id}.json"
        found = None
        for k in self.kernel_processes():
            try:
                if any(tag in arg for arg in k.cmdline()):
                    found = k
            except psutil.Error:
                pass
        return found


def _is_alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(procs: list[psutil.Process], timeout: float) -> None:
    """Wait until every process in ``procs`` has exited (a zombie counts as exited),
    then kill the survivors by pid. psutil.Process checks pid + create time, so a
    recycled pid is never hit."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _is_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)  # polling interval
        alive = [p for p in alive if _is_alive(p)]
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    deadline = time.monotonic() + 10
    while any(_is_alive(p) for p in alive) and time.monotonic() < deadline:
        time.sleep(0.1)


# --------------------------------------------------------------------------- notebooks


def write_notebook(root_dir: str | os.PathLike, name: str, cells: list[str],
                   kernel: str = "python3", kernel_display: str = "Python 3 (ipykernel)") -> Path:
    """Write an nbformat v4 notebook of code cells under root_dir, for kernel spec
    ``kernel`` (see :meth:`JupyterServer.add_kernelspec` for others than python3).

    ``name`` is relative to root_dir (e.g. ``"smoke.ipynb"``). Returns its path."""
    nb = {
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": kernel, "display_name": kernel_display,
                           "language": "python"},
            "language_info": {"name": "python"},
        },
        "cells": [
            {
                "cell_type": "code",
                "id": f"cell-{i}",
                "metadata": {},
                "execution_count": None,
                "outputs": [],
                "source": src,
            }
            for i, src in enumerate(cells)
        ],
    }
    path = Path(root_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_json.dumps(nb, indent=1))
    return path


# JS: find the NotebookPanel for a path (or the current notebook when path is null).
_FIND_PANEL = r"""
(path) => {
  const app = window.jupyterapp;
  if (!app || !app.shell) return null;
  const isNb = (w) => w && w.content && w.context && w.sessionContext && w.content.model;
  if (path) {
    for (const w of app.shell.widgets('main')) {
      if (isNb(w) && (w.context.path === path || w.context.path.endsWith(':' + path))) return w;
    }
    return null;
  }
  const cur = app.shell.currentWidget;
  if (isNb(cur)) return cur;
  for (const w of app.shell.widgets('main')) { if (isNb(w)) return w; }
  return null;
}
"""

_KERNEL_STATE = (
    "(path) => { const panel = (" + _FIND_PANEL + ")(path);"
    " if (!panel) return 'no-panel';"
    " const k = panel.sessionContext.session && panel.sessionContext.session.kernel;"
    " return k ? k.status : 'no-kernel'; }"
)


def kernel_status(page, name: str | None = None) -> str:
    """Current kernel status ('idle', 'busy', 'starting', ..., 'no-kernel', 'no-panel')."""
    return page.evaluate(_KERNEL_STATE, name)


def wait_kernel_idle(page, timeout: float = STEP_TIMEOUT, name: str | None = None) -> None:
    """Wait until the notebook's kernel reports 'idle' (via ``jupyterapp``)."""
    try:
        page.wait_for_function(
            "(path) => (" + _KERNEL_STATE + ")(path) === 'idle'",
            arg=name, timeout=_ms(timeout), polling=200,
        )
    except Exception as e:
        raise TimeoutError(
            f"kernel not idle after {timeout:.0f}s (status={_safe_status(page, name)})"
        ) from e


def _safe_status(page, name):
    try:
        return kernel_status(page, name)
    except Exception as e:  # pragma: no cover - diagnostics only
        return f"? ({e!r})"


def open_notebook(page, server: JupyterServer, name: str, timeout: float = STEP_TIMEOUT,
                  ui: str = "lab") -> None:
    """Open ``name`` (relative to server.root_dir) in JupyterLab (or, ``ui="notebook7"``,
    in Jupyter Notebook 7's interface), wait for its cells, accept a kernel-selection
    dialog if one shows, and wait for the kernel to be idle. The page shows this notebook
    alone: JupyterLab's saved workspaces are reset first."""
    server.reset_workspaces()
    page.goto(server.notebook_url(name, ui), wait_until="domcontentloaded", timeout=_ms(timeout))
    wait_notebook_ready(page, name, timeout)


def wait_notebook_ready(page, name: str, timeout: float = STEP_TIMEOUT) -> None:
    """After a page load (or reload): wait for the notebook's cells and an idle kernel,
    accepting a kernel-selection dialog if one shows."""
    page.wait_for_selector(".jp-Notebook .jp-Cell", state="attached", timeout=_ms(timeout))
    page.wait_for_function(
        "(path) => !!(" + _FIND_PANEL + ")(path)", arg=name, timeout=_ms(timeout), polling=200
    )
    deadline = time.monotonic() + timeout
    accept = ".jp-Dialog .jp-Dialog-button.jp-mod-accept"
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(
                f"kernel for {name} not idle after {timeout:.0f}s "
                f"(status={_safe_status(page, name)})"
            )
        # Wake on whichever comes first: a dialog, or an idle kernel.
        try:
            state = page.wait_for_function(
                "([path, sel]) => document.querySelector(sel) ? 'dialog'"
                " : ((" + _KERNEL_STATE + ")(path) === 'idle' ? 'idle' : false)",
                arg=[name, accept], timeout=_ms(left), polling=200,
            ).json_value()
        except Exception:
            continue  # loop re-checks the deadline and raises with the status
        if state == "idle":
            break
        btn = page.locator(accept).first
        try:
            btn.click(timeout=10_000)
            page.locator(accept).first.wait_for(state="detached", timeout=10_000)
        except Exception:
            pass  # dialog vanished on its own; loop again
    page.evaluate(
        "(path) => { const p = (" + _FIND_PANEL + ")(path);"
        " window.jupyterapp.shell.activateById(p.id); }",
        name,
    )


def start_run_all(page, name: str | None = None) -> None:
    """Clear all outputs and start "Run All" (``notebook:run-all-cells``); returns at
    once. :func:`wait_run_all` waits for it to end."""
    page.evaluate(
        "async (path) => {"
        "  const p = (" + _FIND_PANEL + ")(path);"
        "  if (!p) throw new Error('no notebook panel for ' + path);"
        "  const app = window.jupyterapp;"
        "  app.shell.activateById(p.id);"
        "  await app.commands.execute('notebook:clear-all-cell-outputs');"
        "  window.__labRunAll = {done: false, ok: null, error: null};"
        "  app.commands.execute('notebook:run-all-cells').then("
        "    (ok) => { window.__labRunAll.ok = ok; window.__labRunAll.done = true; },"
        "    (e) => { window.__labRunAll.error = String(e); window.__labRunAll.done = true; });"
        "}",
        name,
    )


def wait_run_all(page, timeout: float = STEP_TIMEOUT, name: str | None = None) -> bool:
    """Wait until the "Run All" started by :func:`start_run_all` finished (no ``[*]``
    prompt, kernel idle). Returns JupyterLab's verdict (False if a cell raised)."""
    try:
        page.wait_for_function(
            "(path) => window.__labRunAll && window.__labRunAll.done"
            " && !Array.from(document.querySelectorAll('.jp-InputPrompt'))"
            "       .some((e) => e.textContent.includes('[*]'))"
            " && (" + _KERNEL_STATE + ")(path) === 'idle'",
            arg=name, timeout=_ms(timeout), polling=200,
        )
    except Exception as e:
        raise TimeoutError(
            f"run-all did not finish in {timeout:.0f}s (kernel={_safe_status(page, name)})"
        ) from e
    res = page.evaluate("() => window.__labRunAll")
    if res.get("error"):
        raise RuntimeError(f"notebook:run-all-cells failed: {res['error']}")
    return bool(res.get("ok"))


def run_all_cells(page, timeout: float = STEP_TIMEOUT, name: str | None = None) -> bool:
    """Clear all outputs, run all cells and wait until execution finished and the kernel
    is idle. Returns JupyterLab's verdict (False if a cell raised)."""
    start_run_all(page, name)
    return wait_run_all(page, timeout, name)


def kernel_id(page, name: str | None = None) -> str:
    """The id of the notebook's kernel (a restart keeps it; the process changes)."""
    kid = page.evaluate(
        "(path) => { const p = (" + _FIND_PANEL + ")(path);"
        " const k = p && p.sessionContext.session && p.sessionContext.session.kernel;"
        " return k ? k.id : null; }",
        name,
    )
    if not kid:
        raise RuntimeError(f"no kernel for notebook {name!r}")
    return kid


def save_notebook(page, name: str | None = None, timeout: float = STEP_TIMEOUT) -> None:
    """Save the notebook (outputs included) as Ctrl+S would, and wait until it is clean."""
    page.evaluate(
        "async (path) => { const p = (" + _FIND_PANEL + ")(path);"
        " window.jupyterapp.shell.activateById(p.id);"
        " await window.jupyterapp.commands.execute('docmanager:save'); }",
        name,
    )
    page.wait_for_function(
        "(path) => { const p = (" + _FIND_PANEL + ")(path); return p && !p.model.dirty; }",
        arg=name, timeout=_ms(timeout), polling=200,
    )


def click_menu(page, menu: str, command: str, timeout: float = STEP_TIMEOUT) -> None:
    """Open the menu bar's ``menu`` (its text, e.g. "Kernel") and click the entry
    running ``command`` (its ``data-command``, e.g. "kernelmenu:restart")."""
    page.locator(".lm-MenuBar-item").filter(has_text=_exact(menu)).first.click(
        timeout=_ms(timeout))
    page.locator(f'.lm-Menu li.lm-Menu-item[data-command="{command}"]').first.click(
        timeout=_ms(timeout))


def accept_dialog(page, timeout: float = STEP_TIMEOUT) -> str:
    """Click the accept button of the dialog that shows; return the dialog's text."""
    dialog = page.locator(".jp-Dialog").first
    dialog.wait_for(state="visible", timeout=_ms(timeout))
    text = dialog.inner_text(timeout=_ms(timeout))
    page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept").first.click(timeout=_ms(timeout))
    dialog.wait_for(state="detached", timeout=_ms(timeout))
    return text


def restart_kernel_from_menu(page, timeout: float = STEP_TIMEOUT) -> str:
    """Kernel menu > "Restart Kernel…" and accept the dialog, as a user does.
    Returns the dialog's text. Does not wait for the new kernel."""
    click_menu(page, "Kernel", "kernelmenu:restart", timeout)
    return accept_dialog(page, timeout)


def interrupt_from_toolbar(page, timeout: float = STEP_TIMEOUT) -> None:
    """Click the notebook toolbar's "Interrupt the kernel" button (■)."""
    page.locator('.jp-NotebookPanel-toolbar [data-command="notebook:interrupt-kernel"]').first.click(
        timeout=_ms(timeout))


def notebook_outputs(page, name: str | None = None) -> list[dict]:
    """All outputs of the live notebook model: ``[{"cell": i, **output_json}, ...]``."""
    return page.evaluate(
        "(path) => { const p = (" + _FIND_PANEL + ")(path);"
        " if (!p) throw new Error('no notebook panel for ' + path);"
        " const out = []; const cells = p.content.model.cells;"
        " for (let i = 0; i < cells.length; i++) {"
        "   const c = cells.get(i); if (c.type !== 'code') continue;"
        "   const outs = c.outputs;"
        "   for (let j = 0; j < outs.length; j++) out.push(Object.assign({cell: i}, outs.get(j).toJSON()));"
        " }"
        " return out; }",
        name,
    )


def notebook_errors(page, name: str | None = None) -> list[dict]:
    """Error outputs (output_type == 'error') from the live notebook model, each
    ``{"cell", "ename", "evalue", "traceback"}`` (traceback ANSI codes stripped)."""
    ansi = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
    errs = []
    for o in notebook_outputs(page, name):
        if o.get("output_type") == "error":
            errs.append({
                "cell": o["cell"],
                "ename": o.get("ename"),
                "evalue": o.get("evalue"),
                "traceback": "\n".join(ansi.sub("", t) for t in o.get("traceback", [])),
            })
    return errs


# --------------------------------------------------------------------------- widgets


def _exact(text: str) -> Pattern:
    return re.compile(r"^\s*" + re.escape(text) + r"\s*$")


def widget_button(page, text: str):
    """Locator for ipywidgets buttons whose text is exactly ``text`` in output areas."""
    return page.locator(".jp-OutputArea-output button.jupyter-button.widget-button").filter(
        has_text=_exact(text)
    )


def click_button(page, text: str, timeout: float = STEP_TIMEOUT, index: int = 0) -> None:
    """Click the ipywidgets Button whose text is exactly ``text`` (inside an output area).
    Waits for it to be visible and enabled."""
    btn = widget_button(page, text).nth(index)
    btn.wait_for(state="visible", timeout=_ms(timeout))
    btn.click(timeout=_ms(timeout))


def read_text(page, css: str, timeout: float = STEP_TIMEOUT) -> str:
    """Text of the first element matching ``css`` (e.g. a Label ``div.widget-label`` or an
    HTML widget ``.my-class .widget-html-content``), stripped. Waits for it to be attached."""
    loc = page.locator(css).first
    loc.wait_for(state="attached", timeout=_ms(timeout))
    return loc.inner_text(timeout=_ms(timeout)).strip()


def wait_text(page, css: str, expected: str | Pattern, timeout: float = STEP_TIMEOUT) -> str:
    """Wait until the first element matching ``css`` has text ``expected`` (exact string
    after stripping, or a compiled regex searched in the text). Returns the text."""
    loc = page.locator(css).first
    want = _exact(expected) if isinstance(expected, str) else expected
    deadline = time.monotonic() + timeout
    try:
        from playwright.sync_api import expect
        expect(loc).to_have_text(want, timeout=_ms(timeout))
    except AssertionError as e:
        try:
            last = loc.inner_text(timeout=1000)
        except Exception:
            last = "(element not found)"
        raise AssertionError(
            f"{css!r}: expected {expected!r} within {timeout:.0f}s, last text {last!r}"
        ) from e
    return loc.inner_text(timeout=_ms(max(1.0, deadline - time.monotonic()))).strip()


def widget_render_errors(page) -> list[str]:
    """Texts of widget views that failed to render ('Error displaying widget')."""
    return page.locator(".jp-OutputArea-output").filter(
        has_text="Error displaying widget"
    ).all_inner_texts()


def screenshot(page, name: str, full_page: bool = True) -> Path:
    """Save a PNG screenshot to ``<repo>/artifacts/<name>`` and return the path."""
    if not name.endswith(".png"):
        name += ".png"
    path = artifacts_dir() / name
    page.screenshot(path=str(path), full_page=full_page)
    return path


# --------------------------------------------------------------------------- diagnostics


def server_diagnostics(server: JupyterServer) -> str:
    """Stacks of every kernel of the server and of their children, and the server
    log's tail: attached to a failed browser test's report (see conftest.py)."""
    procs: list[psutil.Process] = []
    for k in server.kernel_processes():
        procs.append(k)
        try:
            procs += [c for c in k.children(recursive=True) if _is_alive(c)]
        except psutil.Error:
            pass
    return thread_stacks(procs) + "\n\n" + server.log_tail(80)
