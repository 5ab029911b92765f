"""W7 "I/O-bound" and W8 "rate limit" (issue 18): ``python -m bench.io_bench [--repeats N]``.

W7: 2,000 items, each one HTTP GET to a local server (a separate process,
asyncio, keep-alive) that answers after 50 ms; 64 requests in flight, side
by side in one run:

* ``ThreadPoolExecutor(64)`` + one ``httpx.Client``;
* asyncio + ``httpx.AsyncClient`` + a semaphore of 64;
* mpire ``WorkerPool(64, start_method="threading")`` + one ``httpx.Client``;
* nbmplock ``num_procs=1, concurrency=64``: a plain function (one
  ``httpx.Client`` from ``init_function``) and an ``async def`` (an
  ``httpx.AsyncClient`` from an async ``init_function``); every item recorded
  durably in a run directory;
* asyncio and nbmplock's ``async def`` again with a minimal stdlib client
  (:class:`StreamClient`), since ``httpx.AsyncClient`` is the bottleneck there.

Throughput (items/s, the median of ``--repeats`` runs), and CPU seconds per
item: of the calling process ("parent") and of the client side in all
(parent + its workers; the server's own CPU is not counted).

W8: 600 items at ``rate_limit="20/s"`` (``num_procs=2, concurrency=8``):
wall time, the span from the first start to the last (ideal 599/20 = 29.95 s),
and the most starts in any 1 s window (documented bound: rate + 1 = 21).

Writes ``bench/results/io.md`` and ``io.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
N_ITEMS = 2000
IN_FLIGHT = 64
DELAY = 0.05
W8_ITEMS = 600
W8_RATE = "20/s"

SERVER = r"""
import asyncio, sys
DELAY = float(sys.argv[1])

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head:
                break
            await asyncio.sleep(DELAY)
            body = b'{"ok": true}'
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


class Server:
    """The local API, in a process of its own (its CPU is not the client's)."""

    def __init__(self, delay: float):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(delay)],
                                     stdout=subprocess.PIPE, text=True)
        port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{port}"

    def cpu(self) -> float:
        import psutil
        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def _cpu() -> tuple[float, float]:
    """(this process's CPU seconds, this process's and its children's)."""
    from .loadmeter import own_cpu_seconds
    return time.process_time(), own_cpu_seconds()


# -- the contenders -------------------------------------------------------------

def _limits():
    import httpx
    return httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)


def run_threadpool(url: str, items: list) -> None:
    import httpx
    with httpx.Client(limits=_limits()) as client, ThreadPoolExecutor(IN_FLIGHT) as pool:
        for response in pool.map(lambda i: client.get(f"{url}/item/{i}"), items):
            response.raise_for_status()


def run_asyncio(url: str, items: list) -> None:
    import httpx

    async def main():
        gate = asyncio.Semaphore(IN_FLIGHT)
        async with httpx.AsyncClient(limits=_limits()) as client:
            async def one(i):
                async with gate:
                    (await client.get(f"{url}/item/{i}")).raise_for_status()
            await asyncio.gather(*(one(i) for i in items))

    asyncio.run(main())


class StreamClient:
    """A minimal keep-alive HTTP/1.1 GET client on asyncio streams (stdlib only):
    the asyncio contenders' second client, since httpx.AsyncClient's pool is slow
    with 64 requests at once."""

    def __init__(self, url: str):
        host, port = url.rsplit("//", 1)[1].split(":")
        self.host, self.port = host, int(port)
        self._idle: list = []

    async def get(self, path: str) -> bytes:
        conn = self._idle.pop() if self._idle else await asyncio.open_connection(
            self.host, self.port)
        reader, writer = conn
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await reader.readexactly(length)
        self._idle.append(conn)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        return body

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class HttpClientPerThread(threading.local):
    """The threads' stdlib client: one keep-alive ``http.client`` connection per
    thread (a ``threading.local``, the pattern docs/calling-an-api.md gives for
    a client that is not thread-safe). Costs far less CPU per request than httpx."""

    def __init__(self, url: str):
        host, port = url.rsplit("//", 1)[1].split(":")
        self.host, self.port = host, int(port)
        self.conn = None

    def get(self, path: str) -> bytes:
        import http.client
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        self.conn.request("GET", path)
        response = self.conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        return body


def run_threadpool_stdlib(url: str, items: list) -> None:
    client = HttpClientPerThread(url)
    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        list(pool.map(lambda i: client.get(f"/item/{i}"), items))


def nb_tinit(shared):
    return {"client": HttpClientPerThread(shared["url"])}


def nb_tget(item, shared, init_values):
    init_values["client"].get(f"/item/{item}")
    return item


def run_nbmplock_stdlib(url: str, items: list) -> None:
    _run_nbmplock(nb_tget, nb_tinit, url, items)


def run_asyncio_streams(url: str, items: list) -> None:
    async def main():
        gate = asyncio.Semaphore(IN_FLIGHT)
        client = StreamClient(url)

        async def one(i):
            async with gate:
                await client.get(f"/item/{i}")
        await asyncio.gather(*(one(i) for i in items))
        await client.aclose()

    asyncio.run(main())


