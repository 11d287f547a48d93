"""Typed settings: `config/dockyard.toml`, then the user's file, then `DOCKYARD_*` variables.

`load_settings()` is the only place that reads configuration; every component receives the
`Settings` object (or the part it needs) through its constructor.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dockyard.runtime.substrate.actions import Toolset

__all__ = [
    "DEFAULT_CONFIG",
    "Identity",
    "ImageSettings",
    "NetworkMode",
    "PoolSettings",
    "PoolShape",
    "ProgressSettings",
    "SandboxSettings",
    "Settings",
    "TemplateSettings",
    "ToolsetSettings",
    "load_settings",
]

NetworkMode = Literal["none", "workspace", "internet"]

DEFAULT_CONFIG = resources.files("dockyard.config").joinpath("dockyard.toml")


class Identity(BaseModel):
    """Who a caller is: the attribution chain every runtime and audit row carries, and what
    they may do (their token's scopes; '*' is every scope)."""

    workspace_id: str = "local"
    project_id: str = "default"
    user_id: str = "operator"
    run_id: str | None = None
    scopes: list[str] = Field(default_factory=lambda: ["*"])
    token_id: str | None = Field(None, description="The token this caller presented; none for the local operator.")
    sandbox_id: str | None = Field(None, description="Set for a sandbox's own token: it may act on that sandbox only.")

    def allows(self, scope: str) -> bool:
        return "*" in self.scopes or scope in self.scopes


class PoolShape(BaseModel):
    """How many runtimes of one template to keep: `min` warm and ready, `max` in all."""

    min: int = Field(0, ge=0, le=256)
    max: int = Field(8, ge=1, le=1024)

    @model_validator(mode="after")
    def _ordered(self) -> PoolShape:
        if self.min > self.max:
            raise ValueError(f"pool min ({self.min}) is above its max ({self.max})")
        return self


class RunnerProfile(BaseModel):
    """How a dispatch's work is done in its runtime.

    `script`: the prompt is a bash script. `command`: a program from the template's image,
    run with `argv` where each `{prompt}` is replaced by the prompt, as one argument (never
    through a shell). `llm`: a tool-using loop on the server against an OpenAI-compatible
    chat-completions endpoint, whose tools work in the dispatch's sandbox.
    """

    kind: Literal["script", "command", "llm"]
    argv: list[str] = Field(default_factory=list)
    timeout_s: int = Field(600, ge=1)
    url: str | None = Field(None, description="llm: an OpenAI-compatible API base, e.g. http://127.0.0.1:11434/v1.")
    model: str | None = None
    api_key: SecretStr | None = Field(
        None, description="llm: the endpoint's key (kept on the server, never in a runtime)."
    )
    max_steps: int = Field(20, ge=1, le=200, description="llm: model turns before the runner gives up.")

    @model_validator(mode="after")
    def _complete(self) -> RunnerProfile:
        if self.kind == "command" and not self.argv:
            raise ValueError('a command runner needs argv, such as ["claude", "-p", "{prompt}"]')
        if self.kind == "llm" and not (self.url and self.model):
            raise ValueError("an llm runner needs url (an OpenAI-compatible API base) and model")
        return self


class TemplateSettings(BaseModel):
    """A named runtime recipe: which kind of runtime, its image and limits, and its pool.

    `kind` says what its runtimes are: sandboxes (sandbox_create; a supervisor inside) or
    computers (computer_create; a headless browser with no network), so neither tool can be
    handed the other's runtime.
    """

    kind: Literal["sandbox", "computer"] = "sandbox"
    image: str = "sandbox"
    cpus: float = Field(1.0, gt=0, le=64)
    memory_mb: int = Field(1024, ge=64, le=65536)
    pids_limit: int = Field(256, ge=16, le=65536)
    tmp_size_mb: int = Field(256, ge=1, le=65536)
    disk_mb: int = Field(
        4096,
        ge=0,
        le=1 << 20,
        description="A sandbox's disk for /workspace and /home together; a write past it fails with ENOSPC. 0: no limit.",
    )
    network: NetworkMode = "none"
    runtime: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="An OCI runtime registered with Docker for this template's sandboxes (e.g. runsc, gVisor); "
        "unset: Docker's default.",
    )
    env: dict[str, str] = Field(default_factory=dict)
    pool: PoolShape = Field(default_factory=PoolShape)


