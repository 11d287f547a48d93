"""The `dockyard` command line: serve, images, pool status, doctor, version."""

from __future__ import annotations

import logging
import sys
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

import anyio
import typer
from rich.console import Console

from dockyard.runtime.settings import Settings, load_settings
from dockyard.server import checks, transports
from dockyard.server.app import build_server

__all__ = ["app", "main"]

app = typer.Typer(help="dockyard: an MCP server for isolated agent runtimes.", no_args_is_help=True)
images_app = typer.Typer(help="Build and inspect runtime images.", no_args_is_help=True)
app.add_typer(images_app, name="images")
pool_app = typer.Typer(help="Inspect the warm pools.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="DOCKYARD_CONFIG", help="A TOML file that overrides the defaults."),
]
err = Console(stderr=True)


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except (FileNotFoundError, ValueError) as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _logging(level: str) -> None:
    # stdout belongs to the MCP stdio transport: logs always go to stderr.
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Docker API request is noise


@app.command()
def serve(config: ConfigOption = None) -> None:
    """Run the MCP server on stdio (for Claude Desktop, Claude Code, Cursor, VS Code...)."""
    settings = _settings(config)
    _logging(settings.log_level)
    anyio.run(transports.run_stdio, build_server(settings))


@images_app.command("build")
def images_build(
    config: ConfigOption = None,
    recipe: Annotated[list[str] | None, typer.Argument(help="Recipes to build (default: all used by templates).")] = None,
) -> None:
    """Build the runtime images (bootstrapping the Debian base if needed), with progress."""
    settings = _settings(config)
    _logging("WARNING")
    ok = anyio.run(checks.build_images, settings, recipe or sorted({t.image for t in settings.templates.values()}))
    raise typer.Exit(0 if ok else 1)


@images_app.command("status")
def images_status(config: ConfigOption = None) -> None:
    """Show whether each runtime image is built and up to date."""
    settings = _settings(config)
    anyio.run(checks.show_images, settings)


@pool_app.command("status")
def pool_status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show each pool's warm/claimed/provisioning/draining runtimes, queue and claim latency."""
    settings = _settings(config)
    anyio.run(checks.show_pools, settings, as_json)


@app.command()
def doctor(config: ConfigOption = None) -> None:
    """Check the Docker daemon, images, store and config, and say what to fix."""
    settings = _settings(config)
    _logging("WARNING")
    raise typer.Exit(0 if anyio.run(checks.doctor, settings) else 1)


@app.command()
def version() -> None:
    """Print dockyard's version."""
    print(package_version("dockyard"))


def main() -> None:
    app()
