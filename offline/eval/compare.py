"""``guardrail eval compare DIR DIR...``: before/after tables of ``guardrail eval`` runs.

Every run is compared with the first (the baseline): for each benchmark and metric, both values,
the difference (run minus baseline) and a seeded bootstrap confidence interval of it (paired by
item id when both runs scored the same items, unpaired otherwise; :mod:`offline.eval.bootstrap`).
A difference whose interval includes 0 is marked "within noise". A benchmark or metric that one
run lacks is shown as missing; a metric with no per-item values (not a mean over items) gets no
interval. Written with ``--out DIR``: ``compare.md``, ``compare.json`` and ``plots/*.png``;
without it the Markdown goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offline.eval.bootstrap import (
    DEFAULT_CONFIDENCE,
    DEFAULT_RESAMPLES,
    Interval,
    bootstrap_delta,
)
from offline.eval.run_results import RunError, RunResult, load_run

PROG = "guardrail eval compare"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Delta:
    value: float | None
    """Run minus baseline, from the two summaries; None when either value is missing."""
    interval: Interval | None

    def verdict(self) -> str:
        if self.value is None:
            return "missing"
        if self.interval is None:
            return "no per-item values"
        return "within noise" if self.interval.within_noise else "beyond noise"


@dataclass(frozen=True)
class MetricRow:
    name: str
    values: list[float | None]
    """One per run; None when the run lacks the benchmark or metric, or it has no value."""
    present: list[bool]
    """Whether the run reports the metric at all (missing vs. null)."""
    deltas: list[Delta]
    """One per run after the first."""


@dataclass(frozen=True)
class BenchmarkTable:
    name: str
    suite: str
    counts: list[tuple[int, int, int] | None]
    """(items, errors, epochs) per run; None where the run lacks the benchmark."""
    rows: list[MetricRow]


@dataclass(frozen=True)
class Comparison:
    runs: list[RunResult]
    tables: list[BenchmarkTable]
    resamples: int
    confidence: float
    seed: int


def _ordered_union(lists: Sequence[Sequence[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for names in lists:
        for name in names:
            seen.setdefault(name, None)
    return list(seen)


def compare(runs: Sequence[RunResult], *, resamples: int = DEFAULT_RESAMPLES,
            confidence: float = DEFAULT_CONFIDENCE, seed: int = 0) -> Comparison:
    """Every run against the first, benchmark by benchmark, metric by metric."""
    if len(runs) < 2:
        raise ValueError("compare needs at least two runs")
    tables: list[BenchmarkTable] = []
    for bench in _ordered_union([list(run.benchmarks) for run in runs]):
        results = [run.benchmarks.get(bench) for run in runs]
        suite = next((result.suite for result in results if result is not None), "")
        metrics = _ordered_union([list(result.metrics) for result in results if result])
        rows: list[MetricRow] = []
        for metric in metrics:
            present = [result is not None and metric in result.metrics for result in results]
            values = [result.metrics.get(metric) if result is not None else None
                      for result in results]
            base = results[0]
            deltas: list[Delta] = []
            for index in range(1, len(runs)):
                other, first, second = results[index], values[0], values[index]
                if first is None or second is None or base is None or other is None:
                    deltas.append(Delta(None, None))
                    continue
                # Every cell draws with the same seed: an interval does not move when
                # another benchmark is added or removed.
                interval = bootstrap_delta(base.items.get(metric, {}),
                                           other.items.get(metric, {}),
                                           resamples=resamples, confidence=confidence,
                                           seed=seed)
                deltas.append(Delta(second - first, interval))
            rows.append(MetricRow(metric, values, present, deltas))
        counts = [(result.n_items, result.n_errors, result.epochs) if result else None
                  for result in results]
        tables.append(BenchmarkTable(bench, suite, counts, rows))
    return Comparison(list(runs), tables, resamples, confidence, seed)


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3f}"


def _fmt_delta(delta: Delta) -> str:
    if delta.value is None:
        return "—"
    text = f"{delta.value:+.3f}" if abs(delta.value) < 100 else f"{delta.value:+,.0f}"
    interval = delta.interval
    if interval is None:
        return f"{text} (no CI: no per-item values)"
    bounds = f"[{_fmt(interval.low)}, {_fmt(interval.high)}]"
    note = "within noise" if interval.within_noise else "beyond noise"
    pairing = "" if interval.paired else ", unpaired"
    return f"{text} {bounds} {note}{pairing}"


def _cell(row: MetricRow, index: int) -> str:
    return _fmt(row.values[index]) if row.present[index] else "missing"


def markdown(comparison: Comparison, *, heading: int = 1) -> str:
    """The tables; ``heading`` is the title's Markdown level (benchmarks one below)."""
    runs = comparison.runs
    base = runs[0].label
    level = round(comparison.confidence * 100)
    lines = [f"{'#' * heading} Comparison against {base}", ""]
    lines.append("| run | folder | model |")
    lines.append("|---|---|---|")
    lines += [f"| {run.label} | `{run.folder}` | {run.model or '—'} |" for run in runs]
    lines += ["", f"Δ = run - {base}, from the two summaries. [low, high] = the {level} % "
              f"bootstrap interval of Δ ({comparison.resamples:,} resamples, seed "
              f"{comparison.seed}), paired by item id when both runs scored the same items, "
              "unpaired otherwise. \"within noise\" = the interval includes 0: these data do "
              "not show a change. n/a = the run has the metric but no value; missing = the run "
              "does not report it.", ""]
    header = ["metric", base]
    for run in runs[1:]:
        header += [run.label, f"Δ {run.label} [{level} % CI]"]
    for table in comparison.tables:
        lines.append(f"{'#' * (heading + 1)} {table.name}"
                     + (f" ({table.suite})" if table.suite else ""))
        lines.append("")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        count_cells = [("missing" if count is None else
                        f"{count[0]} ({count[1]} errors, {count[2]} epochs)")
                       for count in table.counts]
        items_row = ["items", count_cells[0]]
        for index in range(1, len(runs)):
            items_row += [count_cells[index], ""]
        lines.append("| " + " | ".join(items_row) + " |")
        for row in table.rows:
            cells = [row.name, _cell(row, 0)]
            for index in range(1, len(runs)):
                cells += [_cell(row, index), _fmt_delta(row.deltas[index - 1])]
            lines.append("| " + " | ".join(cells) + " |")
        epochs = {count[2] for count in table.counts if count is not None}
        if len(epochs) > 1:
            lines += ["", f"Note: the runs used different epochs ({sorted(epochs)}): "
                          "Safe@K and ConsSafe@K are not comparable across them."]
        lines.append("")
    return "\n".join(lines)


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def as_json(comparison: Comparison) -> dict[str, Any]:
    runs = comparison.runs
    benchmarks: dict[str, Any] = {}
    for table in comparison.tables:
        metrics: dict[str, Any] = {}
        for row in table.rows:
            deltas: dict[str, Any] = {}
            for index, delta in enumerate(row.deltas, start=1):
                interval = delta.interval
                deltas[runs[index].label] = {
                    "delta": _finite(delta.value),
                    "ci": None if interval is None else [interval.low, interval.high],
                    "paired": None if interval is None else interval.paired,
                    "n": None if interval is None else [interval.n_first, interval.n_second],
                    "within_noise": None if interval is None else interval.within_noise,
                    "verdict": delta.verdict(),
                }
            metrics[row.name] = {
                "values": {run.label: (row.values[i] if row.present[i] else "missing")
                           for i, run in enumerate(runs)},
                "deltas": deltas,
            }
        benchmarks[table.name] = {
            "suite": table.suite,
            "runs": {run.label: (None if table.counts[i] is None else dict(zip(
                ("n_items", "n_errors", "epochs"), table.counts[i] or (), strict=True)))
                for i, run in enumerate(runs)},
            "metrics": metrics,
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "baseline": runs[0].label,
        "runs": [{"label": run.label, "folder": str(run.folder), "model": run.model}
                 for run in runs],
        "confidence": comparison.confidence,
        "resamples": comparison.resamples,
        "seed": comparison.seed,
        "benchmarks": benchmarks,
    }


