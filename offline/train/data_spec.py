"""``--data`` entries, parsed one way for ``guardrail train sft`` and ``guardrail train dpo``.

An entry is ``PATH`` or ``PATH:RATIO`` on the command line or in the YAML, or a YAML mapping
``{path: PATH, ratio: RATIO}``. The ratio (default 1) scales the file's usable rows: 0.5 keeps
a seeded half, 2 repeats them twice, 0 leaves the file out (it is still read and counted). A
colon whose tail is not a number belongs to the path. A folder stands for its ``*.jsonl`` files
(held-out ``*.test.jsonl`` excepted, and those of the other command's form), in name order, each
at the folder's ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offline.train.errors import TrainInputError


class DataError(TrainInputError):
    """Training data the command cannot use; one line naming the file and the problem."""


@dataclass(frozen=True, slots=True)
class DataSpec:
    path: Path
    ratio: float = 1.0

    def to_mapping(self) -> dict[str, Any]:
        return {"path": str(self.path), "ratio": self.ratio}


def _ratio(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0:
        raise DataError(f"--data {where}: the ratio must be a finite number >= 0, not {value!r}")
    return float(value)


def parse_spec(value: Any) -> DataSpec:
    """One entry, as typed or as read from YAML; no file system access."""
    if isinstance(value, DataSpec):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"path", "ratio"})
        if unknown:
            raise DataError(f"--data: unknown key {unknown[0]!r} in {value!r} (an entry has "
                            "'path' and 'ratio')")
        path = value.get("path")
        if not isinstance(path, str) or not path:
            raise DataError(f"--data: {value!r} needs a 'path'")
        return DataSpec(Path(path), _ratio(value.get("ratio", 1.0), path))
    if not isinstance(value, str) or not value:
        raise DataError(f"--data: {value!r} is not FILE_OR_DIR[:RATIO]")
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            number = float(tail)
        except ValueError:
            return DataSpec(Path(value))  # a colon that is part of the path
        return DataSpec(Path(head), _ratio(number, value))
    return DataSpec(Path(value))


def parse_specs(values: Any) -> list[DataSpec]:
    """The whole ``data`` setting: one entry or a list of them."""
    if values is None or values == "" or values == []:
        raise DataError("--data is required (or 'data' in the config)")
    return [parse_spec(value) for value in (values if isinstance(values, list) else [values])]


def expand(spec: DataSpec, wanted: Callable[[Path], bool] | None = None) -> list[DataSpec]:
    """The files an entry stands for; a missing path or an empty folder is an error.

    In a folder, held-out splits (``*.test.jsonl``, as ``guardrail harvest`` writes them) are
    never trained on, and files ``wanted`` declines are left out: a harvest folder holds SFT
    records and preference pairs side by side, each command takes its own. A file named
    explicitly is taken as it is (and fails later if it has the wrong form)."""
    if spec.path.is_dir():
        files = [item for item in sorted(spec.path.glob("*.jsonl"))
                 if not item.name.endswith(".test.jsonl")]
        if not files:
            raise DataError(f"--data {spec.path}: the folder holds no *.jsonl file "
                            "(other than held-out *.test.jsonl)")
        kept = [item for item in files if wanted is None or wanted(item)]
        if not kept:
            raise DataError(f"--data {spec.path}: no file in the folder has the form this "
                            f"command trains on (found {', '.join(f.name for f in files)})")
        return [DataSpec(item, spec.ratio) for item in kept]
    if not spec.path.is_file():
        raise DataError(f"--data {spec.path}: no such file or folder")
    return [spec]
