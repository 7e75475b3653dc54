"""The cycle's one report: what each stage did, and the evaluations compared.

``DIR/report.md`` lists the stages (ran or skipped, when, how long), the harvest's funnel, what
the correction changed, the training run's figures, and then the comparison of the tuned model,
and the proxy in front of each model, against the base model (``guardrail eval compare``'s
tables, :mod:`offline.eval.compare`). ``DIR/report/`` holds that comparison's ``compare.json``
and plots. Written anew after every cycle run, skipped stages included: it costs little.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offline.cycle.stage import StageOutcome
from offline.cycle.stages import EVAL_LABELS

# The figures of the train command's training_summary.json (sft and dpo), in the order shown.
_TRAINING_KEYS = ("global_step", "rows", "records_dropped", "records_skipped", "tokens_seen",
                  "training_loss", "saved")


def _training_line(summary: dict[str, Any]) -> str:
    shown = []
    for key in _TRAINING_KEYS:
        if key in summary and summary[key] is not None:
            value = summary[key]
            shown.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(shown) or "no summary"


def write_report(root: Path, outcomes: dict[str, StageOutcome], *, resamples: int = 10_000,
                 seed: int = 0) -> Path:
    lines = ["# guardrail cycle report", "", f"Folder: `{root}`", "",
             "| stage | this run | finished | seconds | input hash |", "|---|---|---|---|---|"]
    for name, outcome in outcomes.items():
        record = outcome.record
        seconds = record.get("seconds")
        took = f"{seconds:.1f}" if isinstance(seconds, int | float) else "?"
        lines.append(f"| {name} | {outcome.status} | {record.get('finished_at', '?')} | "
                     f"{took} | `{str(record.get('input_hash', ''))[:12]}` |")
    lines += ["", "\"skipped\": its inputs (settings, input files, package versions) hashed to "
              "the same value as a completed earlier run, whose output was kept.", ""]
    harvest = outcomes.get("harvest")
    if harvest is not None:
        funnel = harvest.record.get("summary", {}).get("funnel") or []
        steps = " -> ".join(f"{stage.get('kept')} {stage.get('filter')}" for stage in funnel
                            if isinstance(stage, dict))
        lines += ["## Data", "", f"Harvest: {steps or 'no funnel'} (records left after each "
                  "filter; the card in `stages/harvest/out/README.md` gives the reasons).", ""]
    correct = outcomes.get("correct")
    if correct is not None:
        summary = correct.record.get("summary", {})
        lines += [f"Correction: {summary.get('selected', 0)} of {summary.get('rows', 0)} "
                  f"harvested records selected for rewriting, {summary.get('corrected', 0)} "
                  f"rewritten, {summary.get('kept_as_harvested', 0)} kept as harvested (the "
                  "corrector's output was rejected).", ""]
    train = outcomes.get("train")
    if train is not None:
        lines += [f"Training: {_training_line(train.record.get('summary', {}))}; model in "
                  f"`{train.out}`.", ""]
    evaluated = [(EVAL_LABELS[name], outcomes[name].out) for name in EVAL_LABELS
                 if name in outcomes]
    if len(evaluated) >= 2:
        from offline.eval.compare import compare, markdown, write_comparison
        from offline.eval.run_results import load_run

        runs = [load_run(folder, label) for label, folder in evaluated]
        comparison = compare(runs, resamples=resamples, seed=seed)
        write_comparison(comparison, root / "report")
        lines += ["## Evaluation", "", "Plots: `report/plots/`; the same tables as JSON: "
                  "`report/compare.json`.", "", markdown(comparison, heading=3)]
    path = root / "report.md"
    temporary = path.with_name(".report.md.tmp")
    temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    temporary.replace(path)
    return path