def run_mpire(url: str, items: list) -> None:
    import httpx
    from mpire import WorkerPool
    with httpx.Client(limits=_limits()) as client:
        with WorkerPool(n_jobs=IN_FLIGHT, start_method="threading") as pool:
            def get(i):
                client.get(f"{url}/item/{i}").raise_for_status()
            pool.map(get, items, chunk_size=1, progress_bar=False)


def nb_init(shared):
    import httpx
    return {"client": httpx.Client(limits=_limits())}


def nb_get(item, shared, init_values):
    init_values["client"].get(f"{shared['url']}/item/{item}").raise_for_status()
    return item


async def nb_ainit(shared):
    import httpx
    return {"client": httpx.AsyncClient(limits=_limits())}


async def nb_aget(item, shared, init_values):
    (await init_values["client"].get(f"{shared['url']}/item/{item}")).raise_for_status()
    return item


async def nb_sinit(shared):
    return {"client": StreamClient(shared["url"])}


async def nb_sget(item, shared, init_values):
    await init_values["client"].get(f"/item/{item}")
    return item


def _run_nbmplock(process, init, url: str, items: list) -> None:
    import nbmplock
    with tempfile.TemporaryDirectory(prefix="io-bench-") as tmp:
        summary = nbmplock.mp_lock(items, process, None, 1, os.path.join(tmp, "run"),
                                   shared_data={"url": url}, init_function=init,
                                   concurrency=IN_FLIGHT, verbose=False)
        assert summary.done == len(items) and summary.failed == 0, summary


def run_nbmplock(url: str, items: list) -> None:
    _run_nbmplock(nb_get, nb_init, url, items)


def run_nbmplock_async(url: str, items: list) -> None:
    _run_nbmplock(nb_aget, nb_ainit, url, items)


def run_nbmplock_streams(url: str, items: list) -> None:
    _run_nbmplock(nb_sget, nb_sinit, url, items)


CONTENDERS = [
    ("ThreadPoolExecutor(64) + httpx.Client", run_threadpool),
    ("asyncio + httpx.AsyncClient, semaphore 64", run_asyncio),
    ("mpire threading, 64 workers + httpx.Client", run_mpire),
    ("nbmplock num_procs=1 concurrency=64 (def)", run_nbmplock),
    ("nbmplock num_procs=1 concurrency=64 (async def, httpx.AsyncClient)", run_nbmplock_async),
    ("asyncio + stdlib streams client, semaphore 64", run_asyncio_streams),
    ("nbmplock num_procs=1 concurrency=64 (async def, stdlib streams)", run_nbmplock_streams),
    ("ThreadPoolExecutor(64) + stdlib http.client per thread", run_threadpool_stdlib),
    ("nbmplock num_procs=1 concurrency=64 (def, stdlib http.client per thread)",
     run_nbmplock_stdlib),
]
#: The client each contender uses: "vs same client" compares within a client.
CLIENT = {run_threadpool: "httpx.Client", run_mpire: "httpx.Client",
          run_nbmplock: "httpx.Client", run_asyncio: "httpx.AsyncClient",
          run_nbmplock_async: "httpx.AsyncClient", run_asyncio_streams: "streams",
          run_nbmplock_streams: "streams", run_threadpool_stdlib: "http.client",
          run_nbmplock_stdlib: "http.client"}


