"""SFT throughput of ``guardrail train sft``'s stack (TRL's SFTTrainer, peft LoRA) on one device.

A random-weight model of real shape (default: Qwen2.5-1.5B's config, the shape of
DeepSeek-R1-Distill-Qwen-1.5B) trains on random token rows, a prompt and a completion each,
the loss on the completion only, as the command trains; LoRA (every linear layer) and full
fine-tuning, each in a fresh process so that its peak memory is its own. Reported per mode:
trained tokens per second over the timed steps (after the warm-up ones), peak memory
(``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on the CPU) and the
device's name.

    python -m benchmarks.train_throughput --device cuda                 # 1.5B, bf16
    python -m benchmarks.train_throughput --device cuda --gradient-checkpointing --seq-len 8192
    python -m benchmarks.train_throughput --device cpu --config-size tiny --steps 3   # smoke
    ... --results benchmarks/RESULTS.md      # also append the rows to that file

No figure is invented: a mode that fails (out of memory, say) is reported as failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Qwen2.5-1.5B (= DeepSeek-R1-Distill-Qwen-1.5B's architecture); tiny: a CPU smoke run.
SHAPES: dict[str, dict[str, Any]] = {
    "1.5b": {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960,
             "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
             "max_position_embeddings": 32768, "rope_theta": 1000000.0,
             "tie_word_embeddings": True},
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 2048, "tie_word_embeddings": False},
}
MODES = ("lora", "full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--device", default="auto",
                        help="cuda, cuda:N or cpu (auto: cuda where there is one)")
    parser.add_argument("--config-size", choices=sorted(SHAPES), default="1.5b")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated: lora, full")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per row")
    parser.add_argument("--prompt-len", type=int, default=256,
                        help="tokens of each row without loss (the prompt)")
    parser.add_argument("--batch", type=int, default=4, help="per-device batch size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 on a GPU that has it, fp32 otherwise")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass (less memory)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--results", type=Path,
                        help="append the rows to this Markdown file (benchmarks/RESULTS.md)")
    parser.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if not 0 < args.prompt_len < args.seq_len:
        parser.error("--prompt-len must be between 0 and --seq-len")
    return args


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {choice}: torch sees no CUDA device here")
    return choice


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return str(torch.cuda.get_device_name(torch.device(device)))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer only for its pad/EOS ids: the rows are token ids already."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, vocab_size)}}
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<pad>")),
        pad_token="<pad>", eos_token="<eos>")
    return fast


def _rows(count: int, args: argparse.Namespace, vocab_size: int) -> list[dict[str, list[int]]]:
    """Random token rows in TRL's tokenized prompt-completion form."""
    import torch

    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(2, vocab_size, (args.seq_len,), generator=generator).tolist()
        mask = [0] * args.prompt_len + [1] * (args.seq_len - args.prompt_len)
        rows.append({"input_ids": ids, "completion_mask": mask})
    return rows


