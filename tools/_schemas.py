"""A tool's schemas as the tool list carries them: what pydantic generates, without what costs
bytes and says nothing.

Every listed tool is sent to the client's model on every turn, so the list is kept small while
each schema still accepts and rejects exactly what it did:

- no `title` keyword (pydantic derives one from every name: "Sandbox Id" for sandbox_id);
- no `default: null`, and no `default` at all in an output schema (an output has no defaults);
- an optional input (default None) is described as its value, not as "that or null": a caller
  leaves it out (the server still takes null for it);
- elsewhere `anyOf: [{type: T, ...}, {type: null}]` becomes `type: [T, "null"]` where the
  keywords beside `type` apply to T only;
- a definition used once is written where it is used; only one used twice or more stays in
  `$defs`, shared.
"""

from __future__ import annotations

from typing import Any

__all__ = ["trimmed_input", "trimmed_output"]

Schema = dict[str, Any]

_SCHEMA_MAPS = ("properties", "$defs", "patternProperties", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalProperties", "not", "contains", "if", "then", "else", "propertyNames")
_NULL = {"type": "null"}
_DEFS = "#/$defs/"
# Keywords that constrain values of one JSON type only, so they mean the same beside ["T", "null"].
_TYPE_KEYWORDS: dict[str, set[str]] = {
    "string": {"minLength", "maxLength", "pattern", "format"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "boolean": set(),
    "array": {"items", "minItems", "maxItems", "uniqueItems"},
    "object": {"properties", "additionalProperties", "required", "minProperties", "maxProperties"},
}


def trimmed_input(schema: Schema) -> Schema:
    """An input schema, trimmed, that refuses arguments it does not name."""
    trimmed = _shared_definitions(_trim(schema, output=False))
    trimmed["additionalProperties"] = False
    return trimmed


def trimmed_output(schema: Schema) -> Schema:
    """An output schema, trimmed."""
    return _shared_definitions(_trim(schema, output=True))


def _trim(schema: Any, *, output: bool) -> Any:
    if not isinstance(schema, dict):
        return schema
    trimmed: Schema = {}
    for key, value in schema.items():
        if key == "title" or (key == "default" and (output or value is None)):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            trimmed[key] = {name: _trim(sub, output=output) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            trimmed[key] = [_trim(sub, output=output) for sub in value]
        elif key in _SCHEMA_VALUES and isinstance(value, dict):
            trimmed[key] = _trim(value, output=output)
        else:
            trimmed[key] = value
    branches = trimmed.get("anyOf")
    if not isinstance(branches, list) or len(branches) != 2 or _NULL not in branches:
        return trimmed
    (other,) = [branch for branch in branches if branch != _NULL]
    if not isinstance(other, dict) or set(other) & (set(trimmed) - {"anyOf"}):
        return trimmed
    if not output and schema.get("default", ...) is None:
        del trimmed["anyOf"]
        return {**other, **trimmed}  # optional: a caller leaves it out rather than send null
    kind = other.get("type")
    if (
        not isinstance(kind, str)
        or kind not in _TYPE_KEYWORDS
        or set(other) - {"type", "description"} - _TYPE_KEYWORDS[kind]
    ):
        return trimmed
    del trimmed["anyOf"]
    return {**other, "type": [kind, "null"], **trimmed}


def _shared_definitions(schema: Schema) -> Schema:
    """Write each definition used once (and not recursively) where it is used."""
    definitions: dict[str, Schema] = schema.get("$defs", {})
    if not definitions:
        return schema
    uses: dict[str, int] = {}
    _count_refs(schema, uses)
    inline = {name for name in definitions if uses.get(name, 0) <= 1 and not _refers_to(definitions[name], name)}

    def resolve(node: Any) -> Any:
        if isinstance(node, list):
            return [resolve(item) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_DEFS) and ref[len(_DEFS) :] in inline:
            beside = {key: value for key, value in node.items() if key != "$ref"}
            return resolve({**definitions[ref[len(_DEFS) :]], **beside})
        return {key: resolve(value) for key, value in node.items()}

    result = {key: resolve(value) for key, value in schema.items() if key != "$defs"}
    kept = {name: resolve(definition) for name, definition in definitions.items() if name not in inline}
    if kept:
        result["$defs"] = kept
    return result


def _count_refs(node: Any, uses: dict[str, int]) -> None:
    if isinstance(node, list):
        for item in node:
            _count_refs(item, uses)
    elif isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_DEFS):
            uses[ref[len(_DEFS) :]] = uses.get(ref[len(_DEFS) :], 0) + 1
        for value in node.values():
            _count_refs(value, uses)


def _refers_to(node: Any, name: str) -> bool:
    found: dict[str, int] = {}
    _count_refs(node, found)
    return name in found
