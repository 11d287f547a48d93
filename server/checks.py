"""Operator commands behind the CLI: image builds with a progress display, and `doctor`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TextIO

import anyio
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from dockyard.runtime.engine import instance_id
from dockyard.runtime.runtimes.disks import host_check
from dockyard.runtime.runtimes.images import ImageService
from dockyard.runtime.runtimes.netguard import NetworkGuard
from dockyard.runtime.runtimes.poolstatus import pool_status
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.auditverify import load_export
from dockyard.runtime.substrate.docker import DockerBackend
from dockyard.runtime.substrate.errors import DockyardError
from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import Store

__all__ = ["build_images", "doctor", "export_audit", "reanchor_audit", "show_images", "show_pools", "verify_audit"]

console = Console(stderr=True)


def _images(settings: Settings) -> tuple[DockerBackend, ImageService]:
    docker = DockerBackend(settings.docker_host, settings.docker_timeout_s)
    return docker, ImageService(settings.images, docker, settings.data_dir / "build")


async def build_images(settings: Settings, recipes: list[str]) -> bool:
    """Build each recipe's image, showing the phase and step of each; False if one failed."""
    docker, images = _images(settings)
    ok = True
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[note]}"))
    with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
        for recipe in recipes:
            task = progress.add_task(images.tag(recipe), total=None, note="checking")
            async with anyio.create_task_group() as tg:

                async def watch(recipe: str = recipe, task: TaskID = task) -> None:
                    while True:
                        state = images.state(recipe)
                        if state is not None:
                            progress.update(
                                task, total=state.total or None, completed=state.step, note=state.describe()[:70]
                            )
                        await anyio.sleep(0.2)

                tg.start_soon(watch)
                try:
                    await images.ensure(recipe)
                    progress.update(task, total=1, completed=1, note="[green]ready")
                except DockyardError as exc:
                    ok = False
                    progress.update(task, total=1, completed=0, note="[red]failed")
                    console.print(f"[red]{recipe}:[/red] {exc}")
                tg.cancel_scope.cancel()
    await docker.close()
    return ok


async def show_images(settings: Settings) -> None:
    docker, images = _images(settings)
    table = Table("recipe", "image", "present", "current")
    for recipe in sorted({t.image for t in settings.templates.values()}):
        status = await images.status(recipe)
        table.add_row(recipe, status.tag, _mark(status.is_present), _mark(status.is_current))
    Console().print(table)
    await docker.close()


async def show_pools(settings: Settings, as_json: bool) -> None:
    """Print every pool's status as the store records it (the server need not be running)."""
    store = Store(settings.store_path)
    await store.open()
    try:
        pools = await pool_status(store, settings)
    finally:
        await store.close()
    if as_json:
        print(json.dumps([p.model_dump() for p in pools], indent=2))
        return
    table = Table(
        "template",
        "warm",
        "claimed",
        "starting",
        "draining",
        "removing",
        "min/target/max",
        "queue",
        "warm/cold claims",
        "claim ms p50/p95/p99",
    )
    for p in pools:
        latency = "/".join("-" if v is None else f"{v:g}" for v in (p.claim_ms_p50, p.claim_ms_p95, p.claim_ms_p99))
        table.add_row(
            p.template,
            str(p.warm),
            str(p.claimed),
            str(p.provisioning),
            str(p.draining),
            str(p.destroying),
            f"{p.min}/{p.target}/{p.max}",
            str(p.queue_depth),
            f"{p.claims_warm}/{p.claims_cold}",
            latency,
        )
    Console().print(table)


async def verify_audit(settings: Settings, as_json: bool, against: Path | None = None) -> bool:
    """Walk the audit log's chain, check its key and signed head (and an earlier export, if
    given), and print the verdict; True when intact."""
    export = load_export(await anyio.Path(against).read_text()) if against is not None else None
    store = Store(settings.store_path)
    await store.open()
    try:
        result = await AuditLog(store, settings.data_dir).verify(against=export)
    finally:
        await store.close()
    if as_json:
        print(result.model_dump_json(indent=2))
    elif result.intact:
        anchored = (
            f", signed head at {result.head_rows} rows" if result.head_rows is not None else ", no signed head yet"
        )
        lag = f" (+{result.unanchored_rows} after it)" if result.unanchored_rows else ""
        legacy = f"; {result.legacy_rows} rows from before the audit key" if result.legacy_rows else ""
        print(f"audit log intact: {result.rows_checked} rows{anchored}{lag}{legacy}")
    else:
        for finding in result.findings:
            where = f" at row {finding.row_id}" if finding.row_id is not None else ""
            print(f"audit log broken{where} ({finding.kind}): {finding.reason}")
    return result.intact


