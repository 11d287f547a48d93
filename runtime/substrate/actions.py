"""The names of what a caller may do, declared once: `Action` is what the audit log records in a
row's `kind` (and what a refusal is recorded under), `Scope` is what a token may hold, and
`Toolset` is a family of tools a server may offer (config `[toolsets]`, `serve --toolsets`).

Both are `StrEnum`s, so a member is the very string that is stored, audited and shown to a
client: `Action.SANDBOX_EXEC == "sandbox.exec"`, `Scope.SANDBOX_EXEC == "sandbox:exec"`. An
action is `<family>.<verb>`, mostly the tool's name with a dot (`sandbox_exec` records
`sandbox.exec`); a scope is `<family>:<right>`.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Action", "Scope", "Toolset"]


class Action(StrEnum):
    """An audited action: the `kind` of its audit rows, whether it was done, failed or refused."""

    # Sandboxes and their snapshots.
    SANDBOX_CREATE = "sandbox.create"
    SANDBOX_EXEC = "sandbox.exec"
    SANDBOX_WRITE_FILE = "sandbox.write_file"
    SANDBOX_READ_FILE = "sandbox.read_file"
    SANDBOX_READ_OUTPUT = "sandbox.read_output"  # reading a command's full output (dockyard://sandboxes/.../execs/...)
    SANDBOX_LIST_FILES = "sandbox.list_files"
    SANDBOX_EXPOSE_PORT = "sandbox.expose_port"
    SANDBOX_SNAPSHOT = "sandbox.snapshot"
    SANDBOX_LIST = "sandbox.list"
    SANDBOX_DESTROY = "sandbox.destroy"
    SANDBOX_EXPIRE = "sandbox.expire"  # dockyard destroys a sandbox whose ttl ran out
    SNAPSHOT_DELETE = "snapshot.delete"
    SNAPSHOT_LIST = "snapshot.list"

    # Computers (headless browsers).
    COMPUTER_CREATE = "computer.create"
    COMPUTER_LIST = "computer.list"
    COMPUTER_NAVIGATE = "computer.navigate"
    COMPUTER_SNAPSHOT = "computer.snapshot"  # the page's accessibility tree, not a runtime snapshot
    COMPUTER_CLICK = "computer.click"
    COMPUTER_TYPE = "computer.type"
    COMPUTER_PRESS = "computer.press"
    COMPUTER_SCROLL = "computer.scroll"
    COMPUTER_WAIT_FOR = "computer.wait_for"
    COMPUTER_UPLOAD = "computer.upload"  # a file from a sandbox into a page's file input
    COMPUTER_SCREENSHOT = "computer.screenshot"
    COMPUTER_DESTROY = "computer.destroy"
    COMPUTER_EXPIRE = "computer.expire"  # dockyard destroys a computer whose ttl ran out

    POOL_STATUS = "pool.status"

    # Dispatches.
    DISPATCH_CREATE = "dispatch.create"
    DISPATCH_AWAIT = "dispatch.await"
    DISPATCH_READ = "dispatch.read"  # reading a dispatch's resource (dockyard://dispatches/...)
    DISPATCH_CANCEL = "dispatch.cancel"
    DISPATCH_LIST = "dispatch.list"
    DISPATCH_SUBMIT = "dispatch.submit"  # a run hands in its result, with its own token as proof
    DISPATCH_RUN = "dispatch.run"  # dockyard starts a dispatch's run (a `started` row)
    DISPATCH_FINISH = "dispatch.finish"  # a dispatch's run ended, however it ended

    # Long calls handed back as tasks (the MCP Tasks extension).
    TASK_GET = "task.get"  # tasks/get: a task's state, and its result once done
    TASK_UPDATE = "task.update"  # tasks/update: input for a task (none of dockyard's asks for any)
    TASK_CANCEL = "task.cancel"  # tasks/cancel: stop a task's call

    # Teams.
    TEAM_CREATE = "team.create"
    TEAM_SPAWN = "team.spawn"
    TEAM_MESSAGE = "team.message"
    TEAM_BROADCAST = "team.broadcast"
    TEAM_TASKS = "team.tasks"
    TEAM_READ = "team.read"  # reading one's inbox
    TEAM_ADD_TASKS = "team.add_tasks"
    TEAM_CLAIM = "team.claim"
    TEAM_COMPLETE = "team.complete"
    TEAM_PROPOSE_PLAN = "team.propose_plan"
    TEAM_APPROVE_PLAN = "team.approve_plan"
    TEAM_SHUTDOWN = "team.shutdown"
    TEAM_CLEANUP = "team.cleanup"
    TEAM_LIST = "team.list"
    TEAM_TURN = "team.turn"  # one turn of a member's runner, from its wake-up to its answer

    # Tokens and the audit log.
    WHOAMI = "whoami"
    CAPABILITIES_READ = "capabilities.read"  # what the server offers the caller, and its use of each quota
    TOKEN_MINT = "token.mint"
    TOKEN_REVOKE = "token.revoke"
    AUDIT_QUERY = "audit.query"
    AUDIT_VERIFY = "audit.verify"
    AUDIT_REANCHOR = "audit.reanchor"  # the operator signs a new head over a log found broken
    BRIDGE_TOKEN = "bridge.token"  # a session from inside a sandbox presents (or fails to present) a token


class Scope(StrEnum):
    """A right a token may hold; the admin key, and a token minted with `*`, hold them all."""

    SANDBOX_CREATE = "sandbox:create"  # create, expose, snapshot and destroy sandboxes
    SANDBOX_EXEC = "sandbox:exec"
    SANDBOX_FILES = "sandbox:files"
    POOL_READ = "pool:read"
    COMPUTER_USE = "computer:use"
    DISPATCH_CREATE = "dispatch:create"  # create and cancel dispatches
    DISPATCH_READ = "dispatch:read"
    DISPATCH_USER_PC = "dispatch:user_pc"  # dispatch to the host's own runner (mode user_pc)
    TEAM_LEAD = "team:lead"
    TEAM_MEMBER = "team:member"
    TOKEN_MINT = "token:mint"  # mint and revoke tokens, never wider than one's own
    AUDIT_READ = "audit:read"
    WORKSPACE_ADMIN = "workspace:admin"  # end what another user of the workspace made


class Toolset(StrEnum):
    """A family of tools a server offers or leaves out; each tool belongs to exactly one."""

    SANDBOX = "sandbox"  # sandboxes, their files, ports and snapshots; whoami
    COMPUTER = "computer"  # headless browsers
    DISPATCH = "dispatch"  # handing tasks off and collecting their results
    TEAM = "team"  # agent teams: members, messages, tasks, plans
    ADMIN = "admin"  # capabilities, tokens, the audit log, the pools
