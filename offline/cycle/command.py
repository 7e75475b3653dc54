"""``guardrail cycle --config FILE [--out DIR]``: harvest -> correct -> train -> evaluate the base
model, the tuned model and (optionally) the proxy in front of each -> one report.

Each stage runs the project's own command in a child process and is cached under
``DIR/stages/``: a stage whose inputs did not change since it last completed is skipped, so a
cycle that failed resumes where it stopped. The report is ``DIR/report.md``. Exit status: 0
done, 1 a stage failed (one line naming it, its last output and its log), 2 a bad config, 130
interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from offline.cycle.commands import missing_commands
from offline.cycle.config import CycleConfig, CycleConfigError, load_cycle_config
from offline.cycle.stage import StageFailed

PROG = "guardrail cycle"


def _say(line: str) -> None:
    print(f"{PROG}: {line}", file=sys.stderr, flush=True)


def needed_commands(config: CycleConfig) -> list[str]:
    needed = ["harvest", "train"]
    if config.correct is not None:
        needed.append("correct")
    if config.eval is not None:
        needed.append("eval")
        if config.eval.proxy is not None:
            needed.append("serve")
    return needed


def run(args: argparse.Namespace) -> int:
    from offline.cycle.report import write_report
    from offline.cycle.stages import Cycle

    try:
        config = load_cycle_config(Path(args.config))
        out = args.out or config.out
        if not out:
            raise CycleConfigError("--out is required (or 'out' in the config)")
        missing = missing_commands(needed_commands(config))
        if missing:
            raise CycleConfigError(
                f"this install has no guardrail {', '.join(missing)} command (installed before "
                "it landed?): reinstall the package, e.g. pip install -e '.[dev]'")
    except CycleConfigError as error:
        _say(f"error: {error}")
        return 2
    root = Path(out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    cycle = Cycle(config, root, log=_say)
    try:
        cycle.run()
    except StageFailed as error:
        _say(f"error: {error}")
        _say(f"rerun the same command to resume: the {len(cycle.outcomes)} completed stage(s) "
             "are skipped")
        return 1
    except KeyboardInterrupt:  # the child got the same SIGINT; its servers were stopped
        _say(f"interrupted; rerun the same command to resume: the {len(cycle.outcomes)} "
             "completed stage(s) are skipped")
        return 130
    report = write_report(root, cycle.outcomes, seed=args.seed)
    ran = sum(outcome.status == "ran" for outcome in cycle.outcomes.values())
    _say(f"{ran} stage(s) ran, {len(cycle.outcomes) - ran} skipped; report: {report}")
    return 0


def add_cycle_parser(commands: Any) -> None:
    parser = commands.add_parser("cycle", help="harvest, correct, train, evaluate: one report",
                                 description="Harvest -> correct -> train -> evaluate the "
                                 "base model, the tuned model and (optionally) the proxy in "
                                 "front of each -> one report (DIR/report.md). Each stage is "
                                 "cached: a rerun skips what completed with the same inputs.")
    parser.add_argument("--config", required=True, help="the cycle's YAML file")
    parser.add_argument("--out", help="the cycle's folder (default: 'out' in the config)")
    parser.add_argument("--seed", type=int, default=0, help="the report's bootstrap seed")
    parser.set_defaults(handler=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guardrail")
    add_cycle_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cycle", *(sys.argv[1:] if argv is None else argv)])
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