def measure(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One mode in this process: build, train warm-up + timed steps, report."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Qwen2Config, TrainerCallback
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    device = _device(args.device)
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(torch.device(device))
    bf16 = args.precision == "bf16" or (args.precision == "auto" and on_gpu
                                        and torch.cuda.is_bf16_supported())
    shape = SHAPES[args.config_size]
    torch.manual_seed(0)
    config = Qwen2Config(**shape, bos_token_id=None, eos_token_id=1, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
        config, dtype=torch.bfloat16 if bf16 and mode == "lora" else torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    warmup, total_steps = args.warmup, args.warmup + args.steps

    class Clock(TrainerCallback):
        """Wall time of the timed steps, the device synchronised at each edge."""

        def __init__(self) -> None:
            self.start = 0.0
            self.seconds = 0.0

        def _sync(self) -> None:
            if on_gpu:
                torch.cuda.synchronize()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == warmup:
                self._sync()
                self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == total_steps:
                self._sync()
                self.seconds = time.perf_counter() - self.start

    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    clock = Clock()
    with tempfile.TemporaryDirectory() as scratch:
        sft_args = SFTConfig(
            output_dir=scratch, max_steps=total_steps, per_device_train_batch_size=args.batch,
            learning_rate=1e-5, bf16=bf16, use_cpu=not on_gpu, report_to="none",
            save_strategy="no", logging_steps=total_steps, disable_tqdm=True,
            gradient_checkpointing=args.gradient_checkpointing,
            activation_checkpointing=args.gradient_checkpointing,
            max_length=args.seq_len, dataloader_num_workers=0, seed=0)
        rows = _rows(args.batch * total_steps, args, shape["vocab_size"])
        trainer = SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_list(rows),
                             processing_class=_tokenizer(shape["vocab_size"]),
                             peft_config=peft_config, callbacks=[clock])
        trained: Any = trainer.model
        trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    tokens = args.steps * args.batch * args.seq_len
    peak = (torch.cuda.max_memory_allocated() if on_gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"mode": mode, "device": _device_name(device), "config": args.config_size,
            "parameters": parameters, "trainable": trainable,
            "precision": "bf16" if bf16 else "fp32", "seq_len": args.seq_len,
            "batch": args.batch, "steps": args.steps,
            "gradient_checkpointing": args.gradient_checkpointing,
            "tokens_per_s": tokens / clock.seconds if clock.seconds else None,
            "peak_memory_gib": peak / 2**30,
            "peak_memory_kind": "max_memory_allocated" if on_gpu else "peak RSS"}


def _child(mode: str, argv: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", *argv,
                           "--one", mode], capture_output=True, text=True, check=False)
    last = done.stdout.strip().splitlines()[-1:] if done.stdout.strip() else []
    if done.returncode != 0 or not last:
        error = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"mode": mode, "failed": error[:200]}
    result: dict[str, Any] = json.loads(last[0])
    return result


def _row(result: dict[str, Any], when: str) -> str:
    if "failed" in result:
        return f"| {when} | {result['mode']} | failed: {result['failed']} | | | | | | | |"
    speed = result["tokens_per_s"]
    model = (f"{result['config']} ({result['parameters'] / 1e6:,.1f} M parameters, "
             f"{result['trainable'] / 1e6:,.2f} M trained)")
    return (f"| {when} | {result['mode']} | {result['device']} | {model} "
            f"| {result['precision']} | {result['seq_len']} x {result['batch']} "
            f"| {'on' if result['gradient_checkpointing'] else 'off'} | {result['steps']} "
            f"| {f'{speed:,.0f}' if speed else 'n/a'} "
            f"| {result['peak_memory_gib']:.2f} ({result['peak_memory_kind']}) |")


SECTION = "## train_throughput.py: SFT tokens per second and peak memory"
HEADER = ("| date | mode | device | model | precision | seq x batch | grad. ckpt | timed steps "
          "| tokens/s | peak memory GiB |\n|---|---|---|---|---|---|---|---|---|---|")


def append_rows(path: Path, rows: list[str]) -> None:
    """The rows at the end of this benchmark's table in ``path`` (the section is made if the
    file has none), so that later sections of the file stay where they are."""
    text = path.read_text("utf-8") if path.exists() else ""
    lines = text.splitlines()
    if SECTION not in lines:
        lines += ["", SECTION, "", *HEADER.splitlines()]
    at = lines.index(SECTION) + 1
    while at < len(lines) and not lines[at].startswith("|"):
        at += 1  # the section's prose, up to its table
    while at < len(lines) and lines[at].startswith("|"):
        at += 1  # the table's rows
    lines[at:at] = rows
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    if args.one:
        import torch

        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
        print(json.dumps(measure(args.one, args)), flush=True)
        return 0
    child_argv = [item for item in raw if item != "--results"
                  and (args.results is None or item != str(args.results))]
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    results = []
    for mode in [item.strip() for item in args.modes.split(",") if item.strip()]:
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown mode {mode!r} (lora, full)")
        result = _child(mode, child_argv)
        print(json.dumps(result), flush=True)
        results.append(result)
    rows = [_row(result, when) for result in results]
    print(HEADER)
    print("\n".join(rows))
    if args.results is not None:
        append_rows(args.results, rows)
    return 0 if all("failed" not in result for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
