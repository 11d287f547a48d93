"""The admin key and what the operator does with it from the command line."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import Store
from dockyard.runtime.substrate.tokens import ADMIN, Minted, TokenService

__all__ = ["admin_key", "mint_as_admin"]


def admin_key(settings: Settings) -> tuple[str, Path | None, bool]:
    """The admin key: from config or the environment, else the data dir's `admin-key` file,
    created (readable by its owner only) on first use. Returns (key, file, created)."""
    if settings.admin_key is not None:
        return settings.admin_key.get_secret_value(), None, False
    path = settings.data_dir / "admin-key"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip(), path, False
    with os.fdopen(fd, "w") as fh:
        fh.write("dya_" + secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip(), path, True


async def mint_as_admin(settings: Settings, **request: Any) -> Minted:
    """Mint a token with the admin's authority, straight on the store (no server needed)."""
    store = Store(settings.store_path)
    await store.open()
    try:
        return await TokenService(store, AuditLog(store, settings.data_dir), None).mint(ADMIN, **request)
    finally:
        await store.close()
