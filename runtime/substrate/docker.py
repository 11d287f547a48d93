"""The Docker backend: the only module family that talks to the Docker daemon.

docker-py is blocking, so every call hops to a worker thread. Attached execs (stdin, streamed
stdout/stderr) use the Engine API's hijacked connection directly over an async socket, so a
long-running command holds no thread and can be abandoned the moment it times out.
docker-py errors are translated into the engine's error tree in `dockerapi` and nowhere else.

`DockerBackend` is the one surface callers use. Its rooms, each a small class over the shared
connection (`dockerapi.DockerConnection`): containers (`dockercontainers`), execs and archives
(`dockerexec`), networks and images (`dockerimages`).
"""

from __future__ import annotations

from dockyard.runtime.substrate.dockercontainers import ContainerCalls, ContainerSpec
from dockyard.runtime.substrate.dockerexec import STDERR, STDOUT, ExecCalls, ExecChannel
from dockyard.runtime.substrate.dockerimages import ImageCalls, NetworkCalls

__all__ = ["STDERR", "STDOUT", "ContainerSpec", "DockerBackend", "ExecChannel"]


class DockerBackend(ContainerCalls, ExecCalls, NetworkCalls, ImageCalls):
    """Blocking docker-py calls off the event loop, plus async attached execs: every call on
    containers, execs, archives, networks and images, over one connection to the daemon."""
