"""What every part of a running ``edge-fleet serve`` shares: its options, the database,
the ingester's counters, a way to publish to the broker, and the clock.

One :class:`Server` per process, built by :mod:`agent.server.serve` and handed to the
HTTP app (``app.state.server``) and to the rollout driver. Tests build one directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa

from agent.fleet.broker import BrokerOptions
from agent.server.ingest import IngestOptions, IngestStats
from agent.server.web.alerts import Thresholds


@dataclass(frozen=True)
class ServeOptions:
    """Everything ``edge-fleet serve`` is told (options and ``EDGE_FLEET_*``)."""

    db_url: str
    broker: BrokerOptions
    ingest: IngestOptions  # ingest.client_id is also this instance's name (leases, logs)
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    tls_cert: Path | None = None  # HTTPS when both are given
    tls_key: Path | None = None
    registry: str | None = None  # the registry: a folder or an http(s):// URL (/releases)
    sign_key: Path | None = None  # the deploy key: signs every desired state published
    raw_days: float = 7.0
    agg_days: float = 90.0
    prune_every_s: float = 3600.0
    alerts: Thresholds = field(default_factory=Thresholds)  # the dashboard's alerts

    @property
    def instance(self) -> str:
        return self.ingest.client_id


class Publisher(Protocol):
    """Publishes to the broker, retained, QoS 1, and returns once the broker has it.

    Raises :class:`agent.fleet.broker.BrokerError` when the broker is away or refuses.
    """

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None: ...


COMMANDS_WAITING = 8  # device commands waiting for their reply at once (api/commands.py)


@dataclass
class Server:
    """The shared parts of one running server instance."""

    options: ServeOptions
    engine: sa.Engine
    publisher: Publisher
    ingest_stats: Callable[[], IngestStats | None] = lambda: None  # None: not ingesting
    clock: Callable[[], float] = field(default=time.time)
    command_slots: threading.BoundedSemaphore = field(
        default_factory=lambda: threading.BoundedSemaphore(COMMANDS_WAITING)
    )

    @property
    def prefix(self) -> str:
        return self.options.broker.prefix
