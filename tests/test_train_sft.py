"""``guardrail train sft`` end to end on a tiny R1-Distill tokenizer (real template) and a random
Qwen2 (tests/tiny_models.py): a few CPU steps each, through ``main(argv)`` as the CLI runs it."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from offline.harvest.records import UnsafeChainRecord
from offline.train.command import main, run
from offline.train.mixture import DataError, build, scan
from offline.train.sft import run_sft
from offline.train.sft_config import ConfigError, read_yaml, resolve
from tests.tiny_models import CORPUS, R1, RECORD, build_model, build_tokenizer

FAST = ["--sft", "max_steps=2", "--sft", "per_device_train_batch_size=2",
        "--sft", "learning_rate=1e-3", "--sft", "use_cpu=true", "--sft", "disable_tqdm=true"]
LONG = UnsafeChainRecord.build(prompt=CORPUS[0], reasoning=" ".join(CORPUS * 20),
                               answer=CORPUS[3])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny-r1")
    build_model(build_tokenizer(R1, folder), folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "unsafechain.jsonl"
    rows = [RECORD, UnsafeChainRecord.build(prompt=CORPUS[4], reasoning=CORPUS[1],
                                            answer=CORPUS[3])]
    path.write_text("".join(json.dumps(row.to_dict()) + "\n" for row in rows), encoding="utf-8")
    return path


def scan_rows(path: Path, tokenizer: Any) -> list[dict[str, str]]:
    return build(scan([str(path)]), tokenizer, max_length=8192, seed=0).rows


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def summary(out: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((out / "training_summary.json").read_text("utf-8"))
    return loaded


def test_full_sft_changes_every_weight_and_writes_the_run(model_dir: Path, data: Path,
                                                          tmp_path: Path) -> None:
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"seed": 3, "max_length": 512,
                                      "sft": {"learning_rate": "1e-9", "warmup_steps": 0}}))
    out = tmp_path / "out"
    assert main(["sft", "--config", str(config), "--data", str(data), "--model", str(model_dir),
                 "--out", str(out), *FAST]) == 0
    before, after = weights(model_dir), weights(out)
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged  # the command line's learning_rate (1e-3) beat the YAML's 1e-9
    resolved = read_yaml(out / "config.yaml")
    assert (resolved["seed"], resolved["max_length"], resolved["lora"]) == (3, 512, False)
    assert resolved["sft"]["learning_rate"] == 1e-3 and resolved["sft"]["warmup_steps"] == 0
    run = summary(out)
    assert run["global_step"] == 2 and [item["step"] for item in run["losses"]] == [1, 2]
    assert run["records_dropped"] == 0 and run["saved"] == "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(tokenizer(text=row["prompt"] + row["completion"])["input_ids"])
               for row in scan_rows(data, tokenizer)]
    assert run["tokens_seen"] == 2 * sum(lengths)  # two steps of both rows, padding not counted
    card = json.loads((out / "data_card.json").read_text("utf-8"))
    assert card["files"][0] | {"path": ""} == {
        "path": "", "ratio": 1.0, "form": "unsafechain", "rows": 2, "kept": 2, "used": 2,
        "skipped": {}, "dropped": {}}
    assert AutoTokenizer.from_pretrained(out).chat_template
    if importlib.util.find_spec("matplotlib") is None:  # the curve is optional, and says so
        assert run["loss_curve"] is None and not (out / "loss_curve.png").exists()
    else:
        assert run["loss_curve"] == "loss_curve.png"
        assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mixture_ratios_and_prompt_completion_rows(model_dir: Path, data: Path,
                                                   tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ready = tmp_path / "ready"
    ready.mkdir()
    rows = [{"prompt": f"p{i}", "completion": f"c{i}</s>"} for i in range(10)]
    (ready / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), "utf-8")
    sources = scan([f"{data}:3", f"{ready}:0.5"])
    assert [form for _, form in sources] == ["unsafechain", "prompt-completion"]
    first = build(sources, tokenizer, max_length=512, seed=1)
    assert [card.used for card in first.cards] == [6, 5] and len(first.rows) == 11
    assert all(row in rows for row in first.rows if row["prompt"].startswith("p"))
    again = build(sources, tokenizer, max_length=512, seed=1)
    assert again.rows == first.rows  # seeded
    with pytest.raises(DataError, match="ratio must be a finite number >= 0"):
        scan([f"{data}:-1"])


def test_same_seed_same_weights(model_dir: Path, data: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["sft", "--data", f"{data}:1.5", "--model", str(model_dir), "--out",
                     str(out), "--seed", "7", *FAST]) == 0
        runs.append(weights(out))
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])


class Snapshot(TrainerCallback):
    """The trainer's parameters as training starts and as it ends."""

    def __init__(self) -> None:
        self.begin: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}

    def _take(self, model: Any) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begin = self._take(kwargs["model"])

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.end = self._take(kwargs["model"])


