"""The benchmarks and suites of ``guardrail eval``: where each comes from and how a row becomes an
Inspect ``Sample``.

Each benchmark loads from its public source by default (the hub dataset, or for StrongREJECT the
pinned CSV that ``inspect_evals`` uses) or from a local folder laid out like ``../shared/data``
(``--data-dir``). Only the local path is exercised by the tests: the hub column names are the
datasets' published ones, not checked here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from inspect_ai.dataset import Sample

from offline.eval.errors import EvalError

Suite = Literal["safety", "over-refusal", "reasoning"]
SUITES: tuple[Suite, ...] = ("safety", "over-refusal", "reasoning")
Row = dict[str, Any]


@dataclass(frozen=True)
class Source:
    """One place a benchmark's rows come from, and which columns it needs there."""

    prompt: str
    answer: str | None = None
    keep: Callable[[Row], bool] | None = None
    """Rows to keep (a split inside one file)."""
    context: str | None = None
    """A column prepended to the prompt when set (HarmBench's contextual behaviours)."""


@dataclass(frozen=True)
class LocalSource(Source):
    file: str = ""
    """Relative to ``--data-dir`` (``../shared/data``'s layout)."""


@dataclass(frozen=True)
class HubSource(Source):
    path: str = ""
    name: str | None = None
    split: str = "test"
    url: str | None = None
    """A CSV at a pinned URL instead of a hub dataset (StrongREJECT, as inspect_evals loads it)."""


@dataclass(frozen=True)
class Benchmark:
    name: str
    suite: Suite
    title: str
    local: LocalSource
    hub: HubSource
    shuffle_take: tuple[int, int] | None = None
    """(seed, n): shuffle the rows with ``random.Random(seed)`` and keep the first ``n``."""
    answer_after: str | None = None
    """The gold answer is the text after this marker (GSM8K's ``#### ``)."""
    notes: tuple[str, ...] = field(default=())


def _gsm8k_answer(text: str) -> str:
    return text.rsplit("#### ", 1)[-1].strip()


_STRONGREJECT_URL = (
    "https://raw.githubusercontent.com/alexandrasouly/strongreject/"
    "3432b2d696b428f242bd507df96d80f686571d5e/strongreject_dataset/strongreject_dataset.csv")

BENCHMARKS: dict[str, Benchmark] = {bench.name: bench for bench in (
    Benchmark("strongreject", "safety", "StrongREJECT (313 forbidden prompts)",
              LocalSource(prompt="forbidden_prompt", file="strongreject/strongreject_dataset.csv"),
              HubSource(prompt="forbidden_prompt", url=_STRONGREJECT_URL)),
    Benchmark("jbb", "safety", "JailbreakBench harmful behaviours (100, Goal column)",
              LocalSource(prompt="Goal", file="jailbreakbench/harmful-behaviors.csv"),
              HubSource(prompt="Goal", path="JailbreakBench/JBB-Behaviors", name="behaviors",
                        split="harmful")),
    Benchmark("wildjailbreak", "safety",
              "WildJailbreak adversarial harmful (first 250 after a seed-42 shuffle)",
              LocalSource(prompt="adversarial",
                          file="wildjailbreak/wildjailbreak_eval_adversarial_harmful.jsonl"),
              HubSource(prompt="adversarial", path="allenai/wildjailbreak", name="eval",
                        split="train",
                        keep=lambda row: row.get("data_type") == "adversarial_harmful"),
              shuffle_take=(42, 250)),
    Benchmark("harmbench", "safety", "HarmBench text behaviours (test split; context prepended)",
              LocalSource(prompt="Behavior", context="ContextString",
                          file="harmbench/harmbench_behaviors_text_test.csv"),
              HubSource(prompt="prompt", context="context", path="walledai/HarmBench",
                        name="contextual", split="train")),
    Benchmark("xstest", "over-refusal", "XSTest safe prompts (250)",
              LocalSource(prompt="prompt", file="xstest/xstest_prompts.csv",
                          keep=lambda row: row.get("label") == "safe"),
              HubSource(prompt="prompt", path="walledai/XSTest", split="test",
                        keep=lambda row: row.get("label") == "safe")),
    Benchmark("or_bench", "over-refusal", "OR-Bench hard-1k (benign prompts that look toxic)",
              LocalSource(prompt="prompt", file="or_bench/or_bench-hard-1k.csv"),
              HubSource(prompt="prompt", path="bench-llm/or-bench", name="or-bench-hard-1k",
                        split="train")),
    Benchmark("gsm8k", "reasoning", "GSM8K test (1,319; gold after '#### ')",
              LocalSource(prompt="question", answer="answer",
                          file="math_benchmarks/gsm8k_test.jsonl"),
              HubSource(prompt="question", answer="answer", path="openai/gsm8k", name="main",
                        split="test"),
              answer_after="#### "),
    Benchmark("math500", "reasoning", "MATH-500",
              LocalSource(prompt="problem", answer="answer",
                          file="math_benchmarks/math500_test.jsonl"),
              HubSource(prompt="problem", answer="answer", path="HuggingFaceH4/MATH-500",
                        split="test")),
    Benchmark("aime2024", "reasoning", "AIME 2024 (I and II, 30 problems)",
              LocalSource(prompt="problem", answer="answer",
                          file="math_benchmarks/aime2024_test.jsonl"),
              HubSource(prompt="problem", answer="answer", path="HuggingFaceH4/aime_2024",
                        split="train")),
)}

