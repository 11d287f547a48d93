"""Domain results the engine returns; the tools hand them to clients as structured output."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "AuditEntry",
    "AuditFinding",
    "AuditPage",
    "AuditVerification",
    "ExecResult",
    "FileContent",
    "FileEntry",
    "FileListing",
    "FileReadResult",
    "FileWritten",
    "PoolInfo",
    "PortInfo",
    "SandboxInfo",
    "SnapshotInfo",
]


class SandboxInfo(BaseModel):
    """A sandbox as its owner sees it."""

    sandbox_id: str
    template: str
    status: str
    network: str
    cpus: float
    memory_mb: int
    created_at: datetime
    expires_at: datetime | None = Field(None, description="When the sandbox is destroyed automatically (UTC).")
    from_snapshot: str | None = None
    ports: dict[int, str] = Field(default_factory=dict, description="Exposed ports and their URLs.")


class ExecResult(BaseModel):
    """How a command ended and what it printed."""

    exit_code: int = Field(description="The command's exit code; 124 when it was killed at its timeout.")
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool = Field(description="True when stdout or stderr was cut at the output cap.")
    duration_ms: float
    exec_n: int | None = Field(None, description="The command's number in its sandbox, for its output resources.")
    stdout_uri: str | None = Field(
        None, description="Set when stdout here was cut to fit the result: the resource holding all of it."
    )
    stderr_uri: str | None = Field(
        None, description="Set when stderr here was cut to fit the result: the resource holding all of it."
    )


class FileWritten(BaseModel):
    """A file written into /workspace."""

    path: str = Field(description="The path relative to /workspace.")
    size: int


class FileContent(BaseModel):
    """A file read from /workspace."""

    path: str
    encoding: Literal["utf-8", "base64"]
    content: str
    size: int = Field(description="The file's full size in bytes.")
    truncated: bool = Field(description="True when only the first max_bytes were returned.")


class FileReadResult(BaseModel):
    """One page of a file read from /workspace: text here, or binary bytes as an embedded resource."""

    path: str
    encoding: Literal["utf-8", "binary"] = Field(
        description="utf-8: the page is in content; binary: content is empty and the page's bytes are the "
        "embedded resource (a blob) of this result."
    )
    content: str
    size: int = Field(description="The file's full size in bytes.")
    offset: int = Field(description="Where this page starts, in bytes.")
    length: int = Field(description="How many bytes of the file this page holds.")
    has_more: bool = Field(description="True when the file goes on after this page.")
    next_offset: int | None = Field(None, description="The offset of the next page, when there is one.")


class FileEntry(BaseModel):
    """One entry of a directory listing."""

    path: str = Field(
        description="Relative to /workspace; a byte that is not printable UTF-8 is shown as \\xNN (see is_addressable)."
    )
    type: Literal["file", "dir", "symlink", "fifo", "socket", "device", "other"]
    size: int
    mtime: float
    is_addressable: bool = Field(
        default=True,
        description="False when the name is not UTF-8 or holds control characters: the file tools cannot "
        "reach it by name (rename it with sandbox_exec).",
    )


class FileListing(BaseModel):
    """The entries under a directory of /workspace."""

    path: str
    entries: list[FileEntry]
    truncated: bool


class PortInfo(BaseModel):
    """A sandbox port reachable from this machine."""

    sandbox_id: str
    port: int
    url: str


class SnapshotInfo(BaseModel):
    """A saved copy of a sandbox's /workspace and home directory."""

    snapshot_id: str
    sandbox_id: str
    label: str | None
    size_bytes: int
    created_at: datetime


class PoolInfo(BaseModel):
    """One template's warm pool: its shape, its runtimes by state, its queue and its claims."""

    template: str
    network: str
    min: int
    max: int
    target: int = Field(description="Warm runtimes the pool keeps ready now (the autoscaler moves it).")
    autoscale: bool
    warm: int
    claimed: int
    provisioning: int
    draining: int
    destroying: int = Field(0, description="Runtimes being removed (they still hold a place under max until gone).")
    queue_depth: int
    workspace_share: int = Field(
        0, description="The most of this pool's runtimes one workspace may hold (quotas.workspace_pool_share)."
    )
    claims_warm: int = Field(description="Claims served from a warm runtime (recent history).")
    claims_cold: int = Field(description="Claims that had to wait for a container start.")
    claim_ms_p50: float | None = None
    claim_ms_p95: float | None = None
    claim_ms_p99: float | None = None


