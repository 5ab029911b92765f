"""Turn samples into per-library summaries, ratios and target checks.

Every sample gets a score (see :class:`bench.cases.WorkloadSpec`); W2 and W4
pair each run with the serial baseline of the *same repeat*.  A summary holds
the median and spread (min-max and interquartile range) of the scores, the
parent process's CPU per item, the slowdown against the fastest peer of its
workload, and, for the nbmplock rows that have one, the target and whether
it was met.

A row any of whose runs failed the delivery check, raised or timed out is
not timed at all: its numbers would not be comparable.  Two kinds of rows
are derived from others, paired repeat by repeat: UI (Job + Panel against
bare ``mp_lock``) and KEY (the per-item cost of items that are not ``str``).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from . import nbm, peers
from .cases import WORKLOADS_BY_KEY
from .records import ERROR, FAILED, OK, SKIPPED, Sample
from .workloads import INT_NUMBER_TASK, NUMBER_TASK, RECORD_NUMBER_TASK

MP_LOCK = nbm.MP_LOCK.library
MP_LOCK_VALUE = nbm.MP_LOCK_VALUE.library
JOB_PANEL = nbm.JOB_PANEL.library
UI_LIBRARY = "Job + headless Panel vs bare mp_lock (W1 time ratio)"

#: Row states other than measured, as the table shows them.
NOT_TIMED = {FAILED: "FAILED", ERROR: "ERROR", SKIPPED: "skipped"}


@dataclass
class Summary:
    """Aggregated result of one (workload, library) row."""

    workload: str
    library: str
    role: str
    unit: str
    higher_is_better: bool
    values: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    median: Optional[float] = None
    low: Optional[float] = None
    high: Optional[float] = None
    q1: Optional[float] = None
    q3: Optional[float] = None
    seconds_median: Optional[float] = None
    parent_cpu_us: Optional[float] = None  # median parent CPU per item, microseconds
    vs_best: Optional[float] = None
    state: str = OK  # OK, or why the row has no number: FAILED, ERROR, SKIPPED
    target: str = ""
    status: str = ""
    note: str = ""
    details: dict = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        """Whether the row has a number to show."""
        return self.state == OK and self.median is not None and not math.isnan(self.median)

    @property
    def spread(self) -> Optional[float]:
        """The run's own noise: (max - min) / median of the scores."""
        if not self.measured or not self.median:
            return None
        return (self.high - self.low) / abs(self.median)


def finite(values: Iterable[Optional[float]]) -> list[float]:
    """The values that are real numbers."""
    return [v for v in values if v is not None and not math.isnan(v)]


def fill_stats(row: Summary) -> Summary:
    """Set the median, min, max and quartiles of ``row.values``."""
    values = finite(row.values)
    if values:
        row.median = statistics.median(values)
        row.low, row.high = min(values), max(values)
        if len(values) >= 2:
            row.q1, _, row.q3 = statistics.quantiles(values, n=4, method="inclusive")
        else:
            row.q1 = row.q3 = values[0]
    if row.seconds:
        row.seconds_median = statistics.median(row.seconds)
    return row


def baseline_seconds(samples: Sequence[Sample]) -> dict[tuple[str, int], float]:
    """Serial-baseline seconds keyed by (workload, repeat)."""
    return {(s.workload, s.repeat): s.seconds for s in samples if s.role == "baseline" and s.status == OK}


def _median_extra(samples: Sequence[Sample], key: str) -> Optional[float]:
    values = [s.extra[key] for s in samples if key in s.extra]
    return statistics.median(values) if values else None


