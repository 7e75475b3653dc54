"""Optional mix-in of benign cases that passed untouched, at a set ratio.

Training on safety data alone teaches over-refusal; mixing in ordinary requests the proxy let
through (with their own, unchanged responses) keeps the model's reasoning on benign work. The
ratio is benign records per safety record (0.5: one benign for every two); the sample is seeded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TypeVar

from offline.harvest.funnel import FilterResult

T = TypeVar("T")


def mix_in(records: Sequence[T], benign: Sequence[T], ratio: float, *,
           seed: int = 0) -> FilterResult[T]:
    """``records`` followed by a seeded sample of ``benign``; the benign records left out are
    counted as ``benign_not_used`` (fewer available than asked for is reported in ``details``)."""
    if ratio < 0:
        raise ValueError(f"mix-in ratio must be >= 0, not {ratio}")
    wanted = round(ratio * len(records))
    taken = min(wanted, len(benign))
    chosen = sorted(random.Random(seed).sample(range(len(benign)), taken))
    result: FilterResult[T] = FilterResult(
        "mix_in", [*records, *(benign[index] for index in chosen)],
        details={"ratio": ratio, "wanted": wanted, "added": taken, "available": len(benign),
                 "short_by": wanted - taken})
    if len(benign) - taken:
        result.removed["benign_not_used"] = len(benign) - taken
    return result