class AuditEntry(BaseModel):
    """One row of the audit log: who did what, on what, when, and how it ended."""

    id: int = Field(description="The row's place in the chain; ids only grow.")
    ts: datetime = Field(description="When the action ended, or for a `started` row when it began (UTC).")
    workspace_id: str
    project_id: str
    user_id: str
    run_id: str | None
    token_id: str | None = Field(description="The token the actor presented; null for the local operator.")
    kind: str = Field(description="The action, such as sandbox.exec or token.mint.")
    target: str | None = Field(description="What it acted on, such as a sandbox id.")
    outcome: str = Field(
        description="ok, error, denied, cancelled; started (a row written before the action ran, "
        "followed by its ending row, whose detail names it in started_id) or interrupted (the "
        "server stopped before the started action ended)."
    )
    detail: dict[str, Any] | None = Field(
        description="What the action was given and how it went (a command, a path, an exit code...); "
        "null unless details=true was asked for."
    )
    duration_ms: float


class AuditPage(BaseModel):
    """Audit rows, newest first, as many as fit the result budget."""

    rows: list[AuditEntry]
    more: bool = Field(description="True when more rows match: pass next_cursor to read on.")
    next_cursor: str | None = Field(None, description="Where the next page starts; opaque, for this query only.")


class AuditFinding(BaseModel):
    """One thing wrong with the audit log."""

    kind: str = Field(
        description="edited, deleted, reordered, recomputed (without the key), truncated (rows cut from the "
        "tail), emptied, head_missing, head_forged, key_missing or export_mismatch."
    )
    row_id: int | None = Field(None, description="The row it concerns, when it concerns one.")
    reason: str


class AuditVerification(BaseModel):
    """The result of walking the audit log's hash chain from its first row and checking its anchors."""

    rows_checked: int = Field(description="Rows examined, up to and including the first broken one.")
    intact: bool
    first_broken_id: int | None = Field(None, description="The first row whose hash, link or MAC is wrong.")
    reason: str | None = Field(None, description="What is wrong, in a sentence (the first finding's).")
    findings: list[AuditFinding] = Field(default_factory=list, description="Everything found wrong; empty when intact.")
    head_rows: int | None = Field(None, description="Rows the signed head vouches for; null without a valid head.")
    unanchored_rows: int | None = Field(
        None, description="Rows after the head's last row (a crash mid-append leaves one)."
    )
    legacy_rows: int = Field(0, description="Rows written before the audit key existed: checked by their chain only.")


class DispatchInfo(BaseModel):
    """A dispatch as its caller sees it."""

    dispatch_id: str
    mode: str = Field(description="The mode it runs in.")
    requested_mode: str = Field(description="The mode the caller asked for.")
    hint: str | None = Field(None, description="Set when a phrase in the task overrode the requested mode.")
    runner: str
    status: str = Field(description="queued, running, completed, failed, cancelled or interrupted.")
    result: str | None = Field(
        None,
        description="The runner's output (a script's stdout, an agent's answer), or what it handed in with "
        "dispatch_submit; team modes: each member's as a '[member N] ...' line.",
    )
    error: str | None = None
    sandbox_id: str | None = Field(None, description="The sandbox the work runs in.")
    members: list[dict] | None = Field(None, description="Team modes: each member's status and result.")
    next_steps: str | None = None


class TeamInfo(BaseModel):
    """A team as its lead sees it."""

    team_id: str
    name: str
    status: str = Field(description="active, or shut down.")
    sandbox_id: str | None = Field(None, description="The sandbox members with isolation 'shared' work in.")
    notice: str | None = Field(
        None, description="Something the lead must know, such as teammates a restart interrupted."
    )


