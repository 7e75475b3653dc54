"""Llama Guard 3's side of the wire: the messages we send, and reading what it answers.

We never render the Llama Guard prompt ourselves. The model's own chat template (shipped in its
HF tokenizer and applied by vLLM) turns ``[user, assistant]`` messages into the task line, the
S1-S14 category list and the ``User:`` / ``Agent:`` conversation, and asks for an assessment of
ONLY THE LAST Agent message. Rendering it here would duplicate that template and drift from it.

The model answers ``safe``, or ``unsafe`` and a line of categories (``S1,S3``). The template
ends at the assistant header without the usual blank line, so the model first emits ``\\n\\n``:
the parser and the logprob scorer both skip leading whitespace.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from guardrail.errors import GuardError
from guardrail.guards.base import GuardView

# Names as the Llama Guard 3 model card gives them. The chat template's prompt uses shorter
# labels for a few (S3 "Sex Crimes", S4 "Child Exploitation", S11 "Self-Harm"); the codes are
# what the model outputs, so the codes are what matter. Llama-Guard-3-1B covers S1-S13.
CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes",
    "S2": "Non-Violent Crimes",
    "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation",
    "S5": "Defamation",
    "S6": "Specialized Advice",
    "S7": "Privacy",
    "S8": "Intellectual Property",
    "S9": "Indiscriminate Weapons",
    "S10": "Hate",
    "S11": "Suicide & Self-Harm",
    "S12": "Sexual Content",
    "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}

_RAW_IN_ERRORS = 200
_FIRST_LINE = re.compile(r"(safe|unsafe)\b(.*)", re.IGNORECASE)
_CATEGORY_CODE = re.compile(r"S\d{1,2}", re.IGNORECASE)


def build_messages(view: GuardView) -> list[dict[str, str]]:
    """``[user, assistant]``: with an even number of turns the template judges the Agent's last
    message, i.e. the window of the response that ends with the step under judgement.

    Plain string contents: the 8B template reads them directly, and vLLM converts them into text
    parts for the 1B template (which iterates over content parts) by detecting its format.
    """
    return [
        {"role": "user", "content": view.request},
        {"role": "assistant", "content": view.response_text()},
    ]


def _shorten(text: str) -> str:
    if len(text) <= _RAW_IN_ERRORS:
        return repr(text)
    return repr(text[:_RAW_IN_ERRORS]) + f"... ({len(text)} chars)"


def parse_verdict(text: str) -> tuple[bool, tuple[str, ...]]:
    """``(unsafe, categories)`` from Llama Guard's text output.

    The first non-blank line must be ``safe`` or ``unsafe`` (any case); categories follow on the
    same line or the next one, separated by commas or spaces. Anything else raises GuardError
    with the raw text. A garbled category line does not make an ``unsafe`` verdict an error: the
    verdict is what protects the user, and an error could be waved through by
    ``guard.on_error: allow``. Only recognised ``S<n>`` codes are kept.
    """
    lines = [line.strip() for line in text.strip().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise GuardError(f"llama-guard: empty output {_shorten(text)}")
    match = _FIRST_LINE.fullmatch(lines[0])
    if match is None:
        raise GuardError(f"llama-guard: output is neither 'safe' nor 'unsafe': {_shorten(text)}")
    word, rest = match.group(1).lower(), match.group(2).strip()
    if word == "safe":
        if rest:
            raise GuardError(f"llama-guard: unexpected text after 'safe': {_shorten(text)}")
        return False, ()
    category_text = rest if rest else (lines[1] if len(lines) > 1 else "")
    codes: list[str] = []
    for token in re.split(r"[,\s]+", category_text):
        if _CATEGORY_CODE.fullmatch(token):
            code = token.upper()
            if code not in codes:
                codes.append(code)
    return True, tuple(codes)


def _probability(logprob: object) -> float:
    if not isinstance(logprob, int | float) or math.isnan(logprob):
        return 0.0
    return math.exp(logprob) if logprob < 0 else 1.0


def score_from_logprobs(logprobs: object) -> float | None:
    """P(unsafe) / (P(unsafe) + P(safe)) at the first generated word, or None if not known.

    ``logprobs`` is a chat-completions choice's ``logprobs`` object: ``{"content": [{"token",
    "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}``. Leading
    whitespace tokens (the ``\\n\\n`` Llama Guard emits first) are skipped. Every top entry that
    strips to ``safe`` / ``unsafe`` (any case) counts towards that word; a word absent from the
    top list counts as probability 0; with both absent, or no usable logprobs, None.
    """
    if not isinstance(logprobs, Mapping):
        return None
    content = logprobs.get("content")
    if not isinstance(content, Sequence) or isinstance(content, str):
        return None
    first = next(
        (
            entry
            for entry in content
            if isinstance(entry, Mapping) and str(entry.get("token", "")).strip()
        ),
        None,
    )
    if first is None:
        return None
    candidates: list[Any] = list(first.get("top_logprobs") or [])
    # The sampled token itself belongs to the distribution even if a server left it out of
    # top_logprobs (OpenAI's spec lets top lists be short).
    if not any(
        isinstance(entry, Mapping) and entry.get("token") == first.get("token")
        for entry in candidates
    ):
        candidates.append(first)
    mass = {"safe": 0.0, "unsafe": 0.0}
    seen = {"safe": False, "unsafe": False}
    for entry in candidates:
        if not isinstance(entry, Mapping):
            continue
        word = str(entry.get("token", "")).strip().lower()
        if word in mass:
            mass[word] += _probability(entry.get("logprob"))
            seen[word] = True
    if not (seen["safe"] or seen["unsafe"]):
        return None
    total = mass["safe"] + mass["unsafe"]
    if total <= 0.0:
        return None
    return mass["unsafe"] / total


def describe(categories: Sequence[str]) -> str:
    """``S9 (Indiscriminate Weapons), S1 (Violent Crimes)`` for logs and audit records."""
    return ", ".join(f"{code} ({CATEGORIES[code]})" if code in CATEGORIES else code
                     for code in categories)
