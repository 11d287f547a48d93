"""tools: the size of the tool list a client is sent (and its model reads on every turn), for
the default stdio toolsets, each toolset alone and all of them: bytes of compact JSON, as the
official client receives it from `dockyard serve --toolsets ...` over stdio. No timing."""

from __future__ import annotations

import json

from bench.figures import Figure, Target
from bench.run import Options, Run
from bench.served import EVERY_TOOLSET, serve

__all__ = ["measure"]

SECTION = "tools"
DEFAULT_BUDGET_KB = 32.0


async def _listed(run: Run, name: str, toolsets: str | None) -> tuple[int, float]:
    """How many tools `dockyard serve` lists with these toolsets, and their size in KiB."""
    async with serve(run, f"tools-{name}", pool_min=0, pool_max=1, computers=(0, 1), toolsets=toolsets) as served:
        tools = (await served.client.list_tools()).tools
    dumped = [tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in tools]
    return len(tools), len(json.dumps(dumped, separators=(",", ":"), ensure_ascii=False)) / 1024


async def measure(run: Run, options: Options) -> list[Figure]:
    """One row per toolset choice; the default's target is the 32 KiB budget."""
    count, size = await _listed(run, "default", None)
    figures = [
        Figure(
            SECTION,
            f"tool list, default stdio toolsets ({count} tools)",
            unit="KiB",
            samples=[size],
            target=Target.below(DEFAULT_BUDGET_KB),
        )
    ]
    for toolset in [*EVERY_TOOLSET.split(","), EVERY_TOOLSET]:
        count, size = await _listed(run, toolset.replace(",", "-"), toolset)
        label = "every toolset" if toolset == EVERY_TOOLSET else f"toolset {toolset} alone"
        figures.append(Figure(SECTION, f"tool list, {label} ({count} tools)", unit="KiB", samples=[size]))
    return figures
