"""Command line: ``python -m bench [--quick] [--workers N] [--repeats N] [--only W1,W3,DASK] [--out DIR]``.

Runs the workloads (W1-W6, INT) into ``results.md``, ``results.json`` and
``chart.png``, then the studies (W1ANATOMY, ANATOMY, W3ANATOMY, DASK, STORE), each into its own
Markdown file beside them.  Full mode writes to ``bench/results/``, the
files the README quotes; ``--quick`` writes to ``bench/results/quick/`` so a
quick check never overwrites them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import dask_bench, store_choice, w1_anatomy, w2_anatomy, w3_anatomy
from .analysis import summarise
from .cases import WORKLOADS, WORKLOADS_BY_KEY, Settings, WorkloadSpec
from .harness import run_workload
from .loadmeter import foreign_share, read_cpu
from .records import Sample
from .report import environment, table_lines, write_all
from .workloads import FULL_SIZES, QUICK_SIZES, calibrate_loops_per_ms

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Study:
    """A benchmark with a report of its own, written beside the suite's."""

    key: str
    title: str
    regenerate: Callable[..., Path]  # (out_dir, *, quick, workers, repeats) -> the file written
    problem: Callable[[], Optional[str]] = lambda: None


STUDIES: tuple[Study, ...] = (
    Study("W1ANATOMY", "where W1's time goes (nbmplock's phases vs Pool)", w1_anatomy.regenerate),
    Study("ANATOMY", "where W2's last percent goes (nbmplock vs Pool)", w2_anatomy.regenerate),
    Study("W3ANATOMY", "what W3's durable results cost (nbmplock vs mpire)", w3_anatomy.regenerate),
    Study("DASK", "nbmplock on Dask vs client.map", dask_bench.regenerate, dask_bench.distributed_problem),
    Study("STORE", "run-store format: SQLite vs append-only log", store_choice.regenerate),
)
STUDIES_BY_KEY: dict[str, Study] = {s.key: s for s in STUDIES}


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmark nbmplock against its peers.")
    parser.add_argument("--quick", action="store_true", help="scaled-down sizes, a few minutes")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--repeats", type=int, help="runs per library (default 5, or 3 with --quick)")
    parser.add_argument("--only", help="comma-separated workloads and studies to run, e.g. W1,W3,DASK "
                        f"(default all: {', '.join(all_keys())})")
    parser.add_argument("--out", type=Path,
                        help="output directory (default bench/results, or bench/results/quick with --quick)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()),
                        help="where temporary run directories go (default: the system temp dir)")
    parser.add_argument("--timeout", type=float,
                        help="per-run timeout in seconds, 0 for none (default 1800, or 300 with --quick)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    try:
        args.workloads, args.studies = select(args.only)
    except ValueError as exc:
        parser.error(str(exc))
    if args.out is None:
        args.out = RESULTS / "quick" if args.quick else RESULTS
    return args


def all_keys() -> list[str]:
    return [w.key for w in WORKLOADS] + [s.key for s in STUDIES]


def select(only: Optional[str]) -> tuple[list[WorkloadSpec], list[Study]]:
    """The workloads and studies named in ``--only`` (all when empty), in suite order."""
    if not only:
        return list(WORKLOADS), list(STUDIES)
    wanted = {key.strip().upper() for key in only.split(",") if key.strip()}
    unknown = wanted - WORKLOADS_BY_KEY.keys() - STUDIES_BY_KEY.keys()
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(sorted(unknown))}; choose from {', '.join(all_keys())}")
    return [w for w in WORKLOADS if w.key in wanted], [s for s in STUDIES if s.key in wanted]


def log(line: str) -> None:
    """Progress output."""
    print(line, flush=True)


