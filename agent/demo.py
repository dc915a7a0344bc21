"""``edge-agent demo``: the whole agent on this machine, with nothing to set up.

No camera, no broker, no TPU: the demo generates two real TFLite models with our own
code (``agent.modelgen``: colour classifiers whose answers are known), publishes the
first, signed and with a self-test and a latency budget, into a registry folder in a
temporary directory, and runs the real agent (``Service``) on a synthetic stream.
Halfway through it publishes the second release to the channel; the agent's poll
finds it, and it goes through the same gate as in the field (download, verify,
self-test and budget, activation, probation) while the stream keeps running. What the
agent reports (results, telemetry, events, state) is printed as it happens, and sent
to a broker as well with ``--broker``. Everything is removed at the end unless
``--keep`` names a folder.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import yaml

from agent.config import config_from_dict
from agent.errors import ConfigError
from agent.strictjson import dumps

MODEL = "colours"
LABELS = "red\ngreen\nblue\n"
RESULT_EVERY_S = 1.0  # results are printed at most this often (all are counted)


class _Printer:
    """Prints what the agent records, one short line each (or JSON lines)."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.started = time.monotonic()
        self.results: Counter[int] = Counter()
        self.outcomes: list[str] = []
        self._last_result = 0.0
        self._lock = threading.Lock()

    def say(self, text: str) -> None:
        if not self.as_json:
            self._line(f"{'demo':<9} {text}")

    def _line(self, text: str) -> None:
        with self._lock:
            self.out.write(f"{time.monotonic() - self.started:6.1f}s  {text}\n")
            self.out.flush()

    def __call__(self, stream: str, doc: Mapping[str, Any]) -> None:
        if stream == "results":
            self.results[doc.get("version") or 0] += 1
        if stream == "events" and doc.get("event") in ("update_succeeded", "update_failed"):
            self.outcomes.append(f"{doc['event']} v{doc.get('version')}")
        if self.as_json:
            with self._lock:
                self.out.write(dumps({"stream": stream, **doc}) + "\n")
                self.out.flush()
            return
        line = self._describe(stream, doc)
        if line:
            self._line(line)

    def _describe(self, stream: str, doc: Mapping[str, Any]) -> str | None:
        if stream == "results":
            now = time.monotonic()
            if now - self._last_result < RESULT_EVERY_S:
                return None
            self._last_result = now
            classes = " ".join(f"{c['label']} {c['score']:.2f}" for c in doc.get("classes", []))
            return (
                f"{'result':<9} v{doc['version']} {doc['backend']}: {classes}  "
                f"({doc['infer_ms']:.2f} ms)"
            )
        if stream == "telemetry":
            inference = doc.get("inference") or {}
            outbox = doc.get("outbox") or {}
            return (
                f"{'telemetry':<9} {inference.get('fps', 0):.1f} fps, "
                f"p95 {inference.get('latency_ms_p95', 0):.1f} ms, "
                f"{inference.get('results', 0)} results, {inference.get('errors', 0)} errors; "
                f"cpu {doc.get('cpu_pct', 0):.0f}%, rss {doc.get('rss_mb', 0):.0f} MB; "
                f"outbox {outbox.get('depth', 0)}"
            )
        if stream == "events":
            detail = {
                k: round(v, 3) if isinstance(v, float) else v
                for k, v in doc.items()
                if k not in ("ts", "event", "id", "update_id", "model", "seq", "schema")
            }
            text = ", ".join(f"{k}={v}" for k, v in detail.items() if v is not None)
            return f"{'event':<9} {doc['event']} {text}".rstrip()
        if stream == "state":
            update = doc.get("update") or {}

            def release(version: Any) -> str:
                return f"v{version}" if version is not None else "none"

            return (
                f"{'state':<9} active {release(doc.get('version'))}, "
                f"serving {release(doc.get('serving'))}, phase {doc.get('phase')}"
                + (f" (update to v{update['version']})" if update else "")
            )
        return None


