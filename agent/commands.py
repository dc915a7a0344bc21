"""Commands from the fleet: ``<prefix>/<device>/cmd/<name>`` in, one reply out.

A command's payload is a JSON object (or empty); its reply goes to the MQTT 5 response
topic with the request's correlation data when the request names one, else to
``<prefix>/<device>/reply``. Every request gets exactly one reply:

    {"command": "ping", "ok": true, "result": {...}, "request_id": "<the request's id>"}
    {"command": "reboot", "ok": false, "error": "unknown command 'reboot'; known: …"}

Requests are parsed on paho's thread (cheap checks only: size, JSON by
:func:`agent.strictjson.parse_object`'s rules, name) and run one
at a time on a worker thread, so a slow command (a rollback loads a model) never stalls
the network loop. A full queue, an unknown name, a malformed or oversized payload and a
handler's failure each get an error reply; none of them stops the agent.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from agent import lazylog
from agent.errors import DocumentError, EdgeAgentError
from agent.strictjson import parse_object

if TYPE_CHECKING:  # paho only where MQTT runs (the control socket's clients use this too)
    from agent.mqtt import Incoming

log = lazylog.get(__name__)  # logging is imported when a line is logged

Handler = Callable[[dict[str, Any]], Mapping[str, Any]]
Reply = Callable[[str, Mapping[str, Any], "bytes | None"], None]

_QUEUE = 16  # commands waiting to run; more get a "busy" reply


class CommandError(EdgeAgentError):
    """A command was refused; the message goes back to the asker."""


class _Request(msgspec.Struct, frozen=True):
    name: str
    args: dict[str, Any]
    reply_to: str
    correlation: bytes | None
    request_id: Any


class Commands:
    """Parses, queues and runs commands; replies through ``reply(topic, body, correlation)``."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        reply: Reply,
        *,
        reply_topic: str,
        max_bytes: int,
    ) -> None:
        self.handlers = dict(handlers)
        self.reply = reply
        self.reply_topic = reply_topic
        self.max_bytes = max_bytes
        self._queue: queue.Queue[_Request | None] = queue.Queue(_QUEUE)
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the running command (bounded) and drop the queued ones unanswered."""
        self._stopping = True
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            if request is not None:
                self._answer(
                    request.name,
                    request.reply_to,
                    request.correlation,
                    request.request_id,
                    error="agent stopping: not run",
                )
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, message: Incoming) -> None:
        """Take a request from paho's thread; replies at once when it cannot be run."""
        name = message.topic.rsplit("/cmd/", 1)[-1]
        reply_to = message.response_topic or self.reply_topic
        request_id: Any = None
        try:
            args = self._parse(message.payload)
            request_id = args.pop("id", None)
            if self._stopping:
                raise CommandError("agent stopping: not run")
            if name not in self.handlers:
                known = ", ".join(sorted(self.handlers))
                raise CommandError(f"unknown command {name!r}; known: {known}")
            self._queue.put_nowait(_Request(name, args, reply_to, message.correlation, request_id))
        except CommandError as exc:
            self._answer(name, reply_to, message.correlation, request_id, error=str(exc))
        except queue.Full:
            self._answer(
                name, reply_to, message.correlation, request_id, error="busy: too many commands"
            )
        except Exception as exc:  # never leave a request unanswered
            log.exception("command %s could not be taken", name)
            self._answer(
                name, reply_to, message.correlation, request_id, error=f"internal error: {exc}"
            )

    def _parse(self, payload: bytes) -> dict[str, Any]:
        if len(payload) > self.max_bytes:
            raise CommandError(
                f"payload too large: {len(payload)} bytes (mqtt.command_max_bytes is "
                f"{self.max_bytes})"
            )
        if not payload.strip():
            return {}
        try:
            return parse_object(payload, what="payload", max_bytes=self.max_bytes)
        except DocumentError as exc:
            raise CommandError(str(exc)) from None

    def _run(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                return
            try:
                result = dict(self.handlers[request.name](request.args))
            except EdgeAgentError as exc:
                self._answer(
                    request.name,
                    request.reply_to,
                    request.correlation,
                    request.request_id,
                    error=str(exc),
                )
            except Exception as exc:  # a handler bug: reply, log, keep serving
                log.exception("command %s failed", request.name)
                self._answer(
                    request.name,
                    request.reply_to,
                    request.correlation,
                    request.request_id,
                    error=f"internal error: {type(exc).__name__}: {exc}",
                )
            else:
                self._answer(
                    request.name,
                    request.reply_to,
                    request.correlation,
                    request.request_id,
                    result=result,
                )

    def _answer(
        self,
        name: str,
        topic: str,
        correlation: bytes | None,
        request_id: Any,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        body: dict[str, Any] = {"command": name, "ok": error is None}
        if error is None:
            body["result"] = result or {}
        else:
            body["error"] = error
            log.warning("command %s refused: %s", name, error)
        if request_id is not None:
            body["request_id"] = request_id
        self.reply(topic, body, correlation)
