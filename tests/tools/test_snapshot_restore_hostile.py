"""A snapshot altered on disk must never write outside `/workspace` and the home when restored.

Each test takes a real snapshot, then plays whoever could change its tar in the data dir:
entries that would lead a root-side extraction out of the sandbox's places are refused before
anything is claimed; owners and setuid bits are made the sandbox's own.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from mcp import Client
from sqlmodel import Session, create_engine, select

from dockyard.runtime.runtimes.supervisor import CONTROL_MOUNT
from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import Runtime, RuntimeState, Snapshot
from tests.conftest import call, call_error, sh

pytestmark = pytest.mark.anyio

Entry = tuple[tarfile.TarInfo, bytes | None]


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields: object) -> Entry:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.uid, info.gid = kind, len(data), 0o644, 1000, 1000
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data if kind == tarfile.REGTYPE else None


async def snapshot_with(client: Client, settings: Settings, *extra: Entry) -> str:
    """A real snapshot of a sandbox holding `marker`, its workspace tar then given `extra` entries."""
    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    await sh(client, sandbox_id, "echo kept > /workspace/marker")
    snapshot_id = (await call(client, "sandbox_snapshot", sandbox_id=sandbox_id))["snapshot_id"]
    await call(client, "sandbox_destroy", sandbox_id=sandbox_id)
    with Session(create_engine(f"sqlite:///{settings.store_path}")) as session:
        folder = Path(session.exec(select(Snapshot).where(Snapshot.id == snapshot_id)).one().path)
    tar_path = folder / "workspace.tar"
    original = tar_path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(original)) as tar:
        kept = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in [*kept, *extra]:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return snapshot_id


def files_named(root: Path, name: str) -> list[Path]:
    return [p for p in root.rglob(name)]


def claimed(settings: Settings) -> int:
    with Session(create_engine(f"sqlite:///{settings.store_path}")) as session:
        return len(session.exec(select(Runtime).where(Runtime.state == RuntimeState.CLAIMED)).all())


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        pytest.param(
            lambda: [entry("esc", tarfile.SYMTYPE, linkname=CONTROL_MOUNT), entry("esc/pwned", data=b"x")],
            "below the symlink 'esc'",
            id="file-below-a-symlink-to-the-control-directory",
        ),
        pytest.param(
            lambda: [entry("d", tarfile.SYMTYPE, linkname="/"), entry("d/run/dockyard-sup/control/pwned", data=b"x")],
            "below the symlink 'd'",
            id="file-below-a-symlink-to-the-root",
        ),
        pytest.param(lambda: [entry("../../run/dockyard-sup/control/pwned", data=b"x")], "'..'", id="dot-dot"),
        pytest.param(lambda: [entry(f"/{CONTROL_MOUNT.strip('/')}/pwned", data=b"x")], "absolute name", id="absolute"),
        pytest.param(lambda: [entry("pwned", tarfile.LNKTYPE, linkname="etc/shadow")], "hard link", id="hard-link-out"),
        pytest.param(
            lambda: [entry("pwned", tarfile.CHRTYPE, devmajor=1, devminor=3)], "special file", id="device-node"
        ),
    ],
)
async def test_a_tampered_snapshot_is_refused_before_anything_is_claimed_and_writes_nothing(
    client: Client, settings: Settings, extra: Callable[[], list[Entry]], said: str
) -> None:
    snapshot_id = await snapshot_with(client, settings, *extra())
    before = claimed(settings)
    message = await call_error(client, "sandbox_create", from_snapshot=snapshot_id)
    assert f"snapshot '{snapshot_id}' cannot be restored" in message and said in message, message
    assert "altered outside dockyard" in message
    assert files_named(settings.data_dir, "pwned") == []  # nothing reached the host's control directories
    assert claimed(settings) == before  # no runtime held for a sandbox that was never made
    assert not list(settings.snapshots_dir.glob(".restoring-*"))  # the checked copy is gone too


async def test_a_snapshot_cannot_restore_root_owned_or_setuid_files(client: Client, settings: Settings) -> None:
    """Owners become the sandbox's own users and setuid bits are dropped; the content is kept."""
    snapshot_id = await snapshot_with(
        client,
        settings,
        entry("suid", data=b"#!/bin/sh\nid -u\n", mode=0o4755, uid=0, gid=0),
        entry("rootdir", tarfile.DIRTYPE, mode=0o777, uid=0, gid=0),
        entry("rootdir/inside", data=b"x", uid=0, gid=0),
        entry("member", data=b"m", uid=1003, gid=0),
    )
    sandbox_id = (await call(client, "sandbox_create", from_snapshot=snapshot_id))["sandbox_id"]
    listed = await sh(
        client, sandbox_id, "cd /workspace && stat -c '%n %u %g %a' marker suid rootdir rootdir/inside member"
    )
    assert listed["stdout"].splitlines() == [
        "marker 1000 1000 664",  # written with the sandbox's umask 002
        "suid 1000 1000 755",
        "rootdir 1000 1000 777",
        "rootdir/inside 1000 1000 644",
        "member 1003 1000 644",
    ]
    assert (await sh(client, sandbox_id, "cat /workspace/marker && rm -r /workspace/rootdir && echo gone"))[
        "stdout"
    ] == "kept\ngone\n"
