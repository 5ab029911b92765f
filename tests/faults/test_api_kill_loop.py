"""Issue 18: calling a real local HTTP API with ``concurrency=16``, SIGKILLed and resumed.

A driver subprocess (``api_driver.py``) runs ``mp_lock_value`` over 3,000
items, ``num_procs=2, concurrency=16``, each item one GET to an HTTP server
that this test runs on 127.0.0.1 (:mod:`.api_server`). The test SIGKILLs the
driver at random instants (seeded), reads the done-set after each kill, and
resumes until a run completes. The server's own log is the truth about what
was paid for:

* every item was answered, and the last run's results are exactly the answers;
* no item is recorded done without an answer (after every kill too);
* no item recorded done is called again by a later run;
* items answered but not recorded done at a kill (they are called again) are at
  most ``num_procs * concurrency`` per kill, and an item answered more than
  once was caught in flight by as many kills.

And the 429 test: a server that answers bursts (more than its limit in one
second) and the first call of some items with ``429`` + ``Retry-After``; the
job with ``rate_limit`` below the server's limit stays under it, waits at
least ``Retry-After`` before calling a throttled item again, and ends with no
failure.
"""

from __future__ import annotations

import bisect
from collections import Counter, defaultdict
from pathlib import Path

import pytest

import nbmplock
from nbmplock import _read

from . import api_driver
from .api_server import ApiServer
from .helpers import FIGURES, Driver

SCRIPT = Path(__file__).resolve().parent / "api_driver.py"
WORKERS, CONCURRENCY = 2, 16
RUN_END_BOUND = 120.0


def _kill_delay(rng) -> float:
    roll = rng.random()
    if roll < 0.2:
        return rng.uniform(0.0, 0.1)  # start-up: workers forking, first calls
    return rng.uniform(0.1, 0.9)


@pytest.mark.timeout(300)
def test_api_kill_loop(tmp_path, rng, seed):
    n_items, max_kills = 3000, 8
    items = api_driver.make_items(n_items, "k")
    out = tmp_path / "out"
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    done_after: dict[int, set] = {}
    kills = 0
    run = 0
    with ApiServer(delay=0.04) as server:
        while True:
            cfg = dict(run=run, out=str(out), ledger=str(ledger), url=server.url,
                       n_items=n_items, tag="k", workers=WORKERS, concurrency=CONCURRENCY)
            proc = Driver(cfg, ledger, SCRIPT)
            try:
                proc.wait_ready()
                if kills < max_kills:
                    rc = proc.wait(_kill_delay(rng))
                    if rc is None:
                        left = proc.kill_with_workers(5)
                        kills += 1
                        assert not left, f"workers {left} outlived the SIGKILLed driver"
                        done_after[run] = set(_read.read_done(str(out))) \
                            if out.exists() else set()
                        run += 1
                        continue
                else:
                    rc = proc.finish(timeout=RUN_END_BOUND)
                assert rc == 0, f"driver run {run} failed (rc {rc}): {proc.stderr()}"
                break
            finally:
                proc.close()
        final_run = run
        log = server.entries()

    final = api_driver.json.loads((ledger / f"final-r{final_run:04d}.json").read_text())
    assert final == {"completed": True, "results_ok": True}
    answered: dict[int, Counter] = defaultdict(Counter)
    for item, r, _, status in log:
        assert status == 200
        answered[r][item] += 1
    all_answered: Counter = Counter()
    for counts in answered.values():
        all_answered.update(counts)
    assert set(all_answered) == set(items), "every item answered"
    done_final = set(_read.read_done(str(out)))
    assert done_final == set(items)

    bound = WORKERS * CONCURRENCY
    previous: set = set()
    answered_so_far: set = set()
    in_flight_at: dict[int, set] = {}
    for r in range(final_run + 1):
        here = answered.get(r, Counter())
        again = set(here) & previous
        assert not again, f"run {r} called {len(again)} items recorded done before it: " \
                          f"{sorted(again)[:5]}"
        twice = [i for i, n in here.items() if n > 1]
        assert not twice, f"run {r} called {twice[:5]} twice without a kill"
        answered_so_far |= set(here)
        if r == final_run:
            break
        done = done_after[r]
        assert previous <= done, f"the done-set shrank after kill {r}"
        unpaid = done - answered_so_far
        assert not unpaid, f"after kill {r}, {len(unpaid)} items are recorded done without " \
                           f"an answer: {sorted(unpaid)[:5]}"
        in_flight_at[r] = set(here) - done
        assert len(in_flight_at[r]) <= bound, (
            f"{len(in_flight_at[r])} items answered but not recorded at kill {r}; "
            f"the bound is num_procs x concurrency = {bound}")
        previous = done
    caught = Counter(i for s in in_flight_at.values() for i in s)
    extra = {i: n for i, n in all_answered.items() if n > 1 + caught[i]}
    assert not extra, f"items paid for more often than kills caught them: {list(extra)[:5]}"
    duplicates = sum(n - 1 for n in all_answered.values())
    assert duplicates <= kills * bound
    print(f"api kill loop (seed {seed}): {kills} kills, {final_run + 1} runs, "
          f"{duplicates} items paid twice, at most "
          f"{max((len(s) for s in in_flight_at.values()), default=0)} per kill (bound {bound})")
    FIGURES.add("kills_survived", kills)
    FIGURES.add("faults_injected", kills)
    FIGURES.add("api_kill_loop_duplicates", duplicates)


def _max_in_window(times, window: float = 1.0) -> int:
    times = sorted(times)
    return max((bisect.bisect_right(times, t + window) - i for i, t in enumerate(times)),
               default=0)


@pytest.mark.timeout(120)
def test_429_with_retry_after_stays_under_the_limit_and_ends_without_failures(tmp_path):
    items = api_driver.make_items(120, "t")
    throttled = frozenset(items[::10])  # their first call gets 429, Retry-After: 0.5
    with ApiServer(delay=0.01, limit=25, throttle_first=throttled, retry_after=0.5) as server:
        job = nbmplock.Job(items, api_driver.call_api, str(tmp_path / "run"), num_procs=2,
                           concurrency=8, rate_limit="20/s", max_retries=5,
                           retry_on=api_driver.Throttled, retry_delay=0.2,
                           shared_data={"url": server.url}, init_function=api_driver.init)
        job.start()
        ended = job.wait(90)
        log = server.entries()
    assert ended, "the job did not end"
    assert job.state is nbmplock.JobState.FINISHED
    assert job.progress.failed == 0 and not job.failures
    assert job.results() == [api_driver.expected(i) for i in items]
    arrivals = [t for _, _, t, _ in log]
    assert _max_in_window(arrivals) <= 21, "rate_limit: at most rate + 1 calls in any 1 s"
    statuses = Counter(status for *_, status in log)
    assert statuses[200] == len(items)
    assert statuses[429] == len(throttled), "only the planted 429s: the limit kept us under"
    calls = defaultdict(list)
    for item, _, t, status in log:
        calls[item].append((t, status))
    for item in throttled:
        (t1, s1), (t2, s2) = sorted(calls[item])[:2]
        assert (s1, s2) == (429, 200)
        assert t2 - t1 >= 0.5 - 0.01, f"{item} called again {t2 - t1:.3f} s after its 429"
