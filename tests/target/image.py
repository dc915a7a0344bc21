"""The container image (container/Containerfile), built and run with podman, offline.

Run from the checkout root, as root, on a Debian machine with podman and runc::

    python3 tests/target/image.py

No container registry is needed. The base is a local image imported from a cached
debootstrap of bookworm with python3 and venv (what ``debian:bookworm-slim`` plus the
Containerfile's apt step gives), and the build gets the project's wheel and a wheelhouse
for CPython 3.11 in its context (``--build-arg WHEELS=wheels/ARCH``) and runs with
``--network none``. On the host's own architecture: ``--version``, ``demo`` (with its
hot swap), and the agent itself with a read-only config and a state volume, pulling v1
and then v2 (signed) from a registry served on the host's loopback (``--network host``);
its health check; ``podman stop`` ending in exit 0. The other one (arm64, a Raspberry
Pi's, on an x86_64 host) under qemu-user emulation: the build, ``--version`` and
``demo``; qemu shows the host's /proc/cpuinfo, with which the emulated demo hangs (no
output in 5 minutes; XNNPACK segfaults on it in a chroot), so an ARM one is mounted over
it (a Pi does not need that).

Podman keeps its images under the cache (``containers/``), apart from the host's; the
base image stays there, the rest is removed at the end, also on failure or Ctrl-C.
The test machine needed two podman settings that a Raspberry Pi does not: runc (crun 1.8
refuses cgroup v1 with a v2 hierarchy that has a controller) and explicit, lower
ulimits (podman raises RLIMIT_NOFILE/NPROC above the hard limit, and root here lacks
CAP_SYS_RESOURCE).
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.target import common
from tests.target.common import CACHE, REPO, Checks, Failed

SCRIPT = "image"


@dataclass(frozen=True)
class Arch:
    """One of the image's platforms: Debian's name, the kernel's, podman's."""

    debian: str
    machine: str

    @property
    def platform(self) -> str:
        return f"linux/{self.debian}"

    @property
    def image(self) -> str:
        return f"localhost/edge-agent-target:{self.debian}"

    @property
    def wheel_tags(self) -> tuple[str, ...]:
        return common.bookworm_wheel_tags(self.machine)

    def emulated(self) -> bool:
        return platform.machine() != self.machine


AMD64, ARM64 = Arch("amd64", "x86_64"), Arch("arm64", "aarch64")
# The agent checks run on the host's own architecture; the other one builds and runs the
# demo under emulation (on a Raspberry Pi: amd64 emulated, arm64 native).
NATIVE, FOREIGN = (ARM64, AMD64) if platform.machine() == ARM64.machine else (AMD64, ARM64)
PODMAN = (
    "podman",
    "--root",
    str(CACHE / "containers" / "storage"),
    "--runroot",  # podman's run-time state, one per storage (tmpfs)
    "/run/edge-agent-target" + str(CACHE).replace("/", "-"),
    "--runtime",
    "runc",
)
LIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")
# What container/README.md recommends, as the unit's ProtectSystem and empty
# CapabilityBoundingSet: the agent writes only its volume (and /tmp, a tmpfs).
HARDENED = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")
CONTAINER = "edge-agent-target-smoke"
VOLUME = "edge-agent-target-state"
MODEL = "colours"
CONFIG = """\
device: {{id: image-smoke}}
registry:
  url: "http://127.0.0.1:{port}/"
  public_key: /etc/edge-agent/registry.pub
  poll_interval_s: 1
model: {{name: {model}, channel: stable}}
store: {{dir: /var/lib/edge-agent/models, keep: 2, reserve_mb: 0}}
runtime: {{accelerator: cpu, threads: 1}}
source: {{type: synthetic, width: 160, height: 120, fps: 10}}
results: {{publish: every, min_score: 0.0}}
telemetry: {{interval_s: 2, outbox: /var/lib/edge-agent/outbox.sqlite}}
update: {{probation_s: 4, budget_runs: 20, poll_jitter: 0}}
"""
# Run as root inside the image (a tool run, not the agent): a generated model released,
# signed, to the registry folder mounted at /registry (the key pair in /keys).
PUBLISH = """\
[ -e /keys/registry.key ] || edge-fleet keygen --out /keys >/dev/null
python3 -c 'import sys; from agent import modelgen
open("/tmp/m.tflite", "wb").write(modelgen.colour_classifier(offset={offset}))'
printf 'red\\ngreen\\nblue\\n' > /tmp/labels.txt
edge-fleet publish --model {model} --version {version} --registry /registry \\
    --task classification --labels /tmp/labels.txt --channel stable \\
    --sign-key /keys/registry.key \\
    --selftest-random 4 --budget-p95-ms 1000 /tmp/m.tflite >/dev/null
