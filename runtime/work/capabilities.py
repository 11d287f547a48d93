"""What this dockyard offers one caller: dispatch modes, runners, templates, quotas with the
caller's own use of each, and how programs inside a sandbox reach the tools (the bridge).

Everything is filtered by the caller's token: a part it has no scope for is left out, and a
count is only ever of the caller's own workspace, user or run tree. A tenant-wide quota shows
its limit but not its use, which would count other workspaces.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field
from sqlmodel import Session, col, func, select

from dockyard.runtime.substrate.actions import Scope
from dockyard.runtime.substrate.settings import Identity, RunnerProfile, Settings
from dockyard.runtime.substrate.store import (
    Computer,
    Dispatch,
    RunLink,
    Sandbox,
    SandboxStatus,
    Snapshot,
    Store,
    utcnow,
)
from dockyard.runtime.work.dispatch.routing import Mode

__all__ = ["BridgeInfo", "Capabilities", "ModeInfo", "QuotaInfo", "RunnerInfo", "TemplateInfo", "capabilities"]

_ANY = "*"
_SANDBOX = (Scope.SANDBOX_CREATE, Scope.SANDBOX_EXEC, Scope.SANDBOX_FILES)
_MODES = {
    Mode.REMOTE: "a fresh sandbox from the pool, made for this dispatch and destroyed when it ends: copy out "
    "what you need (the result is the runner's output, or what it hands in with dispatch_submit)",
    Mode.LOCAL: "your own sandbox (sandbox_id), which stays yours afterwards with whatever the run left in it",
    Mode.TEAM_SINGLE_VM: "one runner per member (members: a prompt each), all in one fresh sandbox, each member as "
    "a user of its own there; the sandbox is destroyed at the end",
    Mode.TEAM_MULTI_VM: "one runner per member, each in a fresh sandbox of its own, destroyed at the end",
    Mode.USER_PC: "the machine dockyard runs on, outside any sandbox, after the user confirms each run",
}
_TEAM_RESULT = (
    " The result is every member's output in order, one '[member N] ...' line each (no model combines them); "
    "the dispatch fails if any member fails."
)


class ModeInfo(BaseModel):
    """A dispatch mode and whether this caller may use it."""

    name: str
    enabled: bool
    what: str = Field(description="Where the work runs and what becomes of its sandbox.")
    why_not: str | None = Field(None, description="Why it is off for you, when it is.")


class RunnerInfo(BaseModel):
    """A runner profile from config (`[runners.NAME]`)."""

    name: str
    kind: str = Field(description="script, command or llm.")
    prompt: str = Field(description="What `prompt` (or a member's prompt) means for this runner.")
    timeout_s: int
    on_user_pc: bool = Field(description="Whether mode user_pc may use it.")


class TemplateInfo(BaseModel):
    """A runtime template (`[templates.NAME]`): what its runtimes are, their limits and their pool."""

    name: str
    kind: str = Field(description="sandbox (sandbox_create) or computer (computer_create).")
    image: str
    is_default: bool
    cpus: float
    memory_mb: int
    pids_limit: int
    tmp_size_mb: int
    disk_mb: int = Field(description="/workspace and /home together; 0: no limit.")
    network: str
    pool_min: int = Field(description="Runtimes kept warm.")
    pool_max: int = Field(description="Runtimes at most, for every workspace together.")
    workspace_share: int = Field(description="The most of this pool your workspace may hold at once.")


class QuotaInfo(BaseModel):
    """A quota, its limit and how much of it you use now."""

    name: str = Field(description="The setting under [quotas].")
    limit: int = Field(description="0: no limit.")
    used: int | None = Field(description="Your current use; null where it would count other workspaces.")
    unit: str


class BridgeInfo(BaseModel):
    """How a program inside a sandbox calls dockyard's tools."""

    command: str = "dockyard-bridge"
    how: str = (
        "an MCP server on stdio inside every sandbox: point any MCP client's stdio transport at it. It needs no "
        "network (it works with network 'none'); the supervisor relays it to this server."
    )
    shell: str = (
        "dockyard-call TOOL '{\"arg\": ...}' prints the tool's structured result as one JSON line (exit 1 when "
        "the tool fails); dockyard-call --list names the tools."
    )
    python: str = "/opt/dockyard/client/bin/python has the official MCP Python SDK."
    identity: str = (
        "A session acts as the sandbox's own token: sandbox:exec and sandbox:files on that sandbox only. With "
        "DOCKYARD_TOKEN set (a dispatch runner and a team member find their token there) it acts as that token "
        "instead, which must be bound to this sandbox; MCP clients pass few variables on, so give it in the "
        "server's env."
    )
    templates: list[str] = Field(description="The templates whose sandboxes have it (computers do not).")


