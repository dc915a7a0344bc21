"""Logs an operator can read: levels, formats, events as key=value, rate limits, and the
runtime's own stderr lines kept off the terminal (``agent.logs``,
``agent.runtime.native_stderr``), in-process and through ``edge-agent`` subprocesses."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent import logs, modelgen
from agent.runtime import native_stderr

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
RUNTIME_LINE = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
NO_LEVEL = "not a log level; use one of debug, info, warning, error"


# -- level and format: option, environment, default ------------------------------------


@pytest.mark.parametrize(
    ("option", "env", "default", "expected"),
    [
        (None, {}, "info", logging.INFO),
        (None, {}, "warning", logging.WARNING),
        (None, {"EDGE_AGENT_LOG_LEVEL": "debug"}, "warning", logging.DEBUG),
        (None, {"EDGE_AGENT_LOG_LEVEL": " ERROR "}, "info", logging.ERROR),
        (None, {"EDGE_AGENT_LOG_LEVEL": ""}, "info", logging.INFO),  # empty: not set
        ("error", {"EDGE_AGENT_LOG_LEVEL": "debug"}, "info", logging.ERROR),  # option wins
        ("warning", {"EDGE_AGENT_LOG_LEVEL": "verbose"}, "info", logging.WARNING),
        (None, {"EDGE_AGENT_LOG": "DEBUG"}, "info", logging.DEBUG),  # the deprecated name
        (None, {"EDGE_AGENT_LOG": "debug", "EDGE_AGENT_LOG_LEVEL": "error"}, "info", 40),
    ],
)
def test_level_comes_from_option_then_environment_then_default(
    option: str | None, env: dict[str, str], default: str, expected: int
) -> None:
    assert logs.resolve_level(option, env, default) == expected


@pytest.mark.parametrize(
    ("option", "env", "message"),
    [
        (None, {"EDGE_AGENT_LOG_LEVEL": "verbose"}, f"EDGE_AGENT_LOG_LEVEL=verbose: {NO_LEVEL}"),
        (None, {"EDGE_AGENT_LOG_LEVEL": "5"}, f"EDGE_AGENT_LOG_LEVEL=5: {NO_LEVEL}"),
        (None, {"EDGE_AGENT_LOG_LEVEL": "a\nb"}, f"EDGE_AGENT_LOG_LEVEL=a\\nb: {NO_LEVEL}"),
        (None, {"EDGE_AGENT_LOG": "verbose"}, f"EDGE_AGENT_LOG=verbose: {NO_LEVEL}"),
        ("loud", {}, f"--log-level=loud: {NO_LEVEL}"),
    ],
)
def test_a_level_that_is_no_choice_is_one_line_naming_where_and_the_choices(
    option: str | None, env: dict[str, str], message: str
) -> None:
    with pytest.raises(logs.LogSettingError) as error:
        logs.resolve_level(option, env, "info")
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("option", "env", "expected"),
    [
        (None, {}, "text"),
        (None, {"EDGE_AGENT_LOG_FORMAT": "JSON"}, "json"),
        ("text", {"EDGE_AGENT_LOG_FORMAT": "json"}, "text"),
    ],
)
def test_format_comes_from_option_then_environment(
    option: str | None, env: dict[str, str], expected: str
) -> None:
    assert logs.resolve_format(option, env) == expected


def test_a_format_that_is_no_choice_names_the_variable() -> None:
    with pytest.raises(logs.LogSettingError, match=r"^EDGE_AGENT_LOG_FORMAT=xml: not a log"):
        logs.resolve_format(None, {"EDGE_AGENT_LOG_FORMAT": "xml"})


def test_the_light_settings_module_has_loggings_numbers() -> None:
    """agent.logsettings (loaded without logging, for check-config) repeats the levels."""
    assert logs.LEVELS == {
        "debug": logging.DEBUG,
        "info": logging.INFO,
        "warning": logging.WARNING,
        "error": logging.ERROR,
    }


# -- journald ------------------------------------------------------------------------------


def test_journald_is_recognised_only_when_journal_stream_names_our_stream(
    tmp_path: Path,
) -> None:
    with (tmp_path / "err").open("w") as stream, (tmp_path / "other").open("w") as other:
        own = os.fstat(stream.fileno())
        theirs = os.fstat(other.fileno())
        assert logs.under_journald(stream, {"JOURNAL_STREAM": f"{own.st_dev}:{own.st_ino}"})
        # inherited by a child whose stderr goes elsewhere: not the journal
        assert not logs.under_journald(
            stream, {"JOURNAL_STREAM": f"{theirs.st_dev}:{theirs.st_ino}"}
        )
        assert not logs.under_journald(stream, {})
        assert not logs.under_journald(stream, {"JOURNAL_STREAM": "junk"})
    assert not logs.under_journald(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


# -- events as key=value -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("colours", "colours"),
        ("two words", '"two words"'),
        ("", '""'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("back\\slash", '"back\\\\slash"'),
        ("line\nbreak", '"line\\nbreak"'),
        ("bell\x07", '"bell\\x07"'),
        ("esc\x1b[31mred", '"esc\\x1b[31mred"'),
        ("rtl\u202eevil", '"rtl\\u202eevil"'),
        ("tag\U000e0041", '"tag\\U000e0041"'),
        ("ünïcode", "ünïcode"),
        (None, "null"),
        (True, "true"),
        (False, "false"),
        (42, "42"),
        (12.34567, "12.346"),
        (0.000123456, "0.000123"),
        (1764480000.123456, "1764480000.123"),
        (0.0, "0.0"),
        (float("nan"), "nan"),
        ([1, 2], "[1,2]"),
        ({"a": "b c"}, '"{\\"a\\":\\"b c\\"}"'),
    ],
)
def test_values_are_bare_when_they_can_be_else_quoted_and_escaped(value: object, text: str) -> None:
    assert logs.format_value(value) == text


def test_an_event_reads_name_then_key_value_pairs_in_order() -> None:
    line = logs.kv(
        "source_lost", {"source": "mjpeg", "error": "connection refused", "down_s": 1.23456}
    )
    assert line == 'source_lost source=mjpeg error="connection refused" down_s=1.235'
    assert logs.kv("odd name", {"bad key=": 1}) == "odd_name bad_key_=1"


# -- formatters --------------------------------------------------------------------------


def _record(
    level: int, msg: object, *args: object, name: str = "agent.mqtt", **extra: object
) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, args or None, None)
    record.__dict__.update(extra)
    return record


def test_text_lines_carry_a_timestamp_outside_the_journal() -> None:
    text = logs.TextFormatter().format(_record(logging.WARNING, "cannot connect to %s", "x"))
    assert re.fullmatch(rf"{STAMP} WARNING agent\.mqtt: cannot connect to x", text), text


def test_journal_lines_carry_the_syslog_priority_and_no_timestamp() -> None:
    formatter = logs.TextFormatter(journald=True)
    assert formatter.format(_record(logging.WARNING, "w")) == "<4>WARNING agent.mqtt: w"
    assert formatter.format(_record(logging.ERROR, "e")) == "<3>ERROR agent.mqtt: e"
    assert formatter.format(_record(logging.INFO, "i")) == "<6>INFO agent.mqtt: i"
    assert formatter.format(_record(logging.DEBUG, "d")) == "<7>DEBUG agent.mqtt: d"
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record(logging.ERROR, "failed")
        record.exc_info = sys.exc_info()
    lines = formatter.format(record).splitlines()
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)  # per line


def test_text_escapes_control_characters_from_the_network_and_shows_events_as_kv() -> None:
    formatter = logs.TextFormatter(journald=True)
    forged = formatter.format(_record(logging.ERROR, "%s: ignored", "edge/x\x1b[2J\r<0>fake"))
    assert forged == "<3>ERROR agent.mqtt: edge/x\\x1b[2J\\r<0>fake: ignored"
    event = logs.Event("model_swapped", {"model": "colours", "version": 2})
    assert formatter.format(_record(logging.INFO, event, name="agent.pipeline")) == (
        "<6>INFO agent.pipeline: model_swapped model=colours version=2"
    )


def test_json_lines_carry_the_event_fields_and_the_suppressed_count() -> None:
    event = logs.Event("source_lost", {"source": "mjpeg", "msg": "clash", "down_s": 1.5})
    doc = json.loads(logs.JsonFormatter().format(_record(logging.INFO, event, suppressed=3)))
    assert doc["level"] == "info" and doc["logger"] == "agent.mqtt"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["ts"])
    assert doc["msg"] == "source_lost source=mjpeg msg=clash down_s=1.5"
    assert doc["event"] == "source_lost" and doc["source"] == "mjpeg" and doc["down_s"] == 1.5
    assert doc["msg_"] == "clash"  # a field never overwrites the line's own keys
    assert doc["suppressed"] == 3


# -- rate limiting -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "now", "expected"),
    [
        (None, 0.0, (True, 0, logs.Window(0.0))),
        (logs.Window(0.0), 30.0, (False, 0, logs.Window(0.0, 1))),
        (logs.Window(0.0, 5), 59.9, (False, 0, logs.Window(0.0, 6))),
        (logs.Window(0.0, 6), 60.0, (True, 6, logs.Window(60.0))),
        (logs.Window(0.0), 61.0, (True, 0, logs.Window(61.0))),
    ],
)
def test_admit_lets_the_first_through_then_one_per_interval_with_the_count(
    window: logs.Window | None, now: float, expected: tuple[bool, int, logs.Window]
) -> None:
    assert logs.admit(window, now, 60.0) == expected


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def limited() -> Iterator[tuple[logging.Logger, io.StringIO, FakeClock]]:
    clock = FakeClock()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s%(suppressed_note)s"))
    handler.addFilter(logs.RateLimit(interval_s=60.0, clock=clock))

    class Note(logging.Filter):  # after the limit: shows what it set
        def filter(self, record: logging.LogRecord) -> bool:
            count = getattr(record, "suppressed", 0)
            record.suppressed_note = f" ({count} suppressed)" if count else ""
            return True

    handler.addFilter(Note())
    logger = logging.getLogger("test.ratelimit")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield logger, out, clock
    finally:
        logger.removeHandler(handler)


def test_repeated_warnings_are_held_back_by_template_not_text(
    limited: tuple[logging.Logger, io.StringIO, FakeClock],
) -> None:
    logger, out, clock = limited
    steps: list[tuple[float, int, str, tuple[object, ...]]] = [
        (0, logging.WARNING, "frame %d does not fit", (1,)),  # first: out
        (1, logging.WARNING, "frame %d does not fit", (2,)),  # same template: held
        (2, logging.WARNING, "frame %d does not fit", (3,)),  # held
        (3, logging.WARNING, "inference failed on %d", (3,)),  # another template: out
        (4, logging.INFO, "frame %d does not fit", (4,)),  # info is never limited
        (5, logging.ERROR, "frame %d does not fit", (5,)),  # another level: out
        (6, logging.WARNING, "%s", ("disk full",)),  # only placeholders: keyed on text
        (7, logging.WARNING, "%s", ("camera gone",)),  # out
        (8, logging.WARNING, "%s", ("disk full",)),  # held
        (61, logging.WARNING, "frame %d does not fit", (6,)),  # a minute on: out, count
        (62, logging.WARNING, "frame %d does not fit", (7,)),  # held again
    ]
    for at, level, msg, args in steps:
        clock.now = 1000.0 + at
        logger.log(level, msg, *args)
    assert out.getvalue().splitlines() == [
        "WARNING frame 1 does not fit",
        "WARNING inference failed on 3",
        "INFO frame 4 does not fit",
        "ERROR frame 5 does not fit",
        "WARNING disk full",
        "WARNING camera gone",
        "WARNING frame 6 does not fit (2 suppressed)",
    ]


def test_a_repeat_key_tells_reasons_apart_under_one_template(
    limited: tuple[logging.Logger, io.StringIO, FakeClock],
) -> None:
    logger, out, _ = limited
    for why in ("refused", "refused", "DNS", "refused", "DNS"):
        logger.warning("cannot connect: %s", why, extra={"repeat_key": why})
    assert out.getvalue().splitlines() == [
        "WARNING cannot connect: refused",
        "WARNING cannot connect: DNS",
    ]


# -- the runtime's stderr -----------------------------------------------------------------


def test_native_stderr_lines_are_logged_info_at_debug_and_errors_at_warning(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG, "agent.runtime")
    with native_stderr.captured():
        os.write(2, f"{RUNTIME_LINE}\nERROR: something real\n".encode())
    assert capfd.readouterr().err == ""  # nothing reached fd 2
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.DEBUG, RUNTIME_LINE),
        (logging.WARNING, "ERROR: something real"),
    ]
    os.write(2, b"after\n")  # fd 2 is back
    assert capfd.readouterr().err == "after\n"


def test_native_stderr_is_forwarded_when_the_body_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(RuntimeError), native_stderr.captured():
        os.write(2, b"ERROR: Encountered unresolved custom op\n")
        raise RuntimeError("allocate failed")
    assert "ERROR: Encountered unresolved custom op" in caplog.text


# -- through edge-agent -------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import cv2

    root = tmp_path_factory.mktemp("logs")
    model = root / "colours.tflite"
    model.write_bytes(modelgen.colour_classifier())
    image = root / "red.png"
    red = np.zeros((40, 40, 3), np.uint8)
    red[..., 2] = 255
    cv2.imwrite(str(image), red)
    return model, image


def edge_agent(
    *args: str, env: dict[str, str] | None = None, stderr: int | None = subprocess.PIPE
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    clean.pop("JOURNAL_STREAM", None)
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**clean, **(env or {})},
        timeout=120,
    )


def test_the_runtime_banner_stays_off_stderr_unless_debugging(
    model_and_image: tuple[Path, Path],
) -> None:
    model, image = model_and_image
    quiet = edge_agent("infer", "--model", str(model), str(image))
    assert quiet.returncode == 0, quiet.stderr
    assert "red.png" in quiet.stdout
    assert "INFO: Created TensorFlow Lite" not in quiet.stderr
    assert quiet.stderr == ""
    loud = edge_agent("infer", "--model", str(model), str(image), "--log-level", "debug")
    assert loud.returncode == 0, loud.stderr
    shown = [line for line in loud.stderr.splitlines() if RUNTIME_LINE in line]
    assert shown and re.fullmatch(rf"{STAMP} DEBUG agent\.runtime: {RUNTIME_LINE}", shown[0])
    from_env = edge_agent(
        "infer", "--model", str(model), str(image), env={"EDGE_AGENT_LOG_LEVEL": "DEBUG"}
    )
    assert RUNTIME_LINE in from_env.stderr


def test_json_log_lines_from_the_command_line(model_and_image: tuple[Path, Path]) -> None:
    model, image = model_and_image
    done = edge_agent(
        "infer", "--model", str(model), str(image), "--log-level=debug", "--log-format=json"
    )
    assert done.returncode == 0, done.stderr
    docs = [json.loads(line) for line in done.stderr.splitlines()]
    assert {"ts", "level", "logger", "msg"} <= set(docs[0])
    assert any(d["msg"] == RUNTIME_LINE and d["level"] == "debug" for d in docs)


def test_under_journald_lines_have_priorities_and_no_timestamp(
    model_and_image: tuple[Path, Path], tmp_path: Path
) -> None:
    model, image = model_and_image
    err = tmp_path / "stderr"
    with err.open("w") as stream:
        st = os.fstat(stream.fileno())
        done = edge_agent(
            "infer",
            "--model",
            str(model),
            str(image),
            "--log-level=debug",
            env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            stderr=stream.fileno(),
        )
    assert done.returncode == 0
    assert f"<7>DEBUG agent.runtime: {RUNTIME_LINE}" in err.read_text().splitlines()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"EDGE_AGENT_LOG_LEVEL": "verbose"},
            f"edge-agent: EDGE_AGENT_LOG_LEVEL=verbose: {NO_LEVEL}",
        ),
        ({"EDGE_AGENT_LOG": "verbose"}, f"edge-agent: EDGE_AGENT_LOG=verbose: {NO_LEVEL}"),
        (
            {"EDGE_AGENT_LOG_FORMAT": "xml"},
            "edge-agent: EDGE_AGENT_LOG_FORMAT=xml: not a log format; use one of text, json",
        ),
    ],
)
def test_a_bad_log_variable_is_one_line_and_exit_2(
    env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    done = edge_agent("check-config", "--config", str(tmp_path / "none.yaml"), env=env)
    assert done.returncode == 2
    assert done.stderr.strip() == expected


def test_a_bad_log_option_is_a_usage_error() -> None:
    done = edge_agent("demo", "--log-level", "verbose")
    assert done.returncode == 2
    assert "--log-level: invalid choice: 'verbose'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("level", "shown"), [("warning", False), ("debug", True)])
def test_opencv_warnings_stay_off_stderr_unless_debugging(level: str, shown: bool) -> None:
    script = (
        "import sys\n"
        "from agent import logs\n"
        f"logs.setup({level!r}, None, sys.stderr)\n"
        "import cv2\n"  # imported after setup, as every source does
        "assert cv2.imread('/nonexistent/frame.png') is None\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_LOG_LEVEL"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert ("[ WARN" in done.stderr) is shown, done.stderr


def test_the_recent_lines_are_kept_by_an_agent_only() -> None:
    """The in-memory ring (the `logs` command) is set up for `run` and `demo`; a command
    line that answers and ends keeps none, and loads neither the ring nor the redactor."""
    script = (
        "import logging, sys\n"
        "from agent import logs\n"
        "logs.setup('info', None, sys.stderr, ring=False)\n"
        "logging.getLogger('t').warning('one')\n"
        "assert 'agent.logring' not in sys.modules and 'agent.redact' not in sys.modules\n"
        "logs.setup('info', None, sys.stderr)\n"
        "from agent.logring import RING\n"
        "logging.getLogger('t').warning('two')\n"
        "assert RING in logging.getLogger().handlers\n"
        "print(RING.tail(10, 10_000)[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "WARNING t: two" in done.stdout and "one" not in done.stdout
    assert "WARNING t: one" in done.stderr
