"""Reading an nbmplock panel in the page, and a run directory beside it.

The panel's stable hooks (see the docstring of ``nbmplock/_panel.py``): the root has
the class ``nbmplock-panel``, the state badge ``nbmplock-state``, the counts line
``nbmplock-counts`` reads::

    done {done} / {total} · earlier runs {done_before} · this run {done_now} · failed {failed} · in flight {in_flight}

and the buttons are described Start, Stop, Force stop, Resume and Retry failed.
Several panels on one page are told apart by their order (``k``).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter

from .lab import STEP_TIMEOUT, _exact, wait_text

COUNTS_RE = re.compile(
    r"^done (\d+) / (\d+) · earlier runs (\d+) · this run (\d+) · failed (\d+)"
    r" · in flight (\d+)$"
)
COUNT_KEYS = ("done", "total", "done_before", "done_now", "failed", "in_flight")
BUTTONS = ("Start", "Stop", "Force stop", "Resume", "Retry failed")


def panel_css(k: int, part: str = "") -> str:
    """Selector of the ``k``-th panel of the page (``>> nth=k``), or of ``part`` in it."""
    return f".nbmplock-panel >> nth={k}" + (f" >> {part}" if part else "")


def parse_counts(text: str) -> dict | None:
    m = COUNTS_RE.match(text.strip())
    return dict(zip(COUNT_KEYS, map(int, m.groups()))) if m else None


def read_counts(page, k: int = 0) -> dict:
    text = page.locator(panel_css(k, ".nbmplock-counts")).inner_text(timeout=10_000)
    counts = parse_counts(text)
    assert counts is not None, f"counts line of panel {k} not in the stable format: {text!r}"
    return counts


def wait_counts(page, k: int, ok, what: str, timeout: float = STEP_TIMEOUT) -> dict:
    """Poll panel ``k``'s counts line until ``ok(counts)``; return those counts."""
    loc = page.locator(panel_css(k, ".nbmplock-counts"))
    deadline = time.monotonic() + timeout
    text = "(not shown)"
    while time.monotonic() < deadline:
        try:
            text = loc.inner_text(timeout=5_000)
        except Exception:
            text = "(not shown)"
        counts = parse_counts(text)
        if counts is not None and ok(counts):
            return counts
        time.sleep(0.1)  # polling interval
    raise AssertionError(f"panel {k}: {what} not seen within {timeout:.0f}s; last {text!r}")


def wait_state(page, k: int, state: str, timeout: float = STEP_TIMEOUT) -> None:
    """Wait until panel ``k``'s badge reads ``state`` ("running", "stopped", ...)."""
    wait_text(page, panel_css(k, ".nbmplock-state"), state, timeout=timeout)


def button_states(page, k: int = 0) -> dict[str, bool]:
    """``{description: enabled}`` for the five buttons of panel ``k``."""
    states = {}
    for name in BUTTONS:
        btn = page.locator(panel_css(k, "button.widget-button")).filter(has_text=_exact(name))
        btn.first.wait_for(state="visible", timeout=10_000)
        states[name] = btn.first.is_enabled(timeout=10_000)
    return states


def jsonl_names(path: str) -> list:
    """The items a test's save_callback (or process) appended to ``path``, one JSON
    value per line; a torn last line (the process was killed mid-write) is left out."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return out


def repeated(values) -> dict:
    """``{value: count}`` of the values that occur more than once."""
    return {v: n for v, n in Counter(values).items() if n > 1}


_RENDERED = (
    "() => { for (const o of document.querySelectorAll('.jp-OutputArea-output')) {"
    "   const t = o.innerText || '';"
    "   if (t.includes('Error displaying widget')) return 'error: ' + t.trim().slice(0, 300); }"
    " const c = document.querySelector('.nbmplock-panel .nbmplock-counts');"
    " return c && /^done \\d+ \\/ \\d+/.test(c.innerText.trim()) ? 'ok' : false; }"
)


def wait_panel_rendered(page, timeout: float = STEP_TIMEOUT) -> None:
    """Wait until a panel shows its counts line; fail at once, with the page's text, if
    a widget view failed to render instead ("Error displaying widget: model not found")."""
    try:
        state = page.wait_for_function(_RENDERED, timeout=timeout * 1000.0,
                                       polling=200).json_value()
    except Exception as e:
        loading = page.get_by_text("Loading widget...").count()
        raise AssertionError(f"no panel rendered within {timeout:.0f}s"
                             + (f" ({loading} 'Loading widget...' shown)" if loading else "")) from e
    assert state == "ok", f"the panel did not render: {state}"
