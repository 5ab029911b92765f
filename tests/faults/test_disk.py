"""Issue 6, item 5: a disk that fills up, a write that fails, a read-only ``out_path``.

* A real size-limited tmpfs (skipped where it cannot be mounted) fills during
  the run: by the run log (stored results), by worker output, or by the
  user's own ``save_callback``. The run stops with the ``OSError`` (ENOSPC)
  as its error, the store is left clean (no half record), and once space is
  freed a resume completes with nothing lost and nothing recorded run again.
* The same with ENOSPC injected at the store's own ``os.write`` (only the
  store's: ``nbmplock._store.os`` is replaced by a proxy), also after a short
  write of half a record.
* A read-only ``out_path`` (a tmpfs remounted read-only: root ignores mode
  bits) fails with ``InvalidArgumentsError`` before any work starts.
"""

from __future__ import annotations

import errno
import json
import os
import types
from collections import Counter
from pathlib import Path

import pytest

import nbmplock
from nbmplock import _read, _saver, _store

from .helpers import FIGURES, remount, tmpfs

PAD = 2000


def heavy(item: str, shared: dict, init_values):
    """A ~2 KB result (fills the log when results are kept); optional output."""
    fd = os.open(shared["ledger"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, (json.dumps(item) + "\n").encode())
    os.close(fd)
    if shared.get("print"):
        print(f"{item} " + "o" * shared["print"])
    return item + "#" * PAD


def expected(items):
    return [i + "#" * PAD for i in items]


def processed(ledger: Path) -> Counter:
    if not ledger.exists():
        return Counter()
    return Counter(json.loads(line) for line in ledger.read_text().splitlines())


class CarefulSaver:
    """A save_callback that writes ``out_path/data`` and undoes a batch it could not finish."""

    def __init__(self):
        self.names: list[str] = []

    def __call__(self, output_filepath, results, names):
        path = output_filepath + ".jsonl"
        data = "".join(json.dumps([n, r]) + "\n" for n, r in zip(names, results)).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        self.names.extend(names)


def _check_clean_store(out: Path) -> set:
    snap = nbmplock.read_snapshot(str(out))
    assert snap.torn_bytes == 0, "a failed write left half a record in the log"
    assert snap.holder_pid is None
    return set(_read.read_contents(str(out)).done)


# -- a real full disk --------------------------------------------------------

FILLERS = {
    # how the disk fills: (kwargs for the run, shared_data extras, uses a save_callback)
    "log": ({}, {}, False),
    "output": ({}, {"print": 4000}, False),
    "save_callback": ({"save_batch": 5}, {}, True),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("filler", sorted(FILLERS))
def test_disk_fills_up_mid_run_then_resume_completes(tmp_path, filler):
    kwargs, extra, with_saver = FILLERS[filler]
    items = [f"disk-{i:05d}" for i in range(1500)]  # ~3 MB of results or output
    ledger = tmp_path / "ledger"  # not on the small disk
    shared = {"ledger": str(ledger), **extra}
    saver = CarefulSaver() if with_saver else None
    with tmpfs(tmp_path / "small", "1m") as small:
        out = small / "run"

        def run():
            return nbmplock.mp_lock_value(items, heavy, saver, 2, str(out), shared_data=shared,
                                          verbose=False, chunk_size=10, **kwargs)

        with pytest.raises(OSError) as info:
            run()
        assert info.value.errno == errno.ENOSPC, repr(info.value)
        done = _check_clean_store(out)
        assert 0 < len(done) < len(items), len(done)
        before = processed(ledger)
        if saver is not None:
            saved = set(saver.names)
            assert done <= saved, "recorded done without being saved"
            # Consecutive save calls share a done record (at most RECORD_BATCHES of
            # them): those saved and not yet recorded when the disk filled run again.
            assert len(saved - done) <= 5 * _saver.RECORD_BATCHES, \
                "more saved-but-not-recorded than the batches one record covers"

        remount(small, "size=64m")  # space is freed
        assert run() == expected(items)
        assert _check_clean_store(out) == set(items)
        again = {i for i in done if processed(ledger)[i] > before[i]}
        assert not again, f"items recorded done ran again: {sorted(again)[:5]}"
        if saver is not None:
            saved = Counter(saver.names)
            assert set(saved) == set(items)
            assert sum(saved.values()) - len(items) <= 5 * _saver.RECORD_BATCHES
            rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
            assert Counter(n for n, _ in rows) == saved
    FIGURES.add("faults_injected")


# -- ENOSPC injected at the store's write ---------------------------------------

class _FailingOs(types.SimpleNamespace):
    """``os`` for the store module only: ``write`` (and ``writev``) fails with
    ENOSPC after ``ok`` calls."""

    def __init__(self, ok: int, partial: bool):
        super().__init__()
        self.ok, self.partial, self.calls, self.failed = ok, partial, 0, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def write(self, fd, data):
        self.calls += 1
        if self.calls <= self.ok:
            return os.write(fd, data)
        if self.partial and self.calls == self.ok + 1 and len(data) > 1:
            return os.write(fd, bytes(data[: len(data) // 2]))
        self.failed += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def writev(self, fd, buffers):
        return self.write(fd, b"".join(buffers))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("partial", [False, True], ids=["refused", "short-write"])
@pytest.mark.parametrize("ok", [0, 1, 7, 30])
def test_injected_enospc_in_the_store(tmp_path, monkeypatch, ok, partial):
    items = [f"inj-{i:04d}" for i in range(300)]
    ledger = tmp_path / "ledger"
    out = tmp_path / "out"
    saver = CarefulSaver()
    fake = _FailingOs(ok, partial)
    monkeypatch.setattr(_store, "os", fake)
    monkeypatch.setattr(_saver, "RECORD_BATCHES", 1)  # one SPAN record per save call

    def run():
        return nbmplock.mp_lock_value(items, heavy, saver, 2, str(out), save_batch=4,
                                      shared_data={"ledger": str(ledger)}, verbose=False,
                                      chunk_size=2)

    with pytest.raises(OSError) as info:
        run()
    assert info.value.errno == errno.ENOSPC and fake.failed >= 1
    monkeypatch.setattr(_store, "os", os)
    done = _check_clean_store(out)
    # the LIST and RUN records first, then one SPAN record per save_batch of 4
    assert len(done) == 4 * max(0, ok - 2), (len(done), ok)
    log = out / _read.STATE_DIR / "log"
    assert log.stat().st_size == _read.read_contents(str(out)).valid_bytes
    before = processed(ledger)
    assert run() == expected(items)
    assert _check_clean_store(out) == set(items)
    assert not {i for i in done if processed(ledger)[i] > before[i]}
    saved = Counter(saver.names)
    assert set(saved) == set(items)
    twice = {i for i, n in saved.items() if n > 1}
    # saved again: only the batch whose record failed, and the buffer flushed at the end
    # (at most save_batch - 1 + chunk_size items) whose record failed too
    assert len(twice) <= 4 + 3 + 2, twice
    FIGURES.add("faults_injected")


# -- read-only out_path ------------------------------------------------------------

def _never(item, shared, init_values):
    fd = os.open(shared["ledger"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, b"ran\n")
    os.close(fd)
    return item


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["new-subdir", "mount-root", "existing-run"])
def test_read_only_out_path_fails_before_any_work(tmp_path, where):
    ledger = tmp_path / "ledger"
    shared = {"ledger": str(ledger)}
    items = ["a", "b", "c"]
    with tmpfs(tmp_path / "ro", "1m") as ro:
        out = {"new-subdir": ro / "run", "mount-root": ro, "existing-run": ro / "old"}[where]
        if where == "existing-run":
            nbmplock.mp_lock(items[:1], _never, None, 1, str(out), shared_data=shared,
                             verbose=False)
            ledger.unlink()
        remount(ro, "ro")
        try:
            for attempt in ("mp_lock", "job"):
                with pytest.raises(nbmplock.InvalidArgumentsError) as info:
                    if attempt == "mp_lock":
                        nbmplock.mp_lock(items, _never, None, 2, str(out), shared_data=shared,
                                         verbose=False)
                    else:
                        nbmplock.Job(items, _never, str(out), shared_data=shared).start()
                message = str(info.value)
                assert message.startswith("Invalid out_path. Expected values: "), message
                assert "Read-only file system" in message, message
                assert isinstance(info.value, ValueError)
                assert not ledger.exists(), "work started on a read-only out_path"
        finally:
            remount(ro, "rw")
    FIGURES.add("faults_injected")


@pytest.mark.timeout(60)
def test_full_disk_at_the_completion_mark_does_not_fail_a_finished_run(tmp_path, monkeypatch):
    items = [f"k{i}" for i in range(8)]
    out = str(tmp_path / "out")
    # the LIST and RUN records, then the 8 SPAN records fit; the END and COMPLETE do not
    monkeypatch.setattr(_store, "os", _FailingOs(len(items) + 2, False))
    nbmplock.mp_lock(items, _never, None, 1, out, shared_data={"ledger": str(tmp_path / "l")},
                     verbose=False, chunk_size=1)
    assert nbmplock.is_mp_lock_completed(items, out)
