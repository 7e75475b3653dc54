"""A model's output as the evaluation reads it: reasoning and answer apart, and whether the trace
was cut off.

Reasoning comes from the endpoint's own field (``reasoning_content``, which Inspect keeps as
``ContentReasoning``) or from ``<think>…</think>`` in the text, split by the proxy's own parser
(``guardrail/reasoning.py``). A trace is truncated when generation stopped at the token limit or
a think block was opened and never closed (its text is all reasoning), or no answer came at all:
it has no final answer, so nothing downstream can score it as if it had answered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inspect_ai.model import ContentReasoning, ContentText, ModelOutput

from guardrail.reasoning import CLOSE_TAG, OPEN_TAG, ThinkStart, split_inline_think

TRUNCATING_STOPS = frozenset({"max_tokens", "model_length"})


@dataclass(frozen=True)
class Trace:
    reasoning: str
    answer: str
    truncated: bool
    stop_reason: str
    reasoning_tokens: int
    answer_tokens: int
    proxy: dict[str, Any] = field(default_factory=dict)
    """The proxy's ``guardrail`` field when the model is the proxy (action, checks, flagged)."""

    @property
    def reasoning_cut(self) -> bool:
        """The reasoning never ended (no answer began)."""
        return self.truncated and not self.answer

    @property
    def answer_cut(self) -> bool:
        return self.truncated and bool(self.answer)

    @property
    def final_answer(self) -> str | None:
        """The answer to score, or None: a truncated trace has no final answer."""
        return None if self.truncated else self.answer

    @property
    def full(self) -> str:
        if self.reasoning and self.answer:
            return f"{self.reasoning}\n\n{self.answer}"
        return self.reasoning or self.answer


def _tokens(text: str) -> int:
    """Whitespace words: the same count for every backend, so runs compare (a tokenizer's count
    would differ by model); the README says so."""
    return len(text.split())


def _parts(output: ModelOutput) -> tuple[str, str]:
    """(reasoning field text, content text) of the first choice."""
    if not output.choices:
        return "", output.completion
    content = output.choices[0].message.content
    if isinstance(content, str):
        return "", content
    reasoning = "".join(part.reasoning for part in content if isinstance(part, ContentReasoning))
    text = "".join(part.text for part in content if isinstance(part, ContentText))
    return reasoning, text


def read_trace(output: ModelOutput, think_start: ThinkStart = "auto") -> Trace:
    field_reasoning, text = _parts(output)
    stop = str(output.stop_reason)
    cut = stop in TRUNCATING_STOPS
    if field_reasoning:
        reasoning, answer = field_reasoning, text
        truncated = cut or not answer.strip()
    elif CLOSE_TAG in text:
        reasoning, answer = split_inline_think(text, "reasoning")
        truncated = cut or not answer.strip()
    else:
        opened = (text.lstrip().startswith(OPEN_TAG) or think_start == "reasoning"
                  or bool((output.metadata or {}).get("think_open")))
        if cut or opened:
            # Cut off, or a think block never closed: all of it is unfinished reasoning.
            reasoning, answer = text.replace(OPEN_TAG, "", 1).strip(), ""
            truncated = True
        else:
            reasoning, answer = split_inline_think(text, think_start)
            truncated = not answer.strip()
    metadata = output.metadata or {}
    proxy = metadata.get("guardrail")
    return Trace(reasoning=reasoning.strip(), answer=answer.strip(), truncated=truncated,
                 stop_reason=stop, reasoning_tokens=_tokens(reasoning),
                 answer_tokens=_tokens(answer),
                 proxy=proxy if isinstance(proxy, dict) else {})
