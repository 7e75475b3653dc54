"""The evaluation prompts a harvested set must not leak: every suite the evaluation knows.

Each suite is loaded from the Hugging Face hub by its dataset id (the default, through
``datasets``), or from a local folder laid out as the project's shared data folder
(``--data-dir``: ``strongreject/strongreject_dataset.csv``, ``math_benchmarks/gsm8k_test.jsonl``
...). A suite's prompts are every column a model sees: for WildJailbreak both the adversarial
prompt and its plain (vanilla) request.

Hub ids marked (unverified) below are the community copies the evaluation tools use
(inspect_evals, safety-eval); the originals live on GitHub only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from guardrail.errors import GuardrailError


class EvalSetError(GuardrailError):
    """An evaluation suite could not be loaded; the message says which and why."""

    code = "eval_set_unavailable"


@dataclass(frozen=True, slots=True)
class HubSource:
    dataset: str
    config: str | None
    split: str
    columns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LocalSource:
    path: str
    """Relative to the data folder; ``.csv``, ``.jsonl`` or ``.json`` (an array of objects)."""
    columns: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    hub: HubSource
    local: LocalSource


@dataclass(frozen=True, slots=True)
class EvalSet:
    """One suite's prompts, ready for decontamination."""

    name: str
    prompts: tuple[str, ...]


SUITES: dict[str, Suite] = {suite.name: suite for suite in (
    Suite("strongreject",
          HubSource("walledai/StrongREJECT", None, "train", ("prompt",)),  # (unverified)
          LocalSource("strongreject/strongreject_dataset.csv", ("forbidden_prompt",))),
    Suite("jbb_harmful",
          HubSource("JailbreakBench/JBB-Behaviors", "behaviors", "harmful", ("Goal",)),
          LocalSource("jailbreakbench/harmful-behaviors.csv", ("Goal",))),
    Suite("wildjailbreak",
          # The hub's eval config also holds the adversarial benign rows; all are prompts a
          # model is evaluated on, so all are kept out of training.
          HubSource("allenai/wildjailbreak", "eval", "train", ("adversarial", "vanilla")),
          LocalSource("wildjailbreak/wildjailbreak_eval_adversarial_harmful.jsonl",
                      ("adversarial", "vanilla"))),
    Suite("harmbench",
          HubSource("walledai/HarmBench", "standard", "train", ("prompt",)),  # (unverified)
          LocalSource("harmbench/harmbench_behaviors_text_all.csv", ("Behavior",))),
    Suite("xstest",
          HubSource("walledai/XSTest", None, "test", ("prompt",)),  # (unverified)
          LocalSource("xstest/xstest_prompts.csv", ("prompt",))),
    Suite("or_bench_hard",
          HubSource("bench-llm/or-bench", "or-bench-hard-1k", "train", ("prompt",)),
          LocalSource("or_bench/or_bench-hard-1k.csv", ("prompt",))),
    Suite("gsm8k",
          HubSource("openai/gsm8k", "main", "test", ("question",)),
          LocalSource("math_benchmarks/gsm8k_test.jsonl", ("question",))),
    Suite("math500",
          HubSource("HuggingFaceH4/MATH-500", None, "test", ("problem",)),
          LocalSource("math_benchmarks/math500_test.jsonl", ("problem",))),
    Suite("aime2024",
          HubSource("HuggingFaceH4/aime_2024", None, "train", ("problem",)),  # (unverified)
          LocalSource("math_benchmarks/aime2024_test.jsonl", ("problem",))),
)}


def _prompts(rows: Iterable[dict[str, object]], columns: Sequence[str], where: str) -> list[str]:
    found: list[str] = []
    seen_column = False
    for row in rows:
        for column in columns:
            value = row.get(column)
            if column in row:
                seen_column = True
            if isinstance(value, str) and value.strip():
                found.append(value)
    if not seen_column:
        raise EvalSetError(f"{where}: none of the columns {list(columns)} found")
    return found


def _read_local(path: Path) -> list[dict[str, object]]:
    """Rows of a local copy, read as the public-set importers read theirs."""
    from offline.harvest.importers import PublicSetError, read_local

    try:
        return read_local(path)
    except PublicSetError as error:
        raise EvalSetError(str(error)) from None


def load_local(suite: Suite, data_dir: Path) -> EvalSet:
    path = data_dir / suite.local.path
    if not path.is_file():
        raise EvalSetError(f"{suite.name}: no file {path} (the --data-dir layout is "
                           f"<dir>/{suite.local.path})")
    try:
        rows = _read_local(path)
    except (OSError, ValueError) as error:
        raise EvalSetError(f"{suite.name}: cannot read {path}: {error}") from error
    return EvalSet(suite.name, tuple(_prompts(rows, suite.local.columns, str(path))))


def load_hub(suite: Suite) -> EvalSet:
    """The suite from the hub (cached by ``datasets``); a clear error when it cannot be had."""
    try:
        import datasets
    except ImportError as error:
        raise EvalSetError("loading evaluation sets from the hub needs `datasets` "
                           "(pip install 'reasoning-guardrail[offline]')") from error
    hub = suite.hub
    try:
        data = datasets.load_dataset(hub.dataset, hub.config, split=hub.split)
    except Exception as error:  # datasets raises many kinds (offline, gated, missing)
        raise EvalSetError(
            f"{suite.name}: cannot load {hub.dataset} from the hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); give --data-dir with local "
            "copies instead") from error
    return EvalSet(suite.name, tuple(_prompts(data, hub.columns, hub.dataset)))


def load_eval_sets(names: Sequence[str] | None = None,
                   data_dir: Path | None = None) -> list[EvalSet]:
    """The named suites (all by default), from ``data_dir`` when given, else from the hub."""
    chosen = list(names) if names else list(SUITES)
    unknown = [name for name in chosen if name not in SUITES]
    if unknown:
        raise EvalSetError(f"unknown evaluation suites {unknown}; known: {sorted(SUITES)}")
    if data_dir is not None:
        return [load_local(SUITES[name], data_dir) for name in chosen]
    return [load_hub(SUITES[name]) for name in chosen]
