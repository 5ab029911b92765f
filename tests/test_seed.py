"""The doc_ock API, kept: positional order, batches, shared data, init, resume."""

from __future__ import annotations

import os
import threading

import pytest

import nbmplock
from nbmplock import (InvalidArgumentsError, is_mp_lock_completed, mp_lock, mp_lock_batch,
                      mp_lock_value, mp_lock_values)
from nbmplock._read import read_contents

from . import helpers
from .helpers import Saver

ITEMS = [f"item-{i:04d}" for i in range(237)]


def test_positional_order_and_save_batches(tmp_path):
    saver = Saver()
    out = str(tmp_path / "run")
    summary = mp_lock(ITEMS, helpers.echo, saver, 2, out, 10, None, None, False)
    assert summary.done == len(ITEMS) and summary.failed == 0 and summary.skipped == 0
    assert sorted(saver.names) == sorted(ITEMS)
    sizes = [len(names) for _, _, names in saver.calls]
    assert all(s == 10 for s in sizes[:-1]) and 1 <= sizes[-1] <= 10
    assert {path for path, _, _ in saver.calls} == {f"{out}/data"}
    for _, results, names in saver.calls:
        assert results == names  # echo: result i belongs to name i
    assert is_mp_lock_completed(ITEMS, out)


def test_save_callback_is_never_concurrent(tmp_path):
    busy = threading.Lock()
    overlaps = []

    def save(path, results, names):
        if not busy.acquire(blocking=False):
            overlaps.append(names)
            return
        try:
            threading.Event().wait(0.001)
        finally:
            busy.release()

    mp_lock(ITEMS, helpers.echo, save, 2, str(tmp_path), save_batch=3, verbose=False)
    assert overlaps == []


def test_saves_that_returned_are_recorded_when_a_later_save_raises(tmp_path):
    """Consecutive save calls share one done record; a call that raises must not
    take the records of the calls before it down with it."""
    calls: list[list[str]] = []

    def save(path, results, names):
        if len(calls) == 40:
            raise OSError("disk full")
        calls.append(list(names))

    out = str(tmp_path / "run")
    with pytest.raises(OSError, match="disk full"):
        mp_lock(ITEMS, helpers.echo, save, 2, out, save_batch=1, verbose=False)
    saved = [name for names in calls for name in names]
    contents = read_contents(out)
    recorded = {ITEMS[i] for span in contents.spans for i in span.positions()}
    assert recorded == set(saved)  # every returned call recorded, nothing else


def test_shared_data_and_init_once_per_worker(tmp_path):
    results = mp_lock_value(ITEMS, helpers.with_init, None, 2, str(tmp_path / "r"),
                            shared_data={"token": "T"}, init_function=helpers.init_pid,
                            verbose=False)
    pids = {r.split(":")[1] for r in results}
    assert 1 <= len(pids) <= 2
    assert all(r.endswith(":T") for r in results)
    assert [r.split(":")[0] for r in results] == ITEMS


def test_init_values_and_shared_data_default_to_empty_dicts(tmp_path):
    def probe(item, shared_data, init_values):
        return (shared_data, init_values)

    results = mp_lock_value(["a"], probe, None, 1, str(tmp_path), verbose=False)
    assert results == [({}, {})]


def test_mp_lock_value_order_and_resume_returns_earlier_results(tmp_path):
    out = str(tmp_path / "v")
    first = mp_lock_value(ITEMS[:100], helpers.length, None, 2, out, verbose=False)
    assert first == [len(i) for i in ITEMS[:100]]
    calls = []
    second = mp_lock_values(ITEMS, helpers.length, lambda p, r, n: calls.extend(n), 2, out,
                            verbose=False)
    assert second == [len(i) for i in ITEMS]
    assert sorted(calls) == sorted(ITEMS[100:])  # only the new items ran


def _array_unless_seven(x, shared_data, init_values):
    import numpy as np
    if x % 10 == 7:
        raise ValueError("no sevens")
    return np.arange(3) + x


def test_results_that_are_arrays_or_frames_come_back_whole(tmp_path):
    """A numpy array (or DataFrame) answers == with an array, whose truth value
    raises: the results are assembled and checked by identity, never by ==."""
    np = pytest.importorskip("numpy")
    pd = pytest.importorskip("pandas")
    out = str(tmp_path / "arrays")
    got = mp_lock_value(list(range(40)), _array_unless_seven, None, 2, out, verbose=False,
                        errors="record")  # the sevens fail: their results are None
    assert len(got) == 40
    for x, value in enumerate(got):
        assert value is None if x % 10 == 7 else (value == np.arange(3) + x).all()
    job = nbmplock.Job(list(range(40)), _array_unless_seven, out)
    assert set(job.results(by_key=True)) == {b"i%d" % x for x in range(40) if x % 10 != 7}
    assert len(dict(job.iter_results())) == 36
    assert len(job.to_pandas()) == 40
    frames = mp_lock_value([1, 2, 3], helpers.frame_of, None, 2, str(tmp_path / "frames"),
                           verbose=False)
    assert [f["a"].tolist() for f in frames] == [[1, 1], [2, 2], [3, 3]]
    assert isinstance(frames[0], pd.DataFrame)


