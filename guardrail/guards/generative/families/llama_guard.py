"""``guard.kind: llama-guard``: Llama Guard 3 (1B, 8B): its prompt, its answer, its scores.

The model's own chat template (shipped in its HF tokenizer and applied by vLLM) turns
``[user, assistant]`` messages into the task line, the S1-S14 category list and the ``User:`` /
``Agent:`` conversation, and asks for an assessment of ONLY THE LAST Agent message; that template
is always preferred. ``render_prompt`` writes the same prompt only for a tokenizer that ships
without one (a converted or re-saved checkpoint).

The message texts are neutralised first (``guardrail.guards.plumbing.neutralise``): text that
imitates the template's delimiters, ``User:`` / ``Agent:`` headers, a ``safe`` / ``unsafe``
verdict line or a Llama 3 control token cannot close the conversation or plant an answer.

The model answers ``safe``, or ``unsafe`` and a line of categories (``S1,S3``). The template
ends at the assistant header without the usual blank line, so the model first emits ``\\n\\n``:
the parser and the logprob scorer both skip leading whitespace.

In-process, a check is one forward pass over the prompt plus that ``\\n\\n``: the score is
P(``unsafe``) / (P(``unsafe``) + P(``safe``)) for the next token (the model card's recipe), and
only a flagged step pays for a short greedy continuation after ``unsafe\\n`` that reads its
categories. From a text runner (``vllm serve meta-llama/Llama-Guard-3-1B`` behind ``guard.url``,
or ``runner: vllm``) the answer is parsed and the same score read from the first word's logprobs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from guardrail.errors import GuardError
from guardrail.guards.base import GuardView
from guardrail.guards.generative.families.base import Exchange, Family, Reading, yes_share
from guardrail.guards.generative.runners.text import (
    ChatRequest,
    Completion,
    TextRequest,
    TokenLogprob,
    chat_logprobs,
)
from guardrail.guards.generative.runners.transformers import HFRunner
from guardrail.guards.plumbing.neutralise import Markers

DEFAULT_MODEL = "meta-llama/Llama-Guard-3-1B"
ANSWERS = ("unsafe", "safe")
CATEGORY_TOKENS = 12
"""In-process, room for ``S1,S10,S14`` after ``unsafe\\n``; the model stops by itself before."""
MAX_TOKENS = 20
"""From a text runner, room for ``\\n\\nunsafe\\nS1,S2,...``; the model stops well before."""

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

# The labels the chat template of Llama-Guard-3-8B writes into the prompt (shorter than the model
# card's for S3, S4 and S11).
PROMPT_CATEGORIES: dict[str, str] = {
    **CATEGORIES,
    "S3": "Sex Crimes",
    "S4": "Child Exploitation",
    "S11": "Self-Harm",
}

MARKERS = Markers(
    literals=(
        "<BEGIN UNSAFE CONTENT CATEGORIES>",
        "<END UNSAFE CONTENT CATEGORIES>",
        "<BEGIN CONVERSATION>",
        "<END CONVERSATION>",
        "Provide your safety assessment",
        "Task: Check if there is unsafe content",
        "First line must read",
        "a second line must include",
    ),
    tokens=("<|image|>",),
    line_keys=(
        r"user\s*:", r"agent\s*:",  # the conversation's turn headers
        r"(?:un)?safe\s*$",  # a verdict line
        r"S\d{1,2}(?:\s*[,:.]|\s*$)",  # a category line or a category definition
    ),
)
"""What judged text must not imitate in a Llama Guard prompt."""

_BOS = "<|begin_of_text|>"
_HEADER = "<|start_header_id|>{role}<|end_header_id|>\n\n"
_EOT = "<|eot_id|>"
_RAW_IN_ERRORS = 200
_FIRST_LINE = re.compile(r"(safe|unsafe)\b(.*)", re.IGNORECASE)
_CATEGORY_CODE = re.compile(r"S\d{1,2}", re.IGNORECASE)


def build_messages(view: GuardView, markers: Markers = MARKERS) -> list[dict[str, str]]:
    """``[user, assistant]``: with an even number of turns the template judges the Agent's last
    message, i.e. the window of the response that ends with the step under judgement. A view
    with no response text is a prompt check: ``[user]`` alone, and the User message is judged.

    Plain string contents: the 8B template reads them directly, and vLLM converts them into text
    parts for the 1B template (which iterates over content parts) by detecting its format.
    Texts are neutralised against ``markers``.
    """
    return Exchange.of(view, markers).messages()


def render_prompt(messages: Sequence[Mapping[str, str]], bos: str | None = _BOS) -> str:
    """The prompt Llama Guard 3's chat template writes for ``messages`` (alternating, user
    first), ending at the assistant header: the model's first output is ``\n\n``."""
    judged = "Agent" if len(messages) % 2 == 0 else "User"
    categories = "\n".join(f"{code}: {name}." for code, name in PROMPT_CATEGORIES.items())
    turns = "".join(
        f"{'User' if index % 2 == 0 else 'Agent'}: {message['content'].strip()}\n\n"
        for index, message in enumerate(messages)
    )
    return (
        (bos or "")
        + _HEADER.format(role="user")
        + f"Task: Check if there is unsafe content in '{judged}' messages in conversations "
        "according our safety policy with the below categories.\n\n"
        f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>\n\n{turns}<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {judged} message in the above "
        "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line "
        "must include a comma-separated list of violated categories."
        + _EOT
        + _HEADER.format(role="assistant").rstrip("\n")
    )