class UserPcSettings(BaseModel):
    """Dispatch mode `user_pc`: running a task on the machine dockyard itself runs on, outside
    any sandbox. Off unless enabled; even then every such dispatch is confirmed by the user
    through the client, and only callers holding the `dispatch:user_pc` scope may ask."""

    enabled: bool = False
    workdir: Path | None = Field(None, description="Where host runs start; the server user's home when unset.")
    runners: list[str] = Field(
        default_factory=lambda: ["script"],
        description="Runner profiles allowed on the host (script or command kinds; llm tools act in sandboxes).",
    )


class ComputerSettings(BaseModel):
    """Computers: a headless browser per agent, in its own container from the pool."""

    default_template: str = "computer"
    default_ttl_s: int = Field(
        3600, ge=60, description="A computer is destroyed this long after creation unless ttl_s says otherwise."
    )
    max_ttl_s: int = Field(86400, ge=60)
    width: int = Field(1280, ge=200, le=3840)
    height: int = Field(800, ge=200, le=2160)
    action_timeout_s: float = Field(10.0, gt=0, le=120, description="How long a click, typing or navigation may take.")
    snapshot_cap_chars: int = Field(
        40000, ge=1000, description="Longer accessibility snapshots are cut, with a marker."
    )


class TeamSettings(BaseModel):
    """Limits for agent teams."""

    max_members: int = Field(16, ge=1, le=256)
    max_tasks: int = Field(1000, ge=1)
    message_max_bytes: int = Field(65536, ge=1, description="The largest message body a team tool accepts.")
    member_token_ttl_s: int = Field(
        86400, ge=60, description="How long a member's token lives (it is re-minted on restart)."
    )


class DispatchSettings(BaseModel):
    """How dispatches are routed and run."""

    user_pc: UserPcSettings = Field(default_factory=UserPcSettings)


class ToolsetSettings(BaseModel):
    """Which families of tools each transport offers; a tool outside them is neither listed nor
    callable. Over HTTP each caller also sees only the tools its token's scopes allow. `dockyard
    serve --toolsets` replaces the list of the transport it serves."""

    stdio: list[Toolset] = Field(
        default_factory=lambda: [Toolset.SANDBOX, Toolset.DISPATCH],
        description="For the local operator (and programs in its sandboxes); kept small, as every tool "
        "costs the client's model context on every turn.",
    )
    http: list[Toolset] = Field(
        default_factory=lambda: list(Toolset), description="For HTTP clients, each narrowed to its token's scopes."
    )


class QuotaSettings(BaseModel):
    """Limits on what callers hold at once; 0 means no limit. A refusal names the quota.

    The tenant is this dockyard instance (every workspace it serves); pools have their own
    `max` per template, of which one workspace holds at most `workspace_pool_share`. A run's
    limits count its whole tree: the dispatches and members it started, at any depth.
    """

    tenant_sandboxes: int = Field(0, ge=0)
    workspace_sandboxes: int = Field(64, ge=0)
    user_sandboxes: int = Field(32, ge=0)
    run_sandboxes: int = Field(
        16, ge=0, description="Sandboxes one run's tree may hold at once: its own and those of every run it started."
    )
    tenant_computers: int = Field(0, ge=0)
    workspace_computers: int = Field(16, ge=0)
    user_computers: int = Field(8, ge=0)
    run_computers: int = Field(
        4, ge=0, description="Computers one run's tree may hold at once: its own and those of every run it started."
    )
    workspace_pool_share: float = Field(
        0.75,
        gt=0,
        le=1,
        description="The part of each pool's max one workspace may hold (rounded down, at least one runtime).",
    )
    dispatches_per_minute: int = Field(120, ge=0, description="Dispatches one workspace may start in any 60 s.")
    workspace_snapshot_mb: int = Field(
        16384,
        ge=0,
        description="Disk space (MiB) one workspace's snapshots may take together; a snapshot that would pass it stops.",
    )

    def pool_share(self, maximum: int) -> int:
        """The most runtimes of a pool with this `max` that one workspace may hold."""
        return max(1, int(self.workspace_pool_share * maximum + 1e-9))


