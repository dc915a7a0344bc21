"""provisioning/install.sh, device-identity.sh and the systemd unit, on real trees.

install.sh runs with ``--root`` into a temporary image tree (fast mode: a venv that sees
this interpreter's packages, ``pip install --no-deps``); nothing touches the running
system. The tree is seeded with what any systemd image has (its units), so
``systemd-analyze verify --root`` checks the installed unit, ExecStart included.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import stat
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import parse_config
from tests.broker import ClientTLS, SecureBroker, connect_outcome
from tests.certs import TestCA

REPO = Path(__file__).resolve().parent.parent
INSTALL = REPO / "provisioning" / "install.sh"
IDENTITY = REPO / "provisioning" / "device-identity.sh"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is missing (Debian package systemd; .ci/run installs it)",
)
DEVICE = "pi-door-01"
VENV = Path("opt/edge-agent/venv")
UNIT = Path("etc/systemd/system/edge-agent.service")
WANTS = Path("etc/systemd/system/multi-user.target.wants/edge-agent.service")
CONFIG = Path("etc/edge-agent/config.yaml")
SYSUSERS = Path("etc/sysusers.d/edge-agent.conf")
TMPFILES = Path("etc/tmpfiles.d/edge-agent.conf")
UDEV = Path("etc/udev/rules.d/65-edge-agent.rules")
MAX_EXPOSURE = 2.0


def run(
    *command: str | Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env=env,
        cwd=cwd,
        input=input,
    )


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = run(
        INSTALL,
        "--root",
        root,
        "--python",
        sys.executable,
        "--system-site-packages",
        "--no-deps",
        *args,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def tree_env() -> dict[str, str]:
    """Environment for the tree's programs: the --no-deps install takes the dependencies
    from this test environment (in CI a venv the tree's --system-site-packages cannot see),
    and writes no bytecode into the tree."""
    here = sysconfig.get_paths()
    deps = os.pathsep.join(dict.fromkeys([here["purelib"], here["platlib"]]))
    return {**os.environ, "PYTHONPATH": deps, "PYTHONDONTWRITEBYTECODE": "1"}


def listing(root: Path) -> list[tuple[str, str, str]]:
    """Every path under ``root`` with its mode (and a symlink's target)."""
    rows = []
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        target = os.readlink(path) if path.is_symlink() else ""
        rows.append((str(path.relative_to(root)), stat.filemode(info.st_mode), target))
    return rows


def files(root: Path) -> set[str]:
    """Files and symlinks under ``root`` (folders left empty are not counted)."""
    return {name for name, mode, _ in listing(root) if mode[0] != "d"}


def seed_image_base(root: Path) -> None:
    """What every systemd image has and the unit relies on: systemd's units."""
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)


@dataclass
class Tree:
    """One install.sh run into an image tree, shared by the install.sh tests (in file
    order: the re-install test edits the config; the last test uninstalls)."""

    root: Path
    base: set[str]  # files before install.sh ran
    first: list[tuple[str, str, str]]  # listing after the first run
    output: str


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    root = tmp_path_factory.mktemp("image")
    if SYSTEMD_ANALYZE is not None:
        seed_image_base(root)
    base = files(root)
    result = install(root, "--device-id", DEVICE)
    return Tree(root, base, listing(root), result.stdout)


# -- install.sh ------------------------------------------------------------------------


def test_install_into_tree_lays_out_unit_user_config_udev_and_venv(tree: Tree) -> None:
    root = tree.root
    assert (root / UNIT).read_text() == (REPO / "systemd/edge-agent.service").read_text()
    assert os.readlink(root / WANTS) == "/etc/systemd/system/edge-agent.service"
    assert (root / SYSUSERS).read_text() == (REPO / "systemd/edge-agent.sysusers").read_text()
    assert (root / TMPFILES).is_file()
    assert 'SUBSYSTEM=="apex", MODE="0660", GROUP="apex"' in (root / UDEV).read_text()
    assert stat.S_IMODE((root / CONFIG).stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "etc/edge-agent/tls").stat().st_mode) == 0o750
    assert os.access(root / VENV / "bin/edge-agent", os.X_OK)
    # the running system is not touched: the user comes from sysusers.d at first boot
    assert "created at first boot" in tree.output
    # one line per step
    assert len(tree.output.splitlines()) >= 8


