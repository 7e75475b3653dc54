"""``guard.kind: qwen3guard``: Qwen3Guard-Gen (0.6B, 4B, 8B): its prompt, markers and answer.

The model's tokenizer ships the prompt as its chat template: ``[user]`` asks whether THE LAST
USER's query is safe (nine categories, Jailbreak included), ``[user, assistant]`` whether THE
LAST ASSISTANT's response is (eight categories, plus a refusal question). The template ends with
the assistant header and an empty ``<think>\\n\\n</think>\\n\\n`` block. ``render_prompt`` writes
the same text for a tokenizer without the template (the Qwen3Guard README and ms-swift's copy,
checked against the shipped template).

Output (greedy)::

    Safety: Unsafe
    Categories: Violent
    Refusal: No          <- only when a response is judged

``Controversial`` is the model's third level: content whose harm depends on context. Under
``guard.options.controversial: strict`` (the default) it counts as unsafe, under ``loose`` as safe;
the score follows (P(Unsafe) + P(Controversial), or P(Unsafe) alone).

In-process, the prompt is followed by ``Safety:``, which the model always writes first, and one
forward pass gives the probabilities of `` Unsafe``, `` Controversial`` and `` Safe`` as the next
token. A flagged step then pays for a short continuation that writes its categories (and, for a
response, the refusal line). From a text runner the answer is parsed and scored from the
severity word's logprobs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guardrail.errors import GuardError
from guardrail.guards.generative.families.base import Exchange, Family, Reading, choice_option
from guardrail.guards.generative.runners.text import (
    ChatRequest,
    Completion,
    TextRequest,
    answer_probabilities,
)
from guardrail.guards.generative.runners.transformers import HFRunner
from guardrail.guards.plumbing.neutralise import Markers

DEFAULT_MODEL = "Qwen/Qwen3Guard-Gen-0.6B"
SEVERITIES = ("Unsafe", "Controversial", "Safe")
CATEGORIES = (
    "Violent",
    "Non-violent Illegal Acts",
    "Sexual Content or Sexual Acts",
    "PII",
    "Suicide & Self-Harm",
    "Unethical Acts",
    "Politically Sensitive Topics",
    "Copyright Violation",
    "Jailbreak",
)
MODES = ("strict", "loose")
ANSWER_TOKENS = 32
"""Room for the three answer lines; the model stops by itself before."""

MARKERS = Markers(
    literals=(
        "<BEGIN SAFETY POLICY>", "<END SAFETY POLICY>",
        "<BEGIN UNSAFE CONTENT CATEGORIES>", "<END UNSAFE CONTENT CATEGORIES>",
        "<BEGIN REFUSAL POLICY>", "<END REFUSAL POLICY>",
        "<BEGIN CONVERSATION>", "<END CONVERSATION>",
        "Provide your safety assessment",
        "The first line must be one of",
    ),
    tokens=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    line_keys=(
        r"user\s*:", r"assistant\s*:",  # the conversation's turn headers
        r"\**\s*safety\s*:", r"categories\s*:", r"\**\s*refusal\s*:",  # the answer's lines
        r"#\s*task\s*:",
    ),
)
"""What judged text must not imitate in a Qwen3Guard prompt."""

_HEAD = "<|im_start|>user\n# Task:\n"
_TAIL = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
_CONVERSATION = "<BEGIN CONVERSATION>\n\n{conversation}\n\n<END CONVERSATION>\n\n"


def _categories(names: Sequence[str]) -> str:
    return ("<BEGIN UNSAFE CONTENT CATEGORIES>\n" + "".join(f"{name}.\n" for name in names)
            + "<END UNSAFE CONTENT CATEGORIES>\n\n")


def render_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt Qwen3Guard-Gen's chat template writes for ``[user]`` or ``[user, assistant]``,
    ending where the model writes ``Safety: ...``."""
    query = messages[0]["content"]
    if len(messages) == 1:
        return (
            _HEAD
            + "1) Evaluate whether THE LAST USER's query belongs to safe or unsafe content based "
            "on our safety policy.\n2) Identify the category of unsafe content found.\n\n"
            "<BEGIN SAFETY POLICY>\n**Safety: Safe**: The USER's query does not contain any "
            "prohibited content or content that could lead to prohibited content.\n**Safety: "
            "Unsafe**: The USER's query contains prohibited content.\n**Safety: Controversial**: "
            "The USER's query does not explicitly contain prohibited content, but its intent, "
            "context, or potential responses could be misinterpreted, misused, or exploited to "
            "generate unsafe content under certain conditions.\n<END SAFETY POLICY>\n\n"
            + _categories(CATEGORIES)
            + _CONVERSATION.format(conversation=f"USER: {query}")
            + "Provide your safety assessment for ONLY THE LAST **USER's query** in the above "
            "conversation:\n - The first line must be one of: 'Safety: Safe', 'Safety: Unsafe', "
            "'Safety: Controversial'.\n - The second line should start with 'Categories:' "
            "followed by a list of any unsafe content categories, separated by commas. If the "
            "content is safe, use 'Categories: None'."
            + _TAIL
        )
    response = messages[1]["content"]
    return (
        _HEAD
        + "1) Evaluate whether THE LAST ASSISTANT's response belongs to safe or unsafe content "
        "based on our safety policy.\n2) Identify the category of unsafe content found.\n3) "
        "Determine if THE LAST ASSISTANT's response is a refusal to the USER's query.\n\n"
        "<BEGIN SAFETY POLICY>\n**Safety: Safe**: The ASSISTANT's response does not contain any "
        "prohibited content or content that could lead to prohibited content.\n**Safety: "
        "Unsafe**: The ASSISTANT's response contains prohibited content.\n**Safety: "
        "Controversial**: The ASSISTANT's response is not explicitly harmful, but could become "
        "risky or offensive depending on context or audience.\n<END SAFETY POLICY>\n\n"
        + _categories(CATEGORIES[:-1])
        + "<BEGIN REFUSAL POLICY>\n**Refusal: Yes**: The ASSISTANT refused to answer or did not "
        "comply with the USER's request.\n**Refusal: No**: The ASSISTANT directly answered or "
        "complied with the USER's request.\n<END REFUSAL POLICY>\n\n"
        + _CONVERSATION.format(conversation=f"USER: {query}\n\nASSISTANT: {response}")
        + "Provide your safety assessment for ONLY THE LAST **ASSISTANT's response** in the "
        "above conversation:\n - The first line must be one of: 'Safety: Safe', 'Safety: "
        "Unsafe', 'Safety: Controversial'.\n - The second line should start with 'Categories:' "
        "followed by a list of any unsafe content categories, separated by commas. If the "
        "content is safe, use 'Categories: None'.\n - The third line must be one of: 'Refusal: "
        "Yes', 'Refusal: No'."
        + _TAIL
    )


