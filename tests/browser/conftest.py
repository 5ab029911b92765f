"""Fixtures for browser tests: a real JupyterLab server and a headless Chromium page.

Every test collected under tests/browser/ gets ``pytest.mark.browser`` (deselect with
``-m 'not browser'``). The tests are skipped when /usr/bin/chromium or playwright is missing.

Fixtures:
  jupyter_server  (session) -> lab.JupyterServer with .url .token .root_dir .api(...)
  browser_page    (function) -> playwright sync Page in a fresh persistent context.
                  On test failure a screenshot is saved to artifacts/<test>-failure.png.
Helpers live in tests/browser/lab.py.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import psutil
import pytest

from . import lab

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.browser)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    if rep.when == "call" and rep.failed:
        _explain_failure(item, rep)
    return rep


def _explain_failure(item, rep) -> None:
    """A failed (or timed-out) browser test explains itself: while its kernel is still
    there, add every kernel's (and worker's) thread stacks (py-spy) and the server log's
    tail to the report, and keep them in artifacts/<test>-stacks.txt. (The page's
    screenshot and console are kept by ``browser_page``.) Expected failures (xfail) skip
    this: ``rep.failed`` is false for them."""
    server = item.funcargs.get("jupyter_server") if hasattr(item, "funcargs") else None
    if server is None or server.proc is None:
        return
    try:
        text = lab.server_diagnostics(server)
    except Exception as e:  # diagnostics must never hide the failure itself
        text = f"(diagnostics failed: {e!r})"
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.name)
    try:
        (lab.artifacts_dir() / f"{stem}-stacks.txt").write_text(text)
    except OSError:
        pass
    rep.sections.append(("kernel stacks (py-spy) and server log", text))


def _require_browser():
    # CI (.ci/run) sets NBMPLOCK_REQUIRE_BROWSER=1: there a missing browser fails.
    missing = pytest.fail if os.environ.get("NBMPLOCK_REQUIRE_BROWSER") == "1" else pytest.skip
    if not os.path.exists(lab.CHROMIUM):
        missing(f"{lab.CHROMIUM} not installed (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("playwright not installed")


@pytest.fixture(scope="session")
def jupyter_server(tmp_path_factory):
    """JupyterLab on 127.0.0.1:<free port> with a random token and isolated config dirs.

    Notebooks go in ``jupyter_server.root_dir``. The server log is copied to
    artifacts/jupyter-server.log at teardown."""
    _require_browser()
    base = tmp_path_factory.mktemp("jupyter")
    server = lab.JupyterServer(base)
    server.start(timeout=lab.STEP_TIMEOUT)
    try:
        yield server
    finally:
        server.stop()
        try:
            shutil.copy(server.log_path, lab.artifacts_dir() / "jupyter-server.log")
        except OSError:
            pass


@pytest.fixture(autouse=True)
def _fresh_kernels(request):
    """After each test that used ``jupyter_server`` (and after its browser closed), shut
    down all its sessions and kernels, so every test starts with a fresh kernel and no
    kernel process outlives the test (tests/conftest.py's ``no_orphans`` checks that)."""
    server = None
    if "jupyter_server" in request.fixturenames:
        server = request.getfixturevalue("jupyter_server")
    yield
    if server is not None:
        server.shutdown_kernels()


@pytest.fixture(scope="session")
def _playwright():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


@pytest.fixture
def browser_page(_playwright, tmp_path_factory, request):
    """A page of Debian's Chromium (headless, persistent context in a fresh temp dir)."""
    profile = tmp_path_factory.mktemp("chromium-profile")
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    context = _playwright.chromium.launch_persistent_context(
        str(profile),
        executable_path=lab.CHROMIUM,
        headless=True,
        args=list(lab.CHROMIUM_ARGS),
        viewport={"width": 1400, "height": 1000},
    )
    console: list[str] = []
    try:
        context.set_default_timeout(lab._ms(lab.STEP_TIMEOUT))
        page = context.pages[0] if context.pages else context.new_page()
        page.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
        page.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
        yield page
        failed = any(
            getattr(getattr(request.node, f"rep_{w}", None), "failed", False)
            for w in ("setup", "call")
        )
        if failed:
            stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
            try:
                lab.screenshot(page, f"{stem}-failure.png")
            except Exception:
                pass
            (lab.artifacts_dir() / f"{stem}-console.log").write_text("\n".join(console))
    finally:
        # Chromium processes this context started (descendants of pytest via the
        # playwright driver): wait for them after close, kill any survivor by pid.
        chromium = [p for p in _descendants(me) if p.pid not in before and _is_chromium(p)]
        context.close()
        lab._reap(chromium, timeout=15)


def _descendants(proc):
    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


def _is_chromium(p) -> bool:
    try:
        return "chrom" in p.name().lower()
    except psutil.Error:
        return False
