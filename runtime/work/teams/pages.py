"""team_tasks within the result budget: every member, with its plan and outputs cut to share
half the budget, and the task list as a summary (title, status, owner, a 200-character preview
of the result) by default, in full on request (a page at a time, or one task by id)."""

from __future__ import annotations

from dockyard.runtime.runtimes.outputs import head_tail
from dockyard.runtime.substrate.errors import NotFoundError
from dockyard.runtime.substrate.models import MemberInfo, TaskInfo, TeamTasksPage, TeamView

__all__ = ["PREVIEW_CHARS", "fitted"]

PREVIEW_CHARS = 200
"""How much of a result, an output or a plan the summary shows."""


def fitted(view: TeamView, budget_chars: int, *, detail: bool, task_id: str | None, offset: int) -> TeamTasksPage:
    """`view` as a page within `budget_chars`: summaries unless `detail` (or one `task_id`),
    tasks from `offset` for as long as they fit."""
    if task_id is not None:
        tasks = [task for task in view.tasks if task.task_id == task_id]
        if not tasks:
            raise NotFoundError(f"team {view.team.team_id} has no task '{task_id}'; call team_tasks to see its tasks")
        detail, offset = True, 0
    else:
        tasks = view.tasks[offset:]
    # members (at most a few dozen) share half the budget; their outputs are what a lead reads most
    members_share = max(budget_chars // 2 // max(len(view.members), 1) // 2, PREVIEW_CHARS)
    members = [_member(m, members_share) for m in view.members]
    page = TeamTasksPage(team=view.team, members=members, tasks=[], notice=view.notice, offset=offset)
    used = len(page.model_dump_json()) + 100
    for task in tasks:
        shown = _task(task, budget_chars // 3 if detail else PREVIEW_CHARS, detail)
        cost = len(shown.model_dump_json())
        if page.tasks and used + cost > budget_chars:
            break
        page.tasks.append(shown)
        used += cost
    if task_id is None and len(page.tasks) < len(tasks):
        page.has_more, page.next_offset = True, offset + len(page.tasks)
    return page


def _cut(text: str | None, limit: int) -> str | None:
    return None if text is None else head_tail(text, limit)[0]


def _member(member: MemberInfo, limit: int) -> MemberInfo:
    return member.model_copy(
        update={
            "plan": _cut(member.plan, limit),
            "plan_feedback": _cut(member.plan_feedback, limit),
            "last_output": _cut(member.last_output, limit),
            "last_error": _cut(member.last_error, limit),
        }
    )


def _task(task: TaskInfo, limit: int, detail: bool) -> TaskInfo:
    return task.model_copy(
        update={
            "title": _cut(task.title, limit),
            "detail": _cut(task.detail, limit) if detail else None,
            "result": _cut(task.result, limit),
        }
    )