def test_mp_lock_batch(tmp_path):
    saver = Saver()
    summary = mp_lock_batch(ITEMS, helpers.batch_upper, saver, 2, str(tmp_path), 7,
                            verbose=False)
    assert summary.done == len(ITEMS)
    got = {n: r for _, results, names in saver.calls for n, r in zip(names, results)}
    assert got == {i: i.upper() for i in ITEMS}


def test_batch_returning_wrong_length_is_a_clear_failure(tmp_path):
    def bad(items, shared, init):
        return items[:-1]

    with pytest.raises(TypeError, match="must return a list of 3 results"):
        mp_lock_batch(["a", "b", "c"], bad, None, 1, str(tmp_path), 3, verbose=False)


def test_any_str_is_an_item(tmp_path):
    odd = ["", " ", "line\nbreak", "tab\there", "trailing ", " leading", "ünïcødé ✓ 漢字",
           "x" * 100_000, "\r\n", "null\x00byte", "item-1", "item-1 "]
    out = str(tmp_path)
    assert mp_lock_value(odd, helpers.echo, None, 2, out, verbose=False) == odd
    assert read_contents(out).done == set(odd)
    saver = Saver()
    mp_lock(odd, helpers.echo, saver, 2, out, verbose=False)
    assert saver.calls == []  # all recorded done: nothing runs again
    assert is_mp_lock_completed(odd, out)


def test_duplicates_run_once_and_values_fill_every_position(tmp_path):
    items = ["a", "b", "a", "c", "b", "a"]
    saver = Saver()
    assert mp_lock_value(items, helpers.echo, saver, 2, str(tmp_path), verbose=False) == items
    assert sorted(saver.names) == ["a", "b", "c"]


def test_exception_is_reraised_with_own_type_cause_and_note_then_resume(tmp_path):
    out = str(tmp_path)
    saver = Saver()
    with pytest.raises(ValueError, match="no sevens") as info:
        mp_lock(ITEMS, helpers.fail_on_seven, saver, 2, out, verbose=False)
    exc = info.value
    assert isinstance(exc.__cause__, nbmplock.RemoteTraceback)
    assert "fail_on_seven" in str(exc.__cause__)
    assert any("item-" in note and "resume" in note for note in exc.__notes__)
    done = read_contents(out).done
    assert done == set(saver.names)  # recorded done == handed to save_callback
    saver2 = Saver()
    summary = mp_lock(ITEMS, helpers.echo, saver2, 2, out, verbose=False)
    assert not set(saver2.names) & done
    assert set(saver2.names) | done == set(ITEMS)
    assert summary.skipped == len(done)


def test_errors_record_carries_on_and_reports(tmp_path):
    out = str(tmp_path)
    summary = mp_lock(ITEMS, helpers.fail_on_seven, None, 2, out, verbose=False,
                      errors="record")
    sevens = [i for i in ITEMS if i.endswith("7")]
    assert summary.failed == len(sevens)
    assert summary.done == len(ITEMS) - len(sevens)
    assert {f.item for f in summary.failures} == set(sevens)
    f = summary.failures[0]
    assert f.exc_type == "ValueError" and "no sevens" in f.message and "Traceback" in f.traceback
    # failures are not done: a resume tries them again
    summary = mp_lock(ITEMS, helpers.echo, None, 2, out, verbose=False)
    assert summary.done == len(sevens) and summary.failed == 0
    assert is_mp_lock_completed(ITEMS, out)


def test_max_retries_retries_before_failing(tmp_path):
    marker = tmp_path / "attempts"
    marker.mkdir()

    def flaky(item, shared, init):
        path = marker / item
        n = int(path.read_text()) if path.exists() else 0
        path.write_text(str(n + 1))
        if n < 2:
            raise RuntimeError("flaky")
        return item

    out = str(tmp_path / "run")
    assert mp_lock_value(["a", "b"], flaky, None, 1, out, verbose=False,
                         max_retries=2) == ["a", "b"]
    summary = mp_lock(["c"], flaky, None, 1, str(tmp_path / "run2"), verbose=False,
                      max_retries=1, errors="record")
    assert summary.failed == 1 and summary.failures[0].attempts == 2


