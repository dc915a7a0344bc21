"""``/metrics``: the fleet in Prometheus' text format, built afresh on every scrape.

:class:`FleetCollector` is a prometheus_client custom collector: each scrape reads the
database (devices by model, version and online; update outcomes) and the ingester's
counters (:class:`agent.server.ingest.IngestStats`) and returns metric families; it is
registered in a new ``CollectorRegistry`` per scrape and rendered with
``generate_latest``, so nothing is kept between scrapes and no global registry is
touched. A database that does not answer gives ``edge_fleet_database_up 0`` and leaves
out the families read from it; the ingester's still come.

The metrics (docs/server.md "Metrics"):

- ``edge_fleet_devices{model,version,online}`` (gauge): devices known, by each model
  their state document says they serve (``models`` with several pipelines or a
  cascade, else the top-level model: a device serving two models counts under each;
  "" when not reported yet) and its version, and whether their status says online;
  the :data:`MAX_RELEASES` pairs with the most devices, the rest summed
  under ``model="_other", version="_other"`` (:func:`fold_releases`);
- ``edge_fleet_update_outcomes_total{outcome}`` (counter): terminal update events
  stored, fleet-wide, since the database was created: ``succeeded``
  (``update_succeeded``), ``failed`` (``update_failed``), ``rolled_back``
  (``rolled_back``). Events are history and never pruned, so it only grows;
- ``edge_fleet_ingest_messages_total{result}`` (counter, this instance since start):
  ``stored``, ``duplicate``, and ``malformed_<reason>`` for each reason of
  :data:`agent.server.inbound.REASONS`;
- ``edge_fleet_ingest_queue_depth``, ``edge_fleet_ingest_lag_seconds`` (gauges; the
  lag only once a message was stored), ``edge_fleet_broker_connected``,
  ``edge_fleet_database_up`` (0 or 1), ``edge_fleet_build_info{version,instance}`` (1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent import __version__
from agent.contract import UPDATE_OUTCOMES, EventName, UpdateOutcome
from agent.server import queries
from agent.server.inbound import REASONS
from agent.server.ingest import IngestStats
from agent.server.schema import device_models, events

OUTCOME_EVENTS: Final[dict[EventName, UpdateOutcome]] = {
    "update_succeeded": "succeeded",
    "update_failed": "failed",
    "rolled_back": "rolled_back",
}
"""Which stored event counts as which update outcome."""


@dataclass(frozen=True)
class FleetFigures:
    """What the database says, read once per scrape (None: it did not answer)."""

    devices: list[tuple[str, str, bool, int]]  # model, version, online, count
    outcomes: dict[str, int]


MAX_RELEASES: Final = 50
"""Model/version pairs with series of their own in ``edge_fleet_devices``; the rest
are summed under :data:`OTHER`. Devices name their model themselves: a hostile fleet
inventing names would otherwise make a series per name in every scrape."""
OTHER: Final = "_other"  # not a model name (they start with a letter or a digit)


def fold_releases(
    rows: list[tuple[str, str, bool, int]], keep: int = MAX_RELEASES
) -> list[tuple[str, str, bool, int]]:
    """``rows`` (model, version, online, count) with the ``keep`` pairs holding the
    most devices kept (ties: by name) and every other pair summed, per online, into
    (``_other``, ``_other``); at most ``2 * (keep + 1)`` rows, sorted."""
    totals: dict[tuple[str, str], int] = {}
    for model, version, _online, count in rows:
        totals[model, version] = totals.get((model, version), 0) + count
    kept = set(sorted(totals, key=lambda pair: (-totals[pair], pair))[:keep])
    out: dict[tuple[str, str, bool], int] = {}
    for model, version, online, count in rows:
        key = (model, version, online) if (model, version) in kept else (OTHER, OTHER, online)
        out[key] = out.get(key, 0) + count
    return [(m, v, o, c) for (m, v, o), c in sorted(out.items())]


def read_figures(conn: sa.Connection) -> FleetFigures:
    """Count devices by each model they serve, its version and online, and update
    outcomes by outcome."""
    rows = conn.execute(queries.models_by_online(device_models.c.version))
    by_device = [
        (model or "", "" if version is None else str(version), bool(online), int(count))
        for model, version, online, count in rows
    ]
    counted = conn.execute(
        sa.select(events.c.event, sa.func.count())
        .where(events.c.event.in_(list(OUTCOME_EVENTS)))
        .group_by(events.c.event)
    )
    outcomes: dict[str, int] = dict.fromkeys(UPDATE_OUTCOMES, 0)
    for name, count in counted:
        outcomes[OUTCOME_EVENTS[name]] += int(count)
    return FleetFigures(fold_releases(by_device), outcomes)


class FleetCollector(Collector):
    """The families of one scrape from figures already read (no I/O in ``collect``)."""

    def __init__(
        self, figures: FleetFigures | None, stats: IngestStats | None, instance: str
    ) -> None:
        self.figures = figures
        self.stats = stats
        self.instance = instance

    def collect(self) -> Iterator[Metric]:
        figures, stats = self.figures, self.stats
        if figures is not None:
            gauge = GaugeMetricFamily(
                "edge_fleet_devices",
                "Devices known, by each model they serve (a device serving two counts under each),"
                " its version and online.",
                labels=["model", "version", "online"],
            )
            for model, version, online, count in figures.devices:
                gauge.add_metric([model, version, "true" if online else "false"], count)
            yield gauge
            outcomes = CounterMetricFamily(
                "edge_fleet_update_outcomes",
                "Terminal update events stored, by outcome (fleet-wide, all time).",
                labels=["outcome"],
            )
            for outcome, count in figures.outcomes.items():
                outcomes.add_metric([outcome], count)
            yield outcomes
        if stats is not None:
            messages = CounterMetricFamily(
                "edge_fleet_ingest_messages",
                "Device messages taken by this instance since start, by result.",
                labels=["result"],
            )
            messages.add_metric(["stored"], stats.stored)
            messages.add_metric(["duplicate"], stats.duplicates)
            for reason in REASONS:
                messages.add_metric([f"malformed_{reason}"], stats.malformed.get(reason, 0))
            yield messages
            yield GaugeMetricFamily(
                "edge_fleet_ingest_queue_depth",
                "Messages received and not yet stored.",
                value=stats.queue_depth,
            )
            if stats.lag_s is not None:
                yield GaugeMetricFamily(
                    "edge_fleet_ingest_lag_seconds",
                    "Now minus the device timestamp of the last message stored.",
                    value=stats.lag_s,
                )
        yield GaugeMetricFamily(
            "edge_fleet_broker_connected",
            "1 when this instance is connected to the broker and subscribed.",
            value=1 if stats is not None and stats.broker_connected else 0,
        )
        yield GaugeMetricFamily(
            "edge_fleet_database_up",
            "1 when the database answered this scrape.",
            value=0 if figures is None else 1,
        )
        yield InfoMetricFamily(
            "edge_fleet_build",
            "The server's version and instance name.",
            value={"version": __version__, "instance": self.instance},
        )


def render(figures: FleetFigures | None, stats: IngestStats | None, instance: str) -> bytes:
    """The exposition text of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(figures, stats, instance))
    return generate_latest(registry)