def w7(repeats: int) -> list[dict]:
    server = Server(DELAY)
    rows = []
    try:
        items = [str(i) for i in range(N_ITEMS)]
        run_threadpool(server.url, items[:200])  # warm up the server
        samples: dict[str, list] = {name: [] for name, _ in CONTENDERS}
        for _ in range(repeats):
            for name, fn in CONTENDERS:  # interleaved: a busy moment hits each alike
                s0, c0 = server.cpu(), _cpu()
                began = time.perf_counter()
                fn(server.url, items)
                wall = time.perf_counter() - began
                c1, s1 = _cpu(), server.cpu()
                samples[name].append((wall, c1[0] - c0[0], (c1[1] - c0[1]) - (s1 - s0)))
        for name, fn in CONTENDERS:
            walls = [w for w, _, _ in samples[name]]
            wall = statistics.median(walls)
            parent = statistics.median(p for _, p, _ in samples[name])
            total = statistics.median(t for _, _, t in samples[name])
            rows.append(dict(name=name, client=CLIENT[fn], wall=wall, walls=walls,
                             items_per_s=N_ITEMS / wall,
                             parent_cpu_ms_per_item=1000 * parent / N_ITEMS,
                             client_cpu_ms_per_item=1000 * total / N_ITEMS))
    finally:
        server.close()
    return with_ratios(rows)


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's throughput over the best peer's, overall and with the same client."""
    peers = [r for r in rows if not r["name"].startswith("nbmplock")]
    best = max(r["items_per_s"] for r in peers)
    for r in rows:
        same = [p["items_per_s"] for p in peers if p["client"] == r["client"]]
        r["vs_best_peer"] = r["items_per_s"] / best
        r["vs_same_client"] = r["items_per_s"] / max(same) if same else None
    return rows


def w8_stamp(item, shared, init_values):
    return time.monotonic()


def w8() -> dict:
    import nbmplock
    with tempfile.TemporaryDirectory(prefix="io-bench-") as tmp:
        began = time.monotonic()
        starts = nbmplock.mp_lock_value(list(range(W8_ITEMS)), w8_stamp, None, 2,
                                        os.path.join(tmp, "run"), concurrency=8,
                                        rate_limit=W8_RATE, verbose=False)
        wall = time.monotonic() - began
    starts.sort()
    window = max(bisect.bisect_right(starts, s + 1.0) - i for i, s in enumerate(starts))
    ideal = (W8_ITEMS - 1) / 20
    return dict(items=W8_ITEMS, rate=W8_RATE, wall=wall, span=starts[-1] - starts[0],
                ideal_span=ideal, span_error=(starts[-1] - starts[0]) / ideal - 1,
                max_starts_in_1s=window, documented_bound=21)


def write(rows: list[dict], w8row: dict, repeats: int, load: float | None,
          when: str | None = None) -> None:
    RESULTS.mkdir(exist_ok=True)
    env = dict(python=platform.python_version(), cpus=os.cpu_count(),
               machine=platform.machine(),
               when=when or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               repeats=repeats, foreign_load=load)
    (RESULTS / "io.json").write_text(json.dumps(dict(env=env, w7=rows, w8=w8row), indent=1))
    lines = [
        "# I/O-bound work: W7 and W8 (issue 18)", "",
        f"`python -m bench.io_bench --repeats {repeats}`; Python {env['python']}, "
        f"{env['cpus']} CPUs, {env['when']}."
        + (f" Other processes took {load:.0%} of the machine meanwhile: absolute figures "
           "are noisy, the side-by-side order less so."
           if load is not None and load >= 0.05 else ""), "",
        f"## W7: {N_ITEMS:,} HTTP GETs to a local server answering after "
        f"{DELAY * 1000:.0f} ms, {IN_FLIGHT} in flight", "",
        f"Ideal: {N_ITEMS} / {IN_FLIGHT} x {DELAY:g} s = {N_ITEMS / IN_FLIGHT * DELAY:.2f} s "
        f"({IN_FLIGHT / DELAY:,.0f} items/s). Median of {repeats} interleaved runs. CPU per "
        "item: of the calling process (parent), and of the client side in all (parent + "
        "nbmplock's worker process; the server's own CPU left out).", "",
        "| contender | wall s | items/s | vs best peer, same client | vs best peer | "
        "parent CPU ms/item | client CPU ms/item |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['wall']:.2f} | {r['items_per_s']:,.0f} | "
                     f"{r['vs_same_client']:.2f}x | {r['vs_best_peer']:.2f}x | "
                     f"{r['parent_cpu_ms_per_item']:.3f} | {r['client_cpu_ms_per_item']:.3f} |")
    lines += [
        "", "nbmplock records every item in its run directory (a durable done-set, "
        "resumable); the peers keep nothing. The same client on both sides of each "
        "comparison: httpx.Client and a stdlib http.client connection per thread for the "
        "threads, httpx.AsyncClient and a stdlib asyncio-streams client for the "
        "coroutines. \"vs best peer, same client\" divides by the fastest non-nbmplock row "
        "with the same client; \"vs best peer\" by the fastest non-nbmplock row of all. "
        "httpx's clients cost 3-9 ms of CPU per request on this machine: with them the "
        "client's CPU, not the 50 ms wait, sets the pace (one process: one GIL), and the "
        "stdlib clients show the cost of the map itself.", "",
        f"## W8: {W8_ITEMS} items at rate_limit={W8_RATE!r} (num_procs=2, concurrency=8)", "",
        "| wall s | first to last start s | ideal s | error | most starts in any 1 s | "
        "documented bound |", "|---:|---:|---:|---:|---:|---:|",
        f"| {w8row['wall']:.2f} | {w8row['span']:.2f} | {w8row['ideal_span']:.2f} | "
        f"{w8row['span_error']:+.1%} | {w8row['max_starts_in_1s']} | "
        f"{w8row['documented_bound']} |", "",
    ]
    (RESULTS / "io.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.io_bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite io.md from io.json, running nothing")
    args = parser.parse_args(argv)
    if args.report_only:
        data = json.loads((RESULTS / "io.json").read_text())
        env = data["env"]
        write(with_ratios(data["w7"]), data["w8"], env["repeats"], env["foreign_load"],
              env["when"])
        return 0
    from .loadmeter import foreign_share, read_cpu
    start = read_cpu()
    rows = w7(args.repeats)
    for r in rows:
        print(f"{r['name']:52s} {r['wall']:6.2f} s {r['items_per_s']:7.0f}/s "
              f"{r['vs_best_peer']:.2f}x parent {r['parent_cpu_ms_per_item']:.3f} ms/item")
    w8row = w8()
    print(f"W8: {w8row}")
    write(rows, w8row, args.repeats, foreign_share(start, read_cpu()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