def details_for(workload: str, samples: Sequence[Sample], workers: int, median: Optional[float]) -> dict:
    """Extras: serial per-item cost, share of ideal (W2), disk usage (W5), RSS figures (W6)."""
    ok = [s for s in samples if s.status == OK]
    if ok and ok[0].role == "baseline":
        return {"per_item_ms": statistics.median(1000 * s.seconds / s.n_items for s in ok)}
    if workload == "W2" and median is not None:
        return {"of_ideal": median / workers}
    if workload == "W5":
        disk, raw = _median_extra(samples, "disk_bytes"), _median_extra(samples, "raw_bytes")
        return {
            "disk_bytes": disk,
            "apparent_bytes": _median_extra(samples, "apparent_bytes"),
            "raw_bytes": raw,
            "disk_vs_raw": disk / raw if disk is not None and raw else None,
            "prepare_seconds": _median_extra(samples, "prepare_seconds"),
        }
    if workload == "W6":
        return {
            "peak_rss": _median_extra(samples, "peak_rss"),
            "list_bytes": _median_extra(samples, "list_bytes"),
            "baseline_rss": _median_extra(samples, "baseline_rss"),
            "after_list_rss": _median_extra(samples, "after_list_rss"),
        }
    return {}


def state_and_note(samples: Sequence[Sample]) -> tuple[str, str]:
    """The row's state (the worst of its samples) and the first message explaining it."""
    for status in (FAILED, ERROR, SKIPPED):
        for s in samples:
            if s.status != status:
                continue
            if status == SKIPPED:
                return status, s.error or ""
            where = "setup" if s.repeat < 0 else f"repeat {s.repeat + 1}"
            return status, f"{where}: {s.error}".replace("setup: setup: ", "setup: ")
    return OK, ""


def parent_cpu_us(samples: Sequence[Sample]) -> Optional[float]:
    """Median parent CPU per item, in microseconds."""
    values = [1e6 * s.parent_cpu / s.n_items for s in samples
              if s.status == OK and s.parent_cpu is not None and s.n_items]
    return statistics.median(values) if values else None


def summarise_group(samples: Sequence[Sample], baselines: dict, workers: int) -> Summary:
    """Summary of the samples of one (workload, library) pair."""
    first = samples[0]
    spec = WORKLOADS_BY_KEY[first.workload]
    row = Summary(first.workload, first.library, first.role, spec.unit, spec.higher_is_better)
    row.state, row.note = state_and_note(samples)
    if row.state == OK:
        for s in samples:
            row.values.append(spec.score(s, baselines.get((s.workload, s.repeat)), workers))
            row.seconds.append(s.seconds)
        row.parent_cpu_us = parent_cpu_us(samples)
    fill_stats(row)
    row.details = details_for(first.workload, samples, workers, row.median if row.measured else None)
    return row


def group_samples(samples: Sequence[Sample], order: Sequence[tuple[str, str]] = ()) -> list[list[Sample]]:
    """Samples grouped by (workload, library): keys in *order* first, then first-seen order."""
    groups: dict[tuple[str, str], list[Sample]] = {key: [] for key in order}
    for s in samples:
        groups.setdefault((s.workload, s.library), []).append(s)
    return [group for group in groups.values() if group]


def best_peer(rows: Sequence[Summary], workload: str) -> Optional[Summary]:
    """The peer row with the best median in *workload*."""
    mine = [r for r in rows if r.workload == workload and r.role == "peer" and r.measured]
    if not mine:
        return None
    return (max if mine[0].higher_is_better else min)(mine, key=lambda r: r.median)


def set_vs_best(rows: Sequence[Summary]) -> None:
    """Set each row's slowdown against the fastest peer of its workload (1.0 = fastest)."""
    for workload in {r.workload for r in rows}:
        best = best_peer(rows, workload)
        if best is None or not best.median:
            continue
        for r in rows:
            if r.workload == workload and r.measured and r.role != "baseline" and r.median:
                r.vs_best = best.median / r.median if r.higher_is_better else r.median / best.median


# --------------------------------------------------------------------------
# Derived rows: paired repeat by repeat
# --------------------------------------------------------------------------