class MemberInfo(BaseModel):
    """A teammate and what it is doing."""

    member_id: str
    role: str
    runner: str
    isolation: str = Field(description="shared (the team's sandbox) or own (a sandbox of its own).")
    status: str = Field(
        description="starting, busy (a turn runs), idle (waits for a message), ready (a restart interrupted it; a message resumes it), stopped, failed."
    )
    sandbox_id: str | None = None
    plan_mode: bool = False
    plan_status: str | None = Field(None, description="Plan mode: none yet, pending, approved or rejected.")
    plan: str | None = None
    plan_feedback: str | None = None
    turns: int = Field(0, description="Turns taken: the first prompt, then each batch of messages.")
    last_output: str | None = Field(
        None, description="What its last turn produced (a script's stdout, a model's answer)."
    )
    last_error: str | None = None
    notice: str | None = None


class TaskInfo(BaseModel):
    """A task on a team's shared list."""

    task_id: str
    title: str
    detail: str | None = None
    status: str = Field(description="open, claimed, done or failed.")
    owner: str | None = Field(None, description="The role of the member who claimed it.")
    result: str | None = None
    notice: str | None = None


class MessageInfo(BaseModel):
    """A message and its delivery receipt."""

    message_id: int
    sender: str = Field(description="A member's role, or 'lead'.")
    author: str = Field(description="Who wrote it: for the lead side, the user who sent it; else the member's role.")
    recipient: str = Field(description="A member's role, or 'lead'.")
    kind: str = Field(description="message, broadcast or plan.")
    body: str
    created_at: str
    delivered: bool = Field(
        description="The recipient has processed it (its turn with it finished, or the lead read it)."
    )
    delivered_at: str | None = None


class MessagesSent(BaseModel):
    """What team_message or team_broadcast appended to inboxes."""

    messages: list[MessageInfo]
    notice: str | None = None


class TeamView(BaseModel):
    """A team's members and shared task list."""

    team: TeamInfo
    members: list[MemberInfo]
    tasks: list[TaskInfo]
    notice: str | None = None


class TeamTasksPage(BaseModel):
    """A team's members and a page of its task list, within the result budget."""

    team: TeamInfo
    members: list[MemberInfo] = Field(
        description="Every member; its plan, last output and last error cut (head and tail) to share half the budget."
    )
    tasks: list[TaskInfo] = Field(
        description="Tasks from offset, oldest first: without detail, a summary (title, status, owner, a preview of "
        "the result); with detail (or a task_id), their detail and result too, cut only to fit."
    )
    notice: str | None = None
    offset: int = Field(0, description="The place in the task list of the first task here.")
    has_more: bool = Field(False, description="True when more tasks follow: pass next_offset as offset.")
    next_offset: int | None = None


class Inbox(BaseModel):
    """The caller's side of a team's messages."""

    received: list[MessageInfo] = Field(
        description="Messages to you, oldest first; reading them as lead is your receipt."
    )
    sent: list[MessageInfo] = Field(description="Messages you sent, with whether each was delivered.")
    notice: str | None = None


class TasksAdded(BaseModel):
    tasks: list[TaskInfo]


class TeamForgotten(BaseModel):
    """What team_cleanup removed."""

    team_id: str
    forgotten: bool = True
    members: int
    messages: int
    tasks: int


class ComputerInfo(BaseModel):
    """A computer: a headless browser of your own."""

    computer_id: str
    template: str
    width: int
    height: int
    created_at: datetime
    expires_at: datetime | None = Field(None, description="When it is destroyed unless destroyed before.")


class PageState(BaseModel):
    """Where a computer's page is, after an action."""

    url: str
    title: str
    snapshot: str | None = Field(
        None,
        description="The page's accessibility tree; elements carry refs such as [ref=e5] for computer_click and computer_type.",
    )
    snapshot_chars: int | None = Field(None, description="The whole snapshot's length, in characters.")
    offset: int | None = Field(None, description="Where in the whole snapshot this part starts.")
    has_more: bool | None = Field(None, description="True when the snapshot was cut: pass next_offset as offset.")
    next_offset: int | None = None


class ComputerList(BaseModel):
    computers: list[ComputerInfo]
