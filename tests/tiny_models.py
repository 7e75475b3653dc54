"""Tiny models for the training tests: byte-level BPE tokenizers with the real chat templates
of DeepSeek-R1-Distill (whose tokenizer adds BOS itself) and Qwen3 (no BOS), and a random-weight
Qwen2 saved and loaded back with ``from_pretrained``, as a model folder would be."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config

from guardrail.templates import __file__ as templates_init
from offline.harvest.records import UnsafeChainRecord

TEMPLATES = Path(templates_init).parent
R1_BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
R1_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
CORPUS = [
    "How do I pick a lock on my own front door?",
    "The user asks about locks. I should think about whether this is safe to answer.",
    "Okay, so the request is about a door they own; a locksmith is the safe route.",
    "Call a licensed locksmith, or your landlord, to get back into your home.",
    "Write a poem about the sea and the wind at night.",
]
REASONING = "Okay, the request is about a door they own; a locksmith is the safe route."
ANSWER = "Call a licensed locksmith to get back into your home."
RECORD = UnsafeChainRecord.build(prompt="How do I pick a lock on my own front door?",
                                 reasoning=REASONING, answer=ANSWER)


@dataclass(frozen=True)
class Flavour:
    name: str
    template: str
    specials: list[str]
    bos: str | None
    eos: str
    pad: str


R1 = Flavour("r1", "deepseek-r1-distill.jinja",
             [R1_BOS, R1_EOS, "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"], R1_BOS, R1_EOS,
             R1_EOS)
QWEN3 = Flavour("qwen3", "qwen3.jinja", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                None, "<|im_end|>", "<|endoftext|>")


def build_tokenizer(flavour: Flavour, folder: Path) -> Any:
    """A byte-level BPE with the flavour's special tokens and real chat template, saved and
    loaded back with AutoTokenizer (as a model folder would be)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=flavour.specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    # <think> / </think> are added, non-special tokens in both real vocabularies.
    tokenizer.add_tokens(["<think>", "</think>"])
    if flavour.bos is not None:  # R1-Distill's tokenizer puts BOS first by itself
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{flavour.bos} $A", pair=f"{flavour.bos} $A $B",
            special_tokens=[(flavour.bos, tokenizer.token_to_id(flavour.bos))])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, bos_token=flavour.bos, eos_token=flavour.eos,
        pad_token=flavour.pad)
    fast.chat_template = (TEMPLATES / flavour.template).read_text("utf-8")
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def build_model(tokenizer: Any, folder: Path) -> Any:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder)
