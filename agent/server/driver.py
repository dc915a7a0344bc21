"""The rollout driver of one server instance: a thread that, every ``tick_s``, takes or
renews the lease ``rollout:<id>`` of each unfinished rollout (:mod:`agent.server.lease`)
and advances the ones it holds (:mod:`agent.server.rollouts`), persisted step by step.

Crash safety, the order of writes around each publication:

1. A desired state's ``issued_at`` is chosen and committed *before* it is published
   (``rollout_devices.issued_at``, ``take_back_at``, ``rollouts.final_issued_at``).
2. It is published retained, QoS 1; the broker's PUBACK is awaited.
3. Only then is it marked sent (``sent``, ``take_back_sent``; a ``deploys`` row).

The same holds for a shadow rollout's instructions: their one ``issued_at`` is in the
rollout's options from its creation, and ``trial_sent`` / ``trial_cleared`` mark them.

A crash between 2 and 3 re-publishes the same document after the restart: same
fields, same ``issued_at``, and an Ed25519 signature is deterministic, so the very same
bytes. A device that already applied it sees the desired state it applied (the agent
keys applied desired states by model, version and issued_at) and does nothing again;
a retained message replaced by itself changes nothing for later subscribers. A crash
between 1 and 2 publishes it for the first time after the restart. So no step is lost
and none applied twice; finished steps are never re-run (their rows say succeeded).
A device's silence is measured from ``sent``, so a slow restart does not count
against it beyond the time it takes.

Every write checks, in its transaction, that this instance still holds the lease; an
instance that lost it (paused past ``lease_s``) stops acting on that rollout. Lease
times are the database's clock (:func:`agent.server.lease.db_now`), so instances whose
clocks disagree still agree on who holds a lease.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from agent.errors import EdgeAgentError
from agent.fleet.deploy import desired_payload, issue_time
from agent.fleet.shadow import shadow_payload
from agent.server import lease, rollstore
from agent.server.context import Server
from agent.server.rollouts import ACTIVE, TERMINAL, Publication, Rollout, advance, due
from agent.server.schema import rollouts

log = logging.getLogger(__name__)

TICK_S = 1.0
LEASE_S = 15.0
MIN_GAP_S = 0.1  # between two ticks, however often devices send news
MAX_ROUNDS = 4  # advance/publish rounds per rollout and tick (a step ends, the next starts)


class LeaseLost(Exception):
    """Another instance holds the rollout's lease now."""


def lease_name(rollout_id: str) -> str:
    return f"rollout:{rollout_id}"


