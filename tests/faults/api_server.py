"""A small HTTP API on 127.0.0.1, in a thread of the test process, that keeps its own log.

``GET /item/<item>?run=<run>`` answers ``{"item": ..., "answer": "ok:<item>"}``
after ``delay`` seconds. Every request is logged *before* its answer is
written, with the time it arrived (``time.monotonic()``) and the status sent:
an item is "answered" (paid for) once a 200 line is in the log, whether or
not the client lived to read it.

Throttling, for the 429 test: more than ``limit`` requests in the last
``window`` seconds, or the first request of an item in ``throttle_first``,
get ``429 Too Many Requests`` with ``Retry-After: <retry_after>``.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many clients connect at once: no SYN retries

    def handle_error(self, request, client_address):
        """A client killed mid-answer (a SIGKILLed worker) is part of the test: quiet."""
        import sys
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class ApiServer:
    def __init__(self, delay: float = 0.02, limit: int | None = None, window: float = 1.0,
                 throttle_first: frozenset = frozenset(), retry_after: float = 1.0):
        self.delay = delay
        self.limit = limit
        self.window = window
        self.throttle_first = set(throttle_first)
        self.retry_after = retry_after
        self.log: list[tuple[str, int, float, int]] = []  # (item, run, arrived, status)
        self._lock = threading.Lock()
        self._recent: deque = deque()
        self._seen: set = set()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - the http.server API
                url = urlparse(self.path)
                item = unquote(url.path.rsplit("/", 1)[-1])
                run = int(parse_qs(url.query).get("run", ["0"])[0])
                arrived = time.monotonic()
                status = api._admit(item, arrived)
                if status == 200 and api.delay:
                    time.sleep(api.delay)
                with api._lock:  # logged before the answer is written
                    api.log.append((item, run, arrived, status))
                body = json.dumps({"item": item, "answer": f"ok:{item}"} if status == 200
                                  else {"error": "slow down"}).encode()
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", f"{api.retry_after:g}")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="test-api-server", daemon=True)

    def _admit(self, item: str, now: float) -> int:
        with self._lock:
            recent = self._recent
            recent.append(now)
            while recent and recent[0] < now - self.window:
                recent.popleft()
            if item in self.throttle_first and item not in self._seen:
                self._seen.add(item)
                return 429
            self._seen.add(item)
            if self.limit is not None and len(recent) > self.limit:
                return 429
            return 200

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def entries(self) -> list[tuple[str, int, float, int]]:
        with self._lock:
            return list(self.log)
