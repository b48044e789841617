from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from moto import mock_aws

from control_plane.runtime import use_services
from tests.control_plane_world import MOTO_CONFIG, World, build_world
from tests.stack import Stack


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "WARNING")


@pytest.fixture
def world(aws_env: None, tmp_path: Path) -> Iterator[World]:
    with mock_aws(config=MOTO_CONFIG):
        w = build_world(tmp_path)
        use_services(w.svc)
        try:
            yield w
        finally:
            use_services(None)
            w.close()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The local stack with its gateway, shared by the integration tests of a run."""
    from proctor.dev.stack import down, up

    directory = tmp_path_factory.mktemp("stack")
    state = up(directory)
    try:
        yield Stack(directory, state)
    finally:
        down(directory)
