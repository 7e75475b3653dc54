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

    assert summary["global_step"] == 2 and [e["step"] for e in summary["losses"]] == [1, 2]
    assert summary["rows"] == 4 and summary["records_skipped"] == 2
    assert summary["records_dropped"] == 0 and summary["saved"] == "model"
    assert summary["world_size"] == 1 and summary["tokens_seen"] > 0
    # The same output folder as SFT's: data card, summary, resolved config, loss curve.
    card = json.loads((out / "data_card.json").read_text())
    files = card["files"]
    assert [(f["rows"], f["kept"], f["used"], f["ratio"], f["form"]) for f in files] == [
        (4, 2, 2, 1.0, "ipo-pairs"), (4, 4, 2, 0.5, "ipo-pairs")]
    assert sum(files[0]["skipped"].values()) == 2 and card["rows"] == 4
    assert json.loads((out / "training_summary.json").read_text()) == summary
    assert "ratio: 0.5" in (out / "config.yaml").read_text()
    assert (out / "tokenizer_config.json").is_file()
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"

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
    _one_line_error(capsys, [*base, "--dpo", "learning_rate=fast"],
                    "dpo.learning_rate: a float, not 'fast'")
    config.write_text(f"data: [{good}]\nmodel: {r1_dir}\nlora: 'no'\n", "utf-8")
    _one_line_error(capsys, ["--config", str(config), "--out", str(tmp_path / "o")],
                    "'lora' must be true or false, not 'no'")

    bad = write_jsonl(tmp_path / "bad.jsonl", ["nope", pair(1) | {"prefix": 3}])
    _one_line_error(capsys, ["--data", str(bad), *base[2:]],
                    "no pair to train on (2 skipped, 0 dropped; first: ")
    # The wrong file: SFT's UnsafeChain records (or chat rows) given to dpo.
    records = write_jsonl(tmp_path / "unsafechain.jsonl",
                          [{"prompt": "x", "response": "<think>r</think>a"}])
    _one_line_error(capsys, ["--data", str(records), *base[2:]],
                    "unsafechain.jsonl:1: not an IPO pair (prompt, chosen, rejected; written by "
                    "guardrail harvest) (found ['prompt', 'response'])")
    _one_line_error(capsys, ["--data", f"{good}:-1", *base[2:]],
                    "the ratio must be a finite number >= 0, not -1.0")
    _one_line_error(capsys, ["--data", str(tmp_path / "missing.jsonl"), *base[2:]],
                    "missing.jsonl: no such file or folder")

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
    (taken / "training_summary.json").write_text("{}", "utf-8")
    _one_line_error(capsys, ["--data", str(good), "--model", str(r1_dir), "--out", str(taken)],
                    "holds another run (training_summary.json); pass --overwrite")
    assert (taken / "training_summary.json").read_text() == "{}"
    _one_line_error(capsys, ["--data", str(good), "--model", str(r1_dir), "--out",
                             str(tmp_path), "--overwrite"], "holds the input")
    assert good.is_file()


def test_over_long_pairs_are_dropped_and_counted_never_cut(
        r1_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = build_tokenizer(R1, tmp_path / "tok")
    long = pair(2, "A locksmith is the safe route. " * 30)
    good = write_jsonl(tmp_path / "pairs.jsonl", [pair(1), long])
    short = pair(1)
    limit = max(len(tokenizer(text=short["prompt"] + short[side])["input_ids"]) + 1
                for side in ("chosen", "rejected"))
    config = DPORunConfig.from_mapping({"data": [str(good)], "model": str(r1_dir),
                                        "out": str(tmp_path / "run"), "max_length": limit,
                                        "dpo": FAST | {"max_steps": 1}})
    summary = train_dpo(config)
    assert (summary["rows"], summary["records_dropped"]) == (1, 1)
    card = json.loads((tmp_path / "run" / "data_card.json").read_text())
    assert card["files"][0]["dropped"] == {f"longer than max_length ({limit} tokens)": 1}

    def no_weights(*_: Any, **__: Any) -> Any:
        raise AssertionError("weights loaded before the input was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_weights)
    capsys.readouterr()  # the run above's progress bars
    _one_line_error(capsys, ["--data", str(good), "--model", str(r1_dir), "--out",
                             str(tmp_path / "o"), "--max-length", "8"],
                    "no pair to train on (0 skipped, 2 dropped; first: ")
    assert not (tmp_path / "o").exists()


def test_command_line_wins_over_the_yaml(r1_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair(1), pair(2)])
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("old run", "utf-8")
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"data": [str(data)], "model": str(r1_dir), "out": str(out),
                                  "beta": 0.5, "dpo": FAST | {"max_steps": 5}}), "utf-8")
    # learning_rate=5e-6 as the README writes it: YAML 1.1 reads it as a string, which reached
    # the optimizer ("'<=' not supported between 'float' and 'str'") after the folder was made.
    assert main(["--config", str(config), "--dpo", "max_steps=1", "--beta", "0.25",
                 "--dpo", "learning_rate=5e-6", "--overwrite"]) == 0
    assert "guardrail train dpo: trained 1 steps on 2 pairs" in capsys.readouterr().err
    resolved = (out / "config.yaml").read_text()
    assert "beta: 0.25" in resolved and "max_steps: 1" in resolved
    assert "learning_rate: 5.0e-06" in resolved
    assert not (out / "stale.txt").exists()
