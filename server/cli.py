"""The `dockyard` command line: serve, images, pool status, audit verify and export, doctor, version."""

from __future__ import annotations

import json
import logging
import os
import sys
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

import anyio
import typer
from rich.console import Console

from dockyard.runtime.substrate.actions import Toolset
from dockyard.runtime.substrate.errors import DockyardError
from dockyard.runtime.substrate.settings import Settings, load_settings
from dockyard.server import checks, transports
from dockyard.server.admin import admin_key, mint_as_admin
from dockyard.server.app import build_server

__all__ = ["app", "main"]

app = typer.Typer(help="dockyard: an MCP server for isolated agent runtimes.", no_args_is_help=True)
images_app = typer.Typer(help="Build and inspect runtime images.", no_args_is_help=True)
app.add_typer(images_app, name="images")
pool_app = typer.Typer(help="Inspect the warm pools.", no_args_is_help=True)
app.add_typer(pool_app, name="pool")
audit_app = typer.Typer(help="Check and export the audit log.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
token_app = typer.Typer(help="Mint tokens for HTTP clients, with the admin's authority.", no_args_is_help=True)
app.add_typer(token_app, name="token")

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


def _toolsets(names: str | None) -> list[Toolset] | None:
    if names is None:
        return None
    chosen = [name.strip() for name in names.split(",") if name.strip()]
    if unknown := [name for name in chosen if name not in list(Toolset)]:
        err.print(f"[red]unknown toolset {', '.join(unknown)}[/red]; choose from {', '.join(Toolset)}")
        raise typer.Exit(2)
    return [Toolset(name) for name in chosen]


@app.command()
def serve(
    config: ConfigOption = None,
    http: Annotated[
        str | None,
        typer.Option(
            "--http",
            metavar="HOST:PORT",
            help="Serve streamable HTTP with bearer tokens at http://HOST:PORT/mcp instead of stdio.",
        ),
    ] = None,
    toolsets: Annotated[
        str | None,
        typer.Option(
            "--toolsets",
            metavar="NAMES",
            help=f"Comma-separated toolsets to offer ({', '.join(Toolset)}); default: [toolsets] in the config "
            "(stdio: sandbox,dispatch; HTTP: all, each caller seeing what its token's scopes allow).",
        ),
    ] = None,
) -> None:
    """Run the MCP server: on stdio for the local operator (Claude Desktop, Claude Code, Cursor,
    VS Code...), or with --http for clients holding tokens."""
    settings = _settings(config)
    _logging(settings.log_level)
    offered = _toolsets(toolsets)
    if http is None:
        anyio.run(transports.run_stdio, build_server(settings, toolsets=offered))
        return
    host, _, port = http.rpartition(":")
    if not host or not port.isdigit():
        Console(stderr=True).print(f"[red]--http wants HOST:PORT, such as 127.0.0.1:8765; got {http!r}")
        raise typer.Exit(2)
    host = host.strip("[]")
    key, path, created = admin_key(settings)
    if created:
        Console(stderr=True).print(
            f"dockyard: generated the admin key in {path} (readable by you only); it mints tokens"
        )
    elif path is not None:
        Console(stderr=True).print(f"dockyard: the admin key is in {path}")
    bearer = transports.BearerTokens()
    anyio.run(
        transports.run_http,
        build_server(settings, bearer=bearer, admin_key=key, toolsets=offered),
        bearer,
        host,
        int(port),
    )


@images_app.command("build")
def images_build(
    config: ConfigOption = None,
    recipe: Annotated[
        list[str] | None, typer.Argument(help="Recipes to build (default: all used by templates).")
    ] = None,
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
    """Show each pool's warm/claimed/provisioning/draining/removing runtimes, queue and claim latency."""
    settings = _settings(config)
    anyio.run(checks.show_pools, settings, as_json)


@audit_app.command("verify")
def audit_verify(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of sentences.")] = False,
    against: Annotated[
        Path | None,
        typer.Option(
            "--against", help="An earlier `dockyard audit export`: its rows must still be in the log, unchanged."
        ),
    ] = None,
) -> None:
    """Walk the audit log's hash chain and check its key and signed head; exit 1 and say what
    was done (rows edited, deleted, cut from the tail, the table emptied, the chain recomputed
    without the key, the head removed or forged) if it was tampered with."""
    settings = _settings(config)
    _logging("WARNING")
    if against is not None and not against.is_file():
        err.print(f"[red]no export at {against}")
        raise typer.Exit(2)
    try:
        intact = anyio.run(checks.verify_audit, settings, as_json, against)
    except ValueError as exc:
        err.print(f"[red]{against} is not an audit export:[/red] {exc}")
        raise typer.Exit(2) from exc
    raise typer.Exit(0 if intact else 1)


@audit_app.command("export")
def audit_export(
    config: ConfigOption = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here instead of to stdout.")] = None,
) -> None:
    """Write every audit row as JSON lines, then the signed head, to keep a copy elsewhere;
    `dockyard audit verify --against` checks the log against it later."""
    settings = _settings(config)
    _logging("WARNING")
    if output is None:
        count = anyio.run(checks.export_audit, settings, sys.stdout)
    else:
        with output.open("w") as out:
            count = anyio.run(checks.export_audit, settings, out)
    err.print(f"exported {count} audit rows and the signed head")


@audit_app.command("reanchor")
def audit_reanchor(config: ConfigOption = None) -> None:
    """After looking into a broken log (export it first): record what verify finds in an
    audit.reanchor row and sign a new head over the table as it is, so new rows are anchored
    again. Rows edited, deleted or recomputed stay reported; only the head is renewed."""
    settings = _settings(config)
    _logging("WARNING")
    anyio.run(checks.reanchor_audit, settings)


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


# The host programs dockyard runs (mkfs.ext4, iptables, debootstrap...) live in the sbin folders,
# which a client starting the server (a desktop app, say) often leaves off PATH.
_SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")


def _system_path() -> None:
    """Append the system's program folders that PATH lacks, for this process and its children."""
    present = os.environ.get("PATH", "").split(os.pathsep)
    missing = [folder for folder in _SYSTEM_DIRS if folder not in present]
    if missing:
        os.environ["PATH"] = os.pathsep.join([p for p in present if p] + missing)


def main() -> None:
    _system_path()
    app()


@token_app.command("mint")
def token_mint(
    scope: Annotated[
        list[str], typer.Option("--scope", "-s", help="A scope to grant; repeat for more (e.g. sandbox:create).")
    ],
    workspace: Annotated[str, typer.Option("--workspace", "-w", help="The workspace the token acts in.")],
    project: Annotated[str, typer.Option("--project", help="Project id.")] = "default",
    user: Annotated[str, typer.Option("--user", help="User id.")] = "user",
    ttl: Annotated[int | None, typer.Option("--ttl", help="Lifetime in seconds (default 24 h).")] = None,
    label: Annotated[str | None, typer.Option("--label", help="A note for the audit log.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Mint a token (the secret is printed once; only its hash is stored)."""
    settings = _settings(config)
    _logging("WARNING")
    try:
        minted = anyio.run(
            lambda: mint_as_admin(
                settings, scopes=scope, workspace_id=workspace, project_id=project, user_id=user, ttl_s=ttl, label=label
            )
        )
    except DockyardError as exc:
        Console(stderr=True).print(f"[red]{exc}")
        raise typer.Exit(2) from exc
    if as_json:
        print(
            json.dumps(
                {
                    "token": minted.token,
                    "token_id": minted.token_id,
                    "identity": minted.identity.model_dump(),
                    "expires_at": minted.expires_at.isoformat() if minted.expires_at else None,
                }
            )
        )
    else:
        print(minted.token)
        Console(stderr=True).print(
            f"token {minted.token_id}: {', '.join(minted.identity.scopes)} in workspace {workspace}, "
            f"expires {minted.expires_at.isoformat() if minted.expires_at else 'never'}"
        )
