"""``python -m nbmplock``: look into a run directory from a terminal.

``status OUT_PATH``    done / failed / total, last update, live holder, last failures
``failures OUT_PATH``  every failure with its traceback
``forget OUT_PATH``    forget items on purpose (``--failed``, ``--all``, ``--items FILE``)
``repair OUT_PATH``    rewrite a damaged log, keeping every readable record
``demo [OUT_PATH]``    a short job that is stopped part-way and resumed

Works while a run is going on: it reads without taking the lock.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import sys

from ._keys import encoded_key
from ._read import STATE_DIR, read_contents, read_snapshot
from ._state import THROTTLED_SHARE
from ._store import forget_in, repair
from ._text import clip, short_repr


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _check_dir(out_path: str) -> str | None:
    if not os.path.isdir(os.path.join(out_path, STATE_DIR)):
        return f"{out_path!r} is not an nbmplock run directory (no {STATE_DIR}/ inside)"
    return None


def _live_text(live: dict) -> str:
    """What the live run said, about once a second: in flight, retrying, pace."""
    parts = [f"{live.get('in_flight', 0):,} in flight"]
    if live.get("retrying"):
        parts.append(f"{live['retrying']:,} waiting to retry")
    elapsed = live.get("elapsed") or 0.0
    if elapsed > 0:
        rate = live.get("done", 0) / elapsed
        parts.append(f"{rate:,.1f} items/s")
        limit = live.get("rate_limit")
        if limit:
            held = " (held to it)" if rate >= THROTTLED_SHARE * limit else ""
            parts.append(f"rate limit {limit:g}/s{held}")
    age = max(0.0, dt.datetime.now().timestamp() - live.get("time", 0))
    return ", ".join(parts) + f" (as of {age:.0f} s ago)"


def _line_keys(line: str) -> list:
    """The keys a line of ``forget --items`` may mean: the str itself, and the
    int it spells (int items are keyed as ints, not as their text)."""
    keys: list = [line]
    try:
        number = int(line.strip())
    except ValueError:
        return keys
    return keys + [encoded_key(number)]


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


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
    if snap.last_end:
        end = snap.last_end
        why = f" ({end['reason']})" if end.get("reason") else ""
        out.write(f"last run:      {end.get('status')} at {_when(end.get('time'))}{why}\n")
    if snap.holder_pid is None:
        out.write("live run:      none (a new run may start)\n")
    else:
        pid = f"pid {snap.holder_pid}" if snap.holder_pid > 0 else "unknown pid"
        out.write(f"live run:      yes, {pid} holds the lock\n")
        if snap.live:
            out.write(f"now:           {_live_text(snap.live)}\n")
    if len(snap.runs) > 1 or (snap.runs and snap.fingerprint
                              and snap.runs[0][0] != snap.fingerprint.run):
        out.write("done by run:\n")  # which work made the results kept now
        for run, fp, n in snap.runs:
            what = (f"function {fp.get('function', '?')}" if fp
                    else "a run of a release that did not record its work")
            latest = " (the latest)" if snap.fingerprint and run == snap.fingerprint.run else ""
            out.write(f"  {run or '?':16}  {n:>10,} done  {what}{latest}\n")
    if snap.torn_bytes:
        out.write(f"note:          a torn last record ({snap.torn_bytes} bytes) will be ignored\n")
    if snap.failures and last:
        out.write(f"\nlast {min(last, len(snap.failures))} failures:\n")
        for f in snap.failures[-last:]:
            out.write(f"  {short_repr(f.item, 60)}  {clip(f.summary(), 120)}  "
                      f"(attempts {f.attempts})\n")
    return 0


def failures(out_path: str, out) -> int:
    snap = read_snapshot(out_path)
    if not snap.failures:
        out.write("no failures recorded\n")
        return 0
    for f in snap.failures:
        out.write(f"=== {short_repr(f.item, 2000)}  [{f.kind}, attempts {f.attempts}, "
                  f"{_when(f.time)}]\n")
        out.write(f"{f.summary()}\n")
        if f.traceback:
            out.write(f.traceback.rstrip() + "\n")
        out.write("\n")
    return 0


def _demo_work(item: str, shared_data: dict, init_values: dict) -> str:
    """About 5 ms of CPU work per item: a stand-in for resizing an image."""
    h = hashlib.sha256(item.encode())
    for _ in range(shared_data["rounds"]):
        h = hashlib.sha256(h.digest())
    return h.hexdigest()[:12]


def demo(out_path: str, n_items: int, out) -> int:
    """Run a job, stop it part-way, resume it: what a crash-proof map looks like."""
    import json
    import threading

    from ._job import Job
    from ._progress import TqdmObserver
    from ._seed import is_mp_lock_completed, mp_lock

    items = [f"photo-{i:05d}.jpg" for i in range(n_items)]
    shared = {"rounds": 4000}

    def save(path: str, results: list, names: list) -> None:
        with open(path + ".jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"item": n, "hash": r}) + "\n" for n, r in zip(names, results))

    out.write(f"1. Start a job of {n_items} items on every core, and stop it once half are done "
              "(as a crash, Ctrl-C or the Stop button would):\n")
    out.flush()
    job = Job(items, _demo_work, out_path, save_callback=save, shared_data=shared)
    bar = TqdmObserver(job)
    halfway = threading.Event()
    job.subscribe(lambda e: halfway.set() if e.progress.done >= n_items // 2 else None)
    job.start()
    halfway.wait()
    if job.state.active:
        job.stop()
    job.wait()
    bar.close()
    done = job.progress.done
    out.write(f"   stopped: {done} items recorded done in {out_path!r}\n\n")
    out.write("2. Run the same call again: only what is not done runs.\n")
    out.flush()
    summary = mp_lock(items, _demo_work, save, os.cpu_count() or 1, out_path, shared_data=shared)
    out.write(f"   {summary}\n\n")
    with open(os.path.join(out_path, "data.jsonl"), encoding="utf-8") as f:
        saved = [json.loads(line)["item"] for line in f]
    out.write(f"3. Check: {len(saved)} lines saved for {n_items} items, "
              f"{len(saved) - len(set(saved))} saved twice; completed: "
              f"{is_mp_lock_completed(items, out_path)}.\n")
    out.write(f"   Inspect it any time: python -m nbmplock status {out_path}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line; output that cannot be encoded (a lone surrogate in an item,
    ``LANG=C``) is escaped, and a closed pipe (``| head``) ends it quietly."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):  # not a TextIOWrapper (a test's StringIO)
            pass
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (``| head``): no traceback. Point stdout at
        # /dev/null so that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbmplock",
                                     description="Inspect an nbmplock run directory.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_status = sub.add_parser("status", help="done / failed / total, live run, last failures")
    p_status.add_argument("out_path")
    p_status.add_argument("--last", type=int, default=5, help="failures to show (default 5)")
    p_fail = sub.add_parser("failures", help="every failure with its traceback")
    p_fail.add_argument("out_path")
    p_forget = sub.add_parser("forget", help="forget items on purpose, so they run again")
    p_forget.add_argument("out_path")
    what = p_forget.add_mutually_exclusive_group(required=True)
    what.add_argument("--failed", action="store_true", help="every failure")
    what.add_argument("--all", action="store_true", help="every item: the next run starts over")
    what.add_argument("--items", metavar="FILE",
                      help="a file of keys, one per line: str or int items themselves, or what "
                      "key= gave them")
    p_repair = sub.add_parser("repair", help="rewrite a damaged log, keeping readable records")
    p_repair.add_argument("out_path")
    p_demo = sub.add_parser("demo", help="a short job, stopped part-way and resumed")
    p_demo.add_argument("out_path", nargs="?", default=None,
                        help="run directory (default: a new temporary directory)")
    p_demo.add_argument("--items", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.command == "demo":
        import tempfile
        out_path = args.out_path or os.path.join(tempfile.mkdtemp(prefix="nbmplock-demo-"), "run")
        return demo(out_path, args.items, sys.stdout)
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
        if args.command == "forget":
            keys = None
            if args.items:
                with open(args.items, encoding="utf-8") as f:
                    asked = [line.rstrip("\n") for line in f if line.rstrip("\n")]
                contents = read_contents(args.out_path)
                known = contents.all_done() | set(contents.failures)
                keys, unknown = [], []
                for line in asked:
                    found = [k for k in _line_keys(line) if k in known]
                    keys += found
                    if not found:
                        unknown.append(line)
                if unknown:
                    sys.stderr.write(
                        f"nbmplock: {len(unknown):,} of the {len(asked):,} keys are neither done "
                        f"nor failed in {args.out_path!r} (first: {short_repr(unknown[0], 60)}); "
                        "--items takes one key per line: a str item itself, an int item, or "
                        "what key= gave it\n")
                if not keys:
                    return 1
            forget_in(args.out_path, keys=keys, failed=args.failed, everything=args.all)
            what = "every item" if args.all else ("every failure" if args.failed else
                                                  _count(len(keys), "item"))
            out.write(f"forgot {what}: recorded in the log; they run again on the next run\n")
            return 0
        kept = repair(args.out_path)
        dropped = (f"{kept.damaged:,} damaged part(s) of the log dropped (their items are "
                   "not done and run again)") if kept.damaged else "nothing was damaged"
        done = kept.all_done()
        out.write(f"repaired: {len(done):,} items done and {len(kept.live_failures(done)):,} failed "
                  f"are kept; {dropped}\n")
        return 0
    except BrokenPipeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a CLI reports, it does not dump a traceback
        sys.stderr.write(f"nbmplock: {type(exc).__name__}: {exc}\n")
        return 1
