"""W6: peak RSS of the parent process, measured in a fresh subprocess.

The parent side (:func:`measure`) starts ``python -m bench.memprobe`` once per
measurement.  The child imports the library, builds the item list itself,
runs the map over it with a trivial function and prints one JSON line with
its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which does not
include the worker processes) and the size of the list
(``sys.getsizeof(list)`` plus ``sys.getsizeof`` of every string).

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

from .nbm import run_mp_lock
from .peers import run_multiprocess_chunked
from .workloads import LENGTH_TASK, label_items

#: Root of the repository (the directory holding the ``bench`` package).
REPO_ROOT = Path(__file__).resolve().parent.parent


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def list_bytes(items: Sequence[str]) -> int:
    """Memory held by *items*: the list object plus every string in it."""
    return sys.getsizeof(items) + sum(sys.getsizeof(s) for s in items)


def _probe_mp_lock(items: list[str], workers: int, scratch: Path) -> None:
    run_mp_lock(LENGTH_TASK, items, workers, scratch)


def _probe_multiprocess(items: list[str], workers: int, scratch: Path) -> None:
    run_multiprocess_chunked(LENGTH_TASK, items, workers, scratch)


#: Probe name -> (module imported before the baseline, map call).
PROBES: dict[str, tuple[str, Callable[[list[str], int, Path], None]]] = {
    "mp_lock": ("nbmplock", _probe_mp_lock),
    "multiprocess": ("multiprocess", _probe_multiprocess),
}


def probe(name: str, n_items: int, workers: int, scratch: Path) -> dict:
    """Run one probe in this process and return its measurements."""
    module, call = PROBES[name]
    __import__(module)
    baseline = peak_rss_bytes()
    items = label_items(n_items)
    size = list_bytes(items)
    after_list = peak_rss_bytes()
    start = time.perf_counter()
    call(items, workers, scratch)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_rss": peak_rss_bytes(),
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
    return json.loads(done.stdout.strip().splitlines()[-1])


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
