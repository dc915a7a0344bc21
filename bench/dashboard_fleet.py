"""A fleet in a database for bench/dashboard.py, written with the ingester's own writes
(agent/server/store.py, agent/server/bulk.py) so the pages read what a real fleet
leaves behind.

- ``devices`` devices ``sim-0001`` … (bench/fleetsim.py's documents): groups ``sim``, one
  of ten sites and, for one in twenty, ``canary``; versions 1–3 of ``person-detector``;
  one in 25 offline for an hour; ``RECENT`` telemetry documents each over the last 15
  minutes (the alerts' window), with alert-worthy figures on some (outbox growing, errors
  up, temperature high, fallen back to the CPU); an ``agent_started`` event each and
  ``source_lost`` / ``source_recovered`` and update events on some.
- ``sim-0001`` with ``days`` days of the six charted metrics at 10 s (60,480 documents
  for 7 days: raw samples and their minute aggregates).
- a registry folder with ``person-detector`` v1–3 (small generated files), so the
  releases page has something to list.
- ``ROLLOUTS`` finished rollouts (history), the last over the whole ``sim`` group.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import fleetsim  # bench/, beside this file
import sqlalchemy as sa

from agent.fleet.publish import publish
from agent.server import rollstore
from agent.server.bulk import Telemetry, store_telemetry
from agent.server.retention import numeric_samples
from agent.server.schema import rollout_devices, rollout_steps
from agent.server.store import insert_event, upsert_device

DAY_S = 86_400
RECENT = 15  # telemetry documents per device, a minute apart: each minute of the alerts' window
RECENT_STEP_S = 60
ROLLOUTS = 30
BATCH = 2_000  # telemetry documents per store_telemetry call
SITES = 10
CHARTED = ("inference.fps", "inference.latency_ms_p95", "cpu_pct", "mem_pct", "temp_c",
           "outbox.depth")  # fmt: skip


def groups(n: int) -> list[str]:
    return ["sim", f"site-{n % SITES}", *(["canary"] if n % 20 == 0 else [])]


def quirk(n: int) -> str:
    """What is wrong with device ``n`` (alert-worthy figures on one in eight)."""
    if n % 25 == 0:
        return "offline"
    return {3: "outbox", 5: "errors", 7: "hot", 9: "fallback"}.get(n % 40, "")


def _telemetry(dev: fleetsim.Device, ts: float, k: int, kind: str) -> dict[str, Any]:
    """fleetsim's document, bent by the device's quirk at its ``k``-th recent sample."""
    doc = fleetsim.telemetry(dev, ts)
    if kind == "outbox":
        doc["outbox"]["depth"] = 0 if k < RECENT // 2 else 400 * k
    elif kind == "errors":
        doc["inference"]["errors"] = doc["inference"]["frames"] // 5
    elif kind == "hot":
        doc["temp_c"] = 84.5
    elif kind == "fallback":
        doc["inference"]["backend"] = "cpu"
    return doc


def seed_devices(engine: sa.Engine, devices: int, now: float) -> None:
    for first in range(1, devices + 1, 250):
        docs: list[Telemetry] = []
        with engine.begin() as conn:
            for n in range(first, min(first + 250, devices + 1)):
                dev = fleetsim.Device(fleetsim.device_id(n), groups(n), 1 + n % 3, random.Random(n))
                kind = quirk(n)
                seen = now - 3600 if kind == "offline" else now
                dev.started = now - 7200
                state = fleetsim.state(dev, seen)
                if kind == "fallback":
                    state["backend"] = "cpu"
                online = "offline" if kind == "offline" else "online"
                upsert_device(conn, dev.id, seen, status=fleetsim.status(dev, seen, online))
                upsert_device(conn, dev.id, seen, state=state)
                insert_event(conn, dev.id, dev.started, fleetsim.started_event(dev, dev.started))
                if n % 7 == 0:
                    for ts in (seen - 900, seen - 600):
                        insert_event(conn, dev.id, ts, fleetsim.source_event(dev, ts))
                if n % 11 == 0:
                    insert_event(conn, dev.id, seen - 3000, {"event": "update_succeeded",
                                 "model": fleetsim.MODEL, "version": dev.version})  # fmt: skip
                if kind == "fallback":
                    insert_event(conn, dev.id, seen - 300, {"event": "accelerator_fallback",
                                 "error": "no Edge TPU answered"})  # fmt: skip
                for k in range(RECENT):
                    ts = seen - RECENT_STEP_S * (RECENT - 1 - k)
                    doc = _telemetry(dev, ts, k, kind)
                    docs.append(Telemetry(dev.id, ts, numeric_samples(doc), doc))
            store_telemetry(conn, docs)


def seed_history(engine: sa.Engine, days: float, now: float) -> int:
    """``days`` of sim-0001's charted metrics at 10 s, ending just before its recent
    documents; returns the documents stored."""
    rng = random.Random(7)
    count = int(days * DAY_S / 10)
    start = now - RECENT * RECENT_STEP_S - count * 10
    for first in range(0, count, BATCH):
        docs = []
        for k in range(first, min(first + BATCH, count)):
            samples = {
                "inference.fps": round(rng.uniform(28.0, 30.5), 2),
                "inference.latency_ms_p95": round(rng.uniform(12, 20), 2),
                "cpu_pct": round(rng.uniform(5, 60), 1),
                "mem_pct": round(rng.uniform(20, 60), 1),
                "temp_c": round(rng.uniform(45, 70), 1),
                "outbox.depth": float(rng.randrange(0, 5)),
            }
            docs.append(Telemetry("sim-0001", start + 10 * k, samples, None))
        with engine.begin() as conn:
            store_telemetry(conn, docs)
    return count


def seed_rollouts(engine: sa.Engine, devices: int, now: float) -> str:
    """Finished rollouts over the sites and, last, over the whole ``sim`` group (every
    device a member, each succeeded); returns that last one's id."""
    last = ""
    with engine.begin() as conn:
        for k in range(ROLLOUTS):
            group = "sim" if k == ROLLOUTS - 1 else f"site-{k % SITES}"
            members = rollstore.members_of(conn, group)
            if not members:
                continue
            at = now - (ROLLOUTS - k) * 3600
            last = rollstore.create(conn, who="bench", group=group, model=fleetsim.MODEL,
                                    version=1 + k % 3, canary_pct=10, step_pct=25,
                                    timeout_s=900, members=members, now=at)  # fmt: skip
            conn.execute(sa.update(rollout_steps).where(rollout_steps.c.rollout_id == last)
                         .values(status="succeeded", started=at, finished=at + 60))  # fmt: skip
            conn.execute(
                sa.update(rollout_devices)
                .where(rollout_devices.c.rollout_id == last)
                .values(
                    outcome="succeeded",
                    phase="succeeded",
                    sent=at + 1,
                    seconds=12.5,
                    last_heard=at + 14,
                    updated=at + 14,
                )
            )
            rollstore.set_status(conn, last, "succeeded", at + 600)
    return last


def seed_registry(folder: Path) -> None:
    """``person-detector`` v1–3 in a registry folder (generated bytes shaped as TFLite)."""
    src = folder.parent / "release-src"
    src.mkdir(parents=True, exist_ok=True)
    labels = src / "labels.txt"
    labels.write_text("background\nperson\n")
    for version in (1, 2, 3):
        data = bytearray(random.Random(version).randbytes(150_000 + 10_000 * version))
        data[4:8] = b"TFL3"
        model = src / f"model-{version}.tflite"
        model.write_bytes(bytes(data))
        publish([model], model=fleetsim.MODEL, version=version, registry=folder,
                task="detection", labels=labels, channels=("stable",))  # fmt: skip


def seed(engine: sa.Engine, devices: int, days: float, registry: Path) -> dict[str, Any]:
    """Everything above; what was made and seconds per part."""
    now = time.time()
    took: dict[str, Any] = {}
    t0 = time.perf_counter()
    seed_devices(engine, devices, now)
    took["devices_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    took["history_docs"] = seed_history(engine, days, now)
    took["history_s"] = time.perf_counter() - t0
    took["rollout"] = seed_rollouts(engine, devices, now)
    seed_registry(registry)
    return took
