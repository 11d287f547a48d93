"""Helpers for pool tests: wait for a pool to reach a shape, read its runtimes."""

from __future__ import annotations

import anyio
from sqlmodel import col, select

from dockyard.runtime.engine import Engine
from dockyard.runtime.models import PoolInfo
from dockyard.runtime.store import PoolEvent, Runtime, RuntimeState


async def pool_info(engine: Engine, template: str = "default") -> PoolInfo:
    return next(p for p in await engine.pool_status() if p.template == template)


async def wait_for_pool(engine: Engine, *, warm: int, template: str = "default", within_s: float = 60) -> PoolInfo:
    """Wait until the pool holds exactly `warm` warm runtimes and nothing is starting or draining."""
    with anyio.fail_after(within_s):
        while True:
            info = await pool_info(engine, template)
            if info.warm == warm and info.provisioning == 0 and info.draining == 0:
                return info
            await anyio.sleep(0.1)


async def live_runtimes(engine: Engine) -> list[Runtime]:
    return await engine.store.run(
        lambda s: list(s.exec(select(Runtime).where(col(Runtime.state).in_(RuntimeState.LIVE))).all())
    )


async def event_reasons(engine: Engine, runtime_id: str) -> list[str]:
    """The reasons of every lifecycle transition of one runtime, oldest first."""
    return await engine.store.run(
        lambda s: [e.reason for e in s.exec(select(PoolEvent).where(PoolEvent.runtime_id == runtime_id)).all()]
    )
