"""`bin/bench`: run the benchmark's sections, print one table, write every sample to JSON.

Each figure is p50/p95 over its samples beside a baseline measured in the same run. Everything
the run creates is removed at the end, also on error or Ctrl-C. Never run by pytest.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import FrameType
from typing import Any

import anyio
from rich.console import Console

from bench.figures import Figure, render, summary
from bench.machine import describe
from bench.run import Options, Run, say
from bench.sections import SECTIONS
from bench.served import DOCKYARD


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bin/bench", description="Measure dockyard against baselines taken in the same run."
    )
    parser.add_argument(
        "--only",
        type=lambda text: [name.strip() for name in text.split(",") if name.strip()],
        default=list(SECTIONS),
        help=f"comma-separated sections to run (default all: {','.join(SECTIONS)})",
    )
    parser.add_argument(
        "--runs", type=int, default=30, help="samples per figure (default 30; snapshot takes max(3, runs/10))"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the 20-in-parallel claims and of the 100 dispatches (default 3)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("bench-results.json"),
        help="where to write every sample (default ./bench-results.json)",
    )
    args = parser.parse_args()
    if unknown := [name for name in args.only if name not in SECTIONS]:
        parser.error(f"unknown section {', '.join(unknown)}; choose from {','.join(SECTIONS)}")
    if args.runs < 2 or args.rounds < 1:
        parser.error("--runs must be at least 2 and --rounds at least 1")
    args.only = [name for name in SECTIONS if name in args.only]  # the table keeps one order
    return args


def _images_ready() -> bool:
    """Build the runtime images if they are missing or stale (a no-op when current), progress on stderr."""
    say("[bold]images:[/bold] checking the runtime images (built once if missing or stale)")
    return subprocess.run([str(DOCKYARD), "images", "build"], stdout=sys.stderr, check=False).returncode == 0


async def _measure(run: Run, options: Options, names: list[str], figures: list[Figure], failed: list[str]) -> None:
    """Run the sections in turn; a failing section becomes a row saying so, and the rest still run."""
    for name in names:
        say(f"[bold]{name}:[/bold] measuring ...")
        started = time.monotonic()
        try:
            figures += await SECTIONS[name](run, options)
        except Exception as exc:  # noqa: BLE001 - reported in the table and on stderr, then the run goes on
            traceback.print_exc()
            failed.append(name)
            leaf: BaseException = exc
            while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:
                leaf = leaf.exceptions[0]
            figures.append(Figure.unavailable(name, "every figure", f"failed: {type(leaf).__name__}: {leaf}"))
        say(f"[bold]{name}:[/bold] done in {time.monotonic() - started:.0f} s")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up the way Ctrl-C does


def _document(
    args: argparse.Namespace, run: Run, machine: dict[str, Any], figures: list[Figure], state: str
) -> dict[str, Any]:
    met = [f.is_met for f in figures if f.is_met is not None]
    return {
        "run_id": run.id,
        "state": state,
        "options": {"only": args.only, "runs": args.runs, "rounds": args.rounds},
        "machine": machine,
        "summary": {
            "targets": len(met),
            "targets_met": sum(met),
            "figures": [summary(figure) for figure in figures],
        },
        "figures": [figure.to_json() for figure in figures],
    }


def main() -> int:
    args = _parse()
    signal.signal(signal.SIGTERM, _interrupt)
    if not _images_ready():
        say("[red]the runtime images could not be built; see above, or run bin/dockyard doctor")
        return 1
    run = Run()
    figures: list[Figure] = []
    failed: list[str] = []
    machine: dict[str, Any] = {}
    state = "error"
    try:
        machine = describe(run)
        anyio.run(_measure, run, Options(args.runs, args.rounds), args.only, figures, failed)
        state = "failed sections: " + ",".join(failed) if failed else "complete"
    except KeyboardInterrupt:
        state = "interrupted"
        say("[yellow]interrupted")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the removal short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            args.json.write_text(json.dumps(_document(args, run, machine, figures, state), indent=2) + "\n")
            say(f"samples and machine info: {args.json}")
        finally:
            say("removing the run's containers, networks and files ...")
            removed = run.close(
                grace_s=5 if state in ("error", "interrupted") else 0
            )  # a start cut short can land late
            say(f"removed {removed} leftover containers")
    title = (
        f"dockyard bench, run {run.id}: p50/p95 of --runs {args.runs}, "
        "ratio = baseline p50 / ours p50 (ours / baseline for a rate)"
    )
    Console(width=None if sys.stdout.isatty() else 200).print(render(figures, title))
    if state == "interrupted":
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
