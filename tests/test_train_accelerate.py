"""The many-GPU path of ``guardrail train``: every shipped accelerate config read by accelerate's
own loader and launch validation (a typo fails here, not on a rented cluster), and SFT run for
real by ``accelerate launch`` in two CPU processes (gloo) with the shipped DDP config."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("accelerate")

import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from safetensors.torch import load_file
from transformers import AutoTokenizer

from offline.harvest.records import UnsafeChainRecord
from offline.train import run_folder
from tests.tiny_models import CORPUS, R1, RECORD, build_model, build_tokenizer

ROOT = Path(__file__).parents[1]
CONFIGS = ROOT / "offline" / "train" / "accelerate"
SHIPPED = {"multi_gpu.yaml": "MULTI_GPU", "zero2.yaml": "DEEPSPEED", "zero3.yaml": "DEEPSPEED",
           "fsdp.yaml": "FSDP"}
# What each deepspeed_config value may be (accelerate's launch help; its parser has no choices).
DEEPSPEED_VALUES: dict[str, tuple[Any, ...]] = {
    "zero_stage": (0, 1, 2, 3), "offload_optimizer_device": ("none", "cpu", "nvme"),
    "offload_param_device": ("none", "cpu", "nvme"), "zero3_init_flag": (True, False),
    "zero3_save_16bit_model": (True, False), "deepspeed_multinode_launcher": (
        "pdsh", "standard", "openmpi", "mvapich", "mpich", "nossh", "slurm")}


def launch_problems(path: Path) -> list[str]:
    """What accelerate would ignore or refuse in a config: the loader checks top-level keys;
    the nested ones become ``accelerate launch`` options, where a misspelt key is silently
    ignored, so each must name one; then the launch validation and the plugin's own reading."""
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    parser = launch_command_parser()
    options = {action.dest for action in parser._actions}
    problems = []
    for key in config.fsdp_config:
        name = key if key.startswith("fsdp") else f"fsdp_{key}"
        if name not in options:
            problems.append(f"fsdp_config.{key}: not an accelerate launch option")
    for key, value in config.deepspeed_config.items():
        if key not in options:
            problems.append(f"deepspeed_config.{key}: not an accelerate launch option")
        elif key in DEEPSPEED_VALUES and value not in DEEPSPEED_VALUES[key]:
            problems.append(f"deepspeed_config.{key}: {value!r} is not one of "
                            f"{DEEPSPEED_VALUES[key]}")
    if problems:
        return problems
    args, defaults, _ = _validate_launch_command(
        parser.parse_args(["--config_file", str(path), "-m", "guardrail.cli", "train"]))
    if args.use_fsdp:  # the environment the processes get, read back by accelerate's plugin
        env = prepare_multi_gpu_env(args)
        with patch_environment(**{k: v for k, v in env.items()
                                  if k.startswith(("FSDP_", "ACCELERATE_"))}):
            plugin = FullyShardedDataParallelPlugin()
        if "FULL_STATE_DICT" not in str(plugin.state_dict_type):
            problems.append("FSDP without FULL_STATE_DICT: the trained model is not saved whole")
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
        stage = env["ACCELERATE_DEEPSPEED_ZERO_STAGE"]
        gathers = env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false").lower()
        if stage == "3" and gathers != "true":
            problems.append("ZeRO-3 without zero3_save_16bit_model: the model is saved as shards")
    return problems


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_config_is_read_by_accelerate(name: str) -> None:
    path = CONFIGS / name
    assert str(load_config_from_file(str(path)).distributed_type).endswith(SHIPPED[name])
    assert launch_problems(path) == []


def test_the_shipped_configs_are_all_tested() -> None:
    assert sorted(item.name for item in CONFIGS.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize(("edit", "expected"), [
    (("fsdp.yaml", "fsdp_state_dict_type", "fsdp_state_dict_typ"), "not an accelerate launch"),
    (("fsdp.yaml", "FULL_STATE_DICT", "SHARDED_STATE_DICT"), "not saved whole"),
    (("zero3.yaml", "zero3_save_16bit_model: true", "zero3_save_16bit_model: false"),
     "saved as shards"),
    (("zero2.yaml", "offload_param_device: none", "offload_param_device: gpu"), "not one of"),
    (("multi_gpu.yaml", "num_processes: 8", "num_processs: 8"), "unknown keys"),
])
def test_a_typo_in_a_config_is_caught(edit: tuple[str, str, str], expected: str,
                                      tmp_path: Path) -> None:
    name, old, new = edit
    text = (CONFIGS / name).read_text("utf-8")
    assert old in text
    broken = tmp_path / name
    broken.write_text(text.replace(old, new), "utf-8")
    try:
        problems = launch_problems(broken)
    except ValueError as error:  # the loader's own refusal of an unknown top-level key
        problems = [str(error)]
    assert any(expected in problem for problem in problems), problems


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_sft_trains_in_two_processes_under_accelerate_launch(tmp_path: Path) -> None:
    """The shipped DDP config, two processes on the CPU (gloo), the README's command."""
    torch.set_num_threads(1)
    model = tmp_path / "model"
    model.mkdir()
    build_model(build_tokenizer(R1, model), model)
    data = tmp_path / "unsafechain.jsonl"
    records = [RECORD, UnsafeChainRecord.build(prompt=CORPUS[4], reasoning=CORPUS[1],
                                               answer=CORPUS[3])]
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in records), "utf-8")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(CONFIGS / "multi_gpu.yaml"), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", str(_free_port()),
               "-m", "guardrail.cli", "train", "sft", "--data", str(data), "--model", str(model),
               "--out", str(out), "--sft", "max_steps=2", "--sft", "per_device_train_batch_size=1",
               "--sft", "learning_rate=1e-3", "--sft", "use_cpu=true", "--sft", "disable_tqdm=true",
               "--sft", "ddp_find_unused_parameters=false"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                        "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert log.count("guardrail train sft: 2 steps on 2 rows") == 1, log[-4000:]  # one report

    summary = json.loads((out / run_folder.SUMMARY).read_text("utf-8"))
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    # One row per process per step: each step saw both rows, so both processes trained.
    tokenizer = AutoTokenizer.from_pretrained(model)
    card = json.loads((out / run_folder.CARD).read_text("utf-8"))
    assert card["rows"] == 2
    from offline.train.mixture import build, scan

    rows = build(scan([str(data)]), tokenizer, max_length=8192, seed=0).rows
    lengths = [len(tokenizer(text=r["prompt"] + r["completion"])["input_ids"]) for r in rows]
    assert summary["tokens_seen"] == 2 * sum(lengths)

    before, after = load_file(str(model / "model.safetensors")), load_file(
        str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    assert [name for name in before if torch.equal(before[name], after[name])] == []
    # One output folder, written once: our files are created exclusively (a second writer
    # would have failed its process), and nothing was written beside it.
    assert sorted(item.name for item in tmp_path.iterdir()) == ["model", "out",
                                                                "unsafechain.jsonl"]
    for name in (run_folder.CONFIG, run_folder.CARD, run_folder.SUMMARY, run_folder.CURVE):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
