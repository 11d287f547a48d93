"""Pool status, read from the store alone, so the server's tool and the CLI report the same."""

from __future__ import annotations

import statistics

from sqlalchemy import func
from sqlmodel import Session, col, select

from dockyard.runtime.substrate.models import PoolInfo
from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import Computer, PoolState, Runtime, Sandbox, Store

__all__ = ["pool_status"]

_HISTORY = 1000  # claims per template that the percentiles cover


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1], 2)


async def pool_status(store: Store, settings: Settings) -> list[PoolInfo]:
    """Every configured pool: counts by state, target and queue, warm vs cold claims, latency."""

    def read(session: Session) -> list[PoolInfo]:
        counts: dict[tuple[str, str], int] = {
            (template, state): n
            for template, state, n in session.exec(
                select(Runtime.template, Runtime.state, func.count()).group_by(Runtime.template, Runtime.state)
            ).all()
        }
        pools = []
        for name, tpl in settings.templates.items():
            state = session.get(PoolState, name)
            model = Computer if tpl.kind == "computer" else Sandbox
            claims = session.exec(
                select(model.served_warm, model.claim_ms)
                .where(model.template == name, col(model.served_warm).is_not(None))
                .order_by(col(model.created_at).desc())
                .limit(_HISTORY)
            ).all()
            latencies = sorted(ms for _, ms in claims if ms is not None)
            pools.append(
                PoolInfo(
                    template=name,
                    network=tpl.network,
                    min=tpl.pool.min,
                    max=tpl.pool.max,
                    target=state.target if state else tpl.pool.min,
                    autoscale=settings.pool.autoscale_enabled,
                    warm=counts.get((name, "warm"), 0),
                    claimed=counts.get((name, "claimed"), 0),
                    provisioning=counts.get((name, "provisioning"), 0),
                    draining=counts.get((name, "draining"), 0),
                    destroying=counts.get((name, "destroying"), 0),
                    queue_depth=state.queue_depth if state else 0,
                    workspace_share=settings.quotas.pool_share(tpl.pool.max),
                    claims_warm=sum(1 for warm, _ in claims if warm),
                    claims_cold=sum(1 for warm, _ in claims if not warm),
                    claim_ms_p50=_percentile(latencies, 50),
                    claim_ms_p95=_percentile(latencies, 95),
                    claim_ms_p99=_percentile(latencies, 99),
                )
            )
        return pools

    return await store.run(read)
