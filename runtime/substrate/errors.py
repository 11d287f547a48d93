"""The one error tree of the dockyard engine.

Every failure the engine reports on purpose is a `DockyardError`; its message is one
sentence written for the caller (often an LLM): what was wrong and what to do instead.
The tool layer passes that message on unchanged and hides everything else.

    DockyardError
    ├── NotFoundError                 an id or name the caller gave does not exist
    │   ├── SandboxNotFoundError
    │   │   └── SandboxLostError      its container died or vanished outside dockyard
    │   ├── SnapshotNotFoundError
    │   ├── TemplateNotFoundError
    │   └── ComputerNotFoundError
    ├── InvalidRequestError           input the schema cannot catch
    │   ├── PathOutsideWorkspaceError
    │   ├── SizeLimitError
    │   ├── TimeLimitError            an operation ran past its configured time limit
    │   ├── EncodingError
    │   ├── NetworkNotAllowedError
    │   ├── UnsafeSnapshotError       a snapshot's archive was altered to write outside its places
    │   └── StateError                a row's lifecycle state does not allow the step asked of it
    ├── SandboxPausedError            frozen from outside dockyard (`docker pause`); unpause it
    ├── ComputerActionError           the browser could not do it (a stale ref, an unreachable page)
    ├── AccessDeniedError             the caller's token does not allow this
    │   └── ScopeError                a scope the call needs is missing
    ├── CapacityError                 no room now; retry later or free something
    │   ├── PoolExhaustedError        a full pool freed nothing within the claim timeout
    │   └── QuotaExceededError        a configured quota is reached
    ├── LlmRunnerError                the llm runner's model endpoint failed, or the model never finished
    ├── ImageError
    │   ├── ImageBuildingError        the image is still being built; try again soon
    │   └── ImageBuildFailedError
    ├── NotRunningError               the part of the engine called is not running (start-up, shutdown)
    └── BackendError                  the container engine failed or is unreachable
        ├── DockerUnavailableError
        ├── ContainerGoneError        the container behind a runtime no longer exists
        ├── SupervisorError           a sandbox's supervisor is unreachable, refused us, or broke the protocol
        └── AuditWriteError           an action's audit row could not be written; the action fails
"""

from __future__ import annotations

__all__ = [
    "AccessDeniedError",
    "AuditWriteError",
    "BackendError",
    "CapacityError",
    "ComputerActionError",
    "ComputerNotFoundError",
    "ContainerGoneError",
    "DockerUnavailableError",
    "DockyardError",
    "EncodingError",
    "ImageBuildFailedError",
    "ImageBuildingError",
    "ImageError",
    "InvalidRequestError",
    "LlmRunnerError",
    "NetworkNotAllowedError",
    "NotFoundError",
    "NotRunningError",
    "PathOutsideWorkspaceError",
    "PoolExhaustedError",
    "QuotaExceededError",
    "SandboxLostError",
    "SandboxNotFoundError",
    "SandboxPausedError",
    "ScopeError",
    "SizeLimitError",
    "SnapshotNotFoundError",
    "StateError",
    "SupervisorError",
    "TemplateNotFoundError",
    "TimeLimitError",
    "UnsafeSnapshotError",
]


class DockyardError(Exception):
    """Base of every error the engine raises on purpose; the message is safe to show."""


class NotFoundError(DockyardError):
    """Raised when an id or name given by the caller does not exist (or is not theirs)."""


class SandboxNotFoundError(NotFoundError):
    """Raised when a sandbox id is unknown, destroyed, or owned by another workspace."""

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(f"unknown sandbox '{sandbox_id}'; call sandbox_list to see your sandboxes")


class SandboxLostError(SandboxNotFoundError):
    """Raised for a sandbox whose container died or was removed outside dockyard."""

    def __init__(self, sandbox_id: str, reason: str) -> None:
        NotFoundError.__init__(
            self, f"sandbox '{sandbox_id}' was lost ({reason}); create a new one with sandbox_create"
        )


class SandboxPausedError(DockyardError):
    """Raised for a sandbox whose container someone outside dockyard froze (`docker pause`)."""

    def __init__(self, sandbox_id: str) -> None:
        super().__init__(
            f"sandbox '{sandbox_id}' is paused outside dockyard (docker pause), so nothing in it can run; "
            "its /workspace is intact: unpause its container, or destroy it with sandbox_destroy"
        )


class SnapshotNotFoundError(NotFoundError):
    """Raised when a snapshot id is unknown or owned by another workspace."""

    def __init__(self, snapshot_id: str) -> None:
        super().__init__(f"unknown snapshot '{snapshot_id}'; sandbox_snapshot returns the ids you can use")


