"""What a sandbox_create asks for is checked against the settings before anything starts: the
template must be a sandbox's, the network allowed, the sizes and time to live within their
caps, and environment names plain and outside dockyard's own prefix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dockyard.runtime.runtimes.sandboxspec import capped, checked_env, sandbox_template, ttl_within, usable_network
from dockyard.runtime.substrate.errors import InvalidRequestError, NetworkNotAllowedError, TemplateNotFoundError
from dockyard.runtime.substrate.settings import Settings, load_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(data_dir=tmp_path)


def test_a_computer_template_is_refused_for_a_sandbox_and_named_as_such(settings: Settings) -> None:
    assert sandbox_template(settings, "default").kind == "sandbox"
    with pytest.raises(InvalidRequestError, match="template 'computer' is a computer; use computer_create"):
        sandbox_template(settings, "computer")
    with pytest.raises(TemplateNotFoundError, match=r"unknown template 'nope'; allowed: .*default"):
        sandbox_template(settings, "nope")


def test_internet_is_refused_unless_the_config_allows_it(settings: Settings) -> None:
    assert usable_network(settings.sandbox, "workspace") == "workspace"
    with pytest.raises(NetworkNotAllowedError, match=r"disabled by config: sandbox.allow_internet"):
        usable_network(settings.sandbox, "internet")
    opened = settings.sandbox.model_copy(update={"allow_internet": True})
    assert usable_network(opened, "internet") == "internet"
    with pytest.raises(NetworkNotAllowedError, match="network 'bridge' is not allowed; allowed: none, workspace"):
        usable_network(settings.sandbox, "bridge")


def test_sizes_and_time_to_live_past_their_caps_are_refused(settings: Settings) -> None:
    limits = settings.sandbox
    assert capped("cpus", limits.max_cpus, limits.max_cpus) == limits.max_cpus
    with pytest.raises(InvalidRequestError, match=r"cpus 9\.0 is over the cap"):
        capped("cpus", 9.0, 4.0)
    assert ttl_within(limits, None) == limits.default_ttl_s
    assert ttl_within(limits, 0) == 0  # no expiry
    with pytest.raises(InvalidRequestError, match=re.escape(f"allowed: 1..{limits.max_ttl_s}")):
        ttl_within(limits, limits.max_ttl_s + 1)


@pytest.mark.parametrize("name", ["1ABC", "A-B", "", "DOCKYARD_TOKEN", "A B"])
def test_an_environment_name_that_is_not_plain_or_is_dockyards_own_is_refused(name: str) -> None:
    with pytest.raises(InvalidRequestError, match="invalid environment variable name"):
        checked_env({name: "x"})


def test_plain_environment_names_pass_as_a_copy() -> None:
    env = {"PATH_EXTRA": "/opt", "_private": "1"}
    checked = checked_env(env)
    assert checked == env and checked is not env
    assert checked_env(None) == {}
