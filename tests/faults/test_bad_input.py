"""Issue 6, item 6: the bad-input catalogue, table-driven.

Every argument of ``mp_lock``, ``mp_lock_value``, ``mp_lock_batch`` and ``Job``
with wrong types and values. Each must raise :class:`nbmplock.InvalidArgumentsError`
(also a ``ValueError``) whose message is ``Invalid <argument>. Expected values: ...``,
before anything is written: the ``out_path`` directory is not even created.
Items without a stable key and bad ``key=`` (issue 15) too, each also given to an
existing run directory, which must stay byte for byte as it was. Then the
documented behaviour of the legal-but-odd inputs: duplicate items,
a missing parent directory, and functions that cannot be serialised under
``spawn``.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest

import nbmplock
import nbmplock._read

from .helpers import FIGURES


def ok_process(item, shared_data, init_values):
    return item.upper()


def ok_batch(items, shared_data, init_values):
    return [i.upper() for i in items]


async def async_process(item, shared_data, init_values):
    return item


def generator_process(item, shared_data, init_values):
    yield item


async def async_save(output_filepath, data_results, data_names):
    pass


async def async_init(shared_data):
    return {}


class AsyncCallable:
    """Accepted since issue 18 (awaited on the worker's event loop): see test_concurrency."""

    async def __call__(self, item, shared_data, init_values):
        return item


APIS = ["mp_lock", "mp_lock_value", "mp_lock_batch", "Job"]
SEED_APIS = APIS[:3]


def call(api: str, out: Path, **bad):
    """Call ``api`` with good arguments except ``bad``; positional order of the seed."""
    args = dict(data_list=["a", "b"], process=ok_batch if api == "mp_lock_batch" else ok_process,
                save_callback=None, num_procs=1, out_path=str(out), save_batch=10,
                shared_data=None, init_function=None)
    args.update(bad)
    if api == "Job":
        args.pop("verbose", None)
        data, proc, out_path = args.pop("data_list"), args.pop("process"), args.pop("out_path")
        return nbmplock.Job(data, proc, out_path, **args).start()
    args.setdefault("verbose", False)
    positional = [args.pop(k) for k in ("data_list", "process", "save_callback", "num_procs",
                                        "out_path")]
    if api == "mp_lock_batch":
        positional.append(args.pop("batch_size", 2))
    return getattr(nbmplock, api)(*positional, **args)


class _Gen:
    """A fresh generator per use (the table is built once)."""

    def __repr__(self):
        return "generator"


GEN = _Gen()


class _Marker:
    def __init__(self, name, make):
        self.name, self.make = name, make

    def __repr__(self):
        return self.name


def _broken():
    yield "a"
    yield "b"
    raise OSError("disk gone")


EMPTY_GEN = _Marker("empty generator", lambda: (i for i in ()))
BROKEN_GEN = _Marker("generator raising", _broken)


class Opaque:
    """An object whose only identity is its address."""

# (argument, bad value, APIs it applies to, words the message must contain)
CASES = [
    ("data_list", 5, APIS, "got int"),
    ("data_list", "abc", APIS, "got str"),
    ("data_list", b"ab", APIS, "got bytes"),
    ("data_list", [], APIS, "got no item"),
    ("data_list", (), APIS, "got no item"),
    ("data_list", None, APIS, "got NoneType"),
    ("data_list", {"a": 1}, APIS, "list(d.values())"),
    ("data_list", EMPTY_GEN, APIS, "got no item"),
    ("data_list", BROKEN_GEN, APIS, "reading it raised OSError: disk gone after 2 items"),
    ("data_list", ["a", object(), "b"], APIS, "index 1 is an object"),
    ("data_list", [1, 2, lambda: 3], APIS, "index 2 is a function"),
    ("data_list", [(1, object())], APIS, "holding an object"),
    ("data_list", ["a"] * 999 + [Opaque()], APIS, "index 999 is an Opaque"),
    ("data_list", [{"id": 1, "f": print}], APIS, "index 0 is a dict ({'id': 1, 'f': "),
    ("data_list", [1, 2, 3, Opaque], APIS, "index 3 is a type"),
    ("process", None, APIS, "got NoneType"),
    ("process", 5, APIS, "got int"),
    ("process", "ok_process", APIS, "got str"),
    ("process", generator_process, APIS, "got a generator function"),
    ("save_callback", async_save, APIS, "got an async def function"),
    ("save_callback", 5, APIS, "got int"),
    ("save_callback", "save", APIS, "got str"),
    ("num_procs", 0, APIS, "got 0"),
    ("num_procs", -1, APIS, "got -1"),
    ("num_procs", 1.5, APIS, "got 1.5"),
    ("num_procs", "2", APIS, "got '2'"),
    ("num_procs", True, APIS, "got True"),
    ("num_procs", None, SEED_APIS, "got None"),
    ("out_path", "", APIS, "got ''"),
    ("out_path", "   ", APIS, "got '   '"),
    ("out_path", None, APIS, "got None"),
    ("out_path", 5, APIS, "got 5"),
    ("out_path", b"/tmp/bytes-path", APIS, "got b'/tmp/bytes-path'"),
    ("save_batch", 0, APIS, "got 0"),
    ("save_batch", -3, APIS, "got -3"),
    ("save_batch", 2.0, APIS, "got 2.0"),
    ("save_batch", "10", APIS, "got '10'"),
    ("save_batch", None, APIS, "got None"),
    ("save_batch", False, APIS, "got False"),
    ("batch_size", 0, ["mp_lock_batch", "Job"], "got 0"),
    ("batch_size", -2, ["mp_lock_batch", "Job"], "got -2"),
    ("batch_size", "3", ["mp_lock_batch", "Job"], "got '3'"),
    ("batch_size", 1.5, ["mp_lock_batch", "Job"], "got 1.5"),
    ("batch_size", None, ["mp_lock_batch"], "got None"),
    ("init_function", 5, APIS, "got int"),
    ("init_function", "init", APIS, "got str"),
    ("errors", "ignore", APIS, "got 'ignore'"),
    ("errors", None, APIS, "got None"),
    ("max_retries", -1, APIS, "got -1"),
    ("max_retries", 1.5, APIS, "got 1.5"),
    ("max_retries", "2", APIS, "got '2'"),
    ("item_timeout", 0, APIS, "got 0"),
    ("item_timeout", -1.0, APIS, "got -1.0"),
    ("item_timeout", "5", APIS, "got '5'"),
    ("item_timeout", True, APIS, "got True"),
    ("item_timeout", float("nan"), APIS, "got nan"),
    ("chunk_size", 0, APIS, "got 0"),
    ("chunk_size", "4", APIS, "got '4'"),
    ("start_method", "thread", APIS, "got 'thread'"),
    ("start_method", 1, APIS, "got 1"),
    ("backend", 5, APIS, "got int"),
    ("no_such_option", 1, SEED_APIS, "keyword options among"),
    ("key", 5, APIS, "got int"),
    ("key", "", APIS, "got str"),
    ("on_change", "ignore", APIS, "got 'ignore'"),
]


try:
    import numpy
except ImportError:  # numpy is not a dependency: its cases run where it is installed
    numpy = None
if numpy is not None:
    CASES += [
        ("data_list", [numpy.arange(3)], APIS, "index 0 is a ndarray"),
        ("data_list", [1, 2, numpy.float64(1.5), numpy.arange(2)], APIS,
         "index 3 is a ndarray"),
        ("data_list", [{"id": "a", "vector": numpy.zeros(2)}], APIS, "holding a ndarray"),
    ]


def _ids(case):
    arg, value, _, _ = case
    return f"{arg}={value!r:.20}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_bad_argument_is_refused_before_anything_is_written(tmp_path, case):
    argument, value, apis, words = case
    for api in apis:
        root = tmp_path / api
        root.mkdir()
        out = root / "parent" / "out"
        bad = value.make() if isinstance(value, _Marker) else value
        with pytest.raises(nbmplock.InvalidArgumentsError) as info:
            call(api, out, **{argument: bad})
        error = info.value
        assert isinstance(error, ValueError) and isinstance(error, nbmplock.NbmplockError)
        message = str(error)
        assert message.startswith(f"Invalid {argument}. Expected values: "), (api, message)
        assert words in message, (api, message)
        assert error.argument == argument
        assert list(root.iterdir()) == [], f"{api} wrote {list(root.rglob('*'))} first"
    FIGURES.add("bad_inputs_refused", len(apis))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", APIS)
def test_out_path_that_is_a_file(tmp_path, api):
    path = tmp_path / "a-file"
    path.write_bytes(b"user data")
    with pytest.raises(nbmplock.InvalidArgumentsError, match=r"^Invalid out_path\. Expected"):
        call(api, path)
    assert path.read_bytes() == b"user data" and list(tmp_path.iterdir()) == [path]
    FIGURES.add("bad_inputs_refused")


@pytest.mark.timeout(30)
def test_is_mp_lock_completed_checks_its_arguments_and_writes_nothing(tmp_path):
    out = tmp_path / "nothing-here"
    for bad in ([], ["a", object()], "abc", None):
        with pytest.raises(nbmplock.InvalidArgumentsError, match="^Invalid data_list"):
            nbmplock.is_mp_lock_completed(bad, str(out))
    for bad in ("", None, 3):
        with pytest.raises(nbmplock.InvalidArgumentsError, match="^Invalid out_path"):
            nbmplock.is_mp_lock_completed(["a"], bad)
    assert nbmplock.is_mp_lock_completed(["a"], str(out)) is False
    assert not out.exists()


# -- legal but odd ------------------------------------------------------------

def counting(item, shared_data, init_values):
    fd = os.open(shared_data["ledger"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, (json.dumps(item) + "\n").encode())
    os.close(fd)
    return item.upper()


def counting_batch(items, shared_data, init_values):
    return [counting(i, shared_data, init_values) for i in items]


def _counts(ledger: Path) -> Counter:
    return Counter(json.loads(line) for line in ledger.read_text().splitlines())


DUPS = ["a", "b", "a", "c", "b", "a", "", "", "d"]


@pytest.mark.timeout(60)
def test_duplicate_items_run_once_and_mp_lock_value_fills_every_position(tmp_path):
    ledger = tmp_path / "ledger"
    shared = {"ledger": str(ledger)}
    values = nbmplock.mp_lock_value(DUPS, counting, None, 2, str(tmp_path / "v"),
                                    shared_data=shared, verbose=False)
    assert values == [i.upper() for i in DUPS]
    assert _counts(ledger) == Counter(set(DUPS))
    assert nbmplock.is_mp_lock_completed(DUPS, str(tmp_path / "v"))
    # a resume with the same duplicates: nothing runs, the same values come back
    values = nbmplock.mp_lock_value(DUPS, counting, None, 2, str(tmp_path / "v"),
                                    shared_data=shared, verbose=False)
    assert values == [i.upper() for i in DUPS] and _counts(ledger) == Counter(set(DUPS))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["mp_lock", "mp_lock_batch"])
def test_duplicate_items_are_saved_once(tmp_path, api):
    ledger = tmp_path / "ledger"
    saved: list = []

    def save(path, results, names):
        saved.extend(zip(names, results))

    fn = counting_batch if api == "mp_lock_batch" else counting
    extra = (2,) if api == "mp_lock_batch" else ()
    summary = getattr(nbmplock, api)(DUPS, fn, save, 2, str(tmp_path / "out"), *extra,
                                     save_batch=2, shared_data={"ledger": str(ledger)},
                                     verbose=False)
    assert sorted(saved) == sorted((i, i.upper()) for i in set(DUPS))
    assert _counts(ledger) == Counter(set(DUPS))
    assert summary.done == len(set(DUPS))


@pytest.mark.timeout(60)
def test_missing_parents_of_out_path_are_created(tmp_path):
    out = tmp_path / "a" / "b" / "c" / "run"
    assert nbmplock.mp_lock_value(["x", "y"], ok_process, None, 1, str(out),
                                  verbose=False) == ["X", "Y"]
    assert (out / ".nbmplock" / "log").exists()


@pytest.mark.timeout(60)
def test_pathlike_out_path_is_accepted(tmp_path):
    assert nbmplock.mp_lock_value(["x"], ok_process, None, 1, tmp_path / "p",
                                  verbose=False) == ["X"]


# -- functions that cannot travel to a spawned worker -------------------------------

def _closure_over(resource):
    def process(item, shared_data, init_values):
        return f"{item}:{type(resource).__name__}"
    return process


@pytest.mark.timeout(90)
@pytest.mark.parametrize("where", ["process", "init_function", "shared_data"])
def test_unserialisable_under_spawn_says_why_and_how_to_fix(tmp_path, where):
    sock = socket.socket()
    ledger = tmp_path / "ledger"
    shared = {"ledger": str(ledger)}
    kwargs = dict(shared_data=shared, verbose=False, start_method="spawn")
    process = counting
    if where == "process":
        process = _closure_over(sock)
    elif where == "init_function":
        kwargs["init_function"] = lambda shared_data: sock
    else:
        kwargs["shared_data"] = dict(shared, connection=sock)
    try:
        with pytest.raises(nbmplock.SerializationError) as info:
            nbmplock.mp_lock(["a", "b"], process, None, 2, str(tmp_path / "out"), **kwargs)
    finally:
        sock.close()
    message = str(info.value)
    assert isinstance(info.value, TypeError)
    assert "socket" in message and "init_function" in message, message
    assert "start_method='fork'" in message
    assert not ledger.exists(), "work started"
    # nothing is damaged: the same run with a function that travels completes
    nbmplock.mp_lock(["a", "b"], counting, None, 2, str(tmp_path / "out"),
                     shared_data=shared, verbose=False, start_method="spawn")
    assert _counts(ledger) == Counter(["a", "b"])
    FIGURES.add("faults_injected")


@pytest.mark.timeout(90)
def test_closure_over_a_lock_does_travel_under_spawn(tmp_path):
    """dill pickles a threading.Lock (as a new lock), so this one is not an error."""
    process = _closure_over(threading.Lock())
    assert nbmplock.mp_lock_value(["a"], process, None, 1, str(tmp_path / "out"),
                                  verbose=False, start_method="spawn") == ["a:lock"]


@pytest.mark.timeout(60)
def test_items_with_nul_are_not_confused_with_another_list(tmp_path):
    """items_hash once joined items with NUL: ['a', 'b'] and ['a\\x00b'] collided, and
    the COMPLETE mark of one list finished the other unprocessed (fixed in 40f894e)."""
    out = str(tmp_path / "out")
    ledger = tmp_path / "ledger"
    shared = {"ledger": str(ledger)}
    assert nbmplock.mp_lock_value(["a", "b"], counting, None, 1, out, shared_data=shared,
                                  verbose=False) == ["A", "B"]
    assert nbmplock.is_mp_lock_completed(["a\x00b"], out) is False
    assert nbmplock.mp_lock_value(["a\x00b"], counting, None, 1, out, shared_data=shared,
                                  verbose=False) == ["A\x00B"]
    assert _counts(ledger) == Counter(["a", "b", "a\x00b"])


def returns_lazy(item, shared_data, init_values):
    """A plain function that returns a generator or a coroutine for some items."""
    if item == "gen":
        return (c for c in item)
    if item == "coro":
        return async_process(item, shared_data, init_values)
    return item


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["mp_lock", "mp_lock_batch"])
def test_a_coroutine_or_generator_returned_at_run_time_is_a_failure_not_done(tmp_path, api):
    """Issue 12, case 3: never record done an item whose work never ran."""
    out = tmp_path / "out"
    items = ["a", "gen", "b", "coro", "c"]
    process = returns_lazy
    if api == "mp_lock_batch":
        def process(batch, shared_data, init_values):
            return [returns_lazy(i, shared_data, init_values) for i in batch]
    with pytest.raises(TypeError, match="returned a generator"):
        call(api, out, data_list=items, process=process)
    summary = call(api, out, data_list=items, process=process, errors="record")
    assert {f.item for f in summary.failures} == {"gen", "coro"}
    assert {f.exc_type for f in summary.failures} == {"TypeError"}
    done = nbmplock._read.read_contents(str(out)).done
    assert done == {"a", "b", "c"}
    assert not nbmplock.is_mp_lock_completed(items, str(out))
    log = (out / ".nbmplock" / "output.log").read_text()
    assert "never awaited" not in log


