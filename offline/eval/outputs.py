"""What a run leaves in ``--out DIR`` besides Inspect's logs: ``items.jsonl`` (one line per item
after epoch reduction), ``summary.json`` and ``manifest.json``. The shapes are a contract
(``guardrail eval compare`` bootstraps over ``items.jsonl``); ``schema_version`` changes with
them.

    summary.json  {"schema_version": 1, "model": str, "generation": {...},
                   "benchmarks": {BENCH: {"suite", "n_items", "n_errors", "epochs",
                                          "metrics": {METRIC: float | null},
                                          "counts": {METRIC: items with the value}}}}
    items.jsonl   {"benchmark": str, "item_id": str, "values": {METRIC: float}}

Every summary metric is the mean of the per-item values under the same name, over the items
that have it (``counts``).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from inspect_ai.log import EvalLog

from offline.eval import metrics as m

SCHEMA_VERSION = 1
PACKAGES = ("reasoning-guardrail", "inspect-ai", "inspect-evals", "math-verify", "transformers",
            "torch", "vllm", "datasets", "openai")


@dataclass
class Item:
    benchmark: str
    item_id: str
    values: dict[str, float]
    errors: list[str] = field(default_factory=list)


@dataclass
class BenchResult:
    name: str
    suite: str
    epochs: int
    items: list[Item]
    status: str

    @property
    def n_errors(self) -> int:
        return sum(1 for item in self.items if item.errors)

    def summary(self) -> dict[str, Any]:
        means, counts = m.summarise([item.values for item in self.items])
        return {"suite": self.suite, "n_items": len(self.items), "n_errors": self.n_errors,
                "epochs": self.epochs, "metrics": means, "counts": counts}


def items_of(log: EvalLog) -> BenchResult:
    """Each item's epochs reduced (``metrics.reduce_item``); an epoch that failed to generate
    counts an error on its item, and its values are missing, not zero."""
    name = log.eval.task
    suite = str((log.eval.metadata or {}).get("suite", ""))
    epochs: dict[str, list[dict[str, float | None]]] = defaultdict(list)
    errors: dict[str, list[str]] = defaultdict(list)
    for sample in log.samples or []:
        key = str(sample.id)
        if sample.error is not None:
            errors[key].append(f"epoch {sample.epoch}: generation failed: "
                               f"{sample.error.message}")
            epochs[key].append({})
            continue
        for score in (sample.scores or {}).values():
            value = score.value if isinstance(score.value, dict) else {}
            epochs[key].append({k: float(v) for k, v in value.items()
                                if isinstance(v, int | float)})
            errors[key].extend(f"epoch {sample.epoch}: {error}"
                               for error in (score.metadata or {}).get("errors", []))
    items = [Item(name, key, m.reduce_item(samples, suite), errors[key])
             for key, samples in epochs.items()]
    return BenchResult(name, suite, log.eval.config.epochs or 1, items, log.status)


def write_items(results: list[BenchResult], path: Path) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for result in results:
            for item in result.items:
                line: dict[str, Any] = {"benchmark": item.benchmark, "item_id": item.item_id,
                                        "values": item.values}
                if item.errors:
                    line["errors"] = item.errors
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")


def summary(model: str, generation: dict[str, Any], results: list[BenchResult]
            ) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "model": model, "generation": generation,
            "benchmarks": {result.name: result.summary() for result in results}}


def _git_revision() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    try:
        revision = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                  capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"revision": None, "dirty": None}
    return {"revision": revision, "dirty": bool(dirty)}


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(*, config: dict[str, Any], generation: dict[str, Any], model: str,
             judges: dict[str, Any], sources: dict[str, str], argv: list[str]) -> dict[str, Any]:
    datasets: dict[str, Any] = {}
    for bench, source in sources.items():
        path = Path(source)
        datasets[bench] = {"source": source,
                           "sha256": file_hash(path) if path.is_file() else None}
    return {"schema_version": SCHEMA_VERSION, "git": _git_revision(), "packages": _versions(),
            "python": sys.version.split()[0], "platform": platform.platform(),
            "command": argv, "model": model, "seeds": {"generation": generation["seed"],
                                                       "wildjailbreak_shuffle": 42},
            "generation": generation, "judges": judges, "datasets": datasets,
            "config": config}
