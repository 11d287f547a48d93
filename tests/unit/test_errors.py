"""The error tree: every class of runtime/substrate/errors.py is drawn, under its parent, in the module's
docstring, so the drawing a newcomer reads cannot drift from the code."""

from __future__ import annotations

import inspect
import re

from dockyard.runtime.substrate import errors
from dockyard.runtime.substrate.errors import DockyardError

# One drawn class: the tree's guides ("│   ", "    ") give its depth, then "├── " or "└── ".
_BRANCH = re.compile(r"^(?P<guides>(?:│   |    )*)[├└]── (?P<name>\w+)")
_INDENT = 4


def _classes() -> dict[str, type[BaseException]]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if cls.__module__ == errors.__name__ and issubclass(cls, BaseException)
    }


def _drawn_parents() -> dict[str, str | None]:
    """Each class named in the docstring's drawing, with the class drawn above it (None for the root)."""
    lines = [line.strip("\n") for line in (errors.__doc__ or "").splitlines()]
    root = next(i for i, line in enumerate(lines) if line.strip() == DockyardError.__name__)
    margin = len(lines[root]) - len(lines[root].lstrip())
    parents: dict[str, str | None] = {DockyardError.__name__: None}
    path = [DockyardError.__name__]
    for line in lines[root + 1 :]:
        match = _BRANCH.match(line[margin:])
        if match is None:
            break
        depth = len(match["guides"]) // _INDENT + 1
        del path[depth:]
        parents[match["name"]] = path[-1]
        path.append(match["name"])
    return parents


def test_every_error_class_is_a_dockyard_error() -> None:
    outside = sorted(name for name, cls in _classes().items() if not issubclass(cls, DockyardError))
    assert outside == []


def test_every_error_class_is_drawn_under_its_parent_in_the_docstring() -> None:
    actual = {name: (None if cls is DockyardError else cls.__bases__[0].__name__) for name, cls in _classes().items()}
    assert _drawn_parents() == actual


def test_every_error_class_is_exported_and_nothing_else_is() -> None:
    assert sorted(errors.__all__) == sorted(_classes())


def test_every_error_class_says_when_it_is_raised() -> None:
    undocumented = sorted(name for name, cls in _classes().items() if not (cls.__dict__.get("__doc__") or "").strip())
    assert undocumented == []
