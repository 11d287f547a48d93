"""Configuration layering and the audit chain."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from mcp import Client

from dockyard.runtime.audit import GENESIS
from dockyard.runtime.engine import Engine
from dockyard.runtime.errors import SandboxNotFoundError
from dockyard.runtime.settings import load_settings
from dockyard.server.app import build_server
from tests.conftest import call, call_error, make_settings

pytestmark = pytest.mark.anyio


def test_user_file_overrides_defaults_and_environment_overrides_the_file(tmp_path: Path, monkeypatch) -> None:
    user_file = tmp_path / "dockyard.toml"
    user_file.write_text('[sandbox]\noutput_cap_bytes = 2048\nexec_default_timeout_s = 5\n[templates.big]\nmemory_mb = 4096\n')
    monkeypatch.setenv("DOCKYARD_SANDBOX__EXEC_DEFAULT_TIMEOUT_S", "9")
    monkeypatch.setenv("DOCKYARD_DATA_DIR", str(tmp_path / "data"))
    settings = load_settings(user_file)
    assert settings.sandbox.output_cap_bytes == 2048  # from the user's file
    assert settings.sandbox.exec_default_timeout_s == 9  # the environment wins over the file
    assert settings.sandbox.read_cap_bytes == 1 << 20  # untouched defaults survive the merge
    assert settings.templates["big"].memory_mb == 4096 and "default" in settings.templates
    assert settings.data_dir == tmp_path / "data"


def test_pool_variables_size_the_default_template_and_turn_on_the_autoscaler(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKYARD_DATA_DIR", str(tmp_path / "data"))
    defaults = load_settings()
    assert (defaults.templates["default"].pool.min, defaults.templates["default"].pool.max) == (2, 8)
    assert defaults.pool.autoscale_enabled is False
    monkeypatch.setenv("POOL_MIN", "3")
    monkeypatch.setenv("POOL_MAX", "12")
    monkeypatch.setenv("POOL_AUTOSCALE_ENABLED", "true")
    settings = load_settings()
    assert (settings.templates["default"].pool.min, settings.templates["default"].pool.max) == (3, 12)
    assert settings.pool.autoscale_enabled is True
    monkeypatch.setenv("POOL_MIN", "20")
    with pytest.raises(ValueError, match=r"pool min \(20\) is above its max \(12\)"):
        load_settings()


def test_a_missing_config_file_is_an_error_not_a_silent_default(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


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
        body = {k: getattr(row, k) for k in ("workspace_id", "project_id", "user_id", "run_id", "kind", "target", "outcome", "detail", "duration_ms", "prev_hash")}
        body["ts"] = row.ts.isoformat()
        assert row.hash == hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        previous = row.hash
    assert json.loads(rows[2].detail) == {**json.loads(rows[1].detail), "exit_code": 0, "timed_out": False, "truncated": False,
                                          "started_id": rows[1].id}
    assert (await engine.audit.verify()).intact


async def test_the_stdio_operator_has_the_scopes_config_grants(tmp_path: Path, sandbox_image: str) -> None:
    settings = make_settings(tmp_path / "data", operator={"scopes": ["sandbox:exec"]}, default_pool={"min": 0, "max": 2})
    async with Client(build_server(settings)) as client:
        assert (await call(client, "whoami"))["scopes"] == ["sandbox:exec"]
        assert "needs the scope 'sandbox:create'" in await call_error(client, "sandbox_create")
        assert "needs the scope 'pool:read'" in await call_error(client, "pool_status")