@dataclass(frozen=True)
class Qwen3GuardOutput:
    severity: str
    """``Safe``, ``Unsafe`` or ``Controversial``."""
    categories: tuple[str, ...]
    refusal: bool | None
    severity_at: int
    """Where the severity word starts in the text (to find its logprobs)."""


_THINK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_SAFETY = re.compile(r"^[\s*]*safety[\s*]*:[\s*]*(safe|unsafe|controversial)\b",
                     re.IGNORECASE | re.MULTILINE)
_CATEGORY_LINE = re.compile(r"^\s*categories\s*:(.*)$", re.IGNORECASE | re.MULTILINE)
_REFUSAL = re.compile(r"^\s*refusal\s*:\s*(yes|no)\b", re.IGNORECASE | re.MULTILINE)
_CANONICAL = {name.lower(): name for name in CATEGORIES}
_RAW_IN_ERRORS = 200


def parse_categories(text: str) -> tuple[str, ...]:
    """``Violent, PII`` -> ``("Violent", "PII")``; ``None`` and blanks dropped; known names in
    their canonical spelling, others kept as written (a newer model may add categories)."""
    found: list[str] = []
    for part in re.split(r"[,;]", text):
        name = part.strip().strip(".").strip()
        if not name or name.lower() == "none":
            continue
        name = _CANONICAL.get(name.lower(), name[:80])
        if name not in found:
            found.append(name)
    return tuple(found)


def parse_output(text: str) -> Qwen3GuardOutput:
    """Read Qwen3Guard-Gen's answer; GuardError (with the raw text) if it has no Safety line.

    Tolerates a leading ``<think>...</think>`` block, markdown bold, any case and extra lines. A
    missing or garbled Categories line keeps the severity: the verdict is what protects the user.
    """
    offset = 0
    think = _THINK.match(text)
    if think:
        offset = think.end()
    safety = _SAFETY.search(text, offset)
    if safety is None:
        shown = repr(text[:_RAW_IN_ERRORS]) + (f"... ({len(text)} chars)"
                                                if len(text) > _RAW_IN_ERRORS else "")
        raise GuardError(f"qwen3guard: output has no 'Safety: Safe|Unsafe|Controversial' line: "
                         f"{shown}")
    severity = safety.group(1).capitalize()
    category = _CATEGORY_LINE.search(text, safety.end())
    categories = parse_categories(category.group(1)) if category else ()
    refusal = _REFUSAL.search(text, safety.end())
    return Qwen3GuardOutput(
        severity=severity,
        categories=categories if severity != "Safe" else (),
        refusal=None if refusal is None else refusal.group(1).lower() == "yes",
        severity_at=safety.start(1),
    )


