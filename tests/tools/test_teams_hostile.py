"""Members of one shared sandbox against each other: each runs as a Unix user of its own, so
a member in plan mode cannot take the token of a member that may act (from its processes, its
files or its home), cannot tamper with or signal what is the other's, and a token it got hold
of anyway is refused from its user. Members still share /workspace."""

from __future__ import annotations

import json
from pathlib import Path

import docker
import pytest

from dockyard.runtime.substrate.store import AuditEvent, Member
from tests.conftest import call, container_of
from tests.tools.test_teams import all_idle, members, rows, team_server, until

pytestmark = pytest.mark.anyio

# The builder may act: it keeps its token in its environment (a turn's, and a server it leaves
# running), in a private file in its home, and keeps notes in a private file in /workspace.
BUILDER = r"""
if [ "$DOCKYARD_TURN" = 1 ]; then
  echo "$HOME" > /workspace/builder-home
  setsid sleep 600 >/dev/null 2>&1 < /dev/null &
  echo $! > /workspace/builder-pid
  umask 077
  printf %s "$DOCKYARD_TOKEN" > "$HOME/token"
  echo "the builder's notes" > /workspace/builder-private
  echo "user=$(id -un)"
  who=$(dockyard-call whoami)
  sandbox=$(printf %s "$who" | python3 -c 'import json, sys; print(json.load(sys.stdin)["sandbox_id"])')
  ran=$(dockyard-call sandbox_exec "{\"sandbox_id\": \"$sandbox\", \"command\": \"id -un\"}")
  printf %s "$ran" | python3 -c 'import json, sys; print("exec-user=" + json.load(sys.stdin)["stdout"].strip())'
  echo "$who"
fi
"""

# The planner is in plan mode: it may only use the team tools, and wants the builder's token.
PLANNER = r"""
me="$DOCKYARD_TOKEN"
pid=$(cat /workspace/builder-pid)
home=$(cat /workspace/builder-home)
attempt() { name=$1; shift; if "$@" >/dev/null 2>&1; then echo "$name=allowed"; else echo "$name=refused"; fi; }
if [ "$DOCKYARD_TURN" = 1 ]; then
  echo "user=$(id -un)"
  attempt environ cat /proc/$pid/environ
  attempt fds ls /proc/$pid/fd
  attempt mem python3 -c "open('/proc/$pid/mem', 'rb')"
  attempt ptrace python3 -c "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); sys.exit(libc.ptrace(16, $pid, 0, 0) != 0)"
  attempt read-private cat /workspace/builder-private
  attempt write-private sh -c 'echo tampered >> /workspace/builder-private'
  attempt list-home ls "$home"
  attempt read-home-token cat "$home/token"
  attempt plant-in-home sh -c "echo planted > '$home/.bashrc'"
  attempt stop kill -STOP $pid
  attempt kill kill -KILL $pid
  attempt owner-bridge env -u DOCKYARD_TOKEN dockyard-call whoami
  stolen=$({
    for f in /proc/[0-9]*/environ; do tr '\0' '\n' < "$f"; done
    ps axeww -o args=
    grep -rhao 'dyt_[A-Za-z0-9_-]*' /workspace /tmp /home /dev/shm /run
  } 2>/dev/null | grep -o 'dyt_[A-Za-z0-9_-]\{20,\}' | grep -vxF "$me" | sort -u | tr '\n' ' ')
  echo "stolen=$stolen"
else
  leaked=$(cat /workspace/leaked-token)
  attempt leaked-token env DOCKYARD_TOKEN="$leaked" dockyard-call whoami
fi
"""


def outcomes(output: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line and not line.startswith("{"))


