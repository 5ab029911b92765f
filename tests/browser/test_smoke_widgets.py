"""Smoke test of the browser harness: widgets render, background-thread updates arrive,
a button click reaches the kernel. No nbmplock code involved."""

import time

import pytest

from .lab import (
    click_button,
    notebook_errors,
    open_notebook,
    read_text,
    run_all_cells,
    screenshot,
    wait_text,
    widget_render_errors,
    write_notebook,
)

pytestmark = pytest.mark.browser

CELLS = [
    """\
import threading, time
import ipywidgets as widgets
from IPython.display import display

html = widgets.HTML(value="count=-")
html.add_class("smoke-root")
button = widgets.Button(description="Go")

def on_click(_):
    html.value = "clicked"

button.on_click(on_click)
display(widgets.VBox([button, html]))
""",
    """\
def count():
    for i in range(21):
        html.value = f"count={i}"
        time.sleep(0.05)

threading.Thread(target=count, daemon=True).start()
""",
]

HTML = ".smoke-root .widget-html-content"


def test_smoke_widgets(jupyter_server, browser_page):
    page = browser_page
    t0 = time.monotonic()
    write_notebook(jupyter_server.root_dir, "smoke.ipynb", CELLS)
    open_notebook(page, jupyter_server, "smoke.ipynb")
    t_open = time.monotonic()

    assert run_all_cells(page), notebook_errors(page)
    wait_text(page, HTML, "count=20")
    click_button(page, "Go")
    wait_text(page, HTML, "clicked")
    assert read_text(page, HTML) == "clicked"
    screenshot(page, "smoke.png")

    assert notebook_errors(page) == []
    assert widget_render_errors(page) == []
    print(f"open {t_open - t0:.1f}s, run+click {time.monotonic() - t_open:.1f}s")
