"""Every measured number the README's Performance section and docs/performance.md
quote is held by a committed file under ``bench/results/``.

A measured number is one written with a decimal point or a thousands separator
(``1,364,811``, ``0.43``, ``1.37x``, ``30.1 s``); counts and settings such as
``2 workers`` or ``400 items`` are not checked. A number is backed when some
results file holds it, written the same way, as a whole number (``1.3`` is not
backed by ``1.37``). A failure names the number and the line that quotes it:
rerun the benchmark that makes it and quote its file, or drop the number.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# A number with a decimal point or a thousands separator: a measurement.
MEASURED = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+)(?![\w,]*\d)")
# Lines that quote something else than a measurement of ours (versions, dates).
NOT_MEASURED = re.compile(r"Python \d|\d{4}-\d{2}-\d{2}|version|v\d")


def _results_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(RESULTS.glob("*.md")))


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    rest = text[start + len(heading):]
    end = re.search(r"^## ", rest, re.M)
    return rest[:end.start()] if end else rest


def quoted_lines():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    yield from (("README.md", line) for line in _section(readme, "## Performance").splitlines())
    perf = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    yield from (("docs/performance.md", line) for line in perf.splitlines())


def _numbers(line: str) -> list[str]:
    line = re.sub(r"`[^`]*`", "", line)  # code: commands, options, names
    line = re.sub(r"\]\([^)]*\)", "]", line)  # link targets
    if NOT_MEASURED.search(line):
        line = re.sub(r"Python [\d.]+|\d{4}-\d{2}-\d{2}|v[\d.]+", "", line)
    return MEASURED.findall(line)


def test_every_quoted_measurement_is_in_a_results_file():
    held = set(MEASURED.findall(_results_text()))
    missing = [f"{where}: {number!r} in {line.strip()[:160]!r}"
               for where, line in quoted_lines() for number in _numbers(line)
               if number not in held]
    assert not missing, ("numbers quoted but held by no file under bench/results/:\n"
                         + "\n".join(missing))


@pytest.mark.parametrize("line, numbers", [
    ("| W1 | 1,364,811 items/s (0.43 µs) | 1.37x |", ["1,364,811", "0.43", "1.37"]),
    ("400 items × 10 ms on 2 workers, 5 repeats", []),
    ("`python -m bench --only W2` and [x](../bench/results/io.md)", []),
])
def test_what_counts_as_a_measurement(line, numbers):
    assert _numbers(line) == numbers
