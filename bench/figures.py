"""Figures: samples beside a baseline measured in the same run, their summary, table and JSON."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

from rich.table import Table
from rich.text import Text

__all__ = ["Figure", "Target", "percentile", "render", "summary"]


def percentile(samples: list[float], pct: int) -> float:
    """The `pct`th percentile (inclusive method), or the one sample there is."""
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[pct - 1]


@dataclass(frozen=True)
class Target:
    """What a figure should reach: a p50 below a bound, or a baseline p50 / our p50 ratio."""

    kind: Literal["below", "speedup"]
    value: float

    @classmethod
    def below(cls, bound: float) -> Target:
        return cls("below", bound)

    @classmethod
    def speedup(cls, times: float) -> Target:
        return cls("speedup", times)

    def describe(self, unit: str) -> str:
        return f"p50 < {self.value:g} {unit}" if self.kind == "below" else f">= {self.value:g}x"

    def is_met(self, p50: float, ratio: float | None) -> bool:
        if self.kind == "below":
            return p50 < self.value
        return ratio is not None and ratio >= self.value


@dataclass
class Figure:
    """One row: our samples, the baseline's samples beside them, and the target, if any.

    A figure without samples carries a `note` instead, saying why there is no number
    (not built yet, or its section failed); it never gets a made-up one. Most figures are
    times or sizes (lower is better); a rate sets `higher_is_better`, which turns the ratio
    around so that above 1 still means ours is better (its p95 stays the 95th percentile of
    its samples: the fast end).
    """

    section: str
    name: str
    unit: str = "ms"
    samples: list[float] = field(default_factory=list)
    baseline: str | None = None
    baseline_samples: list[float] = field(default_factory=list)
    target: Target | None = None
    note: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    higher_is_better: bool = False

    @classmethod
    def unavailable(cls, section: str, name: str, why: str) -> Figure:
        """A row that has no number yet, and says why."""
        return cls(section, name, note=why)

    @property
    def p50(self) -> float | None:
        return percentile(self.samples, 50) if self.samples else None

    @property
    def p95(self) -> float | None:
        return percentile(self.samples, 95) if self.samples else None

    @property
    def baseline_p50(self) -> float | None:
        return percentile(self.baseline_samples, 50) if self.baseline_samples else None

    @property
    def baseline_p95(self) -> float | None:
        return percentile(self.baseline_samples, 95) if self.baseline_samples else None

    @property
    def ratio(self) -> float | None:
        """Baseline p50 / our p50, or ours / the baseline's for a rate: above 1 means ours is better."""
        if self.p50 is None or self.baseline_p50 is None:
            return None
        top, bottom = (self.p50, self.baseline_p50) if self.higher_is_better else (self.baseline_p50, self.p50)
        return top / bottom if bottom > 0 else None

    @property
    def is_met(self) -> bool | None:
        if self.target is None or self.p50 is None:
            return None
        return self.target.is_met(self.p50, self.ratio)

    def to_json(self) -> dict[str, Any]:
        """The summary fields and every raw sample."""
        return {
            **summary(self),
            "samples": [round(value, 4) for value in self.samples],
            "baseline_samples": [round(value, 4) for value in self.baseline_samples],
            "details": self.details,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def summary(figure: Figure) -> dict[str, Any]:
    """The figure's percentiles, ratio and target, without the samples."""
    return {
        "section": figure.section,
        "figure": figure.name,
        "unit": figure.unit,
        "higher_is_better": figure.higher_is_better,
        "n": len(figure.samples),
        "p50": _rounded(figure.p50),
        "p95": _rounded(figure.p95),
        "baseline": figure.baseline,
        "baseline_n": len(figure.baseline_samples),
        "baseline_p50": _rounded(figure.baseline_p50),
        "baseline_p95": _rounded(figure.baseline_p95),
        "ratio": _rounded(figure.ratio),
        "target": figure.target.describe(figure.unit) if figure.target else None,
        "met": figure.is_met,
        "note": figure.note,
    }


def _amount(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    digits = 2 if value < 10 else 1 if value < 100 else 0
    return f"{value:.{digits}f} {unit}"


def _verdict(met: bool | None) -> Text:
    if met is None:
        return Text("-")
    return Text("yes", style="green") if met else Text("no", style="bold red")


def render(figures: list[Figure], title: str) -> Table:
    """One table of every figure, grouped by section."""
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    for column in ("p50", "p95", "n"):
        table.add_column(column, justify="right")
    table.add_column("baseline")
    for column in ("base p50", "base p95", "ratio"):
        table.add_column(column, justify="right")
    table.add_column("target")
    table.add_column("met", justify="center")
    section = None
    for figure in figures:
        if section is not None and figure.section != section:
            table.add_section()
        section = figure.section
        name = f"{figure.section}: {figure.name}"
        if figure.note is not None:
            table.add_row(name, "-", "-", "0", Text(figure.note, style="dim"), "-", "-", "-", "-", Text("-"))
            continue
        ratio = figure.ratio
        table.add_row(
            name,
            _amount(figure.p50, figure.unit),
            _amount(figure.p95, figure.unit),
            str(len(figure.samples)),
            figure.baseline or "-",
            _amount(figure.baseline_p50, figure.unit),
            _amount(figure.baseline_p95, figure.unit),
            "-" if ratio is None else f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x",
            figure.target.describe(figure.unit) if figure.target else "-",
            _verdict(figure.is_met),
        )
    return table
