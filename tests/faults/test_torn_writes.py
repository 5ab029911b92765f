"""Issue 6, item 2: torn and corrupt records in every file of the run store.

The log's damage rules (``nbmplock/_store.py``): a torn or corrupt *last*
record is ignored and truncated away by the next run; a damaged record with
valid records after it raises :class:`nbmplock.StoreCorruptError`, discards
nothing, and ``python -m nbmplock repair`` keeps every readable record.

Here a real run builds the log, then it is cut at, and separately has a byte
flipped at, every offset of its last record (a sample for the big failure
record), and each damaged copy is resumed for real: it must open, lose exactly
the torn record's items (and run exactly those again) and complete. The torn
last records are tried with items of every kind too (issue 15: ints, dicts,
tuples, paths, named tuples, and ``key=``), by a sample of offsets. Damage to
``job.json``, ``output.log`` and ``lock`` must never stop a resume.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import nbmplock
from nbmplock import _log as log_format
from nbmplock import _read
from nbmplock._keys import compute_keys

from . import driver
from .helpers import FIGURES, REPO

BAD = "bad item"


def work(item, shared: dict, init_values) -> str:
    """Log the item's label to the ledger named in shared_data, print a line, return a value."""
    name = driver.label(item)
    fd = os.open(shared["ledger"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(name) + "\n").encode())
    finally:
        os.close(fd)
    print(f"working on {name!r}")
    if name == shared.get("bad", BAD):
        raise ValueError("this item always fails")
    return f"<{name}>"


ITEMS = [f"t{i:03d}" for i in range(20)] + ["", "a\nb", "ü 🙂", "NL\x01\x01 fake header"]


@dataclass(frozen=True)
class Case:
    """The items of one kind (driver.KINDS: str, ints, dicts, ... and key=), and the
    item that always fails."""

    kind: str
    items: list
    bad: object

    @property
    def key(self):
        return driver.key_option(self.kind)

    def labels(self, items=None) -> list[str]:
        return [driver.label(i) for i in (self.items if items is None else items)]

    def expected(self, items=None) -> list:
        bad = driver.label(self.bad)
        return [None if n == bad else f"<{n}>" for n in self.labels(items)]


def case_of(kind: str) -> Case:
    make = driver.KINDS[kind][0]
    return Case(kind, [make(i, s) for i, s in enumerate(ITEMS)], make(len(ITEMS), BAD))


#: Every kind of item the torn-record tests also run with (issue 15).
KINDS = list(driver.KINDS)
STR = case_of("str")


def expected(items):
    return [None if i == BAD else f"<{i}>" for i in items]


def processed(ledger: Path) -> list[str]:
    if not ledger.exists():
        return []
    return [json.loads(line) for line in ledger.read_text().splitlines()]


def records(out: Path) -> list[tuple[int, int, int]]:
    """(start, end, kind) of every record of the log."""
    data = (out / _read.STATE_DIR / "log").read_bytes()
    pos, found = 0, []
    while pos < len(data):
        _magic, kind, _flags, length, _crc = log_format._HEADER.unpack_from(data, pos)
        end = pos + log_format._HEADER.size + length
        found.append((pos, end, kind))
        pos = end
    assert pos == len(data)
    return found


def run(items, out: Path, ledger: Path, case: Case = STR, **kw):
    return nbmplock.mp_lock_value(items, work, None, 1, str(out), verbose=False,
                                  shared_data={"ledger": str(ledger),
                                               "bad": driver.label(case.bad)},
                                  chunk_size=1, key=case.key, **kw)