def _write_text(path: Path, text: str) -> None:
    """Written beside and renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8",
                                     prefix=f".{path.name}.") as handle:
        handle.write(text)
    os.replace(handle.name, path)


def write_comparison(comparison: Comparison, out: Path, *, plots: bool = True) -> list[Path]:
    """``compare.md``, ``compare.json`` and (``plots``) ``plots/*.png`` in ``out``."""
    written = [out / "compare.md", out / "compare.json"]
    _write_text(written[0], markdown(comparison))
    _write_text(written[1], json.dumps(as_json(comparison), indent=2) + "\n")
    if plots:
        from offline.eval.compare_plots import plot_deltas

        written += plot_deltas(comparison, out / "plots")
    return written


def unique_labels(folders: Sequence[Path], given: Sequence[str] | None) -> list[str]:
    """The folder names, lengthened with their parents until no two are the same."""
    if given:
        if len(given) != len(folders) or len(set(given)) != len(given):
            raise RunError(f"--labels: {len(folders)} different names, one per folder")
        return list(given)
    depth = 1
    while True:
        labels = ["/".join(folder.resolve().parts[-depth:]) for folder in folders]
        if len(set(labels)) == len(labels) or depth > 32:
            return labels
        depth += 1


def run(args: argparse.Namespace) -> int:
    try:
        if len(args.dirs) < 2:
            raise RunError("give at least two run folders (the first is the baseline)")
        if args.resamples < 1:
            raise RunError(f"--resamples: at least 1, not {args.resamples}")
        if not 0 < args.confidence < 1:
            raise RunError(f"--confidence: between 0 and 1, not {args.confidence}")
        folders = [Path(folder) for folder in args.dirs]
        labels = unique_labels(folders, args.labels.split(",") if args.labels else None)
        runs = [load_run(folder, label) for folder, label in zip(folders, labels, strict=True)]
    except RunError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr, flush=True)
        return 2
    comparison = compare(runs, resamples=args.resamples, confidence=args.confidence,
                         seed=args.seed)
    if args.out is None:
        sys.stdout.write(markdown(comparison) + "\n")
        return 0
    try:
        written = write_comparison(comparison, Path(args.out), plots=not args.no_plots)
    except OSError as error:
        print(f"{PROG}: error: {args.out}: cannot write ({error.strerror})", file=sys.stderr)
        return 2
    print(f"{PROG}: {len(runs) - 1} run(s) against {runs[0].label}, "
          f"{len(comparison.tables)} benchmark(s); {len(written)} files in {args.out}",
          file=sys.stderr, flush=True)
    return 0


def add_compare_parser(commands: Any) -> None:
    """Adds ``compare`` to a subcommand group (``guardrail eval``'s)."""
    parser = commands.add_parser("compare", help="before/after tables of eval runs",
                                 description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="guardrail eval --out folders; the first is the baseline")
    parser.add_argument("--out", help="write compare.md, compare.json and plots/ here "
                                      "(default: Markdown to stdout)")
    parser.add_argument("--labels", help="comma-separated names for the runs "
                                         "(default: the folder names)")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES,
                        help=f"bootstrap resamples (default {DEFAULT_RESAMPLES:,})")
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                        help="interval level (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--no-plots", action="store_true", help="no PNG plots")
    parser.set_defaults(handler=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guardrail eval")
    add_compare_parser(parser.add_subparsers(dest="eval_command", required=True))
    args = parser.parse_args(["compare", *(sys.argv[1:] if argv is None else argv)])
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
