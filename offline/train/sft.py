"""``guardrail train sft``: supervised fine-tuning with TRL's SFTTrainer, full or LoRA.

Every check that can fail on bad input runs before any weights load: the config, the output
folder, the data's shape, the tokenizer's chat template. The output folder then holds the model
(or the LoRA adapter, or with ``merge`` the merged model) and tokenizer at its root,
``checkpoints/`` for ``--resume``, ``config.yaml`` (the resolved config), ``data_card.json``
(counts per file, skipped and dropped rows with reasons), ``training_summary.json`` and, where
matplotlib is installed, ``loss_curve.png``.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from offline.train.mixture import Mixture, build, scan
from offline.train.sft_config import SFTScriptConfig, sft_arguments

CHECKPOINTS = "checkpoints"
RUN_FILES = ("training_summary.json", "config.yaml", CHECKPOINTS)


class RunError(ValueError):
    """A run that cannot start (output folder, model folder, checkpoint); one line."""


@dataclass(frozen=True, slots=True)
class SFTResult:
    out: Path
    global_step: int
    summary: dict[str, Any]


def check_out(config: SFTScriptConfig) -> tuple[Path, bool]:
    """The output folder, and whether an old run there is to be cleared (--overwrite)."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: exists and is not a folder")
    if config.resume is None and out.is_dir() and any(out.iterdir()):
        if not config.overwrite:
            held = [name for name in RUN_FILES if (out / name).exists()]
            what = f"another run ({', '.join(held)})" if held else "other files"
            raise RunError(f"--out {out}: holds {what}; pass --overwrite to replace it or "
                           "--resume to continue it")
        return out, True
    return out, False


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


def _losses(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [{"step": entry["step"], "loss": entry["loss"]} for entry in log_history
            if "loss" in entry and "step" in entry]


def _plot(losses: list[dict[str, float]], path: Path) -> bool:
    if not losses or importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")  # headless: no display on a training box
    from matplotlib import pyplot  # type: ignore[import-not-found,unused-ignore]

    figure, axes = pyplot.subplots(figsize=(6, 4))
    axes.plot([item["step"] for item in losses], [item["loss"] for item in losses])
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return True


def _write_card(out: Path, mixture: Mixture, config: SFTScriptConfig) -> None:
    card = {"model": config.model, "max_length": config.max_length, "seed": config.seed,
            "rows": len(mixture.rows), "skipped": mixture.skipped, "dropped": mixture.dropped,
            "files": [file.to_dict() for file in mixture.cards]}
    (out / "data_card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def run_sft(config: SFTScriptConfig, callbacks: list[Any] | None = None) -> SFTResult:
    """Check everything that can be checked cheaply, then train and write the output folder."""
    out, clear = check_out(config)
    resume = resume_point(config, out)
    sources = scan(config.data)
    tokenizer = load_tokenizer(config.model)
    mixture = build(sources, tokenizer, config.max_length, config.seed)
    if not mixture.rows:
        raise RunError(f"no rows to train on ({mixture.skipped} skipped, {mixture.dropped} "
                       "dropped; see the counts with smaller inputs)")
    arguments = sft_arguments(config, out / CHECKPOINTS)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    try:
        args = SFTConfig(**arguments)
    except (ValueError, TypeError) as error:  # e.g. save_strategy: sometimes
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise RunError(f"sft: TRL refuses the settings ({first})") from None
    if clear:  # only now that the new run can start: a failed start loses nothing
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    resolved = config.to_dict() | {"sft": {key: value for key, value in arguments.items()
                                            if key not in ("output_dir", "max_length", "seed")}}
    (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False), encoding="utf-8")
    _write_card(out, mixture, config)

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
    result = trainer.train(resume_from_checkpoint=resume)
    trained: Any = trainer.model
    if config.merge:
        trained = trained.merge_and_unload()
    trained.save_pretrained(out)
    tokenizer.save_pretrained(out)

    losses = _losses(trainer.state.log_history)
    summary = {
        "global_step": trainer.state.global_step,
        "resumed_from": resume,
        "training_loss": result.training_loss,
        "losses": losses,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "rows": len(mixture.rows),
        "records_skipped": mixture.skipped,
        "records_dropped": mixture.dropped,
        "saved": "merged model" if config.merge else "adapter" if config.lora else "model",
    }
    summary["loss_curve"] = "loss_curve.png" if _plot(losses, out / "loss_curve.png") else None
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n",
                                               encoding="utf-8")
    return SFTResult(out, trainer.state.global_step, summary)
