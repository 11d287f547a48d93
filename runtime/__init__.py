"""The dockyard engine: store and audit, Docker backend, images and sandboxes.

This package never imports `mcp`, `dockyard.tools` or `dockyard.server`.
"""

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.settings import Identity, Settings, load_settings

__all__ = ["Engine", "Identity", "Settings", "load_settings"]
