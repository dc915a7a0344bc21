"""Several pipelines on one device: ``pipelines:``, a store and update worker per model.

The config rules and the store layout are table tests; the desired-state routing runs
on the real ``DesiredState``; the device is the real agent (``edge-agent run``) with two
generated models on two synthetic streams, a ``file://`` registry and a real mosquitto:
what is asserted is what the fleet sees (results topics, the state document, events).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import contract
from agent.commands import CommandError
from agent.config import HomeAssistantConfig, ResultsConfig, config_from_dict, parse_config
from agent.config_pipelines import served_models
from agent.control import ask
from agent.desired import DesiredState, NotServedHere
from agent.errors import ConfigError
from agent.fleet.publish import publish
from agent.homeassistant import discovery_configs
from agent.preflight import check
from agent.stores import store_dirs
from agent.units import compose_state
from tests.agentproc import MODEL, AgentProcess, Tap, publish_models, wait_alive
from tests.broker import Collector, Mosquitto, subscriber
from tests.conftest import Models
from tests.pipecfg import two_pipelines, write_pipelines

DEV = "dev-p"
OTHER = "boxes"
CASCADE = "crops"

# -- config ---------------------------------------------------------------------------

TWO = """
pipelines:
  - name: door
    model: {name: people}
    source: {type: synthetic, fps: 5}
    cascade: {model: {name: faces}, labels: [person], max_crops: 2}
  - name: yard
    model: {name: cars, channel: beta}
    source: {type: images, path: /srv/frames}
    results: {publish: every, min_score: 0.2}
  - name: gate
    model: {name: people}
