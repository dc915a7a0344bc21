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
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `tests.target` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.target.common import (
    REPO,
    SYSTEMD_PACKAGES,
    Checks,
    Failed,
    Overlay,
    bookworm_wheel_tags,
    need_root_and_tools,
    rootfs,
    say,
    wheelhouse,
)
from tests.target.nspawn import Container, Unit, sigterm_interrupts

SCRIPT = "systemd"
PLATFORMS = bookworm_wheel_tags("x86_64")
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
DROPINS = ("sysusers", "tmpfiles")
SHOW = "StatusText,ActiveState,SubState,NRestarts,ExecMainStatus,MainPID,Result"
FORBIDDEN = re.compile(r"EPERM|SIGSYS|Operation not permitted|Traceback")


def config(top_k: int = 3, interval: float = 10) -> str:
    """The device's config: the registry and broker inside, a synthetic stream."""
    return f"""\
device: {{id: {DEVICE}}}
registry: {{url: "http://127.0.0.1:{PORT}/", public_key: {ETC}/registry.pub}}
model: {{name: {MODEL}, channel: stable}}
runtime: {{accelerator: cpu}}
source: {{type: synthetic, width: 64, height: 48, fps: 10}}
results: {{publish: every, min_score: 0.0, top_k: {top_k}}}
mqtt: {{url: "mqtt://127.0.0.1:1883"}}
telemetry: {{interval_s: {interval}}}
update: {{probation_s: 5, desired_public_key: {ETC}/deploy.pub}}
"""


INVALID = config() + "bogus_section: {unknown: 1}\n"  # unknown keys are refused: exit 78


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

    @property
    def unit(self) -> Unit:
        return Unit(self.c, UNIT)

    def show(self) -> dict[str, str]:
        return self.unit.show(SHOW)

    def wait_serving(
        self, version: int, timeout: float, since: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Wait until the unit is active (running), serving ``version`` with no update
        under way (a new main PID first, given ``since``)."""

        def serving(shown: dict[str, str]) -> bool:
            return (
                (since is None or shown["MainPID"] != since["MainPID"])
                and (shown["ActiveState"], shown["SubState"]) == ("active", "running")
                and re.search(rf"\b{MODEL} v{version} ", shown["StatusText"]) is not None
                and "updating" not in shown["StatusText"]
            )

        return self.unit.wait(SHOW, serving, timeout, f"serving v{version}")

    def write_config(self, text: str) -> None:
        self.c.sh(
            f"cd {ETC} && cat > config.yaml.new && chgrp edge-agent config.yaml.new"
            " && chmod 0640 config.yaml.new && mv -f config.yaml.new config.yaml",
            timeout=30,
            input=text,
        )

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
        mark = self.unit.cursor()
        self.write_config(config(top_k=1, interval=2))
        self.c.sh(f"systemctl reload {UNIT}", timeout=120)
        # systemctl reload returned after the agent's answer: status says so at once.
        shown_json = self.c.sh("/opt/edge-agent/venv/bin/edge-agent status --json", timeout=60)
        report = (json.loads(shown_json.stdout)["daemon"]["status"] or {}).get("reload") or {}
        if report.get("outcome") != "reloaded":
            raise Failed(f"systemctl reload returned before the agent reloaded: {report}")
        self.unit.wait_journal(mark, "reload: applying the new configuration", timeout=30)
        shown = self.wait_serving(1, timeout=60)
        if shown["MainPID"] != before["MainPID"]:
            raise Failed(f"reload restarted the agent: {_brief(shown)}")
        status = self.c.sh("/opt/edge-agent/venv/bin/edge-agent status", timeout=60).stdout
        return f"reload applied (telemetry 2 s, top_k 1); {_first(status)}"

    def reload_refuses(self) -> str:
        before = self.show()
        mark = self.unit.cursor()
        self.write_config(INVALID)
        try:
            done = self.c.sh(f"systemctl reload {UNIT}", timeout=120, check=False)
            self.unit.wait_journal(mark, "the new configuration is not used", timeout=30)
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
            failed = self.unit.wait(SHOW, _failed_78, 60, "failed with status 78")
            time.sleep(15)
            later = self.show()
        finally:
            self.write_config(config(top_k=1, interval=2))
        if later["NRestarts"] != failed["NRestarts"] or later["ActiveState"] != "failed":
            raise Failed(f"restarted after exit 78: {_brief(failed)} -> {_brief(later)}")
        self.c.sh(f"systemctl restart {UNIT}", timeout=240)
        self.wait_serving(1, timeout=120)
        return f"failed, status 78, NRestarts {later['NRestarts']} over 15 s; fixed: serving again"

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
        bad = [line for line in self.unit.journal().splitlines() if FORBIDDEN.search(line)]
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
        if self.c.existing(gone):
            raise Failed(f"--uninstall left: {self.c.existing(gone)}")
        kept = (f"{ETC}/config.yaml", "/var/lib/edge-agent")
        if self.c.existing(kept) != list(kept):
            raise Failed(f"--uninstall removed what it keeps: {kept}")
        known = self.c.sh(f"systemctl list-unit-files {UNIT}", timeout=30, check=False).stdout
        if UNIT in known:
            raise Failed(f"systemd still knows {UNIT} after --uninstall")
        self.c.sh("cd /root/edge-agent && provisioning/install.sh --uninstall --purge", timeout=120)
        purged = (ETC, "/var/lib/edge-agent", *(f"/etc/{d}.d/edge-agent.conf" for d in DROPINS))
        if self.c.existing(purged):
            raise Failed(f"--uninstall --purge left: {self.c.existing(purged)}")
        owned = self.c.sh(
            "find / -xdev \\( -path /proc -o -path /sys -o -path /wheels \\) -prune"
            " -o -user edge-agent -print",
            timeout=120,
            check=False,
        ).stdout.split()
        if owned:
            raise Failed(f"files of user edge-agent left: {owned[:5]}")
        return "no unit, venv, udev rules; with --purge no config, state, sysusers/tmpfiles"

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
            print("--- console ---", self.box.console_tail(), sep="\n", file=sys.stderr)

    def close(self) -> None:
        if self.box is not None:
            self.box.close()
        if self.view is not None:
            self.view.close()


def _failed_78(shown: dict[str, str]) -> bool:
    return shown["ActiveState"] == "failed" and shown["ExecMainStatus"] == "78"


def _brief(shown: dict[str, str]) -> str:
    keys = ("ActiveState", "SubState", "NRestarts", "ExecMainStatus", "StatusText")
    return ", ".join(f"{k}={shown.get(k, '?')}" for k in keys)


def _first(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no status)"


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
        with sigterm_interrupts():
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