# -- keys (issue 15) ------------------------------------------------------------

def _raises_half_way(item):
    if item["n"] >= 2:
        raise ValueError(f"no key for {item['n']}")
    return str(item["n"])


Record = collections.namedtuple("Record", "id value")

KEY_CASES = [
    # items, key, words
    ([{"id": "a"}, {"id": "a", "x": 1}], "id", "the items at index 0"),
    ([{"id": "a"}, {"id": "b"}], lambda r: r["missing"], "it raised KeyError"),
    ([{"id": "a"}], lambda r: 7, "it returned a int"),
    ([{"id": "a"}, {"name": "b"}], "id", "it raised KeyError"),
    (["a", "b"], lambda s: "same", "the same key 'same'"),
    # colliding keys: both positions named, however far apart
    ([{"id": str(i), "n": i} for i in range(1000)] + [{"id": "3", "n": -1}], "id",
     "the items at index 3 ({'id': '3', 'n': 3}) and 1000 ({'id': '3', 'n': -1}) have "
     "the same key '3'"),
    ([Record("r1", 1), Record("r2", 2), Record("r1", 3)], "id",
     "the items at index 0 (Record(id='r1', value=1)) and 2 (Record(id='r1', value=3))"),
    ([(1, "a"), (2, "a")], lambda t: t[1], "the items at index 0 ((1, 'a')) and 1"),
    # a key= that raises, on the first item or half way through the list
    ([{"n": i} for i in range(5)], _raises_half_way,
     "it raised ValueError: no key for 2 on the item at index 2"),
    ([Record("r1", 1)], "missing_field", "it raised AttributeError"),
    ([[1, 2]], "id", "it raised AttributeError"),
    # a key= that returns something else than a str
    ([{"id": 1}], "id", "it returned a int (1) for the item at index 0"),
    ([{"id": "a"}, {"id": None}], "id", "it returned a NoneType (None) for the item at index 1"),
    (["a"], lambda s: s.encode(), "it returned a bytes (b'a')"),
    ([Record(("x", 1), 1)], "id", "it returned a tuple"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("case", KEY_CASES, ids=[c[2] for c in KEY_CASES])
def test_bad_keys_are_refused_before_anything_is_written(tmp_path, api, case):
    items, key, words = case
    out = tmp_path / "parent" / "out"
    with pytest.raises(nbmplock.InvalidArgumentsError) as info:
        call(api, out, data_list=items, key=key)
    assert str(info.value).startswith("Invalid key. Expected values: "), info.value
    assert words in str(info.value)
    assert not tmp_path.joinpath("parent").exists()
    FIGURES.add("bad_inputs_refused")


def _files(root: Path) -> dict:
    """Every file and folder under ``root``: its bytes (None for a folder) and mode."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes(), p.stat().st_mode)
            for p in sorted(root.rglob("*"))}


def recording(item, shared_data, init_values):
    fd = os.open(shared_data["ledger"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, (repr(item) + "\n").encode())
    os.close(fd)
    return repr(item)


def recording_batch(items, shared_data, init_values):
    return [recording(i, shared_data, init_values) for i in items]


# (name, arguments): every bad input of issue 15, each given to an existing run directory
UNTOUCHED = [
    ("object()", lambda: dict(data_list=["a", object()])),
    ("lambda", lambda: dict(data_list=["a", lambda: 1])),
    ("numpy array", lambda: dict(data_list=["a", pytest.importorskip("numpy").arange(3)])),
    ("colliding keys", lambda: dict(data_list=[{"id": "a"}, {"id": "a", "x": 1}], key="id")),
    ("key= raising", lambda: dict(data_list=[{"id": "a"}, {"n": 1}], key="id")),
    ("key= returning an int", lambda: dict(data_list=[{"id": 1}], key="id")),
    ("key= function returning None", lambda: dict(data_list=["a"], key=lambda s: None)),
    ("empty generator", lambda: dict(data_list=EMPTY_GEN.make())),
    ("generator raising half way", lambda: dict(data_list=_broken())),
    ("generator of unkeyable items", lambda: dict(data_list=(object() for _ in range(3)))),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name,bad", UNTOUCHED, ids=[n for n, _ in UNTOUCHED])
def test_bad_input_leaves_an_existing_run_directory_untouched(tmp_path, api, name, bad):
    """Refused before any work: no item runs, and the run directory (a finished run)
    is byte for byte what it was, lock file and modes included."""
    out = tmp_path / "out"
    ledger = tmp_path / "ledger"
    shared = {"ledger": str(ledger)}
    summary = nbmplock.mp_lock(["a", "b", "c"], recording,
                               None, 1, str(out), verbose=False, shared_data=shared)
    assert summary.done == 3
    ledger.unlink()
    before = _files(out)
    process = recording_batch if api == "mp_lock_batch" else recording
    with pytest.raises(nbmplock.InvalidArgumentsError) as info:
        call(api, out, process=process, shared_data=shared, **bad())
    assert info.value.argument in ("data_list", "key"), info.value
    assert str(info.value).startswith(f"Invalid {info.value.argument}. Expected values: ")
    assert _files(out) == before, f"{name}: {api} changed the run directory"
    assert not ledger.exists(), f"{name}: {api} ran an item before refusing"
    FIGURES.add("bad_inputs_refused")
