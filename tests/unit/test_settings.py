"""Settings layering: the shipped config/dockyard.toml first, then the user's file, then
DOCKYARD_* variables (and the short POOL_* ones), then what the caller passes; each later layer
overrides single keys of the earlier ones and leaves the rest as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from dockyard.runtime.substrate.settings import Settings, load_settings


def test_user_file_overrides_defaults_and_environment_overrides_the_file(tmp_path: Path, monkeypatch) -> None:
    user_file = tmp_path / "dockyard.toml"
    user_file.write_text(
        "[sandbox]\noutput_cap_bytes = 2048\nexec_default_timeout_s = 5\n[templates.big]\nmemory_mb = 4096\n"
    )
    monkeypatch.setenv("DOCKYARD_SANDBOX__EXEC_DEFAULT_TIMEOUT_S", "9")
    monkeypatch.setenv("DOCKYARD_DATA_DIR", str(tmp_path / "data"))
    settings = load_settings(user_file)
    assert settings.sandbox.output_cap_bytes == 2048  # from the user's file
    assert settings.sandbox.exec_default_timeout_s == 9  # the environment wins over the file
    assert settings.sandbox.read_cap_bytes == 1 << 20  # untouched defaults survive the merge
    assert settings.templates["big"].memory_mb == 4096 and "default" in settings.templates
    assert settings.data_dir == tmp_path / "data"


def test_pool_variables_size_the_default_template_and_turn_on_the_autoscaler(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DOCKYARD_DATA_DIR", str(tmp_path / "data"))
    defaults = load_settings()
    assert (defaults.templates["default"].pool.min, defaults.templates["default"].pool.max) == (2, 8)
    assert defaults.pool.autoscale_enabled is False
    monkeypatch.setenv("POOL_MIN", "3")
    monkeypatch.setenv("POOL_MAX", "12")
    monkeypatch.setenv("POOL_AUTOSCALE_ENABLED", "true")
    settings = load_settings()
    assert (settings.templates["default"].pool.min, settings.templates["default"].pool.max) == (3, 12)
    assert settings.pool.autoscale_enabled is True
    monkeypatch.setenv("POOL_MIN", "20")
    with pytest.raises(ValueError, match=r"pool min \(20\) is above its max \(12\)"):
        load_settings()


def test_a_missing_config_file_is_an_error_not_a_silent_default(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_the_shipped_config_is_the_first_layer_over_the_classes_own_defaults(tmp_path: Path) -> None:
    """The classes alone keep no computer template and no warm sandbox; the shipped file adds both."""
    bare = Settings.model_fields["templates"].default_factory()  # type: ignore[misc]  # the class default, no file read
    assert sorted(bare) == ["default"] and bare["default"].pool.min == 0
    shipped = load_settings(data_dir=tmp_path)
    assert sorted(shipped.templates) == ["computer", "default"]
    assert shipped.templates["default"].pool.min == 2
    assert (shipped.templates["computer"].kind, shipped.templates["computer"].pool.max) == ("computer", 4)
    assert shipped.operator.workspace_id == "local" and shipped.operator.scopes == ["*"]


@pytest.mark.parametrize(
    ("in_file", "in_env", "passed", "expected"),
    [
        (None, None, None, 65536),  # the shipped value
        (2048, None, None, 2048),
        (None, 4096, None, 4096),
        (2048, 4096, None, 4096),
        (2048, 4096, 8192, 8192),
        (None, None, 8192, 8192),
    ],
)
def test_each_layer_overrides_the_ones_before_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    in_file: int | None,
    in_env: int | None,
    passed: int | None,
    expected: int,
) -> None:
    user_file = tmp_path / "dockyard.toml"
    user_file.write_text(f"[sandbox]\noutput_cap_bytes = {in_file}\n" if in_file is not None else "")
    if in_env is not None:
        monkeypatch.setenv("DOCKYARD_SANDBOX__OUTPUT_CAP_BYTES", str(in_env))
    overrides = {"sandbox": {"output_cap_bytes": passed}} if passed is not None else {}
    settings = load_settings(user_file, data_dir=tmp_path, **overrides)
    assert settings.sandbox.output_cap_bytes == expected


def test_a_layer_that_sets_one_key_of_a_table_keeps_the_others_of_every_layer_below(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_file = tmp_path / "dockyard.toml"
    user_file.write_text("[templates.default]\nmemory_mb = 2048\n[templates.default.pool]\nmax = 3\n")
    monkeypatch.setenv("DOCKYARD_TEMPLATES__DEFAULT__CPUS", "1.5")
    monkeypatch.setenv("DOCKYARD_SANDBOX__READ_CAP_BYTES", "4096")
    settings = load_settings(user_file, data_dir=tmp_path, sandbox={"output_cap_bytes": 2048})
    default = settings.templates["default"]
    assert (default.cpus, default.memory_mb) == (1.5, 2048)  # from the environment, from the file
    assert (default.pool.min, default.pool.max) == (2, 3)  # min from the shipped file, max from the user's
    assert (default.image, default.disk_mb) == ("sandbox", 4096)  # shipped
    assert (settings.sandbox.output_cap_bytes, settings.sandbox.read_cap_bytes) == (2048, 4096)
    assert settings.sandbox.exec_default_timeout_s == 60  # shipped, under two layers that set its neighbours
    assert "computer" in settings.templates  # a table the user's file does not name survives whole


def test_pool_variables_override_the_users_file_for_the_default_template(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_file = tmp_path / "dockyard.toml"
    user_file.write_text("[templates.default.pool]\nmin = 1\nmax = 5\n")
    assert load_settings(user_file, data_dir=tmp_path).templates["default"].pool.max == 5
    monkeypatch.setenv("POOL_MAX", "6")
    pool = load_settings(user_file, data_dir=tmp_path).templates["default"].pool
    assert (pool.min, pool.max) == (1, 6)


def test_an_unknown_table_in_the_users_file_is_refused_not_ignored(tmp_path: Path) -> None:
    user_file = tmp_path / "dockyard.toml"
    user_file.write_text("[sandboxes]\noutput_cap_bytes = 2048\n")
    with pytest.raises(ValidationError, match="sandboxes"):
        load_settings(user_file, data_dir=tmp_path)


def test_a_default_template_the_templates_do_not_hold_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKYARD_SANDBOX__DEFAULT_TEMPLATE", "gpu")
    with pytest.raises(ValidationError, match=r"sandbox\.default_template 'gpu' is not among the templates"):
        load_settings(data_dir=tmp_path)