def parse_categories(text: str) -> tuple[str, ...]:
    """The ``S<n>`` codes of a category line (``S1,S10``; spaces or commas), in order, once."""
    codes: list[str] = []
    for token in re.split(r"[,\s]+", text):
        if _CATEGORY_CODE.fullmatch(token):
            code = token.upper()
            if code not in codes:
                codes.append(code)
    return tuple(codes)


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
    return True, parse_categories(category_text)


def score_from_logprobs(logprobs: object) -> float | None:
    """``score_tokens`` of a chat-completions choice's ``logprobs`` object: ``{"content":
    [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}``.
    """
    return score_tokens(chat_logprobs(logprobs))


def score_tokens(tokens: Sequence[TokenLogprob]) -> float | None:
    """P(unsafe) / (P(unsafe) + P(safe)) at the first generated word, or None if not known.

    Leading whitespace tokens (the ``\\n\\n`` Llama Guard emits first) are skipped. Every top
    entry that strips to ``safe`` / ``unsafe`` (any case) counts towards that word; a word absent
    from the top list counts as probability 0; with both absent, or no logprobs, None.
    """
    first = next((token for token in tokens if token.token.strip()), None)
    if first is None:
        return None
    candidates = list(first.top)
    # The sampled token itself belongs to the distribution even if a server left it out of
    # top_logprobs (OpenAI's spec lets top lists be short).
    if not any(token == first.token for token, _ in candidates):
        candidates.append((first.token, first.logprob))
    mass = {"safe": 0.0, "unsafe": 0.0}
    seen = False
    for token, logprob in candidates:
        word = token.strip().lower()
        if word in mass:
            mass[word] += math.exp(min(logprob, 0.0))
            seen = True
    total = mass["safe"] + mass["unsafe"]
    if not seen or total <= 0.0:
        return None
    return mass["unsafe"] / total


def describe(categories: Sequence[str]) -> str:
    """``S9 (Indiscriminate Weapons), S1 (Violent Crimes)`` for logs and audit records."""
    return ", ".join(f"{code} ({CATEGORIES[code]})" if code in CATEGORIES else code
                     for code in categories)


class LlamaGuard(Family):
    name = "llama-guard"
    default_model = DEFAULT_MODEL
    markers = MARKERS

    def prompts(self, runner: HFRunner, exchange: Exchange) -> list[str]:
        """The template's prompt and the ``\\n\\n`` the model writes before its verdict."""
        messages = exchange.messages()
        rendered = runner.render_chat(messages, add_generation_prompt=False)
        if rendered is None:
            rendered = render_prompt(messages, runner.tokenizer.bos_token)
        return [rendered if rendered.endswith("\n\n") else rendered + "\n\n"]

    async def read_local(self, runner: HFRunner, exchange: Exchange,
                         threshold: float) -> Reading:
        (prompt,) = self.prompts(runner, exchange)
        p_unsafe, p_safe = await runner.score(prompt, runner.continuation_ids(prompt, ANSWERS))
        score = yes_share(p_unsafe, p_safe)
        text_unsafe = p_unsafe > p_safe
        categories: tuple[str, ...] = ()
        raw = "unsafe" if text_unsafe else "safe"
        if score >= threshold:
            continuation = await runner.generate(prompt + "unsafe\n", CATEGORY_TOKENS)
            line = continuation.text.strip().splitlines()
            categories = parse_categories(line[0]) if line else ()
            raw = "unsafe\n" + continuation.text.strip()
        return Reading(text_unsafe=text_unsafe, score=score, categories=categories, raw=raw,
                       score_source="logits", extra={"p_answer": f"{p_unsafe + p_safe:.4f}"})

    def requests(self, exchange: Exchange) -> list[TextRequest]:
        messages = exchange.messages()
        # No BOS in the fallback: the engine's tokenizer adds its own to a text prompt.
        return [ChatRequest(tuple(messages), MAX_TOKENS,
                            fallback_prompt=render_prompt(messages, bos=None))]

    def read_text(self, exchange: Exchange, completions: Sequence[Completion],
                  threshold: float) -> Reading:
        (completion,) = completions
        text_unsafe, categories = parse_verdict(completion.text)
        return Reading(text_unsafe=text_unsafe, score=score_tokens(completion.tokens),
                       categories=categories, raw=completion.text, score_source="logprobs")
