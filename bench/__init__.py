"""Benchmark suite comparing nbmplock with other parallel-map libraries.

Run it from the repository root::

    python -m bench                  # full run: everything under bench/results/
    python -m bench --quick          # scaled-down sizes, into bench/results/quick/
    python -m bench --only W1,W3 --workers 4 --repeats 7

Modules, each importing only modules above it in this list (no circles):

* :mod:`bench.records` -- the records passed between modules (``Runner``,
  ``Measurement``, ``Sample``, ``ResultMismatch``, ...); imports no other.
* :mod:`bench.workloads` -- the picklable work functions, item builders,
  what a caller must receive per item, calibration and the workload sizes.
* :mod:`bench.loadmeter` -- how much CPU other processes took meanwhile.
* :mod:`bench.delivery` -- the check that every item was delivered exactly once.
* :mod:`bench.peers` -- one runner per peer library (multiprocess, stdlib
  multiprocessing, concurrent.futures, mpire, joblib, tqdm).
* :mod:`bench.nbm` -- the nbmplock runners (mp_lock_value, mp_lock with and
  without a save_callback, Job+Panel) and whether this version takes items
  that are not ``str``.
* :mod:`bench.memprobe` -- the fresh-subprocess peak-RSS probe used by W6.
* :mod:`bench.interrupt_latency` -- Ctrl-C with every worker busy (INT).
* :mod:`bench.cases` -- the registry of (workload, library) cases and how
  each is timed.
* :mod:`bench.harness` -- runs the cases interleaved repeat by repeat.
* :mod:`bench.analysis` -- medians, spreads, ratios and target checks.
* :mod:`bench.report` -- the Markdown table, JSON dump and PNG chart.
* :mod:`bench.w2_anatomy`, :mod:`bench.dask_bench`, :mod:`bench.store_choice`
  -- studies with a report of their own, also runnable alone.
* :mod:`bench.__main__` -- the command line.
"""