"""


def podman(*args: str | Path, timeout: float, check: bool = True) -> str:
    """``podman ARGS`` with this script's storage and runtime; its stdout."""
    return common.run([*PODMAN, *args], timeout=timeout, check=check).stdout


def run_image(arch: Arch, *args: str | Path, timeout: float, options: tuple[str, ...] = ()) -> str:
    """``podman run --rm OPTIONS IMAGE ARGS``: no network, no proxy settings passed in,
    an ARM /proc/cpuinfo under emulation."""
    argv = ["run", "--rm", "--platform", arch.platform, *LIMITS, "--network", "none"]
    argv += ["--http-proxy=false", *options]
    if arch.emulated() and arch is ARM64:
        cpuinfo = CACHE / "image-arm-cpuinfo"
        cpuinfo.write_text(common.PI4_CPUINFO)
        argv += ["-v", f"{cpuinfo}:/proc/cpuinfo:ro"]
    return podman(*argv, arch.image, *args, timeout=timeout)


def version() -> str:
    text = (REPO / "agent" / "__init__.py").read_text()
    return text.split('__version__ = "', 1)[1].split('"', 1)[0]


def base_image(arch: Arch) -> str:
    """The local base: the cached root filesystem imported once (tagged by its key)."""
    root = common.rootfs(arch.debian, common.IMAGE_PACKAGES)
    tag = f"localhost/edge-agent-target-base:{root.name.removeprefix('rootfs-')}"
    if _exists(tag):
        return tag
    skip = ("--exclude=./var/cache/apt/archives/*.deb", "--exclude=./var/cache/apt/*.bin")
    tar = subprocess.Popen(["tar", "-C", str(root), *skip, "-c", "."], stdout=subprocess.PIPE)
    try:
        subprocess.run(
            [*PODMAN, "import", "--quiet", "--arch", arch.debian, "-", tag],
            stdin=tar.stdout,
            capture_output=True,
            check=True,
            timeout=600,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        raise Failed(f"podman import of {root}: {exc}") from exc
    finally:
        tar.kill()
        tar.wait()
    return tag


def _exists(tag: str) -> bool:
    done = common.run([*PODMAN, "image", "exists", tag], timeout=60, check=False)
    return done.returncode == 0


def build_context(into: Path, arches: tuple[Arch, ...]) -> str:
    """The checkout (``.dockerignore`` is applied by the build) and ``wheels/ARCH/``:
    the project's wheel and every dependency's for CPython 3.11 (cached downloads)."""
    wheel = common.project_wheel(CACHE / "image-project")
    skip = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".*_cache")
    shutil.copytree(REPO, into, ignore=skip)
    counts = []
    for arch in arches:
        wanted = [f"{wheel}[device]"]
        house = common.wheelhouse(arch.wheel_tags, wanted, [REPO / "pyproject.toml"])
        wheels = into / "wheels" / arch.debian
        wheels.mkdir(parents=True)
        for found in [wheel, *house.glob("*.whl")]:
            shutil.copy2(found, wheels / found.name)
        counts.append(f"{arch.debian} {len(list(wheels.iterdir()))}")
    return f"wheels: {', '.join(counts)}"


def build(arch: Arch, context: Path) -> str:
    """The image, built with no network: everything comes from the context."""
    if arch.emulated():
        common.enable_binfmt(arch.machine)
    base = base_image(arch)
    began = time.monotonic()
    values = {"BASE": base, "WHEELS": f"wheels/{arch.debian}", "VERSION": version()}
    argv = ["build", "--platform", arch.platform, "--format", "docker"]  # docker: HEALTHCHECK
    argv += [*LIMITS, "--network", "none", "--http-proxy=false"]
    argv += [arg for k, v in values.items() for arg in ("--build-arg", f"{k}={v}")]
    argv += ["-f", str(context / "container" / "Containerfile"), "-t", arch.image]
    podman(*argv, context, timeout=1200)
    size = podman("image", "inspect", arch.image, "--format", "{{.Size}}", timeout=60).strip()
    took = time.monotonic() - began
    return f"{arch.image} from {base}: {int(size) / 1e6:.0f} MB in {took:.0f} s"


