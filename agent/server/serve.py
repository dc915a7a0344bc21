"""``edge-fleet serve``: wires the parts of one server instance together and runs them.

Build → start → run → stop, in this order, and stopped in reverse:

0. a trial bind of the listen address (:func:`cannot_listen`: a port in use is one
   line and exit 1 before anything is opened);
1. the database (:func:`agent.server.db.open_database`: migrations applied);
2. the ingester (:class:`agent.server.ingest.Ingester`), which connects in the
   background and also publishes for the API (:meth:`Ingester.publish`);
3. the rollout driver (:class:`agent.server.driver.RolloutDriver`);
4. the prune thread (:func:`agent.server.store.prune` at start, then every
   ``prune_every_s``; a failure is logged, never fatal);
5. uvicorn in the main thread, serving :func:`agent.server.app.create_app`.

SIGTERM or SIGINT: uvicorn stops taking requests and finishes those in flight (the
dashboard's live streams are ended at once: :func:`agent.server.web.live.close_streams`;
else each would hold the stop for the whole graceful timeout), then the
driver stops (leases released), the ingester stops (what is committed is acknowledged,
the rest stays in the broker's session) and the engine is disposed of; exit 0.
This module holds no business logic.
"""

from __future__ import annotations

import errno
import gc
import logging
import signal
import socket
import threading
from types import FrameType

import uvicorn

from agent import __version__
from agent.errors import ConfigError, DatabaseError
from agent.server.app import create_app
from agent.server.context import ServeOptions, Server
from agent.server.db import open_database
from agent.server.driver import RolloutDriver
from agent.server.ingest import Ingester
from agent.server.limits import H11WithDeadline
from agent.server.store import prune
from agent.server.web import live

log = logging.getLogger("agent.server")

STOP_TIMEOUT_S = 10.0
GRACEFUL_S = 10  # requests in flight at SIGTERM get this long


def run(options: ServeOptions) -> int:
    """Serve until SIGTERM or SIGINT; the exit code (0 after a signal).

    1: the address cannot be listened on or the database cannot be opened (one line);
    2: the ingester's options are unusable (one line).
    """
    logging.getLogger("alembic").setLevel(logging.WARNING)  # a line per migration step
    taken = cannot_listen(options.listen_host, options.listen_port)
    if taken is not None:  # before anything opens: no broker session, no migration
        log.error("cannot listen on %s: %s", _address(options), taken)
        return 1
    early = _note_early_signals()
    try:
        engine = open_database(options.db_url)
    except DatabaseError as exc:
        log.error("%s", exc)
        return 1
    if early:  # asked to stop while migrating: nothing else was started
        engine.dispose()
        log.info("%s: stopped before serving", _name(early[0]))
        return 0
    try:
        ingester = Ingester(engine, options.broker, options.ingest)
    except ConfigError as exc:
        engine.dispose()
        for problem in exc.problems:
            log.error("%s", problem)
        return 2
    server = Server(options, engine, publisher=ingester, ingest_stats=ingester.snapshot)
    driver = RolloutDriver(server)
    ingester.on_news = driver.nudge  # a step is judged when its devices report, not a tick later
    stop_pruning = threading.Event()
    pruner = threading.Thread(
        target=_prune_loop, args=(server, stop_pruning), name="prune", daemon=True
    )
    web = _Uvicorn(_uvicorn_config(server, options))
    _catch_signals(web)
    log.info(
        "edge-fleet %s: instance %s, database %s",
        __version__,
        options.instance,
        engine.url.render_as_string(hide_password=True),
    )
    ingester.start()
    log.info(
        "ingesting from %s as %s (share group %s)",
        options.broker.url,
        options.ingest.client_id,
        options.ingest.group,
    )
    try:
        driver.start()
        pruner.start()
        settle_heap()
        try:
            web.run()
        except SystemExit:  # uvicorn's own exit on a failed start (it logged why)
            web.failed = True
    finally:
        stop_pruning.set()
        driver.stop(STOP_TIMEOUT_S)
        ingester.stop(STOP_TIMEOUT_S)
        pruner.join(STOP_TIMEOUT_S)
        engine.dispose()
    if web.failed:
        log.error("not serving: cannot listen on %s", _address(options))
        return 1
    log.info("stopped")
    return 0


