"""The panel with items that are not strings (issue 15): dict rows, keyed by "id"."""

from __future__ import annotations

import pytest

import nbmplock

from . import helpers

pytest.importorskip("ipywidgets")
from nbmplock._panel import Panel  # noqa: E402


def needs_email(row, shared_data, init_values):
    if not row["email"]:
        raise ValueError(f"no e-mail address for {row['id']}")
    return row["email"].split("@")[1]


@pytest.mark.timeout(60)
def test_failures_of_unhashable_items_show_in_the_panel(tmp_path, caplog):
    """Bug: the panel kept its failure rows in a dict by item, so a failed dict row
    raised TypeError (unhashable) in the views thread and the table stayed empty."""
    rows = [{"id": f"r{i:03d}", "email": "" if i % 10 == 3 else f"u{i}@x.org"}
            for i in range(50)]
    job = nbmplock.Job(rows, needs_email, str(tmp_path / "run"), key="id", num_procs=2)
    panel = Panel(job)
    try:
        job.start()
        helpers.wait_job(job)
        panel.refresh()
        assert job.progress.failed == 5
        table = panel.failures_table.value
        assert "Failures (5)" in table and "no e-mail address for r013" in table
        assert "a view of the job raised" not in caplog.text
        # the same rows from disk, in a panel of a new Job over the same directory
        again = nbmplock.Job(rows, needs_email, str(tmp_path / "run"), key="id")
        other = Panel(again)
        try:
            assert "Failures (5)" in other.failures_table.value
        finally:
            other.close()
    finally:
        panel.close()
