"""A seeded train/test split that never puts one prompt on both sides.

Records are grouped by their normalised prompt (several preference pairs can come from one
case), the groups are shuffled with ``seed`` and the first ones make up the test split, so the
same input and seed always give the same split.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from offline.harvest.dedupe import normalise

T = TypeVar("T")


@dataclass
class Split(Generic[T]):
    train: list[T]
    test: list[T]


def train_test_split(records: Sequence[T], key: Callable[[T], str], *,
                     test_fraction: float = 0.1, seed: int = 0) -> Split[T]:
    """``test_fraction`` of the prompt groups (rounded up, at least one when there are two or
    more groups) go to ``test``; records keep their input order within each side."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), not {test_fraction}")
    groups: dict[str, int] = {}
    for record in records:
        groups.setdefault(normalise(key(record)), len(groups))
    order = list(groups)
    random.Random(seed).shuffle(order)
    size = math.ceil(len(order) * test_fraction) if test_fraction else 0
    if len(order) < 2:
        size = 0
    test_groups = set(order[:size])
    split: Split[T] = Split([], [])
    for record in records:
        (split.test if normalise(key(record)) in test_groups else split.train).append(record)
    return split
