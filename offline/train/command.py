"""``guardrail train``: fine-tune a reasoning model on harvested data (``sft``, ``dpo``).

``guardrail train sft --data FILE_OR_DIR[:RATIO]... --model PATH_OR_ID --out DIR [--lora]
[--merge] [--config FILE]``: settings come from the dataclass defaults, then the YAML file, then
the command line. Bad input is one line on stderr and exit status 2, before any weights load.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from offline.train import run_folder
from offline.train.dpo import add_dpo_parser
from offline.train.errors import TrainInputError
from offline.train.sft import run_sft
from offline.train.sft_config import SFTScriptConfig, read_yaml, resolve

PROG = "guardrail train sft"


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not YAML") from None


def cli_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (None = not given), as config keys."""
    keys = ("data", "model", "out", "lora", "merge", "lora_r", "lora_alpha", "lora_dropout",
            "lora_target_modules", "max_length", "seed", "resume", "overwrite")
    chosen = {key: getattr(args, key) for key in keys if getattr(args, key) is not None}
    if args.sft:
        chosen["sft"] = dict(args.sft)
    return chosen


def config_from(args: argparse.Namespace) -> SFTScriptConfig:
    from_yaml = read_yaml(Path(args.config)) if args.config else {}
    return resolve(from_yaml, cli_settings(args))


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from(args)
        result = run_sft(config)
    except TrainInputError as error:
        return _fail(str(error))
    main_process = run_folder.is_main()
    run_folder.leave_process_group()
    if not main_process:  # under accelerate launch, one report, not one per process
        return 0
    summary = result.summary
    print(f"{PROG}: {summary['global_step']} steps on {summary['rows']:,} rows "
          f"({summary['records_dropped']} dropped as too long, {summary['records_skipped']} "
          f"skipped); {summary['saved']} in {result.out}", file=sys.stderr, flush=True)
    return 0


def add_sft_parser(commands: Any) -> None:
    parser = commands.add_parser("sft", help="supervised fine-tuning with TRL's SFTTrainer",
                                 description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--config", help="YAML file of settings (the command line wins)")
    parser.add_argument("--data", nargs="+", default=None, metavar="FILE_OR_DIR[:RATIO]",
                        help="JSONL files or folders, each with an optional mixing ratio "
                             "(default 1; 0.5 keeps a seeded half, 2 repeats them)")
    parser.add_argument("--model", help="model folder or hub id")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                        help="train a LoRA adapter (peft) instead of every weight")
    parser.add_argument("--merge", action=argparse.BooleanOptionalAction, default=None,
                        help="merge the LoRA adapter into the saved model")
    parser.add_argument("--lora-r", type=int)
    parser.add_argument("--lora-alpha", type=int)
    parser.add_argument("--lora-dropout", type=float)
    parser.add_argument("--lora-target-modules", nargs="+", default=None,
                        help="module names (default: all-linear)")
    parser.add_argument("--max-length", type=int,
                        help="longest row in tokens; longer ones are dropped and counted "
                             "(default 8192)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from a checkpoint folder (default: the latest in --out)")
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="replace an output folder that holds another run")
    parser.add_argument("--sft", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="any TRL SFTConfig field, e.g. --sft learning_rate=1e-5")
    parser.set_defaults(handler=run)


def add_train_parser(commands: Any) -> None:
    parser = commands.add_parser("train", help="fine-tune a model on harvested data",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="train_command", required=True)
    add_sft_parser(commands)
    add_dpo_parser(commands)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guardrail")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
