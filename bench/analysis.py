"""Turn samples into per-library summaries, ratios and target checks.

Every sample gets a score (see :class:`bench.cases.WorkloadSpec`); W2 and W4
pair each run with the serial baseline of the *same repeat*.  A summary holds
the median and spread (min-max and interquartile range) of the scores, the
slowdown against the fastest peer of its workload, and, for nbmplock rows, the
target and whether it was met.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from . import nbm, peers
from .cases import WORKLOADS_BY_KEY
from .harness import Sample

MP_LOCK = nbm.MP_LOCK.library
MP_LOCK_VALUE = nbm.MP_LOCK_VALUE.library
JOB_PANEL = nbm.JOB_PANEL.library
UI_LIBRARY = "Job + headless Panel vs bare mp_lock (W1 time ratio)"


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
    vs_best: Optional[float] = None
    target: str = ""
    status: str = ""
    note: str = ""
    details: dict = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        """Whether at least one repeat produced a number."""
        return self.median is not None and not math.isnan(self.median)


def finite(values: Iterable[float]) -> list[float]:
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
    return {(s.workload, s.repeat): s.seconds for s in samples if s.role == "baseline" and s.status == "ok"}


def _median_extra(samples: Sequence[Sample], key: str) -> Optional[float]:
    values = [s.extra[key] for s in samples if key in s.extra]
    return statistics.median(values) if values else None


def details_for(workload: str, samples: Sequence[Sample]) -> dict:
    """Extras: per-item cost of the serial baseline, disk usage (W5), RSS figures (W6)."""
    ok = [s for s in samples if s.status == "ok"]
    if ok and ok[0].role == "baseline":
        return {"per_item_ms": statistics.median(1000 * s.seconds / s.n_items for s in ok)}
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


def note_for(samples: Sequence[Sample]) -> str:
    """The first skip or error message among *samples*, with its repeat."""
    for s in samples:
        if s.status == "skipped":
            return f"skipped: {s.error}"
        if s.status == "error":
            where = "setup" if s.repeat < 0 else f"repeat {s.repeat + 1}"
            return f"error ({where}): {s.error}".replace("setup: setup: ", "setup: ")
    return ""


def summarise_group(samples: Sequence[Sample], baselines: dict, workers: int) -> Summary:
    """Summary of the samples of one (workload, library) pair."""
    first = samples[0]
    spec = WORKLOADS_BY_KEY[first.workload]
    row = Summary(first.workload, first.library, first.role, spec.unit, spec.higher_is_better)
    for s in samples:
        if s.status == "ok":
            row.values.append(spec.score(s, baselines.get((s.workload, s.repeat)), workers))
            row.seconds.append(s.seconds)
    row.note = note_for(samples)
    row.details = details_for(first.workload, samples)
    return fill_stats(row)


def group_samples(samples: Sequence[Sample], order: Sequence[tuple[str, str]] = ()) -> list[list[Sample]]:
    """Samples grouped by (workload, library): keys in *order* first, then first-seen order."""
    groups: dict[tuple[str, str], list[Sample]] = {key: [] for key in order}
    for s in samples:
        groups.setdefault((s.workload, s.library), []).append(s)
    return [group for group in groups.values() if group]


def set_vs_best(rows: Sequence[Summary]) -> None:
    """Set each row's slowdown against the fastest peer of its workload (1.0 = fastest)."""
    for workload in {r.workload for r in rows}:
        mine = [r for r in rows if r.workload == workload]
        peer_medians = [r.median for r in mine if r.role == "peer" and r.measured]
        if not peer_medians:
            continue
        higher = mine[0].higher_is_better
        best = max(peer_medians) if higher else min(peer_medians)
        for r in mine:
            if r.measured and r.role != "baseline" and best and r.median:
                r.vs_best = best / r.median if higher else r.median / best


def ui_row(samples: Sequence[Sample]) -> Optional[Summary]:
    """The UI row: per-repeat ratio of Job+Panel time to bare mp_lock time on W1."""
    w1 = [s for s in samples if s.workload == "W1"]
    if not w1:
        return None
    panel = {s.repeat: s.seconds for s in w1 if s.library == JOB_PANEL and s.status == "ok"}
    bare = {s.repeat: s.seconds for s in w1 if s.library == MP_LOCK and s.status == "ok"}
    row = Summary("UI", UI_LIBRARY, "nbmplock", "x", False)
    row.values = [panel[r] / bare[r] for r in sorted(panel.keys() & bare.keys())]
    if not row.values:
        notes = [note_for([s for s in w1 if s.library == lib]) for lib in (JOB_PANEL, MP_LOCK)]
        row.note = "; ".join(n for n in notes if n) or "needs both W1 rows"
    return fill_stats(row)


