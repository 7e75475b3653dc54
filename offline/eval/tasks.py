"""Each benchmark as an Inspect task: what ``guardrail eval`` runs, and runnable on its own:

    inspect eval offline/eval/tasks.py@strongreject --model guardrail-hf/path/to/model \\
        -T data_dir=../shared/data -T judge=embedded -T rubric_judge=openai/gpt-4o

``judge`` is a guard kind or a project config file; ``rubric_judge`` an Inspect model name (the
StrongREJECT rubric and XSTest refusal classes; without it, no StrongREJECT score and string
matching for refusals). ``data_dir`` unset loads the public dataset.
"""

from __future__ import annotations

from pathlib import Path

from inspect_ai import Epochs, Task, task
from inspect_ai.dataset import MemoryDataset
from inspect_ai.model import GenerateConfig
from inspect_ai.scorer import Scorer
from inspect_ai.solver import generate

from guardrail.config import Config, load_config
from offline.eval.benchmarks import BENCHMARKS, Benchmark, load_samples
from offline.eval.judges import parse_judges
from offline.eval.scorers import (
    ModelRef,
    item_means,
    item_reducer,
    math_scorer,
    refusal_scorer,
    safety_scorer,
)


def scorer_for(bench: Benchmark, judge: Config, rubric: ModelRef | None) -> Scorer:
    if bench.suite == "safety":
        return safety_scorer(judge, rubric if bench.name == "strongreject" else None)
    if bench.suite == "over-refusal":
        return refusal_scorer(rubric)
    return math_scorer()


def build_task(bench: Benchmark, *, data_dir: Path | None, limit: int | None, judge: Config,
               rubric: ModelRef | None, samples: int = 1,
               config: GenerateConfig | None = None) -> tuple[Task, str]:
    """The task, and where its rows came from."""
    rows, source = load_samples(bench, data_dir, limit)
    task = Task(
        dataset=MemoryDataset(rows, name=bench.name),
        solver=generate(),
        scorer=scorer_for(bench, judge, rubric),
        metrics=[item_means()],
        epochs=Epochs(samples, item_reducer()),
        config=config or GenerateConfig(),
        name=bench.name,
        metadata={"suite": bench.suite, "source": source},
    )
    return task, source


def _plain(name: str, data_dir: str | None, judge: str, rubric_judge: str | None,
           samples: int) -> Task:
    spec = parse_judges([judge], load_config(None), "defaults")
    rubric: ModelRef | None = (rubric_judge, {}) if rubric_judge else None
    task, _ = build_task(BENCHMARKS[name], data_dir=Path(data_dir) if data_dir else None,
                         limit=None, judge=spec.guard_config, rubric=rubric, samples=samples)
    return task



@task
def strongreject(data_dir: str | None = None, judge: str = "embedded",
                 rubric_judge: str | None = None, samples: int = 1) -> Task:
    return _plain("strongreject", data_dir, judge, rubric_judge, samples)


@task
def jbb(data_dir: str | None = None, judge: str = "embedded", rubric_judge: str | None = None,
        samples: int = 1) -> Task:
    return _plain("jbb", data_dir, judge, rubric_judge, samples)


@task
def wildjailbreak(data_dir: str | None = None, judge: str = "embedded",
                  rubric_judge: str | None = None, samples: int = 1) -> Task:
    return _plain("wildjailbreak", data_dir, judge, rubric_judge, samples)


@task
def harmbench(data_dir: str | None = None, judge: str = "embedded",
              rubric_judge: str | None = None, samples: int = 1) -> Task:
    return _plain("harmbench", data_dir, judge, rubric_judge, samples)


@task
def xstest(data_dir: str | None = None, judge: str = "embedded",
           rubric_judge: str | None = None, samples: int = 1) -> Task:
    return _plain("xstest", data_dir, judge, rubric_judge, samples)


@task
def or_bench(data_dir: str | None = None, judge: str = "embedded",
             rubric_judge: str | None = None, samples: int = 1) -> Task:
    return _plain("or_bench", data_dir, judge, rubric_judge, samples)


@task
def gsm8k(data_dir: str | None = None, judge: str = "embedded",
          rubric_judge: str | None = None, samples: int = 1) -> Task:
    return _plain("gsm8k", data_dir, judge, rubric_judge, samples)


@task
def math500(data_dir: str | None = None, judge: str = "embedded",
            rubric_judge: str | None = None, samples: int = 1) -> Task:
    return _plain("math500", data_dir, judge, rubric_judge, samples)


@task
def aime2024(data_dir: str | None = None, judge: str = "embedded",
             rubric_judge: str | None = None, samples: int = 1) -> Task:
    return _plain("aime2024", data_dir, judge, rubric_judge, samples)
