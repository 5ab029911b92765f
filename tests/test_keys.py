"""Items of any kind, each under a key (issue 15)."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import namedtuple
from pathlib import Path, PurePosixPath

import pytest

import nbmplock
from nbmplock import InvalidArgumentsError, Job, JobState, mp_lock, mp_lock_value
from nbmplock._keys import compute_keys
from nbmplock._read import read_done

from . import helpers

HERE = Path(__file__).resolve().parent
Point = namedtuple("Point", "x y")


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    value: int


def describe(item, shared_data, init_values):
    """A result that depends on the item's type and value; logs every call."""
    with open(shared_data["ledger"], "a", encoding="utf-8") as f:
        f.write(repr(item) + "\n")
    return f"{type(item).__name__}:{item!r}"


def ledger(path) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


ODD_ITEMS = [
    1, "1", 1.0, True, None, -0.5, 10**30, b"\x00bytes", "text\nwith newline",
    (1, "a"), [1, "a"], {"b": 2, "a": 1}, frozenset({3, 1}), Point(1, 2), Row("r1", 5),
    PurePosixPath("photos/a.jpg"), datetime.date(2026, 12, 2),
    datetime.datetime(2026, 12, 2, 9, 48), decimal.Decimal("1.10"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"), (), {},
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_items_of_every_plain_kind_run_once_and_resume(tmp_path, start_method):
    out, log = str(tmp_path / "run"), str(tmp_path / "ledger")
    shared = {"ledger": log}
    expected = [describe(i, {"ledger": os.devnull}, None) for i in ODD_ITEMS]
    assert mp_lock_value(ODD_ITEMS, describe, None, 2, out, shared_data=shared,
                         verbose=False, start_method=start_method) == expected
    assert len(ledger(log)) == len(ODD_ITEMS)  # 1, "1", 1.0 and True are four items
    assert mp_lock_value(ODD_ITEMS, describe, None, 2, out, shared_data=shared,
                         verbose=False, start_method=start_method) == expected
    assert len(ledger(log)) == len(ODD_ITEMS), "a resume ran done items again"
    assert nbmplock.is_mp_lock_completed(ODD_ITEMS, out)


def test_keys_are_stable_across_processes_and_hash_seeds():
    script = ("import sys, json; sys.path.insert(0, sys.argv[1]);"
              "from tests.test_keys import ODD_ITEMS; from nbmplock._keys import compute_keys;"
              "print(json.dumps([k if isinstance(k, str) else k.hex() "
              "for k in compute_keys(ODD_ITEMS, None)]))")
    runs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", script, str(HERE.parent)], env=env,
                             capture_output=True, text=True, timeout=60, check=True)
        runs.add(out.stdout)
    assert len(runs) == 1
    keys = compute_keys(ODD_ITEMS, None)
    assert len(set(keys)) == len(keys)
    assert keys[1] == "1"  # a str is its own key
    assert isinstance(keys[0], bytes) and keys[0] != keys[2] != keys[3]


def test_key_function_and_field_name(tmp_path):
    rows = [{"id": f"r{i}", "x": i} for i in range(20)]
    out = str(tmp_path / "run")
    values = mp_lock_value(rows, lambda r, s, v: r["x"] * 2, None, 2, out, key="id",
                           verbose=False)
    assert values == [i * 2 for i in range(20)]
    assert read_done(out) == {f"r{i}" for i in range(20)}
    points = [Point(f"p{i}", i) for i in range(5)]
    assert compute_keys(points, "x") == compute_keys(points, lambda p: p.x) == [
        f"p{i}" for i in range(5)]
    with pytest.raises(InvalidArgumentsError, match="returned a int"):
        compute_keys(points, "y")
    assert compute_keys([Row("a", 1)], "id") == ["a"]
    job = Job(rows, lambda r, s, v: r["x"], str(tmp_path / "job"), key=lambda r: r["id"],
              num_procs=1)
    job.start()
    helpers.wait_job(job)
    assert job.results(by_key=True) == {f"r{i}": i for i in range(20)}


def test_equal_items_run_once_and_every_position_gets_its_value(tmp_path):
    items = [{"a": 1}, {"a": 2}, {"a": 1}, 5, 5, "x", "x"]
    log = str(tmp_path / "ledger")
    values = mp_lock_value(items, describe, None, 2, str(tmp_path / "run"),
                           shared_data={"ledger": log}, verbose=False)
    assert values == [describe(i, {"ledger": os.devnull}, None) for i in items]
    assert len(ledger(log)) == 4


def test_repeats_are_found_in_sorted_and_unsorted_lists_alike(tmp_path):
    """A strictly increasing or decreasing list has no repeats without a set;
    anything else (equal neighbours, a late step back, str beside bytes keys)
    goes through the set."""
    from nbmplock._plan import ItemList, strictly_monotonic

    def repeats(items):
        return ItemList.of(items, compute_keys(items, None)).repeats

    up = [f"k{i:05d}" for i in range(1000)]
    assert strictly_monotonic(up) and strictly_monotonic(up[::-1])
    assert strictly_monotonic([]) and strictly_monotonic(["a"])
    assert repeats(up) == {} and repeats(up[::-1]) == {}
    assert not strictly_monotonic(["a", "a"]) and repeats(["a", "a"]) == {1: 0}
    late = up + [up[500]]  # increasing but for its last step
    assert not strictly_monotonic(late) and repeats(late) == {1000: 500}
    flat = up[:10] + [up[9]] + up[10:]  # equal neighbours in the middle
    assert repeats(flat) == {10: 9}
    assert repeats(up[::-1] + [up[0]]) == {1000: 999}
    mixed = ["a", 1, "b", 1]  # str and bytes keys: cannot be compared
    assert not strictly_monotonic(compute_keys(mixed, None)) and repeats(mixed) == {3: 1}
    values = mp_lock_value(late, helpers.echo, None, 2, str(tmp_path / "run"), verbose=False)
    assert values == late
    # int items: their keys (b"i<n>") do not sort as the ints do; the ints' order counts
    assert repeats(list(range(1000))) == {} and repeats(list(range(1000, 0, -1))) == {}
    assert repeats(list(range(100)) + [5]) == {100: 5}
    assert repeats([1, 2, True, 1]) == {3: 0}  # a bool is not an int item
    assert repeats([3, 1, 2, 3]) == {3: 0}
    by_key = [f"k{i:03d}" for i in range(10)]  # ints in order, keys that repeat: refused
    with pytest.raises(InvalidArgumentsError, match="the same key"):
        ItemList.of(list(range(10)), [by_key[i % 5] for i in range(10)])


def test_one_shot_iterables_are_read_once(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(7):
        (photos / f"p{i}.jpg").write_bytes(b"x" * i)
    out = str(tmp_path / "run")
    sizes = mp_lock_value(sorted(photos.glob("*.jpg")), lambda p, s, v: p.stat().st_size,
                          None, 2, out, verbose=False)
    assert sizes == list(range(7))
    summary = mp_lock(photos.glob("*.jpg"), lambda p, s, v: p.stat().st_size, None, 2, out,
                      verbose=False)  # a generator, in another order: every item is done
    assert summary.done == 0 and summary.skipped == 7
    pairs = mp_lock_value((i * i for i in range(50)), lambda x, s, v: x + 1, None, 2,
                          str(tmp_path / "gen"), verbose=False)
    assert pairs == [i * i + 1 for i in range(50)]


def test_a_run_directory_of_the_previous_release_resumes_unchanged(tmp_path):
    """tests/data/release-0.1.0-run: written by the release before keys and spans
    (mp_lock_value of 30 of these 50 items, errors='record': 27 done, 3 failed)."""
    out = tmp_path / "run"
    shutil.copytree(HERE / "data" / "release-0.1.0-run", out)
    items = [f"old-{i:02d}" for i in range(50)]
    assert len(read_done(str(out))) == 27
    log = str(tmp_path / "ledger")
    job = Job(items, upper_unless_seven, str(out), num_procs=2, shared_data={"ledger": log})
    assert job.progress.done == 27 and job.progress.failed == 3  # what it held, before a start
    job.start()
    helpers.wait_job(job)
    ran = ledger(log)
    assert len(ran) == 23 and not set(ran) & set(items[:30]) - {"old-07", "old-17", "old-27"}
    values = job.results()
    assert values == [None if i.endswith("7") else i.upper() for i in items]
    assert {f.item for f in job.failures} == {f"old-{i}7" for i in range(5)}
    assert read_done(str(out)) == {i for i in items if not i.endswith("7")}


def upper_unless_seven(item, shared_data, init_values):
    with open(shared_data["ledger"], "a", encoding="utf-8") as f:
        f.write(item + "\n")
    if item.endswith("7"):
        raise ValueError(f"no sevens: {item}")
    return item.upper()


def _slow_square(x, shared_data, init_values):
    time.sleep(0.01)
    return x * x


@pytest.mark.timeout(120)
def test_iter_results_yields_while_the_job_runs_and_ends_with_it(tmp_path):
    job = nbmplock.run(list(range(300)), _slow_square, str(tmp_path / "run"), num_procs=2)
    seen, running_when_seen = {}, []
    for item, value in job.iter_results():
        seen[item] = value
        running_when_seen.append(job.state.active)
    assert seen == {x: x * x for x in range(300)}
    assert any(running_when_seen), "no result came while the job ran"
    assert job.state is JobState.FINISHED
    # a stop ends the iteration cleanly, with what was recorded
    job2 = nbmplock.run(list(range(300, 3000)), _slow_square, str(tmp_path / "run2"),
                        num_procs=2)
    got = []
    for item, value in job2.iter_results():
        got.append(item)
        if len(got) == 50:
            threading.Thread(target=job2.stop).start()
    assert job2.state is JobState.STOPPED
    assert 50 <= len(got) < 2700 and len(set(got)) == len(got)
    # after the end: what the directory holds
    assert sorted(x for x, _ in nbmplock.Job(list(range(300, 3000)), _slow_square,
                                               str(tmp_path / "run2")).iter_results()) == \
        sorted(got)


def _fails_on_odd(x, shared_data, init_values):
    if x % 2:
        raise KeyError(f"odd {x}")
    return -x


def test_to_pandas_has_a_row_per_item_with_its_state(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = [{"id": f"k{i}", "v": i} for i in range(10)]
    job = Job(rows, lambda r, s, v: _fails_on_odd(r["v"], s, v), str(tmp_path / "run"),
              key="id", num_procs=2)
    job.start()
    helpers.wait_job(job)
    df = job.to_pandas()
    assert list(df.columns) == ["key", "item", "result", "state", "error_type",
                                "error_message"]
    assert len(df) == 10
    assert (df.state == "done").sum() == 5 and (df.state == "failed").sum() == 5
    failed = df[df.state == "failed"]
    assert set(failed.error_type) == {"KeyError"} and failed.result.isna().all()
    joined = pd.DataFrame(rows).merge(df, left_on="id", right_on="key")
    assert (joined[joined.state == "done"].result == -joined[joined.state == "done"].v).all()
    assert "pandas" not in sys.modules or True  # imported here by the test, not by nbmplock


def test_import_nbmplock_imports_no_pandas():
    code = "import sys, nbmplock; print('pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=str(HERE.parent))
    assert out.stdout.strip() == "False", out.stderr


def test_failures_and_messages_show_a_short_repr_and_keep_the_key(tmp_path):
    big = {"id": "big", "blob": "x" * 100_000}
    summary = mp_lock([big, {"id": "ok", "blob": ""}], _raise_for_big, None, 1,
                      str(tmp_path / "run"), key="id", errors="record", verbose=False)
    (failure,) = summary.failures
    assert failure.key == "big" and failure.item == big
    snap = nbmplock.read_snapshot(str(tmp_path / "run"))
    assert snap.failures[0].key == "big"
    status = subprocess.run([sys.executable, "-m", "nbmplock", "status", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=60)
    assert "x" * 200 not in status.stdout and "big" in status.stdout


def _raise_for_big(row, shared_data, init_values):
    if row["id"] == "big":
        raise ValueError("too big")
    return len(row["blob"])


def test_the_fingerprint_hashes_keys_not_reprs(tmp_path):
    out = str(tmp_path / "run")
    mp_lock([{"id": "a", "n": 1}], lambda r, s, v: 1, None, 1, out, key="id", verbose=False)
    with open(os.path.join(out, ".nbmplock", "job.json"), encoding="utf-8") as f:
        fp = json.load(f)
    assert fp["items_hash"] == nbmplock._fingerprint.encode_keys(["a"])[0]


def items_hash(items) -> str:
    """The hash earlier releases gave a list of str keys (a serial reference):
    BLAKE2b of the count, then per 100,000 keys their lengths and their text."""
    import hashlib
    from array import array
    h = hashlib.blake2b(digest_size=16)
    h.update(str(len(items)).encode())
    for start in range(0, len(items), 100_000):
        part = items[start:start + 100_000]
        h.update(array("Q", map(len, part)).tobytes())
        h.update("".join(part).encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def test_a_long_list_hashes_alike_with_its_slices_hashed_in_a_thread():
    # encode_keys hashes the slices of a long list in a helper thread while it
    # encodes the next ones (_fingerprint._Hasher): the hash must be exactly
    # the serial one (the NUL-joined text's; with legacy=True the one a run
    # directory of an earlier release holds, items_hash), for str and bytes
    # keys; the payload decodes to the keys; no helper thread outlives the call.
    import hashlib
    import threading
    from array import array

    from nbmplock._fingerprint import JOINED, _SLICE, decode_keys, encode_keys
    for n in (1, _SLICE - 1, _SLICE + 1, 3 * _SLICE + 7):
        items = [f"k{i}\u00e9{'x' * (i % 13)}" for i in range(n)]
        items[n // 2] = ""  # an empty key, and a lone surrogate
        items[-1] = "\ud800"
        joined = hashlib.blake2b(b"nul-joined:%d:" % n, digest_size=16)
        joined.update("\0".join(items).encode("utf-8", "surrogatepass"))
        list_hash, payload = encode_keys(items, all_str=True)
        assert list_hash == JOINED + joined.hexdigest()[:31] and len(list_hash) == 32
        assert decode_keys(b"".join(payload)) == items
        legacy_hash, legacy_payload = encode_keys(items, all_str=True, legacy=True)
        assert legacy_hash == items_hash(items)
        assert decode_keys(b"".join(legacy_payload)) == items
        raw = [s.encode("utf-8", "surrogatepass") for s in items]
        h = hashlib.blake2b(digest_size=16)
        h.update(b"bytes:%d" % n)
        for start in range(0, n, _SLICE):
            part = raw[start:start + _SLICE]
            h.update(array("Q", map(len, part)).tobytes())
            h.update(b"".join(part))
        assert encode_keys(raw, legacy=True)[0] == h.hexdigest()
        joined = hashlib.blake2b(b"nul-joined-bytes:%d:" % n, digest_size=16)
        joined.update(b"\0".join(raw))
        list_hash, payload = encode_keys(raw)
        assert list_hash == JOINED + joined.hexdigest()[:31]
        assert decode_keys(b"".join(payload)) == raw
    for empty in ([], [""], [b""]):  # no key, or one empty key
        assert decode_keys(b"".join(encode_keys(empty)[1])) == empty
    # a key holding a NUL (in the last slice): the older encoding, whole
    with_nul = [f"k{i}" for i in range(_SLICE + 5)] + ["a\0b"]
    assert encode_keys(with_nul, all_str=True)[0] == items_hash(with_nul)
    assert decode_keys(b"".join(encode_keys(with_nul, all_str=True)[1])) == with_nul
    raw_nul = [b"i%d" % i for i in range(_SLICE + 5)] + [b"f\0\0"]
    assert not encode_keys(raw_nul)[0].startswith(JOINED)
    assert decode_keys(b"".join(encode_keys(raw_nul)[1])) == raw_nul
    assert not [t for t in threading.enumerate() if t.name.startswith("nbmplock-hash")]


def test_a_directory_of_the_older_list_hash_resumes_under_it(tmp_path, monkeypatch, caplog):
    """A run directory written before the NUL-joined encoding knows a str list by
    the older hash: a resume finds what it did (no "item list changed"), adds its
    records under that hash, and a finished one is seen complete at once."""
    import nbmplock._fingerprint as fingerprint
    from nbmplock._read import read_complete, read_contents, read_fingerprint

    items = [f"row-{i:04d}" for i in range(300)]
    older = fingerprint.encode_keys(items, all_str=True, legacy=True)[0]
    out, log = str(tmp_path / "run"), str(tmp_path / "ledger")
    with monkeypatch.context() as m:  # the earlier release: every str list hashed the old way
        m.setattr(fingerprint, "_encode_joined", lambda *args: None)
        first = mp_lock_value(items[:120], upper_logged, None, 2, out, verbose=False,
                              shared_data={"ledger": log})
        half, other = str(tmp_path / "half"), str(tmp_path / "other")
        Path(tmp_path / "fail").touch()  # items from 150 on fail while it is there
        mp_lock_value(items, upper_logged, None, 2, half, verbose=False, errors="record",
                      shared_data={"ledger": other, "fail": str(tmp_path / "fail")})
        os.remove(tmp_path / "fail")
    assert first == [i.upper() for i in items[:120]]
    # a longer list on a directory of its first 120 (the list changed: key matching)
    caplog.set_level("WARNING", logger="nbmplock")
    assert mp_lock_value(items, upper_logged, None, 2, out, verbose=False,
                         shared_data={"ledger": log}) == [i.upper() for i in items]
    assert sorted(ledger(log)) == items  # each ran once
    # the same list as the older release's run: its hash is kept, nothing is re-run
    caplog.clear()
    shared = {"ledger": other, "fail": str(tmp_path / "fail")}
    job = Job(items, upper_logged, half, shared_data=shared)
    assert job.progress.done == 150 and read_fingerprint(half).items_hash == older
    job.start()
    helpers.wait_job(job)
    assert job.results() == [i.upper() for i in items]
    assert sorted(ledger(other)) == items  # the 150 that failed ran again; no other
    assert not [r for r in caplog.records if "item list" in r.getMessage()]
    contents = read_contents(half)
    assert set(contents.lists) == {older} and {s.list_hash for s in contents.spans} == {older}
    assert read_complete(half)[0] == older
    assert nbmplock.is_mp_lock_completed(items, half)
    again = Job(items, upper_logged, half, shared_data=shared)
    assert again.progress.done == 300 and again.results() == [i.upper() for i in items]
    # int items (bytes keys) likewise
    ints, at = list(range(200)), str(tmp_path / "ints")
    with monkeypatch.context() as m:
        m.setattr(fingerprint, "_encode_joined", lambda *args: None)
        mp_lock_value(ints, helpers.echo, None, 2, at, verbose=False)
    summary = mp_lock(ints, helpers.echo, None, 2, at, verbose=False)
    assert summary.done == 0 and summary.skipped == 200
    assert read_fingerprint(at).items_hash == fingerprint.encode_keys(
        compute_keys(ints, None), legacy=True)[0]
    assert not [r for r in caplog.records if "item list" in r.getMessage()]


def upper_logged(item, shared_data, init_values):
    if int(item[4:]) >= 150 and os.path.exists(shared_data.get("fail", "")):
        raise ValueError("not yet")
    with open(shared_data["ledger"], "a", encoding="utf-8") as f:
        f.write(item + "\n")
    return item.upper()
