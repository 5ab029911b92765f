"""Write the results: Markdown table, raw JSON and a PNG chart.

All three files are written next to each other (``results.md``,
``results.json``, ``chart.png``), each through a ``*.tmp`` file renamed into
place so a crash never leaves half a file.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

from .analysis import NOT_TIMED, Summary
from .cases import WORKLOADS
from .loadmeter import WARN_SHARE
from .nbm import NOT_SUPPORTED
from .records import OK, SKIPPED, Sample

#: Distributions whose versions head the report.
VERSIONED = ("nbmplock", "multiprocess", "dill", "mpire", "joblib", "tqdm", "matplotlib", "psutil")

ROLE_COLOURS = {"peer": "#4C72B0", "nbmplock": "#DD8452", "baseline": "#9A9A9A"}
MIB = 1024 * 1024


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------

def nbmplock_version() -> str:
    """nbmplock's version, or why it is not importable."""
    try:
        import nbmplock
    except Exception as exc:
        return f"not importable ({type(exc).__name__}: {exc})"
    if not hasattr(nbmplock, "mp_lock"):
        return "incomplete (no mp_lock yet)"
    version = getattr(nbmplock, "__version__", None)
    if version:
        return str(version)
    try:
        return importlib.metadata.version("nbmplock") + " (installed metadata)"
    except importlib.metadata.PackageNotFoundError:
        return "unknown (source tree)"


def library_versions() -> dict[str, str]:
    """Versions of the benchmarked libraries."""
    versions = {}
    for name in VERSIONED:
        if name == "nbmplock":
            versions[name] = nbmplock_version()
            continue
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_model() -> str:
    """The CPU model name, if the OS tells."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict:
    """Cores, memory and CPU of this machine."""
    info = {"logical_cores": os.cpu_count(), "cpu": cpu_model()}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["ram_bytes"] = psutil.virtual_memory().total
    except ImportError:
        pass
    return info


def environment() -> dict:
    """Date, Python, platform, machine and library versions."""
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "start_method": multiprocessing.get_start_method(),
        "machine": machine(),
        "versions": library_versions(),
    }


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------

def display_value(unit: str, value: float) -> float:
    """*value* converted to the unit shown (bytes/s become MiB/s)."""
    return value / MIB if unit == "MiB/s" else value


def fmt(unit: str, value: Optional[float]) -> str:
    """*value* formatted for *unit*."""
    if value is None or math.isnan(value):
        return "—"
    v = display_value(unit, value)
    if unit in ("items/s", "MiB/s"):
        return f"{v:,.0f}"
    if unit == "s":
        return f"{v:.3f}"
    if unit in ("x", "µs/item"):
        return f"{v:.3f}"
    return f"{v:.2f}"


def fmt_us(us: Optional[float]) -> str:
    """Microseconds, three significant digits or so."""
    if us is None:
        return "—"
    return f"{us:,.0f}" if us >= 100 else f"{us:.2f}"


def fmt_bytes(n: Optional[float]) -> str:
    """A byte count in MiB."""
    return "—" if n is None else f"{n / MIB:,.1f} MiB"


def state_text(row: Summary) -> str:
    """Why a row has no number, in a word or three."""
    if NOT_SUPPORTED in row.note:
        return NOT_SUPPORTED
    if row.state == OK:
        return "no data"
    return NOT_TIMED[row.state] + ("" if row.state == SKIPPED else " (not timed)")


def result_cell(row: Summary) -> str:
    """``median unit (min–max)``, or why there is no number."""
    if not row.measured:
        return state_text(row)
    spread = f"{fmt(row.unit, row.low)}–{fmt(row.unit, row.high)}"
    return f"{fmt(row.unit, row.median)} {row.unit} ({spread})"


def details_cell(row: Summary, note: str) -> str:
    """Workload extras, the runner's note and any error, for the table."""
    parts = []
    d = row.details
    if d.get("per_item_ms") is not None:
        parts.append(f"serial {d['per_item_ms']:.2f} ms/item")
    if d.get("of_ideal") is not None:
        parts.append(f"{d['of_ideal']:.3f} of ideal")
    if row.workload == "W5" and d.get("disk_bytes") is not None:
        parts.append(
            f"disk {fmt_bytes(d['disk_bytes'])} = {d['disk_vs_raw']:.2f}x raw ({fmt_bytes(d['raw_bytes'])}); "
            f"prepare {d['prepare_seconds']:.1f} s"
        )
    if row.workload == "W6" and d.get("peak_rss") is not None:
        parts.append(
            f"peak RSS {fmt_bytes(d['peak_rss'])}, list {fmt_bytes(d['list_bytes'])}, "
            f"before list {fmt_bytes(d['baseline_rss'])}"
        )
    if note and row.state != SKIPPED:
        parts.append(note)
    if row.note:
        text = row.note if len(row.note) <= 200 else row.note[:197] + "..."
        if NOT_SUPPORTED in text:  # the result cell says it already: keep the reason
            text = text.replace(f"{NOT_SUPPORTED} ", "")
        elif row.state != OK:
            text = f"{row.state}: {text}"
        parts.append(text)
    return "; ".join(parts)


