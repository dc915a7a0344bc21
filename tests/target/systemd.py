"""The unit under a real systemd as PID 1: install.sh live in a booted container.

``python3 tests/target/systemd.py`` (as root, on Debian, from the checkout): boots an
overlay of a cached amd64 bookworm root filesystem with systemd as PID 1
(``systemd-nspawn -b``, private network), runs ``provisioning/install.sh`` live from a
copy of the checkout with an offline wheelhouse (``PIP_NO_INDEX``), serves a signed
registry and mosquitto on the container's loopback, and checks, one line each:

- the service reaches active (running) with READY and serves v1;
- ``systemctl reload`` applies a new config; with an invalid one it exits non-zero
  while the agent keeps serving;
- the watchdog restarts a stalled (SIGSTOPped) agent;
- an invalid config ends in status 78 with no restart loop;
- a pushed update (``edge-fleet deploy`` over mosquitto) is served under the hardened
  unit, with no EPERM / SIGSYS / "Operation not permitted" / Traceback in the journal;
- install.sh run again changes nothing (config, unit) and the service runs again;
- ``systemd-analyze security`` live: exposure at most 2.0;
- ``install.sh --uninstall`` leaves no unit, venv or udev rules; ``--purge`` no config,
  state, sysusers.d/tmpfiles.d entries or files of the user;
- ``systemctl poweroff`` ends the container; the overlay is removed.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # run as a script: make `tests.target` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.target.common import (
    REPO,
    SYSTEMD_PACKAGES,
    Checks,
    Failed,
    Overlay,
    need_root_and_tools,
    rootfs,
    say,
    wheelhouse,
)
from tests.target.nspawn import Container

SCRIPT = "systemd"
# Every manylinux tag bookworm's glibc (2.36) runs: pip download takes the --platform
# tags as they are (manylinux_2_36 alone would not match a manylinux_2_27 wheel).
PLATFORMS = ("manylinux2014_x86_64", *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 37)))
EXTRAS = ("litert", "video", "serial")  # install.sh's default extras
DEVICE = "target-01"
MODEL = "colours"
PORT = 8000
UNIT = "edge-agent.service"
ETC = "/etc/edge-agent"
FLEET = "/opt/edge-agent/venv/bin/edge-fleet"
KEYS = "/root/keys"  # the operator's signing keys (a fleet machine's, here inside)
REGISTRY = "/srv/registry"
INSTALL = (
    "cd /root/edge-agent && PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels provisioning/install.sh"
    f" --registry http://127.0.0.1:{PORT}/ --model {MODEL} --device-id {DEVICE}"
)
SHOW = "StatusText,ActiveState,SubState,NRestarts,ExecMainStatus,MainPID,Result"
FORBIDDEN = re.compile(r"EPERM|SIGSYS|Operation not permitted|Traceback")
CONFIG = """\
device: {{id: {device}}}
registry:
  url: http://127.0.0.1:{port}/
  public_key: {etc}/registry.pub
