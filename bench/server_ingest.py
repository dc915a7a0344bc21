"""The fleet server's ingestion, as a ratio to a bare paho subscriber on the same stream.

For each database (SQLite, then PostgreSQL when Debian's ``postgresql`` is installed;
otherwise one line says it is skipped): a fresh local mosquitto (tests/broker.py), the
real :class:`agent.server.ingest.Ingester` into a fresh database, and beside it a bare
paho client subscribed at QoS 1 to the same topics that only counts. Then
``bench/fleetsim.py`` runs ``--devices`` devices (a subprocess) sending telemetry every
``--interval`` seconds (1 s: ~1,000 msg/s for 1,000 devices) for ``--duration``
seconds. The broker queues without limit (``max_queued_messages 0``), so a slow ingester
shows as a lower rate and lag, never as drops.

Figures, each side over the same stream:

- messages/s: the N messages the simulator had acknowledged, divided by the time from
  the first message the bare client got to the moment that side had all N (the
  ingester: stored + duplicates + malformed reached N). Ratio ingester / bare, goal
  >= 0.5. A side that keeps up reaches the offered rate.
- lag: the ingester's own ``lag_s`` (its clock minus the ``ts`` of the last message
  stored), sampled every 0.2 s during the run (p50, max); the bare client's the same,
  from every 50th message. Duplicates: the ingester's count (0 expected on one
  instance); "behind": messages a side had not handled when the bench stopped waiting
  (``DRAIN_S`` after the simulator's end; the broker still holds them, nothing is lost).
- database size per device per day: see :func:`size_report`: the arithmetic is printed.

    python bench/server_ingest.py [--devices 1000] [--interval 1] [--duration 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.fleet.broker import BrokerOptions  # noqa: E402
from agent.server.db import open_database  # noqa: E402
from agent.server.ingest import Ingester, IngestOptions  # noqa: E402
from agent.server.schema import messages, telemetry_agg, telemetry_raw  # noqa: E402
from tests.broker import Mosquitto  # noqa: E402
from tests.postgres import Postgres, binaries  # noqa: E402

SIM = ROOT / "bench" / "fleetsim.py"
TOPICS = ["edge/+/status", "edge/+/state", "edge/+/telemetry", "edge/+/events"]
REAL_INTERVAL_S = 10.0  # the agent's default telemetry.interval_s
DAY_S = 86_400
DRAIN_S = 120.0  # after the simulator stops, the ingester gets this long to catch up
RAW_DAYS, AGG_DAYS = 7, 90  # the server's default retention


class Bare:
    """A bare paho subscriber (QoS 1, its own network thread) that counts messages."""

    def __init__(self, port: int) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.lags: list[float] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="bare", protocol=mqtt.MQTTv5
        )
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in TOPICS])
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        self.count += 1
        if self.first is None:
            self.first = now
        self.last = now
        if self.count % 50 == 0:  # the lag of a sample, without parsing every message
            ts = json.loads(msg.payload).get("ts")
            if isinstance(ts, float | int):
                self.lags.append(now - ts)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Case:
    name: str
    published: int = 0
    bare_rate: float = 0.0
    ingest_rate: float = 0.0
    bare_missing: int = 0
    ingest_missing: int = 0
    duplicates: int = 0
    malformed: int = 0
    bare_lag: list[float] = field(default_factory=list)
    ingest_lag: list[float] = field(default_factory=list)
    sim: dict[str, Any] = field(default_factory=dict)
    size: list[str] = field(default_factory=list)


def run_case(name: str, url: str, args: argparse.Namespace, tmp: Path) -> Case:
    case = Case(name)
    engine = open_database(url)
    sizes0 = table_bytes(engine)
    with Mosquitto(tmp / f"broker-{name}", extra_conf=["max_queued_messages 0"]) as broker:
        bare = Bare(broker.port)
        ingester = Ingester(
            engine, BrokerOptions(url=broker.url), IngestOptions(client_id=f"bench-{name}")
        )
        ingester.start()
        if not (ingester.wait_connected(10) and bare.subscribed.wait(10)):
            raise RuntimeError("the ingester or the bare client did not subscribe in 10 s")
        sim = subprocess.Popen(
            [sys.executable, str(SIM), "--devices", str(args.devices), "--interval",
             str(args.interval), "--duration", str(args.duration), "--broker", broker.url],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        while sim.poll() is None:
            time.sleep(0.2)
            lag = ingester.snapshot().lag_s
            if lag is not None:
                case.ingest_lag.append(lag)
        out, _ = sim.communicate(timeout=30)
        if sim.returncode != 0:
            raise RuntimeError(f"the simulator failed: {out.strip()[-500:]}")
        case.sim = json.loads(out.strip().splitlines()[-1])
        case.published = int(case.sim["acked"])
        done_at = None
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline:
            s = ingester.snapshot()
            handled = s.stored + s.duplicates + sum(s.malformed.values())
            if handled >= case.published and bare.count >= case.published:
                done_at = time.time()
                break
            if s.lag_s is not None:
                case.ingest_lag.append(s.lag_s)
            time.sleep(0.05)
        s = ingester.snapshot()
        ingester.stop()
        bare.close()
    start = bare.first or time.time()
    handled = s.stored + s.duplicates + sum(s.malformed.values())
    case.bare_rate = bare.count / max(1e-9, (bare.last or start) - start)
    case.ingest_rate = handled / max(1e-9, (done_at or time.time()) - start)
    case.bare_missing = case.published - bare.count
    case.ingest_missing = case.published - handled
    case.duplicates, case.malformed = s.duplicates, sum(s.malformed.values())
    case.bare_lag = bare.lags
    case.size = size_report(engine, sizes0, args.devices)
    engine.dispose()
    return case


def table_bytes(engine: sa.Engine) -> dict[str, int]:
    """Bytes each table takes with its indexes (SQLite: dbstat after a WAL checkpoint;
    PostgreSQL: pg_total_relation_size), and "total": the file / pg_database_size."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            rows = conn.execute(sa.text(
                "SELECT relname, pg_total_relation_size(oid) FROM pg_class "
                "WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace"
            )).all()  # fmt: skip
            total = conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar()
        else:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            rows = conn.exec_driver_sql(
                "SELECT coalesce(m.tbl_name, d.name), sum(d.pgsize) FROM dbstat d "
                "LEFT JOIN sqlite_master m ON m.name = d.name GROUP BY 1"
            ).all()
            total = conn.exec_driver_sql(
                "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size"
            ).scalar()
    return {**{str(r[0]): int(r[1]) for r in rows}, "total": int(total or 0)}


