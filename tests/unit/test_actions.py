"""Action and scope names are declared once, in `Action` and `Scope`: every name the sources
spell is a member, every member is used, and `Scope` is exactly what the token service mints.
The members are the very strings stored and shown, so the audit rows and the messages a client
reads do not change with the enums.

The sources are read as syntax trees, so these checks also hold for modules that still spell
their names as strings."""

from __future__ import annotations

import ast
import re
from collections.abc import AsyncIterator, Iterator
from functools import cache
from pathlib import Path

import pytest

from dockyard.runtime.substrate.actions import Action, Scope
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.errors import InvalidRequestError, ScopeError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import Store
from dockyard.runtime.substrate.tokens import ADMIN, SANDBOX_SCOPES, SCOPES, TokenService

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(path for folder in ("server", "tools", "runtime") for path in (ROOT / folder).rglob("*.py"))

# The calls that take an action (and a scope), by the position of that argument after `self`.
ACTION_AT = {
    "authorized": 2, "current": 1, "any_of": 2, "require": 2, "live": 1, "deny": 1, "may_end": 2, "record": 1,
    "append": 1, "check_owned": 2, "_owned": 2, "_anyone": 1, "team": 2, "party": 2, "lead_of": 2,
}  # fmt: skip
SCOPE_AT = {"authorized": 1, "require": 1, "any_of": 1, "publish_to": 1, "allows": 0, "mint_for_run": 2}

ACTION_FAMILIES = {value.partition(".")[0] for value in Action if "." in value}
SCOPE_FAMILIES = {value.partition(":")[0] for value in Scope}
ACTION_SHAPED = re.compile(rf"({'|'.join(ACTION_FAMILIES)})\.[a-z_]+")
SCOPE_SHAPED = re.compile(rf"({'|'.join(SCOPE_FAMILIES)}):[a-z_]+")


@cache
def trees() -> list[tuple[str, ast.AST]]:
    """Each source file (by its path in the checkout) and its syntax tree, parsed once."""
    return [(str(path.relative_to(ROOT)), ast.parse(path.read_text(), str(path))) for path in SOURCES]


def strings(node: ast.AST | None) -> Iterator[str]:
    """The string constants an argument is, or holds (a list or tuple of them)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.List | ast.Tuple | ast.Set):
        for item in node.elts:
            yield from strings(item)


def called(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def argument(call: ast.Call, at: int) -> ast.AST | None:
    return call.args[at] if at < len(call.args) and not isinstance(call.args[at], ast.Starred) else None


def named_in_calls(table: dict[str, int]) -> Iterator[tuple[str, int, str]]:
    """(file, line, string) for every string passed where `table` says an action or scope goes."""
    for where, tree in trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or (name := called(node)) not in table:
                continue
            if name == "append" and not any(kw.arg == "outcome" for kw in node.keywords):
                continue  # a list's append, not the audit log's
            for value in strings(argument(node, table[name])):
                yield where, node.lineno, value


def shaped(pattern: re.Pattern[str]) -> Iterator[tuple[str, int, str]]:
    """(file, line, string) for every string constant in the sources that has `pattern`'s shape."""
    for where, tree in trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.fullmatch(node.value):
                yield where, node.lineno, node.value


def test_the_sources_are_found() -> None:
    assert {path.parent.name for path in SOURCES} >= {"server", "tools", "runtime", "teams", "dispatch"}


def test_every_action_passed_to_a_check_or_the_audit_log_is_a_member_of_action() -> None:
    strays = [
        f"{where}:{line}: {value!r}" for where, line, value in named_in_calls(ACTION_AT) if value not in set(Action)
    ]
    assert strays == []


def test_every_scope_passed_to_a_check_is_a_member_of_scope() -> None:
    strays = [
        f"{where}:{line}: {value!r}" for where, line, value in named_in_calls(SCOPE_AT) if value not in set(Scope)
    ]
    assert strays == []