@pytest.mark.parametrize("call, message", [
    (lambda o: mp_lock("abc", helpers.echo, None, 1, o), "Invalid data_list"),
    (lambda o: mp_lock([], helpers.echo, None, 1, o), "Invalid data_list"),
    (lambda o: mp_lock(["a", object()], helpers.echo, None, 1, o), "index 1"),
    (lambda o: mp_lock(["a"], "echo", None, 1, o), "Invalid process"),
    (lambda o: mp_lock(["a"], helpers.echo, 5, 1, o), "Invalid save_callback"),
    (lambda o: mp_lock(["a"], helpers.echo, None, 0, o), "Invalid num_procs"),
    (lambda o: mp_lock(["a"], helpers.echo, None, 2.0, o), "Invalid num_procs"),
    (lambda o: mp_lock(["a"], helpers.echo, None, True, o), "Invalid num_procs"),
    (lambda o: mp_lock(["a"], helpers.echo, None, 1, ""), "Invalid out_path"),
    (lambda o: mp_lock(["a"], helpers.echo, None, 1, 42), "Invalid out_path"),
    (lambda o: mp_lock(["a"], helpers.echo, None, 1, o, save_batch=0), "Invalid save_batch"),
    (lambda o: mp_lock(["a"], helpers.echo, None, 1, o, init_function=3), "Invalid init_function"),
    (lambda o: mp_lock_batch(["a"], helpers.batch_upper, None, 1, o, 0), "Invalid batch_size"),
    (lambda o: mp_lock(["a"], helpers.echo, None, 1, o, errors="ignore"), "Invalid errors"),
    (lambda o: mp_lock(["a"], helpers.echo, None, 1, o, item_timeout=-1), "Invalid item_timeout"),
    (lambda o: mp_lock(["a"], helpers.echo, None, 1, o, start_method="thread"), "Invalid start_method"),
    (lambda o: mp_lock(["a"], helpers.echo, None, 1, o, colour="red"), "Invalid colour"),
    (lambda o: mp_lock((i for i in ""), helpers.echo, None, 1, o), "got no item"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, call, message):
    out = str(tmp_path / "never")
    with pytest.raises(InvalidArgumentsError, match=message) as info:
        call(out)
    assert str(info.value).startswith("Invalid ") and "Expected values: " in str(info.value)
    assert isinstance(info.value, ValueError)
    assert not os.path.exists(out)


def test_out_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InvalidArgumentsError, match="out_path"):
        mp_lock(["a"], helpers.echo, None, 1, str(f), verbose=False)
    assert f.read_text() == "x"


def test_missing_parent_is_created_and_pathlike_accepted(tmp_path):
    out = tmp_path / "a" / "b" / "c"
    assert mp_lock_value(["x"], helpers.echo, None, 1, out, verbose=False) == ["x"]


def test_verbose_shows_one_tqdm_bar(tmp_path, capsys):
    out = str(tmp_path)
    mp_lock(ITEMS[:50], helpers.echo, None, 2, out)
    mp_lock(ITEMS, helpers.echo, None, 2, out)
    err = capsys.readouterr().err
    assert "nbmplock" in err and f"{len(ITEMS)}/{len(ITEMS)}" in err
    assert "failed=0" in err


def test_worker_output_is_captured_with_worker_prefix(tmp_path):
    def noisy(item, shared, init):
        print("out", item)
        import sys
        print("err", item, file=sys.stderr)
        return item

    out = str(tmp_path)
    mp_lock(["a", "b", "c"], noisy, None, 2, out, verbose=False)
    text = (tmp_path / ".nbmplock" / "output.log").read_text()
    for item in "abc":
        assert f"out {item}" in text and f"err {item}" in text
    assert all(line.startswith("[w") for line in text.splitlines())


def _chatty(item, shared_data, init_values):
    for i in range(5000):
        print(f"{item} line {i}")
    return item


@pytest.mark.timeout(60)
def test_chatty_output_is_capped_in_the_terminal_and_kept_whole_in_the_log(tmp_path, capsys):
    """Issue 13, item 2: every line went through tqdm.write (35x slower than quiet)."""
    import time as _time

    from nbmplock import _progress

    out = str(tmp_path / "run")
    started = _time.monotonic()
    mp_lock(["a", "b", "c", "d"], _chatty, None, 2, out, verbose=True)
    seconds = _time.monotonic() - started
    shown = capsys.readouterr().out.splitlines()
    limit = _progress.MAX_LINES_PER_SECOND * (int(seconds) + 2)
    assert 0 < len(shown) <= limit
    assert "more lines of worker output not shown here" in shown[-1]
    with open(os.path.join(out, ".nbmplock", "output.log"), encoding="utf-8") as f:
        logged = f.read().splitlines()
    assert len(logged) == 20_000 and logged[0].endswith("line 0")