def cannot_listen(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (in use, not this machine's address, a
    name that does not resolve), or None: a bind tried and released at once, as uvicorn
    will bind (``SO_REUSEADDR``). A port taken between this and uvicorn's bind is still
    caught there (exit 1)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"{host!r} does not resolve ({exc.strerror})"
    for family, kind, proto, _, address in found:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                hint = " (another server there? pick another --listen)"
                return f"{exc.strerror or exc}{hint if exc.errno == errno.EADDRINUSE else ''}"
    return None


def settle_heap() -> None:
    """Move what start-up allocated (modules, the app, the engine) out of the garbage
    collector's reach: a full collection then scans only what requests allocate. Without
    it, a 1,000-device list paid 60–90 ms pauses at p95 (bench/server_api.py)."""
    gc.collect()
    gc.freeze()


class _Uvicorn(uvicorn.Server):
    """uvicorn, saying where it listens and which signal stops it in our words."""

    failed = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info("listening on %s", self.config_url)
        else:
            self.failed = True

    @property
    def config_url(self) -> str:
        scheme = "https" if self.config.ssl_certfile else "http"
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{self.config.port}"

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            log.info("%s: stopping (HTTP server, rollout driver, ingester)", _name(sig))
            live.close_streams(self.config.app)  # open live pages would hold the stop
        super().handle_exit(sig, frame)


def _name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _uvicorn_config(server: Server, options: ServeOptions) -> uvicorn.Config:
    tls = options.tls_cert is not None and options.tls_key is not None
    return uvicorn.Config(
        create_app(server),
        host=options.listen_host,
        port=options.listen_port,
        ssl_certfile=str(options.tls_cert) if tls else None,
        ssl_keyfile=str(options.tls_key) if tls else None,
        log_config=None,  # our handler (agent.logs) on the root logger
        access_log=False,
        lifespan="off",
        http=H11WithDeadline,  # a request head must arrive within 10 s (slowloris)
        server_header=False,
        proxy_headers=False,  # behind a proxy the client address is not trusted anyway
        limit_concurrency=256,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=GRACEFUL_S,
    )


def _note_early_signals() -> list[int]:
    """Until :func:`_catch_signals` takes over, SIGTERM and SIGINT are only noted."""
    early: list[int] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda sig, frame: early.append(sig))
    return early


def _catch_signals(web: _Uvicorn) -> None:
    """SIGTERM and SIGINT only ask ``web`` to stop. uvicorn puts its own handlers in
    place while it runs and, once stopped, raises the signal it caught again: that one
    lands here and must not kill the process before the driver and the ingester are
    stopped. A signal before uvicorn runs makes it stop right after starting."""

    def note(sig: int, frame: FrameType | None) -> None:
        if not web.should_exit:
            web.handle_exit(sig, frame)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, note)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its startup chatter


def _prune_loop(server: Server, stop: threading.Event) -> None:
    """Prune at once, then every ``prune_every_s`` until ``stop``; never raises."""
    options = server.options
    while not stop.is_set():
        try:
            with server.engine.begin() as conn:
                pruned = prune(conn, server.clock(), options.raw_days, options.agg_days)
            if pruned.raw or pruned.agg or pruned.messages:
                log.info(
                    "pruned %d raw samples, %d aggregates, %d message ids",
                    pruned.raw,
                    pruned.agg,
                    pruned.messages,
                )
        except Exception as exc:  # the database away, a lock: try again next time
            reason = (str(getattr(exc, "orig", None) or exc).splitlines() or [""])[0]
            log.warning("pruning failed (retried in %gs): %s", options.prune_every_s, reason)
        stop.wait(options.prune_every_s)


def _address(options: ServeOptions) -> str:
    host = options.listen_host
    return f"[{host}]:{options.listen_port}" if ":" in host else f"{host}:{options.listen_port}"
