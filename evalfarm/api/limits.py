"""A bound on request bodies, before anything reads them: no client makes the server buffer 20 MB of JSON.

Uvicorn has no such limit of its own. A declared `Content-Length` over the bound is refused before the
application sees it; a chunked body is counted as it arrives and refused when it passes the bound. Either
way the rest of the body is read and dropped (up to `DRAIN_BYTES`) before the answer, as nginx's lingering
close does: a client still sending when the server closes would get a connection reset, not the 413.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException

MAX_BODY_BYTES = 1 << 20  #: a job request is a few hundred bytes; 1 MiB leaves room for many tags
DRAIN_BYTES = 64 << 20  #: past this, a refused body is not read on: the connection is simply closed


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, 400 for a `Content-Length` that is no number."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _reply(send, 400, "Content-Length must be a number of bytes")
                return
            if int(declared) > self.max_bytes:
                await _drain(receive, 0)
                await _reply(send, 413, f"request body over {self.max_bytes} bytes")
                return
        received = 0

        async def counted_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    await _drain(receive, received)
                    # An HTTPException, because FastAPI turns any other error while it reads a body into a 400.
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, counted_receive, send)


async def _drain(receive: Any, received: int) -> None:
    more = True
    while more and received <= DRAIN_BYTES:
        message = await receive()
        if message["type"] != "http.request":
            return
        received += len(message.get("body", b""))
        more = message.get("more_body", False)


async def _reply(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
