"""One ``guardrail eval`` run: resolve the model and judges (failing in one line before any
generation), run the benchmarks as an Inspect eval set in ``DIR/logs``, then write the items,
summary, manifest, report and plots from Inspect's logs.

Resuming is Inspect's: ``eval_set`` over the same log folder reruns only what has not finished,
reusing every completed sample from the earlier logs (a crashed log included), so an interrupted
run continues without generating a finished item again.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardrail.config import load_config
from guardrail.errors import ConfigError
from offline.eval import models, outputs, report, run_folder
from offline.eval.benchmarks import select
from offline.eval.config import EvalConfig, generation
from offline.eval.errors import EvalError, plain
from offline.eval.judges import is_model, parse_judges
from offline.eval.scorers import STRING_MATCH_LABEL, ModelRef


@dataclass
class RunOutcome:
    success: bool
    out: Path
    summary: dict[str, Any]


def _rubric(value: str | None, config: EvalConfig) -> ModelRef | None:
    if value is None:
        return None
    if not is_model(value):
        raise EvalError(f"--judge {value}: not a model")
    choice = models.choose(value, api_key_env=config.api_key_env)
    models.load(choice)  # an unknown provider or a missing key fails here, in one line
    return choice.name, choice.args


def _logs_on_disk(log_dir: Path) -> dict[tuple[str, float | None], str]:
    """Each Inspect log in ``log_dir`` (by name and modification time) and its status."""
    from inspect_ai.log import list_eval_logs, read_eval_log

    if not log_dir.is_dir():
        return {}
    return {(info.name, info.mtime): read_eval_log(info, header_only=True).status
            for info in list_eval_logs(str(log_dir), recursive=False)}


def _resume_notice(before: dict[tuple[str, float | None], str], log_dir: Path) -> str | None:
    """One line saying that this run continues an earlier one in the same folder."""
    if not before:
        return None
    statuses: dict[str, int] = {}
    for status in before.values():
        statuses[status] = statuses.get(status, 0) + 1
    held = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items()))
    return (f"guardrail eval: resuming from {log_dir} ({held} earlier logs): their finished "
            "samples are reused, only the rest is generated")


def _interrupted(before: dict[tuple[str, float | None], str], log_dir: Path) -> bool:
    """Whether this run left a log cancelled. Inspect writes a run cut short by Ctrl-C as
    ``cancelled`` but, on asyncio, can return no logs for it and report success; the logs on
    disk say what happened."""
    return any(status == "cancelled" and key not in before
               for key, status in _logs_on_disk(log_dir).items())


def run(config: EvalConfig, argv: list[str] | None = None) -> RunOutcome:
    from inspect_ai import eval_set
    from inspect_ai.log import read_eval_log
    from inspect_ai.model import GenerateConfig

    from offline.eval.hooks import track  # and registers the hook that closes judges
    from offline.eval.tasks import build_task

    benches = select(config.suite)
    out = Path(config.out)
    try:
        guard_config = load_config(config.guard_config)
    except ConfigError as error:
        raise EvalError(f"config error: {error}") from error
    spec = parse_judges(config.judge, guard_config, config.guard_config or "defaults")
    rubric = _rubric(spec.model, config)
    choice = models.choose(config.model, backend=config.backend,
                           served_model=config.served_model, api_key_env=config.api_key_env,
                           model_args=config.model_args)
    resuming = run_folder.check_rerun(out, config, choice.name)  # before any weights load
    decoding: dict[str, Any] = {
        "temperature": config.temperature, "top_p": config.top_p,
        "max_tokens": config.max_tokens, "seed": config.seed,
        "max_connections": config.max_connections, "max_retries": config.max_retries,
        "timeout": config.request_timeout_s}
    if config.repetition_penalty is not None:
        decoding["extra_body"] = {"repetition_penalty": config.repetition_penalty}
    data_dir = Path(config.data_dir) if config.data_dir else None
    tasks, sources = [], {}
    for bench in benches:
        task, source = build_task(bench, data_dir=data_dir, limit=config.limit,
                                  judge=spec.guard_config, rubric=rubric,
                                  samples=config.samples, config=GenerateConfig(**decoding))
        tasks.append(task)
        sources[bench.name] = source
    # The datasets are read first: a bad file fails in a moment, before weights load.
    model = track(models.load(choice, **decoding))
    judges = {"harm (reasoning / answer / full)": spec.guard_label,
              "strongreject rubric": spec.model or "none (no model judge: no score)",
              "refusal": spec.model or STRING_MATCH_LABEL}
    before = _logs_on_disk(out / "logs")
    run_folder.record(out, config, choice.name)
    notice = _resume_notice(before, out / "logs") if resuming else None
    if notice:
        print(notice, file=sys.stderr, flush=True)
    try:
        success, logs = eval_set(
            tasks, log_dir=str(out / "logs"), model=model,
            retry_attempts=config.retry_attempts, display=config.display,  # type: ignore[arg-type]
            log_buffer=config.log_buffer, fail_on_error=config.fail_on_error,
            max_tasks=config.max_tasks, max_samples=config.max_samples,
            max_connections=config.max_connections)
    except Exception as error:
        # Inspect refuses a log folder holding another run's tasks, among other things.
        raise EvalError(f"inspect: {plain(' '.join(str(error).split()))[:400]}") from error
    if _interrupted(before, out / "logs"):
        # No outputs from a cut-short run: they would describe part of it as the whole.
        raise KeyboardInterrupt
    success = success and len(logs) == len(tasks)
    results = [outputs.items_of(read_eval_log(log.location)) for log in logs]
    order = {bench.name: index for index, bench in enumerate(benches)}
    results.sort(key=lambda result: order.get(result.name, len(order)))
    gen = generation(config)
    summary = outputs.summary(choice.label or choice.name, gen, results)
    outputs.write_items(results, out / "items.jsonl")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    manifest = outputs.manifest(config=config.to_dict(), generation=gen,
                                model=choice.label or choice.name, judges=judges,
                                sources=sources, argv=argv or [])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(report.render(summary, judges), encoding="utf-8")
    report.plot(summary, out / "plots")
    return RunOutcome(success, out, summary)