async def reanchor_audit(settings: Settings) -> None:
    """Record what verify finds in an audit.reanchor row and sign a new head over the table."""
    store = Store(settings.store_path)
    await store.open()
    try:
        found = await AuditLog(store, settings.data_dir).reanchor(settings.operator)
    finally:
        await store.close()
    for finding in found.findings:
        print(f"recorded ({finding.kind}): {finding.reason}")
    print("signed a new audit head over the table as it is; damage in the chain itself stays visible")


async def export_audit(settings: Settings, out: TextIO) -> int:
    """Write every audit row as a JSON line, then the signed head; returns the row count."""
    store = Store(settings.store_path)
    await store.open()
    try:
        rows, head = await AuditLog(store, settings.data_dir).export()
    finally:
        await store.close()
    for row in rows:
        out.write(json.dumps(row, sort_keys=True) + "\n")
    out.write(json.dumps({"head": head}, sort_keys=True) + "\n")
    out.flush()
    return len(rows)


async def doctor(settings: Settings) -> bool:
    """Check everything dockyard needs and print what to fix; True when all is well."""
    table = Table("check", "status", "detail")
    healthy = True

    def row(name: str, ok: bool, detail: str, fix: str = "") -> None:
        nonlocal healthy
        healthy &= ok
        table.add_row(name, _mark(ok), detail if ok else f"{detail}\n[yellow]fix:[/yellow] {fix}")

    row("config", True, f"templates: {', '.join(settings.templates)}; data dir {settings.data_dir}")
    try:
        store = Store(settings.store_path)
        await store.open()
        await store.close()
        row("store", True, f"{settings.store_path} (instance {instance_id(settings)})")
    except OSError as exc:
        row("store", False, str(exc), "make the data dir writable or set DOCKYARD_DATA_DIR")

    docker, images = _images(settings)
    try:
        info = await docker.version()
        row(
            "docker",
            True,
            f"Docker Engine {info.get('Version')} (API {info.get('ApiVersion')}) at {settings.docker_host}",
        )
    except DockyardError as exc:
        row("docker", False, str(exc), "start Docker (e.g. `sudo systemctl start docker`) or set DOCKER_HOST")
        Console().print(table)
        return False
    for recipe in sorted({t.image for t in settings.templates.values()}):
        status = await images.status(recipe)
        detail = f"{status.tag}: " + (
            "built and current" if status.is_current else "stale" if status.is_present else "missing"
        )
        row(f"image {recipe}", status.is_current, detail, "run `dockyard images build` (also done on first use)")
    rules = await NetworkGuard(instance_id(settings)).check()
    if rules.startswith("missing"):
        # not a failure: sandboxes on network 'none' (the default) need no rules
        table.add_row(
            "network rules",
            _mark(None),
            f"{rules}\n[yellow]fix:[/yellow] run dockyard as root "
            "(or with CAP_NET_ADMIN) on a host with iptables, and Docker with its iptables rules on",
        )
    else:
        table.add_row("network rules", _mark(True), rules)
    default_runtime, registered = await docker.oci_runtimes()
    table.add_row(
        "OCI runtime", _mark(True), f"Docker's default: {default_runtime}; registered: {', '.join(registered)}"
    )
    for name, tpl in sorted(settings.templates.items()):
        if tpl.runtime is not None:
            row(
                f"template {name}",
                tpl.runtime in registered,
                f"runs its sandboxes under {tpl.runtime}",
                f"install {tpl.runtime} and register it with Docker (see the README), or remove `runtime`",
            )
    lacking = host_check()
    if lacking is not None:
        table.add_row(
            "sandbox disks",
            _mark(None),
            f"missing: {lacking}; /workspace and /home are Docker volumes "
            "without a size limit\n[yellow]fix:[/yellow] run dockyard as root on a host with loop devices",
        )
    else:
        table.add_row(
            "sandbox disks", _mark(True), "an ext4 image per sandbox on a loop device, of its template's disk_mb"
        )
    if shutil.which("debootstrap") is None:
        hint = (
            "installed automatically when running as root"
            if os.geteuid() == 0
            else "`sudo apt-get install debootstrap`"
        )
        table.add_row("debootstrap", _mark(None), f"not installed; needed only where no registry answers ({hint})")
    await docker.close()
    Console().print(table)
    return healthy


def _mark(ok: bool | None) -> str:
    return {True: "[green]ok[/green]", False: "[red]FAIL[/red]", None: "[yellow]note[/yellow]"}[ok]
