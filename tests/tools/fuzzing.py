"""Hypothesis strategies for a tool's arguments: drawn from its JSON input schema, mixed with
adversarial values and with ids of live, gone, foreign and made-up objects.

Only what a client can send over a real transport: the SDK parses every message as strict JSON,
which refuses lone surrogates (`"\\ud800"`), so no string here holds one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

__all__ = ["Ids", "arguments"]

ODD_STRINGS: list[str] = [
    "",
    " ",
    "\x00",
    "\n",
    "a\nb",
    "\t",
    "\x1b[2J",
    "\x7f",
    "\x85",
    "\u2028",
    "\ufeff",
    "\u202eevil",
    "🙂",
    "é",
    "..",
    ".",
    "/",
    "~",
    "$(id)",
    "`id`",
    "; rm -rf /",
    "%s%n",
    "{}",
    "[]",
    "null",
    "true",
    "-1",
    "1e309",
    "NaN",
    " sbx_0000000000000000",
    "a" * 300,
    "x" * 5000,
    "*",
    "?",
    "\\",
    "'\"",
]
PATHS: list[str] = [
    "hello.txt",
    "dir",
    "dir/sub/f",
    "dir/sub",
    "new/deeper/file.txt",
    "fifo",
    "sock",
    "link_out",
    "link_out/passwd",
    "link_in",
    "loop",
    "here",
    "here/here/hello.txt",
    "dir/sub/../sub",
    "up",
    "up/etc/passwd",
    "two\nlines",
    "caf\\xe9",
    "café",
    "../etc/passwd",
    "/etc/passwd",
    "/workspace",
    "/workspace/hello.txt",
    "/workspace/../etc",
    "a/../../x",
    ".",
    "./",
    "//",
    "dir//sub///f",
    "hello.txt/x",
    " hello.txt ",
    "/proc/self/status",
    "/tmp/x",
    "~/x",
    "a" * 255,
    "a" * 256,
    ("d/" * 200) + "f",
]
SCRIPTS: list[str] = [
    "echo hi",
    "true",
    "exit 3",
    "cat /etc/passwd",
    "ls -la /",
    "echo out; echo err >&2",
    "sleep 0.2",
    "kill -9 $$",
    "printf '\\xff\\xfe'",
    "head -c 100000 /dev/zero",
    "yes | head -c 200000",
    "cat",
    "ulimit -a",
    ":",
]
ODD_NUMBERS: list[Any] = [
    0,
    -1,
    1,
    -0.0,
    0.5,
    2**31,
    2**63,
    2**64,
    -(2**63),
    10**30,
    1e308,
    math.inf,
    -math.inf,
    math.nan,
]
ODD_VALUES: list[Any] = [None, True, False, [], {}, [None], {"a": {"b": []}}, "1", 1.5, ["x"] * 3]
# Durations that must never make a case wait: small ones, or ones the schema refuses.
WAITS: list[Any] = [0, 0.1, 1, 2, -1, -0.5, 10**12, "soon", None, math.nan, math.inf]
DATES = [
    "2026-01-01T00:00:00",
    "0001-01-01T00:00:00+14:00",
    "9999-12-31T23:59:59-14:00",
    "not a date",
    "2026-13-45",
    "1e10",
    "",
    "2026-06-01T12:00:00Z",
]
TTLS: list[Any] = [1, 2, 60, 61, 0, -5, 10**12, "1h", None]
_ID_FIELDS = {
    "sandbox_id",
    "team_id",
    "dispatch_id",
    "computer_id",
    "token_id",
    "task_id",
    "from_snapshot",
    "member",
    "to",
    "role",
    "workspace_id",
    "project_id",
    "user_id",
    "run_id",
    "actor",
    "template",
}


def _text() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=40), st.sampled_from(ODD_STRINGS))


def _key() -> st.SearchStrategy[str]:
    return st.one_of(st.text(max_size=20), st.sampled_from(ODD_STRINGS))


def _junk() -> st.SearchStrategy[Any]:
    return st.one_of(st.sampled_from(ODD_VALUES), st.sampled_from(ODD_NUMBERS), st.sampled_from(ODD_STRINGS))


def _value(name: str, schema: dict[str, Any], defs: dict[str, Any], ids: Ids, odd: bool) -> st.SearchStrategy[Any]:
    """A value for one field: as its schema says, or (in an odd case) often anything at all."""
    if name in ("timeout_s", "wait_s"):
        return st.sampled_from(WAITS[:4] if not odd else WAITS)
    if name == "ttl_s":
        return st.sampled_from(TTLS[:4] if not odd else TTLS)
    if not odd:
        if name in ids.live:
            return st.just(ids.live[name])
        return _from_schema(name, schema, defs, ids, odd)
    return st.one_of(_from_schema(name, schema, defs, ids, odd), _junk())


def _from_schema(
    name: str, schema: dict[str, Any], defs: dict[str, Any], ids: Ids, odd: bool
) -> st.SearchStrategy[Any]:
    """Values of a schema; in an odd case also just past its bounds, and odd strings."""
    if "$ref" in schema:
        return _from_schema(name, defs[schema["$ref"].rsplit("/", 1)[-1]], defs, ids, odd)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([_from_schema(name, option, defs, ids, odd) for option in schema[key]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind in ("integer", "number"):
        return _number(kind, schema, odd)
    if kind == "array":
        items = _from_schema(name, schema.get("items", {}), defs, ids, odd)
        low = 0 if odd else schema.get("minItems", 0)
        return st.lists(items, min_size=low, max_size=max(low, min(schema.get("maxItems", 4), 4)))
    if kind == "object":
        if schema.get("properties"):
            return _object(schema, defs, ids, odd)
        return st.dictionaries(_key(), _text(), max_size=4)
    if kind == "string":
        return _string(name, schema, ids, odd)
    return _junk()


def _number(kind: str, schema: dict[str, Any], odd: bool) -> st.SearchStrategy[Any]:
    low, high = schema.get("minimum"), schema.get("maximum")
    above, below = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if kind == "integer":
        low = above + 1 if above is not None else low
        high = below - 1 if below is not None else high
        inside: st.SearchStrategy[Any] = st.integers(min_value=low, max_value=high)
    else:
        inside = st.floats(
            min_value=low if above is None else above,
            max_value=high if below is None else below,
            exclude_min=above is not None,
            exclude_max=below is not None,
            allow_nan=False,
        )
    if not odd:
        return inside
    edges = [value for value in (low, high, above, below) if value is not None]
    return st.one_of(inside, st.sampled_from(edges + [v + 1 for v in edges] + [v - 1 for v in edges] + ODD_NUMBERS))


def _string(name: str, schema: dict[str, Any], ids: Ids, odd: bool) -> st.SearchStrategy[str]:
    if name in _ID_FIELDS:
        strings = st.one_of(st.sampled_from(ids.others), _text())
    elif name == "path":
        strings = st.one_of(st.sampled_from(PATHS), st.sampled_from(PATHS), st.sampled_from(PATHS), _text())
    elif name in ("command", "prompt"):
        strings = st.one_of(st.sampled_from(SCRIPTS), _text())
    elif schema.get("format") == "date-time":
        strings = st.sampled_from(DATES)
    else:
        strings = _text()
    if odd:
        return strings
    low, high = schema.get("minLength", 0), schema.get("maxLength", 10**9)
    return strings.map(lambda text: (text + "x" * low)[:high]) if low or high < 5000 else strings


def _object(schema: dict[str, Any], defs: dict[str, Any], ids: Ids, odd: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Each optional field present or not; in an odd case a required one may be missing, and a
    field the tool does not know may come along."""
    required = set(schema.get("required", []))
    fields = []
    for name, sub in schema.get("properties", {}).items():
        value = _value(name, sub, defs, ids, odd)
        keep = st.booleans()
        if name in required:
            keep = st.sampled_from([True] * 9 + [False]) if odd else st.just(True)
        if name == "timeout_s":
            keep = st.just(True)  # a missing one means the default wait, up to a minute or more
        fields.append(st.tuples(st.just(name), keep, value))
    extra = st.one_of(st.none(), st.tuples(_key(), _junk())) if odd else st.none()
    return st.tuples(st.tuples(*fields), extra).map(_assemble)


def _assemble(drawn: tuple[tuple[tuple[str, bool, Any], ...], Any]) -> dict[str, Any]:
    fields, extra = drawn
    out = {name: value for name, keep, value in fields if keep}
    if extra is not None and extra[0] not in out:
        out[extra[0]] = extra[1]
    return out


@dataclass
class Ids:
    """Ids for a case: `live` by field name (the sandbox for sandbox_id, ...), `others` of every
    kind, gone and made up."""

    live: dict[str, str]
    others: list[str]


def arguments(schema: dict[str, Any], ids: Ids) -> st.SearchStrategy[dict[str, Any]]:
    """Arguments for a tool with this input schema: half the cases well formed (valid types,
    live ids), half odd."""
    defs = schema.get("$defs", {})
    return st.one_of(_object(schema, defs, ids, odd=False), _object(schema, defs, ids, odd=True))