def inspect_image() -> str:
    """What the Containerfile promises: user, entry point, volume, labels, health check."""
    (doc,) = json.loads(podman("image", "inspect", NATIVE.image, timeout=60))
    config = doc["Config"]
    labels = config.get("Labels") or {}
    health = doc.get("Healthcheck") or config.get("Healthcheck") or {}  # podman: top level
    wanted = {
        "User": config.get("User") == "edge-agent",
        "Entrypoint": config.get("Entrypoint") == ["edge-agent"],
        "Cmd": config.get("Cmd") == ["run", "--config", "/etc/edge-agent/config.yaml"],
        "Volumes": "/var/lib/edge-agent" in (config.get("Volumes") or {}),
        "Healthcheck": "edge-agent status" in " ".join(health.get("Test", [])),
        "version label": labels.get("org.opencontainers.image.version") == version(),
    }
    wrong = [name for name, ok in wanted.items() if not ok]
    if wrong:
        raise Failed(f"image config: {', '.join(wrong)} not as expected: {config}")
    return f"user edge-agent, volume /var/lib/edge-agent, {len(labels)} labels, health check"


def check_version(arch: Arch) -> str:
    out = run_image(arch, "--version", timeout=300).strip()
    if version() not in out:
        raise Failed(f"--version said {out!r}, not {version()}")
    return out


