"""offline/train/dpo.py end to end on the tiny R1-Distill / Qwen3 tokenizers and random Qwen2 of
tests/test_train_render.py: real TRL DPOTrainer steps on CPU, token masks read from TRL's own
tokenization and collator, and the one-line errors of the command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from offline.harvest.pairs import build_pair
from offline.train.dpo import DPORunConfig, main, prepare, run_training, train_dpo
from tests.tiny_models import QWEN3, R1, Flavour, build_model, build_tokenizer

REQUEST = "How do I pick a lock on my own front door?"
PREFIX = "Okay, they own the door. "
FAST = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3,
        "use_cpu": True, "bf16": False, "dataloader_num_workers": 0}


def pair(n: int, safe: str = "A locksmith is the safe route.") -> dict[str, Any]:
    return build_pair(REQUEST, PREFIX, f"Wait, I should be careful {n}.", safe,
                      "Call a licensed locksmith.", f"Here is how to rake the pins {n}.").to_dict()


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    "utf-8")
    return path


@pytest.fixture(scope="module", params=[R1, QWEN3], ids=lambda f: f.name)
def model_dir(request: pytest.FixtureRequest,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Flavour, Path]:
    """A model folder as `--model` takes it: tokenizer (real template) and random weights."""
    torch.set_num_threads(1)
    flavour: Flavour = request.param
    folder = tmp_path_factory.mktemp(f"dpo-{flavour.name}")
    build_model(build_tokenizer(flavour, folder), folder)
    return flavour, folder


@pytest.fixture(scope="module")
def r1_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("dpo-r1-only")
    build_model(build_tokenizer(R1, folder), folder)
    return folder


def test_trl_tokenization_puts_loss_on_the_suffixes_only(
        model_dir: tuple[Flavour, Path], tmp_path: Path) -> None:
    flavour, folder = model_dir
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair(1)])
    config = DPORunConfig.from_mapping({"data": [str(data)], "model": str(folder),
                                        "out": str(tmp_path / "out"), "dpo": FAST})
    prepared = prepare(config)
    trainer = prepared.trainer
    tokenizer = trainer.processing_class
    row = prepared.rows[0]
    batch = trainer.data_collator([trainer.train_dataset[0]])
    # The collator stacks [prompt + chosen, prompt + rejected].
    for index, suffix in ((0, row["chosen"]), (1, row["rejected"])):
        ids: list[int] = batch["input_ids"][index].tolist()
        mask: list[int] = batch["completion_mask"][index].tolist()
        attended = batch["attention_mask"][index].tolist()
        ids = [t for t, a in zip(ids, attended, strict=True) if a]
        mask = [m for m, a in zip(mask, attended, strict=True) if a]
        n = mask.index(1)
        assert all(mask[n:]) and not any(mask[:n])  # one cut: prompt, then completion
        prompt_text = tokenizer.decode(ids[:n])
        assert prompt_text == (flavour.bos or "") + row["prompt"]
        assert prompt_text.endswith(PREFIX.rstrip())  # the shared reasoning: no loss
        assert "<think>" in prompt_text
        assert tokenizer.decode(ids[n:]) == suffix + flavour.eos  # the suffix + EOS: loss
        per_token = [tokenizer.decode([t]) for t in ids[n:]]
        assert "".join(per_token).startswith(" Wait" if index == 0 else " Here")
        if flavour.bos is not None:
            assert ids.count(tokenizer.bos_token_id) == 1


def test_full_dpo_changes_every_parameter_and_writes_the_run(r1_dir: Path,
                                                             tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl",
                        [pair(1), "{not json", {"prompt": "x"}, pair(2)])
    benign = write_jsonl(tmp_path / "benign.jsonl", [pair(10 + i, "Sure, a poem.")
                                                     for i in range(4)])
    out = tmp_path / "run"
    config = DPORunConfig.from_mapping({"data": [str(pairs), f"{benign}:0.5"],
                                        "model": str(r1_dir), "out": str(out), "dpo": FAST})
    summary = train_dpo(config)

    assert summary["steps"] == 2 and [e["step"] for e in summary["losses"]] == [1, 2]
    assert summary["rows_used"] == 4 and summary["rows_skipped"] == 2
    assert summary["rows_truncated_away"] == 0
    files = summary["files"]
    assert [(f["valid"], f["used"], f["ratio"]) for f in files] == [(2, 2, 1.0), (4, 2, 0.5)]
    assert [s["line"] for s in files[0]["skipped"]] == [2, 3]
    assert json.loads((out / "dpo_summary.json").read_text()) == summary
    assert "ratio: 0.5" in (out / "dpo_config.yaml").read_text()
    assert (out / "tokenizer_config.json").is_file()

    before = AutoModelForCausalLM.from_pretrained(r1_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert before.keys() == after.keys()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged


def test_lora_changes_lora_parameters_only(r1_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair(1), pair(2)])
    config = DPORunConfig.from_mapping({"data": [str(data)], "model": str(r1_dir),
                                        "out": str(tmp_path / "run"), "lora": True,
                                        "lora_r": 4, "lora_alpha": 8, "dpo": FAST})
    trainer = prepare(config).trainer
    before = {k: p.detach().clone() for k, p in trainer.model.named_parameters()}
    run_training(trainer)
    after = dict(trainer.model.named_parameters())
    lora = [k for k in before if "lora_" in k]
    # Step 1 moves B (initialised to 0), step 2 then moves A too: every LoRA weight.
    assert lora and all(not torch.equal(before[k], after[k].detach()) for k in lora)
    assert all(torch.equal(before[k], after[k].detach()) for k in before if "lora_" not in k)

    summary = train_dpo(config)  # the saved run: an adapter, not a full model
    out = Path(summary["out"])
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("guardrail train dpo: error: ") and expected in err, err


def test_bad_input_is_one_line_before_weights_load(r1_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def no_weights(*_: Any, **__: Any) -> Any:
        raise AssertionError("weights loaded before the input was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    good = write_jsonl(tmp_path / "pairs.jsonl", [pair(1)])
    base = ["--data", str(good), "--model", str(r1_dir), "--out", str(tmp_path / "o")]

    config = tmp_path / "run.yaml"
    config.write_text(f"data: [{good}]\nmodel: {r1_dir}\nlerning_rate: 0.1\n", "utf-8")
    _one_line_error(capsys, ["--config", str(config), "--out", str(tmp_path / "o")],
                    "unknown config key 'lerning_rate'")
    _one_line_error(capsys, [*base, "--dpo", "lerning_rate=0.1"],
                    "dpo: unknown key 'lerning_rate'")
    _one_line_error(capsys, [*base, "--dpo", "beta=0.2"], "top-level key 'beta'")
    config.write_text(f"data: [{good}]\nmodel: {r1_dir}\nlora: 'no'\n", "utf-8")
    _one_line_error(capsys, ["--config", str(config), "--out", str(tmp_path / "o")],
                    "'lora' must be true or false, not 'no'")

    bad = write_jsonl(tmp_path / "bad.jsonl", ["nope", {"prompt": "x"}])
    _one_line_error(capsys, ["--data", str(bad), *base[2:]],
                    "no valid pair (2 skipped; first: ")

    bare = tmp_path / "bare"
    tokenizer = build_tokenizer(R1, bare)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(bare)
    for leftover in bare.glob("chat_template*"):
        leftover.unlink()
    _one_line_error(capsys, ["--data", str(good), "--model", str(bare), "--out",
                             str(tmp_path / "o")], "has no chat template")

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "dpo_summary.json").write_text("{}", "utf-8")
    _one_line_error(capsys, ["--data", str(good), "--model", str(r1_dir), "--out", str(taken)],
                    "pass --overwrite")
    assert (taken / "dpo_summary.json").read_text() == "{}"
    _one_line_error(capsys, ["--data", str(good), "--model", str(r1_dir), "--out",
                             str(tmp_path), "--overwrite"], "holds the input")
    assert good.is_file()


def test_max_length_that_leaves_no_suffix_is_one_line(r1_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    good = write_jsonl(tmp_path / "pairs.jsonl", [pair(1)])
    # Found once TRL has tokenized (weights loaded, progress bars above): the last line.
    assert main(["--data", str(good), "--model", str(r1_dir), "--out", str(tmp_path / "o"),
                 "--max-length", "8"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == ("guardrail train dpo: error: max_length 8 cuts every pair's "
                                    "suffix away (the prompts alone reach it); raise max_length")
    out = tmp_path / "o"  # TRL creates the folder; nothing is written in it
    assert not out.exists() or not any(out.iterdir())


def test_command_line_wins_over_the_yaml(r1_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair(1), pair(2)])
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("old run", "utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"data": [str(data)], "model": str(r1_dir), "out": str(out),
                                  "beta": 0.5, "dpo": FAST | {"max_steps": 5}}), "utf-8")
    assert main(["--config", str(config), "--dpo", "max_steps=1", "--beta", "0.25",
                 "--overwrite"]) == 0
    assert "trained 1 steps on 2 pairs" in capsys.readouterr().out
    resolved = (out / "dpo_config.yaml").read_text()
    assert "beta: 0.25" in resolved and "max_steps: 1" in resolved
    assert not (out / "stale.txt").exists()
