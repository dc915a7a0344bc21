"""The fleet server's read API at fleet scale: p50/p95 against a bare route, same run.

The database (SQLite, or ``--db postgresql`` on a throwaway PostgreSQL from Debian's
package) is seeded directly with :mod:`agent.server.store`'s writes, as the ingester
makes them: ``--devices`` devices (``sim-0001`` …, bench/fleetsim.py's documents) with a
status, a state and ``--recent`` telemetry documents each (10 s apart, ending now),
and ``sim-0001`` with 7 days of ``inference.fps`` at 10 s (60,480 samples, raw and
their minute aggregates). The app (:func:`agent.server.app.create_app`) runs on a real
uvicorn (tests/serverhttp.py), and each request is a new HTTP/1.1 connection with a
viewer token (:func:`agent.server.auth.create_token`):

- baseline: ``GET /bench/baseline``, a trivial route added to the app here that
  checks the same viewer token and returns ``{"ok": true}``: HTTP, auth and JSON, no
  query (``/healthz`` answers without a token and may ask the broker, so it would
  not be the same work);
- ``GET /api/v1/devices`` (all devices; goal p95 <= 100 ms);
- ``GET /api/v1/devices/sim-0001/telemetry?metric=inference.fps&since=<7 days ago>``
  (goal p95 <= 200 ms).

Rounds alternate the three (after 3 warm-up calls each). A route that answers 404
(not there yet) is reported as ``route missing (404)`` and not timed.

    python bench/server_api.py [--devices 1000] [--calls 50] [--db sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import inspect
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fleetsim  # noqa: E402  (bench/, beside this file)
import sqlalchemy as sa  # noqa: E402
from fastapi import Depends  # noqa: E402

from agent.fleet.broker import BrokerOptions  # noqa: E402
from agent.server.app import create_app  # noqa: E402
from agent.server.auth import Caller, create_token, viewer  # noqa: E402
from agent.server.context import ServeOptions, Server  # noqa: E402
from agent.server.db import open_database  # noqa: E402
from agent.server.ingest import IngestOptions  # noqa: E402
from agent.server.retention import numeric_samples  # noqa: E402
from agent.server.serve import settle_heap  # noqa: E402
from agent.server.store import insert_telemetry, upsert_device  # noqa: E402
from tests.postgres import Postgres, binaries  # noqa: E402
from tests.serverhttp import Reply, call, running  # noqa: E402

DAY_S = 86_400
WEEK_SAMPLES = 7 * DAY_S // 10  # 60,480: 7 days at 10 s
WARMUP = 3


class NoBroker:
    """The server's Publisher, unused by read routes."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        raise RuntimeError("the API bench publishes nothing")


