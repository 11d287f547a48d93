"""Agent teams: a lead spawns members that message each other, claim tasks and propose plans.

A member is a logical agent with a conversation made of turns. Its first turn works on the
prompt it was spawned with; after each turn it is idle until a message arrives, and the
message wakes it at once (an event, not a polling loop) for a turn that works on every message
that arrived meanwhile. When that turn ends, the messages count as delivered: that is the
receipt the sender sees.

- `script` members run their prompt as a bash script in their sandbox on every turn, with the
  turn's messages as JSON lines on stdin; `command` members run their program with the turn's
  text as the prompt; `llm` members go on with one conversation, each message a user turn,
  and the team tools next to the sandbox tools.
- Each member acts with its own token (team:member plus work in its own sandbox), in process
  for `llm` members and through `dockyard-bridge` for programs in the sandbox, so every
  message, claim and plan has a known author. Tokens a member hands on (a dispatch's run, a
  sandbox's bridge) never carry team scopes.
- A member in plan mode works with a token that may only use the team tools until the lead
  approves its plan; an `llm` member is also refused commands and writes meanwhile.
- Inboxes are rows in the store, mirrored into the recipient's sandbox as JSON lines at
  `/workspace/.dockyard/inbox/<role>.jsonl`.
- After a restart, members that were busy are marked ready (never re-run behind the lead's
  back) and, while any is, the lead's look at the team says who was interrupted; a message
  resumes them.

The rooms: `service` (team and member rows, spawning, shutting down), `access` (who is who),
`messaging` (inboxes, delivery, receipts, wake-ups), `tasks` (the task list and plans),
`members` (the member loop and its turns, run by the runner core), `membertools` (the team
tools a member calls, each declared once for the MCP tool and the `llm` runner), `states` (the
lifecycles), `views` (results and the restart notice).
"""

from dockyard.runtime.work.teams.service import ISOLATIONS, TeamService
from dockyard.runtime.work.teams.views import LEAD

__all__ = ["ISOLATIONS", "LEAD", "TeamService"]