class Capabilities(BaseModel):
    """What this server offers you, as your token allows you to see it."""

    workspace_id: str
    scopes: list[str]
    modes: list[ModeInfo] = Field(description="Dispatch modes; empty without dispatch:create.")
    runners: list[RunnerInfo] = Field(description="For dispatch and team_spawn; empty without either scope.")
    templates: list[TemplateInfo] = Field(
        description="Sandbox templates with a sandbox scope, computers with computer:use."
    )
    sandbox_limits: dict[str, Any] = Field(description="Caps on what sandbox_create and sandbox_exec accept.")
    quotas: list[QuotaInfo]
    bridge: BridgeInfo | None = Field(None, description="How programs inside a sandbox reach the tools.")
    notice: str | None = None


def _prompt(profile: RunnerProfile) -> str:
    if profile.kind == "script":
        return "a bash script, run in the sandbox as its user; its stdout is the result"
    if profile.kind == "command":
        program = profile.argv[0] if profile.argv else "the program"
        return (
            f"the task for the agent CLI '{program}': it replaces {{prompt}} in the profile's argv as one argument "
            "(no shell); the program's stdout is the result"
        )
    return (
        f"the task for the model '{profile.model}', which works in the sandbox with exec, read_file and write_file "
        "tools (members also get the team tools); its final answer is the result"
    )


def _modes(settings: Settings, who: Identity) -> list[ModeInfo]:
    if not who.allows(Scope.DISPATCH_CREATE):
        return []
    modes = []
    for mode, what in _MODES.items():
        why = None
        if mode == Mode.USER_PC and not settings.dispatch.user_pc.enabled:
            why = "off on this server ([dispatch.user_pc] enabled = false)"
        elif mode == Mode.USER_PC and not who.allows(Scope.DISPATCH_USER_PC):
            why = "your token lacks the dispatch:user_pc scope"
        team = _TEAM_RESULT if mode in (Mode.TEAM_SINGLE_VM, Mode.TEAM_MULTI_VM) else ""
        modes.append(ModeInfo(name=mode, enabled=why is None, what=what + "." + team, why_not=why))
    return modes


def _runners(settings: Settings, who: Identity) -> list[RunnerInfo]:
    if not (who.allows(Scope.DISPATCH_CREATE) or who.allows(Scope.TEAM_LEAD)):
        return []
    host = settings.dispatch.user_pc
    return [
        RunnerInfo(
            name=name,
            kind=profile.kind,
            prompt=_prompt(profile),
            timeout_s=profile.timeout_s,
            on_user_pc=host.enabled and name in host.runners and profile.kind != "llm",
        )
        for name, profile in sorted(settings.runners.items())
    ]


def _templates(settings: Settings, who: Identity) -> list[TemplateInfo]:
    shown = []
    for name, template in sorted(settings.templates.items()):
        allowed = who.allows(Scope.COMPUTER_USE) if template.kind == "computer" else any(map(who.allows, _SANDBOX))
        if not allowed:
            continue
        default = (
            settings.computers.default_template if template.kind == "computer" else settings.sandbox.default_template
        )
        shown.append(
            TemplateInfo(
                name=name,
                kind=template.kind,
                image=template.image,
                is_default=name == default,
                cpus=template.cpus,
                memory_mb=template.memory_mb,
                pids_limit=template.pids_limit,
                tmp_size_mb=template.tmp_size_mb,
                disk_mb=template.disk_mb,
                network=template.network,
                pool_min=template.pool.min,
                pool_max=template.pool.max,
                workspace_share=settings.quotas.pool_share(template.pool.max),
            )
        )
    return shown


def _sandbox_limits(settings: Settings, who: Identity) -> dict[str, Any]:
    if not any(map(who.allows, _SANDBOX)):
        return {}
    limits = settings.sandbox
    return {
        "networks": ["none", "workspace", *(["internet"] if limits.allow_internet else [])],
        "max_cpus": limits.max_cpus,
        "max_memory_mb": limits.max_memory_mb,
        "default_ttl_s": limits.default_ttl_s,
        "max_ttl_s": limits.max_ttl_s,
        "exec_default_timeout_s": limits.exec_default_timeout_s,
        "exec_max_timeout_s": limits.exec_max_timeout_s,
        "output_cap_bytes": limits.output_cap_bytes,
        "read_cap_bytes": limits.read_cap_bytes,
        "write_cap_bytes": limits.write_cap_bytes,
    }