class TemplateNotFoundError(NotFoundError):
    """Raised when a template name is not in the configuration."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown template '{name}'; allowed: {', '.join(sorted(known))}")


class ComputerNotFoundError(NotFoundError):
    """Raised when a computer id is unknown, ended, or owned by another workspace (or `why` says
    what else made it unusable)."""

    def __init__(self, computer_id: str, why: str | None = None) -> None:
        super().__init__(
            why or f"unknown computer '{computer_id}'; computer_create starts one, and ids are per workspace"
        )


class InvalidRequestError(DockyardError):
    """Raised for input the schema cannot catch: it names the problem and what is allowed."""


class PathOutsideWorkspaceError(InvalidRequestError):
    """Raised when a file path leaves /workspace, by '..', an absolute path or a symlink."""


class SizeLimitError(InvalidRequestError):
    """Raised when content is larger than the configured cap."""


class TimeLimitError(InvalidRequestError):
    """Raised when an operation (such as a snapshot of a large workspace) runs past its time limit."""


class EncodingError(InvalidRequestError):
    """Raised when content is not valid in the encoding the caller named."""


class NetworkNotAllowedError(InvalidRequestError):
    """Raised when a network mode is unknown or disabled by configuration."""


class UnsafeSnapshotError(InvalidRequestError):
    """Raised when a snapshot's tar holds an entry that could write outside the sandbox's places."""

    def __init__(self, snapshot_id: str, what: str) -> None:
        super().__init__(
            f"snapshot '{snapshot_id}' cannot be restored: {what}; it was altered outside dockyard "
            "(dockyard never writes such an entry); delete it with snapshot tools or restore another one"
        )


class StateError(InvalidRequestError):
    """Raised when a lifecycle step is asked of a row whose state does not allow it (a task that
    is not open, a plan that is not pending); the message says what state it is in and what to do."""


class ComputerActionError(DockyardError):
    """Raised when the browser could not do what was asked (a stale ref, an unreachable page, a bad key)."""


class CapacityError(DockyardError):
    """Raised when a request cannot be served now for lack of capacity."""


class PoolExhaustedError(CapacityError):
    """Raised when a claim waited its whole timeout in the queue of a pool at its max."""

    def __init__(self, template: str, maximum: int, waited_s: float) -> None:
        super().__init__(
            f"pool '{template}' is at its max of {maximum} runtimes and none was released within {waited_s:g} s; "
            "destroy a sandbox you no longer need (sandbox_list shows yours) or try again later"
        )


class LlmRunnerError(DockyardError):
    """Raised when the `llm` runner's endpoint fails or answers something unusable, or the model
    does not finish within its allowed turns."""


class ImageError(DockyardError):
    """Base of errors about runtime images."""


class ImageBuildingError(ImageError):
    """Raised when a tool needs an image that is still being built after the wait allowed."""


class ImageBuildFailedError(ImageError):
    """Raised when the last attempt to build an image failed; the message says why."""


class NotRunningError(DockyardError):
    """Raised when a call reaches a part of the engine (the store, the pool manager) that is not
    running: the server is still starting up or already shutting down."""

    def __init__(self, part: str) -> None:
        super().__init__(f"{part} is not running (the server is starting up or shutting down); try again in a moment")


class BackendError(DockyardError):
    """Raised when the container engine rejects or fails an operation."""


class DockerUnavailableError(BackendError):
    """Raised when the Docker daemon cannot be reached."""


class ContainerGoneError(BackendError):
    """Raised when the container behind a runtime no longer exists."""


class SupervisorError(BackendError):
    """Raised when a sandbox's supervisor could not be reached, refused us, or broke the protocol."""


class AuditWriteError(BackendError):
    """Raised when an action's audit row cannot be written: no unrecorded action is reported as done."""

    def __init__(self, action: str, reason: str, error: str | None = None, *, started: bool = True) -> None:
        if not started:
            super().__init__(
                f"the audit row that opens this {action} could not be written ({reason}), so it was not started"
            )
        elif error is None:
            super().__init__(
                f"the audit row for this {action} could not be written ({reason}), so the call is reported as "
                "failed; the action itself may have taken effect, so check before retrying"
            )
        else:
            super().__init__(f"{action} failed ({error}) and its audit row could not be written either ({reason})")


class AccessDeniedError(DockyardError):
    """Raised when the caller's token does not allow what they asked."""


class ScopeError(AccessDeniedError):
    """Raised when a call needs a scope the caller's token lacks."""

    def __init__(self, scope: str, held: list[str]) -> None:
        have = ", ".join(sorted(held)) or "none"
        super().__init__(
            f"this call needs the scope '{scope}', which your token lacks (it has: {have}); ask for a token with it"
        )


class QuotaExceededError(CapacityError):
    """Raised when a configured quota is reached; the message names the quota and its limit."""
