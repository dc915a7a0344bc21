"""The fleet server's HTTP app on a real uvicorn in a thread, and a small JSON client.

``running(app)`` serves ``app`` on 127.0.0.1 on a free port for the duration of a
``with`` and yields its base URL; ``call`` sends one request with urllib and returns the
status, the headers and the decoded JSON (or text) body. No mocks: real sockets, real
HTTP/1.1, real uvicorn.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

START_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def running(app: Any, **options: Any) -> Iterator[str]:
    """Serve ``app`` on a free local port; yields ``http://127.0.0.1:PORT``. ``options``
    go to ``uvicorn.Config`` (e.g. ``http=`` a protocol class)."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on port {port} in {START_S:g} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        from agent.server.web.live import close_streams

        close_streams(app)  # a browser's open live page would hold the stop until its timeout
        server.should_exit = True
        thread.join(START_S)


@contextmanager
def app_over(
    db_url: str,
    *,
    now: float,
    prepare: Callable[[Any], None] = lambda engine: None,
    publisher: Any = None,
    registry: str | None = None,
) -> Iterator[tuple[str, Any, Any]]:
    """The fleet server's app over the database at ``db_url`` (migrated, then filled by
    ``prepare(engine)``), on a real uvicorn, with the clock stopped at ``now`` and no
    broker (``publisher``: what deploys publish through, if the test needs one).
    Yields (base URL, engine, server); the engine is disposed of at the end."""
    from agent.fleet.broker import BrokerOptions
    from agent.server.app import create_app
    from agent.server.context import ServeOptions, Server
    from agent.server.db import open_database
    from agent.server.ingest import IngestOptions

    engine = open_database(db_url)
    try:
        prepare(engine)
        options = ServeOptions(
            db_url, BrokerOptions("mqtt://127.0.0.1:1"), IngestOptions("t"), registry=registry
        )
        server = Server(options, engine, publisher=publisher, clock=lambda: now)
        with running(create_app(server)) as url:
            yield url, engine, server
    finally:
        engine.dispose()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any  # decoded JSON, or the text when it is not JSON

    @property
    def text(self) -> str:
        return self.body if isinstance(self.body, str) else json.dumps(self.body)


def call(
    method: str,
    url: str,
    *,
    token: str | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
    data: bytes | None = None,
) -> Reply:
    """One request; any status (4xx, 5xx too) comes back as a :class:`Reply`. ``body``
    is sent as JSON; ``data``, given instead, as it is."""
    data = data if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, got, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, got, raw = exc.code, dict(exc.headers), exc.read()
    text = raw.decode("utf-8", "replace")
    try:
        decoded: Any = json.loads(text)
    except ValueError:
        decoded = text
    return Reply(status, {k.lower(): v for k, v in got.items()}, decoded)
