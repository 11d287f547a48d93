"""The host runner (dispatch mode `user_pc`) without Docker: a real program on this machine,
its output streamed and kept, and nothing of the server's environment passed on beyond the
basics. (Its time limit, which kills everything the run started, is tested through dispatch.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from dockyard.runtime.substrate.errors import InvalidRequestError
from dockyard.runtime.substrate.settings import Identity, RunnerProfile
from dockyard.runtime.work.runners import InSandbox, Job, OnHost, OutputCallback
from dockyard.runtime.work.runners.host import HostRunner

pytestmark = pytest.mark.anyio

SCRIPT = RunnerProfile(kind="script")


def job(
    tmp_path: Path,
    prompt: str,
    *,
    profile: RunnerProfile = SCRIPT,
    env: dict[str, str] | None = None,
    on_output: OutputCallback | None = None,
) -> Job:
    return Job(profile, prompt, Identity(), OnHost(tmp_path), 10, env=env or {}, on_output=on_output)


async def test_a_script_runs_in_its_directory_with_the_jobs_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKYARD_ADMIN_KEY", "server-secret")
    ran = await HostRunner(cap=1 << 16).run(
        job(
            tmp_path,
            'pwd; echo "$DOCKYARD_RUN_ID ${DOCKYARD_ADMIN_KEY:-unset}"; echo oops >&2; exit 3',
            env={"DOCKYARD_RUN_ID": "dsp_1"},
        )
    )
    assert (ran.output, ran.stderr, ran.exit_code, ran.timed_out, ran.is_ok) == (
        f"{tmp_path}\ndsp_1 unset\n",
        "oops\n",
        3,
        False,
        False,
    )


async def test_a_command_profile_gets_the_prompt_as_one_argument_never_as_shell_text(tmp_path: Path) -> None:
    printf = RunnerProfile(kind="command", argv=["printf", "%s|", "{prompt}", "x{prompt}"])
    ran = await HostRunner(cap=1 << 16).run(job(tmp_path, "a b; touch pwned", profile=printf))
    assert ran.output == "a b; touch pwned|xa b; touch pwned|" and ran.is_ok
    assert not (tmp_path / "pwned").exists()


async def test_output_streams_while_the_run_goes_on(tmp_path: Path) -> None:
    heard: list[tuple[str, str]] = []

    async def on_output(stream: str, text: str) -> None:
        heard.append((stream, text))

    ran = await HostRunner(cap=1 << 16).run(job(tmp_path, "echo one; echo two >&2", on_output=on_output))
    assert ("stdout", "one\n") in heard and ("stderr", "two\n") in heard and ran.output == "one\n"


async def test_each_stream_keeps_its_last_bytes_under_the_cap(tmp_path: Path) -> None:
    ran = await HostRunner(cap=8).run(job(tmp_path, "printf 0123456789abcdef"))
    assert ran.output == "89abcdef"


async def test_an_llm_profile_or_a_sandbox_job_never_runs_on_the_host(tmp_path: Path) -> None:
    model = RunnerProfile(kind="llm", url="http://127.0.0.1:9/v1", model="m")
    with pytest.raises(InvalidRequestError, match="cannot run on the host"):
        await HostRunner(cap=8).run(job(tmp_path, "hi", profile=model))
    with pytest.raises(InvalidRequestError, match="runs on this machine only"):
        await HostRunner(cap=8).run(Job(SCRIPT, "true", Identity(), InSandbox("sbx_1"), 5))
