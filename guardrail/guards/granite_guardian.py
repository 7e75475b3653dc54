"""``guard.kind: granite-guardian``: IBM Granite Guardian 3.x, in-process or over an endpoint.

``guard.options.risk`` picks the risk judged (``harm`` by default; ``jailbreak``, ``social_bias``,
``violence``, ``profanity``, ``sexual_content``, ``unethical_behavior``...), passed to the model's
chat template as ``guardian_config``; ``guard.options.guardian_config`` passes a mapping as is
(Granite Guardian 3.3: ``{criteria_id: harm}``). A flagged step's category is the risk's name.

In-process (3.0-3.2, whose first answer token is ``Yes`` or ``No``): one forward pass over the
templated prompt; the score is P(Yes) / (P(Yes) + P(No)), the model card's recipe.

Endpoint (``guard.url``): one chat request with ``chat_template_kwargs.guardian_config``; the
answer (any version's shape) is parsed and scored from the yes/no word's logprobs.
"""

from __future__ import annotations

from guardrail.config import GuardConfig
from guardrail.errors import ConfigError
from guardrail.guards.base import Guard, GuardView
from guardrail.guards.chat_endpoint import answer_probabilities
from guardrail.guards.generative_base import EndpointGuard, LocalGuard, Reading, chat_messages
from guardrail.guards.granite_guardian_format import (
    DEFAULT_MODEL,
    MARKERS,
    OPTIONS,
    guardian_config,
    parse_output,
    risk_label,
)

ANSWER_TOKENS = 20
"""Room for ``Yes`` plus 3.2's confidence tag (3.3 in thinking mode needs a larger limit)."""


def create_granite_guardian(config: GuardConfig) -> Guard:
    """The endpoint variant when ``guard.url`` is set, the in-process one otherwise."""
    if config.url:
        return GraniteGuardianEndpoint(config)
    return GraniteGuardianLocal(config)


class GraniteGuardianLocal(LocalGuard):
    name = "granite-guardian"
    options = OPTIONS

    def __init__(self, config: GuardConfig) -> None:
        super().__init__(config, default_model=DEFAULT_MODEL, markers=MARKERS)
        self.guardian_config = guardian_config(config.options)
        self.risk = risk_label(self.guardian_config)

    def prompt(self, view: GuardView) -> str:
        rendered = self.runner.render_chat(
            chat_messages(view, self.neutralise), add_generation_prompt=True,
            guardian_config=self.guardian_config,
        )
        if rendered is None:
            raise ConfigError(
                f"guard.model: the tokenizer of {self.model} has no chat template; Granite "
                "Guardian's risk definitions live in it"
            )
        return rendered

    async def _read(self, view: GuardView) -> Reading:
        prompt = self.prompt(view)
        ids = self.runner.continuation_ids(prompt, ("Yes", "No"))
        p_yes, p_no = await self.runner.score(prompt, ids)
        score = p_yes / (p_yes + p_no) if p_yes + p_no > 0 else 0.5
        return Reading(text_unsafe=p_yes > p_no, score=score,
                       categories=(self.risk,), raw="Yes" if p_yes > p_no else "No",
                       score_source="logits", extra={"risk": self.risk})


class GraniteGuardianEndpoint(EndpointGuard):
    name = "granite-guardian"
    options = OPTIONS

    def __init__(self, config: GuardConfig) -> None:
        super().__init__(config, default_model=DEFAULT_MODEL, markers=MARKERS)
        self.guardian_config = guardian_config(config.options)
        self.risk = risk_label(self.guardian_config)

    async def _read(self, view: GuardView) -> Reading:
        completion = await self.endpoint.chat(
            chat_messages(view, self.neutralise), max_tokens=ANSWER_TOKENS,
            template_kwargs={"guardian_config": self.guardian_config},
        )
        output = parse_output(completion.text)
        probabilities = answer_probabilities(completion, output.answer_at, ("yes", "no"))
        extra = {"risk": self.risk}
        if output.confidence:
            extra["confidence"] = output.confidence
        return Reading(text_unsafe=output.risky,
                       score=None if probabilities is None else probabilities["yes"],
                       categories=(self.risk,), raw=completion.text, score_source="logprobs",
                       extra=extra)