# --------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------

Check = Callable[[Summary, dict[str, Summary], int], Optional[bool]]


def _median_of(rows: dict[str, Summary], library: str) -> Optional[float]:
    row = rows.get(library)
    return row.median if row is not None and row.measured else None


def check_w1(row: Summary, rows: dict[str, Summary], workers: int) -> Optional[bool]:
    """Within 1.5x of the fastest peer and at least 5x mpire and joblib."""
    slower = [_median_of(rows, peers.MPIRE.library), _median_of(rows, peers.JOBLIB.library)]
    if row.vs_best is None or None in slower:
        return None
    return row.vs_best <= 1.5 and all(row.median >= 5 * m for m in slower)


def check_w2(row: Summary, rows: dict[str, Summary], workers: int) -> Optional[bool]:
    """Speedup at least 0.95 of ideal (= workers)."""
    return row.median >= 0.95 * workers


def check_w3(row: Summary, rows: dict[str, Summary], workers: int) -> Optional[bool]:
    """Throughput within 1.2x of the fastest peer."""
    return None if row.vs_best is None else row.vs_best <= 1.2


def check_w4(row: Summary, rows: dict[str, Summary], workers: int) -> Optional[bool]:
    """Wall time within 1.1x of ideal."""
    return row.median <= 1.1


def resume_check(limit_seconds: float) -> Check:
    """W5: resume faster than *limit_seconds* and run directory at most 1.2x raw."""
    def check(row: Summary, rows: dict[str, Summary], workers: int) -> Optional[bool]:
        ratio = row.details.get("disk_vs_raw")
        return None if ratio is None else row.median < limit_seconds and ratio <= 1.2
    return check


def check_w6(row: Summary, rows: dict[str, Summary], workers: int) -> Optional[bool]:
    """Peak RSS below twice the list size."""
    return row.median < 2.0


def check_ui(row: Summary, rows: dict[str, Summary], workers: int) -> Optional[bool]:
    """Job + Panel within 5% of bare mp_lock."""
    return row.median <= 1.05


#: (workload, library) -> (target text, check).
TARGETS: dict[tuple[str, str], tuple[str, Check]] = {
    ("W1", MP_LOCK): ("≤1.5x fastest peer; ≥5x mpire & joblib", check_w1),
    ("W2", MP_LOCK): ("≥0.95 × ideal speedup", check_w2),
    ("W2", MP_LOCK_VALUE): ("≥0.95 × ideal speedup", check_w2),
    ("W3", MP_LOCK): ("≤1.2x fastest peer", check_w3),
    ("W3", MP_LOCK_VALUE): ("≤1.2x fastest peer", check_w3),
    ("W4", MP_LOCK): ("≤1.1x ideal", check_w4),
    ("W4", MP_LOCK_VALUE): ("≤1.1x ideal", check_w4),
    ("W5", MP_LOCK): ("<0.3 s; disk ≤1.2x raw", resume_check(0.3)),
    ("W5", MP_LOCK_VALUE): ("<1.5 s; disk ≤1.2x raw", resume_check(1.5)),
    ("W6", MP_LOCK): ("<2x list size", check_w6),
    ("UI", UI_LIBRARY): ("≤1.05", check_ui),
}


def apply_targets(rows: Sequence[Summary], workers: int) -> None:
    """Fill ``target`` and ``status`` (PASS / MISS / n/a) of the rows that have a target."""
    for row in rows:
        target = TARGETS.get((row.workload, row.library))
        if target is None:
            continue
        row.target, check = target
        same_workload = {r.library: r for r in rows if r.workload == row.workload}
        outcome = check(row, same_workload, workers) if row.measured else None
        row.status = {True: "PASS", False: "MISS", None: "n/a"}[outcome]


def summarise(samples: Sequence[Sample], workers: int, order: Sequence[tuple[str, str]] = ()) -> list[Summary]:
    """All summary rows, in *order* of (workload, library), the UI row after W1."""
    baselines = baseline_seconds(samples)
    rows = [summarise_group(group, baselines, workers) for group in group_samples(samples, order)]
    set_vs_best(rows)
    ui = ui_row(samples)
    if ui is not None:
        last_w1 = max(i for i, r in enumerate(rows) if r.workload == "W1")
        rows.insert(last_w1 + 1, ui)
    apply_targets(rows, workers)
    return rows
