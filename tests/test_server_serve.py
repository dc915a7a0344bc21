"""``edge-fleet serve`` as a real process against a real mosquitto and a real database:
it starts, ingests, answers /healthz and /metrics (checked by promtool), guards the API
with tokens made by ``edge-fleet token``, audits, says when the broker or the database
is away, refuses bad options before starting, and stops cleanly on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from agent.errors import DatabaseError
from agent.fleet import cli as fleet_cli
from agent.fleet.broker import BrokerError, BrokerOptions
from agent.server import auth
from agent.server.db import open_database
from agent.server.ingest import Ingester, IngestOptions
from tests.broker import Mosquitto, free_port, subscriber, wait_until
from tests.postgres import Postgres, binaries
from tests.serverhttp import Reply, call
from tests.test_dashboard import Client
from tests.test_server_ingest import dumps, state_doc, status

START_S = 20.0
WAIT_S = 20.0
PROMTOOL = shutil.which("promtool")


class Serve:
    """One ``edge-fleet serve`` subprocess; its log (stderr) in a file."""

    def __init__(self, folder: Path, broker: Mosquitto, db: str, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = db
        self.log_path = folder / f"serve-{self.port}.log"
        argv = [
            sys.executable, "-m", "agent.fleet.cli", "serve", "--broker", broker.url,
            "--db", db, "--listen", f"127.0.0.1:{self.port}", "--client-id",
            f"test-{self.port}", "--connect-timeout", "3", *extra,
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> Reply:
        return call("GET", f"{self.url}/healthz", timeout=5)

    def wait_health(self, status: int, timeout: float = WAIT_S) -> Reply:
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self.health()
                if reply.status == status:
                    return reply
            except OSError:
                reply = None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"/healthz never {status}: {reply}\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def get(self, path: str, token: str | None = None) -> Reply:
        return call("GET", f"{self.url}{path}", token=token)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"serve did not stop on SIGTERM\n{self.log()[-3000:]}") from None


@contextlib.contextmanager
def serving(folder: Path, broker: Mosquitto, db: str, *extra: str) -> Iterator[Serve]:
    serve = Serve(folder, broker, db, *extra)
    try:
        yield serve
    finally:
        if serve.proc.poll() is None:
            serve.proc.kill()
            serve.proc.wait(5)


def token(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.fleet.cli", "token", *args, "--db", db],
        capture_output=True,
        text=True,
        timeout=60,
    )


def new_token(db: str, name: str, role: str) -> str:
    made = token(db, "create", "--name", name, "--role", role, "--json")
    assert made.returncode == 0, made.stderr
    value: str = json.loads(made.stdout)["token"]
    return value


def sqlite_db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fleet.db'}"


# -- the running server ------------------------------------------------------------------


def test_serve_ingests_answers_health_and_metrics_then_stops_on_sigterm(
    tmp_path: Path, broker: Mosquitto
) -> None:
    db = sqlite_db(tmp_path)
    with serving(tmp_path, broker, db) as serve:
        health = serve.wait_health(200, START_S).body
        assert health["status"] == "ok" and health["problems"] == []
        assert health["broker"] == {"connected": True}
        assert health["database"] == {"ok": True, "error": None}
        assert health["instance"] == f"test-{serve.port}"

        device = subscriber(broker.url, [])
        try:
            device.publish("edge/cam-1/status", dumps(status()), retain=True)
            device.publish("edge/cam-1/state", dumps(state_doc(version=3)), retain=True)
            device.publish("edge/cam-1/events", b"not json")
        finally:
            device.close()
        assert wait_until(
            lambda: (
                serve.health().body["ingest"]["stored"] == 2
                and serve.health().body["ingest"]["malformed"]["not_json"] == 1
            ),
            WAIT_S,
        ), serve.health().body

        viewer = new_token(db, "prometheus", "viewer")
        scraped = serve.get("/metrics", viewer)
        assert scraped.status == 200, scraped.body
        assert scraped.headers["content-type"].startswith("text/plain")
        text = scraped.body
        assert 'edge_fleet_devices{model="colours",online="true",version="3"} 1.0' in text
        assert 'edge_fleet_ingest_messages_total{result="stored"} 2.0' in text
        assert 'edge_fleet_ingest_messages_total{result="malformed_not_json"} 1.0' in text
        assert "edge_fleet_broker_connected 1.0" in text
        assert "edge_fleet_database_up 1.0" in text
        assert 'edge_fleet_update_outcomes_total{outcome="succeeded"} 0.0' in text
        assert "edge_fleet_build_info{" in text
        if PROMTOOL is not None:
            checked = subprocess.run(
                [PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True,
                timeout=30,
            )  # fmt: skip
            assert checked.returncode == 0, checked.stdout + checked.stderr

        assert serve.stop() == 0
        log = serve.log()
    assert f"listening on http://127.0.0.1:{serve.port}" in log
    assert f"ingesting from {broker.url} as test-{serve.port} (share group edge-fleet)" in log
    assert "SIGTERM: stopping" in log
    assert log.rstrip().endswith("stopped"), log[-2000:]
    assert "Traceback" not in log


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is missing (Debian package prometheus)")
def test_promtool_rejects_a_broken_exposition() -> None:
    """The promtool check above can fail: it is not a rubber stamp."""
    broken = '# TYPE x counter\nx_total{a="1"} one\n'
    checked = subprocess.run(
        [PROMTOOL or "", "check", "metrics"], input=broken, capture_output=True, text=True,
        timeout=30,
    )  # fmt: skip
    assert checked.returncode != 0


def test_tokens_guard_the_api_and_every_token_action_is_audited(
    tmp_path: Path, broker: Mosquitto
) -> None:
    db = sqlite_db(tmp_path)
    operator = new_token(db, "ops", "operator")
    viewer = new_token(db, "grafana", "viewer")
    with serving(tmp_path, broker, db) as serve:
        serve.wait_health(200, START_S)
        for presented in (None, "eft_unknown", "garbage", viewer[:-2]):
            reply = serve.get("/api/v1/audit", presented)
            assert reply.status == 401, (presented, reply.body)
            assert reply.body == {"detail": "a valid API token is needed"}
            assert reply.headers["www-authenticate"] == "Bearer"
        assert serve.get("/metrics").status == 401
        forbidden = serve.get("/api/v1/audit", viewer)
        assert forbidden.status == 403 and "viewer" in forbidden.body["detail"]

        assert serve.get("/metrics", viewer).status == 200
        revoked = token(db, "revoke", "--name", "grafana")
        assert revoked.returncode == 0, revoked.stderr
        assert serve.get("/metrics", viewer).status == 401
        again = token(db, "revoke", "--name", "grafana")
        assert again.returncode == 1 and "no live token named 'grafana'" in again.stderr

        entries = serve.get("/api/v1/audit", operator)
        assert entries.status == 200, entries.body
        log = entries.body["entries"]
        assert [(e["action"], e["target"], e["outcome"]) for e in log] == [
            ("token.revoke", "grafana", "not_found"),
            ("token.revoke", "grafana", "ok"),
            ("token.create", "grafana", "ok"),
            ("token.create", "ops", "ok"),
        ]
        assert all(e["who"].startswith("cli:") for e in log)
        assert log[-1]["detail"] == {"role": "operator"}
        newest = log[0]["ts"]
        only = serve.get(f"/api/v1/audit?action=token.create&limit=1&until={newest}", operator)
        assert [e["target"] for e in only.body["entries"]] == ["grafana"]
        assert serve.get("/api/v1/audit?since=5&until=4", operator).status == 400
        for bad in ("limit=0", "limit=1001", "since=nan", "until=inf", "who=" + "x" * 200):
            assert serve.get(f"/api/v1/audit?{bad}", operator).status == 422, bad
        assert serve.stop() == 0

    listed = token(db, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["role"], r["revoked"] is not None) for r in rows] == [
        ("ops", "operator", False),
        ("grafana", "viewer", True),
    ]
    assert operator not in listed.stdout and auth.token_hash(operator) not in listed.stdout
    assert "grafana" in token(db, "list").stdout


def test_healthz_says_503_while_the_broker_is_away(tmp_path: Path, broker: Mosquitto) -> None:
    with serving(tmp_path, broker, sqlite_db(tmp_path)) as serve:
        serve.wait_health(200, START_S)
        broker.stop()
        down = serve.wait_health(503)
        assert down.body["status"] == "degraded"
        assert down.body["problems"] == ["broker: not connected"]
        assert down.body["database"]["ok"] is True
        broker.start()
        assert serve.wait_health(200, 45).body["ingest"]["connects"] >= 2
        assert serve.stop() == 0


@pytest.mark.skipif(binaries() is None, reason="PostgreSQL is not installed")
def test_database_down_is_503_with_the_reason_then_back_to_200(
    tmp_path: Path, broker: Mosquitto
) -> None:
    with Postgres(binaries() or Path()) as pg:
        db = pg.new_database()
        operator = new_token(db, "ops", "operator")
        with serving(tmp_path, broker, db) as serve:
            serve.wait_health(200, START_S)
            assert serve.get("/metrics", operator).status == 200  # remembered from now on
            web = Client(serve.url)
            assert web.login(operator)[0] == 303
            pg.pause()
            try:
                down = serve.wait_health(503)
                assert down.body["database"]["ok"] is False
                assert down.body["problems"][0].startswith("database: ")
                assert down.body["broker"] == {"connected": True}
                api = serve.get("/api/v1/audit", operator)
                assert api.status == 503
                assert api.body["detail"].startswith("database unavailable: ")
                scraped = serve.get("/metrics", operator)
                assert scraped.status == 200
                assert "edge_fleet_database_up 0.0" in scraped.body
                assert "edge_fleet_devices" not in scraped.body
                status, headers, page = web.request("GET", "/ui/")  # a person: a page
                assert status == 503 and headers["content-type"].startswith("text/html")
                assert "database unavailable: " in page and "Traceback" not in page
            finally:
                pg.resume()
            serve.wait_health(200)
            assert serve.get("/api/v1/audit", operator).status == 200
            assert serve.stop() == 0
            assert "Traceback" not in serve.log()


# -- bad options: exit 2, one line, nothing started -------------------------------------


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--listen", "nope"], "--listen: 'nope' is not HOST:PORT"),
        (["--listen", "127.0.0.1:70000"], "--listen: '70000' is not a port"),
        (["--listen", "[::1:80"], "--listen: '[::1:80' is not [IPV6]:PORT"),
        (["--listen", "a b:80"], "--listen: 'a b' is not a host name"),
        (["--raw-days", "nan"], "--raw-days: nan must be a number of days"),
        (["--agg-days", "-1"], "--agg-days: -1.0 must be a number of days"),
        (["--connect-timeout", "inf"], "--connect-timeout: inf must be 0 to 600 seconds"),
        (["--tls-cert", "CERT"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "/no/cert", "--tls-key", "CERT"], "--tls-cert: cannot read /no/cert"),
        (["--sign-key", "CERT"], "--sign-key: "),
        (["--tls-cert", "CERT", "--tls-key", "CERT"], "--tls-cert/--tls-key: cannot load"),
        (["--registry", "/no/registry"], "--registry: /no/registry is not a folder"),
        (["--db", "mysql://x/y"], "--db: database URL mysql://x/y is not supported"),
        (["--client-id", "a/b"], "--client-id: "),
        (["--share-group", "a+b"], "--share-group: "),
        (["--alert-temp-c", "500"], "--alert-temp-c: 500.0 must be 20 to 150 °C"),
        (["--alert-offline-min", "nan"], "--alert-offline-min: nan must be 1 to 10080 minutes"),
        (["--alert-error-pct", "0"], "--alert-error-pct: 0.0 must be 0.1 to 100 %"),
        (["--broker", "http://x"], "--broker: 'http://x' is not an mqtt:// or mqtts:// URL"),
    ],
)
def test_bad_serve_options_exit_2_with_one_line_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], says: str
) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not a key\n")
    args = [str(cert) if a == "CERT" else a for a in args]
    db = tmp_path / "fleet.db"
    base = ["serve", "--broker", "mqtt://127.0.0.1:1", "--db", f"sqlite:///{db}"]
    assert fleet_cli.main([*base, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edge-fleet: {says}"), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not db.exists()


def test_alert_options_become_the_dashboards_thresholds(tmp_path: Path) -> None:
    from agent.server.cli import serve_options
    from agent.server.web.alerts import Thresholds

    base = ["serve", "--broker", "mqtt://127.0.0.1:1", "--db", f"sqlite:///{tmp_path}/f.db"]
    default = serve_options(fleet_cli._parser().parse_args(base))
    assert default.alerts == Thresholds()
    args = fleet_cli._parser().parse_args(
        [*base, "--alert-offline-min", "30", "--alert-temp-c", "70", "--alert-error-pct", "2"]
        + ["--alert-outbox-growth", "500"]
    )
    assert serve_options(args).alerts == Thresholds(
        offline_s=1800, outbox_growth=500, temp_high_c=70, error_share=0.02
    )


def test_serve_answers_https_with_its_certificate(tmp_path: Path, broker: Mosquitto) -> None:
    import ssl
    import urllib.request

    from tests.certs import TestCA

    ca = TestCA(tmp_path / "ca")
    issued = ca.issue("fleet-server")
    tls = ("--tls-cert", str(issued.cert), "--tls-key", str(issued.key))
    with serving(tmp_path, broker, sqlite_db(tmp_path), *tls) as serve:
        context = ssl.create_default_context(cafile=str(ca.cert_path))
        url = f"https://127.0.0.1:{serve.port}/healthz"

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(url, context=context, timeout=5) as reply:
                    return bool(reply.status == 200)
            except OSError:
                return False

        assert wait_until(healthy, START_S), serve.log()[-2000:]
        with pytest.raises(OSError):  # plain HTTP on the TLS port is not served
            serve.health()
        rollout = [sys.executable, "-m", "agent.fleet.cli", "rollout", "--model", "colours",
                   "--version", "1", "--group", "door", "--server",
                   f"https://127.0.0.1:{serve.port}", "--token", "eft_nope"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
        untrusted = subprocess.run(rollout, capture_output=True, text=True, timeout=60, env=env)
        assert untrusted.returncode == 1 and len(untrusted.stderr.splitlines()) == 1
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, untrusted.stderr
        assert "(a certificate from a private CA: set SSL_CERT_FILE=ca.pem)" in untrusted.stderr
        env["SSL_CERT_FILE"] = str(ca.cert_path)  # trusted: the request reaches the API
        trusted = subprocess.run(rollout, capture_output=True, text=True, timeout=60, env=env)
        assert trusted.returncode == 1 and "the token is not valid (401)" in trusted.stderr
        assert serve.stop() == 0
    assert f"listening on https://127.0.0.1:{serve.port}" in serve.log()


def test_serve_without_a_broker_says_which_option_or_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGE_FLEET_BROKER", raising=False)
    assert fleet_cli.main(["serve", "--db", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    assert capsys.readouterr().err == (
        "edge-fleet: --broker: required (or set EDGE_FLEET_BROKER)\n"
    )


def test_serve_exits_1_with_one_line_when_the_port_is_taken(
    tmp_path: Path, broker: Mosquitto
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "agent.fleet.cli", "serve", "--broker", broker.url,
             "--db", sqlite_db(tmp_path), "--listen", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()  # one line, and nothing started before it
    assert len(lines) == 1, lines
    assert (
        f"ERROR agent.server: cannot listen on 127.0.0.1:{port}: Address already in use"
        in (lines[0])
    )


def test_serve_exits_1_with_one_line_when_the_database_cannot_be_reached(
    tmp_path: Path, broker: Mosquitto
) -> None:
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-m", "agent.fleet.cli", "serve", "--broker", broker.url,
         "--db", f"postgresql://fleet:secret@127.0.0.1:{port}/fleet",
         "--listen", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "ERROR agent.server: database postgresql" in lines[0], lines
    assert "fleet:***@" in lines[0] and "secret" not in lines[0]


def test_token_commands_refuse_bad_names_and_duplicates(tmp_path: Path) -> None:
    db = sqlite_db(tmp_path)
    bad = token(db, "create", "--name", "../x", "--role", "viewer")
    assert bad.returncode == 2 and bad.stderr.startswith("edge-fleet: --name: '../x'")
    new_token(db, "a", "viewer")
    twice = token(db, "create", "--name", "a", "--role", "operator")
    assert twice.returncode == 2 and "a token named 'a' exists" in twice.stderr
    unreachable = token("postgresql://x@127.0.0.1:1/db", "list")
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr
    assert len(unreachable.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("action", [["list"], ["revoke", "--name", "a"]])
def test_token_list_or_revoke_in_a_missing_sqlite_file_says_so_and_creates_nothing(
    tmp_path: Path, action: list[str]
) -> None:
    typo = tmp_path / "flet.db"
    done = token(f"sqlite:///{typo}", *action)
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"edge-fleet: database sqlite:///{typo}: no such file ({typo}): no token was made "
        "there; check --db or EDGE_FLEET_DB (the systemd unit's is "
        "sqlite:////var/lib/edge-fleet/fleet.db)\n"
    )
    assert not typo.exists() and done.stdout == ""


# -- the parts ------------------------------------------------------------------------------


def test_tokens_are_found_by_hash_until_revoked(db_url: str) -> None:
    engine = open_database(db_url)
    try:
        with engine.begin() as conn:
            viewer = auth.create_token(conn, "v", "viewer", 1.0)
            operator = auth.create_token(conn, "o", "operator", 2.0)
        with engine.begin() as conn:
            assert auth.lookup(conn, viewer) == auth.Caller("v", "viewer")
            assert auth.lookup(conn, operator) == auth.Caller("o", "operator")
            for wrong in ("", viewer[:-1], "eft_" + "A" * 43, viewer + "x" * 200, "Bearer x"):
                assert auth.lookup(conn, wrong) is None, wrong
            stored = conn.execute(sa.text("SELECT hash FROM tokens ORDER BY id")).scalars().all()
            assert viewer not in stored and auth.token_hash(viewer) in stored
            assert auth.revoke_token(conn, "v", 3.0) is True
        with engine.begin() as conn:
            assert auth.lookup(conn, viewer) is None
            assert auth.revoke_token(conn, "v", 4.0) is False
            assert auth.revoke_token(conn, "nobody", 4.0) is False
            listed = auth.list_tokens(conn)
        assert [(t["name"], t["role"], t["revoked"]) for t in listed] == [
            ("v", "viewer", 3.0),
            ("o", "operator", None),
        ]
        assert all("hash" not in t for t in listed)
    finally:
        engine.dispose()


def test_ingester_publishes_with_a_puback_and_refuses_while_disconnected(
    tmp_path: Path, broker: Mosquitto
) -> None:
    engine = open_database(sqlite_db(tmp_path))
    options = BrokerOptions(url=broker.url, timeout_s=3)
    ingester = Ingester(engine, options, IngestOptions(client_id="pub-test"))
    try:
        with pytest.raises(BrokerError, match="not connected"):
            ingester.publish("edge/groups/door/desired", b"{}")
        ingester.start()
        assert ingester.wait_connected(10)
        ingester.publish("edge/groups/door/desired", b'{"x": 1}')
        watcher = subscriber(broker.url, ["edge/groups/door/desired"])
        try:
            got = watcher.wait_for_topic("edge/groups/door/desired", 5)
            assert got.payload == b'{"x": 1}' and got.retain
        finally:
            watcher.close()
        broker.stop()
        assert wait_until(lambda: not ingester.wait_connected(0), 10)
        with pytest.raises(BrokerError, match="not connected"):
            ingester.publish("edge/groups/door/desired", b"{}")
    finally:
        ingester.stop(5)
        engine.dispose()


def test_open_database_failure_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError) as caught:
        open_database(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'f.db'}")
    assert len(str(caught.value).splitlines()) == 1


# -- the systemd unit ---------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
UNIT_EXPOSURE = 2.0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_the_unit_passes_systemd_verify_and_the_exposure_threshold(tmp_path: Path) -> None:
    from tests.test_provisioning import run, seed_image_base

    root = tmp_path / "image"
    seed_image_base(root)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    shutil.copy(REPO / "systemd/edge-fleet.service", units)
    binary = root / "opt/edge-fleet/venv/bin/edge-fleet"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    verify = run("systemd-analyze", "verify", f"--root={root}", "edge-fleet.service")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    binary.unlink()  # verify looks at ExecStart inside the tree
    broken = run("systemd-analyze", "verify", f"--root={root}", "edge-fleet.service")
    assert "/opt/edge-fleet/venv/bin/edge-fleet is not executable" in broken.stderr
    security = run(
        "systemd-analyze", "security", "--offline=yes", f"--root={root}",
        f"--threshold={int(UNIT_EXPOSURE * 10)}", "--no-pager", "edge-fleet.service",
    )  # fmt: skip
    assert security.returncode == 0, security.stdout + security.stderr
    text = (REPO / "systemd/edge-fleet.service").read_text()
    needed = (
        "EnvironmentFile=-/etc/edge-fleet/env",
        "User=edge-fleet",
        "StateDirectory=edge-fleet",
        "EDGE_FLEET_DB=sqlite:////var/lib/edge-fleet/",
    )
    assert all(line in text for line in needed)


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers missing")
def test_the_sysusers_file_creates_the_service_user(tmp_path: Path) -> None:
    from tests.test_provisioning import run

    text = (REPO / "systemd/edge-fleet.sysusers").read_text()
    result = run("systemd-sysusers", f"--root={tmp_path}", "--dry-run", "-", input=text)
    assert result.returncode == 0, result.stderr
    assert "Creating user 'edge-fleet'" in result.stdout + result.stderr


BLOCK_EXTRA = (
    "import sys\n"
    "for name in ('sqlalchemy', 'alembic', 'fastapi', 'uvicorn', 'prometheus_client'):\n"
    "    sys.modules[name] = None  # as if the server extra were not installed\n"
    "from agent.fleet.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.parametrize(
    "command", [["serve", "--broker", "mqtt://127.0.0.1:1"], ["token", "list"]]
)
def test_without_the_server_extra_help_works_and_the_commands_say_what_to_install(
    command: list[str],
) -> None:
    def fleet(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", BLOCK_EXTRA, *args], capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip

    helped = fleet("--help")
    assert helped.returncode == 0 and "serve" in helped.stdout and "token" in helped.stdout
    assert fleet("serve", "--help").returncode == 0
    done = fleet(*command)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"edge-fleet: {command[0]} needs the server extra (sqlalchemy, alembic, fastapi, "
        "uvicorn, prometheus_client missing): pip install 'edge-agent[server]'"
    ]
