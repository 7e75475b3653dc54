"""Bootstrap confidence intervals for the difference of two runs' means.

Paired when both runs scored the same items (each resample draws item ids, and the difference is
taken item by item: the items' own difficulty cancels out); unpaired otherwise (each run's items
are resampled on their own). The interval is the percentile interval of the resampled mean
differences. Seeded: the same inputs give the same interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_CONFIDENCE = 0.95
_CHUNK = 1_000_000
"""Resample draws (items x resamples) built at once; bounds the memory of a large set."""


@dataclass(frozen=True, slots=True)
class Interval:
    delta: float
    """Mean of the second run minus mean of the first, over the items the interval is taken
    on (all of each run's items unpaired; the shared items paired)."""
    low: float
    high: float
    paired: bool
    n_first: int
    n_second: int

    @property
    def within_noise(self) -> bool:
        """The interval includes 0: the data do not show a change at this confidence."""
        return self.low <= 0.0 <= self.high


def _resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples`` means of ``values`` drawn with replacement, built in bounded chunks."""
    import numpy as np

    size = len(values)
    per_chunk = max(1, _CHUNK // size)
    means: list[np.ndarray] = []
    remaining = resamples
    while remaining:
        count = min(per_chunk, remaining)
        draws = rng.integers(0, size, size=(count, size))
        means.append(values[draws].mean(axis=1))
        remaining -= count
    return np.concatenate(means)


def bootstrap_delta(first: Mapping[str, float], second: Mapping[str, float], *,
                    resamples: int = DEFAULT_RESAMPLES, confidence: float = DEFAULT_CONFIDENCE,
                    seed: int = 0) -> Interval | None:
    """The interval of ``mean(second) - mean(first)``; items are keyed by id.

    Paired when the two runs hold exactly the same item ids, unpaired otherwise (runs on
    different items, or one run missing some). None when either run has no item."""
    # numpy is imported here, not with the module: `guardrail eval compare` is registered
    # whenever the `guardrail` command builds its parser, whatever command runs.
    import numpy as np

    if not first or not second:
        return None
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence is between 0 and 1, not {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples is at least 1, not {resamples}")
    rng = np.random.default_rng(seed)
    tail = (1.0 - confidence) / 2.0 * 100.0
    paired = first.keys() == second.keys()
    if paired:
        ids = sorted(first)
        diffs = np.array([second[key] - first[key] for key in ids], dtype=np.float64)
        delta = float(diffs.mean())
        boot = _resampled_means(diffs, resamples, rng)
    else:
        a = np.array(list(first.values()), dtype=np.float64)
        b = np.array(list(second.values()), dtype=np.float64)
        delta = float(b.mean() - a.mean())
        boot = _resampled_means(b, resamples, rng) - _resampled_means(a, resamples, rng)
    low, high = np.percentile(boot, [tail, 100.0 - tail])
    # Rounding noise must not turn an exact zero (identical runs) into "beyond noise".
    low, high = float(np.round(low, 12)), float(np.round(high, 12))
    return Interval(delta=delta, low=low, high=high, paired=paired, n_first=len(first),
                    n_second=len(second))