def build_bases(root: Path, case: Case) -> dict:
    """Run directories built by real runs, each ending with a different kind of record.

    ``complete``: a finished run (its LIST and RUN records, 24 SPAN records,
    the END record saying how the run ended, then the COMPLETE mark);
    ``done``: the same cut before the END record (a crash just before it);
    ``fail``: a run cut after its last FAIL record (before its END record).
    """
    items = case.items
    complete = root / "complete"
    assert run(items, complete, root / "l1", case) == case.expected()
    recs = records(complete)
    assert [k for _, _, k in recs] == ([log_format._LIST, log_format._RUN]
                                       + [log_format._SPAN] * len(items)
                                       + [log_format._END, log_format._COMPLETE])
    done = _copy(complete, root / "done")
    os.truncate(_log(done), recs[-2][0])
    fail = root / "fail"
    with_bad = items + [case.bad]
    assert run(with_bad, fail, root / "l2", case, errors="record") == case.expected(with_bad)
    recs = records(fail)
    assert [k for _, _, k in recs[-2:]] == [log_format._FAIL, log_format._END]
    os.truncate(_log(fail), recs[-1][0])
    return {"complete": complete, "done": done, "fail": fail}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The run directories of ``str`` items (see :func:`build_bases`)."""
    return build_bases(tmp_path_factory.mktemp("bases"), STR)


@pytest.fixture(scope="module")
def kind_bases(tmp_path_factory):
    """``kind -> (Case, bases)``, built on first use."""
    built: dict = {}

    def get(kind: str):
        if kind not in built:
            case = case_of(kind)
            built[kind] = case, build_bases(tmp_path_factory.mktemp(f"bases-{kind}"), case)
        return built[kind]
    return get


def offsets_to_try(start: int, end: int, kind: str, rng) -> list[int]:
    """Every offset of the record for str items; for the other kinds (the same records
    with other keys) its header, a sample of the rest and its last byte."""
    if kind == "str":
        return list(range(start, end))
    return sorted(set(range(start, min(end, start + log_format._HEADER.size + 2)))
                  | set(rng.sample(range(start, end), min(8, end - start))) | {end - 1})


def _copy(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


def _log(out: Path) -> Path:
    return out / _read.STATE_DIR / "log"


def _damage(path: Path, offset: int, how: str) -> None:
    if how == "truncate":
        os.truncate(path, offset)
    else:
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("kind", KINDS)
def test_torn_last_done_record_every_offset(kind_bases, tmp_path, rng, kind, how):
    case, bases = kind_bases(kind)
    items = case.items
    base = bases["done"]
    start, end, _ = records(base)[-1]
    last = driver.label(items[-1])
    tried = 0
    for offset in offsets_to_try(start, end, kind, rng):
        out = _copy(base, tmp_path / f"o{offset}")
        _damage(_log(out), offset, how)
        snap = nbmplock.read_snapshot(str(out))
        torn = (offset - start) if how == "truncate" else (end - start)
        assert (snap.done, snap.torn_bytes) == (len(items) - 1, torn), (offset, snap)
        ledger = tmp_path / f"l{offset}"
        assert run(items, out, ledger, case) == case.expected(), offset
        assert processed(ledger) == [last], (offset, processed(ledger))
        snap = nbmplock.read_snapshot(str(out))
        assert (snap.done, snap.torn_bytes) == (len(items), 0)
        shutil.rmtree(out)
        tried += 1
    FIGURES.add("offsets_tried", tried)
    FIGURES.add("faults_injected", tried)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("kind", KINDS)
def test_torn_complete_mark_every_offset(kind_bases, tmp_path, rng, kind, how):
    """The COMPLETE mark ending a finished run, torn: still finished, nothing runs again."""
    case, bases = kind_bases(kind)
    items = case.items
    base = bases["complete"]
    start, end, _ = records(base)[-1]
    tried = 0
    for offset in offsets_to_try(start, end, kind, rng):
        out = _copy(base, tmp_path / f"o{offset}")
        _damage(_log(out), offset, how)
        assert _read.read_complete(str(out)) is None
        snap = nbmplock.read_snapshot(str(out))
        torn = (offset - start) if how == "truncate" else (end - start)
        assert (snap.done, snap.torn_bytes) == (len(items), torn), (offset, snap)
        assert nbmplock.is_mp_lock_completed(items, str(out), key=case.key)
        ledger = tmp_path / f"l{offset}"
        assert run(items, out, ledger, case) == case.expected(), offset
        assert processed(ledger) == [], offset
        assert _read.read_complete(str(out)) is not None
        assert nbmplock.read_snapshot(str(out)).torn_bytes == 0
        shutil.rmtree(out)
        tried += 1
    FIGURES.add("offsets_tried", tried)
    FIGURES.add("faults_injected", tried)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("kind", KINDS)
def test_torn_last_fail_record(kind_bases, tmp_path, rng, kind, how):
    """The failure record (a traceback: ~1-2 KB): its header bytes and a sample of the rest."""
    case, bases = kind_bases(kind)
    base = bases["fail"]
    start, end, _ = records(base)[-1]
    n_sample = 40 if kind == "str" else 8
    offsets = sorted(set(range(start, start + log_format._HEADER.size + 2))
                     | set(rng.sample(range(start, end), min(n_sample, end - start)))
                     | {end - 1})
    items = case.items + [case.bad]
    bad = driver.label(case.bad)
    bad_key = compute_keys([case.bad], case.key)[0]
    for offset in offsets:
        out = _copy(base, tmp_path / f"o{offset}")
        _damage(_log(out), offset, how)
        snap = nbmplock.read_snapshot(str(out))
        assert snap.done == len(case.items) and snap.failures == (), (offset, snap)
        assert snap.torn_bytes == ((offset - start) if how == "truncate" else (end - start))
        ledger = tmp_path / f"l{offset}"
        assert run(items, out, ledger, case, errors="record") == case.expected(items)
        assert processed(ledger) == [bad]  # failures are not done: retried on resume
        snap = nbmplock.read_snapshot(str(out))
        assert snap.torn_bytes == 0 and [f.key for f in snap.failures] == [bad_key]
        # the torn record was ignored: this is the failure's first recorded attempt
        assert snap.failures[0].attempts == 1 and snap.failures[0].kind == "exception"
        shutil.rmtree(out)
    FIGURES.add("offsets_tried", len(offsets))
    FIGURES.add("faults_injected", len(offsets))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("base", ["done", "complete"])
def test_zero_filled_tail_is_ignored(bases, tmp_path, base):
    """A crash can leave a block of zeros after the last record (delayed allocation)."""
    out = _copy(bases[base], tmp_path / "out")
    with open(_log(out), "ab") as f:
        f.write(b"\0" * 4096)
    assert nbmplock.read_snapshot(str(out)).torn_bytes == 4096
    ledger = tmp_path / "ledger"
    assert run(ITEMS, out, ledger) == expected(ITEMS)
    assert processed(ledger) == []
    assert _log(out).stat().st_size == records(out)[-1][1]
    FIGURES.add("faults_injected")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "nbmplock", *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=str(REPO))


# (item index, byte within its SPAN record): magic, kind, length, crc, payload
MIDDLE = [(0, 0), (0, 30), (7, 1), (12, 2), (12, 5), (12, 9), (12, 20), (22, 40)]
FIRST_SPAN = 2  # after the LIST and RUN records


@pytest.mark.timeout(120)
@pytest.mark.parametrize("index,within", MIDDLE)
def test_corrupt_middle_record_is_reported_never_dropped(bases, tmp_path, index, within):
    out = _copy(bases["done"], tmp_path / "out")
    recs = records(out)
    start, end, kind = recs[FIRST_SPAN + index]
    assert kind == log_format._SPAN and within < end - start
    _damage(_log(out), start + within, "flip")
    before = _log(out).read_bytes()
    ledger = tmp_path / "ledger"

    with pytest.raises(nbmplock.StoreCorruptError) as info:
        run(ITEMS, out, ledger)
    message = str(info.value)
    assert f"damaged at byte {start} " in message, message
    assert "repair" in message and "nothing was discarded" in message
    assert _log(out).read_bytes() == before, "a failed open changed the log"
    assert processed(ledger) == [], "work started on a corrupt store"
    with pytest.raises(nbmplock.StoreCorruptError):
        nbmplock.read_snapshot(str(out))
    status = _cli("status", str(out))
    assert status.returncode == 1 and "StoreCorruptError" in status.stderr, status

    fixed = _cli("repair", str(out))
    assert fixed.returncode == 0, fixed.stderr
    assert (f"{len(ITEMS) - 1} items done and 0 failed are kept; 1 damaged part(s) of the "
            "log dropped") in fixed.stdout, fixed.stdout
    snap = nbmplock.read_snapshot(str(out))
    assert (snap.done, snap.torn_bytes) == (len(ITEMS) - 1, 0)
    assert run(ITEMS, out, ledger) == expected(ITEMS)
    assert processed(ledger) == [ITEMS[index]], "repair lost more than the damaged record"
    FIGURES.add("offsets_tried")
    FIGURES.add("faults_injected")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["LIST", "RUN"])
def test_a_damaged_list_or_run_record_loses_nothing_for_the_same_list(bases, tmp_path, which):
    """Spans name positions of their list: the same list resumes without its LIST."""
    out = _copy(bases["done"], tmp_path / "out")
    start, end, kind = records(out)[0 if which == "LIST" else 1]
    assert kind == getattr(log_format, f"_{which}")
    _damage(_log(out), start + 20, "flip")
    ledger = tmp_path / "ledger"
    with pytest.raises(nbmplock.StoreCorruptError):
        run(ITEMS, out, ledger)
    assert _cli("repair", str(out)).returncode == 0
    assert run(ITEMS, out, ledger) == expected(ITEMS)
    assert processed(ledger) == []  # every item was done, and still is
    FIGURES.add("faults_injected")


@pytest.mark.timeout(60)
def test_corrupt_middle_record_of_a_finished_run(bases, tmp_path):
    """Finished runs are not re-scanned on open, but reading their results finds the damage."""
    out = _copy(bases["complete"], tmp_path / "out")
    start, end, _ = records(out)[FIRST_SPAN + 12]
    _damage(_log(out), start + 20, "flip")
    before = _log(out).read_bytes()
    ledger = tmp_path / "ledger"
    with pytest.raises(nbmplock.StoreCorruptError, match=f"damaged at byte {start} "):
        run(ITEMS, out, ledger)  # mp_lock_value must read every stored result
    nbmplock.mp_lock(ITEMS, work, None, 1, str(out), verbose=False,
                     shared_data={"ledger": str(ledger)})  # nothing to do: every item is done
    assert processed(ledger) == [] and _log(out).read_bytes() == before
    FIGURES.add("faults_injected")


# -- the other files of the run store -------------------------------------------

def _half_done(bases, dest: Path) -> Path:
    """A copy of the finished run cut cleanly after 12 items: 12 items left to do."""
    out = _copy(bases["done"], dest)
    os.truncate(_log(out), records(out)[FIRST_SPAN + 11][1])
    return out


def _garbage(n: int) -> bytes:
    return bytes((i * 97 + 13) % 256 for i in range(n))


JOB_JSON = {
    "empty": lambda old: b"",
    "truncated": lambda old: old[: len(old) // 2],
    "garbage": lambda old: _garbage(300),
    "not-an-object": lambda old: b"[1, 2, 3]",
    "missing-keys": lambda old: b'{"function": "work"}',
    "wrong-types": lambda old: b'{"function": 1, "function_hash": null, "n_items": "x", '
                               b'"items_hash": []}',
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", sorted(JOB_JSON))
def test_damaged_job_json_does_not_break_resume(bases, tmp_path, variant):
    out = _half_done(bases, tmp_path / "out")
    path = out / _read.STATE_DIR / "job.json"
    path.write_bytes(JOB_JSON[variant](path.read_bytes()))
    (out / _read.STATE_DIR / "job.json.tmp").write_bytes(_garbage(50))  # a crashed replace
    ledger = tmp_path / "ledger"
    assert run(ITEMS, out, ledger) == expected(ITEMS)
    assert processed(ledger) == ITEMS[12:]
    assert _read.read_fingerprint(str(out)) is not None
    FIGURES.add("faults_injected")


OUTPUT_LOG = {
    "garbage": lambda p: p.write_bytes(_garbage(5000)),
    "torn-line": lambda p: p.write_bytes(b"[w0] a whole line\n[w0] half a li"),
    "missing": lambda p: p.unlink(),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", sorted(OUTPUT_LOG))
def test_damaged_output_log_does_not_break_resume(bases, tmp_path, variant):
    out = _half_done(bases, tmp_path / "out")
    path = out / _read.STATE_DIR / "output.log"
    OUTPUT_LOG[variant](path)
    ledger = tmp_path / "ledger"
    assert run(ITEMS, out, ledger) == expected(ITEMS)
    assert processed(ledger) == ITEMS[12:]
    text = path.read_bytes().decode("utf-8", "replace")
    for item in ITEMS[12:]:
        if "\n" not in item:
            assert f"] working on {item!r}\n" in text
    FIGURES.add("faults_injected")


LOCK = {
    "garbage": lambda p: p.write_bytes(_garbage(64)),
    "empty": lambda p: p.write_bytes(b""),
    "live-pid-no-lock": lambda p: p.write_bytes(f"{os.getpid()} host 0\n".encode()),
    "pid-1": lambda p: p.write_bytes(b"1 elsewhere 0\n"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("variant", sorted(LOCK))
def test_stale_or_damaged_lock_file_does_not_block(bases, tmp_path, variant):
    """Only a held ``flock`` blocks a run; whatever text the lock file holds does not."""
    out = _half_done(bases, tmp_path / "out")
    LOCK[variant](out / _read.STATE_DIR / "lock")
    assert nbmplock.read_snapshot(str(out)).holder_pid is None
    ledger = tmp_path / "ledger"
    assert run(ITEMS, out, ledger) == expected(ITEMS)
    assert processed(ledger) == ITEMS[12:]
    FIGURES.add("faults_injected")