def usable_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class SuiteRun:
    """Everything one run of the suite collected."""

    samples: list[Sample] = field(default_factory=list)
    notes: dict[tuple[str, str], str] = field(default_factory=dict)  # (workload, library) -> note, table order
    foreign_cpu: dict[str, Optional[float]] = field(default_factory=dict)
    workload_seconds: dict[str, float] = field(default_factory=dict)
    studies: dict[str, str] = field(default_factory=dict)  # key -> file written, or the error
    interrupted: bool = False


def run_suite(workloads: Sequence[WorkloadSpec], settings: Settings, repeats: int, suite: SuiteRun) -> None:
    """Run *workloads* one after the other into *suite*."""
    for spec in workloads:
        log(f"== {spec.key} {spec.title} ==")
        before = read_cpu()
        cases = spec.build(settings)
        suite.notes.update({(c.workload, c.library): c.note for c in cases})
        run_workload(cases, repeats, settings.timeout, suite.samples.append, log)
        del cases
        after = read_cpu()
        share = foreign_share(before, after)
        suite.foreign_cpu[spec.key] = share
        if before and after:
            suite.workload_seconds[spec.key] = after.wall - before.wall
            busy = "" if share is None else f"; other processes used {share:.0%} of the CPUs"
            log(f"   {spec.key} took {after.wall - before.wall:.0f} s{busy}")


def run_studies(studies: Sequence[Study], args: argparse.Namespace, suite: SuiteRun) -> None:
    """Run each study; one that cannot run or fails is reported, the others go on."""
    for study in studies:
        log(f"== {study.key} {study.title} ==")
        problem = study.problem()
        if problem:
            suite.studies[study.key] = f"skipped: {problem}"
            log(f"   skipped: {problem}")
            continue
        started = time.perf_counter()
        try:
            path = study.regenerate(args.out, quick=args.quick, workers=args.workers, repeats=args.repeats)
        except Exception as exc:  # report and go on, like a failing library
            suite.studies[study.key] = f"error: {type(exc).__name__}: {exc}"
            log(traceback.format_exc())
            continue
        suite.studies[study.key] = path.name
        log(f"   wrote {path} in {time.perf_counter() - started:.0f} s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the selected workloads and studies and write the report; return the exit status."""
    args = parse_args(argv)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    repeats = args.repeats or (3 if args.quick else 5)
    timeout = args.timeout if args.timeout is not None else (300.0 if args.quick else 1800.0)
    started = time.perf_counter()
    if args.workers > usable_cores():
        log(f"note: {args.workers} workers on {usable_cores()} usable cores; speedups will be capped")

    suite = SuiteRun()
    settings = None
    try:
        if args.workloads:
            log("calibrating the busy loop ...")
            settings = Settings(sizes, args.workers, calibrate_loops_per_ms(), args.scratch, timeout or None)
            log(f"  {settings.loops_per_ms:,.0f} loops per ms")
            run_suite(args.workloads, settings, repeats, suite)
        run_studies(args.studies, args, suite)
    except KeyboardInterrupt:
        suite.interrupted = True
        log("interrupted: writing partial results")

    if not args.workloads:
        return 130 if suite.interrupted else 0
    meta = {
        "environment": environment(),
        "quick": args.quick,
        "workers": args.workers,
        "repeats": repeats,
        "workloads": [w.key for w in args.workloads],
        "sizes": vars(sizes),
        "sizes_text": sizes.describe(),
        "full_sizes_text": FULL_SIZES.describe(),
        "loops_per_ms": settings.loops_per_ms if settings else None,
        "timeout_seconds": settings.timeout if settings else None,
        "elapsed_seconds": time.perf_counter() - started,
        "workload_seconds": suite.workload_seconds,
        "foreign_cpu": suite.foreign_cpu,
        "studies": suite.studies,
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "interrupted": suite.interrupted,
    }
    rows = summarise(suite.samples, args.workers, order=list(suite.notes), cores=usable_cores())
    paths = write_all(args.out, meta, rows, suite.samples, suite.notes)
    log("")
    log("\n".join(table_lines(rows, suite.notes)))
    log("")
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return 130 if suite.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
