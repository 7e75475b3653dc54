"""``guard.kind: granite-guardian``: IBM Granite Guardian 3.x: its risk, markers and answer.

``guard.options.risk`` picks the risk judged (``harm`` by default; ``jailbreak``, ``social_bias``,
``violence``, ``profanity``, ``sexual_content``, ``unethical_behavior``...), passed to the model's
chat template as ``guardian_config``; ``guard.options.guardian_config`` passes a mapping as is
(Granite Guardian 3.3: ``{criteria_id: harm}``). A flagged step's category is the risk's name.

The prompt is the model's chat template, which takes the risk to judge as
``guardian_config={"risk_name": "harm"}`` (3.0-3.2; 3.3 names it ``criteria_id``); there is no
hand-written fallback, since the template is what defines each risk. ``[user]`` judges the
prompt, ``[user, assistant]`` the response.

Output shapes, by version::

    Yes                                    3.0, 3.1
    Yes\\n<confidence> High </confidence>   3.2
    <score> yes </score>                   3.3 (after <think>...</think> in thinking mode)

``Yes`` means the risk is present (unsafe). In-process (3.0-3.2, whose first answer token is
``Yes`` or ``No``) a check is one forward pass and the score P(Yes) / (P(Yes) + P(No)), the model
card's recipe; from a text runner, any version's answer is parsed and scored from the yes/no
word's logprobs.
"""

from __future__ import annotations

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

DEFAULT_MODEL = "ibm-granite/granite-guardian-3.1-2b"
DEFAULT_RISK = "harm"
ANSWER_TOKENS = 20
"""Room for ``Yes`` plus 3.2's confidence tag (3.3 in thinking mode needs a larger limit)."""

MARKERS = Markers(
    literals=(
        "<start_of_risk_definition>", "<end_of_risk_definition>",
        "<start_of_conversation>", "<end_of_conversation>",
        "You are a safety agent trying to help determine",
        "Our safety risk definition is defined below",
        "Your answer must be either",
    ),
    tokens=("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>", "<|tool_call|>"),
    line_keys=(
        r"user\s+message\s*:", r"assistant\s+message\s*:", r"context\s*:",
        r"(?:yes|no)\s*$",  # a verdict line
        r"</?score>", r"</?confidence>",
        r"is\s+the\s+(?:user|assistant)\s+message\s+harmful",
    ),
)
"""What judged text must not imitate in a Granite Guardian prompt."""


def guardian_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """``guard.options.guardian_config`` as given (e.g. ``{"criteria_id": "harm"}`` for 3.3),
    else ``{"risk_name": guard.options.risk}`` (default ``harm``)."""
    given = options.get("guardian_config")
    if given is not None:
        if not isinstance(given, dict) or not given:
            raise ConfigError("guard.options.guardian_config: expected a non-empty mapping, e.g. "
                              "{risk_name: harm}")
        return dict(given)
    risk = options.get("risk", DEFAULT_RISK)
    if not isinstance(risk, str) or not risk.strip():
        raise ConfigError("guard.options.risk: expected a risk name such as harm, jailbreak, "
                          "social_bias, violence, profanity, sexual_content, unethical_behavior")
    return {"risk_name": risk.strip()}


def risk_label(config: Mapping[str, Any]) -> str:
    """The name a flagged step's category gets: the risk (or criteria) judged."""
    for key in ("risk_name", "criteria_id"):
        if isinstance(config.get(key), str):
            return str(config[key])
    return "risk"


@dataclass(frozen=True)
class GraniteOutput:
    risky: bool
    answer_at: int
    """Where the yes/no word starts in the text (to find its logprobs)."""
    confidence: str | None


_THINK = re.compile(r"^\s*<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_SCORE = re.compile(r"<score>\s*(yes|no)\s*</score>", re.IGNORECASE)
_FIRST_WORD = re.compile(r"\s*(yes|no)\b", re.IGNORECASE)
_CONFIDENCE = re.compile(r"<confidence>\s*(\w+)\s*</confidence>", re.IGNORECASE)
_RAW_IN_ERRORS = 200


def parse_output(text: str) -> GraniteOutput:
    """Read any version's answer; GuardError (with the raw text) when there is no yes/no."""
    think = _THINK.match(text)
    offset = think.end() if think else 0
    match = _SCORE.search(text, offset) or _FIRST_WORD.match(text, offset)
    if match is None:
        shown = repr(text[:_RAW_IN_ERRORS]) + (f"... ({len(text)} chars)"
                                                if len(text) > _RAW_IN_ERRORS else "")
        raise GuardError(f"granite-guardian: output is neither 'Yes' nor 'No': {shown}")
    confidence = _CONFIDENCE.search(text, match.end())
    return GraniteOutput(
        risky=match.group(1).lower() == "yes",
        answer_at=match.start(1),
        confidence=confidence.group(1).capitalize() if confidence else None,
    )


class GraniteGuardian(Family):
    name = "granite-guardian"
    default_model = DEFAULT_MODEL
    markers = MARKERS
    options = ("risk", "guardian_config")

    def __init__(self, options: Mapping[str, Any]) -> None:
        self.guardian_config = guardian_config(options)
        self.risk = risk_label(self.guardian_config)

    def prompts(self, runner: HFRunner, exchange: Exchange) -> list[str]:
        rendered = runner.render_chat(exchange.messages(), add_generation_prompt=True,
                                      guardian_config=self.guardian_config)
        if rendered is None:
            raise ConfigError(
                f"guard.model: the tokenizer of {runner.model_name} has no chat template; "
                "Granite Guardian's risk definitions live in it"
            )
        return [rendered]

    async def read_local(self, runner: HFRunner, exchange: Exchange,
                         threshold: float) -> Reading:
        (prompt,) = self.prompts(runner, exchange)
        p_yes, p_no = await runner.score(prompt, runner.continuation_ids(prompt, ("Yes", "No")))
        return Reading(text_unsafe=p_yes > p_no, score=yes_share(p_yes, p_no),
                       categories=(self.risk,), raw="Yes" if p_yes > p_no else "No",
                       score_source="logits", extra={"risk": self.risk})

    def requests(self, exchange: Exchange) -> list[TextRequest]:
        # No fallback prompt: the risk definitions live in the model's own template.
        return [ChatRequest(tuple(exchange.messages()), ANSWER_TOKENS,
                            template_kwargs={"guardian_config": self.guardian_config})]

    def read_text(self, exchange: Exchange, completions: Sequence[Completion],
                  threshold: float) -> Reading:
        (completion,) = completions
        output = parse_output(completion.text)
        probabilities = answer_probabilities(completion, output.answer_at, ("yes", "no"))
        extra = {"risk": self.risk}
        if output.confidence:
            extra["confidence"] = output.confidence
        return Reading(text_unsafe=output.risky,
                       score=None if probabilities is None else probabilities["yes"],
                       categories=(self.risk,), raw=completion.text, score_source="logprobs",
                       extra=extra)