def size_report(engine: sa.Engine, before: dict[str, int], devices: int) -> list[str]:
    """Database size per device per day, extrapolated to the real 10 s interval.

    (a) as the goal asks: growth of the whole database / telemetry messages stored =
    bytes per telemetry sample (a device's one document), x 8,640 samples a day.
    (b) by table: raw samples and message ids grow per sample (x 8,640 a day), but
    minute aggregates grow per minute and metric (x 1,440 a day per metric), however
    fast the run sent; at a 1 s interval (a) spreads one minute's aggregate row over
    60 samples instead of 6, so (b) is the better figure. Plus what one device holds
    at the default retention (raw and ids 7 days, aggregates 90 days).
    """
    after = table_bytes(engine)
    with engine.connect() as conn:
        samples = conn.execute(
            sa.select(sa.func.count()).where(messages.c.stream == "telemetry")
        ).scalar_one()
        raw_rows = conn.execute(sa.select(sa.func.count()).select_from(telemetry_raw)).scalar_one()
        agg_rows = conn.execute(sa.select(sa.func.count()).select_from(telemetry_agg)).scalar_one()
    if not samples or not agg_rows:
        return ["  size: no telemetry stored"]
    grew = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    per_day = DAY_S / REAL_INTERVAL_S  # 8,640 samples a day
    metrics = raw_rows / samples
    total = grew["total"] / samples
    per_sample = (grew.get("telemetry_raw", 0) + grew.get("messages", 0)) / samples
    per_agg_row = grew.get("telemetry_agg", 0) / agg_rows
    agg_day = per_agg_row * metrics * (DAY_S / 60)
    day_b = per_sample * per_day + agg_day
    held = per_sample * per_day * RAW_DAYS + agg_day * AGG_DAYS
    mb = 1e6
    return [
        f"  size: {grew['total'] / mb:.1f} MB grew for {samples} telemetry samples of "
        f"{devices} devices ({metrics:.0f} metrics each; {raw_rows} raw rows, {agg_rows} "
        "aggregate rows)",
        f"  (a) {grew['total']} B / {samples} samples = {total:.0f} B/sample; x {per_day:.0f} "
        f"samples/day = {total * per_day / mb:.2f} MB per device per day",
        f"  (b) raw + message ids {per_sample:.0f} B/sample x {per_day:.0f} = "
        f"{per_sample * per_day / mb:.2f} MB; aggregates {per_agg_row:.0f} B/row x "
        f"{metrics:.0f} metrics x 1440 minutes = {agg_day / mb:.2f} MB; "
        f"= {day_b / mb:.2f} MB per device per day",
        f"  held per device at retention (raw {RAW_DAYS} d, aggregates {AGG_DAYS} d): "
        f"{per_sample * per_day * RAW_DAYS / mb:.0f} + {agg_day * AGG_DAYS / mb:.0f} = "
        f"{held / mb:.0f} MB; x {devices} devices = {held * devices / 1e9:.1f} GB",
    ]


def quantiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    ordered = sorted(values)
    return f"p50 {statistics.median(ordered):.2f} s, max {ordered[-1]:.2f} s"


def show(case: Case) -> None:
    ratio = case.ingest_rate / case.bare_rate if case.bare_rate else 0.0
    cpu = case.sim.get("cpu_share", 0.0)
    print(f"{case.name}: {case.published} messages acknowledged to the simulator "
          f"({case.sim.get('published')}); simulator CPU {cpu:.0%} of a core")  # fmt: skip
    print(f"  bare paho:  {case.bare_rate:7.0f} msg/s, lag {quantiles(case.bare_lag)}, "
          f"behind {case.bare_missing}")  # fmt: skip
    print(f"  ingester:   {case.ingest_rate:7.0f} msg/s, lag {quantiles(case.ingest_lag)}, "
          f"behind {case.ingest_missing} after a {DRAIN_S:.0f} s drain, "
          f"duplicates {case.duplicates}, malformed {case.malformed}")  # fmt: skip
    print(f"  ratio (ingester / bare): {ratio:.2f}  (goal >= 0.5)")
    for line in case.size:
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--only", choices=["sqlite", "postgresql"], default=None)
    args = parser.parse_args()
    if not 1 <= args.devices <= 10_000 or args.interval < 0.05 or args.duration < 1:
        parser.error("--devices 1..10000, --interval >= 0.05 s, --duration >= 1 s")
    print(f"{args.devices} devices, telemetry every {args.interval:g} s, {args.duration:g} s "
          f"(~{args.devices / args.interval:.0f} msg/s offered)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "sqlite"):
            show(run_case("sqlite", f"sqlite:///{tmp}/fleet.db", args, Path(tmp)))
        if args.only in (None, "postgresql"):
            bin_dir = binaries()
            if bin_dir is None:
                print("postgresql: skipped (not installed: apt-get install postgresql)")
            else:
                with Postgres(bin_dir) as pg:
                    show(run_case("postgresql", pg.new_database(), args, Path(tmp)))


if __name__ == "__main__":
    main()