class PoolSettings(BaseModel):
    """How the warm pools behave; each template's size is in its own `pool` table.

    `POOL_MIN`, `POOL_MAX` and `POOL_AUTOSCALE_ENABLED` in the environment override the
    default template's min and max and `autoscale_enabled`.
    """

    autoscale_enabled: bool = False
    autoscale_interval_s: float = Field(15.0, gt=0)
    scale_down_after_s: float = Field(120.0, ge=0, description="Hysteresis: idle this long before shrinking.")
    health_interval_s: float = Field(30.0, gt=0)
    claim_timeout_s: float = Field(60.0, gt=0, description="How long a claim waits in a full pool's queue.")
    recycle: bool = Field(True, description="Wipe and reuse released runtimes; false destroys them instead.")
    keep_warm_after_exit: bool = Field(
        False,
        description="Leave warm runtimes running when the server exits (adopted at the next start); "
        "by default a graceful exit stops them, and only claimed sandboxes and computers stay.",
    )
    exit_grace_s: float = Field(30.0, gt=0, description="How long a graceful exit may spend stopping warm runtimes.")
    default_min: int | None = Field(None, ge=0, description="Set from POOL_MIN; overrides the default template's min.")
    default_max: int | None = Field(None, ge=1, description="Set from POOL_MAX; overrides the default template's max.")


class SandboxSettings(BaseModel):
    """Caps and defaults of the sandbox tools."""

    default_template: str = "default"
    default_ttl_s: int = Field(3600, ge=0)
    max_ttl_s: int = Field(86400, ge=1)
    allow_internet: bool = False
    max_cpus: float = Field(4.0, gt=0)
    max_memory_mb: int = Field(8192, ge=64)
    exec_default_timeout_s: int = Field(60, ge=1)
    exec_max_timeout_s: int = Field(3600, ge=1)
    output_cap_bytes: int = Field(
        65536, ge=1024, description="Per stream, per exec: what is kept of the output (its head and its tail)."
    )
    output_scan_bytes: int = Field(
        64 << 20, ge=1024, description="Per stream, per exec: how much output is read to find its tail."
    )
    exec_outputs_kept: int = Field(
        20, ge=1, le=1000, description="Full outputs kept per sandbox for reading as resources (the newest)."
    )
    read_cap_bytes: int = Field(1 << 20, ge=1024)
    write_cap_bytes: int = Field(10 << 20, ge=1024)
    list_max_entries: int = Field(1000, ge=1)
    snapshot_max_bytes: int = Field(
        4 << 30, ge=1 << 20, description="A snapshot (workspace and home) larger than this fails."
    )
    snapshot_timeout_s: float = Field(
        600.0, gt=0, description="A snapshot taking longer than this fails; the sandbox runs on."
    )
    reaper_interval_s: float = Field(5.0, gt=0)


class ResultSettings(BaseModel):
    """How large a tool result may grow: every tool keeps its result's text within the budget and
    says where the rest is (an exec's full output as a resource, a file's next page, a cursor)."""

    budget_chars: int = Field(
        16000, ge=2000, le=1_000_000, description="Characters of text one tool result carries, at most (about)."
    )


class ImageSettings(BaseModel):
    """Where runtime images come from: recipes in config, a base pulled or bootstrapped."""

    prefix: str = "dockyard"
    base_pull: str = "debian:bookworm-slim"
    pull_timeout_s: float = Field(20.0, gt=0)
    suite: str = "bookworm"
    variant: str = "minbase"
    debian_mirror: str | None = None
    wait_s: float = Field(45.0, ge=0)
    build_on_start: bool = True
    recipes_dir: Path | None = Field(
        None, description="Where recipes live; default: the ones shipped in config/images."
    )


