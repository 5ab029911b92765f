"""The README's options table and the options record (``nbmplock/_options.py``) agree.

Every option of the record has a row in the table between the README's
``<!-- options table: start -->`` and ``<!-- options table: end -->`` marks,
and every row is an option of the record, in the record's order, with the
record's default, its ``%%mplock`` flag, and a value in the ``mp_lock`` & co.
column exactly when ``mp_lock`` & co. take it. A failure prints the row to add
(written from the record; edit its last cell into plain words).
"""

from __future__ import annotations

import ast
import re
from dataclasses import fields
from pathlib import Path

import pytest

from nbmplock._options import Options, default, opt_of

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- options table: start -->", "<!-- options table: end -->"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table_rows() -> dict[str, list[str]]:
    """Option name -> the cells of its row (in the README's order)."""
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text, f"README.md lost its {START} / {END} marks"
    body = text.split(START, 1)[1].split(END, 1)[0]
    lines = [line for line in body.splitlines() if line.strip().startswith("|")]
    rows: dict[str, list[str]] = {}
    for line in lines[2:]:  # after the header and the |---| line
        cells = _cells(line)
        match = re.fullmatch(r"`(\w+)`", cells[0])
        assert match, f"an options row must start with `name`: {line!r}"
        assert match.group(1) not in rows, f"option {match.group(1)} has two rows"
        rows[match.group(1)] = cells
    return rows


def _literal(cell: str):
    """The Python value a cell shows as `value`, or a marker when it shows words."""
    match = re.fullmatch(r"`([^`]*)`", cell)
    if not match:
        return _WORDS
    try:
        return ast.literal_eval(match.group(1))
    except (ValueError, SyntaxError):
        return _WORDS


_WORDS = object()


def suggested_row(name: str) -> str:
    f = next(f for f in fields(Options) if f.name == name)
    opt = opt_of(f)
    seed = f"`{default(name, seed=True)!r}`" if opt.seed else "—"
    flag = f"`{opt.flag}`" if opt.flag else "—"
    return f"| `{name}` | `{default(name)!r}` | {seed} | {flag} | {opt.help} |"


def test_every_option_has_a_row_and_every_row_is_an_option():
    rows = table_rows()
    record = list(Options.names())
    missing = [name for name in record if name not in rows]
    extra = [name for name in rows if name not in record]
    message = []
    if missing:
        message.append("options missing from README.md's table; add these rows:\n"
                       + "\n".join(suggested_row(name) for name in missing))
    if extra:
        message.append(f"rows of README.md's table that are not options: {extra}")
    assert not message, "\n\n".join(message)
    assert list(rows) == record, "README.md's options table is not in the record's order"


@pytest.mark.parametrize("name", Options.names())
def test_row_matches_the_record(name):
    rows = table_rows()
    if name not in rows:
        pytest.skip("missing row: reported by test_every_option_has_a_row_and_every_row_is_an_option")
    _, job_default, seed_cell, flag_cell, meaning = rows[name][:5]
    opt = opt_of(next(f for f in fields(Options) if f.name == name))
    assert _literal(job_default) == default(name), (
        f"{name}: README says {job_default}, the record's default is {default(name)!r}")
    assert flag_cell.startswith(f"`{opt.flag}`") if opt.flag else flag_cell.startswith("—"), (
        f"{name}: README's flag cell {flag_cell!r}, the record's flag {opt.flag!r}")
    if opt.seed:
        assert not seed_cell.startswith("—"), f"{name}: mp_lock & co. take it"
        shown = _literal(seed_cell)
        if shown is not _WORDS:
            assert shown == default(name, seed=True), (
                f"{name}: README says {seed_cell} for mp_lock & co., the record "
                f"{default(name, seed=True)!r}")
    else:
        assert _literal(seed_cell) is _WORDS, (
            f"{name}: mp_lock & co. do not take it by keyword; say so in words")
    assert meaning, f"{name}: say what it does"