"""


def test_pipelines_normalise_and_list_every_model_once() -> None:
    config = parse_config(TWO, env={})
    pipelines = config.pipeline_list()
    assert [p.name for p in pipelines] == ["door", "yard", "gate"]
    assert [type(p.source).__name__ for p in pipelines] == [
        "SyntheticSource",
        "ImagesSource",
        "CameraSource",
    ]
    assert pipelines[1].results.min_score == 0.2 and pipelines[0].results.min_score == 0.5
    assert pipelines[0].cascade is not None and pipelines[0].cascade.labels == ("person",)
    assert list(served_models(pipelines)) == ["people", "faces", "cars"]


def test_the_single_model_shape_is_one_pipeline_named_main() -> None:
    config = parse_config("model: {name: colours}\nsource: {type: synthetic}\n", env={})
    (main,) = config.pipeline_list()
    assert (main.name, main.model.name, main.source, main.cascade) == (
        "main",
        "colours",
        config.source,
        None,
    )
    assert config.pipelines == ()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "pipelines:\n  - {name: door, model: {name: a}}\n  - {name: door, model: {name: b}}\n",
            "config.yaml:3: pipelines[1].name: 'door' is used twice",
        ),
        (
            "model: {name: a}\npipelines:\n  - {name: door, model: {name: a}}\n",
            "config.yaml:2: pipelines: set either pipelines or model/source/results/cascade, "
            "not both (model set too)",
        ),
        (
            "pipelines:\n  - {name: door, model: {name: a}, cascade: {model: {name: a}}}\n",
            "config.yaml:2: pipelines[0].cascade.model.name: 'a' is the pipeline's own model",
        ),
        (
            "model: {name: a}\ncascade: {model: {name: a}}\n",
            "config.yaml:2: cascade.model.name: 'a' is the pipeline's own model",
        ),
        ("pipelines: []\n", "config.yaml:1: pipelines: must be a list of 1 to 8 pipelines"),
        ("pipelines: {door: 1}\n", "pipelines: must be a list of 1 to 8 pipelines"),
        (
            "pipelines:\n  - {name: 'a b', model: {name: a}}\n",
            "config.yaml:2: pipelines[0].name: must be letters, digits, '_' and '-'",
        ),
        ("pipelines:\n  - {model: {name: a}}\n", "config.yaml:2: pipelines[0].name: required"),
        (
            "pipelines:\n  - {name: door}\n",
            "pipelines[0].model.name: required: every pipeline names its model(s)",
        ),
        (
            "pipelines:\n  - {name: door, model: {name: a}, source: {type: tv}}\n",
            "config.yaml:2: pipelines[0].source.type: unknown type 'tv'",
        ),
        (
            "pipelines:\n  - {name: door, model: {name: a}, results: {min_score: 2}}\n",
            "config.yaml:2: pipelines[0].results.min_score: Expected `float` <= 1.0",
        ),
        (
            "pipelines:\n  - {name: door, model: {name: a}, colour: red}\n",
            "config.yaml:2: pipelines[0].colour: unknown key",
        ),
        (
            "pipelines:\n  - name: door\n    model: {name: a}\n"
            "    cascade: {model: {name: b}, max_crops: 33}\n",
            "config.yaml:4: pipelines[0].cascade.max_crops: Expected `int` <= 32",
        ),
        (
            "pipelines:\n  - name: door\n    model: {name: a}\n"
            "    cascade: {model: {name: b}, top_k: 0}\n",
            "config.yaml:4: pipelines[0].cascade.top_k: Expected `int` >= 1",
        ),
        (
            "pipelines:\n  - {name: door, model: {name: a}}\n"
            "  - {name: yard, model: {name: a, channel: beta}}\n",
            "config.yaml:3: pipelines[1].model.channel: 'beta', but pipelines[0].model follows "
            "'stable' for model 'a'; a model follows one channel",
        ),
        (
            "pipelines:\n" + "".join(f"  - {{name: p{i}, model: {{name: a}}}}\n" for i in range(9)),
            "pipelines: must be a list of 1 to 8 pipelines",
        ),
    ],
)
def test_config_errors_are_one_line_naming_the_key(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, env={})
    lines = str(caught.value).splitlines()
    assert len(lines) == 1 and error in lines[0], lines


def test_home_assistant_label_sensors_read_each_pipelines_results() -> None:
    ha = HomeAssistantConfig(discovery=True, labels=("person",))
    found = discovery_configs(
        "d1",
        "edge/d1",
        ha,
        agent_version="0",
        telemetry_interval_s=10,
        pipelines=[("door", ResultsConfig()), ("yard", ResultsConfig())],
    )
    sensors = {d.object_id: d for d in found if d.component == "binary_sensor"}
    assert {k: d.config["state_topic"] for k, d in sensors.items()} == {
        "door_person_detected": "edge/d1/results/door",
        "yard_person_detected": "edge/d1/results/yard",
    }


# -- stores ---------------------------------------------------------------------------

ROOT = Path("/var/lib/edge-agent/store")


@pytest.mark.parametrize(
    ("held", "models", "root_for"),
    [
        (None, ["a"], "a"),  # a fresh store, one model: the root
        ("a", ["a"], "a"),
        (None, ["a", "b"], "a"),  # fresh: the first pipeline's model
        ("b", ["a", "b"], "b"),  # the root keeps the model it holds
        ("a", ["a", "b", "c"], "a"),
        ("old", ["a", "b"], "a"),  # holds a model no longer served: as a renamed model did
        (None, [], None),
    ],
)
def test_each_model_has_its_store_and_the_root_keeps_what_it_holds(
    held: str | None, models: list[str], root_for: str | None
) -> None:
    dirs = store_dirs(ROOT, held, models)
    assert list(dirs) == models
    for name, folder in dirs.items():
        assert folder == (ROOT if name == root_for else ROOT / "models" / name)


# -- desired state per model -------------------------------------------------------------


def _doc(model: str, version: int, issued_at: float) -> bytes:
    return json.dumps({"model": model, "version": version, "issued_at": issued_at}).encode()


def test_per_model_topics_route_by_model_and_the_devices_newest_wins() -> None:
    state = DesiredState("edge", "d1", ["door"], model="a", only_model=True)
    assert set(state.topics) == {
        "edge/d1/desired",
        "edge/groups/door/desired",
        "edge/d1/desired/a",
        "edge/groups/door/desired/a",
    }
    with pytest.raises(ValueError, match="'b' on the desired-state topic of model 'a'"):
        state.update("edge/d1/desired/a", _doc("b", 1, 10))
    assert state.winner() is None
    with pytest.raises(NotServedHere):  # another model's, on the topic of older fleets
        state.update("edge/d1/desired", _doc("b", 1, 10))
    state.update("edge/groups/door/desired/a", _doc("a", 5, 50))
    assert state.winner() is not None and state.winner().version == 5  # type: ignore[union-attr]
    state.update("edge/d1/desired", _doc("a", 2, 20))
    state.update("edge/d1/desired/a", _doc("a", 3, 30))
    winner = state.winner()
    assert winner is not None and (winner.version, winner.source) == (3, "device")
    state.update("edge/d1/desired", _doc("a", 4, 40))  # the most recently issued of its own
    assert state.winner().version == 4  # type: ignore[union-attr]
    with pytest.raises(NotServedHere):  # the legacy topic moved to another model
        state.update("edge/d1/desired", _doc("b", 1, 60))
    assert state.winner().version == 3  # type: ignore[union-attr]


def test_the_single_model_follows_the_legacy_topic_as_before() -> None:
    state = DesiredState("edge", "d1", [], model="a")
    desired = state.update("edge/d1/desired", _doc("b", 1, 10))  # a model switch, as ever
    assert desired is not None and state.winner() == desired


# -- the device --------------------------------------------------------------------------


@pytest.fixture
def operator(broker: Mosquitto) -> Iterator[Collector]:
    client = subscriber(broker.url, [])
    yield client
    client.close()


def _colours(root: Path, models: Models) -> None:
    """colours v1 on channel stable, v2 published on no channel (for a desired state)."""
    publish_models(root, models.root, (1,))
    publish(
        [models.root / "v2.tflite"],
        model=MODEL,
        version=2,
        registry=root,
        task="classification",
        labels=models.labels,
        channels=(),
    )


def _registry(tmp_path: Path, models: Models) -> Path:
    root = tmp_path / "registry"
    _colours(root, models)
    publish(
        [models.path("detector.tflite")],
        model=OTHER,
        version=1,
        registry=root,
        task="detection",
        labels=models.labels,
        channels=("stable",),
    )
    publish(
        [models.path("v4_small.tflite")],
        model=CASCADE,
        version=1,
        registry=root,
        task="classification",
        labels=models.labels,
        channels=("stable",),
    )
    return root


def _two_pipelines(tmp_path: Path, broker: Mosquitto, registry: Path) -> AgentProcess:
    agent = AgentProcess(
        tmp_path / DEV,
        DEV,
        {
            "registry": {"url": registry.as_uri(), "poll_interval_s": 3600},
            "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
        },
    )
    return two_pipelines(
        agent, OTHER, cascade={"model": {"name": CASCADE}, "max_crops": 2, "top_k": 1}
    )


def _events(tap: Tap, name: str) -> list[dict[str, Any]]:
    return [d for d in tap.docs("/events") if d["event"] == name]


def _state(tap: Tap) -> dict[str, Any]:
    states = tap.docs("/state")
    return states[-1] if states else {}


def test_two_pipelines_serve_two_models_and_update_one_alone(
    tmp_path: Path,
    broker: Mosquitto,
    models: Models,
    agents: list[AgentProcess],
    operator: Collector,
) -> None:
    registry = _registry(tmp_path, models)
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#"])
    try:
        agent = _two_pipelines(tmp_path, broker, registry)
        agents.append(agent)
        agent.start()

        def serving(name: str, model: str, version: int) -> bool:
            results = tap.docs(f"/results/{name}")
            return len(results) >= 3 and all(
                (r["model"], r["version"], r["pipeline"]) == (model, version, name)
                for r in results[-3:]
            )

        wait_alive(
            lambda: serving("door", MODEL, 1) and serving("yard", OTHER, 1),
            60,
            "both pipelines serving v1 of their models",
            agent,
        )
        assert not tap.docs(f"edge/{DEV}/results")  # nothing on the single model's topic
        assert "detections" in tap.docs("/results/yard")[-1]
        assert "classes" in tap.docs("/results/door")[-1]
        wait_alive(
            lambda: (
                set(_state(tap).get("models", {})) == {MODEL, OTHER, CASCADE}
                and all(m["serving"] == 1 for m in _state(tap)["models"].values())
                and _state(tap)["models"][CASCADE]["phase"] == "succeeded"
            ),
            30,
            "a state with the three models serving (the cascade's through probation)",
            agent,
        )
        state = _state(tap)
        assert state["model"] == MODEL and state["version"] == 1  # the first pipeline's
        assert state["pipelines"] == {
            "door": {"model": MODEL, "cascade": None, "source": "synthetic"},
            "yard": {"model": OTHER, "cascade": CASCADE, "source": "synthetic"},
        }
        store = agent.root / "store"
        assert json.loads((store / "active.json").read_text())["model"] == MODEL
        for name in (OTHER, CASCADE):  # each model its own store
            assert (
                json.loads((store / "models" / name / "active.json").read_text())["model"] == name
            )
        wait_alive(
            lambda: (
                set(tap.docs("/telemetry")[-1].get("pipelines", {})) == {"door", "yard"}
                if tap.docs("/telemetry")
                else False
            ),
            30,
            "telemetry per pipeline",
            agent,
        )
        for stream, doc in (
            ("state", _state(tap)),
            ("telemetry", tap.docs("/telemetry")[-1]),
            ("results", tap.docs("/results/yard")[-1]),
        ):
            contract.validator(stream).validate_python(doc)  # the typed documents
        figures = tap.docs("/telemetry")[-1]["pipelines"]
        assert figures["yard"]["model"] == OTHER and figures["door"]["cascade"] is None
        cascade = figures["yard"]["cascade"]  # the cascade stage runs the served model
        assert (cascade["model"], cascade["version"], cascade["errors"]) == (CASCADE, 1, 0)
        assert cascade["crops"] > 0
        nested = [
            d["cascade"]
            for r in tap.docs("/results/yard")
            for d in r["detections"]
            if "cascade" in d
        ]
        assert nested and all((n["model"], n["version"]) == (CASCADE, 1) for n in nested)
        assert all(len(n["classes"]) <= 1 for n in nested)  # the cascade's own top_k
        assert tap.docs("/telemetry")[-1]["inference"]["model"] == MODEL

        # A desired state on the model's own topic updates that model alone.
        yard_before = len(tap.docs("/results/yard"))
        started_before = len(_events(tap, "update_started"))
        body = {"model": MODEL, "version": 2, "issued_at": 1000.0}
        operator.publish(f"edge/{DEV}/desired/{MODEL}", json.dumps(body), retain=True)
        wait_alive(lambda: serving("door", MODEL, 2), 60, "door on v2", agent)
        wait_alive(lambda: len(tap.docs("/results/yard")) > yard_before + 5, 30, "yard on", agent)
        assert all(r["version"] == 1 for r in tap.docs("/results/yard"))
        started = _events(tap, "update_started")[started_before:]
        assert [(e["model"], e["version"]) for e in started] == [(MODEL, 2)]
        wait_alive(
            lambda: (
                _state(tap)["models"][MODEL]["version"] == 2
                and _state(tap)["models"][MODEL]["desired"] is not None
            ),
            30,
            "the state's colours at v2",
            agent,
        )
        assert _state(tap)["models"][OTHER]["version"] == 1

        # On a model's topic, another model is refused; on the older fleets' topic a
        # model not served here is ignored, and neither changes what serves.
        wrong = {"model": OTHER, "version": 1, "issued_at": 2000.0}
        operator.publish(f"edge/{DEV}/desired/{MODEL}", json.dumps(wrong), retain=True)
        wait_alive(lambda: bool(_events(tap, "desired_invalid")), 30, "desired_invalid", agent)
        assert (
            "'boxes' on the desired-state topic of model 'colours'"
            in (_events(tap, "desired_invalid")[0]["error"])
        )
        stranger = {"model": "trees", "version": 1, "issued_at": 3000.0}
        operator.publish(f"edge/{DEV}/desired", json.dumps(stranger), retain=True)
        wait_alive(lambda: bool(_events(tap, "desired_ignored")), 30, "desired_ignored", agent)
        ignored = _events(tap, "desired_ignored")
        assert [(e["model"], e["reason"]) for e in ignored] == [("trees", "not served here")]
        operator.publish(f"edge/{DEV}/desired", "{not json", retain=True)  # every unit reads it
        wait_alive(lambda: len(_events(tap, "desired_invalid")) >= 2, 30, "desired_invalid", agent)
        time.sleep(0.5)  # the other models' workers have read it too: reported once
        invalid = _events(tap, "desired_invalid")
        assert [e["topic"] for e in invalid] == [
            f"edge/{DEV}/desired/{MODEL}",
            f"edge/{DEV}/desired",
        ]
        assert serving("door", MODEL, 2)

        # The control socket's commands name the model (default: the first pipeline's).
        sock = agent.root / "control.sock"
        pong = ask(sock, "ping")
        assert (pong["model"], pong["version"]) == (MODEL, 2)
        assert {m: p["version"] for m, p in pong["models"].items()} == {
            MODEL: 2,
            OTHER: 1,
            CASCADE: 1,
        }
        with pytest.raises(CommandError, match=r"'trees' is not served here \(served: "):
            ask(sock, "rollback", {"model": "trees"})
        with pytest.raises(CommandError, match="no earlier release"):
            ask(sock, "rollback", {"model": OTHER})  # boxes has only v1: nothing changed
        status = ask(sock, "status")
        assert status["pipelines_stats"]["yard"]["model"] == OTHER
        done = ask(sock, "rollback", {"model": MODEL})
        assert (done["from"], done["version"]) == (2, 1)
        wait_alive(lambda: bool(_events(tap, "rolled_back")), 30, "rolled_back", agent)
        (rolled,) = _events(tap, "rolled_back")  # with several models: which one
        assert (rolled["model"], rolled["from"], rolled["to"]) == (MODEL, 2, 1)
        wait_alive(lambda: serving("door", MODEL, 1), 30, "door back on v1", agent)
        assert all(r["version"] == 1 for r in tap.docs("/results/yard"))
        assert agent.terminate() == 0
    finally:
        tap.close()
    assert "Traceback" not in agent.log()


def test_the_single_model_follows_its_own_desired_topic_and_publishes_as_before(
    tmp_path: Path,
    broker: Mosquitto,
    models: Models,
    agents: list[AgentProcess],
    operator: Collector,
) -> None:
    registry = tmp_path / "registry"
    _colours(registry, models)
    agent = AgentProcess(
        tmp_path / DEV,
        DEV,
        {
            "registry": {"url": registry.as_uri(), "poll_interval_s": 3600},
            "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
        },
    )
    agents.append(agent)
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#"])
    try:
        agent.start()
        body = {"model": MODEL, "version": 2, "issued_at": 1000.0}
        operator.publish(f"edge/{DEV}/desired/{MODEL}", json.dumps(body), retain=True)
        wait_alive(
            lambda: (
                len(r := tap.docs(f"{DEV}/results")) >= 3 and all(d["version"] == 2 for d in r[-3:])
            ),
            60,
            "v2 from the model's own desired topic",
            agent,
        )
        result = tap.docs(f"{DEV}/results")[-1]
        assert "pipeline" not in result
        wait_alive(
            lambda: (_state(tap).get("desired") or {}).get("version") == 2,
            30,
            "the state's desired v2",
            agent,
        )
        state = _state(tap)
        assert "models" not in state and "pipelines" not in state
        assert "pipelines" not in tap.docs("/telemetry")[-1]
        assert not (agent.root / "store" / "models").exists()
        assert agent.terminate() == 0
    finally:
        tap.close()


def test_preflight_checks_each_pipelines_source_and_model(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    (registry / "people").mkdir(parents=True)
    (registry / "people" / "index.json").write_text("{}")
    config = config_from_dict(
        {
            "registry": {"url": registry.as_uri()},
            "store": {"dir": str(tmp_path / "store")},
            "telemetry": {"outbox": str(tmp_path / "outbox.sqlite")},
            "pipelines": [
                {"name": "door", "model": {"name": "people"}, "source": {"type": "synthetic"}},
                {
                    "name": "yard",
                    "model": {"name": "cars"},
                    "source": {"type": "video", "path": str(tmp_path / "none.mp4")},
                    "cascade": {"model": {"name": "plates"}},
                },
            ],
        }
    )
    found = check(config)
    assert found.errors == []
    assert f"pipelines[1].source.path: no video file at {tmp_path / 'none.mp4'} (yet)" in (
        found.warnings
    )
    missing = [w for w in found.warnings if "index.json yet" in w]
    assert [w.split(" has no ")[1].split("/")[0] for w in missing] == ["cars", "plates"]


@pytest.mark.parametrize(
    ("sources", "error"),
    [
        (
            [{"type": "camera", "device": "0"}, {"type": "camera", "device": "/dev/video0"}],
            "pipelines[1].source: the camera /dev/video0 is already pipelines[0].source's",
        ),
        ([{"type": "camera", "device": "0"}, {"type": "camera", "device": "1"}], None),
        (
            [{"type": "udp", "port": 9000}, {"type": "udp", "port": 9000, "bind": "127.0.0.1"}],
            "pipelines[1].source: the UDP port 9000 is already pipelines[0].source's",
        ),
        ([{"type": "udp", "port": 9000}, {"type": "udp", "port": 9001}], None),
        (
            [{"type": "serial", "device": "/dev/ttyUSB0"}] * 2,
            "pipelines[1].source: the serial device /dev/ttyUSB0 is already",
        ),
        ([{"type": "synthetic"}] * 2, None),  # what several can read
    ],
)
def test_two_pipelines_on_one_camera_port_or_serial_device_are_refused(
    tmp_path: Path, sources: list[dict[str, Any]], error: str | None
) -> None:
    config = config_from_dict(
        {
            "store": {"dir": str(tmp_path / "store")},
            "telemetry": {"outbox": str(tmp_path / "outbox.sqlite")},
            "pipelines": [
                {"name": f"p{n}", "model": {"name": f"m{n}"}, "source": source}
                for n, source in enumerate(sources)
            ],
        }
    )
    shared = [e for e in check(config).errors if "one pipeline per device" in e]
    if error is None:
        assert shared == []
    else:
        assert len(shared) == 1 and shared[0].startswith(error), shared


def test_the_state_of_several_models_keeps_the_first_ones_fields_on_top() -> None:
    def part(model: str, version: int) -> dict[str, Any]:
        return {
            "agent_version": "0.1.0",
            "model": model,
            "version": version,
            "sha256": f"{model}-sha",
            "backend": "cpu",
            "serving": version,
            "previous": None,
            "phase": "succeeded",
            "last_error": None,
            "update": None,
            "desired": None,
            "bad": [],
            "runtime": None,
        }

    config = parse_config(TWO, env={})
    parts = {"people": part("people", 3), "faces": part("faces", 1), "cars": part("cars", 7)}
    doc = compose_state(parts["people"], parts, config.pipeline_list())  # type: ignore[arg-type]
    assert {k: doc[k] for k in ("model", "version", "agent_version")} == {  # type: ignore[literal-required]
        "model": "people",
        "version": 3,
        "agent_version": "0.1.0",
    }
    assert doc["models"]["cars"] == {k: v for k, v in parts["cars"].items() if k != "agent_version"}
    assert list(doc["models"]) == ["people", "faces", "cars"]
    assert doc["pipelines"] == {
        "door": {"model": "people", "cascade": "faces", "source": "synthetic"},
        "yard": {"model": "cars", "cascade": None, "source": "images"},
        "gate": {"model": "people", "cascade": None, "source": "camera"},
    }
    contract.validator("state").validate_python(
        {**doc, "schema": 1, "seq": 1, "id": "x", "ts": 1.0}
    )
    # each model's part is bounded (16 models must fit one message); the top level not
    parts["cars"]["bad"] = [f"cars@{n}" for n in range(1, 65)]
    parts["cars"]["last_error"] = "x" * 5000
    doc = compose_state(parts["people"], parts, config.pipeline_list())  # type: ignore[arg-type]
    cars = doc["models"]["cars"]
    assert cars["bad"] == [f"cars@{n}" for n in range(49, 65)]
    assert cars["last_error"] is not None and len(cars["last_error"]) == 1000
    assert cars["last_error"].endswith("…")


def test_a_device_moving_to_pipelines_keeps_its_model_in_the_store_root(
    tmp_path: Path, broker: Mosquitto, models: Models, agents: list[AgentProcess]
) -> None:
    registry = _registry(tmp_path, models)
    agent = AgentProcess(
        tmp_path / DEV,
        DEV,
        {
            "registry": {"url": registry.as_uri(), "poll_interval_s": 3600},
            "mqtt": {"url": broker.url, "reconnect_max_s": 1, "keepalive_s": 5},
        },
    )
    agents.append(agent)
    agent.start()
    store = agent.root / "store"
    wait_alive(lambda: "update to v1 succeeded" in agent.log(), 60, "colours v1", agent)
    assert agent.terminate() == 0
    write_pipelines(  # the model the root holds is now the second pipeline's
        agent,
        {"name": "yard", "model": {"name": OTHER}, "source": {"type": "synthetic"}},
        {"name": "door", "model": {"name": MODEL}, "source": {"type": "synthetic"}},
    )
    tap = Tap("127.0.0.1", broker.port, [f"edge/{DEV}/#"])
    try:
        agent.start()
        wait_alive(
            lambda: all(
                (_state(tap).get("models") or {}).get(m, {}).get("serving") == 1
                for m in (MODEL, OTHER)
            ),
            60,
            "both models serving",
            agent,
        )
        assert agent.terminate() == 0
    finally:
        tap.close()
    assert json.loads((store / "active.json").read_text())["model"] == MODEL
    assert json.loads((store / "models" / OTHER / "active.json").read_text())["model"] == OTHER
    assert not (store / "models" / MODEL).exists()
    assert _state(tap)["model"] == OTHER  # the first pipeline's model on top
    started = [e for e in tap.docs("/events") if e["event"] == "update_started"]
    assert [e["model"] for e in started] == [OTHER]  # colours was not pulled again
