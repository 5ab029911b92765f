"""How long Ctrl-C takes to give control back while every worker is busy.

    python -m bench.interrupt_latency [--repeats 5] [--workers 2]

Runs a script whose ``mp_lock`` call has every worker stuck in a 5-second
item, sends it SIGINT (what Ctrl-C or a Jupyter kernel interrupt sends) and
times until the process has exited, its workers included. Target: under 2 s.
``python -m bench`` runs the same measurement as its ``INT`` workload.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

SCRIPT = textwrap.dedent('''
    import sys, time
    import nbmplock

    def busy(item, shared_data, init_values):
        started = time.time()
        while time.time() - started < 5:
            pass
        return item

    if __name__ == "__main__":
        sys.stderr.write("ready\\n")
        sys.stderr.flush()
        nbmplock.mp_lock([f"i{n}" for n in range(100)], busy, None, int(sys.argv[2]), sys.argv[1],
                         verbose=False)
''')


def measure_once(scratch: Path, workers: int) -> float:
    """Seconds from SIGINT to the script and all its workers gone; raises if they are not."""
    import psutil

    script = scratch / "busy.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, os.fspath(script), os.fspath(scratch / "run"), str(workers)],
                            stderr=subprocess.PIPE, text=True)
    try:
        proc.stderr.readline()
        deadline = time.monotonic() + 30
        while len(psutil.Process(proc.pid).children()) < workers and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # every worker deep in an item
        workers_alive = psutil.Process(proc.pid).children()
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        _, left = psutil.wait_procs(workers_alive, timeout=30)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    if left:
        raise RuntimeError(f"{len(left)} worker(s) still alive 30 s after the interrupt")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    times = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            times.append(measure_once(Path(tmp), args.workers))
    sys.stdout.write(f"Ctrl-C to exit, workers included: median {statistics.median(times):.3f} s "
                     f"(min {min(times):.3f}, max {max(times):.3f}, {len(times)} runs, "
                     f"{args.workers} workers; target < 2 s)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
