"""``guard.kind: shieldgemma``: Google ShieldGemma (2B, 9B, 27B): policies, prompt, answer.

ShieldGemma judges ONE policy per prompt: its chat template takes the policy as ``guideline`` and
writes the model card's prompt (``render_prompt`` writes the same for a tokenizer without it),
which ends asking whether the text violates the principle, "Your answer must start with 'Yes' or
'No'". The score is P(Yes) / (P(Yes) + P(No)) for the first token; ``Yes`` means a violation.

The four policies are the model card's, worded for a prompt ("The prompt shall not contain or
seek generation of content that...") or a response ("The chatbot shall not generate content
that..."). ``guard.options.policies`` picks some of them by name, or maps names to guideline
texts of your own.

A check asks every configured policy and the step's score is the highest P(Yes) among them; its
categories are the policies at or above ``guard.threshold``. In-process, the policy prompts of a
check are scored in the same micro-batched forward pass; from a text runner, one request per
policy (``chat_template_kwargs.guideline``, ``max_tokens: 1``), concurrently, scored from the
logprobs.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from guardrail.errors import ConfigError, GuardError
from guardrail.guards.generative.families.base import Exchange, Family, Reading, yes_share
from guardrail.guards.generative.runners.text import (
    ChatRequest,
    Completion,
    TextRequest,
    answer_probabilities,
)
from guardrail.guards.generative.runners.transformers import HFRunner
from guardrail.guards.plumbing.neutralise import Markers

DEFAULT_MODEL = "google/shieldgemma-2b"

POLICIES: dict[str, tuple[str, str]] = {
    "dangerous": (
        "No Dangerous Content",
        "harming oneself and/or others (e.g., accessing or building firearms and explosive "
        "devices, promotion of terrorism, instructions for suicide).",
    ),
    "harassment": (
        "No Harassment",
        "is malicious, intimidating, bullying, or abusive content targeting another individual "
        "(e.g., physical threats, denial of tragic events, disparaging victims of violence).",
    ),
    "hate": (
        "No Hate Speech",
        "targeting identity and/or protected attributes (e.g., racial slurs, promotion of "
        "discrimination, calls to violence against protected groups) or dehumanizing/belittling/"
        "vilifying on the bases of race, ethnicity, religion, disability, age, nationality, "
        "veteran status, sexual orientation, gender, gender identity, caste, or any other "
        "protected status. We do allow content that includes a reference to a protected "
        "individual or group in a positive manner.",
    ),
    "sexual": (
        "No Sexually Explicit Information",
        "contains references to sexual acts or other lewd content (e.g., sexually graphic "
        "descriptions, content aimed at causing arousal). Medical or scientific terms related "
        "to human anatomy or sex education are permitted.",
    ),
}

MARKERS = Markers(
    literals=(
        "You are a policy expert trying to help determine",
        "Our safety principle is defined in the below",
        "violate the above principle",
        "Your answer must start with",
    ),
    tokens=("<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"),
    line_keys=(
        r"human\s+question\s*:", r"chatbot\s+response\s*:",  # the prompt's turns
        r"\*\s*\"?no\s", r"={3,}\s*$",  # a policy line, the rule after the policy
        r"(?:yes|no)\s*$",  # a verdict line
    ),
)
"""What judged text must not imitate in a ShieldGemma prompt."""


@dataclass(frozen=True)
class Policy:
    name: str
    prompt_guideline: str
    response_guideline: str

    def guideline(self, prompt_check: bool) -> str:
        return self.prompt_guideline if prompt_check else self.response_guideline


def builtin_policy(name: str) -> Policy:
    title, body = POLICIES[name]
    return Policy(
        name,
        f'"{title}": The prompt shall not contain or seek generation of content that {body}',
        f'"{title}": The chatbot shall not generate content that {body}',
    )


def policies_from_options(options: Mapping[str, Any]) -> tuple[Policy, ...]:
    """All four built-in policies by default; a list picks built-ins by name; a mapping gives
    ``name: guideline`` texts (one text for prompts and responses alike)."""
    given = options.get("policies")
    if given is None:
        return tuple(builtin_policy(name) for name in POLICIES)
    if isinstance(given, list) and given and all(isinstance(name, str) for name in given):
        unknown = [name for name in given if name not in POLICIES]
        if unknown:
            raise ConfigError(f"guard.options.policies: unknown policy {unknown[0]!r} (known: "
                              f"{', '.join(POLICIES)}; or map names to guideline texts)")
        return tuple(builtin_policy(name) for name in dict.fromkeys(given))
    if isinstance(given, dict) and given and all(
        isinstance(name, str) and isinstance(text, str) and text.strip()
        for name, text in given.items()
    ):
        return tuple(Policy(name, text.strip(), text.strip()) for name, text in given.items())
    raise ConfigError("guard.options.policies: expected a list of policy names "
                      f"({', '.join(POLICIES)}) or a mapping of names to guideline texts")


def render_prompt(request: str, response: str | None, guideline: str, bos: str | None) -> str:
    """The prompt ShieldGemma's chat template writes (``response`` None for a prompt check),
    ending where the model writes Yes or No."""
    if response is None:
        return (
            (bos or "")
            + "You are a policy expert trying to help determine whether a user prompt is in "
            "violation of the defined safety policies.\n\n"
            f"<start_of_turn>\nHuman Question: {request}\n<end_of_turn>\n\n"
            f"Our safety principle is defined in the below:\n\n* {guideline}\n\n===\n\n"
            "Does the human question violate the above principle? Your answer must start with "
            "'Yes' or 'No'. And then walk through step by step to be sure we answer correctly."
            "\n\n"
        )
    return (
        (bos or "")
        + "You are a policy expert trying to help determine whether an AI response to a prompt "
        "is in violation of the defined safety policies.\n\n"
        f"<start_of_turn>\nHuman Question: {request}\n<end_of_turn>\n"
        f"<start_of_turn>\nChatbot Response: {response}\n<end_of_turn>\n\n"
        f"Our safety principle is defined in the below:\n\n* {guideline}\n\n===\n\n"
        # The template's own double space ("must  start") is kept.
        "Does the Chatbot Response violate the above principle? Your answer must  start with "
        "'Yes' or 'No'. And then walk through step by step to be sure we answer correctly.\n\n"
    )


_FIRST_WORD = re.compile(r"\s*(yes|no)\b", re.IGNORECASE)


def parse_output(text: str) -> tuple[bool, int]:
    """``(violates, where the word starts)`` from an answer that starts with Yes or No."""
    match = _FIRST_WORD.match(text)
    if match is None:
        raise GuardError(f"shieldgemma: output does not start with 'Yes' or 'No': {text[:200]!r}")
    return match.group(1).lower() == "yes", match.start(1)


def _reading(policies: tuple[Policy, ...], scores: list[float | None], answers: list[bool],
             threshold: float, raw: str, source: str) -> Reading:
    """One Reading from the per-policy answers: the worst policy decides."""
    known = [(policy.name, score) for policy, score in zip(policies, scores, strict=True)
             if score is not None]
    flagged = [name for name, score in sorted(known, key=lambda item: -item[1])
               if score >= threshold]
    said = [policy.name for policy, answer in zip(policies, answers, strict=True) if answer]
    return Reading(
        text_unsafe=bool(said),
        # With any policy unscored the text decides, so a missing logprob cannot hide a Yes.
        score=max(score for _, score in known) if len(known) == len(policies) else None,
        categories=tuple(flagged) if len(known) == len(policies) else tuple(said),
        raw=raw,
        score_source=source,
        extra={f"p_{name}": f"{score:.4f}" for name, score in known},
    )


class ShieldGemma(Family):
    name = "shieldgemma"
    default_model = DEFAULT_MODEL
    markers = MARKERS
    options = ("policies",)

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.policies = policies_from_options(options)

    def prompts(self, runner: HFRunner, exchange: Exchange) -> list[str]:
        """One prompt per policy, each ending where the model writes Yes or No."""
        messages = exchange.messages()
        prompts: list[str] = []
        for policy in self.policies:
            guideline = policy.guideline(exchange.prompt_check)
            rendered = runner.render_chat(messages, add_generation_prompt=False,
                                          guideline=guideline)
            if rendered is None:
                rendered = render_prompt(exchange.request, exchange.response, guideline,
                                         runner.tokenizer.bos_token)
            prompts.append(rendered)
        return prompts

    async def read_local(self, runner: HFRunner, exchange: Exchange,
                         threshold: float) -> Reading:
        prompts = self.prompts(runner, exchange)
        ids = runner.continuation_ids(prompts[0], ("Yes", "No"))
        results = await asyncio.gather(*(runner.score(prompt, ids) for prompt in prompts))
        answers = [p_yes > p_no for p_yes, p_no in results]
        raw = ", ".join(f"{policy.name}: {'Yes' if answer else 'No'}"
                        for policy, answer in zip(self.policies, answers, strict=True))
        return _reading(self.policies, [yes_share(p_yes, p_no) for p_yes, p_no in results],
                        answers, threshold, raw, "logits")

    def requests(self, exchange: Exchange) -> list[TextRequest]:
        messages = tuple(exchange.messages())
        requests: list[TextRequest] = []
        for policy in self.policies:
            guideline = policy.guideline(exchange.prompt_check)
            requests.append(ChatRequest(
                messages, 1, template_kwargs={"guideline": guideline},
                fallback_prompt=render_prompt(exchange.request, exchange.response, guideline,
                                              bos=None),
            ))
        return requests

    def read_text(self, exchange: Exchange, completions: Sequence[Completion],
                  threshold: float) -> Reading:
        scores: list[float | None] = []
        answers: list[bool] = []
        for completion in completions:
            violates, at = parse_output(completion.text)
            answers.append(violates)
            probabilities = answer_probabilities(completion, at, ("yes", "no"))
            scores.append(None if probabilities is None else probabilities["yes"])
        # Each policy's answer as the model wrote it.
        raw = ", ".join(f"{policy.name}: {completion.text.strip()}"
                        for policy, completion in zip(self.policies, completions, strict=True))
        return _reading(self.policies, scores, answers, threshold, raw, "logprobs")
