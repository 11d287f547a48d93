"""Dispatch routing without Docker: which mode a task runs in, the hints that override the
caller's choice, and the checks a request must pass (with what each refusal tells the caller)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dockyard.runtime.substrate.errors import InvalidRequestError
from dockyard.runtime.substrate.settings import Identity, Settings, load_settings
from dockyard.runtime.work.dispatch.routing import (
    MAX_MEMBERS,
    MODES,
    check,
    check_host,
    consent_question,
    host_dir,
    route,
)

_RUNNERS = {
    "script": {"kind": "script"},
    "cmd": {"kind": "command", "argv": ["echo", "{prompt}"]},
    "model": {"kind": "llm", "url": "http://127.0.0.1:9/v1", "model": "m"},
}


def settings_with(
    tmp_path: Path, *, user_pc: bool = False, host_runners: list[str] | None = None, workdir: Path | None = None
) -> Settings:
    host = {"enabled": user_pc, "runners": host_runners or ["script"], "workdir": workdir}
    return load_settings(data_dir=tmp_path / "data", runners=_RUNNERS, dispatch={"user_pc": host})


@pytest.fixture
def plain(tmp_path: Path) -> Settings:
    return settings_with(tmp_path)


@pytest.fixture
def host_on(tmp_path: Path) -> Settings:
    return settings_with(tmp_path, user_pc=True, host_runners=["script", "cmd", "model"], workdir=tmp_path)


HOST_CALLER = Identity(scopes=["dispatch:create", "dispatch:user_pc"])


# -- route ------------------------------------------------------------------------------


def test_a_task_without_a_hint_runs_in_the_mode_the_caller_chose() -> None:
    for mode in MODES:
        chosen = route(mode, "sort the list", "sort -n numbers.txt")
        assert (chosen.mode, chosen.hint) == (mode, None)


@pytest.mark.parametrize(
    ("text", "forced", "phrase"),
    [
        ("do it in a clean environment", "remote", "clean environment"),
        ("needs a Fresh Sandbox", "remote", "Fresh Sandbox"),
        ("build on an isolated machine", "remote", "isolated machine"),
        ("run it async", "remote", "async"),
        ("crunch this in the background", "remote", "in the background"),
        ("use a team for the review", "team_multi_vm", "use a team"),
        ("work on it as a team", "team_multi_vm", "as a team"),
    ],
)
def test_a_phrase_in_the_summary_overrides_the_callers_mode_and_says_why(text: str, forced: str, phrase: str) -> None:
    chosen = route("local", text, "true")
    assert chosen.mode == forced
    assert chosen.hint == f"the task says '{phrase}', so it runs as {forced}"


def test_a_phrase_in_the_prompt_counts_as_much_as_one_in_the_summary() -> None:
    chosen = route("local", "t", "echo start; do this asynchronously")
    assert (chosen.mode, chosen.hint) == ("remote", "the task says 'asynchronously', so it runs as remote")


def test_a_hint_that_agrees_with_the_callers_mode_is_no_override() -> None:
    assert route("remote", "a clean environment, please", None).hint is None


def test_a_word_inside_another_word_is_no_hint() -> None:
    assert route("local", "asyncio tests and a teamwork chart", "pytest").mode == "local"


def test_the_first_hint_in_the_list_wins_when_a_task_has_several() -> None:
    assert route("local", "use a team in a clean environment", None).mode == "remote"


# -- check ------------------------------------------------------------------------------


def test_every_mode_with_what_it_needs_passes(plain: Settings, host_on: Settings) -> None:
    check(plain, "remote", "script", "echo hi", None, None)
    check(plain, "local", "cmd", "hello", "sbx_1", None)
    check(plain, "team_single_vm", "script", None, None, ["echo a", "echo b"])
    check(plain, "team_multi_vm", "model", None, None, ["a"] * MAX_MEMBERS)
    check(host_on, "user_pc", "script", "echo hi", None, None)


@pytest.mark.parametrize(
    ("mode", "runner", "prompt", "sandbox_id", "members", "message"),
    [
        (
            "cloud",
            "script",
            "x",
            None,
            None,
            "unknown mode 'cloud'; allowed: local, remote, team_single_vm, team_multi_vm, user_pc",
        ),
        (
            "user_pc",
            "script",
            "x",
            None,
            None,
            "mode 'user_pc' (the machine dockyard runs on) is off on this server; use 'remote' for an isolated runtime",
        ),
        (
            "team_multi_vm",
            "script",
            None,
            None,
            None,
            "mode 'team_multi_vm' needs members: one prompt (for the script runner, a script) per member",
        ),
        (
            "team_single_vm",
            "script",
            None,
            None,
            [],
            "mode 'team_single_vm' needs members: one prompt (for the script runner, a script) per member",
        ),
        (
            "team_multi_vm",
            "script",
            None,
            None,
            ["x"] * (MAX_MEMBERS + 1),
            f"at most {MAX_MEMBERS} members; got {MAX_MEMBERS + 1}",
        ),
        ("remote", "gpt", "x", None, None, "unknown runner 'gpt'; allowed: cmd, model, script"),
        (
            "remote",
            "script",
            None,
            None,
            None,
            "runner 'script' needs a prompt: the script to run, or the task for the command",
        ),
        (
            "remote",
            "cmd",
            "  \n",
            None,
            None,
            "runner 'cmd' needs a prompt: the script to run, or the task for the command",
        ),
        ("local", "script", "x", None, None, "mode 'local' runs in your current sandbox: give its sandbox_id"),
    ],
)
def test_a_request_that_cannot_run_is_refused_with_what_is_allowed(
    plain: Settings,
    mode: str,
    runner: str,
    prompt: str | None,
    sandbox_id: str | None,
    members: list[str] | None,
    message: str,
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check(plain, mode, runner, prompt, sandbox_id, members)
    assert str(refused.value) == message


# -- check_host -------------------------------------------------------------------------


def test_a_confirmed_host_run_by_a_caller_with_the_scope_passes(host_on: Settings) -> None:
    check_host(host_on, HOST_CALLER, "script", "confirmed")
    check_host(host_on, HOST_CALLER, "cmd", "confirmed")


def test_a_caller_without_the_user_pc_scope_is_refused_even_when_confirmed(host_on: Settings) -> None:
    with pytest.raises(InvalidRequestError, match="needs the dispatch:user_pc scope"):
        check_host(host_on, Identity(scopes=["dispatch:create"]), "script", "confirmed")


def test_an_llm_runner_never_runs_on_the_host_even_when_config_lists_it(host_on: Settings) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_host(host_on, HOST_CALLER, "model", "confirmed")
    assert str(refused.value) == "runner 'model' may not run on the host; allowed there: script, cmd"


def test_a_runner_config_does_not_allow_on_the_host_is_refused(tmp_path: Path) -> None:
    only_script = settings_with(tmp_path, user_pc=True)
    with pytest.raises(InvalidRequestError) as refused:
        check_host(only_script, HOST_CALLER, "cmd", "confirmed")
    assert str(refused.value) == "runner 'cmd' may not run on the host; allowed there: script"


@pytest.mark.parametrize(
    ("consent", "why"),
    [
        ("declined", "the user declined to run it on this computer"),
        ("cancelled", "the user dismissed the confirmation"),
        ("unavailable", "this client cannot ask the user to confirm it (it does not support elicitation)"),
        (None, "it was not confirmed by the user"),
        ("yes please", "it was not confirmed by the user"),
    ],
)
def test_anything_but_the_users_confirmation_refuses_a_host_run(
    host_on: Settings, consent: str | None, why: str
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        check_host(host_on, HOST_CALLER, "script", consent)
    assert str(refused.value) == f"mode 'user_pc' did not run: {why}; use 'remote' for an isolated runtime"


# -- consent_question and host_dir --------------------------------------------------------


def test_the_user_is_asked_about_a_host_run_with_its_task_runner_and_directory(
    host_on: Settings, tmp_path: Path
) -> None:
    question = consent_question(host_on, HOST_CALLER, "user_pc", "list files", "ls -la", None)
    assert question is not None
    assert question.startswith(
        f"Run a task on this computer, outside any sandbox, as the user dockyard runs as, in {tmp_path}?"
    )
    assert "Task: list files\nRunner: script\n---\nls -la" in question


def test_the_question_shows_at_most_2000_characters_of_the_prompt(host_on: Settings) -> None:
    question = consent_question(host_on, HOST_CALLER, "user_pc", "t", "x" * 5000, "script")
    assert question is not None and question.endswith("---\n" + "x" * 2000)


def test_no_question_is_asked_for_what_would_not_run_on_the_host(plain: Settings, host_on: Settings) -> None:
    assert consent_question(host_on, HOST_CALLER, "remote", "t", "ls", None) is None
    assert (
        consent_question(host_on, HOST_CALLER, "user_pc", "in a clean environment", "ls", None) is None
    )  # a hint moves it
    assert consent_question(plain, HOST_CALLER, "user_pc", "t", "ls", None) is None  # the mode is off
    assert consent_question(host_on, Identity(scopes=["dispatch:create"]), "user_pc", "t", "ls", None) is None
    assert consent_question(host_on, HOST_CALLER, "user_pc", "t", "ls", "model") is None
    assert consent_question(host_on, HOST_CALLER, "user_pc", "t", None, None) is None  # nothing to run


def test_host_runs_start_in_the_configured_directory_or_the_home(
    plain: Settings, host_on: Settings, tmp_path: Path
) -> None:
    assert host_dir(host_on) == tmp_path
    assert host_dir(plain) == Path.home()