def test_installed_edge_agent_runs_from_the_tree(tree: Tree) -> None:
    venv = tree.root / VENV
    result = run(venv / "bin/edge-agent", "--help", env=tree_env(), cwd=tree.root)
    assert result.returncode == 0, result.stderr
    assert "check-config" in result.stdout
    # the agent imported is the tree's copy, not this checkout
    where = run(
        venv / "bin/python", "-c", "import agent; print(agent.__file__)", env=tree_env(), cwd=venv
    )
    assert where.stdout.strip().startswith(str(venv / "lib")), where.stdout + where.stderr


def test_tree_venv_scripts_use_the_device_path_not_the_build_tree(tree: Tree) -> None:
    script = (tree.root / VENV / "bin/edge-agent").read_text()
    assert str(tree.root) not in script
    assert str(tree.root) not in (tree.root / VENV / "pyvenv.cfg").read_text()
    activate = (tree.root / VENV / "bin/activate").read_text()
    assert str(tree.root) not in activate
    assert re.search(r'(?m)^VIRTUAL_ENV="?/opt/edge-agent/venv"?$', activate), activate


def test_rendered_config_asks_for_the_registry_and_model_then_passes_check_config(
    tree: Tree, tmp_path: Path
) -> None:
    config = tree.root / CONFIG
    check = (sys.executable, "-m", "agent.cli", "check-config", "--config", config)
    result = run(*check, cwd=REPO)
    assert result.returncode == 78  # the two keys an operator must fill in, named
    problems = [line for line in result.stderr.splitlines() if "invalid configuration" in line]
    assert [p.split(": ")[-2] for p in problems] == ["registry.url", "model.name"], problems
    filled = tmp_path / "filled.yaml"  # not in the tree: other tests compare its listing
    text = config.read_text().replace("# url: https://models.example.com/", f"url: {REPO.as_uri()}")
    filled.write_text(text.replace("# name: person-detector", "name: person-detector"))
    result = run(*check[:-1], filled, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert parse_config(config.read_text()).device.id == DEVICE
    # every commented-out key is a real key too: uncommented, the file still validates
    text = re.sub(r"(?m)^(\s*)# ([a-z_]+: )", r"\1\2", config.read_text())
    parsed = parse_config(text)
    assert parsed.mqtt.url == "mqtts://broker.example.com:8883"
    assert parsed.mqtt.key == Path("/etc/edge-agent/tls/device.key")
    assert parsed.registry.url is not None and parsed.model.name is not None


@needs_systemd_analyze
def test_installed_unit_passes_systemd_verify_and_exposure_threshold(tree: Tree) -> None:
    root = tree.root
    verify = run(SYSTEMD_ANALYZE or "", "verify", f"--root={root}", "edge-agent.service")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # verify resolves ExecStart inside the tree: without the venv it fails
    binary = root / VENV / "bin/edge-agent"
    binary.rename(binary.with_name("moved"))
    try:
        broken = run(SYSTEMD_ANALYZE or "", "verify", f"--root={root}", "edge-agent.service")
    finally:
        binary.with_name("moved").rename(binary)
    assert broken.returncode != 0
    assert "/opt/edge-agent/venv/bin/edge-agent is not executable" in broken.stderr
    # systemd 252 takes the threshold on its 0-100 scale: 20 is an exposure of 2.0
    security = run(
        SYSTEMD_ANALYZE or "",
        "security",
        "--offline=yes",
        f"--root={root}",
        f"--threshold={int(MAX_EXPOSURE * 10)}",
        "--no-pager",
        "edge-agent.service",
    )
    assert security.returncode == 0, security.stdout + security.stderr
    score = re.search(r"Overall exposure level for edge-agent\.service: ([0-9.]+)", security.stdout)
    assert score is not None, security.stdout
    assert float(score.group(1)) <= MAX_EXPOSURE


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers missing")
def test_sysusers_file_creates_the_user_and_device_groups(tmp_path: Path) -> None:
    text = (REPO / "systemd/edge-agent.sysusers").read_text()
    result = run("systemd-sysusers", f"--root={tmp_path}", "--dry-run", "-", input=text)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "Creating user 'edge-agent'" in out
    for group in ("apex", "video", "plugdev", "dialout"):
        assert f"Creating group '{group}'" in out  # an empty tree has none yet


def test_install_twice_gives_the_same_tree_and_keeps_an_edited_config(tree: Tree) -> None:
    config = tree.root / CONFIG
    edited = config.read_text().replace("threads: 2", "threads: 3")
    config.write_text(edited)
    config.chmod(0o640)
    result = install(tree.root, "--device-id", "another-id")
    assert "config kept" in result.stdout
    assert config.read_text() == edited
    assert listing(tree.root) == tree.first


def test_install_refuses_a_bad_device_id_and_writes_nothing(tmp_path: Path) -> None:
    for bad in ("a/b", "groups", "-lead", "x" * 129):
        result = run(INSTALL, "--root", tmp_path, "--device-id", bad, "--no-deps")
        assert result.returncode == 2, (bad, result.stdout, result.stderr)
        assert "invalid device id" in result.stderr
    assert listing(tmp_path) == []


def test_uninstall_keeps_config_and_state_then_purge_removes_everything(tree: Tree) -> None:
    root = tree.root
    state = root / "var/lib/edge-agent/outbox.sqlite"  # as the service would have made it
    state.parent.mkdir(parents=True)
    state.write_bytes(b"outbox")
    key = root / "etc/edge-agent/tls/device.key"
    key.write_text("key")

    result = run(INSTALL, "--root", root, "--uninstall")
    assert result.returncode == 0, result.stderr
    for gone in (UNIT, WANTS, VENV, UDEV, Path("opt/edge-agent")):
        assert not (root / gone).exists() and not (root / gone).is_symlink(), gone
    for kept in (CONFIG, SYSUSERS, TMPFILES):
        assert (root / kept).is_file(), kept
    assert key.read_text() == "key" and state.read_bytes() == b"outbox"

    result = run(INSTALL, "--root", root, "--uninstall", "--purge")
    assert result.returncode == 0, result.stderr
    assert files(root) == tree.base


# -- device-identity.sh ------------------------------------------------------------------


def identity(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run(IDENTITY, *args)


def write_ca(folder: Path) -> tuple[TestCA, Path]:
    """A fleet CA and its key file (TestCA keeps its key in memory)."""
    ca = TestCA(folder / "fleet-ca", "fleet CA")
    key = folder / "fleet-ca" / "ca.key"
    key.write_bytes(
        ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    return ca, key


def common_name(name: x509.Name) -> str:
    return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_identity_makes_a_p256_key_0600_and_a_csr_named_for_the_device(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    result = identity("--dir", tls, "--device-id", DEVICE)
    assert result.returncode == 0, result.stderr
    key_file = tls / "device.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr((tls / "device.csr").read_bytes())
    assert csr.is_signature_valid
    assert common_name(csr.subject) == DEVICE
    assert csr.public_key() == key.public_key()


def test_identity_keeps_the_key_unless_forced(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    assert identity("--dir", tls, "--device-id", DEVICE).returncode == 0
    first = (tls / "device.key").read_bytes()
    again = identity("--dir", tls, "--device-id", DEVICE)
    assert again.returncode == 0 and "key kept" in again.stdout
    assert (tls / "device.key").read_bytes() == first
    forced = identity("--dir", tls, "--device-id", DEVICE, "--force")
    assert forced.returncode == 0
    assert (tls / "device.key").read_bytes() != first
    csr = x509.load_pem_x509_csr((tls / "device.csr").read_bytes())
    new_key = serialization.load_pem_private_key((tls / "device.key").read_bytes(), None)
    assert csr.public_key() == new_key.public_key()  # the CSR follows the new key


def test_identity_signs_a_client_certificate_that_the_mtls_broker_accepts(
    secure_broker: SecureBroker, tmp_path: Path
) -> None:
    ca = secure_broker.ca
    ca_key = tmp_path / "ca.key"
    ca_key.write_bytes(
        ca.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    tls = tmp_path / "tls"
    result = identity(
        "--dir", tls, "--device-id", "dev-a", "--ca-cert", ca.cert_path, "--ca-key", ca_key
    )
    assert result.returncode == 0, result.stderr
    assert "openssl verify" in result.stdout
    cert = x509.load_pem_x509_certificate((tls / "device.pem").read_bytes())
    assert common_name(cert.subject) == "dev-a"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days == 825
    assert (tls / "ca.pem").read_bytes() == ca.cert_path.read_bytes()
    device = ClientTLS(tls / "ca.pem", tls / "device.pem", tls / "device.key")
    assert connect_outcome(secure_broker.broker.tls_url, tls=device) == "connected"


@pytest.mark.parametrize("bad", ["a/b", "groups", "dev a", "+", "#", "-x", "x" * 129])
def test_identity_refuses_a_bad_device_id_with_exit_2(tmp_path: Path, bad: str) -> None:
    result = identity("--dir", tmp_path / "tls", "--device-id", bad)
    assert result.returncode == 2
    assert "invalid device id" in result.stderr
    assert not (tmp_path / "tls").exists()


def test_identity_installs_the_fleet_signed_certificate_and_refuses_others(
    tmp_path: Path,
) -> None:
    ca, _ = write_ca(tmp_path)
    tls = tmp_path / "tls"
    assert identity("--dir", tls, "--device-id", DEVICE).returncode == 0

    # a certificate for another key (same CN, same CA) is refused, nothing installed
    stranger = ca.issue(DEVICE)
    refused = identity(
        "--dir", tls, "--device-id", DEVICE, "--cert", stranger.cert, "--ca-cert", ca.cert_path
    )
    assert refused.returncode == 1
    assert "not this device's key" in refused.stderr
    assert not (tls / "device.pem").exists()

    # the fleet signs the CSR: right key, but the wrong CN is refused too
    csr = x509.load_pem_x509_csr((tls / "device.csr").read_bytes())
    wrong_cn = sign(ca, csr, "pi-door-02", tmp_path / "wrong-cn.pem")
    refused = identity("--dir", tls, "--device-id", DEVICE, "--cert", wrong_cn)
    assert refused.returncode == 1
    assert "CN is 'pi-door-02'" in refused.stderr

    signed = sign(ca, csr, DEVICE, tmp_path / "signed.pem")
    result = identity(
        "--dir", tls, "--device-id", DEVICE, "--cert", signed, "--ca-cert", ca.cert_path
    )
    assert result.returncode == 0, result.stderr
    assert (tls / "device.pem").read_bytes() == signed.read_bytes()

    # signed by another CA: refused against the installed ca.pem
    other, _ = write_ca(tmp_path / "other")
    foreign = sign(other, csr, DEVICE, tmp_path / "foreign.pem")
    refused = identity("--dir", tls, "--device-id", DEVICE, "--cert", foreign)
    assert refused.returncode == 1
    assert "openssl verify" in refused.stderr
    assert (tls / "device.pem").read_bytes() == signed.read_bytes()


def test_identity_takes_the_device_id_from_the_trees_config(tmp_path: Path) -> None:
    config = tmp_path / CONFIG
    config.parent.mkdir(parents=True)
    config.write_text("device:\n  id: pi-yard-07   # set by install.sh\n  groups: []\n")
    result = identity("--root", tmp_path)
    assert result.returncode == 0, result.stderr
    csr = x509.load_pem_x509_csr((tmp_path / "etc/edge-agent/tls/device.csr").read_bytes())
    assert common_name(csr.subject) == "pi-yard-07"
    # an image tree without a device id: this machine's hostname would be wrong there
    config.write_text("device:\n  groups: []\n")
    result = identity("--root", tmp_path)
    assert result.returncode == 2
    assert "--device-id" in result.stderr


def sign(ca: TestCA, csr: x509.CertificateSigningRequest, cn: str, out: Path) -> Path:
    """What the fleet does with a device's CSR: a clientAuth certificate for ``cn``."""
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.name)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


def test_registry_and_model_options_fill_a_new_config(tmp_path: Path) -> None:
    url = "https://models.example.com/a&b|c/"  # sed's special characters, kept literally
    install(tmp_path, "--device-id", DEVICE, "--registry", url, "--model", "person-detector")
    config = parse_config((tmp_path / CONFIG).read_text())
    assert config.registry.url == url and config.model.name == "person-detector"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--registry", "models.example.com"),
        ("--registry", "https://x/\n  y: 1"),
        ("--model", "a b"),
        ("--model", "../m"),
    ],
)
def test_unsafe_registry_or_model_values_are_refused(
    tmp_path: Path, option: str, value: str
) -> None:
    result = run(INSTALL, "--root", tmp_path, "--no-deps", option, value)
    assert result.returncode == 2 and option in result.stderr
    assert not (tmp_path / CONFIG).exists()
