"""How a Job shows itself: its panel in a notebook, a line of text elsewhere.

``nbmplock/__init__.py`` hands this module to :mod:`nbmplock._job` (``views``):
the Job calls it, and it imports the panel (and so ipywidgets) only when a Job
is displayed, so ``import nbmplock`` in a script imports neither.
"""

from __future__ import annotations

from typing import Any

from ._errors import MissingDependencyError

NO_WIDGETS_HINT = ' (for the live panel: pip install "nbmplock[notebook]")'


def panel(job) -> Any:
    """The job's panel, built on first use and the same for every display."""
    from ._panel import panel_for
    return panel_for(job)


def mimebundle(job, include=None, exclude=None) -> dict:
    text = job.status_text()
    try:
        widget = panel(job)
    except MissingDependencyError:
        return {"text/plain": text + NO_WIDGETS_HINT}
    if job.state.active:  # the text of an exported notebook is frozen at this moment
        text += " (live panel: open the notebook in Jupyter)"
    bundle = widget._repr_mimebundle_(include=include, exclude=exclude) or {}
    if isinstance(bundle, tuple):
        bundle = bundle[0]
    bundle = dict(bundle)
    bundle["text/plain"] = text
    return bundle
