"""The audit chain of a real engine, and the stdio operator's scopes from config (the settings'
layering itself is tested in tests/unit/test_settings.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from mcp import Client

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.audit import GENESIS
from dockyard.runtime.substrate.errors import SandboxNotFoundError
from dockyard.server.app import build_server
from tests.conftest import call, call_error, make_settings

pytestmark = pytest.mark.anyio


async def test_audit_rows_form_an_unbroken_hash_chain_including_failures(engine: Engine) -> None:
    who = engine.operator
    box = await engine.sandboxes.create(who)
    await engine.sandboxes.exec(who, box.sandbox_id, "true")
    with pytest.raises(SandboxNotFoundError):
        await engine.sandboxes.exec(who, "sbx_missing", "true")
    await engine.sandboxes.destroy(who, box.sandbox_id)

    rows = (await engine.audit.query())[::-1]  # the query is newest first
    assert [(r.kind, r.outcome) for r in rows] == [
        ("sandbox.create", "ok"),
        ("sandbox.exec", "started"),  # on the record before the command runs
        ("sandbox.exec", "ok"),
        ("sandbox.exec", "denied"),  # someone else's or no sandbox: refused, and on the record
        ("sandbox.destroy", "ok"),
    ]
    assert rows[3].target == "sbx_missing"
    previous = GENESIS
    for row in rows:
        assert row.prev_hash == previous
        body = {
            k: getattr(row, k)
            for k in (
                "workspace_id",
                "project_id",
                "user_id",
                "run_id",
                "kind",
                "target",
                "outcome",
                "detail",
                "duration_ms",
                "prev_hash",
            )
        }
        body["ts"] = row.ts.isoformat()
        assert row.hash == hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        previous = row.hash
    assert json.loads(rows[2].detail) == {
        **json.loads(rows[1].detail),
        "exit_code": 0,
        "timed_out": False,
        "truncated": False,
        "started_id": rows[1].id,
    }
    assert (await engine.audit.verify()).intact


async def test_the_stdio_operator_has_the_scopes_config_grants(tmp_path: Path, sandbox_image: str) -> None:
    settings = make_settings(
        tmp_path / "data", operator={"scopes": ["sandbox:exec"]}, default_pool={"min": 0, "max": 2}
    )
    async with Client(build_server(settings)) as client:
        assert (await call(client, "whoami"))["scopes"] == ["sandbox:exec"]
        assert "needs the scope 'sandbox:create'" in await call_error(client, "sandbox_create")
        assert "needs the scope 'pool:read'" in await call_error(client, "pool_status")