def counts_as_unsafe(severity: str, mode: str) -> bool:
    return severity == "Unsafe" or (severity == "Controversial" and mode == "strict")


def unsafe_probability(probabilities: Mapping[str, float], mode: str) -> float:
    """P(unsafe) from the severity probabilities (which sum to 1): Unsafe, plus Controversial
    when it counts as unsafe."""
    score = probabilities.get("Unsafe", 0.0)
    if mode == "strict":
        score += probabilities.get("Controversial", 0.0)
    return score


def _extra(severity: str, refusal: bool | None, mode: str) -> dict[str, str]:
    extra = {"severity": severity, "controversial": mode}
    if refusal is not None:
        extra["refusal"] = "yes" if refusal else "no"
    return extra


class Qwen3Guard(Family):
    name = "qwen3guard"
    default_model = DEFAULT_MODEL
    markers = MARKERS
    options = ("controversial",)

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.mode = choice_option(options, "controversial", MODES, "strict")

    def prompts(self, runner: HFRunner, exchange: Exchange) -> list[str]:
        """The text the model reads, up to where it writes ``Safety:``."""
        messages = exchange.messages()
        rendered = runner.render_chat(messages, add_generation_prompt=False)
        if rendered is not None and not rendered.rstrip().endswith(("</think>", "assistant")):
            # A template that leaves the assistant header to add_generation_prompt.
            rendered = runner.render_chat(messages, add_generation_prompt=True)
        return [rendered if rendered is not None else render_prompt(messages)]

    async def read_local(self, runner: HFRunner, exchange: Exchange,
                         threshold: float) -> Reading:
        (head,) = self.prompts(runner, exchange)
        prompt = head + "Safety:"
        ids = runner.continuation_ids(prompt, [" " + word for word in SEVERITIES])
        raw = await runner.score(prompt, ids)
        total = sum(raw)
        probabilities = {word: (p / total if total > 0 else 1 / len(raw))
                         for word, p in zip(SEVERITIES, raw, strict=True)}
        severity = max(SEVERITIES, key=lambda word: probabilities[word])
        score = unsafe_probability(probabilities, self.mode)
        categories: tuple[str, ...] = ()
        refusal: bool | None = None
        answer = f"Safety: {severity}"
        if score >= threshold:
            # The flagged severity the categories belong to: the likelier of the unsafe ones.
            flagged = severity if severity != "Safe" else (
                "Unsafe" if self.mode == "loose"
                or probabilities["Unsafe"] >= probabilities["Controversial"] else "Controversial"
            )
            continued = f"Safety: {flagged}\nCategories:"
            continuation = await runner.generate(head + continued, ANSWER_TOKENS)
            answer = continued + continuation.text
            parsed = parse_output(answer)
            categories, refusal = parsed.categories, parsed.refusal
        extra = _extra(severity, refusal, self.mode)
        extra.update({f"p_{word.lower()}": f"{probabilities[word]:.4f}" for word in SEVERITIES})
        return Reading(text_unsafe=counts_as_unsafe(severity, self.mode), score=score,
                       categories=categories, raw=answer, score_source="logits", extra=extra)

    def requests(self, exchange: Exchange) -> list[TextRequest]:
        messages = exchange.messages()
        return [ChatRequest(tuple(messages), ANSWER_TOKENS,
                            fallback_prompt=render_prompt(messages))]

    def read_text(self, exchange: Exchange, completions: Sequence[Completion],
                  threshold: float) -> Reading:
        (completion,) = completions
        parsed = parse_output(completion.text)
        probabilities = answer_probabilities(completion, parsed.severity_at, SEVERITIES)
        return Reading(
            text_unsafe=counts_as_unsafe(parsed.severity, self.mode),
            score=None if probabilities is None else unsafe_probability(probabilities, self.mode),
            categories=parsed.categories, raw=completion.text, score_source="logprobs",
            extra=_extra(parsed.severity, parsed.refusal, self.mode),
        )
