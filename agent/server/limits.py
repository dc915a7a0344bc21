"""Bounds on what one HTTP client can make the server hold, before any token is checked.

uvicorn bounds neither a request's body nor the time its head or body may take, and
FastAPI reads a JSON body whole before it runs the route's dependencies (the token
check among them). Without these, anyone who can reach the port could make the server
buffer a body of any size, or hold connections open by trickling bytes until
``limit_concurrency`` is reached and every other client is answered 503.

- :class:`BodyLimit` (ASGI middleware): a body over :data:`MAX_BODY_BYTES` is 413, at
  once when ``Content-Length`` says so, else as soon as the bytes received pass it; a
  body not received whole within :data:`BODY_S` is 408. Either way the route's own
  answer is dropped and the connection closed.
- :class:`H11WithDeadline` (uvicorn's h11 protocol): a request's head (request line and
  headers) must arrive whole within :data:`HEAD_S` of the connection, or of the end of
  the previous response; else the connection is closed. An idle keep-alive connection
  is closed by uvicorn's own ``timeout_keep_alive``.
"""

from __future__ import annotations

import asyncio
import json

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_BODY_BYTES = 64 * 1024  # the API's bodies are a few hundred bytes
BODY_S = 10.0
HEAD_S = 10.0


class BodyLimit:
    """ASGI middleware: refuses a request body that is too large (413) or too slow (408)."""

    def __init__(
        self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES, deadline_s: float = BODY_S
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.deadline_s = deadline_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # uvicorn (h11) has refused a malformed Content-Length already; the bytes are
        # counted below whatever it says.
        declared = [v.strip() for k, v in scope["headers"] if k == b"content-length"]
        if any(v.isdigit() and int(v) > self.max_bytes for v in declared):
            await _answer(send, 413, self._too_large())
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s
        received = 0
        body_done = False
        refused: tuple[int, str] | None = None
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, body_done, refused
            if refused is not None:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                refused = (408, f"the request body did not arrive within {self.deadline_s:g} s")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    refused = (413, self._too_large())
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused is not None and not started:
                return  # the route's answer to a body cut short: ours goes instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if refused is None or started:
                raise
        if refused is not None and not started:
            await _answer(send, *refused)

    def _too_large(self) -> str:
        return f"the request body is over {self.max_bytes} bytes"


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class H11WithDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive
    whole within :data:`HEAD_S` (slowloris: a few bytes now and then, forever)."""

    head_timeout_s = HEAD_S
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole head arrived
            self._disarm_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head()
        super().connection_lost(exc)

    def _arm_head(self) -> None:
        self._disarm_head()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()
