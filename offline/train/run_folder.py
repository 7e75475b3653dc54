"""The output folder of a training run, the same for ``guardrail train sft`` and ``dpo``.

It holds the model (or the LoRA adapter, or with ``merge`` the merged model) and tokenizer at
its root, ``checkpoints/``, ``config.yaml`` (the resolved config), ``data_card.json`` (what the
run trained on: per file, rows read, kept, used, skipped and dropped with reasons),
``training_summary.json`` (steps, losses, tokens, rows, world size) and ``loss_curve.png``
where matplotlib is installed.

Under ``accelerate launch`` every process runs the same command. Every process checks the
input; the main process alone clears the folder and writes our files, between barriers, so
that no process sees another's half-written run; the weights are saved by
``Trainer.save_model`` on every process, which gathers FSDP / ZeRO-3 shards and writes on the
main process only. Our files are created exclusively (``open(..., "x")``): a second writer is
an error, not a silent overwrite.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from offline.train.errors import TrainInputError

CHECKPOINTS = "checkpoints"
CONFIG = "config.yaml"
CARD = "data_card.json"
SUMMARY = "training_summary.json"
CURVE = "loss_curve.png"
ADAPTER = "adapter"
RUN_FILES = (SUMMARY, CONFIG, CARD, CHECKPOINTS)


class RunError(TrainInputError):
    """A run that cannot start (output folder, model folder, checkpoint); one line."""


def check_out(out: Path, *, overwrite: bool, resume: bool, inputs: Sequence[Path],
              resumable: bool = True) -> bool:
    """Whether an old run in ``out`` is to be cleared; raises where the run must not start.

    ``inputs`` (the model folder, the data files) must not lie inside a folder that
    ``--overwrite`` would delete."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out}: exists and is not a folder")
    # Folders without a file hold nothing: the trainer makes ``checkpoints/`` when it is built.
    if resume or not out.is_dir() or not any(item.is_file() for item in out.rglob("*")):
        return False
    if not overwrite:
        held = [name for name in RUN_FILES if (out / name).exists()]
        what = f"another run ({', '.join(held)})" if held else "other files"
        hint = " or --resume to continue it" if resumable and held else ""
        raise RunError(f"--out {out}: holds {what}; pass --overwrite to replace it{hint}")
    for held_input in inputs:
        if held_input.exists() and held_input.resolve().is_relative_to(out.resolve()):
            raise RunError(f"--out {out}: holds the input {held_input}, which --overwrite "
                           "would delete; choose another folder")
    return True


def is_main() -> bool:
    """The process that writes (global rank 0); call once the trainer's arguments exist."""
    from accelerate import PartialState

    return bool(PartialState().is_main_process)


def barrier() -> None:
    """Every process waits here for the others (a no-op in a single process)."""
    from accelerate import PartialState

    PartialState().wait_for_everyone()


def leave_process_group() -> None:
    """End a multi-process run cleanly: every rank waits, then the process group is destroyed.
    Without it gloo's threads can still be running at interpreter exit and abort a rank
    ("terminate called without an active exception") after its work was done."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()


def open_out(out: Path, *, clear: bool, resume: bool) -> None:
    """Make ``out`` ready on the main process, once every process has checked the input.

    ``clear``: delete the old run (``--overwrite``). ``resume``: keep the checkpoints, but our
    own files are written afresh for the continued run."""
    barrier()
    if is_main():
        if clear:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            for name in (CONFIG, CARD, SUMMARY, CURVE):
                (out / name).unlink(missing_ok=True)
    barrier()


def write_new(path: Path, text: str) -> None:
    """Create ``path`` with ``text``; it must not exist (one writer per file)."""
    with path.open("x", encoding="utf-8") as handle:
        handle.write(text)


def write_config(out: Path, resolved: dict[str, Any]) -> None:
    if is_main():
        write_new(out / CONFIG, yaml.safe_dump(resolved, sort_keys=False))


def write_card(out: Path, card: dict[str, Any]) -> None:
    if is_main():
        write_new(out / CARD, json.dumps(card, indent=2) + "\n")


def losses(log_history: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [{"step": int(entry["step"]), "loss": float(entry["loss"])} for entry in log_history
            if "loss" in entry and "step" in entry]


def plot(points: list[dict[str, float]], path: Path) -> bool:
    """The loss curve as a PNG, where matplotlib is installed (it is optional)."""
    if not points or importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")  # headless: no display on a training box
    from matplotlib import pyplot  # type: ignore[import-not-found,unused-ignore]

    figure, axes = pyplot.subplots(figsize=(6, 4))
    axes.plot([item["step"] for item in points], [item["loss"] for item in points])
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    figure.tight_layout()
    with path.open("xb") as handle:
        figure.savefig(handle, format="png")
    pyplot.close(figure)
    return True


def check_saveable(trainer: Any) -> None:
    """Refuse, before training, a sharded setup whose weights ``save_model`` would not write:
    FSDP saves a loadable model only with a full state dict, ZeRO-3 only when it gathers the
    16-bit weights (``zero3_save_16bit_model: true`` in the accelerate config)."""
    if trainer.is_fsdp_enabled:
        kind = str(trainer.accelerator.state.fsdp_plugin.state_dict_type)
        if "FULL_STATE_DICT" not in kind:
            raise RunError(f"FSDP state_dict_type {kind}: the trained model would not be "
                           "saved whole; set fsdp_state_dict_type: FULL_STATE_DICT")
    if trainer.is_deepspeed_enabled:
        settings = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
        zero = settings.get("zero_optimization", {})
        if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
            raise RunError("DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save "
                           "would save shards, not a model; set zero3_save_16bit_model: true")


def save(trainer: Any, out: Path, *, lora: bool, merge: bool, base: str = "") -> str:
    """Save what was trained; every process calls this. Returns what was saved.

    ``merge``: the adapter goes to ``out/adapter``, then the main process loads it on the base
    model (``base``, as trained) from disk, merges and saves the whole model at the root. Going
    through the disk works the same under FSDP and ZeRO-3, where the live model is sharded."""
    if not merge:
        trainer.save_model(str(out))  # gathers shards; writes on the main process only
        return "adapter" if lora else "model"
    trainer.save_model(str(out / ADAPTER))
    barrier()
    if is_main():
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        with warnings.catch_warnings():
            # peft 0.21 reads transformers 5's deprecated alias while wrapping: not ours.
            warnings.filterwarnings("ignore", category=FutureWarning,
                                    message="`is_gradient_checkpointing` is deprecated")
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
                                              str(out / ADAPTER))
            merged = model.merge_and_unload()
        merged.save_pretrained(str(out))
        trainer.processing_class.save_pretrained(str(out))
    barrier()
    return "merged model"


def finish(out: Path, trainer: Any, result: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The training summary (written by the main process); every process returns it."""
    points = losses(trainer.state.log_history)
    summary: dict[str, Any] = {
        "global_step": int(trainer.state.global_step),
        "training_loss": float(result.training_loss),
        "losses": points,
        "tokens_seen": int(trainer.state.num_input_tokens_seen),
        "world_size": int(trainer.args.world_size),
        **extra,
    }
    summary["loss_curve"] = None
    if is_main():
        summary["loss_curve"] = CURVE if plot(points, out / CURVE) else None
        write_new(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    return summary
