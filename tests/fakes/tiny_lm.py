"""Tiny causal LMs made on the spot, for testing in-process guards without downloading one.

``write_tokenizer`` trains a small byte-level BPE (the scheme of Llama 3 and Qwen) on text that
contains the guards' answer words, adds the control tokens of every guard family, and saves it as
a transformers tokenizer with a chat template of the caller's choice. ``write_model`` saves a
random Llama with a matching vocabulary. Both load with ``AutoTokenizer`` /
``AutoModelForCausalLM``, as a real checkpoint does.

``program`` turns the model into a lookup table from the current token to next-token logits:
with the attention and MLP outputs zeroed, the last hidden state is the current token's embedding,
which is set to its own basis vector, and the LM head row of each wanted next token gets the
wanted logit there. So a test can make the model prefer ``unsafe`` over ``safe`` by exactly a
chosen margin, or write a chosen answer greedily, one token leading to the next.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

CONTROL_TOKENS = (
    # Llama 3 / Llama Guard 3
    "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|image|>",
    # Qwen
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    # Mistral / WildGuard
    "<s>", "</s>",
    # Gemma / ShieldGemma
    "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>",
    # Granite
    "<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>",
    # A control token of no known shape: only the tokenizer's own list can name it.
    "<unused0>",
)
PLAIN_ADDED = ("<think>", "</think>", "<|user|>", "<|assistant|>")
"""Added but not special, as Qwen's reasoning tags are."""
WILDGUARD_KEYS = ("Harmful request:", "\nResponse refusal:", "\nHarmful response:")
"""Whole answer keys as single tokens, so that a lookup-table model can write WildGuard's three
answers (with ``:`` alone, the token after it could not depend on which question it ends)."""

# Llama 3's pre-tokenizer split (Qwen2's is the same): a run of newlines is one piece, so "\n\n"
# is one token whether or not text follows it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CORPUS = [
    "safe", "unsafe", "\n\nsafe", "\n\nunsafe\nS1", "unsafe\nS9,S1", "S1 S2 S9 S10 S11 S14",
    "Safety: Safe\nCategories: None", "Safety: Unsafe\nCategories: Violent, PII",
    "Safety: Controversial\nCategories: Jailbreak\nRefusal: No", " Safe Unsafe Controversial",
    "Harmful request: yes\nResponse refusal: no\nHarmful response: yes", " yes no yes no",
    "Yes", "No", "Yes\n", "No\n", "User: Agent: USER: ASSISTANT:", "\n\n", "\n\n\n\n",
    "Task: Check if there is unsafe content in conversations", "<BEGIN CONVERSATION>",
    "How do I bake bread? Mix flour and water, then knead the dough.",
    "the a an is of to and in that it for you with on",
]


def write_tokenizer(
    folder: Path,
    *,
    chat_template: str | None,
    bos: str | None,
    eos: str,
    pad: str,
) -> None:
    """A byte-level BPE tokenizer, built as Llama 3's is, saved in ``folder`` (any text
    encodes, as in real models)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(CONTROL_TOKENS),
    )
    tokenizer.train_from_iterator(_CORPUS * 30, trainer)
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)
                          for token in (*PLAIN_ADDED, *WILDGUARD_KEYS)])

    from transformers import PreTrainedTokenizerFast

    wrapped: Any = cast(Any, PreTrainedTokenizerFast)(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    wrapped.save_pretrained(str(folder))


def write_model(folder: Path, *, vocab_size: int, eos_id: int, seed: int = 0) -> None:
    """A random two-layer Llama small enough to run in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        eos_token_id=eos_id, bos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))


def program(folder: Path, table: Mapping[int, Mapping[int, float]]) -> None:
    """Rewrite the model in ``folder`` so that after token ``t`` the next-token logits are
    ``table[t]`` (0 for every other token; all 0 after a token not in the table)."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(folder))
    hidden = model.config.hidden_size
    if len(table) > hidden:
        raise ValueError(f"a {hidden}-wide model can hold {hidden} rows, not {len(table)}")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        # RMSNorm scales a basis vector to sqrt(hidden): divide it out of the head.
        scale = math.sqrt(hidden)
        for row, (token, logits) in enumerate(table.items()):
            model.model.embed_tokens.weight[token, row] = 1.0
            for target, logit in logits.items():
                model.lm_head.weight[target, row] = logit / scale
    model.save_pretrained(str(folder))


def chain(tokens: Sequence[int], logit: float = 10.0) -> dict[int, dict[int, float]]:
    """A table that writes ``tokens[1:]`` greedily after ``tokens[0]``. A token that would need
    two different successors is an error: the table looks at one token only."""
    table: dict[int, dict[int, float]] = {}
    for current, following in itertools.pairwise(tokens):
        wanted = table.setdefault(current, {})
        if wanted and following not in wanted:
            raise ValueError(f"token {current} would need two successors")
        wanted[following] = logit
    return table


def merge(*tables: Mapping[int, Mapping[int, float]]) -> dict[int, dict[int, float]]:
    merged: dict[int, dict[int, float]] = {}
    for table in tables:
        for token, logits in table.items():
            merged.setdefault(token, {}).update(logits)
    return merged


def ids_of(tokenizer: Any, texts: Iterable[str]) -> list[int]:
    return [int(tokenizer.convert_tokens_to_ids(text)) for text in texts]
