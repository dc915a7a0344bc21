"""Loggers that import :mod:`logging` when a line is first logged.

``logging`` and the agent's setup of it (:mod:`agent.logs`: formatters, the rate limit,
JSON) cost a one-shot command ~5 ms of its ~20 ms budget over ``python -c pass``
(bench/startup.py); ``edge-agent status`` seldom logs anything. The modules on its path
(the store, the control socket, the command queue) log through :func:`get`; the command
line hands its log setup to :func:`defer` instead of running it, and the setup runs just
before the first line is logged, so that line reads as it would have.

``get(name).warning(...)`` calls the real logger's method (an attribute of the real
``logging.Logger``): the caller's frame is the record's, as the rate limit needs (one
line of code, one key). In an agent (``run``) logging is set up before anything logs:
nothing is deferred and these are plain loggers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import logging

_pending: list[Callable[[], object]] = []


def defer(setup: Callable[[], object]) -> None:
    """Run ``setup`` (the process's log setup) before the first line is logged."""
    _pending[:] = [setup]


def _real(name: str) -> logging.Logger:
    import logging

    while _pending:  # a setup that logs (a deprecation) finds nothing pending: no loop
        _pending.pop()()
    return logging.getLogger(name)


class Logger:
    """Stands for ``logging.getLogger(name)``; every attribute is the real logger's."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(_real(self.name), attribute)


def get(name: str) -> logging.Logger:
    """The logger ``name``, imported and set up when first used."""
    return Logger(name)  # type: ignore[return-value]  # it forwards every attribute
