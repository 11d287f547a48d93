"""Fixtures: real Docker, a fresh SQLite file and data dir per test, the official MCP client.

Each test's data dir gives it its own dockyard instance id, so its containers carry their own
label; teardown removes every container and network with that label, even after a failure.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import docker
import docker.errors
import pytest
from mcp import Client
from sqlmodel import Session, create_engine

from dockyard.runtime.engine import Engine, instance_id
from dockyard.runtime.runtimes.disks import release_all
from dockyard.runtime.runtimes.images import ImageService
from dockyard.runtime.runtimes.netguard import remove_rules
from dockyard.runtime.substrate.actions import Toolset
from dockyard.runtime.substrate.docker import DockerBackend
from dockyard.runtime.substrate.settings import Settings, load_settings
from dockyard.runtime.substrate.store import Runtime, Sandbox
from dockyard.server.app import build_server

_UNIT = Path(__file__).parent / "unit"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """`-m unit` selects exactly the tests under tests/unit (their conftest marks them), so the
    other tiers' modules are not even imported: the fast tier stays fast."""
    if config.getoption("markexpr", "") == "unit" and collection_path.is_relative_to(Path(__file__).parent):
        return not (collection_path.is_relative_to(_UNIT) or _UNIT.is_relative_to(collection_path))
    return None


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """The Docker daemon is part of the test environment: no daemon is a failure, not a skip."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(
            f"Docker is not reachable ({exc}). Start the daemon (`sudo systemctl start docker` or "
            "`sudo dockerd &`) and make sure this user may use it.",
            pytrace=False,
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def sandbox_image(docker_client: docker.DockerClient) -> str:
    """Build (or find cached) the sandbox image once per session."""
    settings = load_settings(data_dir=Path(tempfile.mkdtemp(prefix="dockyard-images-")))
    backend = DockerBackend(settings.docker_host, settings.docker_timeout_s)
    images = ImageService(settings.images, backend, settings.data_dir / "build")
    return anyio.run(images.ensure, "sandbox")


@pytest.fixture(scope="session")
def computer_image(docker_client: docker.DockerClient) -> str:
    """Build (or find cached) the computer image (Chromium) once per session."""
    settings = load_settings(data_dir=Path(tempfile.mkdtemp(prefix="dockyard-images-")))
    backend = DockerBackend(settings.docker_host, settings.docker_timeout_s)
    images = ImageService(settings.images, backend, settings.data_dir / "build")
    return anyio.run(images.ensure, "computer")


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for one test: its own data dir, fast loops, a small default pool (min 1, max 8),
    no warm computer (`computer_pool` gives one; `templates` replaces the default's) and every
    toolset on stdio (`toolsets={}` keeps the shipped ones)."""
    overrides.setdefault("toolsets", {"stdio": list(Toolset)})
    sandbox = {"reaper_interval_s": 0.5, **overrides.pop("sandbox", {})}
    pool = {"health_interval_s": 2.0, "claim_timeout_s": 30.0, **overrides.pop("pool", {})}
    default_pool = {"min": 1, "max": 8, **overrides.pop("default_pool", {})}
    computer_pool = {"min": 0, "max": 4, **overrides.pop("computer_pool", {})}
    templates = dict(overrides.pop("templates", {"default": {"pool": default_pool}}))
    # The shipped config keeps a computer warm; tests start a browser only when they ask for one.
    computer = dict(templates.get("computer", {}))
    computer["pool"] = {**computer_pool, **computer.get("pool", {})}
    templates["computer"] = computer
    return load_settings(data_dir=data_dir, sandbox=sandbox, pool=pool, templates=templates, **overrides)


@pytest.fixture
def settings(tmp_path: Path, sandbox_image: str) -> Settings:
    return make_settings(tmp_path / "data")


def remove_instance(client: docker.DockerClient, settings: Settings) -> list[str]:
    """Remove every container and network of the settings' instance; returns container names."""
    label = f"dockyard.instance={instance_id(settings)}"
    removed = []
    # sparse: a container removed between listing and inspecting must not fail the cleanup;
    # one the server is removing at this moment (409) is waited for below.
    exports = client.containers.list(
        all=True, sparse=True, filters={"label": f"dockyard.export-of={instance_id(settings)}"}
    )
    for container in [*client.containers.list(all=True, sparse=True, filters={"label": label}), *exports]:
        removed.append(container.attrs["Names"][0].lstrip("/"))
        try:
            container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
    deadline = time.monotonic() + 30
    while client.containers.list(all=True, sparse=True, filters={"label": label}) and time.monotonic() < deadline:
        time.sleep(0.2)
    for network in client.networks.list(filters={"label": label}):
        network.remove()
    remove_rules(instance_id(settings))  # the firewall rules that guarded its networks
    release_all(settings.data_dir / "disks")  # the sandboxes' disks, mounted on this host
    return removed


@pytest.fixture
def cleanup(docker_client: docker.DockerClient, settings: Settings) -> Iterator[None]:
    yield
    remove_instance(docker_client, settings)


@pytest.fixture
async def engine(settings: Settings, cleanup: None) -> AsyncIterator[Engine]:
    async with Engine.open(settings) as opened:
        yield opened


@pytest.fixture
async def client(settings: Settings, cleanup: None) -> AsyncIterator[Client]:
    async with Client(build_server(settings)) as connected:
        yield connected


def sandbox_row(settings: Settings, sandbox_id: str) -> Sandbox:
    """The store's row of a sandbox, read straight from the SQLite file."""
    with Session(create_engine(f"sqlite:///{settings.store_path}")) as session:
        row = session.get(Sandbox, sandbox_id)
    assert row is not None, f"no sandbox row {sandbox_id}"
    return row


def runtime_row(settings: Settings, runtime_id: str) -> Runtime:
    with Session(create_engine(f"sqlite:///{settings.store_path}")) as session:
        row = session.get(Runtime, runtime_id)
    assert row is not None, f"no runtime row {runtime_id}"
    return row


def container_of(docker_client: docker.DockerClient, settings: Settings, sandbox_id: str) -> dict[str, Any]:
    """The raw `docker inspect` document of a sandbox's container."""
    return docker_client.api.inspect_container(sandbox_row(settings, sandbox_id).container_id)


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool that must succeed; returns its structured result."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, f"{tool} failed: {result.content[0].text if result.content else result}"
    assert result.structured_content is not None
    return result.structured_content


async def call_error(client: Client, tool: str, **arguments: Any) -> str:
    """Call a tool that must fail; returns the error text the client sees."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error, f"{tool} unexpectedly succeeded: {result.structured_content}"
    return result.content[0].text


@pytest.fixture
def serve_http(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient) -> Iterator[Any]:
    """Start `dockyard serve --http` instances (`serve_http(env=..., name=...)`); each is
    stopped and its containers removed at teardown."""
    from tests.served import serve, stop

    started: list[Any] = []

    def start(env: dict[str, str] | None = None, name: str = "data") -> Any:
        served = serve(tmp_path / name, env)
        started.append(served)
        return served

    yield start
    for served in started:
        stop(served)
        remove_instance(docker_client, make_settings(served.data_dir))


@pytest.fixture
def served(serve_http: Any) -> Any:
    """One `dockyard serve --http` with default settings."""
    return serve_http()


async def sh(client: Client, sandbox_id: str, command: str, **extra: Any) -> dict[str, Any]:
    """Run a command through sandbox_exec and return the structured result."""
    return await call(client, "sandbox_exec", sandbox_id=sandbox_id, command=command, **extra)
