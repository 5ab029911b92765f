"""The run directory: records, torn tails, compaction, fingerprint, lock."""

from __future__ import annotations

import logging
import threading
import os
import time

import pytest

import nbmplock
from nbmplock import StoreCorruptError, mp_lock, mp_lock_value
from nbmplock._read import read_contents, read_snapshot
from nbmplock._store import RunStore, repair

from . import helpers


def _log(out):
    return os.path.join(out, ".nbmplock", "log")


def test_records_roundtrip_with_results_and_failures(tmp_path):
    out = str(tmp_path)
    store = RunStore.open(out, keep_results=True)
    store.record_done(["a", "b\nc"], [1, {"x": 2}])
    store.record_failures([nbmplock.Failure("d", "exception", "ValueError", "m", "tb")])
    store.record_done(["e"], None)
    store.close()
    contents = read_contents(out, results=True)
    assert contents.done == {"a", "b\nc", "e"}
    assert contents.results == {"a": 1, "b\nc": {"x": 2}}
    assert list(contents.failures) == ["d"]
    # a later done mark supersedes the failure
    store = RunStore.open(out, keep_results=False)
    assert store.record_done(["d"]) == 1
    store.close()
    assert read_contents(out).failures == {}


def test_torn_last_record_is_ignored_and_truncated(tmp_path, caplog):
    out = str(tmp_path)
    mp_lock(["a", "b"], helpers.echo, None, 1, out, verbose=False)
    size = os.path.getsize(_log(out))
    store = RunStore.open(out, keep_results=False)
    store.record_done(["c"])
    store.close()
    full = os.path.getsize(_log(out))
    for cut in range(size + 1, full):
        os.truncate(_log(out), cut)
        assert read_contents(out).done == {"a", "b"}
        assert read_snapshot(out).torn_bytes == cut - size
    with caplog.at_level(logging.WARNING, logger="nbmplock"):
        summary = mp_lock(["a", "b", "c"], helpers.echo, None, 1, out, verbose=False)
    assert summary.done == 1 and summary.skipped == 2
    assert "torn last record" in caplog.text
    assert read_contents(out).done == {"a", "b", "c"}


def test_damage_in_the_middle_is_reported_not_skipped(tmp_path):
    out = str(tmp_path)
    store = RunStore.open(out, keep_results=False)
    store.record_done(["a"])
    store.record_done(["b"])
    store.close()
    data = bytearray(open(_log(out), "rb").read())
    data[14] ^= 0xFF  # inside the first record's payload
    open(_log(out), "wb").write(bytes(data))
    with pytest.raises(StoreCorruptError, match="repair"):
        read_contents(out)
    with pytest.raises(StoreCorruptError):
        mp_lock(["a", "b"], helpers.echo, None, 1, out, verbose=False)
    assert open(_log(out), "rb").read() == bytes(data)  # nothing was discarded
    kept = repair(out)
    assert (kept.done, kept.damaged) == ({"b"}, 1)
    assert read_contents(out).done == {"b"}
    again = repair(out)  # issue 13, item 9: a second repair reports the same items
    assert (again.done, again.damaged) == ({"b"}, 0)


def test_many_small_records_are_compacted_on_open(tmp_path):
    out = str(tmp_path)
    items = [f"i{n}" for n in range(5000)]
    store = RunStore.open(out, keep_results=True)
    for n, item in enumerate(items):
        store.record_done([item], [n])
    store.close()
    before = read_contents(out, results=True)
    store = RunStore.open(out, keep_results=True)
    store.close()
    after = read_contents(out, results=True)
    assert after.records < 10
    assert after.done == before.done and after.results == before.results


def test_changed_function_or_items_warns_on_resume(tmp_path, caplog):
    out = str(tmp_path)
    mp_lock(["a", "b"], helpers.echo, None, 1, out, verbose=False)
    with caplog.at_level(logging.WARNING, logger="nbmplock"):
        mp_lock(["a", "b"], helpers.echo, None, 1, out, verbose=False)
    assert "changed" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="nbmplock"):
        mp_lock(["a", "b", "c"], helpers.length, None, 1, out, verbose=False)
    assert "process function changed" in caplog.text
    assert "item list changed (2 -> 3 items)" in caplog.text


def test_in_process_second_run_is_refused(tmp_path):
    out = str(tmp_path)
    store = RunStore.open(out, keep_results=False)
    try:
        with pytest.raises(nbmplock.RunLockedError, match="this process"):
            mp_lock(["a"], helpers.echo, None, 1, out, verbose=False)
    finally:
        store.close()
    assert mp_lock_value(["a"], helpers.echo, None, 1, out, verbose=False) == ["a"]


