"""A real HTTP server in the test process that receives webhooks and answers as a test scripts it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


class Listener:
    """Answers each delivery's first `fail_first` requests with `fail_status`, then 200; keeps what came."""

    def __init__(self, fail_first: int = 1, fail_status: int = 500, redirect: bool = False) -> None:
        self.received: list[Received] = []
        self._lock = threading.Lock()
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                delivery = self.headers.get("X-Evalfarm-Delivery", "")
                with listener._lock:
                    seen = sum(r.headers.get("X-Evalfarm-Delivery") == delivery for r in listener.received)
                    status = 302 if redirect and self.path != "/elsewhere" else (
                        fail_status if seen < fail_first else 200)
                    listener.received.append(Received(self.path, dict(self.headers), body, status))
                self.send_response(status)
                if status == 302:  # to this same listener, so that a followed redirect would show here
                    self.send_header("Location", f"http://127.0.0.1:{listener.port}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST  # noqa: N815 - a redirected POST may come back as a GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook"

    def delivered(self) -> list[Received]:
        with self._lock:
            return [r for r in self.received if r.answered == 200]

    @contextmanager
    def running(self) -> Iterator[Listener]:
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.server.shutdown()
            self.server.server_close()
