"""Dispatch: route a task to a mode, run it with the runner core, and never lose its result.

`routing` decides where a task goes and whether it may (pure), `states` is a dispatch's
lifecycle, `service` creates, waits on, cancels and lists dispatches, and `run` executes one.
"""

from dockyard.runtime.work.dispatch.routing import MODES
from dockyard.runtime.work.dispatch.service import DispatchService

__all__ = ["MODES", "DispatchService"]