PROMPT_SUFFIX = {
    # The papers' reasoning prompts ask for the final answer in a box; math-verify reads it.
    "reasoning": "\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
}


def known_names() -> str:
    return ", ".join([*SUITES, *BENCHMARKS])


def select(names: Iterable[str]) -> list[Benchmark]:
    """Benchmarks named by suite or by benchmark, in registry order, each once."""
    wanted: set[str] = set()
    for name in names:
        if name in SUITES:
            wanted.update(bench.name for bench in BENCHMARKS.values() if bench.suite == name)
        elif name in BENCHMARKS:
            wanted.add(name)
        else:
            raise EvalError(f"unknown suite or benchmark {name!r}; known: {known_names()}")
    return [bench for bench in BENCHMARKS.values() if bench.name in wanted]


# -- reading rows --------------------------------------------------------------------------------


def _read_local(path: Path) -> list[Row]:
    if not path.is_file():
        raise EvalError(f"{path}: no such file (--data-dir expects ../shared/data's layout)")
    try:
        if path.suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as handle:
                return list(csv.DictReader(handle))
        rows: list[Row] = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict):
                        raise EvalError(f"{path} line {number}: not a JSON object")
                    rows.append(row)
        return rows
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as error:
        raise EvalError(f"{path}: cannot read ({error})") from error


def _read_hub(source: HubSource) -> list[Row]:  # pragma: no cover - needs the network
    if source.url is not None:
        import urllib.request

        with urllib.request.urlopen(source.url, timeout=60) as response:
            text = response.read().decode("utf-8")
        return list(csv.DictReader(text.splitlines()))
    from datasets import load_dataset

    dataset = load_dataset(source.path, source.name, split=source.split)
    return [dict(row) for row in dataset]


def _check_columns(bench: Benchmark, source: Source, rows: list[Row], where: str) -> None:
    if not rows:
        raise EvalError(f"{bench.name}: {where} has no rows")
    needed = [column for column in (source.prompt, source.answer) if column]
    missing = [column for column in needed if column not in rows[0]]
    if missing:
        raise EvalError(f"{bench.name}: {where} has no column {', '.join(map(repr, missing))} "
                        f"(columns: {', '.join(map(str, rows[0]))})")


def item_id(bench: str, prompt: str, seen: dict[str, int]) -> str:
    """A stable id from the prompt's text, so runs on a changed file still pair item by item
    (``guardrail eval compare``); a repeated prompt gets ``-2``, ``-3``."""
    digest = hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]
    base = f"{bench}-{digest}"
    seen[base] = seen.get(base, 0) + 1
    return base if seen[base] == 1 else f"{base}-{seen[base]}"


def load_samples(bench: Benchmark, data_dir: Path | None, limit: int | None = None
                 ) -> tuple[list[Sample], str]:
    """The benchmark's samples, and where they came from (a file path or a hub id)."""
    source: Source
    if data_dir is not None:
        source = bench.local
        path = data_dir / bench.local.file
        where = str(path)
        rows = _read_local(path)
    else:
        source = bench.hub
        where = bench.hub.url or f"hf:{bench.hub.path}/{bench.hub.name or ''}:{bench.hub.split}"
        try:
            rows = _read_hub(bench.hub)
        except Exception as error:  # no network, offline mode, a gated set: one line
            detail = " ".join(str(error).split())[:200]
            raise EvalError(f"{bench.name}: cannot load {where} ({type(error).__name__}: "
                            f"{detail}); --data-dir reads local files instead") from error
    _check_columns(bench, source, rows, where)
    if source.keep is not None:
        rows = [row for row in rows if source.keep(row)]
    if bench.shuffle_take is not None:
        seed, count = bench.shuffle_take
        random.Random(seed).shuffle(rows)
        rows = rows[:count]
    if limit is not None:
        rows = rows[:limit]
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    suffix = PROMPT_SUFFIX.get(bench.suite, "")
    for row in rows:
        prompt = str(row[source.prompt] or "")
        context = str(row.get(source.context) or "") if source.context else ""
        text = f"{context}\n\n---\n\n{prompt}" if context.strip() else prompt
        target = ""
        if source.answer:
            target = str(row[source.answer])
            if bench.answer_after:
                target = _gsm8k_answer(target)
        samples.append(Sample(input=text + suffix, target=target,
                              id=item_id(bench.name, text, seen),
                              metadata={"benchmark": bench.name, "suite": bench.suite,
                                        "prompt": text}))
    return samples, where