def test_fsync_policy_is_group_commit(tmp_path, monkeypatch):
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(nbmplock._store.os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
    items = [f"i{n}" for n in range(3000)]
    mp_lock(items, helpers.echo, lambda p, r, n: None, 2, str(tmp_path), save_batch=1,
            verbose=False)
    # 3000 save batches, 3000 records: fsync only every 0.2 s and once at the end
    assert 1 <= len(calls) < 50


def test_group_commit_sleeps_while_nothing_is_written(tmp_path, monkeypatch):
    """The syncer wakes for written records only: a run of slow items costs no
    wake-ups between results (each one would take a core from a worker)."""
    rounds = []
    real_sync = RunStore._sync
    monkeypatch.setattr(RunStore, "_sync", lambda self: (rounds.append(self._dirty), real_sync(self)))
    monkeypatch.setattr(nbmplock._store, "SYNC_INTERVAL", 0.02)

    def wait_for(n):
        deadline = time.monotonic() + 5
        while len(rounds) < n and time.monotonic() < deadline:
            time.sleep(0.01)

    store = RunStore.open(str(tmp_path), keep_results=False)
    try:
        store.record_done(["a"])
        wait_for(1)
        time.sleep(0.3)  # 15 sync intervals with nothing written
        assert rounds == [True]
        store.record_done(["b"])
        wait_for(2)
        assert rounds == [True, True]
    finally:
        store.close()
    assert read_contents(str(tmp_path)).done == {"a", "b"}


def test_a_finished_run_ends_the_log_with_complete_and_reruns_read_only_that(tmp_path, monkeypatch):
    out = str(tmp_path)
    items = [f"i{n}" for n in range(300)]
    mp_lock(items, helpers.echo, None, 2, out, verbose=False)
    from nbmplock import _read, _store
    assert _read.read_complete(out)[1:] == (300, 300)
    scans = []
    real_scan = _store.scan
    monkeypatch.setattr(_store, "scan", lambda *a, **k: (scans.append(1), real_scan(*a, **k))[1])
    summary = mp_lock(items, helpers.echo, None, 2, out, verbose=False)
    assert summary.done == 0 and summary.skipped == 300 and scans == []
    assert nbmplock.is_mp_lock_completed(items, out) and scans == []
    size = os.path.getsize(_log(out))
    mp_lock(items, helpers.echo, None, 2, out, verbose=False)
    assert os.path.getsize(_log(out)) == size  # re-running adds nothing
    # a longer list is not complete: only the new item runs
    saver = helpers.Saver()
    mp_lock(items + ["new"], helpers.echo, saver, 2, out, verbose=False)
    assert saver.names == ["new"]
    # a torn COMPLETE record is just a torn tail
    os.truncate(_log(out), os.path.getsize(_log(out)) - 3)
    saver = helpers.Saver()
    assert mp_lock(items + ["new"], helpers.echo, saver, 2, out, verbose=False).skipped == 301
    assert saver.names == []


def test_values_after_a_complete_run_come_from_the_log(tmp_path):
    out = str(tmp_path)
    items = [f"i{n}" for n in range(300)]
    assert mp_lock_value(items, helpers.length, None, 2, out, verbose=False) == list(map(len, items))
    assert mp_lock_value(items, helpers.length, None, 2, out, verbose=False) == list(map(len, items))


def test_close_releases_the_lock_when_the_last_flush_fails(tmp_path):
    # A full disk can make the output log's final flush raise in close(); the
    # run directory must still be unlocked, or the same process (a notebook
    # kernel) could never run it again.
    import errno

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def close(self):
            self.f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = str(tmp_path)
    store = RunStore.open(out, keep_results=False)
    store.record_done(["a"])
    store._out = FullDisk(store._out)
    with pytest.raises(OSError):
        store.close()
    assert read_snapshot(out).holder_pid is None
    again = RunStore.open(out, keep_results=False)
    assert again.contents.done == {"a"}
    again.close()


def test_close_while_the_syncer_is_about_to_commit_never_hangs(tmp_path, monkeypatch):
    """Issue 12, case 1: close() landing between the syncer's gather and its commit.

    The old loop cleared its wake-up event after a timed-out wait; a close()
    landing just before that clear was erased and close() joined a syncer
    that waited for ever. The hook holds the syncer in that window while
    close() runs.
    """
    from nbmplock import _store

    in_window = threading.Event()

    def hook(where):
        if where == "syncer-before-commit" and not in_window.is_set():
            in_window.set()
            time.sleep(0.3)  # close() runs meanwhile

    monkeypatch.setattr(_store, "_test_hook", hook)
    monkeypatch.setattr(_store, "SYNC_INTERVAL", 0.01)
    store = RunStore.open(str(tmp_path), keep_results=False)
    store.record_done(["a"])
    assert in_window.wait(10)
    closer = threading.Thread(target=store.close, name="closer")
    closer.start()
    helpers.join_or_dump(closer, 10, "RunStore.close")
    store = RunStore.open(str(tmp_path), keep_results=False)  # the lock was released
    store.close()
    assert read_contents(str(tmp_path)).done == {"a"}


def test_open_append_close_thousands_of_times_always_ends(tmp_path, monkeypatch):
    """Stress the syncer handshake: random pauses around appends and close()."""
    import random

    from nbmplock import _store

    rng = random.Random(12)
    monkeypatch.setattr(_store, "SYNC_INTERVAL", 0.0005)

    def cycle(i):
        store = RunStore.open(str(tmp_path), keep_results=False)
        for j in range(rng.randrange(0, 4)):
            store.record_done([f"{i}-{j}"])
            if rng.random() < 0.5:
                time.sleep(rng.random() * 0.001)
        if rng.random() < 0.5:
            time.sleep(rng.random() * 0.001)
        store.close()

    def loop():
        for i in range(2000):
            cycle(i)

    worker = threading.Thread(target=loop, name="store-cycles")
    worker.start()
    helpers.join_or_dump(worker, 240, "2000 open/append/close cycles")


def test_two_threads_appending_keep_every_record_whole(tmp_path):
    """The manager and the saver thread both write records (done, failures)."""
    store = RunStore.open(str(tmp_path), keep_results=True)
    big = "x" * 200_000  # big enough that a writev may be split

    def done():
        for i in range(300):
            store.record_done([f"d{i}"], [big])

    def failed():
        for i in range(300):
            store.record_failures([nbmplock.Failure(f"f{i}", "exception", "E", big, "tb")])

    threads = [threading.Thread(target=done), threading.Thread(target=failed)]
    for thread in threads:
        thread.start()
    for thread in threads:
        helpers.join_or_dump(thread, 60, "an appending thread")
    store.close()
    contents = read_contents(str(tmp_path), results=True)
    assert len(contents.done) == 300 and len(contents.failures) == 300
    assert contents.torn_bytes == 0 and set(contents.results.values()) == {big}


def test_crc32_combine_is_zlibs():
    """The parent combines a worker's CRC of a results pickle with the rest of the
    record's instead of reading the pickle again: the CRC must be zlib's own."""
    import random
    import zlib

    from nbmplock._crc import Pickled, crc32_combine
    from nbmplock._log import _frame

    rng = random.Random(7)
    for _ in range(300):
        a = rng.randbytes(rng.randrange(0, 2000))
        b = rng.randbytes(rng.choice([0, 1, 7, rng.randrange(0, 5000),
                                      rng.randrange(256 << 10, 2 << 20)]))
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
        pickled = Pickled(b)
        pickled.crc = zlib.crc32(b) if rng.random() < 0.7 else None  # None: read again
        assert _frame(3, 1, a, pickled) == _frame(3, 1, a, bytes(b))


def _big(item, shared_data, init_values):
    return item.encode().ljust(300_000, b"-")  # a chunk's pickle takes the combined CRC


def test_big_results_read_back_whole_and_a_flipped_byte_in_one_is_damage(tmp_path):
    out = str(tmp_path)
    items = [f"b{n}" for n in range(40)]
    values = mp_lock_value(items, _big, None, 2, out, verbose=False)
    assert [v[:4].rstrip(b"-") for v in values] == [i.encode() for i in items]
    assert read_contents(out, results=True).results == dict(zip(items, values))
    assert mp_lock_value(items, _big, None, 2, out, verbose=False) == values  # from disk
    data = bytearray(open(_log(out), "rb").read())
    at = data.index(b"b7" + b"-" * 1000) + 500  # inside one result, deep in its record
    data[at] ^= 0xFF
    open(_log(out), "wb").write(bytes(data))
    with pytest.raises(StoreCorruptError, match="repair"):
        read_contents(out)