class RolloutDriver:
    """``RolloutDriver(server)``, :meth:`start`, :meth:`stop`; :meth:`tick` runs one
    round (tests call it directly)."""

    def __init__(self, server: Server, *, tick_s: float = TICK_S, lease_s: float = LEASE_S) -> None:
        self.server = server
        self.tick_s = tick_s
        self.lease_s = lease_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._active = False  # the last tick found unfinished rollouts
        self._thread: threading.Thread | None = None
        self._held: set[str] = set()

    @property
    def instance(self) -> str:
        return self.server.options.instance

    def start(self) -> None:
        """Start driving rollouts in the background."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollouts", daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        """A device sent news (the ingester stored a state, a status or an event): tick
        soon instead of at the next ``tick_s``, so a step that ends is seen when it ends,
        not up to a tick later (the ingester calls this; cheap, from any thread). Ignored
        while no rollout is unfinished; ticks stay at least ``MIN_GAP_S`` apart."""
        if self._active:
            self._wake.set()

    def stop(self, timeout: float = 10.0, *, release: bool = True) -> None:
        """Stop, releasing every lease held (``release=False``: keep them, as an
        instance that dies does; another takes them when they expire)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if release:
            try:
                with self.server.engine.begin() as conn:
                    for name in self._held:
                        lease.release(conn, name, self.instance)
            except SQLAlchemyError as exc:  # they expire by themselves
                log.warning("could not release rollout leases: %s", exc)
        self._held.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # news from now on wakes the next wait
            try:
                self.tick()
            except SQLAlchemyError as exc:
                log.warning("rollouts: database unavailable: %s", str(exc).splitlines()[0])
            except Exception:  # a bug: keep the service up, say so, try again next tick
                log.exception("rollouts: unexpected error")
            self._wake.wait(self.tick_s)
            self._stop.wait(MIN_GAP_S)

    def tick(self) -> None:
        """Take the leases of the unfinished rollouts this instance can, advance them."""
        with self.server.engine.connect() as conn:
            ids = list(
                conn.execute(sa.select(rollouts.c.id).where(rollouts.c.status.in_(ACTIVE)))
                .scalars()
                .all()
            )
        self._active = bool(ids)
        for rollout_id in ids:
            if self._stop.is_set():
                return
            name = lease_name(rollout_id)
            with self.server.engine.begin() as conn:
                mine = lease.take(conn, name, self.instance, lease.db_now(conn), self.lease_s)
            if not mine:
                self._held.discard(name)
                continue
            self._held.add(name)
            try:
                self._drive(rollout_id)
            except LeaseLost:
                self._held.discard(name)
                log.warning("rollout %s: lease lost to another instance", rollout_id)

    # -- one rollout ----------------------------------------------------------------------

    @contextmanager
    def _writing(self, rollout_id: str) -> Iterator[sa.Connection]:
        """A transaction that raises LeaseLost unless this instance holds the lease."""
        with self.server.engine.begin() as conn:
            if not lease.holds(conn, lease_name(rollout_id), self.instance, lease.db_now(conn)):
                raise LeaseLost(rollout_id)
            yield conn

    def _drive(self, rollout_id: str) -> None:
        for _ in range(MAX_ROUNDS):
            now = self.server.clock()
            with self.server.engine.connect() as conn:
                loaded = rollstore.load(conn, rollout_id)
                if loaded is None:
                    return
                r, steps, members = loaded
                observed = rollstore.observe(conn, members, self.server.prefix, r.step, r.model, r)
            moved = advance(r, steps, members, observed, now, issue_time)
            changed = moved.rollout != r or moved.steps != steps or moved.members != members
            if changed:
                try:
                    with self._writing(rollout_id) as conn:
                        old = (r.status, members)
                        rollstore.save(conn, moved.rollout, moved.steps, moved.members, old, now)
                except rollstore.Changed:
                    continue  # paused, resumed or aborted meanwhile: look again
                for line in moved.lines:
                    log.info("rollout %s: %s", rollout_id, line)
            r = moved.rollout
            if r.status in TERMINAL:
                self._end(rollout_id)
                return
            pubs = due(r, moved.members, self.server.prefix)
            if pubs and not self._publish(r, pubs):
                return  # the broker is away: try again next tick
            if r.status == "finishing" and pubs:
                with self._writing(rollout_id) as conn:
                    rollstore.set_status(conn, rollout_id, "succeeded", self.server.clock())
                log.info("rollout %s: succeeded", rollout_id)
                self._end(rollout_id)
                return
            if not changed and not pubs:
                return

    def _publish(self, r: Rollout, pubs: list[Publication]) -> bool:
        """Publish each, marking it sent after the broker has it; False on a failure."""
        for pub in pubs:
            desired: dict[str, Any] | None = None
            try:
                if pub.kind == "shadow":
                    payload = self._instruction(r, pub)
                elif (
                    pub.model is not None and pub.version is not None and pub.issued_at is not None
                ):
                    payload = desired_payload(
                        pub.model, pub.version, pub.target, pub.issued_at,
                        self.server.options.sign_key,
                    )  # fmt: skip
                    desired = rollstore.json_doc(payload)
                else:
                    payload = b""
                self.server.publisher.publish(pub.topic, payload, retain=True)
            except (EdgeAgentError, ValueError) as exc:
                log.warning("rollout %s: cannot publish to %s: %s", r.id, pub.topic, exc)
                return False
            if pub.kind in ("issue", "take_back", "shadow", "shadow_clear") or desired is not None:
                with self._writing(r.id) as conn:
                    rollstore.mark_sent(conn, r, pub, desired, self.instance, self.server.clock())
        return True

    def _instruction(self, r: Rollout, pub: Publication) -> bytes:
        """A shadow rollout's instruction for ``pub.target`` (its own: no promotion rule;
        the rollout judges and promotes). Raises ValueError, EdgeAgentError."""
        if r.shadow is None or pub.model is None or pub.version is None:
            raise ValueError("a shadow instruction of a rollout without shadow options")
        return shadow_payload(
            pub.model,
            pub.version,
            pub.target,
            r.shadow.issued_at,
            sample_pct=r.shadow.sample_pct,
            max_cpu_pct=r.shadow.max_cpu_pct,
            promote=None,
            sign_key=self.server.options.sign_key,
        )

    def _end(self, rollout_id: str) -> None:
        name = lease_name(rollout_id)
        with self.server.engine.begin() as conn:
            lease.release(conn, name, self.instance)
        self._held.discard(name)
