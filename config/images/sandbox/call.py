#!/opt/dockyard/client/bin/python
"""dockyard-call: call one of dockyard's tools from a shell inside this sandbox.

    dockyard-call TOOL ['{"json": "arguments"}']   the tool's structured result, one JSON line
    dockyard-call --list                           the tools there are, one name a line

It is a client of the official MCP Python SDK talking to dockyard-bridge, so it acts as the
bridge does: as this sandbox's owner, or as the token in DOCKYARD_TOKEN (a dispatch's runner
has its run's). Exit status: 0 done, 1 the tool (or the session) failed, with the reason on
stderr, 2 bad usage.
"""

import json
import os
import sys
from typing import Any

import anyio
from mcp import Client, MCPError, StdioServerParameters
from mcp.types import TextContent

USAGE = 'usage: dockyard-call TOOL [\'{"json": "arguments"}\'] | dockyard-call --list'


async def list_tools(client: Client) -> int:
    cursor = None
    while True:
        page = await client.list_tools(cursor=cursor)
        for tool in page.tools:
            print(tool.name)
        cursor = page.next_cursor
        if not cursor:
            return 0


async def call_tool(client: Client, tool: str, arguments: dict[str, Any]) -> int:
    try:
        result = await client.call_tool(tool, arguments)
    except MCPError as exc:  # refused as a request rather than failed as a tool
        sys.stderr.write(f"dockyard-call: {tool}: {exc}\n")
        return 1
    text = "\n".join(block.text for block in result.content if isinstance(block, TextContent) and block.text)
    if result.is_error:
        sys.stderr.write(f"dockyard-call: {tool}: {text or 'failed'}\n")
        return 1
    # A tool without a structured result gives its text, as a JSON string.
    print(json.dumps(result.structured_content if result.structured_content is not None else text))
    return 0


def bridge() -> StdioServerParameters:
    """dockyard-bridge, handed DOCKYARD_TOKEN: the SDK gives a server only a few safe variables."""
    token = os.environ.get("DOCKYARD_TOKEN")
    return StdioServerParameters(command="dockyard-bridge", env={"DOCKYARD_TOKEN": token} if token else None)


async def main(args: list[str]) -> int:
    async with Client(bridge()) as client:
        if args[0] == "--list":
            return await list_tools(client)
        return await call_tool(client, args[0], json.loads(args[1]) if len(args) > 1 else {})


def reasons(exc: BaseException) -> list[str]:
    """The messages of an exception, or of every exception an exception group holds."""
    if isinstance(exc, BaseExceptionGroup):
        return [reason for inner in exc.exceptions for reason in reasons(inner)]
    return [str(exc) or type(exc).__name__]


def usage_error(args: list[str]) -> str | None:
    """Why the arguments are unusable, or None."""
    if not args or len(args) > 2:
        return USAGE
    if args[0].startswith("-") and args != ["--list"]:
        return USAGE
    if len(args) == 2:
        try:
            arguments = json.loads(args[1])
        except ValueError as exc:
            return f"dockyard-call: the arguments are not JSON ({exc})\n{USAGE}"
        if not isinstance(arguments, dict):
            return f"dockyard-call: the arguments must be a JSON object\n{USAGE}"
    return None


if __name__ == "__main__":
    problem = usage_error(sys.argv[1:])
    if problem:
        sys.stderr.write(problem + "\n")
        sys.exit(2)
    try:
        sys.exit(anyio.run(main, sys.argv[1:]))
    except Exception as exc:  # noqa: BLE001 - the session could not start or broke: say so on stderr, briefly
        sys.stderr.write(f"dockyard-call: no answer from dockyard through dockyard-bridge: {'; '.join(reasons(exc))}\n")
        sys.exit(1)
