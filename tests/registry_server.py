"""A real HTTP registry on loopback that injects faults, for tests and benchmarks.

It serves the files of a registry folder (HTTP/1.1, Range requests, keep-alive) and,
for paths given faults, misbehaves the way real servers and networks do: truncated
bodies with and without Content-Length, corrupt bytes, trickling, stalls, error
statuses, redirects, ignoring Range. Every request is logged with the range asked
for and the body bytes actually sent, so tests can prove what was fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Fault:
    # truncate | truncate_no_length | no_length | corrupt | trickle | stall | status
    # | redirect | ignore_range | shifted_range | slow_headers
    kind: str
    times: int = 1  # how many requests it spoils; -1: every request
    at: int = 0  # byte offset (truncate, corrupt)
    status: int = 500
    location: str = ""
    interval: float = 0.05  # trickle: seconds between bytes
    max_seconds: float = 10.0  # trickle/stall: give up after this (bounded)


@dataclass
class Request:
    path: str
    range_start: int | None
    status: int
    sent: int = 0


@dataclass
class _State:
    root: Path
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)

    def take_fault(self, path: str) -> Fault | None:
        with self.lock:
            pending = self.faults.get(path, [])
            if not pending:
                return None
            fault = pending[0]
            if fault.times > 0:
                fault.times -= 1
                if fault.times == 0:
                    pending.pop(0)
            return fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        state = self.server.state
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        range_header = self.headers.get("Range")
        start = int(range_header.split("=")[1].split("-")[0]) if range_header else None
        record = Request(path, start, 0)
        with state.lock:
            state.log.append(record)
        fault = state.take_fault(path)
        if fault is not None and fault.kind == "status":
            return self._bare(record, fault.status)
        if fault is not None and fault.kind == "redirect":
            return self._bare(record, 302, {"Location": fault.location})
        if fault is not None and fault.kind == "slow_headers":
            return self._slow_headers(record, fault)
        file = (state.root / path).resolve()
        if not file.is_relative_to(state.root.resolve()) or not file.is_file():
            return self._bare(record, 404)
        data = file.read_bytes()
        # A strong validator as nginx sends one; If-None-Match answers 304 (no body).
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        if not range_header and self.headers.get("If-None-Match") == etag:
            return self._bare(record, 304, {"ETag": etag}, body=False)
        offset = start or 0
        if fault is not None and fault.kind == "ignore_range":
            offset = 0
        if offset > len(data):
            return self._bare(record, 416)
        if fault is not None and fault.kind == "shifted_range" and offset:
            offset += fault.at  # answer 206 for a range the client did not ask for
        body = data[offset:]
        if fault is not None and fault.kind == "corrupt":
            index = fault.at - offset
            if 0 <= index < len(body):
                body = body[:index] + bytes([body[index] ^ 0xFF]) + body[index + 1 :]
        record.status = 206 if offset else 200
        self.send_response(record.status)
        no_length = fault is not None and fault.kind in ("truncate_no_length", "no_length")
        if no_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        if offset:
            self.send_header("Content-Range", f"bytes {offset}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.end_headers()
        try:
            if fault is not None and fault.kind in ("truncate", "truncate_no_length"):
                cut = max(0, fault.at - offset)
                self._send(record, body[:cut])
                self._hang_up()
            elif fault is not None and fault.kind == "trickle":
                deadline = time.monotonic() + fault.max_seconds
                for i in range(len(body)):
                    if time.monotonic() > deadline or state.stopping.is_set():
                        break
                    self._send(record, body[i : i + 1])
                    time.sleep(fault.interval)
                self._hang_up()
            elif fault is not None and fault.kind == "stall":
                self._send(record, body[: max(0, fault.at - offset)])
                state.stopping.wait(fault.max_seconds)
                self._hang_up()
            else:
                self._send(record, body)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True

    def _slow_headers(self, record: Request, fault: Fault) -> None:
        """Send the status line, then a header byte every ``interval`` (bounded)."""
        record.status = 200
        header = b"X-Slow: a\r\n"
        deadline = time.monotonic() + fault.max_seconds
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            i = 0
            while time.monotonic() < deadline and not self.server.state.stopping.is_set():
                self.wfile.write(header[i % len(header) : i % len(header) + 1])
                self.wfile.flush()
                i += 1
                time.sleep(fault.interval)
        except OSError:
            pass
        self._hang_up()

    def _send(self, record: Request, chunk: bytes) -> None:
        self.wfile.write(chunk)
        self.wfile.flush()
        record.sent += len(chunk)

    def _bare(
        self,
        record: Request,
        status: int,
        headers: dict[str, str] | None = None,
        body: bool = True,
    ) -> None:
        record.status = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if body:  # as real servers send with errors and redirects (nginx: an HTML page)
            page = f"<html><body><h1>{status}</h1></body></html>\n".encode()
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
        else:
            self.end_headers()

    def _hang_up(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client hanging up mid-response is what several tests do on purpose
        super().handle_error(request, client_address)  # type: ignore[arg-type]


class RegistryServer:
    """Serve ``root`` on ``host``:free-port until ``stop()`` (or the ``with`` block ends)."""

    def __init__(
        self, root: Path, host: str = "127.0.0.1", tls: tuple[Path, Path] | None = None
    ) -> None:
        self.state = _State(root)
        self.httpd = _Server((host, 0), _Handler)
        self.httpd.state = self.state
        scheme = "http"
        if tls is not None:  # (certificate, key): serve https
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            scheme = "https"
        self.host = host
        self.port = self.httpd.server_address[1]
        self.url = f"{scheme}://{host}:{self.port}/"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def start(self) -> RegistryServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.state.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fault(self, path: str, kind: str, **kwargs: object) -> None:
        """Spoil the next request(s) for ``path`` (a registry-relative path)."""
        with self.state.lock:
            self.state.faults.setdefault(path, []).append(Fault(kind, **kwargs))  # type: ignore[arg-type]

    @property
    def log(self) -> list[Request]:
        with self.state.lock:
            return list(self.state.log)

    def requests_for(self, path: str) -> list[Request]:
        return [r for r in self.log if r.path == path]

    def clear_log(self) -> None:
        with self.state.lock:
            self.state.log.clear()


def main() -> None:
    """Serve a registry folder in its own process (for benchmarks).

    Prints the URL on the first line; on SIGTERM prints the request log as JSON lines.
    ``--fault PATH:KIND:AT`` spoils the first request for PATH (e.g. a cut at byte AT).
    """
    import argparse
    import json
    import signal

    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--fault", action="append", default=[])
    args = parser.parse_args()
    server = RegistryServer(args.root)
    for spec in args.fault:
        path, kind, at = spec.rsplit(":", 2)
        server.fault(path, kind, at=int(at))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    server.start()
    print(server.url, flush=True)
    done.wait()
    server.stop()
    for record in server.log:
        print(json.dumps(record.__dict__), flush=True)


if __name__ == "__main__":
    main()
