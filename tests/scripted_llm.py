"""A scripted OpenAI-compatible chat endpoint on loopback: it stands in for a model (the only
thing outside this machine), answering each turn from a script and recording what it got."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

Turn = Callable[[list[dict[str, Any]]], dict[str, Any]]


def tool_call(name: str, **arguments: Any) -> dict[str, Any]:
    """A turn that calls one tool."""
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
        ],
    }


@dataclass
class ScriptedModel:
    turns: list[Turn]
    key: str = "test-key"
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def chat(self, request: Request) -> JSONResponse:
        if request.headers.get("authorization") != f"Bearer {self.key}":
            return JSONResponse({"error": "bad key"}, status_code=401)
        body = await request.json()
        self.requests.append(body)
        step = len(self.requests) - 1
        message = self.turns[min(step, len(self.turns) - 1)](body["messages"])
        return JSONResponse(
            {
                "id": f"r{step}",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            }
        )


@asynccontextmanager
async def scripted_model(turns: list[Turn]) -> AsyncIterator[ScriptedModel]:
    model = ScriptedModel(turns)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = Starlette(routes=[Route("/v1/chat/completions", model.chat, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    model.url = f"http://127.0.0.1:{port}/v1"
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.02)
        try:
            yield model
        finally:
            server.should_exit = True