def paired_row(samples: Sequence[Sample], workload: str, numerator: str, denominator: str,
               combine: Callable[[Sample, Sample], float], row: Summary) -> Summary:
    """*row* filled with ``combine(numerator sample, denominator sample)`` per repeat."""
    mine = [s for s in samples if s.workload == workload]
    by_library = {lib: [s for s in mine if s.library == lib] for lib in (numerator, denominator)}
    for lib, group in by_library.items():
        state, note = state_and_note(group) if group else (SKIPPED, "not run")
        if state != OK:
            row.state = state
            row.note = f"{lib}: {note}"
            return row
    first = {s.repeat: s for s in by_library[numerator] if s.status == OK}
    second = {s.repeat: s for s in by_library[denominator] if s.status == OK}
    row.values = [combine(first[r], second[r]) for r in sorted(first.keys() & second.keys())]
    return fill_stats(row)


def ui_row(samples: Sequence[Sample]) -> Optional[Summary]:
    """The UI row: per-repeat ratio of Job+Panel time to bare mp_lock time on W1."""
    if not any(s.workload == "W1" for s in samples):
        return None
    row = Summary("UI", UI_LIBRARY, "nbmplock", "x", False)
    return paired_row(samples, "W1", JOB_PANEL, MP_LOCK, lambda a, b: a.seconds / b.seconds, row)


#: KEY rows: (workload, row over other items, the same row over str items).
KEYING_PAIRS: tuple[tuple[str, str, str], ...] = tuple(
    (workload, f"{base.library}, {task.label}", base.library)
    for workload, bases in (("W1", (nbm.MP_LOCK_VALUE,)), ("W5", (nbm.MP_LOCK, nbm.MP_LOCK_VALUE)))
    for base in bases
    for task in (INT_NUMBER_TASK, RECORD_NUMBER_TASK)
)


def keying_rows(samples: Sequence[Sample]) -> list[Summary]:
    """KEY rows: (time with int or dict items) - (time with str items), per item, in µs."""
    rows = []
    present = {s.workload for s in samples}
    for workload, variant, base in KEYING_PAIRS:
        if workload not in present:
            continue
        label = variant.removeprefix(base + ", ")
        name = f"{workload} {base.removeprefix('nbmplock ')}: {label} minus {NUMBER_TASK.label}"
        row = Summary("KEY", name, "nbmplock", "µs/item", False)
        rows.append(paired_row(samples, workload, variant, base,
                               lambda a, b: 1e6 * (a.seconds - b.seconds) / a.n_items, row))
    return rows


def insert_after(rows: list[Summary], workloads: Sequence[str], new: Sequence[Summary]) -> None:
    """Insert *new* after the last row of any of *workloads* (at the end if there is none)."""
    places = [i for i, r in enumerate(rows) if r.workload in workloads]
    at = places[-1] + 1 if places else len(rows)
    rows[at:at] = new


# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
    """What a target check may look at besides its row."""

    rows: dict[str, Summary]  # the rows of the same workload, by library
    best: Optional[Summary]   # the best peer of the workload
    workers: int
    cores: Optional[int]


#: A check returns the target's text and whether it was met (None: a number is missing).
Check = Callable[[Summary, Context], tuple[str, Optional[bool]]]


def _median_of(ctx: Context, library: str) -> Optional[float]:
    row = ctx.rows.get(library)
    return row.median if row is not None and row.measured else None


def check_w1(row: Summary, ctx: Context) -> tuple[str, Optional[bool]]:
    """Within 1.5x of the fastest peer and at least 5x mpire and joblib."""
    text = "≤1.5x fastest peer; ≥5x mpire & joblib"
    slower = [_median_of(ctx, peers.MPIRE.library), _median_of(ctx, peers.JOBLIB.library)]
    if row.vs_best is None or None in slower or not row.measured:
        return text, None
    times = [row.median / m for m in slower]  # throughputs: how many times faster
    text += f" ({times[0]:.1f}x and {times[1]:.1f}x faster)"
    return text, row.vs_best <= 1.5 and all(t >= 5 for t in times)


