"""The registry over https: a private CA in registry.ca is trusted, an unknown one is not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import TransportError
from tests.certs import TestCA
from tests.conftest import Device, Fleet
from tests.registry_server import RegistryServer


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


@pytest.fixture
def https_server(fleet: Fleet, ca: TestCA) -> Iterator[RegistryServer]:
    issued = ca.issue("registry")
    with RegistryServer(fleet.registry, tls=(issued.cert, issued.key)) as srv:
        yield srv


def test_pull_over_https_with_a_private_ca(
    fleet: Fleet, device: Device, ca: TestCA, https_server: RegistryServer
) -> None:
    device.set("registry", url=https_server.url, ca=str(ca.cert_path))
    fleet.release(1)
    assert device.updater().pull().changed
    device.assert_serving(1)


def test_https_registry_with_an_unknown_ca_is_refused(
    fleet: Fleet, device: Device, tmp_path: Path, https_server: RegistryServer
) -> None:
    stranger = TestCA(tmp_path / "other-pki", "some other CA")
    device.set("registry", url=https_server.url, ca=str(stranger.cert_path), retries=0)
    fleet.release(1)
    expected = r"TLS failed: .*certificate verify failed.*registry\.ca"
    with pytest.raises(TransportError, match=expected):
        device.updater().pull()
    device.assert_serving(None)