model: {{name: {model}, channel: stable}}
runtime: {{accelerator: cpu}}
source: {{type: synthetic, width: 64, height: 48, fps: 10}}
results: {{publish: every, min_score: 0.0, top_k: {top_k}}}
mqtt: {{url: "mqtt://127.0.0.1:1883"}}
telemetry: {{interval_s: {interval}}}
update: {{probation_s: 5, desired_public_key: {etc}/deploy.pub}}
{extra}"""


def config(top_k: int = 3, interval: float = 10, extra: str = "") -> str:
    return CONFIG.format(
        device=DEVICE,
        port=PORT,
        etc=ETC,
        model=MODEL,
        top_k=top_k,
        interval=interval,
        extra=extra,
    )


INVALID = config(extra="bogus_section: {unknown: 1}\n")  # unknown keys are refused: 78


def requirements() -> list[str]:
    """What install.sh's pip needs offline: the project's dependencies with the default
    extras, and setuptools for building the project from the checkout."""
    # tomllib: Python 3.11+, the host's python3 (bookworm); the project's mypy targets 3.10
    tomllib = importlib.import_module("tomllib")
    pyproject: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = pyproject["project"]
    needed = list(project["dependencies"])
    for extra in EXTRAS:
        needed += project["optional-dependencies"][extra]
    return needed + list(pyproject["build-system"]["requires"])


class Target:
    """One run: the container, and each check as a method returning its detail line."""

    def __init__(self) -> None:
        self.view: Overlay | None = None
        self.box: Container | None = None
        self.lower = Path()
        self.wheels = Path()

    # --- the machine
    def prepare(self) -> str:
        began = time.monotonic()
        self.lower = rootfs("amd64", SYSTEMD_PACKAGES)
        self.wheels = wheelhouse(PLATFORMS, requirements(), [REPO / "pyproject.toml"])
        count = len(list(self.wheels.glob("*.whl")))
        return f"{self.lower.name}, {count} wheels ({time.monotonic() - began:.0f} s)"

    def boot(self) -> str:
        self.view = Overlay(self.lower, "systemd")
        ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".*_cache", "build")
        shutil.copytree(REPO, self.view.root / "root" / "edge-agent", ignore=ignore)
        console = self.view.work / "console.log"
        self.box = Container(self.view.root, "edge-target", console, {self.wheels: "/wheels"})
        began = time.monotonic()
        state = self.box.boot(timeout=120)
        return f"{state} after {time.monotonic() - began:.0f} s"

    @property
    def c(self) -> Container:
        assert self.box is not None, "the container is not booted"
        return self.box

    def show(self) -> dict[str, str]:
        done = self.c.sh(f"systemctl show -p {SHOW} {UNIT}", timeout=30)
        return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)

    def wait_serving(
        self, version: int, timeout: float, since: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Wait until the unit is active (running), serving ``version`` with no update
        under way (a new main PID first, given ``since``)."""
        deadline = time.monotonic() + timeout
        shown: dict[str, str] = {}
        while time.monotonic() < deadline:
            shown = self.show()
            moved = since is None or shown["MainPID"] != since["MainPID"]
            if (
                moved
                and (shown["ActiveState"], shown["SubState"]) == ("active", "running")
                and re.search(rf"\b{MODEL} v{version} ", shown["StatusText"])
                and "updating" not in shown["StatusText"]
            ):
                return shown
            time.sleep(1)
        raise Failed(f"not serving v{version} within {timeout:g} s: {_brief(shown)}")

    def write_config(self, text: str) -> None:
        self.c.sh(
            f"cd {ETC} && cat > config.yaml.new && chgrp edge-agent config.yaml.new"
            " && chmod 0640 config.yaml.new && mv -f config.yaml.new config.yaml",
            timeout=30,
            input=text,
        )

    def journal(self, since: str = "") -> str:
        cursor = f"--after-cursor='{since}'" if since else ""
        return self.c.sh(f"journalctl -q -o cat -u {UNIT} {cursor}", timeout=60).stdout

    def wait_journal(self, since: str, text: str, timeout: float) -> str:
        """Wait until the unit's journal after the cursor ``since`` has ``text``."""
        deadline = time.monotonic() + timeout
        log = ""
        while time.monotonic() < deadline:
            log = self.journal(since)
            if text in log:
                return log
            time.sleep(0.5)
        raise Failed(f"no {text!r} in the journal within {timeout:g} s:\n{log[-1500:]}")

    def cursor(self) -> str:
        done = self.c.sh("journalctl -q -n 0 --show-cursor", timeout=30, check=False)
        found = re.search(r"-- cursor: (\S+)", done.stdout)
        return found.group(1) if found else ""

    # --- the checks
    def install(self) -> str:
        began = time.monotonic()
        self.c.sh(INSTALL, timeout=900)
        enabled = self.c.sh(f"systemctl is-enabled {UNIT}", timeout=30, check=False).stdout
        if enabled.strip() != "enabled":
            raise Failed(f"{UNIT} is {enabled.strip()!r} after install.sh, not enabled")
        return f"install.sh live in {time.monotonic() - began:.0f} s; {_brief(self.show())}"

    def registry(self) -> str:
        """The operator's keys, v1 published (signed, channel stable), the registry served,
        the device configured to trust it; the service restarted on that config."""
        py = "/opt/edge-agent/venv/bin/python"
        models = (
            "from agent import modelgen; from pathlib import Path; "
            "[Path(f'/root/v{v}.tflite').write_bytes(modelgen.colour_classifier(offset=1000 * v))"
            " for v in (1, 2)]; "
            "Path('/root/colours.txt').write_text('\\n'.join(modelgen.COLOUR_LABELS))"
        )
        self.c.sh(
            f'set -e; {py} -c "{models}"; {FLEET} keygen --out {KEYS}; '
            f"{FLEET} keygen --out {KEYS} --name deploy; "
            f"install -m 0644 {KEYS}/registry.pub {KEYS}/deploy.pub {ETC}/; "
            f"{FLEET} publish /root/v1.tflite --model {MODEL} --version 1 --registry {REGISTRY}"
            f" --task classification --labels /root/colours.txt --channel stable"
            f" --sign-key {KEYS}/registry.key",
            timeout=180,
        )
        self.c.sh(
            f"systemd-run --unit=edge-registry /usr/bin/python3 -m http.server {PORT}"
            f" --bind 127.0.0.1 --directory {REGISTRY}",
            timeout=30,
        )
        self.write_config(config())
        self.c.sh("systemctl is-active mosquitto || systemctl enable --now mosquitto", timeout=60)
        self.c.sh(f"systemctl restart {UNIT}", timeout=240)
        shown = self.wait_serving(1, timeout=120)
        if shown["NRestarts"] != "0":
            raise Failed(f"restarted on the way: {_brief(shown)}")
        return _brief(shown)

    def reload_applies(self) -> str:
        before = self.show()
        mark = self.cursor()
        self.write_config(config(top_k=1, interval=2))
        self.c.sh(f"systemctl reload {UNIT}", timeout=120)
        self.wait_journal(mark, "SIGHUP: reloading the configuration", timeout=30)
        shown = self.wait_serving(1, timeout=60)
        if shown["MainPID"] != before["MainPID"]:
            raise Failed(f"reload restarted the agent: {_brief(shown)}")
        status = self.c.sh(f"{_agent()} status", timeout=60).stdout
        return f"SIGHUP applied (telemetry 2 s, top_k 1); {_first(status)}"

    def reload_refuses(self) -> str:
        before = self.show()
        mark = self.cursor()
        self.write_config(INVALID)
        try:
            done = self.c.sh(f"systemctl reload {UNIT}", timeout=120, check=False)
            self.wait_journal(mark, "the new configuration is not used", timeout=30)
            shown = self.wait_serving(1, timeout=30)
        finally:
            self.write_config(config(top_k=1, interval=2))
        if shown["MainPID"] != before["MainPID"]:
            raise Failed(f"an invalid config restarted the agent: {_brief(shown)}")
        if done.returncode == 0:
            raise Failed(
                "systemctl reload exited 0 with an invalid config (the agent rejected it, "
                "serving on): ExecReload does not wait for the agent's answer"
            )
        return f"systemctl reload exit {done.returncode}; still serving: {shown['StatusText']}"

    def watchdog(self) -> str:
        before = self.show()
        began = time.monotonic()
        self.c.sh(f"kill -STOP {before['MainPID']}", timeout=30)
        shown = self.wait_serving(1, timeout=90, since=before)
        if int(shown["NRestarts"]) <= int(before["NRestarts"]):
            raise Failed(f"a new agent without a restart by systemd: {_brief(shown)}")
        took = time.monotonic() - began
        pids = f"pid {before['MainPID']} -> {shown['MainPID']}"
        return f"{pids}, NRestarts {shown['NRestarts']}, {took:.0f} s"

    def no_restart_loop(self) -> str:
        self.write_config(INVALID)
        try:
            self.c.sh(f"systemctl restart {UNIT}", timeout=240, check=False)
            failed = self._wait_failed(timeout=60)
            time.sleep(15)
            later = self.show()
        finally:
            self.write_config(config(top_k=1, interval=2))
        if later["NRestarts"] != failed["NRestarts"] or later["ActiveState"] != "failed":
            raise Failed(f"restarted after exit 78: {_brief(failed)} -> {_brief(later)}")
        self.c.sh(f"systemctl restart {UNIT}", timeout=240)
        self.wait_serving(1, timeout=120)
        return f"failed, status 78, NRestarts {later['NRestarts']} over 15 s; fixed: serving again"

    def _wait_failed(self, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        shown: dict[str, str] = {}
        while time.monotonic() < deadline:
            shown = self.show()
            if shown["ActiveState"] == "failed" and shown["ExecMainStatus"] == "78":
                return shown
            time.sleep(1)
        raise Failed(f"not failed with status 78 within {timeout:g} s: {_brief(shown)}")

    def pushed_update(self) -> str:
        self.c.sh(
            f"{FLEET} publish /root/v2.tflite --model {MODEL} --version 2 --registry {REGISTRY}"
            f" --task classification --labels /root/colours.txt --sign-key {KEYS}/registry.key",
            timeout=180,
        )
        began = time.monotonic()
        self.c.sh(
            f"{FLEET} deploy --broker mqtt://127.0.0.1:1883 --device {DEVICE} --model {MODEL}"
            f" --version 2 --sign-key {KEYS}/deploy.key --wait 120",
            timeout=180,
        )
        shown = self.wait_serving(2, timeout=60)
        bad = [line for line in self.journal().splitlines() if FORBIDDEN.search(line)]
        if bad:
            raise Failed(f"the journal has {len(bad)} refused-call/traceback lines: {bad[:3]}")
        return (
            f"deploy v2 in {time.monotonic() - began:.0f} s, journal clean; {shown['StatusText']}"
        )

    def reinstall(self) -> str:
        files = f"{ETC}/config.yaml /etc/systemd/system/{UNIT}"
        before = self.c.sh(f"sha256sum {files}", timeout=30).stdout
        pid = self.show()["MainPID"]
        self.c.sh(INSTALL, timeout=900)
        after = self.c.sh(f"sha256sum {files}", timeout=30).stdout
        if before != after:
            raise Failed(f"install.sh changed files:\n{before}->\n{after}")
        shipped = self.c.sh(
            f"cmp /root/edge-agent/systemd/{UNIT} /etc/systemd/system/{UNIT}",
            timeout=30,
            check=False,
        )
        if shipped.returncode != 0:
            raise Failed("the installed unit differs from systemd/edge-agent.service")
        shown = self.wait_serving(2, timeout=120, since={"MainPID": pid})
        return f"config and unit unchanged, restarted: {shown['StatusText']}"

    def security(self) -> str:
        done = self.c.sh(f"systemd-analyze security {UNIT}", timeout=60, check=False)
        found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
        if not found:
            raise Failed(f"no exposure level in systemd-analyze's output: {done.stdout[-300:]}")
        if float(found.group(1)) > 2.0:
            raise Failed(f"exposure {found.group(1)} > 2.0 live")
        return f"exposure {found.group(1)} live"

    def uninstall(self) -> str:
        self.c.sh("cd /root/edge-agent && provisioning/install.sh --uninstall", timeout=120)
        gone = (
            f"/etc/systemd/system/{UNIT}",
            f"/etc/systemd/system/multi-user.target.wants/{UNIT}",
            "/opt/edge-agent",
            "/etc/udev/rules.d/65-edge-agent.rules",
        )
        kept = (f"{ETC}/config.yaml", "/var/lib/edge-agent")
        self._absent(gone)
        missing = self.c.sh(f"for p in {' '.join(kept)}; do [ -e $p ] || echo $p; done", timeout=30)
        if missing.stdout.strip():
            raise Failed(f"--uninstall removed what it keeps: {missing.stdout.split()}")
        known = self.c.sh(f"systemctl list-unit-files {UNIT}", timeout=30, check=False).stdout
        if UNIT in known:
            raise Failed(f"systemd still knows {UNIT} after --uninstall")
        self.c.sh("cd /root/edge-agent && provisioning/install.sh --uninstall --purge", timeout=120)
        self._absent(
            (
                ETC,
                "/var/lib/edge-agent",
                "/etc/sysusers.d/edge-agent.conf",
                "/etc/tmpfiles.d/edge-agent.conf",
            )
        )
        owned = self.c.sh(
            "find / -xdev \\( -path /proc -o -path /sys -o -path /wheels \\) -prune"
            " -o -user edge-agent -print",
            timeout=120,
            check=False,
        ).stdout.split()
        if owned:
            raise Failed(f"files of user edge-agent left: {owned[:5]}")
        return "no unit, venv, udev rules; with --purge no config, state, sysusers/tmpfiles"

    def _absent(self, paths: tuple[str, ...]) -> None:
        left = self.c.sh(f"for p in {' '.join(paths)}; do [ ! -e $p ] || echo $p; done", timeout=30)
        if left.stdout.strip():
            raise Failed(f"left behind: {left.stdout.split()}")

    def poweroff(self) -> str:
        took = self.c.poweroff(timeout=90)
        assert self.view is not None
        work = self.view.work
        self.view.close()
        self.view = None
        if work.exists():
            raise Failed(f"overlay work folder left: {work}")
        return f"nspawn ended {took:.0f} s after poweroff; overlay removed"

    # --- the end, whatever happened
    def report(self) -> None:
        """After a failure: the service's state and journal, and the console's tail."""
        if self.box is not None:
            with contextlib.suppress(Failed):
                for command in (
                    f"systemctl status --no-pager {UNIT}",
                    f"journalctl -u {UNIT} -n 40 --no-pager",
                    "systemctl --failed --no-pager; systemctl status --no-pager mosquitto",
                ):
                    print(self.box.sh(command, timeout=30, check=False).stdout, file=sys.stderr)
        if self.view is not None:
            console = self.view.work / "console.log"
            if console.exists():
                tail = console.read_text(errors="replace").splitlines()[-40:]
                print("--- console ---", *tail, sep="\n", file=sys.stderr)

    def close(self) -> None:
        if self.box is not None:
            self.box.close()
        if self.view is not None:
            self.view.close()


def _agent() -> str:
    return "/opt/edge-agent/venv/bin/edge-agent"


def _brief(shown: dict[str, str]) -> str:
    keys = ("ActiveState", "SubState", "NRestarts", "ExecMainStatus", "StatusText")
    return ", ".join(f"{k}={shown.get(k, '?')}" for k in keys)


def _first(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no status)"


@contextlib.contextmanager
def _interruptible() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C: the clean-up below runs either way."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> int:
    need_root_and_tools(
        {
            "systemd-nspawn": "systemd-container",
            "nsenter": "util-linux",
            "debootstrap": "debootstrap",
        }
    )
    checks = Checks(SCRIPT)
    target = Target()
    steps: list[tuple[str, Callable[[], str]]] = [
        ("cache: root filesystem and wheelhouse", target.prepare),
        ("boot: systemd as PID 1", target.boot),
        ("install.sh live", target.install),
        ("active (running) with READY, serving v1", target.registry),
        ("systemctl reload applies a new config", target.reload_applies),
        ("systemctl reload refuses an invalid config, non-zero", target.reload_refuses),
        ("watchdog restarts a stalled agent", target.watchdog),
        ("invalid config: status 78, no restart loop", target.no_restart_loop),
        ("pushed update served under the hardened unit", target.pushed_update),
        ("install.sh again is idempotent", target.reinstall),
        ("systemd-analyze security <= 2.0 live", target.security),
        ("install.sh --uninstall [--purge]", target.uninstall),
        ("poweroff", target.poweroff),
    ]
    try:
        with _interruptible():
            for name, step in steps:
                checks.check(name, step)
            if checks.failed is not None:
                target.report()
    except KeyboardInterrupt:
        say(SCRIPT, "interrupted: stopping the container")
        checks.failed = checks.failed or "interrupted"
    finally:
        target.close()
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())
