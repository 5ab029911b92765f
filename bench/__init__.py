"""Benchmark suite comparing nbmplock with other parallel-map libraries.

Run it from the repository root::

    python -m bench --quick          # ~2 minute sanity pass, scaled-down sizes
    python -m bench                  # full run
    python -m bench --only W1,W3 --workers 4 --repeats 7

Modules:

* :mod:`bench.workloads` -- the picklable work functions, item builders,
  calibration and the workload sizes.
* :mod:`bench.peers` -- one runner per peer library (multiprocess, stdlib
  multiprocessing, concurrent.futures, mpire, joblib, tqdm).
* :mod:`bench.nbm` -- the nbmplock runners (mp_lock, mp_lock_value, Job+Panel)
  and the resume helpers.
* :mod:`bench.memprobe` -- the fresh-subprocess peak-RSS probe used by W6.
* :mod:`bench.cases` -- the registry of (workload, library) cases.
* :mod:`bench.harness` -- runs the cases interleaved repeat by repeat.
* :mod:`bench.analysis` -- medians, spreads, ratios and target checks.
* :mod:`bench.loadmeter` -- how much CPU other processes took during each workload.
* :mod:`bench.report` -- the Markdown table, JSON dump and PNG chart.
"""
