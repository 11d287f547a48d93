"""Hostile readers of a command's full output, over HTTP with real tokens: the output resource
of a sandbox is read only by a caller who may work in that sandbox."""

from __future__ import annotations

import pytest

from tests.conftest import call
from tests.served import Served, connect, mint

pytestmark = pytest.mark.anyio

SANDBOX = ["sandbox:create", "sandbox:exec", "sandbox:files"]


async def test_workspace_b_cannot_read_the_output_of_a_command_in_a_sandbox_of_a(served: Served) -> None:
    a = await mint(served, scopes=SANDBOX, workspace_id="a", user_id="user")
    b = await mint(served, scopes=SANDBOX, workspace_id="b", user_id="user")  # the same user name
    async with connect(served, a["token"]) as client_a:
        sid = (await call(client_a, "sandbox_create"))["sandbox_id"]
        ran = await call(client_a, "sandbox_exec", sandbox_id=sid, command="echo secret-of-a")
        uri = f"dockyard://sandboxes/{sid}/execs/{ran['exec_n']}/stdout"
        async with connect(served, b["token"]) as client_b:
            for stream in ("stdout", "stderr"):
                with pytest.raises(Exception, match="unknown sandbox") as refused:
                    await client_b.read_resource(uri.replace("/stdout", f"/{stream}"))
                assert "secret-of-a" not in str(refused.value)
        read = await client_a.read_resource(uri)  # still there for its owner
        assert read.contents[0].text == "secret-of-a\n"  # type: ignore[union-attr] - a text resource


async def test_a_token_without_sandbox_scopes_cannot_read_an_output_of_its_own_workspace(served: Served) -> None:
    owner = await mint(served, scopes=[*SANDBOX, "token:mint"], workspace_id="a")
    async with connect(served, owner["token"]) as client:
        sid = (await call(client, "sandbox_create"))["sandbox_id"]
        ran = await call(client, "sandbox_exec", sandbox_id=sid, command="echo secret")
        blind = await call(client, "token_mint", scopes=["sandbox:create"])
    uri = f"dockyard://sandboxes/{sid}/execs/{ran['exec_n']}/stdout"
    async with connect(served, blind["token"]) as client:
        with pytest.raises(Exception, match="sandbox:exec") as refused:
            await client.read_resource(uri)
        assert "secret" not in str(refused.value)
