"""The subprocess side of the API fault test: ``mp_lock_value`` calling a local HTTP API.

Run as ``python tests/faults/api_driver.py CONFIG_JSON``: the test SIGKILLs it
at random instants and reads the server's own log (:mod:`.api_server`). The
functions are imported by the in-process tests (the 429 test) too.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from urllib.parse import quote

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))


class Throttled(Exception):
    """HTTP 429 or 503: worth a retry, after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def init(shared: dict) -> dict:
    """One opener per worker process, shared by its threads (urllib's is thread-safe)."""
    return {"opener": urllib.request.build_opener(), "pid": os.getpid()}


def call_api(item: str, shared: dict, init_values: dict) -> str:
    url = f"{shared['url']}/item/{quote(item, safe='')}?run={shared.get('run', 0)}"
    try:
        with init_values["opener"].open(url, timeout=30) as resp:
            return json.load(resp)["answer"]
    except urllib.error.HTTPError as exc:
        if exc.code in (429, 503):
            after = exc.headers.get("Retry-After")
            raise Throttled(f"HTTP {exc.code} for {item}",
                            float(after) if after else None) from None
        raise


def expected(item: str) -> str:
    return f"ok:{item}"


def make_items(n: int, tag: str) -> list[str]:
    return [f"{tag}{i:05d}" for i in range(n)]


def main(cfg: dict) -> int:
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    import faulthandler
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import nbmplock

    items = make_items(cfg["n_items"], cfg["tag"])
    shared = {"url": cfg["url"], "run": cfg["run"]}
    print("READY", os.getpid(), flush=True)
    results = nbmplock.mp_lock_value(items, call_api, None, cfg["workers"], cfg["out"],
                                     shared_data=shared, init_function=init, verbose=False,
                                     concurrency=cfg["concurrency"])
    final = {"completed": nbmplock.is_mp_lock_completed(items, cfg["out"]),
             "results_ok": results == [expected(i) for i in items]}
    path = os.path.join(cfg["ledger"], f"final-r{cfg['run']:04d}.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(final, f)
    os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    sys.exit(main(json.loads(sys.argv[1])))
