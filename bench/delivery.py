"""Did a run deliver every item exactly once?  The same check for every library.

Inside the timed call the caller hands every result it receives to a
:class:`Receiver`, which keeps what the task says to keep of it (the result
itself for small ones, a fingerprint of a big one).  After the timer stopped,
:func:`check` compares what was kept with what the items must give, as
multisets: the count and the content.  One item missing and another
delivered twice, or a wrong result, is a :class:`ResultMismatch`; the
harness reports that run as FAILED and does not time it.

Calls that hand no results back (``mp_lock`` without a ``save_callback``,
a ``Job`` that keeps none) are checked against nbmplock's own counts
instead: every item ran (or, on a resume, none did) and none failed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Optional, Sequence

from .records import Counted, Outcome, ResultMismatch
from .workloads import Task


class Receiver:
    """The calling code's side of a map: keeps ``task.keep(result)`` of every result."""

    def __init__(self, task: Task) -> None:
        self._keep = task.keep
        self.kept: list = []

    def take(self, results: Iterable) -> None:
        """Receive some results (all at once, in batches, or as an iterator)."""
        if self._keep is None:
            self.kept.extend(results)
        else:
            self.kept.extend(map(self._keep, results))


class Tally:
    """A receiver that keeps no results, only their count and two power sums (int results).

    Used where the caller's memory is what is measured (W6): keeping the
    results would change the number.
    """

    def __init__(self) -> None:
        self.count = self.total = self.squares = 0

    def take(self, results: Iterable[int]) -> None:
        """Fold some results in."""
        for r in results:
            self.count += 1
            self.total += r
            self.squares += r * r



def expected_multiset(task: Task, items: Sequence[Any]) -> Counter:
    """What the caller must have kept for *items*, as a multiset."""
    return Counter(map(task.expect, items))


def _sample(values: Counter, limit: int = 3) -> str:
    return ", ".join(repr(v)[:40] for v in list(values)[:limit])


def check_results(kept: Sequence, expected: Counter) -> str:
    """Raise :class:`ResultMismatch` unless *kept* is exactly *expected*; else describe the check."""
    want = sum(expected.values())
    got = Counter(kept)
    if got != expected:
        missing, extra = expected - got, got - expected
        parts = [f"received {len(kept):,} results for {want:,} items"]
        if missing:
            parts.append(f"{sum(missing.values()):,} expected results missing (e.g. {_sample(missing)})")
        if extra:
            parts.append(f"{sum(extra.values()):,} unexpected or duplicated (e.g. {_sample(extra)})")
        raise ResultMismatch("; ".join(parts))
    return f"{want:,} results, exact multiset"


def check_tally(tally: Tally, task: Task, items: Sequence[Any]) -> str:
    """Raise :class:`ResultMismatch` unless *tally* folded exactly what *items* must give."""
    expected = Tally()
    expected.take(map(task.expect, items))
    got, want = (tally.count, tally.total, tally.squares), (expected.count, expected.total, expected.squares)
    if got != want:
        raise ResultMismatch(f"received {tally.count:,} results for {expected.count:,} items"
                             + ("" if tally.count != expected.count else ", with other values"))
    return f"{expected.count:,} results; count and power sums"


def check_counts(counted: Counted, ran: int, already_done: int) -> str:
    """Raise :class:`ResultMismatch` unless nbmplock's counts are the expected ones."""
    got = (counted.ran, counted.already_done, counted.failed)
    if got != (ran, already_done, 0):
        raise ResultMismatch(
            f"nbmplock reported {counted.ran:,} ran, {counted.already_done:,} already done, "
            f"{counted.failed:,} failed; expected {ran:,} ran, {already_done:,} already done, 0 failed")
    return f"no results back; nbmplock counts {ran:,} ran, {already_done:,} already done"


def check(receiver: Receiver, outcome: Optional[Outcome], expected: Counter, *, fresh: bool) -> str:
    """Check one run's delivery (see the module docstring); return what was checked.

    *fresh*: the run started from an empty run directory (every item must
    run); otherwise it resumed a finished one (no item may run again).
    """
    n = sum(expected.values())
    counted = outcome.counted if outcome is not None else None
    if counted is None:
        return check_results(receiver.kept, expected)
    if receiver.kept:
        raise ResultMismatch(f"a call that returns no results handed {len(receiver.kept):,} back")
    return check_counts(counted, n if fresh else 0, 0 if fresh else n)