def test_every_string_shaped_like_an_action_or_a_scope_is_a_member() -> None:
    """Catches the names kept in constants (a tuple of actions, a list of scopes) too."""
    strays = [f"{where}:{line}: {value!r}" for where, line, value in shaped(ACTION_SHAPED) if value not in set(Action)]
    strays += [f"{where}:{line}: {value!r}" for where, line, value in shaped(SCOPE_SHAPED) if value not in set(Scope)]
    assert strays == []


def test_every_member_is_used_somewhere_in_the_sources() -> None:
    used: set[str] = set()
    for _, tree in trees():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in ("Action", "Scope")
            ):
                used.add(f"{node.value.id}.{node.attr}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                used.add(node.value)
    unused = [f"Action.{a.name}" for a in Action if f"Action.{a.name}" not in used and a.value not in used]
    unused += [f"Scope.{s.name}" for s in Scope if f"Scope.{s.name}" not in used and s.value not in used]
    assert unused == []


def test_members_are_distinct_and_shaped_as_stored() -> None:
    assert len(Action.__members__) == len(Action)  # a repeated value would make an alias, not a member
    assert len(Scope.__members__) == len(Scope)
    assert all(re.fullmatch(r"[a-z_]+\.[a-z_]+|whoami", action) for action in Action)
    assert all(re.fullmatch(r"[a-z_]+:[a-z_]+", scope) for scope in Scope)
    assert all(action.name == action.value.upper().replace(".", "_") for action in Action)
    assert all(scope.name == scope.value.upper().replace(":", "_") for scope in Scope)


def test_a_member_is_the_plain_string_a_client_sees() -> None:
    assert (str(Action.SANDBOX_EXEC), f"{Scope.SANDBOX_EXEC}") == ("sandbox.exec", "sandbox:exec")
    assert type(str(Action.SANDBOX_EXEC)) is str
    message = str(ScopeError(Scope.SANDBOX_EXEC, ["pool:read"]))
    assert message == (
        "this call needs the scope 'sandbox:exec', which your token lacks (it has: pool:read); ask for a token with it"
    )


@pytest.fixture
async def tokens(tmp_path: Path) -> AsyncIterator[tuple[TokenService, AuditLog]]:
    store = Store(tmp_path / "dockyard.db")
    await store.open()
    audit = AuditLog(store, tmp_path)
    yield TokenService(store, audit, "admin-key"), audit
    await store.close()


async def test_scope_is_exactly_what_the_token_service_mints(tokens: tuple[TokenService, AuditLog]) -> None:
    service, _ = tokens
    assert SCOPES == tuple(Scope)
    assert set(SANDBOX_SCOPES) <= set(Scope)
    for scope in Scope:
        minted = await service.mint(ADMIN, scopes=[scope.value], workspace_id="acme")
        assert minted.identity.scopes == [scope.value]
    with pytest.raises(
        InvalidRequestError, match="unknown scope sandbox:admin; known scopes: sandbox:create, sandbox:exec"
    ):
        await service.mint(ADMIN, scopes=["sandbox:admin"], workspace_id="acme")


async def test_an_action_is_stored_in_the_audit_log_as_its_plain_string(tokens: tuple[TokenService, AuditLog]) -> None:
    service, audit = tokens
    who = Identity(workspace_id="acme", project_id="web", user_id="alice", scopes=[Scope.POOL_READ])
    with pytest.raises(ScopeError):
        await service.require(who, Scope.SANDBOX_EXEC, Action.SANDBOX_EXEC, "sbx_1")
    (row,) = await audit.query(workspace_id="acme")
    assert (row.kind, row.outcome, row.target) == ("sandbox.exec", "denied", "sbx_1")
    assert type(row.kind) is str
    assert '"missing_scope": "sandbox:exec"' in row.detail
    (found,) = await audit.query(kind="sandbox.exec")
    assert found.id == row.id