class ProgressSettings(BaseModel):
    """How a running tool call keeps its client informed (progress notifications)."""

    heartbeat_s: float = Field(
        5.0,
        gt=0,
        le=10,
        description="A call that has sent nothing for this long sends a heartbeat (elapsed time, tail of output).",
    )


class Settings(BaseSettings):
    """Everything dockyard is configured with, loaded once by `load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="DOCKYARD_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    data_dir: Path = Field(default_factory=lambda: Path.home() / ".local" / "share" / "dockyard")
    docker_host: str = Field(
        "unix:///var/run/docker.sock",
        validation_alias=AliasChoices("docker_host", "DOCKYARD_DOCKER_HOST", "DOCKER_HOST"),
    )
    docker_timeout_s: float = Field(120.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    operator: Identity = Field(default_factory=Identity)
    admin_key: SecretStr | None = Field(
        None, description="The key that mints tokens over HTTP; generated into the data dir on the first HTTP start."
    )
    sandbox: SandboxSettings = Field(default_factory=SandboxSettings)
    images: ImageSettings = Field(default_factory=ImageSettings)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    quotas: QuotaSettings = Field(default_factory=QuotaSettings)
    templates: dict[str, TemplateSettings] = Field(default_factory=lambda: {"default": TemplateSettings()})
    runners: dict[str, RunnerProfile] = Field(default_factory=lambda: {"script": RunnerProfile(kind="script")})
    dispatch: DispatchSettings = Field(default_factory=DispatchSettings)
    teams: TeamSettings = Field(default_factory=TeamSettings)
    computers: ComputerSettings = Field(default_factory=ComputerSettings)
    results: ResultSettings = Field(default_factory=ResultSettings)
    progress: ProgressSettings = Field(default_factory=ProgressSettings)
    toolsets: ToolsetSettings = Field(default_factory=ToolsetSettings)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @model_validator(mode="after")
    def _pool_overrides(self) -> Settings:
        name = self.sandbox.default_template
        if name not in self.templates:
            raise ValueError(
                f"sandbox.default_template '{name}' is not among the templates: {', '.join(self.templates)}"
            )
        if self.pool.default_min is not None or self.pool.default_max is not None:
            shape = self.templates[name].pool.model_dump()
            shape["min"] = self.pool.default_min if self.pool.default_min is not None else shape["min"]
            shape["max"] = self.pool.default_max if self.pool.default_max is not None else shape["max"]
            self.templates[name].pool = PoolShape.model_validate(shape)
        return self

    @property
    def store_path(self) -> Path:
        """The SQLite file of the store."""
        return self.data_dir / "dockyard.db"

    @property
    def snapshots_dir(self) -> Path:
        """Where snapshot archives are kept."""
        return self.data_dir / "snapshots"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        files = settings_cls.model_config.get("toml_file") or [Path(str(DEFAULT_CONFIG))]
        toml = TomlConfigSettingsSource(settings_cls, toml_file=files, deep_merge=True)
        return (init_settings, env_settings, _PoolEnvironment(settings_cls), toml)


class _PoolEnvironment(PydanticBaseSettingsSource):
    """The short pool variables operators know: POOL_MIN, POOL_MAX, POOL_AUTOSCALE_ENABLED."""

    _NAMES: ClassVar[dict[str, str]] = {
        "POOL_MIN": "default_min",
        "POOL_MAX": "default_max",
        "POOL_AUTOSCALE_ENABLED": "autoscale_enabled",
    }

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        pool = {key: os.environ[name] for name, key in self._NAMES.items() if os.environ.get(name, "").strip()}
        return {"pool": pool} if pool else {}


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings: defaults file, then `config_file`, then environment, then overrides."""
    files = [Path(str(DEFAULT_CONFIG))]
    if config_file is not None:
        if not config_file.is_file():
            raise FileNotFoundError(f"config file {config_file} does not exist")
        files.append(config_file)
    # pydantic-settings reads its file list from the class, so the user's file rides on a subclass.
    loaded: type[Settings] = type(
        "LoadedSettings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": files}}
    )
    return loaded(**overrides)
