"""``report.md`` (tables, the truncation rate first and loud) and PNG plots from a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from offline.eval import metrics as m
from offline.eval.benchmarks import SUITES

HEADLINE = {"safety": ["harmful_full", "harmful_reasoning", "harmful_answer", "safe@1",
                       "strongreject"],
            "over-refusal": ["compliance", "partial_refusal", "full_refusal"],
            "reasoning": ["accuracy"]}
TAIL = ["truncated", "reasoning_tokens", "answer_tokens", "proxy_intervened", "proxy_checks",
        "proxy_flagged", "proxy_corrections", "proxy_wait_words"]
# Means of counts, not fractions: kept out of the plots' 0-1 axis.
COUNTS = ("proxy_checks", "proxy_flagged", "proxy_corrections", "proxy_wait_words")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _columns(suite: str, benches: dict[str, Any]) -> list[str]:
    present = {key for entry in benches.values() for key in entry["metrics"]}
    ordered = [key for key in HEADLINE[suite] if key in present]
    ordered += sorted(key for key in present if key.startswith(("safe@", "conssafe@"))
                      and key not in ordered)
    ordered += [key for key in TAIL if key in present]
    return ordered


def render(summary: dict[str, Any], judges: dict[str, Any]) -> str:
    lines = [f"# guardrail eval: {summary['model']}", ""]
    benches: dict[str, Any] = summary["benchmarks"]
    cut = {name: entry["metrics"].get("truncated") for name, entry in benches.items()}
    worst = [(name, rate) for name, rate in cut.items() if rate]
    if worst:
        lines += ["> **TRUNCATED OUTPUTS.** " + ", ".join(
            f"{name}: {rate:.1%}" for name, rate in worst) +
            " of samples hit the token limit, never closed their reasoning or gave no answer. "
            "They have no "
            "final answer: they score 0 accuracy and no compliance, and their answer view is "
            "judged as cut off. Raise `--max-tokens` before reading the numbers below.", ""]
    else:
        lines += ["No output was truncated.", ""]
    errors = {name: entry["n_errors"] for name, entry in benches.items() if entry["n_errors"]}
    if errors:
        lines += ["> **Errors:** " + ", ".join(f"{name}: {count} item(s)"
                                               for name, count in errors.items()) +
                  " had a generation or judge error (see items.jsonl); a metric's item count "
                  "is in summary.json `counts`.", ""]
    generation = summary["generation"]
    lines += ["Decoding: " + ", ".join(f"{key} {value}" for key, value in generation.items()
                                       if value is not None), "",
              "Judges: " + "; ".join(f"{key}: {value}" for key, value in judges.items()), ""]
    used: set[str] = set()
    for suite in SUITES:
        rows = {name: entry for name, entry in benches.items() if entry["suite"] == suite}
        if not rows:
            continue
        columns = _columns(suite, rows)
        used.update(columns)
        lines += [f"## {suite}", "", "| benchmark | items | errors | epochs | " +
                  " | ".join(columns) + " |",
                  "|---" * (4 + len(columns)) + "|"]
        for name, entry in rows.items():
            lines.append(f"| {name} | {entry['n_items']} | {entry['n_errors']} | "
                         f"{entry['epochs']} | " +
                         " | ".join(_fmt(entry["metrics"].get(key)) for key in columns) + " |")
        lines.append("")
    lines += ["## Definitions", ""]
    lines += [f"- `{key}`: {m.definition(key)}" for key in sorted(used)]
    lines += ["", "Plots: `plots/`. Inspect's logs: `inspect view --log-dir logs`.", ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    benches: dict[str, Any] = summary["benchmarks"]
    for suite in SUITES:
        rows = {name: entry for name, entry in benches.items() if entry["suite"] == suite}
        if not rows:
            continue
        columns = [key for key in _columns(suite, rows) if not key.endswith("_tokens")
                   and key not in COUNTS]
        figure, axis = plt.subplots(figsize=(max(4.0, 1.6 * len(rows) * len(columns) / 3), 3.5))
        width = 0.8 / max(1, len(columns))
        for index, key in enumerate(columns):
            values = [rows[name]["metrics"].get(key) or 0.0 for name in rows]
            axis.bar([position + index * width for position in range(len(rows))], values,
                     width, label=key)
        axis.set_xticks([position + 0.4 - width / 2 for position in range(len(rows))],
                        list(rows))
        axis.set_ylim(0, 1)
        axis.set_title(f"{suite}: {summary['model']}")
        if columns:
            axis.legend(fontsize="small")
        figure.tight_layout()
        path = folder / f"{suite}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written
