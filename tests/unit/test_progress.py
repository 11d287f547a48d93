"""The pacing of a call's progress notifications: output at once, floods coalesced, heartbeats
when quiet, stderr labelled, nothing lost at the end."""

from __future__ import annotations

import re
import time

import anyio
import pytest

from dockyard.tools._progress import MESSAGE_CAP, MIN_GAP_S, Progress

pytestmark = pytest.mark.anyio


class Heard:
    """What a client would receive: (when, progress, message)."""

    def __init__(self) -> None:
        self.notes: list[tuple[float, float, str]] = []

    async def send(self, progress: float, message: str) -> None:
        self.notes.append((time.monotonic(), progress, message))

    @property
    def messages(self) -> list[str]:
        return [message for _, _, message in self.notes]

    @property
    def text(self) -> str:
        return "".join(message for message in self.messages if not message.startswith("[dockyard]"))


async def test_a_chunk_after_a_quiet_spell_is_sent_before_the_next_one_is_written() -> None:
    heard = Heard()
    async with Progress(heard.send, heartbeat_s=10).pacing() as progress:
        await progress.output("stdout", "first\n")
        with anyio.fail_after(5):
            while not heard.notes:
                await anyio.sleep(0.001)
        assert heard.messages == ["first\n"]
        await progress.output("stdout", "second\n")
    assert heard.messages == ["first\n", "second\n"]


async def test_a_flood_is_coalesced_to_at_most_one_notification_per_gap_and_loses_nothing() -> None:
    heard = Heard()
    sent = []
    began = time.monotonic()
    async with Progress(heard.send, heartbeat_s=10).pacing() as progress:
        for i in range(2000):
            line = f"line {i}\n"
            sent.append(line)
            await progress.output("stdout", line)
            if i % 20 == 0:
                await anyio.sleep(0.001)
    took = time.monotonic() - began
    assert heard.text == "".join(sent)
    assert len(heard.notes) <= took / MIN_GAP_S + 2, (len(heard.notes), took)
    gaps = [b[0] - a[0] for a, b in zip(heard.notes, heard.notes[1:-1], strict=False)]
    assert all(gap >= MIN_GAP_S * 0.9 for gap in gaps), gaps


async def test_stderr_lines_are_labelled_and_interleave_with_stdout_in_order() -> None:
    heard = Heard()
    async with Progress(heard.send, heartbeat_s=10).pacing() as progress:
        await progress.output("stdout", "out 1\n")
        await progress.output("stderr", "err 1\nerr 2\n")
        await progress.output("stdout", "out 2\n")
        await progress.output("stderr", "err ")
        await progress.output("stderr", "3 continued\n")
    assert heard.text == "out 1\n[stderr] err 1\n[stderr] err 2\nout 2\n[stderr] err 3 continued\n"


async def test_a_quiet_call_gets_heartbeats_with_elapsed_time_and_the_tail_of_its_output() -> None:
    heard = Heard()
    async with Progress(heard.send, heartbeat_s=0.2).pacing() as progress:
        await anyio.sleep(0.3)
        await progress.output("stdout", "x" * 1000 + "the end\n")
        await anyio.sleep(0.5)
    beats = [m for m in heard.messages if m.startswith("[dockyard] running for")]
    assert re.fullmatch(r"\[dockyard\] running for \d+ s; no output yet", beats[0]), beats
    assert len(beats) >= 2 and beats[-1].endswith("the end\n") and len(beats[-1]) < 400
    progresses = [p for _, p, _ in heard.notes]
    assert progresses == sorted(set(progresses)), "progress must strictly increase"


async def test_notes_keep_their_place_after_the_output_before_them() -> None:
    heard = Heard()
    async with Progress(heard.send, heartbeat_s=10).pacing() as progress:
        await progress.output("stdout", "working\n")
        await progress.note("dispatch dsp_1 is completed")
    assert heard.messages == ["working\n", "[dockyard] dispatch dsp_1 is completed"]


async def test_output_before_an_error_is_sent_and_the_error_comes_out_unwrapped() -> None:
    heard = Heard()
    with pytest.raises(LookupError, match="gone"):
        async with Progress(heard.send, heartbeat_s=10).pacing() as progress:
            await progress.output("stdout", "last words\n")
            raise LookupError("gone")
    assert heard.text == "last words\n"


async def test_one_notification_holds_at_most_the_cap_and_names_what_it_left_out() -> None:
    heard = Heard()
    async with Progress(heard.send, heartbeat_s=10).pacing() as progress:
        await progress.output("stdout", "y\n" * MESSAGE_CAP + "the end\n")
    assert len(heard.notes) == 1
    assert len(heard.messages[0]) < MESSAGE_CAP + 200
    assert f"{MESSAGE_CAP + len('the end') + 1} more characters not streamed" in heard.messages[0]
    assert heard.messages[0].startswith("y\ny\n") and heard.messages[0].endswith("y\nthe end\n")  # the tail is kept
