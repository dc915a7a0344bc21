"""Configuration: typed, validated at load, errors name the key path and its line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config, parse_config
from agent.config_sections import NAME_RULE
from agent.errors import ConfigError

GOOD = """\
device:
  id: pi-door-01
  groups: [door, canary]
registry:
  url: https://models.example.com/
  poll_interval_s: 300
model:
  name: person-detector
  channel: stable
store:
  dir: /var/lib/edge-agent/models
  keep: 3
runtime:
  accelerator: auto
source:
  type: camera
  device: /dev/video0
  fps: 15
mqtt:
  url: mqtts://broker.example.com:8883
  topic_prefix: edge
telemetry:
  interval_s: 10
"""


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "config.yaml", env or {})
    return info.value.problems


def test_design_example_config_is_valid() -> None:
    config = parse_config(GOOD, env={})
    assert config.device.groups == ["door", "canary"]
    assert config.registry.poll_interval_s == 300
    assert config.store.dir == Path("/var/lib/edge-agent/models")
    assert config.registry.max_download_mb == 500  # defaults fill the rest


def test_empty_config_takes_defaults() -> None:
    config = parse_config("", env={})
    assert config.model.channel == "stable" and config.registry.url is None


def test_unknown_key_is_refused_with_path_and_line() -> None:
    text = GOOD.replace("  poll_interval_s: 300", "  poll_intervall_s: 300")
    assert problems(text) == ["config.yaml:6: registry.poll_intervall_s: unknown key"]


def test_unknown_section_is_refused() -> None:
    assert problems(GOOD + "camera:\n  fps: 3\n") == ["config.yaml:24: camera: unknown key"]


def test_wrong_type_names_key_path_and_line() -> None:
    text = GOOD.replace("  keep: 3", "  keep: lots")
    (problem,) = problems(text)
    assert problem == "config.yaml:12: store.keep: 'lots' is not a whole number"


def test_out_of_range_and_bad_choice_are_both_reported() -> None:
    text = GOOD.replace("  fps: 15", "  fps: -1").replace("accelerator: auto", "accelerator: tpu")
    found = problems(text)
    assert any(
        p == "config.yaml:14: runtime.accelerator: Invalid enum value 'tpu'; one of auto, edgetpu, "
        "cpu"
        for p in found
    )
    assert any(p == "config.yaml:18: source.fps: Expected `float` >= 0.0" for p in found)


def test_bad_url_scheme_is_refused() -> None:
    (problem,) = problems(GOOD.replace("https://models", "ftp://models"))
    assert problem == "config.yaml:5: registry.url: must start with http://, https:// or file://"


def test_duplicate_key_is_refused() -> None:
    (problem,) = problems(GOOD.replace("  keep: 3", "  keep: 3\n  keep: 4"))
    assert problem == "config.yaml:13: store.keep: duplicate key"


def test_invalid_yaml_names_the_line() -> None:
    (problem,) = problems(GOOD.replace("  keep: 3", "  keep: [3"))
    assert problem.startswith("config.yaml:") and "not valid YAML" in problem


def test_registry_without_model_name_is_refused() -> None:
    text = GOOD.replace("  name: person-detector\n", "")
    (problem,) = problems(text)
    assert "model.name is required when registry.url is set" in problem


def test_environment_overrides_a_key() -> None:
    env = {
        "EDGE_AGENT_REGISTRY_POLL_INTERVAL_S": "60",
        "EDGE_AGENT_DEVICE_GROUPS": "[a, b]",
        "EDGE_AGENT_DEVICE_ID": "0123",
        "EDGE_AGENT_CRASH_AT": "not-config",
    }
    config = parse_config(GOOD, env=env)
    assert config.registry.poll_interval_s == 60
    assert config.device.groups == ["a", "b"]
    assert config.device.id == "0123"  # stays a string, leading zero and all


def test_bad_environment_value_names_the_variable() -> None:
    (problem,) = problems(GOOD, env={"EDGE_AGENT_STORE_KEEP": "zero"})
    assert problem == "EDGE_AGENT_STORE_KEEP: store.keep: 'zero' is not a whole number"
    (problem,) = problems(GOOD, env={"EDGE_AGENT_STORE_KEPE": "2"})
    assert problem == "EDGE_AGENT_STORE_KEPE: store.kepe: unknown key"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    # check-config tries the broker and the registry: keep them on loopback (port 9:
    # nothing listens, so they are warnings), and the outbox beside the config.
    text = path.read_text()
    text = text.replace("https://models.example.com/", "http://127.0.0.1:9/")
    text = text.replace("mqtts://broker.example.com:8883", "mqtt://127.0.0.1:9")
    path.write_text(text.replace("telemetry:\n", f"telemetry:\n  outbox: {path.parent}/o.db\n"))
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_check_config_exits_0_for_a_valid_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.replace("/var/lib/edge-agent/models", str(tmp_path / "store")))
    result = _check_config(path)
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout


def test_check_config_exits_78_and_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(GOOD.replace("  keep: 3", "  keep: 0"))
    result = _check_config(path)
    assert result.returncode == 78
    assert f"{path}:12: store.keep: Expected `int` >= 1" in result.stderr


def test_check_config_checks_referenced_files(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    text = GOOD.replace("/var/lib/edge-agent/models", str(tmp_path / "store"))
    path.write_text(text.replace("  poll_interval_s: 300", f"  public_key: {tmp_path}/missing.pub"))
    result = _check_config(path)
    assert result.returncode == 78
    assert f"registry.public_key: cannot read {tmp_path}/missing.pub" in result.stderr


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://[::1/", "Invalid IPv6 URL"),
        ("http://models:99999/", "Port out of range"),
        ("http:///nohost", "has no host name"),
        ("file://relative/registry", "needs an absolute path"),
    ],
)
def test_unusable_registry_url_is_refused(url: str, why: str) -> None:
    (problem,) = problems(GOOD.replace("https://models.example.com/", url))
    assert problem.startswith("config.yaml:5: registry.url: ") and why in problem


def test_empty_or_nul_path_is_refused() -> None:
    (problem,) = problems(GOOD.replace("/var/lib/edge-agent/models", '""'))
    assert problem == "config.yaml:11: store.dir: must be a path (not empty, no NUL byte)"
    (problem,) = problems(GOOD, env={"EDGE_AGENT_REGISTRY_PUBLIC_KEY": "/etc/k\x00ey"})
    assert "registry.public_key: must be a path" in problem


def test_self_referring_yaml_alias_is_refused() -> None:
    (problem,) = problems("device:\n  groups: &g [*g]\n")
    assert problem.startswith("config.yaml:2: device.groups[0]: ")


def test_check_config_refuses_a_public_key_that_is_not_one(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    text = GOOD.replace("/var/lib/edge-agent/models", str(tmp_path / "store"))
    path.write_text(text.replace("  poll_interval_s: 300", f"  public_key: {junk}"))
    result = _check_config(path)
    assert result.returncode == 78
    assert f"registry.public_key: cannot load {junk}" in result.stderr


def test_a_source_without_type_names_the_key_and_the_choices() -> None:
    (problem,) = problems("source:\n  device: /dev/video1\n")
    assert problem == (
        "config.yaml:1: source.type: missing; one of camera, video, mjpeg, rtsp, images, "
        "picamera2, serial, udp, synthetic"
    )


def test_a_key_with_control_characters_is_shown_quoted() -> None:
    (problem,) = problems('device:\n  "a\\x85\\x1b[31m": 1\n')
    assert problem == "config.yaml:2: device.'a\\x85\\x1b[31m': unknown key"
    assert problem.isprintable()


def test_environment_booleans_take_the_usual_words_only_for_boolean_keys() -> None:
    env = {"EDGE_AGENT_HOMEASSISTANT_DISCOVERY": "yes", "EDGE_AGENT_DEVICE_ID": "y"}
    config = parse_config("", env=env)
    assert config.homeassistant.discovery is True
    assert config.device.id == "y"  # a string key keeps the text
    (problem,) = problems("", env={"EDGE_AGENT_PRIVACY_SNAPSHOTS": "maybe"})
    assert problem == (
        "EDGE_AGENT_PRIVACY_SNAPSHOTS: privacy.snapshots: 'maybe' is not true or false (or "
        "yes/no, on/off, 1/0)"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # a pattern matches the whole value: "$" alone would let a final newline through
        ('device: {id: "pi-01\\n"}', f"config.yaml:1: device.id: must be {NAME_RULE}"),
        ('model: {name: "m\\n"}', f"config.yaml:1: model.name: must be {NAME_RULE}, at most 128"),
        ("device: {id: groups}", "config.yaml:1: device.id: 'groups' is reserved"),
        ("device: {groups: [ok, a/b]}", "config.yaml:1: device.groups[1]: group name 'a/b'"),
        ("source: {type: mjpeg, url: 'ftp://x'}", "config.yaml:1: source.url: must start with"),
        ("source: {type: tv}", "config.yaml:1: source.type: unknown type 'tv'; one of camera"),
        ("source: {type: udp, width: 3}", "config.yaml:1: source.width: unknown key"),
        ("metrics: {listen: 'localhost:9'}", "config.yaml:1: metrics.listen: 'localhost:9' is not"),
        ('device: {id: "\\ud800"}', "config.yaml:1: device.id: text that is not valid Unicode"),
        ('results: {publish: "\\ud800"}', "config.yaml:1: results.publish: text that is not valid"),
        ("store: {dir: [a]}", "config.yaml:1: store.dir: Expected a path, got `list`"),
        ("store: 3", "config.yaml:1: store: Expected `object`, got `int`"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key(text: str, expected: str) -> None:
    (problem,) = problems(text)
    assert problem.startswith(expected), problem


def test_one_problem_per_section_is_reported_at_once() -> None:
    found = problems("store: {keep: 0}\nmqtt: {keepalive_s: 1}\nbogus: 1\n")
    assert found == [
        "config.yaml:3: bogus: unknown key",
        "config.yaml:1: store.keep: Expected `int` >= 1",
        "config.yaml:2: mqtt.keepalive_s: Expected `int` >= 5",
    ]


def test_the_device_side_does_not_import_pydantic() -> None:
    # pydantic's compiled schemas cost a small board ~100 ms and ~20 MB (issue 19):
    # the config, manifests, control replies and contract are msgspec or plain types.
    modules = "agent.service, agent.cli, agent.local, agent.manifest, agent.pull, agent.contract"
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if 'pydantic' in m))"
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert run.stdout == "[]\n"


# What pydantic's lax mode took before issue 19 (an EnvironmentFile written then must still
# start the agent): text stripped, then read by the key's type as int()/float() read it.
@pytest.mark.parametrize(
    ("var", "raw", "section", "key", "value"),
    [
        ("RUNTIME_THREADS", " 4", "runtime", "threads", 4),
        ("RUNTIME_THREADS", "auto\n", "runtime", "threads", "auto"),
        ("REGISTRY_TIMEOUT_S", "30 ", "registry", "timeout_s", 30.0),
        ("STORE_KEEP", "3\n", "store", "keep", 3),
        ("STORE_KEEP", "+3", "store", "keep", 3),
        ("STORE_KEEP", "05", "store", "keep", 5),
        ("STORE_KEEP", "3.0", "store", "keep", 3),
        ("STORE_KEEP", "1_000", "store", "keep", 1000),
        ("RESULTS_MIN_SCORE", ".5", "results", "min_score", 0.5),
        ("RESULTS_MIN_SCORE", "1.", "results", "min_score", 1.0),
        ("RESULTS_MIN_SCORE", "+0.5\r\n", "results", "min_score", 0.5),
        ("REGISTRY_POLL_INTERVAL_S", "1e3", "registry", "poll_interval_s", 1000.0),
        ("RESULTS_QOS", " 0", "results", "qos", 0),
        ("PRIVACY_SNAPSHOTS", " Yes\n", "privacy", "snapshots", True),
        ("PRIVACY_SNAPSHOTS", "off", "privacy", "snapshots", False),
        ("RUNTIME_ACCELERATOR", "cpu\n", "runtime", "accelerator", "cpu"),
        ("DEVICE_ID", "0123", "device", "id", "0123"),
    ],
)
def test_environment_values_are_read_as_before(
    var: str, raw: str, section: str, key: str, value: object
) -> None:
    config = parse_config("", env={f"EDGE_AGENT_{var}": raw})
    got = getattr(getattr(config, section), key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    ("var", "raw", "expected"),
    [
        ("STORE_KEEP", "3.5", "store.keep: '3.5' is not a whole number"),
        ("STORE_KEEP", "0x10", "store.keep: '0x10' is not a whole number"),
        ("STORE_KEEP", "\u0663", "store.keep: '\u0663' is not a whole number"),
        ("STORE_KEEP", "1e3", "store.keep: '1e3' is not a whole number"),
        ("STORE_KEEP", "", "store.keep: '' is not a whole number"),
        ("REGISTRY_TIMEOUT_S", "ten", "registry.timeout_s: 'ten' is not a number"),
        ("RUNTIME_THREADS", "many", "runtime.threads: 'many' is not auto or a whole number 1..64"),
        ("RUNTIME_THREADS", "0", "runtime.threads: must be auto or a whole number 1..64"),
        ("RESULTS_QOS", "2", "results.qos: Invalid enum value 2; one of 0, 1"),
        ("PRIVACY_SNAPSHOTS", "2", "privacy.snapshots: '2' is not true or false (or yes/no, "),
        ("RUNTIME_ACCELERATOR", "tpu", "runtime.accelerator: Invalid enum value 'tpu'; one of"),
    ],
)
def test_an_unreadable_environment_value_names_the_variable_the_key_and_what_it_takes(
    var: str, raw: str, expected: str
) -> None:
    (problem,) = problems("", env={f"EDGE_AGENT_{var}": raw})
    assert problem.startswith(f"EDGE_AGENT_{var}: {expected}"), problem
    assert "Expected `int`, got `str`" not in problem and problem.isprintable()


# pydantic (lax) took a quoted number or boolean in the file and a whole float for a whole
# number: still taken. It took a YAML true for 1 too: that is refused now (a mistake).
@pytest.mark.parametrize(
    ("text", "section", "key", "value"),
    [
        ('store: {keep: "3"}', "store", "keep", 3),
        ('store: {keep: " 3"}', "store", "keep", 3),
        ('store: {reserve_mb: ".5"}', "store", "reserve_mb", 0.5),
        ('privacy: {snapshots: "yes"}', "privacy", "snapshots", True),
        ('privacy: {snapshots: "off"}', "privacy", "snapshots", False),
        ("privacy: {snapshots: 1}", "privacy", "snapshots", True),
        ("runtime: {threads: 2.0}", "runtime", "threads", 2),
        ("results: {qos: 1.0}", "results", "qos", 1),
        ('source: {type: camera, width: "640"}', "source", "width", 640),
    ],
)
def test_quoted_numbers_and_booleans_in_the_file_are_taken_as_before(
    text: str, section: str, key: str, value: object
) -> None:
    got = getattr(getattr(parse_config(text, env={}), section), key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("results: {qos: true}", "config.yaml:1: results.qos: true is not "),
        ("store: {keep: false}", "config.yaml:1: store.keep: false is not a whole number"),
        ("runtime: {threads: true}", "config.yaml:1: runtime.threads: true is not auto or "),
    ],
)
def test_a_boolean_where_a_number_belongs_is_refused(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text + "\n")
    [line] = info.value.problems
    assert line.startswith(problem), line


def test_every_wrong_key_of_a_section_is_reported() -> None:
    found = problems("store: {keep: 0, reserve_mb: -1, dir: 5}\nmqtt: {keepalive_s: x}\n")
    assert found == [
        "config.yaml:1: store.keep: Expected `int` >= 1",
        "config.yaml:1: store.reserve_mb: Expected `float` >= 0.0",
        "config.yaml:1: store.dir: Expected a path, got `int`",
        "config.yaml:2: mqtt.keepalive_s: 'x' is not a whole number",
    ]


def test_a_missing_required_key_is_named_by_its_path() -> None:
    assert problems("source: {type: video}") == ["config.yaml:1: source.path: required"]
    assert problems("source:\n  type: mjpeg\n  fps: 2\n") == ["config.yaml:1: source.url: required"]


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ('store: {dir: "/tmp/s\\ud800"}', {}, "config.yaml:1: store.dir"),
        ('mqtt: {url: "mqtt://h\\ud800"}', {}, "config.yaml:1: mqtt.url"),
        ('device: {groups: [a, "\\udc80"]}', {}, "config.yaml:1: device.groups[1]"),
        ('device:\n  "\\ud800": 1\n', {}, "config.yaml:1: device"),
        ("", {"EDGE_AGENT_STORE_DIR": "/tmp/\udcff"}, "EDGE_AGENT_STORE_DIR: store.dir"),
    ],
)
def test_text_that_is_not_unicode_is_refused_at_load(
    text: str, env: dict[str, str], expected: str
) -> None:
    # a lone surrogate passed validation and failed later, as an "internal error"
    (problem,) = problems(text, env)
    assert problem == f"{expected}: text that is not valid Unicode"
