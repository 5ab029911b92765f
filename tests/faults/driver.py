"""The subprocess side of the fault-injection tests: one nbmplock call per process.

Run as ``python tests/faults/driver.py CONFIG_JSON``. The parent test kills it
(SIGKILL, SIGINT) at chosen instants, or starts two at once, and then reads
what it left behind. Everything the driver knows is written to a *ledger*
directory outside ``out_path``, one append-only file per writer:

``processed-r{run}-p{pid}.jsonl``
    one JSON string per line, written by a worker *before* it works on an item
    (so an item killed half-way still counts as processed);
``saved-r{run}.jsonl``
    one ``[item, result]`` per line, written by ``save_callback`` with one
    ``os.write`` per batch (SIGKILL keeps what the OS has);
``save-calls-r{run}.jsonl``
    the time (``time.time()``) at which each ``save_callback`` call started;
``final-r{run}.json``
    written once the call returned: its results and ``is_mp_lock_completed``;
``status-r{run}.json``
    for the two-writer test: ``{"status": "ran" | "locked", ...}``.

The functions at module level (``process``, ``init``, ``make_items``,
``expected_result``) are imported by the tests too, so a run in the test
process has the same function fingerprint as the driver's runs.

Items are of one *kind* per run (``cfg["kind"]``, see :data:`KINDS`): ``str``
(every awkward string), or ints, dicts, tuples, paths, named tuples, each
keyed by nbmplock's canonical encoding or by ``key=`` (``cfg["key"]``: a field
name, or ``"callable"`` for :func:`label`). Every item has a *label*, a
``str`` unique in its list: what the ledgers record, so the tests compare
items of any kind as strings.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import threading
import time
import zlib
from typing import NamedTuple

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))


# -- items and what process() returns for them ----------------------------

def make_items(n: int, tag: str = "i", kind: str = "str") -> list:
    """``n`` distinct items of ``kind`` (see :data:`KINDS`), labelled by distinct
    strings with every awkward kind of ``str`` among them."""
    names = _names(n, tag)
    make = KINDS[kind][0]
    items = [make(i, s) for i, s in enumerate(names)]
    assert len({label(x) for x in items}) == n
    return items


def _names(n: int, tag: str) -> list[str]:
    odd = [
        "",                                  # the empty string
        "  edge spaces  ",
        "line\nbreak", "\r\n", "tab\tand\x00nul", "\n",
        "unicode é ß 日本 🙂",
        "lone surrogate \ud800",
        "x" * 20_000,                        # a long one
        "NL\x01\x02 looks like a record header",
    ]
    items = [f"{tag}{i:06d}" for i in range(n)]
    for k, text in enumerate(odd):
        if k < n:
            # spread them over the list: first, last, and in between
            pos = 0 if k == 0 else (n - 1 if k == 1 else (k * 7919) % n)
            items[pos] = text if k < 2 else f"{tag}{pos:06d}{text}"
    assert len(set(items)) == n
    return items


class Payload:
    """An object whose only identity is its address (pickles, but has no stable key)."""

    def __init__(self, n: int):
        self.n = n


class Row(NamedTuple):
    """A named tuple item (a row of ``df.itertuples()``, say)."""

    id: str
    n: int
    score: float


#: kind -> (how to make the item of label ``s`` at position ``i``, key= for the run)
KINDS: dict = {
    "str": (lambda i, s: s, None),
    "int": (lambda i, s: i, None),
    "dict": (lambda i, s: {"id": s, "n": i, "tags": [i % 3, None, 1.5], "ok": i % 2 == 0},
             None),
    "tuple": (lambda i, s: (s, i, -0.5, None, b"\x00b"), None),
    "path": (lambda i, s: pathlib.PosixPath("photos", f"{s}.jpg"), None),
    "namedtuple": (lambda i, s: Row(s, i, i / 7), None),
    # a value with no canonical encoding inside: only key= makes these items usable
    "dict-key=field": (lambda i, s: {"id": s, "n": i, "payload": Payload(i)}, "id"),
    "namedtuple-key=field": (lambda i, s: Row(s, i, i / 7), "id"),
    "tuple-key=callable": (lambda i, s: (s, i, [i, i]), "callable"),
}


def label(item) -> str:
    """The ``str`` that names ``item`` in the ledgers (unique in a list); also the
    ``key=`` function of the ``"callable"`` kinds."""
    if type(item) is str:
        return item
    if type(item) is int:
        return f"#{item}"
    if isinstance(item, dict):
        return item["id"]
    if isinstance(item, Row):
        return item.id
    if isinstance(item, tuple):
        return item[0]
    if isinstance(item, pathlib.PurePath):
        return item.as_posix()
    raise TypeError(f"no label for {item!r}")


def key_option(kind: str):
    """What the driver passes as ``key=`` for items of ``kind``."""
    key = KINDS[kind][1]
    return label if key == "callable" else key


def _crc(text: str) -> int:
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def expected_result(item) -> list:
    name = label(item)
    return [len(name), _crc(name), name[::-1][:50]]


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _append(fd: int, text: str) -> None:
    os.write(fd, text.encode("utf-8", "surrogatepass"))


# -- the functions nbmplock runs ------------------------------------------

def init(shared: dict) -> dict:
    """Once per worker: open this worker's 'processed' ledger."""
    path = os.path.join(shared["ledger"], f"processed-r{shared['run']:04d}-p{os.getpid()}.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
    return {"fd": fd}


def process(item, shared: dict, init_values: dict) -> list:
    """Log the item's label, then work 0.5-2 ms (deterministic per item), then return."""
    name = label(item)
    _append(init_values["fd"], json.dumps(name) + "\n")
    lo, hi = shared["work_ms"]
    _spin((lo + (_crc(name) % 1000) / 1000 * (hi - lo)) / 1000)
    return expected_result(item)


class Saver:
    """``save_callback`` writing ``[item, result]`` lines, one write per batch."""

    def __init__(self, ledger: str, run: int, out_path: str, sleep: float = 0.0,
                 hang_after: int | None = None):
        path = os.path.join(ledger, f"saved-r{run:04d}.jsonl")
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        calls = os.path.join(ledger, f"save-calls-r{run:04d}.jsonl")
        self.calls_fd = os.open(calls, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                0o644)
        self.expected_path = os.path.join(out_path, "data")
        self.busy = threading.Lock()
        self.violations: list[str] = []
        self.sleep = sleep
        self.hang_after = hang_after
        self.n_calls = 0

    def __call__(self, output_filepath: str, data_results: list, data_names: list) -> None:
        # when each call starts (time.time()), for tests of how fast a stop takes effect
        _append(self.calls_fd, json.dumps(time.time()) + "\n")
        self.n_calls += 1
        if self.hang_after is not None and self.n_calls > self.hang_after:
            threading.Event().wait()  # a save that never returns
        if self.sleep:
            time.sleep(self.sleep)
        if not self.busy.acquire(blocking=False):
            self.violations.append("save_callback called concurrently")
        try:
            if output_filepath != self.expected_path:
                self.violations.append(f"output_filepath {output_filepath!r}")
            if len(data_results) != len(data_names):
                self.violations.append("results and names differ in length")
            lines = "".join(json.dumps([label(n), r]) + "\n"
                            for n, r in zip(data_names, data_results))
            _append(self.fd, lines)
        finally:
            self.busy.release()


# -- modes ------------------------------------------------------------------

def _wait_for(path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"driver: barrier {path} never appeared")
        time.sleep(0.0002)


_keep: list = []


def _slow_child_start(seconds: float) -> None:
    """Widen the instant between a worker's fork and its first line (a loaded machine).

    An after-fork hook of ``multiprocess`` runs in every forked child before the
    process target; nbmplock is not touched.
    """
    import multiprocess.util

    class _Anchor:
        pass

    anchor = _Anchor()
    _keep.append(anchor)  # the registry holds its objects weakly
    multiprocess.util.register_after_fork(anchor, lambda _obj: time.sleep(seconds))


def main(cfg: dict) -> int:
    import signal

    # Started from a non-interactive shell in the background (``cmd &``, some CI
    # runners), a process inherits SIGINT ignored and Python installs no
    # KeyboardInterrupt handler: the Ctrl-C tests need the default one.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # A hang must explain itself: the test sends SIGUSR1 before it kills a driver
    # that did not end in time, and every thread's stack lands in its stderr file.
    import faulthandler
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import nbmplock

    if cfg.get("child_start_delay"):
        _slow_child_start(cfg["child_start_delay"])
    if cfg.get("record_every_batch"):  # one done record per save call (a long log)
        import nbmplock._saver
        nbmplock._saver.RECORD_BATCHES = 1

    if cfg.get("verbose"):
        import nbmplock._progress  # noqa: F401 - imports tqdm now, not after READY
    ledger, run, out = cfg["ledger"], cfg["run"], cfg["out"]
    kind = cfg.get("kind", "str")
    items = cfg["items"] if cfg.get("items") else make_items(cfg["n_items"],
                                                             cfg.get("tag", "i"), kind)
    shared = {"ledger": ledger, "run": run, "work_ms": cfg.get("work_ms", [0.5, 2.0])}
    save = Saver(ledger, run, out, cfg.get("save_sleep", 0.0), cfg.get("save_hang_after"))
    options = {k: cfg[k] for k in ("chunk_size", "errors", "max_retries", "item_timeout",
                                   "start_method") if cfg.get(k) is not None}
    if key_option(kind) is not None:
        options["key"] = key_option(kind)
    api = {"lock": nbmplock.mp_lock, "value": nbmplock.mp_lock_value}[cfg.get("api", "lock")]
    print("READY", os.getpid(), flush=True)
    if cfg.get("barrier"):
        _wait_for(cfg["barrier"])
    status: dict = {"pid": os.getpid()}
    try:
        result = api(items, process, save, cfg.get("workers", 2), out,
                     save_batch=cfg.get("save_batch", 10), shared_data=shared,
                     init_function=init, verbose=cfg.get("verbose", False), **options)
    except nbmplock.RunLockedError as exc:
        status.update(status="locked", holder=exc.pid, message=str(exc))
        _write_json(os.path.join(ledger, f"status-r{run:04d}.json"), status)
        return 3
    status["status"] = "ran"
    if cfg.get("barrier"):
        _write_json(os.path.join(ledger, f"status-r{run:04d}.json"), status)
    final = {"completed": nbmplock.is_mp_lock_completed(items, out, key=key_option(kind)),
             "violations": save.violations,
             "results": result if isinstance(result, list) else None}
    _write_json(os.path.join(ledger, f"final-r{run:04d}.json"), final)
    return 0


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


if __name__ == "__main__":
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    sys.exit(main(json.loads(sys.argv[1])))
