"""Fixtures for the infrastructure tests: dummy AWS credentials and a moto server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def _dummy_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials only: nothing here may ever reach real AWS."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _serve() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture()
def moto_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    _dummy_credentials(monkeypatch)
    yield from _serve()


@pytest.fixture(scope="module")
def moto_endpoint_module() -> Iterator[str]:
    """One server (and dummy credentials) for a whole module: for tests that share one deployment."""
    with pytest.MonkeyPatch.context() as mp:
        _dummy_credentials(mp)
        yield from _serve()