async def test_a_planning_member_cannot_take_or_use_the_acting_members_token_in_their_shared_sandbox(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    async with team_server(tmp_path, docker_client, default_pool={"min": 0, "max": 4}) as (client, settings):
        team = (await call(client, "team_create", name="shared"))["team_id"]
        await call(client, "team_spawn", team_id=team, role="builder", prompt=BUILDER, isolation="shared")
        view = await until(client, team, all_idle(1))
        builder = members(view)["builder"]
        assert builder["last_error"] is None, builder["last_error"]
        whoami = json.loads(builder["last_output"].splitlines()[-1])  # its token serves it, from its own user
        assert whoami["run_id"] == builder["member_id"] and "sandbox:exec" in whoami["scopes"]

        await call(
            client, "team_spawn", team_id=team, role="planner", prompt=PLANNER, isolation="shared", plan_mode=True
        )
        view = await until(client, team, all_idle(1))
        planner = members(view)["planner"]
        seen = outcomes(planner["last_output"])
        assert seen.pop("stolen") == "", "the planner found another member's token"
        assert {name: verdict for name, verdict in seen.items() if name != "user"} == {
            name: "refused"
            for name in (
                "environ",
                "fds",
                "mem",
                "ptrace",
                "read-private",
                "write-private",
                "list-home",
                "read-home-token",
                "plant-in-home",
                "stop",
                "kill",
                "owner-bridge",
            )
        }
        users = {m.role: m.unix_user for m in rows(settings, Member)}
        assert users["builder"] != users["planner"] and None not in users.values()
        assert (outcomes(builder["last_output"])["user"], seen["user"]) == (users["builder"], users["planner"])
        assert outcomes(builder["last_output"])["exec-user"] == users["builder"]  # its sandbox_exec, too

        # Nothing of the builder's changed: its server runs on, its notes and home are as it left them.
        container = docker_client.containers.get(
            container_of(docker_client, settings, view["team"]["sandbox_id"])["Id"]
        )
        pid = container.exec_run(["cat", "/workspace/builder-pid"]).output.decode().strip()
        state = container.exec_run(["ps", "-o", "user=,stat=,args=", "-p", pid]).output.decode().split()
        assert state[0] == users["builder"] and state[1].startswith("S") and state[2:] == ["sleep", "600"]
        notes = container.exec_run(["cat", "/workspace/builder-private"], user=users["builder"]).output.decode()
        assert notes == "the builder's notes\n"
        assert (
            container.exec_run(
                ["grep", "-q", "planted", f"/home/{users['builder']}/.bashrc"], user=users["builder"]
            ).exit_code
            == 1
        )

        # Say the builder leaked its token into a file anyone may read: from the planner's user
        # the bridge still refuses it.
        leak = "cp ~/token /workspace/leaked-token && chmod 644 /workspace/leaked-token"
        assert (
            container.exec_run(
                ["sh", "-c", leak], user=users["builder"], environment={"HOME": f"/home/{users['builder']}"}
            ).exit_code
            == 0
        )
        await call(client, "team_message", team_id=team, to="planner", body="try again")
        view = await until(client, team, lambda v: members(v)["planner"]["turns"] == 2 and all_idle(1)(v))
        assert outcomes(members(view)["planner"]["last_output"]) == {"leaked-token": "refused"}
    refusals = [a for a in rows(settings, AuditEvent) if a.kind == "bridge.token" and a.outcome == "denied"]
    reasons = " ".join(json.dumps(a.detail) for a in refusals)
    assert f"serves the Unix user {users['builder']} here, not {users['planner']}" in reasons
    assert f"a session from {users['planner']}" in reasons  # the tokenless try to act as the sandbox's owner


async def test_members_of_a_shared_sandbox_share_files_in_the_workspace(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    first = r"""
if [ "$DOCKYARD_TURN" = 1 ]; then
  mkdir -p shared && echo "one" > shared/notes.txt
else
  cat shared/notes.txt; cat shared/two.txt; rm shared/two.txt && echo "removed two.txt"
fi
id -un
"""
    second = r"""
cat shared/notes.txt && echo "two" >> shared/notes.txt && echo "by two" > shared/two.txt
id -un
"""
    async with team_server(tmp_path, docker_client, default_pool={"min": 0, "max": 4}) as (client, settings):
        team = (await call(client, "team_create", name="pair"))["team_id"]
        await call(client, "team_spawn", team_id=team, role="one", prompt=first, isolation="shared")
        await until(client, team, all_idle(1))
        await call(client, "team_spawn", team_id=team, role="two", prompt=second, isolation="shared")
        view = await until(client, team, all_idle(1))
        two = members(view)["two"]
        assert two["last_error"] is None, two["last_error"]
        await call(client, "team_message", team_id=team, to="one", body="your turn")
        view = await until(client, team, lambda v: members(v)["one"]["turns"] == 2 and all_idle(1)(v))
        one = members(view)["one"]
        assert one["last_error"] is None, one["last_error"]
        *seen, user_one = one["last_output"].splitlines()
        assert seen == ["one", "two", "by two", "removed two.txt"]
        *_, user_two = two["last_output"].splitlines()
        assert {user_one, user_two} == {m.unix_user for m in rows(settings, Member)} and user_one != user_two
        assert "agent" not in (user_one, user_two)


async def test_team_single_vm_dispatch_members_run_each_as_a_user_of_their_own(client) -> None:
    # Both run at once (each sleeps around its look), so each could see the other's processes.
    probe = "sleep 1; id -un; cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep '^DOCKYARD_EXEC_ID=' | sort -u | wc -l; sleep 2"
    sent = await call(
        client, "dispatch", mode="team_single_vm", rationale="r", task_summary="pair work", members=[probe, probe]
    )
    done = await call(client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=120)
    assert done["status"] == "completed", done
    seen = [m["result"].split() for m in done["members"]]
    assert [user for user, _ in seen] == ["m1", "m2"]
    # Each reads only its own command's environments, never the other's.
    assert [count for _, count in seen] == ["1", "1"]
