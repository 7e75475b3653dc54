"""What a text runner (an endpoint, vLLM) is asked and what it answers.

A family asks for greedy completions with logprobs: a ``ChatRequest`` (the model's own chat
template renders the messages, with ``template_kwargs`` for templates that take a policy) or a
``PromptRequest`` (a prompt the family renders itself, as WildGuard's). Every text runner answers
a ``Completion``: the text and, per generated token, its logprob and top alternatives.

``answer_probabilities`` turns those logprobs into the probability of each answer word at the
position where the answer is written: the score of a verdict word.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Mapping[str, str], ...]
    max_tokens: int
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    fallback_prompt: str | None = None
    """The same prompt written here (no BOS: the tokenizer adds its own), for an in-process
    engine whose tokenizer has no chat template; a server always applies its own."""


@dataclass(frozen=True)
class PromptRequest:
    prompt: str
    """Rendered by the family, without BOS (the server's tokenizer adds it)."""
    max_tokens: int


TextRequest = ChatRequest | PromptRequest


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]
    """The most likely tokens at this position with their logprobs (may omit ``token``)."""


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: tuple[TokenLogprob, ...]
    """Empty when the server sent no logprobs."""


@runtime_checkable
class TextRunner(Protocol):
    """A runner that answers requests with text and logprobs (an endpoint, vLLM)."""

    async def complete(self, request: TextRequest) -> Completion: ...


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def chat_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    """``{"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]}``."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list):
        return ()
    tokens: list[TokenLogprob] = []
    for entry in content:
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            return ()
        logprob = _number(entry.get("logprob"))
        top = [(str(alt["token"]), value) for alt in entry.get("top_logprobs") or []
               if isinstance(alt, dict) and isinstance(alt.get("token"), str)
               and (value := _number(alt.get("logprob"))) is not None]
        tokens.append(TokenLogprob(entry["token"], logprob if logprob is not None else -math.inf,
                                   tuple(top)))
    return tuple(tokens)


def completion_logprobs(logprobs: Any) -> tuple[TokenLogprob, ...]:
    """The completions API's shape: parallel lists ``tokens``, ``token_logprobs`` and
    ``top_logprobs`` (a ``{token: logprob}`` mapping per position)."""
    if not isinstance(logprobs, dict):
        return ()
    names, values, tops = (logprobs.get(key) for key in ("tokens", "token_logprobs",
                                                         "top_logprobs"))
    if not isinstance(names, list) or not isinstance(values, list) or len(names) != len(values):
        return ()
    tops = tops if isinstance(tops, list) and len(tops) == len(names) else [None] * len(names)
    tokens: list[TokenLogprob] = []
    for name, value, top in zip(names, values, tops, strict=True):
        if not isinstance(name, str):
            return ()
        logprob = _number(value)
        alternatives = [(str(token), number) for token, alt in (top or {}).items()
                        if (number := _number(alt)) is not None] if isinstance(top, dict) else []
        tokens.append(TokenLogprob(name, logprob if logprob is not None else -math.inf,
                                   tuple(alternatives)))
    return tuple(tokens)


def answer_probabilities(
    completion: Completion, answer_at: int, words: Sequence[str]
) -> dict[str, float] | None:
    """P(word) among ``words`` (summing to 1) at the token that writes ``completion.text`` from
    character ``answer_at`` on: where the model chose its verdict word.

    A top-logprob token counts for a word when, stripped and lower-cased, it is a non-empty prefix
    of that word (``" Uns"`` for ``Unsafe``): the words must start with different letters, which
    holds for every guard here (safe/unsafe/controversial, yes/no). None when the server sent no
    logprobs, the tokens do not spell the text, or no alternative names an answer word.
    """
    lowered = [word.lower() for word in words]
    if len({word[:1] for word in lowered}) != len(lowered):
        raise ValueError(f"answer words must start with different letters: {list(words)}")
    position = 0
    for token in completion.tokens:
        end = position + len(token.token)
        if completion.text[position:end] != token.token:
            return None  # the tokens do not spell the text: cannot locate the answer
        if position <= answer_at < end and token.token[answer_at - position:].strip():
            return _word_mass(token, lowered, words)
        position = end
    return None


def _word_mass(token: TokenLogprob, lowered: Sequence[str],
               words: Sequence[str]) -> dict[str, float] | None:
    candidates = dict(token.top)
    candidates.setdefault(token.token, token.logprob)  # the chosen token is in the distribution
    mass = dict.fromkeys(words, 0.0)
    for name, logprob in candidates.items():
        stem = name.strip().lower()
        if not stem or logprob == -math.inf:
            continue
        for word, low in zip(words, lowered, strict=True):
            if low.startswith(stem):
                mass[word] += math.exp(min(logprob, 0.0))
                break
    total = sum(mass.values())
    if total <= 0.0:
        return None
    return {word: value / total for word, value in mass.items()}
