"""Helpers for pool tests: wait for a pool to reach a shape, read its runtimes."""

from __future__ import annotations

import anyio
from sqlmodel import col, select

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.models import PoolInfo
from dockyard.runtime.substrate.store import PoolEvent, Runtime, RuntimeState


async def pool_info(engine: Engine, template: str = "default") -> PoolInfo:
    return next(p for p in await engine.pool_status() if p.template == template)


async def wait_for_pool(engine: Engine, *, warm: int, template: str = "default", within_s: float = 60) -> PoolInfo:
    """Wait until the pool holds exactly `warm` warm runtimes and nothing is starting or draining;
    if it does not in time, fail with the pool's figures and its latest lifecycle events."""
    info = await pool_info(engine, template)
    with anyio.move_on_after(within_s):
        while True:
            info = await pool_info(engine, template)
            if info.warm == warm and info.provisioning == 0 and info.draining == 0:
                return info
            await anyio.sleep(0.1)
    events = await engine.store.run(
        lambda s: [
            f"{e.runtime_id} {e.from_state}->{e.to_state}: {e.reason}"
            for e in s.exec(
                select(PoolEvent).where(PoolEvent.template == template).order_by(col(PoolEvent.id).desc()).limit(12)
            ).all()
        ]
    )
    raise AssertionError(
        f"pool '{template}' did not settle at {warm} warm within {within_s:g} s: {info}; latest events: {events}"
    )


async def live_runtimes(engine: Engine) -> list[Runtime]:
    return await engine.store.run(
        lambda s: list(s.exec(select(Runtime).where(col(Runtime.state).in_(RuntimeState.LIVE))).all())
    )


async def event_reasons(engine: Engine, runtime_id: str) -> list[str]:
    """The reasons of every lifecycle transition of one runtime, oldest first."""
    return await engine.store.run(
        lambda s: [e.reason for e in s.exec(select(PoolEvent).where(PoolEvent.runtime_id == runtime_id)).all()]
    )
