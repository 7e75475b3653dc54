"""UnsafeChain records and IPO pairs in the forms TRL's SFTTrainer and DPOTrainer take.

SFT uses TRL's *prompt-completion* form (strings), never ``messages``: the R1-Distill chat
template deletes everything up to ``</think>`` from assistant turns, so a conversational dataset
would silently train on answers only (REFERENCE §5). Here only the user turn goes through the
template; the completion is built as text and never does:

- ``prompt`` = the tokenizer's chat template on the user turn with the generation prompt. The
  R1-Distill template ends it in ``<think>\\n``; Qwen3's does not, so there the completion opens
  the block itself;
- ``completion`` = [``<think>\\n``] + reasoning + ``\\n</think>\\n\\n`` + answer + EOS.

BOS, once: TRL 1.16 tokenizes a string prompt and ``prompt + completion`` with the tokenizer's
defaults (``trl.data_utils._tokenize`` calls ``tokenizer(text=...)``), so a tokenizer that adds
BOS itself (R1-Distill's does) would put a second one before the template's ``{{bos_token}}``.
The template's BOS text is therefore dropped from the prompt when, and only when, the tokenizer
adds it. SFTTrainer then marks the prompt tokens ``completion_mask = 0`` and puts the loss on
the completion, EOS included (tests/test_train_render.py shows it token by token).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from offline.harvest.pairs import PreferencePair
from offline.harvest.records import (
    CLOSE_THINK,
    OPEN_THINK,
    BadRow,
    RecordError,
    UnsafeChainRecord,
    split_response,
)


class TokenizerError(ValueError):
    """A tokenizer the rendering cannot use (no chat template, no EOS); says which and why."""


class ChatTokenizer(Protocol):
    """What the rendering needs of a Hugging Face tokenizer."""

    chat_template: Any
    bos_token: Any
    eos_token: Any
    bos_token_id: Any

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str) -> Any: ...


@dataclass(frozen=True, slots=True)
class SFTExample:
    prompt: str
    completion: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(slots=True)
class RenderedSet:
    """Rendered rows, and the rows that were not rendered with the reason (counted, not lost)."""

    rows: list[dict[str, str]] = field(default_factory=list)
    skipped: list[BadRow] = field(default_factory=list)


def adds_bos(tokenizer: ChatTokenizer) -> bool:
    """Whether tokenizing plain text (as TRL does) puts BOS first by itself."""
    if tokenizer.bos_token_id is None:
        return False
    ids = list(tokenizer(text="a")["input_ids"])
    return ids[:1] == [tokenizer.bos_token_id]


def _one_bos(text: str, tokenizer: ChatTokenizer) -> str:
    bos = tokenizer.bos_token
    if isinstance(bos, str) and bos and text.startswith(bos) and adds_bos(tokenizer):
        return text[len(bos):]
    return text


def _check(tokenizer: ChatTokenizer) -> str:
    if not tokenizer.chat_template:
        raise TokenizerError("the tokenizer has no chat template (chat_template is empty); the "
                             "prompt cannot be rendered as the model sees it")
    eos = tokenizer.eos_token
    if not isinstance(eos, str) or not eos:
        raise TokenizerError("the tokenizer has no EOS token: a completion must end in one")
    return eos


def render_prompt(request: str, tokenizer: ChatTokenizer) -> str:
    """The user turn through the chat template, with the generation prompt, BOS at most once."""
    _check(tokenizer)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": request}],
                                             tokenize=False, add_generation_prompt=True)
    if not isinstance(rendered, str):
        raise TokenizerError(f"apply_chat_template returned {type(rendered).__name__}, not text")
    return _one_bos(rendered, tokenizer)


def render_sft(record: UnsafeChainRecord, tokenizer: ChatTokenizer) -> SFTExample:
    """One record as a prompt-completion pair. A record without an answer after ``</think>``
    raises RecordError (training on it would teach the model to stop after thinking); an
    untagged response trains with an empty reasoning block, as R1 writes one."""
    eos = _check(tokenizer)
    parsed = split_response(record.response)
    if not parsed.answer:
        raise RecordError("'response': no answer after </think>")
    prompt = render_prompt(record.prompt, tokenizer)
    # Open the block only where the generation prompt has not (Qwen3 vs R1-Distill).
    if prompt.endswith(OPEN_THINK + "\n"):
        opening = ""
    elif prompt.endswith(OPEN_THINK):
        opening = "\n"
    else:
        opening = OPEN_THINK + "\n"
    completion = f"{opening}{parsed.reasoning}\n{CLOSE_THINK}\n\n{parsed.answer}{eos}"
    return SFTExample(prompt=prompt, completion=completion)


def sft_rows(rows: Iterable[tuple[int, Any] | BadRow],
             tokenizer: ChatTokenizer) -> RenderedSet:
    """Rows as ``read_jsonl`` yields them, rendered; bad ones skipped with their line number."""
    out = RenderedSet()
    for row in rows:
        if isinstance(row, BadRow):
            out.skipped.append(row)
            continue
        line, value = row
        try:
            out.rows.append(render_sft(UnsafeChainRecord.from_dict(value), tokenizer).to_dict())
        except RecordError as error:
            out.skipped.append(BadRow(line=line, problem=str(error)))
    return out


def dpo_row(row: Any, tokenizer: ChatTokenizer) -> dict[str, Any]:
    """An IPO pair (offline/harvest/pairs.py) validated and passed on in TRL's standard form.

    Only the BOS rule touches it: the pair's prompt carries the template's BOS text, and TRL's
    DPOTrainer tokenizes strings with the tokenizer's defaults, as SFT does.
    """
    pair = PreferencePair.from_dict(row)
    out = pair.to_dict()
    out["prompt"] = _one_bos(pair.prompt, tokenizer)
    return out
