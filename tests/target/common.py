"""What both target scripts share: cached Debian root filesystems, wheelhouses, checks.

Standard library only: the scripts run as root on a Debian host with ``python3`` and
nothing of the project installed. Everything they fetch or build goes under the cache
folder (``EDGE_AGENT_TARGET_CACHE``, default ``/var/cache/edge-agent-target``), never
into the checkout:

- ``rootfs-ARCH-KEY/``: a pristine ``debootstrap`` of bookworm with the packages asked
  for (KEY: a digest of the architecture, suite and package list). A run never writes
  into it: it mounts an overlay on top (``Overlay``) and throws the upper layer away.
- ``wheels-PLATFORM-KEY/``: a wheelhouse from ``pip download --only-binary=:all:`` for
  that platform and CPython 3.11 (bookworm's Python): the project's dependencies for the
  offline install the scripts test (``pip install --no-index --find-links``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("EDGE_AGENT_TARGET_CACHE", "/var/cache/edge-agent-target"))
SUITE = "bookworm"
MIRROR = os.environ.get("EDGE_AGENT_TARGET_MIRROR", "http://deb.debian.org/debian")
HOST_CA = Path("/usr/local/share/ca-certificates")
# What a command inside a root filesystem sees: nothing of the host's environment
# (PIP_* settings, a venv, proxies would leak in otherwise), except a proxy if set.
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    **{k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy")},
}


# The two root filesystems (minbase: what a minimal image has, e.g. no procps).
ARM64_PACKAGES = (
    "python3",
    "python3-venv",
    "python3-pip",
    "ca-certificates",
    "mosquitto",
    "openssl",
)
# The container image's local base: what debian:bookworm-slim plus the Containerfile's
# apt step has (python3 with venv), so the build needs no network.
IMAGE_PACKAGES = (
    "python3",
    "python3-venv",
    "ca-certificates",
)
SYSTEMD_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "python3-pip",
    "ca-certificates",
    "mosquitto",
)

CPU = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

"""
# What a Raspberry Pi 4 Model B (4 x Cortex-A72) shows in /proc/cpuinfo.
PI4_CPUINFO = "".join(CPU.format(n=n) for n in range(4)) + (
    "Hardware\t: BCM2835\n"
    "Revision\t: c03114\n"
    "Serial\t\t: 100000003c1f2a4e\n"
    "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n"
)


class Failed(Exception):
    """A check failed: its message is the one line the summary shows."""


def say(script: str, message: str) -> None:
    print(f"{script}: {message}", flush=True)


