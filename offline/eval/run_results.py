"""A finished ``guardrail eval`` run read back from its folder, for comparison.

``DIR/summary.json`` holds each benchmark's metrics; ``DIR/items.jsonl`` one line per item
(after the epochs were reduced) with that item's value of every metric that is a mean over items.
Anything that does not have that shape is a :class:`RunError`: one line naming the file and
what is wrong with it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
SUMMARY = "summary.json"
ITEMS = "items.jsonl"


class RunError(ValueError):
    """A folder that is not a readable eval run; the message is one line."""


@dataclass(frozen=True)
class BenchmarkResult:
    suite: str
    n_items: int
    n_errors: int
    epochs: int
    metrics: dict[str, float | None]
    items: dict[str, dict[str, float]] = field(default_factory=dict)
    """metric -> item id -> that item's value (only metrics the items carry)."""


@dataclass(frozen=True)
class RunResult:
    folder: Path
    label: str
    model: str
    generation: dict[str, Any]
    benchmarks: dict[str, BenchmarkResult]


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RunError(f"{where}: a number or null, not {value!r}")
    if not math.isfinite(value):
        return None  # NaN/inf in JSON (Python writes them) means "no value"
    return float(value)


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RunError(f"{where}: a count (0 or more), not {value!r}")
    return value


def _benchmark(name: str, raw: Any, where: str) -> BenchmarkResult:
    if not isinstance(raw, dict):
        raise RunError(f"{where}: benchmark {name!r} is not an object")
    metrics = raw.get("metrics")
    if not isinstance(metrics, dict):
        raise RunError(f"{where}: benchmark {name!r} has no 'metrics' object")
    return BenchmarkResult(
        suite=str(raw.get("suite", "")),
        n_items=_count(raw.get("n_items", 0), f"{where}: {name}.n_items"),
        n_errors=_count(raw.get("n_errors", 0), f"{where}: {name}.n_errors"),
        epochs=_count(raw.get("epochs", 1), f"{where}: {name}.epochs"),
        metrics={str(key): _number(value, f"{where}: {name}.metrics.{key}")
                 for key, value in metrics.items()},
    )


def _read_items(path: Path, benchmarks: dict[str, BenchmarkResult]) -> None:
    """Fills each benchmark's per-item values; an item listed twice is an error (a mean over
    it would count it twice)."""
    seen: set[tuple[str, str]] = set()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise RunError(f"{path}: cannot read it ({error.strerror})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise RunError(f"{where}: not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("values"), dict):
            raise RunError(f"{where}: expected an object with 'benchmark', 'item_id', 'values'")
        bench, item = str(row.get("benchmark")), str(row.get("item_id"))
        if bench not in benchmarks:
            raise RunError(f"{where}: benchmark {bench!r} is not in {SUMMARY}")
        if (bench, item) in seen:
            raise RunError(f"{where}: item {item!r} of {bench} is listed twice")
        seen.add((bench, item))
        for metric, value in row["values"].items():
            number_value = _number(value, f"{where}: values.{metric}")
            if number_value is not None:
                benchmarks[bench].items.setdefault(str(metric), {})[item] = number_value


def load_run(folder: Path, label: str | None = None) -> RunResult:
    if not folder.is_dir():
        raise RunError(f"{folder}: not a folder")
    path = folder / SUMMARY
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{folder}: no {SUMMARY} (not a finished guardrail eval run)") from None
    except OSError as error:
        raise RunError(f"{path}: cannot read it ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise RunError(f"{path}: not JSON ({error.msg}, line {error.lineno})") from None
    if not isinstance(summary, dict):
        raise RunError(f"{path}: expected a JSON object")
    if summary.get("schema_version") != SCHEMA_VERSION:
        raise RunError(f"{path}: schema_version {summary.get('schema_version')!r}; "
                       f"this compare reads version {SCHEMA_VERSION}")
    raw_benchmarks = summary.get("benchmarks")
    if not isinstance(raw_benchmarks, dict):
        raise RunError(f"{path}: no 'benchmarks' object")
    benchmarks = {str(name): _benchmark(str(name), raw, str(path))
                  for name, raw in raw_benchmarks.items()}
    if (folder / ITEMS).exists():
        _read_items(folder / ITEMS, benchmarks)
    generation = summary.get("generation")
    return RunResult(folder=folder, label=label or folder.resolve().name,
                     model=str(summary.get("model", "")),
                     generation=generation if isinstance(generation, dict) else {},
                     benchmarks=benchmarks)
