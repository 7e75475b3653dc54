"""What every filter returns: the records it kept and how many it removed, by reason.

The dataset card prints the whole funnel ("12,000 cases -> 1,930 intercepted -> ...") from these,
so a filter never drops a record without counting it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class FilterResult(Generic[T]):
    name: str
    """The filter's name in the funnel (``dedupe``, ``decontaminate``...)."""
    kept: list[T]
    removed: Counter[str] = field(default_factory=Counter)
    """How many records were removed, by reason."""
    details: dict[str, Any] = field(default_factory=dict)
    """Anything else the card should say (thresholds, entity counts...)."""

    @property
    def removed_total(self) -> int:
        return sum(self.removed.values())

    def summary(self) -> dict[str, Any]:
        return {"filter": self.name, "kept": len(self.kept), "removed": self.removed_total,
                "by_reason": dict(sorted(self.removed.items())), **self.details}


@dataclass
class Stage:
    name: str
    count: int
    removed: dict[str, int] = field(default_factory=dict)


@dataclass
class Funnel:
    """The stages a dataset went through, for ``--dry-run`` and the dataset card:

        funnel = Funnel("cases", 12000)
        funnel.add("intercepted", 1930)
        funnel.add_result(dedupe(...))
        funnel.line()  # "12,000 cases -> 1,930 intercepted -> 1,402 dedupe"
    """

    start_name: str
    start_count: int
    stages: list[Stage] = field(default_factory=list)

    def add(self, name: str, count: int, removed: dict[str, int] | None = None) -> None:
        self.stages.append(Stage(name, count, dict(removed or {})))

    def add_result(self, result: FilterResult[Any]) -> None:
        self.add(result.name, len(result.kept), dict(result.removed))

    def line(self, arrow: str = "\u2192") -> str:
        parts = [f"{self.start_count:,} {self.start_name}"]
        parts += [f"{stage.count:,} {stage.name}" for stage in self.stages]
        return f" {arrow} ".join(parts)

    def table(self) -> list[dict[str, Any]]:
        """One row per stage: how many entered, how many are left, what was removed and why."""
        rows = []
        before = self.start_count
        for stage in self.stages:
            rows.append({"stage": stage.name, "in": before, "out": stage.count,
                         "removed": dict(sorted(stage.removed.items()))})
            before = stage.count
        return rows
