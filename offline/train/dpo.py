"""``guardrail train dpo``: TRL's DPOTrainer on IPO pairs (offline/harvest/pairs.py).

Each pair is loaded through :func:`offline.train.render.dpo_row`, so the shared reasoning
prefix stays inside ``prompt`` and the loss falls on the diverging suffixes only (IPO's
second stage; tests/test_train_dpo.py shows it token by token). Several files can be mixed,
each with a ratio (``pairs.jsonl:1.0 benign_pairs.jsonl:0.3``), parsed as SFT's are
(offline/train/data_spec.py) and drawn with the run's seed by the same rule
(:func:`offline.train.mixture.scaled`). A pair longer than ``max_length`` tokens is dropped and
counted, never cut. The output folder is SFT's (offline/train/run_folder.py): model or adapter,
tokenizer, ``config.yaml``, ``data_card.json``, ``training_summary.json``, ``loss_curve.png``.

Everything that can be wrong with the input (unknown config key, no valid pair, a model folder
without a chat template, an output folder holding another run) is one line, raised as
:class:`DPOSetupError` before any weights load.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from offline.harvest.records import BadRow, RecordError, read_jsonl
from offline.train import run_folder
from offline.train.data_spec import DataSpec, expand, parse_specs
from offline.train.errors import TrainInputError
from offline.train.mixture import FileCard, scaled
from offline.train.run_folder import CHECKPOINTS
from offline.train.trl_settings import coerce, machine_defaults

# DPOConfig fields the run sets from its own top-level keys; in ``dpo:`` they would conflict.
_OWNED = {"output_dir": "out", "seed": "seed", "max_length": "max_length", "beta": "beta"}
# Defaults that differ from TRL's: activation checkpointing off (TRL turns it on, and its
# deprecated alias warns), a loss logged every step, nothing saved mid-run, no reporting.
_DPO_DEFAULTS: dict[str, Any] = {
    "activation_checkpointing": False,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "include_num_input_tokens_seen": "non_padding",  # the summary's tokens_seen, as SFT's
}


class DPOSetupError(TrainInputError):
    """Input the run cannot use; the message is one line that says what and where."""


@dataclass(slots=True)
class DPORunConfig:
    data: list[DataSpec]
    model: str
    out: Path
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    target_modules: list[str] | None = None
    """``None``: every linear layer (peft's ``"all-linear"``)."""
    seed: int = 0
    max_length: int = 2048
    beta: float = 0.1
    overwrite: bool = False
    dpo: dict[str, Any] = field(default_factory=dict)
    """Any further TRL ``DPOConfig`` field (learning_rate, max_steps, loss_type, ...)."""

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> DPORunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise DPOSetupError(f"unknown config key {key!r} (known: "
                                    f"{', '.join(sorted(known))})")
        for key in ("data", "model", "out"):
            if values.get(key) in (None, "", []):
                raise DPOSetupError(f"{key!r} is required")
        data = parse_specs(values["data"])
        dpo = values.get("dpo") or {}
        if not isinstance(dpo, dict):
            raise DPOSetupError("'dpo' must be a mapping of TRL DPOConfig fields")
        dpo = _dpo_settings(dpo)
        for flag in ("lora", "overwrite"):
            if not isinstance(values.get(flag, False), bool):
                raise DPOSetupError(f"{flag!r} must be true or false, not {values[flag]!r}")
        modules = values.get("target_modules")
        if isinstance(modules, str):
            modules = [modules]
        try:
            return cls(data=data, model=str(values["model"]),
                       out=Path(values["out"]), lora=values.get("lora", False),
                       lora_r=int(values.get("lora_r", 16)),
                       lora_alpha=int(values.get("lora_alpha", 32)),
                       target_modules=list(modules) if modules else None,
                       seed=int(values.get("seed", 0)),
                       max_length=int(values.get("max_length", 2048)),
                       beta=float(values.get("beta", 0.1)),
                       overwrite=values.get("overwrite", False), dpo=dict(dpo))
        except (TypeError, ValueError) as error:
            if isinstance(error, DPOSetupError):
                raise
            raise DPOSetupError(f"bad config value: {error}") from None

    def to_mapping(self) -> dict[str, Any]:
        return {"data": [spec.to_mapping() for spec in self.data],
                "model": self.model, "out": str(self.out), "lora": self.lora,
                "lora_r": self.lora_r, "lora_alpha": self.lora_alpha,
                "target_modules": self.target_modules, "seed": self.seed,
                "max_length": self.max_length, "beta": self.beta, "dpo": dict(self.dpo)}


def _dpo_settings(dpo: dict[str, Any]) -> dict[str, Any]:
    """The ``dpo`` mapping checked against TRL's DPOConfig, each value of its field's type."""
    from trl.trainer.dpo_config import DPOConfig

    fields = {f.name: f.default for f in dataclasses.fields(DPOConfig) if f.init}
    for key in dpo:
        if key in _OWNED:
            raise DPOSetupError(f"dpo.{key}: set it as the top-level key {_OWNED[key]!r}")
        if key not in fields:
            raise DPOSetupError(f"dpo: unknown key {key!r} (not a TRL DPOConfig field)")
    return {key: coerce(f"dpo.{key}", value, fields[key]) for key, value in dpo.items()}


@dataclass(slots=True)
class PairFile:
    """One file's pairs in TRL's form, and its card: rows read, kept, used, skipped, dropped."""

    card: FileCard
    rows: list[dict[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class Prepared:
    """Everything checked and loaded, ready to train: the trainer and what the summary needs."""

    trainer: Any
    files: list[PairFile]
    rows: list[dict[str, str]]
    clear: bool
    """Whether ``out`` holds an old run that ``--overwrite`` replaces."""

    @property
    def truncated_away(self) -> int:
        """Pairs TRL removed itself (none expected: longer pairs are dropped before)."""
        return len(self.rows) - len(self.trainer.train_dataset)


def _length(tokenizer: Any, prompt: str, completion: str) -> int:
    """Tokens of prompt + completion as TRL tokenizes them, with the EOS it appends."""
    return len(tokenizer(text=prompt + completion)["input_ids"]) + 1


def _load_pairs(spec: DataSpec, tokenizer: Any, max_length: int) -> PairFile:
    from offline.train.render import dpo_row

    out = PairFile(FileCard(str(spec.path), spec.ratio, "ipo-pairs"))
    card = out.card
    for row in read_jsonl(spec.path):
        card.rows += 1
        if isinstance(row, BadRow):
            card.skipped[row.problem] += 1
            continue
        try:
            rendered = dpo_row(row[1], tokenizer)
        except RecordError as error:
            card.skipped[str(error)] += 1
            continue
        longest = max(_length(tokenizer, rendered["prompt"], rendered[side])
                      for side in ("chosen", "rejected"))
        if longest > max_length:  # TRL would cut the suffix: drop and count, as SFT does
            card.dropped[f"longer than max_length ({max_length} tokens)"] += 1
            continue
        # Only TRL's three columns: provenance columns may be null in some rows.
        out.rows.append({k: rendered[k] for k in ("prompt", "chosen", "rejected")})
    card.kept = len(out.rows)
    return out


def _mix(files: list[PairFile], seed: int) -> list[dict[str, str]]:
    """Each file's kept pairs at its ratio (seeded draw; whole copies above 1), shuffled."""
    rng = random.Random(seed)
    mixed: list[dict[str, str]] = []
    for f in files:
        take = scaled(list(f.rows), f.card.ratio, rng)
        f.card.used = len(take)
        mixed += take
    rng.shuffle(mixed)
    return mixed


@contextmanager
def _checkpointing_alias() -> Iterator[None]:
    """TRL 1.16 (every step, trl/models/utils.py) and peft (wrapping the model) read
    transformers' deprecated ``is_gradient_checkpointing``; that FutureWarning is theirs to fix,
    and is silenced here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message="`is_gradient_checkpointing` is deprecated")
        yield


def _no_pairs(files: list[PairFile]) -> DPOSetupError:
    skipped = sum(sum(f.card.skipped.values()) for f in files)
    dropped = sum(sum(f.card.dropped.values()) for f in files)
    first = next((f"{f.card.path}: {problem}" for f in files
                  for problem in [*f.card.dropped, *f.card.skipped]), "the files are empty")
    return DPOSetupError(f"data: no pair to train on ({skipped} skipped, {dropped} dropped; "
                         f"first: {first})")


PAIR_FIELDS = ("prompt", "chosen", "rejected")


def _pair_file(path: Path) -> bool:
    """Whether a file in a folder holds pairs (its first JSON row has their fields)."""
    try:
        for row in read_jsonl(path):
            if not isinstance(row, BadRow):
                return isinstance(row[1], dict) and all(key in row[1] for key in PAIR_FIELDS)
    except (OSError, UnicodeDecodeError) as error:
        raise DPOSetupError(f"{path}: cannot read it ({error})") from None
    return True  # empty: kept, and counted as having no pair


def _check_shape(path: Path) -> None:
    """A file whose first JSON row is not a pair is the wrong file (UnsafeChain records, chat
    rows...): one line now, not every row skipped later."""
    try:
        for row in read_jsonl(path):
            if isinstance(row, BadRow):
                continue
            line, value = row
            if not isinstance(value, dict) or not all(key in value for key in PAIR_FIELDS):
                found = sorted(value) if isinstance(value, dict) else type(value).__name__
                raise DPOSetupError(f"{path}:{line}: not an IPO pair (prompt, chosen, rejected; "
                                    f"written by guardrail harvest) (found {found})")
            return
    except (OSError, UnicodeDecodeError) as error:
        raise DPOSetupError(f"{path}: cannot read it ({error})") from None


def prepare(config: DPORunConfig) -> Prepared:
    """Check the input, load the tokenizer and pairs, then the model, and build the trainer."""
    config.dpo = _dpo_settings(config.dpo)
    files_in = [item for spec in config.data for item in expand(spec, _pair_file)]
    for item in files_in:
        _check_shape(item.path)
    clear = run_folder.check_out(config.out, overwrite=config.overwrite, resume=False,
                                 inputs=[Path(config.model), *(d.path for d in files_in)],
                                 resumable=False)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DPOSetupError(f"model: cannot load a tokenizer from {config.model}: {first}") \
            from None
    if not tokenizer.chat_template:
        raise DPOSetupError(f"model: {config.model} has no chat template; the pairs' prompts "
                            "must be rendered the way the model sees them")
    if tokenizer.pad_token is None:  # DPOTrainer pads chosen and rejected to one length
        tokenizer.pad_token = tokenizer.eos_token
    try:
        files = [_load_pairs(spec, tokenizer, config.max_length) for spec in files_in]
    except (OSError, UnicodeDecodeError) as error:
        raise DPOSetupError(f"data: cannot read it ({error})") from None
    if not any(f.rows for f in files):
        raise _no_pairs(files)
    rows = _mix(files, config.seed)
    if not rows:
        raise DPOSetupError("data: the ratios select no pair")

    import torch
    from trl.trainer.dpo_config import DPOConfig

    try:
        args = DPOConfig(**(_DPO_DEFAULTS | machine_defaults(config.dpo) | config.dpo | {
            "output_dir": str(config.out / CHECKPOINTS), "seed": config.seed,
            "max_length": config.max_length, "beta": config.beta}))
        args.world_size  # noqa: B018  (sets up the processes: the barriers need them)
    except (TypeError, ValueError) as error:
        raise DPOSetupError(f"dpo: {str(error).strip().splitlines()[0]}") from None

    # Weights load only from here on.
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.trainer.dpo_trainer import DPOTrainer

    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(config.model)
    peft_config = None
    if config.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                                 target_modules=config.target_modules or "all-linear",
                                 task_type="CAUSAL_LM")
    with _checkpointing_alias():
        trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=peft_config)
    prepared_rows: Any = trainer.train_dataset  # a Dataset here (built from a list above)
    if len(prepared_rows) == 0:
        raise DPOSetupError(f"max_length {config.max_length} cuts every pair's suffix away "
                            "(the prompts alone reach it); raise max_length")
    return Prepared(trainer=trainer, files=files, rows=rows, clear=clear)


def run_training(trainer: Any) -> Any:
    """``trainer.train()``, without the deprecation noise of :func:`_checkpointing_alias`."""
    with _checkpointing_alias():
        return trainer.train()


def card(config: DPORunConfig, prepared: Prepared) -> dict[str, Any]:
    cards = [f.card for f in prepared.files]
    return {"model": config.model, "max_length": config.max_length, "seed": config.seed,
            "rows": len(prepared.rows),
            "skipped": sum(sum(c.skipped.values()) for c in cards),
            "dropped": sum(sum(c.dropped.values()) for c in cards) + prepared.truncated_away,
            "files": [c.to_dict() for c in cards]}


def train_dpo(config: DPORunConfig) -> dict[str, Any]:
    """Train, save the model (or adapter), tokenizer, resolved config, data card and summary."""
    prepared = prepare(config)
    trainer = prepared.trainer
    run_folder.open_out(config.out, clear=prepared.clear, resume=False)
    run_folder.write_config(config.out, config.to_mapping())
    data_card = card(config, prepared)
    run_folder.write_card(config.out, data_card)
    run_folder.check_saveable(trainer)
    result = run_training(trainer)
    saved = run_folder.save(trainer, config.out, lora=config.lora, merge=False)
    return run_folder.finish(config.out, trainer, result, {
        "resumed_from": None,
        "rows": len(prepared.rows),
        "records_skipped": data_card["skipped"],
        "records_dropped": data_card["dropped"],
        "saved": saved,
        "out": str(config.out),
    })


def _yaml_value(text: str) -> Any:
    return yaml.safe_load(text)


def add_dpo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``dpo`` subcommand: a YAML ``--config``, then the command line, which wins."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dpo", help="DPO (IPO's second stage) on preference pairs with TRL's DPOTrainer",
        description="DPO on IPO pairs: the shared reasoning prefix stays in the prompt, the "
                    "loss falls on the diverging suffixes. Command-line values override the "
                    "YAML --config.")
    parser.add_argument("--config", type=Path, help="YAML file with the keys below")
    parser.add_argument("--data", nargs="+", metavar="FILE_OR_DIR[:RATIO]",
                        help="pairs JSONL files or folders, each with an optional ratio "
                             "(default 1; as for sft)")
    parser.add_argument("--model", help="model folder or name (needs a chat template)")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None,
                        help="train a LoRA adapter (peft) instead of every weight")
    parser.add_argument("--lora-r", type=int)
    parser.add_argument("--lora-alpha", type=int)
    parser.add_argument("--target-modules", nargs="+", metavar="NAME",
                        help="LoRA target modules (default: every linear layer)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--beta", type=float)
    parser.add_argument("--overwrite", action="store_true", default=None,
                        help="replace an output folder that holds another run")
    parser.add_argument("--dpo", action="append", default=[], metavar="KEY=VALUE",
                        help="any TRL DPOConfig field (value read as YAML); repeatable")
    parser.set_defaults(handler=run_dpo)
    return parser


def config_from_args(args: argparse.Namespace) -> DPORunConfig:
    values: dict[str, Any] = {}
    if args.config is not None:
        try:
            loaded = yaml.safe_load(args.config.read_text("utf-8"))
        except (OSError, yaml.YAMLError) as error:
            raise DPOSetupError(f"--config {args.config}: {str(error).splitlines()[0]}") \
                from None
        if not isinstance(loaded, dict):
            raise DPOSetupError(f"--config {args.config}: not a YAML mapping")
        values.update(loaded)
    for key in ("data", "model", "out", "lora", "lora_r", "lora_alpha", "target_modules",
                "seed", "max_length", "beta", "overwrite"):
        value = getattr(args, key)
        if value is not None:
            values[key] = [str(v) for v in value] if key == "data" else value
    if args.dpo:
        dpo = dict(values.get("dpo") or {})
        for item in args.dpo:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise DPOSetupError(f"--dpo {item!r}: expected KEY=VALUE")
            dpo[key] = _yaml_value(raw)
        values["dpo"] = dpo
    return DPORunConfig.from_mapping(values)


def run_dpo(args: argparse.Namespace) -> int:
    try:
        summary = train_dpo(config_from_args(args))
    except TrainInputError as error:
        print(f"guardrail train dpo: error: {error}", file=sys.stderr, flush=True)
        return 2
    main_process = run_folder.is_main()
    run_folder.leave_process_group()
    if main_process:  # under accelerate launch, one report, not one per process
        print(f"guardrail train dpo: trained {summary['global_step']} steps on {summary['rows']} "
              f"pairs ({summary['records_skipped']} skipped, {summary['records_dropped']} dropped "
              f"as too long); {summary['saved']} in {summary['out']}", file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guardrail train")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_dpo_parser(subparsers)
    args = parser.parse_args(["dpo", *(argv if argv is not None else sys.argv[1:])])
    handler: Any = args.handler
    return int(handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