def run(
    argv: Sequence[str | Path],
    *,
    timeout: float,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command (bounded), output captured; raise Failed naming it when it fails."""
    args = [str(a) for a in argv]
    try:
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=cwd,
            input=input,
            errors="replace",
        )
    except subprocess.TimeoutExpired as exc:
        raise Failed(f"{shlex.join(args)}: no end after {timeout:g} s") from exc
    if check and done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        print("\n".join(f"    | {line}" for line in tail), file=sys.stderr)
        raise Failed(f"{shlex.join(args)}: exit {done.returncode}")
    return done


class Checks:
    """Named checks run in order; each prints one line; the last line sums them up.

    A failed check stops the run (later checks build on earlier ones): the summary
    names it, and ``finish`` returns 1.
    """

    def __init__(self, script: str) -> None:
        self.script = script
        self.passed: list[str] = []
        self.failed: str | None = None
        self.started = time.monotonic()

    def check(self, name: str, step: Callable[[], str | None]) -> None:
        if self.failed is not None:
            return
        began = time.monotonic()
        try:
            detail = step()
        except Failed as exc:
            self.failed = f"{name}: {exc}"
        except Exception as exc:  # a bug in the script itself: show where
            traceback.print_exc()
            self.failed = f"{name}: {type(exc).__name__}: {exc}"
        took = time.monotonic() - began
        if self.failed is None:
            self.passed.append(name)
            say(self.script, f"ok   {name} ({took:.0f} s){': ' + detail if detail else ''}")
        else:
            say(self.script, f"FAIL {self.failed} ({took:.0f} s)")

    def finish(self) -> int:
        took = time.monotonic() - self.started
        if self.failed is None:
            say(self.script, f"PASS: {len(self.passed)} checks in {took:.0f} s")
            return 0
        say(
            self.script, f"FAIL after {len(self.passed)} passed checks, {took:.0f} s: {self.failed}"
        )
        return 1


def need_root_and_tools(tools: dict[str, str]) -> None:
    """Exit 2 with one line when not root or a tool (command -> Debian package) is missing."""
    if os.geteuid() != 0:
        sys.exit(f"{Path(sys.argv[0]).name}: run as root (debootstrap, chroot, mounts)")
    missing = sorted({pkg for cmd, pkg in tools.items() if shutil.which(cmd) is None})
    if missing:
        sys.exit(f"{Path(sys.argv[0]).name}: missing tools: apt-get install {' '.join(missing)}")


def enable_binfmt(machine: str) -> str:
    """Make the kernel run ``machine`` (e.g. ``aarch64``) binaries through qemu-user:
    binfmt_misc mounted and Debian's ``qemu-MACHINE`` entry enabled (done by
    binfmt-support's postinst on a booted system; a container or CI host may lack it).
    Returns how it was found; raises Failed when it cannot be enabled."""
    entry = Path(f"/proc/sys/fs/binfmt_misc/qemu-{machine}")
    if entry.exists() and entry.read_text().startswith("enabled"):
        return f"{entry}: enabled"
    if not Path("/proc/sys/fs/binfmt_misc/register").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"], timeout=60)
    run(["update-binfmts", "--enable", f"qemu-{machine}"], timeout=60, check=False)
    if not (entry.exists() and entry.read_text().startswith("enabled")):
        raise Failed(
            f"{entry} is not enabled: apt-get install qemu-user-static binfmt-support, then "
            f"update-binfmts --enable qemu-{machine}"
        )
    return f"{entry}: enabled now"


def _key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:10]


def rootfs(arch: str, include: Sequence[str], *, variant: str = "minbase") -> Path:
    """A pristine bookworm root filesystem for ``arch`` with ``include``: built once into
    the cache (debootstrap, the host's extra CA certificates added), reused after."""
    name = f"rootfs-{arch}-{_key(arch, SUITE, variant, sorted(include))}"
    done = CACHE / name
    CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE / f"{name}.lock"):  # one build at a time; the others wait for it
        if not (done / "etc" / "os-release").exists():
            _debootstrap(arch, include, variant, name)
    return done


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def _debootstrap(arch: str, include: Sequence[str], variant: str, name: str) -> None:
    building = CACHE / f"{name}.building"
    shutil.rmtree(building, ignore_errors=True)
    run(
        [
            "debootstrap",
            f"--arch={arch}",
            f"--variant={variant}",
            f"--include={','.join(include)}",
            SUITE,
            building,
            MIRROR,
        ],
        timeout=1800,
    )
    add_host_ca(building)
    (building / "etc" / "hostname").write_text("edge-target\n")
    building.rename(CACHE / name)


def add_host_ca(root: Path) -> None:
    """The host's extra CA certificates (a TLS-inspecting proxy's), trusted inside."""
    certs = sorted(HOST_CA.glob("*.crt")) if HOST_CA.is_dir() else []
    if not certs:
        return
    target = root / "usr" / "local" / "share" / "ca-certificates"
    target.mkdir(parents=True, exist_ok=True)
    for cert in certs:
        shutil.copy2(cert, target / cert.name)
    run(["chroot", root, "update-ca-certificates"], timeout=600, env=CHROOT_ENV)


class Overlay:
    """A writable view of a pristine root filesystem: overlayfs on top of it (a copy
    where overlayfs is not available); ``close`` throws every change away."""

    def __init__(self, lower: Path, label: str) -> None:
        self.work = Path(tempfile.mkdtemp(prefix=f"edge-target-{label}-", dir=CACHE))
        self.root = self.work / "root"
        self.root.mkdir()
        upper, scratch = self.work / "upper", self.work / "scratch"
        upper.mkdir()
        scratch.mkdir()
        options = f"lowerdir={lower},upperdir={upper},workdir={scratch}"
        mounted = run(
            ["mount", "-t", "overlay", "overlay", "-o", options, self.root],
            timeout=60,
            check=False,
        )
        self.overlay = mounted.returncode == 0
        if not self.overlay:
            run(["cp", "-a", f"{lower}/.", self.root], timeout=900)
        self.mounts: list[Path] = []

    def bind(self, source: Path, inside: str, *, readonly: bool = False) -> Path:
        """Bind-mount ``source`` (a file or folder of the host) at ``inside``."""
        target = self.root / inside.lstrip("/")
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch(exist_ok=True)
        run(["mount", "--bind", source, target], timeout=60)
        self.mounts.append(target)
        if readonly:
            run(["mount", "-o", "remount,bind,ro", target], timeout=60)
        return target

    def mount_api(self) -> None:
        """/proc, /sys, /dev, /dev/pts and /dev/shm for a chroot (nspawn does its own)."""
        for fstype, inside in (("proc", "proc"), ("sysfs", "sys")):
            target = self.root / inside
            run(["mount", "-t", fstype, fstype, target], timeout=60)
            self.mounts.append(target)
        self.bind(Path("/dev"), "/dev")
        for inside in ("dev/pts", "dev/shm"):
            target = self.root / inside
            if target.is_dir():
                run(["mount", "--bind", f"/{inside}", target], timeout=60)
                self.mounts.append(target)

    def chroot(
        self,
        command: str,
        *,
        timeout: float,
        check: bool = True,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``sh -c COMMAND`` inside, under ``env -i`` plus ``env``."""
        argv = ["env", "-i", *(f"{k}={v}" for k, v in {**CHROOT_ENV, **(env or {})}.items())]
        return run(
            [*argv, "chroot", self.root, "/bin/sh", "-c", command], timeout=timeout, check=check
        )

    def close(self) -> None:
        for target in reversed(self.mounts):
            run(["umount", "-l", target], timeout=60, check=False)
        self.mounts.clear()
        if self.overlay:
            run(["umount", "-l", self.root], timeout=60, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


@contextlib.contextmanager
def overlay(lower: Path, label: str) -> Iterator[Overlay]:
    view = Overlay(lower, label)
    try:
        yield view
    finally:
        view.close()


def project_wheel(into: Path) -> Path:
    """The project built as a wheel from the checkout (``pip wheel --no-deps``)."""
    into.mkdir(parents=True, exist_ok=True)
    for old in into.glob("edge_agent-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="edge-target-src-") as src:
        # A copy without caches, venvs or build leftovers (they would leak into the wheel).
        ignore = shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "dist"
        )
        shutil.copytree(REPO, Path(src) / "p", ignore=ignore)
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--quiet",
                "-w",
                into,
                Path(src) / "p",
            ],
            timeout=600,
        )
    (wheel,) = into.glob("edge_agent-*.whl")
    return wheel


def bookworm_wheel_tags(machine: str) -> tuple[str, ...]:
    """pip's ``--platform`` tags for bookworm on ``machine`` (``x86_64``, ``aarch64``):
    every manylinux tag up to its glibc 2.36. pip download takes the tags as listed
    (``manylinux_2_36`` alone would not match a ``manylinux_2_27`` wheel), and
    cryptography's wheels need 2.34."""
    older = (f"manylinux_2_{n}_{machine}" for n in range(17, 37))
    return (f"manylinux2014_{machine}", *older)


def wheelhouse(
    platforms: Sequence[str], requirements: Sequence[str], extra_files: Sequence[Path] = ()
) -> Path:
    """A cached folder of binary wheels for CPython 3.11 on ``platforms`` (pip tags, e.g.
    ``manylinux_2_28_aarch64``) with everything ``requirements`` need; ``extra_files``
    (the project's requirement files) are part of the cache key."""
    digest = _key(list(platforms), list(requirements), [p.read_bytes() for p in extra_files])
    house = CACHE / f"wheels-{platforms[-1]}-{digest}"
    CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE / f"{house.name}.lock"):
        if not (house / ".complete").exists():
            _download(house, platforms, requirements)
    return house


def _download(house: Path, platforms: Sequence[str], requirements: Sequence[str]) -> None:
    house.mkdir(parents=True, exist_ok=True)
    argv: list[str | Path] = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--only-binary=:all:",
    ]
    for platform in platforms:
        argv += ["--platform", platform]
    argv += ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "-d", house]
    run([*argv, *requirements], timeout=1800)
    for own in house.glob("edge_agent-*"):  # the project comes fresh from the checkout
        own.unlink()
    (house / ".complete").touch()