def within_noise(row: Summary, ctx: Context) -> tuple[str, Optional[bool]]:
    """No worse than the best peer by more than the best peer's own spread."""
    if ctx.best is None or ctx.best.spread is None:
        return "within the best peer's spread", None
    if not row.measured:
        return f"within the best peer's spread ({ctx.best.spread:.1%})", None
    noise = ctx.best.spread
    text = f"within the best peer's spread ({noise:.1%})"
    if row.higher_is_better:
        return text, row.median >= ctx.best.median * (1 - noise)
    return text, row.median <= ctx.best.median * (1 + noise)


def check_w2(row: Summary, ctx: Context) -> tuple[str, Optional[bool]]:
    """Within noise of the best peer; with 4+ workers on as many cores, also ≥0.95 of ideal."""
    text, ok = within_noise(row, ctx)
    if ctx.workers >= 4 and ctx.cores is not None and ctx.cores >= ctx.workers:
        text += f"; ≥0.95 × ideal ({ctx.workers} workers)"
        ok = None if ok is None else ok and row.median >= 0.95 * ctx.workers
    return text, ok


def check_w3(row: Summary, ctx: Context) -> tuple[str, Optional[bool]]:
    """Throughput within 1.2x of the fastest peer."""
    return "≤1.2x fastest peer", None if row.vs_best is None else row.vs_best <= 1.2


def resume_check(limit_seconds: float) -> Check:
    """W5: resume faster than *limit_seconds* and run directory at most 1.2x raw."""
    def check(row: Summary, ctx: Context) -> tuple[str, Optional[bool]]:
        text = f"<{limit_seconds:g} s; disk ≤1.2x raw"
        ratio = row.details.get("disk_vs_raw")
        if ratio is None or not row.measured:
            return text, None
        return text, row.median < limit_seconds and ratio <= 1.2
    return check


def below(limit: float, text: str) -> Check:
    """The median is at most *limit* (strictly below when *text* starts with ``<``)."""
    def check(row: Summary, ctx: Context) -> tuple[str, Optional[bool]]:
        if not row.measured:
            return text, None
        return text, row.median < limit if text.startswith("<") else row.median <= limit
    return check


#: (workload, library) -> check.  The like-for-like row, mp_lock_value, carries the map targets.
TARGETS: dict[tuple[str, str], Check] = {
    ("W1", MP_LOCK_VALUE): check_w1,
    ("W2", MP_LOCK_VALUE): check_w2,
    ("W3", MP_LOCK_VALUE): check_w3,
    ("W4", MP_LOCK_VALUE): within_noise,
    ("W5", MP_LOCK): resume_check(0.3),
    ("W5", MP_LOCK_VALUE): resume_check(1.5),
    ("W6", MP_LOCK): below(2.0, "<2x list size"),
    ("UI", UI_LIBRARY): below(1.05, "≤1.05"),
    ("INT", "nbmplock mp_lock"): below(2.0, "<2 s"),
}


def apply_targets(rows: Sequence[Summary], workers: int, cores: Optional[int]) -> None:
    """Fill ``target`` and ``status`` (PASS / MISS / n/a) of the rows that have a target."""
    for row in rows:
        check = TARGETS.get((row.workload, row.library))
        if check is None:
            continue
        same = {r.library: r for r in rows if r.workload == row.workload}
        ctx = Context(same, best_peer(rows, row.workload), workers, cores)
        row.target, outcome = check(row, ctx)
        row.status = {True: "PASS", False: "MISS", None: "n/a"}[outcome]


def summarise(samples: Sequence[Sample], workers: int, order: Sequence[tuple[str, str]] = (),
              cores: Optional[int] = None) -> list[Summary]:
    """All summary rows, in *order* of (workload, library); UI after W1, KEY after W5."""
    baselines = baseline_seconds(samples)
    rows = [summarise_group(group, baselines, workers) for group in group_samples(samples, order)]
    set_vs_best(rows)
    ui = ui_row(samples)
    if ui is not None:
        insert_after(rows, ("W1",), [ui])
    insert_after(rows, ("W1", "UI", "W5"), keying_rows(samples))
    apply_targets(rows, workers, cores)
    return rows
