"""offline/train/render.py through TRL's own SFTTrainer, on tiny models built here.

The tokenizers are byte-level BPEs trained on a few sentences, with the special tokens and the
real chat templates of DeepSeek-R1-Distill (whose tokenizer adds BOS itself) and Qwen3 (no BOS);
the model is a random-weight Qwen2 saved and loaded back with ``from_pretrained``. What is
checked is what TRL does with the rendered rows: which tokens carry loss, BOS once, EOS last.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from offline.harvest.pairs import build_pair
from offline.harvest.records import BadRow, RecordError, UnsafeChainRecord
from offline.train.render import (
    TokenizerError,
    adds_bos,
    dpo_row,
    render_prompt,
    render_sft,
    sft_rows,
)
from tests.tiny_models import (
    ANSWER,
    CORPUS,
    QWEN3,
    R1,
    R1_BOS,
    REASONING,
    RECORD,
    Flavour,
    build_model,
    build_tokenizer,
)


def sft_trainer(tokenizer: Any, model: Any, rows: list[dict[str, str]], out: Path,
                max_steps: int = 1) -> Any:
    config = SFTConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                       learning_rate=1e-3, report_to="none", save_strategy="no",
                       logging_strategy="no", use_cpu=True, max_length=512, seed=0,
                       dataloader_num_workers=0, activation_checkpointing=False)
    return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer)


@pytest.fixture(scope="module", params=[R1, QWEN3], ids=lambda f: f.name)
def tiny(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> tuple[Flavour, Any, Path]:
    torch.set_num_threads(1)
    flavour: Flavour = request.param
    folder = tmp_path_factory.mktemp(flavour.name)
    return flavour, build_tokenizer(flavour, folder), folder


def test_rendered_text_keeps_the_reasoning_and_opens_think_once(
        tiny: tuple[Flavour, Any, Path]) -> None:
    flavour, tokenizer, _ = tiny
    example = render_sft(RECORD, tokenizer)
    joined = example.prompt + example.completion
    assert joined.count("<think>") == 1 and joined.count("</think>") == 1
    assert f"<think>\n{REASONING}\n</think>\n\n{ANSWER}{flavour.eos}" in joined
    assert example.completion.endswith(flavour.eos)
    if flavour is R1:  # the generation prompt opens the block; BOS comes from the tokenizer
        assert example.prompt.endswith("<\uff5cAssistant\uff5c><think>\n")
        assert example.completion.startswith(REASONING)
        assert not example.prompt.startswith(R1_BOS) and adds_bos(tokenizer)
        # The trap the prompt-completion form avoids: the template drops assistant reasoning.
        assistant = tokenizer.apply_chat_template(
            [{"role": "user", "content": RECORD.prompt},
             {"role": "assistant", "content": RECORD.response}], tokenize=False)
        assert REASONING not in assistant
    else:
        assert example.prompt.endswith("<|im_start|>assistant\n")
        assert example.completion.startswith(f"<think>\n{REASONING}")
        assert not adds_bos(tokenizer)


def test_sft_trainer_puts_loss_on_reasoning_and_answer_only(
        tiny: tuple[Flavour, Any, Path], tmp_path: Path) -> None:
    flavour, tokenizer, folder = tiny
    example = render_sft(RECORD, tokenizer)
    model = build_model(tokenizer, folder / "model")
    trainer = sft_trainer(tokenizer, model, [example.to_dict()], tmp_path)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids: list[int] = batch["input_ids"][0].tolist()
    labels: list[int] = batch["labels"][0].tolist()
    prompt_ids: list[int] = tokenizer(text=example.prompt)["input_ids"]
    n = len(prompt_ids)

    # Token by token: the prompt is an exact token prefix and carries no loss; every token
    # after it (reasoning, </think>, answer, EOS) carries loss on itself.
    assert ids[:n] == prompt_ids
    table = [(tokenizer.decode([token]), label != -100) for token, label in zip(ids, labels,
                                                                               strict=True)]
    assert not any(loss for _, loss in table[:n]), table[:n]
    assert all(loss for _, loss in table[n:]), table[n:]
    assert labels[n:] == ids[n:]
    learned = tokenizer.decode(ids[n:])
    assert REASONING in learned and ANSWER in learned and "</think>" in learned
    assert learned == example.completion
    assert tokenizer.decode(ids[:n]) == (flavour.bos or "") + example.prompt

    # BOS exactly once (first) where the model has one; EOS last, with loss.
    if flavour.bos is not None:
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    # Once in the completion (Qwen3's EOS, <|im_end|>, also closes the user turn).
    assert ids[n:].count(tokenizer.eos_token_id) == 1


def test_template_bos_plus_tokenizer_bos_would_be_two(tmp_path: Path) -> None:
    """The check above can fail: the raw template text, tokenized as TRL does, has two BOS."""
    tokenizer = build_tokenizer(R1, tmp_path)
    raw = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                        add_generation_prompt=True)
    assert raw.startswith(R1_BOS)
    assert tokenizer(text=raw)["input_ids"].count(tokenizer.bos_token_id) == 2
    assert tokenizer(text=render_prompt("hi", tokenizer))["input_ids"].count(
        tokenizer.bos_token_id) == 1


def test_sft_steps_change_every_trainable_parameter(
        tiny: tuple[Flavour, Any, Path], tmp_path: Path) -> None:
    _, tokenizer, folder = tiny
    rows = [render_sft(RECORD, tokenizer).to_dict(),
            render_sft(UnsafeChainRecord.build(prompt=CORPUS[4], reasoning=CORPUS[1],
                                               answer=CORPUS[3]), tokenizer).to_dict()]
    model = build_model(tokenizer, folder / "model-steps")
    before = {name: p.detach().clone() for name, p in model.named_parameters()
              if p.requires_grad}
    trainer = sft_trainer(tokenizer, model, rows, tmp_path, max_steps=2)
    result = trainer.train()
    assert result.global_step == 2
    unchanged = [name for name, p in trainer.model.named_parameters()
                 if p.requires_grad and torch.equal(before[name], p.detach())]
    assert before and not unchanged


def test_bad_rows_are_counted_with_their_line(tiny: tuple[Flavour, Any, Path]) -> None:
    _, tokenizer, _ = tiny
    rows: list[tuple[int, Any] | BadRow] = [
        (1, RECORD.to_dict()),
        (2, {"prompt": "x"}),
        (3, {"prompt": "x", "response": "<think>only thinking</think>"}),
        BadRow(line=4, problem="not JSON"),
    ]
    rendered = sft_rows(rows, tokenizer)
    assert len(rendered.rows) == 1
    assert [(bad.line, bad.problem) for bad in rendered.skipped] == [
        (2, "'response': a non-empty string is required"),
        (3, "'response': no answer after </think>"),
        (4, "not JSON"),
    ]


def test_tokenizer_without_template_or_eos_is_refused(tiny: tuple[Flavour, Any, Path]) -> None:
    _, _, folder = tiny
    bare = AutoTokenizer.from_pretrained(folder)
    bare.chat_template = None
    with pytest.raises(TokenizerError, match="no chat template"):
        render_sft(RECORD, bare)
    endless = AutoTokenizer.from_pretrained(folder)
    endless.eos_token = None
    with pytest.raises(TokenizerError, match="no EOS token"):
        render_sft(RECORD, endless)


def test_dpo_rows_keep_the_pair_and_carry_bos_once(tiny: tuple[Flavour, Any, Path]) -> None:
    flavour, tokenizer, _ = tiny
    pair = build_pair(RECORD.prompt, "Okay, they own the door. ", "Wait, I should be careful.",
                      "A locksmith is the safe route.", ANSWER, "Here is how to rake the pins.")
    row = dpo_row(pair.to_dict(), tokenizer)
    assert (row["chosen"], row["rejected"], row["prefix"]) == (pair.chosen, pair.rejected,
                                                               pair.prefix)
    assert row["prompt"].endswith("<think>\nOkay, they own the door.")
    if flavour.bos is not None:
        assert pair.prompt.startswith(R1_BOS) and row["prompt"] == pair.prompt[len(R1_BOS):]
        assert tokenizer(text=row["prompt"] + row["chosen"])["input_ids"].count(
            tokenizer.bos_token_id) == 1
    bad = pair.to_dict() | {"prefix": "not the end of the prompt"}
    with pytest.raises(RecordError, match="must end with 'prefix'"):
        dpo_row(bad, tokenizer)


def test_dpo_trainer_keeps_the_shared_prefix_in_the_prompt(
        tiny: tuple[Flavour, Any, Path], tmp_path: Path) -> None:
    """TRL's DPOTrainer on a rendered pair: the shared reasoning is prompt (no loss), the
    diverging suffixes are the completions, BOS once."""
    from trl.trainer.dpo_config import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    flavour, tokenizer, folder = tiny
    pair = build_pair(RECORD.prompt, "Okay, they own the door. ", "Wait, I should be careful.",
                      "A locksmith is the safe route.", ANSWER, "Here is how to rake the pins.")
    row = dpo_row(pair.to_dict(), tokenizer)
    model = build_model(tokenizer, folder / "model-dpo")
    config = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1,
                       report_to="none", save_strategy="no", logging_strategy="no",
                       use_cpu=True, max_length=512, activation_checkpointing=False)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list([row]),
                         processing_class=tokenizer)
    prepared: Any = trainer.train_dataset  # typed as any of several dataset kinds
    tokenized = prepared[0]
    prompt_ids: list[int] = tokenizer(text=row["prompt"])["input_ids"]
    assert tokenized["prompt_ids"] == prompt_ids  # the whole prompt, prefix included
    assert "Okay, they own the door." in tokenizer.decode(tokenized["prompt_ids"])
    assert tokenizer.decode(tokenized["chosen_ids"]) == row["chosen"] + flavour.eos
    assert tokenizer.decode(tokenized["rejected_ids"]) == row["rejected"] + flavour.eos
    if flavour.bos is not None:
        every = tokenized["prompt_ids"] + tokenized["chosen_ids"]
        assert every.count(tokenizer.bos_token_id) == 1
