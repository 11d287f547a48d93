"""Trimming a tool's schemas drops bytes, never meaning: what a trimmed schema accepts and refuses
is what pydantic's schema did (an optional input aside, which leaves out null: the caller omits it)."""

from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator
from pydantic import BaseModel, ConfigDict, Field

from dockyard.tools._schemas import trimmed_input, trimmed_output


class Member(BaseModel):
    role: str = Field(max_length=8)
    turns: int = 0


class Task(BaseModel):
    title: str  # a field named like the keyword
    owner: str | None = Field(None, description="Who claimed it.")


class View(BaseModel):
    """A team."""

    lead: Member
    members: list[Member]
    tasks: list[Task]
    limit: int | None = Field(None, ge=1)


class Arguments(BaseModel):
    model_config = ConfigDict(extra="forbid")

    team_id: str = Field(max_length=4)
    mode: str | None = None
    tasks: list[Task] = Field(default_factory=list)


def accepts(schema: dict[str, Any], value: Any) -> bool:
    return Draft202012Validator(schema).is_valid(value)


def title_keywords(node: Any, inside_properties: bool = False) -> int:
    if isinstance(node, list):
        return sum(title_keywords(item) for item in node)
    if not isinstance(node, dict):
        return 0
    here = 0 if inside_properties else int("title" in node)
    return here + sum(title_keywords(value, key == "properties") for key, value in node.items())


def test_an_output_schema_keeps_what_it_accepts_and_refuses_without_titles_or_defaults() -> None:
    original = View.model_json_schema()
    trimmed = trimmed_output(original)
    assert title_keywords(trimmed) == 0 and "default" not in str(trimmed)
    assert "title" in trimmed["properties"]["tasks"]["items"]["properties"]
    assert set(trimmed["$defs"]) == {"Member"}  # used twice: shared; Task, used once, is in place
    good = {"lead": {"role": "a"}, "members": [{"role": "b", "turns": 2}], "tasks": [{"title": "t", "owner": None}]}
    bad = [
        {**good, "limit": 0},
        {**good, "limit": "1"},
        {**good, "lead": {"role": "x" * 9}},
        {**good, "tasks": [{"owner": "me"}]},
        {**good, "tasks": [{"title": "t", "owner": 3}]},
    ]
    for value in [good, {**good, "limit": None}, {**good, "limit": 5}, *bad]:
        assert accepts(trimmed, value) == accepts(original, value), value


def test_an_input_schema_refuses_unknown_arguments_and_lists_optional_ones_without_null() -> None:
    original = Arguments.model_json_schema()
    trimmed = trimmed_input(original)
    assert trimmed["additionalProperties"] is False
    assert trimmed["properties"]["mode"] == {"type": "string"}
    for value in [{"team_id": "t"}, {"team_id": "t", "mode": "m"}, {"team_id": "long!"}, {"team_id": "t", "x": 1}]:
        assert accepts(trimmed, value) == accepts(original, value), value
