"""Fixtures shared by the engine tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from dockyard.runtime.substrate.settings import Settings
from tests.conftest import make_settings, remove_instance


@pytest.fixture
def pool_settings(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> Iterator[Callable[..., Settings]]:
    """Build settings for one test's pool; every instance made is cleaned up afterwards."""
    made: list[Settings] = []

    def make(**overrides: object) -> Settings:
        settings = make_settings(tmp_path / f"data{len(made)}", **overrides)
        made.append(settings)
        return settings

    yield make
    for settings in made:
        remove_instance(docker_client, settings)