def check_demo(arch: Arch) -> str:
    out = run_image(arch, "demo", timeout=600)
    needed = ("published colours v1", "published colours v2", "hot swap to v2 succeeded")
    missing = [line for line in needed if line not in out]
    if missing:
        raise Failed(f"demo output lacks {missing}: ...{out[-400:]!r}")
    line = next(line for line in out.splitlines() if "results by version" in line)
    return line[line.index("results by version") :]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def registry_server(folder: Path) -> Iterator[int]:
    """``folder`` served over HTTP on the host's loopback (the container shares it)."""
    port = free_port()
    argv = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory"]
    server = subprocess.Popen(
        [*argv, str(folder), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield port
    finally:
        server.terminate()
        server.wait(timeout=10)


def publish(registry: Path, keys: Path, version_: int) -> None:
    """Release a generated model as ``version_`` (its outputs offset by it) to stable."""
    script = PUBLISH.format(model=MODEL, version=version_, offset=float(version_))
    mounts = ("-v", f"{registry}:/registry", "-v", f"{keys}:/keys")
    tool = ("--user", "0", "--entrypoint", "/bin/sh", *mounts)
    run_image(NATIVE, "-c", script, timeout=120, options=tool)


def start_agent(config_dir: Path) -> str:
    """The agent as container/README.md runs it: config read-only, state in a named
    volume, the root filesystem read-only, no capabilities."""
    podman("volume", "rm", "-f", VOLUME, timeout=60, check=False)
    podman("rm", "-f", CONTAINER, timeout=60, check=False)
    mounts = ("-v", f"{config_dir}:/etc/edge-agent:ro", "-v", f"{VOLUME}:/var/lib/edge-agent")
    network = ("--network", "host", "--http-proxy=false")
    named = ("--name", CONTAINER)
    podman("run", "-d", *named, *LIMITS, *HARDENED, *network, *mounts, NATIVE.image, timeout=120)
    return f"container {CONTAINER}, volume {VOLUME}"


def wait_serving(version_: int, within: float) -> str:
    """Until ``edge-agent status`` (in the container) says the agent serves ``version_``."""
    deadline = time.monotonic() + within
    seen: Any = None
    while time.monotonic() < deadline:
        state = podman("inspect", CONTAINER, "--format", "{{.State.Status}}", timeout=60)
        if state.strip() != "running":
            raise Failed(f"the container is {state.strip()}: {agent_logs()[-600:]!r}")
        out = podman("exec", CONTAINER, "edge-agent", "status", "--json", timeout=60)
        status = (json.loads(out).get("daemon") or {}).get("status") or {}
        seen = status.get("status_line")
        if status.get("serving") == version_:
            return f"status: {seen}"
        time.sleep(1)
    raise Failed(f"v{version_} not served within {within:g} s; last status: {seen!r}")


def agent_logs() -> str:
    done = common.run([*PODMAN, "logs", CONTAINER], timeout=60, check=False)
    return done.stdout + done.stderr


def check_health() -> str:
    done = common.run([*PODMAN, "healthcheck", "run", CONTAINER], timeout=60, check=False)
    if done.returncode != 0:
        raise Failed(f"podman healthcheck run: exit {done.returncode}: {done.stdout.strip()}")
    return done.stdout.strip() or "healthy"


def check_stop() -> str:
    """``podman stop`` (SIGTERM) ends the agent with exit 0 well before podman's SIGKILL,
    and its log (stderr) has no warning, error or traceback."""
    began = time.monotonic()
    podman("stop", "-t", "30", CONTAINER, timeout=60)
    took = time.monotonic() - began
    code = podman("inspect", CONTAINER, "--format", "{{.State.ExitCode}}", timeout=60).strip()
    lines = agent_logs().splitlines()
    bad = [line for line in lines if any(w in line for w in ("Traceback", "ERROR", "WARNING"))]
    if code != "0" or bad or took >= 29:
        raise Failed(f"exit {code} after {took:.0f} s; {bad[:3]}")
    return f"exit 0 after {took:.1f} s; {len(lines)} log lines, no warning"


def agent_checks(checks: Checks, work: Path) -> None:
    """The agent container against a registry on the host's loopback."""
    on = f"{NATIVE.debian}: "
    registry, keys, config_dir = work / "registry", work / "keys", work / "config"
    for folder in (registry, keys, config_dir):
        folder.mkdir()
    checks.check(
        f"{on}publish v1, signed (edge-fleet in the image)", lambda: publish(registry, keys, 1)
    )
    with registry_server(registry) as port:
        (config_dir / "config.yaml").write_text(CONFIG.format(port=port, model=MODEL))
        shutil.copy(keys / "registry.pub", config_dir / "registry.pub")
        config_dir.chmod(0o755)
        checks.check(f"{on}agent container starts", lambda: start_agent(config_dir))
        checks.check(f"{on}pulls and serves v1", lambda: wait_serving(1, 120))
        checks.check(f"{on}health check", check_health)
        checks.check(f"{on}publish v2", lambda: publish(registry, keys, 2))
        checks.check(f"{on}hot swap to v2", lambda: wait_serving(2, 120))
        checks.check(f"{on}podman stop: clean exit", check_stop)


def cleanup() -> None:
    """Everything but the base images (cached): the containers, then what is left of an
    interrupted build (working containers), the volume, the images; only in this
    script's storage."""
    podman("rm", "-f", CONTAINER, timeout=120, check=False)
    leftover = podman("ps", "-a", "--external", "--format", "{{.ID}}", timeout=60, check=False)
    if leftover.split():
        podman("rm", "-f", "--storage", *leftover.split(), timeout=120, check=False)
    podman("volume", "rm", "-f", VOLUME, timeout=60, check=False)
    podman("rmi", "-f", AMD64.image, ARM64.image, timeout=120, check=False)
    podman("image", "prune", "-f", timeout=120, check=False)  # the build stages


def interrupted(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main() -> int:
    qemu = f"qemu-{FOREIGN.machine}-static"
    tools = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap", "tar": "tar"}
    common.need_root_and_tools({**tools, qemu: "qemu-user-static"})
    signal.signal(signal.SIGTERM, interrupted)
    checks = Checks(SCRIPT)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="edge-target-image-", dir=CACHE))
    try:
        context = work / "context"
        checks.check("build context", lambda: build_context(context, (NATIVE, FOREIGN)))
        on = f"{NATIVE.debian}: "
        checks.check(f"{on}build (no network)", lambda: build(NATIVE, context))
        checks.check(f"{on}image config", inspect_image)
        checks.check(f"{on}--version", lambda: check_version(NATIVE))
        checks.check(f"{on}demo (hot swap)", lambda: check_demo(NATIVE))
        agent_checks(checks, work)
        on = f"{FOREIGN.debian} (emulated): "
        checks.check(f"{on}build (no network)", lambda: build(FOREIGN, context))
        checks.check(f"{on}--version", lambda: check_version(FOREIGN))
        checks.check(f"{on}demo (hot swap)", lambda: check_demo(FOREIGN))
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: clean up, then the summary
        checks.failed = f"interrupted ({str(exc) or 'SIGINT'})"
    finally:
        cleanup()
        shutil.rmtree(work, ignore_errors=True)
    return checks.finish()


if __name__ == "__main__":
    sys.exit(main())
