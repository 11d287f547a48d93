"""The unit tier: pure logic (queues, scopes, transitions, frames, settings, the audit chain)
on real SQLite files and real sockets in `tmp_path`, without Docker. Every test here is marked
`unit`, so `bin/test -m unit` runs this tier alone, in seconds.

Nothing here may need the Docker daemon: no fixture of tests/conftest.py that reaches it
(`docker_client`, `sandbox_image`, `settings`, `engine`, `client`, ...) is used in this tier.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _no_ambient_configuration(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A unit test sees only the configuration it sets itself, not the shell's."""
    for name in list(os.environ):
        if name.startswith("DOCKYARD_") or name in ("POOL_MIN", "POOL_MAX", "POOL_AUTOSCALE_ENABLED", "DOCKER_HOST"):
            monkeypatch.delenv(name)
    yield
