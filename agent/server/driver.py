"""The rollout driver of one server instance (being built): takes the lease of each
running rollout it can, advances it step by step, persisted, and gives the lease up
on stop. Interface used by :mod:`agent.server.serve`: ``RolloutDriver(server)``,
``start()``, ``stop(timeout)``."""

from __future__ import annotations

from agent.server.context import Server


class RolloutDriver:
    def __init__(self, server: Server) -> None:
        self.server = server

    def start(self) -> None:
        """Start driving rollouts in the background."""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop, releasing every lease held."""