def latest(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc=`` for insert_telemetry where it takes one: since the read API (main after
    this branch), it also keeps the newest document in ``devices.telemetry``, which the
    device list reads. Without it the list would answer lighter rows than a real fleet."""
    return {"doc": doc} if "doc" in inspect.signature(insert_telemetry).parameters else {}


def seed(engine: sa.Engine, devices: int, recent: int, now: float) -> dict[str, float]:
    """Devices, recent telemetry and one device's week of fps; seconds per part."""
    took: dict[str, float] = {}
    t0 = time.perf_counter()
    with engine.begin() as conn:
        for n in range(1, devices + 1):
            dev = fleetsim.Device(fleetsim.device_id(n), list(fleetsim.GROUPS), 1 + n % 3,
                                  random.Random(n))  # fmt: skip
            dev.started = now - 3600
            upsert_device(conn, dev.id, now, status=fleetsim.status(dev, now))
            upsert_device(conn, dev.id, now, state=fleetsim.state(dev, now))
            for k in range(recent, 0, -1):
                ts = now - 10 * k
                doc = fleetsim.telemetry(dev, ts)
                insert_telemetry(conn, dev.id, ts, numeric_samples(doc), **latest(doc))
    took["devices"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rng = random.Random(7)
    with engine.begin() as conn:
        start = now - WEEK_SAMPLES * 10
        for k in range(WEEK_SAMPLES):
            fps = round(rng.uniform(28.0, 30.5), 2)
            insert_telemetry(conn, "sim-0001", start + 10 * k, {"inference.fps": fps})
    took["week"] = time.perf_counter() - t0
    return took


def summary(reply: Reply) -> str:
    """What a reply held, in a few words (the read routes' shapes: devices, points)."""
    body = reply.body
    if isinstance(body, dict):
        for key in ("devices", "points"):
            if isinstance(body.get(key), list):
                return f"{len(body[key])} {key}, {len(reply.text) / 1000:.0f} kB"
    return f"{len(reply.text) / 1000:.1f} kB"


def percentiles(ms: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(ms, n=20, method="inclusive")  # 5 % steps
    return statistics.median(ms), cuts[18]


@contextmanager
def database(kind: str, tmp: Path) -> Iterator[str | None]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'fleet.db'}"
        return
    bin_dir = binaries()
    if bin_dir is None:
        yield None
        return
    with Postgres(bin_dir) as pg:
        yield pg.new_database()


def bench(url: str, args: argparse.Namespace) -> None:
    engine = open_database(url)
    now = time.time()
    took = seed(engine, args.devices, args.recent, now)
    with engine.begin() as conn:
        token = create_token(conn, "bench", "viewer", now)
    print(f"seeded {args.devices} devices with {args.recent} telemetry each in "
          f"{took['devices']:.1f} s; sim-0001's {WEEK_SAMPLES} fps samples in "
          f"{took['week']:.1f} s")  # fmt: skip
    server = Server(
        options=ServeOptions(
            db_url=url,
            broker=BrokerOptions(url="mqtt://127.0.0.1:1"),
            ingest=IngestOptions(client_id="bench"),
        ),
        engine=engine,
        publisher=NoBroker(),
    )
    app = create_app(server)

    def baseline(caller: Caller = Depends(viewer)) -> dict[str, Any]:  # noqa: B008
        return {"ok": True}

    app.add_api_route("/bench/baseline", baseline, methods=["GET"])
    settle_heap()  # as edge-fleet serve does before it serves
    since = now - 7 * DAY_S
    routes = {
        "baseline": "/bench/baseline",
        "devices": "/api/v1/devices",
        "telemetry": f"/api/v1/devices/sim-0001/telemetry?metric=inference.fps&since={since:.0f}",
    }
    timings: dict[str, list[float]] = {name: [] for name in routes}
    with running(app) as base:
        live = {}
        for name, path in routes.items():
            reply = call("GET", base + path, token=token, timeout=30)
            if reply.status == 404:
                print(f"  GET {path}: route missing (404: {reply.text[:120]}); not timed")
            elif reply.status != 200:
                print(f"  GET {path}: {reply.status} {reply.text[:200]}; not timed")
            else:
                live[name] = path
                print(f"  GET {path}: 200, {summary(reply)}")
        for _ in range(WARMUP):
            for path in live.values():
                call("GET", base + path, token=token, timeout=30)
        for _ in range(args.calls):
            for name, path in live.items():
                t0 = time.perf_counter()
                reply = call("GET", base + path, token=token, timeout=30)
                timings[name].append((time.perf_counter() - t0) * 1000)
                if reply.status != 200:
                    raise RuntimeError(f"GET {path} answered {reply.status}: {reply.text[:200]}")
    goals = {"baseline": None, "devices": 100.0, "telemetry": 200.0}
    base_p50 = percentiles(timings["baseline"])[0] if timings["baseline"] else None
    for name in live:
        p50, p95 = percentiles(timings[name])
        goal = goals[name]
        verdict = (
            ""
            if goal is None
            else f"  (goal p95 <= {goal:.0f} ms: {'met' if p95 <= goal else 'MISSED'})"
        )
        ratio = f", p50 {p50 / base_p50:.1f}x baseline" if base_p50 and name != "baseline" else ""
        print(f"  {name:9} p50 {p50:7.1f} ms, p95 {p95:7.1f} ms{ratio}{verdict}")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--recent", type=int, default=2, help="telemetry documents per device")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    if not 1 <= args.devices <= 100_000 or not 0 <= args.recent <= 1000:
        parser.error("--devices must be 1..100000 and --recent 0..1000")
    if not 2 <= args.calls <= 10_000:
        parser.error("--calls must be 2..10000")
    with tempfile.TemporaryDirectory() as tmp, database(args.db, Path(tmp)) as url:
        if url is None:
            print("postgresql: skipped (not installed: apt-get install postgresql)")
            return
        print(f"{args.db}: {args.devices} devices, {args.calls} calls per route")
        bench(url, args)


if __name__ == "__main__":
    main()