@contextlib.contextmanager
def _workdir(keep: Path | None) -> Iterator[Path]:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        if any(keep.iterdir()):  # a second run would publish other bytes as v1
            raise ConfigError([f"--keep {keep}: not empty; name a new or empty folder"])
        yield keep
        return
    folder = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _settings(root: Path, broker: str | None, public_key: Path) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "device": {"id": "demo-device"},
        "registry": {
            "url": (root / "registry").as_uri(),
            "public_key": str(public_key),
            "poll_interval_s": 1,
        },
        "model": {"name": MODEL, "channel": "stable"},
        "store": {"dir": str(root / "store"), "keep": 2, "reserve_mb": 0},
        "runtime": {"accelerator": "auto", "threads": 1},
        "source": {"type": "synthetic", "width": 160, "height": 120, "fps": 10},
        "results": {"publish": "every", "min_score": 0.0, "top_k": 3},
        "telemetry": {"interval_s": 2, "outbox": str(root / "outbox.sqlite")},
        "update": {"probation_s": 4, "budget_runs": 20, "poll_jitter": 0},
    }
    if broker is not None:
        settings["mqtt"] = {"url": broker, "reconnect_max_s": 5}
    return settings


def run_demo(
    seconds: float, broker: str | None, out: TextIO, as_json: bool, keep: Path | None
) -> int:
    """Run the demo for ``seconds``; returns 0 when the hot swap to v2 succeeded.

    Raises ConfigError for an unusable ``--broker`` URL, ModelError when no TFLite
    runtime is installed (it says which package to install).
    """
    from agent import modelgen
    from agent.fleet.publish import publish
    from agent.runtime.backends import runtime_api
    from agent.service import Service
    from agent.verify import generate_keypair

    runtime_api()  # no runtime: say so now, with the package to install
    printer = _Printer(out, as_json)
    with _workdir(keep) as root:
        models = root / "models"
        models.mkdir(exist_ok=True)
        (models / "v1.tflite").write_bytes(modelgen.colour_classifier())
        (models / "v2.tflite").write_bytes(modelgen.colour_classifier(quantised=True))
        (models / "colours.txt").write_text(LABELS)
        private, public = generate_keypair(root / "keys", force=True)

        def release(version: int) -> None:
            publish(
                [models / f"v{version}.tflite"],
                model=MODEL,
                version=version,
                registry=root / "registry",
                task="classification",
                labels=models / "colours.txt",
                sign_key=private,
                channels=("stable",),
                selftest_random=4,
                budget_p95_ms=1000,
            )

        release(1)
        printer.say(f"published {MODEL} v1 (float32, signed, self-test, budget) to {root}/registry")
        settings = _settings(root, broker, public)
        (root / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        config = config_from_dict(settings, "demo settings")
        where = (
            f"; MQTT to {broker} under edge/demo-device/#"
            if broker
            else "; no broker, so messages wait in the outbox"
        )
        printer.say(f"starting the agent on a synthetic 160x120 stream at 10 fps{where}")
        service = Service(config, observe=printer)
        try:
            service.start()
            deadline = time.monotonic() + seconds
            half = time.monotonic() + seconds / 2
            pushed = False
            while time.monotonic() < deadline:
                if not pushed and time.monotonic() >= half:
                    release(2)
                    pushed = True
                    printer.say(f"published {MODEL} v2 (uint8) to channel stable: watch the swap")
                time.sleep(0.1)
        finally:
            service.stop()
        swapped = any(o == "update_succeeded v2" for o in printer.outcomes)
        counts = ", ".join(f"v{v}: {n}" for v, n in sorted(printer.results.items()))
        printer.say(f"stopped. results by version: {counts or 'none'}")
        printer.say(
            "hot swap to v2 succeeded, the stream never stopped"
            if swapped
            else "v2 was not served before the end (run longer: --seconds 40)"
        )
        if keep is not None:
            printer.say(f"kept {root}: config.yaml, registry/, store/, outbox.sqlite")
    return 0 if swapped else 1
