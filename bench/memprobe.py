"""W6: peak RSS of the parent process, measured in a fresh subprocess.

The parent side (:func:`measure`) starts ``python -m bench.memprobe`` once per
measurement.  The child imports the library, builds the item list itself,
runs the map over it with a trivial function and prints one JSON line with
its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which does not
include the worker processes), the size of the list
(``sys.getsizeof(list)`` plus ``sys.getsizeof`` of every string) and its own
CPU time over the map.  The results are folded into a :class:`~bench.delivery.Tally`
(keeping them would change the peak) and checked, after the peak was read,
like every other run's: a mismatch exits non-zero.

Linux carries ``ru_maxrss`` over ``execve``: a process exec'd from the big
benchmark process starts out reporting the benchmark's own peak.  So the
probe forks once, first thing, and measures in that fork, whose counter
starts from the small fresh interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from . import delivery
from .nbm import MP_LOCK
from .peers import MULTIPROCESS_CHUNKED
from .records import ResultMismatch, Runner
from .workloads import NUMBER_TASK, label_items

#: Root of the repository (the directory holding the ``bench`` package).
REPO_ROOT = Path(__file__).resolve().parent.parent


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def list_bytes(items: Sequence[str]) -> int:
    """Memory held by *items*: the list object plus every string in it."""
    return sys.getsizeof(items) + sum(sys.getsizeof(s) for s in items)


#: Probe name -> (module imported before the baseline, runner).
PROBES: dict[str, tuple[str, Runner]] = {
    "mp_lock": ("nbmplock", MP_LOCK),
    "mp_lock-generator": ("nbmplock", MP_LOCK),
    "multiprocess": ("multiprocess", MULTIPROCESS_CHUNKED),
}
#: Probes handed a one-shot generator instead of a list: nbmplock reads it once,
#: up front, into the job; the list it would be is built only after the peak was
#: read, to report the ratio against the same ``list_bytes``.
GENERATOR_PROBES = {"mp_lock-generator"}


def _labels(n_items: int):
    """The items of :func:`label_items`, one at a time (a one-shot generator)."""
    for i in range(n_items):
        yield f"item-{i:08d}"


def probe(name: str, n_items: int, workers: int, scratch: Path) -> dict:
    """Run one probe in this process and return its measurements."""
    module, runner = PROBES[name]
    __import__(module)
    baseline = peak_rss_bytes()
    generator = name in GENERATOR_PROBES
    items = _labels(n_items) if generator else label_items(n_items)
    size = 0 if generator else list_bytes(items)
    after_list = peak_rss_bytes()
    tally = delivery.Tally()
    start, cpu = time.perf_counter(), time.process_time()
    outcome = runner.run(NUMBER_TASK, items, workers, scratch, tally)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = peak_rss_bytes()
    if generator:  # the list it stands for, measured after the peak was read
        items = label_items(n_items)
        size = list_bytes(items)
    try:
        if outcome is not None and outcome.counted is not None:
            checked = delivery.check_counts(outcome.counted, len(items), 0)
        else:
            checked = delivery.check_tally(tally, NUMBER_TASK, items)
    except ResultMismatch as exc:
        return {"mismatch": str(exc)}
    return {
        "delivery": checked,
        "seconds": seconds,
        "parent_cpu": cpu,
        "peak_rss": peak,
        "list_bytes": size,
        "baseline_rss": baseline,
        "after_list_rss": after_list,
    }


def measure(name: str, n_items: int, workers: int, scratch: Path, timeout: float | None) -> dict:
    """Run :func:`probe` in a fresh interpreter and return its result."""
    command = [
        sys.executable, "-m", "bench.memprobe", name,
        "--items", str(n_items), "--workers", str(workers), "--scratch", os.fspath(scratch),
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(
        command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout or None
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-6:]
        raise RuntimeError(f"memory probe exited with {done.returncode}: " + " | ".join(tail))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if "mismatch" in result:
        raise ResultMismatch(result["mismatch"])
    return result


def in_fork(fn: Callable[[], dict]) -> dict:
    """Run *fn* in a forked child (fresh ``ru_maxrss``) and return its result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, send JSON, never return
        os.close(read_fd)
        status = 1
        try:
            with os.fdopen(write_fd, "w") as pipe:
                pipe.write(json.dumps(fn()))
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        payload = pipe.read()
    _, wait_status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(wait_status)
    if code != 0:
        raise SystemExit(f"measuring child exited with {code}")
    return json.loads(payload)


def main(argv: Sequence[str] | None = None) -> None:
    """Child entry point: ``python -m bench.memprobe NAME --items N --workers W --scratch DIR``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", choices=sorted(PROBES))
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--scratch", type=Path, required=True)
    args = parser.parse_args(argv)
    result = in_fork(lambda: probe(args.name, args.items, args.workers, args.scratch))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