def md_escape(text: str) -> str:
    """Make *text* safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------

def header_lines(meta: dict) -> list[str]:
    """The bullet list heading the report."""
    env, m = meta["environment"], meta["environment"]["machine"]
    cores = f"{m['logical_cores']} logical cores"
    if m.get("physical_cores"):
        cores += f" ({m['physical_cores']} physical, {m.get('usable_cores', '?')} usable)"
    ram = f", {m['ram_bytes'] / 1024**3:.1f} GiB RAM" if m.get("ram_bytes") else ""
    mode = "quick" if meta["quick"] else "full"
    sizes = meta["sizes_text"]
    if meta["quick"]:
        mode += f" — sizes scaled down: {sizes} (full mode: {meta['full_sizes_text']})"
    else:
        mode += f" — {sizes}"
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        f"- **Date:** {env['date']}",
        f"- **Mode:** {mode}",
        f"- **Python:** {env['python']} ({env['implementation']}) on {env['platform']}, "
        f"start method `{env['start_method']}`",
        f"- **Machine:** {cores}{ram}, {m['cpu']}",
        f"- **Workers:** {meta['workers']} · **Repeats:** {meta['repeats']} per library, interleaved run by run "
        "(repeat 1 of every library, then repeat 2, ...; order shuffled each repeat, seeded)",
        f"- **Versions:** {versions}",
        f"- **Command:** `{meta.get('command', 'python -m bench')}`",
        f"- **Calibration:** {meta['loops_per_ms'] or 0:,.0f} busy-loop iterations per ms",
        f"- **Total wall time:** {meta['elapsed_seconds']:.0f} s",
        *load_lines(meta.get("foreign_cpu", {})),
    ]
    if meta.get("interrupted"):
        lines.append("- **Interrupted:** the run was stopped early; results are partial")
    return lines


def load_lines(foreign: dict[str, Optional[float]]) -> list[str]:
    """The background-load line, with a warning when other processes were busy."""
    known = {k: v for k, v in foreign.items() if v is not None}
    if not known:
        return []
    shares = ", ".join(f"{k} {v:.0%}" for k, v in known.items())
    line = f"- **Other processes' CPU use** (share of all cores while each workload ran): {shares}"
    busiest = max(known.values())
    if busiest > WARN_SHARE:
        line += (
            f" — **warning:** the machine was not idle (up to {busiest:.0%}); "
            "CPU-bound results (W2 speedup, W4 skew) are skewed and timings are noisier"
        )
    return [line]


def table_lines(rows: Sequence[Summary], notes: dict[tuple[str, str], str]) -> list[str]:
    """The results table."""
    lines = [
        "| Workload | Library | Result: median (min–max) | Wall s (median) | Parent CPU µs/item "
        "| vs fastest peer | Target | Check | Details |",
        "|---|---|---|---:|---:|---:|---|---|---|",
    ]
    for row in rows:
        wall = "—" if row.seconds_median is None else f"{row.seconds_median:.3f}"
        cpu = fmt_us(row.parent_cpu_us)
        vs = "—" if row.vs_best is None else f"{row.vs_best:.2f}x"
        cells = [
            row.workload, row.library, result_cell(row), wall, cpu, vs, row.target, row.status,
            details_cell(row, notes.get((row.workload, row.library), "")),
        ]
        lines.append("| " + " | ".join(md_escape(c) for c in cells) + " |")
    return lines


def legend_lines() -> list[str]:
    """What each workload measures and how to read the columns."""
    lines = ["## Workloads", ""]
    lines += [f"- **{w.key} {w.title}** ({w.unit}): {w.description}." for w in WORKLOADS]
    lines += [
        "- **UI**: time of `nbmplock.Job` with a headless `Panel` divided by bare `mp_lock` on W1, "
        "paired repeat by repeat; 1.0 means the panel costs nothing.",
        "- **KEY**: per-item cost of items that are not `str`: (time with int items, or with dict "
        "items and `key=`) minus (time with str items), divided by the items, paired repeat by "
        "repeat (the dict rows also ship a dict to the worker instead of a short string). "
        f"While nbmplock refuses such items the rows say \"{NOT_SUPPORTED}\".",
        "",
        "**nbmplock rows.** `mp_lock_value` returns every result, as every peer does: it is the "
        "like-for-like row and carries the targets. `mp_lock + save_callback` hands every result "
        "to a callback. `mp_lock, no save_callback` and the Job row get no results back (for a "
        "function that saves its own output): faster, but not like for like.",
        "",
        "**Delivery check.** Every run of every library is checked after its timer stopped: "
        "each result names its item, and the caller must have received exactly the expected "
        "multiset (count and content: one item missing and another twice fails). Rows that get "
        "no results back are checked against nbmplock's own counts (every item ran, none failed; "
        "on a resume, none ran again). A row any of whose runs failed the check (FAILED) or "
        "raised (ERROR) is not timed.",
        "",
        "**Parent CPU µs/item** is the user + system CPU time of the benchmark process itself "
        "(its threads included, worker processes not) over the timed call, divided by the items "
        "(median of the repeats).",
        "",
        "**vs fastest peer** is the slowdown against the best peer median of the workload "
        "(1.00x = as good as the fastest peer; nbmplock and baseline rows are not peers). "
        "**Check** is PASS/MISS for the nbmplock targets, n/a when a number needed is missing. "
        "\"Within the best peer's spread\" (W2, W4) allows the run's own noise: the best peer's "
        "(max − min) / median over its repeats (0 with one repeat). "
        "Every run starts its own pool (start-up and shutdown are timed); nbmplock gets a "
        "fresh empty `out_path` per run. `n/4w` is the chunksize `Pool.map` would pick: "
        "ceil(items / (4 × workers)).",
    ]
    return lines


def study_lines(studies: dict[str, str]) -> list[str]:
    """The studies run with the suite and the files they wrote (or why not)."""
    if not studies:
        return []
    lines = ["## Studies", "", "Run by the same command; each wrote its own report beside this one.", ""]
    for key, outcome in studies.items():
        written = outcome.endswith(".md")
        lines.append(f"- **{key}**: " + (f"[{outcome}]({outcome})" if written else outcome))
    return lines


def error_lines(samples: Sequence[Sample]) -> list[str]:
    """Every error and skip message, in full."""
    seen, lines = set(), []
    for s in samples:
        if s.status == OK or (s.workload, s.library, s.error) in seen:
            continue
        seen.add((s.workload, s.library, s.error))
        where = "" if s.repeat < 0 else f" (repeat {s.repeat + 1})"
        lines.append(f"- {s.workload} {s.library}{where}: {s.status}: {s.error}")
    return ["## Errors and skips", ""] + lines if lines else []


def markdown(meta: dict, rows: Sequence[Summary], samples: Sequence[Sample], notes: dict) -> str:
    """The complete ``results.md`` text."""
    parts = ["# nbmplock benchmark results", "", *header_lines(meta), "", "## Results", "",
             *table_lines(rows, notes), "", "![chart](chart.png)", "", *legend_lines(), ""]
    studies = study_lines(meta.get("studies", {}))
    if studies:
        parts += [*studies, ""]
    errors = error_lines(samples)
    if errors:
        parts += [*errors, ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------
# Chart
# --------------------------------------------------------------------------

#: Reference lines per workload: (value or "workers", label).
REFERENCE_LINES = {
    "W2": [("workers", "ideal")],
    "W4": [(1.0, "ideal"), (1.1, "target")],
    "W5": [(0.3, "mp_lock target"), (1.5, "mp_lock_value target")],
    "W6": [(2.0, "target")],
    "UI": [(1.0, "no cost"), (1.05, "target")],
    "INT": [(2.0, "target")],
}

#: Chart titles of the derived rows.
DERIVED_TITLES = {"UI": "UI: Job+Panel / mp_lock", "KEY": "KEY: keying cost vs str items"}


def chart_panels(rows: Sequence[Summary]) -> list[tuple[str, list[Summary]]]:
    """Rows grouped by workload, in order."""
    panels: dict[str, list[Summary]] = {}
    for row in rows:
        panels.setdefault(row.workload, []).append(row)
    return list(panels.items())


def draw_panel(ax, key: str, rows: Sequence[Summary], workers: int) -> None:
    """One horizontal bar chart: medians with min–max whiskers."""
    labels, medians, lows, highs, colours = [], [], [], [], []
    for row in reversed(rows):
        label = row.library if row.measured else f"{row.library} ({state_text(row)})"
        labels.append(label)
        if row.measured:
            med = display_value(row.unit, row.median)
            medians.append(med)
            lows.append(med - display_value(row.unit, row.low))
            highs.append(display_value(row.unit, row.high) - med)
        else:
            medians.append(0.0)
            lows.append(0.0)
            highs.append(0.0)
        colours.append(ROLE_COLOURS.get(row.role, "#4C72B0"))
    positions = range(len(labels))
    ax.barh(positions, medians, xerr=[lows, highs], color=colours, capsize=3)
    ax.set_yticks(list(positions), labels, fontsize=7)
    spec = {w.key: w for w in WORKLOADS}.get(key)
    title = f"{key} {spec.title}" if spec else DERIVED_TITLES.get(key, key)
    better = "higher" if rows[0].higher_is_better else "lower"
    ax.set_title(f"{title} — {rows[0].unit}, {better} is better", fontsize=9)
    positive = [m for m in medians if m > 0]
    if not positive:
        ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center", va="center", fontsize=8)
        ax.set_xticks([])
        return
    styles = ("--", ":", "-.")
    for (value, label), style in zip(REFERENCE_LINES.get(key, []), styles):
        x = workers if value == "workers" else value
        ax.axvline(x, color="#C44E52", linestyle=style, linewidth=1, label=label)
    if REFERENCE_LINES.get(key):
        ax.legend(fontsize=7, loc="lower right", framealpha=0.8)
    if key == "W1" and max(positive) / min(positive) > 50:
        ax.set_xscale("log")
    ax.tick_params(axis="x", labelsize=7)


def chart(path: Path, meta: dict, rows: Sequence[Summary]) -> None:
    """Write the PNG chart with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = chart_panels(rows)
    if not panels:
        return
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    heights = [max(max(len(p[1]) for p in panels[i * ncols:(i + 1) * ncols]), 2) for i in range(nrows)]
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(16 if ncols == 2 else 9, 0.32 * sum(heights) + 1.2 * nrows + 1),
        gridspec_kw={"height_ratios": heights}, squeeze=False, layout="constrained",
    )
    for ax, (key, panel_rows) in zip(axes.flat, panels):
        draw_panel(ax, key, panel_rows, meta["workers"])
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    env = meta["environment"]
    fig.suptitle(
        f"nbmplock benchmark — {env['date']} — {'quick' if meta['quick'] else 'full'} mode, "
        f"{meta['workers']} workers, {meta['repeats']} repeats, Python {env['python']}, "
        f"{env['machine']['logical_cores']} cores (bars: median, whiskers: min–max; "
        "orange = nbmplock, grey = serial baseline)",
        fontsize=9,
    )
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------

def write_text(path: Path, text: str) -> None:
    """Write *text* to *path* through a temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def to_json(meta: dict, rows: Sequence[Summary], samples: Sequence[Sample]) -> str:
    """Raw samples and summaries as JSON (NaN written as null)."""
    def clean(value):
        if isinstance(value, float) and math.isnan(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    data = {
        "meta": meta,
        "summaries": [dataclasses.asdict(r) for r in rows],
        "samples": [dataclasses.asdict(s) for s in samples],
    }
    return json.dumps(clean(data), indent=1, default=str)


def write_all(out: Path, meta: dict, rows: Sequence[Summary], samples: Sequence[Sample], notes: dict) -> dict[str, Path]:
    """Write results.md, results.json and chart.png into *out*; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "results.md", "json": out / "results.json", "chart": out / "chart.png"}
    write_text(paths["json"], to_json(meta, rows, samples))
    write_text(paths["markdown"], markdown(meta, rows, samples, notes))
    chart(paths["chart"], meta, rows)
    return paths
