"""``python -m nbmplock``: look into a run directory from a terminal.

``status OUT_PATH``    done / failed / total, last update, live holder, last failures
``failures OUT_PATH``  every failure with its traceback
``repair OUT_PATH``    rewrite a damaged log, keeping every readable record

Works while a run is going on: it reads without taking the lock.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys

from ._store import STATE_DIR, read_snapshot, repair


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _check_dir(out_path: str) -> str | None:
    if not os.path.isdir(os.path.join(out_path, STATE_DIR)):
        return f"{out_path!r} is not an nbmplock run directory (no {STATE_DIR}/ inside)"
    return None


def status(out_path: str, last: int, out) -> int:
    snap = read_snapshot(out_path)
    total = snap.fingerprint.n_items if snap.fingerprint else None
    total_text = f"{total:,}" if total is not None else "?"
    out.write(f"run directory: {out_path}\n")
    if snap.fingerprint:
        out.write(f"function:      {snap.fingerprint.function}\n")
    out.write(f"done:          {snap.done:,} / {total_text}\n")
    out.write(f"failed:        {len(snap.failures):,}\n")
    if total is not None:
        out.write(f"not done:      {max(0, total - snap.done):,} (failed included)\n")
    out.write(f"last update:   {_when(snap.last_update)}\n")
    if snap.holder_pid is None:
        out.write("live run:      none (a new run may start)\n")
    else:
        pid = f"pid {snap.holder_pid}" if snap.holder_pid > 0 else "unknown pid"
        out.write(f"live run:      yes, {pid} holds the lock\n")
    if snap.torn_bytes:
        out.write(f"note:          a torn last record ({snap.torn_bytes} bytes) will be ignored\n")
    if snap.failures and last:
        out.write(f"\nlast {min(last, len(snap.failures))} failures:\n")
        for f in snap.failures[-last:]:
            out.write(f"  {f.item!r:.60}  {f.summary():.120}  (attempts {f.attempts})\n")
    return 0


def failures(out_path: str, out) -> int:
    snap = read_snapshot(out_path)
    if not snap.failures:
        out.write("no failures recorded\n")
        return 0
    for f in snap.failures:
        out.write(f"=== {f.item!r}  [{f.kind}, attempts {f.attempts}, {_when(f.time)}]\n")
        out.write(f"{f.summary()}\n")
        if f.traceback:
            out.write(f.traceback.rstrip() + "\n")
        out.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbmplock",
                                     description="Inspect an nbmplock run directory.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_status = sub.add_parser("status", help="done / failed / total, live run, last failures")
    p_status.add_argument("out_path")
    p_status.add_argument("--last", type=int, default=5, help="failures to show (default 5)")
    p_fail = sub.add_parser("failures", help="every failure with its traceback")
    p_fail.add_argument("out_path")
    p_repair = sub.add_parser("repair", help="rewrite a damaged log, keeping readable records")
    p_repair.add_argument("out_path")
    args = parser.parse_args(argv)
    problem = _check_dir(args.out_path)
    if problem:
        sys.stderr.write(f"nbmplock: {problem}\n")
        return 2
    out = sys.stdout
    try:
        if args.command == "status":
            return status(args.out_path, args.last, out)
        if args.command == "failures":
            return failures(args.out_path, out)
        kept = repair(args.out_path)
        out.write(f"repaired: kept {kept} readable records\n")
        return 0
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not dump a traceback
        sys.stderr.write(f"nbmplock: {type(exc).__name__}: {exc}\n")
        return 1
