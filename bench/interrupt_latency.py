"""How long Ctrl-C takes to give control back while every worker is busy.

    python -m bench.interrupt_latency [--repeats 5]

Runs a script whose ``mp_lock`` call has 2 workers each stuck in a 5-second
item, sends it SIGINT (what Ctrl-C or a Jupyter kernel interrupt sends) and
times until the process has exited, its workers included. Target: under 2 s.
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

import psutil

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
        nbmplock.mp_lock([f"i{n}" for n in range(100)], busy, None, 2, sys.argv[1],
                         verbose=False)
''')


def one(tmp: str, index: int) -> float:
    script = os.path.join(tmp, "busy.py")
    with open(script, "w") as f:
        f.write(SCRIPT)
    proc = subprocess.Popen([sys.executable, script, os.path.join(tmp, f"run{index}")],
                            stderr=subprocess.PIPE, text=True)
    proc.stderr.readline()
    deadline = time.monotonic() + 30
    while len(psutil.Process(proc.pid).children()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # both workers deep in an item
    workers = psutil.Process(proc.pid).children()
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    psutil.wait_procs(workers, timeout=30)
    elapsed = time.monotonic() - started
    proc.stderr.read()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = [one(tmp, i) for i in range(args.repeats)]
    sys.stdout.write(f"Ctrl-C to exit, workers included: median {statistics.median(times):.3f} s "
                     f"(min {min(times):.3f}, max {max(times):.3f}, {len(times)} runs; "
                     "target < 2 s)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
