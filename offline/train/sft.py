"""``guardrail train sft``: supervised fine-tuning with TRL's SFTTrainer, full or LoRA.

Every check that can fail on bad input runs before any weights load: the config, the output
folder, the data's shape, the tokenizer's chat template. The output folder is laid out by
offline/train/run_folder.py (shared with ``dpo``): the model (or LoRA adapter, or with ``merge``
the merged model) and tokenizer at its root, ``checkpoints/`` for ``--resume``, the resolved
config, the data card, the training summary and the loss curve. The same command runs in one
process or in many under ``accelerate launch`` (README, "Many GPUs").
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offline.train import run_folder
from offline.train.data_spec import parse_specs
from offline.train.mixture import Mixture, build, scan
from offline.train.run_folder import CHECKPOINTS, RunError
from offline.train.sft_config import SFTScriptConfig, sft_arguments
from offline.train.trl_settings import machine_defaults

__all__ = ["RunError", "SFTResult", "load_tokenizer", "run_sft"]


@dataclass(frozen=True, slots=True)
class SFTResult:
    out: Path
    global_step: int
    summary: dict[str, Any]


def check_out(config: SFTScriptConfig) -> tuple[Path, bool]:
    """The output folder, and whether an old run there is to be cleared (--overwrite)."""
    out = Path(config.out)
    inputs = [Path(config.model), *(spec.path for spec in parse_specs(config.data))]
    clear = run_folder.check_out(out, overwrite=config.overwrite,
                                 resume=config.resume is not None, inputs=inputs)
    return out, clear


def resume_point(config: SFTScriptConfig, out: Path) -> str | None:
    if config.resume is None:
        return None
    if config.resume != "latest":
        if not Path(config.resume).is_dir():
            raise RunError(f"--resume {config.resume}: no such checkpoint folder")
        return config.resume
    from transformers.trainer_utils import get_last_checkpoint

    folder = out / CHECKPOINTS
    last = None
    if folder.is_dir():
        last = get_last_checkpoint(str(folder))  # type: ignore[no-untyped-call]
    if last is None:
        raise RunError(f"--resume: no checkpoint-* folder under {folder} to continue from")
    return str(last)


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RunError(f"--model {model}: cannot load its tokenizer ({first})") from None
    if not tokenizer.chat_template:
        raise RunError(f"--model {model}: the tokenizer has no chat template; the prompts "
                       "cannot be rendered as the model sees them")
    return tokenizer


def _peft_config(config: SFTScriptConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout,
                      target_modules=config.lora_target_modules, task_type="CAUSAL_LM")


def card(mixture: Mixture, config: SFTScriptConfig) -> dict[str, Any]:
    return {"model": config.model, "max_length": config.max_length, "seed": config.seed,
            "rows": len(mixture.rows), "skipped": mixture.skipped, "dropped": mixture.dropped,
            "files": [file.to_dict() for file in mixture.cards]}


def run_sft(config: SFTScriptConfig, callbacks: list[Any] | None = None) -> SFTResult:
    """Check everything that can be checked cheaply, then train and write the output folder."""
    out, clear = check_out(config)
    resume = resume_point(config, out)
    sources = scan(config.data)
    tokenizer = load_tokenizer(config.model)
    mixture = build(sources, tokenizer, config.max_length, config.seed)
    if not mixture.rows:
        raise RunError(f"no rows to train on ({mixture.skipped} skipped, {mixture.dropped} "
                       f"dropped as longer than max_length {config.max_length})")
    arguments = sft_arguments(config, out / CHECKPOINTS)
    arguments = {**machine_defaults(arguments), **arguments}

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    try:
        args = SFTConfig(**arguments)
        args.world_size  # noqa: B018  (sets up the processes: the barriers below need them)
    except (ValueError, TypeError) as error:  # e.g. save_strategy: sometimes
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise RunError(f"sft: TRL refuses the settings ({first})") from None
    # Only now that the new run can start, on every process: a failed start loses nothing.
    run_folder.open_out(out, clear=clear, resume=resume is not None)
    resolved = config.to_dict() | {"sft": {key: value for key, value in arguments.items()
                                            if key not in ("output_dir", "max_length", "seed")}}
    run_folder.write_config(out, resolved)
    run_folder.write_card(out, card(mixture, config))

    model = AutoModelForCausalLM.from_pretrained(config.model)
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated alias while wrapping the model: not ours.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        trainer = SFTTrainer(model=model, args=args,
                             train_dataset=Dataset.from_list(mixture.rows),
                             processing_class=tokenizer,
                             peft_config=_peft_config(config) if config.lora else None,
                             callbacks=callbacks)
    run_folder.check_saveable(trainer)
    result = trainer.train(resume_from_checkpoint=resume)
    saved = run_folder.save(trainer, out, lora=config.lora, merge=config.merge,
                            base=config.model)
    summary = run_folder.finish(out, trainer, result, {
        "resumed_from": resume,
        "rows": len(mixture.rows),
        "records_skipped": mixture.skipped,
        "records_dropped": mixture.dropped,
        "saved": saved,
    })
    return SFTResult(out, trainer.state.global_step, summary)
