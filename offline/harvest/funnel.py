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