def test_lora_changes_every_lora_weight_and_no_base_weight(model_dir: Path, data: Path,
                                                          tmp_path: Path) -> None:
    config = resolve({}, {"data": [str(data)], "model": str(model_dir), "out": str(tmp_path),
                          "lora": True, "lora_r": 4,
                          "sft": {"max_steps": 2, "learning_rate": 1e-3, "use_cpu": True,
                                  "per_device_train_batch_size": 2, "disable_tqdm": True}})
    snapshot = Snapshot()
    result = run_sft(config, callbacks=[snapshot])
    assert result.global_step == 2
    lora = [name for name in snapshot.begin if "lora_" in name]
    base = [name for name in snapshot.begin if "lora_" not in name]
    assert lora and base
    assert [n for n in lora if torch.equal(snapshot.begin[n], snapshot.end[n])] == []
    assert [n for n in base if not torch.equal(snapshot.begin[n], snapshot.end[n])] == []
    assert (tmp_path / "adapter_config.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert summary(tmp_path)["saved"] == "adapter"


def test_merge_writes_a_model_that_loads_and_generates(model_dir: Path, data: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "merged"
    # Without use_cpu or a precision flag, as the README's command: a machine without a bf16 GPU
    # trains in fp32 (TRL's bf16 default refused to start here).
    as_written = FAST[:6] + FAST[8:]
    assert "use_cpu=true" not in as_written and "--sft" not in as_written[-1:]
    assert main(["sft", "--data", f"{data}:2", "--model", str(model_dir), "--out", str(out),
                 "--lora", "--merge", "--lora-r", "4", *as_written]) == 0
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert f"bf16: {str(bf16).lower()}" in (out / "config.yaml").read_text()
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    prompt = tokenizer(text="How do I pick a lock", return_tensors="pt")
    generated = merged.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 3
    changed = weights(out)
    assert any(not torch.equal(weights(model_dir)[n], changed[n]) for n in changed)
    assert summary(out)["rows"] == 4  # ratio 2.0 repeats both records


def test_resume_continues_from_the_saved_step(model_dir: Path, data: Path,
                                              tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ["sft", "--data", str(data), "--model", str(model_dir), "--out", str(out), *FAST]
    assert main(common) == 0
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    assert main([*common, "--resume", "--sft", "max_steps=3"]) == 0
    run = summary(out)
    assert run["global_step"] == 3 > 2
    assert run["resumed_from"].endswith("checkpoint-2")
    assert [item["step"] for item in run["losses"]] == [1, 2, 3]


def test_over_long_record_is_dropped_and_counted(model_dir: Path, data: Path,
                                                 tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(data.read_text("utf-8") + json.dumps(LONG.to_dict()) + "\n"
                     + '{"prompt": "x"}\nnot json\n', encoding="utf-8")
    out = tmp_path / "out"
    assert main(["sft", "--data", str(mixed), "--model", str(model_dir), "--out", str(out),
                 "--max-length", "256", *FAST]) == 0
    run = summary(out)
    assert (run["records_dropped"], run["records_skipped"], run["rows"]) == (1, 2, 2)
    card = json.loads((out / "data_card.json").read_text("utf-8"))["files"][0]
    assert card["dropped"] == {"longer than max_length (256 tokens)": 1}
    assert sum(card["skipped"].values()) == 2 and card["rows"] == 5


def test_yaml_then_command_line(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": "m", "data": ["a.jsonl"], "seed": 3, "lora_r": 4,
                                      "sft": {"learning_rate": "1e-5", "warmup_steps": 2}}))
    resolved = resolve(read_yaml(config), {"out": "o", "seed": 5,
                                           "sft": {"learning_rate": 2e-4}})
    assert (resolved.model, resolved.seed, resolved.lora_r, resolved.out) == ("m", 5, 4, "o")
    assert resolved.sft == {"learning_rate": 2e-4, "warmup_steps": 2}
    assert resolve(read_yaml(config), {"out": "o"}).sft["learning_rate"] == 1e-5
    with pytest.raises(ConfigError, match=r"sft\.max_length: set it as 'max_length'"):
        resolve({"sft": {"max_length": 10}}, {"out": "o", "model": "m", "data": ["a"]})


def _no_weights(model_dir: Path, folder: Path, template: bool = True) -> Path:
    """The tokenizer of the tiny model next to weights that cannot load: an error that comes
    after a weights load would be a traceback, not the expected line."""
    for name in os.listdir(model_dir):
        shutil.copy(model_dir / name, folder / name)
    (folder / "model.safetensors").write_bytes(b"not weights")
    if not template:
        (folder / "chat_template.jinja").unlink()
        settings = json.loads((folder / "tokenizer_config.json").read_text("utf-8"))
        settings.pop("chat_template", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return folder


@pytest.mark.parametrize("case", ["wrong-data", "no-template", "unknown-key", "unknown-sft-key",
                                  "taken-out", "merge-without-lora", "missing-file", "bad-type",
                                  "trl-refuses", "all-too-long", "bad-ratio"])
def test_bad_input_is_one_line_before_any_weights_load(
        case: str, model_dir: Path, data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model").mkdir()
    model = _no_weights(model_dir, tmp_path / "model", template=case != "no-template")
    out = tmp_path / "out"
    argv = ["sft", "--data", str(data), "--model", str(model), "--out", str(out)]
    expected = {
        "wrong-data": "neither UnsafeChain fields (prompt, response) nor prompt/completion",
        "no-template": "the tokenizer has no chat template",
        "unknown-key": "unknown key 'lora_rank'",
        "unknown-sft-key": "unknown SFTConfig key 'learning_rat'",
        "taken-out": "holds another run (training_summary.json); pass --overwrite",
        "merge-without-lora": "--merge merges a LoRA adapter: it needs --lora",
        "missing-file": "nope.jsonl: no such file or folder",
        "bad-type": "seed: expected int, not 'ten'",
        "trl-refuses": "sft: TRL refuses the settings",
        "all-too-long": "no rows to train on (0 skipped, 2 dropped as longer than max_length 8)",
        "bad-ratio": "the ratio must be a finite number >= 0, not -1.0",
    }[case]
    if case == "wrong-data":
        (tmp_path / "chat.jsonl").write_text('{"messages": []}\n', encoding="utf-8")
        argv[2] = str(tmp_path / "chat.jsonl")
    elif case == "unknown-key":
        (tmp_path / "c.yaml").write_text("lora_rank: 8\n", encoding="utf-8")
        argv += ["--config", str(tmp_path / "c.yaml")]
    elif case == "unknown-sft-key":
        argv += ["--sft", "learning_rat=1e-5"]
    elif case == "taken-out":
        out.mkdir()
        (out / "training_summary.json").write_text("{}", encoding="utf-8")
    elif case == "merge-without-lora":
        argv.append("--merge")
    elif case == "bad-type":
        (tmp_path / "c.yaml").write_text("seed: ten\n", encoding="utf-8")
        argv += ["--config", str(tmp_path / "c.yaml")]
    elif case == "trl-refuses":
        argv += ["--sft", "save_strategy=sometimes"]
    elif case == "missing-file":
        argv[2] = str(tmp_path / "nope.jsonl")
    elif case == "all-too-long":
        argv += ["--max-length", "8"]
    elif case == "bad-ratio":
        argv[2] = f"{data}:-1"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("guardrail train sft: error: ") and expected in err, err
    if case == "taken-out":  # --overwrite clears the old run only once the new one can start
        assert main([*argv, "--overwrite", "--data", str(tmp_path / "nope.jsonl")]) == 2
        assert (out / "training_summary.json").exists()


def test_the_train_entry_point_registers_sft() -> None:
    """pyproject.toml's entry point, loaded as guardrail/cli.py loads it (an install made before
    it landed does not list it yet, so it is read from the file here)."""
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text("utf-8"))
    value = project["project"]["entry-points"]["guardrail.commands"]["train"]
    register = EntryPoint("train", value, "guardrail.commands").load()
    parser = argparse.ArgumentParser(prog="guardrail")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", "sft", "--data", "a.jsonl:0.5", "--lora"])
    assert args.handler is run and args.data == ["a.jsonl:0.5"] and args.lora is True
