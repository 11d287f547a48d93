"""A tool that needs an image still being built waits with progress, then says so clearly."""

from __future__ import annotations

import secrets
from pathlib import Path

import anyio
import docker
import pytest
from mcp import Client

from dockyard.runtime.runtimes.images import ImageService
from dockyard.runtime.substrate.docker import DockerBackend
from dockyard.runtime.substrate.errors import ImageBuildFailedError
from dockyard.server.app import build_server
from tests.conftest import call, make_settings, remove_instance

pytestmark = pytest.mark.anyio


async def test_create_reports_a_build_in_progress_then_succeeds_once_built(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    recipe = f"slow-{secrets.token_hex(3)}"
    folder = tmp_path / "recipes" / recipe
    folder.mkdir(parents=True)
    (folder / "Dockerfile").write_text(f"ARG BASE_IMAGE\nFROM {sandbox_image}\nRUN echo building && sleep 6\n")
    settings = make_settings(
        tmp_path / "data",
        images={"recipes_dir": str(tmp_path / "recipes"), "wait_s": 2, "build_on_start": False},
        templates={"default": {}, "slow": {"image": recipe}},
    )
    progress: list[str] = []

    async def on_progress(_: float, __: float | None, message: str | None) -> None:
        progress.append(message or "")

    try:
        async with Client(build_server(settings)) as client:
            first = await client.call_tool("sandbox_create", {"template": "slow"}, progress_callback=on_progress)
            assert first.is_error
            assert "still being built" in first.content[0].text and recipe in first.content[0].text
            assert any(f"building image '{recipe}'" in message for message in progress)

            with anyio.fail_after(120):
                while True:
                    again = await client.call_tool("sandbox_create", {"template": "slow"})
                    if not again.is_error:
                        break
                    assert "still being built" in again.content[0].text
            assert again.structured_content["template"] == "slow"
            listed = (await call(client, "sandbox_list"))["sandboxes"]
            assert [s["template"] for s in listed] == ["slow"]
    finally:
        remove_instance(docker_client, settings)
        try:
            docker_client.images.remove(f"dockyard/{recipe}:latest", force=True)
        except docker.errors.ImageNotFound:
            pass


async def test_wheels_a_recipe_lists_that_cannot_be_downloaded_fail_its_build_clearly(
    tmp_path: Path, sandbox_image: str
) -> None:
    recipe = f"wheels-{secrets.token_hex(3)}"
    folder = tmp_path / "recipes" / recipe
    folder.mkdir(parents=True)
    (folder / "Dockerfile").write_text(f"ARG BASE_IMAGE\nFROM {sandbox_image}\nCOPY wheels /wheels\n")
    # No index to look in: pip fails at once, here, without reaching the network or Docker's builder.
    (folder / "wheels.txt").write_text("--no-index\ndockyard-no-such-package==1.0\n")
    settings = make_settings(
        tmp_path / "data", images={"recipes_dir": str(tmp_path / "recipes"), "build_on_start": False}
    )
    docker_backend = DockerBackend(settings.docker_host, settings.docker_timeout_s)
    images = ImageService(settings.images, docker_backend, tmp_path / "build")
    try:
        with pytest.raises(ImageBuildFailedError) as failed:
            await images.ensure(recipe)
    finally:
        await docker_backend.close()
    assert f"{recipe}/wheels.txt" in str(failed.value) and "dockyard-no-such-package" in str(failed.value)
    assert list((tmp_path / "build").iterdir()) == []  # the recipe's copy is gone
    # The hash is of the recipe as written: pinning another version means a rebuild.
    before = images.recipe_hash(recipe)
    (folder / "wheels.txt").write_text("--no-index\ndockyard-no-such-package==2.0\n")
    assert images.recipe_hash(recipe) != before


async def test_a_template_naming_no_recipe_is_refused_at_once_not_reported_as_building(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    """A typo in a template's image must not look like a build in progress for wait_s, every time."""
    settings = make_settings(tmp_path / "data", templates={"default": {}, "typo": {"image": "no-such-recipe"}})
    try:
        async with Client(build_server(settings)) as client:
            for _ in range(2):
                with anyio.fail_after(10):
                    result = await client.call_tool("sandbox_create", {"template": "typo"})
                assert result.is_error
                message = result.content[0].text
                assert "no image recipe 'no-such-recipe'" in message and "still being built" not in message, message
    finally:
        remove_instance(docker_client, settings)


async def test_a_recipe_whose_files_are_links_builds_and_caches_do_not_change_its_hash(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    """An editable install's recipes are links into the checkout: the build must follow them."""
    recipe = f"linked-{secrets.token_hex(3)}"
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "Dockerfile").write_text(f"ARG BASE_IMAGE\nFROM {sandbox_image}\nCOPY note /note\n")
    (checkout / "note").write_text("linked\n")
    folder = tmp_path / "recipes" / recipe
    folder.mkdir(parents=True)
    for name in ("Dockerfile", "note"):
        (folder / name).symlink_to(checkout / name)
    settings = make_settings(tmp_path / "data", images={"recipes_dir": str(tmp_path / "recipes")})
    docker_backend = DockerBackend(settings.docker_host, settings.docker_timeout_s)
    images = ImageService(settings.images, docker_backend, tmp_path / "build")
    try:
        before = images.recipe_hash(recipe)
        (folder / "__pycache__").mkdir()
        (folder / "__pycache__" / "x.pyc").write_bytes(b"cache")
        (folder / ".ruff_cache").mkdir()
        (folder / ".ruff_cache" / "state").write_bytes(b"cache")
        (folder / "stray.pyc").write_bytes(b"byte-compiled beside its source")
        (folder / ".note.swp").write_bytes(b"an editor's swap file")
        (folder / "note~").write_bytes(b"an editor's backup")
        assert images.recipe_hash(recipe) == before
        (folder / "extra").write_text("a real change\n")
        assert images.recipe_hash(recipe) != before
        (folder / "extra").unlink()
        tag = await images.ensure(recipe)
        ran = docker_client.containers.run(tag, ["cat", "/note"], remove=True, network_disabled=True)
        assert ran == b"linked\n"
    finally:
        await docker_backend.close()
        for image in docker_client.images.list(name=tag.rsplit(":", 1)[0]) if "tag" in locals() else []:
            docker_client.images.remove(image.id, force=True)