def _running(session: Session, model: type[Sandbox] | type[Computer], who: Identity, **match: str | None) -> int:
    stmt = (
        select(func.count())
        .select_from(model)
        .where(model.status == SandboxStatus.RUNNING, model.workspace_id == who.workspace_id)
    )
    for column, value in match.items():
        stmt = stmt.where(getattr(model, column) == value)
    return session.exec(stmt).one()


def _in_tree(session: Session, model: type[Sandbox] | type[Computer], who: Identity) -> int | None:
    if who.run_id is None:
        return None
    below = select(RunLink.run_id).where(RunLink.ancestor_id == who.run_id)
    stmt = (
        select(func.count())
        .select_from(model)
        .where(
            model.status == SandboxStatus.RUNNING,
            model.workspace_id == who.workspace_id,
            (col(model.run_id) == who.run_id) | col(model.run_id).in_(below),
        )
    )
    return session.exec(stmt).one()


def _quotas(settings: Settings, who: Identity) -> Callable[[Session], list[QuotaInfo]]:
    """A store step counting the caller's use of each quota its scopes reach."""
    quotas = settings.quotas

    def count(session: Session) -> list[QuotaInfo]:
        found: list[QuotaInfo] = []
        kinds: list[tuple[str, type[Sandbox] | type[Computer]]] = []
        if any(map(who.allows, _SANDBOX)):
            kinds.append(("sandboxes", Sandbox))
        if who.allows(Scope.COMPUTER_USE):
            kinds.append(("computers", Computer))
        for noun, model in kinds:
            found += [
                QuotaInfo(name=f"tenant_{noun}", limit=getattr(quotas, f"tenant_{noun}"), used=None, unit=noun),
                QuotaInfo(
                    name=f"workspace_{noun}",
                    limit=getattr(quotas, f"workspace_{noun}"),
                    used=_running(session, model, who),
                    unit=noun,
                ),
                QuotaInfo(
                    name=f"user_{noun}",
                    limit=getattr(quotas, f"user_{noun}"),
                    used=_running(session, model, who, user_id=who.user_id),
                    unit=noun,
                ),
            ]
            if who.run_id is not None:
                found.append(
                    QuotaInfo(
                        name=f"run_{noun}",
                        limit=getattr(quotas, f"run_{noun}"),
                        used=_in_tree(session, model, who),
                        unit=noun,
                    )
                )
        if any(map(who.allows, _SANDBOX)):
            sizes = session.exec(select(Snapshot.size_bytes).where(Snapshot.workspace_id == who.workspace_id)).all()
            found.append(
                QuotaInfo(
                    name="workspace_snapshot_mb", limit=quotas.workspace_snapshot_mb, used=sum(sizes) >> 20, unit="MiB"
                )
            )
        if who.allows(Scope.DISPATCH_CREATE):
            since = utcnow() - timedelta(seconds=60)
            started = session.exec(
                select(func.count())
                .select_from(Dispatch)
                .where(Dispatch.workspace_id == who.workspace_id, col(Dispatch.created_at) >= since)
            ).one()
            found.append(
                QuotaInfo(
                    name="dispatches_per_minute",
                    limit=quotas.dispatches_per_minute,
                    used=started,
                    unit="dispatches in the last 60 s",
                )
            )
        return found

    return count


async def capabilities(settings: Settings, store: Store, who: Identity) -> Capabilities:
    """What `who` may use here, and how much of each quota it holds now."""
    if who.workspace_id == _ANY:
        return Capabilities(
            workspace_id=_ANY,
            scopes=list(who.scopes),
            modes=[],
            runners=[],
            templates=[],
            sandbox_limits={},
            quotas=[],
            notice="the admin key only mints tokens and reads the audit; mint a token for a workspace to work in it",
        )
    sandbox_templates = [name for name, t in sorted(settings.templates.items()) if t.kind == "sandbox"]
    reaches = any(map(who.allows, (*_SANDBOX, Scope.DISPATCH_CREATE, Scope.TEAM_LEAD)))
    return Capabilities(
        workspace_id=who.workspace_id,
        scopes=list(who.scopes),
        modes=_modes(settings, who),
        runners=_runners(settings, who),
        templates=_templates(settings, who),
        sandbox_limits=_sandbox_limits(settings, who),
        quotas=await store.run(_quotas(settings, who)),
        bridge=BridgeInfo(templates=sandbox_templates) if reaches else None,
    )
