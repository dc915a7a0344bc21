"""The fleet server against hostile HTTP clients and hostile devices: each test here was
a hole (it failed before its fix). Real uvicorn over raw sockets, a real mosquitto, the
real ingester, SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.fleet.broker import BrokerOptions
from agent.server import serve
from agent.server.app import create_app
from agent.server.auth import create_token
from agent.server.context import ServeOptions, Server
from agent.server.db import open_database
from agent.server.ingest import IngestOptions
from agent.server.limits import MAX_BODY_BYTES, BodyLimit, H11WithDeadline
from agent.server.retention import (
    DAY_S,
    MAX_GROUPS,
    MAX_SAMPLES,
    numeric_samples,
    stored_time,
    usable_groups,
)
from agent.server.schema import device_groups, devices, events, telemetry_raw
from tests.broker import Mosquitto, subscriber, wait_until
from tests.serverhttp import call, running
from tests.test_server_ingest import Running, _taken, dumps, event, state_doc, status, telemetry
from tests.test_server_rollouts import Rig, _retained

NOW = 1_800_000_000.0


@contextmanager
def server_app(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    """A Server on a SQLite file (no broker: what is tested here never publishes) and an
    operator's token."""
    engine = open_database(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        with engine.begin() as conn:
            token = create_token(conn, "op", "operator", NOW)
        options = ServeOptions("sqlite://", BrokerOptions("mqtt://127.0.0.1:1"), IngestOptions("t"))
        yield Server(options, engine, publisher=None, clock=lambda: NOW), token  # type: ignore[arg-type]
    finally:
        engine.dispose()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def exchange(port: int, head: bytes, body: bytes = b"", timeout: float = 5.0) -> bytes:
    """Send ``head`` and ``body`` on a fresh connection; everything the server answers
    until it closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        with contextlib.suppress(OSError):  # answered and closed before reading it all
            s.sendall(body)
        return read_all(s, timeout)


def read_all(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except (TimeoutError, ConnectionResetError):
            break
        if not chunk:
            break
        got += chunk
    return got


def status_and_detail(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, json.loads(body)["detail"] if body else ""


# -- HTTP: bodies ---------------------------------------------------------------------


def test_a_huge_declared_body_is_413_at_once_without_a_token(tmp_path: Path) -> None:
    """Was: FastAPI read the whole body (any size) into memory before checking the token:
    200 MB sent to /api/v1/deploy without a token grew the server by 600 MB."""
    with server_app(tmp_path) as (server, _), running(create_app(server)) as url:
        head = (
            b"POST /api/v1/deploy HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 209715200\r\n\r\n"
        )
        started = time.monotonic()
        status, detail = status_and_detail(exchange(port_of(url), head))
        assert status == 413, detail
        assert detail == f"the request body is over {MAX_BODY_BYTES} bytes"
        assert time.monotonic() - started < 3  # answered without waiting for the body


def test_a_chunked_body_is_cut_off_once_it_passes_the_bound(tmp_path: Path) -> None:
    with server_app(tmp_path) as (server, token), running(create_app(server)) as url:
        head = (
            b"POST /api/v1/rollouts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b" " * 16384
        body = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 8 + b"0\r\n\r\n"  # 128 KiB
        status, detail = status_and_detail(exchange(port_of(url), head, body))
        assert (status, detail) == (413, f"the request body is over {MAX_BODY_BYTES} bytes")


def test_a_body_trickled_slower_than_the_deadline_is_408(tmp_path: Path) -> None:
    with server_app(tmp_path) as (server, token):
        app = BodyLimit(create_app(server), deadline_s=1.0)  # create_app's own has 10 s
        with running(app) as url, socket.create_connection(("127.0.0.1", port_of(url))) as s:
            s.sendall(
                b"POST /api/v1/deploy HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + token.encode() + b"\r\nContent-Length: 100\r\n\r\n{"
            )
            status, detail = status_and_detail(read_all(s, 5.0))
        assert (status, detail) == (408, "the request body did not arrive within 1 s")


def test_small_bodies_still_reach_the_route(tmp_path: Path) -> None:
    with server_app(tmp_path) as (server, token), running(create_app(server)) as url:
        body = json.dumps({"model": "colours", "version": 1, "group": "door"}).encode()
        head = (
            b"POST /api/v1/rollouts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        status, detail = status_and_detail(exchange(port_of(url), head, body))
        assert status == 409 and "no device reports group 'door'" in detail


# -- HTTP: slow heads ----------------------------------------------------------------------


class _QuickDeadline(H11WithDeadline):
    head_timeout_s = 1.0


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost:"])
def test_a_request_head_that_never_completes_is_cut_off(tmp_path: Path, sent: bytes) -> None:
    """Was: a connection that sent nothing, or half a head, was held for ever; 256 of
    them (limit_concurrency) made the server answer 503 to everyone."""
    with (
        server_app(tmp_path) as (server, _),
        running(create_app(server), http=_QuickDeadline) as url,
    ):
        with socket.create_connection(("127.0.0.1", port_of(url))) as s:
            s.sendall(sent)
            started = time.monotonic()
            assert read_all(s, 5.0) == b""  # closed, no answer
            assert time.monotonic() - started < 3
        # a client that sends its head in time is answered, kept alive; a second head
        # that never completes is cut off too (uvicorn's keep-alive timer stops at its
        # first byte)
        with socket.create_connection(("127.0.0.1", port_of(url))) as s:
            s.sendall(b"GET /api/v1/devices HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.2)
            s.sendall(b"GET /api/v1/devices HTTP/1.1\r\nHo")
            started = time.monotonic()
            answer = read_all(s, 10.0)
            assert answer.startswith(b"HTTP/1.1 401 ") and answer.count(b"HTTP/1.1") == 1
            assert time.monotonic() - started < 3


def test_serve_uses_the_protocol_with_the_head_deadline(tmp_path: Path) -> None:
    with server_app(tmp_path) as (server, _):
        config = serve._uvicorn_config(server, server.options)
        assert config.http is H11WithDeadline
        assert config.limit_concurrency is not None and config.timeout_keep_alive <= 5


# -- devices ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "received", "stored"),
    [
        (1000.0, 2000.0, 1000.0),  # an old one (a replayed outbox): kept
        (2000.0 + DAY_S, 2000.0, 2000.0 + DAY_S),  # a clock a day ahead: believed
        (2001.0 + DAY_S, 2000.0, 2000.0),  # further: the server's clock
        (1e300, 2000.0, 2000.0),
        (None, 2000.0, 2000.0),  # a reply has none
    ],
)
def test_a_device_time_far_ahead_is_not_believed(
    ts: float | None, received: float, stored: float
) -> None:
    assert stored_time(ts, received) == stored


def test_only_valid_group_names_are_kept_and_at_most_so_many() -> None:
    claimed: list[Any] = ["yard", "door", "door", "a+b", "x/y", "#", "", 7, "-x", "g" * 200]
    assert usable_groups(claimed) == ["door", "yard"]
    assert usable_groups([f"g{i:05}" for i in range(10_000)]) == [
        f"g{i:05}" for i in range(MAX_GROUPS)
    ]


def test_samples_are_bounded_in_number_and_name_length() -> None:
    doc = {f"m{i:05}": 1.0 for i in range(MAX_SAMPLES + 50)}
    assert list(numeric_samples(doc)) == [f"m{i:05}" for i in range(MAX_SAMPLES)]
    deep = {"x": {"a" * 64: {"b" * 64: 1.0}}, "ok": 2.0}
    assert numeric_samples(deep) == {"ok": 2.0}


def test_a_hostile_device_costs_bounded_rows_and_cannot_stamp_the_future(
    broker: Mosquitto, db_url: str
) -> None:
    """Was: a status naming 10,000 groups (and 'a+b', 'x/y') wrote 10,000 group rows;
    a telemetry document with 15,000 numbers wrote 15,000 raw rows and 15,000 upserts
    in one transaction; a ts ten years ahead was stored as is, never pruned, and pinned
    the device's newest telemetry."""
    engine = open_database(db_url)
    runs = Running(broker)
    try:
        ingester = runs.start(engine)
        groups = [f"g{i}" for i in range(10_000)] + ["a+b", "x/y"]
        many = {**telemetry(), **{f"m{i}": 1.0 for i in range(15_000)}}
        ahead = {**telemetry(), "ts": time.time() + 10 * 365 * DAY_S}
        with subscriber(broker.url, [], client_id="cam-1") as cam:
            cam.publish("edge/cam-1/status", dumps({**status(), "groups": groups}), retain=True)
            cam.publish("edge/cam-1/telemetry", dumps(many))
            cam.publish("edge/cam-1/telemetry", dumps(ahead))
            assert wait_until(lambda: ingester.snapshot().stored == 3, 30), ingester.snapshot()
        now = time.time()
        with engine.connect() as conn:
            names = conn.execute(sa.select(device_groups.c.group_name)).scalars().all()
            raw = conn.execute(sa.select(sa.func.count()).select_from(telemetry_raw)).scalar()
            latest = conn.execute(sa.select(sa.func.max(telemetry_raw.c.ts))).scalar()
            row = conn.execute(sa.select(devices).where(devices.c.id == "cam-1")).one()
        assert len(names) == MAX_GROUPS and not {"a+b", "x/y"} & set(names)
        assert row.groups == sorted(names)
        assert raw is not None and raw <= 2 * MAX_SAMPLES
        assert latest is not None and latest <= now
        assert row.telemetry_ts is not None and row.telemetry_ts <= now
        lag = ingester.snapshot().lag_s
        assert lag is not None and lag >= 0
    finally:
        runs.stop_all()
        engine.dispose()


def test_overlong_fields_are_left_out_and_the_documents_kept(
    broker: Mosquitto, db_url: str
) -> None:
    """Was: on PostgreSQL a state whose model (200 characters) or agent_version overflows
    its column, or an event whose update_id does, was refused whole (the device's
    phase and update never shown); on SQLite the junk went into the columns, the
    device filter and the labels of /metrics."""
    engine = open_database(db_url)
    runs = Running(broker)
    try:
        ingester = runs.start(engine)
        junk = {**state_doc(3), "model": "m" * 200, "agent_version": "v" * 100}
        odd = {**state_doc(3), "id": "s-odd", "model": 'a"b\nc', "phase": "downloading"}
        done = {**event("update_succeeded"), "model": "x" * 300, "update_id": "u" * 100}
        with subscriber(broker.url, [], client_id="cam-1") as cam:
            cam.publish("edge/cam-1/status", dumps(status()), retain=True)
            cam.publish("edge/cam-1/state", dumps(junk), retain=True)
            cam.publish("edge/cam-1/events", dumps(done))
            cam.publish("edge/cam-2/status", dumps(status()), retain=True)
            cam.publish("edge/cam-2/state", dumps(odd), retain=True)
            assert wait_until(lambda: _taken(ingester.snapshot()) == 5, 30)
        assert ingester.snapshot().stored == 5, ingester.snapshot()
        with engine.connect() as conn:
            rows = {r.id: r for r in conn.execute(sa.select(devices))}
            stored = conn.execute(sa.select(events)).one()
        assert rows["cam-1"].state["model"] == "m" * 200  # the document, as sent
        assert (rows["cam-1"].model, rows["cam-1"].version) == (None, 3)
        assert rows["cam-1"].agent_version == "0.1.0"  # from the status
        assert rows["cam-2"].model is None and rows["cam-2"].state["phase"] == "downloading"
        assert (stored.model, stored.update_id) == (None, None)
        assert stored.fields["update_id"] == "u" * 100
    finally:
        runs.stop_all()
        engine.dispose()


def test_deploy_names_longer_than_the_columns_are_422_before_anything_is_published(
    broker: Mosquitto, db_url: str
) -> None:
    """Was: a device or group name of 200 valid characters was published, then its
    deploys row failed on PostgreSQL: a 500, a desired state out with no record."""
    rig = Rig(broker, db_url)
    try:
        with rig.engine.begin() as conn:
            token = create_token(conn, "ops", "operator", time.time())
        long = "d" * 200
        with running(create_app(rig.server())) as url:
            for target in ({"device": long}, {"group": long}):
                body = {"model": "colours", "version": 2, **target}
                reply = call("POST", f"{url}/api/v1/deploy", token=token, body=body)
                kind = next(iter(target))
                assert (reply.status, reply.body["detail"]) == (
                    422,
                    f"{kind}: a {kind} name is at most 128 characters",
                )
            reply = call(
                "POST",
                f"{url}/api/v1/rollouts",
                token=token,
                body={"model": "colours", "version": 2, "group": long},
            )
            assert reply.status == 422
        assert _retained(broker, f"edge/{long}/desired") is None
        assert _retained(broker, f"edge/groups/{long}/desired") is None
    finally:
        rig.close()
