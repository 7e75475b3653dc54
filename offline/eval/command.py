"""``guardrail eval``: re-benchmark a model, a served endpoint or the proxy in front of one.

    guardrail eval --model PATH_OR_ENDPOINT --suite safety over-refusal reasoning \\
        --judge guard.yaml --judge openai/gpt-4o --out runs/base [--limit N] [--data-dir D] \\
        [--config eval.yaml] [--samples K] [--preset safechain|star1] …

Exit status: 0 when every benchmark finished, 1 when some did not (rerun the same command to
resume), 2 for bad input (one line on stderr), 130 when interrupted (rerun to resume).

Nested subcommands hang off the same parser: ``add_eval_subcommands`` is the hook where
``guardrail eval compare DIR…`` registers (offline/eval/compare.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import yaml

from offline.eval.errors import EvalError


def _add_compare(subcommands: Any) -> None:
    from offline.eval.compare import add_compare_parser

    add_compare_parser(subcommands)


EVAL_SUBCOMMANDS: list[Callable[[Any], None]] = [_add_compare]
"""Registrars for ``guardrail eval SUBCOMMAND``: each takes the subparsers object and adds its
parser (setting ``handler``): ``guardrail eval compare`` (offline/eval/compare.py)."""


def add_eval_subcommands(subcommands: Any) -> None:
    """THE HOOK for nested subcommands (``guardrail eval compare``): each registrar in
    ``EVAL_SUBCOMMANDS`` adds its own parser."""
    for register in EVAL_SUBCOMMANDS:
        register(subcommands)


def _model_arg(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE")
    return key, yaml.safe_load(raw)


def add_eval_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "eval", help="re-benchmark a model, endpoint or the proxy (safety, over-refusal, "
                     "reasoning)",
        description="Run the safety, over-refusal and reasoning suites on Inspect and write "
                    "summary.json, items.jsonl, report.md, plots/ and manifest.json to --out.")
    parser.add_argument("--config", help="YAML file of settings (the command line wins)")
    parser.add_argument("--model", help="local folder or hub id, endpoint URL (…/v1), or an "
                                        "Inspect model name (vllm/…, hf/…, openai/…)")
    parser.add_argument("--suite", nargs="+", help="safety, over-refusal, reasoning, or "
                                                   "benchmark names (default: safety)")
    parser.add_argument("--judge", action="append",
                        help="a guard (kind or config .yaml) and/or a model (provider/name or "
                             "URL) for the rubric and refusal judges; repeatable")
    parser.add_argument("--out", help="output folder (rerun with the same one to resume)")
    parser.add_argument("--limit", type=int, help="first N items of each benchmark")
    parser.add_argument("--data-dir", help="local files in ../shared/data's layout "
                                           "(default: the public hub datasets)")
    parser.add_argument("--guard-config", help="project config whose guard judges by default")
    parser.add_argument("--backend", choices=("auto", "transformers", "vllm"))
    parser.add_argument("--model-arg", action="append", type=_model_arg, metavar="KEY=VALUE",
                        help="model provider argument, e.g. tensor_parallel_size=2")
    parser.add_argument("--served-model", help="the endpoint's model name (default: its first)")
    parser.add_argument("--preset", help="decoding of a paper's harness: safechain, star1")
    parser.add_argument("--samples", type=int, help="K samples per item (Inspect epochs)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-connections", type=int,
                        help="concurrent generation requests (default 8)")
    parser.add_argument("--display", choices=("rich", "plain", "full", "conversation", "none"),
                        help="Inspect's progress display (default rich)")
    parser.set_defaults(handler=run_eval)
    add_eval_subcommands(parser.add_subparsers(dest="eval_command", required=False,
                                               metavar="SUBCOMMAND"))


def _fail(message: str, status: int = 2) -> int:
    print(f"guardrail eval: {' '.join(message.split())}", file=sys.stderr, flush=True)
    return status


def run_eval(args: argparse.Namespace) -> int:
    from offline.eval import config as eval_config
    from offline.eval.run import run

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Tokenizers' own thread pool fights Inspect's threads and warns after a fork.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    overrides: dict[str, Any] = {
        "model": args.model, "suite": args.suite, "judge": args.judge, "out": args.out,
        "limit": args.limit, "data_dir": args.data_dir, "guard_config": args.guard_config,
        "backend": args.backend, "served_model": args.served_model, "preset": args.preset,
        "samples": args.samples, "temperature": args.temperature, "top_p": args.top_p,
        "max_tokens": args.max_tokens, "repetition_penalty": args.repetition_penalty,
        "seed": args.seed, "max_connections": args.max_connections, "display": args.display,
        "model_args": dict(args.model_arg) if args.model_arg else None}
    try:
        config = eval_config.load(args.config, overrides)
        outcome = run(config, sys.argv)
    except EvalError as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume", 130)
    line = ", ".join(f"{name}: {entry['n_items']} items, {entry['n_errors']} errors"
                     for name, entry in outcome.summary["benchmarks"].items())
    print(f"guardrail eval: {line}; wrote {outcome.out}", file=sys.stderr, flush=True)
    if not outcome.success:
        return _fail("some benchmarks did not finish; rerun the same command to resume", 1)
    return 0
